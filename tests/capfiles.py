"""Build capture files byte by byte for tests (pcap µs/ns either byte order, pcapng)."""

from __future__ import annotations

import socket
import struct

from tcpcopylib.packet import build_tcp
from tcpcopylib.testing import pcap  # noqa: F401 (capfiles.pcap)

A4, B4 = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.5")
A6, B6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(
    socket.AF_INET6, "2001:db8::5")
MAC_A, MAC_B = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x05"
TS0 = 1_700_000_000_123_456_789  # ns; the µs files keep 1_700_000_000_123_456_000


def ip4(i: int = 0, payload: bytes = b"") -> bytes:
    return build_tcp(A4, B4, 40000 + i, 8080, 1000 + i, 1, 0x18, payload=payload)


def ip6(i: int = 0, payload: bytes = b"") -> bytes:
    return build_tcp(A6, B6, 40000 + i, 8080, 1000 + i, 1, 0x18, payload=payload)


def udp4(dport: int = 53) -> bytes:
    udp = struct.pack("!HHHH", 5000, dport, 12, 0) + b"abcd"
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, A4, B4)
    return hdr + udp


ARP = bytes.fromhex("0001080006040001") + MAC_A + A4 + bytes(6) + B4


# -- link layers: frame(ethertype, payload) per link type ---------------------------------
def eth(etype: int, payload: bytes, vlans=()) -> bytes:
    tags = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in vlans)
    return MAC_B + MAC_A + tags + struct.pack("!H", etype) + payload


def sll(etype: int, payload: bytes) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, MAC_A + b"\0\0", etype) + payload


def sll2(etype: int, payload: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", etype, 0, 2, 1, 0, 6, MAC_A + b"\0\0") + payload


def null(af: int, payload: bytes, endian: str = "<") -> bytes:
    return struct.pack(endian + "I", af) + payload


# -- files: pcap is the kit's writer; pcapng blocks below --------------------------------
def _block(btype: int, body: bytes, endian: str) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def _opt(code: int, val: bytes, endian: str) -> bytes:
    return struct.pack(endian + "HH", code, len(val)) + val + b"\0" * (-len(val) % 4)


def shb(endian: str = "<") -> bytes:
    body = struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    return _block(0x0A0D0D0A, body, endian)


def idb(linktype: int, tsresol: int | None = None, endian: str = "<", snaplen: int = 0,
        tsoffset: int | None = None) -> bytes:
    body = struct.pack(endian + "HHI", linktype, 0, snaplen)
    opts = b""
    if tsresol is not None:
        opts += _opt(9, bytes((tsresol,)), endian)
    if tsoffset is not None:
        opts += _opt(14, struct.pack(endian + "q", tsoffset), endian)
    if opts:
        opts += _opt(0, b"", endian)
    return _block(1, body + opts, endian)


def epb(ifid: int, units: int, frame: bytes, endian: str = "<", orig: int | None = None) -> bytes:
    body = struct.pack(endian + "IIIII", ifid, units >> 32, units & 0xFFFFFFFF, len(frame),
                       len(frame) if orig is None else orig) + frame
    return _block(6, body, endian)


def spb(frame: bytes, endian: str = "<") -> bytes:
    return _block(3, struct.pack(endian + "I", len(frame)) + frame, endian)


def isb(endian: str = "<") -> bytes:
    """An Interface Statistics Block: carries no packet, must be skipped."""
    return _block(5, struct.pack(endian + "III", 0, 0, 0), endian)
