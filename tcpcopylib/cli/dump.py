"""tc-dump: show any record stream as tcpdump-like text, JSON Lines or a pcap file."""

from __future__ import annotations

import os
import struct

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import EX_USAGE, StreamError

_PCAP_REC = struct.Struct("<IIII").pack  # pcap record header: sec, nsec, caplen, len


class TextOut:
    """Buffered text lines to an fd (flushed on idle, like RecordWriter)."""

    def __init__(self, fd: int, max_lines: int = 512):
        self.fd = fd
        self.lines: list[str] = []
        self.max_lines = max_lines

    def write(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= self.max_lines:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        data = ("\n".join(self.lines) + "\n").encode("utf-8", "backslashreplace")
        self.lines.clear()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


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
                          help="a nanosecond pcap (LINKTYPE_RAW) of the pkt records")
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

        out = TextOut(self.stdout_fd)
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
        from tcpcopylib.pcapio import PcapWriter

        writer = PcapWriter(self.stdout_fd)
        # PcapWriter.write, inlined: the hot loop of tc-dump --pcap
        buf, flush, bufsize, pack = writer.buf, writer.flush, writer.bufsize, _PCAP_REC
        wanted = ("pkt", "fb") if args.fb else ("pkt",)
        counts = self.counts
        n = 0
        try:
            for rec in self._records(args.files, flush):
                n += 1
                t = rec["t"]
                counts[t] = counts.get(t, 0) + 1
                if t not in wanted:
                    continue
                data, ts = rec.get("data"), rec.get("ts")
                if type(ts) is not int or type(data) is not bytes:
                    raise StreamError(f"record {n}: a {t} record without bytes 'data' and "
                                      f"integer 'ts'")
                orig = rec.get("len")
                size = len(data)
                try:
                    buf += pack(ts // 1_000_000_000, ts % 1_000_000_000, size,
                                orig if type(orig) is int and orig > size else size)
                except struct.error:
                    raise StreamError(f"record {n}: ts {ts} or len {orig} does not fit in a "
                                      f"pcap file") from None
                buf += data
                writer.packets += 1
                if len(buf) >= bufsize:
                    flush()
        finally:
            flush()
        return 0

    def _from_json(self, args):
        from tcpcopylib.dumpfmt import from_json
        from tcpcopylib.records import FORMAT_VERSION, RecordWriter, header

        writer = None
        try:
            for path in args.files:
                fd = self.open_input(path)
                name = "<stdin>" if path == "-" else path
                with open(fd, "r", encoding="utf-8", errors="strict",
                          closefd=path != "-") as f:
                    for lineno, line in enumerate(f, 1):
                        line = line.strip()
                        if not line or line.startswith("#"):
                            continue
                        try:
                            rec = from_json(line)
                        except ValueError as e:
                            raise StreamError(f"{name}:{lineno}: not a JSON record: {e}") from None
                        if not isinstance(rec, dict) or "t" not in rec:
                            raise StreamError(f"{name}:{lineno}: not a record (a JSON object "
                                              f"with a \"t\" key)")
                        self._count(rec)
                        if rec["t"] == "header":
                            v = rec.get("v")
                            if not isinstance(v, int) or not 1 <= v <= FORMAT_VERSION:
                                raise StreamError(f"{name}:{lineno}: header with unsupported "
                                                  f"format version {v!r}")
                            if writer is None:
                                writer = RecordWriter(self.stdout_fd, rec)
                            else:
                                writer.new_section(rec)
                            continue
                        if writer is None:
                            writer = RecordWriter(self.stdout_fd, header(self.name))
                        writer.write(rec)
            if writer is None:
                writer = RecordWriter(self.stdout_fd, header(self.name))
        except UnicodeDecodeError as e:
            raise StreamError(f"not JSON Lines text: {e}") from None
        finally:
            if writer is not None:
                writer.flush()
        return 0


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
