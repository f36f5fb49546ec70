"""The link layer: link-type numbers, and where the IP datagram is in a captured frame.

Every tool that reads frames (tc-readpcap from files, tc-capture and tc-intercept from
libpcap or AF_PACKET) strips the link layer here, with struct on bytes.

Link types are the numbers of the tcpdump.org registry, as pcap and pcapng files store
them (LINKTYPE_*). libpcap's pcap_datalink() gives the same numbers for a live capture,
except for raw IP: its DLT_RAW is 12 (14 on OpenBSD), and some files carry those numbers
too. All of them are raw IP here (RAW_LINKTYPES); ``bpf_dlt()`` gives libpcap's filter
compiler the number it wants.

``IP_OFFSET[linktype](buf, start, end)`` is the general decoder of one frame,
buf[start:end]; ``ip_span()`` also finds where the datagram ends (padding, snap length).
``LINK_SPANS`` holds the per-frame function tc-readpcap calls, with a fast variant for
Ethernet. tc-capture's batch loop inlines the link types of ETHERTYPE_AT (and PKTTYPE_AT),
tc-intercept's untagged Ethernet. Each fast variant is tested against the general decoder
on the same frames (tests/test_link.py).
"""

from __future__ import annotations

import struct

from tcpcopylib.packet import ip_length

LINKTYPE_NULL = 0           # BSD loopback: a 4-byte address family, the writer's byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101          # raw IPv4 or IPv6, no link header
LINKTYPE_LOOP = 108         # OpenBSD loopback: the address family in network byte order
LINKTYPE_LINUX_SLL = 113    # Linux cooked capture v1 (the "any" interface)
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276   # Linux cooked capture v2
#: raw IP under every number it comes with (12 and 14: libpcap's DLT_RAW, see above)
RAW_LINKTYPES = (LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6)
#: for messages: what is supported
SUPPORTED = "Ethernet (VLAN tags too), Linux cooked v1/v2, raw IP, BSD/OpenBSD loopback"

ETHERTYPE_IPV4, ETHERTYPE_IPV6 = 0x0800, 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)  # 802.1Q, 802.1ad, and the older QinQ value
#: link types whose header ends with an ethertype (VLAN tags may follow it):
#: linktype -> (offset of the ethertype, header length without VLAN tags)
ETHERTYPE_AT = {LINKTYPE_ETHERNET: (12, 14), LINKTYPE_LINUX_SLL: (14, 16),
                LINKTYPE_LINUX_SLL2: (0, 20)}

# Linux packet types: sll_pkttype in a cooked header, and in an AF_PACKET socket address
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST, PACKET_OUTGOING = range(5)
#: cooked link types -> offset of the byte holding the packet type (v1's field is 16 bits,
#: big-endian, and its values fit the low byte)
PKTTYPE_AT = {LINKTYPE_LINUX_SLL: 1, LINKTYPE_LINUX_SLL2: 10}

# Address families of IPv4/IPv6 in loopback headers, across systems
AF_INET_VALUES = (2,)
AF_INET6_VALUES = (10, 24, 28, 30)  # Linux, NetBSD/OpenBSD, FreeBSD, Darwin

_U16_from = struct.Struct("!H").unpack_from
_U32_from = struct.Struct("!I").unpack_from


# -- the general decoders: function(buf, start, end) -> offset of the IP header, or -1 -----
def _with_ethertype(et_at: int, hdr_len: int):
    """The decoder of a link type whose header holds an ethertype at ``et_at`` and is
    ``hdr_len`` bytes long (Ethernet, Linux cooked); VLAN tags after it are skipped."""

    def ip_offset(buf, start: int, end: int) -> int:
        p = start + hdr_len
        if end < p:
            return -1
        etype = _U16_from(buf, start + et_at)[0]
        while etype in VLAN_TPIDS:  # a tag: 2 bytes of TCI, then the next ethertype
            if end < p + 4:
                return -1
            etype = _U16_from(buf, p + 2)[0]
            p += 4
        return p if etype == ETHERTYPE_IPV4 or etype == ETHERTYPE_IPV6 else -1

    return ip_offset


def _raw(buf, start: int, end: int) -> int:
    return start  # (ip_span and the IP parsers check the version)


def _null(buf, start: int, end: int) -> int:
    """BSD loopback: the address family in 4 bytes of the writer's byte order."""
    if end - start < 4:
        return -1
    b0, b1, b2, b3 = buf[start], buf[start + 1], buf[start + 2], buf[start + 3]
    if b1 or b2 or (b0 and b3):
        return -1
    af = b0 | b3  # one end of the 4 bytes holds the value
    return start + 4 if af in AF_INET_VALUES or af in AF_INET6_VALUES else -1


def _loop(buf, start: int, end: int) -> int:
    """OpenBSD loopback: the address family in network byte order."""
    if end - start < 4:
        return -1
    af = _U32_from(buf, start)[0]
    return start + 4 if af in AF_INET_VALUES or af in AF_INET6_VALUES else -1


#: link type -> function(buf, start, end): the offset in buf of the IP header of the frame
#: buf[start:end], or -1 if the frame carries no IPv4/IPv6 datagram (ARP, a runt, ...).
#: A link type not in it is not supported.
IP_OFFSET = {lt: _with_ethertype(*at) for lt, at in ETHERTYPE_AT.items()}
IP_OFFSET.update({LINKTYPE_NULL: _null, LINKTYPE_LOOP: _loop})
IP_OFFSET.update((lt, _raw) for lt in RAW_LINKTYPES)


def ip_span(ip_offset, buf, start: int, end: int, orig_len: int = 0):
    """(first, stop, ip_orig_len) of the IP datagram in the frame buf[start:end], offsets
    in buf, or None if the frame carries no IPv4/IPv6 datagram.

    ``ip_offset`` is the frame's IP_OFFSET entry; ``orig_len`` the frame's length on the
    wire if the capture holds less. Link-layer padding and trailers past the IP length are
    cut off; ``ip_orig_len`` is the datagram's full length when the capture holds less of
    it, else 0. Where the IP header gives no length (packet.ip_length() is 0), the
    datagram is what the frame holds.
    """
    p = ip_offset(buf, start, end)
    if p < 0:
        return None
    tot = ip_length(buf, p, end)
    if tot < 0:
        return None
    if tot:
        if p + tot <= end:
            return p, p + tot, 0
        return p, end, tot
    if orig_len > end - start:
        return p, end, orig_len - (p - start)
    return p, end, 0


def bpf_dlt(linktype: int) -> int:
    """The link-type number libpcap's filter compiler wants (raw IP: DLT_RAW, 12 on Linux;
    pcapy refuses 101)."""
    return 12 if linktype in RAW_LINKTYPES else linktype


# -- tc-readpcap's per-frame functions ----------------------------------------------------
_ETH_IP4 = struct.Struct("!HBBH").unpack_from  # ethertype, version/IHL, TOS, total length


_ETHERNET = IP_OFFSET[LINKTYPE_ETHERNET]


def _span_ethernet(frame, orig_len: int):
    """ip_span of an Ethernet frame, with a fast path for untagged IPv4 that fits."""
    if len(frame) >= 18:
        etype, vhl, _tos, tot = _ETH_IP4(frame, 12)
        if etype == ETHERTYPE_IPV4 and vhl >> 4 == 4 and 20 <= tot <= len(frame) - 14:
            return 14, 14 + tot, 0
    return ip_span(_ETHERNET, frame, 0, len(frame), orig_len)


def _span_of(ip_offset):
    return lambda frame, orig_len: ip_span(ip_offset, frame, 0, len(frame), orig_len)


#: link type -> function(frame, orig_len) -> ip_span() of the whole frame
LINK_SPANS = {lt: _span_of(f) for lt, f in IP_OFFSET.items()}
LINK_SPANS[LINKTYPE_ETHERNET] = _span_ethernet
