import os
import signal
import subprocess
import sys
import time

import pytest

import capfiles as cf
from capfiles import TS0, ARP, eth, ip4, ip6, null, sll, sll2, udp4
from tc import REPO, call, cbor_items, decode, tool_env, tool_path
from tcpcopylib.pcapio import CaptureReader

ETH4, ETH6, VLAN, QINQ = 0x0800, 0x86DD, 0x8100, 0x88A8


def readpcap(tmp_path, content: bytes, *args, name="in.pcap"):
    p = tmp_path / name
    p.write_bytes(content)
    return call(["tc-readpcap", *args, p])


def pkts(out: bytes):
    return [r for r in decode(out) if r["t"] == "pkt"]


# -- link types ------------------------------------------------------------------------------
# (linktype, frame builder for an IPv4 payload, for an IPv6 payload, for a non-IP one or None)
LINKS = {
    "ethernet": (1, lambda p: eth(ETH4, p), lambda p: eth(ETH6, p), lambda: eth(0x0806, ARP)),
    "vlan": (1, lambda p: eth(ETH4, p, [(VLAN, 7)]), lambda p: eth(ETH6, p, [(VLAN, 7)]),
             lambda: eth(0x0806, ARP, [(VLAN, 7)])),
    "qinq": (1, lambda p: eth(ETH4, p, [(QINQ, 100), (VLAN, 7)]),
             lambda p: eth(ETH6, p, [(QINQ, 100), (VLAN, 7)]),
             lambda: eth(0x0806, ARP, [(QINQ, 100), (VLAN, 7)])),
    "sll": (113, lambda p: sll(ETH4, p), lambda p: sll(ETH6, p), lambda: sll(0x0806, ARP)),
    "sll2": (276, lambda p: sll2(ETH4, p), lambda p: sll2(ETH6, p), lambda: sll2(0x0806, ARP)),
    "raw101": (101, bytes, bytes, lambda: b"\x10" + bytes(30)),
    "raw12": (12, bytes, bytes, None),
    "raw14": (14, bytes, bytes, None),
    "ipv4-228": (228, bytes, None, None),
    "ipv6-229": (229, None, bytes, None),
    "null-le": (0, lambda p: null(2, p), lambda p: null(30, p), lambda: null(7, ARP)),
    "null-be": (0, lambda p: null(2, p, ">"), lambda p: null(10, p, ">"), None),
    "loop": (108, lambda p: null(2, p, ">"), lambda p: null(24, p, ">"),
             lambda: null(7, ARP, ">")),
}


@pytest.mark.parametrize("kind", sorted(LINKS))
def test_link_types_yield_the_ip_datagrams(tmp_path, kind):
    lt, mk4, mk6, mk_other = LINKS[kind]
    want, frames = [], []
    for i in range(3):
        for mk, ip in ((mk4, ip4(i, b"GET /%d" % i)), (mk6, ip6(i, b"x" * i))):
            if mk is not None:
                want.append(ip)
                frames.append(mk(ip))
    if mk_other is not None:
        frames.insert(1, mk_other())
    content = cf.pcap([(TS0 + i * 1000, f) for i, f in enumerate(frames)], linktype=lt)
    r = readpcap(tmp_path, content, "--stats")
    assert r.returncode == 0, r.stderr
    got = pkts(r.stdout)
    assert [p["data"] for p in got] == want
    assert all(type(p["ts"]) is int and "len" not in p for p in got)
    skipped = 1 if mk_other else 0
    assert f"{len(frames)} packets read, {len(want)} emitted, {skipped} skipped non-IP" in \
        r.stderr.decode()


def test_header_names_source_and_linktype(tmp_path):
    r = readpcap(tmp_path, cf.pcap([(TS0, eth(ETH4, ip4()))]))
    h = decode(r.stdout, headers=True)[0]
    assert h["t"] == "header" and h["tool"] == "tc-readpcap"
    assert h["linktype"] == 101 and h["source"].endswith("in.pcap")


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("ns", [True, False])
def test_pcap_resolutions_and_byte_orders_give_exact_ns(tmp_path, endian, ns):
    tss = [TS0, TS0 + 1, TS0 + 999_999_999, 4_000_000_000 * 10**9 + 7_000]
    content = cf.pcap([(t, eth(ETH4, ip4(i))) for i, t in enumerate(tss)], ns=ns, endian=endian)
    got = pkts(readpcap(tmp_path, content).stdout)
    assert [p["ts"] for p in got] == [t if ns else t // 1000 * 1000 for t in tss]


def test_pcapng_interfaces_resolutions_and_blocks(tmp_path):
    a, b, c, d = ip4(1), ip6(2), ip4(3, b"spb"), ip6(4)
    content = b"".join([
        cf.shb(),
        cf.idb(1),                     # interface 0: Ethernet, default µs
        cf.idb(101, tsresol=9),        # interface 1: raw IP, ns
        cf.idb(113, tsresol=0x80 | 10),  # interface 2: SLL, 2^-10 s
        cf.epb(0, TS0 // 1000, eth(ETH4, a)),
        cf.isb(),
        cf.epb(1, TS0 + 5, b),
        cf.epb(2, 1024 * 3 + 512, sll(ETH4, c)),
        cf.spb(eth(0x0806, ARP)),
        # a second section, big-endian, ns with a 10 s offset
        cf.shb(">"), cf.idb(229, tsresol=9, endian=">", tsoffset=10),
        cf.epb(0, TS0, d, endian=">"),
    ])
    r = readpcap(tmp_path, content, "--stats", name="x.pcapng")
    assert r.returncode == 0, r.stderr
    got = pkts(r.stdout)
    assert [p["data"] for p in got] == [a, b, c, d]
    assert [p["ts"] for p in got] == [TS0 // 1000 * 1000, TS0 + 5, 3_500_000_000,
                                      TS0 + 10 * 10**9]
    assert "5 packets read, 4 emitted, 1 skipped non-IP" in r.stderr.decode()


def test_pcapng_simple_packet_block_takes_previous_timestamp(tmp_path):
    content = cf.shb() + cf.idb(101, tsresol=9) + cf.epb(0, TS0, ip4(1)) + cf.spb(ip4(2))
    got = pkts(readpcap(tmp_path, content).stdout)
    assert [(p["ts"], p["data"]) for p in got] == [(TS0, ip4(1)), (TS0, ip4(2))]


def test_ethernet_padding_is_cut_and_snaplen_truncation_sets_len(tmp_path):
    small = ip4(0)  # 40 bytes: padded to a 60-byte frame on the wire
    big = ip4(1, b"y" * 1000)
    frames = [(TS0, eth(ETH4, small) + b"\0" * 6 + b"FCS!"),
              (TS0 + 1, eth(ETH4, big)[:14 + 100], 14 + len(big)),
              (TS0 + 2, eth(ETH6, ip6(2, b"z" * 500))[:14 + 60], 14 + 560)]
    got = pkts(readpcap(tmp_path, cf.pcap(frames, snaplen=114)).stdout)
    assert got[0]["data"] == small and "len" not in got[0]
    assert got[1]["data"] == big[:100] and got[1]["len"] == len(big)
    assert got[2]["data"] == ip6(2, b"z" * 500)[:60] and got[2]["len"] == 560


def test_filter_applies_to_each_link_type(tmp_path):
    frames = [eth(ETH4, ip4(0)), eth(ETH4, udp4()), eth(ETH6, ip6(0)), eth(0x0806, ARP)]
    r = readpcap(tmp_path, cf.pcap([(TS0 + i, f) for i, f in enumerate(frames)]),
                 "-F", "tcp port 8080", "--stats")
    assert r.returncode == 0
    assert [p["data"] for p in pkts(r.stdout)] == [ip4(0), ip6(0)]
    assert "4 packets read, 2 emitted, 0 skipped non-IP, 2 filtered out" in r.stderr.decode()
    # raw IP (101 must become DLT_RAW for the compiler) and Linux cooked v2
    for lt, mk in ((101, bytes), (276, lambda p: sll2(ETH4, p))):
        content = cf.pcap([(TS0, mk(ip4(0))), (TS0 + 1, mk(udp4()))], linktype=lt)
        r = readpcap(tmp_path, content, "-F", "udp")
        assert r.returncode == 0, r.stderr
        assert [p["data"] for p in pkts(r.stdout)] == [udp4()]


def test_several_files_and_stdin(tmp_path):
    (tmp_path / "a.pcap").write_bytes(cf.pcap([(TS0, eth(ETH4, ip4(1)))]))
    b = cf.shb() + cf.idb(101, tsresol=9) + cf.epb(0, TS0 + 1, ip6(2))
    r = call(["tc-readpcap", tmp_path / "a.pcap", "-"], input=b)
    assert r.returncode == 0, r.stderr
    recs = decode(r.stdout, headers=True)
    assert [(x["t"], x.get("source")) for x in recs] == [
        ("header", str(tmp_path / "a.pcap")), ("pkt", None), ("header", "<stdin>"),
        ("pkt", None)]
    assert recs[3]["data"] == ip6(2)


def test_count_stops_early(tmp_path):
    content = cf.pcap([(TS0 + i, eth(ETH4, ip4(i))) for i in range(10)])
    assert len(pkts(readpcap(tmp_path, content, "-c", "3").stdout)) == 3


def test_large_file_crosses_read_chunks(tmp_path):
    frames = [(TS0 + i, eth(ETH4, ip4(i % 50, b"p" * (i % 1400)))) for i in range(3000)]
    got = pkts(readpcap(tmp_path, cf.pcap(frames)).stdout)
    assert len(got) == 3000
    assert got[2999]["data"] == ip4(2999 % 50, b"p" * (2999 % 1400))


# -- errors ----------------------------------------------------------------------------------
def test_missing_file_exits_66(tmp_path):
    r = call(["tc-readpcap", tmp_path / "nope.pcap"])
    assert r.returncode == 66
    assert r.stderr.decode() == f"tc-readpcap: error: {tmp_path / 'nope.pcap'}: no such file\n"
    assert r.stdout == b""


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"", b"\xa1"])
def test_not_a_capture_exits_65_with_one_line(tmp_path, content):
    r = readpcap(tmp_path, content)
    assert r.returncode == 65
    err = r.stderr.decode()
    assert err.count("\n") == 1 and ("not a capture" in err or "not a pcap" in err)
    assert r.stdout == b""


@pytest.mark.parametrize("cut", [10, 3])  # mid-packet data, mid record header
def test_truncated_capture_emits_earlier_packets_warns_and_fails(tmp_path, cut):
    content = cf.pcap([(TS0 + i, eth(ETH4, ip4(i, b"q" * 100))) for i in range(5)])
    content = content[:-(14 + 140 + 16) + cut] if cut == 3 else content[:-cut]
    r = readpcap(tmp_path, content)
    assert r.returncode == 65
    assert [p["data"] for p in pkts(r.stdout)] == [ip4(i, b"q" * 100) for i in range(4)]
    err = r.stderr.decode()
    assert err.startswith("tc-readpcap: warning:") and "cut off" in err and err.count("\n") == 1


def test_truncated_pcapng_block(tmp_path):
    content = cf.shb() + cf.idb(101) + cf.epb(0, 1, ip4(1)) + cf.epb(0, 2, ip4(2))[:-9]
    r = readpcap(tmp_path, content)
    assert r.returncode == 65 and [p["data"] for p in pkts(r.stdout)] == [ip4(1)]
    assert "cut off" in r.stderr.decode()


def test_bad_filter_exits_2_before_output(tmp_path):
    r = readpcap(tmp_path, cf.pcap([(TS0, eth(ETH4, ip4()))]), "-F", "tcp and prot")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("tc-readpcap: error: bad filter expression") and err.count("\n") == 1
    assert r.stdout == b""


def test_refuses_a_terminal(tmp_path):
    p = tmp_path / "a.pcap"
    p.write_bytes(cf.pcap([(TS0, eth(ETH4, ip4()))]))
    master, slave = os.openpty()
    try:
        r = subprocess.run([tool_path("tc-readpcap"), str(p)], stdout=slave,
                           stderr=subprocess.PIPE, env=tool_env(), timeout=30)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 2 and b"terminal" in r.stderr


def test_sigint_flushes_and_exits_0():
    proc = subprocess.Popen([tool_path("tc-readpcap"), "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    try:
        proc.stdin.write(cf.pcap([(TS0 + i, eth(ETH4, ip4(i))) for i in range(3)]))
        proc.stdin.flush()
        time.sleep(0.5)  # bounded: it is now blocked reading stdin
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert len(pkts(out)) == 3


# -- library ---------------------------------------------------------------------------------
def test_reader_on_a_pipe_reports_frames_and_linktype():
    r, w = os.pipe()
    content = cf.pcap([(TS0, eth(ETH4, ip4(1))), (TS0 + 1, eth(ETH6, ip6(2)))])
    os.write(w, content)
    os.close(w)
    try:
        got = list(CaptureReader(r, "pipe").frames())
    finally:
        os.close(r)
    assert [(lt, ts, fr) for lt, ts, fr, _o in got] == [
        (1, TS0, eth(ETH4, ip4(1))), (1, TS0 + 1, eth(ETH6, ip6(2)))]


def test_version_does_not_import_heavy_modules():
    code = ("import sys, tcpcopylib.cli.readpcap as m; "
            "assert not {'dpkt', 'pcapy', 'cbor2'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True, env=tool_env(), timeout=30,
                   cwd=str(REPO))


def test_batch_holds_the_same_packets_within_1ms(tmp_path):
    import struct

    big = ip4(7, b"y" * 1000)
    # a packet every 0.3 ms: 4 fit in 1 ms, fewer than -B 8
    frames = [(TS0 + i * 300_000, eth(ETH4, ip4(i % 50, b"p" * (i % 300)))) for i in range(60)]
    frames.insert(30, (TS0 + 8_950_000, eth(ETH4, big)[:14 + 100], 14 + len(big)))  # cut off
    content = cf.pcap(frames, snaplen=1500)
    plain = readpcap(tmp_path, content).stdout
    r = readpcap(tmp_path, content, "-B", "8", "--stats")
    assert r.returncode == 0, r.stderr
    assert pkts(r.stdout) == pkts(plain)  # expanded by every reader: the same records
    assert "61 packets read, 61 emitted" in r.stderr.decode()
    recs = [x for x in cbor_items(r.stdout) if isinstance(x, dict) and x["t"] != "header"]
    sizes = []
    for x in recs:
        if x["t"] == "pkts":
            n = len(x["ts"]) // 8
            stamps = struct.unpack(f">{n}Q", x["ts"])
            assert n <= 8 and stamps[-1] - stamps[0] <= 1_000_000
            sizes.append(n)
        else:  # only the cut-off datagram goes alone, with its original length
            assert x["t"] == "pkt" and x["len"] == len(big)
            sizes.append("pkt")
    assert sizes.count("pkt") == 1 and sum(n for n in sizes if n != "pkt") == 60
    assert max(n for n in sizes if n != "pkt") == 4  # the 1 ms limit, not the count, bites
    r = readpcap(tmp_path, cf.pcap([(TS0 + i, f) for i, (_t, f) in enumerate(frames[:30])]),
                 "-B", "8")
    assert pkts(r.stdout) == pkts(readpcap(tmp_path, cf.pcap(
        [(TS0 + i, f) for i, (_t, f) in enumerate(frames[:30])])).stdout)
    assert readpcap(tmp_path, content, "-B", "0").returncode == 2


# ---- the copy loop in process (tcpcopylib.readpcap.PcapCopier): frames in, a memfd out ----

class _Input:
    """What PcapCopier needs of a CaptureReader: a name and a format."""

    def __init__(self, name, fmt="pcap"):
        self.name, self.format = name, fmt


def _damaged(frames):
    yield from frames
    from tcpcopylib.errors import CaptureFormatError

    raise CaptureFormatError("b.pcap: capture cut off mid-packet")


def _copy_in_memory(inputs, **kw):
    from tcpcopylib.readpcap import PcapCopier

    said = []
    out = os.memfd_create("out")
    try:
        copier = PcapCopier("tc-readpcap", warn=said.append, **kw)
        status = copier.run(inputs, out)
        os.lseek(out, 0, os.SEEK_SET)
        data = os.read(out, 1 << 24)
    finally:
        os.close(out)
    return status, data, copier, said


def test_copier_in_process_counts_skips_and_keeps_a_damaged_file():
    a = [(1, TS0, eth(ETH4, ip4(1)), None), (1, TS0 + 1, eth(0x0806, ARP), None),
         (147, TS0 + 2, b"x" * 40, None), (147, TS0 + 3, b"y" * 40, None),
         (101, TS0 + 4, ip6(2), None)]
    b = [(1, TS0 + 5, eth(ETH4, ip4(3)), None)]
    status, data, copier, said = _copy_in_memory(
        [(_Input("a.pcap"), a), (_Input("b.pcap"), _damaged(b))])
    assert status == 65  # (the damaged file: what came before the damage is kept)
    assert said == ["warning: link type 147 not supported; its frames are skipped",
                    "warning: b.pcap: capture cut off mid-packet"]
    recs = decode(data, headers=True)
    assert [(r["t"], r.get("source")) for r in recs] == [
        ("header", "a.pcap"), ("pkt", None), ("pkt", None), ("header", "b.pcap"), ("pkt", None)]
    assert [r["data"] for r in recs if r["t"] == "pkt"] == [ip4(1), ip6(2), ip4(3)]
    assert copier.counts() == {"read": 6, "emitted": 3, "non_ip": 3, "filtered": 0,
                               "bytes": len(ip4(1)) + len(ip6(2)) + len(ip4(3))}


def test_copier_in_process_batches_within_1ms_and_stops_at_the_limit():
    frames = [(1, TS0 + i * 400_000, eth(ETH4, ip4(i)), None) for i in range(10)]
    status, data, copier, _ = _copy_in_memory([(_Input("a.pcap"), frames)], batch=8, limit=7)
    assert status == 0 and copier.emitted == 7 and copier.read == 7
    items = [x for x in cbor_items(data) if isinstance(x, dict) and x["t"] != "header"]
    # 0, 0.4, 0.8 ms (1.2 ms is more than 1 ms after the first), 1.2 .. 2.0, 2.4
    assert [len(x["len"]) // 2 for x in items] == [3, 3, 1]  # (a column of 16-bit lengths)
    assert [r["data"] for r in decode(data)] == [ip4(i) for i in range(7)]
