"""tc-readpcap's copy loop: the frames of capture files in, one "pkt" record per IPv4/IPv6
datagram out (or "pkts" batches), with the counters of tc-readpcap --stats.

PcapCopier takes its frames from any iterable of (linktype, ts, frame, original length)
(pcapio.CaptureReader.frames() in the tool) and writes to a descriptor, so a test runs it
in process with in-memory files; nothing in it waits, so it has no clock.
"""

from __future__ import annotations

from tcpcopylib.errors import EX_DATAERR, CaptureFormatError, UsageError

# --batch: a batch holds packets of at most 1 ms of recording time (a stage that releases
# it as a whole, tc-pace, sends none of them more than that early) and about 48 KiB
# (larger CBOR items hit glibc's heap-trim cost: feasibility.md section 3.1).
BATCH_SPAN_NS = 1_000_000
BATCH_BYTES = 48 << 10
COUNTERS = ("read", "emitted", "non_ip", "filtered", "bytes")  # (tc-readpcap --stats-json)


def compile_filter(expr: str, linktype: int):
    """A pcap-filter(7) expression compiled for frames of ``linktype`` (UsageError if bad)."""
    import pcapy

    from tcpcopylib.link import bpf_dlt

    try:
        return pcapy.compile(bpf_dlt(linktype), 262144, expr, 1, 0)
    except pcapy.PcapError as e:
        raise UsageError(f"bad filter expression {expr!r}: {e}") from None


class PcapCopier:
    """``tool`` names the headers; ``expr``: a filter expression or None; ``batch``: up to
    this many packets per record; ``limit``: stop after this many packets (None: all);
    ``warn(msg)``: told about link types it skips and damaged files."""

    def __init__(self, tool: str, expr: str | None = None, batch: int = 1,
                 limit: int | None = None, warn=print):
        from tcpcopylib.records import PendingBatch

        self.tool, self.expr, self.batch, self.limit, self.warn = tool, expr, batch, limit, warn
        self.read = self.emitted = self.non_ip = self.filtered = self.bytes = 0
        self.unsupported = set()  # link types already warned about
        self.pending = PendingBatch()  # batch > 1: the packets not yet written
        self.writer = None

    def run(self, inputs, out_fd: int) -> int:
        """Copy each input, a (reader, frames) pair (a pcapio.CaptureReader, or anything
        with its name and format, and the frames), into a section of its own: 0, or
        EX_DATAERR if one of them was damaged (what was read of it is kept)."""
        from tcpcopylib.link import LINKTYPE_RAW
        from tcpcopylib.records import RecordWriter, header

        status = 0
        limit = self.limit
        try:
            for reader, frames in inputs:
                hdr = header(self.tool, source=reader.name, linktype=LINKTYPE_RAW,
                             format=reader.format)
                if self.writer is None:
                    self.writer = RecordWriter(out_fd, hdr)
                else:
                    self.writer.new_section(hdr)
                if limit is not None and self.emitted >= limit:
                    break
                try:
                    self.copy(frames, None if limit is None else limit - self.emitted)
                except CaptureFormatError as e:
                    self.warn(f"warning: {e}")
                    status = EX_DATAERR
                finally:
                    self.pending.write_to(self.writer)  # a batch never spans two files
        finally:
            self.flush()
        return status

    def flush(self) -> None:
        """Before a read that may block, and at the end: nothing is held back."""
        if self.writer is not None:
            self.pending.write_to(self.writer)
            self.writer.flush()

    def copy(self, frames, limit=None):
        """The hot loop: frames -> encoded pkt records (counters kept in locals), or with
        batch > 1 pkts records of up to batch whole datagrams within BATCH_SPAN_NS."""
        from tcpcopylib.wire import encode_pkt

        writer, batch = self.writer, self.batch
        buf, flush, bufsize = writer.buf, writer.flush, writer.bufsize  # write_raw, inlined
        stamps, datas = self.pending.stamps, self.pending.datas
        end_batch = self.pending.write_to
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
                    span, bpf = self._link(lt)
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
                    if not stamps:  # (also after flush() emptied it)
                        batch_bytes = 0
                    elif (len(stamps) >= batch or ts - stamps[0] > BATCH_SPAN_NS
                          or batch_bytes > BATCH_BYTES):
                        end_batch(writer)  # (into buf: the writer's own buffer)
                        batch_bytes = 0
                    stamps.append(ts)
                    datas.append(data)
                    batch_bytes += end - start
                else:
                    if stamps:
                        end_batch(writer)
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

    def _link(self, lt: int):
        """(the datagram span function, the compiled filter) for frames of link type lt;
        (None, None) for a link type we do not read (said once)."""
        from tcpcopylib.link import LINK_SPANS

        span = LINK_SPANS.get(lt)
        if span is None:
            if lt not in self.unsupported:
                self.unsupported.add(lt)
                self.warn(f"warning: link type {lt} not supported; its frames are skipped")
            return None, None
        return span, compile_filter(self.expr, lt) if self.expr else None

    def counts(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    def _sync(self, base, read, emitted, non_ip, filtered, nbytes) -> None:
        """The totals: counters before this file plus this file's so far (each only grows)."""
        self.read = base[0] + read
        self.emitted = base[1] + emitted
        self.non_ip = base[2] + non_ip
        self.filtered = base[3] + filtered
        self.bytes = base[4] + nbytes
