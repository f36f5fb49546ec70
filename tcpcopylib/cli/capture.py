"""tc-capture: live capture of client->server TCP packets as "pkt" records, and with
--server-half the server's answers as "s2c" records (the capture itself:
tcpcopylib.livecapture)."""

from __future__ import annotations

import argparse

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import UsageError
from tcpcopylib.tool import number_arg

SHED_LAG_MS = 500   # --shed-lag default: below tc-session's (2 s), so we shed first


class _OutputAction(argparse.Action):
    """-w FILE: a file output lets stdout be a terminal."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        namespace.allow_tty = value != "-"


class Tool(BaseTool):
    name = "tc-capture"
    summary = ("Capture the client->server TCP packets arriving at this host on IFACE and "
               "write them as \"pkt\" records (raw IP datagrams, link layer stripped).")
    epilog = """examples:
  tc-capture eth0 | tc-session --target 10.0.0.5:8080 | tc-pace | tc-emit
  tc-capture -i eth0 -F 'tcp dst port 80' -c 1000 -w cap.cbor
  tc-capture any 'tcp dst port 80' --stats | tc-dump
  tc-capture eth0 'tcp port 80' --server-half -w orig.cbor    (an ORIGINAL for tc-diff)"""
    interrupt_is_success = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.live = None  # a livecapture.LiveCapture once run() started

    def add_arguments(self, p) -> None:
        p.add_argument("words", nargs="*", metavar="IFACE [EXPR]",
                       help="interface (or 'any'), then optionally a filter expression "
                            "(with -i, all words are the filter)")
        p.add_argument("-i", "--interface", metavar="IFACE",
                       help="interface to capture on ('any' for all)")
        p.add_argument("-F", "--filter", metavar="EXPR",
                       help="BPF filter (tcpdump language) narrowing what is captured; "
                            "default 'tcp'")
        p.add_argument("-c", "--count", type=int, default=0, metavar="COUNT",
                       help="stop after writing COUNT packet records")
        p.add_argument("-w", "--write", default="-", metavar="FILE", action=_OutputAction,
                       help="write the stream to FILE instead of stdout ('-')")
        p.add_argument("--engine", choices=("pcap", "ring", "afpacket"), default="pcap",
                       help="capture engine: libpcap via pcapy-ng (default; a block timer of "
                            "1 ms or one kernel tick, 4 ms at HZ=250), a TPACKET_V2 ring read "
                            "as soon as a packet arrives, or an AF_PACKET socket (one recvfrom "
                            "per packet)")
        p.add_argument("--mtu", type=int, default=0, metavar="BYTES",
                       help="split GRO/LRO super-segments longer than this (default: the "
                            "interface MTU; 1500 for 'any')")
        p.add_argument("-s", "--snaplen", type=int, default=262144, metavar="BYTES",
                       help="bytes captured per packet (default 262144)")
        p.add_argument("-m", "--max-memory", type=int, default=0, metavar="MB",
                       help="above MB of resident memory, shed new sessions (counted) "
                            "instead of growing (default: no limit)")
        p.add_argument("--shed-lag", type=number_arg(float, 0, True, 1e9), metavar="MS",
                       default=SHED_LAG_MS,
                       help="while more than MS behind the kernel (the packets read are that "
                            "old; engines pcap and ring), and for 0.2 s after a kernel drop, shed "
                            "new sessions whole (counted) so that the others stay whole "
                            f"(default {SHED_LAG_MS}; 0: off, drops too)")
        p.add_argument("-S", "--server-half", action="store_true",
                       help="also keep the server->client half: what local servers (ports "
                            "with a listening socket here) send, as \"s2c\" records, which "
                            "no replaying stage sends; the filter must let both directions "
                            "through ('tcp port 80', not 'tcp dst port 80')")
        p.add_argument("-B", "--buffer-size", type=int, default=32768, metavar="KIB",
                       help="kernel capture buffer in KiB (default 32768)")

    def _resolve(self, args) -> tuple[str, str]:
        """(interface, filter expression) from the words, -i and -F; the numbers checked."""
        words = list(args.words)
        iface = args.interface
        if iface is None:
            if not words:
                raise UsageError("no interface given (tc-capture IFACE, or -i IFACE)")
            iface = words.pop(0)
        expr = " ".join(words)
        if expr and args.filter:
            raise UsageError("give the filter either as -F EXPR or as trailing words, not both")
        expr = args.filter or expr
        if args.count < 0 or args.snaplen < 68 or args.buffer_size < 1:
            raise UsageError("-c must be >= 0, -s >= 68, -B >= 1")
        if args.max_memory < 0:
            raise UsageError("-m/--max-memory takes a size in MB (0: no limit)")
        if args.mtu and args.mtu < 68:
            raise UsageError("--mtu must be at least 68")
        return iface, expr

    def run(self, args):
        from tcpcopylib.livecapture import LiveCapture

        iface, expr = self._resolve(args)
        live = self.live = LiveCapture(
            self.name, iface, expr, engine=args.engine, snaplen=args.snaplen,
            buffer_kib=args.buffer_size, mtu=args.mtu, count=args.count,
            max_memory_mb=args.max_memory, warn=self.warn, verbose=args.verbose,
            elapsed=self.elapsed, server_half=args.server_half, shed_lag_ms=args.shed_lag)
        live.open(self.stdout_fd, None if args.write == "-" else args.write)
        self.info(live.describe())
        live.run()
        if not args.stats:  # like tcpdump: counts at the end (--stats prints them via main)
            self.warn(self.stats_line())
        return 0

    def stats_line(self):
        return self.live.stats_line() if self.live else None

    def stats_dict(self) -> dict:
        d = (self.live.counters() if self.live else None) or {}
        d["summary"] = self.stats_line()
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
