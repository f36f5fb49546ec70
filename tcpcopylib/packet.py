"""Struct-level access to IPv4/IPv6 + TCP headers (the hot path: no per-packet objects).

Everything here works on ``bytes``/``bytearray`` holding one IP datagram, as carried in
the "data" field of "pkt" and "fb" records.
"""

from __future__ import annotations

import socket
import struct

IPPROTO_TCP = 6

# TCP flags (RFC 9293)
TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK, TH_URG, TH_ECE, TH_CWR = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)

# TCP options (IANA)
TCPOPT_EOL, TCPOPT_NOP, TCPOPT_MSS, TCPOPT_WSCALE, TCPOPT_SACK_OK, TCPOPT_TIMESTAMP = (
    0, 1, 2, 3, 4, 8)

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class TcpView:
    """The fields of one IP+TCP datagram, parsed once (use for control logic, not bulk).

    Attributes: version, src, dst (packed address bytes), ihl (IP header length), sport,
    dport, seq, ack, flags, window, doff (TCP header length), payload_off; length (the
    datagram's whole length), ip_len and payload_len (the part of the datagram and of its
    payload that the data holds: less than the whole when a capture was cut short).
    """

    __slots__ = ("data", "version", "src", "dst", "ihl", "sport", "dport", "seq", "ack",
                 "flags", "window", "doff", "payload_off", "payload_len", "ip_len", "length")

    @property
    def payload(self) -> bytes:
        return bytes(self.data[self.payload_off:self.payload_off + self.payload_len])

    @property
    def options(self) -> bytes:
        o = self.ihl
        return bytes(self.data[o + 20:o + self.doff])

    def key(self):
        """(src, sport, dst, dport): the direction-specific 4-tuple."""
        return (self.src, self.sport, self.dst, self.dport)


def ip_length(buf, p: int = 0, end: int = -1) -> int:
    """The length of the IPv4/IPv6 datagram at buf[p:end] as its header gives it; 0 where
    the header gives none (an IPv4 total length below 20, as in captures of
    segmentation-offloaded packets; an IPv6 payload length of 0: a jumbogram, BIG TCP; too
    few bytes to hold the field); -1 if it is not IPv4/IPv6 (or empty)."""
    n = (len(buf) if end < 0 else end) - p
    if n < 1:
        return -1
    v = buf[p] >> 4
    if v == 4:
        tot = _U16.unpack_from(buf, p + 2)[0] if n >= 4 else 0
        return tot if tot >= 20 else 0
    if v == 6:
        plen = _U16.unpack_from(buf, p + 4)[0] if n >= 6 else 0
        return 40 + plen if plen else 0
    return -1


def parse_tcp(data, orig_len: int = 0) -> TcpView | None:
    """Parse an IPv4/IPv6 datagram carrying TCP; None if it is not (or is malformed).

    ``orig_len``: the datagram's whole length where ``data`` holds only its beginning and
    says so elsewhere (a record's "len"); else the IP header's length counts (or, where it
    gives none, len(data)). The IP and TCP headers must be in ``data`` and within that
    length. IPv6 extension headers are not followed (a TCP segment behind them returns
    None); IPv4 fragments other than the first return None.
    """
    n = len(data)
    if n < 20:
        return None
    v = data[0] >> 4
    if v == 4:
        vhl, _tos, _tot, _id, frag, _ttl, proto, _sum, src, dst = _IP4.unpack_from(data)
        ihl = (vhl & 0x0F) * 4
        if proto != IPPROTO_TCP or ihl < 20 or frag & 0x1FFF:
            return None
    elif v == 6:
        if n < 40:
            return None
        _vtf, _plen, nxt, _hl, src, dst = _IP6.unpack_from(data)
        if nxt != IPPROTO_TCP:
            return None
        ihl = 40
    else:
        return None
    length = orig_len or ip_length(data) or n
    ip_len = min(length, n)
    if ip_len < ihl + 20:
        return None
    sport, dport, seq, ack, off, flags, win, _csum, _urg = _TCP.unpack_from(data, ihl)
    doff = (off >> 4) * 4
    if doff < 20 or ihl + doff > ip_len:
        return None
    t = TcpView()
    t.data = data
    t.version = v
    t.src = src
    t.dst = dst
    t.ihl = ihl
    t.sport = sport
    t.dport = dport
    t.seq = seq
    t.ack = ack
    t.flags = flags
    t.window = win
    t.doff = doff
    t.payload_off = ihl + doff
    t.payload_len = ip_len - ihl - doff
    t.ip_len = ip_len
    t.length = length
    return t


# IPv4 (no options) + TCP, only the fields parse_tcp_fast() returns or checks: total
# length, fragment, protocol, addresses; ports, seq, ack, data offset, flags, window
_IP4TCP = struct.Struct("!2xH2xHxB2x4s4sHHIIBBH")
_TCP7 = struct.Struct("!HHIIBBH")  # the TCP header up to the window


def parse_tcp_fast(data, orig_len: int = 0):
    """parse_tcp() for the hot path (tc-session's every packet, tc-intercept's): a tuple
    (src, dst, ihl, sport, dport, seq, ack, doff, flags, window, payload_len) where
    parse_tcp() gives a view, None where it gives None. payload_len is the whole
    datagram's (view.length - ihl - doff): more than ``data`` holds when it was cut short.
    """
    n = len(data)
    if n < 40:
        return None
    if data[0] == 0x45:  # the usual case: IPv4 without options, one unpack
        tot, frag, proto, src, dst, sport, dport, seq, ack, off, flags, win = \
            _IP4TCP.unpack_from(data)
        if proto != IPPROTO_TCP or frag & 0x1FFF:
            return None
        length = orig_len or (tot if tot >= 20 else n)
        hlen = 20 + (off >> 4) * 4
        if hlen < 40 or hlen > length or hlen > n:
            return None
        return src, dst, 20, sport, dport, seq, ack, hlen - 20, flags, win, length - hlen
    v = data[0] >> 4
    if v == 4:
        vhl, _tos, tot, _id, frag, _ttl, proto, _s, src, dst = _IP4.unpack_from(data)
        ihl = (vhl & 15) * 4
        if proto != IPPROTO_TCP or ihl < 20 or frag & 0x1FFF or n < ihl + 20:
            return None
        length = orig_len or (tot if tot >= 20 else n)
    elif v == 6:
        if n < 60:
            return None
        _vtf, plen, nxt, _hl, src, dst = _IP6.unpack_from(data)
        if nxt != IPPROTO_TCP:
            return None
        ihl = 40
        length = orig_len or (40 + plen if plen else n)
    else:
        return None
    sport, dport, seq, ack, off, flags, win = _TCP7.unpack_from(data, ihl)
    doff = (off >> 4) * 4
    hlen = ihl + doff
    if doff < 20 or hlen > length or hlen > n:
        return None
    return src, dst, ihl, sport, dport, seq, ack, doff, flags, win, length - hlen


def flow_bytes(data, off: int = 0, end: int = -1) -> bytes | None:
    """The source and destination addresses and ports of the IPv4/IPv6 datagram at
    data[off:end], as the bytes they are written in (12 for IPv4, 36 for IPv6): a compact
    key of one direction of a connection (tc-feedback's routing key). None if it is not
    IPv4/IPv6 or too short to hold the ports; the protocol is not checked (TCP's ports
    and UDP's are alike).
    """
    n = (len(data) if end < 0 else end) - off
    if n < 20:
        return None
    b0 = data[off]
    if b0 >> 4 == 4:
        ihl = (b0 & 0x0F) * 4
        if ihl == 20:  # the usual case: addresses and ports in one piece
            return bytes(data[off + 12:off + 24]) if n >= 24 else None
        if ihl < 20 or n < ihl + 4:
            return None
        return bytes(data[off + 12:off + 20]) + bytes(data[off + ihl:off + ihl + 4])
    if b0 >> 4 == 6 and n >= 44:
        return bytes(data[off + 8:off + 44])
    return None


# session_shard(): the endpoints of an IPv4 datagram without options (addresses, ports) and
# of an IPv6 one (addresses as two 64-bit halves each, then the ports of a TCP header
# right after the fixed header)
_EP4 = struct.Struct("!IIHH").unpack_from      # at offset 12
_EP6 = struct.Struct("!QQQQHH").unpack_from    # at offset 8


def session_shard(data, n: int, off: int = 0, end: int = -1) -> int:
    """Which of ``n`` owners (tc-session --shards) the connection of the IPv4/IPv6
    datagram at data[off:end] belongs to: the session key, the captured (client ip:port,
    server ip:port) pair, hashed the same for both directions and on every run and host
    (Python's hash of a tuple of ints is not salted). 0 for a datagram that is not
    IPv4/IPv6 or too short to hold the ports (its owner only counts it). The one place
    that decides it: a connection never splits between two owners."""
    if n == 1:
        return 0
    size = (len(data) if end < 0 else end) - off
    if size < 24:
        return 0
    b0 = data[off]
    if b0 == 0x45:  # the usual case: IPv4 without options
        s, d, sp, dp = _EP4(data, off + 12)
        a, b = s << 16 | sp, d << 16 | dp
    elif b0 >> 4 == 4:
        ihl = (b0 & 0x0F) * 4
        if ihl < 20 or size < ihl + 4:
            return 0
        s, d = _U32.unpack_from(data, off + 12)[0], _U32.unpack_from(data, off + 16)[0]
        sp, dp = _PORTS.unpack_from(data, off + ihl)
        a, b = s << 16 | sp, d << 16 | dp
    elif b0 >> 4 == 6 and size >= 44:
        s1, s2, d1, d2, sp, dp = _EP6(data, off + 8)
        a, b = (s1 << 64 | s2) << 16 | sp, (d1 << 64 | d2) << 16 | dp
    else:
        return 0
    return hash((a, b) if a < b else (b, a)) % n


def ip_str(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def ip_bytes(text: str) -> bytes:
    """Packed address from text; raises ValueError for garbage."""
    try:
        return socket.inet_pton(socket.AF_INET, text)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, text.strip("[]"))
    except OSError:
        raise ValueError(f"not an IP address: {text!r}") from None


def endpoint_str(packed: bytes, port: int) -> str:
    return f"{ip_str(packed)}:{port}" if len(packed) == 4 else f"[{ip_str(packed)}]:{port}"


def parse_endpoint(text: str) -> tuple[bytes, int]:
    """'10.0.0.5:8080' or '[2001:db8::5]:8080' -> (packed ip, port); ValueError if bad."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT (use [v6addr]:port for IPv6): {text!r}")
    return ip_bytes(host), int(port)


def checksum(data, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of ``data`` plus an initial 32-bit partial sum."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = initial + sum(memoryview(data).cast("H"))
    # the sum above is in host order; fold and swap once at the end
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    return socket.htons(s) if _LITTLE else s


_LITTLE = struct.pack("=H", 1) == b"\x01\x00"


def _pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    """Host-order partial sum of the TCP pseudo-header (RFC 9293 / RFC 8200 §8.1)."""
    if len(src) == 4:
        ph = src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, length)
    else:
        ph = src + dst + struct.pack("!IxxxB", length, IPPROTO_TCP)
    return sum(memoryview(ph).cast("H"))


def fix_checksums(buf: bytearray) -> bytearray:
    """Recompute the IPv4 header checksum (if IPv4) and the TCP checksum in place."""
    v = buf[0] >> 4
    if v == 4:
        ihl = (buf[0] & 0x0F) * 4
        tot = _U16.unpack_from(buf, 2)[0]
        buf[10:12] = b"\0\0"
        _U16.pack_into(buf, 10, checksum(buf[:ihl]))
        src, dst = bytes(buf[12:16]), bytes(buf[16:20])
        end = tot
    else:
        ihl = 40
        end = 40 + _U16.unpack_from(buf, 4)[0]
        src, dst = bytes(buf[8:24]), bytes(buf[24:40])
    seg_len = end - ihl
    buf[ihl + 16:ihl + 18] = b"\0\0"
    _U16.pack_into(buf, ihl + 16, checksum(memoryview(buf)[ihl:end], _pseudo_sum(src, dst, seg_len)))
    return buf


def tcp_checksum_ok(data) -> bool:
    t = parse_tcp(data)
    if t is None:
        return False
    buf = bytearray(data[:t.ip_len])
    want = bytes(buf[t.ihl + 16:t.ihl + 18])
    fix_checksums(buf)
    return bytes(buf[t.ihl + 16:t.ihl + 18]) == want


def build_tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
              flags: int, window: int = 65535, options: bytes = b"", payload: bytes = b"",
              ttl: int = 64, ident: int = 0) -> bytes:
    """A complete IPv4 or IPv6 TCP datagram with correct checksums."""
    if len(options) % 4:
        options += b"\x01" * (4 - len(options) % 4)  # NOP padding
    doff = 20 + len(options)
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (doff // 4) << 4,
                    flags, window, 0, 0) + options + payload
    if len(src) == 4:
        ip = _IP4.pack(0x45, 0, 20 + len(tcp), ident, 0x4000, ttl, IPPROTO_TCP, 0, src, dst)
    else:
        ip = _IP6.pack(6 << 28, len(tcp), IPPROTO_TCP, ttl, src, dst)
    return bytes(fix_checksums(bytearray(ip + tcp)))


def parse_options(opts: bytes) -> dict:
    """TCP options -> {"mss": int, "wscale": int, "sack_ok": True, "ts": (val, ecr)}."""
    out = {}
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break
        ln = opts[i + 1]
        if ln < 2 or i + ln > n:
            break
        body = opts[i + 2:i + ln]
        if kind == TCPOPT_MSS and ln == 4:
            out["mss"] = _U16.unpack(body)[0]
        elif kind == TCPOPT_WSCALE and ln == 3:
            out["wscale"] = body[0]
        elif kind == TCPOPT_SACK_OK:
            out["sack_ok"] = True
        elif kind == TCPOPT_TIMESTAMP and ln == 10:
            out["ts"] = struct.unpack("!II", body)
        i += ln
    return out


def flags_str(flags: int) -> str:
    """tcpdump's flag notation: S, F, R, P, U, E, W, '.' for ACK; 'none' if empty."""
    s = ""
    for bit, ch in ((TH_SYN, "S"), (TH_FIN, "F"), (TH_RST, "R"), (TH_PSH, "P"),
                    (TH_URG, "U"), (TH_ECE, "E"), (TH_CWR, "W"), (TH_ACK, ".")):
        if flags & bit:
            s += ch
    return s or "none"
