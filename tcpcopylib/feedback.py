"""The feedback channel: tc-feedback's router and the FeedbackClient that tc-session uses.

Both directions of a feedback connection carry the ordinary record stream (label + header
+ records). The client announces the sessions it owns with "claim" records
({"t": "claim", "add"|"del": [[client_ip, client_port, target_ip, target_port], ...]});
the server sends it the "fb" records whose (dst ip, dst port, src ip, src port) match one
of its claims. Replies that arrive before their claim are held for a while (the SYN-ACK
may race the registration) and delivered when the claim arrives.

Addresses: "unix:/path", "tcp:HOST:PORT" (HOST may be [v6]), "tcp::PORT" (all addresses,
for listening). Clients default to $TC_FEEDBACK, else DEFAULT_ADDRESS.

Trust: with a shared key (--key FILE, $TC_FEEDBACK_KEY_FILE or $TC_FEEDBACK_KEY) the two
ends prove to each other that they hold it (HMAC-SHA256 over both ends' random nonces,
see auth_mac) before the client may claim or receive anything. Everything a client may
cost the server is bounded: the number of clients, the bytes of an unfinished record per
client and in all, the time to identify (and authenticate), the claims per client. A
client that breaks a rule is sent an "error" record and dropped, with a counted reason;
the server and the other clients go on. tcpcopy-records(5) and tc-feedback(8) document
the records and limits.

Classic clients (tcpcopy 1.3, on the --classic listener) speak intercept 1.0's protocol
(tcpcopylib.classic): their CLIENT_ADDs route replies as claims do, and their replies go
out as 64-byte records in combined frames. They cannot authenticate: --allow (or, without
it, loopback) addresses only.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import hmac
import ipaddress
import math
import os
import secrets
import select
import socket
import struct
import time

import cbor2

from tcpcopylib import classic
from tcpcopylib.errors import (NoPermissionError, PeerVersionError, StreamError,
                               UnavailableError, UsageError)
from tcpcopylib.packet import flow_bytes, parse_tcp_fast
from tcpcopylib.records import (AS_RAW, FORMAT_VERSION, LABEL, T_CLAIM, T_FB, T_HEADER,
                                encode_section, fast_record, header)
from tcpcopylib.streamparse import StreamParser
from tcpcopylib.wire import (Malformed, claim_entry, claim_head, encode_text, encode_uint,
                             fb_prefix, fb_spans, fb_ts, min_item_end, scan_claim, scan_item)

DEFAULT_PORT = 36524
DEFAULT_ADDRESS = f"tcp:127.0.0.1:{DEFAULT_PORT}"
ENV_ADDRESS = "TC_FEEDBACK"
HOLD_BYTES = 64 << 20  # held replies never take more memory than this
T_ERROR = "error"  # server -> client, just before it closes the connection
T_AUTH = "auth"  # the key check, both ways (see auth_mac)
T_REFUSED = "refused"  # server -> client: claim entries owned by another client

ENV_KEY_FILE = "TC_FEEDBACK_KEY_FILE"
ENV_KEY = "TC_FEEDBACK_KEY"
AUTH_ALG = "hmac-sha256"
MIN_KEY = 16  # bytes
NONCE = 16  # bytes of each end's nonce

# Server limits (defaults of tc-feedback's options; see tc-feedback(8))
MAX_CLIENTS = 256
CLIENT_INPUT = 1 << 20  # an unfinished record of one client (and any record) at most
TOTAL_INPUT = 64 << 20  # unfinished records of all clients together
AUTH_TIMEOUT = 5.0  # seconds from accept to a client's header (and auth) at most
MAX_CLAIMS = 1 << 20  # connections claimed by one client at a time
MAX_DEPTH = 8  # nesting of a client record's arrays and maps
CLAIM_CHUNK = 1024  # entries per claim record a FeedbackClient writes (~90 KB at most)
FRAME_BUDGET = 4096  # bytes of a client's input framed per turn of the loop
SERVER_RECORD = 16 << 20  # FeedbackClient: an unfinished record from the server at most

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


def on_loopback(fam, sa) -> bool:
    """Is the (family, sockaddr) of parse_address a Unix socket or a loopback address (no
    one on the network can reach it, so no key is needed)?"""
    if fam == socket.AF_UNIX:
        return True
    try:
        return ipaddress.ip_address(sa[0].partition("%")[0]).is_loopback
    except ValueError:
        return False


def default_address() -> str:
    return os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS


# -- keys and authentication --------------------------------------------------------------

def load_key(path: str | None = None, warn=None) -> bytes | None:
    """The shared key: the file `path` (--key), else the file $TC_FEEDBACK_KEY_FILE, else
    $TC_FEEDBACK_KEY itself; None if none is set. Whitespace around it is not part of it
    (so `echo KEY > file` works); at least MIN_KEY bytes. UsageError if unusable."""
    where = "--key"
    if not path:
        path, where = os.environ.get(ENV_KEY_FILE) or None, f"${ENV_KEY_FILE}"
    if path:
        try:
            with open(path, "rb") as f:
                key = f.read((1 << 16) + 1)
                mode = os.fstat(f.fileno()).st_mode
        except OSError as e:
            raise UsageError(f"cannot read the key file {path!r} ({where}): "
                             f"{e.strerror or e}") from None
        if len(key) > 1 << 16:
            raise UsageError(f"the key file {path!r} ({where}) is larger than 64 KiB")
        if mode & 0o077 and warn is not None:
            warn(f"key file {path!r} can be read by other users (chmod 600 it)")
        what = f"the key file {path!r}"
    else:
        text = os.environ.get(ENV_KEY)
        if not text:
            return None
        key, what = text.encode(), f"${ENV_KEY}"
    key = key.strip()
    if len(key) < MIN_KEY or len(key) > 1 << 16:
        raise UsageError(f"{what} holds {len(key)} bytes: a key is {MIN_KEY} to 65536 bytes "
                         f"(make one with: head -c 32 /dev/urandom | base64 > FILE)")
    return key


_ROLE_CLIENT = b"tcpcopy feedback v1 client"
_ROLE_SERVER = b"tcpcopy feedback v1 server"


def auth_mac(key: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256(key, role || len || server nonce || len || client nonce): the proof one
    end (role) gives of holding the key; each end's own nonce makes a recorded proof
    useless on another connection, the role makes one end's proof useless as the other's."""
    msg = b"".join((role, bytes((len(server_nonce),)), server_nonce,
                    bytes((len(client_nonce),)), client_nonce))
    return hmac.new(key, msg, hashlib.sha256).digest()


def short_repr(v, limit: int = 60) -> str:
    """repr(v) cut to `limit` characters; never raises (a huge integer's repr does)."""
    try:
        text = repr(v)
    except Exception:  # noqa: BLE001 - ValueError (int digits), RecursionError, ...
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def parse_allow(text: str) -> list:
    """--allow 'CIDR,...' -> [ip_network, ...]; UsageError if bad."""
    nets = []
    for part in text.split(","):
        part = part.strip()
        try:
            if not part:
                raise ValueError("empty")
            nets.append(ipaddress.ip_network(part, strict=True))
        except ValueError as e:
            raise UsageError(f"--allow {text!r}: {part!r} is not an address or CIDR network "
                             f"({e})") from None
    return nets


# -- incremental stream decoding (non-blocking sockets and pipes) ------------------------

class PeerStreamParser(StreamParser):
    """A peer's stream (tc-intercept's, a client's, the server's), fed as it arrives:
    ``feed()`` gives (record, raw bytes or None) pairs, headers included. Headers of any
    format version are accepted: the peer check is version_error's, which can answer the
    peer. The readers of fb records take the usual ones themselves (feed_fast)."""

    def __init__(self, name: str):
        super().__init__(name, headers=True, any_version=True)

    def feed(self, data: bytes, mode: int = AS_RAW) -> list:
        """(record, raw bytes or None) pairs, whatever ``mode`` (feed_fast passes one)."""
        pairs = super().feed(data, AS_RAW)  # (not in the comprehension: compiled, its
        return [(item, raw if type(raw) is bytes else None)  # scope has no __class__)
                for item, raw in pairs]


def version_error(peer_v, who: str) -> str | None:
    """A message if a peer's format version differs from ours (or is not an integer: true
    is not 1), else None. Never raises, whatever peer_v is."""
    if type(peer_v) is int:
        if peer_v == FORMAT_VERSION:
            return None
        if -(10 ** 9) < peer_v < 10 ** 9:
            rel = "newer" if peer_v > FORMAT_VERSION else "other"
            return (f"{who} speaks record format version {peer_v}, {rel} than this "
                    f"tcpcopylib's {FORMAT_VERSION}; run the same tcpcopylib version on both "
                    f"ends")
    return f"{who} sent a header without a valid format version ({short_repr(peer_v, 30)})"


# -- a client's input: framed in linear time, bounded ---------------------------------------

class Refusal(Exception):
    """A client broke a rule: it is sent {"t": "error", "error": kind, "msg": msg} and
    dropped (the kinds are tc-feedback(8)'s)."""

    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind
        self.msg = msg


# -- routing keys ------------------------------------------------------------------------

# tc-feedback's routing keys are bytes: the reply's source and destination addresses, then
# its source and destination ports, as they lie in an IPv4 header without options (one
# slice of the datagram: 12 bytes) or an IPv6 header (36 bytes): packet.flow_bytes().
#: The routing key of the reply at data[off:end] (None if it is not IPv4/IPv6).
route_key = flow_bytes


def reply_key(data, off: int = 0, end: int = -1) -> tuple | None:
    """(client ip, client port, target ip, target port) of the reply at data[off:end]:
    its destination, then its source; None if not IPv4/IPv6."""
    key = route_key(data, off, end)
    return None if key is None else _key_parts(key)


def _ip_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _ip_packed(text: str) -> bytes:
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(fam, text)
        except (OSError, TypeError):
            pass
    raise ValueError(f"not an IP address: {text!r}")


def _key_parts(key: bytes) -> tuple:
    """A routing key -> (client ip, client port, target ip, target port)."""
    w = (len(key) - 4) // 2
    tport, cport = _PORTS.unpack_from(key, 2 * w)
    return key[w:2 * w], cport, key[:w], tport


def _key_entry(key: bytes) -> list:
    """A routing key -> the claim entry [client ip text, client port, target ip text,
    target port] that asks for it."""
    cip, cport, tip, tport = _key_parts(key)
    return [_ip_text(cip), cport, _ip_text(tip), tport]




def claim_route_key(entry) -> bytes:
    """The routing key of the replies a claim entry [client_ip_str, client_port,
    target_ip_str, target_port] asks for; ValueError/TypeError if malformed."""
    cip, cport, tip, tport = entry
    cport, tport = int(cport), int(tport)
    if not (0 <= cport < 65536 and 0 <= tport < 65536):
        raise ValueError("port out of range")
    return _ip_packed(tip) + _ip_packed(cip) + _PORTS.pack(tport, cport)


_PACKED: dict = {}  # an IP address's text (UTF-8) -> the address packed, for claims


def _packed_ip(text: bytes) -> bytes:
    """The address whose text (UTF-8) a claim entry holds, packed; ValueError if none."""
    ip = _PACKED.get(text)
    if ip is None:
        ip = _ip_packed(text.decode())
        if len(_PACKED) > 4096:
            _PACKED.clear()
        _PACKED[text] = ip
    return ip


def _entry_route_key(client_ip: bytes, client_port: int, target_ip: bytes,
                     target_port: int) -> bytes:
    """claim_route_key of an entry as wire.scan_claim reads it (addresses as UTF-8)."""
    return (_packed_ip(target_ip) + _packed_ip(client_ip)
            + _PORTS.pack(target_port, client_port))


def claim_keys(buf, pos: int):
    """(add?, [routing key, ...], end) of a claim record at pos in FeedbackClient's layout
    (wire.scan_claim), its addresses valid; None for anything else or an incomplete record
    (decode it in full)."""
    return scan_claim(buf, pos, _entry_route_key)


# -- the client ------------------------------------------------------------------------

class FeedbackClient:
    """tc-session's end of the channel: claim sessions, read their replies.

    With a key (or when the server asks for one) connect() completes the key check both
    ways (see auth_mac) before it returns. The connections claimed and not released are
    kept (live): reconnect() claims them again on a new connection (a restarted server)."""

    def __init__(self, address: str | None = None, name: str = "tc-session",
                 key: bytes | None = None, warn=None):
        self.address = address or default_address()
        self.name = name
        self.key = key
        self.warn = warn
        self.id = secrets.token_bytes(16)  # this client on any connection (see reconnect)
        self.sock: socket.socket | None = None
        self._ops: list = []  # (kind, [encoded entry, ...]) in call order
        self.live: dict = {}  # encoded entry -> None: claimed and not released
        self._decoder = PeerStreamParser(f"feedback server {self.address}")
        self._pending: list = []
        self._auth: list = []  # auth records received, not yet looked at
        self._eof = False
        self._ip_texts: dict = {}  # packed address -> its text CBOR-encoded, for claims
        self._target_ends: dict = {}  # (address, port) -> both CBOR-encoded, for claims
        # one receive buffer: a fresh 256 KiB bytes per recv() costs an mmap/munmap pair
        self._rbuf = memoryview(bytearray(1 << 18))
        self.server_header: dict | None = None
        self.send_timeout = 5.0
        self.refused = 0  # claim entries the server refused (owned by another client)
        self.reconnects = 0
        self._refused_said = 0.0
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
        deadline = time.monotonic() + timeout
        try:
            self._send(encode_section(header(self.name, id=self.id)))
            # The server answers with its own header (or an error record and a close).
            self._wait(lambda: self.server_header is not None, deadline, "no stream header")
            alg = self.server_header.get("auth")
            if alg is None:
                if self.key is not None:
                    raise NoPermissionError(
                        f"tc-feedback at {self.address} does not check keys (started without "
                        f"--key) and this tool was given one: refusing to trust it")
                return
            if alg != AUTH_ALG:
                raise NoPermissionError(f"tc-feedback at {self.address} asks for an unknown "
                                        f"authentication ({short_repr(alg)})")
            if self.key is None:
                raise NoPermissionError(
                    f"tc-feedback at {self.address} requires a key: give --key FILE or set "
                    f"${ENV_KEY_FILE}")
            self._wait(lambda: self._auth, deadline, "no authentication challenge")
            sn = self._auth.pop(0).get("nonce")
            if type(sn) is not bytes or not NONCE <= len(sn) <= 64:
                raise NoPermissionError(f"tc-feedback at {self.address}: malformed "
                                        f"authentication challenge")
            cn = secrets.token_bytes(NONCE)
            self._send(cbor2.dumps({"t": T_AUTH, "nonce": cn,
                                    "mac": auth_mac(self.key, _ROLE_CLIENT, sn, cn)}))
            self._wait(lambda: self._auth, deadline, "no answer to the authentication")
            mac = self._auth.pop(0).get("mac")
            if type(mac) is not bytes or not hmac.compare_digest(
                    mac, auth_mac(self.key, _ROLE_SERVER, sn, cn)):
                raise NoPermissionError(f"tc-feedback at {self.address} does not hold this "
                                        f"key (its proof is wrong): refusing to trust it")
        except BaseException:
            self.close()
            raise

    def _wait(self, done, deadline: float, what: str) -> None:
        """Read until done() (connect's steps); UnavailableError at the deadline or EOF."""
        poll = select.poll()
        poll.register(self.sock.fileno(), select.POLLIN)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnavailableError(f"tc-feedback at {self.address}: {what} within the "
                                       f"connect timeout")
            poll.poll(math.ceil(left * 1e3))
            self._receive()
            if not done() and self._eof:
                raise UnavailableError(f"tc-feedback at {self.address} closed the connection")

    def reconnect(self, timeout: float = 1.0) -> int:
        """A new connection (the server restarted, say), authenticated again, with every live
        claim sent again; the number of connections claimed again. UnavailableError if the
        server cannot be reached (try again later)."""
        self.close()
        self._decoder = PeerStreamParser(f"feedback server {self.address}")
        self._pending, self._auth, self._ops = [], [], []
        self._eof = False
        self.server_header = None
        self.connect(timeout)
        self.reconnects += 1
        if self.live:
            self._ops = [("add", list(self.live))]
            self.flush()
        return len(self.live)

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
            try:
                if replies is None:
                    items = self._decoder.feed(data)
                else:
                    items = self._decoder.feed_fast(
                        data, lambda buf: self._take_replies(buf, replies), wait=fb_prefix)
            except StreamError as e:
                self.close()
                raise UnavailableError(f"tc-feedback at {self.address}: {e}") from None
            for item, _raw in items:
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
                elif t == T_AUTH:
                    self._auth.append(item)
                elif t == T_REFUSED:
                    self._refused_claims(item)
                elif t == T_ERROR:
                    self.close()
                    kind = item.get("error")
                    exc = (PeerVersionError if kind == "version" else NoPermissionError
                           if kind == "auth" else UnavailableError)
                    raise exc(f"tc-feedback at {self.address}: "
                              f"{short_repr(item.get('msg', 'error'), 200)}")
            if self._decoder.pending_bytes > SERVER_RECORD:
                self.close()
                raise UnavailableError(f"tc-feedback at {self.address}: a record of more than "
                                       f"{SERVER_RECORD} bytes")
            if not more:
                return

    def _refused_claims(self, item: dict) -> None:
        entries = item.get("claim")
        n = len(entries) if type(entries) is list else 0
        self.refused += n
        now = time.monotonic()
        if self.warn is not None and now - self._refused_said > 5.0:
            self._refused_said = now
            self.warn(f"tc-feedback at {self.address} refused {n} claim(s): "
                      f"{short_repr(item.get('why'), 80)} (e.g. {short_repr(entries, 80)}; "
                      f"{self.refused} so far); those sessions get no replies")

    def _take_replies(self, buf: bytes, replies: list) -> int:
        """feed_fast's take: (data, len) of the usual fb records at the start of buf into
        `replies`, without a dict per reply; the bytes taken."""
        spans = fb_spans(buf, 0)
        if not spans:
            return 0
        replies += [(buf[d0:d1], length) for d0, d1, length, _end in spans]
        self.last_ts = fb_ts(buf, spans[-2][3] if len(spans) > 1 else 0)
        return spans[-1][3]

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
            # (poll, not select: select fails for descriptors >= 1024)
            poll = select.poll()
            poll.register(self.sock.fileno(), select.POLLIN | select.POLLOUT)
            if any(ev & select.POLLIN for _, ev in poll.poll(math.ceil((deadline - now) * 1e3))):
                self._receive()
                if self.sock is None:
                    raise UnavailableError(f"tc-feedback at {self.address}: not connected")

    def _op(self, kind: str, cip: bytes, cport: int, tip: bytes, tport: int) -> None:
        # each entry [client_ip_str, client_port, target_ip_str, target_port] is CBOR-encoded
        # here (client address texts and target ends cached), records assembled by flush()
        texts, ends = self._ip_texts, self._target_ends
        c, t = texts.get(cip), ends.get((tip, tport))
        if c is None or t is None:
            if len(texts) > 4096 or len(ends) > 4096:
                texts.clear()
                ends.clear()
            c = texts[cip] = encode_text(_ip_text(cip))
            t = ends[(tip, tport)] = encode_text(_ip_text(tip)) + encode_uint(tport)
        entry = claim_entry(c, cport, t)
        if kind == "add":
            self.live[entry] = None
        else:
            self.live.pop(entry, None)
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
        if not self._ops:
            return
        if self.sock is None:  # (reconnect() claims the live ones again)
            self._ops = []
            return
        parts = []
        append = parts.append
        for kind, entries in self._ops:
            n = len(entries)
            if n <= CLAIM_CHUNK:
                append(claim_head(kind, n))
                parts += entries
                continue
            for i in range(0, n, CLAIM_CHUNK):  # (the server bounds a record)
                part = entries[i:i + CLAIM_CHUNK]
                append(claim_head(kind, len(part)))
                parts += part
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
    __slots__ = ("sock", "name", "out", "keys", "dropped", "delivered", "peer",
                 "want_write", "closing", "warned", "state", "inbuf", "fstart", "fpos",
                 "fstack", "nonce", "cid", "deadline", "refused", "classic", "records")

    def __init__(self, sock, peer):
        self.sock = sock
        self.peer = peer
        self.name = peer
        self.out = bytearray()
        self.keys: set = set()
        self.dropped = 0
        self.delivered = 0
        self.want_write = False
        self.closing = False
        self.warned = 0.0
        self.state = _READY  # (a socket accepted by the server starts at _LABEL)
        self.inbuf = bytearray()  # the unfinished record (_frame's state below)
        self.fstart = 0
        self.fpos = 0
        self.fstack: list = []
        self.nonce = b""
        self.cid = None  # the client's "id" (its header): a new connection replaces the old
        self.deadline = 0.0
        self.refused = 0  # claim entries refused (owned by another client)
        self.classic = False  # a classic tcpcopy (tcpcopylib.classic): 14-byte messages in,
        self.records: list = []  # ... and its 64-byte records not framed yet out


# a client's state: what its next item must be
_LABEL, _HEADER, _AUTH, _READY = range(4)
_STATE_NAMES = ("label", "header", "auth", "ready")


class FeedbackServer:
    """Route fb records (raw CBOR, as read from the input) to the clients that claimed them.

    Single-threaded around a selector: the input fd, the listening socket and every client
    socket. Nothing blocks: each client has an output buffer capped at ``client_buffer``
    bytes; replies that do not fit are dropped and counted for that client.
    """

    def __init__(self, listen: str, hold_ms: int = 2000, hold_max: int = 100_000,
                 client_buffer: int = 8 << 20, warn=print, info=None, tool: str = "tc-feedback",
                 key: bytes | None = None, allow: list | None = None,
                 max_clients: int = MAX_CLIENTS, client_input: int = CLIENT_INPUT,
                 total_input: int = TOTAL_INPUT, auth_timeout: float = AUTH_TIMEOUT,
                 max_claims: int = MAX_CLAIMS, classic_listen: str | None = None):
        self.listen_address = listen  # None: classic clients only
        self.classic_address = classic_listen
        self.hold_s = hold_ms / 1000.0
        self.hold_max = hold_max
        self.client_buffer = client_buffer
        self.warn = warn
        self.info = info or (lambda msg, level=1: None)
        self.tool = tool
        self.key = key
        self.allow = allow
        self.max_clients = max_clients
        self.client_input = client_input
        self.total_input = total_input
        self.auth_timeout = auth_timeout
        self.max_claims = max_claims
        self.routes: dict = {}      # key -> _Client
        self.held: dict = {}        # key -> [entry, ...]; entry = [deadline, key, raw]
        self.hold_order = collections.deque()
        self.held_bytes = 0
        self.clients: dict = {}     # fd -> _Client
        self.by_id: dict = {}       # a client's "id" -> _Client
        self.unready = collections.deque()  # clients not identified yet, oldest first
        self.input_bytes = 0        # unfinished records of all clients
        self.counts = dict(replies=0, delivered=0, held=0, held_delivered=0, unclaimed=0,
                           hold_overflow=0, dropped_slow=0, not_tcp=0, clients=0,
                           clients_now=0, claims=0, releases=0, authenticated=0,
                           refused=0, claim_conflicts=0, replaced=0, not_allowed=0,
                           busy=0, evicted=0, accept_errors=0, classic_clients=0,
                           classic_adds=0, classic_moved=0, classic_ignored=0)
        self.refusals: dict = {}    # refusal kind -> count
        self._hello = encode_section(header(tool, auth=AUTH_ALG) if key else header(tool))
        self._dirty: set = set()
        self._poll = None  # select.poll of serve()
        self.lsock = None
        self.classic_lsock = None  # classic tcpcopy clients (intercept's port, 36524)
        self.unix_path = None
        self._accept_paused = 0.0  # the listener is out of the poll set until then
        self._accept_backoff = 0.0
        self._said: dict = {}  # what -> [window end, lines left, suppressed]: see _say
        self._backlog: set = set()  # clients with input read but not framed yet

    # -- setup ---------------------------------------------------------------------------
    def open(self) -> None:
        if self.listen_address is not None:
            self.lsock = self._listen(self.listen_address)
        if self.classic_address is not None:
            self.classic_lsock = self._listen(self.classic_address, classic=True)

    def _listen(self, address: str, classic: bool = False):
        fam, sa = parse_address(address, listen=True)
        if classic and fam == socket.AF_UNIX:
            raise UsageError(f"--classic {address}: tcpcopy connects over TCP (tcp:HOST:PORT "
                             f"or tcp::PORT)")
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
                raise NoPermissionError(f"cannot listen on {address}: {e.strerror}") from None
            raise UnavailableError(f"cannot listen on {address}: {e.strerror or e}") from None
        s.setblocking(False)
        if fam == socket.AF_UNIX:
            self.unix_path = sa
        elif classic:
            if self.allow is None and not on_loopback(fam, sa):
                self.warn(f"classic clients on {address} cannot authenticate and no --allow "
                          f"is given: only connections from loopback addresses are accepted")
        elif self.key is None and not on_loopback(fam, sa):
            self.warn(f"listening on {address} without a key: anyone who can "
                      f"reach it may claim sessions and read the target's replies (give "
                      f"--key FILE, or listen on a loopback or unix: address)")
        return s

    def close(self) -> None:
        for c in list(self.clients.values()):
            self._drop_client(c, None)
        for ls in (self.lsock, self.classic_lsock):
            if ls is not None:
                ls.close()
        self.lsock = self.classic_lsock = None
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
            self.unix_path = None

    # -- the loop ------------------------------------------------------------------------
    def serve(self, in_fd: int, drain_s: float = 5.0, tick=None, tick_s: float = 0.0,
              take=None, name: str | None = None) -> None:
        """Run until the input ends, then until held replies and client buffers are done
        (at most hold time + drain_s). ``take``: an input in this process rather than a
        stream on ``in_fd`` (tc-feedback --capture): when in_fd is readable, take()
        returns the stream's next bytes (b"": none yet); such an input never ends (a
        signal stops the loop)."""
        # select.poll directly (poll, unlike epoll, accepts regular files): the selectors
        # wrapper costs more than the routing itself at ~5 replies per wake-up
        self._poll = poll = select.poll()
        lfd = self.lsock.fileno() if self.lsock is not None else -1
        cfd = self.classic_lsock.fileno() if self.classic_lsock is not None else -1
        for fd in (lfd, cfd):
            if fd >= 0:
                poll.register(fd, select.POLLIN)
        poll.register(in_fd, select.POLLIN)
        clients, dirty_add = self.clients, self._dirty.add
        # one input buffer: a fresh 256 KiB bytes per read costs an mmap/mremap/munmap
        rbuf = bytearray(1 << 18)
        rview = memoryview(rbuf)
        decoder = PeerStreamParser(name or ("<stdin>" if in_fd == 0 else f"input fd {in_fd}"))
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
            if self.unready:
                self._expire_unready(now)
                if self.unready:
                    timeout = min(timeout, math.ceil(max(0.0, self.unready[0].deadline - now)
                                                     * 1e3) + 1)
            if self._backlog:
                timeout = 0
            if self._accept_paused:
                if now >= self._accept_paused:
                    self._accept_paused = 0.0
                    for fd in (lfd, cfd):
                        if fd >= 0:
                            poll.register(fd, select.POLLIN)
                else:
                    timeout = min(timeout, math.ceil((self._accept_paused - now) * 1e3) + 1)
            if next_tick is not None:
                if now >= next_tick:
                    tick()
                    next_tick = now + tick_s
                timeout = min(timeout, math.ceil(max(0.0, next_tick - now) * 1e3))
            for fd, ev in poll.poll(timeout):
                if fd == in_fd and take is not None:
                    data = take()
                    if data:
                        self._serve_input(decoder, data)
                elif fd == in_fd:
                    n = os.readv(in_fd, (rbuf,))
                    if not n:
                        poll.unregister(in_fd)
                        eof_at = time.monotonic()
                        self.info("input ended; draining", 1)
                        continue
                    self._serve_input(decoder, rview[:n].tobytes())
                elif fd == lfd:
                    self._accept(self.lsock)
                elif fd == cfd:
                    self._accept(self.classic_lsock, classic=True)
                else:
                    c = clients.get(fd)
                    if c is None:
                        continue
                    if ev & ~select.POLLOUT:  # readable, or hung up / error: recv says which
                        self._client_readable(c)
                    if c.sock is not None and ev & ~select.POLLIN:
                        dirty_add(c)
            if self._backlog:
                self._serve_backlog()
            self._flush_clients()
        decoder.close()  # StreamError if the input ended inside a record

    # -- routing -------------------------------------------------------------------------
    def _serve_input(self, decoder: PeerStreamParser, data: bytes) -> None:
        """Route the fb records of the next piece of input."""
        for item, raw in self._feed_input(decoder, data):
            if item.get("t") == T_FB:
                d = item.get("data")
                self.route(route_key(d) if d else None, raw or cbor2.dumps(item))

    def _feed_input(self, decoder: PeerStreamParser, data: bytes) -> list:
        """Route the fb records at the start of the input inline (_route_records); what is
        left (a header, another record type, an incomplete record) goes through the
        decoder: its records are returned."""
        return decoder.feed_fast(data, self._route_records, wait=fb_prefix)

    def _route_records(self, buf: bytes) -> int:
        """feed_fast's take: route the fb records at the start of buf, in order (the hot
        loop: no call per usual record, consecutive records for one client appended to its
        buffer at once); the bytes taken."""
        pos, n_buf, routes, cap = 0, len(buf), self.routes, self.client_buffer
        delivered = 0
        while True:
            run_c, run_start, run_n = None, 0, 0  # buf[run_start:pos]: run_n records for run_c
            for d0, d1, _length, end in fb_spans(buf, pos):
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
                if c is not None and not c.classic and len(c.out) + end - pos <= cap:
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
        return pos

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
        queued = len(c.out)
        if c.classic:
            raw = _classic_record(raw)
            if raw is None:  # (an IPv6 reply: its key is never a classic client's)
                self.counts["not_tcp"] += 1
                return False
            queued += len(c.records) * classic.RECORD_SIZE
        if queued + len(raw) > self.client_buffer:
            c.dropped += 1
            self.counts["dropped_slow"] += 1
            now = time.monotonic()
            if now - c.warned > 5.0:
                c.warned = now
                self.warn(f"client {c.name} is not reading fast enough: {c.dropped} replies "
                          f"dropped for it so far")
            return False
        if c.classic:
            c.records.append(raw)
        else:
            c.out += raw
        c.delivered += 1
        self.counts["delivered"] += 1
        self._dirty.add(c)
        return True

    def claim(self, c: _Client, entries, add: bool) -> None:
        """Claim (add) or release the connections of `entries` ([client ip text, client
        port, target ip text, target port] each) for c; Refusal if malformed."""
        if entries is None:
            return
        if type(entries) is not list:
            raise Refusal("claim", f"a claim's {'add' if add else 'del'} is not an array "
                                   f"({type(entries).__name__})")
        keys = []
        for e in entries:
            try:
                keys.append(claim_route_key(e))
            except Exception:  # noqa: BLE001 - whatever the entry holds, it is malformed
                raise Refusal("claim", f"malformed claim entry {short_repr(e)}") from None
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
        refused = None
        for key in keys:
            old = routes.get(key)
            if old is not None and old is not c:  # another client's: never taken
                if refused is None:
                    refused = []
                refused.append(key)
                continue
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
        if len(c.keys) > self.max_claims:
            raise Refusal("limit", f"more than {self.max_claims} connections claimed at once")
        if refused:
            self._refuse_claims(c, refused)

    def _refuse_claims(self, c: _Client, keys: list) -> None:
        """Tell c which of its claims were refused (owned by another client); counted."""
        self.counts["claim_conflicts"] += len(keys)
        c.refused += len(keys)
        if c.sock is not None:
            c.out += cbor2.dumps({"t": T_REFUSED, "claim": [_key_entry(k) for k in keys],
                                  "why": "owned by another client"})
            self._dirty.add(c)
        self._say("conflict", f"client {c.name} claimed {len(keys)} connection(s) owned by "
                              f"another client: refused ({c.refused} so far)")

    # -- classic tcpcopy clients (tcpcopylib.classic; tcpcopy(7), CLASSIC) ---------------------
    def _classic_input(self, c: _Client, data: bytes) -> None:
        """A classic client's 14-byte messages: the version handshake first, then
        CLIENT_ADDs. Its input is never more than one unfinished message."""
        buf = c.inbuf
        buf += data
        size = classic.MSG_SIZE
        pos, n = 0, len(buf)
        while n - pos >= size:
            msg = bytes(buf[pos:pos + size])
            pos += size
            if c.state != _READY:
                if not classic.is_handshake(msg):
                    self._refuse(c, "version", "its first message is not a version handshake "
                                               "(a tcpcopy older than 1.0?)")
                    return
                version = classic.msg_type(msg)
                if version != classic.VERSION:
                    self._say("classic", f"client {c.name} speaks classic version {version}, "
                                         f"not {classic.VERSION}: going on (as intercept does)")
                c.state = _READY
                self.info(f"client {c.name} identified (version {version})", 1)
                continue
            kind = classic.msg_type(msg)
            if kind == classic.CLIENT_ADD:
                self._classic_add(c, classic.msg_route_key(msg))
            else:  # CLIENT_DEL (never sent by tcpcopy) and unknown types: no effect
                self.counts["classic_ignored"] += 1
        del buf[:pos]

    def _classic_add(self, c: _Client, key: bytes) -> None:
        """Route the replies of key to c, as intercept's router_add does: a later ADD moves
        the route from another connection of the same host (tcpcopy spreads its ADDs over
        its connections); one of another host, or a native client's, is never taken."""
        self.counts["claims"] += 1
        self.counts["classic_adds"] += 1
        old = self.routes.get(key)
        if old is not None and old is not c:
            if not old.classic or old.peer.rpartition(":")[0] != c.peer.rpartition(":")[0]:
                self.counts["claim_conflicts"] += 1
                c.refused += 1
                self._say("conflict", f"client {c.name} added a connection owned by "
                                      f"{old.name}: refused ({c.refused} so far)")
                return
            old.keys.discard(key)
            self.counts["classic_moved"] += 1
        keys = c.keys
        keys.discard(key)
        if len(keys) >= self.max_claims:
            # no CLIENT_DEL ever comes: the oldest route of this client makes room
            oldest = next(iter(keys))
            keys.discard(oldest)
            if self.routes.get(oldest) is c:
                del self.routes[oldest]
        self.routes[key] = c
        keys.add(key)
        held = self.held.pop(key, None) if self.held else None
        for entry in held or ():
            self.held_bytes -= len(entry[2])
            # as intercept: a SYN or RST that raced the ADD is delivered; an ACK or data
            # before it belongs to an older connection on the same addresses
            if _syn_or_rst(entry[2]) and self._deliver(c, entry[2]):
                self.counts["held_delivered"] += 1
            else:
                self.counts["unclaimed"] += 1
            entry[2] = None

    # -- clients -------------------------------------------------------------------------
    def _say(self, what: str, msg: str) -> None:
        """warn(), at most 3 lines per 10 s for each kind of message (the rest counted and
        mentioned with the next line let through): a flood of bad peers never floods the
        log."""
        now = time.monotonic()
        st = self._said.get(what)
        if st is None or now >= st[0]:
            if st is not None and st[2]:
                msg += f" ({st[2]} similar message(s) suppressed)"
            st = self._said[what] = [now + 10.0, 3, 0]
        if st[1] > 0:
            st[1] -= 1
            self.warn(msg)
        else:
            st[2] += 1

    def _accept(self, lsock, classic: bool = False) -> None:
        for _ in range(64):
            try:
                s, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.counts["accept_errors"] += 1
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors or memory: make room by dropping the oldest client
                    # not identified yet, if any; else the pending connection stays queued
                    # and the listener readable: stop polling it a while, never spin
                    if self._evict_unready():
                        continue
                    self._accept_backoff = min(max(self._accept_backoff * 2, 0.05), 1.0)
                    self._accept_paused = time.monotonic() + self._accept_backoff
                    for ls in (self.lsock, self.classic_lsock):
                        try:
                            self._poll.unregister(ls.fileno())
                        except (KeyError, ValueError, AttributeError):
                            pass
                    self._say("accept", f"accept failed: {e.strerror or e} "
                                        f"({len(self.clients)} clients); pausing accepts "
                                        f"{self._accept_backoff * 1e3:.0f} ms "
                                        f"({self.counts['accept_errors']} accept errors)")
                else:
                    self._say("accept", f"accept failed: {e.strerror or e}")
                return
            self._accept_backoff = 0.0
            self._admit(s, peer, classic)

    def _admit(self, s, peer, classic: bool = False) -> None:
        s.setblocking(False)
        if s.family != socket.AF_UNIX:
            host = peer[0]
            # a classic client cannot authenticate: --allow's addresses only (without
            # --allow, loopback ones)
            if (self.allow is not None or classic) and not self._allowed(host):
                self.counts["not_allowed"] += 1
                self._say("allow", f"connection from {host} refused (not in --allow)")
                s.close()
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{host}:{peer[1]}" if s.family == socket.AF_INET else f"[{host}]:{peer[1]}"
        else:
            peer = f"unix#{s.fileno()}"
        if len(self.clients) >= self.max_clients and not self._evict_unready():
            self.counts["busy"] += 1
            if classic:
                self._say("busy", f"classic connection from {peer} refused: "
                                  f"{len(self.clients)} clients (--max-clients)")
                s.close()
                return
            self._say("busy", f"connection from {peer} refused: {len(self.clients)} clients "
                              f"(--max-clients)")
            try:
                s.send(self._hello + cbor2.dumps(
                    {"t": T_ERROR, "error": "busy",
                     "msg": f"too many clients ({self.max_clients})"}), socket.MSG_NOSIGNAL)
            except OSError:
                pass
            s.close()
            return
        c = _Client(s, peer)
        c.state = _LABEL
        if classic:  # intercept answers nothing: no header, no key check
            c.classic = True
            c.keys = _OrderedKeys()
            c.name = f"classic {peer}"
            self.counts["classic_clients"] += 1
        else:
            c.out += self._hello
        if self.key is not None and not classic:
            c.nonce = secrets.token_bytes(NONCE)
            c.out += cbor2.dumps({"t": T_AUTH, "alg": AUTH_ALG, "nonce": c.nonce})
        c.deadline = time.monotonic() + self.auth_timeout
        self.unready.append(c)
        self.clients[s.fileno()] = c
        self._poll.register(s.fileno(), select.POLLIN)
        self.counts["clients"] += 1
        self.counts["clients_now"] = len(self.clients)
        self._dirty.add(c)
        self.info(f"client {peer} connected", 2)

    def _evict_unready(self) -> bool:
        """Refuse the oldest client not identified (or authenticated) yet, to make room for
        a new one; False if there is none (identified clients are never evicted)."""
        q = self.unready
        while q:
            c = q.popleft()
            if c.sock is not None and c.state != _READY:
                self.counts["evicted"] += 1
                self._refuse(c, "busy", "dropped to make room for a new client (too many "
                                        "clients not identified yet)")
                return True
        return False

    def _allowed(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.allow is None:
            return ip.is_loopback
        return any(ip in net for net in self.allow)

    def _expire_unready(self, now: float) -> None:
        q = self.unready
        while q and (q[0].sock is None or q[0].state == _READY or q[0].deadline <= now):
            c = q.popleft()
            if c.sock is not None and c.state != _READY:
                what = ("send its version message" if c.classic else "authenticate"
                        if c.state == _AUTH else "identify itself")
                self._refuse(c, "timeout", f"did not {what} within {self.auth_timeout:g} s")

    def _client_readable(self, c: _Client) -> None:
        if c in self._backlog:
            return  # its input so far first (the loop frames it, a budget per turn)
        ready = c.state == _READY
        try:
            # a client not identified yet is read in small parts (its records are small)
            data = c.sock.recv(1 << 16 if ready else 1 << 12)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop_client(c, e.strerror or str(e))
            return
        if not data:
            self._drop_client(c, "disconnected")
            return
        if c.classic:
            self._classic_input(c, data)
            return
        try:
            if ready and not c.inbuf:
                pos = self._inline_claims(c, data)
                if pos == len(data):
                    return
                if pos:
                    data = data[pos:]
            self._client_input(c, data)
        except Refusal as e:
            self._refuse(c, e.kind, e.msg)

    def _inline_claims(self, c: _Client, data: bytes) -> int:
        """Claim records at the start of data, whole as FeedbackClient writes them, read
        inline without framing; the position after the last one."""
        pos, n = 0, len(data)
        while pos < n:
            got = claim_keys(data, pos)
            if got is None:
                break
            add, keys, pos = got
            self._claim_keys(c, keys, add)
        return pos

    def _serve_backlog(self) -> None:
        """Frame a budget more of each client's input read but not framed yet."""
        backlog = list(self._backlog)
        self._backlog.clear()
        for c in backlog:
            if c.sock is not None:
                try:
                    self._client_input(c, b"")
                except Refusal as e:
                    self._refuse(c, e.kind, e.msg)

    def _client_input(self, c: _Client, data: bytes) -> None:
        """Frame c's input (_frame) and handle each complete item; Refusal if c broke a
        rule. What is left is the unfinished record, bounded per client and in all."""
        buf = c.inbuf
        before = len(buf)
        if self.input_bytes + len(data) > self.total_input:
            raise Refusal("limit", f"the server holds {self.input_bytes} bytes of unfinished "
                                   f"records (--total-input)")
        buf += data
        budget_end = c.fpos + FRAME_BUDGET
        fast = 2  # inline claim reading: at the start and after the record carried over
        try:
            while c.fstart < len(buf):
                start = c.fstart
                if c.fpos == start:  # at an item's start
                    if fast and c.state == _READY:
                        fast -= 1
                        pos = self._inline_claims(c, bytes(buf[start:]))
                        if pos:
                            c.fstart = c.fpos = start + pos
                            budget_end += pos  # (not the framer's work)
                            continue
                    if buf[start] == LABEL[0]:  # a label?
                        have = bytes(buf[start:start + len(LABEL)])
                        if have != LABEL:
                            if LABEL.startswith(have):
                                break  # its start: wait for the rest
                            raise Refusal("stream", "not a tcpcopy record stream (no TCPR "
                                                    "label)")
                        c.fstart = c.fpos = start + len(LABEL)
                        self._client_label(c)
                        continue
                if c.fpos >= budget_end:
                    self._backlog.add(c)
                    break
                end = self._frame(c, buf, start, budget_end)
                if end < 0:
                    if end == -2:
                        self._backlog.add(c)  # (more next turn of the loop)
                    break
                c.fstart = end
                self._client_item(c, bytes(buf[start:end]))
                if c.sock is None:
                    return
        finally:
            if c.fstart:
                del buf[:c.fstart]
                c.fpos -= c.fstart
                c.fstart = 0
            self.input_bytes += len(buf) - before

    def _frame(self, c: _Client, buf, start: int, budget_end: int) -> int:
        """Find where c's item at buf[start] ends, going on from where the last call
        stopped (c.fpos, c.fstack: wire.scan_item's state): its end, -1 if more bytes are
        needed, -2 if item heads at budget_end or beyond are left for another turn.

        Every byte is looked at once, however the item arrives (a record cut into 1-byte
        reads costs what it costs whole). Refusal for what a client's record never holds:
        more than its limit of bytes (complete or not), nesting deeper than MAX_DEPTH, tags,
        indefinite lengths, reserved values."""
        limit = self.client_input if c.state == _READY else 4096
        n = len(buf)
        if c.fpos == start:
            c.fstack = [1]  # (the item itself)
        scan_end = min(n, budget_end)
        try:
            pos = c.fpos = scan_item(buf, c.fpos, scan_end, c.fstack, MAX_DEPTH, plain=True)
        except Malformed as e:
            raise Refusal("stream", f"not a valid record: {e}") from None
        if min_item_end(pos, c.fstack) - start > limit:
            raise Refusal("limit", f"a record of more than {limit} bytes")
        if not c.fstack and pos <= n:
            return pos
        if scan_end < n and pos < n:
            return -2
        if n - start > limit:
            raise Refusal("limit", f"an unfinished record of more than {limit} bytes")
        return -1

    def _client_label(self, c: _Client) -> None:
        if c.state == _AUTH:
            raise Refusal("auth", "a label instead of the auth record")
        # (an identified client's new section: a header, no new authentication)
        c.state = -_HEADER if c.state in (_READY, -_HEADER) else _HEADER

    def _client_item(self, c: _Client, raw: bytes) -> None:
        st = c.state
        if st == _LABEL:
            raise Refusal("stream", "not a tcpcopy record stream (no TCPR label at byte 0)")
        if st == _READY:
            got = claim_keys(raw, 0)
            if got is not None and got[2] == len(raw):
                self._claim_keys(c, got[1], got[0])
                return
        try:
            item = cbor2.loads(raw)
        except Exception as e:  # noqa: BLE001 - a malformed item, whatever cbor2 makes of it
            raise Refusal("stream", f"not a valid record: {short_repr(str(e), 80)}") from None
        if type(item) is not dict:
            raise Refusal("stream", f"a {type(item).__name__} item (records are maps with a "
                                    f"'t' key)")
        t = item.get("t")
        if st == _HEADER or st == -_HEADER:
            self._client_header(c, item)
        elif st == _AUTH:
            self._client_auth(c, item)
        elif t == T_CLAIM:
            for kind, add in (("add", True), ("del", False)):
                if kind in item:
                    self.claim(c, item[kind], add)
        elif t == T_HEADER or t == T_AUTH:
            raise Refusal("stream", f"a {t} record out of place")
        # other records: passed over (a newer client may send more)

    def _client_header(self, c: _Client, item: dict) -> None:
        if item.get("t") != T_HEADER:
            raise Refusal("stream", "label not followed by a header record")
        msg = version_error(item.get("v"), f"client {c.peer}")
        if msg:
            raise Refusal("version", msg)
        if c.state == -_HEADER:  # a new section from an identified client
            c.state = _READY
            return
        tool = item.get("tool")
        if type(tool) is str and tool:
            c.name = "".join(ch if ch.isprintable() else "?" for ch in tool[:40]) + "@" + c.peer
        cid = item.get("id")
        if type(cid) is bytes and 8 <= len(cid) <= 64:
            c.cid = cid
        if self.key is not None:
            c.state = _AUTH
        else:
            self._client_ready(c)

    def _client_auth(self, c: _Client, item: dict) -> None:
        cn, mac = item.get("nonce"), item.get("mac")
        if item.get("t") != T_AUTH or type(cn) is not bytes or type(mac) is not bytes \
                or not NONCE <= len(cn) <= 64:
            raise Refusal("auth", "this tc-feedback needs a key: expected an auth record "
                                  "with nonce and mac (give tc-session --key FILE)")
        if not hmac.compare_digest(auth_mac(self.key, _ROLE_CLIENT, c.nonce, cn), mac):
            raise Refusal("auth", "authentication failed: not the key of this tc-feedback")
        c.out += cbor2.dumps({"t": T_AUTH, "mac": auth_mac(self.key, _ROLE_SERVER, c.nonce, cn)})
        self._dirty.add(c)
        self.counts["authenticated"] += 1
        self._client_ready(c)

    def _client_ready(self, c: _Client) -> None:
        """c is identified (and authenticated): it may claim and receive."""
        c.state = _READY
        if c.cid is not None:
            old = self.by_id.get(c.cid)
            if old is not None and old is not c and old.sock is not None:
                # the same client's new connection (its old one broken or half-open): the
                # old one's claims are freed for it
                self.counts["replaced"] += 1
                self._drop_client(old, "replaced by a new connection of the same client")
            self.by_id[c.cid] = c
        self.info(f"client {c.name} {'authenticated' if self.key else 'identified'}", 1)

    def _refuse(self, c: _Client, kind: str, msg: str) -> None:
        self.counts["refused"] += 1
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        self._say("refuse", f"refusing client {c.name}: {msg}")
        try:
            c.sock.send(bytes(c.out) + (b"" if c.classic else cbor2.dumps(
                {"t": T_ERROR, "error": kind, "msg": msg})), socket.MSG_NOSIGNAL)
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
        if c.cid is not None and self.by_id.get(c.cid) is c:
            del self.by_id[c.cid]
        if not c.classic:  # (a classic client's input is never counted: 13 bytes at most)
            self.input_bytes -= len(c.inbuf)
        c.inbuf = bytearray()
        c.records = []
        self._backlog.discard(c)
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
            if c.records:  # a classic client's replies of this turn, in combined frames
                c.out += classic.encode_frames(c.records)
                c.records = []
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
                f"{k['clients']} clients ({k['clients_now']} connected)"
                + (f", {k['refused']} refused ({self._refusal_text()})" if k["refused"] else "")
                + (f", {k['claim_conflicts']} claims refused (owned by another client)"
                   if k["claim_conflicts"] else "")
                + (f", {k['not_allowed']} connections not allowed" if k["not_allowed"] else "")
                + (f", {k['busy']} turned away (--max-clients)" if k["busy"] else "")
                + (f", {k['evicted']} evicted (not identified, to make room)"
                   if k["evicted"] else "")
                + (f", {k['accept_errors']} accept errors" if k["accept_errors"] else "")
                + (f", {k['classic_clients']} classic clients ({k['classic_adds']} adds, "
                   f"{k['classic_moved']} moved, {k['classic_ignored']} other messages "
                   f"ignored)" if k["classic_clients"] else ""))

    def _refusal_text(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.refusals.items()))

    def stats_dict(self) -> dict:
        """Every counter, and the refusals by kind (--stats-json)."""
        return {**self.counts, "held_now": len(self.held), "refusals": dict(self.refusals)}


class _OrderedKeys(dict):
    """A set of routing keys that remembers the order they were added in (a classic
    client's routes: the oldest goes when there are too many)."""

    def add(self, key) -> None:
        self[key] = None

    def discard(self, key) -> None:
        self.pop(key, None)


def _fb_reply(raw: bytes) -> tuple:
    """(datagram, len or None) of an encoded fb record (None, None if it holds none)."""
    spans = fb_spans(raw, 0)
    if spans and spans[0][3] == len(raw):
        d0, d1, length, _end = spans[0]
        return raw[d0:d1], length
    try:
        item = cbor2.loads(raw)
    except Exception:  # noqa: BLE001 - checked by the input's parser already
        return None, None
    d, length = item.get("data"), item.get("len")
    if not isinstance(d, (bytes, bytearray)):
        return None, None
    return bytes(d), length if type(length) is int else None


def _classic_record(raw: bytes) -> bytes | None:
    """The classic 64-byte record of an encoded fb record; None if it has none."""
    d, length = _fb_reply(raw)
    return None if d is None else classic.encode_record(d, length)


def _syn_or_rst(raw: bytes) -> bool:
    d, _ = _fb_reply(raw)
    p = parse_tcp_fast(d) if d is not None else None
    return p is not None and bool(p[8] & 0x06)


def _unix_in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
