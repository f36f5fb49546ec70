"""Live capture of the client->server direction of TCP traffic to this host (tc-capture).

What is kept: inbound TCP datagrams (IPv4, or IPv6 with TCP as the first next header) whose
destination is a local address of this host, as "pkt" records. With ``server_half``
(tc-capture --server-half) also the server->client half: TCP datagrams whose source is a
local address and whose source port has a listening socket here (``listening_ports``), as
"s2c" records, a kind no replaying stage reads (the capture then takes both directions from
the kernel, and the general path: Capturer.batch's fast path is the client half's).

The replay's own packets are never captured again, whatever the BPF filter: tc-emit sends
them *out* of this host (outgoing, dropped by the direction check) and addresses them to
the target (not a local address, dropped by the destination check); their source is a
captured client's, so they are no local server's answers either. The checks are applied
in Python on every packet, on top of the kernel-side direction setting (pcap_setdirection /
PACKET_IGNORE_OUTGOING; not with server_half).

GRO/LRO super-segments longer than the MTU are split back into MTU-sized segments
(``split_segment``) with their own sequence numbers, IP lengths/ids and checksums.

Engines: ``PcapEngine`` (libpcap's TPACKET_V3 ring through pcapy-ng, batch reads with
``next_batch``) and ``AfPacketEngine`` (a plain AF_PACKET socket, one recv per packet).
Both feed link-layer frames to ``Capturer``, which strips the link layer, filters, splits
and writes "pkt" records. The hot path is struct/bytes slicing, no per-packet objects.
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import select
import socket
import struct
import time

from tcpcopylib.errors import NoInputError, NoPermissionError, UsageError
from tcpcopylib.link import (ETHERTYPE_AT, IP_OFFSET, LINKTYPE_ETHERNET, LINKTYPE_RAW,
                             PACKET_OUTGOING, PKTTYPE_AT, bpf_dlt)
from tcpcopylib.packet import (TH_ACK, TH_CWR, TH_FIN, TH_PSH, TH_RST, TH_SYN, fix_checksums,
                               ip_length)
from tcpcopylib.wire import (DATA1, DATA2, PKT_MAP3, PKT_START1, PKT_START2, encode_pkt,
                             encode_s2c)

ETH_P_ALL = 0x0003

# link types with a fast path in Capturer.batch: (ethertype offset, header length,
# packet-type byte offset or -1)
_FAST_LINKTYPES = {lt: (et_at, hdr_len, PKTTYPE_AT.get(lt, -1))
                   for lt, (et_at, hdr_len) in ETHERTYPE_AT.items()}


DEFAULT_SNAPLEN = 262144
DEFAULT_BUFFER_KIB = 32768
DEFAULT_MTU = 1500
ADDR_REFRESH_S = 2.0
RSS_CHECK_S = 0.2     # how often --max-memory looks at the resident size
MAX_SHED_KEYS = 1 << 16
# after a kernel drop, new sessions are shed this long. 1 s shed 40 % of the sessions at
# 4,000 short sessions/s on a busy lab where the drops alone would have cost 1-4 %; 0.2 s
# kept 91 % with no drop and no partial session (bench_live, same minute).
DROP_SHED_S = 0.2
_SEC_USEC = struct.Struct("=II")

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U16N = struct.Struct("=H")  # host order (sockaddr_ll)


# -- record encoding: tcpcopylib.wire (encode_pkt; Capturer.batch packs the start of a pkt
# record inline, PKT_START*, then appends the datagram) -------------------------------------
# from the ethertype: (ethertype, IP version/IHL byte, IPv4 total length, protocol,
# destination)
_FAST_IP4 = struct.Struct("!HBxH5xB6x4s")
# from the ethertype: (IPv6 payload length, next header, destination)
_FAST_IP6 = struct.Struct("!6xHB17x16s")


# -- GRO/LRO super-segment splitting ------------------------------------------------------------
def split_segment(dgram: bytes, mtu: int) -> list[bytes]:
    """Split one IPv4/IPv6 TCP datagram longer than ``mtu`` into datagrams of at most ``mtu``.

    Like GSO: the IP and TCP headers (with options) are copied to every piece; the sequence
    number advances by the payload already sent; the IPv4 id increases by one per piece;
    FIN and PSH stay on the last piece only, CWR on the first only; IP length and
    checksums are recomputed. A datagram that fits, or whose headers alone exceed ``mtu``,
    is returned unchanged.
    """
    v = dgram[0] >> 4
    if v == 4:
        ihl = (dgram[0] & 0x0F) * 4
        total = _U16.unpack_from(dgram, 2)[0]
    elif v == 6:
        ihl = 40
        plen = _U16.unpack_from(dgram, 4)[0]
        total = 40 + plen if plen else len(dgram)  # payload length 0: jumbogram/BIG TCP
    else:
        return [dgram]
    total = min(total, len(dgram))
    if total <= mtu or total < ihl + 20:
        return [dgram]
    doff = (dgram[ihl + 12] >> 4) * 4
    hlen = ihl + doff
    mss = mtu - hlen
    if mss <= 0 or hlen > total:
        return [dgram]
    payload = memoryview(dgram)[hlen:total]
    seq = _U32.unpack_from(dgram, ihl + 4)[0]
    flags = dgram[ihl + 13]
    ident = _U16.unpack_from(dgram, 4)[0] if v == 4 else 0
    headers = bytes(dgram[:hlen])
    out = []
    n = len(payload)
    for i, start in enumerate(range(0, n, mss)):
        chunk = payload[start:start + mss]
        buf = bytearray(headers)
        buf += chunk
        if v == 4:
            _U16.pack_into(buf, 2, hlen + len(chunk))
            _U16.pack_into(buf, 4, (ident + i) & 0xFFFF)
        else:
            _U16.pack_into(buf, 4, doff + len(chunk))
        _U32.pack_into(buf, ihl + 4, (seq + start) & 0xFFFFFFFF)
        f = flags
        if start + mss < n:
            f &= ~(TH_FIN | TH_PSH)
        if i:
            f &= ~TH_CWR
        buf[ihl + 13] = f
        out.append(bytes(fix_checksums(buf)))
    return out


# -- host facts (all namespace-correct: netlink, ioctl, /proc/net) ------------------------------
_NLMSG_HDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_NLMSG_DONE, _NLMSG_ERROR, _RTM_GETADDR = 3, 2, 22
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def local_addresses() -> frozenset:
    """Every IPv4/IPv6 address configured on this host (this network namespace), packed."""
    addrs = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(2.0)
        req = _NLMSG_HDR.pack(_NLMSG_HDR.size + _IFADDRMSG.size, _RTM_GETADDR,
                              _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + _IFADDRMSG.pack(0, 0, 0, 0, 0)
        s.sendto(req, (0, 0))
        for _ in range(10000):  # bounded: a dump ends with NLMSG_DONE long before this
            data = s.recv(1 << 16)
            pos = 0
            while pos + _NLMSG_HDR.size <= len(data):
                ln, typ, _fl, _seq, _pid = _NLMSG_HDR.unpack_from(data, pos)
                if ln < _NLMSG_HDR.size:
                    return frozenset(addrs)
                if typ == _NLMSG_DONE or typ == _NLMSG_ERROR:
                    return frozenset(addrs)
                if typ == _RTM_GETADDR - 2:  # RTM_NEWADDR (20)
                    fam = data[pos + _NLMSG_HDR.size]
                    a = pos + _NLMSG_HDR.size + _IFADDRMSG.size
                    end = pos + ln
                    while a + 4 <= end:
                        alen, atype = _RTATTR.unpack_from(data, a)
                        if alen < 4:
                            break
                        if atype in (_IFA_ADDRESS, _IFA_LOCAL) and fam in (
                                socket.AF_INET, socket.AF_INET6):
                            addrs.add(bytes(data[a + 4:a + alen]))
                        a += (alen + 3) & ~3
                pos += (ln + 3) & ~3
    return frozenset(addrs)


_SOCK_DIAG_BY_FAMILY, _NETLINK_SOCK_DIAG = 20, 4
_TCP_LISTEN = 10
# inet_diag_req_v2: family, protocol, ext, pad, states; then a zeroed inet_diag_sockid
_DIAG_REQ = struct.Struct("=BBBxI48x")
_DIAG_SPORT_AT = _NLMSG_HDR.size + 4  # the socket's port in an inet_diag_msg (big endian)


def listening_ports() -> frozenset:
    """The TCP ports with a listening socket in this network namespace, each as 2 bytes
    big endian (as in a TCP header): the servers whose answers --server-half keeps.
    Asked of the kernel's sock_diag (only listening sockets: cheap with many connections);
    /proc/net/tcp{,6} where that is not available."""
    ports = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as s:
            s.settimeout(2.0)
            for fam in (socket.AF_INET, socket.AF_INET6):
                req = _DIAG_REQ.pack(fam, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
                s.sendto(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY,
                                         _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + req, (0, 0))
                done = False
                for _ in range(100000):  # bounded: a dump ends with NLMSG_DONE
                    data = s.recv(1 << 16)
                    pos = 0
                    while pos + _NLMSG_HDR.size <= len(data):
                        ln, typ = _NLMSG_HDR.unpack_from(data, pos)[:2]
                        if ln < _NLMSG_HDR.size or typ in (_NLMSG_DONE, _NLMSG_ERROR):
                            done = True
                            break
                        if typ == _SOCK_DIAG_BY_FAMILY:
                            ports.add(bytes(data[pos + _DIAG_SPORT_AT:pos + _DIAG_SPORT_AT + 2]))
                        pos += (ln + 3) & ~3
                    if done:
                        break
    except OSError:  # no sock_diag (CONFIG_INET_DIAG off): the slower text tables
        return listening_ports_proc()
    return frozenset(ports)


def listening_ports_proc() -> frozenset:
    """listening_ports() from /proc/net/tcp{,6} (one line per socket, listening or not)."""
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                        ports.add(bytes.fromhex(fields[1].rpartition(":")[2]))
        except OSError:
            pass
    return frozenset(ports)


def interface_mtu(iface: str) -> int:
    """The MTU of ``iface`` (SIOCGIFMTU), or DEFAULT_MTU if it cannot be read."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            r = fcntl.ioctl(s.fileno(), 0x8921, struct.pack("16si12x", iface.encode()[:15], 0))
        except OSError:
            return DEFAULT_MTU
    return struct.unpack_from("i", r, 16)[0]


def interface_rx_drops(iface: str) -> int:
    """Receive drops counted by the interface (``any``: all interfaces), from /proc/net/dev."""
    total = 0
    try:
        with open("/proc/net/dev") as f:
            lines = f.readlines()[2:]
    except OSError:
        return 0
    for line in lines:
        name, _, rest = line.partition(":")
        if iface == "any" or name.strip() == iface:
            fields = rest.split()
            if len(fields) > 3:
                total += int(fields[3])
    return total


def pipe_backlog(fd: int) -> int:
    """Bytes waiting in pipe (or socket) fd (FIONREAD: either end of a pipe); 0 if it
    cannot say."""
    import fcntl
    import termios

    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def check_interface(iface: str) -> None:
    """NoInputError (66) if ``iface`` does not exist here (``any`` always does)."""
    if iface == "any":
        return
    try:
        socket.if_nametoindex(iface)
    except OSError:
        raise NoInputError(f"{iface}: no such interface") from None


def _bad_filter(expr: str, err) -> UsageError:
    return UsageError(f"bad filter expression {expr!r}: {err}")


def _index_of(meta, off: int) -> int:
    """Index of the frame at buffer offset ``off`` in next_batch() metadata (of the frame
    with bytes there: an empty frame before it has the same offset)."""
    for i, (_s, _u, o, caplen) in enumerate(struct.iter_unpack("=IIII", meta)):
        if o == off and caplen:
            return i
    return len(meta) >> 4


# -- the packet path -------------------------------------------------------------------------
class Capturer:
    """Turns captured link-layer frames into "pkt" records on a RecordWriter.

    Counters: frames (seen), records (written), foreign (not inbound TCP to a local
    address: dropped), truncated, supersegs (datagrams longer than the MTU) and
    split_records (the records made from them); s2c_records (of records: the server half).

    With ``server_half``, a TCP datagram from a local address and a server port (the
    2-byte ports ``server_ports``; default: listening_ports(), re-read with the addresses)
    is written as an "s2c" record, whichever way it goes (on loopback a server's answer
    comes in: both ends are local); otherwise the client half's rule holds. A frame the
    link layer says is outgoing (``outgoing`` or a cooked header's packet type) is never
    client->server.
    """

    def __init__(self, writer, mtu: int = DEFAULT_MTU, count: int = 0, addresses=None,
                 max_rss: int = 0, server_half: bool = False, server_ports=None,
                 shed_lag_ms: float = 0):
        self.writer = writer
        self.mtu = mtu
        self.count = count  # stop after this many records (0: never)
        self._fixed_addrs = addresses
        self.local = frozenset(addresses) if addresses is not None else local_addresses()
        self.server_half = server_half
        self._fixed_ports = server_ports
        self.server_ports = frozenset()
        if server_half:
            self.server_ports = (frozenset(server_ports) if server_ports is not None
                                 else listening_ports())
        self._next_refresh = time.monotonic() + ADDR_REFRESH_S
        self.s2c_records = 0
        self.frames = self.records = self.foreign = self.truncated = 0
        self.supersegs = self.split_records = 0
        self.done = False
        # Shedding: while over --max-memory (max_rss bytes), more than --shed-lag behind the
        # kernel (the newest frame of a batch older than shed_lag ns), while the output pipe
        # fills (backlog_over) or just after a kernel drop (drop_seen()), new sessions (a
        # SYN without ACK) are shed with every later packet of theirs, so no half session
        # reaches tc-session. ``shedding``: the reason ("memory", "lag", "backlog",
        # "capture-drops") or None; shed_reasons counts the sessions by it.
        self.max_rss = max_rss
        self.shedding = None
        self.shed_keys: dict = {}
        self.shed_sessions = self.shed_packets = 0
        self.shed_reasons: dict = {}
        self._next_rss_check = 0.0
        self.over_memory = False
        self.shed_lag = int(shed_lag_ms * 1_000_000)
        self.newest_ts = 0     # capture time (ns) of the newest frame read since refresh()
        self.lag_over = False
        self.max_lag = 0
        self.drops_until = 0.0
        self.backlog_over = False  # the output pipe is filling (LiveCapture sets it)

    def refresh(self, now: float) -> None:
        """Re-read the local addresses every ADDR_REFRESH_S (call between batches)."""
        if now >= self._next_refresh:
            self._next_refresh = now + ADDR_REFRESH_S
            if self._fixed_addrs is None:
                self.local = local_addresses()
            if self.server_half and self._fixed_ports is None:
                self.server_ports = listening_ports()
        if self.max_rss and now >= self._next_rss_check:
            self._next_rss_check = now + RSS_CHECK_S
            self.over_memory = resident_bytes() > self.max_rss
        if self.shed_lag and self.newest_ts:
            lag = time.time_ns() - self.newest_ts
            self.newest_ts = 0
            self.max_lag = max(self.max_lag, lag)
            # above the limit: shed; below half of it: caught up
            self.lag_over = lag > self.shed_lag or self.lag_over and lag >= self.shed_lag // 2
        self.shedding = ("memory" if self.over_memory else "lag" if self.lag_over
                         else "backlog" if self.backlog_over
                         else "capture-drops" if now < self.drops_until else None)

    def drop_seen(self, now: float) -> None:
        """The kernel dropped packets (a counter grew): shed new sessions for DROP_SHED_S."""
        self.drops_until = now + DROP_SHED_S

    def _shed(self, buf, p: int, v: int, from_server: bool = False) -> bool:
        """True if the datagram at buf[p:] belongs to a shed session (or starts one; a
        server's packet never does)."""
        ihl = (buf[p] & 0x0F) * 4 if v == 4 else 40
        if from_server:
            client = buf[p + 16:p + 20] if v == 4 else buf[p + 24:p + 40]
            key = (client, buf[p + ihl + 2:p + ihl + 4] + buf[p + ihl:p + ihl + 2])
            if key in self.shed_keys:
                self.shed_packets += 1
                return True
            return False
        src = buf[p + 12:p + 16] if v == 4 else buf[p + 8:p + 24]
        key = (src, buf[p + ihl:p + ihl + 4])  # client address, both ports
        flags = buf[p + ihl + 13]
        if key in self.shed_keys:
            self.shed_packets += 1
            if flags & (TH_FIN | TH_RST):
                del self.shed_keys[key]
            return True
        if self.shedding and flags & TH_SYN and not flags & TH_ACK:
            if len(self.shed_keys) >= MAX_SHED_KEYS:
                del self.shed_keys[next(iter(self.shed_keys))]  # forget the oldest
            self.shed_keys[key] = True
            self.shed_sessions += 1
            self.shed_reasons[self.shedding] = self.shed_reasons.get(self.shedding, 0) + 1
            self.shed_packets += 1
            return True
        return False

    def frame(self, buf, off: int, end: int, linktype: int, ts: int,
              outgoing: bool = False) -> None:
        """One link-layer frame buf[off:end]; buf is bytes (a slice copies). ``outgoing``:
        the capture says this host sent it (AF_PACKET's packet type)."""
        self.frames += 1
        ip_offset = IP_OFFSET.get(linktype)  # None: a link type not supported
        if end - off < 40 or ip_offset is None:  # (< 40: a runt, no IP+TCP header fits)
            self.foreign += 1
            return
        p = ip_offset(buf, off, end)
        pkttype_at = PKTTYPE_AT.get(linktype)
        if pkttype_at is not None and buf[off + pkttype_at] == PACKET_OUTGOING:
            outgoing = True
        if p < 0 or outgoing and not self.server_half:
            self.foreign += 1
            return
        self.datagram(buf, p, end, ts, outgoing)

    def batch(self, buf, meta, linktype: int, ts_unit: int = 1000) -> int:
        """A next_batch() result: ``meta`` holds (sec, usec, offset, caplen) per frame
        ("=IIII"); ``ts_unit``: nanoseconds per unit of the second field (1000: pcap's
        microseconds; 1: the ring's nanoseconds).

        The common case (an IPv4/IPv6 TCP datagram to a local address, no VLAN tag, not
        longer than the MTU, not truncated) is handled inline, encoding straight into the
        writer's buffer; everything else goes through frame(). Returns the frame count.
        """
        n = len(meta) >> 4
        if n and self.shed_lag:  # (the newest frame's capture time: how far behind we are)
            sec, usec = _SEC_USEC.unpack_from(meta, (n - 1) << 4)
            self.newest_ts = sec * 1_000_000_000 + usec * ts_unit
        spec = (None if self.shedding or self.shed_keys or self.server_half
                else _FAST_LINKTYPES.get(linktype))
        frame = self.frame
        if spec is None:
            for i, (sec, usec, off, caplen) in enumerate(struct.iter_unpack("=IIII", meta)):
                frame(buf, off, off + caplen, linktype, sec * 1_000_000_000 + usec * ts_unit)
                if self.done:
                    return i + 1
            return n
        et_pos, l2, pk_pos = spec
        min_cap = l2 + 40
        local, mtu, count = self.local, self.mtu, self.count
        w = self.writer
        out = w.buf
        mv = memoryview(buf)
        ip4, ip6 = _FAST_IP4.unpack_from, _FAST_IP6.unpack_from
        pack1, pack2 = PKT_START1.pack, PKT_START2.pack  # see encode_pkt
        head, data1, data2 = PKT_MAP3, DATA1, DATA2
        slow = foreign = 0
        last_sec = sec_ns = -1
        records = self.records
        try:
            for sec, usec, off, caplen in struct.iter_unpack("=IIII", meta):
                if caplen >= min_cap and (pk_pos < 0 or buf[off + pk_pos] != PACKET_OUTGOING):
                    et, vhl, total, proto, dst = ip4(buf, off + et_pos)
                    if et != 0x0800 or vhl >> 4 != 4:
                        if et == 0x86DD and vhl >> 4 == 6:
                            total, proto, dst = ip6(buf, off + et_pos)
                            total = total + 40 if total else 0  # 0: jumbogram, general path
                        else:
                            proto = 0
                    if proto == 6 and 40 <= total <= mtu and total <= caplen - l2:
                        if dst not in local:
                            foreign += 1
                            continue
                        if sec != last_sec:
                            last_sec, sec_ns = sec, sec * 1_000_000_000
                        p = off + l2
                        if total < 256:  # (>= 40 bytes: the 1-byte length of encode_pkt)
                            out += pack1(head, sec_ns + usec * ts_unit, data1, total)
                        else:
                            out += pack2(head, sec_ns + usec * ts_unit, data2, total)
                        out += mv[p:p + total]
                        records += 1
                        if records == count:
                            self.done = True
                            n = _index_of(meta, off) + 1
                            break
                        continue
                # anything else: the general path (it counts its own frames)
                slow += 1
                w.records += records - self.records  # sync the fast path's records
                self.records = records
                frame(buf, off, off + caplen, linktype, sec * 1_000_000_000 + usec * ts_unit)
                records = self.records
                if self.done:
                    n = _index_of(meta, off) + 1
                    break
        finally:
            mv.release()
            w.records += records - self.records
            self.frames += n - slow
            self.foreign += foreign
            self.records = records
        if len(out) >= w.bufsize:
            w.flush()
        return n

    def from_server(self, buf, p: int, v: int) -> bool:
        """Is the TCP datagram at buf[p:] (IP version v) sent by a server of this host:
        from a local address and a server port (see server_half)?"""
        if v == 4:
            sport_at = p + (buf[p] & 0x0F) * 4
            src = buf[p + 12:p + 16]
        else:
            sport_at = p + 40
            src = buf[p + 8:p + 24]
        return buf[sport_at:sport_at + 2] in self.server_ports and src in self.local

    def datagram(self, buf, p: int, end: int, ts: int, outgoing: bool = False) -> None:
        """One IP datagram at buf[p:end] (end = end of the captured bytes); ``outgoing``:
        the link layer says this host sent it."""
        if end - p < 40:
            self.foreign += 1
            return
        v = buf[p] >> 4
        if v == 4:
            if buf[p + 9] != 6:
                self.foreign += 1
                return
            dst = buf[p + 16:p + 20]
        elif v == 6:
            if buf[p + 6] != 6:
                self.foreign += 1
                return
            dst = buf[p + 24:p + 40]
        else:
            self.foreign += 1
            return
        total = ip_length(buf, p, end) or end - p  # (0: the header does not say)
        encode = encode_pkt
        server = self.server_half and self.from_server(buf, p, v)
        if server:
            encode = encode_s2c
        elif outgoing or dst not in self.local:
            self.foreign += 1
            return
        if (self.shedding or self.shed_keys) and self._shed(buf, p, v, server):
            return
        avail = end - p
        w = self.writer
        if total <= avail:
            data = buf[p:p + total]  # drops Ethernet padding
            if total > self.mtu:
                self.supersegs += 1
                for piece in split_segment(data, self.mtu):
                    self.split_records += 1
                    w.write_raw(encode(ts, piece))
                    self._written(server)
                    if self.done:
                        return
                return
            w.write_raw(encode(ts, data))
        else:  # cut by the snaplen
            self.truncated += 1
            w.write_raw(encode(ts, buf[p:end], orig_len=total))
        self._written(server)

    def _written(self, server: bool) -> None:
        """Count one record written (and stop at the count)."""
        self.records += 1
        if server:
            self.s2c_records += 1
        if self.records == self.count:
            self.done = True


# -- engines ----------------------------------------------------------------------------------
def _perm_or_missing(iface: str, msg: str):
    low = msg.lower()
    if "permission" in low or "not permitted" in low:
        return NoPermissionError(f"{iface}: {msg} (needs root or CAP_NET_RAW)")
    if "no such device" in low or "doesn't exist" in low or "no such" in low:
        return NoInputError(f"{iface}: no such interface")
    return None


# pcap_activate() status codes (pcap/pcap.h)
_PCAP_ERROR_NO_SUCH_DEVICE = -5
_PCAP_ERROR_PERM_DENIED = -8
_PCAP_ERROR_IFACE_NOT_UP = -9
_PCAP_ERROR_PROMISC_PERM_DENIED = -11


class PcapEngine:
    """libpcap via pcapy-ng: TPACKET_V3 ring, inbound only (``both_ways``: both
    directions; libpcap shows a loopback packet once, as it comes in), non-blocking batch
    reads."""

    name = "pcap"

    def __init__(self, iface: str, bpf: str, snaplen: int, buffer_kib: int,
                 both_ways: bool = False, promisc: bool = False):
        import pcapy

        self.iface = iface
        try:
            cap = pcapy.create(iface)
            cap.set_snaplen(snaplen)
            cap.set_promisc(1 if promisc else 0)
            # ms; no immediate mode in pcapy-ng: a block timer instead, which the kernel
            # counts in ticks (1 ms asked: one tick, 4 ms at HZ=250)
            cap.set_timeout(1)
            cap.set_buffer_size(buffer_kib * 1024)
            status = cap.activate()  # pcapy-ng returns libpcap's status, it does not raise
        except pcapy.PcapError as e:
            raise _perm_or_missing(iface, str(e)) or NoInputError(f"{iface}: {e}") from None
        if status is not None and status < 0:
            if status in (_PCAP_ERROR_PERM_DENIED, _PCAP_ERROR_PROMISC_PERM_DENIED):
                raise NoPermissionError(f"{iface}: permission denied (needs root or CAP_NET_RAW)")
            if status == _PCAP_ERROR_NO_SUCH_DEVICE:
                raise NoInputError(f"{iface}: no such interface")
            if status == _PCAP_ERROR_IFACE_NOT_UP:
                raise NoInputError(f"{iface}: interface is down")
            raise NoInputError(f"{iface}: cannot capture (libpcap status {status})")
        if not both_ways:
            try:
                cap.setdirection(pcapy.PCAP_D_IN)  # never see what this host sends
            except pcapy.PcapError as e:
                raise NoInputError(f"{iface}: cannot capture inbound only: {e}") from None
        try:
            cap.setfilter(bpf)
        except pcapy.PcapError as e:
            raise _bad_filter(bpf, e) from None
        cap.setnonblock(1)
        self._use(cap)

    def _use(self, cap) -> None:
        self.cap = cap
        self.linktype = cap.datalink()
        self.fd = cap.getfd()
        self._batch = getattr(cap, "next_batch", None)

    @classmethod
    def from_handle(cls, cap, iface: str) -> "PcapEngine":
        """The engine of an activated, non-blocking pcapy capture opened elsewhere
        (tc-intercept's, with its own options and errors)."""
        engine = cls.__new__(cls)
        engine.iface = iface
        engine._use(cap)
        return engine

    def read(self, capturer: Capturer, max_n: int = 1024) -> int:
        """Feed what the ring holds now to ``capturer``; returns the number of frames."""
        lt = self.linktype
        frame = capturer.frame
        if self._batch is not None:
            buf, meta = self._batch(max_n)
            if not meta:
                return 0
            return capturer.batch(buf, meta, lt)
        n = 0
        while n < max_n and not capturer.done:  # pcapy without next_batch
            hdr, data = self.cap.next()
            if hdr is None:
                break
            sec, usec = hdr.getts()
            frame(data, 0, len(data), lt, sec * 1_000_000_000 + usec * 1000)
            n += 1
        return n

    def drops(self) -> tuple[int, int]:
        """(kernel drops, interface drops as libpcap counts them)."""
        _recv, drop, ifdrop = self.cap.stats()
        return drop, ifdrop

    def kernel_stats(self) -> tuple[int, int, int]:
        """(received, dropped, dropped by the interface) as libpcap counts them."""
        return tuple(self.cap.stats())

    def read_batches(self, consumer, max_n: int = 1024) -> int:
        return self.read(consumer, max_n)

    def describe(self) -> str:
        return "libpcap TPACKET_V3 ring, block timer 1 ms or one kernel tick"

    def close(self) -> None:
        self.cap.close()


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
_ARPHRD_ETHER, _ARPHRD_LOOPBACK = 1, 772


def attach_bpf(sock: socket.socket, expr: str, linktype: int, snaplen: int) -> None:
    """Compile a tcpdump expression with libpcap (pcapy.compile) and attach it to ``sock``."""
    import pcapy

    try:
        insns = pcapy.compile(linktype, snaplen, expr, 1, 0xFFFFFFFF).get_bpf()
    except pcapy.PcapError as e:
        raise _bad_filter(expr, e) from None
    arr = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    prog = _SockFprog(len(insns), arr)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    bytes(ctypes.string_at(ctypes.addressof(prog), ctypes.sizeof(prog))))


class InterfaceDownError(NoInputError):
    """The interface exists but is down (tc-intercept reports it as unavailable, 69)."""


def _packet_socket(iface: str, bpf: str, snaplen: int, both_ways: bool, promisc: bool,
                   before_bind=None) -> tuple[socket.socket, int]:
    """An AF_PACKET socket on ``iface`` with the BPF filter ``bpf`` attached; returns it
    (non-blocking) and the link type of what it reads.

    A named Ethernet (or loopback) interface is read with SOCK_RAW and an Ethernet filter;
    ``any`` and other link types with SOCK_DGRAM (the kernel strips the link layer) and a
    raw-IP filter. Without ``both_ways`` the kernel ignores outgoing packets
    (PACKET_IGNORE_OUTGOING, kernel 4.20 and later; the readers check the packet type
    again). ``before_bind(sock)`` runs before the socket starts receiving (buffer and
    ring set-up); ``promisc`` puts a named interface into promiscuous mode for as long as
    the socket is open.
    """
    hatype = None
    if iface != "any":
        try:
            with open(f"/sys/class/net/{iface}/type") as f:
                hatype = int(f.read())
        except OSError:
            hatype = _ARPHRD_ETHER  # sysfs of another namespace: assume Ethernet
    raw = hatype in (_ARPHRD_ETHER, _ARPHRD_LOOPBACK)
    linktype = LINKTYPE_ETHERNET if raw else LINKTYPE_RAW
    # Named interface: opened for no protocol (it queues nothing) and bound for all only
    # once the filter is in place, so no frame of another interface, or one the filter
    # rejects, is queued in between. "any" has no name to bind to: open for all at once.
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW if raw else socket.SOCK_DGRAM,
                          socket.htons(ETH_P_ALL) if iface == "any" else 0)
    except PermissionError as e:
        raise NoPermissionError(f"{iface}: {e.strerror} (needs root or CAP_NET_RAW)") from None
    try:
        attach_bpf(s, bpf, bpf_dlt(linktype), snaplen)
        if not both_ways:
            try:
                s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                pass  # kernel < 4.20: the packet-type check of the readers drops them
        if before_bind is not None:
            before_bind(s)
        if iface != "any":  # unbound: every interface
            s.bind((iface, ETH_P_ALL))  # (Python puts it in network order)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ENETDOWN:
                raise InterfaceDownError(f"{iface}: interface is down")
            if promisc:
                mreq = struct.pack("iHH8x", socket.if_nametoindex(iface), PACKET_MR_PROMISC, 0)
                s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    except OSError as e:
        s.close()
        if isinstance(e, PermissionError):
            raise NoPermissionError(f"{iface}: {e.strerror} (needs root or CAP_NET_RAW)") from None
        raise NoInputError(f"{iface}: {e.strerror or e}") from None
    except BaseException:
        s.close()
        raise
    s.setblocking(False)
    return s, linktype


class _PacketStats:
    """The kernel's counters of an AF_PACKET socket (PACKET_STATISTICS), summed: the
    kernel resets them on every read."""

    sock: socket.socket
    _received = _dropped = 0

    def kernel_stats(self) -> tuple[int, int, int]:
        """(received, dropped, dropped by the interface: 0, not counted here)."""
        packets, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET,
                                                                  PACKET_STATISTICS, 8))
        self._received += packets  # (the kernel counts drops in packets too)
        self._dropped += drops
        return self._received, self._dropped, 0

    def drops(self) -> tuple[int, int]:
        return self.kernel_stats()[1], 0


class AfPacketEngine(_PacketStats):
    """A plain AF_PACKET socket with a kernel BPF filter; one recvfrom per packet.

    The socket is _packet_socket's. Outgoing packets are ignored by the kernel and dropped
    again here by their packet type; with ``both_ways`` they are read and marked outgoing,
    but for loopback's (the same packet comes in too: read once, as libpcap does).
    Timestamps are taken when a packet is read.
    """

    name = "afpacket"

    def __init__(self, iface: str, bpf: str, snaplen: int, buffer_kib: int,
                 both_ways: bool = False, promisc: bool = False):
        def rcvbuf(s):
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_kib * 1024)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_kib * 1024)

        self.iface = iface
        self.both_ways = both_ways
        self.sock, self.linktype = _packet_socket(iface, bpf, snaplen, both_ways, promisc,
                                                  rcvbuf)
        self.fd = self.sock.fileno()
        self.buf = bytearray(snaplen)

    def read(self, capturer: Capturer, max_n: int = 1024) -> int:
        recv = self.sock.recvfrom_into
        buf = self.buf
        lt = self.linktype
        frame = capturer.frame
        now = time.time_ns
        both_ways = self.both_ways
        n = 0
        while n < max_n:
            try:
                size, addr = recv(buf)
            except BlockingIOError:
                break
            n += 1
            outgoing = addr[2] == PACKET_OUTGOING
            if outgoing and (not both_ways or addr[3] == _ARPHRD_LOOPBACK):
                capturer.frames += 1
                capturer.foreign += 1
                continue
            frame(bytes(buf[:size]), 0, size, lt, now(), outgoing)
            if capturer.done:
                break
        return n

    read_batches = read  # (tc-intercept: frame by frame, the outgoing flag unused)

    def describe(self) -> str:
        return "AF_PACKET socket, one recvfrom per packet"

    def close(self) -> None:
        self.sock.close()


# -- the TPACKET_V2 ring (engine "ring") --------------------------------------------------------
PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 1, 1
PACKET_RX_RING, PACKET_VERSION, TPACKET_V2 = 5, 10, 1
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
TPACKET_ALIGNMENT = 16
# struct tpacket2_hdr: status, len, snaplen, mac, net, sec, nsec, vlan_tci, vlan_tpid, padding
_TP2_HDR = struct.Struct("=IIIHHIIHH4x")
_TP2_SNAPLEN_AT, _TP2_MAC_AT, _TP2_SEC_AT = 8, 12, 16
# the sockaddr_ll that follows it (at TPACKET_ALIGN(sizeof(tpacket2_hdr)) = 32)
_TP2_HATYPE_AT, _TP2_PKTTYPE_AT = 32 + 8, 32 + 10
# Where tpacket_rcv() puts the network header in a frame: after the header and the
# sockaddr_ll (52 bytes), room for a link header of at least 16 bytes, aligned to 16:
# offset 80 for SOCK_DGRAM and for link headers up to 28 bytes (Ethernet's 14: the frame
# starts at 66).
_TP2_NET_AT = 80
# Frames are rounded to a multiple of this; a block (a multiple of the page size) is made
# the least common multiple of frame and page, so it holds whole frames with no gap at its
# end and every frame of the ring is ``frame_size`` after the one before (see RingEngine).
_FRAME_ROUND = 128
_META = struct.Struct("=IIII")
# below this many frames, a batch's metadata is made a frame at a time: the strided slices
# cost about 5 us whatever their length, a frame about 0.5 us
_GATHER_MIN = 12
LINGER_S = 0.0001      # RingEngine.linger
LINGER_BATCH = 64      # capture_loop lingers after a batch of fewer frames than this
# a ring of fewer frames than this holds little of a burst (tc-capture and tc-intercept warn)
RING_FEW_FRAMES = 4096
MAX_DATAGRAM = 65536   # the largest GRO/TSO super-segment (without BIG TCP), lo's MTU
_SIOCETHTOOL = 0x8946
_ETHTOOL_GTSO, _ETHTOOL_GGSO, _ETHTOOL_GFLAGS, _ETHTOOL_GGRO = 0x1E, 0x23, 0x25, 0x2B
_ETH_FLAG_LRO = 1 << 15


def interface_offloads(iface: str) -> bool:
    """Can ``iface`` hand a capture packets longer than its MTU: GRO, LRO, TSO or GSO on?
    (Asked with the SIOCETHTOOL ioctl; True when it cannot tell.)"""
    import fcntl

    val = ctypes.create_string_buffer(8)  # struct ethtool_value {u32 cmd; u32 data}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in (_ETHTOOL_GGRO, _ETHTOOL_GFLAGS, _ETHTOOL_GTSO, _ETHTOOL_GGSO):
            struct.pack_into("=II", val, 0, cmd, 0)
            ifreq = struct.pack("16sP16x", iface.encode()[:15], ctypes.addressof(val))
            try:
                fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
            except OSError:
                return True
            data = struct.unpack_from("=II", val)[1]
            if data & _ETH_FLAG_LRO if cmd == _ETHTOOL_GFLAGS else data:
                return True
    return False


def ring_geometry(frame_bytes: int, buffer_bytes: int, page: int = mmap.PAGESIZE):
    """(frame size, block size, block count) of a TPACKET_V2 ring whose frames hold
    ``frame_bytes`` after the network-header offset and that takes about ``buffer_bytes``:
    frames of a multiple of _FRAME_ROUND (so of TPACKET_ALIGNMENT), blocks of a multiple
    of the page size holding a whole number of frames."""
    frame = -(-(_TP2_NET_AT + frame_bytes) // _FRAME_ROUND) * _FRAME_ROUND
    block = frame * page // math.gcd(frame, page)
    return frame, block, max(1, -(-buffer_bytes // block))


class RingEngine(_PacketStats):
    """A TPACKET_V2 ring (PACKET_RX_RING) mapped into this process, read in pure Python:
    immediate (poll() wakes as soon as the kernel has filled one frame; TPACKET_V3, as
    libpcap uses it, hands over whole blocks, on a timer when traffic is light) and
    batched (one wake-up reads every frame ready).

    The socket is _packet_socket's (the same filter and direction rules as
    AfPacketEngine). Each frame starts with a tpacket2_hdr, whose tp_status says who owns
    it (TP_STATUS_KERNEL: 0, or TP_STATUS_USER set: filled, ours until we write 0 back),
    then the sockaddr_ll (packet and link type), then the packet at tp_mac. Timestamps
    are the kernel's, in nanoseconds.

    Frames are fixed-size: each holds one packet whatever its size, so it is sized for the
    largest packet the capture may see (the MTU and the link header, or 64 KiB with
    offloads on, GRO super-segments; at most the snap length), and the ring of
    ``buffer_kib`` holds buffer_kib * 1024 / frame_size packets (``frame_nr``). (A veth
    whose peer segments nothing may hand over super-segments with its own offloads off:
    those are cut to the frame and counted as truncated.)

    A large batch costs no Python work per frame here: all frames are equally spaced, so
    the column of one header field over n frames is one strided slice of the mmap, and the
    batch's metadata (sec, nsec, offset, caplen: the "=IIII" of Capturer.batch) is made
    of such slices; handing frames back is four strided writes of zeros (tp_status). A
    small batch (below _GATHER_MIN), and frames that need a decision each (outgoing ones
    to skip, an unusual tp_mac), take a per-frame path; with ``both_ways`` every frame
    does (Capturer's general path, which --server-half takes anyway, wants each frame's
    direction).

    Ordering: the kernel writes a frame, then (after a write barrier) its tp_status; we
    read tp_status, then the frame, and write tp_status back only after the frame was
    consumed. Python has no read barrier to put in between: on x86 (TSO) loads are not
    reordered, so this is sound there; on weakly ordered CPUs (arm64) it is not
    guaranteed (not tested there).

    VLAN: the kernel strips the tag before the packet reaches the ring (its TCI is in
    tp_vlan_tci); libpcap puts it back into the frame, this engine does not (as
    AfPacketEngine: the records hold the IP datagram, which the tag does not change).
    """

    name = "ring"
    # capture_loop (tc-capture) flushes a small batch (fewer than LINGER_BATCH frames)
    # and then waits this long before it reads again, so that under load a read finds a
    # batch, not a packet or two: a wake-up and its batch cost some 10-20 us of CPU in
    # Python, per packet at 100,000 packets/s 3 to 5 times what libpcap's 1 ms block timer
    # costs. A packet on an idle link is still read at once; one that comes during the
    # wait waits at most that long (plus the kernel's timer slack, 50 us).
    # (tc-intercept does not wait: its latency is on every gated request.)
    linger = LINGER_S

    def __init__(self, iface: str, bpf: str, snaplen: int, buffer_kib: int,
                 both_ways: bool = False, promisc: bool = False):
        self.iface = iface
        self.both_ways = both_ways
        self.mm = None

        def ring(s):
            dgram = s.type == socket.SOCK_DGRAM
            if iface == "any" or iface == "lo" or interface_offloads(iface):
                largest, self.sized_for = MAX_DATAGRAM, "64 KiB super-segments (offloads on)"
            else:
                largest, self.sized_for = interface_mtu(iface), "the MTU"
            # the snap length counts the link header (Ethernet, maybe one VLAN tag left in)
            frame_bytes = largest + (0 if dgram else 18)
            if snaplen < frame_bytes:
                frame_bytes, self.sized_for = snaplen, "the snap length"
            fsize, bsize, bnr = ring_geometry(frame_bytes, buffer_kib * 1024)
            self.frame_size, self.frame_nr = fsize, bsize // fsize * bnr
            s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            s.setsockopt(SOL_PACKET, PACKET_RX_RING,
                         struct.pack("IIII", bsize, bnr, fsize, self.frame_nr))
            self.mm = mmap.mmap(s.fileno(), bsize * bnr, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            # where the kernel puts the link header of a frame (tp_mac) as a rule
            self.mac_at = _TP2_NET_AT - (0 if dgram else 14)

        try:
            self.sock, self.linktype = _packet_socket(iface, bpf, snaplen, both_ways, promisc,
                                                      ring)
        except BaseException:
            if self.mm is not None:
                self.mm.close()
            raise
        self.fd = self.sock.fileno()
        self.pos = 0  # the next frame to read: the kernel fills them in ring order
        # every frame's metadata with its offset column filled in (the batch path's start)
        nr, fs = self.frame_nr, self.frame_size
        offsets = struct.pack(f"={nr}I", *range(self.mac_at, nr * fs, fs))
        self._tmpl = bytearray(nr * 16)
        for k in range(4):
            self._tmpl[8 + k::16] = offsets[k::4]
        self._zeros = memoryview(bytes(self.frame_nr))
        self.skipped = 0   # outgoing frames left out of the batches (not counted there)
        self._drain_queue()

    def _drain_queue(self) -> None:
        """Packets queued on the socket before the ring was set up ("any" receives from
        its creation) stay in its ordinary queue: drop them."""
        for _ in range(1 << 16):
            try:
                self.sock.recv(1)
            except OSError:
                return

    def describe(self) -> str:
        return f"TPACKET_V2 ring of {self.frame_nr} frames of {self.frame_size} bytes"

    def warning(self) -> str | None:
        """What to tell the user about a ring that holds few packets, or None."""
        if self.frame_nr >= RING_FEW_FRAMES:
            return None
        return (f"warning: the ring holds only {self.frame_nr} packets (frames of "
                f"{self.frame_size} bytes, for {self.sized_for}); a larger -B holds more")

    def _ready(self, max_n: int) -> int:
        """How many frames are ours from ``pos`` on (at most max_n, up to the ring's end)."""
        fs, pos = self.frame_size, self.pos
        if not self.mm[pos * fs]:  # (the usual answer of the call that finds it drained)
            return 0
        n = min(max_n, self.frame_nr - pos)
        # the first byte of each frame's tp_status: TP_STATUS_USER is its lowest bit, and a
        # frame the kernel owns has tp_status 0; it fills them in order, so ours are a run
        status = self.mm[pos * fs:(pos + n) * fs:fs]
        k = status.find(0)
        return n if k < 0 else k

    def _release(self, n: int) -> None:
        """Hand frames pos .. pos+n-1 back to the kernel (tp_status = TP_STATUS_KERNEL,
        written a byte at a time: the kernel takes a frame whose whole word is 0)."""
        fs, pos = self.frame_size, self.pos
        start, stop = pos * fs, (pos + n) * fs
        zeros = self._zeros[:n]
        mm = self.mm
        for k in range(4):
            mm[start + k:stop:fs] = zeros
        self.pos = (pos + n) % self.frame_nr

    def _meta(self, n: int) -> bytearray:
        """The "=IIII" metadata (sec, nsec, offset in the mmap, caplen) of frames pos ..
        pos+n-1, leaving out the outgoing ones that are not read (counted in skipped)."""
        if n < _GATHER_MIN:
            return self._meta_each(n)
        mm, fs, pos = self.mm, self.frame_size, self.pos
        start, stop = pos * fs, (pos + n) * fs
        col = lambda at: mm[start + at:stop:fs]  # noqa: E731 - one byte of each header
        mac = self.mac_at
        if (col(_TP2_MAC_AT).count(mac) != n or col(_TP2_MAC_AT + 1).count(0) != n
                or PACKET_OUTGOING in col(_TP2_PKTTYPE_AT)):
            return self._meta_each(n)
        meta = self._tmpl[pos * 16:(pos + n) * 16]  # the offsets; then the other columns
        for k in range(8):
            meta[k::16] = col(_TP2_SEC_AT + k)      # tp_sec, tp_nsec
        for k in range(4):
            meta[12 + k::16] = col(_TP2_SNAPLEN_AT + k)
        return meta

    def _meta_each(self, n: int) -> bytearray:
        """_meta() a frame at a time."""
        mm, fs = self.mm, self.frame_size
        hdr = _TP2_HDR.unpack_from
        both_ways = self.both_ways
        meta = bytearray()
        for f in range(self.pos * fs, (self.pos + n) * fs, fs):
            _st, _len, snap, mac, _net, sec, nsec, _tci, _tpid = hdr(mm, f)
            if mm[f + _TP2_PKTTYPE_AT] == PACKET_OUTGOING and (
                    not both_ways or _U16N.unpack_from(mm, f + _TP2_HATYPE_AT)[0]
                    == _ARPHRD_LOOPBACK):
                self.skipped += 1
                continue
            meta += _META.pack(sec, nsec, f + mac, snap)
        return meta

    def read(self, capturer: Capturer, max_n: int = 1024) -> int:
        """Feed the frames ready now (at most max_n) to ``capturer``, then hand them back
        to the kernel; returns the number of frames."""
        n = self._ready(max_n)
        if not n:
            return 0
        try:
            if self.both_ways:
                self._each(capturer, n)
            else:
                skipped = self.skipped
                meta = self._meta(n)
                if self.skipped != skipped:  # outgoing: counted as AfPacketEngine does
                    capturer.frames += self.skipped - skipped
                    capturer.foreign += self.skipped - skipped
                capturer.batch(self.mm, meta, self.linktype, 1)
        finally:
            self._release(n)
        return n

    def _each(self, capturer: Capturer, n: int) -> None:
        """Frames pos .. pos+n-1 one by one, with their direction (both_ways)."""
        mm, fs, lt = self.mm, self.frame_size, self.linktype
        hdr, frame = _TP2_HDR.unpack_from, capturer.frame
        for f in range(self.pos * fs, (self.pos + n) * fs, fs):
            _st, _len, snap, mac, _net, sec, nsec, _tci, _tpid = hdr(mm, f)
            outgoing = mm[f + _TP2_PKTTYPE_AT] == PACKET_OUTGOING
            if outgoing and _U16N.unpack_from(mm, f + _TP2_HATYPE_AT)[0] == _ARPHRD_LOOPBACK:
                capturer.frames += 1  # loopback's outgoing copy: read once, coming in
                capturer.foreign += 1
                continue
            frame(mm, f + mac, f + mac + snap, lt, sec * 1_000_000_000 + nsec, outgoing)
            if capturer.done:
                return

    def read_batches(self, consumer, max_n: int = 1024) -> int:
        """Like read(), for a consumer that wants every frame as a batch, both directions
        (but loopback's outgoing copy): ``consumer.batch(buf, meta, linktype, 1)``
        (tc-intercept)."""
        n = self._ready(max_n)
        if not n:
            return 0
        try:
            consumer.batch(self.mm, self._meta(n), self.linktype, 1)
        finally:
            self._release(n)
        return n

    def close(self) -> None:
        self.mm.close()
        self.sock.close()


ENGINES = {"pcap": PcapEngine, "afpacket": AfPacketEngine, "ring": RingEngine}


def open_engine(kind: str, iface: str, bpf: str, snaplen: int = DEFAULT_SNAPLEN,
                buffer_kib: int = DEFAULT_BUFFER_KIB, both_ways: bool = False,
                promisc: bool = False):
    check_interface(iface)
    return ENGINES[kind](iface, bpf, snaplen, buffer_kib, both_ways, promisc)


def capture_loop(engine, capturer: Capturer, stop, on_tick=None, idle_wait: float = 0.25,
                 extra_fds=()) -> None:
    """Read until ``capturer.done`` or ``stop()`` is true, then drain what is readable.

    When the ring is empty the writer is flushed (an idle link never holds records back)
    and the loop waits in select() on the capture fd plus ``extra_fds`` (non-blocking
    signal wakeup pipes, drained here) for at most ``idle_wait`` s. ``on_tick(now)`` runs
    between batches. With an engine that has a ``linger`` (s), a batch of fewer than
    LINGER_BATCH frames is flushed and followed by a sleep of that long before the next
    read (see RingEngine.linger).
    """
    fds = [engine.fd, *extra_fds]
    writer = capturer.writer
    flush = writer.flush
    read = engine.read
    linger = getattr(engine, "linger", 0)
    while not capturer.done and not stop():
        n = read(capturer)
        if n and linger and n < LINGER_BATCH:
            flush()
            time.sleep(linger)
        elif not n:
            flush()
            if stop():
                break
            # (a writer that holds output the pipe did not take: wait for room too)
            held = [writer.fd] if writer.buf and hasattr(writer, "fd") else []
            ready = select.select(fds, held, [], idle_wait)[0]
            for fd in extra_fds:  # drain wakeup pipes, or select would stay ready
                if fd in ready:
                    try:
                        os.read(fd, 4096)
                    except BlockingIOError:
                        pass
        now = time.monotonic()
        capturer.refresh(now)
        if on_tick is not None:
            on_tick(now)
    for _ in range(64):  # stopped: take what the kernel already holds (bounded)
        if capturer.done or read(capturer) == 0:
            break
