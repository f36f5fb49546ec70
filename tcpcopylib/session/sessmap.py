"""The session map: one "sess" record per replayed session, for tc-diff and for people.

tc-session --sessions FILE (or '-': in its own output stream) hands every datagram it
emits to ``SessionMap.packet()`` and every session end to ``SessionMap.end()``. A record
says which captured connection the session replayed, from which client address:port
(one per connection: a session that reconnected has several), to which target, which
copy (-n), how it ended, and when: SYN sent, established, each run of request bytes
first sent, end. The format is in tcpcopy-records(5).

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
    __slots__ = ("base", "high", "conns", "runs", "runs_cut")

    def __init__(self):
        self.base = None     # client seq of stream offset 0
        self.high = 0        # end of the client bytes sent so far
        self.conns = []      # [client ip, client port, SYN time, established time]
        self.runs = []
        self.runs_cut = False


class SessionMap:
    """Collects what each session sent; ``write(rec)`` receives one record per ended
    session (a RecordWriter's write, or tc-session's own output)."""

    def __init__(self, write, flush=None):
        self.write = write
        self.flush_fn = flush
        self.live: dict = {}
        self.written = 0
        self._next_flush = time.monotonic() + FLUSH_EVERY

    @classmethod
    def to_file(cls, path: str, hdr: dict):
        from tcpcopylib.errors import NoInputError
        from tcpcopylib.records import RecordWriter

        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise NoInputError(f"--sessions {path}: {e.strerror or e}") from None
        w = RecordWriter(fd, hdr)
        m = cls(w.write, w.flush)
        m.fd = fd
        return m

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
        tr = self.live.get(sid)
        if tr is None:
            tr = self.live[sid] = _Trace()
        flags = t.flags
        if flags & TH_SYN:
            if tr.base is None:
                tr.base = (t.seq + 1) & M32
            src = ip_str(t.src)
            if not tr.conns or tr.conns[-1][:2] != [src, t.sport]:
                tr.conns.append([src, t.sport, now, None])
            return
        if flags & TH_ACK and not flags & TH_RST and tr.conns and tr.conns[-1][3] is None:
            tr.conns[-1][3] = now
        n = t.payload_len
        if not n or tr.base is None:
            return
        end = ((t.seq - tr.base) & M32) + n
        if end <= tr.high:
            return  # a retransmission
        start = max(tr.high, end - n)
        tr.high = end
        runs = tr.runs
        if runs and runs[-1][1] == start and now - runs[-1][2] <= RUN_NS:
            runs[-1][1] = end
            runs[-1][3] = now
        elif len(runs) < MAX_RUNS:
            runs.append([start, end, now, now])
        else:
            tr.runs_cut = True

    def end(self, s, outcome: str, now: int | None = None) -> None:
        """Session s (an engine Session) ended with ``outcome``: write its record."""
        tr = self.live.pop(s.sid, None) or _Trace()
        ck = s.ckey
        rec = {"t": "sess", "ts": now or time.time_ns(), "sid": s.sid, "copy": s.copy,
               "orig": [ip_str(ck[0]), ck[1], ip_str(ck[2]), ck[3]],
               "target": [ip_str(s.tip), s.tport] if s.tip else None,
               "conns": tr.conns, "outcome": outcome, "start": s.created,
               "end": now or time.time_ns(), "sent": tr.runs}
        if tr.runs_cut:
            rec["sent_cut"] = True
        self.write(rec)
        self.written += 1
        if self.flush_fn is not None and time.monotonic() >= self._next_flush:
            self.flush_fn()
            self._next_flush = time.monotonic() + FLUSH_EVERY

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
