"""tc-readpcap: pcap/pcapng files in, one "pkt" record per IP datagram out."""

from __future__ import annotations

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import number_arg
from tcpcopylib.errors import EX_DATAERR, CaptureFormatError, UsageError


# --batch: a batch holds packets of at most 1 ms of recording time (a stage that releases
# it as a whole, tc-pace, sends none of them more than that early) and about 48 KiB
# (larger CBOR items hit glibc's heap-trim cost: feasibility.md section 3.1).
BATCH_SPAN_NS = 1_000_000
BATCH_BYTES = 48 << 10


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
        self.read = self.emitted = self.non_ip = self.filtered = self.bytes = 0
        self.unsupported = set()  # link types already warned about
        self.pending = None  # --batch: the packets not yet written (a PendingBatch)

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

    def stats_line(self) -> str:
        t = self.elapsed()
        rate = self.read / t if t > 0 else 0.0
        return (f"{self.read} packets read, {self.emitted} emitted, {self.non_ip} skipped "
                f"non-IP, {self.filtered} filtered out, {self.bytes} bytes, {t:.2f} s, "
                f"{rate:,.0f} pkt/s")

    def _compile(self, expr: str, linktype: int):
        import pcapy

        from tcpcopylib.link import bpf_dlt

        try:
            return pcapy.compile(bpf_dlt(linktype), 262144, expr, 1, 0)
        except pcapy.PcapError as e:
            raise UsageError(f"bad filter expression {expr!r}: {e}") from None

    def run(self, args):
        from tcpcopylib.link import LINKTYPE_ETHERNET, LINKTYPE_RAW
        from tcpcopylib.pcapio import CaptureReader
        from tcpcopylib.records import PendingBatch, header

        if args.count is not None and args.count < 0:
            raise UsageError("--count must be >= 0")
        self.pending = PendingBatch()
        if args.filter:
            self._compile(args.filter, LINKTYPE_ETHERNET)  # a bad expression fails before any input
        # Open every input and check its magic before writing anything.
        writer = None
        inputs = []
        for path in args.files:
            fd = self.open_input(path)
            reader = CaptureReader(fd, "<stdin>" if path == "-" else path,
                                   on_idle=lambda: writer and self._flush(writer))
            inputs.append((reader, reader.frames()))
        status = 0
        limit = args.count
        try:
            for reader, frames in inputs:
                hdr = header(self.name, source=reader.name, linktype=LINKTYPE_RAW,
                             format=reader.format)
                if writer is None:
                    writer = self.record_writer(hdr)
                else:
                    writer.new_section(hdr)
                if limit is not None and self.emitted >= limit:
                    break
                try:
                    self._copy(frames, writer, args.filter,
                               None if limit is None else limit - self.emitted, args.batch)
                except CaptureFormatError as e:
                    self.warn(f"warning: {e}")
                    status = EX_DATAERR
                finally:
                    self._end_batch(writer)  # a batch never spans two files
        finally:
            if writer is not None:
                self._flush(writer)
        return status

    def _end_batch(self, writer) -> None:
        """The pending --batch packets into the writer's buffer."""
        self.pending.write_to(writer)

    def _flush(self, writer) -> None:
        """Before a read that may block, and at the end: nothing is held back."""
        self._end_batch(writer)
        writer.flush()

    def _copy(self, frames, writer, expr, limit, batch=1):
        """The hot loop: frames -> encoded pkt records (counters kept in locals), or with
        batch > 1 pkts records of up to batch whole datagrams within BATCH_SPAN_NS."""
        from tcpcopylib.link import LINK_SPANS
        from tcpcopylib.pcapio import encode_pkt

        buf, flush, bufsize = writer.buf, writer.flush, writer.bufsize  # write_raw, inlined
        stamps, datas = self.pending.stamps, self.pending.datas
        batch_bytes = 0
        cur_lt = span = bpf = None
        read = emitted = non_ip = filtered = nbytes = 0
        # the counters before this file: self.* = base + locals at each buffer flush (for
        # --progress and --metrics, once per buffer, not per packet) and at the end
        base = (self.read, self.emitted, self.non_ip, self.filtered, self.bytes)
        limit = -1 if limit is None else limit
        try:
            for lt, ts, frame, orig in frames:
                read += 1
                if lt != cur_lt:
                    cur_lt = lt
                    span = LINK_SPANS.get(lt)
                    bpf = self._compile(expr, lt) if expr and span else None
                    if span is None and lt not in self.unsupported:
                        self.unsupported.add(lt)
                        self.warn(f"warning: link type {lt} not supported; its frames are "
                                  f"skipped")
                if span is None:
                    non_ip += 1
                    continue
                if bpf is not None and not bpf.filter(frame):
                    filtered += 1
                    continue
                s = span(frame, orig)
                if s is None:
                    non_ip += 1
                    continue
                start, end, ip_orig = s
                data = frame[start:end] if start or end != len(frame) else frame
                if batch > 1 and not ip_orig and 0 <= ts and end - start < 0x10000:
                    # (a cut-off datagram goes alone, as a pkt record with its "len")
                    if not stamps:  # (also after _flush() emptied it)
                        batch_bytes = 0
                    elif (len(stamps) >= batch or ts - stamps[0] > BATCH_SPAN_NS
                          or batch_bytes > BATCH_BYTES):
                        self._end_batch(writer)  # (into buf: the writer's own buffer)
                        batch_bytes = 0
                    stamps.append(ts)
                    datas.append(data)
                    batch_bytes += end - start
                else:
                    if stamps:
                        self._end_batch(writer)
                    buf += encode_pkt(ts, data, ip_orig)
                if len(buf) >= bufsize:
                    flush()
                    self._sync(base, read, emitted, non_ip, filtered, nbytes)
                nbytes += end - start
                emitted += 1
                if emitted == limit:
                    return
        finally:
            writer.records += emitted
            self._sync(base, read, emitted, non_ip, filtered, nbytes)

    def _sync(self, base, read, emitted, non_ip, filtered, nbytes) -> None:
        """The totals: counters before this file plus this file's so far (each only grows)."""
        self.read = base[0] + read
        self.emitted = base[1] + emitted
        self.non_ip = base[2] + non_ip
        self.filtered = base[3] + filtered
        self.bytes = base[4] + nbytes

    def stats_dict(self) -> dict:
        return {"read": self.read, "emitted": self.emitted, "non_ip": self.non_ip,
                "filtered": self.filtered, "bytes": self.bytes, "summary": self.stats_line()}


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
