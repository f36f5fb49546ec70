import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cbor2
import pytest

import capfiles as cf
from capfiles import A4, A6, B4, B6, TS0, eth, ip4, ip6, udp4
from tc import REPO, call, chain, decode, stream, tool_env, tool_path
from tcpcopylib.errors import CaptureFormatError
from tcpcopylib.dumpfmt import TextFormatter, from_json, tcp_options_str, to_json
from tcpcopylib.packet import build_tcp
from tcpcopylib.pcapio import CaptureReader

SYN_OPTS = bytes.fromhex("020405b4") + b"\x04\x02" + bytes.fromhex("080a0000000100000000") + \
    b"\x01\x03\x03\x07"


def dump(records, *args, tool="test"):
    return call(["tc-dump", *args], input=stream(records, tool))


def lines(r):
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().splitlines()


# -- text --------------------------------------------------------------------------------
def test_text_lines_look_like_tcpdump():
    ts = 1_700_000_000 * 10**9 + 123_456_789  # 22:13:20 UTC
    syn = build_tcp(A4, B4, 40000, 8080, 100, 0, 0x02, window=64240, options=SYN_OPTS)
    data = build_tcp(A4, B4, 40000, 8080, 101, 5001, 0x18, window=502, payload=b"x" * 18)
    fin6 = build_tcp(A6, B6, 40000, 8080, 119, 5001, 0x11, window=502)
    recs = [{"t": "pkt", "ts": ts, "data": syn},
            {"t": "pkt", "ts": ts + 1, "data": data, "sid": 17},
            {"t": "fb", "ts": ts + 2, "data": fin6, "len": 60},
            {"t": "pkt", "ts": ts + 3, "data": udp4()},
            {"t": "claim", "add": [["10.0.0.1", 40000, "10.0.0.5", 8080]]},
            {"t": "pkt", "ts": ts + 4, "data": data, "dir": "c2s"}]
    out = lines(dump(recs, "-u"))
    assert out[0].startswith("# header v1 tool=test tool_version=")
    assert out[1:] == [
        "22:13:20.123456789 IP 10.0.0.1.40000 > 10.0.0.5.8080: Flags [S], seq 100, win 64240, "
        "options [mss 1460,sackOK,TS val 1 ecr 0,nop,wscale 7], length 0",
        "22:13:20.123456790 sid=17 IP 10.0.0.1.40000 > 10.0.0.5.8080: Flags [P.], "
        "seq 101:119, ack 5001, win 502, length 18",
        "fb 22:13:20.123456791 IP6 2001:db8::1.40000 > 2001:db8::5.8080: Flags [F.], seq 119, "
        "ack 5001, win 502, length 0",
        "22:13:20.123456792 IP 10.0.0.1.5000 > 10.0.0.5.53: UDP, length 4",
        'claim add=[["10.0.0.1",40000,"10.0.0.5",8080]]',
        "22:13:20.123456793 IP 10.0.0.1.40000 > 10.0.0.5.8080: Flags [P.], "
        "seq 101:119, ack 5001, win 502, length 18 {dir=c2s}",
    ]


def test_text_shows_truncation_date_and_non_ip():
    data = build_tcp(A4, B4, 1, 2, 10, 0, 0x10, payload=b"p" * 100)
    f = TextFormatter(utc=True, date=True)
    line = f.line({"t": "pkt", "ts": 0, "data": data[:60], "len": len(data)})
    assert line == ("1970-01-01 00:00:00.000000000 IP 10.0.0.1.1 > 10.0.0.5.2: Flags [.], "
                    "seq 10:110, ack 0, win 65535, length 100 [captured 60 of 140]")
    assert f.line({"t": "pkt", "ts": 5, "data": b"\x10abc"}).endswith("[not IP, 4 bytes]")
    assert f.line({"t": "stats", "in": 3, "name": "a b"}) == 'stats in=3 name="a b"'


def test_tcp_options_rendering_handles_sack_and_garbage():
    sack = b"\x01\x01\x05\x0a" + (1000).to_bytes(4, "big") + (2000).to_bytes(4, "big")
    assert tcp_options_str(sack) == "nop,nop,sack 1 {1000:2000}"
    assert tcp_options_str(b"\x02\x09") == "opt-2 [bad length]"


# -- JSON ---------------------------------------------------------------------------------
def test_json_is_lossless_and_from_json_rebuilds_the_stream(tmp_path):
    recs = [{"t": "pkt", "ts": TS0, "data": ip4(1), "sid": 3},
            {"t": "fb", "ts": 2**64 - 1, "data": ip6(2), "len": 1500},
            {"t": "stats", "nested": {"b": b"\x00\xff", "l": [1, b"x", None, True, 1.5]}},
            {"t": "weird", "s": "ünïcode", "n": -5}]
    original = stream(recs, "a") + stream([{"t": "pkt", "ts": 1, "data": b""}], "b")
    r = call(["tc-dump", "--json"], input=original)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    first = json.loads(out[1])
    assert first["ts"] == TS0 and isinstance(first["ts"], int)
    assert first["data"] == {"$bytes": __import__("base64").b64encode(ip4(1)).decode()}
    (tmp_path / "x.jsonl").write_text("# a comment\n\n" + r.stdout.decode())
    back = call(["tc-dump", "--from-json", tmp_path / "x.jsonl"])
    assert back.returncode == 0, back.stderr
    assert back.stdout == original
    assert decode(back.stdout, headers=True) == decode(original, headers=True)


def test_from_json_without_header_gets_one():
    r = call(["tc-dump", "--from-json"], input=b'{"t":"pkt","ts":5,"data":{"$bytes":"RQ=="}}\n')
    recs = decode(r.stdout, headers=True)
    assert recs[0]["tool"] == "tc-dump" and recs[1] == {"t": "pkt", "ts": 5, "data": b"E"}


@pytest.mark.parametrize("text", [b"{not json\n", b"[1, 2]\n", b"\xff\xfe\n",
                                  b'{"t":"header","v":99}\n'])
def test_from_json_rejects_bad_input_with_65(text):
    r = call(["tc-dump", "--from-json"], input=text)
    assert r.returncode == 65
    assert r.stderr.decode().startswith("tc-dump: error:") and r.stderr.count(b"\n") == 1


def test_json_helpers_round_trip_tags():
    rec = {"t": "x", "tag": cbor2.CBORTag(1234, [b"a"])}
    assert from_json(to_json(rec)) == rec


# -- pcap ---------------------------------------------------------------------------------
def _read_pcap(data: bytes):
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        return [(lt, ts, fr, o) for lt, ts, fr, o in CaptureReader(r, "out").frames()]
    finally:
        os.close(r)


def test_pcap_output_has_pkts_and_optionally_fb():
    recs = [{"t": "pkt", "ts": TS0, "data": ip4(1)}, {"t": "fb", "ts": TS0 + 1, "data": ip4(2)},
            {"t": "stats", "n": 1}, {"t": "pkt", "ts": TS0 + 2, "data": ip6(3)[:50], "len": 60}]
    r = dump(recs, "--pcap")
    assert r.returncode == 0, r.stderr
    assert r.stdout[:4] == (0xA1B23C4D).to_bytes(4, "little")
    assert _read_pcap(r.stdout) == [(101, TS0, ip4(1), 40), (101, TS0 + 2, ip6(3)[:50], 60)]
    r = dump(recs, "--pcap", "--fb")
    assert [f[2] for f in _read_pcap(r.stdout)] == [ip4(1), ip4(2), ip6(3)[:50]]


def test_pcap_rejects_a_pkt_without_data_or_with_a_bad_ts():
    r = dump([{"t": "pkt", "ts": 1}], "--pcap")
    assert r.returncode == 65 and b"without bytes 'data'" in r.stderr
    r = dump([{"t": "pkt", "ts": 1, "data": b"E"}, {"t": "pkt", "ts": -1, "data": b"E"}],
             "--pcap")
    assert r.returncode == 65 and b"record 3: ts -1" in r.stderr and r.stderr.count(b"\n") == 1


def _capture_with_everything() -> tuple[bytes, list]:
    """An Ethernet capture: IPv4/IPv6, VLAN, padding, ARP; returns (file, [(ts, ip)])."""
    want, frames = [], []
    for i in range(40):
        ip = (ip4 if i % 2 else ip6)(i, b"d" * (i * 37 % 1400))
        ts = TS0 + i * 1_000_003
        vlans = [(0x8100, 5)] if i % 5 == 0 else ()
        frames.append((ts, eth(0x86DD if ip[0] >> 4 == 6 else 0x0800, ip, vlans)))
        want.append((ts, ip))
        if i % 7 == 0:
            frames.append((ts, eth(0x0806, cf.ARP) + bytes(18)))
    return cf.pcap(frames), want


def test_round_trip_reproduces_ip_packets_and_timestamps(tmp_path):
    content, want = _capture_with_everything()
    (tmp_path / "x.pcap").write_bytes(content)
    r = chain(["tc-readpcap", tmp_path / "x.pcap"], ["tc-dump", "--pcap"])
    assert r.returncode == 0, r.stderr
    assert [(ts, fr) for _lt, ts, fr, _o in _read_pcap(r.stdout)] == want
    # and through JSON and back, byte for byte
    r2 = chain(["tc-readpcap", tmp_path / "x.pcap"], ["tc-dump", "--json"],
               ["tc-dump", "--from-json"], ["tc-dump", "--pcap"])
    assert r2.stdout == r.stdout


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_tcpdump_reads_the_pcap_with_nanoseconds(tmp_path):
    content, want = _capture_with_everything()
    (tmp_path / "x.pcap").write_bytes(content)
    out = tmp_path / "out.pcap"
    r = chain(["tc-readpcap", tmp_path / "x.pcap"], ["tc-dump", "--pcap"])
    assert r.returncode == 0, r.stderr
    out.write_bytes(r.stdout)
    t = subprocess.run(["tcpdump", "-nn", "-tt", "--time-stamp-precision=nano", "-r", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert t.returncode == 0, t.stderr
    got = t.stdout.splitlines()
    assert len(got) == len(want)
    assert got[0].startswith(f"{TS0 // 10**9}.{TS0 % 10**9:09d} IP6 2001:db8::1.40000 > "
                             "2001:db8::5.8080: Flags [P.]")
    assert got[1].startswith(f"{(TS0 + 1_000_003) // 10**9}.{(TS0 + 1_000_003) % 10**9:09d} "
                             "IP 10.0.0.1.40001 > 10.0.0.5.8080")
    plain = subprocess.run(["tcpdump", "-nn", "-r", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == len(want)


def test_pcap_and_from_json_refuse_a_terminal():
    for mode in ("--pcap", "--from-json"):
        master, slave = os.openpty()
        try:
            r = subprocess.run([tool_path("tc-dump"), mode], stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=subprocess.PIPE, env=tool_env(), timeout=30)
        finally:
            os.close(slave)
            os.close(master)
        assert r.returncode == 2 and b"terminal" in r.stderr


# -- errors -------------------------------------------------------------------------------
def test_missing_input_exits_66(tmp_path):
    r = call(["tc-dump", tmp_path / "none.cbor"])
    assert r.returncode == 66 and b"no such file" in r.stderr


def test_fb_needs_pcap():
    r = dump([], "--fb")
    assert r.returncode == 2


def test_stats_counts_record_types():
    r = dump([{"t": "pkt", "ts": 1, "data": ip4()}] * 3 + [{"t": "fb", "ts": 1, "data": ip4()}],
             "--stats")
    assert "5 records (1 fb, 1 header, 3 pkt)" in r.stderr.decode()


def test_import_is_light():
    code = ("import sys, tcpcopylib.cli.dump; "
            "assert not {'dpkt', 'pcapy', 'cbor2'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=tool_env(), timeout=30,
                   cwd=str(REPO))


# -- against tcpdump, on a real capture ------------------------------------------------------
_TRAFFIC = """
import socket
for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(fam)
    s.bind((addr, 0))
    s.listen()
    c = socket.create_connection((addr, s.getsockname()[1]), timeout=5)
    a, _ = s.accept()
    c.sendall(b"hello" * 300)
    got = 0
    while got < 1500:
        got += len(a.recv(4096))
    a.sendall(b"world")
    c.recv(10)
    c.close(); a.close(); s.close()
"""


@pytest.fixture
def netns():
    name = f"tcdump{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


def _count_frames(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    reader = CaptureReader(fd, str(path))
    try:
        for _frame in reader.frames():
            pass
    except CaptureFormatError:  # empty, or being written
        pass
    finally:
        os.close(fd)
    return reader.frames_read


def _tcpdump_lines(path, strip_sll2=False):
    r = subprocess.run(["tcpdump", "-nn", "-S", "--time-stamp-precision=nano", "-r", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    if strip_sll2:  # "12:00:00.1 lo    In  IP ..." -> "12:00:00.1 IP ..."
        out = [re.sub(r"^(\S+) lo +\S+ +", r"\1 ", line) for line in out]
    return out


@pytest.mark.netns
def test_text_and_pcap_match_tcpdump_on_real_captures(netns, tmp_path):
    """tcpdump captures loopback traffic (Ethernet, µs; and 'any': Linux cooked v2, ns);
    tc-dump's text equals tcpdump's own reading, and the --pcap round trip reads the same."""
    caps = {"lo": (tmp_path / "lo.pcap", []), "any": (tmp_path / "any.pcap",
                                                      ["--time-stamp-precision=nano"])}
    procs, errs = [], []
    try:
        # a small snaplen and a big buffer: in immediate mode the kernel ring holds only
        # buffer/snaplen frames, and a busy machine overflows it
        for iface, (path, extra) in caps.items():
            errs.append(open(tmp_path / f"{iface}.err", "wb"))
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-U", "--immediate-mode",
                 "-Z", "root", "-s", "4096", "-B", "8192", "-w", str(path),
                 *extra], stdout=subprocess.DEVNULL, stderr=errs[-1]))
        for iface in caps:
            for _ in range(200):  # bounded: up to 10 s
                if b"listening on" in (tmp_path / f"{iface}.err").read_bytes():
                    break
                time.sleep(0.05)
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _TRAFFIC],
                       check=True, timeout=30)
        # tcpdump drops what it has not read yet at SIGINT: wait until both files stop growing
        last = None
        for _ in range(60):  # bounded: up to 15 s
            time.sleep(0.25)
            counts = [_count_frames(path) for path, _extra in caps.values()]
            if counts == last and min(counts) >= 16:
                break
            last = counts
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in errs:
            f.close()
    for iface, (path, _extra) in caps.items():
        want = _tcpdump_lines(path, strip_sll2=iface == "any")
        assert len(want) >= 16  # two handshakes, data, replies, closes
        r = chain(["tc-readpcap", path], ["tc-dump"])
        assert r.returncode == 0, r.stderr
        assert [x for x in r.stdout.decode().splitlines() if not x.startswith("#")] == want
        out = tmp_path / f"{iface}.out.pcap"
        r = chain(["tc-readpcap", path], ["tc-dump", "--pcap"])
        assert r.returncode == 0, r.stderr
        out.write_bytes(r.stdout)
        assert _tcpdump_lines(out) == want


# -- the --pcap and --from-json loops in process (tcpcopylib.dumpfmt) -------------------------

def test_write_pcap_in_process_writes_the_kinds_asked_and_counts_every_record():
    import struct

    from tcpcopylib.dumpfmt import write_pcap
    from tcpcopylib.errors import StreamError
    from tcpcopylib.pcapio import PcapWriter

    out = os.memfd_create("pcap")
    try:
        w, counts = PcapWriter(out), {}
        recs = [{"t": "header", "v": 1}, {"t": "pkt", "ts": 3 * 10**9 + 7, "data": b"ab"},
                {"t": "fb", "ts": 5, "data": b"c"}, {"t": "pkt", "ts": 9, "data": b"d", "len": 60}]
        write_pcap(iter(recs), w, ("pkt",), counts)
        assert counts == {"header": 1, "pkt": 2, "fb": 1} and w.packets == 2
        data = os.pread(out, 1 << 16, 0)
        assert data[24:40] == struct.pack("<IIII", 3, 7, 2, 2) and data[40:42] == b"ab"
        assert data[42:58] == struct.pack("<IIII", 0, 9, 1, 60) and data[58:] == b"d"
        with pytest.raises(StreamError, match="record 1: a pkt record without bytes"):
            write_pcap(iter([{"t": "pkt", "ts": 1.5, "data": b""}]), w)
    finally:
        os.close(out)


def test_records_from_json_checks_lines_and_counts_a_bad_header():
    from tcpcopylib.dumpfmt import records_from_json
    from tcpcopylib.errors import StreamError

    seen = []
    lines = ['# a comment', '', '{"t": "header", "v": 1}', '{"t": "pkt", "ts": 1}']
    assert [r["t"] for r in records_from_json(lines, "x", seen.append)] == ["header", "pkt"]
    assert len(seen) == 2
    for bad, msg in (('[1]', r"x:1: not a record"), ('{"t": ', r"x:1: not a JSON record"),
                     ('{"t": "header", "v": 99}', r"x:1: header with unsupported")):
        with pytest.raises(StreamError, match=msg):
            list(records_from_json([bad], "x", seen.append))
    assert seen[-1] == {"t": "header", "v": 99}  # (counted before it was refused)
