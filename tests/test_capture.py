"""tc-capture: record encoding, GRO splitting, link-layer/inbound filtering, and live captures
in the namespace lab compared with tcpdump of the same interface."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import cbor2
import dpkt
import pytest

from tc import REPO, call, decode, loopback_exchange, tool_env, tool_path
from tcpcopylib.testing import BufferWriter, Collector
from tcpcopylib import capture as cap
from tcpcopylib import link
from tcpcopylib.packet import (TH_ACK, TH_CWR, TH_FIN, TH_PSH, build_tcp, checksum, ip_bytes,
                               parse_tcp, tcp_checksum_ok)

A4, B4 = ip_bytes("10.1.0.2"), ip_bytes("10.1.0.1")
A6, B6 = ip_bytes("fd00::2"), ip_bytes("fd00::1")
TS = 1_700_000_000_123_456_000
TS_OPT = b"\x01\x01\x08\x0a" + struct.pack("!II", 1234, 5678)


# -- GRO split -----------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("seq", [1000, 0xFFFFF000], ids=["seq", "seq-wraps"])
def test_split_segment(src, dst, seq):
    payload = os.urandom(10_000)
    big = build_tcp(src, dst, 40000, 80, seq, 777, TH_ACK | TH_PSH | TH_FIN | TH_CWR,
                    options=TS_OPT, payload=payload, ident=65530)
    pieces = cap.split_segment(big, 1500)
    hdr = (20 if src == A4 else 40) + 32
    mss = 1500 - hdr
    assert len(pieces) == -(-len(payload) // mss)
    got = b""
    for i, p in enumerate(pieces):
        t = parse_tcp(p)
        assert len(p) <= 1500 and t.ip_len == len(p)
        assert t.seq == (seq + len(got)) & 0xFFFFFFFF
        assert t.ack == 777 and t.options == TS_OPT and (t.sport, t.dport) == (40000, 80)
        assert tcp_checksum_ok(p)
        last = i == len(pieces) - 1
        assert bool(t.flags & TH_FIN) == last and bool(t.flags & TH_PSH) == last
        assert bool(t.flags & TH_CWR) == (i == 0) and t.flags & TH_ACK
        if src == A4:
            assert checksum(p[:20]) == 0
            assert struct.unpack_from("!H", p, 4)[0] == (65530 + i) & 0xFFFF
            assert p[6] & 0x40  # DF kept
        else:
            assert struct.unpack_from("!H", p, 4)[0] == len(p) - 40
        got += t.payload
    assert got == payload


def test_split_segment_leaves_small_packets_alone():
    small = build_tcp(A4, B4, 1, 2, 3, 4, TH_ACK, payload=b"x" * 1000)
    assert cap.split_segment(small, 1500) == [small]


# -- the packet path (Capturer) with synthetic frames --------------------------------------------
def _eth(ip: bytes, vlan: bool = False) -> bytes:
    et = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    tag = b"\x81\x00\x00\x05" if vlan else b""
    frame = b"\x02" * 6 + b"\x04" * 6 + tag + et + ip
    return frame + bytes(max(0, 60 - len(frame)))  # Ethernet padding


def _sll(ip: bytes, pkttype: int) -> bytes:
    et = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    return struct.pack("!HHH8s", pkttype, 1, 6, b"\x02" * 6) + et + ip


def _sll2(ip: bytes, pkttype: int) -> bytes:
    et = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    return et + b"\0\0" + struct.pack("!IHBB8s", 2, 1, pkttype, 6, b"\x02" * 6) + ip


def _feed(frames, linktype, count=0, mtu=1500, local=(B4, B6)):
    w = Collector()
    c = cap.Capturer(w, mtu=mtu, count=count, addresses=local)
    for f in frames:
        c.frame(f, 0, len(f), linktype, TS)
        if c.done:
            break
    return c, [r["data"] for r in w.recs]


def test_capturer_keeps_inbound_tcp_to_local_addresses_only():
    to_me = build_tcp(A4, B4, 5000, 80, 1, 0, 0x02)
    to_me6 = build_tcp(A6, B6, 5000, 80, 1, 0, 0x02)
    elsewhere = build_tcp(A4, ip_bytes("10.9.9.9"), 5000, 80, 1, 0, 0x02)  # e.g. replayed
    udp = bytearray(to_me)
    udp[9] = 17
    frames = [_eth(to_me), _eth(elsewhere), _eth(bytes(udp)), _eth(to_me6, vlan=True),
              b"\x02" * 12 + b"\x08\x06" + bytes(28)]  # ARP
    c, out = _feed(frames, link.LINKTYPE_ETHERNET)
    assert out == [to_me, to_me6]  # padding trimmed, VLAN tag skipped
    assert (c.frames, c.records, c.foreign) == (5, 2, 3)


@pytest.mark.parametrize("make,lt", [(_sll, link.LINKTYPE_LINUX_SLL),
                                     (_sll2, link.LINKTYPE_LINUX_SLL2)], ids=["sll", "sll2"])
def test_capturer_cooked_drops_outgoing(make, lt):
    p = build_tcp(A4, B4, 5000, 80, 1, 0, 0x02, payload=b"hello")
    c, out = _feed([make(p, link.PACKET_HOST), make(p, link.PACKET_OUTGOING)], lt)
    assert out == [p] and c.foreign == 1


def test_capturer_splits_supersegments_and_counts():
    payload = os.urandom(5000)
    big = build_tcp(A4, B4, 5000, 80, 100, 1, TH_ACK | TH_PSH, payload=payload)
    c, out = _feed([_eth(big)], link.LINKTYPE_ETHERNET)
    assert len(out) == 4 and b"".join(parse_tcp(d).payload for d in out) == payload
    assert (c.supersegs, c.split_records, c.records) == (1, 4, 4)
    c, out = _feed([_eth(big)], link.LINKTYPE_ETHERNET, count=2)  # -c stops mid-split
    assert len(out) == 2 and c.done


def test_capturer_marks_truncated_packets():
    p = build_tcp(A4, B4, 5000, 80, 1, 0, TH_ACK, payload=b"z" * 500)
    w = Collector()
    c = cap.Capturer(w, addresses=(B4,))
    f = _eth(p)
    c.frame(f, 0, 14 + 100, link.LINKTYPE_ETHERNET, TS)
    assert w.recs == [{"t": "pkt", "ts": TS, "data": p[:100], "len": len(p)}]
    assert c.truncated == 1




def _mixed_frames():
    pl = os.urandom(4000)
    return [
        _eth(build_tcp(A4, B4, 5000, 80, 1, 0, 0x02)),                       # SYN, padded
        _eth(build_tcp(A6, B6, 5000, 80, 1, 0, 0x02)),                       # IPv6
        _eth(build_tcp(A4, B4, 5000, 80, 2, 1, TH_ACK, payload=b"q" * 300)),  # 2-byte length
        _eth(build_tcp(A4, ip_bytes("10.9.9.9"), 5000, 80, 1, 0, 0x02)),     # not local
        _eth(build_tcp(A4, B4, 5000, 80, 2, 1, TH_ACK, payload=pl)),          # super-segment
        _eth(build_tcp(A6, B6, 5000, 80, 2, 1, TH_ACK, payload=pl)),
        _eth(build_tcp(A4, B4, 5000, 80, 9, 1, TH_ACK, payload=b"v"), vlan=True),
        b"\x02" * 12 + b"\x08\x06" + bytes(28),                               # ARP
        _eth(build_tcp(A4, B4, 5001, 80, 1, 0, 0x02))[:30],                   # runt
    ]


@pytest.mark.parametrize("count", [0, 1, 3, 6])
@pytest.mark.parametrize("lt,wrap", [(link.LINKTYPE_ETHERNET, None),
                                     (link.LINKTYPE_LINUX_SLL, _sll),
                                     (link.LINKTYPE_LINUX_SLL2, _sll2)], ids=["eth", "sll", "sll2"])
def test_batch_fast_path_equals_general_path(count, lt, wrap):
    frames = _mixed_frames()
    if wrap is not None:
        frames = [wrap(f[14:], link.PACKET_HOST) for f in frames if f[12:14] != b"\x81\x00"]
        frames.insert(1, wrap(build_tcp(A4, B4, 7, 80, 1, 0, 0x02), link.PACKET_OUTGOING))
    buf = b"".join(frames)
    meta, off = b"", 0
    for i, f in enumerate(frames):
        meta += struct.pack("=IIII", 1_700_000_000, 10 * i, off, len(f))
        off += len(f)
    wa, wb = BufferWriter(), BufferWriter()
    a = cap.Capturer(wa, count=count, addresses=(B4, B6))
    b = cap.Capturer(wb, count=count, addresses=(B4, B6))
    n = a.batch(buf, meta, lt)
    for i, f in enumerate(frames):
        b.frame(f, 0, len(f), lt, 1_700_000_000_000_000_000 + 10_000 * i)
        if b.done:
            break
    assert bytes(wa.buf) == bytes(wb.buf) and wa.records == wb.records
    got = [cbor2.loads(x) for x in _split_cbor(bytes(wa.buf))]
    assert len(got) == (count or len(got)) and a.records == len(got)
    assert (a.frames, a.foreign, a.supersegs, a.done) == (b.frames, b.foreign, b.supersegs, b.done)
    assert n == (b.frames if count else len(frames))


def _split_cbor(data):
    import io

    f = io.BytesIO(data)
    dec = cbor2.CBORDecoder(f)
    while f.tell() < len(data):
        start = f.tell()
        dec.decode()
        yield data[start:f.tell()]


@pytest.mark.parametrize("lt", [link.LINKTYPE_ETHERNET, link.LINKTYPE_LINUX_SLL,
                                link.LINKTYPE_LINUX_SLL2, link.LINKTYPE_RAW, link.LINKTYPE_NULL])
def test_garbage_frames_never_raise(lt):
    import random

    rnd = random.Random(lt)
    good = _eth(build_tcp(A4, B4, 5000, 80, 1, 0, TH_ACK, payload=b"p" * 100))
    frames = [bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 120)))
              for _ in range(300)]
    frames += [b"\x81\x00" * 40, b"\x08\x00" * 40]
    frames += [good[:n] for n in range(len(good))]  # every truncation, the last one last
    buf = b"".join(frames)
    meta, off = b"", 0
    for f in frames:
        meta += struct.pack("=IIII", 1_700_000_000, 0, off, len(f))
        off += len(f)
    c = cap.Capturer(BufferWriter(), addresses=(B4, B6))
    c.batch(buf, meta, lt)
    assert c.frames == len(frames)
    for f in frames:
        c.frame(f, 0, len(f), lt, TS)


def test_local_addresses_has_loopback():
    addrs = cap.local_addresses()
    assert socket.inet_aton("127.0.0.1") in addrs


# -- command line without a lab ------------------------------------------------------------------
def test_unknown_interface_is_66():
    r = call(["tc-capture", "nosuchif0"])
    assert r.returncode == 66, r.stderr
    assert r.stderr.decode().count("\n") == 1 and b"nosuchif0" in r.stderr


def test_no_interface_is_usage_error():
    r = call(["tc-capture"])
    assert r.returncode == 2 and b"no interface" in r.stderr


def test_version_is_fast_and_imports_nothing_heavy():
    r = subprocess.run([sys.executable, "-X", "importtime", tool_path("tc-capture"), "--version"],
                       capture_output=True, env=tool_env())
    assert r.returncode == 0 and b"tc-capture" in r.stdout
    assert b"pcapy" not in r.stderr and b"dpkt" not in r.stderr


# -- live captures in the lab --------------------------------------------------------------------
def _tool(lab, host, args, **kw):
    return lab.popen(host, [tool_path("tc-capture"), *args], env=tool_env(), **kw)


def _wait_file(path, deadline_s=5.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} stayed empty")


def _tcpdump(lab, host, iface, path, expr="tcp"):
    p = lab.popen(host, ["tcpdump", "--immediate-mode", "-i", iface, "-Q", "in", "-s", "0", "-U", "-w", str(path),
                         expr], stderr=subprocess.PIPE)
    line = p.stderr.readline()  # "listening on ..." once the capture is active
    assert b"listening" in line, line
    return p


def _cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def _stop(p, timeout=10):
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, err.decode()


def _pcap_datagrams(path, local):
    """Inbound TCP datagrams to a local address in a tcpdump file, link layer stripped."""
    out = []
    with open(path, "rb") as f:
        for _ts, frame in dpkt.pcap.Reader(f):
            ip = frame[14:]
            t = parse_tcp(ip)
            if t is not None and t.dst in local:
                out.append(bytes(ip[:t.ip_len]))
    return out


def _pkts(path):
    with open(path, "rb") as f:
        recs = decode(f.read(), headers=True)
    assert recs[0]["t"] == "header"
    return recs[0], [r for r in recs[1:] if r["t"] == "pkt"]


def _by_connection(datagrams) -> dict:
    """{(src, sport, dst, dport): [datagram, ...] in their order}."""
    conns: dict = {}
    for d in datagrams:
        p = parse_tcp(d)
        conns.setdefault((p.src, p.sport, p.dst, p.dport), []).append(d)
    return conns


def _curl(lab, url, n=3):
    """n HTTP GETs from the client host, one connection each (Python, like curl)."""
    code = ("import sys, urllib.request\n"
            f"for _ in range({n}): urllib.request.urlopen(sys.argv[1], timeout=5).read()")
    r = lab.run("client", [sys.executable, "-c", code, url], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["pcap", "afpacket", "ring"])
@pytest.mark.parametrize("iface", ["cli0", "any"])
def test_capture_matches_tcpdump(lab, tmp_path, engine, iface):
    lab.start_server("online", port=8080)
    out = tmp_path / "cap.cbor"
    p = _tool(lab, "online", ["-i", iface, "--engine", engine, "-w", out, "--stats",
                              "--stats-json", tmp_path / "stats.json"], stderr=subprocess.PIPE)
    _wait_file(out)
    td = _tcpdump(lab, "online", "cli0", tmp_path / "td.pcap")
    _curl(lab, f"http://{lab.online_cli_ip}:8080/")
    _curl(lab, f"http://[{lab.online_cli_ip6}]:8080/", n=2)
    time.sleep(0.3)
    rc, err = _stop(p)
    _stop(td)
    assert rc == 0, err
    assert "packets written" in err
    hdr, pkts = _pkts(out)
    assert hdr["tool"] == "tc-capture" and hdr["source"] == iface and hdr["filter"] == ""
    local = {ip_bytes(a) for a in (lab.online_cli_ip, lab.online_cli_ip6)}
    want = _pcap_datagrams(tmp_path / "td.pcap", local)
    got = [r["data"] for r in pkts]
    assert len(want) >= 5 * 6  # five HTTP exchanges
    # each connection's packets, in its order: the order between connections may differ
    # between two capture sockets (packets handed to the taps on two CPUs at once)
    assert _by_connection(got) == _by_connection(want)
    assert all(parse_tcp(d).dport == 8080 for d in got)
    import json

    st = json.loads((tmp_path / "stats.json").read_text())
    assert st["records"] == len(got) and st["kernel_drops"] == 0 and st["exit_status"] == 0
    assert 0 < st["cpu_us_per_packet"] and "µs CPU per packet" in err
    assert all(type(r["ts"]) is int and r["ts"] > 1.6e18 for r in pkts)
    assert sorted(r["ts"] for r in pkts) == [r["ts"] for r in pkts]


@pytest.mark.netns
def test_count_filter_and_stdout(lab):
    lab.start_server("online", port=8080)
    p = _tool(lab, "online", ["cli0", "tcp", "dst", "port", "8080", "-c", "4"],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    label = os.read(p.stdout.fileno(), 12)  # the stream starts once the capture is open
    _curl(lab, f"http://{lab.online_cli_ip}:8080/", n=2)
    out, err = p.communicate(timeout=10)
    out = label + out
    assert p.returncode == 0, err
    hdr, = decode(out, headers=True)[:1]
    assert hdr["filter"] == "tcp dst port 8080"
    pkts = [r for r in decode(out) if r["t"] == "pkt"]
    assert len(pkts) == 4
    assert parse_tcp(pkts[0]["data"]).flags == 0x02  # the first SYN


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["pcap", "afpacket", "ring"])
def test_idle_link_does_not_hold_records_back(lab, engine):
    """One packet on an otherwise idle link reaches the output at once (flush on idle)."""
    p = _tool(lab, "online", ["cli0", "--engine", engine], stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    try:
        fd = p.stdout.fileno()
        head = os.read(fd, 4096)  # label + header, written as soon as the capture is open
        with lab.enter("client"):
            s = socket.socket()
            s.setblocking(False)
            t0 = time.monotonic()
            s.connect_ex((lab.online_cli_ip, 9))  # closed port: one SYN, an RST back
        data = b""
        while time.monotonic() - t0 < 5 and b"pkt" not in data:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                data += os.read(fd, 4096)
        took = time.monotonic() - t0
        s.close()
    finally:
        p.terminate()
        p.communicate(timeout=10)
    recs = decode(head + data)
    assert [parse_tcp(r["data"]).dport for r in recs] == [9]
    assert took < 1.0, f"first record after {took:.3f} s on an idle link"


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["pcap", "ring"])
def test_sigterm_while_idle_exits_0_with_counts(lab, tmp_path, engine):
    out = tmp_path / "cap.cbor"
    p = _tool(lab, "online", ["cli0", "-w", out, "--engine", engine], stderr=subprocess.PIPE)
    _wait_file(out)
    p.send_signal(signal.SIGUSR1)  # counts now; must not leave the idle loop spinning
    time.sleep(0.2)
    cpu0 = _cpu_ticks(p.pid)
    time.sleep(1.0)
    assert _cpu_ticks(p.pid) - cpu0 < 30, "busy while idle"
    t0 = time.monotonic()
    rc, err = _stop(p)
    assert rc == 0 and time.monotonic() - t0 < 2
    assert err.count("0 packets written") == 2 and "dropped by kernel" in err
    assert _pkts(out)[1] == []


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["pcap", "afpacket", "ring"])
def test_no_permission_is_77(lab, engine):
    # As user nobody when this Python and the checkout are reachable for it (not when the
    # interpreter lives under /root); otherwise as root without CAP_NET_RAW/CAP_NET_ADMIN.
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*nobody, sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import cbor2, pcapy, tcpcopylib.cli.capture", str(REPO)],
        capture_output=True, cwd="/")
    drop = nobody if probe.returncode == 0 else [
        "setpriv", "--bounding-set=-net_raw,-net_admin", "--inh-caps=-net_raw,-net_admin"]
    r = lab.run("online", [*drop, sys.executable, tool_path("tc-capture"), "--engine", engine,
                           "cli0"], capture_output=True, env=tool_env(), timeout=30, cwd="/")
    assert r.returncode == 77, (drop, r.stderr)
    assert r.stderr.count(b"\n") == 1


@pytest.mark.netns
def test_bad_filter_is_usage_error(lab):
    r = lab.run("online", [tool_path("tc-capture"), "cli0", "-F", "tcp and prot 80"],
                capture_output=True, env=tool_env(), timeout=30)
    assert r.returncode == 2 and b"filter" in r.stderr


SINK = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 9000)); s.listen(4); s.settimeout(20)
c, _ = s.accept(); c.settimeout(10); n = 0
while True:
    d = c.recv(1 << 16)
    if not d: break
    n += len(d)
c.sendall(str(n).encode()); c.close()
"""


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["pcap", "afpacket", "ring"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_gro_supersegments_are_split(lab, tmp_path, engine, family):
    lab.run("online", ["ethtool", "-K", "cli0", "gro", "on", "rx", "on"], capture_output=True)
    lab.run("client", ["ethtool", "-K", "up0", "tx", "on", "sg", "on", "tso", "on", "gso", "on"],
            capture_output=True)
    lab.start_server("online", [sys.executable, "-c", SINK], port=9000)
    out = tmp_path / "cap.cbor"
    p = _tool(lab, "online", ["cli0", "--engine", engine, "-w", out, "--stats"],
              stderr=subprocess.PIPE)
    _wait_file(out)
    td = _tcpdump(lab, "online", "cli0", tmp_path / "td.pcap", "tcp port 9000")
    data = bytes(range(256)) * 8192  # 2 MiB
    server = lab.online_cli_ip if family == "ipv4" else lab.online_cli_ip6
    client = f"""
import socket
s = socket.create_connection(({server!r}, 9000), timeout=10)
s.sendall(bytes(range(256)) * 8192); s.shutdown(socket.SHUT_WR)
assert s.recv(100) == b"{len(data)}"
"""
    r = lab.run("client", [sys.executable, "-c", client], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    rc, err = _stop(p)
    _stop(td)
    assert rc == 0, err
    local = {ip_bytes(lab.online_cli_ip), ip_bytes(lab.online_cli_ip6)}
    big = [d for d in _pcap_datagrams(tmp_path / "td.pcap", local) if len(d) > 1500]
    assert big, "GRO did not coalesce anything: the test proves nothing"
    _, pkts = _pkts(out)
    segs = [parse_tcp(r["data"]) for r in pkts]
    segs = [t for t in segs if t.dport == 9000]
    assert max(t.ip_len for t in segs) <= 1500
    # every super-segment tcpdump saw arrives as MTU-sized pieces with valid checksums
    starts = {}
    for i, t in enumerate(segs):
        starts.setdefault(t.seq, []).append(i)

    def pieces_ok(i, b):  # segs[i:] start with b's payload in valid pieces
        got = b""
        while len(got) < b.payload_len and i < len(segs):
            t = segs[i]
            if t.seq != (b.seq + len(got)) & 0xFFFFFFFF or not tcp_checksum_ok(t.data):
                return False
            got += t.payload
            i += 1
        return got == b.payload

    for d in big:  # (a retransmission may repeat a seq: any one run must match)
        b = parse_tcp(d)
        assert any(pieces_ok(i, b) for i in starts.get(b.seq, ())), b.seq
    # the whole byte stream reassembles identically with no gaps (by sequence number: two
    # CPUs may hand the capture socket neighbouring super-segments out of order, which
    # tc-session handles like any reordering)
    isn = next(t.seq for t in segs if t.flags & 0x02)
    pieces = {}
    for t in segs:
        if t.payload_len:
            off = (t.seq - isn - 1) & 0xFFFFFFFF
            if len(t.payload) > len(pieces.get(off, b"")):
                pieces[off] = t.payload
    stream, nxt = bytearray(), 0
    for off in sorted(pieces):
        assert off <= nxt, f"gap in the captured stream at byte {nxt}; tc-capture: {err}"
        stream += pieces[off][nxt - off:]
        nxt = max(nxt, off + len(pieces[off]))
    assert bytes(stream) == data
    assert f"{len(big)} super-segments split into" in err or "super-segments split" in err
    assert " 0 super-segments" not in err


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["pcap", "afpacket", "ring"])
@pytest.mark.parametrize("iface", ["lan0", "cli0", "any"])
def test_own_emitted_packets_are_never_captured(lab, tmp_path, engine, iface):
    """Forged client packets sent from the online host (raw IP and AF_PACKET, as tc-emit
    does) towards the target and the client are not captured, even by a filter matching them.
    Positive control, sent between them: packets from the target to the online host arrive on
    lan0 and are captured there (and on "any"), so a capture that records nothing fails."""
    lab.start_server("online", port=8080)
    out = tmp_path / "cap.cbor"
    p = _tool(lab, "online", [iface, "--engine", engine, "-w", out, "-F", "tcp"],
              stderr=subprocess.PIPE)
    _wait_file(out)
    marker = b"FORGED-BY-REPLAY"
    target, client, online = (ip_bytes(a) for a in (lab.target_ip, lab.client_ip, lab.online_ip))
    control = b"FROM-THE-TARGET"
    with lab.enter("online"):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        pk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        pk.bind(("lan0", 0))
    with lab.enter("target"):
        ctl = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for i in range(20):
            fwd = build_tcp(client, target, 40000 + i, 8080, 1000, 1, TH_ACK | TH_PSH,
                            payload=marker)
            raw.sendto(fwd, (lab.target_ip, 0))
            back = build_tcp(online, client, 8080, 40000 + i, 1000, 1, TH_ACK, payload=marker)
            raw.sendto(back, (lab.client_ip, 0))
            mac = lambda s: bytes.fromhex(s.replace(":", ""))  # noqa: E731
            pk.send(mac(lab.target_mac) + mac(lab.online_mac) + b"\x08\x00" + fwd)
            ctl.sendto(build_tcp(target, online, 41000 + i, 8080, 1000, 1, TH_ACK | TH_PSH,
                                 payload=control), (lab.online_ip, 0))
    finally:
        raw.close()
        pk.close()
        ctl.close()
    _curl(lab, f"http://{lab.online_cli_ip}:8080/", n=1)  # the capture does work meanwhile
    time.sleep(0.3)
    rc, err = _stop(p)
    assert rc == 0, err
    _, pkts = _pkts(out)
    assert not [r for r in pkts if marker in r["data"]]
    got_control = sorted(parse_tcp(r["data"]).sport for r in pkts if control in r["data"])
    assert got_control == ([] if iface == "cli0" else list(range(41000, 41020))), got_control
    if iface != "lan0":
        assert len(pkts) >= 5


def test_max_memory_sheds_whole_new_sessions_and_keeps_running_ones():
    w = Collector()
    c = cap.Capturer(w, addresses=(B4, B6), max_rss=1)  # 1 byte: always over the limit
    running = build_tcp(A4, B4, 4000, 80, 10, 1, TH_ACK, payload=b"old")   # began before
    c.refresh(time.monotonic())
    assert c.shedding
    syn = build_tcp(A4, B4, 5000, 80, 1, 0, 0x02)
    data = build_tcp(A4, B4, 5000, 80, 2, 1, TH_ACK, payload=b"new")
    fin = build_tcp(A4, B4, 5000, 80, 5, 1, TH_ACK | 0x01)
    for ip in (running, syn, data, fin):
        c.frame(_eth(ip), 0, len(_eth(ip)), link.LINKTYPE_ETHERNET, TS)
    assert [r["data"] for r in w.recs] == [running]
    assert (c.shed_sessions, c.shed_packets) == (1, 3)
    assert not c.shed_keys  # the FIN ended the shed session
    c.max_rss = 1 << 40      # memory is fine again: new sessions are captured
    c._next_rss_check = 0
    c.refresh(time.monotonic())
    c.frame(_eth(syn), 0, len(_eth(syn)), link.LINKTYPE_ETHERNET, TS)
    assert not c.shedding and w.recs[-1]["data"] == syn


def test_lag_and_kernel_drops_shed_whole_new_sessions():
    w = Collector()
    c = cap.Capturer(w, addresses=(B4, B6), shed_lag_ms=100)
    running = build_tcp(A4, B4, 4000, 80, 10, 1, TH_ACK, payload=b"old")
    syn = build_tcp(A4, B4, 5000, 80, 1, 0, 0x02)
    data = build_tcp(A4, B4, 5000, 80, 2, 1, TH_ACK, payload=b"new")

    def feed(*ips):
        for ip in ips:
            c.frame(_eth(ip), 0, len(_eth(ip)), link.LINKTYPE_ETHERNET, TS)

    now = time.monotonic()
    c.newest_ts = time.time_ns() - 300_000_000  # the frames read were 300 ms old
    c.refresh(now)
    assert c.shedding == "lag"
    feed(running, syn, data)
    assert [r["data"] for r in w.recs] == [running]
    c.newest_ts = time.time_ns() - 70_000_000  # 70 ms: below the limit, above half of it
    c.refresh(now)
    assert c.shedding == "lag"
    c.newest_ts = time.time_ns()                # caught up
    c.refresh(now)
    assert c.shedding is None
    feed(data)                                  # the shed session stays shed
    assert len(w.recs) == 1
    c.drop_seen(now)                            # the kernel dropped: shed for a while
    c.refresh(now)
    assert c.shedding == "capture-drops"
    feed(build_tcp(A4, B4, 5001, 80, 1, 0, 0x02))
    c.refresh(now + cap.DROP_SHED_S)
    assert c.shedding is None
    feed(build_tcp(A4, B4, 5002, 80, 1, 0, 0x02))
    assert len(w.recs) == 2
    assert c.shed_reasons == {"lag": 1, "capture-drops": 1} and c.shed_sessions == 2
    assert c.max_lag >= 300_000_000


def test_batch_reads_how_old_its_newest_frame_is():
    c = cap.Capturer(BufferWriter(), addresses=(B4, B6), shed_lag_ms=100)
    frames = [_eth(build_tcp(A4, B4, 4000, 80, 10 + i, 1, TH_ACK, payload=b"x"))
              for i in range(3)]
    buf, meta = b"", b""
    for i, f in enumerate(frames):
        meta += struct.pack("=IIII", 1_700_000_000 + i, 5, len(buf), len(f))
        buf += f
    c.batch(buf, meta, link.LINKTYPE_ETHERNET)
    assert c.newest_ts == (1_700_000_002) * 1_000_000_000 + 5000
    c.refresh(time.monotonic())
    assert c.shedding == "lag"  # (stamped in 2023: far behind)


# -- the ring engine (TPACKET_V2), in process in the lab ----------------------------------------
def test_ring_geometry_has_equally_spaced_frames():
    """Every block (a page multiple) holds whole frames (multiples of 16), so the ring's
    frames are all frame_size apart: what the strided reads and writes rely on."""
    for frame_bytes in (68, 100, 148, 1518, 9018, 65554, 262144):
        for buffer in (1, 4096, 1 << 20, 32 << 20):
            frame, block, blocks = cap.ring_geometry(frame_bytes, buffer)
            assert frame % cap.TPACKET_ALIGNMENT == 0 and frame >= cap._TP2_NET_AT + frame_bytes
            assert block % 4096 == 0 and block % frame == 0 and blocks >= 1
            assert block * blocks >= buffer
            assert block <= max(frame * 32, 4096)  # (lcm with a page: at most 32 frames)


def _segments(lab, n, sizes=(0, 1, 300, 1400), v6_every=3, dport=8080):
    """n TCP segments client -> online (raw IP datagrams), IPv6 every v6_every-th."""
    out = []
    for i in range(n):
        v6 = v6_every and i % v6_every == v6_every - 1
        src, dst = ((lab.client_ip6, lab.online_cli_ip6) if v6 else
                    (lab.client_ip, lab.online_cli_ip))
        out.append(build_tcp(ip_bytes(src), ip_bytes(dst), 40000 + i % 50, dport, 1000 + i, 1,
                             TH_ACK | TH_PSH, payload=os.urandom(sizes[i % len(sizes)])))
    return out


def _send(lab, datagrams, pause_every=0):
    """Send raw IP datagrams from the client host."""
    with lab.enter("client"):
        s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with s4, s6:
        for i, d in enumerate(datagrams):
            if d[0] >> 4 == 6:
                s6.sendto(d, (socket.inet_ntop(socket.AF_INET6, d[24:40]), 0))
            else:
                s4.sendto(d, (socket.inet_ntop(socket.AF_INET, d[16:20]), 0))
            if pause_every and i % pause_every == pause_every - 1:
                time.sleep(0.001)


def _open(lab, kind, iface, bpf="tcp", host="online", **kw):
    with lab.enter(host):
        return cap.open_engine(kind, iface, bpf, **kw)


def _drain(pairs, want, timeout=5.0):
    """Read every (engine, capturer) until each capturer has ``want`` records (or the
    timeout), waiting in select() as capture_loop does."""
    end = time.monotonic() + timeout
    while True:
        for e, c in pairs:
            while c.records < want and e.read(c):
                pass
        busy = [e.fd for e, c in pairs if c.records < want]
        if not busy or time.monotonic() > end:
            return
        select.select(busy, [], [], 0.05)


def _recs(w):
    return [cbor2.loads(x) for x in _split_cbor(bytes(w.buf))]


def _local(lab):
    return {ip_bytes(a) for a in (lab.online_cli_ip, lab.online_cli_ip6)}


@pytest.mark.netns
@pytest.mark.parametrize("iface", ["cli0", "any"])
def test_ring_gives_the_records_of_pcap(lab, iface):
    """The same traffic through the ring and through libpcap: the same records, at the
    same capture times (the kernel's; libpcap's in microseconds)."""
    engines = [_open(lab, kind, iface) for kind in ("ring", "pcap")]
    writers = [BufferWriter(), BufferWriter()]
    pairs = [(e, cap.Capturer(w, addresses=_local(lab))) for e, w in zip(engines, writers)]
    try:
        sent = _segments(lab, 300)
        _send(lab, sent)
        _drain(pairs, len(sent))
        ring, pcap = (_recs(w) for w in writers)
        assert [r["data"] for r in ring] == [r["data"] for r in pcap] == sent
        # (each socket stamps a packet as it takes it, microseconds apart)
        assert all(abs(r["ts"] - p["ts"]) < 5_000_000 for r, p in zip(ring, pcap))
        assert any(r["ts"] % 1000 for r in ring)  # nanoseconds
        rc = pairs[0][1]
        assert (rc.frames, rc.foreign, rc.truncated) == (len(sent), 0, 0)
        received, dropped, _ = engines[0].kernel_stats()
        # ("any" is open for all from the start: a few frames come before its filter)
        assert dropped == 0 and (received == len(sent) or iface == "any" and received >= 300)
    finally:
        for e in engines:
            e.close()


@pytest.mark.netns
def test_ring_both_ways_reads_loopback_once_and_knows_outgoing(lab):
    """both_ways (--server-half): a local connection on lo gives each packet once (the
    kernel shows AF_PACKET its outgoing and its incoming copy), client and server halves
    as libpcap gives them."""
    port = 8097
    engines = [_open(lab, kind, "lo", f"tcp port {port}", both_ways=True)
               for kind in ("ring", "pcap")]
    writers = [BufferWriter(), BufferWriter()]
    pairs = [(e, cap.Capturer(w, addresses={ip_bytes("127.0.0.1")}, server_half=True,
                              server_ports={struct.pack("!H", port)}))
             for e, w in zip(engines, writers)]
    try:
        assert loopback_exchange(lab, port, b"GET / HTTP/1.0\r\n\r\n",
                                 b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 3000, client_reads=True)
        time.sleep(0.1)
        _drain(pairs, 10 ** 9, timeout=0.5)
    finally:
        for e in engines:
            e.close()
    ring, pcap = ([(r["t"], r["data"]) for r in _recs(w)] for w in writers)
    assert ring == pcap
    assert {t for t, _ in ring} == {"pkt", "s2c"} and len(ring) >= 8
    # the ring was shown every packet twice, and counts the outgoing copies as foreign
    (_, rc), (_, pc) = pairs
    assert rc.frames == 2 * pc.frames and rc.foreign == pc.foreign + pc.frames


@pytest.mark.netns
def test_ring_filter_rejects_in_the_kernel(lab):
    e = _open(lab, "ring", "cli0", "tcp dst port 9")
    w = BufferWriter()
    c = cap.Capturer(w, addresses=_local(lab))
    try:
        _send(lab, _segments(lab, 50))   # to port 8080: the filter rejects them all
        time.sleep(0.2)
        assert e.read(c) == 0 and c.frames == 0
        assert e.kernel_stats()[0] == 0  # never queued
        _send(lab, _segments(lab, 5, dport=9))  # positive control
        _drain([(e, c)], 5)
        assert c.records == 5
    finally:
        e.close()


@pytest.mark.netns
def test_ring_counts_drops_and_recovers(lab):
    """A ring of 32 frames, not read while 100 packets arrive: 32 kept, 68 counted as
    dropped; then it takes packets again."""
    e = _open(lab, "ring", "cli0", snaplen=200, buffer_kib=4)
    assert e.frame_nr == 32, e.describe()
    w = BufferWriter()
    c = cap.Capturer(w, addresses=_local(lab))
    try:
        sent = _segments(lab, 100, sizes=(10,))
        _send(lab, sent)
        time.sleep(0.2)
        _drain([(e, c)], 100, timeout=0.3)
        assert [r["data"] for r in _recs(w)] == sent[:32]
        assert e.drops() == (68, 0) and e.kernel_stats()[:2] == (100, 68)
        more = _segments(lab, 10, sizes=(20,))
        _send(lab, more)
        _drain([(e, c)], 42)
        assert [r["data"] for r in _recs(w)[32:]] == more and e.drops()[0] == 68
    finally:
        e.close()


@pytest.mark.netns
def test_ring_wraps_many_times(lab):
    """3000 packets through a ring of 32 frames, read as they come (sent in bursts that
    fit): every one, in order, none dropped; the ring went round ~90 times."""
    e = _open(lab, "ring", "cli0", snaplen=200, buffer_kib=4)
    w = BufferWriter()
    c = cap.Capturer(w, addresses=_local(lab))
    try:
        sent = _segments(lab, 3000, sizes=(0, 7, 100))
        for i in range(0, len(sent), 20):
            _send(lab, sent[i:i + 20])
            _drain([(e, c)], i + 20)
        got = _recs(w)
        assert [r["data"] for r in got] == sent
        assert e.drops()[0] == 0 and c.frames == len(sent)
        assert all(a["ts"] <= b["ts"] for a, b in zip(got, got[1:]))
    finally:
        e.close()


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["ring", "pcap"])
def test_ring_snaplen_cuts_like_pcap(lab, kind):
    """-s 100: a 1040-byte datagram is kept as its first 86 bytes (after 14 of Ethernet)
    with its length; a short one whole."""
    e = _open(lab, kind, "cli0", snaplen=100)
    w = BufferWriter()
    c = cap.Capturer(w, addresses=_local(lab))
    try:
        big, small = _segments(lab, 2, sizes=(1000, 10), v6_every=0)
        _send(lab, [big, small])
        _drain([(e, c)], 2)
        assert [(r["data"], r.get("len")) for r in _recs(w)] == [(big[:86], len(big)),
                                                                (small, None)]
        assert c.truncated == 1
    finally:
        e.close()


def test_the_stats_line_says_why_sessions_were_shed():
    from tcpcopylib.livecapture import LiveCapture

    live = LiveCapture("tc-capture", "lo")  # (not opened: its counters only)
    live.capturer = c = cap.Capturer(BufferWriter(), addresses=(B4, B6), shed_lag_ms=100)
    c.shed_sessions, c.shed_packets = 3, 7
    c.shed_reasons.update({"lag": 2, "capture-drops": 1})
    assert "3 sessions shed (7 packets; 1 capture-drops; 2 lag)" in live.stats_line()
