"""The stream rewriting engine: change a connection's client bytes without breaking TCP.

A filter between the source and tc-session sees every captured packet. To change the
bytes a client sent (and their number), ``StreamRewriter`` acts like a NAT that edits
payloads, per connection:

- the client's data is taken in sequence order (out-of-order segments wait for the hole
  to fill; retransmitted and overlapping bytes are used once), and handed to the
  connection's *transform* (``Transform``: ``feed(bytes) -> bytes``, ``end() -> bytes``),
  which returns what may go out now and may hold bytes until it has what a rule needs;
- what the transform gives goes out in the packet that completed it (its ack number,
  options and timestamp; split in pieces of at most MAX_SEG bytes), numbered from the
  client's own initial sequence number: byte n of the output stream has seq ISN+1+n.
  The client's later packets (pure ACKs, FIN, RST) are renumbered by the difference
  between output and input so far, for the rest of the connection;
- captured retransmissions are not passed on: tc-session retransmits by itself, from
  what it was given, and treats repeated bytes as duplicates anyway;
- the SYN (and the first pure ACK) wait until the transform releases its first byte, so
  a transform that drops the connection (``Drop``) before that drops it whole: the
  target never sees it. A transform that cannot go on later (``Drop`` after bytes went
  out, more held than max_hold, a hole that never fills) ends the connection with an
  RST at the current output position: the target sees a shorter, well-formed stream,
  never a corrupted one ("cut").

Packets from the server, of other protocols and of connections seen only as server
side pass unchanged (the caller writes their records as they were). The ack numbers in
client packets count server bytes, which no rule changes, so they stay as captured.
"""

from __future__ import annotations

import struct

from tcpcopylib.packet import (TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, fix_checksums,
                               parse_tcp_fast)

M32 = 0xFFFFFFFF
MAX_SEG = 16384       # payload bytes per rewritten packet (tc-session splits to the MSS)
MAX_CLOSED = 65536    # finished connections remembered (to renumber their last ACKs)
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class Drop(Exception):
    """Raised by a transform: this connection is not to be replayed (the reason in
    args[0]); whole if nothing of it went out yet, else cut with an RST."""


class Transform:
    """What a connection's client bytes become: the identity; the base of the others."""

    #: bytes received and not given back yet (for the bounds)
    held = 0

    def feed(self, data: bytes) -> bytes:
        """The next in-order client bytes; returns what may go out now."""
        return data

    def end(self) -> bytes:
        """The client closed (FIN, RST, end of input): everything still held, rewritten."""
        return b""


class Conn:
    """One client connection as the rewriter follows it. ``client``/``server`` are
    (packed ip, port); ``tag``: a text the connection's records carry (or None)."""

    __slots__ = ("client", "server", "base", "exp", "out", "ooo", "ooo_bytes", "tf",
                 "pending", "sent", "cut", "gone", "tag", "head", "held", "last_ts")

    def __init__(self, client, server, base):
        self.client, self.server = client, server
        self.base = base        # the captured seq of input offset 0 (ISN + 1)
        self.exp = 0            # the next input offset expected
        self.out = 0            # the next output offset
        self.ooo = None         # {offset: (payload, flags)} beyond exp
        self.ooo_bytes = 0
        self.tf = None
        self.pending = []       # (ts, datagram) of the SYN and a first pure ACK, held
        self.sent = False       # has any of it gone out (the SYN, data)?
        self.cut = False        # dropped or cut: the rest of it is not passed on
        self.gone = False       # no longer followed (ended, dropped or cut)
        self.tag = None
        self.head = b""         # the IP+TCP headers of the last packet (for a flush)
        self.held = 0
        self.last_ts = 0


class Stats:
    __slots__ = ("conns", "rewritten_pkts", "dropped", "cut", "retrans_dropped",
                 "bytes_in", "bytes_out", "held_peak", "truncated")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def _signed(d):
    return ((d + 0x80000000) & M32) - 0x80000000


def client_side(key, flags, server_ports, known) -> bool:
    """Is this packet (key: its (src, sport, dst, dport)) of a connection's client, when
    no state says? ``known(key)``: is a connection followed with that client key. The
    sender of a SYN is the client, of a SYN-ACK the server; else a server port decides;
    else the lower port serves (as tc-session decides mid-stream)."""
    src, sport, dst, dport = key
    if known((dst, dport, src, sport)):
        return False
    if flags & TH_SYN:
        return not flags & TH_ACK
    if server_ports:
        if dport in server_ports:
            return True
        if sport in server_ports:
            return False
    return dport < sport


def rebuild(head: bytes, ihl: int, seq: int, flags: int, payload: bytes = b"") -> bytes:
    """The datagram whose IP+TCP headers are ``head`` (of a captured packet) with this
    seq, flags and payload: lengths and checksums made right."""
    buf = bytearray(head)
    buf += payload
    if buf[0] >> 4 == 4:
        _U16.pack_into(buf, 2, len(buf))
    else:
        _U16.pack_into(buf, 4, len(buf) - 40)
    _U32.pack_into(buf, ihl + 4, seq & M32)
    buf[ihl + 13] = flags
    return bytes(fix_checksums(buf))


class StreamRewriter:
    """Rewrites the client half of every connection with a transform per connection.

    ``make_transform(conn)`` gives a Conn its Transform (None: the connection passes
    unchanged). ``server_ports``: the ports that tell a server's packets from a client's
    when no SYN was seen (else the lower port serves). ``max_hold``: bytes a connection
    may hold (transform and out-of-order); ``max_total``: for all connections together;
    ``max_conns``: connections followed at once (the oldest is ended first)."""

    def __init__(self, make_transform, server_ports=(), max_hold: int = 8 << 20,
                 max_total: int = 256 << 20, max_conns: int = 100_000, on_end=None):
        self.make_transform = make_transform
        self.server_ports = frozenset(server_ports)
        self.max_hold, self.max_total, self.max_conns = max_hold, max_total, max_conns
        self.on_end = on_end      # on_end(conn, how): "done", "dropped", "cut"
        self.conns: dict = {}     # (src, sport, dst, dport) of the client -> Conn
        self.closed: dict = {}    # the same key -> (base, delta) of a finished one
        self.total_held = 0
        self.st = Stats()

    # -- the packet path -------------------------------------------------------------
    def packet(self, ts: int, data) -> list | None:
        """A captured packet: None if it goes on unchanged, else the (ts, datagram, tag)
        packets to write in its place (maybe none)."""
        p = parse_tcp_fast(data)
        if p is None:
            return None
        src, dst, ihl, sport, dport, seq, ack, doff, flags, _win, plen = p
        key = (src, sport, dst, dport)
        c = self.conns.get(key)
        if c is None:
            return self._unknown(key, ts, data, p)
        if flags & TH_SYN:
            if flags & TH_ACK or seq == (c.base - 1) & M32:
                return [] if c.pending else None  # a retransmitted SYN (held or gone)
            out = self._end(c, ts, "done")  # the client reused the 4-tuple
            new = self._unknown(key, ts, data, p)
            return out + ([(ts, data, None)] if new is None else new)
        if ihl + doff + plen > len(data):
            # cut by the capture: dropped, a hole; what follows waits for a retransmission
            # to fill it, else the connection ends cut (_end)
            self.st.truncated += 1
            return []
        c.last_ts = ts
        c.head = bytes(data[:ihl + doff])
        if c.cut:
            return []
        off = c.exp + _signed(seq - c.base - c.exp)
        if flags & TH_RST:
            return self._close(c, ts, ihl, flags)
        if not plen and not flags & TH_FIN:  # a pure ACK (or a window probe)
            if c.pending:
                if len(c.pending) < 2:
                    c.pending.append((ts, data))
                return []
            return self._renumbered(c, ts, data, ihl, off, flags)
        if off > c.exp:
            return self._hold_ooo(c, ts, ihl, off, data[ihl + doff:ihl + doff + plen], flags)
        end = off + plen
        if end < c.exp or end == c.exp and not flags & TH_FIN:
            self.st.retrans_dropped += 1
            return []
        payload = bytes(data[ihl + doff + (c.exp - off):ihl + doff + plen])
        out = self._take(c, ts, ihl, payload, flags)
        if c.ooo and not c.gone and not c.cut:
            out += self._fill(c, ts, ihl)
        return out

    def _unknown(self, key, ts, data, p):
        """A packet of no connection followed: a new client connection, a server's
        packet, or the last packets of a finished one."""
        src, dst, ihl, sport, dport, seq, ack, doff, flags, _win, plen = p
        syn = flags & (TH_SYN | TH_ACK) == TH_SYN
        gone = self.closed.get(key)
        if key in self.closed and not syn:
            if gone is None:  # dropped or cut: the rest of it goes nowhere
                return []
            base, delta = gone
            if not delta:
                return None
            return [(ts, rebuild(data[:ihl + doff], ihl, seq + delta, flags,
                                 bytes(data[ihl + doff:ihl + doff + plen])), None)]
        if not syn and not client_side(key, flags, self.server_ports, self._known):
            return None
        if flags & TH_RST or not syn and not plen:
            return None  # nothing to rewrite before it: pass
        c = Conn((src, sport), (dst, dport), (seq + 1) & M32 if syn else seq)
        c.last_ts = ts
        c.head = bytes(data[:ihl + doff])
        c.tf = self.make_transform(c)
        if c.tf is None:
            return None
        if len(self.conns) >= self.max_conns:  # the oldest first (dicts keep order)
            old = next(iter(self.conns.values()))
            extra = self._end(old, ts, "done")
        else:
            extra = []
        self.conns[key] = c
        self.closed.pop(key, None)
        self.st.conns += 1
        if syn:
            c.pending.append((ts, data))
            return extra
        return extra + self.packet(ts, data)  # mid-stream: offset 0 is this byte

    def _known(self, key) -> bool:
        return key in self.conns or key in self.closed

    def _renumbered(self, c, ts, data, ihl, off, flags):
        delta = c.out - c.exp
        if not delta:
            return None if c.tag is None else [(ts, data, c.tag)]
        return [(ts, rebuild(c.head, ihl, c.base + off + delta, flags), c.tag)]

    def _hold_ooo(self, c, ts, ihl, off, payload, flags):
        if c.ooo is None:
            c.ooo = {}
        if off not in c.ooo or len(c.ooo[off][0]) < len(payload):
            c.ooo_bytes += len(payload) - (len(c.ooo[off][0]) if off in c.ooo else 0)
            c.ooo[off] = (bytes(payload), flags)
        return self._bounds(c, ts, ihl)

    def _fill(self, c, ts, ihl):
        out = []
        ooo = c.ooo
        while ooo and not c.cut and not c.gone:
            ready = [o for o in ooo if o <= c.exp]
            if not ready:
                break
            o = min(ready)
            payload, flags = ooo.pop(o)
            c.ooo_bytes -= len(payload)
            if o + len(payload) > c.exp or flags & TH_FIN:
                out += self._take(c, ts, ihl, payload[c.exp - o:], flags)
        return out

    def _take(self, c, ts, ihl, payload, flags):
        """In-order client bytes (and maybe the FIN) through the transform."""
        tf = c.tf
        self.st.bytes_in += len(payload)
        try:
            data = tf.feed(payload) if payload else b""
            if flags & TH_FIN:
                data += tf.end()
        except Drop:
            return self._drop(c, ts, ihl)
        c.exp += len(payload)
        out = self._segments(c, ts, ihl, data, flags)
        if flags & TH_FIN:
            self._forget(c, "done")
            return out
        return out + self._bounds(c, ts, ihl)

    def _segments(self, c, ts, ihl, data, flags):
        """Packets carrying ``data`` (and the FIN if flags has it) from the output offset."""
        fin = flags & TH_FIN
        if not data and not fin:
            return []
        out = self._release(c)
        held_back = len(out)
        base_flags = flags & ~(TH_FIN | TH_PSH) | TH_ACK
        n = len(data)
        i = 0
        while True:
            piece = data[i:i + MAX_SEG]
            last = i + MAX_SEG >= n
            f = base_flags | (flags & (TH_PSH | TH_FIN) if last else 0)
            out.append((ts, rebuild(c.head, ihl, c.base + c.out, f, piece), c.tag))
            c.out += len(piece)
            i += MAX_SEG
            if last:
                break
        self.st.rewritten_pkts += len(out) - held_back
        self.st.bytes_out += n
        return out

    def _release(self, c):
        """The SYN and first ACK held until now, to go first."""
        out = [(ts, d, c.tag) for ts, d in c.pending]
        c.pending = []
        c.sent = True
        return out

    def _bounds(self, c, ts, ihl):
        held = c.tf.held + c.ooo_bytes
        self.total_held += held - c.held
        c.held = held
        if self.total_held > self.st.held_peak:
            self.st.held_peak = self.total_held
        if held > self.max_hold or self.total_held > self.max_total:
            return self._drop(c, ts, ihl)
        return []

    def _drop(self, c, ts, ihl):
        """The connection cannot be replayed as rewritten: whole if nothing went out,
        else ended with an RST at the output position."""
        c.cut = True
        if not c.sent:
            c.pending = []
            self._forget(c, "dropped")
            return []
        self._forget(c, "cut")
        return [(ts, rebuild(c.head, ihl, c.base + c.out, TH_RST | TH_ACK), c.tag)]

    def _close(self, c, ts, ihl, flags):
        """The client's RST: what is held goes out first, then the RST."""
        try:
            data = c.tf.end()
        except Drop:
            return self._drop(c, ts, ihl)
        out = self._segments(c, ts, ihl, data, TH_ACK) if data else self._release(c)
        out.append((ts, rebuild(c.head, ihl, c.base + c.out, flags), c.tag))
        self._forget(c, "done")
        return out

    def _forget(self, c, how):
        key = (*c.client, *c.server)
        if self.conns.get(key) is c:
            del self.conns[key]
            c.gone = True
            self.total_held -= c.held
            c.held = 0
            if len(self.closed) >= MAX_CLOSED:
                del self.closed[next(iter(self.closed))]
            self.closed[key] = None if how != "done" else (c.base, c.out - c.exp)
            if how == "dropped":
                self.st.dropped += 1
            elif how == "cut":
                self.st.cut += 1
            if self.on_end is not None:
                self.on_end(c, how)

    def _end(self, c, ts, how):
        """End a connection without its FIN (a new one on its 4-tuple, the end of input,
        too many at once): what it holds goes out."""
        if c.cut:
            return []
        ihl = (c.head[0] & 15) * 4 if c.head[0] >> 4 == 4 else 40
        out = []
        if c.ooo:
            out = self._fill(c, ts, ihl)
            if c.ooo:  # a hole never filled: what follows it cannot be rewritten
                return out + self._drop(c, ts, ihl)
        try:
            data = c.tf.end()
        except Drop:
            return out + self._drop(c, ts, ihl)
        out += (self._segments(c, ts, ihl, data, TH_ACK | TH_PSH) if data
                else self._release(c))
        self._forget(c, how)
        return out

    def finish(self, ts: int) -> list:
        """End of input: every connection still followed gives what it holds."""
        out = []
        for c in list(self.conns.values()):
            out += self._end(c, max(ts, c.last_ts), "done")
        return out
