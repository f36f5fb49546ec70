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

import cbor2

from tcpcopylib.errors import NoInputError, NoPermissionError, TcError, UnavailableError, UsageError

# Link types (libpcap DLT_ values on Linux)
DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_LOOP = 0, 1, 12, 108
DLT_RAW_ALT, DLT_LINUX_SLL, DLT_LINUX_SLL2 = 101, 113, 276

ETH_IP4, ETH_IP6 = 0x0800, 0x86DD
ETH_VLANS = (0x8100, 0x88A8, 0x9100)

MAX_L2 = 28         # Ethernet + 2 VLAN tags, or Linux cooked v2 (20)
MAX_HEADERS = 120   # IPv4 (<= 60) + TCP (<= 60); IPv6 fixed header 40 + TCP 60
BUFFER_SIZE = 16 << 20
BATCH = 1024

_U16 = struct.Struct("!H")
_META = struct.Struct("=IIII")   # next_batch: sec, usec, offset, caplen
_dumps = cbor2.dumps


def link_offset(dlt: int, frame) -> int:
    """Offset of the IP header in a frame of link type `dlt`; -1 if not IPv4/IPv6."""
    if dlt == DLT_EN10MB:
        off, n = 12, len(frame)
        while off + 2 <= n:
            et = (frame[off] << 8) | frame[off + 1]
            if et in ETH_VLANS:
                off += 4
                continue
            return off + 2 if et in (ETH_IP4, ETH_IP6) else -1
        return -1
    if dlt == DLT_LINUX_SLL:
        et = _U16.unpack_from(frame, 14)[0] if len(frame) >= 16 else 0
        return 16 if et in (ETH_IP4, ETH_IP6) else -1
    if dlt == DLT_LINUX_SLL2:
        et = _U16.unpack_from(frame, 0)[0] if len(frame) >= 20 else 0
        return 20 if et in (ETH_IP4, ETH_IP6) else -1
    if dlt in (DLT_RAW, DLT_RAW_ALT):
        return 0
    if dlt in (DLT_NULL, DLT_LOOP):
        return 4 if len(frame) > 4 else -1
    raise UsageError(f"unsupported link type {dlt} (Ethernet, Linux cooked, raw IP, loopback)")


def fb_record(ip, ts: int, payload: int) -> bytes | None:
    """The encoded fb record for one captured IP datagram; None if it is not IP+TCP.

    ``payload`` is the number of TCP payload bytes to keep (-1: all captured).
    """
    n = len(ip)
    if n < 20:
        return None
    v = ip[0] >> 4
    if v == 4:
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6 or ihl < 20 or (_U16.unpack_from(ip, 6)[0] & 0x1FFF):
            return None
        tot = _U16.unpack_from(ip, 2)[0]
    elif v == 6:
        if n < 40 or ip[6] != 6:
            return None
        ihl = 40
        tot = 40 + _U16.unpack_from(ip, 4)[0]
    else:
        return None
    if n < ihl + 13:
        return None
    hdr = ihl + (ip[ihl + 12] >> 4) * 4
    keep = n if payload < 0 else min(n, hdr + payload)
    return _dumps({"t": "fb", "ts": ts, "data": bytes(ip[:keep]), "len": tot})


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
        self.dlt = cap.datalink()
        link_offset(self.dlt, b"")  # refuse unsupported link types now
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

    def _frame(self, frame, ts: int) -> None:
        self.captured += 1
        dlt = self.dlt
        if dlt == DLT_EN10MB and len(frame) > 14 and frame[12] == 8 and frame[13] == 0:
            off = 14  # the common case: untagged IPv4
        else:
            off = link_offset(dlt, frame)
            if off < 0:
                self.skipped += 1
                return
        rec = fb_record(memoryview(frame)[off:], ts, self.payload)
        if rec is None:
            self.skipped += 1
            return
        self.writer.write_raw(rec)
        self.written += 1

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
                    for sec, usec, off, caplen in iter_meta(meta):
                        frame(buf[off:off + caplen], sec * 1_000_000_000 + usec * 1000)
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
            if got == 0:
                writer.flush()
                poll.poll(1000 if next_tick is None else
                          max(1, int((next_tick - time.monotonic()) * 1000)))
