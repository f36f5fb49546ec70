"""tc-capture --server-half: the server->client half of the capture as "s2c" records.

The capturer's decision on synthetic frames (which packets are the local servers' answers,
which are the clients' packets, which are neither), on every link type and path; the
listening ports it takes as servers; then, in the namespace lab, a live capture of real
clients and a real server compared connection by connection with tcpdump's capture of the
same interface, and read by tc-diff as the original.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import cbor2
import pytest

from tcpcopylib import capture as cap
from tcpcopylib import link
from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_SYN, build_tcp, ip_bytes, parse_tcp
from tcpcopylib.testing import Collector

CLIENT, HOST, ELSEWHERE = ip_bytes("10.1.0.2"), ip_bytes("10.1.0.1"), ip_bytes("10.9.9.9")
CLIENT6, HOST6 = ip_bytes("fd00::2"), ip_bytes("fd00::1")
LO = ip_bytes("127.0.0.1")
TS = 1_700_000_000_123_456_000
PORT = 80
P80 = PORT.to_bytes(2, "big")


def _eth(ip: bytes) -> bytes:
    et = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    frame = b"\x02" * 6 + b"\x04" * 6 + et + ip
    return frame + bytes(max(0, 60 - len(frame)))


def _sll(ip: bytes, pkttype: int) -> bytes:
    et = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    return struct.pack("!HHH8s", pkttype, 1, 6, b"\x02" * 6) + et + ip


def _capturer(server_half=True, local=(HOST, HOST6, LO), ports=(P80,), **kw):
    w = Collector()
    return cap.Capturer(w, addresses=local, server_half=server_half, server_ports=ports,
                        **kw), w


def _kinds(w):
    return [(r["t"], r["data"]) for r in w.recs]


# a conversation and its neighbours, as the host's link sees them
REQUEST = build_tcp(CLIENT, HOST, 40000, PORT, 1, 0, TH_SYN)
ANSWER = build_tcp(HOST, CLIENT, PORT, 40000, 500, 2, TH_SYN | TH_ACK)
ANSWER6 = build_tcp(HOST6, CLIENT6, PORT, 40000, 900, 3, TH_ACK | TH_PSH, payload=b"hi6")
OWN_CLIENT = build_tcp(HOST, ELSEWHERE, 51000, 443, 7, 0, TH_SYN)  # this host as a client
REMOTE_SERVER = build_tcp(ELSEWHERE, HOST, 443, 51000, 8, 8, TH_SYN | TH_ACK)  # its answer
REPLAYED = build_tcp(CLIENT, ELSEWHERE, 40000, PORT, 1, 0, TH_SYN)  # tc-emit's, to a target
OTHER_PORT = build_tcp(HOST, CLIENT, 22, 40001, 1, 1, TH_ACK | TH_PSH, payload=b"ssh")


def test_answers_of_local_servers_are_s2c_records_the_rest_as_before():
    frames = [REQUEST, ANSWER, ANSWER6, OWN_CLIENT, REMOTE_SERVER, REPLAYED, OTHER_PORT]
    c, w = _capturer()
    for ip in frames:
        f = _eth(ip)
        c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS)
    # REMOTE_SERVER is inbound to a local address: the client half's rule keeps it, as
    # tc-capture always did (a filter narrows that); it is no local server's answer
    assert _kinds(w) == [("pkt", REQUEST), ("s2c", ANSWER), ("s2c", ANSWER6),
                         ("pkt", REMOTE_SERVER)]
    assert (c.records, c.s2c_records, c.foreign, c.frames) == (4, 2, 3, 7)
    # the same frames without --server-half: what tc-capture always wrote
    c, w = _capturer(server_half=False)
    for ip in frames:
        f = _eth(ip)
        c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS)
    assert _kinds(w) == [("pkt", REQUEST), ("pkt", REMOTE_SERVER)] and c.s2c_records == 0


def test_on_loopback_both_ends_are_local_and_the_server_port_decides():
    req = build_tcp(LO, LO, 40000, PORT, 1, 0, TH_ACK | TH_PSH, payload=b"GET /")
    ans = build_tcp(LO, LO, PORT, 40000, 1, 6, TH_ACK | TH_PSH, payload=b"200 OK")
    c, w = _capturer()
    for ip in (req, ans):
        f = _eth(ip)
        c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS)
    assert _kinds(w) == [("pkt", req), ("s2c", ans)]


@pytest.mark.parametrize("server_half", [False, True])
def test_outgoing_frames_are_never_client_packets(server_half):
    """A cooked header's packet type, or the engine's outgoing flag: an answer sent out
    is kept (with --server-half); a packet to a local address that this host sent is not
    a client's (the default drops every outgoing frame, as always)."""
    looped = build_tcp(CLIENT, HOST, 40000, PORT, 1, 0, TH_ACK, payload=b"x")
    c, w = _capturer(server_half)
    for ip, pkttype in ((ANSWER, link.PACKET_OUTGOING), (looped, link.PACKET_OUTGOING),
                        (REQUEST, link.PACKET_HOST), (ANSWER6, link.PACKET_HOST)):
        f = _sll(ip, pkttype)
        c.frame(f, 0, len(f), link.LINKTYPE_LINUX_SLL, TS)
    f = _eth(looped)
    c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS, outgoing=True)
    if server_half:  # (ANSWER6 comes in: loopback through "any")
        assert _kinds(w) == [("s2c", ANSWER), ("pkt", REQUEST), ("s2c", ANSWER6)]
    else:
        assert _kinds(w) == [("pkt", REQUEST)]


def test_s2c_records_are_split_cut_and_counted_like_pkt_records():
    payload = os.urandom(4000)
    big = build_tcp(HOST, CLIENT, PORT, 40000, 100, 1, TH_ACK | TH_PSH, payload=payload)
    c, w = _capturer()
    f = _eth(big)
    c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS)
    assert [r["t"] for r in w.recs] == ["s2c"] * 3 and (c.supersegs, c.split_records) == (1, 3)
    assert b"".join(r["data"][40:] for r in w.recs) == payload  # (IP and TCP headers: 40)
    c, w = _capturer()
    c.frame(f, 0, 14 + 100, link.LINKTYPE_ETHERNET, TS)  # cut by the snap length
    assert w.recs == [{"t": "s2c", "ts": TS, "data": big[:100], "len": len(big)}]
    c, w = _capturer(count=2)  # -c counts both halves
    for ip in (REQUEST, ANSWER, ANSWER6):
        f = _eth(ip)
        c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS)
        if c.done:
            break
    assert len(w.recs) == 2 and c.done


def _batch(frames):
    buf = b"".join(frames)
    meta, off = b"", 0
    for i, f in enumerate(frames):
        meta += struct.pack("=IIII", 1_700_000_000, 10 * i, off, len(f))
        off += len(f)
    return buf, meta


class _BufWriter:
    def __init__(self):
        self.buf, self.records, self.bufsize = bytearray(), 0, 1 << 30

    def write_raw(self, b):
        self.buf += b
        self.records += 1

    def flush(self):
        pass


def _sll_as_sent(ip: bytes) -> bytes:
    """A cooked frame, outgoing if this host (HOST, HOST6) is its source."""
    src = ip[12:16] if ip[0] >> 4 == 4 else ip[8:24]
    return _sll(ip, link.PACKET_OUTGOING if src in (HOST, HOST6) else link.PACKET_HOST)


@pytest.mark.parametrize("lt,wrap", [(link.LINKTYPE_ETHERNET, _eth),
                                     (link.LINKTYPE_LINUX_SLL, _sll_as_sent)],
                         ids=["eth", "sll"])
def test_a_batch_gives_what_frame_by_frame_gives(lt, wrap):
    frames = [wrap(ip) for ip in (REQUEST, ANSWER, OWN_CLIENT, REPLAYED, ANSWER6, OTHER_PORT)]
    buf, meta = _batch(frames)
    wa, wb = _BufWriter(), _BufWriter()
    a = cap.Capturer(wa, addresses=(HOST, HOST6), server_half=True, server_ports=(P80,))
    b = cap.Capturer(wb, addresses=(HOST, HOST6), server_half=True, server_ports=(P80,))
    assert a.batch(buf, meta, lt) == len(frames)
    for i, f in enumerate(frames):
        b.frame(f, 0, len(f), lt, 1_700_000_000_000_000_000 + 10_000 * i)
    assert bytes(wa.buf) == bytes(wb.buf) and wa.records == wb.records == 3
    assert (a.frames, a.foreign, a.s2c_records) == (b.frames, b.foreign, b.s2c_records)
    import io

    dec = cbor2.CBORDecoder(io.BytesIO(bytes(wa.buf)))
    assert [dec.decode()["t"] for _ in range(3)] == ["pkt", "s2c", "s2c"]


def test_a_shed_sessions_answers_are_shed_with_it():
    c, w = _capturer(max_rss=1)
    c.shedding = True  # (over --max-memory: the capturer's own check sets it)
    for ip in (REQUEST, ANSWER):
        f = _eth(ip)
        c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS)
    assert w.recs == [] and (c.shed_sessions, c.shed_packets) == (1, 2)
    c.shedding = False
    fin = build_tcp(CLIENT, HOST, 40000, PORT, 2, 501, TH_FIN | TH_ACK)
    later = build_tcp(HOST, CLIENT, PORT, 40001, 1, 1, TH_ACK, payload=b"other session")
    for ip in (fin, later):
        f = _eth(ip)
        c.frame(f, 0, len(f), link.LINKTYPE_ETHERNET, TS)
    assert _kinds(w) == [("s2c", later)] and c.shed_packets == 3


def test_listening_ports_are_the_servers():
    with socket.socket() as s4, socket.socket(socket.AF_INET6) as s6, \
            socket.socket() as connected_only:
        s4.bind(("127.0.0.1", 0))
        s4.listen()
        s6.bind(("::1", 0))
        s6.listen()
        connected_only.bind(("127.0.0.1", 0))  # bound, not listening: no server
        connected_only.connect(s4.getsockname())
        ports = cap.listening_ports()
        mine = {s4.getsockname()[1], s6.getsockname()[1]}
        assert {p.to_bytes(2, "big") for p in mine} <= ports
        assert connected_only.getsockname()[1].to_bytes(2, "big") not in ports
        assert cap.listening_ports_proc() == ports  # the fallback reads the same


# -- what the other stages do with s2c records --------------------------------------------
OLD = 1_600_000_000 * 10**9  # a capture replayed long after
MS = 1_000_000


def _s2c_stream():
    from tc import stream

    return stream([{"t": "pkt", "ts": OLD, "data": REQUEST},
                   {"t": "s2c", "ts": OLD + MS, "data": ANSWER},
                   {"t": "pkt", "ts": OLD + 2 * MS, "data": build_tcp(
                       CLIENT, HOST, 40000, PORT, 2, 501, TH_ACK | TH_PSH, payload=b"GET /")},
                   {"t": "s2c", "ts": OLD + 3 * MS, "data": ANSWER6},
                   {"t": "stats", "ts": OLD + 3 * MS, "n": 1}], "tc-capture", server_half=True)


def test_tc_session_counts_s2c_records_as_the_server_half_and_passes_none_on():
    """Passed on, their capture times would set a tc-pace downstream against tc-session's
    due times (it would wait years here); they are the capture's other half, which
    tc-session already counts and never sends for a pcap."""
    from tc import call, decode

    r = call(["tc-session", "--target", "10.99.0.1:80", "--no-feedback", "--drain", "0",
              "--stats"], input=_s2c_stream())
    assert r.returncode == 0, r.stderr
    out = decode(r.stdout)
    assert {x["t"] for x in out} == {"pkt", "stats"}  # the stats record passes as before
    assert b"4 in (0 ignored, 2 server->client" in r.stderr


@pytest.mark.netns
def test_tc_emit_never_sends_s2c_records(lab):
    """Piped straight into tc-emit (no tc-session in between), an s2c record is counted
    as an ignored record and never sent; the pkt record beside it is."""
    from tc import stream, tool_path

    client, server = ip_bytes(lab.client_ip), ip_bytes(lab.online_cli_ip)
    target = ip_bytes(lab.target_ip)
    answer = build_tcp(server, client, PORT, 40000, 1, 1, TH_ACK | TH_PSH, payload=b"s2c!")
    to_target = build_tcp(client, target, 40001, 8080, 1, 0, TH_SYN)
    lab.start_server("target", port=8080)
    bpf = f"tcp and host {lab.client_ip}"
    with lab.sniff("online", lab.online_cli_if, bpf) as cli, \
            lab.sniff("online", lab.online_if, bpf) as lan:
        r = lab.run("online", [tool_path("tc-emit"), "--stats"], capture_output=True,
                    timeout=30, input=stream([{"t": "s2c", "ts": 1, "data": answer},
                                              {"t": "pkt", "ts": 2, "data": to_target}]))
        frames = cli.frames(0.3) + lan.frames(0.1)
    assert r.returncode == 0, r.stderr
    assert b"sent 1," in r.stderr and b"ignored records 1" in r.stderr
    sent = [(t.sport, t.dport) for t in map(parse_tcp, (ip for _t, ip in frames)) if t]
    assert (40001, 8080) in sent and (PORT, 40000) not in sent, sent


def test_tc_dump_shows_s2c_records_as_packets_and_writes_them_to_a_pcap():
    from tc import call

    from tcpcopylib.reassembly import capture_packets

    r = call(["tc-dump"], input=_s2c_stream())
    lines = r.stdout.decode().splitlines()
    assert r.returncode == 0 and [x.split()[0] for x in lines[1:5]] == [
        lines[1].split()[0], "s2c", lines[3].split()[0], "s2c"]
    assert "IP 10.1.0.1.80 > 10.1.0.2.40000: Flags [S.]" in lines[2]
    assert "IP6 fd00::1.80 > fd00::2.40000" in lines[4]
    r = call(["tc-dump", "--pcap"], input=_s2c_stream())
    fd = os.memfd_create("pcap")
    os.write(fd, r.stdout)
    os.lseek(fd, 0, os.SEEK_SET)
    assert [ip for _ts, ip in capture_packets(fd, "pcap")] == [REQUEST, ANSWER, build_tcp(
        CLIENT, HOST, 40000, PORT, 2, 501, TH_ACK | TH_PSH, payload=b"GET /"), ANSWER6]
    os.close(fd)


def test_tc_diff_takes_a_server_half_stream_as_the_original(tmp_path):
    """The synthetic scenario of test_diff, its original written as tc-capture
    --server-half writes it: the same verdicts as from the pcap; a stream with the client
    half only is refused with a one-line reason (65)."""
    import json

    from diffdata import write_stream
    from tc import run
    from test_diff import _scenario
    from tcpcopylib.reassembly import file_packets

    args = _scenario(tmp_path)
    server = ip_bytes("10.0.0.2")
    both, client_only = [], []
    for ts, ip in file_packets(str(args[0])):
        rec = {"t": "s2c" if ip[12:16] == server else "pkt", "ts": ts, "data": ip}
        both.append(rec)
        if rec["t"] == "pkt":
            client_only.append(rec)
    write_stream(tmp_path / "both.cbor", both, tool="tc-capture")
    write_stream(tmp_path / "client.cbor", client_only, tool="tc-capture")
    want = run(["tc-diff", *args])
    got = run(["tc-diff", tmp_path / "both.cbor", *args[1:]])
    assert want.returncode == got.returncode == 0, got.stderr
    lines = [json.loads(x) for x in got.stdout.decode().splitlines()]
    assert len(lines) == 12 and got.stdout == want.stdout
    r = run(["tc-diff", tmp_path / "client.cbor", *args[1:]])
    assert r.returncode == 65 and b"--server-half" in r.stderr and r.stderr.count(b"\n") == 1


# -- the lab: real clients, a real server, tcpdump beside ---------------------------------
@pytest.mark.netns
@pytest.mark.parametrize("engine", ["pcap", "afpacket", "ring"])
@pytest.mark.parametrize("iface", ["cli0", "any"])
def test_live_server_half_equals_tcpdump_connection_by_connection(lab, tmp_path, engine, iface):
    import subprocess

    import replay_harness as h
    from tc import decode, tool_env, tool_path
    from tcpcopylib.reassembly import connections_from_file

    port = 8099
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "page.html").write_bytes(os.urandom(3000).hex().encode())  # 4 MSS
    lab.start_server("online", port=port, directory=tmp_path / "www")
    stream = tmp_path / "orig.cbor"
    capture = lab.popen("online", [tool_path("tc-capture"), iface, f"tcp port {port}",
                                   "--server-half", "--engine", engine, "-w", stream],
                        env=tool_env(), stderr=subprocess.PIPE)
    td = h.start_tcpdump(lab, "online", "cli0", tmp_path / "tcpdump.pcap", port)
    try:
        deadline = time.monotonic() + 5
        while not (stream.exists() and stream.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.02)  # the header is written once the capture is open
        for path, code in (("page.html", "200"), ("", "200"), ("missing", "404")):
            for _ in range(3):
                r = lab.run("client", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       f"http://{lab.online_cli_ip}:{port}/{path}"],
                            capture_output=True, text=True, timeout=30)
                assert r.stdout == code, r
    finally:
        h.stop_tcpdump(td)  # (waits for the last packets first)
        capture.send_signal(signal.SIGINT)
        _, err = capture.communicate(timeout=20)
    assert capture.returncode == 0, err
    assert b"server to client" in err
    recs = decode(stream.read_bytes(), headers=True)
    assert recs[0]["t"] == "header" and recs[0]["server_half"] is True
    assert {r["t"] for r in recs[1:]} == {"pkt", "s2c"}
    for r in recs[1:]:  # every s2c record is from the server's port, every pkt to it
        sport, dport = struct.unpack_from("!HH", r["data"], (r["data"][0] & 15) * 4)
        assert (sport if r["t"] == "s2c" else dport) == port, r
    mine = {c.key: c for c in connections_from_file(stream, [port], kinds=("pkt", "s2c"))}
    theirs = {c.key: c for c in connections_from_file(tmp_path / "tcpdump.pcap", [port])}
    assert len(mine) == 9 and mine.keys() == theirs.keys()
    for key, c in mine.items():
        t = theirs[key]
        assert c.c2s.bytes == t.c2s.bytes and c.s2c.bytes == t.s2c.bytes, key
        assert c.c2s.fin and c.s2c.fin and len(c.s2c.bytes) > 100, key
    assert sum(len(c.s2c.bytes) > 6000 for c in mine.values()) == 3  # page.html, 3 times


@pytest.mark.netns
def test_a_live_run_compared_as_it_goes_has_no_differences(lab, tmp_path):
    """The issue's live use: tc-capture --server-half | tee orig.cbor | tc-session
    --sessions map.cbor | tc-pace | tc-emit while real clients talk to a real server, the
    target (the same server and files) answering through tc-intercept --payload all; then
    tc-diff orig.cbor: every exchange the same (Date at most is noise), none missing."""
    import json

    import replay_harness as h
    from tc import decode, run

    port = h.PORT
    www = tmp_path / "www"
    www.mkdir()
    for i in range(4):
        (www / f"f{i}.txt").write_bytes(b"file %d\n" % i * (200 + 900 * i))
    lab.start_server("target", port=port, directory=www)
    lab.start_server("online", port=port, directory=www)
    orig, m, replies = tmp_path / "orig.cbor", tmp_path / "map.cbor", tmp_path / "replies.cbor"
    live = h.start_live(lab, tmp_path / "live", port, tee=orig,
                        capture_args=["--server-half"], capture_filter=f"tcp port {port}",
                        session_args=["--sessions", m], replies=replies)
    try:
        for rnd in range(3):
            for i in range(4):
                r = lab.run("client", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       f"http://{lab.online_cli_ip}:{port}/f{i}.txt"],
                            capture_output=True, text=True, timeout=30)
                assert r.stdout == "200", r
        time.sleep(1.0)  # the last replayed answers come back
    finally:
        live.stop()
    assert live.rc("tc-session") == 0, live.diagnostics()
    r = run(["tc-diff", orig, "-s", m, "-t", replies], timeout=120)
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert r.returncode == 0 and len(lines) == 12, r.stderr
    assert {x["verdict"] for x in lines} == {"same"}, r.stderr
    assert all(x["latency_ms"]["original"]["last"] is not None for x in lines)
    assert {d["field"] for x in lines for d in x["noise"]} <= {"header:date"}  # (a new second)
    # tc-session read the server half from the tee'd stream, counted it, sent none of it
    s2c = sum(1 for rec in decode(orig.read_bytes()) if rec["t"] == "s2c")
    assert s2c >= 12 * 4 and live.stats["pkts_server"] == s2c, live.stats
