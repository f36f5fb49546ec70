"""tc-session as a stage (tcpcopylib.stage) and the poll() loop that runs it in a process.

SessionStage: the engine, the DueQueue of input packets (the timing rule) and the output,
with the stage contract (take, next_due, run_due, finish, settled, close); no clock, no
descriptors. SessionRunner: its event loop over the input, the feedback connection, a
wake-up pipe for signals and, for a stage with descriptors of its own (socket mode's
connections, sockets.SocketStage), the one descriptor it gives to watch them by; with
drain, back-pressure, --max-memory, --stats-every and the feedback reconnection. The
clock, the poll object and the descriptors are arguments.
"""

from __future__ import annotations

import math
import os
import select
import time

from tcpcopylib.wire import encode_pkt_sid as encode_pkt

SEC = 1_000_000_000
MAX_PENDING = 100_000   # records held for their due time before we stop reading stdin
CHUNK = 1 << 17
POLL_WAITED_NS = 200_000  # a poll that took longer waited for its input to become readable
OUT_BATCH = 1 << 16     # output bytes buffered before a flush within one loop turn
FD_SETSIZE = 1024       # select() takes descriptors below it only
# loop turns for a near deadline (_poll_timeout): each at the deadline exactly, up to a
# burst of TIMED_BURST_NS / TIMED_EVERY_NS of them; then one per TIMED_EVERY_NS at most
TIMED_EVERY_NS = 1_000_000
TIMED_BURST_NS = 8 * TIMED_EVERY_NS


class FinePoll:
    """select.poll() with a timeout to the microsecond: poll(timeout_ms) takes a float.
    select.poll rounds a timeout up to whole ms, so a packet due at a timer would go out
    up to 1 ms late (0.5 ms on average); a timed wait goes to select.select on the same
    descriptors instead (its timeout is a timeval), as long as they all fit in its
    FD_SETSIZE (else to poll, rounded up). No timeout (block) and 0 stay with poll."""

    def __init__(self):
        self._poll = select.poll()
        self._fds: list[int] = []

    def register(self, fd: int, events: int = select.POLLIN) -> None:
        assert events == select.POLLIN, "select() stands in for POLLIN only"
        self._poll.register(fd, events)
        if fd not in self._fds:
            self._fds.append(fd)

    def unregister(self, fd: int) -> None:
        self._poll.unregister(fd)
        self._fds.remove(fd)

    def poll(self, timeout_ms=None) -> list:
        if not timeout_ms or max(self._fds, default=0) >= FD_SETSIZE:
            return self._poll.poll(None if timeout_ms is None else math.ceil(timeout_ms))
        ready = select.select(self._fds, (), (), timeout_ms * 1e-3)[0]
        return [(fd, select.POLLIN) for fd in ready]


class PacketOutput:
    """The stage's output: the engine's packets as "pkt" records with their sid (with
    batch > 1, "pkts" batches of the packets of one loop turn), other records in their
    place. The writer never flushes by itself: flush() calls before_flush() first (the
    runner sends the pending feedback claims there), so a claim always reaches tc-feedback
    before the SYN that needs it leaves this process."""

    def __init__(self, writer, batch: int = 1):
        from tcpcopylib.records import PendingBatch

        self.writer = writer
        self.batch = batch
        self.pending = PendingBatch(sids=True)  # batch > 1: the packets of the batch being made
        self.before_flush = None
        self.emit = self._emit if batch == 1 else self._emit_batched  # emit(data, sid, now)

    def _emit(self, data, sid, now):
        writer = self.writer
        writer.write_raw(encode_pkt(now, data, sid))
        if len(writer.buf) >= OUT_BATCH:
            self.flush()

    def _emit_batched(self, data, sid, now):
        pending = self.pending
        if sid > 0xFFFFFFFF:  # (a sid column holds 32 bits)
            pending.write_to(self.writer)
            self._emit(data, sid, now)
            return
        pending.stamps.append(now)
        pending.datas.append(data)
        pending.sids.append(sid)
        if len(pending.stamps) >= self.batch:
            pending.write_to(self.writer)
            if len(self.writer.buf) >= OUT_BATCH:
                self.flush()

    def write(self, rec: dict) -> None:
        """A record of another type, passed through."""
        self.pending.write_to(self.writer)  # what came before it goes before it
        self.writer.write(rec)

    def end_batch(self) -> None:
        self.pending.write_to(self.writer)

    def flush(self) -> None:
        self.pending.write_to(self.writer)
        if self.before_flush is not None:
            self.before_flush()
        self.writer.flush()

    def close(self) -> None:
        """At the end: what was made goes out (the claims were flushed by the runner)."""
        self.end_batch()
        self.writer.flush()


class SendOutput:
    """The stage's output with tc-session --send: the engine's packets go straight to an
    Emitter (tc-emit's checks, batches and senders; tcpcopylib.emit), the chain of
    `tc-session | tc-pace | tc-emit` in one process. The packets that PacketOutput would
    write, in the same order and at the same flush points: a batch leaves at flush() (the
    end of each loop turn) or when the Emitter holds a full sendmmsg batch, and the pending
    feedback claims always go out first (before_flush, through Emitter.before_send).
    Records of other types have nowhere to go: they are counted, as tc-emit counts the
    records it ignores (input headers excepted)."""

    def __init__(self, emitter):
        self.emitter = emitter
        self.ignored = 0
        self.before_flush = None
        emitter.before_send = self._claims_first
        emit = emitter.emit

        def send(data, sid, now):  # emit(data, sid, now), as the engine calls it
            emit(data)
        self.emit = send

    def _claims_first(self) -> None:
        if self.before_flush is not None:
            self.before_flush()

    def write(self, rec: dict) -> None:
        if rec.get("t") != "header":
            self.ignored += 1

    def end_batch(self) -> None:
        pass

    def flush(self) -> None:
        if self.emitter.pending:
            self.emitter.flush()  # (claims first, by before_send)
        else:
            self._claims_first()  # releases without a packet go out too

    def close(self) -> None:
        """At the end: the rest is sent (the runner flushed the claims already)."""
        self.before_flush = None
        self.emitter.close()


class SessionStage:
    """The engine fed from a DueQueue: packets are queued when taken and given to the
    engine when due; the engine's packets go to ``out`` (a PacketOutput or a SendOutput)."""

    def __init__(self, engine, due, out: PacketOutput):
        self.engine = engine
        self.due = due
        self.out = out
        # the server->client half of a capture is dropped before it is queued (the engine
        # would only count it; in real captures it is often most of the packets)
        self._server_side = engine.mapper.server_datagram_test()

    def take(self, items, now: int) -> None:
        """Packets are queued; records we do not know pass through."""
        dropped = self.due.push_records(items, now, self._other, self._server_side)
        if dropped:
            self.engine.count_server_side(dropped)

    def _other(self, rec: dict) -> None:
        """A record that is no packet: passed on; a session a filter stage dropped
        (tc-select's "filtered" record) counts as one with the outcome "filtered"."""
        if rec.get("t") == "filtered":
            self.engine.st.outcomes["filtered"] += 1
        self.out.write(rec)

    def feedback(self, replies, now: int) -> None:
        """The target's replies, as FeedbackClient.read_replies() gives them."""
        feedback_packet = self.engine.feedback_packet
        for data, n in replies:
            feedback_packet(data, now, n)

    def run_due(self, now: int) -> None:
        q = self.due.q
        client_packet = self.engine.client_packet
        while q and q[0][0] <= now:  # due.pop_due(), inline
            due, data = q.popleft()
            client_packet(data, now, due)
        self.engine.on_timer(now)

    def next_due(self):
        q = self.due.q
        ds = [d for d in (q[0][0] if q else None, self.engine.next_deadline())
              if d is not None]
        return min(ds) if ds else None

    def queued(self) -> int:
        return len(self.due.q)

    def lag(self, now: int) -> int:
        """How late (ns) the oldest queued packet is; 0 if none is due yet."""
        q = self.due.q
        return now - q[0][0] if q and q[0][0] < now else 0

    def finish(self, now: int) -> None:
        self.due.q.clear()  # after a signal, what is not due is dropped

    def settled(self, now: int) -> bool:
        return not self.engine.sessions or self.engine.quiescent(now)

    def close(self, now: int) -> None:
        self.engine.close_all(now)


class Interruptible:
    """A loop that signals stop: the first SIGTERM/SIGINT asks it to drain, a second to end
    at once. The loop keeps ``stop_sig``, ``stop_count`` and a self-pipe ``_wake_w`` (a
    byte there wakes its poll)."""

    def interrupt(self, signum: int) -> None:
        self.stop_sig = signum
        self.stop_count += 1
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def catch_signals(self) -> None:
        """SIGTERM and SIGINT call interrupt()."""
        import signal

        signal.signal(signal.SIGTERM, lambda signum, frame: self.interrupt(signum))
        signal.signal(signal.SIGINT, lambda signum, frame: self.interrupt(signum))


class SessionRunner(Interruptible):
    """Runs a SessionStage until its input ends (or a signal), then drains it.

    ``fb``: a connected FeedbackClient or None; ``lag``: a metrics.Histogram of the
    feedback lag, or None; ``admission``: an admission.Admission, which sets the engine's
    ``shedding`` every turn (``max_rss`` alone: one for --max-memory); ``on_stats()``:
    called every ``stats_every`` s; ``clock()``
    (wall ns), ``monotonic()`` (s) and ``poll`` (a FinePoll: select.poll's interface, its
    timeout in ms as a float, to the ns) are injectable.
    interrupt(signum) may be called from a signal handler: the first stops reading and
    drains, a second ends at once."""

    def __init__(self, stage: SessionStage, fb=None, *, drain: float = 5.0,
                 feedback_retry: float = 30.0, max_rss: int | None = None,
                 stats_every: float | None = None, on_stats=None, lag=None, warn=print,
                 clock=time.time_ns, monotonic=time.monotonic, poll=None, admission=None):
        self.stage = stage
        self.fb = fb
        self.drain_ns = int(drain * SEC)
        self.feedback_retry = feedback_retry
        if admission is None and max_rss is not None:
            from tcpcopylib.session.admission import Admission

            admission = Admission(lag_ms=0, max_rss=max_rss, monotonic=monotonic)
        self.admission = admission
        self.stats_every = stats_every
        self.on_stats = on_stats
        self.lag = lag
        self.warn = warn
        self.clock, self.monotonic = clock, monotonic
        self.poll = poll if poll is not None else FinePoll()
        self.stop_sig = self.stop_count = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # a lost feedback connection: when, the next try, the wait before the one after
        self.fb_down = None
        self.fb_next = 0.0
        self.fb_backoff = 0.05
        self.fb_fd = -1
        self.in_fd = -1
        self._take = None
        # the last moment the input was known empty, and that moment as it was before the
        # last read (what the read got arrived after it): _own_lag
        self.empty_seen = self.arrived_after = clock()
        self.stage_fd = -1
        self.reading = self.eof = False
        self.drain_until = None
        self.next_stats = 0.0
        self.timed_tat = 0  # the timed wake-ups' limiter (_poll_timeout)
        self._rbuf = memoryview(bytearray(CHUNK))
        stage.out.before_flush = self._flush_claims

    def run(self, in_fd: int, name: str = "<stdin>", take=None) -> None:
        """The loop: until the input is over and drained (or a signal). ``take``: an input
        in this process rather than a stream on ``in_fd`` (tc-session --capture): when
        in_fd is readable, take() returns the stream's next bytes (b"": none yet)."""
        from tcpcopylib.records import AS_PKT
        from tcpcopylib.streamparse import StreamParser

        # (ts, data) tuples, other records and the headers (the output's sections follow them)
        self.parser, self._feed_mode = StreamParser(name=name, headers=True), AS_PKT
        self._take = take
        if take is None:
            os.set_blocking(in_fd, False)
        self.in_fd = in_fd
        # poll, not epoll: epoll refuses regular files (tc-session < file)
        self.poll.register(in_fd, select.POLLIN)
        self.poll.register(self._wake_r, select.POLLIN)
        self.reading = True
        if self.fb is not None:
            self.fb_fd = self.fb.fileno()
            self.poll.register(self.fb_fd, select.POLLIN)
        # a stage with descriptors of its own gives one that is readable when they have
        # events (an epoll set), and handles them in on_ready(now)
        if hasattr(self.stage, "fileno"):
            self.stage_fd = self.stage.fileno()
            self.poll.register(self.stage_fd, select.POLLIN)
        if self.stats_every:
            self.next_stats = self.monotonic() + self.stats_every
        try:
            while self._turn():
                pass
        finally:
            self._close()

    def _turn(self) -> bool:
        """One turn of the loop: what is due, then wait for input or the next due time;
        False when it is over."""
        stage = self.stage
        now = self.clock()
        if self.admission is not None:  # shed new sessions now? (before they are run)
            stage.engine.shedding = self.admission.reason(  # (a backlog: of a pipe only)
                self._own_lag(now), self.in_fd if self.reading and not self._take else -1,
                stage.due)
        stage.run_due(now)
        if self.fb_down is not None and self.monotonic() >= self.fb_next:
            self._fb_retry()
        if self.stop_sig or self.eof and not stage.queued():
            if self.drain_until is None:  # the input is over: drain, then reset
                self.drain_until = now + self.drain_ns
                self._stop_reading()
                stage.finish(now)
            if now >= self.drain_until or self.stop_count > 1 or stage.settled(now):
                stage.close(now)
                return False
        if self.stats_every and self.monotonic() >= self.next_stats:
            self.on_stats()
            self.next_stats += self.stats_every
        stage.out.flush()
        self._back_pressure()
        watch = self.reading and self._take is None
        before = self.clock() if watch else 0
        events = self.poll.poll(self._poll_timeout(now))
        if watch:  # (_own_lag) the input was empty until poll returned if poll returned
            after = self.clock()  # without it or waited (it returns as soon as one is ready)
            if after - before > POLL_WAITED_NS or not any(fd == self.in_fd for fd, _ in events):
                self.empty_seen = after
        for fd, _ in events:
            self._ready(fd)
        return True

    def _ready(self, fd: int) -> None:
        now = self.clock()
        if fd == self.in_fd:
            if self._read_input(now):
                self.eof = True
                self._stop_reading()
        elif fd == self.fb_fd:
            self._read_feedback(now)
        elif fd == self.stage_fd:
            self.stage.on_ready(now)
        else:
            try:
                os.read(self._wake_r, 64)
            except OSError:
                pass

    def _own_lag(self, now: int) -> int:
        """How late (ns) this tc-session is: the oldest due packet's lateness, less what it
        had when it reached our input. A packet that arrives late (an upstream stall: a
        broker's election, a paused capture) is not our lag; one that waits in our pipe
        is. The input is known empty at some moments (a read that did not fill the buffer,
        a poll that returned without it, or that waited until it or another was ready);
        what a read gets arrived after the last such moment, so our lag is at most the
        time since then."""
        lag = self.stage.lag(now)
        if not lag or self._take is not None:  # (in process: the capture sheds on its own)
            return lag
        return min(lag, max(0, now - self.arrived_after))

    def _stop_reading(self) -> None:
        if self.reading:
            self.poll.unregister(self.in_fd)
            self.reading = False

    def _back_pressure(self) -> None:
        """Hold at most MAX_PENDING records for their due time."""
        queued = self.stage.queued()
        if self.reading and queued >= MAX_PENDING:
            self._stop_reading()
        elif (not self.reading and not self.eof and self.drain_until is None
              and queued < MAX_PENDING // 2):
            self.poll.register(self.in_fd, select.POLLIN)
            self.reading = True

    def _poll_timeout(self, now: int):
        """The wait in ms until the earliest deadline, exact (a float; None: block): a
        packet released by a timer goes out when it is due, not up to a ms later (poll()'s
        whole ms). Within a limit: a busy replay, every packet due at a time of its own,
        would turn the loop once per packet (tc-session's CPU 1.4 to 1.7 times). Turns for
        a deadline less than TIMED_EVERY_NS away come in bursts of TIMED_BURST_NS /
        TIMED_EVERY_NS at most, then one per TIMED_EVERY_NS, which sends what is due by
        then together (a generic cell rate algorithm: timed_tat moves on with each). Input
        turns the loop too, each turn moving timed_tat on: it is kept within a turn's
        TIMED_EVERY_NS of the burst, so that a deadline after a busy spell waits no more
        than that (not one ms for every turn the input made)."""
        ds = [d for d in (self.stage.next_due(), self.drain_until) if d is not None]
        t = None
        if ds:
            d = min(ds)
            if d - now < TIMED_EVERY_NS:
                d = max(d, self.timed_tat - TIMED_BURST_NS)
                self.timed_tat = min(max(self.timed_tat, now) + TIMED_EVERY_NS,
                                     now + TIMED_BURST_NS + TIMED_EVERY_NS)
            t = (d - now) / SEC
        if self.stats_every:
            left = self.next_stats - self.monotonic()
            t = left if t is None else min(t, left)
        if t is not None and self.drain_until is not None:
            t = min(t, 0.05)  # while draining, look at quiescence often
        if t is not None:
            t = min(max(t, 0), 3600)  # (poll() refuses years)
        if self.fb_down is not None:
            retry = max(0.0, self.fb_next - self.monotonic())
            t = retry if t is None else min(t, retry)
        return None if t is None else t * 1e3 if t > 0 else 0

    def _read_input(self, now: int) -> bool:
        """Read what the input holds; True at its end."""
        if self._take is not None:
            data = self._take()
            if data:
                self.stage.take(self.parser.feed(data, self._feed_mode), now)
            return False
        try:
            # into one buffer: a fresh 128 KiB bytes per read() costs an mmap/munmap pair
            n = os.readv(self.in_fd, (self._rbuf,))
        except BlockingIOError:
            self.empty_seen = now
            return False
        if n:
            self.arrived_after = self.empty_seen  # (_own_lag)
            if n < CHUNK:  # it took all there was
                self.empty_seen = now
        if not n:
            self.parser.close()
            return True
        self.stage.take(self.parser.feed(self._rbuf[:n].tobytes(), self._feed_mode), now)
        return False

    # -- feedback ----------------------------------------------------------------------------
    def _read_feedback(self, now: int) -> None:
        from tcpcopylib.errors import UnavailableError

        fb = self.fb
        try:
            replies = fb.read_replies()
        except UnavailableError as e:
            self._fb_lost(e)
            return
        self.stage.feedback(replies, now)
        if replies and fb.last_ts and self.lag is not None:
            lag = now - fb.last_ts
            self.lag.observe(lag * 1e-9 if lag > 0 else 0.0)

    def _flush_claims(self) -> None:
        """Before the output is flushed: the claims the engine made go out first."""
        from tcpcopylib.errors import UnavailableError

        fb = self.fb
        if fb is not None and fb.sock is not None:
            try:
                fb.flush()
            except UnavailableError as e:
                self._fb_lost(e)

    def _fb_lost(self, err) -> None:
        """The feedback connection broke: sessions go on; the loop reconnects."""
        if not self.feedback_retry:
            raise err
        if self.fb_fd >= 0:
            try:
                self.poll.unregister(self.fb_fd)
            except (KeyError, ValueError):
                pass
            self.fb_fd = -1
        self.fb.close()
        if self.fb_down is None:
            self.fb_down = self.fb_next = self.monotonic()
            self.fb_backoff = 0.05
            self.warn(f"{err}; reconnecting (for at most {self.feedback_retry:g} s; "
                      f"sessions go on, replies are lost meanwhile)")

    def _fb_retry(self) -> None:
        """One try to reconnect (the loop calls it when due)."""
        from tcpcopylib.errors import UnavailableError

        fb = self.fb
        try:
            n = fb.reconnect(timeout=1.0)
        except UnavailableError as e:
            now_m = self.monotonic()
            if now_m - self.fb_down >= self.feedback_retry:
                raise UnavailableError(f"{e} (gave up reconnecting after "
                                       f"{self.feedback_retry:g} s)") from None
            self.fb_backoff = min(self.fb_backoff * 2, 2.0)
            self.fb_next = now_m + self.fb_backoff
            return
        self.fb_fd = fb.fileno()
        self.poll.register(self.fb_fd, select.POLLIN)
        self.warn(f"reconnected to tc-feedback at {fb.address} after "
                  f"{self.monotonic() - self.fb_down:.1f} s; {n} connection(s) claimed again")
        self.fb_down = None

    def _close(self) -> None:
        """At the end, however it came: what was made goes out, the feedback closes."""
        fb = self.fb
        if fb is not None and fb.sock is not None:
            try:
                fb.flush()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        try:
            self.stage.out.close()
        finally:
            if fb is not None:
                fb.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
