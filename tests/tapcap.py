"""Captures without root: the logs of tests/servers/tap_proxy.py as connections and pcaps.

A tap relay sits between real clients and a real server and logs, per connection, the
bytes of each direction and when it read them. ``connections(dir)`` reads that back;
``pcap(dirs)`` writes the connections as the packets a capture at the relay would hold:
handshake, client data acking the server bytes the relay had passed to the client before
it (the client's ack, as a capture shows it), server data, FINs and RSTs, at the logged
times (raw IP, nanosecond pcap).
"""

from __future__ import annotations

import bisect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, build_tcp

REPO = Path(__file__).resolve().parent.parent
SEG = 32768  # payload per synthesized packet (a loopback capture holds up to 64 KiB)


class Conn:
    """One relayed connection: its endpoints, bytes and events [(kind, ts, n), ...]."""

    def __init__(self, path_base: str):
        self.name = os.path.basename(path_base)
        self.c2s = Path(path_base + ".c2s").read_bytes()
        self.s2c = Path(path_base + ".s2c").read_bytes()
        self.events = []
        for line in Path(path_base + ".events").read_text().splitlines():
            f = line.split()
            if f[0] == "accept":
                self.accept = int(f[1])
                self.peer = (f[2], int(f[3]))
                self.local = (f[4], int(f[5]))
            else:
                self.events.append((f[0], int(f[1]), int(f[2]) if len(f) > 2 else 0))

    @classmethod
    def from_parts(cls, name, accept, peer, local, events, c2s, s2c) -> "Conn":
        """A connection from elsewhere than a relay's logs (wire_connections)."""
        c = cls.__new__(cls)
        c.name, c.accept, c.peer, c.local = name, accept, peer, local
        c.events, c.c2s, c.s2c = events, c2s, s2c
        return c

    def arrivals(self) -> list[tuple[int, int]]:
        """[(ns after accept, client bytes received so far)] per read of client data."""
        out, total = [], 0
        for kind, ts, n in self.events:
            if kind == "c2s":
                total += n
                out.append((ts - self.accept, total))
        return out

    def requests(self) -> list[tuple[int, int | None]]:
        """For each request (client data after the accept or after the server spoke;
        pipelined requests sent together count as one): (ns from the accept to its first
        byte, ns from the accept to the server's last bytes before it, or None)."""
        out, answer, waiting = [], None, True
        for kind, ts, n in self.events:
            if kind == "c2s":
                if waiting:
                    out.append((ts - self.accept, answer))
                    waiting = False
            elif kind == "s2c":
                answer, waiting = ts - self.accept, True
        return out

    def closes(self) -> set:
        """How each side ended: {"c_fin", "s_fin"} for a clean close."""
        return {k for k, _, _ in self.events if k not in ("c2s", "s2c")}


def connections(log_dir) -> list[Conn]:
    names = sorted(p[:-len(".events")] for p in os.listdir(log_dir) if p.endswith(".events"))
    return [Conn(os.path.join(log_dir, n)) for n in names]


def wire_connections(pcap_path, port: int) -> list[Conn]:
    """The connections to port in a capture taken at the server's interface, as the relay
    would have logged them if it had read every segment when the kernel got it: accepted
    when the handshake's ACK came, c2s/s2c events at each segment's new bytes (a
    retransmission adds none), FINs and RSTs. Those times do not include the relay's own
    delays (a busy relay accepts and reads late), so they measure the replay alone."""
    from replay_harness import parse_tcp, pcap_ip_packets

    conns, order = {}, []
    for ts, ip in pcap_ip_packets(pcap_path):
        t = parse_tcp(ip)
        if t is None or port not in (t[2], t[3]):
            continue
        src, dst, sport, dport, seq, _ack, flags, payload = t
        ns = round(float(ts) * 1e9)
        c2s = dport == port
        key = (src, sport) if c2s else (dst, dport)
        if c2s and flags & TH_SYN:
            if key not in conns:  # (else a retransmitted SYN)
                conns[key] = {"isn": {"c2s": seq + 1}, "accept": None, "events": [],
                              "data": {"c2s": bytearray(), "s2c": bytearray()},
                              "local": (dst, port)}
                order.append(key)
            continue
        c = conns.get(key)
        if c is None:
            continue
        d = "c2s" if c2s else "s2c"
        if flags & TH_SYN:  # the SYN-ACK
            c["isn"]["s2c"] = seq + 1
            continue
        if c2s and c["accept"] is None:
            c["accept"] = ns  # the handshake's ACK (or the first segment after the SYN)
        if d not in c["isn"] or c["accept"] is None:
            continue
        off = (seq - c["isn"][d]) & 0xFFFFFFFF
        have = c["data"][d]
        new = payload[len(have) - off:] if off <= len(have) else b""
        if new:
            have += new
            c["events"].append((d, ns, len(new)))
        if flags & (TH_FIN | TH_RST):
            side = "c" if c2s else "s"
            kind = f"{side}_fin" if flags & TH_FIN else f"{side}_rst"
            if not any(k == kind for k, _, _ in c["events"]):
                c["events"].append((kind, ns, 0))
    out = []
    for i, key in enumerate(order):
        c = conns[key]
        if c["accept"] is not None:
            out.append(Conn.from_parts(f"{i + 1:06d}", c["accept"], key, c["local"],
                                       c["events"], bytes(c["data"]["c2s"]),
                                       bytes(c["data"]["s2c"])))
    return out


def _packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def packets(conn: Conn, isn_c: int, isn_s: int, acks: bool = False) -> list[tuple[int, bytes]]:
    """The connection as (ts, IP datagram) in both directions; acks: with the client's
    pure ACK of each read of server data, at once (as the client's kernel sends it; a
    capture shows them, and tc-session learns duplex sessions from them)."""
    c, s = _packed(conn.peer[0]), _packed(conn.local[0])
    cp, sp = conn.peer[1], conn.local[1]
    cseq, sseq = isn_c + 1, isn_s + 1
    t = conn.accept
    out = [(t, build_tcp(c, s, cp, sp, isn_c, 0, TH_SYN)),
           (t, build_tcp(s, c, sp, cp, isn_s, cseq, TH_SYN | TH_ACK)),
           (t, build_tcp(c, s, cp, sp, cseq, sseq, TH_ACK))]
    pos = {"c2s": 0, "s2c": 0}
    for kind, ts, n in conn.events:
        if kind in ("c2s", "s2c"):
            data = (conn.c2s if kind == "c2s" else conn.s2c)[pos[kind]:pos[kind] + n]
            pos[kind] += n
            for i in range(0, n, SEG):
                part = data[i:i + SEG]
                if kind == "c2s":
                    out.append((ts, build_tcp(c, s, cp, sp, cseq, sseq, TH_PSH | TH_ACK,
                                              payload=part)))
                    cseq += len(part)
                else:
                    out.append((ts, build_tcp(s, c, sp, cp, sseq, cseq, TH_PSH | TH_ACK,
                                              payload=part)))
                    sseq += len(part)
            if acks and kind == "s2c":
                out.append((ts, build_tcp(c, s, cp, sp, cseq, sseq, TH_ACK)))
        elif kind == "c_fin":
            out.append((ts, build_tcp(c, s, cp, sp, cseq, sseq, TH_FIN | TH_ACK)))
            cseq += 1
        elif kind == "s_fin":
            out.append((ts, build_tcp(s, c, sp, cp, sseq, cseq, TH_FIN | TH_ACK)))
            sseq += 1
        elif kind == "c_rst":
            out.append((ts, build_tcp(c, s, cp, sp, cseq, 0, TH_RST)))
        elif kind == "s_rst":
            out.append((ts, build_tcp(s, c, sp, cp, sseq, 0, TH_RST)))
    return out


def pcap(dirs, path, acks: bool = False) -> int:
    """Write the connections of the tap log directories as one pcap; the packet count
    (acks: see packets())."""
    from tcpcopylib.link import LINKTYPE_RAW
    from tcpcopylib.pcapio import PcapWriter

    pkts = []
    k = 0
    for d in dirs:
        for conn in connections(d):
            k += 1
            pkts += packets(conn, 1_000_000 * k & 0xFFFFFFFF, 3_000_000_000 - 7919 * k, acks)
    pkts.sort(key=lambda p: p[0])  # (stable: a connection's packets keep their order)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = PcapWriter(fd, LINKTYPE_RAW)
        for ts, data in pkts:
            w.write(ts, data)
        w.flush()
    finally:
        os.close(fd)
    return len(pkts)


# -- timing: when the target got each request, against the recording --------------------

def offsets_late(rec, rep) -> list[float]:
    """For each read of client data online: how much later (ms) the target had that many
    client bytes than the online server had, both counted from the connection's accept
    (no allowance for the target's answers: a duplex client did not wait for any)."""
    got = rep.arrivals()
    totals = [n for _, n in got]
    out = []
    for t, n in rec.arrivals():
        i = bisect.bisect_left(totals, n)
        out.append((got[i][0] - t) / 1e6)
    return out


def gated_late(rec, rep) -> list[float]:
    """For each request of a request/response session: as test_socket_mode.lateness, how
    much later than due it reached the target, where due is its recorded offset or right
    after the target's own answer to the one before, whichever is later."""
    out = []
    for (due, _), (got, answer) in zip(rec.requests(), rep.requests(), strict=True):
        out.append((got - max(due, answer or 0)) / 1e6)
    return out


def is_duplex_kind(name, conn) -> bool:
    """The connections of the test whose client does not wait for the server."""
    if name == "ws":
        return True
    if name == "redis":  # the subscribers (the publisher waits for each reply)
        return not conn.c2s.startswith(b"*3\r\n$7\r\nPUBLISH")
    if name == "sse":
        return conn.c2s.startswith(b"GET /events")
    return False


class Tap:
    """A running tap_proxy.py (stop() ends it and waits, so its logs are complete)."""

    def __init__(self, upstream_port: int, log_dir, env=None):
        self.log_dir = str(log_dir)
        ready = f"{self.log_dir}.ready"
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests/servers/tap_proxy.py"), "--listen",
             "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}", "--log-dir",
             self.log_dir, "--ready", ready], env=env)
        self.port = wait_ready(ready, self.proc)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def connections(self) -> list[Conn]:
        return connections(self.log_dir)


def wait_ready(ready: str, proc, timeout: float = 10.0) -> int:
    """The port written to a --ready file by a process that starts listening."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[:2]} did not start (exit {proc.poll()})")
        time.sleep(0.01)
    return int(Path(ready).read_text().split()[1])
