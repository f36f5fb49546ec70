"""tc-diff --live without root: inputs fed bit by bit through FIFOs (and a file that grows),
lines out before the inputs end, memory back to nothing once connections are compared."""

import json
import os
import signal
import struct
import subprocess
import threading
import time

import cbor2

import tc
from diffdata import MS, Side, fb_records, sess_record
from tcpcopylib.records import encode_section, header

SERVER, TARGET = ("10.0.0.2", 80), ("10.9.0.2", 8080)
T0 = 1_700_000_000 * 10**9
REPLAY = 10**10  # the replay runs 10 s after the capture


def _http(body: bytes, extra: bytes = b"", date: bytes = b"Mon, 01 Jan 2024") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nDate: %s\r\n%sContent-Length: %d\r\n\r\n"
            % (date, extra, len(body)) + body)


def connection(c: int, copies=(0,), gap_ms: float = 2.0, other=lambda c, k: b""):
    """Connection c (one GET) as captured and as replayed by each copy: (original
    datagrams, fb records, sess records). ``other(c, k)`` adds header lines to copy k."""
    client = ("10.0.%d.%d" % (1 + c // 50000, 1 + c % 250), 20000 + c % 40000)
    o = Side(client, SERVER, T0 + int(c * gap_ms * MS))
    req = b"GET /item/%d HTTP/1.1\r\nHost: x\r\n\r\n" % c
    o.exchange(req, _http(b"item %d" % c), 3)
    o.close()
    fbs, maps = [], []
    for k in copies:
        r = Side((client[0], client[1] + 1 + k), TARGET, T0 + REPLAY + int(c * gap_ms * MS)
                 + k * MS, isn_s=5000 + k)
        r.exchange(req, _http(b"item %d" % c, other(c, k), b"Tue, 02 Jan 2024"), 4)
        r.close()
        fbs += fb_records(r)
        maps.append(sess_record(c * 10 + k, o, r, copy=k))
    return o.pkts, fbs, maps


def payload(pkts) -> int:
    """TCP payload bytes of these datagrams (IPv4 and TCP headers of 20 bytes each)."""
    return sum(len(p) - 40 for _, p in pkts)


def pcap_header() -> bytes:
    return struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 101)


def pcap_packets(pkts) -> bytes:
    return b"".join(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(p), len(p)) + p
                    for ts, p in pkts)


def records(recs) -> bytes:
    return b"".join(cbor2.dumps(r) for r in recs)


class Run:
    """tc-diff --live on three FIFOs; its stdout lines and stderr lines collected."""

    def __init__(self, tmp_path, *extra, orig_pcap=True):
        self.fifos = {k: tmp_path / k for k in ("orig", "map", "fb")}
        for p in self.fifos.values():
            os.mkfifo(p)
        self.proc = subprocess.Popen(
            [tc.tool_path("tc-diff"), "--live", str(self.fifos["orig"]), "-s",
             str(self.fifos["map"]), "-t", str(self.fifos["fb"]), *map(str, extra)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
        self.lines, self.err = [], []
        threading.Thread(target=self._collect, args=(self.proc.stdout, self.lines),
                         daemon=True).start()
        threading.Thread(target=self._collect, args=(self.proc.stderr, self.err),
                         daemon=True).start()
        self.w = {k: open(p, "wb") for k, p in self.fifos.items()}  # waits for the reader
        self.w["orig"].write(pcap_header() if orig_pcap else encode_section(header("test")))
        self.w["map"].write(encode_section(header("tc-session")))
        self.w["fb"].write(encode_section(header("tc-intercept")))
        self.orig_pcap = orig_pcap

    @staticmethod
    def _collect(f, out):
        for line in f:
            out.append(line.decode())

    def send(self, conns) -> None:
        pkts, fbs, maps = [], [], []
        for p, f, m in conns:
            pkts += p
            fbs += f
            maps += m
        pkts.sort(key=lambda x: x[0])
        if self.orig_pcap:
            self.w["orig"].write(pcap_packets(pkts))
        else:
            self.w["orig"].write(records({"t": "pkt", "ts": ts, "data": d} for ts, d in pkts))
        self.w["fb"].write(records(sorted(fbs, key=lambda r: r["ts"])))
        self.w["map"].write(records(maps))
        for f in self.w.values():
            f.flush()

    def wait_lines(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while len(self.lines) < n and time.monotonic() < end and self.proc.poll() is None:
            time.sleep(0.05)
        assert len(self.lines) >= n, (len(self.lines), n, "".join(self.err[-5:]))

    def status(self, timeout: float = 10) -> str:
        """The status line SIGUSR1 prints (as --progress does every 5 s)."""
        seen = len(self.err)
        self.proc.send_signal(signal.SIGUSR1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            new = [x for x in self.err[seen:] if " held" in x]
            if new:
                return new[-1]
            time.sleep(0.05)
        raise AssertionError("no status line")

    def close(self, timeout: float = 120):
        for f in self.w.values():
            f.close()
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # (the collectors read the last lines)
        return [json.loads(x) for x in self.lines], "".join(self.err)


def test_lines_come_out_while_the_inputs_are_open_and_memory_returns_to_nothing(tmp_path):
    n = 10_000
    run = Run(tmp_path, "--stats", "--stats-json", tmp_path / "s.json", "--no-learn")
    started = time.monotonic()
    half = n // 2
    for lo in range(0, half, 250):
        run.send(connection(c) for c in range(lo, lo + 250))
    run.wait_lines(half)  # every exchange of the first half, the inputs still open
    assert run.proc.poll() is None
    line = run.status()
    assert "0 open, %d compared" % half in line and "0.0 MB held" in line, line
    for lo in range(half, n, 250):
        run.send(connection(c) for c in range(lo, lo + 250))
    lines, err = run.close()
    took = time.monotonic() - started
    assert run.proc.returncode == 0, err[-2000:]
    assert len(lines) == n and {x["verdict"] for x in lines} == {"same"}
    assert sorted(x["conn"] for x in lines) == list(range(n))
    assert f"{n} exchanges on {n} connections: {n} same" in err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["same"] == n and stats["live"]["held_bytes"] == 0
    # what was held at the most is a small part of what went through
    total = n * payload(connection(0)[0]) * 2  # (about: the target's as much as the original)
    assert 0 < stats["live"]["peak_held_bytes"] < total / 4, stats["live"]
    print(f"\n{n} connections live in {took:.1f} s ({n / took:.0f} exchanges/s), peak held "
          f"{stats['live']['peak_held_bytes']} bytes")


def test_copies_noise_and_noise_learned_after_lines_were_written(tmp_path):
    """Connection 0 comes with copy 0 only (before any copy 1 is known): its line says
    different (X-Id); the later ones wait for their copy 1, learn X-Id as noise and say
    same; the summary and exit status apply the noise learned by the end."""
    def x_id(c, k):
        return b"X-Id: %d\r\n" % (c * 10 + k)
    run = Run(tmp_path, "--stats", orig_pcap=False)
    run.send([connection(0, (0,), other=x_id)])
    run.wait_lines(1)
    run.send(connection(c, (0, 1), other=x_id) for c in range(1, 40))
    run.wait_lines(40)
    lines, err = run.close()
    first = [x for x in lines if x["conn"] == 0]
    assert [x["verdict"] for x in first] == ["different"]
    assert [d["field"] for d in first[0]["differences"]] == ["header:x-id"]
    assert {x["verdict"] for x in lines if x["conn"]} == {"same"}
    assert {d["noise"] for x in lines if x["conn"] for d in x["noise"]
            if d["field"] == "header:x-id"} == {"learned"}
    assert "40 exchanges on 40 connections: 40 same, 0 different" in err, err
    assert "1 exchange(s) written as different are the same" in err
    assert run.proc.returncode == 0


def test_a_missing_session_and_a_failed_one(tmp_path):
    """A captured connection no session replays is missing (not_replayed) once the map
    has gone past it; one that failed is missing with its outcome; the others the same."""
    run = Run(tmp_path, "--wait", "0.5", "--no-learn")
    conns = [connection(c) for c in range(30)]
    o, _, _ = conns[3]
    conns[3] = (o, [], [])  # never replayed
    p, _, m = conns[5]
    conns[5] = (p, [], [dict(m[0], outcome="no_synack", conns=[], sent=[])])
    run.send(conns)
    run.wait_lines(30)  # the inputs still open: not_replayed from the map's progress
    lines, err = run.close()
    verdicts = {x["conn"]: (x["verdict"], x["outcome"]) for x in lines}
    assert verdicts.pop(3) == ("missing", "not_replayed")
    assert verdicts.pop(5) == ("missing", "no_synack")
    assert set(verdicts.values()) == {("same", "completed")}
    assert run.proc.returncode == 1


def test_follow_reads_files_as_they_grow(tmp_path):
    """--follow: regular files appended to by a writer; lines before the writer stops,
    the end once nothing grew for the given time."""
    paths = {k: tmp_path / f"{k}.bin" for k in ("orig", "map", "fb")}
    paths["orig"].write_bytes(pcap_header())
    paths["map"].write_bytes(encode_section(header("tc-session")))
    paths["fb"].write_bytes(encode_section(header("tc-intercept")))
    proc = subprocess.Popen([tc.tool_path("tc-diff"), "--follow", "3", paths["orig"], "-s",
                             paths["map"], "-t", paths["fb"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=tc.tool_env())
    out = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    for batch in range(3):
        cs = [connection(c) for c in range(batch * 20, batch * 20 + 20)]
        with open(paths["orig"], "ab") as f:
            f.write(pcap_packets(sorted((x for p, _, _ in cs for x in p),
                                        key=lambda x: x[0])))
        with open(paths["fb"], "ab") as f:
            f.write(records(sorted((r for _, fb, _ in cs for r in fb),
                                   key=lambda r: r["ts"])))
        with open(paths["map"], "ab") as f:
            f.write(records(r for _, _, m in cs for r in m))
        end = time.monotonic() + 20
        while len(out) < 20 * (batch + 1) and time.monotonic() < end:
            time.sleep(0.05)
        assert len(out) == 20 * (batch + 1) and proc.poll() is None
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert len(out) == 60


def test_a_whole_capture_read_ahead_of_a_slow_map_is_paused_not_dropped(tmp_path):
    """The original is a complete pcap file; the map and the replies come slowly through
    FIFOs. With --hold 200, the capture's reader pauses instead of holding every
    connection (or giving them up as not replayed): what is held stays near the hold and
    the read-ahead (inputs.QUEUE * inputs.BATCH datagrams, about 300 connections here)."""
    n = 3000
    conns = [connection(c) for c in range(n)]
    pcap = tmp_path / "orig.pcap"
    pcap.write_bytes(pcap_header() + pcap_packets(sorted(
        (x for p, _, _ in conns for x in p), key=lambda x: x[0])))
    fifos = {k: tmp_path / k for k in ("map", "fb")}
    for p in fifos.values():
        os.mkfifo(p)
    proc = subprocess.Popen([tc.tool_path("tc-diff"), "--live", "--hold", "200", "--no-learn",
                             "--stats-json", tmp_path / "s.json", pcap, "-s", fifos["map"],
                             "-t", fifos["fb"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=tc.tool_env())
    out = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    with open(fifos["map"], "wb") as m, open(fifos["fb"], "wb") as f:
        m.write(encode_section(header("tc-session")))
        f.write(encode_section(header("tc-intercept")))
        for lo in range(0, n, 50):
            f.write(records(r for _, fb, _ in conns[lo:lo + 50] for r in fb))
            m.write(records(r for _, _, mp in conns[lo:lo + 50] for r in mp))
            f.flush()
            m.flush()
            time.sleep(0.03)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    lines = [json.loads(x) for x in out]
    assert len(lines) == n and {x["verdict"] for x in lines} == {"same"}
    live = json.loads((tmp_path / "s.json").read_text())["live"]
    one = payload(conns[0][0])
    print(f"\npeak held {live['peak_held_bytes']} bytes, {live['peak_held_bytes'] / one:.0f} "
          f"connections of {n}")
    assert live["peak_held_bytes"] < 800 * one < n * one / 3, live


def test_live_on_whole_files_says_what_offline_says(tmp_path):
    """The same files, offline and --live (read side by side at full speed, each input
    running ahead of the others at times): the same lines (in another order) and the same
    aggregates; copies for noise, a few differing answers."""
    from diffdata import write_pcap, write_stream

    def x_id(c, k):
        return b"X-Id: %d\r\n" % (c * 10 + k)
    pk, fb, mp = [], [], []
    for c in range(4000):
        p, f, m = connection(c, (0, 1), other=x_id)
        if c % 397 == 5:
            f = [dict(r, data=r["data"].replace(b"item", b"itex")) for r in f]
        pk += p
        fb += f
        mp += m
    write_pcap(tmp_path / "o.pcap", pk)
    write_stream(tmp_path / "m.cbor", mp)
    write_stream(tmp_path / "f.cbor", sorted(fb, key=lambda r: r["ts"]))
    out = {}
    for mode in ("offline", "live"):
        r = tc.run(["tc-diff", tmp_path / "o.pcap", "-s", tmp_path / "m.cbor", "-t",
                    tmp_path / "f.cbor", "--stats-json", tmp_path / f"{mode}.json"]
                   + (["--live"] if mode == "live" else []), timeout=120)
        assert r.returncode == 1, r.stderr[-2000:]
        stats = json.loads((tmp_path / f"{mode}.json").read_text())
        for k in ("elapsed_s", "summary", "live"):
            stats.pop(k, None)
        out[mode] = (sorted(r.stdout.splitlines()), stats, r.stderr.splitlines()[:4])
    assert out["live"] == out["offline"]
    assert out["live"][1]["different"] == 11 and out["live"][1]["same"] == 3989


def test_any_order_of_inputs_gives_the_same_verdicts():
    """The engine alone, each input whole before the next, in every order (and ticks
    between): the inputs that ended first must not make the others' partners go."""
    import itertools

    from tcpcopylib.diff.core import Options
    from tcpcopylib.diff.live import LiveDiffer

    conns = [connection(c, (0, 1)) for c in range(20)]
    data = {"orig": sorted((x for p, _, _ in conns for x in p), key=lambda x: x[0]),
            "target": sorted(((r["ts"], r["data"]) for _, f, _ in conns for r in f),
                             key=lambda x: x[0]),
            "map": [r for _, _, m in conns for r in m]}
    for order in itertools.permutations(data):
        got = []
        d = LiveDiffer(Options(), got.extend)
        for kind in data:
            d.add_input(kind)
        for kind in order:
            d.feed(kind, 0, data[kind])
            d.settle()
            d.tick()
            d.end_input(kind)
            d.tick()
        d.finish()
        assert sorted((r.conn, r.verdict) for r in got) == [(c, "same") for c in range(20)], \
            order
        assert d.held_bytes() == 0 and not d.slots and d.unclaimed == 0


def test_ctrl_c_compares_what_came_and_reports(tmp_path):
    run = Run(tmp_path, "--no-learn")
    run.send(connection(c) for c in range(10))
    run.wait_lines(10)
    run.send([connection(10)[0:1] + ([], [])])  # a captured connection, nothing else yet
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=20) == 1  # the last one is missing: not replayed
    lines, err = run.close()
    assert len(lines) == 11 and lines[-1]["outcome"] == "not_replayed"
    assert "11 exchanges on 11 connections: 10 same, 0 different, 1 missing" in err, err
