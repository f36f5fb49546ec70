"""An incremental (push) parser for record streams, for select()-driven tools.

``RecordReader`` pulls from a file descriptor and blocks in ``os.read``; a tool that
multiplexes stdin with sockets and timers reads whatever is available itself and
hands the bytes to ``StreamParser.feed()``, which returns the complete records.
Same rules and messages as tcpcopylib.records.RecordReader (both use StreamDecoder).
"""

from __future__ import annotations

from tcpcopylib.records import AS_RECORDS, StreamDecoder


class StreamParser(StreamDecoder):
    def __init__(self, name: str = "<stdin>", headers: bool = False, any_version: bool = False):
        super().__init__(name, headers, any_version)
        self.buf = b""  # the start of an incomplete record (a caller's fast path may take it)

    def feed(self, chunk: bytes, mode: int = AS_RECORDS) -> list:
        """Parse ``chunk`` (appended to any incomplete tail); return the complete records
        (or items as ``mode`` says: see StreamDecoder.parse)."""
        if type(chunk) is not bytes:
            chunk = bytes(chunk)  # the tail is kept: never a view of the caller's buffer
        buf = self.buf + chunk if self.buf else chunk
        out, pos, err = self.parse(buf, mode)
        if err is not None:
            raise err
        self.buf = buf[pos:]
        return out

    def close(self) -> None:
        """End of input: raise StreamError if it ended inside a record."""
        err = self._end_error(len(self.buf))
        if err is not None:
            raise err
