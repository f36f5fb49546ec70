"""tc-intercept's engine: live capture of the target's replies, written as "fb" records.

The capture is libpcap (pcapy-ng) in non-blocking mode, woken by poll() on its fd, with a
1 ms buffer timeout: on an idle link a reply reaches stdout about 1 ms after it arrives
(a blocking next() would wait for the next packet, feasibility.md 4.3). Packets are read
in batches (next_batch) when pcapy has it, and the writer is flushed whenever the capture
has nothing more, so throughput batches itself under load without adding latency.
"""

from __future__ import annotations

import select
import socket
import struct
import time

from tcpcopylib.errors import NoInputError, NoPermissionError, TcError, UnavailableError, UsageError
from tcpcopylib.link import IP_OFFSET, LINKTYPE_ETHERNET, SUPPORTED
from tcpcopylib.packet import parse_tcp_fast
from tcpcopylib.wire import (DATA1, FB_MAP4, FB_START, LEN1, LEN1_KEY, LEN2, LEN2_KEY,
                             encode_fb)

MAX_L2 = 28         # Ethernet + 2 VLAN tags, or Linux cooked v2 (20)
MAX_HEADERS = 120   # IPv4 (<= 60) + TCP (<= 60); IPv6 fixed header 40 + TCP 60
BUFFER_SIZE = 64 << 20
BATCH = 1024

_META = struct.Struct("=IIII")   # next_batch: sec, usec, offset, caplen




def fb_record(buf, ts: int, payload: int, off: int = 0, end: int = -1) -> bytes | None:
    """The encoded fb record for the IP datagram at buf[off:end]; None if it is not IP+TCP
    (packet.parse_tcp's rule: what tc-session could not read is not sent to it).

    ``payload`` is the number of TCP payload bytes to keep (-1: all captured); "len" is
    the datagram's whole length.
    """
    data = buf[off:] if end < 0 else buf[off:end]
    p = parse_tcp_fast(data)
    if p is None:
        return None
    hdr = p[2] + p[7]  # IP header + TCP header
    keep = len(data) if payload < 0 else hdr + payload
    return encode_fb(ts, data[:keep], hdr + p[10])


def snaplen_for(payload: int) -> int:
    return 262144 if payload < 0 else MAX_L2 + MAX_HEADERS + payload


def open_capture(iface: str, bpf: str, snaplen: int, promisc: bool = True,
                 buffer_size: int = BUFFER_SIZE):
    """An activated, non-blocking pcapy capture; errors mapped to exit statuses."""
    import pcapy

    if iface != "any":
        try:
            socket.if_nametoindex(iface)
        except OSError:
            raise NoInputError(f"{iface}: no such interface") from None
    cap = pcapy.create(iface)
    cap.set_snaplen(snaplen)
    cap.set_promisc(1 if promisc else 0)
    cap.set_timeout(1)
    cap.set_buffer_size(buffer_size)
    rc = cap.activate()
    if rc < 0:
        # pcapy's activate() returns libpcap's code; open_live() gives the message
        if rc == -5:
            raise NoInputError(f"{iface}: no such interface")
        if rc == -8:
            raise NoPermissionError(f"{iface}: capturing needs root or CAP_NET_RAW")
        if rc == -9:
            raise UnavailableError(f"{iface}: interface is down")
        try:
            pcapy.open_live(iface, snaplen, int(promisc), 1)
            msg = f"libpcap error {rc}"
        except pcapy.PcapError as e:
            msg = str(e)
        if "ermission" in msg or "not permitted" in msg:
            raise NoPermissionError(f"{iface}: {msg}")
        raise TcError(f"{iface}: cannot capture: {msg}")
    try:
        cap.setfilter(bpf)
    except pcapy.PcapError as e:
        raise UsageError(f"bad filter {bpf!r}: {e}") from None
    cap.setnonblock(1)
    return cap


class Interceptor:
    """Capture loop: frames in, encoded fb records out through a RecordWriter."""

    def __init__(self, cap, writer, payload: int = 0, tick=None, tick_s: float = 10.0):
        self.cap = cap
        self.writer = writer
        self.payload = payload
        self.linktype = cap.datalink()
        self.ip_offset = IP_OFFSET.get(self.linktype)
        if self.ip_offset is None:
            raise UsageError(f"unsupported link type {self.linktype} ({SUPPORTED})")
        self.tick = tick
        self.tick_s = tick_s
        self.captured = 0
        self.written = 0
        self.skipped = 0

    def kernel_stats(self) -> tuple[int, int, int]:
        """(received, dropped, dropped by the interface) as libpcap reports them."""
        try:
            return tuple(self.cap.stats())
        except Exception:  # noqa: BLE001 - a closed or odd handle: no numbers
            return (0, 0, 0)

    def _frame(self, buf, ts: int, start: int = 0, end: int = -1) -> None:
        """One captured frame, buf[start:end] (a batch buffer, or a whole frame)."""
        self.captured += 1
        if end < 0:
            end = len(buf)
        if self.linktype == LINKTYPE_ETHERNET and end - start > 14 and buf[start + 12] == 8 \
                and buf[start + 13] == 0:
            off = start + 14  # the common case, untagged IPv4: ip_offset's answer, no call
        else:
            off = self.ip_offset(buf, start, end)
            if off < 0:
                self.skipped += 1
                return
        rec = fb_record(buf, ts, self.payload, off, end)
        if rec is None:
            self.skipped += 1
            return
        self.writer.write_raw(rec)
        self.written += 1

    def _ether_batch(self, buf: bytes, meta: bytes) -> None:
        """A next_batch() result on Ethernet: untagged IPv4 TCP with headers-only-sized
        records is encoded inline (the hot loop: no calls per packet), the rest by _frame."""
        writer = self.writer
        out = writer.buf
        payload = self.payload
        head, len1, len2 = FB_START.pack, LEN1.pack, LEN2.pack  # see wire.encode_fb
        c1, c2, c8, c16 = FB_MAP4, DATA1, LEN1_KEY, LEN2_KEY
        frame = self._frame
        fast = 0
        for sec, usec, off, caplen in _META.iter_unpack(meta):
            ip = off + 14
            end = off + caplen
            if caplen >= 54 and buf[off + 12] == 8 and buf[off + 13] == 0 and buf[ip] == 0x45 \
                    and buf[ip + 9] == 6 and not (buf[ip + 6] & 0x1F) and not buf[ip + 7]:
                hdr = keep = 20 + (buf[ip + 32] >> 4) * 4  # IP + TCP headers
                if payload:
                    keep = end - ip if payload < 0 else min(end - ip, hdr + payload)
                tot = (buf[ip + 2] << 8) | buf[ip + 3]
                # (parse_tcp's rule: whole headers, captured and within the total length)
                if 40 <= hdr <= tot and ip + hdr <= end and 24 <= keep < 256:
                    out += head(c1, sec * 1_000_000_000 + usec * 1000, c2, keep)
                    out += buf[ip:ip + keep]
                    out += len2(c16, tot) if tot >= 256 else len1(c8, tot)
                    fast += 1
                    continue
            frame(buf, sec * 1_000_000_000 + usec * 1000, off, end)
        self.captured += fast
        self.written += fast
        writer.records += fast
        if len(out) >= writer.bufsize:
            writer.flush()

    def run(self, limit: int = 0) -> None:
        """Capture until interrupted (or `limit` records written, for tests/benchmarks)."""
        cap, writer, frame = self.cap, self.writer, self._frame
        poll = select.poll()
        poll.register(cap.getfd(), select.POLLIN)
        batch = getattr(cap, "next_batch", None)
        next_tick = time.monotonic() + self.tick_s if self.tick else None
        iter_meta = _META.iter_unpack
        while True:
            got = 0
            if batch is not None:
                buf, meta = batch(BATCH)
                if meta:
                    if limit:
                        meta = meta[:16 * (limit - self.written)]
                    if self.linktype == LINKTYPE_ETHERNET:
                        self._ether_batch(buf, meta)
                    else:
                        for sec, usec, off, caplen in iter_meta(meta):
                            frame(buf, sec * 1_000_000_000 + usec * 1000, off, off + caplen)
                    got = len(meta) // 16
            else:
                hdr, data = cap.next()
                if hdr is not None:
                    sec, usec = hdr.getts()
                    frame(data, sec * 1_000_000_000 + usec * 1000)
                    got = 1
            if limit and self.written >= limit:
                writer.flush()
                return
            if next_tick is not None:
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.tick_s
                    self.tick()
            if got == 0 or batch is not None and got < BATCH:
                # less than BATCH: the ring is drained (next_batch reads every block
                # ready), so wait in poll() rather than ask pcap again (its own
                # poll(fd, 0) and buffers for nothing, once per wake-up)
                writer.flush()
                poll.poll(1000 if next_tick is None else
                          max(1, int((next_tick - time.monotonic()) * 1000)))
