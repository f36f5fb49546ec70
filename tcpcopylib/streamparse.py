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
        self._buf = b""
        self._acc = None  # the bytes of an incomplete item being scanned, appended in place

    @property
    def buf(self) -> bytes:
        """The start of an incomplete record (a caller's fast path may take it: set buf to
        b"" and feed those bytes again, or add what it used of them to ``consumed``)."""
        if self._acc is not None:
            self._buf, self._acc = bytes(self._acc), None
        return self._buf

    @buf.setter
    def buf(self, value: bytes) -> None:
        self._buf, self._acc = value, None

    def feed(self, chunk: bytes, mode: int = AS_RECORDS) -> list:
        """Parse ``chunk`` (appended to any incomplete tail); return the complete records
        (or items as ``mode`` says: see StreamDecoder.parse). An incomplete record costs
        only its new bytes per call, whatever the chunk sizes."""
        acc = self._acc
        if acc is not None:
            acc += chunk
            if not self.pending_complete(acc):
                return []
            buf, self._acc = bytes(acc), None
        else:
            if type(chunk) is not bytes:
                chunk = bytes(chunk)  # the tail is kept: never a view of the caller's buffer
            buf = self._buf + chunk if self._buf else chunk
        out, pos, err = self.parse(buf, mode)
        if err is not None:
            raise err
        if self._pend is not None and pos < len(buf):
            self._acc, self._buf = bytearray(memoryview(buf)[pos:]), b""
        else:
            self._buf = buf[pos:]
        return out

    def close(self) -> None:
        """End of input: raise StreamError if it ended inside a record."""
        err = self._end_error(len(self._buf) if self._acc is None else len(self._acc))
        if err is not None:
            raise err
