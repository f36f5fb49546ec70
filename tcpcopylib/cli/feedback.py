"""tc-feedback: deliver the target's replies (fb records) to the tc-session that owns them."""

from tcpcopylib.cli.common import Tool as _Tool


class Tool(_Tool):
    name = "tc-feedback"
    summary = ("Read fb records (from tc-intercept) and serve them on a socket: each connected "
               "tc-session receives the replies of the sessions it claimed.")
    epilog = ("example:\n  tc-intercept eth1 -F 'tcp and src port 8080' | "
              "tc-feedback --listen tcp::36524")
    writes_records = False
    interrupt_is_success = True  # a server stopped by Ctrl-C/SIGTERM is not a failure

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.server = None

    def add_arguments(self, p):
        p.add_argument("input", nargs="?", default="-", metavar="FILE",
                       help="fb record stream to read (default: stdin)")
        p.add_argument("-l", "--listen", default=None, metavar="ADDR",
                       help="unix:/path, tcp:HOST:PORT or tcp::PORT "
                            "(default: tcp::36524)")
        p.add_argument("--hold-ms", type=int, default=2000, metavar="MS",
                       help="keep a reply with no owner yet this long, waiting for its claim "
                            "(default 2000; 0 = never hold)")
        p.add_argument("--hold-max", type=int, default=100_000, metavar="N",
                       help="at most N held replies; the oldest goes first (default 100000)")
        p.add_argument("--client-buffer", type=int, default=8 << 20, metavar="BYTES",
                       help="output buffer per client; replies beyond it are dropped and "
                            "counted (default 8 MiB)")
        p.add_argument("--drain-s", type=float, default=5.0, metavar="S",
                       help="after the input ends, wait at most S seconds (beyond the hold "
                            "time) for clients to read what is queued for them (default 5)")

    def run(self, args):
        from tcpcopylib.errors import UsageError
        from tcpcopylib.feedback import DEFAULT_PORT, FeedbackServer

        if args.hold_ms < 0 or args.hold_max < 1 or args.client_buffer < 1024 or args.drain_s < 0:
            raise UsageError("--hold-ms >= 0, --hold-max >= 1, --client-buffer >= 1024 "
                             "and --drain-s >= 0 are required")
        listen = args.listen or f"tcp::{DEFAULT_PORT}"
        in_fd = self.open_input(args.input)
        self.server = srv = FeedbackServer(listen, hold_ms=args.hold_ms, hold_max=args.hold_max,
                                           client_buffer=args.client_buffer, warn=self.warn,
                                           info=self.info)
        srv.open()
        self.info(f"listening on {listen}")
        tick = (lambda: self.warn(srv.stats_line())) if args.verbose else None
        try:
            srv.serve(in_fd, drain_s=args.drain_s, tick=tick, tick_s=10.0)
        finally:
            srv.close()
        return 0

    def stats_line(self):
        return self.server.stats_line() if self.server else None

    def stats_dict(self) -> dict:
        srv = self.server
        if srv is None:
            return super().stats_dict()
        return {**srv.counts, "held_now": len(srv.held), "summary": self.stats_line()}


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
