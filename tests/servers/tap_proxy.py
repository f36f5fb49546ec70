"""A TCP relay that records what passes through it, as a capture would, without root.

    tap_proxy.py --listen HOST:PORT --upstream HOST:PORT --log-dir DIR [--ready FILE]

Every accepted connection is relayed to the upstream server (a real one: recording_server,
redis-server, ...). Per connection NNNNNN (accept order, from 000001) the directory gets
NNNNNN.c2s and NNNNNN.s2c (the bytes of each direction, in order) and NNNNNN.events, one
line per event, written as it happens:

    accept TS PEER_IP PEER_PORT LISTEN_IP LISTEN_PORT
    c2s TS N        (N bytes read from the client at TS, relayed to the server)
    s2c TS N        (N bytes read from the server, relayed to the client)
    c_fin TS | s_fin TS | c_rst TS | s_rst TS | refused TS

TS is time.time_ns() when the relay read the bytes. tests/tapcap.py turns a directory
into a pcap (the connections as a capture at the relay would show them) and reads the
directories back for comparisons. One thread, a selectors loop; runs until SIGTERM/SIGINT,
then closes its files; --ready FILE gets "PID PORT" once listening (port 0: a free one).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import time

_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


class Side:
    """One socket of a relayed connection and the bytes waiting to be written to it."""

    def __init__(self, sock):
        self.sock = sock
        self.out = bytearray()
        self.eof_in = False      # its peer has sent FIN and we passed it on
        self.shut = False        # we shut down writing towards it
        self.read_eof = False    # it sent us its FIN
        self.events = 0


class Relay:
    def __init__(self, tap, n, client, peer, upstream):
        self.tap = tap
        self.n = n
        base = os.path.join(tap.log_dir, f"{n:06d}")
        self.log = {"c2s": open(base + ".c2s", "wb"), "s2c": open(base + ".s2c", "wb")}
        self.ev = open(base + ".events", "w")
        lip, lport = client.getsockname()[:2]
        self.event(f"accept {time.time_ns()} {peer[0]} {peer[1]} {lip} {lport}")
        self.c = Side(client)
        self.s = None
        self.done = False
        try:
            server = socket.create_connection(upstream, timeout=5)
        except OSError:
            self.event(f"refused {time.time_ns()}")
            self.abort(self.c)
            return
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.setblocking(False)
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s = Side(server)
        self.other = {id(self.c): self.s, id(self.s): self.c}
        self.name = {id(self.c): "c", id(self.s): "s"}
        for side in (self.c, self.s):
            self.watch(side)

    def event(self, line):
        self.ev.write(line + "\n")
        self.ev.flush()

    def watch(self, side):
        ev = (0 if side.read_eof else _R) | (_W if side.out else 0)
        if ev == side.events:
            return
        if not side.events:
            self.tap.sel.register(side.sock, ev, (self, side))
        elif ev:
            self.tap.sel.modify(side.sock, ev, (self, side))
        else:
            self.tap.sel.unregister(side.sock)
        side.events = ev

    def on_read(self, side):
        to = self.other[id(side)]
        d = "c2s" if side is self.c else "s2c"
        try:
            data = side.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.event(f"{self.name[id(side)]}_rst {time.time_ns()}")
            return self.abort(to)
        now = time.time_ns()
        if not data:
            self.event(f"{self.name[id(side)]}_fin {now}")
            side.read_eof = True
            to.eof_in = True
        else:
            self.log[d].write(data)
            self.event(f"{d} {now} {len(data)}")
            to.out += data
        self.flush(to)
        self.watch(side)

    def flush(self, side):
        if side.out:
            try:
                n = side.sock.send(side.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return self.abort(self.other[id(side)])
            del side.out[:n]
        if not side.out and side.eof_in and not side.shut:
            try:
                side.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            side.shut = True
        self.watch(side)
        if self.c.shut and self.s.shut:
            self.close()

    def abort(self, side):
        """Pass a reset on: close `side` with an RST, and the other one too."""
        for x in (self.c, self.s):
            if x is None:
                continue
            try:
                x.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                  b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
        self.close()

    def close(self):
        if self.done:
            return
        self.done = True
        for x in (self.c, self.s):
            if x is None:
                continue
            if x.events:
                self.tap.sel.unregister(x.sock)
                x.events = 0
            x.sock.close()
        for f in self.log.values():
            f.close()
        self.ev.close()
        self.tap.relays.discard(self)


class Tap:
    def __init__(self, listen, upstream, log_dir):
        self.upstream = upstream
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        fam = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, _R, None)
        self.count = 0
        self.relays: set = set()

    def serve_forever(self):
        while True:
            for key, ev in self.sel.select(0.5):
                if key.data is None:
                    self.accept()
                    continue
                relay, side = key.data
                if relay.done:
                    continue
                if ev & _R:
                    relay.on_read(side)
                if ev & _W and not relay.done:
                    relay.flush(side)

    def accept(self):
        # a few per wake-up, so that a burst of new connections does not hold back the
        # reads of those accepted before it (their data would be logged late: the relay's
        # stall, not the replay's; select() reports the rest at once)
        for _ in range(4):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.count += 1
            r = Relay(self, self.count, sock, peer, self.upstream)
            if not r.done:
                self.relays.add(r)

    def close(self):
        for r in list(self.relays):
            r.close()


def _endpoint(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--upstream", required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--ready")
    a = p.parse_args(argv)
    tap = Tap(_endpoint(a.listen), _endpoint(a.upstream), a.log_dir)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if a.ready:
        with open(a.ready + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {tap.sock.getsockname()[1]}\n")
        os.rename(a.ready + ".tmp", a.ready)
    try:
        tap.serve_forever()
    finally:
        tap.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
