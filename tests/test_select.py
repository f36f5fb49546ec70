"""tc-select (tcpcopylib.filters.select) without a network: sessions kept or dropped whole
on their first request (HTTP method/path, header, redis command, bytes), across segment
boundaries; records of other kinds and the server's packets follow their session; the
tool in process with its counters; and the user filter API's example in a pipe."""

import json
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tc import REPO, call, decode, stream, tool_env
from tcpcopylib.errors import UsageError
from tcpcopylib.filters.select import SelectRule, Selector, first_request, resp_command
from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_SYN, build_tcp, parse_tcp

A, B = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.5")
TS0 = 1_700_000_000_000_000_000


def session(sport, data, cuts=(), dport=80, psh_last_only=False):
    """A client's SYN, data cut at `cuts`, FIN; and a server reply in the middle."""
    isn = 5000 + sport
    out = [build_tcp(A, B, sport, dport, isn, 0, TH_SYN)]
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(data)), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        last = b == len(data)
        out.append(build_tcp(A, B, sport, dport, isn + 1 + a, 1, TH_ACK | (
            TH_PSH if last or not psh_last_only else 0), payload=data[a:b]))
    out.insert(2, build_tcp(B, A, dport, sport, 0, isn + 1, TH_ACK | TH_SYN))
    out.append(build_tcp(A, B, sport, dport, isn + 1 + len(data), 1, TH_ACK | TH_FIN))
    return out


def interleave(*sessions):
    out = []
    for i in range(max(map(len, sessions))):
        out += [s[i] for s in sessions if i < len(s)]
    return out


def run(rules, pkts, **kw):
    sel = Selector([SelectRule(a, t) for a, t in rules], **kw)
    out = []
    for i, d in enumerate(pkts):
        out += sel.packet(i, d, d)
    return out + sel.finish(), sel


def ports(out):
    return {p.sport if p.dport in (80, 6379) else p.dport for p in map(parse_tcp, out)}


POST = b"POST /api/orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
RULES = [("keep", "http:POST /api/*"), ("keep", "redis:SET,INCR")]


def redis_cmd(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_keep_post_api_and_redis_writes_whole():
    sessions = {1001: session(1001, POST * 3), 1002: session(1002, GET),
                1003: session(1003, redis_cmd(b"set", b"k", b"v"), dport=6379),
                1004: session(1004, redis_cmd(b"GET", b"k"), dport=6379),
                1005: session(1005, redis_cmd(b"INCR", b"n") * 2, dport=6379)}
    pkts = interleave(*sessions.values())
    out, sel = run(RULES, pkts)
    assert ports(out) == {1001, 1003, 1005}
    for sport in (1001, 1003, 1005):  # whole: every packet of it, in its order
        assert [d for d in out if sport in (parse_tcp(d).sport, parse_tcp(d).dport)] == \
            sessions[sport]
    assert (sel.kept, sel.filtered) == (3, 2)
    assert sel.counts() == {"keep http:POST /api/*": 1, "keep redis:SET,INCR": 2,
                            "default drop": 2}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(POST)), max_size=8), st.booleans())
def test_the_decision_does_not_depend_on_segmentation(cuts, psh_last_only):
    out, _ = run(RULES, session(2000, POST, cuts, psh_last_only=psh_last_only))
    assert ports(out) == {2000}
    out, _ = run(RULES, session(2001, redis_cmd(b"SET", b"key", b"x" * 50), cuts,
                                dport=6379, psh_last_only=psh_last_only))
    assert ports(out) == {2001}
    out, _ = run(RULES, session(2002, GET, cuts, psh_last_only=psh_last_only))
    assert out == []


def test_header_bytes_and_drop_rules_first_match_decides():
    tenant = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Tenant: test-7\r\n\r\n"
    other = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Tenant: prod\r\n\r\n"
    binary = b"\x00\x01HELLO binary protocol"
    out, sel = run([("drop", "http:GET /health*"), ("keep", "header:X-Tenant=test-*"),
                    ("keep", r"bytes:HELLO\s")],
                   interleave(session(1, GET), session(2, tenant), session(3, other),
                              session(4, binary)))
    assert ports(out) == {2, 4}
    # drop rules only: the rest is kept
    out, _ = run([("drop", "http:GET /health*")], interleave(session(1, GET),
                                                            session(2, POST)))
    assert ports(out) == {2}


def test_the_servers_packets_held_before_the_decision_are_bounded():
    """A server that talks while the client's first request is still incomplete (a greeting
    that never ends) is held against max_hold too: past it the session is decided on what
    the client sent so far, and what was held goes on (kept) instead of growing."""
    isn = 7000
    pkts = [build_tcp(A, B, 4000, 80, isn, 0, TH_SYN),
            build_tcp(A, B, 4000, 80, isn + 1, 1, TH_ACK, payload=b"POST /api/x HT")]
    pkts += [build_tcp(B, A, 80, 4000, 1 + 1000 * i, isn + 15, TH_ACK, payload=b"g" * 1000)
             for i in range(10)]

    def feed(rules, max_hold):  # without finish(), which would decide what is pending
        sel = Selector([SelectRule(a, t) for a, t in rules], max_hold=max_hold)
        return [x for d in pkts for x in sel.packet(0, d, d)], sel

    out, sel = feed(RULES, 4096)
    assert not sel.pending and sel.sessions == 1
    assert sel.kept == 0 and sel.filtered == 1  # decided on "POST /api/x HT": no rule kept it
    out, sel = feed([("drop", "bytes:^GET")], 4096)
    assert not sel.pending and sel.kept == 1
    assert out == pkts  # everything held went on, in order
    out, sel = feed([("drop", "bytes:^GET")], 1 << 20)
    assert sel.pending and out == []  # below the bound: still waiting for the request


def test_rules_are_checked():
    for bad in ("nope", "http", "header:NoEquals", "redis:", "bytes:("):
        with pytest.raises(UsageError):
            SelectRule("keep", bad)
    with pytest.raises(UsageError):
        SelectRule("maybe", "redis:GET")


def test_first_request_needs_the_whole_head_or_command():
    assert first_request(POST[:20], True, False) is None
    assert first_request(POST, False, False).req.method == b"POST"
    assert resp_command(redis_cmd(b"SET", b"k", b"v")[:-3]) is None
    assert resp_command(redis_cmd(b"SET", b"k", b"v")) == [b"SET", b"k", b"v"]
    assert first_request(b"\x16\x03\x01", False, False) is None
    assert first_request(b"\x16\x03\x01", True, False).kind == "bytes"


def test_tool_in_process_counts_and_passes_other_records(tmp_path):
    pkts = interleave(session(1001, POST), session(1002, GET))
    recs = [{"t": "pkt", "ts": TS0 + i, "data": d} for i, d in enumerate(pkts)]
    recs.insert(3, {"t": "note", "n": 1})
    js = tmp_path / "s.json"
    r = call(["tc-select", "--keep", "http:POST /api/*", "--stats", "--stats-json", js],
             input=stream(recs))
    assert r.returncode == 0, r.stderr
    got = decode(r.stdout)
    assert {"t": "note", "n": 1} in got
    assert ports([g["data"] for g in got if g["t"] == "pkt"]) == {1001}
    d = json.loads(js.read_text())
    assert d["kept"] == 1 and d["outcomes"] == {"filtered": 1}
    assert d["rules"] == {"keep http:POST /api/*": 1, "default drop": 1}
    assert b"filtered 1" in r.stderr
    # the dropped session leaves a "filtered" record, which tc-session counts
    filt = [g for g in got if g["t"] == "filtered"]
    assert filt == [{"t": "filtered", "by": "tc-select", "rule": "default drop",
                     "client": "10.0.0.1:1002", "server": "10.0.0.5:80"}]
    js2 = tmp_path / "session.json"
    s = call(["tc-session", "--no-feedback", "--target", "10.0.0.9:80", "--drain", "0",
              "--stats-json", js2], input=r.stdout)
    assert s.returncode == 0, s.stderr
    assert json.loads(js2.read_text())["outcomes"]["filtered"] == 1
    assert filt[0] in decode(s.stdout)  # (and passed on)


def test_user_filter_example_runs_in_a_pipe():
    """examples/user-filter.py, the dozen-line filter of tcpcopy(7), between two tools."""
    body = b"tenant=prod&x=1"
    post = (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))
    pkts = interleave(session(1001, post, [30]), session(1002, GET))
    recs = [{"t": "pkt", "ts": TS0 + i, "data": d} for i, d in enumerate(pkts)]
    r = subprocess.run([sys.executable, str(REPO / "examples" / "user-filter.py"),
                        "--stats"], input=stream(recs), capture_output=True,
                       env=tool_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    got = [g["data"] for g in decode(r.stdout) if g["t"] == "pkt"]
    # the health check is dropped, SYN and all (the server's packets pass unchanged)
    assert {parse_tcp(d).sport for d in got if parse_tcp(d).dport == 80} == {1001}
    data = b"".join(parse_tcp(d).payload for d in got if parse_tcp(d).sport == 1001)
    assert b"tenant=test&x=1" in data and b"Content-Length: 15" in data
