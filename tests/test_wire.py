"""tcpcopylib.wire, the one place that writes and reads the record layout by hand.

The golden test: every hand encoder writes what cbor2.dumps writes for the same record,
at every CBOR length boundary, and the stages use these encoders (no copy of their own).
Then the scanners: the usual fb record (fb_spans, fb_prefix), and scan_item's strict
mode for a feedback client's records. (The other scanners: test_records_fast.py.)
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import cbor2
import pytest

from tcpcopylib import wire
from tcpcopylib.wire import (PendingBatch, claim_entry, claim_head, encode_fb, encode_pkt,
                             encode_pkt_sid, encode_pkts, encode_s2c, encode_text, encode_uint,
                             fast_record, fb_prefix, fb_spans, fb_ts, scan_item)

TS = 1_700_000_000_123_456_789
_BOUNDS = [0, 1, 23, 24, 25, 255, 256, 257, 2047, 2048, 65535, 65536]
_STAMPS = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**32 + 1, TS, 2**64 - 1]
_UINTS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]


def _data(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def test_every_hand_encoder_is_cbor2s_encoding():
    # heads
    for n in _UINTS:
        assert wire.cbor_head(0, n) == encode_uint(n) == cbor2.dumps(n), n
        if n <= 65536:
            enc = cbor2.dumps(bytes(n))
            assert wire.cbor_head(2, n) == enc[:len(enc) - n], n
            assert encode_text("a" * n) == cbor2.dumps("a" * n), n
            assert cbor2.dumps([0] * n) == wire.cbor_head(4, n) + b"\x00" * n, n
    assert encode_text("fd00::1é") == cbor2.dumps("fd00::1é")
    # pkt and fb records, each optional key at each boundary; then beyond 64 bits (cbor2's
    # bignum) and a negative ts, as cbor2 writes them
    for ts in _STAMPS + [2**64, -1]:
        for n in _BOUNDS:
            data = _data(n)
            assert encode_pkt(ts, data) == cbor2.dumps({"t": "pkt", "ts": ts, "data": data})
            assert encode_s2c(ts, data) == cbor2.dumps({"t": "s2c", "ts": ts, "data": data})
            for ln in (1, 23, 24, 1500, 70000, 2**32):
                assert encode_pkt(ts, data, ln) == cbor2.dumps(
                    {"t": "pkt", "ts": ts, "data": data, "len": ln}), (ts, n, ln)
                assert encode_s2c(ts, data, ln) == cbor2.dumps(
                    {"t": "s2c", "ts": ts, "data": data, "len": ln}), (ts, n, ln)
            for sid in _UINTS:
                assert encode_pkt_sid(ts, data, sid) == cbor2.dumps(
                    {"t": "pkt", "ts": ts, "data": data, "sid": sid}), (ts, n, sid)
            for ln in (0, 23, 24, 255, 256, 65535, 65536):
                assert encode_fb(ts, data, ln) == cbor2.dumps(
                    {"t": "fb", "ts": ts, "data": data, "len": ln}), (ts, n, ln)
    assert encode_pkt(TS, memoryview(b"x" * 30)) == encode_pkt(TS, b"x" * 30)
    # the start of a pkt (or s2c) record that tc-capture's batch loop packs inline...
    for n in (24, 255, 256, 65535):
        for t, head in (("pkt", wire.PKT_MAP3), ("s2c", wire.S2C_MAP3)):
            start = (wire.PKT_START1.pack(head, TS, wire.DATA1, n) if n < 256 else
                     wire.PKT_START2.pack(head, TS, wire.DATA2, n))
            assert start + _data(n) == cbor2.dumps({"t": t, "ts": TS, "data": _data(n)})
    # ... and an fb record, tc-intercept's
    for n in (24, 255):
        for length in (24, 255, 256, 65535):
            tail = (wire.LEN1.pack(wire.LEN1_KEY, length) if length < 256 else
                    wire.LEN2.pack(wire.LEN2_KEY, length))
            enc = wire.FB_START.pack(wire.FB_MAP4, TS, wire.DATA1, n) + _data(n) + tail
            assert enc == cbor2.dumps({"t": "fb", "ts": TS, "data": _data(n), "len": length})
    # batches, with and without session ids, through PendingBatch too
    for n in (1, 2, 31, 32, 33, 8191, 8192):
        stamps = [(TS + i) if i % 3 else i for i in range(n)]
        datas = [_data(i % 300) for i in range(n)]
        sids = [i * 70001 % 2**32 for i in range(n)]
        for s in (None, sids):
            rec = {"t": "pkts", "ts": struct.pack(f">{n}Q", *stamps),
                   "len": struct.pack(f">{n}H", *map(len, datas)), "data": b"".join(datas)}
            if s is not None:
                rec["sid"] = struct.pack(f">{n}I", *s)
            assert encode_pkts(stamps, datas, s) == cbor2.dumps(rec), n
            pending = PendingBatch(sids=s is not None)
            pending.stamps += stamps
            pending.datas += datas
            if s is not None:
                pending.sids += s

            class Writer:
                buf = bytearray()
            pending.write_to(Writer)
            assert Writer.buf == cbor2.dumps(rec) and not len(pending)
    # claim records
    for n in (0, 1, 23, 24, 255, 256, 1024):
        entries = [["10.0.0.1", i * 257 % 65536, "fd00::5", 65535 - i] for i in range(n)]
        for kind in ("add", "del"):
            enc = claim_head(kind, n) + b"".join(
                claim_entry(encode_text(c), cp, encode_text(t) + encode_uint(tp))
                for c, cp, t, tp in entries)
            assert enc == cbor2.dumps({"t": "claim", kind: entries}), (kind, n)


def test_fast_record_reads_what_the_encoders_write():
    """Our layout (an 8-byte ts, data under 64 KiB, "len"/"sid" under 2**32) is read back
    without cbor2; a record cut anywhere is not read (it waits for the rest)."""
    for ts in (2**32, TS, 2**64 - 1):
        for n in (0, 23, 24, 255, 256, 65535):
            data = _data(n)
            for enc, rec in ((encode_pkt(ts, data), {"t": "pkt", "ts": ts, "data": data}),
                             (encode_pkt(ts, data, 70000),
                              {"t": "pkt", "ts": ts, "data": data, "len": 70000}),
                             (encode_pkt_sid(ts, data, 2**32 - 1),
                              {"t": "pkt", "ts": ts, "data": data, "sid": 2**32 - 1}),
                             (encode_fb(ts, data, 300), {"t": "fb", "ts": ts, "data": data,
                                                         "len": 300})):
                assert fast_record(b"x" + enc, 1, len(enc) + 1) == (rec, len(enc) + 1)
                for cut in range(1, len(enc), max(1, len(enc) // 30)):
                    assert fast_record(enc[:cut], 0, cut) is None


def test_the_stages_use_these_encoders():
    from tcpcopylib import capture, intercept, pcapio
    from tcpcopylib.session import runner

    assert capture.encode_pkt is pcapio.encode_pkt is encode_pkt
    assert capture.encode_s2c is encode_s2c
    assert runner.encode_pkt is encode_pkt_sid
    assert intercept.encode_fb is encode_fb


def test_no_module_but_wire_spells_the_layout():
    """The record keys and the label as CBOR bytes appear in wire.py only (a copy of the
    layout elsewhere would drift from it)."""
    layout = re.compile(rb'b"[^"\n]*\\x(?:61t|62ts|62fb|63pkt|63s2c|64data|63len|63sid|d9\\xd9)')
    lib = Path(wire.__file__).parent
    found = [str(p.relative_to(lib)) for p in sorted(lib.rglob("*.py"))
             if p.name != "wire.py" and layout.search(p.read_bytes())]
    assert found == []
    assert layout.search((lib / "wire.py").read_bytes())  # (the pattern finds it there)


# -- the usual fb record ---------------------------------------------------------------------

def usual_fb(n: int, length: int, ts: int = 1 << 40) -> bytes:
    """An fb record of the usual shape (what fb_spans takes)."""
    enc = encode_fb(ts, _data(n), length)
    assert enc == cbor2.dumps({"t": "fb", "ts": ts, "data": _data(n), "len": length})
    return enc


@pytest.mark.parametrize("n,length", [(24, 24), (24, 255), (40, 256), (255, 65535), (60, 1500)])
def test_fb_spans_and_prefix_of_usual_records(n, length):
    enc = usual_fb(n, length)
    d0 = wire.FB_DATA_AT
    assert fb_spans(enc, 0) == [(d0, d0 + n, length, len(enc))]
    two = b"abc" + enc + usual_fb(30, 300, 1 << 50)
    assert fb_spans(two, 3) == [(3 + d0, 3 + d0 + n, length, 3 + len(enc)),
                                (3 + len(enc) + d0, 3 + len(enc) + d0 + 30, 300, len(two))]
    assert fb_ts(two, 3) == 1 << 40 and fb_ts(two, 3 + len(enc)) == 1 << 50
    assert fb_spans(enc + b"\xa4", 0) == [(d0, d0 + n, length, len(enc))]
    for k in range(1, len(enc)):
        assert fb_spans(enc[:k], 0) == []
        assert fb_spans(b"Z" + enc[:k], 1) == []
        assert fb_spans(enc + enc[:k], 0) == fb_spans(enc, 0)  # the complete one only
        assert fb_prefix(enc[:k]), k  # wait for the rest
    assert not fb_prefix(enc)  # complete: not a prefix
    assert not fb_prefix(enc + b"\x00")


@pytest.mark.parametrize("rec", [
    {"t": "fb", "ts": 1 << 40, "data": b"x" * 23, "len": 300},   # data with a 1-byte head
    {"t": "fb", "ts": 1 << 40, "data": b"x" * 256, "len": 300},  # data with a 3-byte head
    {"t": "fb", "ts": 1 << 40, "data": b"x" * 30, "len": 23},    # len in the head byte
    {"t": "fb", "ts": 1 << 40, "data": b"x" * 30, "len": 70000},  # len as 4 bytes
    {"t": "fb", "ts": 1 << 40, "data": b"x" * 30, "len": 300, "sid": 1},  # another map
    {"t": "fb", "ts": 5, "data": b"x" * 30, "len": 300},         # a short ts
])
def test_fb_spans_and_prefix_refuse_other_layouts(rec):
    enc = cbor2.dumps(rec)
    assert fb_spans(enc, 0) == [] and fb_spans(enc + b"\x00" * 10, 0) == []
    assert not fb_prefix(enc)
    assert fast_record(enc, 0, len(enc)) is None or fast_record(enc, 0, len(enc))[0] == rec
    # the decoder takes it once the difference is visible
    d1 = wire.FB_DATA_AT + enc[24] if enc[23] == 0x58 else None
    seen = 24 if d1 is None else d1 + 5
    for k in range(seen, len(enc)):
        assert not fb_prefix(enc[:k]), k


def test_fb_prefix_refuses_what_is_not_an_fb_record():
    assert not fb_prefix(cbor2.dumps({"t": "pkt", "ts": 1 << 40, "data": b"x" * 30}))
    assert not fb_prefix(cbor2.dumps({"t": "fc"})[:6])
    enc = usual_fb(30, 300)
    for k in (19, 22, 24):  # a wrong byte inside the data key or the data head
        bad = enc[:k - 1] + b"\x00"
        assert not fb_prefix(bad), k
        assert fb_prefix(enc[:k]), k
    d1 = wire.FB_DATA_AT + 30  # a wrong byte within the "len" key
    for k in range(d1 + 1, d1 + 5):
        assert fb_prefix(enc[:k])
        assert not fb_prefix(enc[:k - 1] + b"\x00"), k


# -- scan_item -------------------------------------------------------------------------------

def _scan_whole(enc: bytes, step: int, **kw) -> int:
    """scan_item over enc fed `step` bytes at a time: where the item ends."""
    stack, off = [1], 0
    for end in range(step, len(enc) + step, step):
        off = scan_item(enc, off, min(end, len(enc)), stack, **kw)
        if not stack and off <= min(end, len(enc)):
            return off
    raise AssertionError("never complete")


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_scan_item_finds_the_end_of_any_item_fed_in_pieces(step):
    items = [{"t": "claim", "add": [["10.0.0.1", 80, "10.0.0.2", 8080]] * 40},
             {"t": "stats", "n": [1.5, None, True, -7, 2**64 - 1, b"x" * 300, "y" * 70000]},
             [[[[]]]], {}, 0, "", cbor2.CBORTag(4242, [1, {"a": b"b"}])]
    for item in items:
        enc = cbor2.dumps(item)
        assert _scan_whole(enc + b"\x00" * 5, step) == len(enc), item
        if not isinstance(item, cbor2.CBORTag):
            assert _scan_whole(enc + b"\xff", step, max_depth=8, plain=True) == len(enc)


def test_scan_item_plain_refuses_what_a_clients_record_never_holds():
    for bad in (cbor2.dumps({"t": cbor2.CBORTag(4242, 1)}),   # a tag
                b"\xa1\x61t\x5f\x41x\xff",                     # indefinite bytes
                b"\xbf\x61t\x61x\xff",                         # an indefinite map
                b"\xa1\x61t\xfc",                              # a reserved value
                b"\xa1\x61t\xff",                              # a break outside one
                cbor2.dumps({"t": [[[[[[[[[1]]]]]]]]]})):       # 10 deep
        with pytest.raises(wire.Malformed):
            _scan_whole(bad, 1000, max_depth=8, plain=True)
    assert _scan_whole(cbor2.dumps({"t": [[[[[[[1]]]]]]]}), 1, max_depth=8, plain=True)
    for ok in (cbor2.dumps({"t": cbor2.CBORTag(4242, 1)}), b"\xbf\x61t\x61x\xff"):
        assert _scan_whole(ok, 1) == len(ok)  # (a stream's records may hold them)
