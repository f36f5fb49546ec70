"""The feedback channel: tc-feedback's router and the FeedbackClient that tc-session uses.

Both directions of a feedback connection carry the ordinary record stream (label + header
+ records). The client announces the sessions it owns with "claim" records
({"t": "claim", "add"|"del": [[client_ip, client_port, target_ip, target_port], ...]});
the server sends it the "fb" records whose (dst ip, dst port, src ip, src port) match one
of its claims. Replies that arrive before their claim are held for a while (the SYN-ACK
may race the registration) and delivered when the claim arrives.

Addresses: "unix:/path", "tcp:HOST:PORT" (HOST may be [v6]), "tcp::PORT" (all addresses,
for listening). Clients default to $TC_FEEDBACK, else DEFAULT_ADDRESS.
"""

from __future__ import annotations

import collections
import errno
import math
import os
import select
import socket
import struct
import time

import cbor2

from tcpcopylib.errors import PeerVersionError, StreamError, UnavailableError, UsageError
from tcpcopylib.records import (AS_RAW, FORMAT_VERSION, T_CLAIM, T_FB, T_HEADER, cbor_head,
                                encode_section, fast_record, header)
from tcpcopylib.streamparse import StreamParser

DEFAULT_PORT = 36524
DEFAULT_ADDRESS = f"tcp:127.0.0.1:{DEFAULT_PORT}"
ENV_ADDRESS = "TC_FEEDBACK"
HOLD_BYTES = 64 << 20  # held replies never take more memory than this
T_ERROR = "error"  # server -> client, just before it closes the connection

_U16 = struct.Struct("!H")
_PORTS = struct.Struct("!HH")


# -- addresses -------------------------------------------------------------------------

def parse_address(text: str, listen: bool = False):
    """'unix:/p' | 'tcp:HOST:PORT' | 'tcp::PORT' -> (family, sockaddr); UsageError if bad."""
    kind, sep, rest = text.partition(":")
    if kind == "unix" and sep and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp" and sep:
        host, sep2, port = rest.rpartition(":")
        if sep2 and port.isdigit() and 0 < int(port) < 65536:
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if not host:
                if not listen:
                    host = "127.0.0.1"
                elif socket.has_ipv6:
                    return socket.AF_INET6, ("::", int(port))
                else:
                    return socket.AF_INET, ("0.0.0.0", int(port))
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise UsageError(f"feedback address {text!r}: {e.strerror}") from None
            fam, _, _, _, sa = infos[0]
            return fam, sa
    raise UsageError(f"bad feedback address {text!r} "
                     "(use unix:/path, tcp:HOST:PORT, tcp:[v6]:PORT or tcp::PORT)")


def default_address() -> str:
    return os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS


# -- incremental stream decoding (non-blocking sockets and pipes) ------------------------

FB_PREFIX = b"\xa4\x61t\x62fb\x62ts"   # {"t": "fb", "ts": ...} as tc-intercept encodes it
_FB_DATA = b"\x64data"
_FB_LEN = b"\x63len"


_FB8 = FB_PREFIX + b"\x1b"
_FB8_MID = _FB_DATA + b"\x58"


def fb_span(buf, pos: int):
    """(end, data start, data end) of an fb record of the usual shape at pos, else None.

    The router's path: it needs the record's bytes and the reply's addresses, not a dict.
    """
    if buf.startswith(_FB8_MID, pos + 18) and len(buf) > pos + 24 and buf.startswith(_FB8, pos):
        d1 = pos + 25 + buf[pos + 24]
        if buf.startswith(_FB_LEN, d1) and len(buf) > d1 + 4:
            lb = buf[d1 + 4]
            end = d1 + 7 if lb == 0x19 else d1 + 6 if lb == 0x18 else -1
            if 0 < end <= len(buf):
                return end, pos + 25, d1
    return None


def _fb_prefix(rest: bytes) -> bool:
    """True if rest is an incomplete start of a usual-shape fb record (see fb_span)."""
    k = len(rest)
    if k < 25:
        return _FB8.startswith(rest[:10]) and (k <= 18 or _FB8_MID.startswith(rest[18:]))
    if not (rest.startswith(_FB8) and rest.startswith(_FB8_MID, 18)):
        return False
    d1 = 25 + rest[24]
    if k <= d1 + 4:
        return _FB_LEN.startswith(rest[d1:])
    lb = rest[d1 + 4]
    return rest.startswith(_FB_LEN, d1) and (lb == 0x19 and k < d1 + 7
                                             or lb == 0x18 and k < d1 + 6)


class StreamDecoder(StreamParser):
    """A peer's stream (tc-intercept's, a client's, the server's), fed as it arrives:
    ``feed()`` gives (record, raw bytes or None) pairs, headers included. Headers of any
    format version are accepted: the peer check is version_error's, which can answer the
    peer. The inline fast paths below take usual-shape records from ``buf`` themselves."""

    def __init__(self, name: str):
        super().__init__(name, headers=True, any_version=True)

    def feed(self, data: bytes) -> list:
        return [(item, raw if type(raw) is bytes else None)
                for item, raw in super().feed(data, AS_RAW)]


def version_error(peer_v, who: str) -> str | None:
    """A message if a peer's format version differs from ours, else None."""
    if peer_v == FORMAT_VERSION:
        return None
    rel = "newer" if isinstance(peer_v, int) and peer_v > FORMAT_VERSION else "other"
    return (f"{who} speaks record format version {peer_v}, {rel} than this tcpcopylib's "
            f"{FORMAT_VERSION}; run the same tcpcopylib version on both ends")


# -- routing keys ------------------------------------------------------------------------

def reply_key(data, off: int = 0, end: int = -1) -> tuple | None:
    """(client ip, client port, target ip, target port) of the reply at data[off:end]:
    its destination, then its source."""
    n = (len(data) if end < 0 else end) - off
    if n < 20:
        return None
    v = data[off] >> 4
    if v == 4:
        ihl = (data[off] & 0x0F) * 4
        if n < ihl + 4:
            return None
        sport, dport = _PORTS.unpack_from(data, off + ihl)
        return (bytes(data[off + 16:off + 20]), dport, bytes(data[off + 12:off + 16]), sport)
    if v == 6 and n >= 44:
        sport, dport = _PORTS.unpack_from(data, off + 40)
        return (bytes(data[off + 24:off + 40]), dport, bytes(data[off + 8:off + 24]), sport)
    return None


def _ip_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _ip_packed(text: str) -> bytes:
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(fam, text)
        except (OSError, TypeError):
            pass
    raise ValueError(f"not an IP address: {text!r}")


def claim_key(entry) -> tuple:
    """A claim entry [client_ip_str, client_port, target_ip_str, target_port] -> key."""
    cip, cport, tip, tport = entry
    return (_ip_packed(cip), int(cport), _ip_packed(tip), int(tport))


# tc-feedback's routing keys are bytes: the reply's source and destination addresses, then
# its source and destination ports, as they lie in an IPv4 header without options (one
# slice of the datagram: 12 bytes) or an IPv6 header (36 bytes).

def route_key(data, off: int = 0, end: int = -1) -> bytes | None:
    """The routing key of the reply at data[off:end] (None if it is not IPv4/IPv6)."""
    n = (len(data) if end < 0 else end) - off
    if n < 20:
        return None
    b0 = data[off]
    if b0 >> 4 == 4:
        ihl = (b0 & 0x0F) * 4
        if n < ihl + 4:
            return None
        if ihl == 20:
            return bytes(data[off + 12:off + 24])
        return bytes(data[off + 12:off + 20]) + bytes(data[off + ihl:off + ihl + 4])
    if b0 >> 4 == 6 and n >= 44:
        return bytes(data[off + 8:off + 44])
    return None


def claim_route_key(entry) -> bytes:
    """The routing key of the replies a claim entry [client_ip_str, client_port,
    target_ip_str, target_port] asks for; ValueError/TypeError if malformed."""
    cip, cport, tip, tport = entry
    cport, tport = int(cport), int(tport)
    if not (0 <= cport < 65536 and 0 <= tport < 65536):
        raise ValueError("port out of range")
    return _ip_packed(tip) + _ip_packed(cip) + _PORTS.pack(tport, cport)


_CLAIM_RECORD = {cbor2.dumps({"t": T_CLAIM, k: None})[:-1]: k == "add" for k in ("add", "del")}
_PACKED: dict = {}  # an IP address's text (UTF-8) -> the address packed, for claims


def _claim_ip(buf, p: int):
    """(packed address, next pos) of the CBOR text at p; ValueError if not an address."""
    ib = buf[p]
    if 0x60 <= ib < 0x78:
        n, p = ib - 0x60, p + 1
    elif ib == 0x78:
        n, p = buf[p + 1], p + 2
    else:
        raise ValueError("not a short text")
    text = buf[p:p + n]
    ip = _PACKED.get(text)
    if ip is None:
        ip = _ip_packed(text.decode())
        if len(_PACKED) > 4096:
            _PACKED.clear()
        _PACKED[text] = ip
    return ip, p + n


def _claim_port(buf, p: int):
    ib = buf[p]
    if ib < 24:
        return ib, p + 1
    if ib == 24:
        return buf[p + 1], p + 2
    if ib == 25:
        return (buf[p + 1] << 8) | buf[p + 2], p + 3
    raise ValueError("not a port")


def claim_keys(buf, pos: int):
    """(add?, [routing key, ...], end) of a claim record at pos in FeedbackClient's layout
    ({"t": "claim", "add"|"del": [[ip text, port, ip text, port], ...]}, addresses valid);
    None for anything else or an incomplete record (decode it in full)."""
    add = _CLAIM_RECORD.get(buf[pos:pos + 13])
    if add is None:
        return None
    try:
        p = pos + 13
        ib = buf[p]  # the array of entries: up to 65535
        if 0x80 <= ib < 0x98:
            n, p = ib - 0x80, p + 1
        elif ib == 0x98:
            n, p = buf[p + 1], p + 2
        elif ib == 0x99:
            n, p = (buf[p + 1] << 8) | buf[p + 2], p + 3
        else:
            return None
        keys = []
        for _ in range(n):
            if buf[p] != 0x84:
                return None
            cip, p = _claim_ip(buf, p + 1)
            cport, p = _claim_port(buf, p)
            tip, p = _claim_ip(buf, p)
            tport, p = _claim_port(buf, p)
            keys.append(tip + cip + _PORTS.pack(tport, cport))
    except (IndexError, ValueError):
        return None
    if p > len(buf):
        return None
    return add, keys, p


# -- the client ------------------------------------------------------------------------

_CLAIM_HEAD = {k: cbor2.dumps({"t": T_CLAIM, k: None})[:-1] for k in ("add", "del")}
_UINTS = [cbor2.dumps(i) for i in range(256)]


_UINT16 = struct.Struct(">BH").pack


def _cbor_uint(n: int) -> bytes:
    """cbor2.dumps(n) for an int n >= 0 (a port)."""
    return _UINTS[n] if n < 256 else _UINT16(0x19, n) if n < 0x10000 else cbor_head(0, n)


def _cbor_text(text: str) -> bytes:
    b = text.encode()
    return cbor_head(3, len(b)) + b


class FeedbackClient:
    """tc-session's end of the channel: claim sessions, read their replies."""

    def __init__(self, address: str | None = None, name: str = "tc-session"):
        self.address = address or default_address()
        self.name = name
        self.sock: socket.socket | None = None
        self._ops: list = []  # (kind, [encoded entry, ...]) in call order
        self._decoder = StreamDecoder(f"feedback server {self.address}")
        self._pending: list = []
        self._eof = False
        self._ip_texts: dict = {}  # packed address -> its text CBOR-encoded, for claims
        self._target_ends: dict = {}  # (address, port) -> both CBOR-encoded, for claims
        # one receive buffer: a fresh 256 KiB bytes per recv() costs an mmap/munmap pair
        self._rbuf = memoryview(bytearray(1 << 18))
        self.server_header: dict | None = None
        self.send_timeout = 5.0
        self.last_ts = 0  # "ts" of the newest fb record received (tc-session's feedback lag)

    def connect(self, timeout: float = 5.0) -> None:
        fam, sa = parse_address(self.address)
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(sa)
        except OSError as e:
            s.close()
            why = e.strerror or str(e)
            raise UnavailableError(
                f"cannot connect to tc-feedback at {self.address}: {why} (is tc-feedback "
                f"running there? set --feedback ADDR or ${ENV_ADDRESS})") from None
        if fam != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.sock = s
        self._send(encode_section(header(self.name)))
        # The server answers with its own header (or an error record and a close).
        deadline = time.monotonic() + timeout
        while self.server_header is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise UnavailableError(f"tc-feedback at {self.address}: no stream header "
                                       f"within {timeout:g} s")
            select.select([s], [], [], left)
            self._receive()
            if self.server_header is None and self._eof:
                self.close()
                raise UnavailableError(f"tc-feedback at {self.address} closed the connection")

    def _receive(self, replies: list | None = None) -> None:
        """Read what the socket holds; fb records go to self._pending, or as (data, len)
        pairs to `replies` if given."""
        rbuf = self._rbuf
        size = len(rbuf)
        while not self._eof:
            try:
                n = self.sock.recv_into(rbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._eof = True
                return
            if not n:
                self._eof = True
                return
            data = rbuf[:n].tobytes()
            more = n == size  # else the socket is drained: no failing recv()
            if replies is not None:
                data = self._fast_replies(data, replies)
                if not data:
                    if more:
                        continue
                    return
            for item, _raw in self._decoder.feed(data):
                t = item.get("t")
                if t == T_FB:
                    if type(item.get("ts")) is int:
                        self.last_ts = item["ts"]
                    if replies is None:
                        self._pending.append(item)
                    elif isinstance(item.get("data"), (bytes, bytearray)):
                        replies.append((item["data"], item.get("len")))
                elif t == T_HEADER:
                    msg = version_error(item.get("v"), f"tc-feedback at {self.address}")
                    if msg:
                        self.close()
                        raise PeerVersionError(msg)
                    self.server_header = item
                elif t == T_ERROR:
                    self.close()
                    exc = PeerVersionError if item.get("error") == "version" else UnavailableError
                    raise exc(f"tc-feedback at {self.address}: {item.get('msg', 'error')}")
            if not more:
                return

    def _fast_replies(self, data: bytes, replies: list) -> bytes:
        """Append (data, len) of the leading run of usual-shape fb records (fb_span) of the
        stream to `replies`, inline; return the rest (for the decoder)."""
        dec = self._decoder
        if dec.header is None or dec._expect_header:
            return data
        buf = dec.buf + data if dec.buf else data
        dec.buf = b""
        pos, n, startswith, append = 0, len(buf), buf.startswith, replies.append
        last = -1  # where the last record taken starts (its ts: the feedback lag)
        while n > pos + 24 and startswith(_FB8_MID, pos + 18) and startswith(_FB8, pos):
            d1 = pos + 25 + buf[pos + 24]
            if n <= d1 + 4 or not startswith(_FB_LEN, d1):
                break
            lb = buf[d1 + 4]
            if lb == 0x19:
                end = d1 + 7
                if n < end:
                    break
                append((buf[pos + 25:d1], buf[d1 + 5] << 8 | buf[d1 + 6]))
            elif lb == 0x18:
                end = d1 + 6
                if n < end:
                    break
                append((buf[pos + 25:d1], buf[d1 + 5]))
            else:
                break
            last = pos
            pos = end
        if last >= 0:
            self.last_ts = int.from_bytes(buf[last + 10:last + 18], "big")
        dec.consumed += pos
        rest = buf[pos:] if pos else buf
        if rest and _fb_prefix(rest):
            dec.buf = rest  # the start of the next one: wait for more, no decoder set-up
            return b""
        return rest

    def _send(self, data: bytes) -> None:
        view = data  # a memoryview only if sent in parts
        deadline = None
        while view:
            try:
                n = self.sock.send(view, socket.MSG_NOSIGNAL)
                if n == len(view):
                    return
                view = memoryview(view)[n:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                raise UnavailableError(f"tc-feedback at {self.address}: {e.strerror or e}") from None
            now = time.monotonic()
            deadline = deadline or now + self.send_timeout
            if now >= deadline:
                raise UnavailableError(f"tc-feedback at {self.address} is not reading "
                                       f"(send blocked for {self.send_timeout:g} s)")
            # Keep reading while we wait, so two full buffers cannot deadlock.
            r, _, _ = select.select([self.sock], [self.sock], [], deadline - now)
            if r:
                self._receive()

    def _op(self, kind: str, cip: bytes, cport: int, tip: bytes, tport: int) -> None:
        # each entry [client_ip_str, client_port, target_ip_str, target_port] is CBOR-encoded
        # here (client address texts and target ends cached), records assembled by flush()
        texts, ends = self._ip_texts, self._target_ends
        c, t = texts.get(cip), ends.get((tip, tport))
        if c is None or t is None:
            if len(texts) > 4096 or len(ends) > 4096:
                texts.clear()
                ends.clear()
            c = texts[cip] = _cbor_text(_ip_text(cip))
            t = ends[(tip, tport)] = _cbor_text(_ip_text(tip)) + _cbor_uint(tport)
        entry = b"".join((b"\x84", c, _cbor_uint(cport), t))
        ops = self._ops
        if ops and ops[-1][0] == kind:
            ops[-1][1].append(entry)
        else:
            ops.append((kind, [entry]))

    def claim(self, client_ip: bytes, client_port: int, target_ip: bytes, target_port: int) -> None:
        self._op("add", client_ip, client_port, target_ip, target_port)

    def release(self, client_ip: bytes, client_port: int, target_ip: bytes, target_port: int) -> None:
        self._op("del", client_ip, client_port, target_ip, target_port)

    def flush(self) -> None:
        """Send the pending claims and releases: one claim record per run of either kind,
        as cbor2.dumps({"t": "claim", kind: entries}) encodes it."""
        if not self._ops or self.sock is None:
            return
        parts = []
        for kind, entries in self._ops:
            parts.append(_CLAIM_HEAD[kind])
            parts.append(cbor_head(4, len(entries)))
            parts += entries
        self._ops = []
        self._send(b"".join(parts))

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_available(self) -> list[dict]:
        if self.sock is None:
            raise UnavailableError(f"tc-feedback at {self.address}: not connected")
        self._receive()
        out, self._pending = self._pending, []
        if not out and self._eof:
            raise UnavailableError(f"tc-feedback at {self.address} closed the connection")
        return out

    def read_replies(self) -> list[tuple]:
        """(data, len) of each fb record available (len None if absent): read_available()
        without a dict per reply (tc-session's loop)."""
        if self.sock is None:
            raise UnavailableError(f"tc-feedback at {self.address}: not connected")
        out = []
        if self._pending:
            out = [(r["data"], r.get("len")) for r in self._pending
                   if isinstance(r.get("data"), (bytes, bytearray))]
            self._pending = []
        self._receive(out)
        if not out and self._eof:
            raise UnavailableError(f"tc-feedback at {self.address} closed the connection")
        return out

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the server ------------------------------------------------------------------------

class _Client:
    __slots__ = ("sock", "name", "decoder", "out", "keys", "dropped", "delivered", "peer",
                 "want_write", "closing", "warned")

    def __init__(self, sock, peer):
        self.sock = sock
        self.peer = peer
        self.name = peer
        self.decoder = StreamDecoder(f"client {peer}")
        self.out = bytearray()
        self.keys: set = set()
        self.dropped = 0
        self.delivered = 0
        self.want_write = False
        self.closing = False
        self.warned = 0.0


class FeedbackServer:
    """Route fb records (raw CBOR, as read from the input) to the clients that claimed them.

    Single-threaded around a selector: the input fd, the listening socket and every client
    socket. Nothing blocks: each client has an output buffer capped at ``client_buffer``
    bytes; replies that do not fit are dropped and counted for that client.
    """

    def __init__(self, listen: str, hold_ms: int = 2000, hold_max: int = 100_000,
                 client_buffer: int = 8 << 20, warn=print, info=None, tool: str = "tc-feedback"):
        self.listen_address = listen
        self.hold_s = hold_ms / 1000.0
        self.hold_max = hold_max
        self.client_buffer = client_buffer
        self.warn = warn
        self.info = info or (lambda msg, level=1: None)
        self.tool = tool
        self.routes: dict = {}      # key -> _Client
        self.held: dict = {}        # key -> [entry, ...]; entry = [deadline, key, raw]
        self.hold_order = collections.deque()
        self.held_bytes = 0
        self.clients: dict = {}     # fd -> _Client
        self.counts = dict(replies=0, delivered=0, held=0, held_delivered=0, unclaimed=0,
                           hold_overflow=0, dropped_slow=0, not_tcp=0, clients=0,
                           clients_now=0, claims=0, releases=0)
        self._hello = encode_section(header(tool))
        self._dirty: set = set()
        self._poll = None  # select.poll of serve()
        self.lsock = None
        self.unix_path = None

    # -- setup ---------------------------------------------------------------------------
    def open(self) -> None:
        fam, sa = parse_address(self.listen_address, listen=True)
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            if fam == socket.AF_UNIX:
                try:
                    if os.path.exists(sa) and not _unix_in_use(sa):
                        os.unlink(sa)  # a stale socket left by a killed server
                except OSError:
                    pass
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6 and sa[0] == "::":
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(sa)
            s.listen(64)
        except OSError as e:
            s.close()
            if e.errno in (errno.EACCES, errno.EPERM):
                from tcpcopylib.errors import NoPermissionError
                raise NoPermissionError(f"cannot listen on {self.listen_address}: {e.strerror}") from None
            raise UnavailableError(f"cannot listen on {self.listen_address}: {e.strerror or e}") from None
        s.setblocking(False)
        self.lsock = s
        if fam == socket.AF_UNIX:
            self.unix_path = sa

    def close(self) -> None:
        for c in list(self.clients.values()):
            self._drop_client(c, None)
        if self.lsock is not None:
            self.lsock.close()
            self.lsock = None
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
            self.unix_path = None

    # -- the loop ------------------------------------------------------------------------
    def serve(self, in_fd: int, drain_s: float = 5.0, tick=None, tick_s: float = 0.0) -> None:
        """Run until the input ends, then until held replies and client buffers are done
        (at most hold time + drain_s)."""
        # select.poll directly (poll, unlike epoll, accepts regular files): the selectors
        # wrapper costs more than the routing itself at ~5 replies per wake-up
        self._poll = poll = select.poll()
        lfd = self.lsock.fileno()
        poll.register(lfd, select.POLLIN)
        poll.register(in_fd, select.POLLIN)
        clients, dirty_add = self.clients, self._dirty.add
        # one input buffer: a fresh 256 KiB bytes per read costs an mmap/mremap/munmap
        rbuf = bytearray(1 << 18)
        rview = memoryview(rbuf)
        decoder = StreamDecoder("<stdin>" if in_fd == 0 else f"input fd {in_fd}")
        eof_at = None
        next_tick = time.monotonic() + tick_s if tick else None
        while True:
            now = time.monotonic()
            if self.hold_order:
                self._expire(now)
            if eof_at is not None:
                pending = any(c.out for c in self.clients.values())
                if (not self.held and not pending) or now > eof_at + self.hold_s + drain_s:
                    break
            timeout = 1000
            if self.hold_order:
                timeout = min(timeout, math.ceil(max(0.0, self.hold_order[0][0] - now) * 1e3) + 1)
            if next_tick is not None:
                if now >= next_tick:
                    tick()
                    next_tick = now + tick_s
                timeout = min(timeout, math.ceil(max(0.0, next_tick - now) * 1e3))
            for fd, ev in poll.poll(timeout):
                if fd == in_fd:
                    n = os.readv(in_fd, (rbuf,))
                    if not n:
                        poll.unregister(in_fd)
                        eof_at = time.monotonic()
                        self.info("input ended; draining", 1)
                        continue
                    self._serve_input(decoder, rview[:n].tobytes())
                elif fd == lfd:
                    self._accept()
                else:
                    c = clients.get(fd)
                    if c is None:
                        continue
                    if ev & ~select.POLLOUT:  # readable, or hung up / error: recv says which
                        self._client_readable(c)
                    if c.sock is not None and ev & ~select.POLLIN:
                        dirty_add(c)
            self._flush_clients()
        decoder.close()  # StreamError if the input ended inside a record

    # -- routing -------------------------------------------------------------------------
    def _serve_input(self, decoder: StreamDecoder, data: bytes) -> None:
        """Route the fb records of the next piece of input."""
        for item, raw in self._feed_input(decoder, data):
            if item.get("t") == T_FB:
                d = item.get("data")
                self.route(route_key(d) if d else None, raw or cbor2.dumps(item))

    def _feed_input(self, decoder: StreamDecoder, data: bytes) -> list:
        """Route the fb records at the start of the input inline (the hot loop: no calls
        per usual-shape record; consecutive records for one client are appended to its
        buffer at once), in order; what is left (a header, another record type, an
        incomplete record) goes through the decoder: its records are returned."""
        buf = decoder.buf + data if decoder.buf else data
        decoder.buf = b""
        if decoder.header is None or decoder._expect_header:
            return decoder.feed(buf)
        pos, n_buf, routes, cap = 0, len(buf), self.routes, self.client_buffer
        startswith = buf.startswith
        delivered = 0
        while True:
            run_c, run_start, run_n = None, 0, 0  # buf[run_start:pos]: run_n records for run_c
            while n_buf > pos + 24 and startswith(_FB8_MID, pos + 18) and startswith(_FB8, pos):
                d0 = pos + 25
                d1 = d0 + buf[pos + 24]
                if n_buf <= d1 + 4 or not startswith(_FB_LEN, d1):
                    break
                lb = buf[d1 + 4]
                if lb == 0x19:
                    end = d1 + 7
                elif lb == 0x18:
                    end = d1 + 6
                else:
                    break
                if end > n_buf:
                    break
                if buf[d0] == 0x45 and d0 + 24 <= d1:  # IPv4 without options: see route_key
                    key = buf[d0 + 12:d0 + 24]
                else:
                    key = route_key(buf, d0, d1)
                c = routes.get(key)
                if c is not None and c is run_c and len(c.out) + end - run_start <= cap:
                    run_n += 1
                    pos = end
                    continue
                if run_n:
                    self._add_run(run_c, buf[run_start:pos], run_n)
                    delivered += run_n
                if c is not None and len(c.out) + end - pos <= cap:
                    run_c, run_start, run_n = c, pos, 1
                else:
                    run_c, run_n = None, 0
                    self.route(key, buf[pos:end])
                pos = end
            if run_n:
                self._add_run(run_c, buf[run_start:pos], run_n)
                delivered += run_n
            # an fb record of another layout (say more than 255 bytes of data): in order
            got = fast_record(buf, pos, n_buf) if pos < n_buf else None
            if got is None or got[0]["t"] != T_FB:
                break
            d = got[0]["data"]
            self.route(route_key(d) if d else None, buf[pos:got[1]])
            pos = got[1]
        counts = self.counts
        counts["replies"] += delivered  # the others counted by route()
        counts["delivered"] += delivered
        decoder.consumed += pos
        if pos == n_buf:
            return []  # all routed: no decoder set-up
        return decoder.feed(buf[pos:] if pos else buf)

    def _add_run(self, c: _Client, records: bytes, n: int) -> None:
        c.out += records
        c.delivered += n
        self._dirty.add(c)

    def route(self, key, raw: bytes) -> None:
        """Deliver one encoded fb record whose reply has `key` (None: not TCP)."""
        self.counts["replies"] += 1
        if key is None:
            self.counts["not_tcp"] += 1
            return
        c = self.routes.get(key)
        if c is not None:
            self._deliver(c, raw)
            return
        if self.hold_s <= 0:
            self.counts["unclaimed"] += 1
            return
        while self.hold_order and (len(self.hold_order) >= self.hold_max
                                   or self.held_bytes + len(raw) > HOLD_BYTES):
            self._expire_one(overflow=True)
        self.held_bytes += len(raw)
        entry = [time.monotonic() + self.hold_s, key, raw]
        self.held.setdefault(key, []).append(entry)
        self.hold_order.append(entry)
        self.counts["held"] += 1

    def _expire(self, now: float) -> None:
        order = self.hold_order
        while order and (order[0][2] is None or order[0][0] <= now):
            self._expire_one()

    def _expire_one(self, overflow: bool = False) -> None:
        entry = self.hold_order.popleft()
        if entry[2] is None:
            return  # delivered already
        self.held_bytes -= len(entry[2])
        lst = self.held.get(entry[1])
        if lst:
            lst.remove(entry)
            if not lst:
                del self.held[entry[1]]
        self.counts["unclaimed"] += 1
        if overflow:
            self.counts["hold_overflow"] += 1

    def _deliver(self, c: _Client, raw: bytes) -> bool:
        if len(c.out) + len(raw) > self.client_buffer:
            c.dropped += 1
            self.counts["dropped_slow"] += 1
            now = time.monotonic()
            if now - c.warned > 5.0:
                c.warned = now
                self.warn(f"client {c.name} is not reading fast enough: {c.dropped} replies "
                          f"dropped for it so far")
            return False
        c.out += raw
        c.delivered += 1
        self.counts["delivered"] += 1
        self._dirty.add(c)
        return True

    def claim(self, c: _Client, entries, add: bool) -> None:
        keys = []
        for e in entries:
            try:
                keys.append(claim_route_key(e))
            except (ValueError, TypeError):
                self.warn(f"client {c.name}: ignoring a malformed claim entry {e!r}")
        self._claim_keys(c, keys, add)

    def _claim_keys(self, c: _Client, keys, add: bool) -> None:
        routes = self.routes
        if not add:
            self.counts["releases"] += len(keys)
            for key in keys:
                if routes.get(key) is c:
                    del routes[key]
                c.keys.discard(key)
            return
        self.counts["claims"] += len(keys)
        for key in keys:
            old = routes.get(key)
            if old is not None and old is not c:
                old.keys.discard(key)
            routes[key] = c
            c.keys.add(key)
            if self.held:
                held = self.held.pop(key, None)
                if held:
                    for entry in held:
                        self.held_bytes -= len(entry[2])
                        if self._deliver(c, entry[2]):
                            self.counts["held_delivered"] += 1
                        entry[2] = None

    # -- clients -------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):
            try:
                s, peer = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.warn(f"accept failed: {e.strerror or e}")
                return
            s.setblocking(False)
            if s.family != socket.AF_UNIX:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{peer[0]}:{peer[1]}" if s.family == socket.AF_INET else f"[{peer[0]}]:{peer[1]}"
            else:
                peer = f"unix#{s.fileno()}"
            c = _Client(s, peer)
            c.out += self._hello
            self.clients[s.fileno()] = c
            self._poll.register(s.fileno(), select.POLLIN)
            self.counts["clients"] += 1
            self.counts["clients_now"] = len(self.clients)
            self._dirty.add(c)
            self.info(f"client {peer} connected", 1)

    def _client_readable(self, c: _Client) -> None:
        try:
            data = c.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop_client(c, e.strerror or str(e))
            return
        if not data:
            self._drop_client(c, "disconnected")
            return
        dec = c.decoder
        if dec.header is not None and not dec._expect_header:
            # claim records as FeedbackClient writes them: inline, no CBOR decoder
            buf = dec.buf + data if dec.buf else data
            pos, n = 0, len(buf)
            while pos < n:
                got = claim_keys(buf, pos)
                if got is None:
                    break
                add, keys, pos = got
                self._claim_keys(c, keys, add)
            dec.consumed += pos
            dec.buf = b""
            data = buf[pos:] if pos else buf
            if not data:
                return
        try:
            items = dec.feed(data)
        except StreamError as e:
            self._refuse(c, "stream", str(e))
            return
        for item, _raw in items:
            t = item.get("t")
            if t == T_HEADER:
                msg = version_error(item.get("v"), f"client {c.peer}")
                if msg:
                    self._refuse(c, "version", msg)
                    return
                if item.get("tool"):
                    c.name = f"{item['tool']}@{c.peer}"
            elif t == T_CLAIM:
                if "add" in item:
                    self.claim(c, item["add"] or (), True)
                if "del" in item:
                    self.claim(c, item["del"] or (), False)

    def _refuse(self, c: _Client, kind: str, msg: str) -> None:
        self.warn(f"refusing client {c.peer}: {msg}")
        try:
            c.sock.send(bytes(c.out) + cbor2.dumps({"t": T_ERROR, "error": kind, "msg": msg}),
                        socket.MSG_NOSIGNAL)
        except OSError:
            pass
        c.out.clear()
        self._drop_client(c, None)

    def _drop_client(self, c: _Client, why: str | None) -> None:
        if c.sock is None:
            return
        for key in c.keys:
            if self.routes.get(key) is c:
                del self.routes[key]
        c.keys.clear()
        try:
            self._poll.unregister(c.sock.fileno())
        except (KeyError, ValueError, AttributeError):
            pass
        self.clients.pop(c.sock.fileno(), None)
        c.sock.close()
        c.sock = None
        self._dirty.discard(c)
        self.counts["clients_now"] = len(self.clients)
        if why:
            extra = f", {c.dropped} replies dropped (slow)" if c.dropped else ""
            self.info(f"client {c.name} {why}: {c.delivered} replies delivered{extra}", 1)

    def _flush_clients(self) -> None:
        if not self._dirty:
            return
        dirty = list(self._dirty)
        self._dirty.clear()  # the same set: serve() and _feed_input hold its add
        for c in dirty:
            if c.sock is None:
                continue
            if c.out:
                try:
                    n = c.sock.send(c.out, socket.MSG_NOSIGNAL)
                    del c.out[:n]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:  # EPIPE, ECONNRESET: this client's problem only
                    self._drop_client(c, e.strerror or str(e))
                    continue
            want = bool(c.out)
            if want != c.want_write:
                c.want_write = want
                self._poll.modify(c.sock.fileno(), select.POLLIN | select.POLLOUT if want
                                  else select.POLLIN)

    def stats_line(self) -> str:
        k = self.counts
        return (f"{k['replies']} replies in, {k['delivered']} delivered "
                f"({k['held_delivered']} held then delivered), {k['unclaimed']} unclaimed, "
                f"{k['dropped_slow']} dropped (slow client), {len(self.held)} held now, "
                f"{k['clients']} clients ({k['clients_now']} connected)")


def _unix_in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
