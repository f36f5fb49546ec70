"""Shedding past saturation (tc-session(1), SHEDDING; tcpcopylib.session.admission): new
sessions are shed whole, counted with outcome "shed" and a reason, so that every admitted
session is replayed whole.

In process: the Admission's signals (lag with hysteresis, backlog of a real pipe,
max-sessions, the live/recording default), and tc-session's loop (runner.SessionRunner on
the fake clock of test_session_runner) over a live input it cannot keep up with: each
packet of an admitted session costs it CPU time (the fake clock moves), a shed one
almost none. Every session the scripted target saw holds exactly its captured request;
the others are counted as shed, none is cut. (The lab test is test_shedding_lab.py.)
"""

import json
import os

import tc
from test_session_runner import START, FakeTime, memfd, output

from tcpcopylib.cli.session import Tool
from tcpcopylib.packet import (TH_ACK, TH_FIN, TH_PSH, TH_SYN, build_tcp, ip_bytes,
                               parse_tcp)
from tcpcopylib.records import StageWriter
from tcpcopylib.capture import pipe_backlog
from tcpcopylib.session.admission import DEFAULT_LIVE_LAG, Admission
from tcpcopylib.session.options import build_admission, build_engine
from tcpcopylib.session.runner import PacketOutput, SessionRunner, SessionStage
from tcpcopylib.session.timing import DueQueue
from tcpcopylib.testing import MSS_OPT

MS = 1_000_000
SEC = 1_000_000_000
O, T = ip_bytes("10.1.0.1"), ip_bytes("10.2.0.5")
CISN, SISN, TISN = 1000, 50000, 90000


# -- the signals ---------------------------------------------------------------------------

def test_lag_sheds_above_the_limit_and_stops_below_half_of_it():
    a = Admission(lag_ms=100)
    assert a.reason(0) is None
    assert a.reason(100 * MS) is None             # at the limit: not over it
    assert a.reason(101 * MS) == "lag"
    assert a.reason(60 * MS) == "lag"             # still behind: keeps shedding
    assert a.reason(49 * MS) is None              # caught up
    assert a.reason(80 * MS) is None              # below the limit again: admits
    assert a.as_dict()["max_lag_ms"] == 101


def test_memory_reason_and_lag_off():
    assert Admission(lag_ms=0).reason(10 * SEC) is None
    big = [10]
    m = Admission(lag_ms=0, max_rss=5, rss=lambda: big[0], monotonic=lambda: 0.0)
    assert m.reason(0) == "memory"
    big[0] = 1
    assert m.reason(0) == "memory"                # read again only after RSS_EVERY
    m.next_rss = 0
    assert m.reason(0) is None


def test_backlog_is_what_waits_in_the_input_pipe():
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 5000)
        assert pipe_backlog(r) == pipe_backlog(w) == 5000
        a = Admission(lag_ms=0, backlog=4096)
        assert a.reason(0, r) == "backlog"
        os.read(r, 3000)                              # 2000 left: below half the limit
        assert a.reason(0, r) is None
        assert a.reason(0, -1) is None                # (input closed: no backlog)
    finally:
        os.close(r)
        os.close(w)


def test_default_lag_limit_only_for_a_live_input():
    live, rec = DueQueue(), DueQueue()
    now = START
    live.push(now - 3 * MS, b"p", now)                # stamped 3 ms ago: a live capture
    rec.push(now - 86400 * SEC, b"p", now)            # yesterday: a recording
    a, b = Admission(), Admission()
    late = (DEFAULT_LIVE_LAG + 1) * MS
    assert a.reason(late, due=live) == "lag" and a.live
    assert b.reason(late, due=rec) is None and b.live is False
    # given explicitly, it holds for a recording too; 0 turns it off for a live input
    assert Admission(lag_ms=5).reason(6 * MS, due=rec) == "lag"
    assert Admission(lag_ms=0).reason(late, due=live) is None


# -- tc-session's loop, overloaded ---------------------------------------------------------

def client_ip(i):
    return ip_bytes(f"10.77.{i // 250}.{i % 250 + 1}")


def request(i):
    return b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i + b"x" * (i % 7)


def session_records(n, every_ms, t0, first=0):
    """n captured sessions (SYN, ACK, request, FIN), one every every_ms from t0, of the
    clients first, first + 1, ..."""
    recs = []
    for i in range(first, first + n):
        t, c, req = t0 + (i - first) * every_ms * MS, client_ip(i), request(i)
        for dt, flags, seq, ack, data in (
                (0, TH_SYN, CISN, 0, b""), (100_000, TH_ACK, CISN + 1, SISN + 1, b""),
                (200_000, TH_ACK | TH_PSH, CISN + 1, SISN + 1, req),
                (300_000, TH_ACK | TH_FIN, CISN + 1 + len(req), SISN + 1, b"")):
            recs.append({"t": "pkt", "ts": t + dt, "data": build_tcp(
                c, O, 40000, 80, seq, ack, flags, 65535, MSS_OPT if flags & TH_SYN else b"",
                data)})
    return recs


class Target:
    """A scripted target behind the engine's emit: SYN-ACK, an ack for the request, FIN for
    FIN; ``conns``: client address -> the request bytes it received."""

    def __init__(self):
        self.conns = {}
        self.replies = []

    def emit(self, data, sid, now):
        p = parse_tcp(data)

        def reply(flags, seq, ack):
            self.replies.append(build_tcp(T, p.src, 80, p.sport, seq, ack, flags, 65535,
                                          MSS_OPT if flags & TH_SYN else b""))
        if p.flags & TH_SYN:
            self.conns.setdefault(p.src, b"")
            reply(TH_SYN | TH_ACK, TISN, p.seq + 1)
        elif p.payload:
            self.conns[p.src] += p.payload
            reply(TH_ACK, TISN + 1, p.seq + len(p.payload))
        elif p.flags & TH_FIN:
            reply(TH_ACK | TH_FIN, TISN + 1, p.seq + 1)


class BusyStage(SessionStage):
    """SessionStage whose packets cost time on the fake clock: ``cost`` ns for a packet of
    an admitted session, cost / 20 for one shed (a set lookup); the target's replies are
    fed back after each packet."""

    def __init__(self, engine, due, out, ft, target, cost):
        super().__init__(engine, due, out)
        self.ft, self.target, self.cost = ft, target, cost

    def run_due(self, now):
        q, e = self.due.q, self.engine
        turn = now
        while q and q[0][0] <= turn:  # what was due when the turn began, as run_due does
            data = q.popleft()[1]
            now = self.ft.ns
            e.client_packet(data, now)
            while self.target.replies:
                e.feedback_packet(self.target.replies.pop(0), now)
            p = parse_tcp(data)
            shed = hash((p.src, p.sport, p.dst, p.dport)) in e.shed_keys or (
                p.flags & TH_FIN and (p.src, p.sport, p.dst, p.dport) not in e.sessions
                and p.src not in self.target.conns)
            self.ft.ns += self.cost // 20 if shed else self.cost
        e.on_timer(self.ft.ns)


def run_overloaded(argv, n, every_ms, cost_ms, ft=None, input_fd=None):
    """The live replay of n sessions, one every every_ms, each packet costing cost_ms of
    the fake clock (input_fd: the stream, on ft's clock; default: those sessions in a file
    read as fast as it can be)."""
    args = Tool().build_parser().parse_args(
        ["--target", "10.2.0.5:80", "--no-feedback", "--drain", "2", "--quiet", "5",
         "--sessions", "-", *argv])
    ft = ft or FakeTime()
    target = Target()
    out_fd = memfd()
    out = PacketOutput(StageWriter(out_fd, "tc-session", bufsize=1 << 62))
    engine = build_engine(args, lambda d, sid, now: (target.emit(d, sid, now),
                                                     out.emit(d, sid, now)), None)
    from tcpcopylib.session.sessmap import SessionMap

    smap = SessionMap(out.write)
    engine.emit = smap.wrap_emit(engine.emit)
    engine.on_end = smap.chain_on_end(None)
    engine.on_shed = smap.engine_on_shed(engine)
    admission = build_admission(args)
    stage = BusyStage(engine, DueQueue(), out, ft, target, int(cost_ms * MS))
    runner = SessionRunner(stage, None, drain=args.drain, clock=ft.clock,
                           monotonic=ft.monotonic, poll=ft, admission=admission)
    # live: the capture's timestamps are the fake wall clock's
    runner.run(input_fd if input_fd is not None
               else memfd(tc.stream(session_records(n, every_ms, START))))
    return engine, target, [r for r in output(out_fd) if r["t"] == "sess"], admission


def test_overloaded_live_replay_sheds_whole_sessions_and_keeps_the_rest_exact():
    # a session every ms, 4 packets of 0.5 ms each: twice what the stage can do
    n = 400
    engine, target, sess, adm = run_overloaded(["--shed-lag", "50"], n, 1, 0.5)
    outs = {k: v for k, v in engine.st.outcomes.items() if v}
    shed = engine.shed_reasons.get("lag", 0)
    assert shed > n // 10 and outs.get("completed", 0) > n // 10, outs
    # every session the target saw got exactly its request; the rest was shed, counted
    assert len(target.conns) + shed == n, (len(target.conns), shed)
    for i in range(n):
        got = target.conns.get(client_ip(i))
        assert got is None or got == request(i), i
    assert outs == {"completed": len(target.conns), "shed": shed}
    assert engine.shed_reasons == {"lag": shed}
    # the lag stayed bounded: shedding started at 50 ms and made the stage catch up
    assert 50 * MS < adm.max_lag < 1000 * MS, adm.max_lag
    # the session map: a record per session, the shed ones with their reason and no conn
    shed_recs = [r for r in sess if r["outcome"] == "shed"]
    assert len(shed_recs) == shed and len(sess) == n
    assert all(r["reason"] == "lag" and r["conns"] == [] and r["sid"] == 0
               and r["target"] == ["10.2.0.5", 80] for r in shed_recs)
    assert {r["orig"][0] for r in shed_recs}.isdisjoint(
        {r["orig"][0] for r in sess if r["outcome"] == "completed"})


def test_within_capacity_nothing_is_shed():
    n = 200
    engine, target, _, adm = run_overloaded(["--shed-lag", "50"], n, 4, 0.5)
    assert engine.st.outcomes["completed"] == n and not engine.shed_reasons
    assert all(target.conns[client_ip(i)] == request(i) for i in range(n))


def test_default_sheds_a_live_input_that_falls_seconds_behind():
    # the default limit (2 s): an input 4x what the stage can do for 6 s of capture
    n = 3000
    engine, target, _, adm = run_overloaded([], n, 2, 2)
    shed = engine.shed_reasons.get("lag", 0)
    assert shed > 0 and adm.lag_limit == DEFAULT_LIVE_LAG * MS
    assert len(target.conns) + shed == n
    assert all(target.conns.get(client_ip(i)) in (None, request(i)) for i in range(n))


def test_packets_that_arrive_late_are_not_our_lag():
    """An upstream stall (a broker's election, a paused capture) delivers packets seconds
    after they were captured, then at the usual rate: tc-session keeps up with its input
    all along, so it sheds nothing (its lag counts from when a packet reached it), where
    it sheds when the same lateness builds up in its own input (the tests above)."""
    ft = FakeTime()
    r, w = os.pipe()
    on_time = session_records(20, 10, START)                    # sent as captured
    late = session_records(20, 10, START + 500 * MS, first=20)  # captured at 0.5 s ...
    first_part = tc.stream(on_time)
    os.write(w, first_part)
    rest = tc.stream(on_time + late)[len(first_part):]  # (one stream: one header)

    def deliver():  # ... delivered at 3.5 s, 3 s late: more than the default 2 s limit
        os.write(w, rest)
        os.close(w)
    ft.at[3500 * MS] = deliver
    try:
        engine, target, _, adm = run_overloaded([], 40, 10, 0.1,
                                                ft=ft, input_fd=r)
    finally:
        os.close(r)
    assert adm.lag_limit == DEFAULT_LIVE_LAG * MS          # a live input: the default holds
    assert not engine.shed_reasons and engine.st.outcomes["completed"] == 40, (
        engine.shed_reasons, dict(engine.st.outcomes))
    assert all(target.conns[client_ip(i)] == request(i) for i in range(40))
    assert adm.max_lag < 100 * MS, adm.max_lag  # what it measured: its own lag only


def test_cli_max_sessions_sheds_with_reason_in_stats_and_session_map(tmp_path):
    C = ip_bytes("10.9.0.2")
    recs = [{"t": "pkt", "ts": i, "data": build_tcp(C, O, 5000 + i, 80, CISN, 0, TH_SYN,
                                                     65535, MSS_OPT)} for i in range(4)]
    js = tmp_path / "s.json"
    r = tc.call(["tc-session", "--no-feedback", "--target", "10.2.0.5:80", "--drain", "0",
                 "--max-sessions", "1", "--sessions", "-", "--stats-json", js, "--stats"],
                input=tc.stream(recs))
    assert r.returncode == 0, r.stderr
    st = json.loads(js.read_text())
    assert st["outcomes"]["shed"] == 3 and st["shed_reasons"] == {"max-sessions": 3}
    sess = [x for x in tc.decode(r.stdout) if x["t"] == "sess"]
    assert sorted((x["orig"][1], x["outcome"], x.get("reason")) for x in sess) == [
        (5000, "unfinished", None), (5001, "shed", "max-sessions"),
        (5002, "shed", "max-sessions"), (5003, "shed", "max-sessions")]
    assert "shed: 3 (max-sessions)" in r.stderr.decode()
    assert r.stderr.decode().count("overloaded (max-sessions)") == 1


def test_cli_rejects_bad_shedding_values():
    base = ["tc-session", "--no-feedback", "--target", "10.2.0.5:80"]
    for args in (["--shed-lag", "-1"], ["--shed-lag", "nan"], ["--max-sessions", "0"],
                 ["--shed-backlog", "0"]):
        r = tc.call([*base, *args], input=tc.stream([]))
        assert r.returncode == 2, (args, r.stderr)


def test_shed_record_is_a_sess_record_tc_diff_reads():
    from tcpcopylib.diff.core import Replay, check_sess
    from tcpcopylib.session.sessmap import SessionMap

    recs = []
    m = SessionMap(recs.append)
    key = (ip_bytes("10.77.0.1"), 40000, O, 80)
    m.shed(key, 1, (T, 8080), "lag", START)
    rec = check_sess(recs[0], "test")
    assert rec == {"t": "sess", "ts": START, "sid": 0, "copy": 1,
                   "orig": ["10.77.0.1", 40000, "10.1.0.1", 80], "target": ["10.2.0.5", 8080],
                   "conns": [], "outcome": "shed", "reason": "lag", "start": START,
                   "end": START, "sent": []}
    rp = Replay(rec, 1)
    assert rp.outcome == "shed" and rp.conns == [] and rp.sent_time(0) is None
