"""The record stream: a labeled CBOR sequence (RFC 8742 + RFC 9277).

A stream is one or more *sections*. Each section starts with the 12-byte label
``55800(1413697618(h'424F52'))`` (hexdumps as ``....TCPRCBOR``), then a header map
``{"t": "header", "v": FORMAT_VERSION, "tool": ..., ...}``, then one CBOR map per record.
A label may recur mid-stream, so ``cat a.cbor b.cbor`` is a valid stream.

Record types are documented once in man/man5/tcpcopy-records.5. Stages pass record
types and keys they do not know through untouched.

Reading: ``RecordReader`` reads the fd in large chunks with ``os.read`` (returns what a
pipe holds, never waits for a full buffer) and calls ``on_idle`` before every read that
may block, so a writer downstream can flush: high throughput under load, no added
latency on a live stream.
"""

from __future__ import annotations

import io
import os

import cbor2

from tcpcopylib import __version__
from tcpcopylib.errors import StreamError
# the layout of the records, for the stream and for the stages that import it from here
from tcpcopylib.wire import (LABEL, MAX_DEPTH, T_CLAIM, T_FB, T_HEADER, T_PKT,  # noqa: F401
                             T_PKTS, T_STATS, Malformed, PendingBatch, batch_adds_up,
                             batch_columns, batch_packets, batch_records, batch_stamps,
                             batch_structs, encode_pkts, fast_record, is_batch, min_item_end,
                             pkt_records, record_of, replace_ts, scan_batch, scan_item,
                             scan_record)

FORMAT_VERSION = 1
LABEL_TAG = 55800
PROTOCOL_TAG = 0x54435052  # "TCPR"

CHUNK = 1 << 17
# The largest item (record or header) a reader accepts, in bytes; larger -> StreamError.
# Writers stay far below it: a pkt record holds < 64 KiB, a tc-readpcap batch ~48 KiB (at
# most 112 KiB), a tc-session batch at most MAX_BATCH_PKTS datagrams. See tcpcopy-records(5).
MAX_RECORD = 4 << 20
MAX_BATCH_PKTS = 63  # 63 datagrams of 64 KiB and their columns stay below MAX_RECORD


def header(tool: str, **fields) -> dict:
    h = {"t": T_HEADER, "v": FORMAT_VERSION, "tool": tool, "tool_version": __version__}
    h.update(fields)
    return h


def encode_section(hdr: dict) -> bytes:
    return LABEL + cbor2.dumps(hdr)


def _check_header(item, offset: int, any_version: bool = False) -> dict:
    if type(item) is not dict or item.get("t") != T_HEADER:
        raise StreamError(f"byte {offset}: label not followed by a header record")
    v = item.get("v")
    if type(v) is not int:  # (not True: a bool is no version)
        raise StreamError(f"byte {offset}: header has no integer format version")
    if any_version:
        return item
    if v > FORMAT_VERSION:
        raise StreamError(
            f"stream format version {v if v < 1 << 64 else '(huge)'} is newer than this "
            f"tcpcopylib understands ({FORMAT_VERSION}); upgrade tcpcopylib")
    if v < 1:
        raise StreamError(f"byte {offset}: invalid format version "
                          f"{v if v > -1 << 64 else '(huge)'}")
    return item


def _no_shared(decoder):
    raise cbor2.CBORDecodeError("shared references (tags 28/29) are not allowed in records")


# records never use them; cyclic or exponential values would break every later stage
_SEMANTIC = {28: _no_shared, 29: _no_shared}

# a section header, in the raw slot of RecordReader.iter_raw()
HEADER = "header"

# what StreamDecoder.parse() returns for each item (see there)
AS_RECORDS, AS_RAW, AS_PKT, AS_SPANS = range(4)

# An AS_SPANS item is a tuple (kind, ts, ts_at, stop, count, record), one meaning per slot:
#   kind    T_PKT or T_FB: a record in our layout (wire.scan_record), nothing decoded but
#           its ts; T_PKTS: a batch in our layout (wire.scan_batch); None: a record decoded
#           by cbor2; HEADER: a section header
#   ts      the timestamp (a batch: its first packet's); None if decoded
#   ts_at   the offset in buf of the timestamp's 8 bytes (a batch: of its ts column)
#   stop    the end of the item in buf, where the next one starts
#   count   the packets the item holds: 1, a batch's n, 0 for a header
#   record  the decoded record or header; None for the kinds in our layout
# Tuples, not objects (measured: parse(AS_SPANS) and tc-pace's loop over the items cost
# ~0.7 us more per record with a class with __slots__, ~0.05 us with this new tuple, for
# ~0.7 us in all before; an item is made per record, in tc-pace's hot loop).
SPAN_KIND, SPAN_TS, SPAN_TS_AT, SPAN_STOP, SPAN_COUNT, SPAN_RECORD = range(6)


class StreamDecoder:
    """The parsing state shared by RecordReader (pull) and StreamParser (push).

    ``parse(buf)`` decodes the complete items at the start of ``buf``. Records in our layout
    (tcpcopylib.wire) are read in Python without cbor2; everything else by cbor2.
    """

    def __init__(self, name: str = "<stdin>", headers: bool = False, any_version: bool = False):
        self.name = name
        self.headers = headers
        self.any_version = any_version  # accept headers of any version (the caller checks)
        self.header: dict | None = None
        self.records = 0
        self.sections = 0
        self.consumed = 0  # bytes of complete items so far
        self._expect_header = False
        # the scan of the incomplete item at byte `consumed`: [consumed then, offset where
        # the scan stopped (from the item's start), scan_item's stack]; None if none
        self._pend: list | None = None

    @property
    def at_record(self) -> bool:
        """Is the next item a record (inside a section, no header due)? Then a fast
        scanner may take records in our layout from the input itself (StreamParser)."""
        return self.header is not None and not self._expect_header

    def parse(self, buf: bytes, mode: int = AS_RECORDS):
        """(items, bytes used, error or None). Items before an error are returned; what an
        item is depends on ``mode``:

        - AS_RECORDS: the records (headers only with ``headers=True``);
        - AS_RAW: (record, raw) pairs, raw being the record's bytes when they are what
          cbor2.dumps(record) gives, None when unknown, HEADER for a section header;
        - AS_PKT: (ts, data) tuples for whole packets (pkt records in our layout without
          "len"), records otherwise;
        - AS_SPANS: (kind, ts, ts_at, stop, count, record) tuples (see SPAN_KIND): records
          and batches in our layout located in ``buf``, nothing copied (a stage that
          forwards them patches and writes slices of ``buf``); other records and section
          headers decoded.

        A batch (pkts record) is expanded into its packets, as pkt records or (ts, data)
        tuples, in every mode but AS_SPANS with our layout.
        """
        if type(buf) is not bytes:
            buf = bytes(buf)  # (slices of it become the records' bytes values)
        out: list = []
        append = out.append
        pos, end, fast = 0, len(buf), 0  # fast: records read here, not by a helper
        bio = dec = None  # cbor2's decoder over buf, made when first needed
        scan = scan_record
        try:
            if self.header is None and not self._expect_header:
                self._check_label(buf)
            while pos < end:
                if not self._expect_header and 0xA3 <= buf[pos] <= 0xA5:
                    r = scan(buf, pos, end)
                    if r is not None:  # the hot path: a pkt/fb record in our layout
                        fast += 1
                        if mode == AS_SPANS:
                            append((r[0], r[1], r[2], r[3], 1, None))
                        elif mode == AS_PKT and r[0] == T_PKT and not (r[6] and "len" in r[6]):
                            append((r[1], buf[r[4]:r[5]]))
                        elif mode == AS_RAW:
                            append((record_of(buf, r), buf[pos:r[3]]))
                        else:
                            append(record_of(buf, r))
                        pos = r[3]
                        continue
                    if is_batch(buf, pos):
                        stop = self._batch(buf, pos, end, mode, out)
                        if stop:
                            pos = stop
                            continue
                if buf.startswith(LABEL, pos):
                    pos += len(LABEL)
                    self._expect_header = True
                    continue
                if end - pos < len(LABEL) and LABEL.startswith(buf[pos:]):
                    break  # maybe the start of a label: wait for more bytes
                if dec is None:
                    bio = io.BytesIO(buf)
                    dec = cbor2.CBORDecoder(bio, semantic_decoders=_SEMANTIC)
                stop = self._decode_item(buf, pos, bio, dec, mode, out)
                if not stop:
                    break  # not all here
                pos = stop
        except StreamError as e:
            err = e
        else:
            err = None
        self.consumed += pos
        self.records += fast
        return out, pos, err

    def _check_label(self, buf) -> None:
        """The very first bytes must be the label: reject garbage early and clearly."""
        n = min(len(buf), len(LABEL))
        if buf[:n] != LABEL[:n]:
            raise StreamError(f"{self.name}: not a tcpcopy record stream (no TCPR label at "
                              f"byte 0)")

    def _batch(self, buf, pos: int, end: int, mode: int, out: list) -> int:
        """A batch in our layout at buf[pos:end] into ``out`` as ``mode`` says; the end of
        the batch, 0 if it is not one or not complete (cbor2 decides)."""
        b = scan_batch(buf, pos, end)
        if b is None:
            return 0
        n, ts_at, stop = b[0], b[1], b[6]
        if stop - pos > MAX_RECORD:
            raise self._too_large(self.consumed + pos, stop - pos)
        if mode == AS_SPANS:
            if not batch_adds_up(buf, b):
                raise self._malformed_batch(pos)
            out.append((T_PKTS, batch_stamps(buf, ts_at, 1)[0], ts_at, stop, n, None))
        else:
            cols = batch_columns(buf, b)
            if cols is None:
                raise self._malformed_batch(pos)
            self._expand(*cols, mode, out)
        self.records += 1
        return stop

    def _malformed_batch(self, pos: int) -> StreamError:
        return StreamError(f"{self.name}: malformed pkts record at byte {self.consumed + pos} "
                           f"(lengths do not add up)")

    def _decode_item(self, buf, pos: int, bio, dec, mode: int, out: list) -> int:
        """cbor2 decodes the item at buf[pos] (``dec`` reads ``bio``, a view of buf) into
        ``out`` as ``mode`` says: the end of the item, 0 if it is not all there yet (its
        bytes scanned once: see _advance). StreamError if it is not a valid item."""
        base = self.consumed
        pend = self._pend
        if pend is not None:
            if pos or pend[0] != base:  # (a caller took the item's bytes itself)
                pend = self._pend = None
            elif not self._advance(buf):  # the item we scanned before: scan only what is new
                return 0
        bio.seek(pos)
        try:
            item = dec.decode()
        except cbor2.CBORDecodeEOF:
            if pend is not None:  # the scan said complete: a disagreement is garbage
                raise StreamError(f"{self.name}: not a valid record at byte {base + pos}") \
                    from None
            # not all here: scan what is (once); later reads go on from where it stops
            self._pend = [base + pos, 0, [1]]
            self._advance(buf, pos)
            return 0
        except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError,
                MemoryError) as e:
            raise StreamError(f"{self.name}: not a valid record at byte {base + pos}: {e}") \
                from None
        self._pend = None
        stop = bio.tell()
        if stop - pos > MAX_RECORD:
            raise self._too_large(base + pos, stop - pos)
        if self._expect_header:
            self._decoded_header(item, base + stop, mode, out)
        else:
            self._decoded_record(item, base + stop, mode, out)
        return stop

    def _decoded_header(self, item, at: int, mode: int, out: list) -> None:
        """A header decoded after a label (``at``: the offset of its end in the stream)."""
        self.header = _check_header(item, at, self.any_version)
        self.sections += 1
        self._expect_header = False
        if mode == AS_SPANS:
            out.append((HEADER, None, None, at - self.consumed, 0, item))
        elif self.headers:
            out.append((item, HEADER) if mode == AS_RAW else item)

    def _decoded_record(self, item, at: int, mode: int, out: list) -> None:
        """A record decoded by cbor2 (``at``: the offset of its end in the stream)."""
        if type(item) is not dict or "t" not in item:
            raise StreamError(f"{self.name}: unexpected {type(item).__name__} item at byte "
                              f"{at} (records are maps with a 't' key)")
        if self.header is None:
            raise StreamError(f"{self.name}: record before any header")
        self.records += 1
        if item.get("t") == T_PKTS:
            cols = batch_packets(item, f"{self.name}: byte {at}")
            self._expand(*cols, mode, out, at - self.consumed)
        elif mode == AS_SPANS:
            out.append((None, None, None, at - self.consumed, 1, item))
        else:
            out.append((item, None) if mode == AS_RAW else item)

    def _advance(self, buf, start: int = 0) -> bool:
        """Scan the new bytes of the incomplete item at buf[start:] (self._pend); True
        once it is complete. StreamError if it is malformed or larger than MAX_RECORD."""
        pend = self._pend
        at, off, stack = pend
        end = len(buf) - start
        if stack and off < end:
            try:
                if start:
                    off = scan_item(buf, start + off, len(buf), stack) - start
                else:
                    off = scan_item(buf, off, end, stack)
            except Malformed as e:
                self._pend = None
                raise StreamError(f"{self.name}: not a valid record at byte {at}: {e}") \
                    from None
            pend[1] = off
        if not stack and off <= end:
            return True
        size = min_item_end(off, stack)
        if size > MAX_RECORD:
            self._pend = None
            raise self._too_large(at, size, not stack)
        return False

    def _too_large(self, at: int, size: int, exact: bool = True) -> StreamError:
        return StreamError(
            f"{self.name}: record at byte {at} is {'' if exact else 'at least '}{size} bytes, "
            f"more than the limit of {MAX_RECORD} (see tcpcopy-records(5))")

    def pending_complete(self, buf) -> bool:
        """For a reader holding the incomplete item's bytes in ``buf`` (growing): True when
        parse() has something to do, False while the item is still incomplete (only the new
        bytes are scanned). StreamError if it turns out malformed or too large."""
        if self._pend is None or self._pend[0] != self.consumed:
            return True
        return self._advance(buf)

    @staticmethod
    def _expand(stamps, datas, sids, mode, out, stop=None) -> None:
        """A batch's packets appended to ``out`` as items of ``mode``: (ts, data) tuples
        for AS_PKT, else pkt records (with "sid" if sids; AS_SPANS: decoded pkt records,
        each ending at ``stop``, the batch's end)."""
        if mode == AS_PKT:
            out.extend(zip(stamps, datas))
            return
        recs = pkt_records(stamps, datas, sids)
        if mode == AS_RAW:
            out.extend((rec, None) for rec in recs)
        elif mode == AS_SPANS:
            out.extend((None, None, None, stop, 1, rec) for rec in recs)
        else:
            out.extend(recs)

    def _end_error(self, pending: int) -> StreamError | None:
        """The error for an input that ended with ``pending`` bytes unparsed, if any."""
        if pending:
            return StreamError(
                f"{self.name}: truncated record at byte {self.consumed} "
                f"({pending} trailing bytes)")
        if self._expect_header:
            return StreamError(f"{self.name}: label without a header at end of stream")
        if self.header is None:  # (every writer writes its label and header at once)
            return StreamError(f"{self.name}: empty input, not a record stream (no TCPR "
                               f"label)")
        return None


class RecordReader(StreamDecoder):
    """Iterate over the records of a stream read from a file descriptor.

    Yields record dicts. Header records are consumed (available as ``self.header``)
    unless ``headers=True``. Raises StreamError for anything that is not a stream.
    ``iter_raw()`` yields (record, raw) pairs instead (see StreamDecoder.parse).
    Counters (``records``, ``consumed``) advance a chunk at a time.
    """

    def __init__(self, fd: int, on_idle=None, headers: bool = False, name: str = "<stdin>"):
        super().__init__(name, headers)
        self.fd = fd
        self.on_idle = on_idle
        self.eof = False

    def __iter__(self):
        return self._items(AS_RECORDS)

    def iter_raw(self):
        return self._items(AS_RAW)

    def iter_pkt(self):
        """Items as StreamDecoder.parse(AS_PKT) gives them."""
        return self._items(AS_PKT)

    def iter_spans(self):
        """(buf, items) per chunk read: items as StreamDecoder.parse(AS_SPANS) gives them,
        locating records in buf (which starts with the first of them)."""
        return self._items(AS_SPANS)

    def _items(self, mode: int):
        fd, on_idle, parse = self.fd, self.on_idle, self.parse
        buf = b""
        acc = None  # the bytes of an incomplete item being scanned (appended to in place)
        while True:
            if on_idle is not None:
                on_idle()
            chunk = os.read(fd, CHUNK)
            if not chunk:
                self.eof = True
                err = self._end_error(len(buf) if acc is None else len(acc))
                if err is not None:
                    raise err
                return
            if acc is not None:
                acc += chunk
                if not self.pending_complete(acc):
                    continue
                buf, acc = bytes(acc), None
            else:
                buf = buf + chunk if buf else chunk
            items, pos, err = parse(buf, mode)
            if mode == AS_SPANS:
                if items:
                    yield buf, items
            else:
                yield from items
            if err is not None:
                raise err
            if self._pend is not None and pos < len(buf):
                acc, buf = bytearray(memoryview(buf)[pos:]), b""
            else:
                buf = buf[pos:]


class RecordWriter:
    """Write a stream to a file descriptor, batching output.

    Output is buffered up to ``bufsize`` bytes; call ``flush()`` before anything that
    may block (a read, a sleep), which is what ``RecordReader(on_idle=writer.flush)``
    does. The label and header are written at construction, so even an empty run
    produces a valid stream.
    """

    def __init__(self, fd: int, hdr: dict | None = None, tool: str = "tc-?",
                 bufsize: int = 1 << 16):
        self.fd = fd
        self.bufsize = bufsize
        self.buf = bytearray()
        self.records = 0
        self._dumps = cbor2.dumps
        self.buf += encode_section(hdr if hdr is not None else header(tool))

    def write(self, rec: dict) -> None:
        self.buf += self._dumps(rec)
        self.records += 1
        if len(self.buf) >= self.bufsize:
            self.flush()

    def write_raw(self, encoded: bytes) -> None:
        """Append one already-encoded record (hot paths that encode themselves)."""
        self.buf += encoded
        self.records += 1
        if len(self.buf) >= self.bufsize:
            self.flush()

    def new_section(self, hdr: dict) -> None:
        self.buf += encode_section(hdr)

    def flush(self) -> None:
        drain(self.fd, self.buf)


class StageWriter(RecordWriter):
    """The writer of a stage whose output follows its input's sections: nothing is written
    before the input's first header has been read (so bad input gives an empty output, as
    from every filter); then each input header starts an output section whose header is
    merged_header(tool, that header, **fields). A header record given to write() is such
    an input header (a stage passes the records it does not use on through write())."""

    def __init__(self, fd: int, tool: str, bufsize: int = 1 << 16, **fields):
        self.fd = fd
        self.bufsize = bufsize
        self.buf = bytearray()
        self.records = 0
        self._dumps = cbor2.dumps
        self.tool = tool
        self.fields = fields
        self.started = False

    def write(self, rec: dict) -> None:
        if rec.get("t") == T_HEADER:
            self.section(rec)
        else:
            super().write(rec)

    def section(self, upstream: dict | None) -> None:
        """Start an output section for the input section whose header is ``upstream``."""
        hdr = merged_header(self.tool, upstream, **self.fields)
        if self.started:
            self.new_section(hdr)
        else:  # (before anything else in the buffer)
            self.buf[:0] = encode_section(hdr)
            self.started = True

    def flush(self) -> None:
        if not self.started and self.buf:  # records before any input header: own header
            self.section(None)
        super().flush()


def drain(fd: int, buf: bytearray) -> None:
    """Write all of ``buf`` to ``fd`` and empty it; what was written is removed even when
    a write fails (EPIPE, say), so a retry never duplicates bytes."""
    if not buf:
        return
    view = memoryview(buf)
    total = 0
    try:
        while total < len(buf):
            total += os.write(fd, view[total:])
    finally:
        view.release()
        del buf[:total]


def merged_header(tool: str, upstream: dict | None, **fields) -> dict:
    """A stage's own header: upstream keys kept, tool fields replaced."""
    h = dict(upstream or {})
    h.update(header(tool, **fields))
    if upstream and upstream.get("tool"):
        h["upstream"] = upstream.get("tool")
    return h
