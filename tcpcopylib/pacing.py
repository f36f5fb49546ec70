"""Release timed records on a schedule: the timing contract of DESIGN.md section 4.

A record with an integer ``ts`` (ns) is due at ``anchor_wall + (ts - anchor_ts) / speed``,
anchored at the first timed record seen. Options reshape that schedule:

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


class Timeline:
    """The timing rule, its one implementation (tc-pace's Pacer and tc-session's DueQueue
    both schedule with it): a timed record is due at ``anchor_wall + (ts - anchor_ts) /
    speed`` (clock ns), anchored at the first record ``at()`` is asked about. A gap clamp
    moves the anchor (either end), so the records after it keep their pace."""

    __slots__ = ("speed", "anchor_wall", "anchor_ts")

    def __init__(self, speed: float = 1.0):
        self.speed = speed
        self.anchor_wall: int | None = None  # None until the first timed record
        self.anchor_ts = 0

    def at(self, ts: int, now: int) -> int:
        """When a record stamped ``ts`` is due; the first one anchors the timeline at
        ``now``."""
        if self.anchor_wall is None:
            self.anchor_wall, self.anchor_ts = now, ts
        return self.anchor_wall + self.scaled(ts - self.anchor_ts)

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
                 clock=time.monotonic_ns, sleep=time.sleep):
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
        t = self.timeline.at(ts, now) + self.delay_ns
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
            planned = self.timeline.at(ts, now) + self.delay_ns
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
