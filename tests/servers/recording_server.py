"""A TCP server that records, per accepted connection, the exact bytes it received.

Each connection gets one file in --log-dir named ``NNNNNN_PEERIP_PEERPORT.bin``
(NNNNNN = accept order, from 000001), written unbuffered as bytes arrive. When the
connection ends, a line ``NNNNNN PEERIP PEERPORT BYTES REQUESTS how`` is appended to
``connections.log`` in the same directory (how = peer-closed | server-closed | reset).

Modes:
  http      answers like an HTTP/1.1 server: keep-alive by default, "Connection: close"
            honoured, request bodies with Content-Length, pipelined requests answered in
            order. The response body is "NNNNNN/K METHOD PATH\\n" (connection/request
            number), padded to N bytes with ``?size=N`` in the path.
  greeting  server speaks first: sends "220 greeting NNNNNN\\r\\n" on accept, then answers
            each line with "250 <line>\\r\\n"; the line QUIT gets "221 bye" and a close.

Options: --delay S sleeps S seconds before each answer (a slow target);
--close-after-first closes the connection after the first answer.

Runs until SIGTERM/SIGINT; with --ready FILE, "PID PORT" is written to FILE once the
socket listens (port 0 picks a free port).
Only the standard library is used; one thread, a selectors event loop (so accepting
stays fast under load: a slow accept loop overflows the listen queue).
"""

from __future__ import annotations

import argparse
import heapq
import os
import re
import selectors
import signal
import socket
import sys
import time

_SIZE = re.compile(rb"[?&]size=(\d+)")
_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


class Recorder:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.count = 0
        os.makedirs(log_dir, exist_ok=True)
        self.index = open(os.path.join(log_dir, "connections.log"), "a", buffering=1)

    def open(self, peer) -> tuple[int, object]:
        self.count += 1
        n = self.count
        ip = peer[0].replace(":", "_")
        path = os.path.join(self.log_dir, f"{n:06d}_{ip}_{peer[1]}.bin")
        return n, open(path, "wb", buffering=0)

    def done(self, n, peer, nbytes, nreq, how):
        self.index.write(f"{n:06d} {peer[0]} {peer[1]} {nbytes} {nreq} {how}\n")


class Connection:
    """One accepted connection: non-blocking, driven by Server's event loop."""

    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.n, self.log = server.recorder.open(peer)
        self.buf = b""
        self.out = bytearray()
        self.nbytes = 0
        self.requests = 0
        self.eof = False
        self.waiting = False     # an answer is delayed (--delay)
        self.closing = False     # close once the output is sent
        self.shut = False        # our FIN is out; still logging what the peer sends
        self.deadline = None     # linger end after our FIN
        self.done = False
        self.events = _R
        if server.mode == "greeting":
            self.out += f"220 greeting {self.n:06d}\r\n".encode()
            self.events = _R | _W

    # -- protocol: complete requests -> answers ----------------------------------------
    def next_answer(self):
        """(answer bytes, close) for the next complete request in buf, or None."""
        if self.server.mode == "greeting":
            end = self.buf.find(b"\n")
            if end < 0:
                return None
            line, self.buf = self.buf[:end].rstrip(b"\r"), self.buf[end + 1:]
            self.requests += 1
            if line.upper() == b"QUIT":
                return b"221 bye\r\n", True
            return b"250 " + line + b"\r\n", self.server.close_after_first
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buf[:end].decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        need = end + 4 + int(headers.get("content-length", "0") or 0)
        if len(self.buf) < need:
            return None
        self.buf = self.buf[need:]
        parts = head[0].split()
        method = parts[0] if parts else ""
        path = parts[1] if len(parts) > 1 else "/"
        version = parts[2] if len(parts) > 2 else "HTTP/1.0"
        self.requests += 1
        conn_hdr = headers.get("connection", "").lower()
        close = (conn_hdr == "close" or (version == "HTTP/1.0" and conn_hdr != "keep-alive")
                 or self.server.close_after_first)
        body = f"{self.n:06d}/{self.requests} {method} {path}\n".encode()
        m = _SIZE.search(path.encode("latin-1"))
        if m:
            size = int(m.group(1))
            body = (body + b"x" * size)[:max(size, len(body))]
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode()
        return head + body, close

    def pump(self):
        """Answer every complete request (in order; a delayed answer holds the rest)."""
        while not (self.waiting or self.closing or self.shut):
            ans = self.next_answer()
            if ans is None:
                break
            if self.server.delay:
                self.waiting = True
                self.server.later(self.server.delay, self, ans)
            else:
                self.queue(*ans)

    def queue(self, data, close):
        self.out += data
        self.closing = self.closing or close
        self.waiting = False

    # -- io ------------------------------------------------------------------------------
    def on_read(self):
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            return self.finish("reset")
        if not data:
            self.eof = True
            return
        self.log.write(data)
        self.nbytes += len(data)
        if not self.shut:
            self.buf += data
            self.pump()

    def on_write(self):
        if self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionResetError, BrokenPipeError):
                return self.finish("reset")
            del self.out[:n]

    def settle(self):
        """After any event: close/shutdown when due; the events we wait for now."""
        if self.done:
            return
        if not self.out and self.closing and not self.shut:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.shut = True
            self.deadline = time.monotonic() + self.server.linger
        if self.eof and not self.out and not self.waiting:
            return self.finish("server-closed" if self.shut else "peer-closed")
        if self.shut and time.monotonic() >= self.deadline:
            return self.finish("server-closed")
        ev = (0 if self.eof else _R) | (_W if self.out else 0)
        if ev != self.events:
            if ev:
                self.server.sel.modify(self.sock, ev, self)
            else:
                self.server.sel.unregister(self.sock)
            self.events = ev

    def finish(self, how):
        if self.done:
            return
        self.done = True
        if self.events:
            self.server.sel.unregister(self.sock)
        self.log.close()
        self.server.recorder.done(self.n, self.peer, self.nbytes, self.requests, how)
        self.sock.close()
        self.server.conns.discard(self)


class Server:
    def __init__(self, host, port, log_dir, mode="http", delay=0.0, close_after_first=False,
                 linger=2.0, backlog=4096):
        self.mode = mode
        self.delay = delay
        self.close_after_first = close_after_first
        self.linger = linger
        self.recorder = Recorder(log_dir)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, _R, None)
        self.timers: list = []
        self.seq = 0
        self.conns: set = set()

    def later(self, delay, conn, answer):
        self.seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self.seq, conn, answer))

    def accept(self):
        for _ in range(256):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, sock, peer)
            self.conns.add(conn)
            self.sel.register(sock, conn.events, conn)

    def serve_forever(self):
        while True:
            now = time.monotonic()
            timeout = 0.5
            if self.timers:
                timeout = min(timeout, max(0.0, self.timers[0][0] - now))
            for key, ev in self.sel.select(timeout):
                conn = key.data
                if conn is None:
                    self.accept()
                    continue
                if ev & _R:
                    conn.on_read()
                if (ev & _W or conn.out) and not conn.done:
                    conn.on_write()
                conn.settle()
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, conn, ans = heapq.heappop(self.timers)
                if not conn.done:
                    conn.queue(*ans)
                    conn.pump()
                    conn.on_write()
                    conn.settle()
            for conn in [c for c in self.conns if c.shut]:
                conn.settle()  # linger deadlines


def parse_listen(s: str):
    host, _, port = s.rpartition(":")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="0.0.0.0:8080", help="HOST:PORT ([::]:PORT for v4+v6)")
    p.add_argument("--log-dir", required=True)
    p.add_argument("--mode", choices=("http", "greeting"), default="http")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--close-after-first", action="store_true")
    p.add_argument("--ready", help="file written once the socket listens")
    a = p.parse_args(argv)
    host, port = parse_listen(a.listen)
    srv = Server(host, port, a.log_dir, a.mode, a.delay, a.close_after_first)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if a.ready:
        with open(a.ready + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {srv.sock.getsockname()[1]}\n")
        os.rename(a.ready + ".tmp", a.ready)
    try:
        srv.serve_forever()
    finally:
        srv.recorder.index.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
