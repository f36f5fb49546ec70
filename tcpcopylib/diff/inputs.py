"""tc-diff --live's inputs, read side by side: one thread per input parses it and puts
batches on one bounded queue, which the main thread takes in arrival order.

An input is a file, a FIFO or '-' (stdin); a pcap/pcapng or a record stream, told apart
by its first bytes. A pipe (FIFO, stdin) ends at its EOF. A regular file ends at its end,
or with ``follow_s``, is read as it grows (as ``tail -f``) until no input has grown for
``follow_s`` seconds. Such files and pipes go through a relay thread into a pipe of our
own, so that the parsers, which read until EOF, see the bytes as they come.

A regular file's reader can be paused (``gate``, see ``Input.regular``): tc-diff pauses
an input that runs far ahead of the others (a whole capture read while the replay is still going), so that
what waits for a partner stays bounded. Pipes are never paused: that would stall the
pipeline writing them.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time

from tcpcopylib.errors import NoInputError
from tcpcopylib.reassembly import capture_packets, is_capture, record_packets

BATCH = 256          # items per queue entry (fewer when the input waits)
QUEUE = 8            # entries queued at most: read-ahead of 2048 items at most
POLL = 0.1           # seconds between looks at a followed file's end
KINDS = {"orig": ("pkt",), "target": ("fb",), "map": ()}


class Input:
    def __init__(self, feed: "Feed", path: str, kind: str, index: int):
        self.feed, self.path, self.kind, self.index = feed, path, kind, index
        self.gate = threading.Event()
        self.gate.set()
        self.fd = None
        self.regular = False  # known once open (in the thread: a FIFO's open waits)
        self.name = "<stdin>" if path == "-" else path

    def _open(self) -> int:
        if self.path == "-":
            return os.dup(0)
        try:
            return os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise NoInputError(f"{self.path}: {e.strerror or e}") from None

    def start(self) -> None:
        threading.Thread(target=self._parse, daemon=True,
                         name=f"tc-diff {self.kind} {self.path}").start()

    # -- the relay: a followed file or a pipe, into a pipe of our own ------------------------
    def _relay(self, out_fd: int, head: list, have_head: threading.Event) -> None:
        follow = self.regular and self.feed.follow_s is not None
        got = b""
        try:
            while True:
                chunk = os.read(self.fd, 1 << 16)
                if chunk:
                    self.feed.grew()
                    if not have_head.is_set():
                        got += chunk
                        if len(got) >= 4:
                            head.append(got[:4])
                            have_head.set()
                    _write_all(out_fd, chunk)
                elif follow and not self.feed.quiet():
                    time.sleep(POLL)
                else:
                    break
        except OSError:
            pass  # (the parser went away)
        finally:
            if not have_head.is_set():
                head.append(got)
                have_head.set()
            os.close(out_fd)
            os.close(self.fd)

    def _parse(self) -> None:
        feed, batch = self.feed, []

        def flush():
            if batch:
                self.gate.wait()
                feed.q.put((self.kind, self.index, batch[:]))
                batch.clear()
        try:
            self.fd = self._open()
            self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
            if self.regular and self.feed.follow_s is None:
                fd, head = self.fd, os.pread(self.fd, 4, 0)
            else:
                rfd, wfd = os.pipe()
                got, have = [], threading.Event()
                threading.Thread(target=self._relay, args=(wfd, got, have),
                                 daemon=True).start()
                have.wait()
                fd, head = rfd, got[0]
            if self.kind != "map" and is_capture(head):
                items = capture_packets(fd, self.name, on_idle=flush)
            else:
                take = batch.append if self.kind == "map" else None

                def on_other(rec, take=take):
                    if take is not None and rec.get("t") == "sess":
                        take(rec)
                items = record_packets(fd, self.name, KINDS[self.kind], on_other, flush)
            for item in items:
                batch.append(item)
                if len(batch) >= BATCH:
                    flush()
            flush()
            feed.q.put((self.kind, self.index, None))
        except Exception as e:  # noqa: BLE001 - handed to the main thread, which reports it
            feed.q.put((self.kind, self.index, e))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Feed:
    """The inputs of one tc-diff --live run and the queue they fill."""

    def __init__(self, follow_s: float | None = None):
        self.follow_s = follow_s
        self.q: queue.Queue = queue.Queue(QUEUE)
        self.inputs: list = []
        self.last_growth = time.monotonic()

    def add(self, path: str, kind: str, index: int) -> Input:
        inp = Input(self, path, kind, index)
        self.inputs.append(inp)
        return inp

    def start(self) -> None:
        for inp in self.inputs:
            inp.start()

    def grew(self) -> None:
        self.last_growth = time.monotonic()

    def quiet(self) -> bool:
        """Has no input grown for follow_s seconds (the end of followed files)?"""
        return time.monotonic() - self.last_growth > (self.follow_s or 0)

    def get(self, timeout: float):
        """(kind, index, items | None at its end | an exception), or None if none came."""
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None
