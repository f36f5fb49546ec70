"""TCP stream reassembly: both directions of every connection, from IP datagrams.

Used by tc-diff (the original capture, the target's replies) and by the tests. Feed
``Reassembler.add(ts_ns, ip_datagram)`` (or use ``connections_from_file``), get
``Connection`` objects whose two ``HalfStream``s hold the bytes each side sent.

- Sequence numbers are taken modulo 2^32 relative to each direction's first byte, so a
  stream whose numbers cross 2^32 reassembles like any other.
- Retransmissions and overlaps: a byte already held is not stored again (where a
  later segment carries other bytes for it, the first arrival wins).
- Out-of-order segments are held until the gap fills; a gap never filled is a *hole*
  (zero bytes in ``data()``, listed with its offset and length).
- Every stored byte keeps the capture time of the segment that first carried it
  (``time_at(offset)``), for latencies.
- Memory: each direction stores at most ``limit`` payload bytes (later bytes are
  counted in ``dropped`` and the stream is marked ``truncated``); a reassembler given
  ``on_done`` hands over each connection once both sides closed (FIN or RST) and forgets
  it, and ``expire()`` hands over those idle for longer than a given time.
"""

from __future__ import annotations

import bisect
import struct

from tcpcopylib.packet import TH_ACK, TH_FIN, TH_RST, TH_SYN, ip_str, parse_tcp

M32 = 0xFFFFFFFF
HALF = 0x80000000
DEFAULT_LIMIT = 256 << 20  # bytes per direction (well below 2^31: offsets stay unambiguous)


class HalfStream:
    """One direction of one TCP connection.

    ``add(seq, flags, payload, ts)`` per segment; ``data()`` gives (bytes, holes),
    ``bytes`` the bytes alone. ``syn``/``fin``/``rst``: flags seen; ``base``: sequence
    number of stream offset 0; ``fin_ts``: capture time of the first FIN.
    """

    __slots__ = ("client", "server", "syn", "fin", "rst", "packets", "first_ts", "last_ts",
                 "fin_ts", "base", "segs", "offs", "stored", "limit", "dropped", "other", "_cache")

    def __init__(self, client=None, server=None, first_ts=0, limit: int = DEFAULT_LIMIT):
        self.client = client    # (ip text, port) of the connection's client
        self.server = server
        self.syn = self.fin = self.rst = False
        self.packets = 0
        self.first_ts = first_ts
        self.last_ts = first_ts
        self.fin_ts = None
        self.base = None        # seq of offset 0 (None until a SYN or data is seen)
        self.segs = {}          # offset -> (payload, ts): held bytes, no two overlapping
        self.offs = []          # the offsets of segs, sorted
        self.stored = 0
        self.limit = limit
        self.dropped = 0        # payload bytes not stored (beyond limit)
        self.other = None       # the opposite direction's HalfStream
        self._cache = None

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def add(self, seq: int, flags: int, payload: bytes = b"", ts: int = 0) -> None:
        self.packets += 1
        if ts:
            self.first_ts = self.first_ts or ts
            self.last_ts = max(self.last_ts, ts)
        if flags & TH_SYN:
            if not self.syn:
                self.syn = True
                if self.base is not None and self.segs:  # data seen before the SYN
                    self._rebase((seq + 1) & M32)
                else:
                    self.base = (seq + 1) & M32
            seq = (seq + 1) & M32  # data on a SYN (TCP Fast Open) follows it
        if flags & TH_RST:
            self.rst = True
        if flags & TH_FIN and not self.fin:
            self.fin = True
            self.fin_ts = ts
        if not payload:
            return
        if self.base is None:
            self.base = seq
        rel = (seq - self.base) & M32
        if rel >= HALF:  # before offset 0
            if self.syn:  # before the SYN's next byte: only the part after it counts
                cut = (self.base - seq) & M32
                if cut >= len(payload):
                    return
                payload, rel = payload[cut:], 0
            else:  # the capture started mid-stream and this came late: move offset 0
                self._rebase(seq)
                rel = 0
        self._store(rel, bytes(payload), ts)

    def _rebase(self, seq: int) -> None:
        shift = (self.base - seq) & M32
        if shift >= HALF:  # (the new base is after the old one: keep the old)
            return
        self.segs = {off + shift: v for off, v in self.segs.items()}
        self.offs = [off + shift for off in self.offs]
        self.base = seq
        self._cache = None

    def _store(self, off: int, payload: bytes, ts: int) -> None:
        """Keep the parts of payload that no held segment covers yet."""
        offs, segs = self.offs, self.segs
        i = bisect.bisect_right(offs, off) - 1
        if i >= 0:  # the segment starting at or before off may cover its start
            prev_end = offs[i] + len(segs[offs[i]][0])
            if prev_end > off:
                if prev_end >= off + len(payload):
                    return  # a retransmission
                payload, off = payload[prev_end - off:], prev_end
        j = bisect.bisect_left(offs, off)
        while payload and j < len(offs) and offs[j] < off + len(payload):
            nxt = offs[j]
            if nxt > off:  # the gap before the next held segment
                if not self._put(off, payload[:nxt - off], ts):
                    return
                j += 1
            end = nxt + len(segs[nxt][0])
            payload, off = payload[end - off:], end
            j += 1
        if payload:
            self._put(off, payload, ts)

    def _put(self, off: int, payload: bytes, ts: int) -> bool:
        room = self.limit - self.stored
        if len(payload) > room:
            self.dropped += len(payload) - max(room, 0)
            if room <= 0:
                return False
            payload = payload[:room]
        bisect.insort(self.offs, off)
        self.segs[off] = (payload, ts)
        self.stored += len(payload)
        self._cache = None
        return True

    def _assemble(self):
        """(bytes, holes, offsets, stamps): offsets[i] is where a run first carried at
        stamps[i] starts (sorted, for time_at)."""
        if self._cache is None:
            out = bytearray()
            holes, offs, stamps = [], [], []
            for off in self.offs:
                payload, ts = self.segs[off]
                end = len(out)
                if off > end:
                    holes.append((end, off - end))
                    out.extend(bytes(off - end))
                    end = off
                offs.append(end)
                stamps.append(ts)
                out.extend(payload)
            self._cache = (bytes(out), holes, offs, stamps)
        return self._cache

    def data(self) -> tuple[bytes, list]:
        """(contiguous bytes from offset 0, holes zero-filled; [(offset, length)] of holes)."""
        c = self._assemble()
        return c[0], c[1]

    @property
    def bytes(self) -> bytes:
        return self._assemble()[0]

    def __len__(self) -> int:
        return len(self._assemble()[0])

    def time_at(self, offset: int) -> int | None:
        """Capture time (ns) of the segment that first carried byte ``offset``."""
        _, _, offs, stamps = self._assemble()
        i = bisect.bisect_right(offs, offset) - 1
        return stamps[i] if i >= 0 else None


class Connection:
    """Both directions of one TCP connection: ``c2s`` (client to server) and ``s2c``."""

    __slots__ = ("client", "server", "c2s", "s2c", "first_ts", "last_ts", "number")

    def __init__(self, client, server, ts: int, number: int, limit: int = DEFAULT_LIMIT):
        self.client = client
        self.server = server
        self.c2s = HalfStream(client, server, ts, limit)
        self.s2c = HalfStream(client, server, ts, limit)
        self.c2s.other, self.s2c.other = self.s2c, self.c2s
        self.first_ts = self.last_ts = ts
        self.number = number  # order of first packet in the input

    @property
    def closed(self) -> bool:
        return (self.c2s.fin and self.s2c.fin) or self.c2s.rst or self.s2c.rst

    @property
    def key(self):
        """(client ip, client port, server ip, server port)."""
        return (*self.client, *self.server)

    def __repr__(self):
        return (f"<Connection {self.client} -> {self.server} c2s={len(self.c2s)} "
                f"s2c={len(self.s2c)}>")


class Reassembler:
    """Connections from a sequence of (ts, IP datagram).

    Which side is the client: the sender of a SYN (the receiver of a SYN-ACK); else the
    side whose port is not in ``server_ports``; else the higher port. A SYN (or SYN-ACK)
    on a 4-tuple whose connection already carried data or a FIN/RST starts a new
    connection (port reuse). Without ``on_done``, every connection is kept and
    ``connections()`` returns them in order of first packet; with it, closed ones are
    handed over (a few packets after the close, so that a last ACK or FIN finds them)
    and the open ones at ``finish()``.
    """

    def __init__(self, server_ports=None, limit: int = DEFAULT_LIMIT, on_done=None):
        self.server_ports = set(server_ports or ())
        self.limit = limit
        self.on_done = on_done
        self.open: dict = {}     # (client, server) -> Connection
        self.done: list = []     # without on_done: every connection, in order
        self.count = 0
        self.not_tcp = 0
        self._closing: list = []  # with on_done: closed connections, handed over later

    def add(self, ts: int, ip) -> Connection | None:
        t = parse_tcp(ip)
        if t is None:
            self.not_tcp += 1
            return None
        src, dst = (ip_str(t.src), t.sport), (ip_str(t.dst), t.dport)
        flags = t.flags
        conn = self.open.get((src, dst))
        from_client = True
        if conn is None:
            conn = self.open.get((dst, src))
            from_client = False
        syn = flags & TH_SYN
        if conn is not None and syn:
            half = conn.c2s if from_client else conn.s2c
            if half.segs or half.fin or half.rst or (conn.closed and not half.syn):
                if not (half.syn and (t.seq + 1) & M32 == half.base):  # not a retransmission
                    self._close(conn)
                    conn = None
        if conn is None:
            if syn:
                from_client = not flags & TH_ACK
            elif t.dport in self.server_ports and t.sport not in self.server_ports:
                from_client = True
            elif t.sport in self.server_ports and t.dport not in self.server_ports:
                from_client = False
            else:
                from_client = t.sport >= t.dport
            client, server = (src, dst) if from_client else (dst, src)
            conn = Connection(client, server, ts, self.count, self.limit)
            self.count += 1
            self.open[(client, server)] = conn
            if self.on_done is None:
                self.done.append(conn)
        conn.last_ts = max(conn.last_ts, ts)
        half = conn.c2s if from_client else conn.s2c
        off = t.payload_off
        half.add(t.seq, flags, ip[off:off + t.payload_len], ts)
        if self.on_done is not None:
            self._hand_over(conn)
        return conn

    def _hand_over(self, conn) -> None:
        if conn.closed and conn not in self._closing:
            self._closing.append(conn)
        # a closed connection is handed over once 64 more packets went by (its last ACK,
        # a retransmitted FIN), or at once if many are waiting
        while self._closing and (len(self._closing) > 64 or self._closing[0].last_ts and
                                 conn.last_ts - self._closing[0].last_ts > 2_000_000_000):
            self._close(self._closing.pop(0))

    def _close(self, conn) -> None:
        key = (conn.client, conn.server)
        if self.open.get(key) is conn:
            del self.open[key]
            if self.on_done is not None:
                if conn in self._closing:
                    self._closing.remove(conn)
                self.on_done(conn)

    def expire(self, now_ts: int, idle_ns: int) -> None:
        """Hand over (on_done) every connection without a packet for idle_ns."""
        for conn in [c for c in self.open.values() if now_ts - c.last_ts > idle_ns]:
            self._close(conn)

    def flush_closed(self, now_ts: int, linger_ns: int) -> None:
        """Hand over the closed connections without a packet for linger_ns (when the
        input goes quiet, no 64 more packets come to push them out)."""
        while self._closing and now_ts - self._closing[0].last_ts > linger_ns:
            self._close(self._closing.pop(0))

    def hand_over(self, conn) -> None:
        """Hand over (on_done) this open connection now: its owner knows it is done."""
        self._close(conn)

    def held_bytes(self) -> int:
        """Payload bytes held by the open connections."""
        return sum(c.c2s.stored + c.s2c.stored for c in self.open.values())

    def finish(self) -> None:
        """End of input: hand over what is still open (with on_done)."""
        if self.on_done is not None:
            for conn in sorted(self.open.values(), key=lambda c: c.number):
                self._close(conn)

    def connections(self) -> list:
        return self.done


# ---------------------------------------------------------------------------------------
# inputs: capture files and record streams
# ---------------------------------------------------------------------------------------

#: the record kinds that hold a capture's packets: the client half ("pkt", both halves in a
#: stream from a pcap) and the server half of tc-capture --server-half ("s2c")
CAPTURE_KINDS = ("pkt", "s2c")


def is_capture(head: bytes) -> bool:
    """True if these first bytes start a pcap or pcapng file."""
    from tcpcopylib.pcapio import (PCAP_MAGIC_MODIFIED, PCAP_MAGIC_NS, PCAP_MAGIC_US,
                                   PCAPNG_SHB)

    if len(head) < 4:
        return False
    magics = {struct.unpack(">I", head[:4])[0], struct.unpack("<I", head[:4])[0]}
    return bool(magics & {PCAP_MAGIC_US, PCAP_MAGIC_NS, PCAP_MAGIC_MODIFIED, PCAPNG_SHB})


def capture_packets(fd: int, name: str, on_idle=None):
    """(ts_ns, IP datagram) of every IP packet of a pcap/pcapng file open on fd
    (on_idle() before every read that may block)."""
    from tcpcopylib.link import LINK_SPANS
    from tcpcopylib.pcapio import CaptureReader

    for linktype, ts, frame, orig_len in CaptureReader(fd, name, on_idle).frames():
        span_of = LINK_SPANS.get(linktype)
        if span_of is None:
            from tcpcopylib.errors import CaptureFormatError

            raise CaptureFormatError(f"{name}: unsupported link type {linktype}")
        span = span_of(frame, orig_len)
        if span is not None:
            yield ts, bytes(frame[span[0]:span[1]])


def record_packets(fd: int, name: str, kinds=("pkt",), on_other=None, on_idle=None):
    """(ts_ns, IP datagram) of the pkt records (and pkts batches; fb with kinds=("fb",))
    of a record stream open on fd; other records go to on_other(rec) if given."""
    from tcpcopylib.records import RecordReader, batch_packets

    for rec in RecordReader(fd, on_idle=on_idle, name=name):
        t = rec.get("t")
        if t in kinds and isinstance(rec.get("data"), bytes):
            yield rec.get("ts", 0), rec["data"]
        elif t == "pkts" and "pkt" in kinds:
            stamps, datas, _ = batch_packets(rec, name)
            yield from zip(stamps, datas)
        elif on_other is not None:
            on_other(rec)


def file_packets(path: str, kinds=("pkt",), on_other=None):
    """(ts_ns, IP datagram) from a capture file or a record stream (told apart by their
    first bytes); '-' is stdin. Raises NoInputError / StreamError."""
    import os

    from tcpcopylib.errors import NoInputError

    if path == "-":
        fd = 0
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise NoInputError(f"{path}: {e.strerror or e}") from None
    try:
        head = os.pread(fd, 4, 0) if path != "-" else b""
    except OSError:
        head = b""
    try:
        if path != "-" and is_capture(head):
            yield from capture_packets(fd, path)
        else:
            yield from record_packets(fd, path, kinds, on_other)
    finally:
        if fd:
            os.close(fd)


def connections_from_file(path, server_ports=None, limit: int = DEFAULT_LIMIT,
                          kinds=("pkt",), on_other=None) -> list:
    """Every connection of a capture file or record stream, in order of first packet."""
    r = Reassembler(server_ports, limit)
    for ts, ip in file_packets(str(path), kinds, on_other):
        r.add(ts, ip)
    return r.connections()


def tcp_streams(path, server_port: int, direction: str = "c2s") -> list:
    """The ``direction`` half ("c2s" or "s2c") of every connection to server_port in a
    capture, in order of first packet; each half's ``other`` is the opposite half."""
    out = []
    for conn in connections_from_file(path, [server_port]):
        if conn.server[1] == server_port:
            out.append(conn.c2s if direction == "c2s" else conn.s2c)
    return out
