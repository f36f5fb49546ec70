"""tc-session: replay captured client TCP sessions against a target, as forged packets.

Reads "pkt" records (captured client->server datagrams), writes the datagrams to send
to the target ("pkt" records with "sid", or with -B "pkts" batches with a sid column);
learns the target's replies from tc-feedback.
The engine lives in tcpcopylib.session; this module is the select() loop around it.
"""

from __future__ import annotations

import os
import signal
import struct
import time

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import MAX_SPEED, MIN_SPEED, number_arg
from tcpcopylib.errors import UsageError

SEC = 1_000_000_000
MAX_PENDING = 100_000   # records held for their due time before we stop reading stdin
CHUNK = 1 << 17
OUT_BATCH = 1 << 16     # output bytes buffered before a flush within one loop turn
MAX_BATCH_PKTS = 63     # -B at most: records.MAX_BATCH_PKTS (not imported: cbor2 loads slowly)
RSS_EVERY = 0.2         # seconds between --max-memory checks


_PKT_TS = b"\xa4\x61t\x63pkt\x62ts\x1b"   # {"t": "pkt", "ts": <8-byte uint>, ...
_PKT8 = struct.Struct("!11sQ6sB")   # ... "data": <24..255 bytes>
_PKT16 = struct.Struct("!11sQ6sH")  # ... "data": <256..65535 bytes>
_DATA8, _DATA16 = b"\x64data\x58", b"\x64data\x59"
_SID = b"\x63sid"
# '"sid": <uint>' for the first 256 session ids, then packed: sids are too many to cache
# (concurrent sessions interleave their packets)
_SID_TAILS = [_SID + (bytes((i,)) if i < 24 else bytes((0x18, i))) for i in range(256)]
_SID16 = struct.Struct("!4sBH").pack
_SID32 = struct.Struct("!4sBI").pack


def encode_pkt(ts: int, data: bytes, sid: int) -> bytes:
    """cbor2.dumps({"t": "pkt", "ts": ts, "data": data, "sid": sid}), byte for byte."""
    n = len(data)
    if 0xFFFFFFFF < ts <= 0xFFFFFFFFFFFFFFFF and 24 <= n < 0x10000 and 0 <= sid < 0x100000000:
        tail = (_SID_TAILS[sid] if sid < 0x100 else _SID16(_SID, 0x19, sid) if sid < 0x10000
                else _SID32(_SID, 0x1A, sid))
        if n < 0x100:
            return b"".join((_PKT8.pack(_PKT_TS, ts, _DATA8, n), data, tail))
        return b"".join((_PKT16.pack(_PKT_TS, ts, _DATA16, n), data, tail))
    import cbor2

    return cbor2.dumps({"t": "pkt", "ts": ts, "data": data, "sid": sid})


def _rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Tool(BaseTool):
    name = "tc-session"
    summary = "replay captured client TCP sessions against a target (the TCP client simulation)"
    epilog = """examples:
  tc-readpcap prod.pcap | tc-session --target 10.0.0.5:8080 | tc-pace | tc-emit
  tc-capture eth0 | tc-session -x 80-10.0.0.5:8080,81-10.0.0.6:8081 --stats | tc-emit
  tc-readpcap prod.pcap | tc-session --target 10.0.0.5:80 -c 10.9.9.0/24 -n 3 | tc-pace | tc-emit
    (on the target: ip route add 10.9.9.0/24 via ASSISTANT)
  tc-readpcap prod.pcap | tc-session --socket --target 10.0.0.5:8080 --stats
    (socket mode: ordinary connections from this host; no tc-emit, assistant or root)

outcomes, counters and troubleshooting: see tc-session(1)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.engine = None
        self._rbuf = memoryview(bytearray(CHUNK))
        self.fb_lag = None  # with feedback: a metrics.Histogram of the feedback lag

    def add_arguments(self, p):
        g = p.add_argument_group("mapping")
        g.add_argument("--target", metavar="HOST:PORT",
                       help="replay sessions to captured server port PORT onto HOST:PORT "
                            "([v6]:PORT for IPv6)")
        g.add_argument("-x", "--transfer", metavar="LIST",
                       help="TCPCopy transfer list: [IP:]PORT-IP:PORT,... (first match wins)")
        g.add_argument("--any-port", action="store_true",
                       help="with --target: replay every TCP session; --target HOST keeps "
                            "each server port, HOST:PORT sends all to PORT")
        g.add_argument("-O", "--only-syn", action="store_true",
                       help="replay only sessions whose SYN was captured")
        g.add_argument("-r", "--sample", type=int, default=100, metavar="PCT",
                       help="replay only PCT%% of the sessions (deterministic per client "
                            "address and port, the same on every run and host)")
        g.add_argument("-g", "--ramp", type=float, metavar="SECONDS",
                       help="the replayed share grows from 1%% to PCT (-r, default 100) "
                            "over SECONDS from the first packet")
        w = p.add_argument_group("shaping")
        w.add_argument("-c", "--client-pool", metavar="LIST",
                       help="replay from client addresses of this pool: addresses, "
                            "CIDR networks, FIRST-LAST ranges, a.b.c.x (= .1-.254); the "
                            "target needs a route for it via the assistant")
        w.add_argument("-n", "--copies", type=int, default=1, metavar="N",
                       help="replay each captured session N times, each copy its own "
                            "connection (default 1)")
        w.add_argument("-f", "--instance", metavar="K[/M]",
                       help="instance K of M (default M 16) replaying into one target: "
                            "client ports come from block K of M of 1024-65535")
        w.add_argument("-m", "--max-memory", type=float, metavar="MB",
                       help="while the resident memory is above MB, shed new sessions "
                            "(outcome shed) instead of growing")
        f = p.add_argument_group("feedback")
        f.add_argument("--feedback", metavar="ADDR",
                       help="tc-feedback address: unix:/path or tcp:HOST:PORT "
                            "(default $TC_FEEDBACK, else tcp:127.0.0.1:36524)")
        f.add_argument("--key", metavar="FILE",
                       help="shared key file of tc-feedback --key (default "
                            "$TC_FEEDBACK_KEY_FILE, else the key $TC_FEEDBACK_KEY): both ends "
                            "prove they hold it")
        f.add_argument("--feedback-retry", type=float, default=30.0, metavar="SECONDS",
                       help="when the connection to tc-feedback is lost, keep reconnecting "
                            "(and claiming the live sessions again) this long before giving "
                            "up with exit 69 (default 30; 0 = give up at once)")
        f.add_argument("--no-feedback", action="store_true",
                       help="run without a feedback channel (no session gets established; "
                            "for inspecting the SYNs)")
        b = p.add_argument_group("session behaviour")
        b.add_argument("-W", "--no-wait", action="store_true",
                       help="do not hold a request until the response to the previous one")
        b.add_argument("--quiet", type=float, default=100, metavar="MS",
                       help="a response is complete after the target was silent this long "
                            "(default 100 ms)")
        b.add_argument("--gate-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="release held data anyway when the target acked everything and "
                            "sent nothing for this long (default 5)")
        b.add_argument("-t", "--timeout", type=float, default=600, metavar="SECONDS",
                       help="end a busy session after this much target silence (default 600)")
        b.add_argument("-k", "--keepalive", type=float, default=None, metavar="SECONDS",
                       help="end an idle session after this much silence (default -t + 120)")
        b.add_argument("--connect-timeout", type=float, default=6.0, metavar="SECONDS",
                       help="give up on a SYN without SYN-ACK after this long (default 6)")
        b.add_argument("--gap-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="end a session whose capture misses bytes after this long "
                            "(default 10)")
        b.add_argument("-D", "--mss", type=int, default=1460,
                       help="MSS option of fake SYNs (default 1460)")
        b.add_argument("--max-reconnects", type=int, default=5, metavar="N",
                       help="new connections per session when the target closes early "
                            "(default 5; 0 disables)")
        b.add_argument("--drain", type=float, default=5.0, metavar="SECONDS",
                       help="after the input ends, wait this long for the last responses "
                            "before resetting unfinished sessions (default 5)")
        b.add_argument("--asap", action="store_true",
                       help="send records when read, not at their recorded pace")
        b.add_argument("-a", "--speed", type=number_arg(float, MIN_SPEED, True, MAX_SPEED),
                       default=1.0, metavar="F", help="replay the recording F times faster "
                       f"(TCPCopy's -a; F < 1: slower; {MIN_SPEED:g}..{MAX_SPEED:g}); default 1")
        b.add_argument("--max-gap", type=number_arg(float, 0, True, 1e9), metavar="S",
                       help="shorten gaps between consecutive packet timestamps to S seconds "
                            "(recording time, before -a), as tc-pace --max-gap; a wait of "
                            "more than an hour is warned about")
        o = p.add_argument_group("output")
        o.add_argument("-B", "--batch", type=number_arg(int, 1, True, MAX_BATCH_PKTS), default=1,
                       metavar="N",
                       help="up to N packets per record (\"pkts\" with a sid column, the "
                            "packets of one turn of the loop): less work here and in "
                            "tc-emit; all tc-* tools read batches, scripts see "
                            f"tcpcopy-records(5); 1..{MAX_BATCH_PKTS} (a record stays below "
                            f"the record size limit); default 1")
        k = p.add_argument_group("socket mode (tc-session(1), SOCKET MODE)")
        k.add_argument("--socket", action="store_true",
                       help="replay each session through an ordinary TCP connection from "
                            "this host (-c: its local addresses); no tc-emit, tc-intercept, "
                            "tc-feedback or root needed")
        k.add_argument("--keep", action="store_true",
                       help="with --socket: write the replayed connections to stdout (pkt: "
                            "bytes sent, fb: the target's answers, session: one per "
                            "connection; tcpcopy-records(5))")
        s = p.add_argument_group("statistics")
        s.add_argument("--stats-every", type=float, metavar="N",
                       help="print the summary every N seconds")
        p.add_argument("file", nargs="?", default="-", help="input stream (default stdin)")

    def stats_line(self):
        return self.engine.stats_line() if self.engine else None

    def _print_summary(self):
        if self.engine is not None:
            for line in self.engine.summary().splitlines():
                self.warn(line)
            fb = self.engine.claims
            if fb is not None and (fb.reconnects or fb.refused):
                self.warn(f"feedback: {fb.reconnects} reconnect(s), {fb.refused} claim(s) "
                          f"refused by tc-feedback (owned by another client)")

    # --------------------------------------------------------------------------------
    def _build_engine(self, args, emit, claims):
        from tcpcopylib.session import Config, Engine, Mapper, parse_target, parse_transfer

        if bool(args.target) == bool(args.transfer):
            raise UsageError("give exactly one of --target HOST:PORT and -x LIST")
        if args.any_port and not args.target:
            raise UsageError("--any-port goes with --target")
        if not 0 < args.sample <= 100:
            raise UsageError("-r/--sample takes a percentage in 1..100")
        if args.ramp is not None and not 0 < args.ramp <= 1e9:
            raise UsageError("-g/--ramp takes a positive number of seconds")
        if args.max_memory is not None and not 0 < args.max_memory <= 1e9:
            raise UsageError("-m/--max-memory takes a positive number of MB")
        if not args.copies >= 1:
            raise UsageError("-n/--copies takes a number of copies >= 1")
        if not 88 <= args.mss <= 65495:
            raise UsageError("--mss out of range")
        for name in ("gate_timeout", "timeout", "keepalive", "connect_timeout", "gap_timeout",
                     "stats_every"):
            v = getattr(args, name)
            if v is not None and not 0 < v <= 1e9:  # (not NaN, and a finite number of ns)
                raise UsageError(f"--{name.replace('_', '-')} must be positive (at most 1e9)")
        if not (0 <= args.quiet <= 1e9 and 0 <= args.drain <= 1e9) or args.max_reconnects < 0:
            raise UsageError("--quiet, --drain and --max-reconnects cannot be negative (nor "
                             "NaN, nor more than 1e9 s)")
        rules = (parse_target(args.target, args.any_port) if args.target
                 else parse_transfer(args.transfer))
        alloc = self._build_allocator(args, rules)
        ka = args.keepalive if args.keepalive is not None else args.timeout + 120
        cfg = Config(
            no_wait=args.no_wait, only_syn=args.only_syn, fake_mss=args.mss,
            quiet=int(args.quiet * 1e6), gate_timeout=int(args.gate_timeout * SEC),
            connect_timeout=int(args.connect_timeout * SEC),
            idle_timeout=int(args.timeout * SEC), keepalive_timeout=int(ka * SEC),
            gap_timeout=int(args.gap_timeout * SEC), max_reconnects=args.max_reconnects,
            sample_pct=args.sample, ramp=int((args.ramp or 0) * SEC), copies=args.copies)
        return Engine(Mapper(rules), emit, cfg, claims, alloc)

    @staticmethod
    def _build_allocator(args, rules):
        """-c, -n and -f: the client address:port allocator, checked against the targets."""
        from tcpcopylib.session.alloc import Allocator, parse_instance, parse_pool

        k, m = parse_instance(args.instance) if args.instance else (0, 1)
        targets = {r.target_ip for r in rules}
        pools = (parse_pool(args.client_pool, exclude=targets)
                 if args.client_pool is not None else None)
        alloc = Allocator(pools, k, m)
        fam = {4: "IPv4", 16: "IPv6"}
        for width in sorted({len(ip) for ip in targets}):
            cap = alloc.capacity(width)
            if cap == 0:
                raise UsageError(f"-c has no {fam[width]} address for an {fam[width]} target")
            if args.copies > (cap or alloc.block):
                raise UsageError(f"-n {args.copies}: more copies than client address:port "
                                 f"pairs ({cap or alloc.block}) for one session")
        return alloc

    def run(self, args):
        import math
        import select

        from tcpcopylib.errors import UnavailableError
        from tcpcopylib.records import AS_PKT, PendingBatch, RecordWriter, header
        from tcpcopylib.session.timing import DueQueue
        from tcpcopylib.streamparse import StreamParser

        if args.socket:
            from tcpcopylib.session import sockets

            return sockets.run(self, args)
        if args.keep:
            raise UsageError("--keep goes with --socket")
        fb = None
        if not args.feedback_retry >= 0:
            raise UsageError("--feedback-retry cannot be negative")
        if not args.no_feedback:
            from tcpcopylib.feedback import FeedbackClient, load_key

            from tcpcopylib.metrics import Histogram

            fb = FeedbackClient(args.feedback, name=self.name,
                                key=load_key(args.key, warn=self.warn), warn=self.warn)
            # one observation per read of the socket: the age of the newest reply in it
            self.fb_lag = Histogram()
            lag_observe = self.fb_lag.observe
        # a lost feedback connection: when, the next try, the wait before the one after
        fbst = {"down": None, "next": 0.0, "backoff": 0.05}
        # The writer never flushes by itself: flush_out() sends pending claims first (the
        # engine's claim()/release() go to fb, which sends them on flush()), so a claim
        # always reaches tc-feedback before the SYN that needs it leaves this process.
        writer = RecordWriter(self.stdout_fd, header(self.name), bufsize=1 << 62)
        batch = args.batch
        pending = PendingBatch(sids=True)  # -B: the packets of the batch being made
        stamps, datas, sids = pending.stamps, pending.datas, pending.sids

        def flush_out():
            pending.write_to(writer)
            if fb is not None and fb.sock is not None:
                try:
                    fb.flush()
                except UnavailableError as e:
                    fb_lost(e)
            writer.flush()

        def fb_lost(err):
            """The feedback connection broke: sessions go on; the loop reconnects."""
            nonlocal fb_fd
            if not args.feedback_retry:
                raise err
            if fb_fd >= 0:
                try:
                    poll.unregister(fb_fd)
                except (KeyError, ValueError):
                    pass
                fb_fd = -1
            fb.close()
            if fbst["down"] is None:
                fbst["down"] = fbst["next"] = time.monotonic()
                fbst["backoff"] = 0.05
                self.warn(f"{err}; reconnecting (for at most {args.feedback_retry:g} s; "
                          f"sessions go on, replies are lost meanwhile)")

        def fb_retry():
            """One try to reconnect (the loop calls it when due)."""
            nonlocal fb_fd
            try:
                n = fb.reconnect(timeout=1.0)
            except UnavailableError as e:
                now_m = time.monotonic()
                if now_m - fbst["down"] >= args.feedback_retry:
                    raise UnavailableError(f"{e} (gave up reconnecting after "
                                           f"{args.feedback_retry:g} s)") from None
                fbst["backoff"] = min(fbst["backoff"] * 2, 2.0)
                fbst["next"] = now_m + fbst["backoff"]
                return
            fb_fd = fb.fileno()
            poll.register(fb_fd, select.POLLIN)
            self.warn(f"reconnected to tc-feedback at {fb.address} after "
                      f"{time.monotonic() - fbst['down']:.1f} s; {n} connection(s) claimed "
                      f"again")
            fbst["down"] = None

        def emit(data, sid, now):
            writer.write_raw(encode_pkt(now, data, sid))
            if len(writer.buf) >= OUT_BATCH:
                flush_out()

        def emit_batched(data, sid, now):
            if sid > 0xFFFFFFFF:  # (a sid column holds 32 bits)
                pending.write_to(writer)
                emit(data, sid, now)
                return
            stamps.append(now)
            datas.append(data)
            sids.append(sid)
            if len(stamps) >= batch:
                pending.write_to(writer)
                if len(writer.buf) >= OUT_BATCH:
                    flush_out()

        def write_other(rec):
            pending.write_to(writer)  # what came before it goes before it
            writer.write(rec)

        engine = self.engine = self._build_engine(args, emit if batch == 1 else emit_batched, fb)
        engine.warn = self.warn
        max_rss = int(args.max_memory * (1 << 20)) if args.max_memory else None
        next_rss = 0.0
        if args.verbose:
            engine.on_end = self._log_end
        if fb is not None:
            fb.connect()
        in_fd = self.open_input(args.file)
        os.set_blocking(in_fd, False)
        parser = StreamParser(name="<stdin>" if args.file == "-" else args.file)
        self._feed_mode = AS_PKT  # (ts, data) tuples for packets: no dict per record
        # the server->client half of a capture is dropped before it is queued (the engine
        # would only count it; in real captures it is often most of the packets)
        self._server_side = engine.mapper.server_datagram_test()
        due = DueQueue(asap=args.asap, speed=args.speed, max_gap=args.max_gap, warn=self.warn)

        # Signals: stop reading and drain (a second one ends at once).
        stop = {"sig": 0, "count": 0}
        rpipe, wpipe = os.pipe()
        os.set_blocking(rpipe, False)
        os.set_blocking(wpipe, False)

        def on_signal(signum, frame):
            stop["sig"] = signum
            stop["count"] += 1
            try:
                os.write(wpipe, b"x")
            except OSError:
                pass

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        # poll, not epoll: epoll refuses regular files (tc-session < file)
        poll = select.poll()
        poll.register(in_fd, select.POLLIN)
        poll.register(rpipe, select.POLLIN)
        fb_fd = -1
        if fb is not None:
            fb_fd = fb.fileno()
            poll.register(fb_fd, select.POLLIN)
        q = due.q
        reading = True
        eof = False
        drain_until = None
        next_stats = (time.monotonic() + args.stats_every) if args.stats_every else None
        try:
            while True:
                if max_rss is not None and time.monotonic() >= next_rss:
                    engine.shedding = _rss() > max_rss
                    next_rss = time.monotonic() + RSS_EVERY
                now = time.time_ns()
                while q and q[0][0] <= now:  # due.pop_due(), inline
                    engine.client_packet(q.popleft()[1], now)
                engine.on_timer(now)
                if fbst["down"] is not None and time.monotonic() >= fbst["next"]:
                    fb_retry()
                if stop["sig"] or eof and not q:
                    if drain_until is None:  # the input is over: drain, then reset
                        drain_until = now + int(args.drain * SEC)
                        if reading:
                            poll.unregister(in_fd)
                            reading = False
                        q.clear()  # after a signal, what is not due is dropped
                    if (not engine.sessions or now >= drain_until or stop["count"] > 1
                            or engine.quiescent(now)):
                        engine.close_all(now)
                        break
                if next_stats is not None and time.monotonic() >= next_stats:
                    self._print_summary()
                    next_stats += args.stats_every
                flush_out()
                # back-pressure: hold at most MAX_PENDING records for their due time
                if reading and len(q) >= MAX_PENDING:
                    poll.unregister(in_fd)
                    reading = False
                elif not reading and not eof and drain_until is None and \
                        len(q) < MAX_PENDING // 2:
                    poll.register(in_fd, select.POLLIN)
                    reading = True
                timeout = self._timeout(now, q[0][0] if q else None, engine.next_deadline(),
                                        drain_until, next_stats)
                if fbst["down"] is not None:
                    retry = max(0.0, fbst["next"] - time.monotonic())
                    timeout = retry if timeout is None else min(timeout, retry)
                # as selectors does: milliseconds, rounded up (wait at least timeout)
                for fd, _ in poll.poll(None if timeout is None else
                                       math.ceil(timeout * 1e3) if timeout > 0 else 0):
                    now = time.time_ns()
                    if fd == in_fd:
                        eof = self._read_input(in_fd, parser, due, write_other, engine, now)
                        if eof:
                            poll.unregister(in_fd)
                            reading = False
                    elif fd == fb_fd:
                        try:
                            replies = fb.read_replies()
                        except UnavailableError as e:
                            fb_lost(e)
                            continue
                        for data, n in replies:
                            engine.feedback_packet(data, now, n)
                        if replies and fb.last_ts:
                            lag = now - fb.last_ts
                            lag_observe(lag * 1e-9 if lag > 0 else 0.0)
                    else:
                        try:
                            os.read(rpipe, 64)
                        except OSError:
                            pass
        finally:
            if fb is not None and fb.sock is not None:
                try:
                    fb.flush()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass
            try:
                pending.write_to(writer)
                writer.flush()
            finally:
                if fb is not None:
                    fb.close()
                os.close(rpipe)
                os.close(wpipe)
        if args.stats:
            self._print_summary()
            args.stats = False  # Tool.main would print the one-line version too
        return 0

    def _log_end(self, s, outcome):
        """-v: one line per failed session (-vv: per session)."""
        from tcpcopylib.packet import endpoint_str
        from tcpcopylib.session.engine import FAILURES, OUTCOMES

        if outcome in FAILURES or self.args.verbose >= 2:
            hint = OUTCOMES[outcome]
            moved = (s.cip, s.cport) != s.ckey[:2]
            self.warn(f"session {s.sid} {endpoint_str(s.ckey[0], s.ckey[1])}"
                      + (f" (as {endpoint_str(s.cip, s.cport)})" if moved else "")
                      + f" -> {endpoint_str(s.tip, s.tport)}: {outcome}"
                      + (f" ({hint})" if hint and outcome in FAILURES else ""))

    @staticmethod
    def _timeout(now, *deadlines):
        """select() timeout in seconds until the earliest deadline (None: block)."""
        ds = [d for d in deadlines[:3] if d is not None]
        t = (min(ds) - now) / SEC if ds else None
        if deadlines[3] is not None:
            left = deadlines[3] - time.monotonic()
            t = left if t is None else min(t, left)
        if t is not None and deadlines[2] is not None:
            t = min(t, 0.05)  # while draining, look at quiescence often
        return None if t is None else min(max(t, 0), 3600)  # (select() refuses years)

    def _read_input(self, fd, parser, due, write_other, engine, now) -> bool:
        """Read what stdin holds; True at end of input."""
        try:
            # into one buffer: a fresh 128 KiB bytes per read() costs an mmap/munmap pair
            n = os.readv(fd, (self._rbuf,))
        except BlockingIOError:
            return False
        if not n:
            parser.close()
            return True
        chunk = self._rbuf[:n].tobytes()
        # packets are queued; records we do not know pass through
        dropped = due.push_records(parser.feed(chunk, self._feed_mode), now, write_other,
                                   self._server_side)
        if dropped:
            engine.count_server_side(dropped)
        return False

    def stats_dict(self):
        """--stats-json: every counter and the outcome counts (see tc-session(1))."""
        e = self.engine
        if e is None:
            return super().stats_dict()
        fb = e.claims
        d = {"active": e.active(), **e.st.as_dict(), "early_reuses": e.alloc.early_reuses,
             "feedback_reconnects": fb.reconnects if fb is not None else 0,
             "feedback_claims_refused": fb.refused if fb is not None else 0}
        if self.fb_lag is not None:
            d["feedback_lag"] = self.fb_lag.as_dict()
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
