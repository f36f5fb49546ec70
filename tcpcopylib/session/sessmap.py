"""The session map: one "sess" record per replayed session, for tc-diff and for people.

tc-session --sessions FILE (or '-': in its own output stream) writes one record per
session when it ends: which captured connection the session replayed, from which client
address:port (one per connection: a session that reconnected has several), to which
target, which copy (-n), how it ended, and when: SYN sent, established, each run of
request bytes first sent, end. The format is in tcpcopy-records(5).

Both ways of replaying feed the same map, through four calls per session:
``connecting`` (a connection's SYN left from ip:port), ``established``, ``sent`` (client
stream bytes [start, end) written) and ``end``. Forged mode's are made by ``packet()``,
which reads them off every datagram the engine emits (``wrap_emit``); socket mode
(sockets.SocketEngine) makes them where it connects, writes and reads, and adds what only
it knows: ``received`` (bytes of the target's answer read) and the socket error.

The request times are kept as *runs*: [first offset, end offset, time of the first
segment, time of the last] of client stream bytes sent for the first time, a run
spanning at most RUN_NS, so a byte's send time is known within that.
"""

from __future__ import annotations

import os
import time

from tcpcopylib.packet import TH_ACK, TH_RST, TH_SYN, ip_str, parse_tcp

M32 = 0xFFFFFFFF
RUN_NS = 1_000_000   # a run of sent bytes spans at most 1 ms
MAX_RUNS = 10_000    # per session (a long upload): later runs are not recorded
FLUSH_EVERY = 1.0    # seconds: a map written to a file is flushed at least this often


class _Trace:
    """What one session sent, in the record's terms."""

    __slots__ = ("base", "high", "conns", "runs", "runs_cut", "received")

    def __init__(self):
        self.base = None     # client seq of stream offset 0 (forged mode's packets)
        self.high = 0        # end of the client bytes sent so far
        self.conns = []      # [client ip, client port, SYN time, established time]
        self.runs = []
        self.runs_cut = False
        self.received = 0    # bytes of the target's answers read (socket mode)

    def connecting(self, ip: str, port: int, now: int) -> None:
        if not self.conns or self.conns[-1][:2] != [ip, port]:  # (not a SYN resent)
            self.conns.append([ip, port, now, None])

    def established(self, now: int) -> None:
        if self.conns and self.conns[-1][3] is None:
            self.conns[-1][3] = now

    def sent(self, start: int, end: int, now: int) -> None:
        if end <= self.high:
            return  # a retransmission
        start = max(self.high, start)
        self.high = end
        runs = self.runs
        if runs and runs[-1][1] == start and now - runs[-1][2] <= RUN_NS:
            runs[-1][1] = end
            runs[-1][3] = now
        elif len(runs) < MAX_RUNS:
            runs.append([start, end, now, now])
        else:
            self.runs_cut = True


class SessionMap:
    """Collects what each session sent; ``write(rec)`` receives one record per ended
    session (a RecordWriter's write, or tc-session's own output). ``byte_counts``: the
    records carry bytes_sent and bytes_received (socket mode, which reads the answers)."""

    def __init__(self, write, flush=None, byte_counts=False):
        self.write = write
        self.flush_fn = flush
        self.byte_counts = byte_counts
        self.live: dict = {}
        self.written = 0
        self._next_flush = time.monotonic() + FLUSH_EVERY

    @classmethod
    def to_file(cls, path: str, hdr: dict, byte_counts=False):
        from tcpcopylib.errors import NoInputError
        from tcpcopylib.records import RecordWriter

        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise NoInputError(f"--sessions {path}: {e.strerror or e}") from None
        w = RecordWriter(fd, hdr)
        m = cls(w.write, w.flush, byte_counts)
        m.fd = fd
        return m

    @classmethod
    def for_option(cls, dest: str, write_other, hdr: dict, byte_counts=False):
        """The map of tc-session --sessions DEST: into the output stream (``write_other``,
        the writer of the records tc-session passes on) for '-', else into file DEST (its
        own stream, with header ``hdr``)."""
        if dest == "-":
            return cls(write_other, byte_counts=byte_counts)
        return cls.to_file(dest, hdr, byte_counts)

    def _trace(self, sid: int) -> _Trace:
        tr = self.live.get(sid)
        if tr is None:
            tr = self.live[sid] = _Trace()
        return tr

    # -- what a replay tells the map (socket mode calls these itself) -------------------
    def connecting(self, sid: int, ip: str, port: int, now: int) -> None:
        """Session sid opened a connection from ip:port (its SYN left at now)."""
        self._trace(sid).connecting(ip, port, now)

    def established(self, sid: int, now: int) -> None:
        """Its current connection is established."""
        self._trace(sid).established(now)

    def sent(self, sid: int, start: int, end: int, now: int) -> None:
        """Client stream bytes [start, end) were sent (offsets from the first byte after
        the SYN; bytes sent before are not counted again)."""
        self._trace(sid).sent(start, end, now)

    def received(self, sid: int, n: int) -> None:
        """n bytes of the target's answer were read."""
        self._trace(sid).received += n

    # -- forged mode: the same, read off the emitted datagrams --------------------------
    def wrap_emit(self, emit):
        """An emit(data, sid, now) that traces each datagram, then emits it."""
        packet = self.packet

        def traced(data, sid, now):
            packet(data, sid, now)
            emit(data, sid, now)
        return traced

    def packet(self, data, sid: int, now: int) -> None:
        t = parse_tcp(data)
        if t is None:
            return
        tr = self._trace(sid)
        flags = t.flags
        if flags & TH_SYN:
            if tr.base is None:
                tr.base = (t.seq + 1) & M32
            tr.connecting(ip_str(t.src), t.sport, now)
            return
        if flags & TH_ACK and not flags & TH_RST:
            tr.established(now)
        n = t.payload_len
        if not n or tr.base is None:
            return
        end = ((t.seq - tr.base) & M32) + n
        tr.sent(end - n, end, now)

    # -- the record ----------------------------------------------------------------------
    def end(self, s, outcome: str, now: int | None = None, error: str | None = None) -> None:
        """Session s (an engine Session) ended with ``outcome`` (and the socket error
        ``error``, an errno name): write its record."""
        tr = self.live.pop(s.sid, None) or _Trace()
        ck = s.ckey
        rec = {"t": "sess", "ts": now or time.time_ns(), "sid": s.sid, "copy": s.copy,
               "orig": [ip_str(ck[0]), ck[1], ip_str(ck[2]), ck[3]],
               "target": [ip_str(s.tip), s.tport] if s.tip else None,
               "conns": tr.conns, "outcome": outcome, "start": s.created,
               "end": now or time.time_ns(), "sent": tr.runs}
        if tr.runs_cut:
            rec["sent_cut"] = True
        if self.byte_counts:
            rec["bytes_sent"] = tr.high
            rec["bytes_received"] = tr.received
        if error is not None:
            rec["error"] = error
        self.write(rec)
        self.written += 1
        if self.flush_fn is not None and time.monotonic() >= self._next_flush:
            self.flush_fn()
            self._next_flush = time.monotonic() + FLUSH_EVERY

    def shed(self, ckey, copy: int, target, reason: str, now: int) -> None:
        """A session not replayed, shed at its first packet (tc-session(1), SHEDDING):
        its record, with sid 0, no connection and the ``reason``. ``ckey``: the captured
        4-tuple; ``target``: (ip, port) it would have gone to."""
        rec = {"t": "sess", "ts": now, "sid": 0, "copy": copy,
               "orig": [ip_str(ckey[0]), ckey[1], ip_str(ckey[2]), ckey[3]],
               "target": [ip_str(target[0]), target[1]], "conns": [], "outcome": "shed",
               "reason": reason, "start": now, "end": now, "sent": []}
        self.write(rec)
        self.written += 1

    def engine_on_shed(self, engine):
        """An engine on_shed(k, reason, now) writing shed()'s record."""
        def on_shed(k, reason, now):
            ckey, copy = k if len(k) == 2 else (k, 0)  # (copies: (4-tuple, copy))
            target = engine.mapper.target(ckey[2], ckey[3]) or (ckey[2], ckey[3])
            self.shed(ckey, copy, target, reason, now)
        return on_shed

    def chain_on_end(self, previous):
        """An engine on_end callback: this map's, then ``previous`` (if any)."""
        def on_end(s, outcome):
            self.end(s, outcome)
            if previous is not None:
                previous(s, outcome)
        return on_end

    def close(self) -> None:
        if self.flush_fn is not None:
            self.flush_fn()
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
            self.fd = None
