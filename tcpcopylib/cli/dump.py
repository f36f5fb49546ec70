"""tc-dump: show any record stream as tcpdump-like text, JSON Lines or a pcap file."""

from __future__ import annotations

import os

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import EX_USAGE, StreamError


class Tool(BaseTool):
    name = "tc-dump"
    summary = ("Show a record stream: one tcpdump-like line per record (default), JSON Lines "
               "(--json), or a nanosecond pcap file (--pcap); --from-json turns JSON Lines "
               "back into a stream.")
    epilog = ("examples:\n"
              "  tc-readpcap x.pcap | tc-dump | less\n"
              "  tc-dump --pcap out.cbor > out.pcap && tcpdump -nn -r out.pcap\n"
              "  tc-dump --json cap.cbor > cap.jsonl; tc-dump --from-json cap.jsonl | tc-session ...")
    writes_records = False  # text/JSON; --pcap and --from-json check the terminal themselves

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.counts: dict[str, int] = {}

    def add_arguments(self, p) -> None:
        p.add_argument("files", nargs="*", default=["-"], metavar="FILE",
                       help="record streams ('-' or none: stdin); JSON Lines with --from-json")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--json", action="store_true",
                          help="JSON Lines, every record and field (bytes as {\"$bytes\": base64})")
        mode.add_argument("--pcap", action="store_true",
                          help="a nanosecond pcap (LINKTYPE_RAW) of the pkt (and s2c) "
                               "records")
        mode.add_argument("--from-json", action="store_true",
                          help="read JSON Lines (as --json writes them), write a record stream")
        p.add_argument("--fb", action="store_true",
                       help="with --pcap: also write the fb (feedback) records")
        p.add_argument("-u", "--utc", action="store_true",
                       help="text: show times in UTC instead of local time")
        p.add_argument("--date", action="store_true",
                       help="text: show the date before the time")

    def stats_line(self) -> str:
        n = sum(self.counts.values())
        detail = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
        return f"{n} records ({detail}), {self.elapsed():.2f} s"

    def stats_dict(self) -> dict:
        return {"records": dict(self.counts), "summary": self.stats_line()}

    def _refuse_tty(self, what: str) -> bool:
        if os.isatty(self.stdout_fd):
            self.warn(f"error: refusing to write {what} to a terminal; redirect it to a file "
                      f"or a pipe")
            return True
        return False

    def _records(self, paths, on_idle):
        """Records of every input, headers included, in order."""
        from tcpcopylib.records import RecordReader

        for path in paths:
            fd = self.open_input(path)
            name = "<stdin>" if path == "-" else path
            try:
                yield from RecordReader(fd, on_idle=on_idle, headers=True, name=name)
            finally:
                if path != "-":
                    os.close(fd)

    def _count(self, rec) -> None:
        t = rec.get("t") if isinstance(rec, dict) else None
        key = t if isinstance(t, str) else "?"
        self.counts[key] = self.counts.get(key, 0) + 1

    def run(self, args):
        if args.fb and not args.pcap:
            self.warn("error: --fb only applies to --pcap")
            return EX_USAGE
        if args.pcap:
            if self._refuse_tty("a pcap file"):
                return EX_USAGE
            return self._to_pcap(args)
        if args.from_json:
            if self._refuse_tty("a binary record stream"):
                return EX_USAGE
            return self._from_json(args)
        from tcpcopylib import dumpfmt

        out = dumpfmt.TextOut(self.stdout_fd)
        if args.json:
            render = dumpfmt.to_json
        else:
            render = dumpfmt.TextFormatter(utc=args.utc, date=args.date).line
        try:
            for rec in self._records(args.files, out.flush):
                self._count(rec)
                try:
                    line = render(rec)
                except (TypeError, ValueError, RecursionError) as e:
                    # bytes map keys, undefined, dates, integers of thousands of digits
                    raise StreamError(
                        f"record {sum(self.counts.values())}: cannot be shown"
                        f"{' as JSON' if args.json else ''}: {e}") from None
                out.write(line)
        finally:
            out.flush()
        return 0

    def _to_pcap(self, args):
        from tcpcopylib.dumpfmt import write_pcap
        from tcpcopylib.pcapio import PcapWriter

        writer = PcapWriter(self.stdout_fd)
        kinds = ("pkt", "s2c", "fb") if args.fb else ("pkt", "s2c")
        write_pcap(self._records(args.files, writer.flush), writer, kinds, self.counts)
        return 0

    def _from_json(self, args):
        from tcpcopylib.dumpfmt import stream_from_json
        from tcpcopylib.records import RecordWriter

        stream_from_json(self._text_inputs(args.files),
                         lambda hdr: RecordWriter(self.stdout_fd, hdr), self.name, self._count)
        return 0

    def _text_inputs(self, paths):
        """(name, text file) of every input, each opened when its turn comes."""
        for path in paths:
            fd = self.open_input(path)
            with open(fd, "r", encoding="utf-8", errors="strict", closefd=path != "-") as f:
                yield "<stdin>" if path == "-" else path, f


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
