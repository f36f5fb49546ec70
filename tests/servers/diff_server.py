"""An HTTP/1.1 keep-alive server for the tc-diff lab tests: the same answers on the online
and target hosts, except what --variant changes (another status on /b, another JSON value
on /json/7, no X-Feature header on /c, 50 ms slower on /slow)."""

import argparse
import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import socket


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    variant = False

    def do_GET(self):
        path = self.path.split("?")[0]
        status, headers, body = 200, {"Content-Type": "text/plain"}, b"page " + path.encode()
        if path.startswith("/json/"):
            n = int(path.rsplit("/", 1)[1])
            value = n * 10 + (1 if self.variant and n == 7 else 0)
            body = json.dumps({"id": n, "value": value, "tags": ["a", "b"]}).encode()
            headers["Content-Type"] = "application/json"
        elif path == "/b" and self.variant:
            status = 404
        elif path == "/c" and not self.variant:
            headers["X-Feature"] = "on"
        elif path == "/slow" and self.variant:
            time.sleep(0.05)
        headers["X-Request-Id"] = str(uuid.uuid4())  # differs on every answer: noise
        headers.update({"Date": self.date_time_string(), "Content-Length": str(len(body))})
        # one write: head and body in separate segments would meet Nagle and delayed ACKs
        head = f"HTTP/1.1 {status} {self.responses[status][0]}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.wfile.write(head.encode() + body)

    def log_message(self, *a):
        pass


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--variant", action="store_true")
    a = p.parse_args()
    Handler.variant = a.variant
    Server(("::", a.port), Handler).serve_forever()




def client_main(argv=None):
    """Load for the tests: --http HOST:PORT sends CONNS keep-alive connections of the
    PATHS; --redis HOST:PORT sends CONNS connections of GET/MGET/HGETALL commands."""
    p = argparse.ArgumentParser()
    p.add_argument("--http")
    p.add_argument("--redis")
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--paths", default="/a,/b,/c,/slow,/json/1,/json/7")
    p.add_argument("--keys", type=int, default=20)
    a = p.parse_args(argv)
    host, _, port = (a.http or a.redis).rpartition(":")
    answers = 0
    for c in range(a.conns):
        s = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        f = s.makefile("rb")
        if a.http:
            for path in a.paths.split(","):
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                n = 0
                while True:
                    line = f.readline()
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                    if line in (b"\r\n", b""):
                        break
                f.read(n)
                answers += 1
        else:
            for k in range(a.keys):
                for cmd in ([b"GET", b"key:%d" % k], [b"MGET", b"key:%d" % k, b"nokey"],
                            [b"HGETALL", b"h:%d" % (k % 3)]):
                    s.sendall(b"*%d\r\n" % len(cmd) + b"".join(
                        b"$%d\r\n%s\r\n" % (len(w), w) for w in cmd))
                    _read_resp(f)
                    answers += 1
        s.close()
    print(json.dumps({"answers": answers}))


def _read_resp(f):
    line = f.readline()
    kind, rest = line[:1], line[1:].strip()
    if kind == b"$" and int(rest) >= 0:
        f.read(int(rest) + 2)
    elif kind in (b"*", b"%"):
        for _ in range(int(rest) * (2 if kind == b"%" else 1)):
            _read_resp(f)


if __name__ == "__main__":
    import sys

    client_main(sys.argv[2:]) if sys.argv[1:2] == ["client"] else main()
