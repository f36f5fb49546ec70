"""capture.split_segment at its edges (what bench/mutate.py found untested): the IP length
of every piece, exact flags with a window that is not 0xffff, link-layer padding after the
datagram, a datagram captured shorter than its IP length, IPv6 jumbograms (payload length
0), an MTU that leaves no room or one byte for payload, a datagram that fits returned as is
(even with a checksum the NIC has not filled in). The exact-multiple case is
test_capture_split.py's."""

from __future__ import annotations

import struct

import pytest

from tcpcopylib import capture as cap
from tcpcopylib.packet import (TH_ACK, TH_CWR, TH_FIN, TH_PSH, build_tcp, ip_bytes, parse_tcp,
                               tcp_checksum_ok)

A4, B4 = ip_bytes("10.1.0.2"), ip_bytes("10.1.0.1")
A6, B6 = ip_bytes("fd00::2"), ip_bytes("fd00::1")
ALL = TH_ACK | TH_PSH | TH_FIN | TH_CWR


def big(src, dst, n=3000, flags=ALL, window=0x1234, seq=5000):
    return build_tcp(src, dst, 40000, 80, seq, 777, flags, window=window,
                     payload=bytes(i % 251 for i in range(n)), ident=300)


def check(pieces, src, payload, seq=5000, flags=ALL):
    got = b""
    for i, p in enumerate(pieces):
        t = parse_tcp(p)
        if src == A4:
            assert struct.unpack_from("!H", p, 2)[0] == len(p)
            assert struct.unpack_from("!H", p, 4)[0] == 300 + i
        else:
            assert struct.unpack_from("!H", p, 4)[0] == len(p) - 40
        assert tcp_checksum_ok(p)
        assert t.seq == seq + len(got) and t.window == 0x1234
        want = flags & ~(TH_CWR if i else 0) & ~(0 if i == len(pieces) - 1 else TH_FIN | TH_PSH)
        assert p[len(p) - len(t.payload) - 20 + 13] == want, (i, p[33], want)
        got += t.payload
    assert got == payload


@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_pieces_have_their_own_ip_length_and_exact_flags(src, dst):
    d = big(src, dst)
    hdr = len(d) - 3000
    pieces = cap.split_segment(d, 1000)
    assert len(pieces) == -(-3000 // (1000 - hdr))
    check(pieces, src, d[hdr:])
    # an MTU one byte more than the headers: one payload byte per piece
    small = big(src, dst, n=5, flags=TH_ACK | TH_PSH)
    pieces = cap.split_segment(small, hdr + 1)
    assert len(pieces) == 5
    check(pieces, src, small[hdr:], flags=TH_ACK | TH_PSH)


@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_padding_after_the_datagram_is_not_payload(src, dst):
    d = big(src, dst)
    hdr = len(d) - 3000
    pieces = cap.split_segment(d + b"\xee" * 6, 1000)
    check(pieces, src, d[hdr:])
    assert pieces == cap.split_segment(d, 1000)


@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_a_datagram_that_fits_is_returned_as_is(src, dst):
    d = bytearray(big(src, dst, n=1000))
    d[-1000 - 4] ^= 0xFF  # a wrong TCP checksum (offloaded): left alone, not fixed
    d = bytes(d)
    for mtu in (len(d), len(d) + 1, 9000):
        got = cap.split_segment(d, mtu)
        assert got == [d] and got[0] is d
    # captured shorter than its IP length: what there is fits
    cut = d[:900]
    got = cap.split_segment(cut, 1000)
    assert got == [cut] and got[0] is cut


@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_no_room_for_payload_or_no_tcp_header_is_left_alone(src, dst):
    d = big(src, dst)
    hdr = len(d) - 3000
    for mtu in (hdr, hdr - 1, 10):
        assert cap.split_segment(d, mtu) == [d]
    ihl = hdr - 20
    trunc = d[:ihl + 10]  # the TCP header cut off: nothing to split by
    assert cap.split_segment(trunc, ihl + 5) == [trunc]


def test_ipv6_jumbogram_is_split_by_its_length():
    """IPv6 payload length 0 (BIG TCP): the datagram's own length counts."""
    d = bytearray(big(A6, B6, n=3000))
    d[4:6] = b"\x00\x00"
    d = bytes(d)
    pieces = cap.split_segment(d, 1000)
    assert len(pieces) == -(-3000 // (1000 - 60))
    check(pieces, A6, d[60:])
