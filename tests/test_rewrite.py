"""tc-rewrite's engine (tcpcopylib.filters.stream, rules, http) without a network: the
rewritten stream and its sequence numbers, whatever the segmentation, retransmissions and
reordering of the captured one; bounds; the tool in process; tc-session's engine fed with
the rewritten packets sends the target exactly the rewritten stream."""

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tc import call, decode, stream
from tcpcopylib.filters.rules import RuleSet, make_rule, parse_rule_file
from tcpcopylib.filters.stream import MAX_SEG, StreamRewriter
from tcpcopylib.packet import (TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, build_tcp, parse_tcp,
                               tcp_checksum_ok)

A4, B4 = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.5")
A6, B6 = (socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
          socket.inet_pton(socket.AF_INET6, "2001:db8::5"))
ISN = 0xFFFFFF00  # the client's numbers wrap in the middle of the stream
SACK = 7777       # the captured ack (the online server's bytes): never changed


def client_pkts(stream_bytes, cuts, src=A4, dst=B4, syn=True, fin=True, sport=40000):
    """A client's packets carrying stream_bytes cut at `cuts`."""
    out = [build_tcp(src, dst, sport, 80, ISN, 0, TH_SYN)] if syn else []
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(stream_bytes))), len(stream_bytes)]
    for a, b in zip(bounds, bounds[1:]):
        out.append(build_tcp(src, dst, sport, 80, ISN + 1 + a, SACK, TH_ACK | TH_PSH,
                             payload=stream_bytes[a:b]))
    if fin:
        out.append(build_tcp(src, dst, sport, 80, ISN + 1 + len(stream_bytes), SACK,
                             TH_ACK | TH_FIN))
    return out


def run(rules, pkts, http=None, **kw):
    """(output datagrams, rewriter): pkts through a StreamRewriter of these rules."""
    rs = RuleSet([make_rule(k, w) for k, *w in rules], http)
    rw = StreamRewriter(rs.make_transform, **kw)
    out = []
    for i, d in enumerate(pkts):
        r = rw.packet(i, d)
        out += [d] if r is None else [x[1] for x in r]
    out += [x[1] for x in rw.finish(len(pkts))]
    rw.ruleset = rs
    return out, rw


def client_stream(out, isn=ISN, sport=40000):
    """The client's bytes in the output, checking that they are numbered back to back
    from the ISN, that checksums are right and that acks are the captured ones."""
    data = b""
    fin = None
    for d in out:
        assert tcp_checksum_ok(d)
        p = parse_tcp(d)
        if p.sport != sport:
            continue
        if p.flags & TH_SYN:
            assert p.seq == isn
            continue
        if p.payload_len:
            assert p.seq == (isn + 1 + len(data)) & 0xFFFFFFFF, "a gap or overlap in the output"
            assert p.ack == SACK
            assert p.payload_len <= MAX_SEG
            data += p.payload
        if p.flags & TH_FIN:
            fin = p.seq
    return data, fin


def http_request(method, path, host, body=b"", extra=b""):
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (method, path, host, extra)
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


HOST_RULES = [("host", "test.internal.example"), ("replace", "token=PRODSECRET", "token=t")]


def expected_host_rewrite(reqs):
    out = b""
    for method, path, body in reqs:
        nb = body.replace(b"token=PRODSECRET", b"token=t")
        out += http_request(method, path, b"test.internal.example", nb)
    return out


REQS = [(b"POST", b"/api/a", b"x=1&token=PRODSECRET&y=2"), (b"GET", b"/", b""),
        (b"POST", b"/api/b", b"token=PRODSECRET" * 3)]
ORIG = b"".join(http_request(m, p, b"prod.example.com", b) for m, p, b in REQS)


def test_http_host_and_body_token_any_length():
    out, rw = run(HOST_RULES, client_pkts(ORIG, [5, 60, 61, 200]))
    data, fin = client_stream(out)
    assert data == expected_host_rewrite(REQS)
    assert fin == (ISN + 1 + len(data)) & 0xFFFFFFFF
    assert rw.ruleset.counts() == {"host test.internal.example": 3,
                                   "replace token=PRODSECRET token=t": 4}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(ORIG)), max_size=12), st.randoms())
def test_any_segmentation_retransmission_and_reordering_gives_the_same_stream(cuts, rnd):
    pkts = client_pkts(ORIG, cuts)
    syn, data_pkts, fin = pkts[0], pkts[1:-1], pkts[-1]
    # retransmit some segments, swap some neighbours (the capture's reordering)
    mixed = []
    for d in data_pkts:
        mixed.append(d)
        if rnd.random() < 0.3:
            mixed.append(d)
    for i in range(len(mixed) - 1):
        if rnd.random() < 0.2:
            mixed[i], mixed[i + 1] = mixed[i + 1], mixed[i]
    out, rw = run(HOST_RULES, [syn, *mixed, fin])
    data, fin_seq = client_stream(out)
    assert data == expected_host_rewrite(REQS)
    assert fin_seq == (ISN + 1 + len(data)) & 0xFFFFFFFF
    assert rw.st.cut == rw.st.dropped == 0


def test_header_split_over_two_segments_is_rewritten():
    req = http_request(b"GET", b"/", b"prod.example.com", extra=b"Authorization: Bearer P\r\n")
    cut = req.index(b"Authorization") + 8  # inside the header's name
    out, _ = run([("header-set", "Authorization", "Bearer TEST")], client_pkts(req, [cut]))
    data, _ = client_stream(out)
    assert b"Authorization: Bearer TEST\r\n" in data and b"Bearer P\r\n" not in data


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=10))
def test_raw_substitutions_across_segments(cuts):
    raw = b"user=PROD1;" * 5 + b"tail tok=abc; more tok=zz" + b";" + b"x" * 40
    want = raw.replace(b"PROD1", b"T").replace(b"tok=abc;", b"tok=<abc>;").replace(
        b"tok=zz;", b"tok=<zz>;")
    out, _ = run([("replace", "PROD1", "T"), ("regex", r"tok=([a-z]+);", r"tok=<\1>;")],
                 client_pkts(raw, cuts))
    assert client_stream(out)[0] == want


def test_pure_acks_after_a_length_change_are_renumbered():
    pkts = client_pkts(b"aaaa-PROD-bbbb", [6])
    pkts.insert(3, build_tcp(A4, B4, 40000, 80, ISN + 15, SACK + 100, TH_ACK))
    fin_ack = build_tcp(A4, B4, 40000, 80, ISN + 16, SACK + 101, TH_ACK)
    out, _ = run([("replace", "PROD", "TESTING")], [*pkts, fin_ack])
    ps = [parse_tcp(d) for d in out]
    assert [p.seq for p in ps if not p.payload_len and p.flags == TH_ACK] == [
        (ISN + 15 + 3) & 0xFFFFFFFF, (ISN + 16 + 3) & 0xFFFFFFFF]
    assert client_stream(out)[0] == b"aaaa-TESTING-bbbb"


def test_ipv6_and_server_packets_pass_unchanged():
    pkts = client_pkts(ORIG, [30], src=A6, dst=B6)
    server = build_tcp(B6, A6, 80, 40000, 5000, ISN + 1, TH_ACK, payload=b"HTTP/1.1 200 OK\r\n")
    out, _ = run(HOST_RULES, [pkts[0], server, *pkts[1:]])
    assert server in out
    assert client_stream(out)[0] == expected_host_rewrite(REQS)


def test_pipelined_keepalive_and_chunked():
    chunked = (b"POST /c HTTP/1.1\r\nHost: prod\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\ntoken\r\n10\r\n=PRODSECRET&a=12\r\n0\r\n\r\n")
    reqs = ORIG * 30 + chunked + ORIG
    out, _ = run(HOST_RULES, client_pkts(reqs, range(0, len(reqs), 1448)))
    data, _ = client_stream(out)
    assert data.count(b"Host: test.internal.example") == 30 * 3 + 1 + 3
    assert b"PRODSECRET" not in data.replace(b"token\r\n10\r\n=PRODSECRET", b"")  # (split)
    assert b"0\r\n\r\n" in data


def test_one_megabyte_body_is_held_and_rewritten_within_the_bound():
    body = b"token=PRODSECRET&" + b"z" * (1 << 20)
    req = http_request(b"POST", b"/upload", b"prod", body)
    out, rw = run(HOST_RULES, client_pkts(req, range(0, len(req), 1448)))
    data, _ = client_stream(out)
    new_body = body.replace(b"token=PRODSECRET", b"token=t")
    assert data == http_request(b"POST", b"/upload", b"test.internal.example", new_body)
    assert rw.st.held_peak >= len(body) - 1448  # (held until its last segment)


def test_past_the_bound_the_session_is_dropped_whole_or_cut():
    body = b"q" * 5000
    req = http_request(b"POST", b"/x", b"prod", body)
    # the first request is over the bound: nothing went out, not even the SYN
    out, rw = run(HOST_RULES, client_pkts(req, range(0, len(req), 1000)), max_hold=3000)
    assert not [d for d in out if parse_tcp(d).sport == 40000]
    assert rw.st.dropped == 1
    # a small request first, then one over the bound: cut by an RST after the first
    small = http_request(b"GET", b"/", b"prod")
    out, rw = run(HOST_RULES, client_pkts(small + req, range(0, len(small + req), 1000)),
                  max_hold=3000)
    ps = [parse_tcp(d) for d in out]
    assert ps[-1].flags & TH_RST and ps[-1].seq == (ISN + 1 + len(
        http_request(b"GET", b"/", b"test.internal.example"))) & 0xFFFFFFFF
    assert client_stream(out)[0] == http_request(b"GET", b"/", b"test.internal.example")
    assert rw.st.cut == 1


def test_not_http_passes_unchanged_in_http_mode():
    redis = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    out, _ = run(HOST_RULES, client_pkts(redis, [7]))
    assert client_stream(out)[0] == redis


def test_rule_file(tmp_path):
    f = tmp_path / "rules"
    f.write_text("# test environment\nhost test.internal.example\n"
                 "replace token=PRODSECRET token=t  # the token\n"
                 "url '^/api/(.*)' '/v2/\\1'\nheader-remove X-Debug\n")
    rules = parse_rule_file(str(f))
    assert [r.kind for r in rules] == ["host", "replace", "url", "header-remove"]
    bad = tmp_path / "bad"
    bad.write_text("host a b\n")
    from tcpcopylib.errors import UsageError

    with pytest.raises(UsageError, match="bad:1"):
        parse_rule_file(str(bad))


def test_tool_in_process_passes_other_records_unchanged(tmp_path):
    pkts = client_pkts(ORIG, [40])
    records = [{"t": "pkt", "ts": 1_700_000_000_000_000_000 + i, "data": d}
               for i, d in enumerate(pkts)]
    records.insert(2, {"t": "s2c", "ts": 1_700_000_000_000_000_001,
                       "data": build_tcp(B4, A4, 80, 40000, 1, ISN + 1, TH_ACK)})
    records.insert(3, {"t": "note", "x": [1, 2]})
    r = call(["tc-rewrite", "--host", "test.internal.example", "--replace",
              "token=PRODSECRET", "token=t", "--stats-json", str(tmp_path / "s.json")],
             input=stream(records))
    assert r.returncode == 0, r.stderr
    got = decode(r.stdout)
    assert records[2] in got and records[3] in got
    assert client_stream([g["data"] for g in got if g["t"] == "pkt"])[0] == \
        expected_host_rewrite(REQS)
    import json

    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["rules"]["host test.internal.example"] == 3


def test_engine_sends_the_target_the_rewritten_stream():
    """tc-session's engine, unchanged, fed with the rewritten packets: the target gets
    the rewritten bytes once each, in order, the FIN after them, nothing retransmitted."""
    from tcpcopylib.testing import CLIENT, ONLINE, EngineRig

    rig = EngineRig()
    cisn, tisn, _ = rig.isns
    src = build_tcp  # (readability)
    orig = ORIG
    cuts = [10, 100, 101, 250]
    bounds = [0, *cuts, len(orig)]
    pkts = [src(CLIENT, ONLINE, 5000, 80, int(cisn), 0, TH_SYN, options=b"\x02\x04\x05\xb4")]
    for a, b in zip(bounds, bounds[1:]):
        pkts.append(src(CLIENT, ONLINE, 5000, 80, int(cisn) + 1 + a, SACK, TH_ACK | TH_PSH,
                        payload=orig[a:b]))
        pkts.append(pkts[-1])  # a captured retransmission of each
    pkts.append(src(CLIENT, ONLINE, 5000, 80, int(cisn) + 1 + len(orig), SACK,
                    TH_ACK | TH_FIN))
    out, _ = run(HOST_RULES, pkts)
    got = bytearray()

    def respond(p):  # the target acks every byte at once
        if p.flags & TH_SYN:
            return [src(p.dst, p.src, p.dport, p.sport, int(tisn), p.seq + 1,
                        TH_SYN | TH_ACK, options=b"\x02\x04\x05\xb4")]
        if p.payload_len or p.flags & TH_FIN:
            if p.payload_len:
                assert p.seq - (int(cisn) + 1) == len(got), "out of order or resent"
                got.extend(p.payload)
            fin = p.flags & TH_FIN  # the target closes too
            return [src(p.dst, p.src, p.dport, p.sport, int(tisn) + 1,
                        p.seq + p.payload_len + (1 if fin else 0), TH_ACK | fin)]
        return []

    rig.respond = respond
    for d in out:
        rig.e.client_packet(d, rig.now)
        rig.pump()
        rig.advance(1)
    rig.advance(20000)
    assert bytes(got) == expected_host_rewrite(REQS)
    assert rig.e.st.retransmits == 0
    assert rig.outcomes() == {"completed": 1}


def test_connection_seen_mid_stream_counts_from_its_first_byte():
    out, _ = run(HOST_RULES, client_pkts(ORIG, [50, 120], syn=False))
    data, fin = client_stream(out)  # (numbered from ISN + 1: the first captured byte)
    assert data == expected_host_rewrite(REQS)


def test_user_filter_tag_and_drop_through_the_engine():
    from tcpcopylib.filters import Filter

    class Tagger(Filter):
        def data(self, conn, data, end):
            if conn.first:
                if data.startswith(b"GET /health"):
                    conn.drop()
                conn.tag("first=" + data[:4].decode())
            return data.upper()

    rw = StreamRewriter(Tagger().transform)
    outs = []
    for i, d in enumerate(client_pkts(b"post /x", [3]) +
                          client_pkts(b"GET /health", [], sport=40001)):
        r = rw.packet(i, d)
        outs += [(d, None)] if r is None else [(x[1], x[2]) for x in r]
    assert {parse_tcp(d).sport for d, _ in outs} == {40000}  # the health check: none of it
    assert {tag for _, tag in outs} == {"first=pos"}  # the SYN too (it waited)
    assert b"".join(parse_tcp(d).payload for d, _ in outs) == b"POST /X"
    assert rw.st.dropped == 1


def test_a_new_connection_on_the_same_4_tuple():
    first = client_pkts(b"GET /1 HTTP/1.1\r\nHost: prod\r\n\r\n", [10])
    second = [build_tcp(A4, B4, 40000, 80, 90000, 0, TH_SYN),
              build_tcp(A4, B4, 40000, 80, 90001, SACK, TH_ACK | TH_PSH,
                        payload=b"GET /2 HTTP/1.1\r\nHost: prod\r\n\r\n")]
    out, rw = run(HOST_RULES, first[:-1] + second)  # (the first one's FIN not captured)
    ps = [parse_tcp(d) for d in out]
    assert [p.seq for p in ps if p.flags & TH_SYN] == [ISN, 90000]
    assert client_stream(out[:len(out) - 2])[0] == b"GET /1 HTTP/1.1\r\nHost: test.internal.example\r\n\r\n"
    assert ps[-1].seq == 90001 and ps[-1].payload == b"GET /2 HTTP/1.1\r\nHost: test.internal.example\r\n\r\n"
    assert rw.st.conns == 2


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([b"GET / HTTP/1.1\r\n", b"Host: prod\r\n", b"\r\n",
                                 b"Content-Length: 5\r\n", b"Content-Length: x\r\n",
                                 b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n",
                                 b"0\r\n", b"token=PRODSECRET", b"\x00\xff", b"POST /a HTTP/1.0"]),
                max_size=25),
       st.lists(st.integers(0, 400), max_size=8), st.booleans())
def test_any_client_bytes_give_a_well_formed_stream(parts, cuts, fin):
    """Whatever a client sent (HTTP or not, well-formed or not), the output is numbered
    back to back, or the connection is dropped whole or cut by an RST: never an
    exception, never a gap."""
    raw = b"".join(parts)
    out, rw = run(HOST_RULES, client_pkts(raw, cuts, fin=fin))
    data, _ = client_stream(out)
    rsts = [p for p in map(parse_tcp, out) if p.flags & TH_RST]
    assert len(rsts) == rw.st.cut
    assert rw.st.cut + rw.st.dropped <= 1
    if not rw.st.cut and not rw.st.dropped and not any(rw.ruleset.counts().values()):
        assert data == raw  # no rule applied (a `host` rule also adds a missing Host)
