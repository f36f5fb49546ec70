"""A CPU limit for one process of a lab test or benchmark, without cgroups: a thread stops
it (SIGSTOP) and lets it run (SIGCONT) in turns, ``share`` of every ``period`` seconds
running, as a CPU quota throttles a process (cgroup cpu.max does the same with its
period). For overloading a stage on purpose: a test knob only, nothing in the tools."""

from __future__ import annotations

import os
import signal
import threading


class Throttle:
    """``with Throttle(pid, share=0.2):`` the process runs 20 % of the time. stop() (or
    leaving the block) always lets it run again."""

    def __init__(self, pid: int, share: float, period: float = 0.05):
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
        run, pause = self.period * self.share, self.period * (1 - self.share)
        while not self._stop.is_set():
            if not self._signal(signal.SIGSTOP):
                return
            self._stop.wait(pause)
            self._signal(signal.SIGCONT)
            self._stop.wait(run)

    def stop(self) -> None:
        self._stop.set()
        if self._t.is_alive():
            self._t.join(5)
        self._signal(signal.SIGCONT)
