"""tcpcopylib.reassembly: both directions of each connection, from datagrams (no root)."""

import random

import pytest

from tcpcopylib.packet import build_tcp, ip_bytes
from tcpcopylib.reassembly import HalfStream, Reassembler, connections_from_file

C, S = ("10.0.0.1", 40000), ("10.0.0.2", 80)
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08


def pkt(src, dst, seq, flags, payload=b"", ack=0):
    return build_tcp(ip_bytes(src[0]), ip_bytes(dst[0]), src[1], dst[1], seq, ack, flags,
                     payload=payload)


def conversation(isn_c, isn_s, request, response, mss=100, c=C, s=S):
    """A whole connection's datagrams: handshake, request, response in mss pieces, FINs."""
    out = [pkt(c, s, isn_c, SYN), pkt(s, c, isn_s, SYN | ACK, ack=isn_c + 1)]
    for i in range(0, len(request), mss):
        out.append(pkt(c, s, isn_c + 1 + i, ACK | PSH, request[i:i + mss]))
    for i in range(0, len(response), mss):
        out.append(pkt(s, c, isn_s + 1 + i, ACK | PSH, response[i:i + mss]))
    out.append(pkt(c, s, isn_c + 1 + len(request), ACK | FIN))
    out.append(pkt(s, c, isn_s + 1 + len(response), ACK | FIN))
    return out


def feed(pkts, **kw):
    r = Reassembler(**kw)
    for i, p in enumerate(pkts):
        r.add(1000 + i, p)
    return r


@pytest.mark.parametrize("isn_c,isn_s", [(1000, 5000), (2**32 - 150, 2**32 - 1),
                                         (2**32 - 1, 2**32 - 2)])
def test_both_directions_across_the_seq_wrap(isn_c, isn_s):
    req, resp = bytes(range(256)) * 3, b"R" * 1000 + b"end"
    (conn,) = feed(conversation(isn_c, isn_s, req, resp)).connections()
    assert conn.client == C and conn.server == S
    assert conn.c2s.data() == (req, []) and conn.s2c.data() == (resp, [])
    assert conn.c2s.syn and conn.s2c.syn and conn.closed


def test_retransmissions_overlaps_and_reordering_give_the_bytes_once():
    req = bytes(random.Random(1).randrange(256) for _ in range(3000))
    segs = [(o, req[o:o + 200]) for o in range(0, 3000, 200)]
    rnd = random.Random(7)
    pkts = [pkt(C, S, 99, SYN)]
    shuffled = segs[:]
    rnd.shuffle(shuffled)
    for o, d in shuffled:
        pkts.append(pkt(C, S, 100 + o, ACK, d))
        if rnd.random() < 0.3:
            pkts.append(pkt(C, S, 100 + o, ACK, d))  # retransmitted
    pkts.append(pkt(C, S, 100 + 150, ACK, req[150:750]))  # overlaps three segments
    (conn,) = feed(pkts).connections()
    assert conn.c2s.data() == (req, [])
    assert conn.c2s.stored == len(req)  # duplicates not stored


def test_a_segment_extending_a_held_one_adds_only_its_tail_with_its_own_time():
    h = HalfStream()
    h.add(99, SYN, b"", 1)
    h.add(100, ACK, b"abc", 10)
    h.add(100, ACK, b"abcdef", 20)
    assert h.bytes == b"abcdef"
    assert [h.time_at(i) for i in range(6)] == [10, 10, 10, 20, 20, 20]


def test_holes_are_zero_filled_and_listed_and_mid_stream_start_rebases():
    h = HalfStream()
    h.add(1300, ACK, b"x" * 200, 1)   # no SYN: the first seen seq is offset 0 ...
    h.add(1000, ACK, b"a" * 100, 2)   # ... until an earlier segment comes late
    h.add(1500, ACK, b"y" * 10, 3)
    data, holes = h.data()
    assert holes == [(100, 200)] and len(data) == 510
    assert data[:100] == b"a" * 100 and data[100:300] == bytes(200) and data[300:] == \
        b"x" * 200 + b"y" * 10
    assert h.time_at(0) == 2 and h.time_at(350) == 1 and h.time_at(505) == 3


def test_data_before_the_syn_point_is_cut():
    h = HalfStream()
    h.add(499, SYN, b"", 1)
    h.add(490, ACK, b"0123456789abc", 2)  # starts 10 bytes before offset 0
    assert h.bytes == b"abc"


def test_memory_limit_truncates_and_counts():
    (conn,) = feed(conversation(1, 2, b"q" * 1000, b"r" * 1000), limit=300).connections()
    assert len(conn.c2s) == 300 and conn.c2s.truncated and conn.c2s.dropped == 700


def test_port_reuse_starts_a_new_connection_and_syn_retransmission_does_not():
    first = conversation(1000, 7000, b"first", b"1")
    second = conversation(9000, 3000, b"second", b"2")
    pkts = first[:1] + first + second  # the first SYN sent twice
    conns = feed(pkts).connections()
    assert [c.c2s.bytes for c in conns] == [b"first", b"second"]
    assert [c.s2c.bytes for c in conns] == [b"1", b"2"]


def test_direction_without_syn_from_server_ports_or_the_higher_port():
    p = [pkt(S, C, 10, ACK, b"hello")]  # server -> client, mid-stream
    (conn,) = feed(p, server_ports=[80]).connections()
    assert conn.client == C and conn.s2c.bytes == b"hello"
    (conn,) = feed(p).connections()  # no ports given: the higher port (40000) is the client
    assert conn.client == C
    (conn,) = feed([pkt(("10.0.0.1", 80), ("10.0.0.2", 8080), 1, ACK, b"x")],
                   server_ports=[80]).connections()
    assert conn.server == ("10.0.0.1", 80)


def test_on_done_hands_over_closed_connections_and_the_rest_at_finish():
    got = []
    r = Reassembler(on_done=got.append)
    for i in range(200):
        c = ("10.0.1.%d" % (i % 250 + 1), 30000 + i)
        for p in conversation(i * 1000, 5, b"req%d" % i, b"resp", c=c):
            r.add(i * 10**6, p)
    assert 100 < len(got) < 200  # handed over as they closed, not all held to the end
    assert len(r.open) < 100
    r.add(10**12, pkt(("10.9.9.9", 5555), S, 1, ACK, b"open"))
    r.finish()
    assert len(got) == 201 and got[-1].c2s.bytes == b"open"
    assert sorted(c.c2s.bytes for c in got[:200]) == sorted(b"req%d" % i for i in range(200))


def test_ipv6_and_files(tmp_path):
    c6, s6 = ("2001:db8::1", 41000), ("2001:db8::2", 8080)
    pkts = conversation(5, 6, b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", c=c6, s=s6)
    import struct

    pcap = tmp_path / "x.pcap"
    with open(pcap, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, p in enumerate(pkts):
            f.write(struct.pack("<IIII", 100 + i, 0, len(p), len(p)) + p)
    (conn,) = connections_from_file(pcap)
    assert conn.client == c6 and conn.s2c.bytes.startswith(b"HTTP/1.1 200")
    assert conn.c2s.time_at(0) == 102 * 10**9
    # the same packets as a record stream
    import tc

    recs = tc.stream([{"t": "pkt", "ts": 100 + i, "data": p} for i, p in enumerate(pkts)]
                     + [{"t": "other"}])
    (tmp_path / "x.cbor").write_bytes(recs)
    others = []
    (conn2,) = connections_from_file(tmp_path / "x.cbor", on_other=others.append)
    assert conn2.c2s.bytes == conn.c2s.bytes and others == [{"t": "other"}]
