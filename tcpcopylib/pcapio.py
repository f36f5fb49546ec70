"""Capture files in and out, with struct only (no per-packet objects).

Reading: ``CaptureReader(fd, name).frames()`` yields ``(linktype, ts_ns, frame, orig_len)``
for every packet of a pcap (µs or ns, either byte order, also the "modified" variant)
or pcapng (SHB/IDB/EPB/SPB/OPB, per-interface link type, if_tsresol and if_tsoffset) file
read in large chunks from a file descriptor (a pipe works). Timestamps are integer ns,
computed exactly. tcpcopylib.link finds the IP datagram inside a frame.

Writing: ``PcapWriter`` writes a nanosecond pcap (LINKTYPE_RAW by default).
"""

from __future__ import annotations

import os
import struct

from tcpcopylib.errors import CaptureFormatError
from tcpcopylib.wire import encode_pkt  # noqa: F401 (tc-readpcap's encoder)
from tcpcopylib.link import LINKTYPE_RAW

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_MAGIC_MODIFIED = 0xA1B2CD34  # Kuznetzov's patched libpcap: 8 more bytes per record
PCAPNG_SHB = 0x0A0D0D0A

CHUNK = 1 << 20
MAX_FRAME = 1 << 28  # a larger captured length means a corrupt file


class Interface:
    """A pcapng interface (or the single implicit interface of a pcap file)."""

    __slots__ = ("linktype", "snaplen", "ts_mul", "ts_div", "ts_shift", "ts_offset_ns")

    def __init__(self, linktype: int, snaplen: int = 0):
        self.linktype = linktype
        self.snaplen = snaplen
        self.ts_mul, self.ts_div, self.ts_shift = 1000, 1, 0  # default: µs
        self.ts_offset_ns = 0

    def set_tsresol(self, v: int) -> None:
        if v & 0x80:  # 2^-n seconds
            self.ts_mul, self.ts_div, self.ts_shift = 10**9, 1, v & 0x7F
        elif v <= 9:
            self.ts_mul, self.ts_div, self.ts_shift = 10 ** (9 - v), 1, 0
        else:
            self.ts_mul, self.ts_div, self.ts_shift = 1, 10 ** (v - 9), 0

    def ns(self, units: int) -> int:
        """Exact ns from timestamp units (floor for resolutions finer than 1 ns)."""
        return ((units * self.ts_mul) >> self.ts_shift) // self.ts_div + self.ts_offset_ns


class _Buffer:
    """A growable window over an fd: ``need(n)`` makes n bytes from ``pos`` available."""

    __slots__ = ("fd", "buf", "pos", "offset", "eof", "on_idle")

    def __init__(self, fd: int, on_idle=None, initial: bytes = b""):
        self.fd = fd
        self.on_idle = on_idle
        self.buf = initial
        self.pos = 0
        self.offset = 0  # file offset of buf[0]
        self.eof = False

    def need(self, n: int) -> bool:
        """True if buf[pos:pos+n] is complete; False at EOF before that."""
        while len(self.buf) - self.pos < n:
            if self.eof:
                return False
            if self.on_idle is not None:
                self.on_idle()
            chunk = os.read(self.fd, max(CHUNK, n))
            if not chunk:
                self.eof = True
                return False
            self.offset += self.pos
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
        return True


class CaptureReader:
    """Frames from a pcap or pcapng stream on ``fd``; ``name`` is used in messages.

    Raises CaptureFormatError (exit 65) for a file that is not a capture, and for a
    capture cut off mid-packet (after yielding every complete packet before the cut).
    ``on_idle`` is called before every read that may block (flush downstream output
    there, so a live ``tcpdump -U -w - | tc-readpcap -`` is not held back).
    """

    def __init__(self, fd: int, name: str, on_idle=None):
        self.fd = fd
        self.name = name
        self.on_idle = on_idle
        self.format = None  # "pcap" / "pcapng"
        self.frames_read = 0

    def _cut(self, b: _Buffer, what: str):
        return CaptureFormatError(
            f"{self.name}: capture cut off mid-{what} at byte {b.offset + b.pos} "
            f"(after {self.frames_read} packets)")

    def frames(self):
        b = _Buffer(self.fd, self.on_idle)
        if not b.need(4):
            if b.buf:
                raise CaptureFormatError(f"{self.name}: not a capture file (too short)")
            raise CaptureFormatError(f"{self.name}: empty file, not a capture")
        magic_be = struct.unpack_from(">I", b.buf)[0]
        magic_le = struct.unpack_from("<I", b.buf)[0]
        if magic_be == PCAPNG_SHB:  # a palindrome: either byte order
            self.format = "pcapng"
            return self._pcapng(b)
        for endian, magic in ((">", magic_be), ("<", magic_le)):
            if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS, PCAP_MAGIC_MODIFIED):
                self.format = "pcap"
                return self._pcap(b, endian, magic)
        raise CaptureFormatError(
            f"{self.name}: not a pcap or pcapng file (magic 0x{magic_be:08x})")

    # -- pcap ------------------------------------------------------------------------
    def _pcap(self, b: _Buffer, endian: str, magic: int):
        if not b.need(24):
            raise CaptureFormatError(f"{self.name}: pcap file header cut off")
        network = struct.unpack_from(endian + "I", b.buf, 20)[0]
        b.pos = 24
        linktype = network & 0xFFFF
        return self._pcap_loop(b, endian, linktype, 1 if magic == PCAP_MAGIC_NS else 1000,
                               24 if magic == PCAP_MAGIC_MODIFIED else 16)

    def _pcap_loop(self, b: _Buffer, endian, linktype, mul, hdrlen):
        unpack = struct.Struct(endian + "IIII").unpack_from
        while True:
            buf, pos = b.buf, b.pos
            if len(buf) - pos < hdrlen:
                if not b.need(hdrlen):
                    if len(b.buf) > b.pos:
                        raise self._cut(b, "record header")
                    return
                buf, pos = b.buf, b.pos
            sec, frac, caplen, origlen = unpack(buf, pos)
            start = pos + hdrlen
            end = start + caplen
            if end > len(buf):
                if caplen > MAX_FRAME:
                    raise CaptureFormatError(
                        f"{self.name}: corrupt record at byte {b.offset + pos} "
                        f"(captured length {caplen})")
                if not b.need(hdrlen + caplen):
                    raise self._cut(b, "packet")
                buf, pos = b.buf, b.pos
                start = pos + hdrlen
                end = start + caplen
            b.pos = end
            self.frames_read += 1
            yield linktype, sec * 1_000_000_000 + frac * mul, buf[start:end], origlen

    # -- pcapng ----------------------------------------------------------------------
    def _pcapng(self, b: _Buffer):
        endian = "<"
        ifaces: list[Interface] = []
        last_ts = 0
        while True:
            if not b.need(12):
                if len(b.buf) > b.pos:
                    raise self._cut(b, "block")
                return
            buf, pos = b.buf, b.pos
            btype = struct.unpack_from(endian + "I", buf, pos)[0]
            if btype == PCAPNG_SHB:
                bom = buf[pos + 8:pos + 12]
                if bom == b"\x1a\x2b\x3c\x4d":
                    endian = ">"
                elif bom == b"\x4d\x3c\x2b\x1a":
                    endian = "<"
                else:
                    raise CaptureFormatError(
                        f"{self.name}: bad pcapng byte-order magic at byte {b.offset + pos}")
                ifaces = []
            blen = struct.unpack_from(endian + "I", buf, pos + 4)[0]
            if blen < 12 or blen % 4 or blen > MAX_FRAME:
                raise CaptureFormatError(
                    f"{self.name}: corrupt pcapng block at byte {b.offset + pos} "
                    f"(length {blen})")
            if not b.need(blen):
                raise self._cut(b, "block")
            buf, pos = b.buf, b.pos
            body = pos + 8
            b.pos = pos + blen
            if btype == 6:  # Enhanced Packet Block
                ifid, hi, lo, caplen, origlen = struct.unpack_from(endian + "IIIII", buf, body)
                iface = self._iface(ifaces, ifid, b, pos)
                start = body + 20
                if start + caplen > pos + blen - 4:
                    raise CaptureFormatError(
                        f"{self.name}: corrupt packet block at byte {b.offset + pos}")
                last_ts = iface.ns((hi << 32) | lo)
                self.frames_read += 1
                yield iface.linktype, last_ts, buf[start:start + caplen], origlen
            elif btype == 3:  # Simple Packet Block: no timestamp, interface 0
                origlen = struct.unpack_from(endian + "I", buf, body)[0]
                iface = self._iface(ifaces, 0, b, pos)
                caplen = min(origlen, blen - 16)
                if iface.snaplen:
                    caplen = min(caplen, iface.snaplen)
                self.frames_read += 1
                yield iface.linktype, last_ts, buf[body + 4:body + 4 + caplen], origlen
            elif btype == 2:  # obsolete Packet Block
                ifid, _drops, hi, lo, caplen, origlen = struct.unpack_from(
                    endian + "HHIIII", buf, body)
                iface = self._iface(ifaces, ifid, b, pos)
                start = body + 20
                last_ts = iface.ns((hi << 32) | lo)
                self.frames_read += 1
                yield iface.linktype, last_ts, buf[start:start + caplen], origlen
            elif btype == 1:  # Interface Description Block
                linktype, _res, snaplen = struct.unpack_from(endian + "HHI", buf, body)
                iface = Interface(linktype, snaplen)
                self._options(iface, buf, body + 8, pos + blen - 4, endian)
                ifaces.append(iface)
            # other blocks (NRB, ISB, DSB, custom) carry nothing we need

    def _iface(self, ifaces, ifid, b, pos) -> Interface:
        if ifid >= len(ifaces):
            raise CaptureFormatError(
                f"{self.name}: packet block at byte {b.offset + pos} names interface "
                f"{ifid}, which has no description block")
        return ifaces[ifid]

    @staticmethod
    def _options(iface: Interface, buf, p: int, end: int, endian: str) -> None:
        hdr = struct.Struct(endian + "HH")
        while p + 4 <= end:
            code, olen = hdr.unpack_from(buf, p)
            if code == 0:
                break
            val = buf[p + 4:p + 4 + olen]
            if code == 9 and olen == 1:  # if_tsresol
                iface.set_tsresol(val[0])
            elif code == 14 and olen == 8:  # if_tsoffset, seconds
                iface.ts_offset_ns = struct.unpack(endian + "q", val)[0] * 1_000_000_000
            p += 4 + ((olen + 3) & ~3)




# -- writing -------------------------------------------------------------------------
class PcapWriter:
    """A nanosecond pcap (magic 0xa1b23c4d, little-endian) written to an fd, buffered."""

    SNAPLEN = 262144

    def __init__(self, fd: int, linktype: int = LINKTYPE_RAW, bufsize: int = 1 << 16):
        self.fd = fd
        self.bufsize = bufsize
        self.packets = 0
        self._rec = struct.Struct("<IIII").pack
        self.buf = bytearray(struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0,
                                         self.SNAPLEN, linktype))

    def write(self, ts_ns: int, data, orig_len: int = 0) -> None:
        n = len(data)
        buf = self.buf
        buf += self._rec(ts_ns // 1_000_000_000, ts_ns % 1_000_000_000, n,
                         orig_len if orig_len > n else n)
        buf += data
        self.packets += 1
        if len(buf) >= self.bufsize:
            self.flush()

    def flush(self) -> None:
        from tcpcopylib.records import drain

        drain(self.fd, self.buf)
