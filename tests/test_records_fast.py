"""The fast paths of the record stream: fast_record (Python decoding of the common pkt/fb
layout) and the raw bytes RecordReader.iter_raw() hands to pass-through stages must agree
with cbor2 on every record, common layout or not."""

import os
import random
import struct

import cbor2
import pytest

from tc import call, cbor_items, decode, stream
from tcpcopylib.errors import StreamError
from tcpcopylib.records import (AS_PKT, AS_SPANS, HEADER, LABEL, SPAN_KIND, SPAN_STOP,
                                RecordReader, StreamDecoder, encode_section, fast_record,
                                header)
from tcpcopylib.streamparse import StreamParser

TS = 1_700_000_000_123_456_789
U64 = struct.Struct(">Q").pack


def _varied() -> list[dict]:
    """Records in and around the common layout: every one must decode as cbor2 decodes it."""
    recs = [
        {"t": "pkt", "ts": TS, "data": bytes(20)},                       # tc-readpcap
        {"t": "pkt", "ts": TS, "data": b""},
        {"t": "pkt", "ts": TS + 1, "data": bytes(23)},
        {"t": "pkt", "ts": TS + 2, "data": bytes(24)},
        {"t": "pkt", "ts": TS + 3, "data": bytes(255)},
        {"t": "pkt", "ts": TS + 4, "data": bytes(256)},
        {"t": "pkt", "ts": TS + 5, "data": bytes(1500)},
        {"t": "pkt", "ts": TS + 6, "data": bytes(70000)},                 # 4-byte length
        {"t": "pkt", "ts": TS, "data": b"\x45" * 60, "sid": 0},           # tc-session
        {"t": "pkt", "ts": TS, "data": b"\x45" * 60, "sid": 23},
        {"t": "pkt", "ts": TS, "data": b"\x45" * 60, "sid": 24},
        {"t": "pkt", "ts": TS, "data": b"\x45" * 60, "sid": 300},
        {"t": "pkt", "ts": TS, "data": b"\x45" * 60, "sid": 70000},
        {"t": "pkt", "ts": TS, "data": b"\x45" * 60, "sid": 2**40},
        {"t": "pkt", "ts": TS, "data": b"x", "len": 1500, "sid": 7},
        {"t": "pkt", "ts": TS, "data": b"x", "sid": 7, "len": 1500},
        {"t": "fb", "ts": TS, "data": bytes(40), "len": 40},              # tc-feedback
        {"t": "fb", "ts": TS, "data": bytes(40)},
        {"t": "pkt", "ts": 5, "data": b"small ts"},
        {"t": "pkt", "ts": 0xFFFFFFFF, "data": b"ts fits in 32 bits"},
        {"t": "pkt", "ts": 2**64 + 5, "data": b"big int ts"},
        {"t": "pkt", "ts": -TS, "data": b"negative"},
        {"t": "pkt", "ts": 1.5, "data": b"float ts"},
        {"t": "pkt", "ts": TS, "data": "text data"},
        {"t": "pkt", "ts": TS, "data": b"x", "sid": -1},
        {"t": "pkt", "ts": TS, "data": b"x", "sid": "s1"},
        {"t": "pkt", "ts": TS, "data": b"x", "sid": [1, {"a": b"b"}]},
        {"t": "pkt", "ts": TS, "data": b"x", "zzz": 1},                    # unknown key
        {"t": "pkt", "ts": TS, "data": b"x", "sid": 1, "len": 2, "extra": None},
        {"ts": TS, "t": "pkt", "data": b"x"},                              # other key order
        {"t": "pkt", "data": b"x", "ts": TS},
        {"t": "pkt", "ts": TS},
        {"t": "pkt", "ts": TS, "data": b"x", "len": 2**70},
        {"t": "pktx", "ts": TS, "data": b"x"},
        {"t": "stats", "sent": 5, "nested": {"a": [1, 2.5, None, True]}},
        {"t": "claim", "add": [["10.0.0.1", 5000, "10.0.0.2", 80]]},
        {"t": "pkt", "ts": TS, "data": b"x", "tag": cbor2.CBORTag(4242, [1, b"2"])},
        {"t": "header", "v": 1},                                           # a record, not a header
    ]
    rng = random.Random(7)
    for i in range(300):
        r = {"t": rng.choice(["pkt", "fb"]), "ts": TS + rng.randrange(10**12),
             "data": rng.randbytes(rng.choice([0, 1, 23, 24, 60, 255, 256, 1500]))}
        for k in rng.sample(["len", "sid"], rng.randrange(3)):
            r[k] = rng.choice([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1])
        recs.append(r)
    return recs


# Hand-encoded maps cbor2.dumps would write differently (a longer head than needed, a
# duplicate key): they decode to records whose re-encoding differs from the bytes read.
_HEAD = b"\xa3\x61t\x63pkt\x62ts"
NON_SHORTEST = [
    _HEAD + b"\x1b" + U64(5) + b"\x64data\x41x",                        # small ts in 8 bytes
    _HEAD + b"\x1b" + U64(TS) + b"\x64data\x58\x01x",                   # 1 byte, 1-byte length
    _HEAD + b"\x1b" + U64(TS) + b"\x64data\x59\x00\x30" + bytes(48),    # 48 bytes, 2-byte length
    b"\xa4" + _HEAD[1:] + b"\x1b" + U64(TS) + b"\x64data\x41x\x63sid\x19\x00\x05",
    b"\xa4" + _HEAD[1:] + b"\x1b" + U64(TS) + b"\x64data\x41x\x63sid\x18\x05",
    b"\xa4" + _HEAD[1:] + b"\x1b" + U64(TS) + b"\x64data\x41x\x63sid\x1a\x00\x00\x00\x05",
    b"\xa5" + _HEAD[1:] + b"\x1b" + U64(TS) + b"\x64data\x41x\x63sid\x01\x63sid\x02",  # dup
    b"\xbf" + _HEAD[1:] + b"\x1b" + U64(TS) + b"\x64data\x41x\xff",      # indefinite map
    _HEAD + b"\x1b" + U64(TS) + b"\x64data\x5f\x41x\xff",                # indefinite bytes
]


def _iter_raw(data: bytes, headers: bool = False) -> list:
    r, w = os.pipe()
    import threading

    t = threading.Thread(target=lambda: (os.write(w, data) if len(data) < 60000 else
                                         os.fdopen(w, "wb", closefd=False).write(data),
                                         os.close(w)))
    t.start()
    try:
        return list(RecordReader(r, headers=headers).iter_raw())
    finally:
        t.join()
        os.close(r)


def test_fast_record_agrees_with_cbor2():
    fast = 0
    for rec in _varied():
        enc = cbor2.dumps(rec)
        got = fast_record(enc, 0, len(enc)) if 0xA3 <= enc[0] <= 0xA5 else None
        if got is not None:
            fast += 1
            assert got[0] == rec and got[1] == len(enc)
            assert [type(v) for v in got[0].values()] == [type(v) for v in rec.values()]
        # a cut-off record is never decoded (it waits for more bytes)
        for cut in (1, 5, 12, 20, len(enc) - 1):
            if 0 < cut < len(enc) and 0xA3 <= enc[0] <= 0xA5:
                assert fast_record(enc, 0, cut) is None, (rec, cut)
                assert fast_record(enc[:cut], 0, cut) is None, (rec, cut)
    assert fast > 300  # the common layouts do take the fast path
    for enc in NON_SHORTEST:
        assert fast_record(enc, 0, len(enc)) is None, enc


def test_reader_decodes_like_cbor2_and_raw_is_the_encoding():
    recs = _varied()
    body = b"".join(cbor2.dumps(r) for r in recs) + b"".join(NON_SHORTEST)
    data = encode_section(header("a")) + body
    want = cbor_items(body)
    assert decode(data) == want
    pairs = _iter_raw(data)
    assert [r for r, _ in pairs] == want
    known = 0
    for rec, raw in pairs:
        if raw is not None:
            known += 1
            assert raw == cbor2.dumps(rec)
    assert known > 300
    # the non-shortest encodings are never handed out as raw bytes
    assert all(raw is None for _, raw in pairs[len(recs):])
    # as many sections as we like: headers marked as such
    pairs = _iter_raw(data + data, headers=True)
    assert [raw for _, raw in pairs].count(HEADER) == 2
    assert [r for r, raw in pairs if raw is not HEADER] == want + want


@pytest.mark.parametrize("step", [1, 7, 64, 4096])
def test_stream_parser_any_chunking(step):
    recs = _varied()
    data = stream(recs, "a") + stream(recs[:5], "b") + b"".join(NON_SHORTEST)
    want = cbor_items(stream(recs, "a")[len(LABEL):])[1:] + recs[:5] + \
        cbor_items(b"".join(NON_SHORTEST))
    p = StreamParser()
    got = []
    for i in range(0, len(data), step):
        got += p.feed(data[i:i + step])
    p.close()
    assert got == want
    assert p.records == len(want) and p.sections == 2 and p.consumed == len(data)


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_pkt_mode_gives_ts_data_pairs_for_packets_and_records_for_the_rest(step):
    recs = _varied()
    data = stream(recs, "a") + b"".join(NON_SHORTEST)
    want = decode(data)
    p, got = StreamParser(), []
    for i in range(0, len(data), step):
        got += p.feed(data[i:i + step], AS_PKT)
    p.close()
    pairs = [g for g in got if type(g) is tuple]
    assert len(got) == len(want) and len(pairs) > 50
    for g, w in zip(got, want):
        if type(g) is tuple:  # only common-layout pkt records come as (ts, data)
            assert w["t"] == "pkt" and g == (w["ts"], w["data"]) and type(g[1]) is bytes
            assert "len" not in w  # a truncated packet comes as a record, with its len
            assert fast_record(cbor2.dumps(w), 0, len(cbor2.dumps(w))) is not None
        else:
            assert g == w


def test_spans_locate_every_record_in_the_buffer():
    recs = _varied()
    data = stream(recs, "a") + stream(recs[:3], "b") + b"".join(NON_SHORTEST)
    items, used, err = StreamDecoder(headers=True).parse(data, AS_SPANS)
    assert err is None and used == len(data)
    want = decode(data, headers=True)
    assert len(items) == len(want)
    start = 0
    for (kind, ts, ts_at, stop, count, rec), w in zip(items, want):
        if kind is HEADER or kind is None:
            assert rec == w and ts is None and ts_at is None
            assert count == (0 if kind is HEADER else 1)
        else:  # nothing decoded but the ts: the record is data[start:stop]
            assert kind == w["t"] and data[start:stop] == cbor2.dumps(w)
            assert ts == w["ts"] and data[ts_at:ts_at + 8] == U64(w["ts"])
            assert count == 1 and rec is None
            assert fast_record(data, start, stop) == (w, stop)
        start = stop
    assert items[-1][SPAN_STOP] == len(data)
    assert [i for i, item in enumerate(items) if item[SPAN_KIND] is HEADER] == [0, len(recs) + 1]


def test_errors_after_fast_records_keep_their_offsets():
    good = [{"t": "pkt", "ts": TS, "data": bytes(10)}] * 3
    data = stream(good) + b"\xff\xff"
    with pytest.raises(StreamError, match=f"not a valid record at byte {len(data) - 2}"):
        decode(data)
    # records before the error are still delivered
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    it = iter(RecordReader(r))
    assert [next(it) for _ in range(3)] == good
    with pytest.raises(StreamError):
        next(it)
    os.close(r)
    # a pkt record right after a label is not a header, even in the common layout
    with pytest.raises(StreamError, match="not followed by a header"):
        decode(LABEL + cbor2.dumps(good[0]))
    with pytest.raises(StreamError, match="truncated"):
        decode(stream(good)[:-1])


@pytest.mark.parametrize("opts", [[], ["--keep-ts"], ["--speed", "1000000"],
                                  ["--delay", "0"]])
def test_tc_pace_output_is_the_reencoded_input(opts):
    """Whether tc-pace forwards the bytes it read or re-encodes the record, the output is
    what re-encoding every record gives."""
    recs = [r for r in _varied() if r.get("t") != "header"]
    for i, r in enumerate(recs):
        if type(r.get("ts")) is int and r["ts"] > 10**15:
            r["ts"] = TS + i  # in order, so nothing waits long
    body = b"".join(cbor2.dumps(r) for r in recs) + b"".join(NON_SHORTEST)
    res = call(["tc-pace", *opts], input=encode_section(header("a")) + body)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(LABEL)
    items = cbor_items(out[len(LABEL):])
    assert items[0]["t"] == "header" and items[0]["tool"] == "tc-pace"
    got = items[1:]
    assert len(got) == len(recs) + len(NON_SHORTEST)
    if not opts or opts == ["--keep-ts"] or opts == ["--delay", "0"]:
        assert got == cbor_items(body)  # ts unchanged
    else:
        # --speed rewrites ts of timed records and nothing else
        for g, w in zip(got, cbor_items(body)):
            assert {k: v for k, v in g.items() if k != "ts"} == \
                {k: v for k, v in w.items() if k != "ts"}
    assert out[len(LABEL) + len(cbor2.dumps(items[0])):] == \
        b"".join(cbor2.dumps(r) for r in got)


def test_replace_ts_equals_reencoding():
    from tcpcopylib.records import replace_ts

    n = 0
    for rec in _varied():
        enc = cbor2.dumps(rec)
        got = fast_record(enc, 0, len(enc)) if 0xA3 <= enc[0] <= 0xA5 else None
        if got is None:
            continue
        for ts in (2**32, 2**32 + 1, TS * 3, 2**64 - 1, 2**64, 2**32 - 1, 5, -1):
            new = replace_ts(enc, ts)
            if new is not None:
                n += 1
                assert new == cbor2.dumps(dict(rec, ts=ts)), (rec, ts)
            else:
                assert not 2**32 <= ts < 2**64
    assert n > 1000


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_stream_parser_other_buffers_give_bytes(kind):
    recs = [{"t": "pkt", "ts": TS, "data": b"abc", "sid": 3}, {"t": "pkt", "ts": 1, "data": b"d"}]
    got = StreamParser().feed(kind(stream(recs)))
    assert got == recs and all(type(r["data"]) is bytes for r in got)


# -- batches (pkts records) ------------------------------------------------------------------

def _batch(n, t0=TS):
    stamps = [t0 + i * 1000 for i in range(n)]
    datas = [bytes([i % 256]) * (20 + i * 37 % 1400) for i in range(n)]
    return stamps, datas


def _columns(stamps, datas):
    n = len(stamps)
    return {"ts": struct.pack(f">{n}Q", *stamps), "len": struct.pack(f">{n}H", *map(len, datas)),
            "data": b"".join(datas)}


def test_batch_encoding_is_cbor2s_and_every_mode_expands_it():
    from tcpcopylib.records import (AS_RAW, AS_RECORDS, T_PKTS, batch_records, batch_stamps,
                                    encode_pkts)

    stamps, datas = _batch(40)
    raw = encode_pkts(stamps, datas)
    assert raw == cbor2.dumps({"t": "pkts", **_columns(stamps, datas)})
    # the same batch in another key order is not the common layout: cbor2 decodes it
    other = cbor2.dumps({"data": b"".join(datas), "t": "pkts", **_columns(stamps, datas)})
    head = encode_section(header("test"))
    s = head + raw + cbor2.dumps({"t": "note"}) + other
    pairs = list(zip(stamps, datas))
    pkts = [{"t": "pkt", "ts": t, "data": d} for t, d in pairs]
    items, pos, err = StreamDecoder().parse(s, AS_PKT)
    assert err is None and pos == len(s) and items == pairs + [{"t": "note"}] + pairs
    assert StreamDecoder().parse(s, AS_RECORDS)[0] == pkts + [{"t": "note"}] + pkts
    assert StreamDecoder().parse(s, AS_RAW)[0] == (
        [(p, None) for p in pkts] + [({"t": "note"}, None)] + [(p, None) for p in pkts])
    spans = StreamDecoder().parse(s, AS_SPANS)[0]
    kind, ts, ts_at, stop, n, rec = spans[1]
    assert (kind, ts, n, stop, rec) == (T_PKTS, stamps[0], 40, len(head) + len(raw), None)
    assert batch_stamps(s, ts_at, n) == tuple(stamps)
    assert batch_records(s, len(head), stop) == pkts
    assert [x[5] for x in spans[3:]] == pkts  # the other layout: one decoded pkt each
    # fed in pieces, as a pipe delivers it
    p, got = StreamParser(), []
    for i in range(0, len(s), 333):
        got += p.feed(s[i:i + 333], AS_PKT)
    p.close()
    assert got == items
    assert decode(s) == pkts + [{"t": "note"}] + pkts  # RecordReader


def test_a_batch_with_session_ids_keeps_them_except_as_bare_packets():
    from tcpcopylib.records import AS_RECORDS, T_PKTS, batch_records, encode_pkts

    stamps, datas = _batch(30)
    sids = [1, 2, 70000, 2**32 - 1] + list(range(5, 31))
    cols = {**_columns(stamps, datas), "sid": struct.pack(">30I", *sids)}
    raw = encode_pkts(stamps, datas, sids)
    assert raw == cbor2.dumps({"t": "pkts", **cols})
    other = cbor2.dumps({"sid": cols["sid"], "t": "pkts", **_columns(stamps, datas)})
    head = encode_section(header("test"))
    s = head + raw + other
    pkts = [{"t": "pkt", "ts": t, "data": d, "sid": i} for t, d, i in zip(stamps, datas, sids)]
    assert StreamDecoder().parse(s, AS_RECORDS) == (pkts + pkts, len(s), None)
    assert StreamDecoder().parse(s, AS_PKT)[0] == 2 * list(zip(stamps, datas))
    spans = StreamDecoder().parse(s, AS_SPANS)[0]
    kind, ts, _ts_at, stop, n, _rec = spans[1]  # (spans[0]: the header)
    assert (kind, ts, n, stop) == (T_PKTS, stamps[0], 30, len(head) + len(raw))
    assert batch_records(s, len(head), stop) == pkts
    assert decode(s) == pkts + pkts
    # a sid column of another length than the batch's is malformed, in either layout
    for bad in (raw[:-4 * 30 - 2] + bytes([0x58, 4 * 29]) + raw[-4 * 29:],
                cbor2.dumps({"sid": cols["sid"][4:], "t": "pkts", **_columns(stamps, datas)})):
        err = StreamDecoder().parse(head + bad, AS_RECORDS)[2]
        assert isinstance(err, StreamError), err


@pytest.mark.parametrize("layout", ["common", "other"])
def test_a_batch_whose_lengths_do_not_add_up_is_an_error(layout):
    from tcpcopylib.records import encode_pkts

    stamps, datas = _batch(5)
    if layout == "common":
        raw = bytearray(encode_pkts(stamps, datas))
        at = raw.index(b"\x63len") + 5  # the first length (a 10-byte column: 0x4a head)
        raw[at:at + 2] = b"\xff\xff"
        raw = bytes(raw)
    else:
        cols = _columns(stamps, datas)
        cols["len"] = cols["len"][:-2] + b"\x00\x01"
        raw = cbor2.dumps({"data": cols.pop("data"), "t": "pkts", **cols})
    s = encode_section(header("test")) + raw
    _items, _pos, err = StreamDecoder().parse(s, AS_PKT)
    assert isinstance(err, StreamError) and "malformed pkts record" in str(err)
    r = call(["tc-dump"], input=s)
    assert r.returncode == 65 and b"malformed pkts record" in r.stderr


# -- the scanners at every length boundary of CBOR (bench/mutate.py's records; the
# encoders: test_wire.py) --

def test_fast_record_takes_each_shortest_head_and_no_longer_one():
    """The fast path takes every shortest encoding at each head boundary (data length,
    "len"/"sid" value) and refuses the same value in a longer head than needed (its bytes
    would not be cbor2's)."""
    head = b"\x61t\x63pkt\x62ts\x1b" + U64(TS) + b"\x64data"
    for n in (0, 1, 23, 24, 25, 255, 256, 257, 65535):
        for extra in ({}, {"sid": 0}, {"len": 23}, {"sid": 24}, {"len": 255}, {"sid": 256},
                      {"len": 65535}, {"sid": 65536}, {"len": 2**32 - 1}, {"sid": 7, "len": 9}):
            rec = {"t": "pkt", "ts": TS, "data": bytes(n), **extra}
            enc = cbor2.dumps(rec)
            assert fast_record(enc, 0, len(enc)) == (rec, len(enc)), (n, extra)
            assert fast_record(b"\x00\x00" + enc + b"\xff", 2, len(enc) + 2) == (rec, len(enc) + 2)
            assert fast_record(enc, 0, len(enc) - 1) is None
    longer = [b"\x58\x17" + bytes(23), b"\x59\x00\xff" + bytes(255)]
    for data in longer:
        assert fast_record(b"\xa3" + head + data, 0, 100_000) is None, data[:3]
    for tail, value in ((b"\x18\x17", 23), (b"\x19\x00\xff", 255),
                        (b"\x1a\x00\x00\xff\xff", 65535)):
        for key in (b"\x63sid", b"\x63len"):
            enc = b"\xa4" + head + b"\x41x" + key + tail
            assert fast_record(enc, 0, len(enc)) is None, (key, tail)
            assert cbor2.loads(enc)[key[1:].decode()] == value
    # the smallest values of each longer head are taken
    for tail, value in ((b"\x18\x18", 24), (b"\x19\x01\x00", 256),
                        (b"\x1a\x00\x01\x00\x00", 65536), (b"\x17", 23)):
        enc = b"\xa4" + head + b"\x41x" + b"\x63sid" + tail
        assert fast_record(enc, 0, len(enc)) == (
            {"t": "pkt", "ts": TS, "data": b"x", "sid": value}, len(enc))
    # a timestamp that fits in 32 bits is not in its shortest form with 8 bytes
    for ts in (2**32 - 1, 2**32):
        enc = b"\xa3\x61t\x63pkt\x62ts\x1b" + U64(ts) + b"\x64data\x41x"
        assert (fast_record(enc, 0, len(enc)) is None) == (ts < 2**32)
    # a map of 3 to 5 keys only; an fb record's head
    for m in (0xA2, 0xA6):
        enc = bytes([m]) + head + b"\x41x"
        assert fast_record(enc, 0, len(enc)) is None
    fb = cbor2.dumps({"t": "fb", "ts": TS, "data": bytes(30), "len": 300})
    assert fast_record(fb, 0, len(fb)) == ({"t": "fb", "ts": TS, "data": bytes(30), "len": 300},
                                           len(fb))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 31, 32, 33, 8191, 8192])
def test_encode_pkts_is_cbor2s_at_every_column_boundary(n):
    from tcpcopylib.records import PendingBatch, batch_records, encode_pkts, scan_batch

    rng = random.Random(n)
    stamps = [rng.choice([0, 1, 2**32, 2**64 - 1, TS + i]) for i in range(n)]
    datas = [bytes([i & 255]) * rng.choice([0, 1, 23, 24, 255, 256, 1500]) for i in range(n)]
    sids = [rng.choice([0, 23, 24, 65536, 2**32 - 1]) for _ in range(n)]
    for s in (None, sids):
        rec = {"t": "pkts", "ts": struct.pack(f">{n}Q", *stamps),
               "len": struct.pack(f">{n}H", *map(len, datas)), "data": b"".join(datas)}
        if s is not None:
            rec["sid"] = struct.pack(f">{n}I", *s)
        raw = encode_pkts(stamps, datas, s)
        assert raw == cbor2.dumps(rec)
        buf = b"\x01" + raw + b"\x02"
        b = scan_batch(buf, 1, len(raw) + 1)
        assert b is not None and b[0] == n and b[-1] == len(raw) + 1
        assert scan_batch(buf, 1, len(raw)) is None
        want = [{"t": "pkt", "ts": t, "data": d} for t, d in zip(stamps, datas)]
        if s is not None:
            for w, i in zip(want, s):
                w["sid"] = i
        assert batch_records(buf, 1, len(raw) + 1) == want
        # PendingBatch writes the same record and starts a new one
        pb = PendingBatch(sids=s is not None)

        class W:
            buf = b""
        for t, d, i in zip(stamps, datas, sids):
            pb.stamps.append(t)
            pb.datas.append(d)
            if pb.sids is not None:
                pb.sids.append(i)
        assert len(pb) == n
        w = W()
        pb.write_to(w)
        assert w.buf == raw and len(pb) == 0 and not pb.datas and (pb.sids in (None, []))
        pb.write_to(w)  # empty: writes nothing
        assert w.buf == raw


def test_batch_packets_checks_every_column_of_a_decoded_batch():
    from tcpcopylib.records import batch_packets

    stamps, datas, sids = [TS, TS + 1, 5], [b"ab", b"", b"c" * 300], [1, 2**32 - 1, 0]
    rec = {"t": "pkts", "ts": struct.pack(">3Q", *stamps), "len": struct.pack(">3H", 2, 0, 300),
           "data": b"".join(datas)}
    assert batch_packets(rec, "x") == (tuple(stamps), datas, None)
    rec["sid"] = struct.pack(">3I", *sids)
    assert batch_packets(rec, "x") == (tuple(stamps), datas, tuple(sids))
    one = {"t": "pkts", "ts": U64(7), "len": b"\x00\x01", "data": b"z"}
    assert batch_packets(one, "x") == ((7,), [b"z"], None)
    bad = [dict(rec, ts=rec["ts"][:-1]), dict(rec, ts=rec["ts"] + U64(1)),
           dict(rec, len=rec["len"][:-2]), dict(rec, len=rec["len"] + b"\x00\x00"),
           dict(rec, sid=rec["sid"][:-4]), dict(rec, sid=rec["sid"] + bytes(4)),
           dict(rec, sid=[1, 2, 3]), dict(rec, data=rec["data"] + b"x"),
           dict(rec, data=rec["data"][:-1]), dict(rec, ts=b""), dict(rec, ts=list(stamps)),
           dict(rec, len="abc"), dict(rec, data=None), {"t": "pkts"}]
    for b in bad:
        with pytest.raises(StreamError, match="where: malformed pkts record"):
            batch_packets(b, "where")


def test_fb_record_keeps_headers_and_the_asked_payload_of_tcp_only():
    """intercept.fb_record: IPv4 with options and IPv6, inside a frame (off/end), a
    payload limit, and None for what is not (the first fragment of) TCP over IP."""
    from tcpcopylib.intercept import fb_record
    from tcpcopylib.packet import build_tcp, ip_bytes

    opts = b"\x01\x01\x08\x0a" + bytes(8)  # TCP header of 32 bytes
    v4 = build_tcp(ip_bytes("10.0.0.5"), ip_bytes("10.9.0.1"), 80, 1000, 5, 6, 0x18,
                   options=opts, payload=b"0123456789")
    v4o = bytearray(v4[:20] + b"\x01\x01\x01\x00" + v4[20:])  # with 4 bytes of IP options
    v4o[0] = 0x46
    v4o[2:4] = struct.pack("!H", len(v4o))
    v4o = bytes(v4o)
    v6 = build_tcp(ip_bytes("fd00::5"), ip_bytes("fd00::1"), 80, 1000, 5, 6, 0x18,
                   options=opts, payload=b"0123456789")
    for ip, hdr in ((v4, 52), (v4o, 56), (v6, 72)):
        for payload, keep in ((0, hdr), (3, hdr + 3), (10, hdr + 10), (99, hdr + 10),
                              (-1, hdr + 10)):
            want = {"t": "fb", "ts": TS, "data": ip[:keep], "len": len(ip)}
            assert cbor2.loads(fb_record(ip, TS, payload)) == want, (hdr, payload)
            frame = b"\x02" * 14 + ip + b"\x00" * 6  # Ethernet header and padding
            got = fb_record(frame, TS, payload, 14, 14 + len(ip))
            assert cbor2.loads(got) == want
        # the length field counts, not what was captured
        cut = ip[:hdr + 2]
        assert cbor2.loads(fb_record(cut, TS, -1)) == {
            "t": "fb", "ts": TS, "data": cut, "len": len(ip)}
        # the IP and TCP headers (options too) must be whole: parse_tcp's rule, what
        # tc-session reads (it counted no reply with less)
        assert cbor2.loads(fb_record(ip[:hdr], TS, 0)) == dict(want, data=ip[:hdr])
        assert fb_record(ip[:hdr - 1], TS, 0) is None
    assert fb_record(v4[:19], TS, 0) is None
    assert fb_record(b"\x00" * 3 + v4, TS, 0, 3, 3 + 19) is None
    for at, value in ((9, 17), (0, 0x44), (7, 1), (6, 0x01), (6, 0x20 | 0x1F)):
        bad = bytearray(v4)
        bad[at] = value
        assert fb_record(bytes(bad), TS, 0) is None, (at, value)
    ok = bytearray(v4)
    ok[6] = 0x40 | 0x20  # DF and MF on the first fragment: still TCP with its header
    assert fb_record(bytes(ok), TS, 0) is not None
    bad6 = bytearray(v6)
    bad6[6] = 17
    assert fb_record(bytes(bad6), TS, 0) is None
    assert fb_record(v6[:39], TS, 0) is None
    # an IPv6 payload length over 255: both bytes count
    v6big = build_tcp(ip_bytes("fd00::5"), ip_bytes("fd00::1"), 80, 1000, 5, 6, 0x18,
                      payload=bytes(700))
    assert cbor2.loads(fb_record(v6big, TS, 0))["len"] == len(v6big) == 40 + 20 + 700
    assert fb_record(b"\x50" + v6[1:], TS, 0) is None


def test_scan_batch_takes_only_encode_pkts_layout():
    from tcpcopylib.intercept import fb_record
    from tcpcopylib.records import encode_pkts, scan_batch

    cols = {"ts": U64(TS), "len": b"\x00\x01", "data": b"x"}
    good = cbor2.dumps({"t": "pkts", **cols})
    assert good == encode_pkts([TS], [b"x"]) and scan_batch(good, 0, len(good)) is not None
    for rec in ({"t": "pkts", **cols, "sid": bytes(4), "zz": 1},    # 6 keys
                {"t": "pkts", **cols, "zz": 1},                     # 5 keys, the 5th no sid
                {"t": "pkts", "ts": U64(TS) + b"\x00" * 4, "len": b"\x00\x01", "data": b"x"},
                {"t": "pkts", "ts": b"", "len": b"", "data": b""},
                {"t": "pkts", "ts": U64(TS), "len": b"\x00\x01\x00", "data": b"x"},
                {"t": "pkts", "ts": U64(TS), "len": b"\x00\x01"}):
        enc = cbor2.dumps(rec)
        assert scan_batch(enc + bytes(20), 0, len(enc) + 20) is None, rec
    # an empty range has no fb record either
    from tcpcopylib.packet import build_tcp, ip_bytes
    ip = build_tcp(ip_bytes("10.0.0.5"), ip_bytes("10.9.0.1"), 80, 1000, 5, 6, 0x18)
    assert fb_record(ip, TS, 0) is not None
    assert fb_record(ip, TS, 0, 0, 0) is None and fb_record(ip + ip, TS, 0, 40, 40) is None


def test_scan_batch_reads_each_shortest_column_head_and_no_longer_one():
    from tcpcopylib.records import PendingBatch, encode_pkts, scan_batch

    # an empty data column (0x40) and a default PendingBatch (no sid column)
    raw = encode_pkts([TS, TS], [b"", b""])
    assert scan_batch(raw, 0, len(raw)) is not None
    pb = PendingBatch()
    pb.stamps.append(TS)
    pb.datas.append(b"")

    class W:
        buf = b""
    pb.write_to(W)
    assert W.buf == encode_pkts([TS], [b""]) and cbor2.loads(W.buf).keys() == {"t", "ts", "len", "data"}

    def batch(ts_head, len_head, data_head, data=b"x"):
        return (b"\xa4\x61t\x64pkts\x62ts" + ts_head + U64(TS) + b"\x63len" + len_head
                + struct.pack(">H", len(data)) + b"\x64data" + data_head + data)
    assert batch(b"\x48", b"\x42", b"\x41") == encode_pkts([TS], [b"x"])
    longer = [(b"\x58\x08", b"\x42", b"\x41"), (b"\x59\x00\x08", b"\x42", b"\x41"),
              (b"\x5a\x00\x00\x00\x08", b"\x42", b"\x41"), (b"\x48", b"\x58\x02", b"\x41"),
              (b"\x48", b"\x59\x00\x02", b"\x41"), (b"\x48", b"\x5a\x00\x00\x00\x02", b"\x41"),
              (b"\x48", b"\x42", b"\x58\x01"), (b"\x48", b"\x42", b"\x59\x00\x01"),
              (b"\x48", b"\x42", b"\x5a\x00\x00\x00\x01"), (b"\x48", b"\x42", b"\x5b" + U64(1))]
    for heads in longer:
        enc = batch(*heads)
        assert cbor2.loads(enc)["data"] == b"x"
        assert scan_batch(enc, 0, len(enc)) is None, heads
    # each head's smallest shortest value is taken: 24, 256 and 65536 data bytes
    for n, head in ((24, b"\x58\x18"), (256, b"\x59\x01\x00"), (65536, b"\x5a\x00\x01\x00\x00")):
        if n < 65536:
            enc = batch(b"\x48", b"\x42", head, bytes(n))
            assert enc == encode_pkts([TS], [bytes(n)])
            assert scan_batch(enc, 0, len(enc)) is not None, n
    # 65535 data bytes under a 4-byte head: not the shortest (its head is 0x59)
    enc = batch(b"\x48", b"\x42", b"\x5a\x00\x00\xff\xff", bytes(65535))
    assert len(cbor2.loads(enc)["data"]) == 65535 and scan_batch(enc, 0, len(enc)) is None
    big = encode_pkts([TS] * 2, [bytes(40000), bytes(30000)])
    assert b"\x64data\x5a\x00\x01\x11\x70" in big and scan_batch(big, 0, len(big)) is not None
