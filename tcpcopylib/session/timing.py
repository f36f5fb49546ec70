"""When an input record is due (DESIGN.md §4): anchor_wall + (ts - anchor_ts) / speed.

The rule is pacing.Timeline's; the anchor is the first packet record seen. Live records
(ts close to the wall clock) come out due at once, or held to the first record's latency:
the anchor does not move (unlike tc-pace's), since offsets from a connection's accept are
counted between these due times; a pcap read at full speed is held and released at its
recorded pace. Due times never go backwards, so records keep their input order.
"""

from __future__ import annotations

import collections

# a wait this long for the next packet (1 h) is worth a warning: a timestamp far ahead
from tcpcopylib.pacing import LONG_WAIT_NS, Timeline


class DueQueue:
    """``max_gap`` (s, recording time): a forward jump between consecutive packets larger
    than this counts as exactly that (as tc-pace --max-gap); ``warn(msg)`` is told about
    a wait of more than an hour either way."""

    def __init__(self, asap: bool = False, speed: float = 1.0, max_gap: float | None = None,
                 warn=None):
        self.asap = asap
        self.timeline = Timeline(speed)
        self.last_due = 0
        self.q = collections.deque()
        # the largest step between consecutive due times before it is clamped or told
        self.max_step = LONG_WAIT_NS if max_gap is None else min(
            LONG_WAIT_NS, round(max_gap * 1_000_000_000 / speed))
        self.clamp = max_gap is not None
        self.warn = warn

    def due_time(self, ts, now: int) -> int:
        due = now if self.asap or not isinstance(ts, int) else self.timeline.at(ts, now)
        if due < self.last_due:
            due = self.last_due
        elif due - self.last_due > self.max_step and self.last_due and due > now:
            due = self._long_step(due, self.last_due, now)
        self.last_due = due
        return due

    def push(self, ts, item, now: int) -> None:
        self.q.append((self.due_time(ts, now), item))

    def push_records(self, items, now: int, other, drop=None) -> int:
        """push(ts, data) for each packet: a (ts, data) tuple, or a "pkt" record with bytes
        data (the others of that type are dropped); other(record) for records of any other
        type, in order, but "s2c": the server half of a capture (tc-capture --server-half)
        is dropped, as the server->client packets of a pcap are (passed on, its capture
        times would set a tc-pace downstream against our due times). (StreamParser.feed(
        mode=AS_PKT) gives such items.) Packets for which drop(data) is true still count for
        the anchor but are not queued; returns how many were dropped so, s2c records too."""
        append, asap = self.q.append, self.asap
        last = self.last_due
        dropped = 0
        timeline = self.timeline
        at = timeline.at
        # due_time(), inline: a packet is due at anchor_wall + (ts - anchor_ts) / speed
        aw, ats, speed = timeline.anchor_wall, timeline.anchor_ts, timeline.speed
        for item in items:
            if type(item) is tuple:
                ts, data = item
            else:
                t = item.get("t")
                if t != "pkt":
                    if t == "s2c":
                        dropped += 1
                    else:
                        other(item)
                    continue
                data = item.get("data")
                if not isinstance(data, (bytes, bytearray)):
                    continue
                ts = item.get("ts")
                if type(ts) is int and not -(1 << 64) < ts < 1 << 64:
                    from tcpcopylib.errors import StreamError

                    raise StreamError("a pkt record's ts does not fit in 64 bits")
            if asap or type(ts) is not int:
                due = now
            elif aw is None:
                due = at(ts, now)
                aw, ats = timeline.anchor_wall, timeline.anchor_ts
            elif speed == 1:
                due = aw + ts - ats
            else:
                due = aw + round((ts - ats) / speed)  # (as Timeline.scaled)
            if due < last:
                due = last
            elif due - last > self.max_step and last and due > now:  # (a wait, not idle input)
                due = self._long_step(due, last, now)
                aw = timeline.anchor_wall  # (a clamp moved it)
            last = due
            if drop is not None and drop(data):
                dropped += 1
                continue
            append((due, data))
        self.last_due = last
        return dropped

    def _long_step(self, due: int, last: int, now: int) -> int:
        """A timed packet due long after the one before, in the future: clamp the step to
        max_gap (shifting the anchor, so the rest keeps its pace) or warn about a wait of
        an hour or more (a timestamp far ahead; idle live input is no wait)."""
        step = due - last
        if self.clamp and step > self.max_step:
            self.timeline.anchor_wall -= step - self.max_step
            due = last + self.max_step
        if due - now >= LONG_WAIT_NS and self.warn is not None:
            self.warn(f"warning: the next packet is due in {(due - now) / 1e9:.0f} s (its "
                      f"timestamp jumps ahead); --max-gap S shortens such gaps")
        return due

    def pop_due(self, now: int):
        """Items due at or before now, in order."""
        q = self.q
        out = []
        while q and q[0][0] <= now:
            out.append(q.popleft()[1])
        return out

    def next_due(self):
        return self.q[0][0] if self.q else None

    def __len__(self):
        return len(self.q)
