"""tc-feedback: deliver the target's replies (fb records) to the tc-session that owns them."""

from tcpcopylib.cli.common import Tool as _Tool
from tcpcopylib.cli.intercept import payload_bytes
from tcpcopylib.feedback import AUTH_TIMEOUT, CLIENT_INPUT, MAX_CLIENTS, TOTAL_INPUT

CLASSIC_PORT = 36524  # intercept's (tcpcopylib.classic.DEFAULT_PORT; not imported: startup)


class Tool(_Tool):
    name = "tc-feedback"
    summary = ("Read fb records (from tc-intercept) and serve them on a socket: each connected "
               "tc-session receives the replies of the sessions it claimed.")
    epilog = ("examples:\n  tc-intercept eth1 -F 'tcp and src port 8080' | "
              "tc-feedback --listen tcp::36524\n"
              "  tc-intercept eth1 -F 'tcp and src port 8080' | "
              "tc-feedback --classic --allow 10.0.0.7\n"
              "    (serves an existing tcpcopy 1.3 -s ASSISTANT, as intercept would)\n"
              "  tc-feedback --capture eth1 --capture-filter 'tcp and src port 8080' "
              "--listen tcp::36524\n"
              "    (the first example in one process: no pipe between capture and server)")
    writes_records = False
    interrupt_is_success = True  # a server stopped by Ctrl-C/SIGTERM is not a failure

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.server = None
        self.icpt = None            # with --capture: the Interceptor in this process
        self.capture_stats = None   # its kernel counts, taken before the engine closed

    def add_arguments(self, p):
        p.add_argument("input", nargs="?", default="-", metavar="FILE",
                       help="fb record stream to read (default: stdin)")
        p.add_argument("-l", "--listen", default=None, metavar="ADDR",
                       help="unix:/path, tcp:HOST:PORT or tcp::PORT "
                            "(default: tcp::36524; with --classic: none unless given)")
        p.add_argument("--classic", nargs="?", const=f"tcp::{CLASSIC_PORT}", default=None,
                       metavar="ADDR",
                       help=f"also serve classic tcpcopy 1.3 clients (intercept's protocol) "
                            f"on ADDR, tcp:HOST:PORT or tcp::PORT (default tcp::"
                            f"{CLASSIC_PORT}); they cannot authenticate: only --allow "
                            f"addresses (without --allow, loopback ones) are accepted")
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

        c = p.add_argument_group("capturing in this process (--capture; tc-intercept's options)")
        c.add_argument("--capture", metavar="IFACE",
                       help="capture the target's replies on IFACE in this process, as "
                            "`tc-intercept IFACE |` before it would (the same records, "
                            "without the hop; less CPU); no FILE; ends at SIGINT/SIGTERM; "
                            "needs root or CAP_NET_RAW")
        c.add_argument("--capture-filter", default="tcp", metavar="EXPR",
                       help="with --capture: BPF filter (tcpdump language), as tc-intercept "
                            "-F; default 'tcp'")
        c.add_argument("--capture-engine", choices=("ring", "pcap", "afpacket"), default="ring",
                       help="with --capture: as tc-intercept --engine (default ring)")
        c.add_argument("--capture-buffer", type=int, default=65536, metavar="KIB",
                       help="with --capture: kernel capture buffer in KiB, as tc-intercept -B "
                            "(default 65536)")
        c.add_argument("--capture-payload", type=payload_bytes, default=0, metavar="N|all",
                       help="with --capture: as tc-intercept --payload (default 0)")

        t = p.add_argument_group("trust and limits (see tc-feedback(8): Authentication, Limits)")
        t.add_argument("--key", metavar="FILE",
                       help="shared key file: clients must prove they hold the key (HMAC "
                            "challenge-response) before claiming anything (default "
                            "$TC_FEEDBACK_KEY_FILE, else the key $TC_FEEDBACK_KEY, else none)")
        t.add_argument("--allow", metavar="CIDR,...",
                       help="accept TCP clients from these addresses or networks only")
        t.add_argument("--max-clients", type=int, default=MAX_CLIENTS, metavar="N",
                       help=f"at most N clients at once; more are refused (default "
                            f"{MAX_CLIENTS})")
        t.add_argument("--auth-timeout", type=float, default=AUTH_TIMEOUT, metavar="S",
                       help=f"drop a client that has not sent its header (and proved the key) "
                            f"S seconds after connecting (default {AUTH_TIMEOUT:g})")
        t.add_argument("--client-input", type=int, default=CLIENT_INPUT, metavar="BYTES",
                       help=f"largest record a client may send; a client with a larger "
                            f"unfinished one is dropped (default {CLIENT_INPUT >> 10} KiB)")
        t.add_argument("--total-input", type=int, default=TOTAL_INPUT, metavar="BYTES",
                       help=f"unfinished records of all clients together at most (default "
                            f"{TOTAL_INPUT >> 20} MiB)")

    def run(self, args):
        from tcpcopylib.errors import UsageError
        from tcpcopylib.feedback import DEFAULT_PORT, FeedbackServer, load_key, parse_allow

        if args.hold_ms < 0 or args.hold_max < 1 or args.client_buffer < 1024 or args.drain_s < 0:
            raise UsageError("--hold-ms >= 0, --hold-max >= 1, --client-buffer >= 1024 "
                             "and --drain-s >= 0 are required")
        if args.max_clients < 1 or args.client_input < 4096 or \
                args.total_input < args.client_input or not 0 < args.auth_timeout < 1e6:
            raise UsageError("--max-clients >= 1, --client-input >= 4096, --total-input >= "
                             "--client-input and --auth-timeout > 0 are required")
        key = load_key(args.key, warn=self.warn)
        allow = parse_allow(args.allow) if args.allow else None
        listen = args.listen or (None if args.classic else f"tcp::{DEFAULT_PORT}")
        if args.classic and args.classic == listen:
            raise UsageError(f"--classic and --listen both ask for {listen}: give them "
                             f"different addresses")
        if args.capture and args.input != "-":
            raise UsageError("--capture is the input: give no FILE with it")
        if args.capture_buffer < 64:
            raise UsageError("--capture-buffer >= 64 is required")
        take = name = None
        if args.capture:  # (opened first: a bad interface or no root fails before we listen)
            self.icpt = self._open_capture(args)
            in_fd, take = self.icpt.engine.fd, self.icpt.take
            name = f"capture on {args.capture}"
        else:
            in_fd = self.open_input(args.input)
        self.server = srv = FeedbackServer(listen, hold_ms=args.hold_ms, hold_max=args.hold_max,
                                           client_buffer=args.client_buffer, warn=self.warn,
                                           info=self.info, key=key, allow=allow,
                                           max_clients=args.max_clients,
                                           client_input=args.client_input,
                                           total_input=args.total_input,
                                           auth_timeout=args.auth_timeout,
                                           classic_listen=args.classic)
        srv.open()
        if listen:
            self.info(f"listening on {listen}")
        if args.classic:
            self.info(f"listening on {args.classic} for classic tcpcopy clients")
        tick = (lambda: self.warn(self.stats_line())) if args.verbose else None
        try:
            srv.serve(in_fd, drain_s=args.drain_s, tick=tick, tick_s=10.0, take=take,
                      name=name)
        finally:
            srv.close()
            if self.icpt is not None:
                self.capture_stats = self.icpt.kernel_stats()  # (before the engine closes)
                self.icpt.engine.close()
        return 0

    def _open_capture(self, args):
        """--capture IFACE: tc-intercept's capture, its records kept in memory for the
        server's loop (Interceptor.take)."""
        from tcpcopylib.intercept import open_interceptor
        from tcpcopylib.livecapture import MemoryWriter
        from tcpcopylib.records import header

        iface, bpf = args.capture, args.capture_filter
        return open_interceptor(
            args.capture_engine, iface, bpf, args.capture_payload, args.capture_buffer << 10,
            lambda: MemoryWriter(-1, header("tc-intercept", iface=iface, filter=bpf)),
            warn=self.warn, info=self.info)

    def stats_line(self):
        if self.server is None:
            return None
        if self.icpt is None:
            return self.server.stats_line()
        return f"{self.server.stats_line()}; capture: {self.icpt.stats_line(self.capture_stats)}"

    def stats_dict(self) -> dict:
        srv = self.server
        if srv is None:
            return super().stats_dict()
        d = {**srv.stats_dict(), "summary": self.stats_line()}
        if self.icpt is not None:  # (tc-intercept's counters, as its --stats-json has them)
            d["capture"] = self.icpt.counts(self.capture_stats)
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
