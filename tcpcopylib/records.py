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
import re
import struct
from itertools import accumulate, islice

import cbor2

from tcpcopylib import __version__
from tcpcopylib.errors import StreamError

FORMAT_VERSION = 1
LABEL = bytes.fromhex("d9d9f8da5443505243424f52")  # 55800(TCPR('BOR'))
LABEL_TAG = 55800
PROTOCOL_TAG = 0x54435052  # "TCPR"

# Record types (the "t" key).
T_HEADER = "header"
T_PKT = "pkt"        # an IP datagram: ts (int ns), data (IPv4/IPv6 bytes), [len, sid]
T_PKTS = "pkts"      # a batch of whole datagrams, as columns (see encode_pkts)
T_FB = "fb"          # feedback: a target's reply (IP+TCP headers, maybe payload)
T_CLAIM = "claim"    # feedback client -> tc-feedback: sessions it owns
T_STATS = "stats"    # counters from a stage

CHUNK = 1 << 17
# The largest item (record or header) a reader accepts, in bytes; larger -> StreamError.
# Writers stay far below it: a pkt record holds < 64 KiB, a tc-readpcap batch ~48 KiB (at
# most 112 KiB), a tc-session batch at most MAX_BATCH_PKTS datagrams. See tcpcopy-records(5).
MAX_RECORD = 4 << 20
MAX_BATCH_PKTS = 63  # 63 datagrams of 64 KiB and their columns stay below MAX_RECORD
MAX_DEPTH = 400  # nested arrays/maps (cbor2's own default limit)


def header(tool: str, **fields) -> dict:
    h = {"t": T_HEADER, "v": FORMAT_VERSION, "tool": tool, "tool_version": __version__}
    h.update(fields)
    return h


def encode_section(hdr: dict) -> bytes:
    return LABEL + cbor2.dumps(hdr)


def cbor_head(major: int, n: int) -> bytes:
    """The shortest CBOR head of major type ``major`` with argument ``n`` (0: unsigned int,
    2: byte string, 3: text, 4: array, 5: map), for stages that encode records by hand."""
    m = major << 5
    if n < 24:
        return bytes((m | n,))
    if n < 0x100:
        return bytes((m | 24, n))
    if n < 0x10000:
        return bytes((m | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((m | 26,)) + n.to_bytes(4, "big")
    return bytes((m | 27,)) + n.to_bytes(8, "big")


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


# The layout our tools write for pkt/fb records (cbor2.dumps of a dict in this key order):
# {"t": "pkt"|"fb", "ts": <uint64>, "data": <bytes>[, "len"/"sid": <uint>]...}.
_PKT_HEAD = b"\x61t\x63pkt\x62ts\x1b"  # after the map head byte
_FB_HEAD = b"\x61t\x62fb\x62ts\x1b"
_PKT_TS, _FB_TS = 1 + len(_PKT_HEAD), 1 + len(_FB_HEAD)  # offsets of the ts value
_DATA_KEY = b"\x64data"
_SID_KEY, _LEN_KEY = b"\x63sid", b"\x63len"
_U64 = struct.Struct(">Q").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U16 = struct.Struct(">H").unpack_from


def scan_record(buf, pos: int, end: int):
    """Locate the parts of the record at ``buf[pos:end]`` if it has the common pkt/fb
    layout in the shortest encoding (what cbor2.dumps writes), without copying anything;
    else None (decode it with cbor2: another layout, a non-shortest encoding, or not
    complete yet).

    Returns ``(kind, ts, ts_at, data_start, data_stop, stop, extra)``: kind "pkt" or "fb",
    the timestamp and its offset in buf (8 bytes, big endian), the data's slice, the end of
    the record, and extra the {"len"/"sid": int} keys that follow the data (None if none).
    """
    n = buf[pos] - 0xA0
    if not 3 <= n <= 5:
        return None
    try:
        if buf.startswith(_PKT_HEAD, pos + 1):
            t, p = "pkt", pos + _PKT_TS
        elif buf.startswith(_FB_HEAD, pos + 1):
            t, p = "fb", pos + _FB_TS
        else:
            return None
        ts_at = p
        ts = _U64(buf, p)[0]
        if ts <= 0xFFFFFFFF or not buf.startswith(_DATA_KEY, p + 8):
            return None
        p += 13
        h = buf[p]
        if 0x40 <= h < 0x58:
            p, q = p + 1, p + 1 + h - 0x40
        elif h == 0x58:
            q = buf[p + 1]
            if q < 24:
                return None
            p += 2
            q += p
        elif h == 0x59:
            q = _U16(buf, p + 1)[0]
            if q < 256:
                return None
            p += 3
            q += p
        else:
            return None
        if q > end:
            return None
        data_stop = stop = q
        extra = None
        while n > 3:
            n -= 1
            key = buf[stop:stop + 4]
            if key == _SID_KEY:
                key = "sid"
            elif key == _LEN_KEY:
                key = "len"
            else:
                return None
            if extra is None:
                extra = {}
            elif key in extra:
                return None
            h = buf[stop + 4]
            if h < 24:
                v = h
                stop += 5
            elif h == 0x19:
                v = _U16(buf, stop + 5)[0]
                if v < 256:
                    return None
                stop += 7
            elif h == 0x18:
                v = buf[stop + 5]
                if v < 24:
                    return None
                stop += 6
            elif h == 0x1A:
                v = _U32(buf, stop + 5)[0]
                if v < 65536:
                    return None
                stop += 9
            else:
                return None
            extra[key] = v
    except (IndexError, struct.error):
        return None
    if stop > end:
        return None
    return t, ts, ts_at, p, data_stop, stop, extra


def fast_record(buf, pos: int, end: int):
    """Decode the record at ``buf[pos:end]`` if scan_record() accepts it; else None.

    Returns ``(record, stop)`` where ``buf[pos:stop] == cbor2.dumps(record)``, so a stage can
    forward those bytes instead of re-encoding the record.
    """
    r = scan_record(buf, pos, end)
    if r is None:
        return None
    return _record(buf, r), r[5]


def _record(buf, r) -> dict:
    """The record that scan_record() located as r."""
    rec = {"t": r[0], "ts": r[1], "data": buf[r[3]:r[4]]}
    if r[6]:
        rec.update(r[6])
    return rec


_P64 = struct.Struct(">Q").pack


def replace_ts(raw: bytes, ts: int) -> bytes | None:
    """The bytes of record ``raw`` (as fast_record accepted it) with ``ts`` instead of its
    timestamp, equal to re-encoding the changed record; None if ``ts`` needs another
    length (then re-encode)."""
    if not 0xFFFFFFFF < ts <= 0xFFFFFFFFFFFFFFFF:
        return None
    if raw.startswith(_PKT_HEAD, 1):
        k = _PKT_TS
    elif raw.startswith(_FB_HEAD, 1):
        k = _FB_TS
    else:
        return None
    return b"".join((raw[:k], _P64(ts), raw[k + 8:]))


# -- batches: {"t": "pkts", "ts": h'..', "len": h'..', "data": h'..'[, "sid": h'..']} -----
# Several whole datagrams (no "len" of their own: a cut-off one goes alone, as a pkt record)
# in one item, as columns: ts holds n big-endian uint64 timestamps (ns), len n big-endian
# uint16 datagram lengths, data the datagrams back to back, and sid (tc-session's output)
# n big-endian uint32 session ids. A stage that only looks at timestamps (tc-pace) handles
# a batch with a few C calls; readers expand a batch into its packets, in order
# (StreamDecoder.parse), so a stage that does not know batches never sees one.
_PKTS_HEAD = b"\x61t\x64pkts\x62ts"  # after the map head byte (0xA4; 0xA5 with sids)
_PKTS_LEN_KEY = b"\x63len"
_BATCH_FMT = {}  # n -> (Struct(">nQ"), Struct(">nH"))


def batch_structs(n: int):
    """(timestamps, lengths) structs of a batch of n packets."""
    f = _BATCH_FMT.get(n)
    if f is None:
        if len(_BATCH_FMT) > 4096:
            _BATCH_FMT.clear()
        f = _BATCH_FMT[n] = (struct.Struct(f">{n}Q"), struct.Struct(f">{n}H"))
    return f


def encode_pkts(stamps, datas, sids=None) -> bytes:
    """CBOR of a pkts record of these packets (each shorter than 64 KiB, ts >= 0; session
    ids, if given, < 2**32), the same bytes as cbor2.dumps({"t": "pkts", "ts": ...,
    "len": ..., "data": ...[, "sid": ...]})."""
    n = len(stamps)
    ts_s, len_s = batch_structs(n)
    blob = b"".join(datas)
    parts = [b"\xa4" if sids is None else b"\xa5", _PKTS_HEAD, cbor_head(2, 8 * n),
             ts_s.pack(*stamps), _PKTS_LEN_KEY, cbor_head(2, 2 * n),
             len_s.pack(*map(len, datas)), _DATA_KEY, cbor_head(2, len(blob)), blob]
    if sids is not None:
        parts += (_SID_KEY, cbor_head(2, 4 * n), struct.pack(f">{n}I", *sids))
    return b"".join(parts)


class PendingBatch:
    """The packets of a pkts record being made, as columns (hot loops append to the lists
    directly); ``write_to(writer)`` appends the record to the writer's buffer (counting
    and flushing are the caller's) and starts a new one. With ``sids`` the record gets a
    sid column (tc-session)."""

    __slots__ = ("stamps", "datas", "sids")

    def __init__(self, sids: bool = False):
        self.stamps: list = []
        self.datas: list = []
        self.sids: list | None = [] if sids else None

    def __len__(self) -> int:
        return len(self.stamps)

    def write_to(self, writer) -> None:
        if self.stamps:
            writer.buf += encode_pkts(self.stamps, self.datas, self.sids)
            self.stamps.clear()
            self.datas.clear()
            if self.sids is not None:
                self.sids.clear()


def _bytes_head(buf, p):
    """(length, start) of the CBOR byte string whose head is at buf[p] (shortest form)."""
    h = buf[p]
    if 0x40 <= h < 0x58:
        return h - 0x40, p + 1
    if h == 0x58 and buf[p + 1] >= 24:
        return buf[p + 1], p + 2
    if h == 0x59 and _U16(buf, p + 1)[0] >= 256:
        return _U16(buf, p + 1)[0], p + 3
    if h == 0x5A and _U32(buf, p + 1)[0] >= 65536:
        return _U32(buf, p + 1)[0], p + 5
    return None, p


def scan_batch(buf, pos: int, end: int):
    """Locate a pkts record at ``buf[pos:end]`` in the layout encode_pkts() writes:
    ``(n, ts_at, len_at, data_at, data_stop, sid_at, stop)``, the columns' offsets (sid_at
    None without session ids) and the record's end; None if it is not in that layout or
    not complete (decode it with cbor2, batch_packets() checks it)."""
    try:
        head = buf[pos]
        if not 0xA4 <= head <= 0xA5 or not buf.startswith(_PKTS_HEAD, pos + 1):
            return None
        lt, ts_at = _bytes_head(buf, pos + 1 + len(_PKTS_HEAD))
        if not lt or lt & 7:
            return None
        n = lt >> 3
        len_at, len_stop = _column(buf, ts_at + lt, _PKTS_LEN_KEY, 2 * n)
        data_at, data_stop = _column(buf, len_stop, _DATA_KEY, None)
        sid_at, stop = _column(buf, data_stop, _SID_KEY, 4 * n) if head == 0xA5 else \
            (None, data_stop)
    except (IndexError, struct.error, _NotThere):
        return None
    if stop > end:
        return None
    return n, ts_at, len_at, data_at, data_stop, sid_at, stop


class _NotThere(Exception):
    """_column() did not find what it looked for."""


def _column(buf, p: int, key: bytes, size: int | None):
    """(start, end) of the byte string after the text ``key`` at buf[p], if it holds
    ``size`` bytes (None: any number); else _NotThere."""
    if not buf.startswith(key, p):
        raise _NotThere
    n, at = _bytes_head(buf, p + len(key))
    if n is None or size is not None and n != size:
        raise _NotThere
    return at, at + n


def batch_stamps(buf, ts_at: int, n: int) -> tuple:
    """The n timestamps of a batch that scan_batch() located."""
    return batch_structs(n)[0].unpack_from(buf, ts_at)


def _split(buf, start: int, sizes, stop: int):
    """The slices of buf[start:stop] of these sizes, back to back; None unless they fill
    it exactly (a malformed batch)."""
    offs = list(accumulate(sizes, initial=start))
    if offs[-1] != stop:
        return None
    return [buf[a:q] for a, q in zip(offs, offs[1:])]


def _batch_columns(buf, b):
    """(stamps, datas, sids or None) of the batch scan_batch() located as b; None if its
    lengths do not add up to its data."""
    n, ts_at, len_at, data_at, data_stop, sid_at, _stop = b
    ts_s, len_s = batch_structs(n)
    datas = _split(buf, data_at, len_s.unpack_from(buf, len_at), data_stop)
    if datas is None:
        return None
    sids = None if sid_at is None else struct.unpack_from(f">{n}I", buf, sid_at)
    return ts_s.unpack_from(buf, ts_at), datas, sids


def batch_records(buf, pos: int, end: int) -> list:
    """The pkt records of the batch at buf[pos:end] (in the layout scan_batch() accepts),
    with their "sid" if the batch has session ids."""
    cols = _batch_columns(buf, scan_batch(buf, pos, end))
    if cols is None:
        raise StreamError("malformed pkts record (its lengths do not add up to its data)")
    out: list = []
    StreamDecoder._expand(*cols, AS_RECORDS, out)
    return out


def batch_packets(rec: dict, where: str):
    """(stamps, datas, sids or None) of a decoded pkts record; StreamError if it is
    malformed."""
    stamps, lens, blob, sids = rec.get("ts"), rec.get("len"), rec.get("data"), rec.get("sid")
    if (isinstance(stamps, bytes) and isinstance(lens, bytes) and isinstance(blob, bytes)
            and stamps and len(stamps) % 8 == 0 and len(lens) == len(stamps) // 4
            and (sids is None or isinstance(sids, bytes) and len(sids) == len(lens) * 2)):
        n = len(stamps) // 8
        ts_s, len_s = batch_structs(n)
        datas = _split(blob, 0, len_s.unpack(lens), len(blob))
        if datas is not None:
            return (ts_s.unpack(stamps), datas,
                    None if sids is None else struct.unpack(f">{n}I", sids))
    raise StreamError(f"{where}: malformed pkts record (ts: 8-byte timestamps, len: 2-byte "
                      f"lengths, as many, data: that many bytes; sid: 4-byte session ids, "
                      f"as many)")



# -- the skeleton scan of an incomplete item --------------------------------------------
# An item that is not all there yet is scanned once, without building anything: the scan
# stops where the input stops and resumes there when more arrives, so an item costs the
# same whatever the read sizes (no decoding it again from its start on every read), and a
# declared size beyond MAX_RECORD is refused before its bytes arrive. cbor2 decodes the
# item once, when the scan says it is complete.

# data items without parts: integers, floats, simple values, empty containers, strings of
# up to 23 bytes (one alternative per length: each item is matched whole). Compiled when
# first needed (an incomplete item), not at import.
_RUN = _RUN1 = _ONE_ALL = _ONE_EACH = None


def _compile() -> None:
    global _RUN, _RUN1, _ONE_ALL, _ONE_EACH
    simple = (rb"[\x00-\x17\x20-\x37\x40\x60\x80\xa0\xe0-\xf7]|[\x18\x38\xf8].|[\x19\x39\xf9].."
              rb"|[\x1a\x3a\xfa].{4}|[\x1b\x3b\xfb].{8}|"
              + b"|".join(b"[%s%s].{%d}" % (re.escape(bytes([0x40 + n])),
                                            re.escape(bytes([0x60 + n])), n)
                          for n in range(1, 24)))
    one = re.compile(simple, re.DOTALL)
    _ONE_ALL, _ONE_EACH = one.findall, one.finditer  # each of them
    _RUN1 = re.compile(rb"[\x00-\x17\x20-\x37\x40\x60\x80\xa0\xe0-\xf7]*").match  # one-byte
    _RUN = re.compile(b"(?:" + simple + b")*", re.DOTALL).match  # a run of them


class _Malformed(Exception):
    """The scan met bytes that are not well-formed CBOR."""


def _done(stack: list) -> None:
    """One item of the innermost open container is complete (and maybe containers with it)."""
    while stack:
        top = stack[-1]
        if top < 0:  # indefinite length: items until a break
            return
        if top > 1:
            stack[-1] = top - 1
            return
        stack.pop()  # its last item: the container is complete, an item of its parent


def scan_item(buf, off: int, end: int, stack: list) -> int:
    """Go on scanning an item's skeleton at buf[off:end]. ``stack`` holds what the open
    containers still need ([1] at the item's start: the item itself): n > 0 items, -1
    items until a break, -2/-3 byte/text string chunks until a break. Updated in place;
    returns the offset where the scan stopped: the item is complete when ``stack`` is
    empty and that offset is <= end (it may lie beyond ``end``: a string not all read).
    Raises _Malformed for bytes that are not well-formed CBOR."""
    if _RUN is None:
        _compile()
    tags = 0  # tags in a row just before off
    while stack:
        if off >= end:
            return off
        top = stack[-1]
        if top >= -1:  # a run of items without parts, at C speed
            stop = _RUN(buf, off, end if top < 0 else min(end, off + 24 * top)).end()
            if stop > off:
                if top < 0:  # (items until a break: their number does not matter)
                    off = stop
                    continue
                n = stop - off  # (as many as bytes: all one-byte items, the usual run)
                if n > top or _RUN1(buf, off, stop).end() != stop:
                    n = len(_ONE_ALL(buf, off, stop))
                    if n > top:  # (the run goes on in the parent) the end of item #top
                        stop = next(islice(_ONE_EACH(buf, off, stop), top - 1, None)).end()
                        n = top
                off = stop
                if top > n:
                    stack[-1] = top - n
                else:
                    stack.pop()
                    _done(stack)
                continue
        ib = buf[off]
        major, ai = ib >> 5, ib & 31
        if ib == 0xFF:
            if top >= 0:
                raise _Malformed("break code outside an indefinite-length item")
            stack.pop()
            off += 1
            _done(stack)
            continue
        if top < -1 and (major != -top or ai == 31):
            raise _Malformed("bad chunk in an indefinite-length string")
        if ai < 24:
            val = ai
            off += 1
        elif ai < 28:
            n = 1 << (ai - 24)
            if off + 1 + n > end:
                return off  # the head is not all here: scan it again with more
            val = int.from_bytes(buf[off + 1:off + 1 + n], "big")
            off += 1 + n
        elif ai == 31 and 2 <= major <= 5:
            off += 1
            stack.append(-major if major < 4 else -1)
            if len(stack) > MAX_DEPTH + 1:  # (the item itself is stack[0])
                raise _Malformed(f"nested more than {MAX_DEPTH} deep")
            continue
        else:
            raise _Malformed(f"invalid head byte 0x{ib:02x}")
        if major == 2 or major == 3:
            off += val  # (maybe beyond end: the scan goes on from there)
            _done(stack)
        elif major == 4 or major == 5:
            if major == 5:
                val *= 2
            if val:
                stack.append(val)
                if len(stack) > MAX_DEPTH + 1:
                    raise _Malformed(f"nested more than {MAX_DEPTH} deep")
            else:
                _done(stack)
        elif major == 6:  # a tag: its content is the next item
            tags += 1
            if tags > MAX_DEPTH:  # (cbor2 counts them as nesting too)
                raise _Malformed(f"more than {MAX_DEPTH} tags in a row")
            continue
        else:
            _done(stack)
        tags = 0
    return off


def _min_size(off: int, stack: list) -> int:
    """A lower bound on the end of the item being scanned (each item takes a byte)."""
    need = off + (stack[-1] if stack and stack[-1] > 0 else 1 if stack else 0)
    for c in stack[:-1]:
        if c > 1:
            need += c - 1
    return need


def _no_shared(decoder):
    raise cbor2.CBORDecodeError("shared references (tags 28/29) are not allowed in records")


# records never use them; cyclic or exponential values would break every later stage
_SEMANTIC = {28: _no_shared, 29: _no_shared}

# a section header, in the raw slot of RecordReader.iter_raw()
HEADER = "header"

# what StreamDecoder.parse() returns for each item (see there)
AS_RECORDS, AS_RAW, AS_PKT, AS_SPANS = range(4)


class StreamDecoder:
    """The parsing state shared by RecordReader (pull) and StreamParser (push).

    ``parse(buf)`` decodes the complete items at the start of ``buf``. Records in the common
    pkt/fb layout are decoded in Python (fast_record); everything else by cbor2.
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

    def parse(self, buf: bytes, mode: int = AS_RECORDS):
        """(items, bytes used, error or None). Items before an error are returned; what an
        item is depends on ``mode``:

        - AS_RECORDS: the records (headers only with ``headers=True``);
        - AS_RAW: (record, raw) pairs, raw being the record's bytes when they are what
          cbor2.dumps(record) gives, None when unknown, HEADER for a section header;
        - AS_PKT: (ts, data) tuples for whole packets (pkt records in the common layout
          without "len"), records otherwise;
        - AS_SPANS: scan_record() tuples for records in the common layout (nothing copied:
          a stage that forwards them patches and writes slices of ``buf``), else
          ``(None, record, None, None, None, stop, None)`` and, for section headers,
          ``(HEADER, header, None, None, None, stop, None)``; a batch in the common
          layout is ``(T_PKTS, first ts, ts_at, n, None, stop, None)`` (see scan_batch).

        A batch (pkts record) is expanded into its packets, as pkt records or (ts, data)
        tuples, in every mode but AS_SPANS with the common layout.
        """
        if type(buf) is not bytes:
            buf = bytes(buf)  # (slices of it become the records' bytes values)
        out: list = []
        append = out.append
        if self.header is None and not self._expect_header:
            # The very first bytes must be the label: reject garbage early and clearly.
            n = min(len(buf), len(LABEL))
            if buf[:n] != LABEL[:n]:
                return out, 0, StreamError(
                    f"{self.name}: not a tcpcopy record stream (no TCPR label at byte 0)")
        pos, end, base, records = 0, len(buf), self.consumed, self.records
        bio = dec = None
        err = None
        scan = scan_record
        while pos < end:
            if not self._expect_header and 0xA3 <= buf[pos] <= 0xA5:
                r = scan(buf, pos, end)
                if r is None and buf.startswith(_PKTS_HEAD, pos + 1):
                    b = scan_batch(buf, pos, end)
                    if b is not None:
                        n, ts_at, stop = b[0], b[1], b[6]
                        if stop - pos > MAX_RECORD:
                            err = self._too_large(base + pos, stop - pos)
                            break
                        records += 1
                        if mode == AS_SPANS:
                            if sum(batch_structs(n)[1].unpack_from(buf, b[2])) != b[4] - b[3]:
                                err = StreamError(f"{self.name}: malformed pkts record at "
                                                  f"byte {base + pos} (lengths do not add up)")
                                break
                            append((T_PKTS, _U64(buf, ts_at)[0], ts_at, n, None, stop, None))
                        else:
                            cols = _batch_columns(buf, b)
                            if cols is None:
                                err = StreamError(f"{self.name}: malformed pkts record at "
                                                  f"byte {base + pos} (lengths do not add up)")
                                break
                            self._expand(*cols, mode, out)
                        pos = stop
                        continue
                if r is not None:
                    records += 1
                    if mode == AS_SPANS:
                        append(r)
                    elif mode == AS_PKT and r[0] == "pkt" and not (r[6] and "len" in r[6]):
                        append((r[1], buf[r[3]:r[4]]))
                    elif mode == AS_RAW:
                        append((_record(buf, r), buf[pos:r[5]]))
                    else:
                        append(_record(buf, r))
                    pos = r[5]
                    continue
            if buf.startswith(LABEL, pos):
                pos += len(LABEL)
                self._expect_header = True
                continue
            if end - pos < len(LABEL) and LABEL.startswith(buf[pos:]):
                break  # maybe the start of a label: wait for more bytes
            pend = self._pend
            if pend is not None:
                if pos or pend[0] != base:  # (a caller took the item's bytes itself)
                    pend = self._pend = None
                else:  # the item we scanned before: scan only what is new
                    try:
                        if not self._advance(buf):
                            break
                    except StreamError as e:
                        err = e
                        break
            if dec is None:
                bio = io.BytesIO(buf)
                dec = cbor2.CBORDecoder(bio, semantic_decoders=_SEMANTIC)
            bio.seek(pos)
            try:
                item = dec.decode()
            except cbor2.CBORDecodeEOF:
                if pend is not None:  # the scan said complete: a disagreement is garbage
                    err = StreamError(f"{self.name}: not a valid record at byte {base + pos}")
                    break
                # not all here: scan what is (once); later reads go on from where it stops
                self._pend = [base + pos, 0, [1]]
                try:
                    self._advance(buf, pos)
                except StreamError as e:
                    err = e
                break
            except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError,
                    MemoryError) as e:
                err = StreamError(
                    f"{self.name}: not a valid record at byte {base + pos}: {e}")
                break
            self._pend = None
            newpos = bio.tell()
            if newpos - pos > MAX_RECORD:
                err = self._too_large(base + pos, newpos - pos)
                break
            if self._expect_header:
                try:
                    self.header = _check_header(item, base + newpos, self.any_version)
                except StreamError as e:
                    err = e
                    break
                pos = newpos
                self.sections += 1
                self._expect_header = False
                if mode == AS_SPANS:
                    append((HEADER, item, None, None, None, pos, None))
                elif self.headers:
                    append((item, HEADER) if mode == AS_RAW else item)
                continue
            if type(item) is not dict or "t" not in item:
                err = StreamError(
                    f"{self.name}: unexpected {type(item).__name__} item at byte "
                    f"{base + newpos} (records are maps with a 't' key)")
                break
            if self.header is None:
                err = StreamError(f"{self.name}: record before any header")
                break
            pos = newpos
            records += 1
            if item.get("t") == T_PKTS:
                try:
                    cols = batch_packets(item, f"{self.name}: byte {base + newpos}")
                except StreamError as e:
                    err = e
                    break
                self._expand(*cols, mode, out, pos)
                continue
            if mode == AS_SPANS:
                append((None, item, None, None, None, pos, None))
            else:
                append((item, None) if mode == AS_RAW else item)
        self.consumed = base + pos
        self.records = records
        return out, pos, err

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
            except _Malformed as e:
                self._pend = None
                raise StreamError(f"{self.name}: not a valid record at byte {at}: {e}") \
                    from None
            pend[1] = off
        if not stack and off <= end:
            return True
        size = _min_size(off, stack)
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
        if sids is None:
            recs = ({"t": T_PKT, "ts": ts, "data": data} for ts, data in zip(stamps, datas))
        else:
            recs = ({"t": T_PKT, "ts": ts, "data": data, "sid": sid}
                    for ts, data, sid in zip(stamps, datas, sids))
        if mode == AS_RAW:
            out.extend((rec, None) for rec in recs)
        elif mode == AS_SPANS:
            out.extend((None, rec, None, None, None, stop, None) for rec in recs)
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
