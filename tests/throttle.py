"""A CPU limit for one process of a lab test or benchmark, without cgroups: a thread stops
it (SIGSTOP) whenever the CPU time it used is over ``share`` of the time since the start,
and lets it run again (SIGCONT) once it is under, as a CPU quota throttles a process. The
budget counts the CPU time the process really used (/proc/PID/stat), so a busy machine
that wakes the thread late does not let the process run more than its share on average.
For overloading a stage on purpose: a test knob only, nothing in the tools."""

from __future__ import annotations

import os
import signal
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process pid so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Throttle:
    """``with Throttle(pid, share=0.2):`` the process gets 20 % of one CPU at most. stop()
    (or leaving the block) always lets it run again."""

    def __init__(self, pid: int, share: float, period: float = 0.01):
        assert 0 < share <= 1 and 0 < period <= 1
        self.pid, self.share, self.period = pid, share, period
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _signal(self, sig) -> bool:
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def _run(self) -> None:
        try:
            t0, c0 = time.monotonic(), cpu_seconds(self.pid)
            stopped = False
            while not self._stop.wait(self.period):
                over = cpu_seconds(self.pid) - c0 > self.share * (time.monotonic() - t0)
                if over != stopped:
                    if not self._signal(signal.SIGSTOP if over else signal.SIGCONT):
                        return
                    stopped = over
        except FileNotFoundError:
            return  # the process ended

    def stop(self) -> None:
        self._stop.set()
        if self._t.is_alive():
            self._t.join(5)
        self._signal(signal.SIGCONT)
