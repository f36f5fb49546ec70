"""tc-session: replay captured client TCP sessions against a target, as forged packets.

Reads "pkt" records (captured client->server datagrams), writes the datagrams to send
to the target ("pkt" records with "sid", or with -B "pkts" batches with a sid column);
learns the target's replies from tc-feedback.
The engine lives in tcpcopylib.session, its event loop in tcpcopylib.session.runner; this
module is the options and the wiring.
"""

from __future__ import annotations

import signal

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import MAX_SPEED, MIN_SPEED, number_arg
from tcpcopylib.errors import UsageError

MAX_BATCH_PKTS = 63     # -B at most: records.MAX_BATCH_PKTS (not imported: cbor2 loads slowly)


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
        o.add_argument("--sessions", metavar="FILE",
                       help="write the session map, one \"sess\" record per replayed session "
                            "(for tc-diff), to FILE, or with '-' into the output stream")
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

    def run(self, args):
        from tcpcopylib.records import RecordWriter, header
        from tcpcopylib.session.options import build_engine
        from tcpcopylib.session.runner import PacketOutput, SessionRunner, SessionStage
        from tcpcopylib.session.timing import DueQueue

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
        writer = RecordWriter(self.stdout_fd, header(self.name), bufsize=1 << 62)
        out = PacketOutput(writer, args.batch)
        engine = self.engine = build_engine(args, out.emit, fb)
        engine.warn = self.warn
        if args.verbose:
            engine.on_end = self._log_end
        smap = self._session_map(args, out.write)  # --sessions: wraps emit and on_end
        if fb is not None:
            fb.connect()
        in_fd = self.open_input(args.file)
        due = DueQueue(asap=args.asap, speed=args.speed, max_gap=args.max_gap, warn=self.warn)
        runner = SessionRunner(
            SessionStage(engine, due, out), fb, drain=args.drain,
            feedback_retry=args.feedback_retry,
            max_rss=int(args.max_memory * (1 << 20)) if args.max_memory else None,
            stats_every=args.stats_every, on_stats=self._print_summary, lag=self.fb_lag,
            warn=self.warn)
        # Signals: stop reading and drain (a second one ends at once).
        signal.signal(signal.SIGTERM, lambda signum, frame: runner.interrupt(signum))
        signal.signal(signal.SIGINT, lambda signum, frame: runner.interrupt(signum))
        try:
            runner.run(in_fd, "<stdin>" if args.file == "-" else args.file)
        finally:
            if smap is not None:
                smap.close()
        if args.stats:
            self._print_summary()
            args.stats = False  # Tool.main would print the one-line version too
        return 0

    def _session_map(self, args, write_other):
        """--sessions: a SessionMap fed by the engine's emit and on_end (None without)."""
        if not args.sessions:
            return None
        from tcpcopylib.records import header
        from tcpcopylib.session.sessmap import SessionMap

        smap = (SessionMap(write_other) if args.sessions == "-"
                else SessionMap.to_file(args.sessions, header(self.name)))
        self.engine.emit = smap.wrap_emit(self.engine.emit)
        self.engine.on_end = smap.chain_on_end(self.engine.on_end)
        return smap

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
