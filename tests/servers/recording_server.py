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
Only the standard library is used; one thread per connection.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import threading
import time

_SIZE = re.compile(rb"[?&]size=(\d+)")


class Recorder:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.count = 0
        os.makedirs(log_dir, exist_ok=True)
        self.index = open(os.path.join(log_dir, "connections.log"), "a", buffering=1)

    def open(self, peer) -> tuple[int, object]:
        with self.lock:
            self.count += 1
            n = self.count
        ip = peer[0].replace(":", "_") if ":" in peer[0] else peer[0]
        path = os.path.join(self.log_dir, f"{n:06d}_{ip}_{peer[1]}.bin")
        return n, open(path, "wb", buffering=0)

    def done(self, n, peer, nbytes, nreq, how):
        with self.lock:
            self.index.write(f"{n:06d} {peer[0]} {peer[1]} {nbytes} {nreq} {how}\n")


class Connection:
    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.n, self.log = server.recorder.open(peer)
        self.buf = b""
        self.nbytes = 0
        self.requests = 0
        self.eof = False

    # -- io ---------------------------------------------------------------------
    def fill(self) -> bool:
        """Read more bytes into buf; False at EOF."""
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.log.write(data)
        self.nbytes += len(data)
        self.buf += data
        return True

    def answer(self, data: bytes) -> None:
        if self.server.delay:
            time.sleep(self.server.delay)
        self.sock.sendall(data)

    # -- protocols ----------------------------------------------------------------
    def next_http_request(self):
        """(method, path, headers) of the next complete request, consuming it; None at EOF."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end].decode("latin-1").split("\r\n")
                parts = head[0].split()
                headers = {}
                for line in head[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                need = end + 4 + length
                while len(self.buf) < need:
                    if not self.fill():
                        return None
                self.buf = self.buf[need:]
                method = parts[0] if parts else ""
                path = parts[1] if len(parts) > 1 else "/"
                version = parts[2] if len(parts) > 2 else "HTTP/1.0"
                return method, path, version, headers
            if not self.fill():
                return None

    def serve_http(self) -> str:
        while True:
            req = self.next_http_request()
            if req is None:
                return "peer-closed"
            method, path, version, headers = req
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
            self.answer(head + body)
            if close:
                return "server-closed"

    def serve_greeting(self) -> str:
        self.sock.sendall(f"220 greeting {self.n:06d}\r\n".encode())
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                if not self.fill():
                    return "peer-closed"
                continue
            line, self.buf = self.buf[:end].rstrip(b"\r"), self.buf[end + 1:]
            self.requests += 1
            if line.upper() == b"QUIT":
                self.answer(b"221 bye\r\n")
                return "server-closed"
            self.answer(b"250 " + line + b"\r\n")
            if self.server.close_after_first:
                return "server-closed"

    def run(self):
        how = "error"
        try:
            how = self.serve_greeting() if self.server.mode == "greeting" else self.serve_http()
            if how == "server-closed":
                # Keep recording what the client still sends until it closes too.
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.settimeout(self.server.linger)
                try:
                    while self.fill():
                        pass
                except OSError:
                    pass
        except ConnectionResetError:
            how = "reset"
        except OSError as e:
            how = f"error:{e.errno}"
        finally:
            self.log.close()
            self.server.recorder.done(self.n, self.peer, self.nbytes, self.requests, how)
            try:
                self.sock.close()
            except OSError:
                pass


class Server:
    def __init__(self, host, port, log_dir, mode="http", delay=0.0, close_after_first=False,
                 linger=2.0, backlog=1024):
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

    def serve_forever(self):
        while True:
            try:
                sock, peer = self.sock.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, sock, peer)
            threading.Thread(target=conn.run, daemon=True).start()


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
