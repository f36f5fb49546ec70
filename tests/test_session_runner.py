"""tc-session's loop in process (tcpcopylib.session.runner): a fake clock that moves only
when the loop waits, in-memory files for input and output, a fake feedback connection.
The same stage and runner as the tool's; due times, drain, signals, back-pressure and the
feedback reconnection are checked exactly, in no real time."""

import os
import select
import signal
import socket

import cbor2
import pytest
import tc

from tcpcopylib.cli.session import Tool
from tcpcopylib.errors import UnavailableError
from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_SYN, build_tcp, ip_bytes, parse_tcp
from tcpcopylib.records import StageWriter
from tcpcopylib.session import runner as runner_mod
from tcpcopylib.session.options import build_engine
from tcpcopylib.session.runner import PacketOutput, SessionRunner, SessionStage
from tcpcopylib.session.timing import DueQueue

MS = 1_000_000
T0 = 1_700_000_000 * 10**9  # the recording's clock
START = 10**18              # the fake wall clock's
C, O = ip_bytes("10.9.0.2"), ip_bytes("10.1.0.1")


class FakeTime:
    """Wall (ns) and monotonic (s) clocks that move only when the loop waits: poll() with
    a timeout returns what is ready at once, or else moves the clock by the timeout.
    ``at[t] = fn`` runs fn when the clock reaches START + t ns."""

    def __init__(self):
        self.ns = START
        self.poll_obj = select.poll()
        self.at = {}
        self.waits = []

    def clock(self):
        return self.ns

    def monotonic(self):
        # seconds since the start, plus an uptime: a float of START / 1e9 (1e9 s) would
        # be 120 ns coarse, and the runner's waits are exact to the ns
        return (self.ns - START) / 1e9 + 1000.0

    # the poll object the runner is given
    def register(self, fd, ev):
        self.poll_obj.register(fd, ev)

    def unregister(self, fd):
        self.poll_obj.unregister(fd)

    def poll(self, timeout_ms):
        ready = self.poll_obj.poll(0)
        if ready:
            return ready
        assert timeout_ms is not None, "the loop would block for ever"
        self.waits.append(timeout_ms)
        # a float: the runner's wait is exact (at least 1 ns: a wait of less, a float's
        # rounding error, would not move the clock)
        target = self.ns + max(round(timeout_ms * MS), 1)
        for t in sorted(self.at):  # a scheduled event interrupts the wait
            if self.ns < START + t <= target:
                self.ns = START + t
                self.at.pop(t)()
                return self.poll_obj.poll(0)
        self.ns = target
        return []


def memfd(data=b""):
    fd = os.memfd_create("t")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def syn(i, ms):
    return {"t": "pkt", "ts": T0 + ms * MS, "data": build_tcp(C, O, 5000 + i, 80, 1000, 0, TH_SYN)}


def make(argv, records, fb=None, **kw):
    """(runner, input fd, output fd, fake time, warnings) for tc-session ARGV over RECORDS."""
    args = Tool().build_parser().parse_args(["--target", "10.2.0.5:80", *argv])
    out_fd = memfd()
    out = PacketOutput(StageWriter(out_fd, "tc-session", bufsize=1 << 62), args.batch)
    engine = build_engine(args, out.emit, fb)
    ft, said = FakeTime(), []
    due = DueQueue(asap=args.asap, speed=args.speed, max_gap=args.max_gap, warn=said.append)
    r = SessionRunner(SessionStage(engine, due, out), fb, drain=args.drain,
                      feedback_retry=args.feedback_retry, warn=said.append,
                      clock=ft.clock, monotonic=ft.monotonic, poll=ft, **kw)
    return r, memfd(tc.stream(records)), out_fd, ft, said


def output(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    return tc.decode(data)


def syn_times(recs):
    """When each session's first SYN went out (ms after the start), in session order (a
    SYN without answer is sent again after 1 s: those are left out)."""
    first = {}
    for r in recs:
        if r["t"] == "pkt" and parse_tcp(r["data"]).flags == TH_SYN:
            first.setdefault(parse_tcp(r["data"]).sport, (r["ts"] - START) // MS)
    return [first[port] for port in sorted(first)]


def test_packets_go_out_at_their_recorded_offsets_and_others_pass_through():
    recs = [syn(0, 0), {"t": "note", "n": 1}, syn(1, 300), syn(2, 1200)]
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "-a", "2", "--drain", "0.5"], recs)
    r.run(in_fd)
    got = output(out_fd)
    assert {"t": "note", "n": 1} in got
    assert syn_times(got) == [0, 150, 600]  # (-a 2)
    assert r.stage.engine.sessions == {} and r.stage.engine.st.outcomes
    # the input ended with the last packet sent: drained for 0.5 s, then every session reset
    assert ft.ns - START == (600 + 500) * MS


def test_asap_sends_when_read():
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "--asap", "--drain", "0"],
                                   [syn(0, 0), syn(1, 5000)])
    r.run(in_fd)
    assert syn_times(output(out_fd)) == [0, 0] and ft.ns == START


def test_a_signal_stops_reading_drops_what_is_not_due_and_drains():
    recs = [syn(i, 100 * i) for i in range(10)]
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "--drain", "2"], recs)
    ft.at[350 * MS] = lambda: r.interrupt(signal.SIGTERM)
    r.run(in_fd)
    # the 6 SYNs not due yet were dropped
    assert syn_times(output(out_fd)) == [0, 100, 200, 300] and r.stage.queued() == 0
    assert ft.ns - START == (350 + 2000) * MS  # the drain ran its course (no feedback)


def test_a_second_signal_ends_at_once():
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "--drain", "60"], [syn(0, 0), syn(1, 10)])
    ft.at[100 * MS] = lambda: r.interrupt(signal.SIGTERM)
    ft.at[200 * MS] = lambda: r.interrupt(signal.SIGINT)
    r.run(in_fd)
    assert ft.ns - START == 200 * MS and r.stage.engine.sessions == {}
    assert r.stop_sig == signal.SIGINT and r.stop_count == 2


def test_back_pressure_stops_and_resumes_reading(monkeypatch):
    """Above MAX_PENDING queued packets the input is not read; below half it is again:
    every packet still goes out at its time, and the end of input is seen."""
    monkeypatch.setattr(runner_mod, "MAX_PENDING", 4)
    monkeypatch.setattr(runner_mod, "CHUNK", 200)  # (a few records per read)
    recs = [syn(i, 100 * i) for i in range(12)]
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "--drain", "0"], recs)
    seen = []
    take = r.stage.take
    r.stage.take = lambda items, now: (seen.append(r.stage.queued()), take(items, now))
    r.run(in_fd)
    assert syn_times(output(out_fd)) == [100 * i for i in range(12)]
    assert max(seen) <= 4 + 3 and r.eof  # (a read holds at most 3 of these records)


def test_stats_every_on_the_fake_clock():
    calls = []
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "--drain", "0"],
                                   [syn(0, 0), syn(1, 1000)], stats_every=0.3,
                                   on_stats=lambda: calls.append(ft.ns - START))
    r.run(in_fd)
    assert calls == [300 * MS, 600 * MS, 900 * MS]


class LosingFeedback:
    """A feedback connection that breaks on the first read and comes back on the third
    reconnection attempt (the engine's claims are only counted)."""

    def __init__(self):
        self.a, self.b = socket.socketpair()
        self.b.send(b"x")  # readable: the loop reads it, which fails
        self.sock, self.address = self.a, "unix:/fake"
        self.claims = self.tries = self.closed = 0
        self.last_ts = 0
        self.reconnects = self.refused = 0

    def fileno(self):
        return self.a.fileno()

    def read_replies(self):
        raise UnavailableError("feedback connection lost")

    def reconnect(self, timeout):
        self.tries += 1
        if self.tries < 3:
            raise UnavailableError("cannot connect to tc-feedback")
        self.a.recv(1)  # (not readable any more)
        self.sock = self.a
        return 7

    def claim(self, *a):
        self.claims += 1

    release = claim

    def flush(self):
        pass

    def close(self):
        self.sock = None
        self.closed += 1


def test_feedback_lost_then_reconnected_with_backoff():
    fb = LosingFeedback()
    r, in_fd, out_fd, ft, said = make(["--drain", "0.5"], [syn(0, 0), syn(1, 1000)], fb=fb)
    r.run(in_fd)
    assert fb.tries == 3 and fb.claims >= 2
    # lost at 0; tries at 0, 0.1 (backoff 0.1), 0.3 (0.2): back 0.3 s after the loss
    assert said[0] == ("feedback connection lost; reconnecting (for at most 30 s; sessions "
                       "go on, replies are lost meanwhile)")
    assert said[1] == ("reconnected to tc-feedback at unix:/fake after 0.3 s; 7 "
                       "connection(s) claimed again")
    assert syn_times(output(out_fd)) == [0, 1000]


def test_feedback_lost_for_good_gives_up_after_the_retry_time():
    fb = LosingFeedback()
    fb.reconnect = lambda timeout: (_ for _ in ()).throw(UnavailableError("refused"))
    r, in_fd, out_fd, ft, said = make(["--feedback-retry", "1", "--drain", "5"],
                                      [syn(0, 0), syn(1, 3000)], fb=fb)
    with pytest.raises(UnavailableError, match=r"gave up reconnecting after 1 s"):
        r.run(in_fd)
    # tries at 0, 0.1, 0.3, 0.7 and 1.5 s: the last (each wait a ms more at most: poll()
    # waits at least its timeout, in whole ms rounded up)
    assert 1500 * MS <= ft.ns - START <= 1505 * MS
    assert syn_times(output(out_fd)) == [0]  # what was sent before the end still went out
    assert fb.closed


def test_what_the_stage_sends_is_cbor2_byte_for_byte_with_batches():
    recs = [syn(i, 0) for i in range(5)]
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "-B", "3", "--drain", "0"], recs)
    r.run(in_fd)
    os.lseek(out_fd, 0, os.SEEK_SET)
    raw = os.read(out_fd, 1 << 20)
    kinds = [x.get("t") for x in tc.cbor_items(raw) if isinstance(x, dict)]
    # the 5 SYNs, then at the end (--drain 0) the 5 RSTs: 3 + 2 each, as a batch ends with
    # the loop turn
    assert kinds == ["header", "pkts", "pkts", "pkts", "pkts"]
    got = tc.decode(raw)
    assert [r["sid"] for r in got] == [1, 2, 3, 4, 5] * 2 and syn_times(got) == [0] * 5
    assert raw.endswith(cbor2.dumps(tc.cbor_items(raw)[-1]))  # (cbor2's encoding)


# -- socket mode (sockets.SocketStage) on the same runner: real loopback connections -------

class SocketFakeTime(FakeTime):
    """FakeTime for real sockets: before the fake clock moves, the kernel gets a few real
    ms to finish loopback work (a handshake, a delivery) that is not done yet."""

    def poll(self, timeout_ms):
        return self.poll_obj.poll(0) or self.poll_obj.poll(5) or super().poll(timeout_ms)


def seg(ms, seq, ack, flags, payload=b""):
    return {"t": "pkt", "ts": T0 + ms * MS,
            "data": build_tcp(C, O, 5000, 80, seq, ack, flags, payload=payload)}


def make_socket(argv, records, port):
    """(runner, input fd, output fd, fake time) for tc-session --socket --keep ARGV over
    RECORDS, towards 127.0.0.1:PORT (the session map in the output, as --keep writes it)."""
    from tcpcopylib.session.sessmap import SessionMap
    from tcpcopylib.session.sockets import SocketStage, socket_engine

    args = Tool().build_parser().parse_args(
        ["--socket", "--keep", "-x", f"80-127.0.0.1:{port}", *argv])
    out_fd = memfd()
    writer = StageWriter(out_fd, "tc-session", bufsize=1 << 62, mode="socket")
    engine = socket_engine(args, writer.write, SessionMap(writer.write, byte_counts=True))
    engine.on_end = engine.end_session
    ft = SocketFakeTime()
    due = DueQueue(asap=args.asap, speed=args.speed, max_gap=args.max_gap)
    r = SessionRunner(SocketStage(engine, due, PacketOutput(writer)), drain=args.drain,
                      clock=ft.clock, monotonic=ft.monotonic, poll=ft)
    return r, memfd(tc.stream(records)), out_fd, ft


def payloads(recs, kind):
    """(ms after the start, payload) of the kept records of KIND that carry bytes."""
    out = []
    for x in recs:
        if x["t"] == kind:
            p = parse_tcp(x["data"])
            if p.payload:
                out.append(((x["ts"] - START) // MS, bytes(p.payload)))
    return out


def test_socket_mode_on_the_runner_sends_at_due_times_and_gates_on_the_targets_answer():
    """A request at its offset; the next one waits for the target's answer (which comes
    late) and leaves the moment it is read; the client's FIN; the target closes: the
    session is complete and the loop ends then. The connections' events reach the engine
    through the stage's descriptor (SocketStage.fileno, on_ready)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)  # (accept() in the test: never blocks for ever)
    port = listener.getsockname()[1]
    data = TH_PSH | TH_ACK
    recs = [seg(0, 1000, 0, TH_SYN), seg(1, 1001, 5001, TH_ACK), {"t": "note", "n": 1},
            seg(100, 1001, 5001, data, b"GET /a\r\n"),
            seg(200, 1009, 5007, data, b"GET /b\r\n"),  # (after 6 bytes of answer)
            seg(300, 1017, 5007, TH_FIN | TH_ACK)]
    r, in_fd, out_fd, ft = make_socket(["--drain", "5"], recs, port)
    served, peer = [], []

    def answer():
        conn, addr = listener.accept()
        served.append(conn)
        peer.append(addr)
        conn.sendall(b"resp-a")

    ft.at[250 * MS] = answer
    ft.at[400 * MS] = lambda: served[0].shutdown(socket.SHUT_WR)
    try:
        r.run(in_fd)
        served[0].settimeout(5)
        got = b""
        while chunk := served[0].recv(1 << 16):
            got += chunk
    finally:
        for c in served:
            c.close()
        listener.close()
        r.stage.engine.ep.close()
    assert got == b"GET /a\r\nGET /b\r\n"  # then the FIN (recv's end)
    out = output(out_fd)
    assert {"t": "note", "n": 1} in out
    # /b was due at 200 ms; it waited for the answer, read at 250 ms
    assert payloads(out, "pkt") == [(100, b"GET /a\r\n"), (250, b"GET /b\r\n")]
    assert payloads(out, "fb") == [(250, b"resp-a")]
    (sess,) = [x for x in out if x["t"] == "sess"]
    assert sess["outcome"] == "completed"
    assert (sess["bytes_sent"], sess["bytes_received"]) == (16, 6)
    # one connection, from the port the target saw, opened at once; the requests' times
    ((ip, port_, t_syn, t_est),) = sess["conns"]
    assert (ip, port_) == peer[0] and t_syn == START <= t_est
    a, b = START + 100 * MS, START + 250 * MS
    assert sess["sent"] == [[0, 8, a, a], [8, 16, b, b]]
    assert sess["end"] == START + 400 * MS and "error" not in sess
    assert ft.ns - START < 500 * MS  # settled when the target closed, not after --drain


def test_socket_mode_on_the_runner_a_refused_connection_ends_its_session_at_once():
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))  # bound, not listening: a connect() is refused
    port = spare.getsockname()[1]
    recs = [seg(0, 1000, 0, TH_SYN), seg(50, 1001, 5001, TH_PSH | TH_ACK, b"hello")]
    r, in_fd, out_fd, ft = make_socket(["--drain", "5"], recs, port)
    try:
        r.run(in_fd)
    finally:
        spare.close()
        r.stage.engine.ep.close()
    (sess,) = [x for x in output(out_fd) if x["t"] == "sess"]
    assert sess["outcome"] == "reset_by_target" and sess["error"] == "ECONNREFUSED"
    assert sess["conns"][0][3] is None and sess["sent"] == [] and sess["bytes_sent"] == 0
    assert r.stage.engine.sst.connect_failures == 1 and r.stage.engine.sessions == {}
    assert ft.ns - START <= 50 * MS  # the input's end, not --drain


# -- waits to the microsecond: a packet released by a timer goes out when it is due -------

class ScriptedFeedback(LosingFeedback):
    """A feedback connection whose replies the test hands in (reply()): readable then."""

    def __init__(self):
        super().__init__()
        self.a.recv(1)  # (LosingFeedback's byte: not readable at the start)
        self.replies = []

    def reply(self, data):
        self.replies.append((data, None))
        self.b.send(b"x")

    def read_replies(self):
        self.a.recv(64)
        out, self.replies = self.replies, []
        return out


def test_a_packet_held_by_a_timer_goes_out_at_its_due_time_not_the_next_whole_ms():
    # captured: SYN at 0, the handshake's ACK (the online accept) at 0.1 ms, the request
    # at 0.5 ms. The target's SYN-ACK comes back at 0.4 ms: its accept was 0.3 ms later
    # than the online one, so the request is held (the engine's timer) until 0.8 ms. From
    # 0.5 ms the loop waits 0.3 ms, exactly (with poll()'s whole ms: 1 ms, out at 1.5 ms).
    T = ip_bytes("10.2.0.5")
    recs = [syn(0, 0),
            {"t": "pkt", "ts": T0 + 100_000, "data": build_tcp(C, O, 5000, 80, 1001, 5001, TH_ACK)},
            {"t": "pkt", "ts": T0 + 500_000,
             "data": build_tcp(C, O, 5000, 80, 1001, 5001, TH_PSH | TH_ACK, payload=b"GET /")}]
    fb = ScriptedFeedback()
    r, in_fd, out_fd, ft, _ = make(["--drain", "0.01"], recs, fb=fb)
    ft.at[400_000] = lambda: fb.reply(build_tcp(T, C, 80, 5000, 7000, 1001, TH_SYN | TH_ACK))
    r.run(in_fd)
    sent = [(x["ts"] - START, bytes(parse_tcp(x["data"]).payload))
            for x in output(out_fd) if x["t"] == "pkt" and parse_tcp(x["data"]).payload]
    assert sent == [(800_000, b"GET /")]
    assert [round(w, 9) for w in ft.waits[:4]] == [0.1, 0.4, 0.1, 0.3]  # (ms; to 0.5, 0.8)


def test_fine_poll_waits_with_the_exact_timeout(monkeypatch):
    """FinePoll: a timed wait goes to select() with the timeout to the microsecond; no
    timeout, 0, or a descriptor select() cannot take go to poll()."""
    r, w = os.pipe()
    calls = []
    real_select = select.select

    def spy(rd, wr, ex, timeout):
        calls.append(timeout)
        return real_select(rd, wr, ex, timeout)

    monkeypatch.setattr(runner_mod.select, "select", spy)
    p = runner_mod.FinePoll()
    p.register(r, select.POLLIN)
    assert p.poll(0.25) == [] and calls == [0.25e-3]
    os.write(w, b"x")
    assert p.poll(0.25) == [(r, select.POLLIN)] and p.poll(0) == [(r, select.POLLIN)]
    assert p.poll(None) == [(r, select.POLLIN)] and len(calls) == 2
    monkeypatch.setattr(runner_mod, "FD_SETSIZE", r)  # as if r were too high for select()
    assert p.poll(0.25) == [(r, select.POLLIN)] and len(calls) == 2
    p.unregister(r)
    assert p.poll(0.25) == [] and len(calls) == 3
    os.close(r)
    os.close(w)


def test_a_busy_replay_turns_the_loop_at_most_once_per_ms_after_a_burst():
    # 40 SYNs due 0.1 ms apart: the first ones go out at their due times, one loop turn
    # each; then the loop turns once per ms (TIMED_EVERY_NS) and sends what is due by then
    recs = [{"t": "pkt", "ts": T0 + i * 100_000,
             "data": build_tcp(C, O, 5000 + i, 80, 1000, 0, TH_SYN)} for i in range(40)]
    r, in_fd, out_fd, ft, _ = make(["--no-feedback", "--drain", "0"], recs)
    r.run(in_fd)
    sent = {parse_tcp(x["data"]).sport - 5000: x["ts"] - START for x in output(out_fd)
            if x["t"] == "pkt" and parse_tcp(x["data"]).flags == TH_SYN}
    late = [sent[i] - i * 100_000 for i in range(40)]
    burst = runner_mod.TIMED_BURST_NS // runner_mod.TIMED_EVERY_NS
    assert late[:burst] == [0] * burst
    assert all(0 <= x <= runner_mod.TIMED_EVERY_NS for x in late) and max(late) > 0
    assert len(set(sent.values())) < 40 - burst  # (batches)


def test_a_deadline_after_a_busy_spell_of_input_waits_at_most_a_turn():
    # 10,000 turns made by input, 0.1 ms apart, each with a packet due 0.5 ms later, then
    # the input stops: the next packet, due in 0.1 ms, waits at most TIMED_EVERY_NS (the
    # limiter once counted a ms per turn and had it wait 9 s)
    class Stage:
        due = None

        def next_due(self):
            return self.due

    r = runner_mod.SessionRunner.__new__(runner_mod.SessionRunner)
    r.stage, r.drain_until, r.stats_every, r.fb_down, r.timed_tat = Stage(), None, 0, None, 0
    now = T0
    for _ in range(10_000):
        r.stage.due = now + 500_000
        assert r._poll_timeout(now) <= runner_mod.TIMED_EVERY_NS / 1e6 + 0.5
        now += 100_000
    r.stage.due = now + 100_000
    assert 0.1 <= r._poll_timeout(now) <= runner_mod.TIMED_EVERY_NS / 1e6
