"""tc-diff without root: the comparers, endpoint templates, and the tool on synthetic
captures, session maps and target replies (tests/diffdata.py)."""

import gzip
import json

import pytest

import tc
from diffdata import MS, Side, fb_records, sess_record, write_pcap, write_stream
from tcpcopylib.diff import http, raw, resp
from tcpcopylib.diff.model import Message


def _resp(text: bytes, method="GET"):
    (m,) = http.split_responses(text, [Message(0, 0, {"method": method})])
    return m


def _fields(diffs, noise=False):
    return sorted(d.field for d in diffs if bool(d.noise) == noise)


# -- HTTP ------------------------------------------------------------------------------------
def test_http_chunked_and_gzip_bodies_compare_decoded():
    body = b'{"a": 1, "b": [1, 2, {"c": "x"}]}'
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" \
        % len(body) + body
    z = gzip.compress(body)
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
               b"\r\n\r\n" + b"%x\r\n" % 10 + body[:10] + b"\r\n" + b"%x\r\n" % (len(body) - 10)
               + body[10:] + b"\r\n0\r\n\r\n")
    zipped = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n" \
        b"Content-Length: %d\r\n\r\n" % len(z) + z
    a, b, c = _resp(plain), _resp(chunked), _resp(zipped)
    assert http.compare(None, a, b) == []
    assert _fields(http.compare(None, a, c)) == ["header:content-encoding"]  # body equal


def test_http_json_compared_as_data_with_paths():
    def r(body):
        return _resp(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    a = r(b'{"id": 7, "items": [{"n": 1}, {"n": 2}], "x": "same"}')
    b = r(b'{"x":"same","items":[{"n":1},{"n":3}],"id":7}')  # other order, one value
    assert _fields(http.compare(None, a, a)) == []
    assert _fields(http.compare(None, a, b)) == ["body:$.items[1].n"]
    c = r(b'{"id": 7, "items": [{"n": 1}]}')
    assert _fields(http.compare(None, a, c)) == ["body:$.items[1]", "body:$.x"]


def test_http_status_header_and_default_noise():
    a = _resp(b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nETag: \"1\"\r\n"
              b"Set-Cookie: sid=abc; Path=/\r\nX-Mine: 1\r\nContent-Length: 2\r\n\r\nok")
    b = _resp(b"HTTP/1.1 404 Not Found\r\nDate: Tue, 02 Jan 2024 00:00:00 GMT\r\nETag: \"2\"\r\n"
              b"Set-Cookie: sid=zzz; Path=/\r\nContent-Length: 2\r\n\r\nok")
    d = http.compare(None, a, b)
    assert _fields(d) == ["header:x-mine", "status"]
    assert _fields(d, noise=True) == ["header:date", "header:etag", "header:set-cookie"]
    body_differs = _resp(b"HTTP/1.1 200 OK\r\nETag: \"2\"\r\nContent-Length: 2\r\n\r\nno")
    assert "header:etag" in _fields(http.compare(None, a, body_differs))  # real, then


def test_http_pipelined_requests_head_and_interim_responses():
    reqs = http.split_requests(b"HEAD /x/123 HTTP/1.1\r\n\r\nPOST /api/v1/users/42/orders/"
                               b"9f8e7d6c5b4a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /?q=1"
                               b" HTTP/1.0\r\n\r\n")
    assert [r.endpoint for r in reqs] == ["HEAD /x/{n}", "POST /api/v1/users/{n}/orders/{id}",
                                          "GET /"]
    stream = (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"  # HEAD: no body
              b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nZ"
              b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    got = http.split_responses(stream, reqs)
    assert [m.info["status"] for m in got] == [200, 201, 200]
    assert got[2].info["body"] == b"until the end"
    assert http.split_responses(stream[:30], reqs)[1:] == [None, None]


def test_http_garbage_response_is_unparsable():
    with pytest.raises(http.Unparsable):
        _resp(b"SSH-2.0-OpenSSH\r\n\r\n")


# -- RESP ------------------------------------------------------------------------------------
def test_resp_commands_replies_types_and_values():
    reqs = resp.split_requests(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nping\r\n"
                               b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\nb\r\nINFO server\r\n")
    assert [r.endpoint for r in reqs] == ["GET", "PING", "MGET", "INFO"]
    a = resp.split_responses(b"$3\r\nbar\r\n+PONG\r\n*2\r\n$1\r\n1\r\n$-1\r\n$2\r\nok\r\n", reqs)
    b = resp.split_responses(b"$3\r\nbaz\r\n+PONG\r\n*2\r\n$1\r\n1\r\n:5\r\n-ERR x\r\n", reqs)
    assert [_fields(resp.compare(r, x, y)) for r, x, y in zip(reqs, a, b)] == [
        ["resp:value"], [], ["resp:type[1]"], ["resp:type"]]
    assert resp.split_responses(b"$3\r\nbar\r\n", reqs)[1:] == [None, None, None]


# -- raw -------------------------------------------------------------------------------------
def test_raw_first_difference_in_context():
    a = Message(0, 0, {"bytes": b"x" * 100 + b"HELLO" + b"y" * 100})
    b = Message(0, 0, {"bytes": b"x" * 100 + b"HELLo" + b"y" * 100})
    (d,) = raw.compare(None, a, b)
    assert d.at == 104 and "HELLO" in d.a and "HELLo" in d.b and len(d.a) < 80
    assert raw.compare(None, a, a) == []


# -- the tool on synthetic inputs -------------------------------------------------------------
SERVER, TARGET = ("10.0.0.2", 80), ("10.9.0.2", 8080)


def _http(status=200, body=b"hello", extra=b"", date=b"Mon, 01 Jan 2024 00:00:00 GMT"):
    return (b"HTTP/1.1 %d X\r\nDate: %s\r\n%sContent-Length: %d\r\n\r\n"
            % (status, date, extra, len(body)) + body)


def _scenario(tmp_path, n_conns=4, target_tweak=None, delay=None, copies=2, failed=()):
    """n_conns keep-alive connections of 3 requests; the target answers as target_tweak
    says (conn, i, response) -> response, `delay` ms later on /slow; copy 1 differs from
    copy 0 by an X-Id header (noise to learn)."""
    orig, maps, fbs = [], [], []
    t = 1_700_000_000 * 10**9
    for c in range(n_conns):
        client = ("10.0.0.1", 40000 + c)
        o = Side(client, SERVER, t + c * 50 * MS)
        reps = [Side((client[0], client[1] + 1000 * k), TARGET,  # copies: other ports
                     t + 10**10 + c * 50 * MS + k * 5 * MS, isn_s=7000 + k)
                for k in range(copies)]
        for i, path in enumerate((b"/a/%d" % c, b"/slow", b"/json")):
            req = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path
            body = b'{"v": %d}' % i if path == b"/json" else b"body of " + path
            good = _http(body=body)
            o.exchange(req, good, 5)
            for k, r in enumerate(reps):
                answer = _http(body=body, extra=b"X-Id: %d\r\n" % (c * 10 + k),
                               date=b"Tue, 02 Jan 2024 00:00:00 GMT")
                if target_tweak:
                    answer = target_tweak(c, i, answer)
                r.exchange(req, answer, 5 + (delay if delay and path == b"/slow" else 0))
        o.close()
        orig += o.pkts
        for k, r in enumerate(reps):
            r.close()
            if c in failed:
                maps.append(sess_record(c * 10 + k, o, None, "no_synack", copy=k))
                continue
            maps.append(sess_record(c * 10 + k, o, r, copy=k))
            fbs += fb_records(r)
    write_pcap(tmp_path / "orig.pcap", orig)
    write_stream(tmp_path / "map.cbor", maps)
    write_stream(tmp_path / "fb.cbor", sorted(fbs, key=lambda r: r["ts"]))
    return [tmp_path / "orig.pcap", "--sessions", tmp_path / "map.cbor", "--target",
            tmp_path / "fb.cbor"]


def _run(args):
    r = tc.run(["tc-diff", *args])
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    return r, lines


def test_same_answers_are_same_with_date_and_learned_noise(tmp_path):
    r, lines = _run(_scenario(tmp_path))
    assert r.returncode == 0, r.stderr
    assert len(lines) == 12 and {x["verdict"] for x in lines} == {"same"}
    noise = {d["field"]: d["noise"] for x in lines for d in x["noise"]}
    assert noise == {"header:date": "default", "header:x-id": "learned"}
    assert b"12 exchanges on 4 connections: 12 same, 0 different, 0 missing" in r.stderr
    # without a second copy there is nothing to learn from: X-Id is a difference
    r1, lines1 = _run(_scenario(tmp_path, copies=1))
    assert r1.returncode == 1 and {x["verdict"] for x in lines1} == {"different"}
    # unless ignored by name
    r2, lines2 = _run(_scenario(tmp_path, copies=1) + ["--ignore", "header:x-*"])
    assert r2.returncode == 0 and {d["noise"] for x in lines2 for d in x["noise"]} == {
        "default", "ignored"}


def test_chosen_differences_and_the_latency_shift(tmp_path):
    def tweak(c, i, answer):
        if c == 1 and i == 0:
            return answer.replace(b"200 X", b"500 X")
        if c == 2 and i == 2:
            return answer.replace(b'{"v": 2}', b'{"v": 9}')
        return answer
    r, lines = _run(_scenario(tmp_path, target_tweak=tweak, delay=50))
    assert r.returncode == 1
    bad = {(x["conn"], x["exchange"]): [d["field"] for d in x["differences"]]
           for x in lines if x["verdict"] != "same"}
    assert bad == {(1, 0): ["status"], (2, 2): ["body:$.v"]}
    slow = [x for x in lines if x["endpoint"] == "GET /slow"]
    for x in slow:
        shift = x["latency_ms"]["target"]["last"] - x["latency_ms"]["original"]["last"]
        assert abs(shift - 50) < 1, x
    fast = [x for x in lines if x["endpoint"] == "GET /json"]
    assert all(abs(x["latency_ms"]["target"]["first"] - x["latency_ms"]["original"]["first"])
               < 1 for x in fast)
    assert b"GET /slow: 4, 0, 0;" in r.stderr and b"(+50.0)" in r.stderr
    assert b"GET /a/{n}: 4, 1, 0" in r.stderr


def test_a_failed_session_is_missing_with_its_outcome(tmp_path):
    r, lines = _run(_scenario(tmp_path, failed=(3,)))
    assert r.returncode == 1
    missing = [x for x in lines if x["verdict"] == "missing"]
    assert len(missing) == 3 and {x["outcome"] for x in missing} == {"no_synack"}
    assert {x["conn"] for x in missing} == {3}
    assert b"missing: 10.0.0.1:40003 #0 GET /a/3 HTTP/1.1: no response from the target " \
        b"(session no_synack)" in r.stderr


def test_garbage_and_mismatched_inputs(tmp_path):
    args = _scenario(tmp_path, n_conns=1)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"this is not a capture nor a stream\n" * 10)
    for i, what in ((0, "original"), (2, "map"), (4, "target")):
        bad = list(args)
        bad[i] = garbage
        r = tc.run(["tc-diff", *bad])
        assert r.returncode == 65, (what, r.stderr)
        assert r.stderr.count(b"\n") == 1 and b"tc-diff: error:" in r.stderr
    r = tc.run(["tc-diff", *args[:-1], tmp_path / "nope.cbor"])
    assert r.returncode == 66 and r.stderr.count(b"\n") == 1
    # a map of another capture
    other = tmp_path / "other"
    other.mkdir()
    oargs = _scenario(other, n_conns=1)
    write_stream(other / "map.cbor", [dict(sess_record(1, Side(("10.7.7.7", 1), SERVER, 0),
                                                       None), outcome="completed")])
    r = tc.run(["tc-diff", args[0], "--sessions", oargs[2], "--target", args[4]])
    assert r.returncode == 65 and b"matches no connection" in r.stderr
    # replies captured without payload
    fb = [dict(rec, data=rec["data"][:40], len=len(rec["data"]))
          for rec in tc.decode((tmp_path / "fb.cbor").read_bytes())]
    write_stream(tmp_path / "nopayload.cbor", fb)
    r = tc.run(["tc-diff", *args[:-1], tmp_path / "nopayload.cbor"])
    assert r.returncode == 65 and b"--payload all" in r.stderr
    r = tc.run(["tc-diff", args[0]])
    assert r.returncode == 2


def test_raw_protocol_by_turns(tmp_path):
    client = ("10.0.0.1", 41000)
    o = Side(client, SERVER, 10**18)
    t = Side(client, TARGET, 10**18 + 10**10)
    for i, (q, a, b) in enumerate(((b"HELO x\n", b"250 ok\n", b"250 ok\n"),
                                   (b"DATA 1\n", b"354 go\n", b"354 go\n"),
                                   (b"QUIT\n", b"221 bye\n", b"221 ciao\n"))):
        o.exchange(q, a, 3)
        t.exchange(q, b, 3 + 20 * (i == 1))
    o.close()
    t.close()
    write_pcap(tmp_path / "o.pcap", o.pkts)
    write_stream(tmp_path / "m.cbor", [sess_record(1, o, t)])
    write_stream(tmp_path / "f.cbor", fb_records(t))
    r, lines = _run([tmp_path / "o.pcap", "-s", tmp_path / "m.cbor", "-t", tmp_path / "f.cbor"])
    assert [(x["proto"], x["endpoint"], x["verdict"]) for x in lines] == [
        ("raw", "HELO", "same"), ("raw", "DATA", "same"), ("raw", "QUIT", "different")]
    assert lines[2]["differences"][0]["at"] == 4
    shift = lines[1]["latency_ms"]["target"]["last"] - lines[1]["latency_ms"]["original"]["last"]
    assert abs(shift - 20) < 1
