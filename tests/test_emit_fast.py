"""tc-emit's sendmmsg vectors: the struct-packed fast path and the ctypes path send exactly
the datagrams given, in order, to the addresses given (loopback and socketpairs only)."""

import ctypes
import socket
import struct

import pytest

from tcpcopylib.emit import _BYTES_OFF, MmsgBatch


def _recv_all(sock, n):
    sock.settimeout(2)
    return [sock.recv(70000) for _ in range(n)]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_batch_sends_every_datagram_in_order(kind):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        batch = MmsgBatch(a, size=8)
        sent = []
        for round_ in range(3):  # the vectors are reused: nothing stale may leak through
            datas = [bytes([round_, i]) * (1 + 97 * i) for i in range(8 - 3 * round_)]
            assert batch.send([kind(d) for d in datas]) == []
            sent += datas
        assert _recv_all(b, len(sent)) == sent
    finally:
        a.close()
        b.close()


def test_batch_sends_to_each_name():
    rx = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        names = []
        for s in rx:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            raw = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) +
                   socket.inet_aton("127.0.0.1") + bytes(8))
            names.append(ctypes.create_string_buffer(raw, len(raw)))
        batch = MmsgBatch(tx, size=4)
        datas = [b"to0-a", b"to1-a", b"to0-b", b"to1-b"]
        addrs = [ctypes.addressof(names[i % 2]) for i in range(4)]
        assert batch.send(datas, addrs, 16) == []
        assert _recv_all(rx[0], 2) == [b"to0-a", b"to0-b"]
        assert _recv_all(rx[1], 2) == [b"to1-a", b"to1-b"]
    finally:
        for s in (*rx, tx):
            s.close()


def test_bytes_address_offset_found():
    assert _BYTES_OFF is not None  # CPython: the fast path is in use
