import os

import cbor2
import pytest

from tc import decode, run, stream
from tcpcopylib.errors import StreamError
from tcpcopylib.records import FORMAT_VERSION, LABEL, RecordReader, RecordWriter, header


def test_label_spells_tcpr_cbor():
    assert LABEL[4:] == b"TCPRCBOR"
    assert cbor2.loads(LABEL).tag == 55800


def test_round_trip_and_concatenation():
    a = stream([{"t": "pkt", "ts": i, "data": b"x" * i} for i in range(100)], "a")
    b = stream([{"t": "other", "k": [1, 2]}], "b")
    recs = decode(a + b, headers=True)
    assert [r["t"] for r in recs] == ["header"] + ["pkt"] * 100 + ["header", "other"]
    assert recs[101]["tool"] == "b"
    assert recs[50]["data"] == b"x" * 49


def test_writer_batches_until_flush():
    r, w = os.pipe()
    wr = RecordWriter(w, header("t"), bufsize=1 << 20)
    wr.write({"t": "pkt", "ts": 1, "data": b"a"})
    os.set_blocking(r, False)
    with pytest.raises(BlockingIOError):
        os.read(r, 100)  # nothing written yet: batched
    wr.flush()
    assert os.read(r, 1000).startswith(LABEL)
    os.close(r)
    os.close(w)


def test_reader_yields_before_eof():
    """A record is delivered as soon as its bytes arrive, without waiting for more."""
    r, w = os.pipe()
    os.write(w, stream([{"t": "pkt", "ts": 1, "data": b"a"}]))
    it = iter(RecordReader(r))
    assert next(it)["ts"] == 1  # would block forever if the reader waited for a full chunk
    os.close(w)
    assert list(it) == []
    os.close(r)


def test_on_idle_called_before_blocking_read():
    calls = []
    r, w = os.pipe()
    os.write(w, stream([{"t": "pkt", "ts": 1, "data": b""}]))
    os.close(w)
    list(RecordReader(r, on_idle=lambda: calls.append(1)))
    assert len(calls) >= 2
    os.close(r)


@pytest.mark.parametrize("data, message", [
    (b"GET / HTTP/1.1\r\n", "not a tcpcopy record stream"),
    (b"", "empty input"),  # (every writer writes its label and header at once)
    (LABEL + cbor2.dumps({"t": "header", "v": FORMAT_VERSION + 1}), "newer"),
    (LABEL + cbor2.dumps({"t": "pkt"}), "not followed by a header"),
    (stream([{"t": "pkt", "ts": 1, "data": b"abcdef"}])[:-3], "truncated"),
    (stream([]) + cbor2.dumps(5), "unexpected int"),
    (stream([]) + b"\xff\xff\xff", "not a valid record"),
])
def test_bad_streams(data, message):
    if message is None:
        assert decode(data) == []
        return
    with pytest.raises(StreamError, match=message):
        decode(data)


def test_tool_help_from_checkout():
    r = run(["tc-session", "--help"])
    assert r.returncode == 0 and b"usage: tc-session" in r.stdout


def test_stage_writer_writes_nothing_before_the_input_header():
    """StageWriter: no bytes until an input header is known; each input header starts a
    section merged with it; records with no input header at all get the tool's header."""
    from tcpcopylib.records import StageWriter

    r, w = os.pipe()
    try:
        sw = StageWriter(w, "tc-x", mode="m")
        sw.flush()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
        sw.write({"t": "header", "v": 1, "tool": "up", "src": "a"})
        sw.write({"t": "n", "i": 1})
        sw.write({"t": "header", "v": 1, "tool": "up2"})
        sw.flush()
        got = decode(os.read(r, 1 << 16), headers=True)
        lone = StageWriter(w, "tc-x")
        lone.write({"t": "n", "i": 2})
        lone.flush()
        alone = decode(os.read(r, 1 << 16), headers=True)
    finally:
        os.close(r)
        os.close(w)
    assert [(h["tool"], h.get("upstream"), h.get("src"), h["mode"]) for h in got
            if h["t"] == "header"] == [("tc-x", "up", "a", "m"), ("tc-x", "up2", None, "m")]
    assert [x["t"] for x in got] == ["header", "n", "header"]
    assert [x["t"] for x in alone] == ["header", "n"] and "upstream" not in alone[0]
