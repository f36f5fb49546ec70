"""Synthetic inputs for tc-diff without a lab: an original capture (pcap, both
directions), a session map (sess records) and the target's replies (fb records), built
from a list of exchanges per connection with chosen times."""

from __future__ import annotations

import struct

import cbor2

from tcpcopylib.packet import build_tcp, ip_bytes
from tcpcopylib.records import encode_section, header

SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08
MS = 1_000_000
MSS = 1000


def _segments(src, dst, isn, data, flags=ACK | PSH):
    return [build_tcp(ip_bytes(src[0]), ip_bytes(dst[0]), src[1], dst[1], isn + 1 + i, 0,
                      flags, payload=data[i:i + MSS]) for i in range(0, len(data), MSS)]


class Side:
    """One side's conversation: (ts, datagram) list, with the send times of requests."""

    def __init__(self, client, server, t0, isn_c=1000, isn_s=90000):
        self.client, self.server = client, server
        self.isn_c, self.isn_s = isn_c, isn_s
        self.c_off = self.s_off = 0
        self.t = t0
        c, s = client, server
        self.pkts = [(t0, build_tcp(ip_bytes(c[0]), ip_bytes(s[0]), c[1], s[1], isn_c, 0,
                                    SYN)),
                     (t0 + MS // 10, build_tcp(ip_bytes(s[0]), ip_bytes(c[0]), s[1], c[1],
                                               isn_s, isn_c + 1, SYN | ACK))]
        self.runs = []  # the session map's "sent" runs
        self.t += MS

    def exchange(self, request: bytes, response: bytes, delay_ms: float = 5.0):
        for p in _segments(self.client, self.server, self.isn_c + self.c_off, request):
            self.pkts.append((self.t, p))
        self.runs.append([self.c_off, self.c_off + len(request), self.t, self.t])
        self.c_off += len(request)
        self.t += int(delay_ms * MS)
        for p in _segments(self.server, self.client, self.isn_s + self.s_off, response):
            self.pkts.append((self.t, p))
        self.s_off += len(response)
        self.t += 2 * MS

    def close(self):
        c, s = self.client, self.server
        self.pkts.append((self.t, build_tcp(ip_bytes(c[0]), ip_bytes(s[0]), c[1], s[1],
                                            self.isn_c + 1 + self.c_off, 0, FIN | ACK)))
        self.pkts.append((self.t, build_tcp(ip_bytes(s[0]), ip_bytes(c[0]), s[1], c[1],
                                            self.isn_s + 1 + self.s_off, 0, FIN | ACK)))


def write_pcap(path, pkts):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 101))
        for ts, p in sorted(pkts, key=lambda x: x[0]):
            f.write(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(p), len(p)) + p)


def write_stream(path, records, tool="test"):
    with open(path, "wb") as f:
        f.write(encode_section(header(tool)) + b"".join(cbor2.dumps(r) for r in records))


def fb_records(side: Side) -> list:
    """The target's half of a conversation as tc-intercept --payload all writes it."""
    return [{"t": "fb", "ts": ts, "data": p, "len": len(p)} for ts, p in side.pkts
            if p[12:16] == ip_bytes(side.server[0])]


def sess_record(sid, orig: Side, replay: Side | None, outcome="completed", copy=0) -> dict:
    o = [*orig.client, *orig.server]
    if replay is None:
        return {"t": "sess", "sid": sid, "copy": copy, "orig": o, "target": ["10.9.0.2", 8080],
                "conns": [], "outcome": outcome, "start": 0, "end": 0, "sent": []}
    return {"t": "sess", "sid": sid, "copy": copy, "orig": o,
            "target": list(replay.server), "outcome": outcome,
            "conns": [[*replay.client, replay.pkts[0][0], replay.pkts[1][0]]],
            "start": replay.pkts[0][0], "end": replay.t, "sent": replay.runs}
