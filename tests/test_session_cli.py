"""tc-session as a process: options, exit codes, timing, the loop with tc-feedback, man page."""

import json
import os
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


def pkt(ts, *a, **kw):
    return {"t": "pkt", "ts": ts, "data": build_tcp(*a, **kw)}


def test_usage_errors_exit_2():
    for args in ([], ["--target", "10.0.0.1:80", "-x", "80-10.0.0.1:80"],
                 ["-x", "80-nohost:80"], ["--target", "10.0.0.1"],
                 ["--any-port", "-x", "80-10.0.0.1:80"], ["--target", "1.2.3.4:80", "-r", "0"],
                 ["--target", "1.2.3.4:80", "-t", "0"], ["--target", "1.2.3.4:80", "--drain", "-1"],
                 ["--target", "1.2.3.4:80", "--timeout", "x"]):
        r = tc.run(["tc-session", "--no-feedback", *args], input=tc.stream([]))
        assert r.returncode == 2, args
        assert b"tc-session: error" in r.stderr


def test_feedback_unreachable_exits_69(tmp_path):
    r = tc.run(["tc-session", "--target", "10.0.0.1:80", "--feedback",
                f"unix:{tmp_path}/none.sock"], input=tc.stream([]))
    assert r.returncode == 69
    assert b"cannot connect to tc-feedback" in r.stderr


def test_bad_stream_exits_65():
    r = tc.run(["tc-session", "--target", "10.0.0.1:80", "--no-feedback"],
               input=b"not a stream at all")
    assert r.returncode == 65 and b"not a tcpcopy record stream" in r.stderr


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
    r = tc.run(["tc-session", "--target", "10.2.0.5:80", "--no-feedback",
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
    assert all(abs(g - 300) < 60 for g in gaps), gaps
    st = json.loads(js.read_text())
    assert st["outcomes"]["no_synack"] == 3 and st["fake_syn"] == 1
    assert st["pkts_server"] == 1
    assert b"no SYN-ACK: check the route to the assistant" in r.stderr
    assert b"session 1 10.9.0.2:5000 -> 10.2.0.5:80: no_synack (" in r.stderr  # -v


def test_speed_replays_the_recording_faster(tmp_path):
    """-a/--speed F (TCPCopy's -a): sessions start at their recorded offsets divided by F."""
    t0 = 1_700_000_000 * 10**9
    recs = [pkt(t0 + i * 400 * MS, C, O, 5000 + i, 80, CISN, 0, TH_SYN, options=MSS)
            for i in range(3)]
    r = tc.run(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "-a", "4",
                "--connect-timeout", "0.2", "--drain", "0"], input=tc.stream(recs))
    assert r.returncode == 0, r.stderr
    syns = [x["ts"] for x in tc.decode(r.stdout) if x["t"] == "pkt"
            and parse_tcp(x["data"]).flags == TH_SYN]
    gaps = [(b - a) / MS for a, b in zip(syns[:3], syns[1:3])]
    assert len(gaps) == 2 and all(abs(g - 100) < 40 for g in gaps), gaps
    bad = tc.run(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "-a", "0"],
                 input=tc.stream([]))
    assert bad.returncode == 2 and b"must be >= 0.001" in bad.stderr


def test_batched_input_replays_like_single_packets():
    """tc-readpcap --batch output (pkts records) gives tc-session the same packets at the
    same recorded offsets as one pkt record each."""
    from tcpcopylib.records import encode_pkts

    t0 = 1_700_000_000 * 10**9
    recs = [pkt(t0 + i * 50 * MS + k * MS // 4, C, O, 5000 + i, 80, CISN, 0, TH_SYN,
                options=MSS) if k == 0 else
            pkt(t0 + i * 50 * MS + k * MS // 4, O, C, 80, 5000 + i, SISN, CISN + 1,
                TH_SYN | TH_ACK) for i in range(4) for k in range(2)]
    plain = tc.stream(recs)
    batched = encode_section(header("test")) + b"".join(
        encode_pkts([r["ts"] for r in recs[j:j + 3]], [r["data"] for r in recs[j:j + 3]])
        for j in range(0, len(recs), 3))
    runs = []
    for data in (plain, batched):
        r = tc.run(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "--stats",
                    "--connect-timeout", "0.2", "--drain", "0"], input=data)
        assert r.returncode == 0, r.stderr
        out = [x for x in tc.decode(r.stdout) if x["t"] == "pkt"]
        runs.append(([(x["sid"], x["data"]) for x in out],
                     [(x["ts"] - out[0]["ts"]) // MS for x in out[:4]],
                     re.search(rb"packets: .*", r.stderr).group()))
    assert runs[0][0] and runs[0][0] == runs[1][0]
    assert runs[1][2].startswith(b"packets: 8 in (0 ignored, 4 server->client")
    assert runs[0][2] == runs[1][2]
    for gaps in (runs[0][1], runs[1][1]):  # the SYNs 50 ms apart, as recorded
        assert all(abs(g - 50 * i) < 25 for i, g in enumerate(gaps)), gaps


class Proc:
    """A tool with a stdin pipe and a reader thread decoding its stdout."""

    def __init__(self, args):
        self.p = subprocess.Popen([str(tc.BIN / args[0]), *map(str, args[1:])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=tc.env())
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
    fb = subprocess.Popen([str(tc.BIN / "tc-feedback"), "--listen", f"unix:{sock}"],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.env())
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
    s = Proc(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "--stats-every", "0.2",
              "--drain", "0.3"])
    try:
        s.send(tc.stream([pkt(time.time_ns(), C, O, 5000, 80, CISN, 0, TH_SYN, options=MSS)]))
        s.expect(lambda p: p.flags & TH_SYN)
        time.sleep(0.7)
        s.p.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        s.p.stdin.close()
        assert s.p.wait(timeout=20) == 0
        err = s.p.stderr.read().decode()
        assert err.count("tc-session: outcomes:") >= 2, err
        assert "1 sessions (1 active" in err  # the SIGUSR1 line or a periodic summary
    finally:
        s.stop()


def test_input_from_a_regular_file(tmp_path):
    f = tmp_path / "in.cbor"
    f.write_bytes(tc.stream([pkt(0, C, O, 5000 + i, 80, CISN, 0, TH_SYN, options=MSS)
                             for i in range(3)]))
    for args, stdin in (([f], None), ([], f)):
        with open(stdin or os.devnull, "rb") as fh:
            r = subprocess.run([str(tc.BIN / "tc-session"), "--target", "10.2.0.5:80",
                                "--no-feedback", "--drain", "0", *map(str, args)],
                               stdin=fh, capture_output=True, env=tc.env(), timeout=30)
        assert r.returncode == 0, r.stderr
        flags = [parse_tcp(x["data"]).flags for x in tc.decode(r.stdout)]
        assert flags == [TH_SYN] * 3 + [TH_RST] * 3  # SYNs, then aborted at the end
