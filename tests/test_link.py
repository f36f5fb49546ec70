"""tcpcopylib.link: the link-layer decoders (IP_OFFSET, ip_span) on every supported link
type, and each fast variant against them on the same frames: tc-readpcap's LINK_SPANS,
tc-capture's Capturer.batch (its inline Ethernet / Linux cooked path) and Capturer.frame,
tc-intercept's inline Ethernet batch and its per-frame path. Frames: Ethernet with 0-2
VLAN tags, Linux cooked v1/v2 (incoming and outgoing), raw IP under each number, BSD and
OpenBSD loopback; IPv4 (options too) and IPv6 inside; non-IP ethertypes and address
families, padding, truncation and changed bytes."""

from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from packetgen import A4, A6, B4, B6, any_datagram, tcp_datagrams
from tcpcopylib.capture import Capturer
from tcpcopylib.errors import UsageError
from tcpcopylib.intercept import Interceptor, fb_record
from tcpcopylib.link import (IP_OFFSET, LINK_SPANS, LINKTYPE_ETHERNET, LINKTYPE_IPV4,
                             LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
                             LINKTYPE_LOOP, LINKTYPE_NULL, LINKTYPE_RAW, PACKET_HOST,
                             PACKET_OUTGOING, bpf_dlt, ip_span)
from tcpcopylib.packet import TH_ACK, build_tcp
from tcpcopylib.testing import BufferWriter

TS = 1_700_000_000 * 10**9  # (next_batch() metadata: s + µs)
MACS = b"\x02" * 6 + b"\x04" * 6
ARP = 0x0806


def ethertype_of(ip: bytes) -> int:
    return 0x86DD if ip[:1] and ip[0] >> 4 == 6 else 0x0800


def eth(ip: bytes, vlans=(), etype=None) -> bytes:
    tags = b"".join(struct.pack("!HH", tpid, 5) for tpid in vlans)
    return MACS + tags + struct.pack("!H", ethertype_of(ip) if etype is None else etype) + ip


def sll(ip: bytes, pkttype=PACKET_HOST, etype=None) -> bytes:
    et = ethertype_of(ip) if etype is None else etype
    return struct.pack("!HHH8sH", pkttype, 1, 6, b"\x02" * 8, et) + ip


def sll2(ip: bytes, pkttype=PACKET_HOST, etype=None) -> bytes:
    et = ethertype_of(ip) if etype is None else etype
    return struct.pack("!HHIHBB8s", et, 0, 2, 1, pkttype, 6, b"\x02" * 8) + ip


def loopback(ip: bytes, af=None, endian="<") -> bytes:
    if af is None:
        af = 10 if ip[:1] and ip[0] >> 4 == 6 else 2
    return struct.pack(endian + "I", af) + ip


# -- the general decoders, by example --------------------------------------------------------
IP4 = build_tcp(B4, A4, 8080, 1000, 5, 6, 0x18, payload=b"hello")
IP6 = build_tcp(B6, A6, 8080, 1000, 5, 6, 0x18, payload=b"hello")


@pytest.mark.parametrize("lt,frame,offset", [
    (LINKTYPE_ETHERNET, eth(IP4), 14),
    (LINKTYPE_ETHERNET, eth(IP6), 14),
    (LINKTYPE_ETHERNET, eth(IP4, [0x8100]), 18),
    (LINKTYPE_ETHERNET, eth(IP6, [0x88A8, 0x8100]), 22),
    (LINKTYPE_ETHERNET, eth(IP4, [0x9100]), 18),
    (LINKTYPE_ETHERNET, eth(b"", [0x88A8, 0x8100], 0x86DD), 22),  # (no IP bytes: ip_span's)
    (LINKTYPE_ETHERNET, eth(IP4, etype=ARP), -1),
    (LINKTYPE_ETHERNET, eth(IP4, [0x8100], ARP), -1),
    (LINKTYPE_ETHERNET, eth(IP4)[:13], -1),
    (LINKTYPE_ETHERNET, eth(IP4, [0x8100])[:17], -1),  # the tag cut short
    (LINKTYPE_LINUX_SLL, sll(IP4), 16),
    (LINKTYPE_LINUX_SLL, sll(IP6, PACKET_OUTGOING), 16),  # (direction: Capturer's concern)
    (LINKTYPE_LINUX_SLL, sll(IP4, etype=ARP), -1),
    (LINKTYPE_LINUX_SLL, sll(struct.pack("!HH", 5, 0x0800) + IP4, etype=0x8100), 20),  # VLAN
    (LINKTYPE_LINUX_SLL2, sll2(IP4), 20),
    (LINKTYPE_LINUX_SLL2, sll2(IP6), 20),
    (LINKTYPE_LINUX_SLL2, sll2(IP4, etype=ARP), -1),
    (LINKTYPE_LINUX_SLL2, sll2(IP4)[:19], -1),
    (LINKTYPE_RAW, IP4, 0), (12, IP6, 0), (14, IP4, 0), (LINKTYPE_IPV4, IP4, 0),
    (LINKTYPE_IPV6, IP6, 0),
    (LINKTYPE_NULL, loopback(IP4), 4),
    (LINKTYPE_NULL, loopback(IP6, 30, ">"), 4),  # Darwin's AF_INET6, big-endian writer
    (LINKTYPE_NULL, loopback(IP6, 24), 4),
    (LINKTYPE_NULL, loopback(IP4, 7), -1),        # not an IP address family
    (LINKTYPE_NULL, b"\x02\x00\x00\x02" + IP4, -1),  # both ends set: no byte order fits
    (LINKTYPE_NULL, loopback(IP4)[:3], -1),
    (LINKTYPE_LOOP, loopback(IP4, 2, ">"), 4),
    (LINKTYPE_LOOP, loopback(IP6, 28, ">"), 4),
    (LINKTYPE_LOOP, loopback(IP4, 2, "<"), -1),  # network byte order only
], ids=lambda v: None if isinstance(v, bytes) else str(v))
def test_ip_offset(lt, frame, offset):
    assert IP_OFFSET[lt](frame, 0, len(frame)) == offset
    # a frame inside a larger buffer (a next_batch() block): offsets in the buffer
    buf = b"\xff" * 7 + frame + b"\x81\x00" * 4
    assert IP_OFFSET[lt](buf, 7, 7 + len(frame)) == (offset + 7 if offset >= 0 else -1)


def test_ip_span_cuts_padding_and_says_what_the_capture_lacks():
    f = eth(IP4) + bytes(8)  # padding / FCS
    assert ip_span(IP_OFFSET[LINKTYPE_ETHERNET], f, 0, len(f)) == (14, 14 + len(IP4), 0)
    cut = eth(IP4)[:50]
    assert ip_span(IP_OFFSET[LINKTYPE_ETHERNET], cut, 0, 50) == (14, 50, len(IP4))
    tso = bytearray(eth(IP4))
    tso[16:18] = b"\0\0"  # total length 0 (offloaded): the frame, and its wire length
    assert ip_span(IP_OFFSET[LINKTYPE_ETHERNET], bytes(tso), 0, len(tso)) == (14, len(tso), 0)
    assert ip_span(IP_OFFSET[LINKTYPE_ETHERNET], bytes(tso), 0, len(tso), 9000) == \
        (14, len(tso), 9000 - 14)
    assert ip_span(IP_OFFSET[LINKTYPE_RAW], b"\x10" + IP4[1:], 0, len(IP4)) is None
    assert ip_span(IP_OFFSET[LINKTYPE_ETHERNET], eth(b""), 0, 14) is None


def test_names_and_libpcap_numbers():
    assert bpf_dlt(LINKTYPE_RAW) == bpf_dlt(12) == bpf_dlt(14) == bpf_dlt(LINKTYPE_IPV4) == 12
    assert bpf_dlt(LINKTYPE_ETHERNET) == 1 and bpf_dlt(LINKTYPE_LINUX_SLL2) == 276
    assert set(LINK_SPANS) == set(IP_OFFSET)
    assert 147 not in IP_OFFSET  # a user link type: not supported


def test_interceptor_refuses_an_unsupported_link_type():
    class Cap:
        linktype = 147

    with pytest.raises(UsageError, match="unsupported link type 147"):
        Interceptor(Cap(), BufferWriter())


# -- frames for the property tests -----------------------------------------------------------
KINDS = ["eth", "eth-vlan", "eth-qinq", "sll", "sll-out", "sll2", "sll2-out", "raw",
         "raw12", "null", "null-be", "loop"]


@st.composite
def frames(draw, kinds=KINDS):
    """(link type, frame, offset of the IP header as built or -1) — the offset is None
    once the link header was changed or cut (no claim then, only agreement)."""
    kind = draw(st.sampled_from(kinds))
    ip = draw(st.one_of(tcp_datagrams(), any_datagram))
    not_ip = draw(st.integers(0, 9)) == 0
    if kind.startswith("eth"):
        vlans = {"eth": (), "eth-vlan": (0x8100,), "eth-qinq": (0x88A8, 0x8100)}[kind]
        f, lt, off = eth(ip, vlans, ARP if not_ip else None), LINKTYPE_ETHERNET, 14 + 4 * len(vlans)
    elif kind.startswith("sll2"):
        f = sll2(ip, PACKET_OUTGOING if kind.endswith("out") else PACKET_HOST,
                 ARP if not_ip else None)
        lt, off = LINKTYPE_LINUX_SLL2, 20
    elif kind.startswith("sll"):
        f = sll(ip, PACKET_OUTGOING if kind.endswith("out") else PACKET_HOST,
                ARP if not_ip else None)
        lt, off = LINKTYPE_LINUX_SLL, 16
    elif kind.startswith("raw"):
        f, lt, off, not_ip = ip, 12 if kind == "raw12" else LINKTYPE_RAW, 0, False
    else:
        endian = "<" if kind == "null" else ">"
        f = loopback(ip, 7 if not_ip else None, endian)
        lt, off = (LINKTYPE_NULL if kind.startswith("null") else LINKTYPE_LOOP), 4
    hdr = off  # the link header's length as built
    if not_ip:
        off = -1
    f += bytes(draw(st.integers(0, 2)) * 6)  # Ethernet padding / trailer
    b = bytearray(f)
    change = draw(st.sampled_from(["none", "none", "byte", "cut"]))
    if change == "byte" and b:
        at = draw(st.integers(0, len(b) - 1))
        b[at] = draw(st.integers(0, 255))
        if at < hdr:
            off = None
    elif change == "cut":
        b = b[:draw(st.integers(0, len(b)))]
        if len(b) < hdr and off is not None:
            off = -1  # the link header cut short
    return lt, bytes(b), off


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(frame=frames(), orig_extra=st.sampled_from([0, 0, 1, 1000]))
def test_decoders_find_the_datagram_and_spans_agree(frame, orig_extra):
    lt, f, off = frame
    got = IP_OFFSET[lt](f, 0, len(f))
    if off is not None:
        assert got == off
    buf = b"\x08\x00" * 9 + f + b"\x81\x00"
    assert IP_OFFSET[lt](buf, 18, 18 + len(f)) == (got + 18 if got >= 0 else -1)
    orig = len(f) + orig_extra if orig_extra else 0
    span = ip_span(IP_OFFSET[lt], f, 0, len(f), orig)
    assert LINK_SPANS[lt](f, orig) == span
    if span is not None:
        assert ip_span(IP_OFFSET[lt], buf, 18, 18 + len(f), orig) == (
            span[0] + 18, span[1] + 18, span[2])


# -- tc-capture: Capturer.batch (inline fast path) against Capturer.frame -------------------


def _batch(fs):
    """A next_batch() result: the frames in one buffer, and their metadata."""
    meta, off = [], 0
    for i, f in enumerate(fs):
        meta.append(struct.pack("=IIII", TS // 10**9, i, off, len(f)))
        off += len(f)
    return b"".join(fs), b"".join(meta)


@st.composite
def batches(draw):
    """(link type, frames) of one link type, as one capture hands them over."""
    kinds = {LINKTYPE_ETHERNET: ["eth", "eth-vlan", "eth-qinq"],
             LINKTYPE_LINUX_SLL: ["sll", "sll-out"], LINKTYPE_LINUX_SLL2: ["sll2", "sll2-out"],
             LINKTYPE_RAW: ["raw"], LINKTYPE_NULL: ["null"]}
    lt = draw(st.sampled_from(sorted(kinds)))
    fs = draw(st.lists(frames(kinds[lt]), min_size=1, max_size=12))
    return lt, [f for _, f, _ in fs]


_SYN4 = build_tcp(A4, B4, 5000, 80, 1, 0, 0x02)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=batches(), count=st.sampled_from([0, 0, 1, 3]), mtu=st.sampled_from([1500, 200]))
# (found by this test: the IPv4 ethertype on a version-0 datagram; -c reached just after
# an empty frame, at the same buffer offset)
@example(batch=(LINKTYPE_ETHERNET, [eth(b"\x00" + _SYN4[1:], etype=0x0800)]), count=0, mtu=1500)
@example(batch=(LINKTYPE_ETHERNET, [eth(_SYN4), b"", eth(_SYN4)]), count=2, mtu=1500)
def test_capturer_batch_is_capturer_frame(batch, count, mtu):
    lt, fs = batch
    buf, meta = _batch(fs)
    wa, wb = BufferWriter(), BufferWriter()
    a = Capturer(wa, mtu=mtu, count=count, addresses=(A4, B4, A6, B6))
    b = Capturer(wb, mtu=mtu, count=count, addresses=(A4, B4, A6, B6))
    n = a.batch(buf, meta, lt)
    for i, f in enumerate(fs):
        b.frame(f, 0, len(f), lt, TS + i * 1000)
        if b.done:
            break
    assert bytes(wa.buf) == bytes(wb.buf) and wa.records == wb.records
    assert (a.frames, a.records, a.foreign, a.truncated, a.supersegs, a.done) == \
        (b.frames, b.records, b.foreign, b.truncated, b.supersegs, b.done)
    assert n == (b.frames if b.done else len(fs))


def test_capturer_frame_uses_the_link_decoders():
    """What the general path keeps and drops, link by link (the inbound TCP to A4)."""
    ip = build_tcp(B4, A4, 5000, 80, 1, 0, TH_ACK, payload=b"x")
    cases = [(LINKTYPE_ETHERNET, eth(ip, [0x88A8, 0x8100]), 1),
             (LINKTYPE_LINUX_SLL, sll(ip), 1), (LINKTYPE_LINUX_SLL, sll(ip, PACKET_OUTGOING), 0),
             (LINKTYPE_LINUX_SLL, sll(ip, etype=ARP), 0),
             (LINKTYPE_LINUX_SLL2, sll2(ip), 1), (LINKTYPE_LINUX_SLL2, sll2(ip, 4), 0),
             (12, ip, 1), (14, ip, 1), (LINKTYPE_RAW, ip, 1), (LINKTYPE_IPV4, ip, 1),
             (LINKTYPE_NULL, loopback(ip), 1), (LINKTYPE_NULL, loopback(ip, 7), 0),
             (LINKTYPE_LOOP, loopback(ip, 2, ">"), 1), (147, ip, 0)]
    for lt, f, kept in cases:
        w = BufferWriter()
        c = Capturer(w, addresses=(A4,))
        c.frame(f, 0, len(f), lt, TS)
        assert (c.records, c.foreign) == (kept, 1 - kept), lt
        if kept:
            assert cbor2.loads(bytes(w.buf))["data"] == ip


# -- tc-intercept: the inline Ethernet batch and the per-frame path -------------------------
def _interceptor(lt, payload):
    class Cap:
        linktype = lt

    w = BufferWriter()
    return Interceptor(Cap(), w, payload=payload), w


def _general_fb(lt, fs, payload):
    """The fb records the general decoders give for these frames."""
    out = b""
    for i, f in enumerate(fs):
        p = IP_OFFSET[lt](f, 0, len(f))
        rec = fb_record(f, TS + i * 1000, payload, p, len(f)) if p >= 0 else None
        out += rec or b""
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=batches(), payload=st.sampled_from([0, 0, 4, 300, -1]))
def test_interceptor_paths_are_the_general_decoders(batch, payload):
    lt, fs = batch
    ic, w = _interceptor(lt, payload)
    for i, f in enumerate(fs):  # the per-frame path (other link types, pcapy without batches)
        ic._frame(f, TS + i * 1000)
    want = _general_fb(lt, fs, payload)
    assert bytes(w.buf) == want
    assert (ic.captured, ic.written + ic.skipped) == (len(fs), len(fs))
    if lt == LINKTYPE_ETHERNET:  # the inline batch loop
        ic, w = _interceptor(lt, payload)
        ic._ether_batch(*_batch(fs))
        assert bytes(w.buf) == want and w.records == ic.written
        assert (ic.captured, ic.written + ic.skipped) == (len(fs), len(fs))
