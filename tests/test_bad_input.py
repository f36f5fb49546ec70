"""Hostile and odd input: the documented exit status and one line, never a traceback, and
readers that stay linear (issue 14). Each test here failed before its fix."""

from __future__ import annotations

import datetime
import os
import select
import struct
import subprocess
import time

import cbor2
import pytest

import tcpcopylib.records as records
from tc import call, stream, tool_env, tool_path
from tcpcopylib.errors import StreamError
from tcpcopylib.records import LABEL, MAX_RECORD, header
from tcpcopylib.streamparse import StreamParser

T0 = 1_700_000_000 * 10**9
HDR = LABEL + cbor2.dumps(header("test"))
PKT = {"t": "pkt", "ts": T0, "data": bytes([0x45]) + bytes(39)}


def one_line_error(r, status):
    err = r.stderr.decode()
    assert r.returncode == status, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# -- linear decoding ---------------------------------------------------------------------

class Counting:
    """cbor2 decode() calls and bytes scanned by the incomplete-item scan."""

    def __init__(self, monkeypatch):
        self.decodes = self.scanned = 0
        real_decoder, real_scan = cbor2.CBORDecoder, records.scan_item
        me = self

        class Decoder:
            def __init__(self, *a, **kw):
                self.d = real_decoder(*a, **kw)

            def decode(self):
                me.decodes += 1
                return self.d.decode()

        def scan(buf, off, end, stack):
            me.scanned += max(0, end - off)
            return real_scan(buf, off, end, stack)

        monkeypatch.setattr(records.cbor2, "CBORDecoder", Decoder)
        monkeypatch.setattr(records, "scan_item", scan)


@pytest.mark.parametrize("body", [
    b"\xa2\x61t\x61x\x61a\x9a" + (1 << 20).to_bytes(4, "big") + bytes(1 << 20),  # 1 Mi zeros
    b"\xa2\x61t\x61x\x61a\x5a" + (1 << 21).to_bytes(4, "big") + bytes(1 << 21),  # 2 MiB bytes
    b"\xa2\x61t\x61x\x61a\x9f" + b"\x82\x18\x20\x00" * (1 << 18) + b"\xff",  # indefinite
], ids=["zeros", "bytes", "indefinite"])
def test_an_incomplete_record_costs_only_its_new_bytes(monkeypatch, body):
    """Fed in 4 KiB pieces, a large record is decoded once (not again on every piece: that
    was quadratic) and each byte is scanned about once."""
    data = HDR + body + cbor2.dumps(PKT)
    c = Counting(monkeypatch)
    p = StreamParser()
    got = []
    for i in range(0, len(data), 4096):
        got += p.feed(data[i:i + 4096])
    p.close()
    assert len(got) == 2 and got[1] == PKT
    assert c.decodes <= 6, c.decodes  # header, first try, the decode, the pkt
    assert c.scanned <= 2 * len(body), (c.scanned, len(body))


def test_record_reader_is_linear_too(monkeypatch):
    c = Counting(monkeypatch)
    body = b"\xa2\x61t\x61x\x61a\x9a" + (1 << 20).to_bytes(4, "big") + bytes(1 << 20)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a writer in small pieces, so that every read gets a little
        os.close(r)
        data = HDR + body + cbor2.dumps(PKT)
        for i in range(0, len(data), 8192):
            os.write(w, data[i:i + 8192])
        os._exit(0)
    os.close(w)
    try:
        got = list(records.RecordReader(r))
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got[-1] == PKT and c.decodes <= 6
    assert c.scanned <= 2 * len(body)


def test_a_declared_size_beyond_the_limit_is_refused_at_once():
    """A 2**40-item array followed by 8 MiB of zeros cost tc-dump 11 s of CPU."""
    data = HDR + b"\x9b" + (1 << 40).to_bytes(8, "big") + bytes(8 << 20)
    t = time.process_time()
    p = StreamParser()
    with pytest.raises(StreamError, match="limit"):
        for i in range(0, len(data), 65536):
            p.feed(data[i:i + 65536])
    assert time.process_time() - t < 2
    r = call(["tc-dump"], input=data)
    one_line_error(r, 65)
    assert b"more than the limit" in r.stderr


def test_a_record_past_the_limit_is_refused_even_when_complete():
    rec = {"t": "x", "blob": bytes(MAX_RECORD)}
    with pytest.raises(StreamError, match="limit"):
        StreamParser().feed(HDR + cbor2.dumps(rec))
    ok = {"t": "x", "blob": bytes(MAX_RECORD - 100)}
    assert StreamParser().feed(HDR + cbor2.dumps(ok)) == [ok]


# -- fuzz: records or StreamError, whatever the bytes and the read sizes ------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEEDS = [
    cbor2.dumps(PKT),
    cbor2.dumps({"t": "fb", "ts": T0, "data": bytes(300), "len": 400}),
    records.encode_pkts([T0, T0 + 1], [bytes(20), bytes(30)], [1, 2]),
    cbor2.dumps({"t": "claim", "add": [["10.0.0.1", 1, "10.0.0.2", 80]]}),
    cbor2.dumps({"t": "stats", "n": [1, 2.5, None, True, "x"], "m": {"a": b"b"}}),
    HDR,
]


@st.composite
def streams(draw):
    parts = [HDR] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            parts.append(draw(st.sampled_from(_SEEDS)))
        elif kind == 1:  # a record with bytes changed
            b = bytearray(draw(st.sampled_from(_SEEDS)))
            for _ in range(draw(st.integers(1, 4))):
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
            parts.append(bytes(b))
        elif kind == 2:  # cut short
            b = draw(st.sampled_from(_SEEDS))
            parts.append(b[:draw(st.integers(0, len(b)))])
        else:
            parts.append(draw(st.binary(max_size=40)))
    return b"".join(parts)


def _outcome(data: bytes, cuts) -> tuple:
    """(records, error message or None) of feeding data in pieces cut at cuts."""
    p = StreamParser(headers=True)
    out: list = []
    prev = 0
    try:
        for c in sorted(set(cuts)) + [len(data)]:
            if c > prev:
                out += p.feed(data[prev:c])
                prev = c
        p.close()
    except StreamError as e:
        return out, str(e)
    return out, None


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=streams(), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_fuzz_decoder_gives_records_or_stream_error(data, cuts):
    """Never another exception, and the same records whatever the read sizes (the
    incremental scan agrees with decoding all at once)."""
    whole = _outcome(data, [])
    for cut in ([c for c in cuts if c < len(data)], range(len(data) if len(data) < 400 else 0)):
        got = _outcome(data, cut)
        assert (got[1] is None) == (whole[1] is None), (got[1], whole[1])
        if whole[1] is None:
            assert got[0] == whole[0]
        else:  # (feed() raises: the records of that piece before the error are not given)
            a, b = sorted((got[0], whole[0]), key=len)
            assert a == b[:len(a)]


# -- exit statuses -----------------------------------------------------------------------

def test_dump_bignum_ts_is_65():
    data = stream([{"t": "pkt", "ts": 10**5000, "data": bytes(20)}])
    for args in (["tc-dump"], ["tc-dump", "--json"]):
        one_line_error(call(args, input=data), 65)


@pytest.mark.parametrize("value", [cbor2.undefined, datetime.datetime(
    2020, 1, 1, tzinfo=datetime.timezone.utc)])
def test_dump_json_of_values_json_cannot_hold_is_65(value):
    one_line_error(call(["tc-dump", "--json"], input=stream([{"t": "x", "v": value}])), 65)


def test_dump_json_bytes_keys_is_65():
    one_line_error(call(["tc-dump", "--json"], input=stream([{"t": "x", b"k": 1}])), 65)


# a map whose value is a shared reference to the map itself (tags 28 and 29)
CYCLIC = HDR + b"\xd8\x1c\xa2\x61t\x63pkt\x61x\xd8\x1d\x00"


@pytest.mark.parametrize("tool", [["tc-pace"], ["tc-dump", "--json"],
                                  ["tc-session", "--no-feedback", "--target", "10.0.0.1:80"]])
def test_cyclic_shared_references_are_65(tool):
    r = call(tool, input=CYCLIC)
    one_line_error(r, 65)
    assert b"shared" in r.stderr or b"tag 29" in r.stderr


def test_directory_as_input_is_66_with_its_name(tmp_path):
    for tool in ("tc-dump", "tc-pace"):
        r = call([tool, str(tmp_path)])
        one_line_error(r, 66)
        assert str(tmp_path).encode() in r.stderr


@pytest.mark.parametrize("args", [["--speed", "1e-300"], ["--rate", "1e-300"],
                                  ["--delay", "1e308"], ["--max-gap", "1e308"]])
def test_pace_absurd_numbers_are_usage_errors(args):
    r = call(["tc-pace", *args], input=stream([PKT, dict(PKT, ts=T0 + 10**9)]))
    assert r.returncode == 2 and b"Overflow" not in r.stderr


def test_closed_stdout_is_one_line_not_a_traceback():
    data = stream([PKT] * 1000)
    for tool in ("tc-dump", "tc-pace"):
        r = subprocess.run(f"{tool_path(tool)} >&-", shell=True, input=data,
                           capture_output=True, env=tool_env(), timeout=60)
        one_line_error(r, 1)
        assert b"stdout" in r.stderr


def test_pace_refuses_a_batch_whose_lengths_do_not_add_up():
    bad = {"t": "pkts", "ts": struct.pack(">2Q", T0, T0 + 1), "len": struct.pack(">2H", 20, 30),
           "data": bytes(40)}
    r = call(["tc-pace"], input=stream([bad]))
    one_line_error(r, 65)


@pytest.mark.parametrize("pool", ["10.0.0.0/0", "0.0.0.0", "255.255.255.255", "224.0.0.1",
                                  "10.0.0.1-239.0.0.1", "10.0.0.9,ff02::1", ""])
def test_session_refuses_unusable_client_pools(pool):
    r = call(["tc-session", "--no-feedback", "--target", "10.0.0.1:80", "-c", pool],
             input=stream([]))
    assert r.returncode == 2, r.stderr


@pytest.mark.parametrize("args", [["-a", "1e-300"], ["--drain", "nan"], ["--drain", "inf"],
                                  ["--max-gap", "nan"]])
def test_session_absurd_numbers_are_usage_errors(args):
    r = call(["tc-session", "--no-feedback", "--target", "10.0.0.1:80", *args],
             input=stream([]))
    assert r.returncode == 2, r.stderr


FAR = [PKT, dict(PKT, ts=T0 + 3 * 365 * 86400 * 10**9)]  # 3 years later


@pytest.mark.parametrize("tool", [["tc-pace"],
                                  ["tc-session", "--no-feedback", "--target", "10.0.0.1:80"]])
def test_a_timestamp_years_ahead_is_warned_about(tool):
    p = subprocess.Popen([tool_path(tool[0]), *tool[1:]], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=tool_env())
    p.stdin.write(stream(FAR))
    p.stdin.close()
    # (it would wait for years: the warning comes first)
    ready = select.select([p.stderr], [], [], 20)[0]
    line = p.stderr.readline() if ready else b""
    p.kill()
    p.wait()
    assert b"warning" in line and b"--max-gap" in line


def test_session_max_gap_shortens_the_wait():
    r = call(["tc-session", "--no-feedback", "--target", "10.0.0.1:80", "--max-gap", "0.1",
              "--drain", "0"], input=stream(FAR))
    assert r.returncode == 0, r.stderr


def test_version_true_is_not_version_1():
    r = call(["tc-dump"], input=LABEL + cbor2.dumps({"t": "header", "v": True}))
    one_line_error(r, 65)


def test_session_batches_stay_below_the_record_limit():
    """tc-session -B is bounded so that a batch of 64 KiB datagrams fits MAX_RECORD."""
    from tcpcopylib.session import options

    assert options.MAX_BATCH_PKTS == records.MAX_BATCH_PKTS
    n = records.MAX_BATCH_PKTS
    big = records.encode_pkts([T0] * n, [bytes(65535)] * n, list(range(n)))
    assert len(big) <= MAX_RECORD
    assert len(StreamParser().feed(HDR + big)) == n
    r = call(["tc-session", "--no-feedback", "--target", "10.0.0.1:80", "-B", str(n + 1)],
             input=stream([]))
    assert r.returncode == 2


def test_due_queue_warns_about_waits_not_about_idle_input():
    from tcpcopylib.session.timing import DueQueue

    said = []
    h = 3600 * 10**9
    q = DueQueue(warn=said.append)
    q.push_records([(T0, b"a"), (T0 + 2 * h, b"b")], 10**9, None)
    assert len(said) == 1 and q.q[-1][0] == 10**9 + 2 * h  # a wait: warned, kept
    said.clear()
    live = DueQueue(warn=said.append)  # live input idle for 2 hours: due now, no warning
    live.push_records([(T0, b"a")], 10**9, None)
    live.push_records([(T0 + 2 * h, b"b")], 10**9 + 2 * h, None)
    asap = DueQueue(asap=True, warn=said.append)
    asap.push_records([(T0, b"a")], 10**9, None)
    asap.push_records([(T0 + 2 * h, b"b")], 10**9 + 2 * h, None)
    assert said == []
    clamped = DueQueue(max_gap=1.0, warn=said.append)
    clamped.push_records([(T0, b"a"), (T0 + 2 * h, b"b"), (T0 + 2 * h + 5, b"c")], 10**9, None)
    assert [d for d, _ in clamped.q] == [10**9, 2 * 10**9, 2 * 10**9 + 5] and said == []


@pytest.mark.parametrize("ts", [10**5000, 1 << 70, -(10**30)], ids=["bignum", "2^70", "negative"])
@pytest.mark.parametrize("tool", [["tc-pace"],
                                  ["tc-session", "--no-feedback", "--target", "10.0.0.1:80"]])
def test_a_timestamp_beyond_64_bits_is_65(tool, ts):
    """(It overflowed a float or a sleep: exit 1.)"""
    r = call(tool, input=stream([PKT, dict(PKT, ts=ts)]))
    one_line_error(r, 65)
    assert b"64 bits" in r.stderr
