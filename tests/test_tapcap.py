"""tests/tapcap.py's capture reader (wire_connections) against its capture writer (pcap):
a relay's log written as packets and read back gives the same connections."""

import os

import tapcap
from tcpcopylib.link import LINKTYPE_RAW
from tcpcopylib.pcapio import PcapWriter


def write_log(d, n, accept, peer_port, events, c2s, s2c):
    """A tap relay's log of connection n (tests/servers/tap_proxy.py's files)."""
    (d / f"{n:06d}.c2s").write_bytes(c2s)
    (d / f"{n:06d}.s2c").write_bytes(s2c)
    lines = [f"accept {accept} ::ffff:10.1.0.2 {peer_port} ::ffff:10.1.0.1 8081"]
    lines += [f"{k} {ts} {size}" if k in ("c2s", "s2c") else f"{k} {ts}"
              for k, ts, size in events]
    (d / f"{n:06d}.events").write_text("\n".join(lines) + "\n")


def test_a_capture_reads_back_as_the_relay_logged_it(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    t0 = 1_700_000_000_000_000_000
    write_log(logs, 1, t0, 40001,
              [("c2s", t0 + 300_000, 18), ("s2c", t0 + 900_000, 5), ("c2s", t0 + 2_000_000, 4),
               ("s2c", t0 + 2_500_000, 3), ("c_fin", t0 + 3_000_000, 0),
               ("s_fin", t0 + 3_100_000, 0)],
              b"GET / HTTP/1.1\r\n\r\n" + b"PING", b"hello" + b"bye")
    write_log(logs, 2, t0 + 1_000_000, 40002,
              [("s2c", t0 + 1_100_000, 6), ("c2s", t0 + 4_000_000, 6),
               ("c_rst", t0 + 5_000_000, 0)],
              b"QUIT\r\n", b"READY\n")
    pcap = tmp_path / "relay.pcap"
    assert tapcap.pcap([logs], pcap) > 0

    logged = tapcap.connections(logs)
    read = tapcap.wire_connections(pcap, 8081)
    assert [(c.peer, c.c2s, c.s2c) for c in read] == [(c.peer, c.c2s, c.s2c) for c in logged]
    for got, want in zip(read, logged):
        assert abs(got.accept - want.accept) < 1000  # (a float's ns, at 1.7e9 s)
        assert [(k, n) for k, _, n in got.events] == [(k, n) for k, _, n in want.events]
        assert all(abs(g[1] - w[1]) < 1000 for g, w in zip(got.events, want.events))
        for (ga, gb), (wa, wb) in zip(got.requests(), want.requests(), strict=True):
            assert abs(ga - wa) < 1000 and (gb is None) == (wb is None)
            assert gb is None or abs(gb - wb) < 1000


def test_retransmitted_segments_add_no_bytes(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    t0 = 1_700_000_000_000_000_000
    write_log(logs, 1, t0, 40003, [("c2s", t0 + 100_000, 3), ("c2s", t0 + 200_000, 3)],
              b"abcdef", b"")
    conn = tapcap.connections(logs)[0]
    pkts = tapcap.packets(conn, 1000, 5000)
    data = [p for p in pkts if len(p[1]) > 60]  # the two data segments (IPv6 + TCP = 60)
    pkts.insert(pkts.index(data[1]) + 1, (data[1][0] + 50_000, data[0][1]))  # "abc" again

    path = tmp_path / "retx.pcap"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    w = PcapWriter(fd, LINKTYPE_RAW)
    for ts, d in pkts:
        w.write(ts, d)
    w.flush()
    os.close(fd)
    (got,) = tapcap.wire_connections(path, 8081)
    assert got.c2s == b"abcdef"
    assert [(k, n) for k, _, n in got.events] == [("c2s", 3), ("c2s", 3)]
