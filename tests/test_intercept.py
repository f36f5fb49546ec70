"""tc-intercept in the namespace lab: replies captured with correct headers, v4 and v6, latency."""

import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

import tc
from tcpcopylib.feedback import PeerStreamParser
from tcpcopylib.intercept import fb_record
from tcpcopylib.link import LINKTYPE_ETHERNET
from tcpcopylib.packet import TH_ACK, TH_SYN, build_tcp, ip_bytes, parse_tcp

import cbor2


class Intercept:
    """tc-intercept running in a lab host; records collected by a thread with arrival times."""

    def __init__(self, lab, host, *args):
        self.p = lab.popen(host, [sys.executable, tc.tool_path("tc-intercept"), *args,
                                  "-v", "--stats"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
        line = self.p.stderr.readline().decode()  # "capturing on ..." once the capture is open
        assert "capturing on" in line, line + self.p.stderr.read().decode()
        self.q = queue.Queue()
        self.header = None
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        dec = PeerStreamParser("tc-intercept")
        fd = self.p.stdout.fileno()
        while True:
            data = os.read(fd, 1 << 16)
            now = time.perf_counter()
            if not data:
                return
            for item, _raw in dec.feed(data):
                if item["t"] == "header":
                    self.header = item
                else:
                    self.q.put((now, item))

    def wait(self, pred, timeout=5.0):
        """The first record (arrival time, record) matching pred, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, rec = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            if pred(rec):
                return t, rec
        return None

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
        rc = self.p.wait(5)
        self.t.join(2)
        return rc, self.p.stderr.read().decode()


def forge_syn(lab, src, dst, sport, dport, seq):
    """Send a SYN from `online` with a client's source address (a raw IPPROTO_RAW socket)."""
    fam = socket.AF_INET if ":" not in src else socket.AF_INET6
    pkt = build_tcp(ip_bytes(src), ip_bytes(dst), sport, dport, seq, 0, TH_SYN,
                    options=b"\x02\x04\x05\xb4")
    with lab.enter("online"):
        s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with s:
        t0 = time.perf_counter()
        s.sendto(pkt, (dst, 0))
    return t0


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["ring", "pcap", "afpacket"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_synack_captured_on_assistant(lab, v6, engine):
    lab.start_server("target", port=8080)
    client = lab.client_ip6 if v6 else lab.client_ip
    target = lab.target_ip6 if v6 else lab.target_ip
    ic = Intercept(lab, "assistant", "lan0", "-F", "tcp and src port 8080", "--engine", engine)
    try:
        time.sleep(0.2)  # an idle link: the latency below is the idle-link case
        sport, seq = random.randint(20000, 60000), random.getrandbits(32)
        t0 = forge_syn(lab, client, target, sport, 8080, seq)
        got = ic.wait(lambda r: parse_tcp(r["data"]).dport == sport)
        assert got is not None, "no SYN-ACK record from tc-intercept"
        t1, rec = got
        latency_ms = (t1 - t0) * 1000
        print(f"\n{'IPv6' if v6 else 'IPv4'}: SYN sent -> SYN-ACK record on stdout: "
              f"{latency_ms:.2f} ms")
        assert latency_ms < 50
        tcp = parse_tcp(rec["data"])
        assert tcp.version == (6 if v6 else 4)
        assert tcp.src == ip_bytes(target) and tcp.dst == ip_bytes(client)
        assert tcp.sport == 8080 and tcp.dport == sport
        assert tcp.flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK
        assert tcp.ack == (seq + 1) & 0xFFFFFFFF
        assert rec["len"] == len(rec["data"]) == tcp.ihl + tcp.doff  # headers only
        assert abs(rec["ts"] - time.time_ns()) < 10 * 10**9
        assert ic.header["tool"] == "tc-intercept"
        if engine != "afpacket":  # (afpacket's timestamps: when read)
            assert rec["ts"] <= time.time_ns()
    finally:
        rc, err = ic.stop()
    assert rc == 0
    assert "replies written" in err and "dropped" in err
    assert " 0 dropped" in err and "kernel: 0 received" not in err


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["ring", "pcap"])
def test_payload_of_a_real_connection(lab, tmp_path, engine):
    """A real HTTP exchange online -> target, captured on the target's side (outgoing
    there): payload kept."""
    (tmp_path / "index.html").write_text("x" * 3000)
    lab.start_server("target", port=8080, directory=tmp_path)
    full = Intercept(lab, "target", "-i", "lan0", "-F", "tcp and src port 8080",
                     "--payload", "all", "--engine", engine)
    cut = Intercept(lab, "target", "lan0", "-F", "tcp and src port 8080", "--payload", "5",
                    "--engine", engine)
    try:
        fetch = ("import urllib.request,sys; "
                 "print(len(urllib.request.urlopen(sys.argv[1], timeout=3).read()))")
        r = lab.run("online", [sys.executable, "-c", fetch, f"http://{lab.target_ip}:8080/"],
                    capture_output=True, text=True, timeout=10)
        assert r.stdout.strip() == "3000", r.stderr

        def first_data(ic):
            got = ic.wait(lambda rec: parse_tcp(rec["data"]).payload_len > 0)
            assert got is not None
            return got[1]

        rec = first_data(full)
        tcp = parse_tcp(rec["data"])
        assert tcp.payload.startswith(b"HTTP/1.0 200")
        assert rec["len"] == len(rec["data"])
        rec = first_data(cut)
        tcp = parse_tcp(rec["data"])
        assert tcp.payload == b"HTTP/"
        assert rec["len"] > len(rec["data"]) == tcp.ihl + tcp.doff + 5
    finally:
        full.stop()
        cut.stop()


@pytest.mark.parametrize("engine", ["ring", "pcap", "afpacket"])
def test_unknown_interface_exit_66(engine):
    r = tc.call(["tc-intercept", "nosuch-if0", "--engine", engine])
    assert r.returncode == 66
    assert b"no such interface" in r.stderr


@pytest.mark.netns
@pytest.mark.parametrize("engine", ["ring", "pcap", "afpacket"])
def test_interface_down_exit_69(lab, engine):
    lab.run("assistant", ["ip", "link", "set", "lan0", "down"], check=True)
    r = lab.run("assistant", [sys.executable, tc.tool_path("tc-intercept"), "lan0",
                              "--engine", engine], capture_output=True, env=tc.tool_env(),
                timeout=30)
    assert r.returncode == 69, r.stderr
    assert b"interface is down" in r.stderr and r.stderr.count(b"\n") == 1


@pytest.mark.netns
def test_engines_give_the_same_records_on_loopback(lab):
    """In process, on lo (both directions, each packet shown twice to AF_PACKET): the
    ring's and libpcap's batches make the same fb records, each packet once."""
    from tcpcopylib.intercept import Interceptor, open_engine, snaplen_for
    from tcpcopylib.testing import BufferWriter

    port = 8098
    with lab.enter("online"):
        engines = [open_engine(kind, "lo", f"tcp port {port}", snaplen_for(5), promisc=False)
                   for kind in ("ring", "pcap")]
    ics = [Interceptor(e, BufferWriter(), payload=5) for e in engines]
    try:
        tc.loopback_exchange(lab, port, b"hello", b"x" * 2000)
        time.sleep(0.1)
        deadline = time.monotonic() + 2
        for e, ic in zip(engines, ics):
            while time.monotonic() < deadline and (e.read_batches(ic) or ic.written < 7):
                time.sleep(0.01)
    finally:
        for e in engines:
            e.close()
    def records(buf):
        import io

        f = io.BytesIO(bytes(buf))
        dec = cbor2.CBORDecoder(f)
        while f.tell() < len(buf):
            yield {k: v for k, v in dec.decode().items() if k != "ts"}

    ring, pcap = (list(records(ic.writer.buf)) for ic in ics)
    assert ring == pcap and len(ring) >= 7
    assert [p for p in (parse_tcp(r["data"]).payload for r in ring) if p] == [b"hello", b"xxxxx"]


def test_usage_errors():
    assert tc.call(["tc-intercept"]).returncode == 2
    assert tc.call(["tc-intercept", "lo", "--payload", "lots"]).returncode == 2


@pytest.mark.netns
def test_take_gives_the_stream_in_process(lab):
    """Interceptor.take (tc-feedback --capture): the stream's header, then the records
    captured since the last call, each once; b"" when nothing came."""
    from tcpcopylib.intercept import Interceptor, open_engine, snaplen_for
    from tcpcopylib.livecapture import MemoryWriter
    from tcpcopylib.records import StreamDecoder, header

    port = 8097
    with lab.enter("online"):
        engine = open_engine("ring", "lo", f"tcp port {port}", snaplen_for(5), promisc=False)
    ic = Interceptor(engine, MemoryWriter(-1, header("tc-intercept")), payload=5)
    try:
        first = ic.take()
        tc.loopback_exchange(lab, port, b"hello", b"x" * 2000)
        chunks = [first]
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and ic.written < 7:
            chunks.append(ic.take())
            time.sleep(0.01)
        chunks.append(ic.take())
        assert ic.take() == b""  # all was taken
    finally:
        engine.close()
    items, pos, err = StreamDecoder("take", headers=True).parse(b"".join(chunks))
    assert err is None and pos == sum(map(len, chunks))
    assert items[0]["t"] == "header" and items[0]["tool"] == "tc-intercept"
    fbs = [r for r in items[1:] if r.get("t") == "fb"]
    assert len(fbs) == ic.written >= 7
    assert [p for p in (parse_tcp(r["data"]).payload for r in fbs) if p] == [b"hello", b"xxxxx"]


def test_feedback_capture_errors(tmp_path):
    """tc-feedback --capture: a bad interface is 66 before anything listens; a FILE
    beside it, or a bad option value, is a usage error."""
    sock = tmp_path / "fb.sock"
    r = tc.call(["tc-feedback", "--capture", "nosuch-if0", "--listen", f"unix:{sock}"])
    assert r.returncode == 66 and b"no such interface" in r.stderr, r.stderr
    assert not sock.exists()
    r = tc.call(["tc-feedback", "--capture", "lo", "--listen", f"unix:{sock}", "in.cbor"])
    assert r.returncode == 2 and b"no FILE" in r.stderr, r.stderr
    for bad in (["--capture-payload", "lots"], ["--capture-buffer", "1"],
                ["--capture-engine", "nosuch"]):
        r = tc.call(["tc-feedback", "--capture", "lo", "--listen", f"unix:{sock}", *bad])
        assert r.returncode == 2, (bad, r.stderr)


@pytest.mark.netns
def test_no_permission_exit_77():
    """Without CAP_NET_RAW (dropped from the bounding set, as root): 77."""
    import shutil

    assert shutil.which("setpriv"), "setpriv (util-linux) is needed"
    r = subprocess.run(["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw",
                        sys.executable, tc.tool_path("tc-intercept"), "lo"],
                       capture_output=True, env=tc.tool_env(), timeout=30)
    assert r.returncode == 77, r.stderr
    assert b"root or CAP_NET_RAW" in r.stderr


def test_fb_record():
    ip = build_tcp(ip_bytes("10.0.0.5"), ip_bytes("10.9.0.1"), 8080, 1000, 5, 6, 0x18,
                   payload=b"hello")
    r = cbor2.loads(fb_record(ip, 7, 0))
    assert r == {"t": "fb", "ts": 7, "data": ip[:40], "len": len(ip)}
    assert cbor2.loads(fb_record(ip, 7, 3))["data"] == ip[:43]
    assert cbor2.loads(fb_record(ip, 7, -1))["data"] == ip
    udp = bytearray(ip)
    udp[9] = 17
    assert fb_record(bytes(udp), 7, 0) is None


@pytest.mark.parametrize("payload", [0, 5, -1])
def test_batch_fast_path_equals_generic(tmp_path, payload):
    """The inline Ethernet/IPv4 batch loop writes exactly what the generic path writes."""
    import struct

    from tcpcopylib.intercept import Interceptor
    from tcpcopylib.records import RecordWriter

    t, c = ip_bytes("10.0.0.5"), ip_bytes("10.9.0.1")
    ips = [build_tcp(t, c, 8080, 1000 + i, i, 2, TH_ACK, payload=b"x" * (i * 7 % 300))
           for i in range(60)]
    ips[5] = build_tcp(ip_bytes("2001:db8::1"), ip_bytes("2001:db8::2"), 8080, 1, 1, 2, TH_ACK)
    frames = [b"\x02" * 12 + (b"\x86\xdd" if i == 5 else b"\x08\x00") + ip
              for i, ip in enumerate(ips)]
    frames.append(b"\x02" * 12 + b"\x08\x06" + b"\0" * 28)  # ARP: skipped
    offs = [sum(map(len, frames[:i])) for i in range(len(frames))]
    meta = b"".join(struct.pack("=IIII", 1700000000, 2, o, len(f)) for o, f in zip(offs, frames))

    class Cap:
        linktype = LINKTYPE_ETHERNET

    path = tmp_path / "out.cbor"
    w = RecordWriter(os.open(path, os.O_WRONLY | os.O_CREAT), tool="t")
    ic = Interceptor(Cap(), w, payload=payload)
    ic._ether_batch(b"".join(frames), meta)
    w.flush()
    want = [cbor2.loads(fb_record(ip, 1700000000 * 10**9 + 2000, payload)) for ip in ips]
    assert tc.decode(path.read_bytes()) == want
    assert (ic.captured, ic.written, ic.skipped) == (61, 60, 1)
