"""tc-capture's GRO/LRO super-segment splitting (capture.split_segment and the Capturer path):
the pieces are the segments GSO would have sent, whatever the payload's length is next to the
MSS, in particular an exact multiple of it."""

import os
import struct

import pytest

from tcpcopylib import capture as cap
from tcpcopylib.packet import (TH_ACK, TH_CWR, TH_FIN, TH_PSH, build_tcp, checksum, ip_bytes,
                               parse_tcp, tcp_checksum_ok)
from tcpcopylib.testing import Collector

A4, B4 = ip_bytes("10.1.0.2"), ip_bytes("10.1.0.1")
A6, B6 = ip_bytes("fd00::2"), ip_bytes("fd00::1")
TS_OPT = b"\x01\x01\x08\x0a" + struct.pack("!II", 1234, 5678)
MTU = 1500
FAMILIES = pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
OPTIONS = pytest.mark.parametrize("options", [b"", TS_OPT], ids=["no-options", "timestamps"])


def mss_of(src, options):
    """The payload of a full piece: the MTU less the IP and TCP headers."""
    return MTU - (20 if len(src) == 4 else 40) - 20 - len(options)


def supersegment(src, dst, payload, options=TS_OPT, seq=1000,
                 flags=TH_ACK | TH_PSH | TH_FIN | TH_CWR):
    return build_tcp(src, dst, 40000, 80, seq, 777, flags, 5000, options, payload,
                     ident=65530)


def check_pieces(big, pieces):
    """Each piece is a valid segment of big's stream, at most MTU long, in order, with the
    headers copied and the flags where GSO puts them; returns the payload sizes."""
    orig = parse_tcp(big)
    got = b""
    for i, p in enumerate(pieces):
        t = parse_tcp(p)
        last = i == len(pieces) - 1
        assert len(p) <= MTU and t.ip_len == len(p) and tcp_checksum_ok(p), i
        assert t.seq == (orig.seq + len(got)) & 0xFFFFFFFF, i
        assert (t.src, t.dst, t.sport, t.dport, t.ack, t.window, t.options) == (
            orig.src, orig.dst, orig.sport, orig.dport, orig.ack, orig.window, orig.options)
        # FIN and PSH on the last piece only (if the super-segment had them), CWR on the first
        assert t.flags & (TH_FIN | TH_PSH) == (orig.flags & (TH_FIN | TH_PSH) if last else 0), i
        assert t.flags & TH_CWR == (orig.flags & TH_CWR if i == 0 else 0), i
        assert t.flags & ~(TH_FIN | TH_PSH | TH_CWR) == orig.flags & ~(TH_FIN | TH_PSH | TH_CWR)
        if t.version == 4:
            assert checksum(p[:20]) == 0
            assert struct.unpack_from("!H", p, 4)[0] == (65530 + i) & 0xFFFF
        assert t.payload, f"piece {i} carries no data"
        got += t.payload
    assert got == orig.payload
    return [len(parse_tcp(p).payload) for p in pieces]


@FAMILIES
@OPTIONS
@pytest.mark.parametrize("k", [2, 3, 7])
def test_an_exact_multiple_of_the_mss_keeps_fin_and_psh_on_its_last_piece(src, dst, options,
                                                                           k):
    mss = mss_of(src, options)
    big = supersegment(src, dst, os.urandom(k * mss), options)
    pieces = cap.split_segment(big, MTU)
    assert check_pieces(big, pieces) == [mss] * k
    assert parse_tcp(pieces[-1]).flags & (TH_FIN | TH_PSH) == TH_FIN | TH_PSH


@FAMILIES
@pytest.mark.parametrize("extra", [-1, 1])
def test_one_byte_either_side_of_a_multiple(src, dst, extra):
    mss = mss_of(src, TS_OPT)
    big = supersegment(src, dst, os.urandom(3 * mss + extra))
    sizes = check_pieces(big, cap.split_segment(big, MTU))
    assert sizes == ([mss, mss, mss - 1] if extra < 0 else [mss, mss, mss, 1])


@FAMILIES
def test_split_across_2_32_at_a_piece_boundary(src, dst):
    mss = mss_of(src, TS_OPT)
    big = supersegment(src, dst, os.urandom(4 * mss), seq=2**32 - 2 * mss)  # piece 3 at 0
    pieces = cap.split_segment(big, MTU)
    assert check_pieces(big, pieces) == [mss] * 4
    assert [parse_tcp(p).seq for p in pieces] == [2**32 - 2 * mss, 2**32 - mss, 0, mss]


@FAMILIES
def test_a_supersegment_without_fin_or_psh_gives_none_to_its_pieces(src, dst):
    mss = mss_of(src, TS_OPT)
    big = supersegment(src, dst, os.urandom(2 * mss), flags=TH_ACK)
    pieces = cap.split_segment(big, MTU)
    assert check_pieces(big, pieces) == [mss, mss]
    assert all(parse_tcp(p).flags == TH_ACK for p in pieces)


@FAMILIES
def test_exactly_the_mtu_is_left_alone_one_byte_more_is_split(src, dst):
    mss = mss_of(src, TS_OPT)
    fits = supersegment(src, dst, os.urandom(mss))
    assert len(fits) == MTU and cap.split_segment(fits, MTU) == [fits]
    big = supersegment(src, dst, os.urandom(mss + 1))
    assert check_pieces(big, cap.split_segment(big, MTU)) == [mss, 1]


@FAMILIES
def test_capturer_records_an_exact_multiple_as_that_many_pieces(src, dst):
    mss = mss_of(src, TS_OPT)
    big = supersegment(src, dst, os.urandom(4 * mss))
    w = Collector()
    c = cap.Capturer(w, mtu=MTU, addresses=(dst,))
    c.datagram(big, 0, len(big), 123)
    assert check_pieces(big, [r["data"] for r in w.recs]) == [mss] * 4
    assert {r["ts"] for r in w.recs} == {123}
    assert (c.supersegs, c.split_records, c.records) == (1, 4, 4)
