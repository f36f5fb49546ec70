"""tcpcopylib.packet's IP/TCP parsing: parse_tcp (the general parser) and the fast
variants beside it, each checked against it on the same datagrams (IPv4 with and without
options, IPv6, TCP options, cut short, bytes changed, lengths that lie, garbage):
parse_tcp_fast (tc-session, tc-intercept), flow_bytes (tc-feedback's route_key and
reply_key), and intercept.fb_record built on them."""

from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from packetgen import A4, A6, B4, B6, TCP_OPTIONS, any_datagram, with_ip_options
from tcpcopylib.feedback import reply_key, route_key
from tcpcopylib.intercept import fb_record
from tcpcopylib.packet import (TH_ACK, TH_PSH, TH_SYN, build_tcp, flow_bytes, ip_length,
                               parse_tcp, parse_tcp_fast)

TS = 1_700_000_000_123_456_789
orig_lens = st.one_of(st.just(0), st.integers(0, 70000))  # a record's "len", or none
SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))


def fields(t):
    """What parse_tcp_fast must give for parse_tcp's view t."""
    if t is None:
        return None
    return (t.src, t.dst, t.ihl, t.sport, t.dport, t.seq, t.ack, t.doff, t.flags,
            t.window, t.length - t.ihl - t.doff)


# -- the general parser ----------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_parse_tcp_reads_every_field(src, dst):
    opts = TCP_OPTIONS[2]
    d = build_tcp(src, dst, 40000, 8080, 2**32 - 5, 77, TH_ACK | TH_PSH, 1234,
                  options=opts, payload=b"hello")
    t = parse_tcp(d)
    ihl = 20 if src == A4 else 40
    assert (t.version, t.src, t.dst, t.ihl, t.sport, t.dport, t.seq, t.ack, t.flags,
            t.window, t.doff) == (4 if src == A4 else 6, src, dst, ihl, 40000, 8080,
                                  2**32 - 5, 77, TH_ACK | TH_PSH, 1234, 32)
    assert t.options == opts and t.payload == b"hello"
    assert t.length == t.ip_len == len(d) and t.payload_len == 5
    # cut short: the view holds what is there, length says what was sent
    c = parse_tcp(d[:ihl + 32 + 2])
    assert (c.ip_len, c.payload_len, c.payload, c.length) == (ihl + 34, 2, b"he", len(d))
    # a record's "len" is the whole length of headers-only data
    h = parse_tcp(d[:ihl + 32], orig_len=len(d))
    assert (h.length, h.payload_len) == (len(d), 0)
    assert parse_tcp(d[:ihl + 31]) is None  # the TCP header must be whole
    assert parse_tcp(d, orig_len=ihl + 31) is None  # and within the datagram's length


def test_ip_length_and_where_the_header_gives_none():
    d4 = build_tcp(A4, B4, 1, 2, 3, 4, TH_SYN, payload=b"x" * 10)
    d6 = build_tcp(A6, B6, 1, 2, 3, 4, TH_SYN, payload=b"x" * 10)
    assert ip_length(d4) == 50 and ip_length(d6) == 70
    assert ip_length(b"xx" + d4 + b"pad", 2, 2 + 50) == 50
    zero4 = d4[:2] + b"\0\0" + d4[4:]       # segmentation offload: total length 0
    zero6 = d6[:4] + b"\0\0" + d6[6:]       # jumbogram / BIG TCP
    assert ip_length(zero4) == ip_length(zero6) == 0
    assert ip_length(d4[:3]) == 0 and ip_length(d6[:5]) == 0  # the field is not there
    header_only = d4[:2] + b"\0\x14" + d4[4:]  # a total length of 20: the IP header alone
    assert ip_length(header_only) == 20
    assert parse_tcp(header_only) is None and parse_tcp_fast(header_only) is None
    assert ip_length(d4[:2] + b"\0\x13" + d4[4:]) == 0
    assert ip_length(b"") == -1 and ip_length(b"\x10" + d4[1:]) == -1
    # parse_tcp takes what is there then
    assert parse_tcp(zero4).length == len(d4) and parse_tcp(zero6).length == len(d6)
    assert parse_tcp_fast(zero4)[10] == parse_tcp_fast(zero6)[10] == 10


def test_parse_tcp_refuses_what_is_not_a_tcp_segment():
    d = build_tcp(A4, B4, 1, 2, 3, 4, TH_ACK, payload=b"abc")
    for at, value in ((9, 17), (0, 0x44), (6, 0x01), (7, 1), (0, 0x55)):
        bad = bytearray(d)
        bad[at] = value
        assert parse_tcp(bytes(bad)) is None and parse_tcp_fast(bytes(bad)) is None, at
    first_fragment = bytearray(d)
    first_fragment[6] = 0x20  # MF, offset 0: the TCP header is there
    assert parse_tcp(bytes(first_fragment)) is not None
    doff_short = bytearray(d)
    doff_short[32] = 0x40  # a data offset of 16 bytes
    assert parse_tcp(bytes(doff_short)) is None
    assert parse_tcp(with_ip_options(d, b"\x01" * 4)).ihl == 24
    d6 = bytearray(build_tcp(A6, B6, 1, 2, 3, 4, TH_ACK))
    d6[6] = 0  # hop-by-hop options first: not followed
    assert parse_tcp(bytes(d6)) is None


# -- the fast variants against it ------------------------------------------------------------
@SETTINGS
@given(d=any_datagram, orig_len=orig_lens)
@example(d=build_tcp(A4, B4, 1, 2, 3, 4, TH_ACK)[:39], orig_len=0)
@example(d=build_tcp(A6, B6, 1, 2, 3, 4, TH_ACK)[:59], orig_len=0)
def test_parse_tcp_fast_is_parse_tcp(d, orig_len):
    assert parse_tcp_fast(d, orig_len) == fields(parse_tcp(d, orig_len))
    assert parse_tcp_fast(bytearray(d), orig_len) == fields(parse_tcp(d, orig_len))
    if orig_len == 0:
        assert parse_tcp_fast(d, None) == parse_tcp_fast(d)  # (the engine passes None)


@SETTINGS
@given(d=any_datagram, pre=st.binary(max_size=20), post=st.binary(max_size=8))
def test_flow_bytes_are_parse_tcps_addresses_and_ports(d, pre, post):
    key = flow_bytes(d)
    t = parse_tcp(d)
    if t is not None:
        assert key == t.src + t.dst + struct.pack("!HH", t.sport, t.dport)
        assert reply_key(d) == (t.dst, t.dport, t.src, t.sport)
    elif key is not None:  # not TCP, but IPv4/IPv6 with room for ports: the same bytes
        v6 = d[0] >> 4 == 6
        ihl = 40 if v6 else (d[0] & 15) * 4
        addresses = d[8:40] if v6 else d[12:20]
        assert ihl >= 20 and len(d) >= ihl + 4 and key == addresses + d[ihl:ihl + 4]
    # inside a larger buffer, at an offset, as tc-feedback's scanner calls it
    buf = pre + d + post
    assert flow_bytes(buf, len(pre), len(pre) + len(d)) == key
    assert flow_bytes(bytearray(buf), len(pre), len(pre) + len(d)) == key
    assert route_key is flow_bytes


def test_flow_bytes_refuses_ipv4_headers_shorter_than_20():
    d = bytearray(build_tcp(A4, B4, 1, 2, 3, 4, TH_ACK))
    d[0] = 0x44
    assert flow_bytes(bytes(d)) is None and reply_key(bytes(d)) is None
    assert flow_bytes(bytes(d[:23])) is None  # no room for the ports


@SETTINGS
@given(d=any_datagram, payload=st.sampled_from([0, 1, 5, 300, -1]),
       pre=st.binary(max_size=20), post=st.binary(max_size=8))
def test_fb_record_is_parse_tcps_datagram(d, payload, pre, post):
    t = parse_tcp(d)
    rec = fb_record(d, TS, payload)
    if t is None:
        assert rec is None
        return
    keep = len(d) if payload < 0 else min(len(d), t.ihl + t.doff + payload)
    assert cbor2.loads(rec) == {"t": "fb", "ts": TS, "data": d[:keep], "len": t.length}
    buf = pre + d + post
    assert fb_record(buf, TS, payload, len(pre), len(pre) + len(d)) == rec
