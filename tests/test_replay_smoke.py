"""Self-tests of the replay harness (no tc-session needed).

- the recording server on loopback records exactly what clients sent, in every mode;
- pcap reassembly handles reordering, retransmission, overlap and mid-stream starts;
- in the lab: real client -> recording server under tcpdump; the client streams
  reassembled from the pcap equal, byte for byte, what the online server logged.
"""

import socket
import struct
import subprocess
import sys
import time

import pytest

import replay_harness as h
from tcpcopylib import testing


# -- reassembly on a synthetic pcap -------------------------------------------------------

def _ip4_tcp(src, dst, sport, dport, seq, flags, payload=b"", ack=0):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    total = 20 + len(tcp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


def _write_pcap(path, packets, linktype=101):
    """A µs pcap of the packets, 1 ms apart."""
    path.write_bytes(testing.pcap([(1000 * 10**9 + i * 10**6, p) for i, p in enumerate(packets)],
                          linktype, ns=False))


def test_reassembly_reorder_retransmit_overlap(tmp_path):
    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 80)
    isn = 0xFFFFFFF0  # wraps inside the stream
    data = bytes(range(256)) * 4

    def seg(off, n, flags=0x18):
        return _ip4_tcp(c[0], s[0], c[1], s[1], (isn + 1 + off) & 0xFFFFFFFF, flags,
                        data[off:off + n])

    pkts = [_ip4_tcp(c[0], s[0], c[1], s[1], isn, 0x02),
            _ip4_tcp(s[0], c[0], s[1], c[1], 777, 0x12, ack=isn + 1),
            seg(0, 100), seg(300, 200), seg(100, 200),   # out of order
            seg(100, 200),                                # retransmission
            seg(250, 300),                                # overlap
            seg(550, len(data) - 550),
            _ip4_tcp(s[0], c[0], s[1], c[1], 778, 0x18, b"reply"),
            _ip4_tcp(c[0], s[0], c[1], s[1], (isn + 1 + len(data)) & 0xFFFFFFFF, 0x11)]
    pcap = tmp_path / "a.pcap"
    _write_pcap(pcap, pkts)
    (st,) = h.tcp_streams(pcap, 80)
    assert st.syn and st.fin
    assert st.data() == (data, [])
    assert st.other.bytes == b"reply"
    # The same without the SYN and with the first segment missing: a hole is reported.
    _write_pcap(pcap, [seg(300, 200), seg(0, 100), seg(500, 100)])
    (st,) = h.tcp_streams(pcap, 80)
    got, holes = st.data()
    assert not st.syn and holes == [(100, 200)]
    assert got[:100] == data[:100] and got[300:600] == data[300:600]


def test_reassembly_ethernet_and_port_reuse(tmp_path):
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 80)
    pkts = []
    for isn, body in ((1000, b"first"), (5000, b"second")):
        pkts += [eth + _ip4_tcp(c[0], s[0], c[1], s[1], isn, 0x02),
                 eth + _ip4_tcp(c[0], s[0], c[1], s[1], isn + 1, 0x18, body),
                 eth + _ip4_tcp(c[0], s[0], c[1], s[1], isn + 1 + len(body), 0x11)]
    pcap = tmp_path / "e.pcap"
    _write_pcap(pcap, pkts, linktype=1)
    assert [x.bytes for x in h.tcp_streams(pcap, 80)] == [b"first", b"second"]


def test_recording_problem_checks_the_capture_against_the_server_log(tmp_path):
    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 80)
    body = b"GET / HTTP/1.1\r\n\r\n"
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / f"1_{c[0]}_{c[1]}.bin").write_bytes(body * 2)
    whole = [_ip4_tcp(c[0], s[0], c[1], s[1], 99, 0x02),
             _ip4_tcp(c[0], s[0], c[1], s[1], 100, 0x18, body),
             _ip4_tcp(c[0], s[0], c[1], s[1], 100 + len(body), 0x18, body)]
    pcap = tmp_path / "r.pcap"
    _write_pcap(pcap, whole)
    assert h.recording_problem(pcap, logs, 80) == ""
    _write_pcap(pcap, whole[1:])  # from after the handshake: still every byte
    assert h.recording_problem(pcap, logs, 80) == ""
    _write_pcap(pcap, whole[:2])  # the second request is not in the capture
    assert "missing=1 different=0 extra=1" in h.recording_problem(pcap, logs, 80)
    _write_pcap(pcap, [whole[0], whole[2]])  # nor the first: a hole
    assert "holes in the streams of [('10.0.0.1', 40000)]" in h.recording_problem(pcap, logs, 80)
    _write_pcap(pcap, [])
    assert "missing=0 different=0 extra=1" in h.recording_problem(pcap, logs, 80)


def test_compare_streams_reports_each_kind():
    def stream(port, data, seq=100):
        st = h.Stream(("10.0.0.1", port), ("10.0.0.2", 80))
        st.add(seq - 1, 0x02, b"")
        st.add(seq, 0x18, data)
        return st

    a, b, c = stream(1, b"hello world"), stream(2, b"abc"), stream(3, b"xyz")
    logged = [h.Logged(1, "::ffff:10.0.0.1", 1, b"hello "),   # split over 2 connections
              h.Logged(2, "10.0.0.1", 1, b"world"),
              h.Logged(3, "10.0.0.1", 7, b"ab"),             # another port: a remap
              h.Logged(4, "10.0.0.9", 9, b"x"),              # nobody sent that
              h.Logged(5, "10.0.0.1", 3, b"")]               # empty: ignored
    res = h.compare_streams([a, b, c, stream(4, b"")], logged)
    assert res.identical == 1 and res.missing == [("10.0.0.1", 3)]
    assert res.different[0][0] == ("10.0.0.1", 2) and "only 2 of 3" in res.different[0][1]
    assert res.remapped == [(("10.0.0.1", 2), ("10.0.0.1", 7))]
    assert [k for k, _ in res.extra] == [("10.0.0.9", 9)] and res.empty_skipped == 1
    assert not res.ok
    ok = h.compare_streams([a, b], logged[:3] + [h.Logged(6, "10.0.0.1", 7, b"c")],
                           allow_remap=True)
    assert ok.ok and ok.identical == 2 and ok.connections == 4
    assert not h.compare_streams([a, b], logged[:3] + [h.Logged(6, "10.0.0.1", 7, b"c")]).ok
    bad = h.compare_streams([a], [h.Logged(1, "10.0.0.1", 1, b"hellO world")])
    assert bad.missing == [("10.0.0.1", 1)] and "first difference at 4" in bad.extra[0][1]


# -- the recording server on loopback ----------------------------------------------------------

@pytest.fixture
def loopback_server(tmp_path):
    procs = []

    def start(*args):
        ready = tmp_path / f"ready{len(procs)}"
        logs = tmp_path / f"logs{len(procs)}"
        p = subprocess.Popen([sys.executable, str(h.SERVERS / "recording_server.py"),
                              "--listen", "127.0.0.1:0", "--log-dir", str(logs),
                              "--ready", str(ready), *args])
        procs.append(p)
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline and p.poll() is None, "server did not start"
            time.sleep(0.02)
        return int(ready.read_text().split()[1]), logs

    yield start
    for p in procs:
        p.terminate()
        p.wait(5)


def _client(port, scenario, *args):
    r = subprocess.run([sys.executable, str(h.SERVERS / "traffic_client.py"), scenario,
                        "--server", f"127.0.0.1:{port}", *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    import json
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])


def _wait_logged(logs, n, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        idx = logs / "connections.log"
        if idx.exists() and len(idx.read_text().splitlines()) >= n:
            return idx.read_text().splitlines()
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} connections logged in {logs}")


@pytest.mark.parametrize("scenario,args,conns,requests", [
    ("keepalive", ["--conns", 2, "--requests", 3], 2, 6),
    ("close", ["--conns", 3], 3, 3),
    ("pipelined", ["--conns", 2, "--requests", 4], 2, 8),
    ("bigbody", ["--conns", 1, "--body-size", 300000], 1, 2),
    ("concurrent", ["--conns", 20, "--requests", 2], 20, 40),
])
def test_recording_server_http(loopback_server, scenario, args, conns, requests):
    port, logs = loopback_server()
    rc, res = _client(port, scenario, *args)
    assert rc == 0 and res["answers"] == requests and res["conns"] == conns, res
    index = _wait_logged(logs, conns)
    assert sum(int(ln.split()[4]) for ln in index) == requests
    got = h.logged_streams(logs)
    assert len(got) == conns
    assert sum(c.data.count(b"HTTP/1.1\r\n") for c in got) == requests
    if scenario == "bigbody":
        assert len(got[0].data) > 300000


def test_recording_server_greeting_delay_and_close(loopback_server):
    port, logs = loopback_server("--mode", "greeting", "--delay", "0.2")
    t0 = time.monotonic()
    rc, res = _client(port, "greeting", "--conns", 1, "--requests", 2)
    assert rc == 0 and res["answers"] == 2, res
    assert time.monotonic() - t0 >= 0.6  # two answers + QUIT, each delayed 0.2 s
    _wait_logged(logs, 1)
    assert h.logged_streams(logs)[0].data == b"CMD 0 0\r\nCMD 0 1\r\nQUIT\r\n"
    port, logs = loopback_server("--close-after-first")
    rc, res = _client(port, "keepalive", "--conns", 1, "--requests", 2)
    assert rc == 1 and res["answers"] == 1 and "server closed" in res["errors"][0]


# -- record in the lab, reassemble, compare with what the online server logged ------------------

SCENARIOS = h.SCENARIOS


@pytest.mark.netns
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lab_recording_matches_server_log(lab, tmp_path, scenario):
    args, server_kw = SCENARIOS[scenario]
    rec = h.record(lab, tmp_path, scenario, *args, server_kw=server_kw)
    assert rec.client["n_errors"] == 0, rec.client
    streams = rec.streams()
    assert streams and all(s.syn for s in streams)
    assert all(not s.data()[1] for s in streams), "holes in the capture"
    res = h.compare_streams(streams, h.logged_streams(rec.online_logs))
    assert res.ok and res.identical == rec.client["conns"], res.describe()


@pytest.mark.netns
def test_lab_recording_midconnection_and_v6(lab, tmp_path):
    rec = h.record(lab, tmp_path, "keepalive", "--conns", 3, "--requests", 3, midconn=True)
    streams = rec.streams()
    assert len(streams) == 3 and not any(s.syn for s in streams)
    res = h.compare_streams(streams, h.logged_streams(rec.online_logs))
    assert res.ok and res.identical == 3, res.describe()
    rec6 = h.record(lab, tmp_path / "v6", "keepalive", "--conns", 2, "--requests", 2, v6=True)
    streams = rec6.streams()
    assert [s.client[0] for s in streams] == [lab.client_ip6] * 2
    res = h.compare_streams(streams, h.logged_streams(rec6.online_logs))
    assert res.ok and res.identical == 2, res.describe()
