"""Bounded client traffic for the replay lab: real TCP connections to a recording server.

    traffic_client.py SCENARIO --server HOST:PORT [options]

Scenarios (HTTP unless noted):
  keepalive   --conns C --requests K: C connections, K requests each, each answer read
              before the next request; the client closes first
  close       --conns C [--gap S]: one request per connection with "Connection: close",
              S seconds between connections
  bigbody     --conns C --body-size N: one POST with an N-byte body per connection
  pipelined   --conns C --requests K: K requests sent in one write, then K answers read
  greeting    --conns C --requests K: server speaks first (recording_server --mode greeting);
              read the greeting, send K lines, QUIT
  concurrent  --conns C --requests K: open all C connections first, then every connection
              does K request/answer rounds (one thread per connection)
  many        --conns C --requests K --parallel P: C short keep-alive sessions, P at a time
  mixed       keepalive + close + bigbody + pipelined, one after another

--hold-after-connect FILE: connect every connection, then wait until FILE exists (at most
30 s) before sending any request (for captures that start mid-connection); the file
FILE.connected is written once all connections are established.

Prints one JSON line: {"conns":..,"requests":..,"answers":..,"errors":[..]}.
Every wait is bounded (socket timeout --timeout, default 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time


class Result:
    def __init__(self):
        self.lock = threading.Lock()
        self.conns = self.requests = self.answers = 0
        self.errors: list[str] = []

    def add(self, conns=0, requests=0, answers=0, error=None):
        with self.lock:
            self.conns += conns
            self.requests += requests
            self.answers += answers
            if error:
                self.errors.append(error)


class Client:
    """One client connection with minimal HTTP/line response parsing."""

    def __init__(self, server, timeout, result: Result, tag: str):
        self.result = result
        self.tag = tag
        host, port = server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect((host, port))
        self.buf = b""
        result.add(conns=1)

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed")
        self.buf += data

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(sep)
        return head

    def read_http_answer(self) -> bytes:
        head = self.read_until(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        self.result.add(answers=1)
        return body

    def send_request(self, path, body=b"", close=False, method=None):
        self.sock.sendall(request(self.tag, path, body, close, method))
        self.result.add(requests=1)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def request(tag, path, body=b"", close=False, method=None) -> bytes:
    method = method or ("POST" if body else "GET")
    h = [f"{method} {path} HTTP/1.1", "Host: lab", f"User-Agent: tc-e2e/{tag}"]
    if body:
        h.append(f"Content-Length: {len(body)}")
    h.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(h) + "\r\n\r\n").encode() + body


class Runner:
    def __init__(self, a):
        self.a = a
        host, _, port = a.server.rpartition(":")
        self.server = (host.strip("[]"), int(port))
        self.result = Result()

    def client(self, tag) -> Client:
        return Client(self.server, self.a.timeout, self.result, tag)

    def hold(self):
        """--hold-after-connect: announce, then wait for the go file (bounded)."""
        if not self.a.hold_after_connect:
            return
        with open(self.a.hold_after_connect + ".connected", "w") as f:
            f.write("1\n")
        deadline = time.monotonic() + 30
        while not os.path.exists(self.a.hold_after_connect):
            if time.monotonic() > deadline:
                raise TimeoutError("hold file never appeared")
            time.sleep(0.01)

    def guarded(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported in the JSON line
            self.result.add(error=f"{fn.__name__}{args}: {type(e).__name__}: {e}")

    # -- scenarios -----------------------------------------------------------------
    def keepalive(self):
        cs = [self.client(f"ka{i}") for i in range(self.a.conns)]
        self.hold()
        for i, c in enumerate(cs):
            for k in range(self.a.requests):
                c.send_request(f"/ka/{i}/{k}?size={100 * k}")
                c.read_http_answer()
            c.close()

    def close(self):
        for i in range(self.a.conns):
            if i and self.a.gap:
                time.sleep(self.a.gap)
            c = self.client(f"cl{i}")
            c.send_request(f"/close/{i}", close=True)
            c.read_http_answer()
            c.close()

    def bigbody(self):
        for i in range(self.a.conns):
            body = bytes((j * 7 + i) & 0xFF for j in range(256)) * (self.a.body_size // 256)
            body += b"z" * (self.a.body_size - len(body))
            c = self.client(f"bb{i}")
            c.send_request(f"/upload/{i}", body=body)
            c.read_http_answer()
            c.send_request(f"/after-upload/{i}")
            c.read_http_answer()
            c.close()

    def pipelined(self):
        for i in range(self.a.conns):
            c = self.client(f"pl{i}")
            c.sock.sendall(b"".join(request(f"pl{i}", f"/pipe/{i}/{k}")
                                    for k in range(self.a.requests)))
            c.result.add(requests=self.a.requests)
            for _ in range(self.a.requests):
                c.read_http_answer()
            c.close()

    def greeting(self):
        cs = [self.client(f"gr{i}") for i in range(self.a.conns)]
        self.hold()
        for i, c in enumerate(cs):
            c.read_until(b"\r\n")
            for k in range(self.a.requests):
                c.sock.sendall(f"CMD {i} {k}\r\n".encode())
                c.result.add(requests=1)
                c.read_until(b"\r\n")
                c.result.add(answers=1)
            c.sock.sendall(b"QUIT\r\n")
            c.read_until(b"\r\n")
            c.close()

    def concurrent(self):
        cs = [self.client(f"cc{i}") for i in range(self.a.conns)]
        self.hold()

        def work(i, c):
            for k in range(self.a.requests):
                c.send_request(f"/cc/{i}/{k}")
                c.read_http_answer()
            c.close()

        ts = [threading.Thread(target=self.guarded, args=(work, i, c)) for i, c in enumerate(cs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(self.a.timeout * (self.a.requests + 1))

    def many(self):
        counter = iter(range(self.a.conns))
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    c = self.client(f"m{i}")
                    for k in range(self.a.requests):
                        c.send_request(f"/m/{i}/{k}", close=(k == self.a.requests - 1
                                                              and i % 2 == 1))
                        c.read_http_answer()
                    c.close()
                except Exception as e:  # noqa: BLE001
                    self.result.add(error=f"many {i}: {type(e).__name__}: {e}")

        ts = [threading.Thread(target=worker) for _ in range(self.a.parallel)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(self.a.timeout * self.a.conns)

    def mixed(self):
        self.keepalive()
        self.close()
        self.bigbody()
        self.pipelined()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=("keepalive", "close", "bigbody", "pipelined", "greeting",
                                        "concurrent", "many", "mixed"))
    p.add_argument("--server", required=True, help="HOST:PORT ([v6]:PORT)")
    p.add_argument("--conns", type=int, default=3)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--body-size", type=int, default=1 << 20)
    p.add_argument("--parallel", type=int, default=20)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--gap", type=float, default=0.0,
                   help="close: seconds between one connection's end and the next")
    p.add_argument("--hold-after-connect", metavar="FILE")
    a = p.parse_args(argv)
    r = Runner(a)
    r.guarded(getattr(r, a.scenario))
    res = r.result
    print(json.dumps({"conns": res.conns, "requests": res.requests, "answers": res.answers,
                      "errors": res.errors[:20], "n_errors": len(res.errors)}), flush=True)
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
