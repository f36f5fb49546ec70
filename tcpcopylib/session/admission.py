"""Admission of new sessions past saturation: tc-session sheds whole new sessions (outcome
"shed", with a reason) when it measures that it cannot keep up, so that every session it
admitted stays whole. A stage that falls behind a live capture loses packets at random
further up (the pipe fills, tc-capture blocks, the kernel's capture buffer overflows and
drops packets from the middle of sessions); shedding starts before that, at signals that
grow first:

  lag          how late the oldest due input packet is (its due time, DESIGN.md §4, against
               the clock), --shed-lag MS; by default only for a live input (timestamps on
               the wall clock: a recording read from a file loses nothing when we are
               late, it waits in the pipe);
  backlog      input bytes waiting in the pipe or socket (FIONREAD), --shed-backlog KIB;
  memory       resident memory, -m/--max-memory MB;
  max-sessions live sessions, --max-sessions N (checked by the engine itself at each new
               session, Config.max_sessions, so that the limit is exact).

The decision is made at a session's first packet (engine.Engine._new_session reads
``engine.shedding``, the reason or None, set here once per loop turn): its later packets
are dropped by a set lookup (engine.shed_keys) up to its FIN or RST. Lag and backlog
shed with hysteresis: shedding starts above the limit and stops below half of it, so that
a stage that caught up takes new sessions again only once its backlog is really gone.
"""

from __future__ import annotations

import os

MS = 1_000_000
SEC = 1_000_000_000
LIVE_SKEW = 60 * SEC      # timestamps this close to the wall clock: a live capture
DEFAULT_LIVE_LAG = 2000   # ms: --shed-lag for a live input unless given
RSS_EVERY = 0.2           # seconds between --max-memory checks


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Admission:
    """Decides, once per loop turn, whether new sessions are shed and why.

    ``lag_ms``: None for the default (DEFAULT_LIVE_LAG for a live input, off for a
    recording), 0 for off; ``backlog`` bytes, ``max_rss`` bytes: None for no limit.
    ``rss`` and ``monotonic`` are injectable (tests)."""

    def __init__(self, lag_ms: float | None = None, backlog: int | None = None,
                 max_rss: int | None = None,
                 rss=rss, monotonic=None):
        import time

        self.lag_auto = lag_ms is None
        self.lag_limit = None if lag_ms is None or lag_ms == 0 else int(lag_ms * MS)
        self.backlog_limit = backlog or None
        if self.backlog_limit:
            from tcpcopylib.capture import pipe_backlog  # (FIONREAD, tc-capture's too)

            self.backlog = pipe_backlog
        self.max_rss = max_rss
        self.rss = rss
        self.monotonic = monotonic or time.monotonic
        self.over = {"lag": False, "backlog": False}  # the hysteresis states
        self.over_memory = False
        self.next_rss = 0.0
        self.max_lag = 0          # the largest lag seen (ns), for the stats
        self.live = None          # decided at the first packet (lag_auto)

    def reason(self, lag: int, in_fd: int = -1, due=None) -> str | None:
        """Why new sessions are shed now ("lag", "backlog", "memory"), or None. ``lag``: ns the
        oldest due packet is late; ``in_fd``: the input (for the backlog); ``due``: the
        DueQueue (whether the input is live, for the default)."""
        if lag > self.max_lag:
            self.max_lag = lag
        if self.max_rss is not None:
            now = self.monotonic()
            if now >= self.next_rss:
                self.over_memory = self.rss() > self.max_rss
                self.next_rss = now + RSS_EVERY
        why = "memory" if self.over_memory else None
        if self.lag_auto and self.live is None and due is not None:
            self._decide_live(due)
        if self.lag_limit is not None and self._hysteresis("lag", lag, self.lag_limit):
            why = why or "lag"
        if self.backlog_limit is not None and in_fd >= 0 and self._hysteresis(
                "backlog", self.backlog(in_fd), self.backlog_limit):
            why = why or "backlog"
        return why

    def _hysteresis(self, name: str, value: int, limit: int) -> bool:
        over = self.over[name]
        if value > limit:
            over = True
        elif value < limit // 2:
            over = False
        self.over[name] = over
        return over

    def _decide_live(self, due) -> None:
        """The default --shed-lag: on for a live input, whose first packet's timestamp was
        close to the wall clock (a tc-capture stream), off for a recording."""
        tl = due.timeline
        if tl.anchor_wall is None:
            return  # no timed packet yet
        self.live = abs(tl.anchor_wall - tl.anchor_ts) < LIVE_SKEW and not due.asap
        if self.live:
            self.lag_limit = DEFAULT_LIVE_LAG * MS

    def as_dict(self) -> dict:
        return {"shed_lag_ms": (self.lag_limit or 0) / MS,  # (0: off)
                "max_lag_ms": round(self.max_lag / MS, 3)}
