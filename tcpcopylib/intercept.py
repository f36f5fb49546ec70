"""tc-intercept's engine: live capture of the target's replies, written as "fb" records.

The capture is one of tc-capture's engines (tcpcopylib.capture), both directions, in
non-blocking mode, woken by poll() on its fd: "ring" (the default: a TPACKET_V2 ring,
immediate, a reply reaches stdout as soon as it is read), "pcap" (libpcap through
pcapy-ng, with a 1 ms buffer timeout: on an idle link a reply waits about 1 ms for its
block, feasibility.md 4.3) or "afpacket" (one recvfrom per packet). Packets are read in
batches where the engine has them, and the writer is flushed whenever the capture has
nothing more, so throughput batches itself under load without adding latency.
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


def open_engine(kind: str, iface: str, bpf: str, snaplen: int, promisc: bool = True,
                buffer_size: int = BUFFER_SIZE):
    """The capture engine ``kind`` (tcpcopylib.capture.ENGINES) on ``iface``, both
    directions; errors mapped to tc-intercept's exit statuses."""
    from tcpcopylib import capture

    if kind == "pcap":
        return capture.PcapEngine.from_handle(
            open_capture(iface, bpf, snaplen, promisc, buffer_size), iface)
    if iface != "any":
        try:
            socket.if_nametoindex(iface)
        except OSError:
            raise NoInputError(f"{iface}: no such interface") from None
    try:
        return capture.ENGINES[kind](iface, bpf, snaplen, max(1, buffer_size >> 10),
                                     both_ways=True, promisc=promisc)
    except capture.InterfaceDownError as e:
        raise UnavailableError(str(e)) from None
    except NoPermissionError as e:
        raise NoPermissionError(f"{iface}: capturing needs root or CAP_NET_RAW") from e


def open_interceptor(kind: str, iface: str, bpf: str, payload: int, buffer_size: int,
                     make_writer, *, promisc: bool = True, warn=print, info=None, tick=None,
                     tick_s: float = 10.0) -> "Interceptor":
    """tc-intercept's capture, opened (open_engine), as tc-intercept and tc-feedback
    --capture use it: the engine's warning said, ``make_writer()`` called once the capture is
    open (a stream is started only then), the "capturing on" line given to ``info``. The
    engine is closed if anything after opening it fails; else the caller closes
    ``.engine``."""
    engine = open_engine(kind, iface, bpf, snaplen_for(payload), promisc=promisc,
                         buffer_size=buffer_size)
    try:
        warning = getattr(engine, "warning", lambda: None)()
        if warning:
            warn(warning)
        icpt = Interceptor(engine, make_writer(), payload=payload, tick=tick, tick_s=tick_s)
    except BaseException:
        engine.close()
        raise
    if info is not None:
        info(f"capturing on {iface}, filter {bpf!r} ({engine.describe()})")
    return icpt


class Interceptor:
    """Capture loop: frames in, encoded fb records out through a RecordWriter.

    ``engine``: a capture engine of tcpcopylib.capture (open_engine). The engine feeds
    frames to batch() and frame(), the interface of capture.Capturer."""

    def __init__(self, engine, writer, payload: int = 0, tick=None, tick_s: float = 10.0):
        self.engine = engine
        self.writer = writer
        self.payload = payload
        self.linktype = engine.linktype
        self.ip_offset = IP_OFFSET.get(self.linktype)
        if self.ip_offset is None:
            raise UsageError(f"unsupported link type {self.linktype} ({SUPPORTED})")
        self.tick = tick
        self.tick_s = tick_s
        self.captured = 0
        self.written = 0
        self.skipped = 0
        self.limit = 0       # stop after this many records (0: never)
        self.done = False
        # (the engines count loopback's outgoing copies of packets, which they leave out,
        # here; libpcap never shows them: not reported)
        self.frames = self.foreign = 0

    def kernel_stats(self) -> tuple[int, int, int]:
        """(received, dropped, dropped by the interface) as the kernel (or libpcap) reports
        them."""
        try:
            return tuple(self.engine.kernel_stats())
        except Exception:  # noqa: BLE001 - a closed or odd handle: no numbers
            return (0, 0, 0)

    def counts(self, kernel=None) -> dict:
        """The counters (--stats-json); ``kernel``: kernel_stats() taken earlier (before the
        engine was closed), else asked now."""
        recv, drop, ifdrop = kernel or self.kernel_stats()
        return {"captured": self.captured, "written": self.written, "skipped": self.skipped,
                "kernel_received": recv, "kernel_drops": drop, "if_drops": ifdrop}

    def stats_line(self, kernel=None) -> str:
        """The counters in words (--stats, -v)."""
        c = self.counts(kernel)
        return (f"{c['captured']} packets captured, {c['written']} replies written, "
                f"{c['skipped']} skipped (not TCP); kernel: {c['kernel_received']} received, "
                f"{c['kernel_drops']} dropped, {c['if_drops']} dropped by interface")

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

    def frame(self, buf, start: int, end: int, linktype: int, ts: int,
              outgoing: bool = False) -> None:
        """One frame from an engine that reads frame by frame (Capturer's signature)."""
        self._frame(buf, ts, start, end)
        if self.limit and self.written >= self.limit:
            self.done = True

    def batch(self, buf, meta, linktype: int, ts_unit: int = 1000) -> int:
        """A batch from an engine: (sec, usec or nsec, offset, caplen) per frame ("=IIII",
        as Capturer.batch; ``ts_unit``: ns per unit of the second field)."""
        n = len(meta) >> 4
        if self.limit:
            meta = meta[:16 * (self.limit - self.written)]
        if self.linktype == LINKTYPE_ETHERNET:
            self._ether_batch(buf, meta, ts_unit)
        else:
            frame = self._frame
            for sec, sub, off, caplen in _META.iter_unpack(meta):
                frame(buf, sec * 1_000_000_000 + sub * ts_unit, off, off + caplen)
        if self.limit and self.written >= self.limit:
            self.done = True
        return n

    def _ether_batch(self, buf, meta, ts_unit: int = 1000) -> None:
        """A batch on Ethernet: untagged IPv4 TCP with headers-only-sized records is
        encoded inline (the hot loop: no calls per packet), the rest by _frame."""
        writer = self.writer
        out = writer.buf
        payload = self.payload
        head, len1, len2 = FB_START.pack, LEN1.pack, LEN2.pack  # see wire.encode_fb
        c1, c2, c8, c16 = FB_MAP4, DATA1, LEN1_KEY, LEN2_KEY
        frame = self._frame
        fast = 0
        for sec, sub, off, caplen in _META.iter_unpack(meta):
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
                    out += head(c1, sec * 1_000_000_000 + sub * ts_unit, c2, keep)
                    out += buf[ip:ip + keep]
                    out += len2(c16, tot) if tot >= 256 else len1(c8, tot)
                    fast += 1
                    continue
            frame(buf, sec * 1_000_000_000 + sub * ts_unit, off, end)
        self.captured += fast
        self.written += fast
        writer.records += fast
        if len(out) >= writer.bufsize:
            writer.flush()

    def take(self, max_reads: int = 8) -> bytes:
        """In process (tc-feedback --capture; ``writer`` a livecapture.MemoryWriter): read
        what the kernel holds now (at most ``max_reads`` batches) and return the records
        made since the last call, the stream's header first. The reader waits for the
        engine's fd (``engine.fd``), so no linger here: its loop batches by itself."""
        read = self.engine.read_batches
        for _ in range(max_reads):
            if read(self, BATCH) < BATCH:
                break
        buf = self.writer.buf
        data = bytes(buf)
        buf.clear()
        return data

    def run(self, limit: int = 0) -> None:
        """Capture until interrupted (or `limit` records written, for tests/benchmarks)."""
        engine, writer = self.engine, self.writer
        self.limit = limit
        read = engine.read_batches
        poll = select.poll()
        poll.register(engine.fd, select.POLLIN)
        next_tick = time.monotonic() + self.tick_s if self.tick else None
        from tcpcopylib.capture import LINGER_BATCH  # as capture_loop (RingEngine.linger)

        linger = getattr(engine, "linger", 0)
        while True:
            got = read(self, BATCH)
            if self.done:
                writer.flush()
                return
            if next_tick is not None:
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.tick_s
                    self.tick()
            if got < BATCH:
                # less than BATCH: the capture is drained (pcap's next_batch reads every
                # block ready; the ring stops at its end only), so wait in poll() rather
                # than ask again (libpcap's own poll(fd, 0) and buffers for nothing)
                writer.flush()
                if linger and 0 < got < LINGER_BATCH:  # a small batch goes out at once;
                    time.sleep(linger)  # then a short wait: more per read, fewer wake-ups
                    continue
                poll.poll(1000 if next_tick is None else
                          max(1, int((next_tick - time.monotonic()) * 1000)))
