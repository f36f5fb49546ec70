"""tc-session --send: the engine's packets sent from tc-session's own process (tc-emit's
Emitter behind runner.SendOutput) instead of written as records for `| tc-pace | tc-emit`.

In process, on the fake clock of test_session_runner: the same workload through
PacketOutput and through SendOutput gives the same datagrams, in the same order, each sent
at the time its record is stamped with, the feedback claim of a session before its SYN.
From the command line: the options that go with --send, the error without CAP_NET_RAW,
and the counters in --stats-json and the metrics. (The lab replays of both forms are in
test_replay_e2e.py.)
"""

import os
import shutil
import socket
import subprocess

import pytest
import tc
from test_session_runner import START, FakeTime, memfd, output, syn

from tcpcopylib import metrics
from tcpcopylib.cli.session import Tool
from tcpcopylib.emit import Emitter
from tcpcopylib.packet import TH_SYN, parse_tcp
from tcpcopylib.records import StageWriter
from tcpcopylib.session.options import build_engine
from tcpcopylib.session.report import stats_dict
from tcpcopylib.session.runner import PacketOutput, SendOutput, SessionRunner, SessionStage
from tcpcopylib.session.timing import DueQueue
from tcpcopylib.testing import tool_env, tool_path

MS = 1_000_000


class Log:
    """One ordered log of what left the process: feedback claims and sent batches."""

    def __init__(self, ft):
        self.ft = ft
        self.events = []


class QuietFeedback:
    """A connected feedback channel that never answers; its claims go to the log when
    flushed (as FeedbackClient sends them)."""

    def __init__(self, log):
        self.log = log
        self.a, self.b = socket.socketpair()
        self.sock, self.address = self.a, "unix:/fake"
        self.ops = []
        self.last_ts = 0
        self.reconnects = self.refused = 0

    def fileno(self):
        return self.a.fileno()

    def read_replies(self):
        return []

    def claim(self, cip, cport, tip, tport):
        self.ops.append(("claim", cport))

    def release(self, cip, cport, tip, tport):
        self.ops.append(("release", cport))

    def flush(self):
        self.log.events += self.ops
        self.ops = []

    def close(self):
        self.sock = None
        self.a.close()
        self.b.close()


class FakeSender:
    """A sender (emit.RawSender's interface) that logs each batch with the fake clock's
    time; every datagram whose port is in ``refuse`` fails with EPERM."""

    link_layer = False

    def __init__(self, log, refuse=()):
        self.log = log
        self.refuse = set(refuse)

    def send_batch(self, datas):
        self.log.events.append(("send", self.log.ft.ns, list(datas)))
        return [(i, PermissionError(1, "Operation not permitted"))
                for i, d in enumerate(datas) if parse_tcp(d).sport in self.refuse]


def run(argv, records, send, refuse=()):
    """tc-session ARGV over RECORDS on the fake clock, with a QuietFeedback: (log, the
    output: records, or the SendOutput)."""
    args = Tool().build_parser().parse_args(["--target", "10.2.0.5:80", *argv])
    ft = FakeTime()
    log = Log(ft)
    fb = QuietFeedback(log)
    out_fd = memfd()
    if send:
        out = SendOutput(Emitter(FakeSender(log, refuse)))
    else:
        out = PacketOutput(StageWriter(out_fd, "tc-session", bufsize=1 << 62))
    engine = build_engine(args, out.emit, fb)
    due = DueQueue(asap=args.asap, speed=args.speed, max_gap=args.max_gap)
    r = SessionRunner(SessionStage(engine, due, out), fb, drain=args.drain,
                      feedback_retry=args.feedback_retry, clock=ft.clock,
                      monotonic=ft.monotonic, poll=ft)
    r.run(memfd(tc.stream(records)))
    return log, (out if send else output(out_fd)), engine


# 70 SYNs at the same instant (more than one sendmmsg batch of 64 in one loop turn), 30
# more spread over 3 s, a record tc-emit would ignore; no answers: each SYN is sent again
# after 1 s, and at the end (drain 0.5 s) every session is reset
RECORDS = ([syn(i, 0) for i in range(70)] + [{"t": "note", "n": 1}]
           + [syn(70 + i, 100 * i) for i in range(30)])
ARGV = ["--drain", "0.5", "--connect-timeout", "10"]


def test_send_output_sends_exactly_what_packet_output_writes_when_stamped():
    _, recs, _ = run(ARGV, RECORDS, send=False)
    log, out, engine = run(ARGV, RECORDS, send=True)
    pkts = [r for r in recs if r["t"] == "pkt"]
    sends = [e for e in log.events if e[0] == "send"]
    sent = [(t, d) for _, t, batch in sends for d in batch]
    # the same datagrams, in the same order, each sent at its record's ts (fake clock)
    assert [d for _, d in sent] == [r["data"] for r in pkts]
    assert [t for t, _ in sent] == [r["ts"] for r in pkts]
    assert len(pkts) == engine.st.pkts_out >= 300  # SYN, its retransmission, the RST
    assert max(len(b) for _, _, b in sends) == 64  # a full batch left within its turn
    assert {t - START for t, _ in sent} >= {0, 1000 * MS, 2900 * MS}
    # the note is counted as tc-emit counts it; the counters are tc-emit's
    em = out.emitter
    assert out.ignored == 1 and [r for r in recs if r["t"] == "note"] == [{"t": "note", "n": 1}]
    assert (em.sent, em.failed, em.fixed, em.skips) == (len(pkts), 0, 0, {})
    # every session's claim left before its first SYN did
    claimed = set()
    for e in log.events:
        if e[0] == "claim":
            claimed.add(e[1])
        elif e[0] == "send":
            for d in e[2]:
                t = parse_tcp(d)
                if t.flags == TH_SYN:
                    assert t.sport in claimed, f"SYN of {t.sport} before its claim"
    assert len(claimed) == 100


def test_send_errors_are_counted_by_errno_and_show_in_stats_and_metrics():
    log, out, engine = run(["--drain", "0"], [syn(i, 0) for i in range(5)], send=True,
                           refuse={5001, 5003})
    em = out.emitter
    # 5 SYNs and 5 RSTs; the two sessions' packets fail with EPERM, the rest is sent
    assert (em.sent, em.failed, em.errors) == (6, 4, {"EPERM": 4})
    d = stats_dict(engine, None, out)
    assert d["emit"] == {"sent": 6, "failed": 4, "errors": {"EPERM": 4}, "fixed": 0,
                         "skips": {}, "ignored": 0}
    assert d["pkts_out"] == 10
    text = metrics.render("tc-session", d)
    assert 'tcpcopy_packets_total{stage="session"} 10' in text
    assert 'tcpcopy_packets_total{stage="emit"} 6' in text
    assert 'tcpcopy_send_errors_total{stage="emit",error="EPERM"} 4' in text
    assert 'key="emit.' not in text  # each emit counter has its own metric


# -- the command line ------------------------------------------------------------------

def session(*args, prefix=(), input=b""):
    return subprocess.run([*prefix, tool_path("tc-session"), *args], input=input,
                          capture_output=True, env=tool_env(), timeout=60)


@pytest.mark.parametrize("args,message", [
    (["-o", "lo", "--dst-mac", "02:00:00:00:00:01"], "-o/--dst-mac/--src-mac go with --send"),
    (["--send", "--socket"], "--send goes with forged mode, not --socket"),
    (["--send", "-B", "8"], "-B/--batch shapes the record output; --send writes none"),
    (["--send", "--sessions", "-"], "--send writes no output stream; give a FILE"),
    (["--send", "-o", "lo"], "-o IFACE needs --dst-mac (tc-emit does no ARP)"),
    (["--send", "--dst-mac", "02:00:00:00:00:01"], "--dst-mac/--src-mac need -o IFACE"),
    (["--capture", "lo", "some.cbor"], "--capture IFACE is the input: no FILE"),
    (["--capture", "lo", "--shards", "2"], "--capture goes with forged mode in one process"),
    (["--capture-filter", "tcp"], "--capture-filter goes with --capture"),
])
def test_send_option_usage_errors(args, message):
    r = session("--target", "10.2.0.5:80", "--no-feedback", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_send_without_cap_net_raw_exits_77():
    """Without a raw socket (not root, or root minus CAP_NET_RAW): one line, exit 77,
    before anything is read."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) not installed")
        prefix = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"]
    r = session("--target", "10.2.0.5:80", "--no-feedback", "--send", prefix=prefix,
                input=tc.stream([syn(0, 0)]))
    assert r.returncode == 77, r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert lines == ["tc-session: error: cannot open a raw socket (Operation not "
                     "permitted): run as root or with CAP_NET_RAW"], lines
    assert r.stdout == b""


def test_capture_on_a_missing_interface_exits_66():
    r = session("--target", "10.2.0.5:80", "--no-feedback", "--capture", "no-such-if0")
    assert r.returncode == 66, r.stderr
    assert r.stderr.decode().strip().splitlines() == [
        "tc-session: error: no-such-if0: no such interface"]


def test_capture_without_cap_net_raw_exits_77():
    """--capture IFACE without the right to capture: one line, exit 77."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) not installed")
        prefix = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"]
    r = session("--target", "10.2.0.5:80", "--no-feedback", "--capture", "lo", prefix=prefix)
    assert r.returncode == 77, r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "needs root or CAP_NET_RAW" in lines[0], lines
