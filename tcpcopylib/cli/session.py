"""tc-session: replay captured client TCP sessions against a target, as forged packets.

Reads "pkt" records (captured client->server datagrams), writes the datagrams to send
to the target ("pkt" records with "sid", or with -B "pkts" batches with a sid column), or
with --send sends them itself (tc-emit's Emitter in this process: runner.SendOutput);
learns the target's replies from tc-feedback.
The engine lives in tcpcopylib.session, its event loop in tcpcopylib.session.runner, its
options in tcpcopylib.session.options, its reports in tcpcopylib.session.report; this
module is the wiring.
"""

from __future__ import annotations


from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import UsageError


class Tool(BaseTool):
    name = "tc-session"
    summary = "replay captured client TCP sessions against a target (the TCP client simulation)"
    epilog = """examples:
  tc-readpcap prod.pcap | tc-session --target 10.0.0.5:8080 | tc-pace | tc-emit
  tc-capture eth0 | tc-session -x 80-10.0.0.5:8080,81-10.0.0.6:8081 --stats | tc-emit
  tc-capture eth0 | tc-session --target 10.0.0.5:8080 --send
    (the same as | tc-pace | tc-emit, sent from this process: less CPU; needs root)
  tc-readpcap prod.pcap | tc-session --target 10.0.0.5:80 -c 10.9.9.0/24 -n 3 | tc-pace | tc-emit
    (on the target: ip route add 10.9.9.0/24 via ASSISTANT)
  tc-readpcap prod.pcap | tc-session --socket --target 10.0.0.5:8080 --stats
    (socket mode: ordinary connections from this host; no tc-emit, assistant or root)

outcomes, counters and troubleshooting: see tc-session(1)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.engine = None
        self.fb_lag = None  # with feedback: a metrics.Histogram of the feedback lag
        self.sender = None  # with --send: the sender (emit.RawSender or LinkSender)
        self.sent = None    # ... and the SendOutput whose Emitter counts what was sent
        self.shard_parent = None  # with --shards N: the parent (session.shards)
        self.admission = None  # admission.Admission: when new sessions are shed
        self.live = None  # with --capture: the livecapture.LiveCapture in this process

    def add_arguments(self, p):
        from tcpcopylib.session.options import add_arguments

        add_arguments(p)

    def run(self, args):
        from tcpcopylib.session.options import (build_admission, build_engine, check_capture,
                                                check_send)
        from tcpcopylib.session.runner import SessionRunner
        from tcpcopylib.session.timing import DueQueue

        check_send(args)
        check_capture(args)
        if args.shards != 1:
            from tcpcopylib.session import shards

            return shards.run(self, args)
        if args.socket:
            from tcpcopylib.session import sockets

            return sockets.run(self, args)
        if args.keep:
            raise UsageError("--keep goes with --socket")
        fb = self._feedback_client(args)
        engine = self.engine = build_engine(args, None, fb)  # (its output comes next)
        self.admission = build_admission(args)
        out = self._output(args)
        engine.emit = out.emit
        engine.warn = self.warn
        if args.verbose:
            from tcpcopylib.session.report import end_logger

            engine.on_end = end_logger(self.warn, args.verbose)
        smap = self._session_map(args, out.write)  # --sessions: wraps emit and on_end
        if fb is not None:
            fb.connect()
        if args.capture:
            in_fd, name, take = self._open_capture(args)
        else:
            in_fd, name, take = self.open_input(args.file), args.file, None
        due = DueQueue(asap=args.asap, speed=args.speed, max_gap=args.max_gap, warn=self.warn)
        runner = SessionRunner(
            self.make_stage(engine, due, out), fb, drain=args.drain,
            feedback_retry=args.feedback_retry,
            admission=self.admission, stats_every=args.stats_every,
            on_stats=self._print_summary, lag=self.fb_lag, warn=self.warn)
        # Signals: stop reading and drain (a second one ends at once).
        runner.catch_signals()
        try:
            runner.run(in_fd, "<stdin>" if name == "-" else name, take=take)
        finally:
            if self.live is not None:
                self.live.close()
            if smap is not None:
                smap.close()
            if self.sender is not None:
                self.sender.close()
        if args.stats:
            self._print_summary()
            args.stats = False  # Tool.main would print the one-line version too
        return 0

    def _open_capture(self, args):
        """--capture IFACE: the capture in this process, as the input (in_fd, name, take)."""
        from tcpcopylib.cli.capture import SHED_LAG_MS
        from tcpcopylib.livecapture import LiveCapture

        live = self.live = LiveCapture(
            self.name, args.capture, args.capture_filter, engine=args.capture_engine,
            buffer_kib=args.capture_buffer, warn=self.warn, shed_lag_ms=SHED_LAG_MS)
        live.open(None)
        self.info(live.describe())
        return live.engine.fd, f"capture on {args.capture}", live.take

    def make_stage(self, engine, due, out):
        """The stage the runner runs (a shard of --shards makes its own)."""
        from tcpcopylib.session.runner import SessionStage

        return SessionStage(engine, due, out)

    def _output(self, args):
        """Where the engine's packets go: "pkt" records on stdout, or with --send an
        Emitter (raw socket, or AF_PACKET with -o) in this process."""
        from tcpcopylib.session.runner import PacketOutput, SendOutput

        if not args.send:
            from tcpcopylib.records import StageWriter

            # the header goes out once the input's is read (merged with it:
            # tcpcopy-records(5))
            writer = StageWriter(self.stdout_fd, self.name, bufsize=1 << 62)
            return PacketOutput(writer, args.batch)
        from tcpcopylib.cli.emit import open_sender, send_error_warner
        from tcpcopylib.emit import Emitter

        self.sender = open_sender(args)  # no raw socket: exit 77
        self.sent = SendOutput(Emitter(self.sender, send_error_warner(self.warn)))
        return self.sent

    def _feedback_client(self, args):
        """The FeedbackClient of --feedback/--key (not yet connected); None with
        --no-feedback."""
        if not args.feedback_retry >= 0:
            raise UsageError("--feedback-retry cannot be negative")
        if args.no_feedback:
            return None
        from tcpcopylib.classic import ClassicFeedbackClient, is_classic_address
        from tcpcopylib.feedback import FeedbackClient, default_address, load_key
        from tcpcopylib.metrics import Histogram

        address = args.feedback or default_address()
        if is_classic_address(address):  # an existing intercept (tcpcopy(7), CLASSIC)
            if args.key:
                raise UsageError("--key: a classic intercept checks no key (it is trusted "
                                 "by its address)")
            return ClassicFeedbackClient(address, name=self.name, warn=self.warn)
        # one observation per read of the socket: the age of the newest reply in it
        self.fb_lag = Histogram()
        return FeedbackClient(args.feedback, name=self.name,
                              key=load_key(args.key, warn=self.warn), warn=self.warn)

    def _session_map(self, args, write_other):
        """--sessions: a SessionMap fed by the engine's emit and on_end (None without)."""
        if not args.sessions:
            return None
        from tcpcopylib.records import header
        from tcpcopylib.session.sessmap import SessionMap

        smap = SessionMap.for_option(args.sessions, write_other, header(self.name))
        self.engine.emit = smap.wrap_emit(self.engine.emit)
        self.engine.on_end = smap.chain_on_end(self.engine.on_end)
        self.engine.on_shed = smap.engine_on_shed(self.engine)
        return smap

    def _print_summary(self):
        if self.shard_parent is not None:
            from tcpcopylib.session import shards

            for line in shards.summary_lines(self):
                self.warn(line)
        elif self.engine is not None:
            from tcpcopylib.session.report import summary_lines

            for line in summary_lines(self.engine, self.sent):
                self.warn(line)
            if self.live is not None:
                self.warn(f"capture: {self.live.stats_line()}")

    def stats_line(self):
        if self.engine is None:
            return None
        if self.shard_parent is not None:
            from tcpcopylib.session import shards

            return shards.stats_line(self)
        line = self.engine.stats_line()
        if self.sent is not None:
            em = self.sent.emitter
            line += f", {em.sent} sent" + (f" ({em.failed} failed)" if em.failed else "")
        return line

    def stats_dict(self):
        """--stats-json: the --stats line, every counter and the outcome counts."""
        if self.engine is None:
            return super().stats_dict()
        if self.shard_parent is not None:
            from tcpcopylib.session import shards

            return shards.stats_dict(self)
        from tcpcopylib.session.report import stats_dict

        d = stats_dict(self.engine, self.fb_lag, self.sent, self.admission)
        if self.live is not None:
            d["capture"] = self.live.counters()
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
