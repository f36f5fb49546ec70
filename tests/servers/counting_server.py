"""A light HTTP/1.x-ish target for many short connections: answers, closes, logs the bytes.

Each connection: read until the end of the request head ("\\r\\n\\r\\n"), answer
"HTTP/1.1 200 OK" with a 2-byte body and "Connection: close", shut the sending side, keep
reading until the peer closes, then append one line to --log:
``PEER_IP PEER_PORT HOW HEX_OF_EVERY_BYTE_RECEIVED`` (HOW: eof | reset).
The log is flushed every 0.2 s and at SIGTERM/SIGINT. One thread, a selectors loop, O(1)
work per event (for thousands of concurrent connections on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
import time

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log", required=True)
    a = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", a.port))
    sock.listen(4096)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    log = open(a.log, "a", buffering=1 << 20)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def done(c, how):
        s, peer, buf, _answered = c
        sel.unregister(s)
        s.close()
        ip = peer[0].removeprefix("::ffff:")
        log.write(f"{ip} {peer[1]} {how} {bytes(buf).hex()}\n")

    next_flush = time.monotonic() + 0.2
    try:
        while True:
            for key, _ev in sel.select(0.2):
                if key.data is None:
                    for _ in range(256):
                        try:
                            s, peer = sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        s.setblocking(False)
                        sel.register(s, selectors.EVENT_READ, [s, peer, bytearray(), False])
                    continue
                c = key.data
                try:
                    data = c[0].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    done(c, "reset")
                    continue
                if not data:
                    done(c, "eof")
                    continue
                c[2] += data
                if not c[3] and b"\r\n\r\n" in c[2]:
                    c[3] = True
                    try:
                        c[0].sendall(ANSWER)
                        c[0].shutdown(socket.SHUT_WR)
                    except OSError:
                        done(c, "reset")
            if time.monotonic() >= next_flush:
                log.flush()
                next_flush = time.monotonic() + 0.2
    finally:
        log.flush()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
