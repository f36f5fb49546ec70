"""The classic feedback protocol of TCPCopy 1.3 and intercept 1.0 (TCP port 36524), and
the tc-session side of it (ClassicFeedbackClient).

What lets tcpcopylib replace one end at a time: tc-session --feedback classic:HOST[:PORT]
speaks to an existing intercept as tcpcopy does, and tc-feedback --classic serves an
existing tcpcopy as intercept does (the server side is FeedbackServer's, in feedback.py;
it uses the layouts below). The layouts follow the specification written from both
programs' sources (the project's reference/classic-wire.md); tcpcopy(7) documents them.

tcpcopy -> intercept: back-to-back 14-byte messages, no length prefix, packed:
    clt_ip(4) clt_port(2) type(2, big-endian) target_ip(4) target_port(2)
addresses and ports as they are on the wire (network order). The first message on a
connection is the version handshake: all zeros but type = VERSION (6). Then one
CLIENT_ADD per replayed connection, sent before its SYN, with the replayed client and
target addresses: the replies between them go to the connection that carried it (a
later ADD of the same connection moves them). CLIENT_DEL exists but is never sent; the
receiver ignores it and unknown types.

intercept -> tcpcopy, in the default ("combined") build: frames of a big-endian 16-bit
count (1..16) and that many 64-byte records. A record is the reply's IPv4 header (20
bytes, tot_len untouched, so the receiver learns the payload length without the payload)
and its TCP header (cut to 44 bytes), zero-padded to 64. Builds that change the wire
(--with-resp-payload: 192-byte records, at most 6; --disable-combined: no count) do not
interoperate and are reported as incompatible (FrameReader), never misread.
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time

from tcpcopylib.errors import PeerVersionError, TcError, UnavailableError, UsageError

DEFAULT_PORT = 36524
VERSION = 6             # INTERNAL_VERSION of tcpcopy 1.3 and intercept 1.0
CLIENT_ADD = 1
CLIENT_DEL = 2
MSG = struct.Struct("!4sHH4sH")   # clt_ip, clt_port, type, target_ip, target_port
MSG_SIZE = MSG.size                # 14
RECORD_SIZE = 64                   # msg_server_t: IP header 20 + TCP header 20 + 24
MAX_TCP_HEADER = 44                # a longer TCP header is cut here (doff left as it is)
MAX_RECORDS = 16                   # records per frame (COMB_MAX_NUM)
COUNT = struct.Struct("!H")
MAX_FRAME = COUNT.size + MAX_RECORDS * RECORD_SIZE   # 1026 bytes
HANDSHAKE = MSG.pack(bytes(4), 0, VERSION, bytes(4), 0)
_ZEROS = bytes(RECORD_SIZE)
_MAX_DATAGRAM_HEADER = 120         # IPv4 header <= 60 + TCP header <= 60


class ClassicError(TcError):
    """The peer does not speak the classic protocol of the default build (a payload or
    non-combined intercept, or not an intercept at all)."""

    exit_code = PeerVersionError.exit_code


# -- tcpcopy -> intercept: 14-byte messages ----------------------------------------------

def encode_msg(msg_type: int, client_ip: bytes, client_port: int, target_ip: bytes,
               target_port: int) -> bytes:
    """One 14-byte message; the addresses packed (4 bytes), the ports integers."""
    return MSG.pack(client_ip, client_port, msg_type, target_ip, target_port)


def client_add(client_ip: bytes, client_port: int, target_ip: bytes, target_port: int) -> bytes:
    return MSG.pack(client_ip, client_port, CLIENT_ADD, target_ip, target_port)


def decode_msg(buf, off: int = 0) -> tuple:
    """(client ip, client port, type, target ip, target port) of the message at off."""
    return MSG.unpack_from(buf, off)


def is_handshake(msg) -> bool:
    """Does a first message announce a version (client address and port zero), as every
    tcpcopy since 1.0 sends? (Older ones sent an 8-byte message without it.)"""
    return msg[:6] == b"\0\0\0\0\0\0"


def msg_type(msg) -> int:
    return msg[6] << 8 | msg[7]


def msg_route_key(msg) -> bytes:
    """The routing key (packet.flow_bytes of the replies) that a message's client and
    target ask for: target ip, client ip, target port, client port, as they lie in an
    IPv4 reply's headers."""
    return bytes(msg[8:12]) + bytes(msg[0:4]) + bytes(msg[12:14]) + bytes(msg[4:6])


# -- intercept -> tcpcopy: 64-byte records in combined frames --------------------------------

def encode_record(datagram, length: int | None = None) -> bytes | None:
    """The 64-byte record of an IPv4 TCP reply (at least its headers); None for anything
    else (IPv6 replies have no classic form).

    The IP header as it is (its options too: then the TCP header follows them, where a
    reader that finds it at ihl*4, as tcpcopy does, looks for it), the TCP header cut to
    what fits, zeros after. ``length``: the datagram's whole length, written to tot_len if
    it says otherwise (a capture that did not fill it in); tcpcopy takes the reply's
    payload length from tot_len."""
    n = len(datagram)
    if n < 40 or datagram[0] >> 4 != 4 or datagram[9] != 6:
        return None
    ihl = (datagram[0] & 15) * 4
    if ihl < 20 or n < ihl + 20:
        return None
    end = min(ihl + (datagram[ihl + 12] >> 4) * 4, n, RECORD_SIZE)
    rec = bytes(datagram[:end])
    if length is not None and 0 < length <= 0xFFFF and (rec[2] << 8 | rec[3]) != length:
        rec = rec[:2] + COUNT.pack(length) + rec[4:]
    return rec + _ZEROS[end:]


def encode_frames(records) -> bytes:
    """Combined frames of the records (64 bytes each), at most MAX_RECORDS per frame."""
    parts = []
    for i in range(0, len(records), MAX_RECORDS):
        chunk = records[i:i + MAX_RECORDS]
        parts.append(COUNT.pack(len(chunk)))
        parts += chunk
    return b"".join(parts)


def record_datagram(rec: bytes) -> bytes:
    """A record as the datagram headers tc-session's engine reads (packet.parse_tcp_fast):
    the record itself, zero-padded when its headers claim more than 64 bytes (a TCP header
    that intercept cut: the cut options read as end-of-options). tot_len still says how
    long the reply was, so the engine counts its payload."""
    ihl = (rec[0] & 15) * 4
    need = ihl + (rec[ihl + 12] >> 4) * 4 if ihl + 13 <= len(rec) else 0
    if need > len(rec):
        return rec + bytes(min(need, _MAX_DATAGRAM_HEADER) - len(rec))
    return rec


def record_problem(rec) -> str | None:
    """Why a 64-byte record cannot be a reply's headers (None if it can)."""
    if rec[0] >> 4 != 4 or rec[0] & 15 < 5:
        return f"its first byte is {rec[0]:#04x}, not an IPv4 header's"
    if rec[9] != 6:
        return f"its protocol is {rec[9]}, not TCP"
    return None


_MISMATCH = ("the peer is not a classic intercept of the default build (an intercept built "
             "--with-resp-payload sends 192-byte records, one built --disable-combined sends "
             "no counts; neither interoperates with tcpcopy 1.3's default build either)")


class FrameReader:
    """Reassembles combined frames from a byte stream fed in any pieces: feed() gives the
    complete records (64 bytes each) in order. ClassicError for what no default-build
    intercept sends: a count of 0 or more than MAX_RECORDS (tcpcopy closes the connection
    on the latter), a record that is not an IPv4 TCP header. A reader that accepted them
    would go on reading records out of step, silently."""

    def __init__(self):
        self.buf = bytearray()
        self.frames = 0
        self.records = 0

    def feed(self, data) -> list:
        buf = self.buf
        buf += data
        out = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            count = buf[pos] << 8 | buf[pos + 1]
            if not 0 < count <= MAX_RECORDS:
                raise ClassicError(f"a frame of {count} records (1..{MAX_RECORDS} expected): "
                                   + _MISMATCH)
            end = pos + 2 + count * RECORD_SIZE
            if end > n:
                break
            for at in range(pos + 2, end, RECORD_SIZE):
                rec = bytes(buf[at:at + RECORD_SIZE])
                why = record_problem(rec)
                if why:
                    raise ClassicError(f"record {self.records + 1}: {why}: " + _MISMATCH)
                out.append(rec)
                self.records += 1
            self.frames += 1
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self.buf)


# -- addresses ---------------------------------------------------------------------------

PREFIX = "classic:"


def is_classic_address(text: str | None) -> bool:
    return bool(text) and text.startswith(PREFIX)


def parse_classic_address(text: str) -> tuple:
    """'classic:HOST[:PORT]' ('[v6]' for an IPv6 HOST) -> (family, sockaddr); UsageError
    if bad. PORT defaults to 36524, intercept's."""
    rest = text[len(PREFIX):] if text.startswith(PREFIX) else text
    host, port = rest, DEFAULT_PORT
    if rest.startswith("["):
        h, sep, tail = rest[1:].partition("]")
        host = h
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                host = ""
            else:
                port = int(tail[1:])
    elif rest.count(":") == 1:
        host, p = rest.split(":")
        port = int(p) if p.isdigit() else -1
    if not host or not 0 < port < 65536:
        raise UsageError(f"bad classic feedback address {text!r} (use classic:HOST or "
                         f"classic:HOST:PORT, the intercept's address and port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"classic feedback address {text!r}: {e.strerror}") from None
    fam, _, _, _, sa = infos[0]
    return fam, sa


# -- tc-session's end: the client of an intercept ------------------------------------------

class ClassicFeedbackClient:
    """FeedbackClient's interface (tcpcopylib.feedback) over the classic protocol: what
    tc-session's engine and runner use of it (claim, release, flush, fileno, read_replies,
    connect, reconnect, close) behaves the same, and read_replies gives the same reply
    headers. A claim is a CLIENT_ADD (IPv4 only: the protocol has no IPv6 form); a
    release sends nothing (intercept ignores CLIENT_DEL, tcpcopy never sends it). There
    are no keys and no answer to the handshake: an intercept is trusted by its address.
    reconnect() sends the handshake and an ADD for every live connection again."""

    def __init__(self, address: str, name: str = "tc-session", warn=None):
        self.address = address
        self.name = name
        self.warn = warn
        self.sock: socket.socket | None = None
        self.live: dict = {}   # 14-byte ADD message -> None: claimed and not released
        self._out = bytearray()
        self._reader = FrameReader()
        self._eof = False
        self.send_timeout = 5.0
        self.refused = 0       # (FeedbackClient's counters, for the reports)
        self.reconnects = 0
        self.unroutable = 0    # IPv6 connections: no CLIENT_ADD can name them
        self.last_ts = 0       # records carry no time: no feedback lag measured

    def connect(self, timeout: float = 5.0) -> None:
        fam, sa = parse_classic_address(self.address)
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(sa)
        except OSError as e:
            s.close()
            raise UnavailableError(
                f"cannot connect to the classic intercept at {self.address}: "
                f"{e.strerror or e} (is intercept, or tc-feedback --classic, running there?)"
            ) from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.sock = s
        self._eof = False
        self._reader = FrameReader()
        self._out = bytearray(HANDSHAKE)
        try:
            self.flush()
        except BaseException:
            self.close()
            raise

    def reconnect(self, timeout: float = 1.0) -> int:
        self.close()
        self.connect(timeout)
        self.reconnects += 1
        if self.live:
            self._out += b"".join(self.live)
            self.flush()
        return len(self.live)

    def claim(self, client_ip: bytes, client_port: int, target_ip: bytes,
              target_port: int) -> None:
        if len(client_ip) != 4 or len(target_ip) != 4:
            self.unroutable += 1
            if self.unroutable == 1 and self.warn is not None:
                self.warn(f"the classic protocol carries IPv4 addresses only: IPv6 sessions "
                          f"get no replies from {self.address}")
            return
        msg = MSG.pack(client_ip, client_port, CLIENT_ADD, target_ip, target_port)
        self.live[msg] = None
        self._out += msg

    def release(self, client_ip: bytes, client_port: int, target_ip: bytes,
                target_port: int) -> None:
        if len(client_ip) == 4 and len(target_ip) == 4:
            self.live.pop(MSG.pack(client_ip, client_port, CLIENT_ADD, target_ip,
                                   target_port), None)

    def flush(self) -> None:
        """Send what is pending, whole: intercept reads each message with a blocking read,
        so a message is never left half-sent (wait for the socket at most send_timeout)."""
        if not self._out:
            return
        if self.sock is None:   # (reconnect() sends the live ones again)
            self._out.clear()
            return
        view, deadline = memoryview(bytes(self._out)), None
        self._out.clear()
        while view:
            try:
                n = self.sock.send(view, socket.MSG_NOSIGNAL)
                view = view[n:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                raise UnavailableError(f"classic intercept at {self.address}: "
                                       f"{e.strerror or e}") from None
            now = time.monotonic()
            deadline = deadline or now + self.send_timeout
            if now >= deadline:
                raise UnavailableError(f"classic intercept at {self.address} is not reading "
                                       f"(send blocked for {self.send_timeout:g} s)")
            poll = select.poll()
            poll.register(self.sock.fileno(), select.POLLOUT)
            poll.poll(math.ceil((deadline - now) * 1e3))

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_replies(self) -> list:
        """(reply headers, None) for each record available: what the engine's
        feedback_packet reads (tot_len gives the payload length). UnavailableError at the
        end of the connection, ClassicError if the peer's frames are not the default
        build's."""
        if self.sock is None:
            raise UnavailableError(f"classic intercept at {self.address}: not connected")
        out = []
        while not self._eof:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._eof = True
                break
            if not data:
                self._eof = True
                break
            try:
                recs = self._reader.feed(data)
            except ClassicError as e:
                self.close()
                raise ClassicError(f"classic intercept at {self.address}: {e}") from None
            out += [(record_datagram(r), None) for r in recs]
            if len(data) < 1 << 16:
                break
        if not out and self._eof:
            raise UnavailableError(f"classic intercept at {self.address} closed the connection")
        return out

    def read_available(self) -> list:
        """The replies as fb-like records ({"t": "fb", "data": ...}), for inspection."""
        return [{"t": "fb", "data": d} for d, _ in self.read_replies()]

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
