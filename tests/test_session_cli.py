"""tc-session as a tool: options, exit codes, timing, the loop with tc-feedback, man page."""

import json
import queue
import re
import signal
import subprocess
import threading
import time

import cbor2
import pytest
import tc

from tcpcopylib.packet import (TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, build_tcp, ip_bytes,
                               parse_tcp)
from tcpcopylib.records import encode_section, header
from tcpcopylib.streamparse import StreamParser

MS = 1_000_000
C, O, T = ip_bytes("10.9.0.2"), ip_bytes("10.1.0.1"), ip_bytes("10.2.0.5")
CISN, SISN, TISN = 1000, 50000, 700000
MSS = b"\x02\x04\x05\xb4"
# Real-clock checks of when tc-session sends (the exact due times are checked on a fake clock
# in test_session_fast.py and below): a send may be this late on a loaded 2-core machine.
# Each check's spacing is chosen so that the faults it looks for are further off than this.
SLACK_MS = 150


def pkt(ts, *a, **kw):
    return {"t": "pkt", "ts": ts, "data": build_tcp(*a, **kw)}


def test_usage_errors_exit_2():
    for args in ([], ["--target", "10.0.0.1:80", "-x", "80-10.0.0.1:80"],
                 ["-x", "80-nohost:80"], ["--target", "10.0.0.1"],
                 ["--any-port", "-x", "80-10.0.0.1:80"], ["--target", "1.2.3.4:80", "-r", "0"],
                 ["--target", "1.2.3.4:80", "-t", "0"], ["--target", "1.2.3.4:80", "--drain", "-1"],
                 ["--target", "1.2.3.4:80", "--timeout", "x"]):
        r = tc.call(["tc-session", "--no-feedback", *args], input=tc.stream([]))
        assert r.returncode == 2, args
        assert b"tc-session: error" in r.stderr


def test_feedback_unreachable_exits_69(tmp_path):
    r = tc.call(["tc-session", "--target", "10.0.0.1:80", "--feedback",
                 f"unix:{tmp_path}/none.sock"], input=tc.stream([]))
    assert r.returncode == 69
    assert b"cannot connect to tc-feedback" in r.stderr


@pytest.mark.parametrize("batch", [1, 4])
def test_offline_offsets_kept_and_unknown_records_pass(tmp_path, batch):
    """(With -B 4 the packets go out as pkts batches; read back, they are the same.)"""
    t0 = 1_700_000_000 * 10**9
    recs = [pkt(t0, C, O, 5000, 80, CISN, 0, TH_SYN, options=MSS),
            {"t": "note", "x": 1},
            pkt(t0 + 300 * MS, C, O, 5001, 80, CISN, 0, TH_SYN, options=MSS),
            pkt(t0 + 600 * MS, C, O, 5002, 80, 5, 9, TH_ACK | TH_PSH, payload=b"mid"),
            pkt(t0 + 600 * MS, O, C, 80, 5000, SISN, CISN + 1, TH_SYN | TH_ACK)]
    js = tmp_path / "s.json"
    r = tc.call(["tc-session", "--target", "10.2.0.5:80", "--no-feedback",
                 "--connect-timeout", "0.2", "--stats", "--stats-json", js, "-v", "-B", batch],
                input=tc.stream(recs))
    assert r.returncode == 0, r.stderr
    assert (b"\x64pkts" in r.stdout) == (batch > 1)
    out = tc.decode(r.stdout)
    assert {"t": "note", "x": 1} in out
    syns = [(x["ts"], x["sid"], parse_tcp(x["data"])) for x in out
            if x["t"] == "pkt" and parse_tcp(x["data"]).flags == TH_SYN]
    assert [p.sport for _, _, p in syns] == [5000, 5001, 5002]
    assert [p.dst for _, _, p in syns] == [T] * 3
    assert len({sid for _, sid, _ in syns}) == 3
    gaps = [(b[0] - a[0]) / MS for a, b in zip(syns, syns[1:])]
    assert all(abs(g - 300) < SLACK_MS for g in gaps), gaps  # not 0 (unpaced), not 600
    st = json.loads(js.read_text())
    assert st["outcomes"]["no_synack"] == 3 and st["fake_syn"] == 1
    assert st["pkts_server"] == 1
    assert b"no SYN-ACK: check the route to the assistant" in r.stderr
    assert b"session 1 10.9.0.2:5000 -> 10.2.0.5:80: no_synack (" in r.stderr  # -v


def test_output_sections_carry_the_input_headers_keys():
    """tcpcopy-records(5): each input section starts an output section whose header is
    tc-session's, with the keys of the input's header (the source's interface, linktype,
    ...) and upstream naming the tool before; nothing before the input's header is read."""
    t0 = 1_700_000_000 * 10**9
    first = tc.stream([pkt(t0, C, O, 5000, 80, CISN, 0, TH_SYN, options=MSS)],
                      tool="tc-capture", source="eth7", linktype=101, tool_version="0.0")
    second = tc.stream([{"t": "note", "x": 2}], tool="tc-readpcap", source="b.pcap")
    r = tc.call(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "--asap",
                 "--drain", "0"], input=first + second)
    assert r.returncode == 0, r.stderr
    out = tc.decode(r.stdout, headers=True)
    headers = [x for x in out if x["t"] == "header"]
    assert [(h["tool"], h["upstream"], h["source"]) for h in headers] == [
        ("tc-session", "tc-capture", "eth7"), ("tc-session", "tc-readpcap", "b.pcap")]
    assert headers[0]["linktype"] == 101 and headers[0]["tool_version"] != "0.0"
    assert out[0] is headers[0] and {"t": "note", "x": 2} in out
    assert any(x["t"] == "pkt" for x in out)


def test_speed_replays_the_recording_faster(tmp_path):
    """-a/--speed F (TCPCopy's -a): sessions start at their recorded offsets divided by F."""
    t0 = 1_700_000_000 * 10**9
    recs = [pkt(t0 + i * 1200 * MS, C, O, 5000 + i, 80, CISN, 0, TH_SYN, options=MSS)
            for i in range(3)]
    r = tc.call(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "-a", "4",
                 "--connect-timeout", "0.2", "--drain", "0"], input=tc.stream(recs))
    assert r.returncode == 0, r.stderr
    syns = [x["ts"] for x in tc.decode(r.stdout) if x["t"] == "pkt"
            and parse_tcp(x["data"]).flags == TH_SYN]
    gaps = [(b - a) / MS for a, b in zip(syns[:3], syns[1:3])]
    # 300 ms: not 1200 (no speed-up), 75 (divided twice) or 0
    assert len(gaps) == 2 and all(abs(g - 300) < SLACK_MS for g in gaps), gaps
    bad = tc.call(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "-a", "0"],
                  input=tc.stream([]))
    assert bad.returncode == 2 and b"must be >= 0.001" in bad.stderr


def test_due_times_on_a_fake_clock():
    """The schedules the real-clock tests above check with SLACK_MS, exact: tc-session's
    input path (StreamParser in AS_PKT mode into a DueQueue) with a fake clock."""
    from tcpcopylib.records import AS_PKT, encode_pkts
    from tcpcopylib.session.timing import DueQueue

    def due_offsets(data, speed=1.0, reads=7):
        parser, q, now = StreamParser(), DueQueue(speed=speed), 10**18
        for j in range(0, len(data), reads):  # in pieces, as reads arrive
            q.push_records(parser.feed(data[j:j + reads], AS_PKT), now, lambda rec: None)
            now += 3 * MS  # the clock moves between reads; due times must not
        return [(due - q.q[0][0]) / MS for due, _ in q.q]

    t0 = 1_700_000_000 * 10**9
    syns = [pkt(t0 + i * 300 * MS, C, O, 5000 + i, 80, CISN, 0, TH_SYN) for i in range(3)]
    assert due_offsets(tc.stream(syns)) == [0, 300, 600]
    syns = [pkt(t0 + i * 1200 * MS, C, O, 5000 + i, 80, CISN, 0, TH_SYN) for i in range(3)]
    assert due_offsets(tc.stream(syns), speed=4) == [0, 300, 600]
    recs = [pkt(t0 + i * 400 * MS + k * MS // 4, C, O, 5000 + i, 80, CISN, 0, TH_SYN)
            for i in range(4) for k in range(2)]
    batched = encode_section(header("test")) + b"".join(
        encode_pkts([r["ts"] for r in recs[j:j + 3]], [r["data"] for r in recs[j:j + 3]])
        for j in range(0, len(recs), 3))
    want = [400 * i + k / 4 for i in range(4) for k in range(2)]
    assert due_offsets(tc.stream(recs)) == due_offsets(batched) == want


def test_batched_input_replays_like_single_packets():
    """tc-readpcap --batch output (pkts records) gives tc-session the same packets at the
    same recorded offsets as one pkt record each."""
    from tcpcopylib.records import encode_pkts

    t0 = 1_700_000_000 * 10**9
    recs = [pkt(t0 + i * 400 * MS + k * MS // 4, C, O, 5000 + i, 80, CISN, 0, TH_SYN,
                options=MSS) if k == 0 else
            pkt(t0 + i * 400 * MS + k * MS // 4, O, C, 80, 5000 + i, SISN, CISN + 1,
                TH_SYN | TH_ACK) for i in range(4) for k in range(2)]
    plain = tc.stream(recs)
    batched = encode_section(header("test")) + b"".join(
        encode_pkts([r["ts"] for r in recs[j:j + 3]], [r["data"] for r in recs[j:j + 3]])
        for j in range(0, len(recs), 3))
    runs = []
    for data in (plain, batched):
        r = tc.call(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "--stats",
                     "--connect-timeout", "0.2", "--drain", "0"], input=data)
        assert r.returncode == 0, r.stderr
        out = [x for x in tc.decode(r.stdout) if x["t"] == "pkt"]
        syns = [x["ts"] for x in out if parse_tcp(x["data"]).flags == TH_SYN]
        runs.append(([(x["sid"], x["data"]) for x in out],
                     [(ts - syns[0]) // MS for ts in syns],
                     re.search(rb"packets: .*", r.stderr).group()))
    assert runs[0][0] and runs[0][0] == runs[1][0]
    assert runs[1][2].startswith(b"packets: 8 in (0 ignored, 4 server->client")
    assert runs[0][2] == runs[1][2]
    for offsets in (runs[0][1], runs[1][1]):  # the SYNs 400 ms apart, as recorded
        assert len(offsets) == 4, offsets      # (not all at once: a batch's own ts)
        assert all(abs(o - 400 * i) < SLACK_MS for i, o in enumerate(offsets)), offsets


class Proc:
    """A tool with a stdin pipe and a reader thread decoding its stdout."""

    def __init__(self, args):
        self.p = subprocess.Popen([tc.tool_path(args[0]), *map(str, args[1:])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=tc.tool_env())
        self.q = queue.Queue()
        self.raw = bytearray()  # the stream as written
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        parser = StreamParser()
        while True:
            chunk = self.p.stdout.read1(65536)
            if not chunk:
                return
            self.raw += chunk
            for rec in parser.feed(chunk):
                self.q.put(rec)

    def send(self, data):
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def expect(self, pred, timeout=10):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                rec = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if rec.get("t") == "pkt":
                p = parse_tcp(rec["data"])
                if pred(p):
                    return p
        raise AssertionError("expected packet not seen")

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)


@pytest.fixture
def feedback(tmp_path):
    sock = tmp_path / "fb.sock"
    fb = subprocess.Popen([tc.tool_path("tc-feedback"), "--listen", f"unix:{sock}"],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    fb.stdin.write(encode_section(header("test-intercept")))
    fb.stdin.flush()

    def reply(*a, **kw):
        fb.stdin.write(cbor2.dumps({"t": "fb", "ts": time.time_ns(),
                                    "data": build_tcp(T, C, 80, 5000, *a, **kw)}))
        fb.stdin.flush()

    yield f"unix:{sock}", reply
    fb.kill()
    fb.wait(timeout=10)


@pytest.mark.parametrize("batch", [1, 8])
def test_full_loop_through_tc_feedback(tmp_path, feedback, batch):
    """Each packet goes out as soon as it is made, batched (-B 8) or not: every step
    waits for the one before."""
    addr, reply = feedback
    js = tmp_path / "s.json"
    s = Proc(["tc-session", "--target", "10.2.0.5:80", "--feedback", addr, "--asap",
              "--stats-json", js, "--drain", "5", "-B", batch])
    try:
        now = time.time_ns()
        s.send(tc.stream([
            pkt(now, C, O, 5000, 80, CISN, 0, TH_SYN, options=MSS),
            pkt(now, C, O, 5000, 80, CISN + 1, SISN + 1, TH_ACK),
            pkt(now, C, O, 5000, 80, CISN + 1, SISN + 1, TH_ACK | TH_PSH, payload=b"PING\n"),
            pkt(now, C, O, 5000, 80, CISN + 6, SISN + 6, TH_ACK | TH_FIN)]))
        syn = s.expect(lambda p: p.flags & TH_SYN)
        assert syn.seq == CISN and syn.dst == T
        reply(TISN, CISN + 1, TH_SYN | TH_ACK, options=MSS)
        data = s.expect(lambda p: p.payload)
        assert data.payload == b"PING\n" and data.ack == TISN + 1
        reply(TISN + 1, CISN + 6, TH_ACK | TH_PSH, payload=b"PONG\n")
        fin = s.expect(lambda p: p.flags & TH_FIN)
        assert fin.ack == TISN + 6 and fin.seq == CISN + 6
        reply(TISN + 6, CISN + 7, TH_ACK | TH_FIN)
        s.expect(lambda p: p.flags == TH_ACK and p.ack == TISN + 7)
        s.p.stdin.close()
        assert s.p.wait(timeout=10) == 0
        st = json.loads(js.read_text())
        assert st["outcomes"]["completed"] == 1 and st["active"] == 0
        assert st["gate_bytes"] == 1
        assert (b"\x64pkts" in s.raw) == (batch > 1)
    finally:
        s.stop()


def test_sigterm_drains_then_resets(tmp_path, feedback):
    addr, reply = feedback
    js = tmp_path / "s.json"
    s = Proc(["tc-session", "--target", "10.2.0.5:80", "--feedback", addr, "--asap",
              "--stats-json", js, "--drain", "0.5"])
    try:
        now = time.time_ns()
        s.send(tc.stream([
            pkt(now, C, O, 5000, 80, CISN, 0, TH_SYN, options=MSS),
            pkt(now, C, O, 5000, 80, CISN + 1, SISN + 1, TH_ACK | TH_PSH, payload=b"A"),
            pkt(now, C, O, 5000, 80, CISN + 2, SISN + 900, TH_ACK | TH_PSH, payload=b"B")]))
        s.expect(lambda p: p.flags & TH_SYN)
        reply(TISN, CISN + 1, TH_SYN | TH_ACK, options=MSS)
        s.expect(lambda p: p.payload == b"A")
        s.p.send_signal(signal.SIGTERM)
        rst = s.expect(lambda p: p.flags & TH_RST)
        assert rst.seq == CISN + 2
        assert s.p.wait(timeout=10) == 0
        st = json.loads(js.read_text())
        assert st["outcomes"]["unfinished"] == 1
    finally:
        s.stop()


def test_man_page_lints_and_lists_every_option():
    page = tc.REPO / "man" / "man1" / "tc-session.1"
    r = subprocess.run(["mandoc", "-Tlint", "-W", "warning", str(page)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = subprocess.run(["mandoc", "-Tutf8", str(page)], capture_output=True,
                          text=True).stdout
    text = re.sub(".\b", "", text)
    from tcpcopylib.cli.session import Tool

    opts = [o for a in Tool().build_parser()._actions for o in a.option_strings]
    missing = [o for o in opts if o not in text]
    assert not missing, missing
    for outcome in ("completed", "reconnected", "closed_early", "reset_by_target",
                    "no_synack", "capture_gap", "timed_out", "unfinished", "filtered"):
        assert outcome in text


def test_stats_every_and_sigusr1_while_running():
    """--stats-every prints the summary (the stats line, then "outcomes:" and the rest) every
    N s; SIGUSR1 prints the stats line alone, once, and the tool goes on."""
    s = Proc(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "--stats-every", "0.2",
              "--drain", "0.3"])
    err = []

    def read_stderr():
        for ln in s.p.stderr:
            err.append(ln.decode())

    def wait_for(cond, what, timeout=20):
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end and s.p.poll() is None, f"{what}: {''.join(err)}"
            time.sleep(0.05)

    stats = re.compile(r"^tc-session: \d+ sessions \(\d+ active, .* feedback$")

    def counts():
        """(stats lines, summaries) up to the end of the last whole summary: each summary
        has one stats line; SIGUSR1's lines are the rest (they may land between a summary's
        lines, so they are told apart by count, not place)."""
        lines = list(err)
        ends = [i for i, ln in enumerate(lines) if ln.startswith("tc-session: client ports:")]
        lines = lines[:ends[-1] + 1] if ends else []
        return (sum(1 for ln in lines if stats.match(ln)),
                lines.count("tc-session: outcomes:\n"))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        s.send(tc.stream([pkt(time.time_ns(), C, O, 5000, 80, CISN, 0, TH_SYN, options=MSS)]))
        s.expect(lambda p: p.flags & TH_SYN)
        wait_for(lambda: counts()[1] >= 2, "two periodic summaries")
        n_stats, n_summaries = counts()
        assert n_stats == n_summaries, err  # one stats line per summary, none alone yet
        s.p.send_signal(signal.SIGUSR1)
        wait_for(lambda: counts()[0] - counts()[1] >= 1, "the SIGUSR1 line")
        assert s.p.poll() is None, "SIGUSR1 must not end the tool"
        s.p.stdin.close()
        assert s.p.wait(timeout=20) == 0
        reader.join(timeout=10)
        n_stats, n_summaries = counts()
        assert n_stats - n_summaries == 1, err  # one SIGUSR1, one line
        alone = [ln for ln, nxt in zip(err, err[1:] + [""])
                 if stats.match(ln) and nxt != "tc-session: outcomes:\n"]
        assert len(alone) == 1 and alone[0].startswith("tc-session: 1 sessions ("), err
        assert "tc-session: 1 sessions (1 active" in "".join(err)
    finally:
        s.stop()


def test_input_from_a_regular_file(tmp_path):
    f = tmp_path / "in.cbor"
    f.write_bytes(tc.stream([pkt(0, C, O, 5000 + i, 80, CISN, 0, TH_SYN, options=MSS)
                             for i in range(3)]))
    for args, stdin in (([f], None), ([], f.read_bytes())):  # (call()'s stdin is a file)
        r = tc.call(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "--drain", "0",
                     *args], input=stdin)
        assert r.returncode == 0, r.stderr
        flags = [parse_tcp(x["data"]).flags for x in tc.decode(r.stdout)]
        assert flags == [TH_SYN] * 3 + [TH_RST] * 3  # SYNs, then aborted at the end
