"""An incremental (push) parser for record streams, for select()-driven tools.

``RecordReader`` pulls from a file descriptor and blocks in ``os.read``; a tool that
multiplexes stdin with sockets and timers reads whatever is available itself and
hands the bytes to ``StreamParser.feed()``, which returns the complete records.
Same rules and messages as tcpcopylib.records.RecordReader.
"""

from __future__ import annotations

import io

import cbor2

from tcpcopylib.errors import StreamError
from tcpcopylib.records import LABEL, MAX_PENDING, _check_header


class StreamParser:
    def __init__(self, name: str = "<stdin>", headers: bool = False):
        self.name = name
        self.headers = headers
        self.header: dict | None = None
        self.records = 0
        self.sections = 0
        self.consumed = 0
        self._buf = b""
        self._expect_header = False

    def feed(self, chunk: bytes) -> list[dict]:
        """Parse ``chunk`` (appended to any incomplete tail); return complete records."""
        buf = self._buf + chunk if self._buf else chunk
        out: list[dict] = []
        if self.header is None and not self._expect_header:
            n = min(len(buf), len(LABEL))
            if buf[:n] != LABEL[:n]:
                raise StreamError(
                    f"{self.name}: not a tcpcopy record stream (no TCPR label at byte 0)")
        bio = io.BytesIO(buf)
        dec = cbor2.CBORDecoder(bio)
        pos, end = 0, len(buf)
        while pos < end:
            if buf.startswith(LABEL, pos):
                pos += len(LABEL)
                bio.seek(pos)
                self._expect_header = True
                self.consumed += len(LABEL)
                continue
            if end - pos < len(LABEL) and LABEL.startswith(buf[pos:]):
                break  # maybe the start of a label: wait for more bytes
            try:
                item = dec.decode()
            except cbor2.CBORDecodeEOF:
                break
            except (cbor2.CBORDecodeError, ValueError, OverflowError) as e:
                raise StreamError(
                    f"{self.name}: not a valid record at byte {self.consumed}: {e}") from None
            newpos = bio.tell()
            self.consumed += newpos - pos
            pos = newpos
            if self._expect_header:
                self.header = _check_header(item, self.consumed)
                self.sections += 1
                self._expect_header = False
                if self.headers:
                    out.append(item)
                continue
            if type(item) is not dict or "t" not in item:
                raise StreamError(
                    f"{self.name}: unexpected {type(item).__name__} item at byte "
                    f"{self.consumed} (records are maps with a 't' key)")
            if self.header is None:
                raise StreamError(f"{self.name}: record before any header")
            self.records += 1
            out.append(item)
        self._buf = buf[pos:]
        if len(self._buf) > MAX_PENDING:
            raise StreamError(
                f"{self.name}: no complete record in {len(self._buf)} bytes at byte "
                f"{self.consumed}; not a record stream")
        return out

    def close(self) -> None:
        """End of input: raise StreamError if it ended inside a record."""
        if self._buf:
            raise StreamError(
                f"{self.name}: truncated record at byte {self.consumed} "
                f"({len(self._buf)} trailing bytes)")
        if self._expect_header:
            raise StreamError(f"{self.name}: label without a header at end of stream")
