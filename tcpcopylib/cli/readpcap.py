"""tc-readpcap: pcap/pcapng files in, one "pkt" record per IP datagram out."""

from __future__ import annotations

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import number_arg
from tcpcopylib.errors import UsageError


class Tool(BaseTool):
    name = "tc-readpcap"
    summary = ("Read pcap/pcapng capture files and write one \"pkt\" record per IPv4/IPv6 "
               "datagram (link layer removed, timestamps in integer ns).")
    epilog = ("examples:\n"
              "  tc-readpcap prod.pcap | tc-session --target 10.0.0.5:8080 | tc-pace | tc-emit\n"
              "  tc-readpcap -F 'tcp port 80' a.pcapng b.pcap | tc-dump")
    interrupt_is_success = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.copier = None  # a tcpcopylib.readpcap.PcapCopier: the loop and its counters

    def add_arguments(self, p) -> None:
        p.add_argument("files", nargs="*", default=["-"], metavar="FILE",
                       help="capture files, pcap or pcapng ('-' or none: stdin)")
        p.add_argument("-F", "--filter", metavar="EXPR",
                       help="only packets matching this pcap-filter(7) expression")
        p.add_argument("-c", "--count", type=int, metavar="N",
                       help="stop after emitting N packets")
        p.add_argument("-B", "--batch", type=number_arg(int, 1, True), default=1, metavar="N",
                       help="up to N packets per record (\"pkts\", within 1 ms of "
                            "recording time): less work for every stage downstream; all "
                            "tc-* tools read batches, scripts see tcpcopy-records(5)")

    def counts(self) -> dict:
        from tcpcopylib.readpcap import COUNTERS

        return self.copier.counts() if self.copier else dict.fromkeys(COUNTERS, 0)

    def stats_line(self) -> str:
        c = self.counts()
        t = self.elapsed()
        rate = c["read"] / t if t > 0 else 0.0
        return (f"{c['read']} packets read, {c['emitted']} emitted, {c['non_ip']} skipped "
                f"non-IP, {c['filtered']} filtered out, {c['bytes']} bytes, {t:.2f} s, "
                f"{rate:,.0f} pkt/s")

    def run(self, args):
        from tcpcopylib.link import LINKTYPE_ETHERNET
        from tcpcopylib.pcapio import CaptureReader
        from tcpcopylib.readpcap import PcapCopier, compile_filter

        if args.count is not None and args.count < 0:
            raise UsageError("--count must be >= 0")
        if args.filter:
            compile_filter(args.filter, LINKTYPE_ETHERNET)  # a bad expression fails before any input
        copier = self.copier = PcapCopier(self.name, args.filter, args.batch, args.count,
                                          warn=self.warn)
        # Open every input and check its magic before writing anything.
        inputs = []
        for path in args.files:
            fd = self.open_input(path)
            reader = CaptureReader(fd, "<stdin>" if path == "-" else path,
                                   on_idle=copier.flush)
            inputs.append((reader, reader.frames()))
        return copier.run(inputs, self.stdout_fd)

    def stats_dict(self) -> dict:
        return {**self.counts(), "summary": self.stats_line()}


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
