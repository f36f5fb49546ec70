"""tc-intercept: capture the target's replies on the assistant, write fb records."""

from tcpcopylib.cli.common import Tool as _Tool


def payload_bytes(text: str) -> int:
    """--payload's argument: N bytes, or 'all' (-1)."""
    import argparse

    if text == "all":
        return -1
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError("N bytes, or 'all'")


class Tool(_Tool):
    name = "tc-intercept"
    summary = ("Capture the target's replies (live) and write them as fb records: "
               "IP and TCP headers, optionally the first bytes of payload.")
    epilog = ("example (on the assistant):\n  tc-intercept eth1 -F 'tcp and src port 8080' | "
              "tc-feedback --listen tcp::36524")
    interrupt_is_success = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.icpt = None
        self.final_stats = None  # the kernel's counts, taken before the engine is closed

    def add_arguments(self, p):
        p.add_argument("iface", nargs="?", metavar="IFACE",
                       help="interface to capture on ('any' for all)")
        p.add_argument("-i", "--interface", dest="iface_opt", metavar="IFACE",
                       help="same as IFACE")
        p.add_argument("-F", "--filter", default="tcp", metavar="EXPR",
                       help="BPF filter in tcpdump syntax (default: 'tcp')")
        p.add_argument("--payload", type=payload_bytes, default=0, metavar="N|all",
                       help="also keep the first N payload bytes of each reply (default 0)")
        p.add_argument("-p", "--no-promisc", action="store_true",
                       help="do not put the interface into promiscuous mode")
        p.add_argument("-B", "--buffer-size", type=int, default=65536, metavar="KIB",
                       help="kernel capture buffer in KiB (default 65536)")
        p.add_argument("--engine", choices=("ring", "pcap", "afpacket"), default="ring",
                       help="capture engine: a TPACKET_V2 ring read as soon as a reply "
                            "arrives (default), libpcap via pcapy-ng (1 ms block timer), or "
                            "an AF_PACKET socket (one recvfrom per packet)")
        p.add_argument("-c", "--count", type=int, default=0, metavar="N",
                       help="exit after writing N records (default: run until stopped)")
        p.add_argument("--stats-interval", type=float, default=10.0, metavar="S",
                       help="with -v, print the counters every S seconds (default 10)")

    def run(self, args):
        from tcpcopylib.errors import UsageError
        from tcpcopylib.intercept import open_interceptor
        from tcpcopylib.records import header

        iface = args.iface_opt or args.iface
        if not iface or (args.iface_opt and args.iface and args.iface != args.iface_opt):
            raise UsageError("give one interface: tc-intercept IFACE (or -i IFACE)")
        if args.buffer_size < 64 or args.count < 0 or args.stats_interval <= 0:
            raise UsageError("--buffer-size >= 64, --count >= 0, --stats-interval > 0")
        tick = (lambda: self.warn(self.stats_line())) if args.verbose else None
        self.icpt = icpt = open_interceptor(
            args.engine, iface, args.filter, args.payload, args.buffer_size << 10,
            lambda: self.record_writer(header(self.name, iface=iface, filter=args.filter)),
            promisc=not args.no_promisc, warn=self.warn, info=self.info, tick=tick,
            tick_s=args.stats_interval)
        try:
            try:
                icpt.run(limit=args.count)
            finally:
                icpt.writer.flush()
        finally:
            self.final_stats = icpt.kernel_stats()
            icpt.engine.close()
        return 0

    def stats_line(self):
        return self.icpt.stats_line(self.final_stats) if self.icpt else None

    def stats_dict(self) -> dict:
        if self.icpt is None:
            return super().stats_dict()
        return {**self.icpt.counts(self.final_stats), "summary": self.stats_line()}


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
