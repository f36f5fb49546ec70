"""Hypothesis strategies for tests: IP datagrams carrying TCP, valid and not."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from tcpcopylib.packet import build_tcp, ip_bytes

A4, B4 = ip_bytes("10.0.0.1"), ip_bytes("10.0.0.5")
A6, B6 = ip_bytes("2001:db8::1"), ip_bytes("2001:db8::5")
TCP_OPTIONS = [b"", b"\x02\x04\x05\xb4",                                  # MSS
               b"\x01\x01\x08\x0a" + struct.pack("!II", 7, 9),            # NOP NOP TS
               b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07"]


def with_ip_options(d: bytes, opts: bytes) -> bytes:
    """An IPv4 datagram with IP options (a multiple of 4 bytes) put in its header."""
    b = bytearray(d[:20] + opts + d[20:])
    b[0] = 0x40 | (20 + len(opts)) // 4
    b[2:4] = struct.pack("!H", len(b))
    return bytes(b)


@st.composite
def tcp_datagrams(draw):
    """Well-formed IPv4/IPv6 TCP datagrams (IP and TCP options, any flags, a payload),
    from A4/A6 to B4/B6."""
    v6 = draw(st.booleans())
    src, dst = (A6, B6) if v6 else (A4, B4)
    d = build_tcp(src, dst, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
                  draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                  draw(st.integers(0, 255)), draw(st.integers(0, 65535)),
                  options=draw(st.sampled_from(TCP_OPTIONS)),
                  payload=draw(st.binary(max_size=300)))
    if not v6 and draw(st.integers(0, 3)) == 0:
        d = with_ip_options(d, draw(st.sampled_from([b"\x01" * 4, b"\x94\x04\x00\x00" * 2])))
    return d


@st.composite
def changed_datagrams(draw):
    """tcp_datagrams() changed once to three times: a length field set to anything, a byte
    changed (in the headers mostly), the version changed, cut short."""
    b = bytearray(draw(tcp_datagrams()))
    v6 = b[0] >> 4 == 6
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["length", "byte", "header byte", "version", "cut"]))
        if kind == "length" and len(b) >= 6:  # IPv4 total / IPv6 payload length: any value
            at, n = (4, len(b) - 40) if v6 else (2, len(b))
            value = draw(st.sampled_from([0, 1, 19, 20, 39, 40, n - 1, n + 1, 65535])
                         if draw(st.booleans()) else st.integers(0, 65535))
            b[at:at + 2] = struct.pack("!H", value & 0xFFFF)
        elif kind == "byte" and b:
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        elif kind == "header byte" and b:  # the first 80 bytes: IP and TCP headers
            b[draw(st.integers(0, min(len(b), 80) - 1))] = draw(st.integers(0, 255))
        elif kind == "version" and b:
            b[0] = draw(st.sampled_from([0x45, 0x46, 0x44, 0x4F, 0x60, 0x50, 0x00]))
        elif kind == "cut":
            b = b[:draw(st.integers(0, len(b)))]
    return bytes(b)


#: tcp_datagrams(), changed_datagrams() and garbage (some with an IP version nibble)
any_datagram = st.one_of(tcp_datagrams(), changed_datagrams(), changed_datagrams(),
                         st.binary(max_size=90),
                         st.binary(min_size=1, max_size=90).map(lambda b: b"\x45" + b),
                         st.binary(min_size=1, max_size=90).map(lambda b: b"\x60" + b))
