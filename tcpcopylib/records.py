"""The record stream: a labeled CBOR sequence (RFC 8742 + RFC 9277).

A stream is one or more *sections*. Each section starts with the 12-byte label
``55800(1413697618(h'424F52'))`` (hexdumps as ``....TCPRCBOR``), then a header map
``{"t": "header", "v": FORMAT_VERSION, "tool": ..., ...}``, then one CBOR map per record.
A label may recur mid-stream, so ``cat a.cbor b.cbor`` is a valid stream.

Record types are documented once in man/man5/tcpcopy-records.5. Stages pass record
types and keys they do not know through untouched.

Reading: ``RecordReader`` reads the fd in large chunks with ``os.read`` (returns what a
pipe holds, never waits for a full buffer) and calls ``on_idle`` before every read that
may block, so a writer downstream can flush: high throughput under load, no added
latency on a live stream.
"""

from __future__ import annotations

import io
import os

import cbor2

from tcpcopylib import __version__
from tcpcopylib.errors import StreamError

FORMAT_VERSION = 1
LABEL = bytes.fromhex("d9d9f8da5443505243424f52")  # 55800(TCPR('BOR'))
LABEL_TAG = 55800
PROTOCOL_TAG = 0x54435052  # "TCPR"

# Record types (the "t" key).
T_HEADER = "header"
T_PKT = "pkt"        # an IP datagram: ts (int ns), data (IPv4/IPv6 bytes), [len, sid]
T_FB = "fb"          # feedback: a target's reply (IP+TCP headers, maybe payload)
T_CLAIM = "claim"    # feedback client -> tc-feedback: sessions it owns
T_STATS = "stats"    # counters from a stage

CHUNK = 1 << 17
MAX_PENDING = 64 << 20  # a "record" this large without completing is garbage


def header(tool: str, **fields) -> dict:
    h = {"t": T_HEADER, "v": FORMAT_VERSION, "tool": tool, "tool_version": __version__}
    h.update(fields)
    return h


def encode_section(hdr: dict) -> bytes:
    return LABEL + cbor2.dumps(hdr)


def _check_header(item, offset: int) -> dict:
    if type(item) is not dict or item.get("t") != T_HEADER:
        raise StreamError(f"byte {offset}: label not followed by a header record")
    v = item.get("v")
    if not isinstance(v, int):
        raise StreamError(f"byte {offset}: header has no integer format version")
    if v > FORMAT_VERSION:
        raise StreamError(
            f"stream format version {v} is newer than this tcpcopylib understands "
            f"({FORMAT_VERSION}); upgrade tcpcopylib")
    if v < 1:
        raise StreamError(f"byte {offset}: invalid format version {v}")
    return item


class RecordReader:
    """Iterate over the records of a stream read from a file descriptor.

    Yields record dicts. Header records are consumed (available as ``self.header``)
    unless ``headers=True``. Raises StreamError for anything that is not a stream.
    """

    def __init__(self, fd: int, on_idle=None, headers: bool = False, name: str = "<stdin>"):
        self.fd = fd
        self.on_idle = on_idle
        self.headers = headers
        self.name = name
        self.header: dict | None = None
        self.records = 0
        self.sections = 0
        self.consumed = 0  # bytes of complete items so far
        self.eof = False

    def __iter__(self):
        fd, on_idle, want_headers = self.fd, self.on_idle, self.headers
        buf = b""
        expect_header = False
        while True:
            if on_idle is not None:
                on_idle()
            chunk = os.read(fd, CHUNK)
            if not chunk:
                self.eof = True
                if buf:
                    raise StreamError(
                        f"{self.name}: truncated record at byte {self.consumed} "
                        f"({len(buf)} trailing bytes)")
                if expect_header:
                    raise StreamError(f"{self.name}: label without a header at end of stream")
                return
            buf = buf + chunk if buf else chunk
            if self.header is None and not expect_header:
                # The very first bytes must be the label: reject garbage early and clearly.
                n = min(len(buf), len(LABEL))
                if buf[:n] != LABEL[:n]:
                    raise StreamError(
                        f"{self.name}: not a tcpcopy record stream (no TCPR label at byte 0)")
            bio = io.BytesIO(buf)
            dec = cbor2.CBORDecoder(bio)
            pos = 0
            end = len(buf)
            while pos < end:
                if buf.startswith(LABEL, pos):
                    pos += len(LABEL)
                    bio.seek(pos)
                    expect_header = True
                    self.consumed += len(LABEL)
                    continue
                try:
                    item = dec.decode()
                except cbor2.CBORDecodeEOF:
                    bio.seek(pos)
                    break
                except (cbor2.CBORDecodeError, ValueError, OverflowError) as e:
                    raise StreamError(
                        f"{self.name}: not a valid record at byte {self.consumed}: {e}") from None
                newpos = bio.tell()
                self.consumed += newpos - pos
                pos = newpos
                if expect_header:
                    self.header = _check_header(item, self.consumed)
                    self.sections += 1
                    expect_header = False
                    if want_headers:
                        yield item
                    continue
                if type(item) is not dict or "t" not in item:
                    raise StreamError(
                        f"{self.name}: unexpected {type(item).__name__} item at byte "
                        f"{self.consumed} (records are maps with a 't' key)")
                if self.header is None:
                    raise StreamError(f"{self.name}: record before any header")
                self.records += 1
                yield item
            buf = buf[pos:]
            if len(buf) > MAX_PENDING:
                raise StreamError(
                    f"{self.name}: no complete record in {len(buf)} bytes at byte "
                    f"{self.consumed}; not a record stream")


def read_records(fd: int, on_idle=None, headers: bool = False, name: str = "<stdin>"):
    return iter(RecordReader(fd, on_idle=on_idle, headers=headers, name=name))


class RecordWriter:
    """Write a stream to a file descriptor, batching output.

    Output is buffered up to ``bufsize`` bytes; call ``flush()`` before anything that
    may block (a read, a sleep), which is what ``RecordReader(on_idle=writer.flush)``
    does. The label and header are written at construction, so even an empty run
    produces a valid stream.
    """

    def __init__(self, fd: int, hdr: dict | None = None, tool: str = "tc-?",
                 bufsize: int = 1 << 16):
        self.fd = fd
        self.bufsize = bufsize
        self.buf = bytearray()
        self.records = 0
        self._dumps = cbor2.dumps
        self.buf += encode_section(hdr if hdr is not None else header(tool))

    def write(self, rec: dict) -> None:
        self.buf += self._dumps(rec)
        self.records += 1
        if len(self.buf) >= self.bufsize:
            self.flush()

    def write_raw(self, encoded: bytes) -> None:
        """Append one already-encoded record (hot paths that encode themselves)."""
        self.buf += encoded
        self.records += 1
        if len(self.buf) >= self.bufsize:
            self.flush()

    def new_section(self, hdr: dict) -> None:
        self.buf += encode_section(hdr)

    def flush(self) -> None:
        buf = self.buf
        if not buf:
            return
        view = memoryview(buf)
        total = 0
        try:
            while total < len(buf):
                total += os.write(self.fd, view[total:])
        finally:
            view.release()
            del buf[:total]


def merged_header(tool: str, upstream: dict | None, **fields) -> dict:
    """A stage's own header: upstream keys kept, tool fields replaced."""
    h = dict(upstream or {})
    h.update(header(tool, **fields))
    if upstream and upstream.get("tool"):
        h["upstream"] = upstream.get("tool")
    return h
