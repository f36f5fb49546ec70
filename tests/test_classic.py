"""The classic protocol of tcpcopy 1.3 / intercept 1.0 (tcpcopylib.classic), both ends,
against fake peers written from the specification (reference/classic-wire.md), byte for
byte: its test plan (section 6), point by point, is marked "plan N" below.

tcpcopy role: tc-session --feedback classic:HOST:PORT / ClassicFeedbackClient against a
fake intercept (a listening socket here). intercept role: tc-feedback --classic against
a fake tcpcopy (a plain socket here); tc-feedback reads fb records from a pipe we feed.
No root."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time

import cbor2
import pytest

import tc
from tcpcopylib import classic
from tcpcopylib.errors import UnavailableError
from tcpcopylib.feedback import FeedbackClient, reply_key
from tcpcopylib.packet import build_tcp, ip_bytes, parse_tcp_fast
from tcpcopylib.records import encode_section

# The specification's example: client 10.0.0.5:40000, target 192.168.0.2:8080
CLIENT, CPORT = ip_bytes("10.0.0.5"), 40000
TARGET, TPORT = ip_bytes("192.168.0.2"), 8080
HANDSHAKE_HEX = "00000000" "0000" "0006" "00000000" "0000"   # plan 1
ADD_HEX = "0a000005" "9c40" "0001" "c0a80002" "1f90"          # plan 2
MSS = b"\x02\x04\x05\xb4"   # the MSS option: a SYN-ACK's TCP header of 24 bytes (doff 6)
SYN, RST, ACK, PSH = 0x02, 0x04, 0x10, 0x08


def spec_msg(cip: bytes, cport: int, kind: int, tip: bytes, tport: int) -> bytes:
    """A 14-byte message as the specification lays it out (section 2), written here
    independently of tcpcopylib.classic."""
    return cip + struct.pack("!H", cport) + struct.pack(">H", kind) + tip + \
        struct.pack("!H", tport)


def spec_frames(stream: bytes) -> list:
    """Combined frames (section 3.2) -> [[64-byte record, ...], ...]; asserts whole."""
    frames, pos = [], 0
    while pos < len(stream):
        (count,) = struct.unpack_from(">H", stream, pos)
        assert 1 <= count <= 16, count
        body = stream[pos + 2:pos + 2 + 64 * count]
        assert len(body) == 64 * count, "a frame cut short"
        frames.append([body[i:i + 64] for i in range(0, len(body), 64)])
        pos += 2 + 64 * count
    return frames


def reply(flags=SYN | ACK, options=MSS, payload=b"", cport=CPORT, client=CLIENT, seq=7000,
          ack=1001):
    """The target's reply to the client (a SYN-ACK with MSS by default)."""
    return build_tcp(TARGET, client, TPORT, cport, seq, ack, flags, 29200, options, payload)


def fb(d, length=None):
    return {"t": "fb", "ts": time.time_ns(), "data": d, "len": len(d) if length is None
            else length}


def decode_partial(data: bytes) -> list:
    """The complete records at the start of a stream that is still being written."""
    try:
        return tc.decode(data)
    except Exception:  # noqa: BLE001 - cut inside a record: try again with more
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_until(sock, n: int, timeout: float = 5.0) -> bytes:
    """At least n bytes (or what came before the timeout or EOF)."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if select.select([sock], [], [], 0.05)[0]:
            part = sock.recv(65536)
            if not part:
                break
            got += part
    return got


def quiet_recv(sock, wait: float = 0.3) -> bytes:
    """What arrives within `wait` seconds (b"" if nothing)."""
    return recv_until(sock, 1 << 30, wait)


def closed(sock, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.05)[0]:
            try:
                if sock.recv(65536) == b"":
                    return True
            except ConnectionResetError:
                return True
    return False


# -- the message and record layouts --------------------------------------------------------

def test_message_layouts_are_the_specifications():
    assert classic.HANDSHAKE.hex() == HANDSHAKE_HEX and len(classic.HANDSHAKE) == 14
    add = classic.client_add(CLIENT, CPORT, TARGET, TPORT)
    assert add.hex() == ADD_HEX
    assert add == spec_msg(CLIENT, CPORT, 1, TARGET, TPORT)
    assert classic.encode_msg(2, CLIENT, CPORT, TARGET, TPORT) == \
        spec_msg(CLIENT, CPORT, 2, TARGET, TPORT)
    assert classic.decode_msg(add) == (CLIENT, CPORT, 1, TARGET, TPORT)
    assert classic.is_handshake(classic.HANDSHAKE) and not classic.is_handshake(add)
    assert classic.msg_type(classic.HANDSHAKE) == 6 and classic.msg_type(add) == 1
    # the replies an ADD asks for: the reply's own routing key
    assert classic.msg_route_key(add) == reply(ACK)[12:24]


def test_record_of_a_syn_ack_is_66_bytes_framed():   # plan 3 (the encoding)
    d = reply()
    assert d[:4] == bytes.fromhex("4500002c") and (d[32] >> 4) == 6
    rec = classic.encode_record(d)
    assert rec == d[:20] + d[20:44] + bytes(20)
    frame = classic.encode_frames([rec])
    assert frame == b"\x00\x01" + d[:44] + bytes(20) and len(frame) == 66


def test_record_cuts_the_tcp_header_at_44_bytes_and_keeps_tot_len():   # plan 9
    opts = bytes.fromhex("0101080a0000000100000002") + b"\x01" * 28  # 40 bytes of options
    d = reply(ACK | PSH, opts, b"x" * 100)
    assert (d[32] >> 4) * 4 == 60
    rec = classic.encode_record(d)
    assert rec == d[:64] and len(rec) == 64          # IP 20 + the first 44 TCP bytes
    assert struct.unpack_from("!H", rec, 2)[0] == 20 + 60 + 100
    # what tc-session reads of it: the header padded back out, payload length from tot_len
    p = parse_tcp_fast(classic.record_datagram(rec))
    assert p is not None and p[10] == 100 and p[7] == 60
    # a 100-byte reply with a plain header: tot_len 20 + doff*4 + 100, payload absent
    d = reply(ACK | PSH, b"", b"y" * 100)
    rec = classic.encode_record(d)
    assert struct.unpack_from("!H", rec, 2)[0] == 20 + 20 + 100
    assert rec[40:] == bytes(24)
    assert parse_tcp_fast(classic.record_datagram(rec))[10] == 100
    # a datagram cut after its headers (tc-intercept without payload) with its length
    assert classic.encode_record(d[:40], 140) == rec
    # tot_len not filled in by the capture: the length is written into it
    zeroed = d[:2] + b"\0\0" + d[4:]
    assert classic.encode_record(zeroed[:40], 140) == rec


def test_record_of_what_has_no_classic_form():
    assert classic.encode_record(build_tcp(ip_bytes("2001:db8::5"), ip_bytes("2001:db8::1"),
                                           80, 1000, 1, 2, ACK)) is None
    assert classic.encode_record(reply()[:39]) is None
    udp = bytearray(reply())
    udp[9] = 17
    assert classic.encode_record(bytes(udp)) is None


def test_frames_hold_at_most_16_records_in_order():
    recs = [classic.encode_record(reply(ACK, b"", cport=1000 + i)) for i in range(40)]
    frames = spec_frames(classic.encode_frames(recs))
    assert [len(f) for f in frames] == [16, 16, 8]
    assert [r for f in frames for r in f] == recs


# -- FrameReader: the tcpcopy side's reassembly ---------------------------------------------

def test_frame_reader_any_split_and_counts_1_to_16():   # plan 4 (receiver)
    recs = [classic.encode_record(reply(ACK, b"", cport=2000 + i)) for i in range(16)]
    stream = b"".join(struct.pack(">H", n) + b"".join(recs[:n]) for n in (1, 16, 5))
    want = recs[:1] + recs + recs[:5]
    for step in (1, 2, 13, 64, 66, 1000, len(stream)):
        r = classic.FrameReader()
        got = []
        for i in range(0, len(stream), step):
            got += r.feed(stream[i:i + step])
        assert got == want, step
        assert r.frames == 3 and r.pending_bytes == 0


def test_frame_reader_refuses_count_17_and_0():   # plan 4: 17 closes the connection
    rec = classic.encode_record(reply())
    with pytest.raises(classic.ClassicError, match="17 records"):
        classic.FrameReader().feed(struct.pack(">H", 17) + rec * 17)
    with pytest.raises(classic.ClassicError, match="0 records"):
        classic.FrameReader().feed(b"\x00\x00")


def test_payload_and_uncombined_builds_are_reported_incompatible():   # plan 10
    d = reply(ACK | PSH, b"", b"z" * 10)
    rec = classic.encode_record(d)
    # an intercept built --with-resp-payload: 192-byte records (headers, payload, zeros)
    big = (d + bytes(192))[:192]
    payload_stream = struct.pack(">H", 1) + big + struct.pack(">H", 2) + big * 2
    with pytest.raises(classic.ClassicError, match="with-resp-payload"):
        classic.FrameReader().feed(payload_stream)
    # the same for a SYN-ACK (no payload: the record is zeros after its headers)
    syn_ack = (reply() + bytes(192))[:192]
    with pytest.raises(classic.ClassicError):
        classic.FrameReader().feed(struct.pack(">H", 1) + syn_ack + struct.pack(">H", 1)
                                   + syn_ack)
    # --disable-combined: bare records (the "count" is 0x4500)
    with pytest.raises(classic.ClassicError, match="disable-combined"):
        classic.FrameReader().feed(rec * 3)


def test_parse_classic_address():
    assert classic.parse_classic_address("classic:127.0.0.1") == \
        (socket.AF_INET, ("127.0.0.1", 36524))
    assert classic.parse_classic_address("classic:127.0.0.1:4000")[1] == ("127.0.0.1", 4000)
    assert classic.parse_classic_address("classic:[::1]:4000")[1][:2] == ("::1", 4000)
    for bad in ("classic:", "classic:1.2.3.4:0", "classic:1.2.3.4:x", "classic:[::1]x"):
        with pytest.raises(Exception, match="classic"):
            classic.parse_classic_address(bad)


# -- tcpcopy role: ClassicFeedbackClient / tc-session against a fake intercept ---------------

@pytest.fixture
def fake_intercept():
    """A listening socket on loopback: the fake intercept (accept() it yourself)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    yield ls
    ls.close()


def accept(ls, timeout=5.0):
    ls.settimeout(timeout)
    conn, _ = ls.accept()
    conn.settimeout(None)
    return conn


def test_client_handshake_and_add_bytes(fake_intercept):   # plans 1 and 2
    port = fake_intercept.getsockname()[1]
    c = classic.ClassicFeedbackClient(f"classic:127.0.0.1:{port}")
    c.connect(timeout=5)   # returns without any answer (intercept never answers)
    conn = accept(fake_intercept)
    try:
        assert recv_until(conn, 14).hex() == HANDSHAKE_HEX
        c.claim(CLIENT, CPORT, TARGET, TPORT)
        c.claim(CLIENT, CPORT + 1, TARGET, TPORT)
        c.release(CLIENT, CPORT + 1, TARGET, TPORT)   # sends nothing
        c.flush()
        got = recv_until(conn, 28)
        assert got.hex() == ADD_HEX + spec_msg(CLIENT, CPORT + 1, 1, TARGET, TPORT).hex()
        assert quiet_recv(conn, 0.2) == b""
        # an IPv6 session has no classic form: nothing sent, counted
        c.claim(ip_bytes("2001:db8::1"), 5, ip_bytes("2001:db8::2"), 80)
        c.flush()
        assert quiet_recv(conn, 0.2) == b"" and c.unroutable == 1
        # the records it reads are the reply headers tc-session's engine reads
        d = reply()
        conn.sendall(b"\x00\x01" + d[:44] + bytes(20))
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            select.select([c], [], [], 0.05)
            got += c.read_replies()
        assert len(got) == 1 and got[0][1] is None
        assert parse_tcp_fast(got[0][0]) == parse_tcp_fast(d)
        assert reply_key(got[0][0]) == (CLIENT, CPORT, TARGET, TPORT)
    finally:
        c.close()
        conn.close()


def test_client_count_17_closes_and_reports(fake_intercept):   # plans 4 and 10
    port = fake_intercept.getsockname()[1]
    c = classic.ClassicFeedbackClient(f"classic:127.0.0.1:{port}")
    c.connect(timeout=5)
    conn = accept(fake_intercept)
    try:
        conn.sendall(struct.pack(">H", 17) + classic.encode_record(reply()) * 17)
        with pytest.raises(classic.ClassicError, match="17 records"):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                select.select([c], [], [], 0.05)
                c.read_replies()
        assert c.sock is None   # closed
        assert closed(conn)
    finally:
        c.close()
        conn.close()


def test_client_reconnects_with_a_fresh_handshake_and_its_adds(fake_intercept):   # plan 8
    port = fake_intercept.getsockname()[1]
    c = classic.ClassicFeedbackClient(f"classic:127.0.0.1:{port}")
    c.connect(timeout=5)
    first = accept(fake_intercept)
    try:
        c.claim(CLIENT, CPORT, TARGET, TPORT)
        c.flush()
        assert recv_until(first, 28).hex() == HANDSHAKE_HEX + ADD_HEX
        first.close()   # intercept went away
        with pytest.raises(UnavailableError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                select.select([c], [], [], 0.05)
                c.read_replies()
        assert c.reconnect(timeout=5) == 1
        second = accept(fake_intercept)
        assert recv_until(second, 28).hex() == HANDSHAKE_HEX + ADD_HEX
        second.close()
    finally:
        c.close()


def test_tc_session_without_intercept_exits_69(tmp_path):   # plan 8 (no listener)
    port = free_port()
    syn = build_tcp(CLIENT, ip_bytes("10.1.1.1"), CPORT, TPORT, 1000, 0, SYN)
    r = tc.run([tc.tool_path("tc-session"), "--target", f"192.168.0.2:{TPORT}",
                "--feedback", f"classic:127.0.0.1:{port}"],
               input=tc.stream([{"t": "pkt", "ts": 1, "data": syn}]), timeout=30)
    assert r.returncode == 69, r.stderr
    assert b"classic intercept" in r.stderr


def test_tc_session_sends_the_add_before_the_syn(fake_intercept, tmp_path):   # plan 2
    """tc-session --feedback classic: the ADD of a replayed connection carries the
    replayed client (here -c's) and the target, and is on the intercept's socket before
    the SYN leaves tc-session."""
    port = fake_intercept.getsockname()[1]
    syn = build_tcp(ip_bytes("10.9.0.1"), ip_bytes("10.1.1.1"), 5555, TPORT, 1000, 0, SYN,
                    options=MSS)
    inp = tmp_path / "in.cbor"
    inp.write_bytes(tc.stream([{"t": "pkt", "ts": 1, "data": syn}]))
    p = subprocess.Popen([tc.tool_path("tc-session"), "--target", f"192.168.0.2:{TPORT}",
                          "-c", "10.0.0.5", "--feedback", f"classic:127.0.0.1:{port}",
                          "--drain", "0.5", "--connect-timeout", "0.3", str(inp)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
    try:
        conn = accept(fake_intercept)
        out = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                r["t"] == "pkt" for r in decode_partial(out)):
            if select.select([p.stdout], [], [], 0.05)[0]:
                out += os.read(p.stdout.fileno(), 65536)
        conn.setblocking(False)
        sent = conn.recv(65536)   # already there when the SYN left tc-session
        conn.setblocking(True)
        assert sent[:14].hex() == HANDSHAKE_HEX
        assert len(sent) == 28
        cip, cport, kind, tip, tport = struct.unpack("!4sHH4sH", sent[14:])
        assert (cip, kind, tip, tport) == (CLIENT, 1, TARGET, TPORT)
        out += p.stdout.read()
        assert p.wait(30) == 0, p.stderr.read()
        pkts = [r for r in tc.decode(out) if r["t"] == "pkt"]
        first = parse_tcp_fast(pkts[0]["data"])
        assert first[8] == SYN and first[3] == cport and first[0] == CLIENT
        conn.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_tc_session_reports_a_payload_intercept_and_exits_76(fake_intercept, tmp_path):
    """plan 10 end to end: the fake intercept answers the SYN's ADD with a frame of a
    --with-resp-payload build (192-byte records): tc-session stops with exit 76 and says
    why, instead of reading records out of step."""
    port = fake_intercept.getsockname()[1]
    syn = build_tcp(CLIENT, ip_bytes("10.1.1.1"), CPORT, TPORT, 1000, 0, SYN, options=MSS)
    inp = tmp_path / "in.cbor"
    inp.write_bytes(tc.stream([{"t": "pkt", "ts": 1, "data": syn}]))
    p = subprocess.Popen([tc.tool_path("tc-session"), "--target", f"192.168.0.2:{TPORT}",
                          "--feedback", f"classic:127.0.0.1:{port}", "--drain", "10",
                          str(inp)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=tc.tool_env())
    try:
        conn = accept(fake_intercept)
        assert len(recv_until(conn, 28)) == 28   # handshake + ADD
        big = (reply() + bytes(192))[:192]
        conn.sendall(struct.pack(">H", 1) + big + struct.pack(">H", 1) + big)
        assert p.wait(30) == 76
        assert b"with-resp-payload" in p.stderr.read()
        conn.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_tc_session_classic_refuses_a_key(tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    r = tc.run([tc.tool_path("tc-session"), "--target", "192.168.0.2:80", "--feedback",
                "classic:127.0.0.1", "--key", str(key)], input=tc.stream([]), timeout=30)
    assert r.returncode == 2 and b"classic" in r.stderr


# -- intercept role: tc-feedback --classic against a fake tcpcopy ----------------------------

class ClassicServer:
    """tc-feedback --classic on a loopback port (and its native listener on a Unix socket),
    fed fb records through a pipe we hold open."""

    def __init__(self, tmp_path, *opts):
        self.port = free_port()
        self.native = "unix:" + str(tmp_path / "fb.sock")
        self.p = subprocess.Popen(
            [tc.tool_path("tc-feedback"), "--listen", self.native, "--classic",
             f"tcp:127.0.0.1:{self.port}", "--stats", "-v", "--hold-ms", "5000", *opts],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
        self.p.stdin.write(encode_section({"t": "header", "v": 1, "tool": "test"}))
        self.p.stdin.flush()
        self.socks = []

    def tcpcopy(self, handshake=classic.HANDSHAKE) -> socket.socket:
        """A fake tcpcopy connection: connect, then its first message."""
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket()
            try:
                s.connect(("127.0.0.1", self.port))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or self.p.poll() is not None:
                    raise
                time.sleep(0.02)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if handshake:
            s.sendall(handshake)
        self.socks.append(s)
        return s

    def send(self, *datagrams):
        self.p.stdin.write(b"".join(cbor2.dumps(fb(d)) for d in datagrams))
        self.p.stdin.flush()

    def finish(self, timeout=15):
        self.p.stdin.close()
        rc = self.p.wait(timeout)
        return rc, self.p.stderr.read().decode()

    def kill(self):
        for s in self.socks:
            s.close()
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def cserver(tmp_path):
    made = []

    def start(*opts):
        s = ClassicServer(tmp_path, *opts)
        made.append(s)
        return s

    yield start
    for s in made:
        s.kill()


def add(sock, cport=CPORT, client=CLIENT, kind=1):
    sock.sendall(spec_msg(client, cport, kind, TARGET, TPORT))


def records_of(sock, n, timeout=5.0) -> list:
    """n records read from the fake tcpcopy's socket, frame by frame (asserts whole
    frames of 1..16)."""
    stream = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frames = spec_frames(stream)
            if sum(map(len, frames)) >= n:
                break
        except AssertionError:
            pass   # a frame not all there yet
        if select.select([sock], [], [], 0.05)[0]:
            part = sock.recv(65536)
            if not part:
                break
            stream += part
    return [r for f in spec_frames(stream) for r in f]


_probes = iter(range(60000, 65000))


def settle(srv, sock):
    """Until tc-feedback has handled what the fake tcpcopy sent on sock and every reply
    sent to its input so far: a probe connection is added on sock and a SYN-ACK for it
    sent to the input; each is handled in order, and the probe's record (held until its
    add, if need be) comes back only once both are in."""
    port = next(_probes)
    add(sock, port)
    srv.send(reply(cport=port))
    recs = records_of(sock, 1, timeout=15)
    assert [struct.unpack_from("!H", r, 22)[0] for r in recs] == [port], recs


def test_server_syn_ack_record_byte_exact(cserver):   # plan 3
    srv = cserver()
    s = srv.tcpcopy()
    add(s)
    settle(srv, s)
    d = reply()
    srv.send(d)
    got = recv_until(s, 66)
    assert got == b"\x00\x01" + d[:20] + d[20:44] + bytes(20)
    assert quiet_recv(s, 0.2) == b""


def test_server_frames_many_replies_in_order(cserver):   # plan 4 (sender)
    srv = cserver()
    s = srv.tcpcopy()
    add(s)
    settle(srv, s)
    replies = [reply(ACK | PSH, b"", bytes([i]) * (i + 1), seq=9000 + i) for i in range(50)]
    srv.send(*replies)
    recs = records_of(s, 50)
    assert recs == [classic.encode_record(d) for d in replies]
    # tot_len tells each reply's length (plan 9)
    assert [struct.unpack_from("!H", r, 2)[0] for r in recs] == [40 + i + 1 for i in range(50)]


def test_server_version_other_than_6_only_warned(cserver):   # plan 1 (server side)
    srv = cserver()
    s = srv.tcpcopy(handshake=classic.encode_msg(5, bytes(4), 0, bytes(4), 0))
    add(s)
    settle(srv, s)
    srv.send(reply())
    assert len(records_of(s, 1)) == 1
    s.close()
    rc, err = srv.finish()
    assert rc == 0 and "classic version 5" in err


def test_server_race_syn_ack_and_rst_held_ack_and_data_not(cserver):   # plan 5
    srv = cserver()
    s = srv.tcpcopy()
    syn_ack, rst = reply(), reply(RST | ACK, b"", cport=CPORT + 1)
    stale_ack = reply(ACK, b"", cport=CPORT + 2)
    stale_data = reply(ACK | PSH, b"", b"old", cport=CPORT + 3)
    srv.send(syn_ack, rst, stale_ack, stale_data)
    settle(srv, s)   # handled (held) before any ADD of theirs
    for port in (CPORT, CPORT + 1, CPORT + 2, CPORT + 3):
        add(s, port)
    recs = records_of(s, 2)
    assert sorted(recs) == sorted([classic.encode_record(syn_ack), classic.encode_record(rst)])
    settle(srv, s)   # (every ADD handled: the stale replies were dropped, not delivered)
    assert quiet_recv(s, 0.2) == b""
    # routed now: later replies of the same connections are delivered
    srv.send(stale_ack)
    assert records_of(s, 1) == [classic.encode_record(stale_ack)]


def test_server_route_moves_and_del_and_unknown_change_nothing(cserver):   # plan 6
    srv = cserver()
    a, b = srv.tcpcopy(), srv.tcpcopy()
    add(a)
    settle(srv, a)
    srv.send(reply(ACK, b"", seq=1))
    assert len(records_of(a, 1)) == 1
    add(b)   # the same connection added on B: B gets its replies from now on
    settle(srv, b)
    srv.send(reply(ACK, b"", seq=2))
    got = records_of(b, 1)
    assert [struct.unpack_from("!I", r, 24)[0] for r in got] == [2]
    assert quiet_recv(a, 0.2) == b""
    add(a, kind=2)   # CLIENT_DEL: no effect (intercept only logs it)
    add(a, kind=9)   # an unknown type: ignored
    settle(srv, a)
    srv.send(reply(ACK, b"", seq=3))
    assert [struct.unpack_from("!I", r, 24)[0] for r in records_of(b, 1)] == [3]
    assert quiet_recv(a, 0.2) == b""
    for sock in (a, b):
        sock.close()
    rc, err = srv.finish()
    assert rc == 0 and "2 other messages ignored" in err and "1 moved" in err, err


def test_server_closes_on_a_first_message_without_version(cserver):   # plan 7
    srv = cserver()
    s = srv.tcpcopy(handshake=spec_msg(CLIENT, CPORT, 1, TARGET, TPORT))
    assert closed(s)
    # a fresh connection is served
    s2 = srv.tcpcopy()
    add(s2)
    settle(srv, s2)
    srv.send(reply())
    assert len(records_of(s2, 1)) == 1


def test_server_end_closes_classic_connections(cserver):   # plan 8 (tcpcopy then exits)
    srv = cserver("--drain-s", "0.2")
    s = srv.tcpcopy()
    add(s)
    settle(srv, s)
    srv.p.stdin.close()
    assert closed(s, 15)
    assert srv.p.wait(15) == 0


def test_server_handshake_timeout_bounded(cserver):
    srv = cserver("--auth-timeout", "0.3")
    s = srv.tcpcopy(handshake=b"")   # connects, says nothing
    assert closed(s, 5)


def test_server_half_message_waits_for_the_rest(cserver):
    srv = cserver()
    s = srv.tcpcopy(handshake=classic.HANDSHAKE[:5])
    time.sleep(0.1)
    s.sendall(classic.HANDSHAKE[5:] + spec_msg(CLIENT, CPORT, 1, TARGET, TPORT)[:9])
    time.sleep(0.1)
    s.sendall(spec_msg(CLIENT, CPORT, 1, TARGET, TPORT)[9:])
    settle(srv, s)
    srv.send(reply())
    assert len(records_of(s, 1)) == 1


def native_replies(client, n, timeout=10.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        select.select([client], [], [], 0.05)
        got += client.read_replies()
    return got


def test_classic_and_native_clients_each_get_only_their_own(cserver):
    srv = cserver()
    t1, t2 = srv.tcpcopy(), srv.tcpcopy()
    native = FeedbackClient(srv.native, name="native")
    native.connect(timeout=5)
    try:
        add(t1, 1001)
        add(t2, 2001)
        add(t2, 2002)
        native.claim(CLIENT, 3001, TARGET, TPORT)
        native.flush()
        settle(srv, t1)
        settle(srv, t2)
        srv.send(reply(cport=3001))   # (held until the native claim is in, if need be)
        assert [reply_key(d)[1] for d, _ in native_replies(native, 1)] == [3001]
        # a classic ADD of the native client's connection is refused (not moved)
        add(t1, 3001)
        settle(srv, t1)
        srv.send(*(reply(ACK, b"", cport=p) for p in (1001, 2001, 3001, 2002, 1001, 4444)))
        assert [struct.unpack_from("!H", r, 22)[0] for r in records_of(t1, 2)] == [1001, 1001]
        assert [struct.unpack_from("!H", r, 22)[0] for r in records_of(t2, 2)] == [2001, 2002]
        assert [reply_key(d)[1] for d, _ in native_replies(native, 1)] == [3001]
        for sock in (t1, t2):
            assert quiet_recv(sock, 0.2) == b""
    finally:
        native.close()
    rc, err = srv.finish()
    assert rc == 0 and "1 claims refused" in err, err


def test_server_classic_peer_only_from_allow(cserver):
    srv = cserver("--allow", "10.0.0.0/8")
    s = srv.tcpcopy()
    assert closed(s)
    s.close()
    rc, err = srv.finish()
    assert "not in --allow" in err and "1 connections not allowed" in err, err
    # with the peer's address allowed it is served
    srv = cserver("--allow", "127.0.0.0/8")
    s = srv.tcpcopy()
    add(s)
    settle(srv, s)
    srv.send(reply())
    assert len(records_of(s, 1)) == 1


def test_tc_feedback_classic_option_checks(tmp_path):
    r = tc.run([tc.tool_path("tc-feedback"), "--classic", "tcp::40001", "--listen",
                "tcp::40001"], input=b"", timeout=30)
    assert r.returncode == 2 and b"different addresses" in r.stderr
    r = tc.run([tc.tool_path("tc-feedback"), "--classic", f"unix:{tmp_path}/x"],
               input=b"", timeout=30)
    assert r.returncode == 2 and b"over TCP" in r.stderr


def test_classic_client_meets_classic_server(cserver):
    """Both of our ends: ClassicFeedbackClient (tc-session's) through tc-feedback
    --classic; several replies per connection, any number of connections."""
    srv = cserver()
    c = classic.ClassicFeedbackClient(f"classic:127.0.0.1:{srv.port}")
    deadline = time.monotonic() + 10
    while True:
        try:
            c.connect(timeout=5)
            break
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        for p in range(100):
            c.claim(CLIENT, 10000 + p, TARGET, TPORT)
        c.flush()
        time.sleep(0.3)
        sent = [reply(ACK, b"", cport=10000 + p % 100, seq=p) for p in range(300)]
        srv.send(*sent)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 300 and time.monotonic() < deadline:
            select.select([c], [], [], 0.05)
            got += c.read_replies()
        assert [parse_tcp_fast(d) for d, _ in got] == [parse_tcp_fast(d) for d in sent]
    finally:
        c.close()


# -- the server's classic peers in process: bounds and the routing in the inline path -------

def _classic_peer(srv, name="127.0.0.1:5000"):
    from tcpcopylib.feedback import _Client, _OrderedKeys

    a, b = socket.socketpair()
    c = _Client(a, name)
    c.classic, c.keys, c.state = True, _OrderedKeys(), 0
    srv.clients[a.fileno()] = c
    return c, a, b


def test_server_classic_routes_are_bounded_oldest_first():
    """No CLIENT_DEL ever comes: a classic client's oldest route makes room (max_claims)."""
    from tcpcopylib.feedback import FeedbackServer

    srv = FeedbackServer(None, max_claims=3, warn=lambda msg: None)
    c, a, b = _classic_peer(srv)
    try:
        srv._classic_input(c, classic.HANDSHAKE + b"".join(
            classic.client_add(CLIENT, p, TARGET, TPORT) for p in range(1, 6)))
        assert c.sock is not None
        assert list(c.keys) == [reply(ACK, b"", cport=p)[12:24] for p in (3, 4, 5)]
        assert set(srv.routes) == set(c.keys) and srv.counts["classic_adds"] == 5
        # the same connection added again is the newest
        srv._classic_input(c, classic.client_add(CLIENT, 3, TARGET, TPORT))
        assert list(c.keys)[-1] == reply(ACK, b"", cport=3)[12:24]
    finally:
        a.close()
        b.close()


def test_server_classic_inline_routing_frames_per_turn_and_caps():
    """Replies for a classic client among a native client's, through the inline router:
    the classic one gets 64-byte records framed at the flush (16 a frame), the native one
    its records byte for byte; a classic client's buffer is bounded like a native one's."""
    from tcpcopylib.feedback import FeedbackServer, PeerStreamParser, _Client, _ip_text
    from tcpcopylib.intercept import encode_fb

    srv = FeedbackServer(None, client_buffer=30 * 64, warn=lambda msg: None)
    c, a, b = _classic_peer(srv)
    native = _Client(None, "native")
    try:
        srv._classic_input(c, classic.HANDSHAKE + classic.client_add(CLIENT, 1, TARGET, TPORT))
        srv.claim(native, [[_ip_text(CLIENT), 2, _ip_text(TARGET), TPORT]], True)
        datas = [reply(ACK | PSH, b"", b"d" * i, cport=1 + i % 2, seq=i) for i in range(80)]
        stream = encode_section({"t": "header", "v": 1, "tool": "t"}) + b"".join(
            encode_fb(i, d, len(d)) for i, d in enumerate(datas))
        srv._serve_input(PeerStreamParser("t"), stream)
        srv._flush_clients()
        got = quiet_recv(b, 0.3)
        recs = [r for f in spec_frames(got) for r in f]
        mine = [d for d in datas if reply_key(d)[1] == 1]
        assert len(recs) == 30 and recs == [classic.encode_record(d) for d in mine[:30]]
        want, native_drops = b"", 0   # the native client: what fits in its buffer
        for i, d in enumerate(datas):
            raw = encode_fb(i, d, len(d))
            if reply_key(d)[1] != 2:
                continue
            if len(want) + len(raw) > srv.client_buffer:
                native_drops += 1
            else:
                want += raw
        assert native_drops and bytes(native.out) == want
        assert srv.counts["dropped_slow"] == 10 + native_drops
    finally:
        a.close()
        b.close()


def test_record_of_a_reply_with_ip_options_keeps_them_before_tcp():
    """An IP header with options: the record keeps them and the TCP header after them, where
    a reader that goes by ihl (tcpcopy, tc-session) finds it (spec section 7)."""
    d = reply(ACK, b"")
    opt = bytes([0x46]) + d[1:2] + struct.pack("!H", len(d) + 4) + d[4:20] + b"\x01" * 4 + d[20:]
    rec = classic.encode_record(opt)
    assert rec[:44] == opt[:44] and rec[44:] == bytes(20)
    assert parse_tcp_fast(classic.record_datagram(rec))[3:9] == parse_tcp_fast(d)[3:9]


def test_doctor_checks_a_classic_feedback_address(fake_intercept):
    """tc-doctor --feedback classic:... (or $TC_FEEDBACK): connects and sends the version
    message, as tc-session would; a closed port fails with advice."""
    from tcpcopylib import doctor

    port = fake_intercept.getsockname()[1]
    ctx = doctor.Context("online", feedback=f"classic:127.0.0.1:{port}")
    r = doctor.check_feedback(ctx)
    assert r.verdict == doctor.OK and "classic" in r.seen, r
    conn = accept(fake_intercept)
    assert recv_until(conn, 14).hex() == HANDSHAKE_HEX
    conn.close()
    r = doctor.check_feedback(doctor.Context("online",
                                             feedback=f"classic:127.0.0.1:{free_port()}"))
    assert r.verdict == doctor.FAIL and "--classic" in r.advice, r


def test_server_with_a_key_serves_allowed_classic_clients(cserver, tmp_path):
    """--key binds native clients; classic ones cannot prove it and are served on their
    --allow address alone (and refused elsewhere, key or not)."""
    key = tmp_path / "key"
    key.write_text("s" * 32)
    key.chmod(0o600)
    srv = cserver("--key", str(key), "--allow", "127.0.0.1")
    s = srv.tcpcopy()
    add(s)
    settle(srv, s)
    srv.send(reply(ACK, b""))
    assert records_of(s, 1) == [classic.encode_record(reply(ACK, b""))]
    native = FeedbackClient(srv.native, name="native")   # no key: refused
    with pytest.raises(Exception, match="key"):
        native.connect(timeout=5)
