"""HTTP load for live-replay tests: keep-alive and short connections, every answer checked.

    live_http_client.py --server HOST:PORT --sessions N [--requests K] [--parallel P]

Session i (0 <= i < N) is a keep-alive connection of K requests when i is even, a short
connection (one request with "Connection: close") when i is odd; P threads work through
the sessions. Each answer must be exactly what tests/servers/recording_server.py sends
for that request ("HTTP/1.1 200 OK", body "NNNNNN/k GET PATH\\n" with k the request's
number on its connection), a short connection must then be closed by the server, and
no connection may be reset. With --post-every M, the first request of every M-th
session is a POST with a --body-size byte body (several segments).

--hold FILE: open --hold-conns keep-alive connections, send one request on each, write
FILE.ready, wait (at most 30 s) until FILE exists, then send --requests more on each.

--rate R: at most R requests/s in total (for benchmarks); --duration S: keep starting
sessions for S seconds (instead of N sessions).

Prints one JSON line: {"sessions", "requests", "answers", "bad", "errors": [...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time

_BODY = re.compile(rb"^\d{6}/(\d+) (GET|POST) (\S+)\n$")


class Failure(Exception):
    pass


class Conn:
    def __init__(self, server, timeout):
        host, port = server
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.k = 0
        self.status_only = False

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise Failure("server closed the connection early")
        self.buf += data

    def exchange(self, path: str, close=False, body=b"") -> None:
        """One request (a POST if it has a body), its answer read and checked."""
        self.k += 1
        hdr = "close" if close else "keep-alive"
        method = "POST" if body else "GET"
        clen = f"Content-Length: {len(body)}\r\n" if body else ""
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: lab\r\nUser-Agent: live-e2e\r\n"
                          f"{clen}Connection: {hdr}\r\n\r\n".encode() + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if lines[0] != b"HTTP/1.1 200 OK":
            raise Failure(f"status line {lines[0]!r}")
        hdrs = {k.strip().lower(): v.strip() for k, _, v in
                (ln.partition(b":") for ln in lines[1:])}
        n = int(hdrs.get(b"content-length", b"-1"))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        if self.status_only:
            return
        m = _BODY.match(body)
        if not m or int(m.group(1)) != self.k or m.group(2).decode() != method \
                or m.group(3).decode() != path:
            raise Failure(f"answer {body!r} to request {self.k} {path}")
        if hdrs.get(b"connection", b"").lower() != hdr.encode():
            raise Failure(f"Connection: {hdrs.get(b'connection')!r} to {hdr}")
        if close:
            if self.sock.recv(1) != b"" or self.buf:
                raise Failure("data after the last answer of a short connection")

    def close(self):
        self.sock.close()


class Run:
    def __init__(self, a):
        self.a = a
        host, _, port = a.server.rpartition(":")
        self.server = (host.strip("[]"), int(port))
        self.lock = threading.Lock()
        self.sessions = self.requests = self.answers = 0
        self.errors: list[str] = []
        self.next_i = 0
        self.t0 = time.monotonic()
        self.sent = 0  # requests started, for --rate

    def count(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def throttle(self):
        if not self.a.rate:
            return
        with self.lock:
            due = self.t0 + self.sent / self.a.rate
            self.sent += 1
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def take(self):
        with self.lock:
            i = self.next_i
            if self.a.duration:
                if time.monotonic() - self.t0 >= self.a.duration:
                    return None
            elif i >= self.a.sessions:
                return None
            self.next_i += 1
            return i

    def session(self, i):
        c = Conn(self.server, self.a.timeout)
        c.status_only = self.a.status_only
        try:
            n = 1 if i % 2 else self.a.requests
            post = self.a.post_every and i % self.a.post_every == 0
            for k in range(n):
                self.throttle()
                self.count(requests=1)
                body = bytes((i + j) & 0xFF for j in range(self.a.body_size)) \
                    if post and k == 0 else b""
                c.exchange(f"/s{i}/r{k}", close=bool(i % 2), body=body)
                self.count(answers=1)
        finally:
            c.close()
        self.count(sessions=1)

    def worker(self):
        while (i := self.take()) is not None:
            try:
                self.session(i)
            except (OSError, Failure, ValueError) as e:
                with self.lock:
                    self.errors.append(f"session {i}: {type(e).__name__}: {e}")

    def load(self):
        ts = [threading.Thread(target=self.worker) for _ in range(self.a.parallel)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def held(self):
        """Sessions open before the capture: one request each, wait, then more."""
        cs = [Conn(self.server, self.a.timeout) for _ in range(self.a.hold_conns)]
        for i, c in enumerate(cs):
            self.count(requests=1)
            c.exchange(f"/h{i}/r0")
            self.count(answers=1)
        with open(self.a.hold + ".ready", "w") as f:
            f.write("1\n")
        deadline = time.monotonic() + 30
        while not os.path.exists(self.a.hold):
            if time.monotonic() > deadline:
                raise Failure("hold file never appeared")
            time.sleep(0.01)
        for k in range(1, self.a.requests + 1):
            for i, c in enumerate(cs):
                self.count(requests=1)
                c.exchange(f"/h{i}/r{k}")
                self.count(answers=1)
        for c in cs:
            c.close()
        self.count(sessions=len(cs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", required=True, help="HOST:PORT ([v6]:PORT)")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--requests", type=int, default=5, help="requests per keep-alive session")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--post-every", type=int, default=0, metavar="M",
                   help="the first request of every M-th session is a POST")
    p.add_argument("--body-size", type=int, default=20000, help="POST body bytes")
    p.add_argument("--status-only", action="store_true",
                   help="check only the status line (a server other than recording_server)")
    p.add_argument("--hold", metavar="FILE")
    p.add_argument("--hold-conns", type=int, default=10)
    a = p.parse_args(argv)
    r = Run(a)
    try:
        r.held() if a.hold else r.load()
    except (OSError, Failure) as e:
        r.errors.append(f"{type(e).__name__}: {e}")
    el = time.monotonic() - r.t0
    print(json.dumps({"sessions": r.sessions, "requests": r.requests, "answers": r.answers,
                      "elapsed": round(el, 3), "errors": r.errors[:20],
                      "n_errors": len(r.errors)}), flush=True)
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
