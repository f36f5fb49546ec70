"""Send IP datagrams as they are: the engine of tc-emit.

Two senders:

- RawSender: ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` (IP_HDRINCL implied) and its IPv6
  twin; the destination is each packet's own dst address. Linux fills in the IPv4 header
  checksum, the total length and a zero IP ID; it never touches the TCP checksum
  (feasibility.md 4.2), and fills in nothing for IPv6.
- LinkSender: ``AF_PACKET`` on one interface with an Ethernet header we build; the kernel
  fills in nothing, so the IPv4 header checksum is checked too.

Both send a batch per ``sendmmsg(2)`` call (ctypes, GIL released). Emitter can hand the
batches to a sender thread (``threaded=True``), so that decoding the next records overlaps
the kernel's work; the tools do not use it: the thread's GIL hand-offs cost more than the
overlap gains (tc-session --send, offline -a 10 in bench_offline, alternating: 14.8 and
12.0 s with the thread against 13.0 and 10.4 s without). Emitter verifies the TCP checksum of
every packet (the ones' complement sum is a big integer modulo 0xFFFF: one C call),
recomputes it when wrong, and counts send errors by errno name: a failed packet never stops
the stream.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import socket
import struct
import threading

from tcpcopylib.errors import NoInputError, NoPermissionError, UsageError
from tcpcopylib.packet import IPPROTO_TCP, fix_checksums

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
BATCH = 64
_U16 = struct.Struct("!H")


def tcp_sum_ok(data) -> bool | None:
    """True/False for a TCP datagram's checksum; None when not checkable (not TCP, fragment,
    IPv6 extension headers, truncated).

    The pseudo-header's addresses sit right before the TCP header when the IP header has no
    options (IPv4 bytes 12-20, IPv6 bytes 8-40), so one slice holds addresses + segment; the
    sum of its 16-bit words, plus protocol and length, is 0 mod 0xFFFF when the checksum is
    right (65536 = 1 mod 65535).
    """
    b0 = data[0]
    if b0 == 0x45:
        if data[9] != IPPROTO_TCP or data[6] & 0x3F or data[7]:  # fragments: not checkable
            return None
        start, hl, end = 12, 20, (data[2] << 8) | data[3]
    elif b0 >> 4 == 6:
        if data[6] != IPPROTO_TCP:
            return None
        start, hl, end = 8, 40, 40 + ((data[4] << 8) | data[5])
    elif b0 >> 4 == 4:  # IPv4 with options: addresses and segment are apart
        if data[9] != IPPROTO_TCP or data[6] & 0x3F or data[7]:
            return None
        hl = (b0 & 0x0F) << 2
        end = (data[2] << 8) | data[3]
        seg_len = end - hl
        if end > len(data) or seg_len < 20:
            return None
        s = int.from_bytes(data[hl:end], "big") << (8 * (seg_len & 1))
        return (s + int.from_bytes(data[12:20], "big") + 6 + seg_len) % 0xFFFF == 0
    else:
        return None
    seg_len = end - hl
    if end > len(data) or seg_len < 20:
        return None
    s = int.from_bytes(data[start:end], "big") << (8 * (seg_len & 1))
    return (s + 6 + seg_len) % 0xFFFF == 0


def ip4_header_ok(data) -> bool:
    ihl = (data[0] & 0x0F) << 2
    return int.from_bytes(data[:ihl], "big") % 0xFFFF == 0


def fix_ip4_header(buf: bytearray) -> None:
    ihl = (buf[0] & 0x0F) << 2
    buf[10:12] = b"\0\0"
    s = int.from_bytes(buf[:ihl], "big") % 0xFFFF
    _U16.pack_into(buf, 10, (~s) & 0xFFFF if s else 0xFFFF)


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    try:
        if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise UsageError(f"not a MAC address (like 02:00:00:00:01:02): {text!r}") from None


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, f"errno{e.errno}") if e.errno else type(e).__name__


def _perm(e: OSError) -> NoPermissionError:
    return NoPermissionError(f"cannot open a raw socket ({e.strerror}): "
                             "run as root or with CAP_NET_RAW")


# -- sendmmsg through ctypes ----------------------------------------------------------

class _Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_char_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_Iov)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = getattr(_libc, "sendmmsg", None)
if _sendmmsg is not None:
    _sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    _sendmmsg.restype = ctypes.c_int
_MSGSZ = ctypes.sizeof(_MMsgHdr)


def _bytes_data_offset() -> int | None:
    """Where a bytes object's data starts, relative to id() (CPython), if that checks out."""
    off = bytes.__basicsize__ - 1
    probe = b"tcpcopy probe \x00\xff"
    try:
        if ctypes.string_at(id(probe) + off, len(probe)) == probe:
            return off
    except Exception:  # noqa: BLE001 - not CPython-like: use the ctypes path
        pass
    return None


_BYTES_OFF = _bytes_data_offset()
_IOV = struct.Struct("@PN")  # struct iovec
_PTR = struct.Struct("@P")
_U32N = struct.Struct("@I")
_IOV_SZ = ctypes.sizeof(_Iov)
_NAME_OFF = _MMsgHdr.hdr.offset + _MsgHdr.name.offset
_NAMELEN_OFF = _MMsgHdr.hdr.offset + _MsgHdr.namelen.offset


class MmsgBatch:
    """Preallocated sendmmsg(2) vectors for up to `size` datagrams on one socket.

    The vectors are filled with struct.pack_into (a bytes object's address is id() plus
    a fixed offset in CPython, checked at import), not ctypes attributes: about 4x
    cheaper per datagram. Other buffer types take the ctypes path.
    """

    def __init__(self, sock: socket.socket, size: int = BATCH):
        self.sock, self.size = sock, size
        self.iovs = (_Iov * size)()
        self.msgs = (_MMsgHdr * size)()
        self.base = ctypes.addressof(self.msgs)
        for i in range(size):
            self.msgs[i].hdr.iov = ctypes.pointer(self.iovs[i])
            self.msgs[i].hdr.iovlen = 1
        self.iov_mem = memoryview(self.iovs).cast("B")
        self.msg_mem = memoryview(self.msgs).cast("B")
        self.namelen = 0

    def send(self, datas, names=None, namelen=0) -> list[tuple[int, OSError]]:
        """Send datas[i] (to sockaddr names[i] if given); returns [(index, error)]."""
        n = len(datas)
        if names is not None and namelen != self.namelen:
            for i in range(self.size):
                _U32N.pack_into(self.msg_mem, i * _MSGSZ + _NAMELEN_OFF, namelen)
            self.namelen = namelen
        off = _BYTES_OFF
        if off is not None and all(type(d) is bytes for d in datas):
            iov_mem, pack_iov = self.iov_mem, _IOV.pack_into
            for i, d in enumerate(datas):
                pack_iov(iov_mem, i * _IOV_SZ, id(d) + off, len(d))
            if names is not None:
                msg_mem, pack_ptr = self.msg_mem, _PTR.pack_into
                for i, name in enumerate(names):
                    pack_ptr(msg_mem, i * _MSGSZ + _NAME_OFF, name)
        else:
            iovs, msgs = self.iovs, self.msgs
            for i, d in enumerate(datas):
                iov = iovs[i]
                iov.base = bytes(d)
                iov.len = len(d)
                if names is not None:
                    msgs[i].hdr.name = names[i]
        if _sendmmsg is None:  # no sendmmsg in this libc: one call per datagram
            return self._send_each(datas, names)
        fd, failures, off = self.sock.fileno(), [], 0
        while off < n:
            r = _sendmmsg(fd, self.base + off * _MSGSZ, n - off, 0)
            if r < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                failures.append((off, OSError(e, os.strerror(e))))
                off += 1  # the failing datagram is dropped; go on with the next
            else:
                off += r
        return failures

    def _send_each(self, datas, names):
        failures = []
        for i, d in enumerate(datas):
            try:
                self.sock.send(d) if names is None else self.sock.sendto(d, names[i])
            except OSError as e:
                failures.append((i, e))
        return failures


def _sockaddr(dst: bytes) -> ctypes.Array:
    if len(dst) == 4:
        raw = struct.pack("=H", socket.AF_INET) + b"\0\0" + dst + bytes(8)
    else:
        raw = struct.pack("=H", socket.AF_INET6) + b"\0\0" + bytes(4) + dst + bytes(4)
    return ctypes.create_string_buffer(raw, len(raw))


class RawSender:
    """Raw IPv4/IPv6 sockets; the destination is the packet's own dst address."""

    link_layer = False

    def __init__(self, batch: int = BATCH):
        try:
            self.s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError as e:
            raise _perm(e) from None
        self.s6 = self.b6 = None
        self.b4 = MmsgBatch(self.s4, batch)
        self._addr: dict[bytes, tuple] = {}  # packed dst -> (sockaddr buffer, its address)

    def _name(self, dst: bytes) -> int:
        a = self._addr.get(dst)
        if a is None:
            buf = _sockaddr(dst)
            a = self._addr[dst] = (buf, ctypes.addressof(buf))
        return a[1]

    def send_batch(self, datas) -> list[tuple[int, OSError]]:
        """Send runs of same-family datagrams with one sendmmsg each."""
        if len(self._addr) > 4096:
            self._addr.clear()  # only between batches: a batch's addresses stay alive
        addr_get, name = self._addr.get, self._name
        if all(d[0] >> 4 != 6 for d in datas):  # the common case: IPv4 only
            names = [(addr_get(d[16:20]) or (None, name(d[16:20])))[1] for d in datas]
            return self.b4.send(datas, names, 16)
        failures, i, n = [], 0, len(datas)
        while i < n:
            v6 = datas[i][0] >> 4 == 6
            j = i
            while j < n and (datas[j][0] >> 4 == 6) == v6:
                j += 1
            run = datas[i:j]
            if v6:
                try:
                    batch = self._batch6()
                except OSError as e:
                    failures += [(k, e) for k in range(i, j)]
                    i = j
                    continue
                lo, hi, namelen = 24, 40, 28
            else:
                batch, lo, hi, namelen = self.b4, 16, 20, 16
            names = [(addr_get(d[lo:hi]) or (None, name(d[lo:hi])))[1] for d in run]
            failures += [(i + k, e) for k, e in batch.send(run, names, namelen)]
            i = j
        return failures

    def _batch6(self) -> MmsgBatch:
        if self.b6 is None:
            self.s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.b6 = MmsgBatch(self.s6, self.b4.size)
        return self.b6

    def close(self):
        for s in (self.s4, self.s6):
            if s is not None:
                s.close()


class LinkSender:
    """AF_PACKET on `iface`: each datagram behind an Ethernet header built here."""

    link_layer = True

    def __init__(self, iface: str, dst_mac: bytes, src_mac: bytes | None = None,
                 batch: int = BATCH):
        try:
            socket.if_nametoindex(iface)
        except OSError:
            raise NoInputError(f"{iface}: no such interface") from None
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        except PermissionError as e:
            raise _perm(e) from None
        try:
            self.sock.bind((iface, 0))
        except OSError as e:
            self.sock.close()
            if e.errno in (errno.ENODEV, errno.ENXIO):
                raise NoInputError(f"{iface}: no such interface") from None
            raise
        if src_mac is None:
            src_mac = self.sock.getsockname()[4]  # the interface's own address
        self.prefix4 = dst_mac + src_mac + _U16.pack(ETH_P_IP)
        self.prefix6 = dst_mac + src_mac + _U16.pack(ETH_P_IPV6)
        self.batch = MmsgBatch(self.sock, batch)

    def send_batch(self, datas) -> list[tuple[int, OSError]]:
        p4, p6 = self.prefix4, self.prefix6
        return self.batch.send([(p4 if d[0] >> 4 == 4 else p6) + d for d in datas])

    def close(self):
        self.sock.close()


class Emitter:
    """Check, fix, batch and send datagrams; count what happened.

    ``emit(data)`` queues one datagram (sent when BATCH are pending or at ``flush()``);
    ``close()`` sends the rest and waits. With ``threaded=True`` batches are sent by a
    thread while the caller decodes the next records.

    Counters: sent, failed (by errno name in ``errors``), fixed (checksums recomputed),
    skipped (by reason in ``skips``: malformed, truncated). ``on_new_error(name, exc)`` is
    called once per error kind (from the sending thread). ``before_send()``, if set, is
    called before each batch leaves (tc-session --send sends its feedback claims there, so a
    claim always goes out before the SYN that needs it).
    """

    def __init__(self, sender, on_new_error=None, batch: int = BATCH, threaded: bool = False):
        self.sender = sender
        self.on_new_error = on_new_error
        self.batch = batch
        self.sent = 0
        self.fixed = 0
        self.errors: dict[str, int] = {}
        self.skips: dict[str, int] = {}
        self.pending: list[bytes] = []
        self.before_send = None
        self._q = self._thread = None
        self._fail: BaseException | None = None
        if threaded:
            self._q = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._sender_loop, name="tc-emit-send",
                                            daemon=True)
            self._thread.start()

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def skip(self, why: str) -> None:
        self.skips[why] = self.skips.get(why, 0) + 1

    def emit(self, data, orig_len: int | None = None) -> bool:
        """Queue one datagram; False if it was skipped (malformed or truncated)."""
        n = len(data)
        v = data[0] >> 4 if n else 0
        if n < 20 or (v != 4 and (v != 6 or n < 40)):
            self.skip("malformed")
            return False
        if orig_len is not None and orig_len > n:
            self.skip("truncated")  # a cut-off datagram would carry wrong data
            return False
        ok = tcp_sum_ok(data)
        if ok is False or (v == 4 and self.sender.link_layer and not ip4_header_ok(data)):
            buf = bytearray(data)
            if ok is False:
                fix_checksums(buf)  # also fixes the IPv4 header checksum
            else:
                fix_ip4_header(buf)
            data = bytes(buf)
            self.fixed += 1
        pending = self.pending
        pending.append(data)
        if len(pending) >= self.batch:
            self.flush()
        return True

    def flush(self) -> None:
        """Hand the pending datagrams to the sender (now, or to the sending thread)."""
        if not self.pending:
            return
        datas, self.pending = self.pending, []
        if self.before_send is not None:
            self.before_send()
        if self._q is None:
            self._send(datas)
            return
        if self._fail is not None:
            raise self._fail
        self._q.put(datas)

    def close(self) -> None:
        """Send what is pending and wait until the sending thread is done."""
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._q.put(None)
                self._thread.join()
                self._thread = None
        if self._fail is not None:
            raise self._fail

    def _sender_loop(self) -> None:
        q = self._q
        while True:
            datas = q.get()
            if datas is None:
                return
            if self._fail is None:
                try:
                    self._send(datas)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    self._fail = e

    def _send(self, datas) -> None:
        if hasattr(self.sender, "send_batch"):
            failures = self.sender.send_batch(datas)
        else:
            failures = []
            for i, d in enumerate(datas):
                try:
                    self.sender.send(d)
                except OSError as e:
                    failures.append((i, e))
        self.sent += len(datas) - len(failures)
        for _i, e in failures:
            name = errno_name(e)
            seen = self.errors.get(name, 0)
            self.errors[name] = seen + 1
            if not seen and self.on_new_error is not None:
                self.on_new_error(name, e)

    def as_dict(self) -> dict:
        """The counters, as --stats-json shows them."""
        return {"sent": self.sent, "failed": self.failed, "errors": dict(self.errors),
                "fixed": self.fixed, "skips": dict(self.skips)}

    def summary(self) -> str:
        parts = [f"sent {self.sent}", f"failed {self.failed}"]
        if self.errors:
            parts[-1] += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) + ")"
        parts.append(f"fixed checksums {self.fixed}")
        for why, v in sorted(self.skips.items()):
            parts.append(f"{why} {v}")
        return ", ".join(parts)
