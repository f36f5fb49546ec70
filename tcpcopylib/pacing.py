"""Release timed records on a schedule: the timing contract of DESIGN.md section 4.

A record with an integer ``ts`` (ns) is due at ``anchor_wall + (ts - anchor_ts) / speed``,
anchored at the first timed record seen. A live stream (timestamps within ``LIVE_NS`` of the
wall clock when read) passes straight through tc-pace: at speed 1, a live record that would
wait (it came quicker than the anchor record did) moves the anchor back so it is due at once
(see Timeline). Options reshape that schedule:

- ``max_gap`` (s, recording time): a jump between consecutive timestamps larger than this
  (forwards or backwards) counts as exactly ``max_gap``; the anchor is shifted, so the rest
  of the recording keeps its pace.
- ``delay`` (s): added to every due time.
- ``rate`` (records/s): releases are at least ``1/rate`` apart; records queue, never drop.

Every release time is computed from an anchor (``anchor + n * interval``), never by adding
up sleeps, so oversleeping does not accumulate into drift. Records without an integer ``ts``
are not paced. ``clock`` (ns, monotonic) and ``sleep`` (s) are injectable for tests.
"""

from __future__ import annotations

import time

NS = 1_000_000_000
LONG_WAIT_NS = 3600 * NS  # a wait worth a warning (a timestamp far ahead)
# a record stamped this close to the wall clock when it is read is live (Timeline.at)
LIVE_NS = 20_000_000


class Timeline:
    """The timing rule, its one implementation (tc-pace's Pacer and tc-session's DueQueue
    both schedule with it): a timed record is due at ``anchor_wall + (ts - anchor_ts) /
    speed`` (clock ns), anchored at the first record ``at()`` is asked about. A gap clamp
    moves the anchor (either end), so the records after it keep their pace.

    With ``wall`` (tc-pace's Pacer), live records (stamped within LIVE_NS of the wall clock
    when read: tc-session's output) are due at once: at speed 1, one that the anchor would
    hold (it travelled quicker than the anchor record did, e.g. the first record of a
    pipeline starting up) moves ``anchor_wall`` back so that it is due now. Otherwise the
    first record's latency would delay every later record of the stream by as much. A
    recording (its stamps long past) keeps its pace. tc-session's DueQueue passes no
    ``wall``: its due times are where offsets from a connection's accept are counted
    (engine._before_offset), which a moving anchor would shift (by up to 15 ms in a live
    lab run); there the first record's latency stays a floor."""

    __slots__ = ("speed", "anchor_wall", "anchor_ts")

    def __init__(self, speed: float = 1.0):
        self.speed = speed
        self.anchor_wall: int | None = None  # None until the first timed record
        self.anchor_ts = 0

    def at(self, ts: int, now: int, wall=None) -> int:
        """When a record stamped ``ts`` is due; the first one anchors the timeline at
        ``now``. ``wall()``: the wall clock (ns since the epoch; asked only when the record
        would wait), for live records to pass at once (see above); None: never."""
        if self.anchor_wall is None:
            self.anchor_wall, self.anchor_ts = now, ts
        due = self.anchor_wall + self.scaled(ts - self.anchor_ts)
        if due > now and wall is not None and self.speed == 1 and \
                -LIVE_NS <= wall() - ts <= LIVE_NS:
            self.anchor_wall -= due - now  # a live record: due at once (see above)
            return now
        return due

    def scaled(self, offset: int) -> int:
        """A span of recording time (ns) as clock time."""
        return offset if self.speed == 1 else round(offset / self.speed)

    def shift(self) -> int | None:
        """At speed 1, once anchored, ``at(ts) == ts + shift()`` (for loops that inline
        it); None otherwise."""
        if self.anchor_wall is None or self.speed != 1:
            return None
        return self.anchor_wall - self.anchor_ts


class Pacer:
    def __init__(self, speed: float = 1.0, max_gap: float | None = None,
                 rate: float | None = None, delay: float = 0.0,
                 clock=time.monotonic_ns, sleep=time.sleep, wall=time.time_ns):
        if not speed > 0:
            raise ValueError("speed must be > 0")
        if rate is not None and not rate > 0:
            raise ValueError("rate must be > 0")
        if max_gap is not None and not max_gap >= 0:
            raise ValueError("max-gap must be >= 0")
        if not delay >= 0:
            raise ValueError("delay must be >= 0")
        self.timeline = Timeline(speed)
        self.max_gap_ns = None if max_gap is None else round(max_gap * NS)
        self.rate = rate
        self.interval_ns = None if rate is None else NS / rate
        self.delay_ns = round(delay * NS)
        self.clock = clock
        self.sleep = sleep
        self.wall = wall  # the clock live records are stamped with (Timeline.at)
        self.warn = None  # warn(msg): told about a wait of an hour or more
        self.origin_ts: int | None = None   # first ts seen (for rewriting ts)
        self.prev_ts: int | None = None
        self._slot_base: int | None = None  # rate schedule: slot n = base + n * interval
        self._slot_n = 0
        # no gap clamp, no rate: once anchored, plan() is the timeline's rule plus the delay
        self._plain = max_gap is None and rate is None
        # statistics
        self.timed = 0
        self.max_late_ns = 0
        self.sleeps = 0

    def plan(self, ts: int, now: int) -> int:
        """The planned release time (clock ns) of a record stamped ``ts``, read at ``now``."""
        if self.origin_ts is None:
            self.origin_ts = self.prev_ts = ts
        else:
            limit = self.max_gap_ns
            if limit is not None:
                gap = ts - self.prev_ts
                if gap > limit or gap < -limit:
                    self.timeline.anchor_ts += gap - limit
            self.prev_ts = ts
        t = self.timeline.at(ts, now, self.wall) + self.delay_ns
        if self.interval_ns is None:
            return t
        base = self._slot_base
        if base is not None:
            slot = base + round(self._slot_n * self.interval_ns)
            if t < slot:
                if slot < now - self.interval_ns:
                    # We fell behind the schedule (input stalled): restart it from now
                    # rather than releasing a burst to catch up.
                    self._slot_base, self._slot_n = now, 1
                else:
                    self._slot_n += 1
                return slot
        self._slot_base, self._slot_n = t, 1
        return t

    def due(self, ts: int, flush=None) -> int:
        """Wait until a record stamped ``ts`` is due (calling ``flush`` before any sleep);
        return its planned release time on the recording's clock
        (``origin_ts + (planned - anchor_wall)``): ``ts`` itself with no option set."""
        now = self.clock()
        if self._plain and self.origin_ts is not None:
            planned = self.timeline.at(ts, now, self.wall) + self.delay_ns
        else:
            planned = self.plan(ts, now)
        if planned > now:
            if planned - now >= LONG_WAIT_NS and self.warn is not None:
                self.warn(f"warning: the next record is due in {(planned - now) / NS:.0f} s "
                          f"(its timestamp jumps ahead); --max-gap S shortens such gaps")
            if flush is not None:
                flush()
            clock, sleep = self.clock, self.sleep
            for _ in range(1000):  # sleep() may return early (signals); bounded anyway
                sleep(min((planned - now) / NS, 1e6))  # (sleep() refuses centuries)
                self.sleeps += 1
                now = clock()
                if now >= planned:
                    break
        self.timed += 1
        late = now - planned
        if late > self.max_late_ns:
            self.max_late_ns = late
        return self.origin_ts + (planned - self.timeline.anchor_wall)

    def release(self, rec: dict, flush=None, keep_ts: bool = False) -> dict:
        """Wait until ``rec`` is due (calling ``flush`` before any sleep) and return it.

        A timed record's ``ts`` is rewritten to its planned release time (see ``due``),
        unless ``keep_ts``; with no option set that is the original ``ts``.
        """
        ts = rec.get("ts")
        if type(ts) is not int:
            return rec
        new_ts = self.due(ts, flush)
        if not keep_ts and new_ts != ts:
            rec["ts"] = new_ts
        return rec


class PaceRunner:
    """tc-pace's forwarding loop: the records of a stream read from ``in_fd`` go to a
    RecordWriter on ``out_fd`` (made at the first header, ``tool`` merged into it), each
    when ``pacer`` says it is due; what was released is flushed before every sleep and
    every blocking read. A timed record's ts becomes its planned release time (Pacer.due),
    unless ``keep_ts``. The clock is the pacer's (clock, sleep), the I/O two descriptors,
    so a test runs it in process with a fake clock and in-memory files."""

    def __init__(self, pacer: Pacer, out_fd: int, tool: str = "tc-pace", keep_ts: bool = False):
        self.pacer = pacer
        self.out_fd = out_fd
        self.tool = tool
        self.keep_ts = keep_ts
        self.writer = None
        self.records_in = self.records_out = 0
        # A batch (pkts) moves as one item, every ts shifted with its first, unless records
        # are rate-capped or gaps clamped: then each of its packets is paced on its own.
        self.whole_batches = pacer.interval_ns is None and pacer.max_gap_ns is None

    def run(self, in_fd: int, name: str = "<stdin>") -> None:
        """Until the end of the input (an empty one is a StreamError: nothing written)."""
        import struct

        from tcpcopylib.records import HEADER, T_PKTS, RecordReader

        # Records in the common layout are forwarded as the bytes read, their ts patched in
        # place: out is a copy of the chunk being released, out[mark:cur] the records released
        # but not yet in the writer's buffer, cur the start of the next record.
        out = None
        mark = cur = 0

        def take():
            """out[mark:cur] into the writer's buffer."""
            nonlocal mark
            if cur > mark:
                self.writer.buf += memoryview(out)[mark:cur]
                mark = cur

        def flush():
            take()
            if self.writer is not None:
                self.writer.flush()

        reader = RecordReader(in_fd, on_idle=flush, headers=True, name=name)
        due, keep_ts = self.pacer.due, self.keep_ts
        patch_ts = struct.Struct(">Q").pack_into
        try:
            for buf, items in reader.iter_spans():
                out = bytearray(buf)
                mark = cur = 0
                for kind, ts, ts_at, stop, n, rec in items:  # (records.SPAN_KIND)
                    if rec is not None:  # decoded by cbor2 (a header too): re-encoded
                        take()
                        mark = cur = stop
                        if kind is HEADER:
                            self._header(rec)
                        else:
                            self._decoded(rec, flush, name)
                        continue
                    if kind == T_PKTS:
                        if self.whole_batches:
                            self._shift_batch(out, ts, ts_at, n, flush)
                        else:  # rate cap or gap clamp: each packet goes when it is due
                            take()
                            self._batch_apart(buf, cur, stop, n, flush)
                            mark = stop
                        cur = stop
                        continue
                    self.records_in += 1
                    new_ts = due(ts, flush)
                    if new_ts != ts and not keep_ts:
                        if 0xFFFFFFFF < new_ts <= 0xFFFFFFFFFFFFFFFF:
                            patch_ts(out, ts_at, new_ts)
                        else:  # another length: re-encoded
                            take()
                            self._reencode(buf, cur, stop, new_ts)
                            mark = stop
                    cur = stop
                    self.records_out += 1
                take()
                if len(self.writer.buf) >= self.writer.bufsize:
                    self.writer.flush()
        finally:
            flush()  # what was released before an error or a signal still goes out

    def _header(self, hdr: dict) -> None:
        from tcpcopylib.records import RecordWriter, merged_header

        hdr = merged_header(self.tool, hdr)
        if self.writer is None:
            self.writer = RecordWriter(self.out_fd, hdr)
        else:
            self.writer.new_section(hdr)

    def _decoded(self, rec: dict, flush, name: str) -> None:
        """A record not in the common layout (decoded by cbor2), re-encoded."""
        self.records_in += 1
        rts = rec.get("ts")
        if type(rts) is int:
            if not -(1 << 64) < rts < 1 << 64:
                from tcpcopylib.errors import StreamError

                raise StreamError(f"{name}: record {self.records_in}: ts does not fit in "
                                  f"64 bits")
            new_ts = self.pacer.due(rts, flush)
            if not self.keep_ts:
                rec["ts"] = new_ts
        self.writer.write(rec)
        self.records_out += 1

    def _shift_batch(self, out: bytearray, ts: int, ts_at: int, n: int, flush) -> None:
        """A batch of n packets, due as its first: one due(); every ts shifted with the
        first, in place."""
        from tcpcopylib.records import batch_stamps, batch_structs

        self.records_in += n
        self.records_out += n
        stamps = batch_stamps(out, ts_at, n)
        new0 = self.pacer.due(ts, flush)
        scaled = self.pacer.timeline.scaled
        if (new0 != ts or self.pacer.timeline.speed != 1) and not self.keep_ts:
            new = [new0 + scaled(t - ts) for t in stamps]
            if min(new) < 0 or max(new) > 0xFFFFFFFFFFFFFFFF:
                from tcpcopylib.errors import StreamError

                raise StreamError("a timestamp out of range after pacing")
            batch_structs(n)[0].pack_into(out, ts_at, *new)

    def _batch_apart(self, buf, start: int, stop: int, n: int, flush) -> None:
        """A batch of n packets each paced on its own: written one by one, each with its
        sid."""
        from tcpcopylib.records import batch_records

        self.records_in += n
        self.records_out += n
        due, keep_ts, write = self.pacer.due, self.keep_ts, self.writer.write
        for rec in batch_records(buf, start, stop):
            new_ts = due(rec["ts"], flush)
            if not keep_ts:
                rec["ts"] = new_ts
            write(rec)

    def _reencode(self, buf, start: int, stop: int, new_ts: int) -> None:
        """A pkt record whose new ts does not fit the bytes of its old one."""
        from tcpcopylib.records import fast_record

        rec = fast_record(buf, start, stop)[0]
        rec["ts"] = new_ts
        self.writer.write(rec)
