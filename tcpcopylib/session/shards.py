"""tc-session --shards N: one tc-session's session work in N processes (one per core).

The parent reads the input once and hands each packet record to shard
``session_shard(datagram, N)`` (tcpcopylib.packet: the captured connection's key, the
same for both directions, so a connection and its -n copies stay in one process). Each
shard is an ordinary tc-session in a child process (``ShardChild``: cli/session.py's Tool
with its own engine, feedback connection and output) with:

* its own client port block: shard k of N with the user's ``-f K/M`` (default 0/1) is
  instance ``K*N + k`` of ``M*N`` (so M*N <= 256), never a 4-tuple of another shard or
  another tc-session of the same -f plan;
* its own session ids: shard k numbers its sessions from ``k * 2**32 // N + 1``, so the
  "sid" of a packet or a "sess" record names one session in the merged output;
* the parent's timing anchor: the parent sends every shard the wall time at which it read
  the first packet and that packet's ts (an "anchor" record, never written out), so each
  shard keeps the recording's pace from the same origin as one process would (and -g
  ramps from the same start). With --max-gap the parent shortens the gaps itself
  (rewriting the ts of the records after a gap) and the shards see no gap to clamp.

Between parent and child: the child's stdin is an ordinary record stream (label and
header per input section, the records of its sessions, in input order); its output is a
pipe of *frames* (kind byte, 4-byte length, payload): "R" whole records (one flush of
its output, no section header: the parent writes one stream with one header per input
section), "M" a message line (the parent prints it, so the children's warnings and
errors reach the parent's stderr), "S" its counters (every second and at its end).

In pipe mode the parent writes the children's record frames as they arrive: each
shard's records are in its own order (nondecreasing ts), and records of different shards
are interleaved at flush boundaries: a record may carry a ts up to one turn of a shard's
loop (normally well under a millisecond) before the one written ahead of it. tc-pace
releases such a record at once (it is due already), so nothing is reordered or delayed
downstream. With --send each child sends its packets itself and writes no records.

Exit, signals: a child that fails (exit status not 0) stops the others (SIGTERM: they
drain) and its status is the parent's, after a line naming the shard. SIGINT/SIGTERM to
the parent go to every child (the first: drain, a second: end at once); the children are
in their own process group (a terminal's Ctrl-C reaches only the parent, which passes it
on once). A closed stdout (EPIPE) kills the children and exits 141. A child never
outlives the parent: PR_SET_PDEATHSIG (SIGKILL), and its input ends when the parent's
end of the pipe closes.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import select
import signal
import struct
import time

from tcpcopylib.errors import UsageError
from tcpcopylib.session.runner import Interruptible
from tcpcopylib.packet import session_shard
from tcpcopylib.records import AS_PKT, LABEL, T_HEADER, T_PKT
from tcpcopylib.wire import PKT_TS_AT, encode_pkt, pkt_spans

MAX_SHARDS = 64
T_ANCHOR = "anchor"         # parent -> child only: {"t", "wall", "ts"}
FRAME = struct.Struct(">cI")
F_RECORDS, F_MESSAGE, F_STATS = b"R", b"M", b"S"
CHUNK = 1 << 17
CHILD_BUFFER = 4 << 20      # bytes held for one child before the parent stops reading input
STOP_GRACE = 30.0           # s after a second signal before the children are killed
REPORT_EVERY = 1_000_000_000  # ns between a shard's reports of its counters
KNOWN_MAX = 1 << 17          # connections remembered by the parent before it starts over
_U64 = struct.Struct(">Q")
PR_SET_PDEATHSIG = 1


# -- the plan: what each shard is given -------------------------------------------------------

def shard_instance(args, k: int, n: int) -> str:
    """The -f of shard k of n: block K*n + k of M*n, with the user's -f K/M (default 0/1)."""
    from tcpcopylib.session.alloc import parse_instance

    big_k, m = parse_instance(args.instance) if args.instance else (0, 1)
    if m * n > 256:
        raise UsageError(f"--shards {n} with -f {big_k}/{m}: {m} x {n} port blocks, more "
                         f"than 256 (use a smaller M or fewer shards)")
    return f"{big_k * n + k}/{m * n}"


def shard_args(args, k: int, n: int):
    """The options of shard k: the user's, with its port block, reading its stdin, and
    without what the parent does (the reports, the gap clamp)."""
    a = copy.copy(args)
    a.shards = 1
    a.instance = shard_instance(args, k, n)
    a.file = "-"
    a.max_gap = None  # the parent shortened the gaps already
    a.stats = a.progress = False
    a.stats_json = a.metrics = a.metrics_listen = None
    return a


def check(args) -> None:
    """--shards and the options that go with it (UsageError)."""
    n = args.shards
    if not 1 <= n <= MAX_SHARDS:
        raise UsageError(f"--shards takes a number of processes in 1..{MAX_SHARDS}")
    if args.socket:
        raise UsageError("--shards goes with forged mode (records out or --send), not "
                         "--socket")
    shard_instance(args, 0, n)


# -- a child: one shard -------------------------------------------------------------------------

def _frame(fd: int, kind: bytes, payload) -> None:
    """One frame to the parent, whole (a blocking pipe: the writes wait for the parent)."""
    data = FRAME.pack(kind, len(payload)) + bytes(payload)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _child_classes():
    """ShardChild and its writer and stage, made when first needed (cli.session, runner)."""
    from tcpcopylib.cli.session import Tool
    from tcpcopylib.records import StageWriter
    from tcpcopylib.session.runner import PacketOutput, SessionStage

    class FrameWriter(StageWriter):
        """A StageWriter whose flush sends its buffer as one "R" frame, without section
        headers (the parent writes those)."""

        def section(self, upstream) -> None:
            self.started = True

        def flush(self) -> None:
            if self.buf:
                try:
                    _frame(self.fd, F_RECORDS, self.buf)
                finally:
                    self.buf.clear()

    class ShardStage(SessionStage):
        """The stage of shard k of n: session ids from its own range, the parent's anchor
        (taken out of the input before anything else)."""

        def __init__(self, engine, due, out, k: int, n: int, report):
            super().__init__(engine, due, out)
            engine.next_sid = k * (1 << 32) // n + 1
            self.report = report  # sends the counters to the parent
            self.next_report = 0

        def run_due(self, now: int) -> None:
            super().run_due(now)
            if now >= self.next_report:
                self.next_report = now + REPORT_EVERY
                self.report()

        def take(self, items, now: int) -> None:
            for i, item in enumerate(items):
                if type(item) is dict and item.get("t") == T_ANCHOR:
                    tl = self.due.timeline
                    tl.anchor_wall, tl.anchor_ts = item["wall"], item["ts"]
                    self.engine.t0 = item["wall"]
                    del items[i]
                    self.take = super().take  # (the anchor comes once)
                    break
            super().take(items, now)

    class ShardChild(Tool):
        """tc-session as shard k of n: output in frames to the parent, messages too."""

        def __init__(self, k: int, n: int, out_fd: int):
            super().__init__(stdout_fd=out_fd)
            self.k, self.n = k, n

        def warn(self, msg: str) -> None:
            try:
                _frame(self.stdout_fd, F_MESSAGE, f"shard {self.k}: {msg}".encode())
            except OSError:
                pass

        def make_stage(self, engine, due, out):
            return ShardStage(engine, due, out, self.k, self.n, self.report)

        def report(self) -> None:
            """The counters to the parent (its --stats-json, metrics and --progress)."""
            stats = self.stats_dict()
            stats["cpu_s"] = _cpu_s()
            _frame(self.stdout_fd, F_STATS, json.dumps(stats).encode())

        def _output(self, args):
            if args.send:
                return super()._output(args)
            return PacketOutput(FrameWriter(self.stdout_fd, self.name, bufsize=1 << 62),
                                args.batch)

        def _session_map(self, args, write_other):
            """--sessions FILE: each shard appends its own section to the file the parent
            made empty (whole writes: the sections' records do not mix within a record)."""
            if args.sessions in (None, "-"):
                return super()._session_map(args, write_other)
            from tcpcopylib.errors import NoInputError
            from tcpcopylib.records import RecordWriter, header
            from tcpcopylib.session.sessmap import SessionMap

            try:
                fd = os.open(args.sessions, os.O_WRONLY | os.O_APPEND)
            except OSError as e:
                raise NoInputError(f"--sessions {args.sessions}: {e.strerror or e}") from None
            w = RecordWriter(fd, header(self.name), bufsize=1 << 62)
            smap = SessionMap(w.write, w.flush)
            smap.fd = fd
            self.engine.emit = smap.wrap_emit(self.engine.emit)
            self.engine.on_end = smap.chain_on_end(self.engine.on_end)
            return smap

    return ShardChild


def _child(args, k: int, n: int, in_r: int, out_w: int, parent: int, keep: tuple,
           stdout_fd: int) -> None:
    """The child process of shard k (after fork): run, report, _exit. Never returns."""
    status = 70
    try:
        try:
            os.setpgid(0, 0)  # a terminal's signals go to the parent, which passes them on
        except OSError:
            pass
        _die_with_parent(parent)
        for fd in keep:
            if fd not in (in_r, out_w):
                _close(fd)
        os.dup2(in_r, 0)
        if in_r != 0:
            os.close(in_r)
        if stdout_fd not in (0, out_w):  # (the parent's stdout: its readers see only it)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stdout_fd)
            os.close(null)
        tool = _child_classes()(k, n, out_w)
        signal.signal(signal.SIGUSR1, tool._print_stats)  # (its own line, not the parent's)
        a = shard_args(args, k, n)
        tool.args = a
        status = tool._run_to_status(a)
        status = 141 if status is None else status
        try:
            tool.report()
        except OSError:
            pass
    except BaseException as e:  # noqa: BLE001 - a child reports and exits, whatever happened
        try:
            _frame(out_w, F_MESSAGE, f"shard {k}: error: {type(e).__name__}: {e}".encode())
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(status)


def _cpu_s() -> float:
    """This process's CPU time so far (user + system), in seconds."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return round(ru.ru_utime + ru.ru_stime, 6)


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies (Linux), and at once if it is gone already."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(70)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# -- the parent --------------------------------------------------------------------------------

class Shard:
    """The parent's view of one child."""

    __slots__ = ("k", "pid", "in_w", "out_r", "pending", "frames", "stats", "status",
                 "records")

    def __init__(self, k, pid, in_w, out_r):
        self.k, self.pid, self.in_w, self.out_r = k, pid, in_w, out_r
        self.pending = bytearray()  # bytes for its stdin not yet written
        self.frames = bytearray()   # bytes of its output not yet a whole frame
        self.stats = None           # its counters (dict), as it last reported them
        self.status = None          # its exit status, once reaped
        self.records = 0            # records sent to it


class ShardParent(Interruptible):
    """Reads the input, feeds the shards, forwards their output and messages, waits for
    them. ``writer``: a StageWriter on stdout (pipe mode) or None (--send); ``warn``
    prints a line on stderr; ``clock``: wall ns."""

    def __init__(self, args, n: int, writer, warn, clock=time.time_ns):
        self.args, self.n, self.writer, self.warn, self.clock = args, n, writer, warn, clock
        self.shards: list[Shard] = []
        self.anchored = False
        # the shard of each connection seen lately, by its packets' endpoint bytes (IPv4
        # without options): a dict look-up instead of session_shard() for most packets
        self.known: dict = {}
        self.max_gap = (None if args.max_gap is None or args.asap
                        else round(args.max_gap * 1e9))
        self.prev_ts = None
        self.cut = 0            # recording time taken out by the gap clamp so far
        self.ignored = 0        # --send: records of other types (as SendOutput counts them)
        self.failed = None      # (shard, status) of the first child that failed
        self.on_stats = None    # called when a shard reported its counters
        self.stop_sig = self.stop_count = 0
        self.reading = self.eof = False  # (eof: no more input for the shards)
        self.kill_at = 0.0      # after a second signal: when the shards are killed
        self.poll = select.poll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- start ----------------------------------------------------------------------------
    def start(self, in_fd: int, stdout_fd: int) -> None:
        """Fork the children (before any connection of ours exists), with what they all
        import imported once, here."""
        import importlib

        for name in ("feedback", "session.runner", "session.timing", "streamparse",
                     *(("emit", "cli.emit") if self.args.send else ())):
            importlib.import_module("tcpcopylib." + name)
        _child_classes()
        pipes = [(os.pipe(), os.pipe()) for _ in range(self.n)]
        every = [fd for pair in pipes for p in pair for fd in p] + [self._wake_r,
                                                                     self._wake_w]
        if in_fd not in (0, 1, 2):
            every.append(in_fd)
        parent = os.getpid()
        for k, ((in_r, in_w), (out_r, out_w)) in enumerate(pipes):
            pid = os.fork()
            if pid == 0:
                _child(self.args, k, self.n, in_r, out_w, parent, tuple(every), stdout_fd)
            os.close(in_r)
            os.close(out_w)
            os.set_blocking(in_w, False)
            os.set_blocking(out_r, False)
            self.shards.append(Shard(k, pid, in_w, out_r))
            self.poll.register(out_r, select.POLLIN)

    # interrupt(), catch_signals(): Interruptible's. The first signal stops reading and lets
    # the shards drain, a second ends them at once (each is passed on to every child).

    # -- the loop -------------------------------------------------------------------------
    def run(self, in_fd: int, name: str = "<stdin>") -> None:
        from tcpcopylib.streamparse import StreamParser

        self.parser = StreamParser(name=name, headers=True)
        self.in_fd = in_fd
        os.set_blocking(in_fd, False)
        self.poll.register(self._wake_r, select.POLLIN)
        self._read_on()
        rbuf = memoryview(bytearray(CHUNK))
        forwarded = 0
        try:
            while self._live():
                if self.stop_count > forwarded:
                    forwarded = self._forward_signal()
                if self.writer is not None:
                    self.writer.flush()
                self._flow()
                for fd, ev in self.poll.poll(1000 if self.stop_count < 2 else 100):
                    self._ready(fd, ev, rbuf)
                if self.stop_count >= 2 and time.monotonic() > self.kill_at:
                    self._kill()
        except BaseException:
            self._kill()
            raise
        finally:
            if self.writer is not None:
                self.writer.flush()
            _close(self._wake_r)
            _close(self._wake_w)

    def _live(self) -> bool:
        return any(s.status is None for s in self.shards)

    def _forward_signal(self) -> int:
        """Pass the signal on: stop reading; the children drain (a second: end)."""
        self._read_off()
        self.eof = True
        for s in self.shards:
            if s.in_w >= 0:  # what it was owed is dropped, as one tc-session drops it
                self._close_input(s)
            if s.status is None:
                try:
                    os.kill(s.pid, self.stop_sig)
                except ProcessLookupError:
                    pass
        if self.stop_count >= 2:
            self.kill_at = time.monotonic() + STOP_GRACE
        return self.stop_count

    def _read_on(self) -> None:
        if not self.reading:
            self.poll.register(self.in_fd, select.POLLIN)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.poll.unregister(self.in_fd)
            self.reading = False

    def _flow(self) -> None:
        """Back-pressure, and the end of the input passed on (each child's stdin closed
        once what it is owed is written)."""
        held = 0
        for s in self.shards:
            if s.in_w < 0:
                continue
            if s.pending:
                self._write_child(s)  # at once: the pipe has room, most of the time
            if s.in_w < 0:
                continue
            if s.pending:
                self.poll.register(s.in_w, select.POLLOUT)
                held = max(held, len(s.pending))
            elif self.eof:
                self._close_input(s)
            else:
                try:
                    self.poll.unregister(s.in_w)
                except KeyError:
                    pass
        if self.eof or self.stop_count:
            return
        if held >= CHILD_BUFFER:
            self._read_off()
        elif held < CHILD_BUFFER // 2:
            self._read_on()

    def _close_input(self, s: Shard) -> None:
        try:
            self.poll.unregister(s.in_w)
        except KeyError:
            pass
        _close(s.in_w)
        s.in_w = -1
        s.pending.clear()

    def _ready(self, fd: int, ev: int, rbuf) -> None:
        if fd == self.in_fd:
            self._read_input(rbuf)
            return
        if fd == self._wake_r:
            try:
                os.read(self._wake_r, 64)
            except OSError:
                pass
            return
        for s in self.shards:
            if fd == s.out_r:
                self._read_child(s)
                return
            if fd == s.in_w:
                self._write_child(s)
                return

    def _write_child(self, s: Shard) -> None:
        try:
            n = os.write(s.in_w, s.pending)
        except BlockingIOError:
            return
        except OSError as e:  # the child is gone (EPIPE): its end is reported by its output
            if e.errno not in (errno.EPIPE, errno.EBADF):
                raise
            self._close_input(s)
            return
        del s.pending[:n]

    # -- input -> shards ------------------------------------------------------------------
    def _read_input(self, rbuf) -> None:
        try:
            n = os.readv(self.in_fd, (rbuf,))
        except BlockingIOError:
            return
        if not n:
            self._read_off()
            self.eof = True
            self.parser.close()  # StreamError if it ended inside a record
            return
        items = self.parser.feed_fast(rbuf[:n].tobytes(), self._take, AS_PKT)
        if items:
            self._items(items)

    def _anchor(self, ts: int) -> None:
        """The first packet: every shard is told when it was read (their common origin)."""
        import cbor2

        self.anchored = True
        rec = cbor2.dumps({"t": T_ANCHOR, "wall": self.clock(), "ts": ts})
        for s in self.shards:
            s.pending += rec

    def _take(self, buf: bytes) -> int:
        """feed_fast's take: the usual pkt records at the start of buf, each to its shard
        (consecutive records of one shard in one piece); the bytes taken."""
        spans = pkt_spans(buf, 0)
        if not spans:
            return 0
        if not self.anchored:
            self._anchor(_U64.unpack_from(buf, PKT_TS_AT)[0])
        if self.max_gap is not None:
            return self._take_clamped(buf, spans)
        n, shards, view = self.n, self.shards, memoryview(buf)
        known = self.known
        if len(known) > KNOWN_MAX:
            known.clear()
        run_k, run_start, pos, run_n = -1, 0, 0, 0
        for d0, d1 in spans:
            if buf[d0] == 0x45:  # IPv4 without options: its endpoints' bytes name it
                ends = buf[d0 + 12:d0 + 24]
                k = known.get(ends)
                if k is None:
                    k = known[ends] = session_shard(buf, n, d0, d1)
            else:
                k = session_shard(buf, n, d0, d1)
            if k != run_k:
                if run_n:
                    s = shards[run_k]
                    s.pending += view[run_start:pos]
                    s.records += run_n
                run_k, run_start, run_n = k, pos, 0
            run_n += 1
            pos = d1
        s = shards[run_k]
        s.pending += view[run_start:pos]
        s.records += run_n
        return pos

    def _take_clamped(self, buf: bytes, spans) -> int:
        """_take with --max-gap: each record's ts less the time cut out of the gaps so
        far (a forward jump of more than max-gap between consecutive packets counts as
        exactly max-gap, as tc-pace --max-gap and one tc-session do it)."""
        pos = 0
        for d0, d1 in spans:
            ts = self._clamp(_U64.unpack_from(buf, pos + PKT_TS_AT)[0])
            s = self.shards[session_shard(buf, self.n, d0, d1)]
            s.pending += encode_pkt(ts, buf[d0:d1])
            s.records += 1
            pos = d1
        return pos

    def _clamp(self, ts):
        if self.max_gap is None or type(ts) is not int:
            return ts
        prev, self.prev_ts = self.prev_ts, ts
        if prev is not None and ts - prev > self.max_gap:
            self.cut += ts - prev - self.max_gap
        return ts - self.cut

    def _items(self, items) -> None:
        """What the fast path did not take: packets of other layouts (batches expanded,
        (ts, data) pairs), headers, records of other types."""
        import cbor2

        for item in items:
            if type(item) is tuple:  # a whole packet (from a batch, say)
                ts, data = item
                if not self.anchored and type(ts) is int:
                    self._anchor(ts)
                s = self.shards[session_shard(data, self.n)]
                s.pending += encode_pkt(self._clamp(ts), data)
                s.records += 1
                continue
            t = item.get("t")
            if t == T_HEADER:  # a section: every shard reads it, the output starts one
                raw = LABEL + cbor2.dumps(item)
                for s in self.shards:
                    s.pending += raw
                if self.writer is not None:
                    self.writer.section(item)
                continue
            data = item.get("data")
            if t in (T_PKT, "s2c") and isinstance(data, (bytes, bytearray)):
                if t == T_PKT:
                    if not self.anchored and type(item.get("ts")) is int:
                        self._anchor(item["ts"])
                    if self.max_gap is not None:
                        item = dict(item, ts=self._clamp(item.get("ts")))
                s = self.shards[session_shard(data, self.n)]
                s.pending += cbor2.dumps(item)
                s.records += 1
            elif self.writer is not None:  # passed through, as one tc-session does
                self.writer.write(item)
            else:
                self.ignored += 1

    # -- shards -> output -----------------------------------------------------------------
    def _read_child(self, s: Shard) -> None:
        try:
            data = os.read(s.out_r, 1 << 18)
        except BlockingIOError:
            return
        if data:
            s.frames += data
            self._frames(s)
            return
        self.poll.unregister(s.out_r)
        _close(s.out_r)
        if s.in_w >= 0:
            self._close_input(s)
        _, wstatus = os.waitpid(s.pid, 0)
        s.status = os.waitstatus_to_exitcode(wstatus)
        if s.status < 0:
            s.status = 128 - s.status
        stopped = self.stop_count and s.status in (128 + signal.SIGINT,
                                                   128 + signal.SIGTERM)
        if s.status and not stopped and self.failed is None:
            self.failed = (s.k, s.status)
            if self.stop_count < 2:
                self.warn(f"shard {s.k} failed (exit status {s.status}); stopping the "
                          f"other shards")
            if not self.stop_count:
                self.interrupt(signal.SIGTERM)

    def _frames(self, s: Shard) -> None:
        buf, pos, end = s.frames, 0, len(s.frames)
        while end - pos >= FRAME.size:
            kind, size = FRAME.unpack_from(buf, pos)
            stop = pos + FRAME.size + size
            if stop > end:
                break
            payload = buf[pos + FRAME.size:stop]
            if kind == F_RECORDS:
                if self.writer is not None:
                    self.writer.buf += payload
            elif kind == F_MESSAGE:
                self.warn(payload.decode(errors="replace"))
            elif kind == F_STATS:
                s.stats = json.loads(payload)
                if self.on_stats is not None:
                    self.on_stats()
            pos = stop
        del buf[:pos]

    def _kill(self) -> None:
        """Abnormal end: no child left behind."""
        for s in self.shards:
            if s.status is None:
                try:
                    os.kill(s.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(s.pid, 0)
                except ChildProcessError:
                    pass
                s.status = 128 + signal.SIGKILL


# -- totals ----------------------------------------------------------------------------------

def add_counts(total: dict, part: dict) -> dict:
    """The counters of ``part`` added into ``total`` (numbers summed, maps recursively;
    text and lists are not counters and are left out)."""
    for key, v in part.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
            continue
        if isinstance(v, dict):
            add_counts(total.setdefault(key, {}), v)
        else:
            total[key] = total.get(key, 0) + v
    return total


def fill_engine(engine, totals: dict) -> None:
    """Set an (idle) engine's counters to the shards' totals, so that its reports
    (stats_line, summary) tell the whole run."""
    st = engine.st
    for key, v in totals.items():
        if hasattr(st, key):
            setattr(st, key, dict(v) if isinstance(v, dict) else v)
    engine.alloc.early_reuses = totals.get("early_reuses", 0)


# -- tc-session --shards N ------------------------------------------------------------------

def run(tool, args) -> int:
    """tc-session --shards N (tool: cli/session.py's Tool; args checked there)."""
    from tcpcopylib.session.options import build_engine

    check(args)
    if args.keep:
        raise UsageError("--keep goes with --socket")
    n = args.shards
    # the options checked once, here (a usage error is the parent's), with shard 0's -f;
    # this engine never runs: at the end it holds the totals for the reports
    tool.engine = build_engine(shard_args(args, 0, n), None, None)
    if args.sessions not in (None, "-"):
        try:
            os.close(os.open(args.sessions, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        except OSError as e:
            from tcpcopylib.errors import NoInputError

            raise NoInputError(f"--sessions {args.sessions}: {e.strerror or e}") from None
    in_fd = tool.open_input(args.file)
    writer = None
    if not args.send:
        from tcpcopylib.records import StageWriter

        writer = StageWriter(tool.stdout_fd, tool.name, bufsize=1 << 62)
    parent = tool.shard_parent = ShardParent(args, n, writer, tool.warn)
    parent.on_stats = lambda: _totals(tool, parent)
    parent.start(in_fd, tool.stdout_fd)
    parent.catch_signals()
    parent.run(in_fd, "<stdin>" if args.file == "-" else args.file)
    if parent.failed is not None:
        k, status = parent.failed
        from tcpcopylib.errors import TcError

        err = TcError(f"shard {k} of {n} failed (exit status {status})")
        err.exit_code = status
        raise err
    if args.stats:
        tool._print_summary()
        args.stats = False
    return 0


def _totals(tool, parent: ShardParent) -> None:
    totals: dict = {}
    for s in parent.shards:
        if s.stats:
            add_counts(totals, {k: v for k, v in s.stats.items() if k != "cpu_s"})
    tool.shard_totals = totals
    fill_engine(tool.engine, totals)


def stats_line(tool) -> str:
    """The --stats line of the totals (the idle engine has no session: the shards' live
    ones are put in)."""
    active = (getattr(tool, "shard_totals", None) or {}).get("active", 0)
    return tool.engine.stats_line().replace(" (0 active,", f" ({active} active,", 1)


def summary_lines(tool) -> list:
    from tcpcopylib.session.report import summary_lines as lines

    out = lines(tool.engine)
    out[0] = stats_line(tool)
    em = (getattr(tool, "shard_totals", None) or {}).get("emit")
    if em:  # --send: tc-emit's counters, summed (as report.summary_lines shows them)
        errors = ", ".join(f"{k} {v}" for k, v in sorted(em.get("errors", {}).items()))
        out.append(f"sending: sent {em.get('sent', 0)}, failed {em.get('failed', 0)}"
                   + (f" ({errors})" if errors else "")
                   + f", fixed checksums {em.get('fixed', 0)}, ignored records "
                   f"{em.get('ignored', 0) + tool.shard_parent.ignored}")
    return out


def stats_dict(tool) -> dict:
    """--stats-json of a sharded run: the shards' counters summed (and "shards": how many,
    "shard_records": the records each was given, "parent_cpu_s" and "shard_cpu_s": the
    CPU seconds of the parent and of each shard)."""
    totals = dict(getattr(tool, "shard_totals", {}) or {})
    parent = tool.shard_parent
    totals["summary"] = stats_line(tool)
    totals["shards"] = parent.n
    totals["shard_records"] = [s.records for s in parent.shards]
    # where the CPU went: the parent (reading, dispatching, writing) and each shard
    totals["parent_cpu_s"] = _cpu_s()
    totals["shard_cpu_s"] = [(s.stats or {}).get("cpu_s") for s in parent.shards]
    if parent.writer is None and "emit" in totals:
        totals["emit"]["ignored"] = totals["emit"].get("ignored", 0) + parent.ignored
    return totals
