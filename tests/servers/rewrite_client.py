"""The HTTP traffic of tc-rewrite's lab tests: production values in flight.

    rewrite_client.py --server HOST:PORT [--keepalive 100] [--big 1048576] [--pipelined 10]

Every request carries "Host: prod.example.com" and POST bodies carry
"token=PRODSECRET". Connections, one after the other:
  1. keep-alive: K requests, GET and POST alternating, each answer read before the next;
  2. a POST with a big body (the token at its start, middle and end), then a GET;
  3. N requests pipelined in one write (POSTs among them), then N answers;
  4. a request whose head is sent in two writes (two segments), cut inside the Host
     header, then a POST.
Prints one JSON line: {"requests": n, "answers": n, "errors": [...]}.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from traffic_client import Client, Result  # noqa: E402

HOST = b"prod.example.com"
TOKEN = b"token=PRODSECRET"


def req(method: bytes, path: bytes, body: bytes = b"") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: rewrite-lab\r\n" % (method, path, HOST)
    if body:
        head += b"Content-Length: %d\r\nContent-Type: application/x-www-form-urlencoded\r\n" \
            % len(body)
    return head + b"\r\n" + body


def post(path: bytes, n: int) -> bytes:
    return req(b"POST", path, b"n=%d&%s&end=1" % (n, TOKEN))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--keepalive", type=int, default=100)
    p.add_argument("--big", type=int, default=1 << 20)
    p.add_argument("--pipelined", type=int, default=10)
    a = p.parse_args()
    host, _, port = a.server.rpartition(":")
    server = (host.strip("[]"), int(port))
    res = Result()

    def send(c, data, n=1):
        c.sock.sendall(data)
        res.add(requests=n)

    try:
        c = Client(server, 10, res, "ka")
        for k in range(a.keepalive):
            send(c, post(b"/api/ka/%d" % k, k) if k % 2 else req(b"GET", b"/ka/%d" % k))
            c.read_http_answer()
        c.close()

        c = Client(server, 20, res, "big")
        filler = bytes(range(97, 123)) * (a.big // 26)
        third = len(filler) // 3
        body = TOKEN + filler[:third] + b"&" + TOKEN + b"&" + filler[third:] + TOKEN
        send(c, req(b"POST", b"/upload", body))
        c.read_http_answer()
        send(c, req(b"GET", b"/after-upload"))
        c.read_http_answer()
        c.close()

        c = Client(server, 10, res, "pl")
        send(c, b"".join(post(b"/api/pl/%d" % k, k) if k % 3 == 0 else req(b"GET", b"/pl/%d" % k)
                         for k in range(a.pipelined)), a.pipelined)
        for _ in range(a.pipelined):
            c.read_http_answer()
        c.close()

        c = Client(server, 10, res, "split")
        head = req(b"GET", b"/split")
        cut = head.index(b"prod.example") + 4
        c.sock.sendall(head[:cut])
        time.sleep(0.1)  # (TCP_NODELAY: the first part leaves as a segment of its own)
        send(c, head[cut:])
        c.read_http_answer()
        send(c, post(b"/api/split", 1))
        c.read_http_answer()
        c.close()
    except Exception as e:  # noqa: BLE001 - reported in the JSON line
        res.add(error=f"{type(e).__name__}: {e}")
    print(json.dumps({"requests": res.requests, "answers": res.answers,
                      "errors": res.errors}))


if __name__ == "__main__":
    main()
