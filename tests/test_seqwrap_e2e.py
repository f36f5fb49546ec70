"""Sequence numbers crossing 2^32 mid-stream, in both directions, replayed byte-exact.

A lab recording (real clients, real online server) has its ISNs rewritten per connection
(replay_harness.rewrite_isns) so that the client's data and the online server's data both
cross 2^32 in the middle of a segment, a few KB into the stream; the client's acks cross
with the server's data. The replay then forges client sequence numbers across the wrap
towards the target, reads the target's acks of them across the wrap, and gates requests
on captured acks that wrap. The target's log must equal the capture byte for byte.
"""

import pytest

import capfiles
import replay_harness as h
from tcpcopylib.packet import build_tcp, tcp_checksum_ok

TIMEOUT = 120
C, S = capfiles.A4, capfiles.B4


def _synthetic(path, rounds=4, req=700, resp=3000, mss=1000):
    """A client at 10.0.0.1:40000 talking to 10.0.0.5:8080: `rounds` requests of `req`
    bytes, each answered by `resp` bytes in segments of at most `mss`."""
    cseq, sseq, ts, pkts = 1000, 7_000_000, capfiles.TS0, []

    def add(frm_client, seq, ack, flags, payload=b""):
        nonlocal ts
        ts += 1000
        src, dst, sp, dp = (C, S, 40000, 8080) if frm_client else (S, C, 8080, 40000)
        pkts.append((ts, capfiles.eth(0x0800, build_tcp(src, dst, sp, dp, seq, ack, flags,
                                                        payload=payload))))

    add(True, cseq, 0, 0x02)
    add(False, sseq, cseq + 1, 0x12)
    cseq, sseq = cseq + 1, sseq + 1
    add(True, cseq, sseq, 0x10)
    for r in range(rounds):
        data = bytes((r * 31 + i) & 0xFF for i in range(req))
        for i in range(0, req, mss):
            add(True, cseq, sseq, 0x18, data[i:i + mss])
            cseq += len(data[i:i + mss])
        body = bytes((r * 17 + i * 3) & 0xFF for i in range(resp))
        for i in range(0, resp, mss):
            add(False, sseq, cseq, 0x18, body[i:i + mss])
            sseq += len(body[i:i + mss])
        add(True, cseq, sseq, 0x10)
    add(True, cseq, sseq, 0x11)
    add(False, sseq, cseq + 1, 0x11)
    add(True, cseq + 1, sseq + 1, 0x10)
    path.write_bytes(capfiles.pcap(pkts, ns=False))


def _payloads(pcap):
    return [(h.parse_tcp(ip)[0], h.parse_tcp(ip)[7]) for _, ip in h.pcap_ip_packets(pcap)]


def test_rewrite_isns_crosses_2_32_both_ways(tmp_path):
    """The rewriting helper itself: every data byte and every stream kept, checksums right,
    and both directions' data and acks on both sides of 2^32 (read back from the file)."""
    src, dst = tmp_path / "orig.pcap", tmp_path / "wrapped.pcap"
    _synthetic(src)
    before = h.seq_wraps(src, 8080)
    assert before[0]["c2s"]["after"] == before[0]["s2c"]["after"] == 0  # a control
    info = h.rewrite_isns(src, dst, 8080)
    assert len(info) == 1 and info[0]["c2s"]["length"] == 2800
    assert info[0]["s2c"]["length"] == 12000
    assert 0 < info[0]["c2s"]["cross_at"] < 2800 and 0 < info[0]["s2c"]["cross_at"] < 12000
    [w] = h.seq_wraps(dst, 8080)
    for d, total in (("c2s", 2800), ("s2c", 12000)):
        assert w[d]["before"] >= 1000 and w[d]["after"] >= 1000, w
        assert w[d]["before"] + w[d]["after"] == total, w
        assert w[d]["acks_before"] and w[d]["acks_after"], w
        assert w[d]["before"] == info[0][d]["cross_at"], (w, info)
    # the payloads, their order and everything but seq/ack/checksums are unchanged
    assert _payloads(src) == _payloads(dst)
    assert all(tcp_checksum_ok(ip) for _, ip in h.pcap_ip_packets(dst))
    for d in ("c2s", "s2c"):
        [a], [b] = h.tcp_streams(src, 8080, d), h.tcp_streams(dst, 8080, d)
        assert a.bytes == b.bytes and len(a.bytes) > 0 and not b.data()[1]
    # a segment spans the wrap in each direction (seq near 2^32, seq + len past it)
    spans = {h.parse_tcp(ip)[2] == 40000 for _, ip in h.pcap_ip_packets(dst)
             if (t := h.parse_tcp(ip))[7] and t[4] + len(t[7]) > 1 << 32}
    assert spans == {True, False}


@pytest.mark.netns
@pytest.mark.parametrize("v6,midconn", [(False, False), (True, False), (False, True)],
                         ids=["v4", "v6", "v4-midconn"])
def test_replay_across_seq_wrap_byte_identical(lab, tmp_path, v6, midconn):
    """midconn: the capture starts after the handshakes (tc-session fakes the SYN; offset
    0 is the first captured byte, the wrap comes later)."""
    # 3 keep-alive connections, 40 request/response rounds each (responses of 0..3,900
    # bytes of body): about 3.8 KB from each client, about 83 KB from the server
    n, rounds = 3, 40
    rec = h.record(lab, tmp_path / "rec", "keepalive", "--conns", n, "--requests", rounds,
                   v6=v6, midconn=midconn)
    assert rec.client["n_errors"] == 0 and rec.client["answers"] == n * rounds, rec.client
    wrapped = tmp_path / "wrapped.pcap"
    info = h.rewrite_isns(rec.pcap, wrapped, h.PORT)
    wraps = h.seq_wraps(wrapped, h.PORT)
    assert len(wraps) == n, (info, wraps)
    for w in wraps:  # mid-stream, both ways, a few KB in
        for d in ("c2s", "s2c"):
            assert w[d]["before"] >= 1500 and w[d]["after"] >= 1500, wraps
            assert w[d]["acks_before"] and w[d]["acks_after"], wraps
    orig = {s.client: s.bytes for s in h.tcp_streams(rec.pcap, h.PORT)}
    assert {s.client: s.bytes for s in h.tcp_streams(wrapped, h.PORT)} == orig
    rep = h.replay(lab, wrapped, tmp_path / "replay", v6=v6, timeout=TIMEOUT)
    assert not rep.timed_out, rep.diagnostics()
    for name in ("tc-readpcap", "tc-session", "tc-pace", "tc-emit"):
        assert rep.rc(name) == 0, f"{name} exited {rep.rc(name)}\n{rep.diagnostics()}"
    res = h.compare_streams(h.tcp_streams(wrapped, h.PORT), rep.logged())
    assert res.ok and res.identical == n, f"{res.describe()}\n{rep.stats}\n{rep.diagnostics()}"
    # the replayed client data crossed 2^32 on the wire to the target too
    for w in h.seq_wraps(tmp_path / "replay" / "target.pcap", h.PORT):
        assert w["c2s"]["before"] >= 1500 and w["c2s"]["after"] >= 1500, w
    out = rep.stats["outcomes"]
    assert out["completed"] == n and sum(out.values()) == n, rep.stats
    # every request after the first, and the FIN, waited for the response to the one
    # before (the captured acks wrap too): gated by its bytes, never by the timeout. (A
    # gate ended by the 100 ms quiet rule needs feedback delayed that long mid-response:
    # a loaded machine, at most a couple of times.)
    st = rep.stats
    assert st["gate_bytes"] + st["gate_quiet"] == n * rounds, st
    assert st["gate_quiet"] <= 2 and st["gate_timeout"] == 0, st
    assert rep.stats["fake_syn"] == (n if midconn else 0), rep.stats
