"""Send IP datagrams as they are: the engine of tc-emit.

Two senders:

- RawSender: ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` (IP_HDRINCL implied) and its IPv6
  twin. Linux fills in the IPv4 header checksum, the total length and a zero IP ID; it never
  touches the TCP checksum (feasibility.md 4.2), and fills in nothing for IPv6.
- LinkSender: ``AF_PACKET`` on one interface with an Ethernet header we build; the kernel
  fills in nothing, so the IPv4 header checksum is checked too.

Emitter verifies the TCP checksum of every packet (a ones' complement sum taken as a big
integer modulo 0xFFFF: one C call), recomputes it when wrong, sends, and counts send errors
by errno name: a failed packet never stops the stream.
"""

from __future__ import annotations

import errno
import socket
import struct

from tcpcopylib.errors import NoInputError, NoPermissionError, UsageError
from tcpcopylib.packet import IPPROTO_TCP, fix_checksums

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
_U16 = struct.Struct("!H")
_PROTO6 = b"\0\x06"


def tcp_sum_ok(data) -> bool | None:
    """True/False for a TCP datagram's checksum; None when not checkable (not TCP, fragment,
    IPv6 extension headers, truncated). The one's complement sum of all 16-bit words of
    pseudo-header + segment is 0 mod 0xFFFF exactly when the checksum is right."""
    v = data[0] >> 4
    if v == 4:
        if data[9] != IPPROTO_TCP or (data[6] & 0x3F) or data[7]:  # fragments
            return None
        ihl = (data[0] & 0x0F) << 2
        end = _U16.unpack_from(data, 2)[0]
        if end > len(data) or end < ihl + 20:
            return None
        seg_len = end - ihl
        pseudo = data[12:20] + _PROTO6 + _U16.pack(seg_len)
    elif v == 6:
        if data[6] != IPPROTO_TCP:
            return None
        ihl = 40
        end = 40 + _U16.unpack_from(data, 4)[0]
        if end > len(data) or end < 60:
            return None
        seg_len = end - ihl
        pseudo = data[8:40] + seg_len.to_bytes(4, "big") + b"\0\0" + _PROTO6
    else:
        return None
    seg = data[ihl:end]
    if seg_len & 1:
        seg += b"\0"
    return (int.from_bytes(pseudo, "big") + int.from_bytes(seg, "big")) % 0xFFFF == 0


def ip4_header_ok(data) -> bool:
    ihl = (data[0] & 0x0F) << 2
    return int.from_bytes(data[:ihl], "big") % 0xFFFF == 0


def fix_ip4_header(buf: bytearray) -> None:
    ihl = (buf[0] & 0x0F) << 2
    buf[10:12] = b"\0\0"
    s = int.from_bytes(buf[:ihl], "big") % 0xFFFF
    _U16.pack_into(buf, 10, (~s) & 0xFFFF if s else 0xFFFF)


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    try:
        if len(parts) != 6:
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise UsageError(f"not a MAC address (like 02:00:00:00:01:02): {text!r}") from None
    return mac


def _perm(e: OSError) -> NoPermissionError:
    return NoPermissionError(f"cannot open a raw socket ({e.strerror}): "
                             "run as root or with CAP_NET_RAW")


class RawSender:
    """Raw IPv4/IPv6 sockets; the destination is the packet's own dst address."""

    link_layer = False

    def __init__(self):
        try:
            self.s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError as e:
            raise _perm(e) from None
        self.s6 = None
        self._addr: dict[bytes, tuple] = {}  # packed dst -> sockaddr (a tiny cache)

    def _sock6(self):
        if self.s6 is None:
            self.s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        return self.s6

    def send(self, data) -> None:
        if data[0] >> 4 == 4:
            dst = data[16:20]
            addr = self._addr.get(dst)
            if addr is None:
                addr = self._cache(dst, (socket.inet_ntop(socket.AF_INET, dst), 0))
            self.s4.sendto(data, addr)
        else:
            dst = data[24:40]
            addr = self._addr.get(dst)
            if addr is None:
                addr = self._cache(dst, (socket.inet_ntop(socket.AF_INET6, dst), 0))
            self._sock6().sendto(data, addr)

    def _cache(self, dst, addr):
        if len(self._addr) > 4096:
            self._addr.clear()
        self._addr[dst] = addr
        return addr

    def close(self):
        for s in (self.s4, self.s6):
            if s is not None:
                s.close()


class LinkSender:
    """AF_PACKET on `iface`: each datagram behind an Ethernet header built here."""

    link_layer = True

    def __init__(self, iface: str, dst_mac: bytes, src_mac: bytes | None = None):
        try:
            socket.if_nametoindex(iface)
        except OSError:
            raise NoInputError(f"{iface}: no such interface") from None
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        except PermissionError as e:
            raise _perm(e) from None
        try:
            self.sock.bind((iface, 0))
        except OSError as e:
            self.sock.close()
            if e.errno in (errno.ENODEV, errno.ENXIO):
                raise NoInputError(f"{iface}: no such interface") from None
            raise
        if src_mac is None:
            src_mac = self.sock.getsockname()[4]  # the interface's own address
        self.prefix4 = dst_mac + src_mac + _U16.pack(ETH_P_IP)
        self.prefix6 = dst_mac + src_mac + _U16.pack(ETH_P_IPV6)

    def send(self, data) -> None:
        self.sock.send((self.prefix4 if data[0] >> 4 == 4 else self.prefix6) + data)

    def close(self):
        self.sock.close()


class Emitter:
    """Check, fix and send datagrams; count what happened.

    Counters: sent, failed (by errno name in ``errors``), fixed (checksums recomputed),
    skipped (by reason in ``skips``: malformed, truncated). ``on_new_error(name, exc)`` is
    called once per error kind.
    """

    def __init__(self, sender, on_new_error=None):
        self.sender = sender
        self.on_new_error = on_new_error
        self.sent = 0
        self.fixed = 0
        self.errors: dict[str, int] = {}
        self.skips: dict[str, int] = {}

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def skip(self, why: str) -> None:
        self.skips[why] = self.skips.get(why, 0) + 1

    def emit(self, data, orig_len: int | None = None) -> bool:
        """Send one datagram; False if it was skipped or the send failed."""
        n = len(data)
        if n < 20 or (data[0] >> 4) not in (4, 6) or (data[0] >> 4 == 6 and n < 40):
            self.skip("malformed")
            return False
        if orig_len is not None and orig_len > n:
            self.skip("truncated")  # a cut-off datagram would carry wrong data
            return False
        ok = tcp_sum_ok(data)
        if ok is False or (self.sender.link_layer and data[0] >> 4 == 4
                           and not ip4_header_ok(data)):
            buf = bytearray(data)
            if ok is False:
                fix_checksums(buf)  # also fixes the IPv4 header checksum
            else:
                fix_ip4_header(buf)
            data = bytes(buf)
            self.fixed += 1
        try:
            self.sender.send(data)
        except OSError as e:
            name = errno.errorcode.get(e.errno, f"errno{e.errno}") if e.errno else type(e).__name__
            seen = self.errors.get(name, 0)
            self.errors[name] = seen + 1
            if not seen and self.on_new_error is not None:
                self.on_new_error(name, e)
            return False
        self.sent += 1
        return True

    def summary(self) -> str:
        parts = [f"sent {self.sent}", f"failed {self.failed}"]
        if self.errors:
            parts[-1] += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) + ")"
        parts.append(f"fixed checksums {self.fixed}")
        for why, v in sorted(self.skips.items()):
            parts.append(f"{why} {v}")
        return ", ".join(parts)
