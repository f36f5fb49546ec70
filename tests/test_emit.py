"""tc-emit: checksum checks (unit) and real sends into the namespace lab (netns)."""

import errno
import os
import shutil

import cbor2
import pytest
from tc import call, stream, tool_path

from tcpcopylib import packet
from tcpcopylib.emit import Emitter, fix_ip4_header, ip4_header_ok, parse_mac, tcp_sum_ok
from tcpcopylib.errors import UsageError
from tcpcopylib.records import encode_pkts

C4, T4 = packet.ip_bytes("10.200.9.2"), packet.ip_bytes("10.200.1.2")
C6, T6 = packet.ip_bytes("fd00:200:9::2"), packet.ip_bytes("fd00:200:1::2")
MSS = b"\x02\x04\x05\xb4"


def syn(src, dst, sport, dport=8080, payload=b""):
    return packet.build_tcp(src, dst, sport, dport, 1000, 0, packet.TH_SYN, options=MSS,
                            payload=payload)


def corrupt_tcp_sum(data):
    b = bytearray(data)
    off = (b[0] & 0x0F) * 4 if b[0] >> 4 == 4 else 40
    b[off + 16] ^= 0x5A
    return bytes(b)


# -- unit ------------------------------------------------------------------------------

@pytest.mark.parametrize("src,dst", [(C4, T4), (C6, T6)], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("plen", [0, 1, 7, 1400])
def test_tcp_sum_ok_matches_reference(src, dst, plen):
    good = syn(src, dst, 40000, payload=os.urandom(plen))
    assert tcp_sum_ok(good) is True and packet.tcp_checksum_ok(good)
    bad = corrupt_tcp_sum(good)
    assert tcp_sum_ok(bad) is False and not packet.tcp_checksum_ok(bad)
    b = bytearray(good)
    b[-1 if plen else 30] ^= 1  # a flipped bit anywhere in the segment
    assert tcp_sum_ok(bytes(b)) is False


def test_tcp_sum_ok_not_checkable():
    udp = bytearray(syn(C4, T4, 1))
    udp[9] = 17
    assert tcp_sum_ok(bytes(udp)) is None
    frag = bytearray(syn(C4, T4, 1))
    frag[6] |= 0x20  # more fragments
    assert tcp_sum_ok(bytes(frag)) is None


def test_ip4_header_fix():
    b = bytearray(syn(C4, T4, 1))
    assert ip4_header_ok(b)
    b[10:12] = b"\xde\xad"
    assert not ip4_header_ok(b)
    fix_ip4_header(b)
    assert ip4_header_ok(b) and bytes(b) == syn(C4, T4, 1)


def test_parse_mac():
    assert parse_mac("02:00:00:00:01:0a") == bytes([2, 0, 0, 0, 1, 10])
    for bad in ("02:00:00:00:01", "zz:00:00:00:01:02", "0200.0000.0102"):
        with pytest.raises(UsageError):
            parse_mac(bad)


class FakeSender:
    link_layer = False

    def __init__(self, fail=None):
        self.sent, self.fail = [], fail or {}

    def send(self, data):
        e = self.fail.get(data[19] if data[0] >> 4 == 4 else data[39])
        if e:
            raise OSError(e, os.strerror(e))
        self.sent.append(data)


def test_emitter_counts_fixes_skips_and_errors():
    warned = []
    s = FakeSender(fail={3: errno.EPERM, 4: errno.ENETUNREACH})
    em = Emitter(s, lambda name, e: warned.append(name))
    d3 = packet.ip_bytes("10.200.1.3")
    d4 = packet.ip_bytes("10.200.1.4")
    good, bad = syn(C4, T4, 1), corrupt_tcp_sum(syn(C6, T6, 2))
    assert em.emit(good) and em.emit(bad)
    for _ in range(3):
        em.emit(syn(C4, d3, 3))
    em.emit(syn(C4, d4, 4))
    assert not em.emit(b"\x45" + b"\0" * 10)          # too short
    assert not em.emit(syn(C4, T4, 5)[:30], orig_len=44)  # truncated
    assert em.emit(syn(C4, T4, 6))  # errors never stop the stream
    em.close()
    assert s.sent == [good, syn(C6, T6, 2), syn(C4, T4, 6)]  # the bad checksum recomputed
    assert (em.sent, em.fixed, em.failed) == (3, 1, 4)
    assert em.errors == {"EPERM": 3, "ENETUNREACH": 1}
    assert warned == ["EPERM", "ENETUNREACH"]  # once per kind
    assert em.skips == {"malformed": 1, "truncated": 1}
    assert "EPERM 3" in em.summary()


def test_link_layer_fixes_ip_header_checksum():
    s = FakeSender()
    s.link_layer = True
    em = Emitter(s)
    b = bytearray(syn(C4, T4, 1))
    b[10:12] = b"\0\0"
    assert em.emit(bytes(b))
    em.close()
    assert s.sent == [syn(C4, T4, 1)] and em.fixed == 1


@pytest.mark.parametrize("threaded", [False, True])
def test_emitter_batches_in_order(threaded):
    s = FakeSender()
    em = Emitter(s, batch=4, threaded=threaded)
    pkts = [syn(C4, T4, i) for i in range(10)]
    for p in pkts:
        em.emit(p)
    em.flush()
    em.close()
    assert s.sent == pkts and em.sent == 10


def test_usage_errors():
    r = call(["tc-emit", "--dst-mac", "02:00:00:00:00:01"])
    assert r.returncode == 2 and b"need -o" in r.stderr
    r = call(["tc-emit", "-o", "lo"])
    assert r.returncode == 2 and b"--dst-mac" in r.stderr


# -- in the lab ------------------------------------------------------------------------

def emit(lab, *args, input=b"", host="online", prefix=()):
    return lab.run(host, [*prefix, tool_path("tc-emit"), *args], input=input,
                   capture_output=True, timeout=30)


def synacks(frames):
    out = []
    for _ptype, ip in frames:
        t = packet.parse_tcp(ip)
        if t and t.flags & (packet.TH_SYN | packet.TH_ACK) == packet.TH_SYN | packet.TH_ACK:
            out.append((t.dport, t.ack))
    return out


def watch(lab, client):
    bpf = f"tcp and host {client}"
    return {"assistant": lab.sniff("assistant", lab.assist_if, bpf),
            "online-lan": lab.sniff("online", lab.online_if, bpf),
            "online-cli": lab.sniff("online", lab.online_cli_if, bpf),
            "client": lab.sniff("client", lab.client_if, bpf)}


def syn_recv_peers(lab):
    out = lab.run("target", ["ss", "-Htn", "state", "syn-recv"], capture_output=True,
                  text=True).stdout
    return out


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("link", [False, True], ids=["raw", "afpacket"])
def test_forged_syn_reaches_target_synack_only_on_assistant(lab, v6, link):
    lab.start_server("target", port=8080)
    src, dst = (C6, T6) if v6 else (C4, T4)
    client = lab.client_ip6 if v6 else lab.client_ip
    pkts = [syn(src, dst, 41000), corrupt_tcp_sum(syn(src, dst, 41001))]
    args = ["--stats"]
    if link:
        args += ["-o", lab.online_if, "--dst-mac", lab.target_mac]
    socks = watch(lab, client)
    try:
        # the second one in a batch (a pkts record, as tc-readpcap --batch writes them)
        r = emit(lab, *args, input=stream([{"t": "pkt", "ts": 1, "data": pkts[0]}])
                 + encode_pkts([2], pkts[1:]))
        assert r.returncode == 0, r.stderr
        assert b"sent 2, failed 0, fixed checksums 1" in r.stderr
        got = synacks(socks["assistant"].frames(0.3))
        assert sorted(got) == [(41000, 1001), (41001, 1001)]
        for k in ("online-lan", "online-cli", "client"):
            assert synacks(socks[k].frames()) == [], k
    finally:
        for s in socks.values():
            s.close()
    peers = syn_recv_peers(lab)
    assert f"{client}]:41000" in peers or f"{client}:41000" in peers, peers


@pytest.mark.netns
def test_send_errors_counted_and_not_fatal(lab):
    if shutil.which("iptables") is None:
        pytest.fail("iptables not installed")
    lab.start_server("target", port=8080)
    r = lab.run("online", ["iptables", "-A", "OUTPUT", "-p", "tcp", "-d", lab.target_ip,
                           "--dport", "9999", "-j", "DROP"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    recs = []
    for i in range(6):
        recs.append({"t": "pkt", "ts": i, "data": syn(C4, T4, 42000 + i, 9999)})  # EPERM
        recs.append({"t": "pkt", "ts": i, "data": syn(C4, T4, 43000 + i)})          # fine
    recs.append({"t": "pkt", "ts": 9, "data": syn(C4, packet.ip_bytes("192.0.2.1"), 1)})
    recs.append({"t": "claim", "add": []})
    with lab.sniff("assistant", lab.assist_if, f"tcp and host {lab.client_ip}") as asn:
        r = emit(lab, "--stats", input=stream(recs))
        got = synacks(asn.frames(0.3))
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert sorted(p for p, _ in got) == [43000 + i for i in range(6)]
    assert "sent 6, failed 7 (ENETUNREACH 1, EPERM 6)" in err
    assert "ignored records 1" in err
    assert err.count("warning: send failed: EPERM") == 1


@pytest.mark.netns
@pytest.mark.parametrize("garbage", [
    os.urandom(64),
    cbor2.dumps({"t": "pkt", "ts": 1, "data": syn(C4, T4, 44000)}),  # no label, no header
], ids=["random", "unlabelled"])
def test_garbage_input_sends_nothing(lab, garbage):
    with lab.sniff("online", lab.online_if, "tcp") as onl:
        r = emit(lab, input=garbage)
        assert r.returncode == 65, r.stderr
        assert b"not a tcpcopy record stream" in r.stderr
        assert onl.frames(0.1) == []


@pytest.mark.netns
def test_unknown_interface(lab):
    r = emit(lab, "-o", "nosuch0", "--dst-mac", lab.target_mac, input=stream([]))
    assert r.returncode == 66
    assert r.stderr.decode().strip() == "tc-emit: error: nosuch0: no such interface"


@pytest.mark.netns
def test_missing_input_file(lab, tmp_path):
    r = emit(lab, str(tmp_path / "nope.cbor"))
    assert r.returncode == 66


@pytest.mark.netns
@pytest.mark.parametrize("link", [False, True], ids=["raw", "afpacket"])
def test_without_cap_net_raw_exits_77(lab, link):
    """Root minus CAP_NET_RAW (uid 65534 could not even read this Python's install)."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) not installed")
    args = ["-o", lab.online_if, "--dst-mac", lab.target_mac] if link else []
    with lab.sniff("online", lab.online_if, "tcp") as onl:
        r = emit(lab, *args, input=stream([{"t": "pkt", "ts": 1, "data": syn(C4, T4, 1)}]),
                 prefix=["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"])
        assert onl.frames(0.1) == []
    assert r.returncode == 77, r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_RAW" in lines[0]
