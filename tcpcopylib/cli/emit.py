"""tc-emit: send the IP datagram of every "pkt" record (raw IP socket, or AF_PACKET with -o)."""

from __future__ import annotations

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import UsageError


class Tool(BaseTool):
    name = "tc-emit"
    summary = ("Send the IPv4/IPv6 datagram of every \"pkt\" record as it is, to its own "
               "destination address (raw IP sockets; link layer with -o). TCP checksums are "
               "verified and recomputed when wrong. Send errors are counted, never fatal.")
    epilog = ("examples:\n"
              "  tc-readpcap prod.pcap | tc-session --target 10.0.0.5:8080 | tc-pace | tc-emit\n"
              "  tc-emit --stats -o eth1 --dst-mac 02:00:00:00:01:02 < out.cbor")
    writes_records = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.emitter = None
        self.ignored = 0

    def add_arguments(self, p) -> None:
        p.add_argument("files", nargs="*", default=["-"], metavar="FILE",
                       help="record streams to read in turn ('-' or none: stdin)")
        add_sender_arguments(p)

    def stats_line(self):
        if self.emitter is None:
            return None
        t = self.elapsed()
        rate = self.emitter.sent / t if t > 0 else 0.0
        return (f"{self.emitter.summary()}, ignored records {self.ignored}, {t:.2f} s, "
                f"{rate:,.0f} pkt/s")

    def stats_dict(self) -> dict:
        em = self.emitter
        if em is None:
            return super().stats_dict()
        return {**em.as_dict(), "ignored": self.ignored, "summary": self.stats_line()}

    def run(self, args):
        from tcpcopylib.emit import Emitter
        from tcpcopylib.records import RecordReader

        sender = open_sender(args)
        # every input opens before anything is sent (missing file: 66)
        try:
            fds = [(self.open_input(p), "<stdin>" if p == "-" else p) for p in args.files]
        except BaseException:
            sender.close()
            raise
        # batches of up to 64 per sendmmsg; what is pending goes out before a read may block
        self.emitter = em = Emitter(sender, send_error_warner(self.warn))
        emit = em.emit
        try:
            for fd, name in fds:
                for rec in RecordReader(fd, on_idle=em.flush, name=name).iter_pkt():
                    if type(rec) is tuple:  # (ts, data) of a whole packet
                        emit(rec[1])
                    elif rec["t"] == "pkt":
                        data = rec.get("data")
                        if type(data) is bytes:
                            emit(data, rec.get("len"))
                        else:
                            em.skip("malformed")
                    else:
                        self.ignored += 1
        finally:
            try:
                em.close()
            finally:
                sender.close()


def add_sender_arguments(p) -> None:
    """The options that choose how datagrams are sent (tc-emit's, and tc-session's with
    --send)."""
    p.add_argument("-o", "--interface", metavar="IFACE",
                   help="send Ethernet frames on IFACE (AF_PACKET) instead of raw IP; "
                        "needs --dst-mac")
    p.add_argument("--dst-mac", metavar="MAC",
                   help="destination MAC address of the frames sent with -o")
    p.add_argument("--src-mac", metavar="MAC",
                   help="source MAC address with -o (default: the interface's own)")


def check_sender_arguments(args) -> None:
    """Usage errors of the sender options (before anything is opened)."""
    from tcpcopylib.emit import parse_mac

    if args.interface is None and (args.dst_mac or args.src_mac):
        raise UsageError("--dst-mac/--src-mac need -o IFACE")
    if args.interface is not None:
        if not args.dst_mac:
            raise UsageError("-o IFACE needs --dst-mac (tc-emit does no ARP)")
        parse_mac(args.dst_mac)
        if args.src_mac:
            parse_mac(args.src_mac)


def send_error_warner(warn):
    """An Emitter's on_new_error(name, exc): one warning per kind of send error."""
    def on_new_error(name, exc):
        warn(f"warning: send failed: {name} ({exc.strerror or exc}); "
             f"counting further {name} failures silently")
    return on_new_error


def open_sender(args):
    """The sender the options describe: a LinkSender with -o, else a RawSender (no raw
    socket allowed: NoPermissionError, exit 77; no such interface: 66)."""
    from tcpcopylib.emit import LinkSender, RawSender, parse_mac

    check_sender_arguments(args)
    if args.interface is not None:
        src = parse_mac(args.src_mac) if args.src_mac else None
        return LinkSender(args.interface, parse_mac(args.dst_mac), src)
    return RawSender()


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
