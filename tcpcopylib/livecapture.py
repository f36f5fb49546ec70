"""tc-capture's run: one interface captured into a record stream until a packet count, a
signal or an error, and its counters. The parts (the engines, Capturer, capture_loop)
are in tcpcopylib.capture; tcpcopylib.cli.capture is the options."""

from __future__ import annotations

import os
import signal
import time

from tcpcopylib import capture as cap
from tcpcopylib.errors import NoInputError
from tcpcopylib.link import LINKTYPE_RAW
from tcpcopylib.records import RecordWriter

STATS_EVERY_S = 5.0     # seconds between -v status lines
DROPS_EVERY_S = 0.2     # seconds between looks at the kernel's drop counter (shedding)
PIPE_EVERY_S = 0.005    # seconds between looks at how full the output pipe is (shedding)
PIPE_SIZE = 1 << 20     # the output pipe is enlarged to this (if allowed): bursts fit
PIPE_HIGH, PIPE_LOW = 0.75, 0.25  # shed above this share of the pipe full, stop below that
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
HOLD_MAX = 64 << 20     # output held while the pipe is full, at most (then writes wait)


class LiveCapture:
    """Capture on ``iface`` with BPF ``expr`` (empty: "tcp") into a record stream.

    open() starts the engine and the output, run() captures; counters() and stats_line()
    may be called at any time (None before the capture started). ``warn(msg)`` says the
    warnings (and, with ``verbose``, a status line every STATS_EVERY_S); ``elapsed()``: the
    seconds the stats line reports (default: since this object was made). ``server_half``:
    the server->client half too, as "s2c" records (tcpcopylib.capture.Capturer)."""

    def __init__(self, tool: str, iface: str, expr: str = "", *, engine: str = "pcap",
                 snaplen: int = cap.DEFAULT_SNAPLEN, buffer_kib: int = cap.DEFAULT_BUFFER_KIB,
                 mtu: int = 0, count: int = 0, max_memory_mb: int = 0, warn=print,
                 verbose: int = 0, elapsed=None, server_half: bool = False,
                 shed_lag_ms: float = 0):
        self.tool, self.iface, self.expr = tool, iface, expr
        self.engine_kind, self.snaplen, self.buffer_kib = engine, snaplen, buffer_kib
        self.mtu, self.count, self.max_memory_mb = mtu, count, max_memory_mb
        self.warn, self.verbose = warn, verbose
        self.server_half = server_half
        self.shed_lag_ms = shed_lag_ms
        self.drops_seen = 0
        self.next_drops = self.next_pipe = 0.0
        self.pipe_size = 0      # the output pipe's capacity; 0: not a pipe (or no shedding)
        self.shed_warned_for: set = set()
        started = time.monotonic()
        self.elapsed = elapsed or (lambda: time.monotonic() - started)
        self.engine = self.capturer = self.writer = None
        self.out_fd, self.close_out = -1, False
        self.if_drops0 = 0
        self.final_drops = (0, 0)
        self.next_report = 0.0

    def open(self, out_fd: int | None, path: str | None = None) -> None:
        """Start the engine; the stream goes to ``path`` (created) if given, else to
        ``out_fd``; with neither, it collects in memory for a reader in this process
        (take()). UsageError, NoInputError, NoPermissionError as tcpcopylib.capture says."""
        from tcpcopylib.records import header

        iface = self.iface
        engine = cap.open_engine(self.engine_kind, iface, self.expr or "tcp", self.snaplen,
                                 self.buffer_kib, both_ways=self.server_half)
        self.engine = engine
        warning = getattr(engine, "warning", lambda: None)()
        if warning:
            self.warn(warning)
        self.if_drops0 = cap.interface_rx_drops(iface)
        mtu = self.mtu or (cap.interface_mtu(iface) if iface != "any" else cap.DEFAULT_MTU)
        self.mtu = mtu
        self.out_fd = out_fd
        if path is not None:
            try:
                self.out_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as e:
                engine.close()
                raise NoInputError(f"{path}: {e.strerror}") from None
            self.close_out = True
        hdr = header(self.tool, source=iface, filter=self.expr, linktype=LINKTYPE_RAW,
                     snaplen=self.snaplen, mtu=mtu, engine=engine.name, ts_clock="realtime")
        if self.server_half:
            hdr["server_half"] = True  # the stream holds s2c records too
        if self.shed_lag_ms and self.out_fd is not None:
            self.pipe_size = _pipe_size(self.out_fd)
        if self.out_fd is None:  # in process: the reader takes the bytes from writer.buf
            self.writer = MemoryWriter(-1, hdr)
        elif self.pipe_size:  # a pipe: never block on it while the kernel's ring fills
            os.set_blocking(self.out_fd, False)
            self.writer = HoldingWriter(self.out_fd, hdr)
        else:
            self.writer = RecordWriter(self.out_fd, hdr)
        self.capturer = cap.Capturer(self.writer, mtu=mtu, count=self.count,
                                     max_rss=self.max_memory_mb << 20,
                                     server_half=self.server_half,
                                     shed_lag_ms=self.shed_lag_ms)

    def describe(self) -> str:
        e = self.engine
        servers = (f", server half of {len(self.capturer.server_ports)} listening ports"
                   if self.server_half else "")
        return (f"capturing on {self.iface} ({e.name}: {e.describe()}, linktype "
                f"{e.linktype}, filter {self.expr or 'tcp'!r}, mtu {self.mtu}, "
                f"{len(self.capturer.local)} local addresses{servers})")

    def run(self) -> None:
        """Capture until the count is reached or SIGINT/SIGTERM; then flush the output and
        close the engine (and the output file)."""
        # Signals only set a flag (and wake select through the pipe): the loop stops
        # between batches, so a record is never cut in half, then flushes.
        stop_sig = []
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        old_wakeup = signal.set_wakeup_fd(wfd)

        def on_signal(signum, frame):
            stop_sig.append(signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.next_report = time.monotonic() + STATS_EVERY_S
        try:
            self.writer.flush()  # the header goes out at once: downstream sees a stream start
            cap.capture_loop(self.engine, self.capturer, lambda: bool(stop_sig), self._tick,
                             extra_fds=(rfd,))
        finally:
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
            self._close()

    def take(self, max_reads: int = 8) -> bytes:
        """In process (opened without an output): read what the kernel holds now (at most
        ``max_reads`` engine reads) and return the records made since the last call, the
        stream's header first. The reader waits for the engine's fd (``engine.fd``)."""
        read, c = self.engine.read, self.capturer
        for _ in range(max_reads):
            if read(c) == 0 or c.done:
                break
        now = time.monotonic()
        c.refresh(now)
        self._tick(now)
        buf = self.writer.buf
        data = bytes(buf)
        buf.clear()
        return data

    def close(self) -> None:
        """In process: stop capturing (the reader took the records)."""
        if self.engine is not None:
            self._close()

    def _tick(self, now: float) -> None:
        """Between batches: new kernel drops (they start shedding), the shedding warning
        (once per reason) and the -v status line."""
        c = self.capturer
        if self.pipe_size and now >= self.next_pipe:
            # downstream falls behind: the pipe fills before we block and the kernel drops
            self.next_pipe = now + PIPE_EVERY_S
            waiting = (cap.pipe_backlog(self.out_fd) + len(self.writer.buf)) / self.pipe_size
            c.backlog_over = waiting > PIPE_HIGH or c.backlog_over and waiting >= PIPE_LOW
        if c.shed_lag and now >= self.next_drops:
            self.next_drops = now + DROPS_EVERY_S
            drops = self.engine.drops()[0]
            if drops > self.drops_seen:
                self.drops_seen = drops
                c.drop_seen(now)
        for why in c.shed_reasons.keys() - self.shed_warned_for:
            self.shed_warned_for.add(why)
            limit = {"memory": f"over --max-memory {self.max_memory_mb} MB",
                     "lag": f"more than --shed-lag {self.shed_lag_ms:g} ms behind the kernel",
                     "backlog": "the output pipe is filling (the next stage falls behind)",
                     "capture-drops": "the kernel dropped packets"}.get(why, why)
            self.warn(f"warning: {limit}: shedding new sessions (counted in --stats)")
        if self.verbose and now >= self.next_report:
            self.next_report = now + STATS_EVERY_S
            self.warn(self.stats_line())

    def _close(self) -> None:
        try:
            if self.pipe_size:
                os.set_blocking(self.out_fd, True)  # the rest, whatever it takes
            self.writer.flush()
        finally:
            self.final_drops = self.engine.drops()
            self.engine.close()
            self.engine = None
            if self.close_out:
                os.close(self.out_fd)

    def counters(self) -> dict | None:
        """The counters (--stats-json), None before the capture started."""
        c = self.capturer
        if c is None:
            return None
        kdrop, pcap_ifdrop = self.engine.drops() if self.engine else self.final_drops
        ifdrop = max(pcap_ifdrop, cap.interface_rx_drops(self.iface) - self.if_drops0)
        return {"records": c.records, "s2c_records": c.s2c_records, "frames": c.frames,
                "foreign": c.foreign,
                "supersegs": c.supersegs, "split_records": c.split_records,
                "truncated": c.truncated, "kernel_drops": kdrop, "if_drops": ifdrop,
                "shed_sessions": c.shed_sessions, "shed_packets": c.shed_packets,
                "shed_reasons": dict(c.shed_reasons), "max_lag_ms": round(c.max_lag / 1e6, 3),
                "cpu_us_per_packet": round(cpu_seconds() * 1e6 / max(c.frames, 1), 3)}

    def stats_line(self) -> str | None:
        d = self.counters()
        if d is None:
            return None
        s2c = f"{d['s2c_records']} server to client, " if self.server_half else ""
        shed_why = "".join(f"; {n} {why}" for why, n in sorted(d["shed_reasons"].items()))
        return (f"{d['records']} packets written, {s2c}{d['frames']} captured, {d['foreign']} "
                f"not inbound TCP to this host, {d['supersegs']} super-segments split into "
                f"{d['split_records']}, {d['truncated']} truncated, {d['shed_sessions']} "
                f"sessions shed ({d['shed_packets']} packets{shed_why}), {d['kernel_drops']} "
                f"dropped by kernel, {d['if_drops']} dropped by interface, "
                f"{self.elapsed():.2f} s, {d['cpu_us_per_packet']:.2f} µs CPU per packet")


class MemoryWriter(RecordWriter):
    """tc-session --capture's writer: the records stay in ``buf`` until LiveCapture.take()
    hands them to the session's stream parser in the same process."""

    def flush(self) -> None:
        pass


class HoldingWriter(RecordWriter):
    """tc-capture's writer into a pipe when it sheds (the pipe non-blocking): flush() writes
    what the pipe takes and holds the rest, up to HOLD_MAX bytes (then it waits for the
    pipe), so that a slow next stage does not stop tc-capture from reading the kernel's
    ring, which would then drop packets of admitted sessions; meanwhile the held bytes count
    as backlog and new sessions are shed (LiveCapture._tick)."""

    def flush(self) -> None:
        import select

        buf = self.buf
        if not buf:
            return
        view = memoryview(buf)
        total = 0
        try:
            while total < len(buf):
                try:
                    total += os.write(self.fd, view[total:])
                except BlockingIOError:
                    if len(buf) - total <= HOLD_MAX:
                        break
                    select.select([], [self.fd], [], 1.0)
        finally:
            view.release()
            del buf[:total]


def _pipe_size(fd: int) -> int:
    """The capacity of pipe fd, enlarged to PIPE_SIZE if allowed; 0 if fd is no pipe."""
    import fcntl
    import stat

    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # (above /proc/sys/fs/pipe-max-size for an unprivileged user: keep it)
        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return 0


def cpu_seconds() -> float:
    """User + system CPU time of this process (the production-safety figure in --stats)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
