"""The record layout on the wire: every hand-written encoder and fast scanner of records.

Our tools write each record as ``cbor2.dumps`` writes its dict: keys in the documented
order, every head in its shortest form (tcpcopy-records(5)). The hot paths encode and read
that layout by hand, here and nowhere else; tests/test_wire.py checks every encoder
against cbor2 (the golden test). A scanner that meets anything else says so (None) and the
caller decodes with cbor2, so a record of another layout is read all the same.

- heads: cbor_head, encode_uint, encode_text;
- pkt, s2c and fb records: encode_pkt, encode_pkt_sid, encode_s2c, encode_fb, and the
  parts for an encoder inlined in a loop (PKT_START1...); scan_record, fast_record, replace_ts; the
  usual fb record of tc-intercept: fb_spans, fb_prefix;
- batches (pkts records): encode_pkts, PendingBatch, scan_batch and its readers;
- claim records: claim_head, claim_entry, scan_claim;
- any item: scan_item, the resumable skeleton scan of an item not all read yet.

No cbor2 at import (tc-session and tc-capture start without it); the rare general cases
import it when they need it.
"""

from __future__ import annotations

import re
import struct
from itertools import accumulate, islice

from tcpcopylib.errors import StreamError

# 55800(1413697618(h'424F52')): hexdumps as ....TCPRCBOR
LABEL = bytes.fromhex("d9d9f8da5443505243424f52")

# Record types (the "t" key).
T_HEADER = "header"
T_PKT = "pkt"        # an IP datagram: ts (int ns), data (IPv4/IPv6 bytes), [len, sid]
T_S2C = "s2c"        # the server->client half of a capture: keys as pkt (never replayed)
T_PKTS = "pkts"      # a batch of whole datagrams, as columns (see encode_pkts)
T_FB = "fb"          # feedback: a target's reply (IP+TCP headers, maybe payload)
T_CLAIM = "claim"    # feedback client -> tc-feedback: sessions it owns
T_STATS = "stats"    # counters from a stage

MAX_DEPTH = 400  # nested arrays/maps of a record (cbor2's own default limit)

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_P64 = struct.Struct(">Q").pack


# -- heads ---------------------------------------------------------------------------------

def cbor_head(major: int, n: int) -> bytes:
    """The shortest CBOR head of major type ``major`` with argument ``n`` (0: unsigned int,
    2: byte string, 3: text, 4: array, 5: map)."""
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


_UINTS = [cbor_head(0, i) for i in range(256)]


def encode_uint(n: int) -> bytes:
    """cbor2.dumps(n) for an int 0 <= n < 2**64."""
    return _UINTS[n] if n < 256 else cbor_head(0, n)


def encode_text(text: str) -> bytes:
    """cbor2.dumps(text)."""
    b = text.encode()
    return cbor_head(3, len(b)) + b


# -- pkt and fb records ----------------------------------------------------------------------
# {"t": "pkt"|"fb", "ts": <uint>, "data": <bytes>[, "len": <uint>][, "sid": <uint>]}, in this
# key order. A timestamp is nanoseconds since 1970: in practice always an 8-byte head.

_T_PKT = b"\x61t\x63pkt"  # "t": "pkt" (after the map head)
_T_FB = b"\x61t\x62fb"
_T_S2C = b"\x61t\x63s2c"
_T_BYTES = {T_PKT: _T_PKT, T_FB: _T_FB, T_S2C: _T_S2C}
_TS_KEY = b"\x62ts"
_DATA_KEY = b"\x64data"
_LEN_KEY = b"\x63len"
_SID_KEY = b"\x63sid"
_TS8 = b"\x1b"  # the head of an 8-byte unsigned int
_MAP = (b"\xa0", b"\xa1", b"\xa2", b"\xa3", b"\xa4", b"\xa5")  # map heads by size

_PKT_HEAD = _T_PKT + _TS_KEY + _TS8  # after the map head: then the 8-byte ts
_FB_HEAD = _T_FB + _TS_KEY + _TS8
_PKT_TS, _FB_TS = 1 + len(_PKT_HEAD), 1 + len(_FB_HEAD)  # offsets of the ts value

# For an encoder inlined in a capture loop (no call per packet), the records above in parts
# that one struct packs (8-byte ts; data of 24..255 bytes, 256..65535 with the 2s):
#   a pkt record:   PKT_START1.pack(PKT_MAP3, ts, DATA1, n) + data
#                   PKT_START2.pack(PKT_MAP3, ts, DATA2, n) + data
#   an s2c record:  the same with S2C_MAP3 (as long as PKT_MAP3: the same structs pack it)
#   an fb record:   FB_START.pack(FB_MAP4, ts, DATA1, n) + data + LEN1.pack(LEN1_KEY, length)
#                   (a "len" of 24..255; 256..65535: LEN2, LEN2_KEY)
DATA1, DATA2 = _DATA_KEY + b"\x58", _DATA_KEY + b"\x59"  # "data": 1-/2-byte length
PKT_MAP3 = _MAP[3] + _PKT_HEAD  # {"t", "ts", "data"}, up to the ts value
PKT_MAP4 = _MAP[4] + _PKT_HEAD  # the same with one more key after the data
S2C_MAP3 = _MAP[3] + _T_S2C + _TS_KEY + _TS8  # {"t": "s2c", "ts", "data"}, up to the ts
assert len(S2C_MAP3) == len(PKT_MAP3)
PKT_START1 = struct.Struct(f">{len(PKT_MAP3)}sQ{len(DATA1)}sB")
PKT_START2 = struct.Struct(f">{len(PKT_MAP3)}sQ{len(DATA2)}sH")
FB_MAP4 = _MAP[4] + _FB_HEAD  # {"t", "ts", "data", "len"}, up to the ts value
FB_START = struct.Struct(f">{len(FB_MAP4)}sQ{len(DATA1)}sB")
LEN1_KEY, LEN2_KEY = _LEN_KEY + b"\x18", _LEN_KEY + b"\x19"  # "len": 1-/2-byte value
LEN1 = struct.Struct(f">{len(LEN1_KEY)}sB")
LEN2 = struct.Struct(f">{len(LEN2_KEY)}sH")

_SID_TAILS = [_SID_KEY + _UINTS[i] for i in range(256)]  # '"sid": i' for the first ids
_SID16 = struct.Struct(">4sBH").pack
_SID32 = struct.Struct(">4sBI").pack


def _general_pkt(t: str, ts, data, extra: tuple) -> bytes:
    """A pkt/fb record by hand for any uint64 ts, else cbor2's encoding (a bignum, a
    negative ts: never written by our tools, but cbor2 knows how)."""
    if type(ts) is int and 0 <= ts < 1 << 64 and all(
            type(v) is int and 0 <= v < 1 << 64 for _, v in extra):
        parts = [_MAP[3 + len(extra)], _T_BYTES[t], _TS_KEY,
                 cbor_head(0, ts), _DATA_KEY, cbor_head(2, len(data)), data]
        for key, v in extra:
            parts += (_LEN_KEY if key == "len" else _SID_KEY, cbor_head(0, v))
        return b"".join(parts)
    import cbor2

    return cbor2.dumps({"t": t, "ts": ts, "data": bytes(data), **dict(extra)})


def _capture_encoder(map3: bytes, kind: str):
    """The encoder of a captured packet record of type ``kind`` ({"t": kind, "ts", "data"
    [, "len"]}) whose first bytes up to "ts" are ``map3``: pkt (the client's half) and s2c
    (the server's, tc-capture --server-half) differ only there."""

    def encode(ts: int, data, orig_len: int | None = 0) -> bytes:
        n = len(data)
        if not orig_len and 0xFFFFFFFF < ts <= 0xFFFFFFFFFFFFFFFF and 24 <= n < 0x10000:
            if n < 256:
                return PKT_START1.pack(map3, ts, DATA1, n) + data
            return PKT_START2.pack(map3, ts, DATA2, n) + data
        return _general_pkt(kind, ts, data, (("len", orig_len),) if orig_len else ())

    return encode


#: encode_pkt(ts, data, orig_len=0): cbor2.dumps({"t": "pkt", "ts": ts, "data": data[,
#: "len": orig_len]}), byte for byte; "len" (the datagram's length before the capture cut
#: it) only if not 0 or None.
encode_pkt = _capture_encoder(PKT_MAP3, T_PKT)
#: encode_s2c: the same for a server->client packet of a capture (type "s2c").
encode_s2c = _capture_encoder(S2C_MAP3, T_S2C)


def encode_pkt_sid(ts: int, data, sid: int) -> bytes:
    """cbor2.dumps({"t": "pkt", "ts": ts, "data": data, "sid": sid}), byte for byte
    (tc-session's output)."""
    n = len(data)
    if 0xFFFFFFFF < ts <= 0xFFFFFFFFFFFFFFFF and 24 <= n < 0x10000 and 0 <= sid < 0x100000000:
        tail = (_SID_TAILS[sid] if sid < 0x100 else _SID16(_SID_KEY, 0x19, sid)
                if sid < 0x10000 else _SID32(_SID_KEY, 0x1A, sid))
        if n < 0x100:
            return b"".join((PKT_START1.pack(PKT_MAP4, ts, DATA1, n), data, tail))
        return b"".join((PKT_START2.pack(PKT_MAP4, ts, DATA2, n), data, tail))
    return _general_pkt(T_PKT, ts, data, (("sid", sid),))


# The usual fb record, what tc-intercept writes for a reply's headers: an 8-byte ts, 24..255
# bytes of data, a "len" of 24..65535 (the datagram's length).
FB_DATA_AT = FB_START.size  # where the data of a usual fb record starts
_FB_SIZE_AT = FB_DATA_AT - 1  # its 1-byte length
_FB_TS_AT = len(FB_MAP4)


def encode_fb(ts: int, data, length: int) -> bytes:
    """cbor2.dumps({"t": "fb", "ts": ts, "data": data, "len": length}), byte for byte."""
    n = len(data)
    if 0xFFFFFFFF < ts <= 0xFFFFFFFFFFFFFFFF and 24 <= n < 256 and 256 <= length < 0x10000:
        return FB_START.pack(FB_MAP4, ts, DATA1, n) + data + LEN2.pack(LEN2_KEY, length)
    return _general_pkt(T_FB, ts, data, (("len", length),))


def fb_spans(buf, pos: int) -> list:
    """The usual fb records one after the other from buf[pos], complete: a list of
    ``(data_start, data_stop, length, end)`` (the reply's datagram is buf[data_start:
    data_stop], its "len" is length; the next record starts at end). Empty if the record at
    pos is not one (another layout, not all there: decode it)."""
    out = []
    append = out.append
    n, startswith = len(buf), buf.startswith
    while (n > pos + _FB_SIZE_AT and startswith(DATA1, pos + _FB_SIZE_AT - len(DATA1))
           and startswith(FB_MAP4, pos)):
        d0 = pos + FB_DATA_AT
        d1 = d0 + buf[pos + _FB_SIZE_AT]
        if n <= d1 + len(_LEN_KEY) or not startswith(_LEN_KEY, d1):
            break
        lb = buf[d1 + 4]
        if lb == 0x19:
            pos = d1 + 7
            if pos > n:
                break
            append((d0, d1, buf[d1 + 5] << 8 | buf[d1 + 6], pos))
        elif lb == 0x18:
            pos = d1 + 6
            if pos > n:
                break
            append((d0, d1, buf[d1 + 5], pos))
        else:
            break
    return out


def fb_ts(buf, start: int) -> int:
    """The timestamp of the usual fb record at buf[start] (one that fb_spans located)."""
    return _U64(buf, start + _FB_TS_AT)[0]


def fb_prefix(rest) -> bool:
    """True if ``rest`` is an incomplete start of a usual fb record (see fb_spans): worth
    waiting for the rest rather than decoding it."""
    k = len(rest)
    if k <= _FB_SIZE_AT:
        return (FB_MAP4.startswith(rest[:_FB_TS_AT])
                and (k <= _FB_TS_AT + 8 or DATA1.startswith(rest[_FB_TS_AT + 8:])))
    if not (rest.startswith(FB_MAP4) and rest.startswith(DATA1, _FB_TS_AT + 8)):
        return False
    d1 = FB_DATA_AT + rest[_FB_SIZE_AT]
    if k <= d1 + len(_LEN_KEY):
        return _LEN_KEY.startswith(rest[d1:])
    lb = rest[d1 + 4]
    return rest.startswith(_LEN_KEY, d1) and (lb == 0x19 and k < d1 + 7
                                              or lb == 0x18 and k < d1 + 6)


# The usual pkt record, what tc-capture and tc-readpcap write for a whole datagram: an
# 8-byte ts, 24..65535 bytes of data, no other key (PKT_START1/PKT_START2).
PKT_TS_AT = len(PKT_MAP3)  # where the ts of such a record starts
_PKT_DATA_KEY_AT = PKT_TS_AT + 8  # where its "data" key starts (DATA1 or DATA2)


def pkt_spans(buf, pos: int) -> list:
    """The usual pkt records one after the other from buf[pos], complete: a list of
    ``(data_start, data_stop)`` (the next record starts at data_stop; the ts of one is
    the 8 bytes at its start + PKT_TS_AT). Empty if the record at pos is not one."""
    out = []
    append = out.append
    n, startswith = len(buf), buf.startswith
    head, data1, data2 = PKT_MAP3, DATA1, DATA2  # (locals: this loop runs per record)
    key_at, size_at = _PKT_DATA_KEY_AT, _PKT_DATA_KEY_AT + len(DATA1)
    while startswith(head, pos) and n > pos + size_at + 1:
        if startswith(data1, pos + key_at):
            size = buf[pos + size_at]
            if size < 24:
                break
            d0 = pos + size_at + 1
        elif startswith(data2, pos + key_at):
            size = buf[pos + size_at] << 8 | buf[pos + size_at + 1]
            if size < 256:
                break
            d0 = pos + size_at + 2
        else:
            break
        d1 = d0 + size
        if d1 > n:
            break
        append((d0, d1))
        pos = d1
    return out


# scan_record's result: (kind, ts, ts_at, stop, data_start, data_stop, extra)

def scan_record(buf, pos: int, end: int):
    """Locate the parts of the pkt or fb record at ``buf[pos:end]`` if it is in our layout
    (shortest heads, an 8-byte ts, "len"/"sid" after the data), without copying anything;
    else None (decode it with cbor2: another layout, or not complete yet).

    Returns ``(kind, ts, ts_at, stop, data_start, data_stop, extra)``: kind T_PKT or T_FB,
    the timestamp and the offset of its 8 bytes (big endian), the end of the record, the
    data's slice, and extra the {"len"/"sid": int} keys after the data (None if none).
    """
    n = buf[pos] - 0xA0
    if not 3 <= n <= 5:
        return None
    try:
        if buf.startswith(_PKT_HEAD, pos + 1):
            t, p = T_PKT, pos + _PKT_TS
        elif buf.startswith(_FB_HEAD, pos + 1):
            t, p = T_FB, pos + _FB_TS
        else:
            return None
        ts_at = p
        ts = _U64(buf, p)[0]
        if ts <= 0xFFFFFFFF or not buf.startswith(_DATA_KEY, p + 8):
            return None
        p += 8 + len(_DATA_KEY)
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
        stop = q
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
            h = buf[stop + 4]  # its value: an unsigned int of at most 4 bytes
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
    return t, ts, ts_at, stop, p, q, extra


def record_of(buf, r) -> dict:
    """The record that scan_record() located as r."""
    rec = {"t": r[0], "ts": r[1], "data": buf[r[4]:r[5]]}
    if r[6]:
        rec.update(r[6])
    return rec


def fast_record(buf, pos: int, end: int):
    """Decode the record at ``buf[pos:end]`` if scan_record() accepts it; else None.

    Returns ``(record, stop)`` where ``buf[pos:stop] == cbor2.dumps(record)``, so a stage can
    forward those bytes instead of re-encoding the record.
    """
    r = scan_record(buf, pos, end)
    if r is None:
        return None
    return record_of(buf, r), r[3]


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
_PKTS_HEAD = b"\x61t\x64pkts" + _TS_KEY  # after the map head (4 keys; 5 with sids)
_BATCH_FMT = {}  # n -> (Struct(">nQ"), Struct(">nH"))


def is_batch(buf, pos: int) -> bool:
    """Does the item at buf[pos] start as a batch in our layout (see scan_batch)?"""
    return buf.startswith(_PKTS_HEAD, pos + 1)


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
    parts = [_MAP[4] if sids is None else _MAP[5], _PKTS_HEAD, cbor_head(2, 8 * n),
             ts_s.pack(*stamps), _LEN_KEY, cbor_head(2, 2 * n),
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
        len_at, len_stop = _column(buf, ts_at + lt, _LEN_KEY, 2 * n)
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


def batch_adds_up(buf, b) -> bool:
    """Do the lengths of the batch scan_batch() located as b add up to its data?"""
    n, _ts_at, len_at, data_at, data_stop, _sid_at, _stop = b
    return sum(batch_structs(n)[1].unpack_from(buf, len_at)) == data_stop - data_at


def _split(buf, start: int, sizes, stop: int):
    """The slices of buf[start:stop] of these sizes, back to back; None unless they fill
    it exactly (a malformed batch)."""
    offs = list(accumulate(sizes, initial=start))
    if offs[-1] != stop:
        return None
    return [buf[a:q] for a, q in zip(offs, offs[1:])]


def batch_columns(buf, b):
    """(stamps, datas, sids or None) of the batch scan_batch() located as b; None if its
    lengths do not add up to its data."""
    n, ts_at, len_at, data_at, data_stop, sid_at, _stop = b
    ts_s, len_s = batch_structs(n)
    datas = _split(buf, data_at, len_s.unpack_from(buf, len_at), data_stop)
    if datas is None:
        return None
    sids = None if sid_at is None else struct.unpack_from(f">{n}I", buf, sid_at)
    return ts_s.unpack_from(buf, ts_at), datas, sids


def pkt_records(stamps, datas, sids) -> list:
    """A batch's packets as pkt records (with "sid" if sids)."""
    if sids is None:
        return [{"t": T_PKT, "ts": ts, "data": data} for ts, data in zip(stamps, datas)]
    return [{"t": T_PKT, "ts": ts, "data": data, "sid": sid}
            for ts, data, sid in zip(stamps, datas, sids)]


def batch_records(buf, pos: int, end: int) -> list:
    """The pkt records of the batch at buf[pos:end] (in the layout scan_batch() accepts),
    with their "sid" if the batch has session ids."""
    cols = batch_columns(buf, scan_batch(buf, pos, end))
    if cols is None:
        raise StreamError("malformed pkts record (its lengths do not add up to its data)")
    return pkt_records(*cols)


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


# -- claim records: {"t": "claim", "add"|"del": [[client ip, port, target ip, port], ...]} --
# (the addresses as text), as FeedbackClient writes them.
_CLAIM_HEAD = {k: _MAP[2] + b"\x61t\x65claim" + encode_text(k) for k in ("add", "del")}
_CLAIM_KIND = {head: k == "add" for k, head in _CLAIM_HEAD.items()}
_CLAIM_HEAD_LEN = len(_CLAIM_HEAD["add"])
_ARRAY4 = b"\x84"


def claim_head(kind: str, n: int) -> bytes:
    """The start of a claim record of kind "add" or "del" with n entries (claim_entry()
    each) to follow."""
    return _CLAIM_HEAD[kind] + cbor_head(4, n)


def claim_entry(client_ip: bytes, client_port: int, target: bytes) -> bytes:
    """One entry [client ip, client port, target ip, target port] of a claim record:
    ``client_ip`` encode_text() of the address, ``target`` encode_text() of the target's
    address followed by encode_uint() of its port (both cached by the caller)."""
    return b"".join((_ARRAY4, client_ip, encode_uint(client_port), target))


def scan_claim(buf, pos: int, key):
    """(add?, [key(client ip, client port, target ip, target port) per entry], end) of the
    claim record at buf[pos] in FeedbackClient's layout (up to 65535 entries, the
    addresses' texts as bytes; key raises ValueError for one that is no address); None
    for anything else or an incomplete record (decode it in full)."""
    add = _CLAIM_KIND.get(buf[pos:pos + _CLAIM_HEAD_LEN])
    if add is None:
        return None
    try:
        p = pos + _CLAIM_HEAD_LEN
        ib = buf[p]  # the array of entries
        if 0x80 <= ib < 0x98:
            n, p = ib - 0x80, p + 1
        elif ib == 0x98:
            n, p = buf[p + 1], p + 2
        elif ib == 0x99:
            n, p = (buf[p + 1] << 8) | buf[p + 2], p + 3
        else:
            return None
        keys = []
        for _ in range(n):
            if buf[p] != 0x84:
                return None
            cip, p = _short_text(buf, p + 1)
            cport, p = _port(buf, p)
            tip, p = _short_text(buf, p)
            tport, p = _port(buf, p)
            keys.append(key(cip, cport, tip, tport))
    except (IndexError, ValueError):
        return None
    if p > len(buf):
        return None
    return add, keys, p


def _short_text(buf, p: int):
    """(the bytes, next pos) of the text of less than 256 bytes at buf[p]; ValueError if
    there is none."""
    ib = buf[p]
    if 0x60 <= ib < 0x78:
        n, p = ib - 0x60, p + 1
    elif ib == 0x78:
        n, p = buf[p + 1], p + 2
    else:
        raise ValueError("not a short text")
    return buf[p:p + n], p + n


def _port(buf, p: int):
    """(value, next pos) of the unsigned int < 65536 at buf[p]; ValueError if none."""
    ib = buf[p]
    if ib < 24:
        return ib, p + 1
    if ib == 24:
        return buf[p + 1], p + 2
    if ib == 25:
        return (buf[p + 1] << 8) | buf[p + 2], p + 3
    raise ValueError("not a port")


# -- the skeleton scan of an item not all read yet ------------------------------------------
# An item that is not all there yet is scanned once, without building anything: the scan
# stops where the input stops and resumes there when more arrives, so an item costs the
# same whatever the read sizes (no decoding it again from its start on every read), and a
# declared size beyond a limit is refused before its bytes arrive. cbor2 decodes the item
# once, when the scan says it is complete.

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


class Malformed(ValueError):
    """The scan met bytes that are not well-formed CBOR (or not allowed: see scan_item)."""


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


def scan_item(buf, off: int, end: int, stack: list, max_depth: int = MAX_DEPTH,
              plain: bool = False) -> int:
    """Go on scanning an item's skeleton at buf[off:end]. ``stack`` holds what the open
    containers still need ([1] at the item's start: the item itself): n > 0 items, -1
    items until a break, -2/-3 byte/text string chunks until a break. Updated in place;
    returns the offset where the scan stopped: the item is complete when ``stack`` is
    empty and that offset is <= the end of the data (it may lie beyond: a string not all
    read). A head cut at ``end`` is left for the next call (so ``end`` may also be a
    budget: where this call stops scanning).

    Raises Malformed for bytes that are not well-formed CBOR, nesting deeper than
    ``max_depth``, and with ``plain`` (a feedback client's records) for any tag or
    indefinite length."""
    if _RUN is None:
        _compile()
    tags = 0  # tags in a row just before off
    while stack:
        if off >= end:
            return off
        top = stack[-1]
        if top >= -1:  # a run of items without parts, at C speed
            stop = _skip_run(buf, off, end, stack, top)
            if stop > off:
                off = stop
                continue
        ib = buf[off]
        major, ai = ib >> 5, ib & 31
        if ib == 0xFF:
            if top >= 0:
                raise Malformed("break code outside an indefinite-length item")
            stack.pop()
            off += 1
            _done(stack)
            continue
        if top < -1 and (major != -top or ai == 31):
            raise Malformed("bad chunk in an indefinite-length string")
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
            if plain:
                raise Malformed(f"an indefinite-length item (0x{ib:02x})")
            off += 1
            stack.append(-major if major < 4 else -1)
            if len(stack) > max_depth + 1:  # (the item itself is stack[0])
                raise Malformed(f"nested more than {max_depth} deep")
            continue
        else:
            raise Malformed(f"invalid head byte 0x{ib:02x}")
        if major == 2 or major == 3:
            off += val  # (maybe beyond end: the scan goes on from there)
            _done(stack)
        elif major == 4 or major == 5:
            if major == 5:
                val *= 2
            if val:
                stack.append(val)
                if len(stack) > max_depth + 1:
                    raise Malformed(f"nested more than {max_depth} deep")
            else:
                _done(stack)
        elif major == 6:  # a tag: its content is the next item
            if plain:
                raise Malformed("a tagged item")
            tags += 1
            if tags > max_depth:  # (cbor2 counts them as nesting too)
                raise Malformed(f"more than {max_depth} tags in a row")
            continue
        else:
            _done(stack)
        tags = 0
    return off


def _skip_run(buf, off: int, end: int, stack: list, top: int) -> int:
    """Pass the items without parts at buf[off:end] that the innermost open container
    (``top`` = stack[-1], >= -1) still needs, updating ``stack``; where they end (off if
    there is none)."""
    stop = _RUN(buf, off, end if top < 0 else min(end, off + 24 * top)).end()
    if stop == off or top < 0:  # (items until a break: their number does not matter)
        return stop
    n = stop - off  # (as many as bytes: all one-byte items, the usual run)
    if n > top or _RUN1(buf, off, stop).end() != stop:
        n = len(_ONE_ALL(buf, off, stop))
        if n > top:  # (the run goes on in the parent) the end of item #top
            stop = next(islice(_ONE_EACH(buf, off, stop), top - 1, None)).end()
            n = top
    if top > n:
        stack[-1] = top - n
    else:
        stack.pop()
        _done(stack)
    return stop


def min_item_end(off: int, stack: list) -> int:
    """A lower bound on the end of the item scan_item() stopped at ``off`` (each item it
    still needs takes a byte)."""
    need = off + (stack[-1] if stack and stack[-1] > 0 else 1 if stack else 0)
    for c in stack[:-1]:
        if c > 1:
            need += c - 1
    return need
