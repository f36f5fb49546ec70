"""An incremental (push) parser for record streams, for select()-driven tools.

``RecordReader`` pulls from a file descriptor and blocks in ``os.read``; a tool that
multiplexes stdin with sockets and timers reads whatever is available itself and
hands the bytes to ``StreamParser.feed()``, which returns the complete records.
Same rules and messages as tcpcopylib.records.RecordReader (both use StreamDecoder).
``feed_fast()`` lets a caller take the records it knows from the input itself first.
"""

from __future__ import annotations

from tcpcopylib.records import AS_RECORDS, StreamDecoder


class StreamParser(StreamDecoder):
    def __init__(self, name: str = "<stdin>", headers: bool = False, any_version: bool = False):
        super().__init__(name, headers, any_version)
        self._buf = b""
        self._acc = None  # the bytes of an incomplete item being scanned, appended in place

    @property
    def pending_bytes(self) -> int:
        """The size of the incomplete record held for the next feed()."""
        return len(self._buf) if self._acc is None else len(self._acc)

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

    def feed_fast(self, chunk: bytes, take, mode: int = AS_RECORDS, wait=None) -> list:
        """feed() with the caller's fast path first: when the input is at a record (inside a
        section), ``take(buf)`` handles the records it knows at the start of ``buf`` (what
        was held + chunk) itself and returns how many bytes it took; the rest is parsed as
        feed() parses it, unless ``wait(rest)`` says it is the start of a record ``take``
        knows: then it is held, unparsed, for the next call."""
        if self._acc is not None:  # (an item scanned in part: take may know it whole now)
            self._buf, self._acc = bytes(self._acc), None
        buf = self._buf + chunk if self._buf else chunk
        self._buf = b""
        if not self.at_record:
            return self.feed(buf, mode)
        pos = take(buf)
        self.consumed += pos  # (the decoder's offsets count what take used)
        if pos == len(buf):
            return []
        rest = buf[pos:] if pos else buf
        if wait is not None and wait(rest):
            self._buf = rest
            return []
        return self.feed(rest, mode)

    def close(self) -> None:
        """End of input: raise StreamError if it ended inside a record."""
        err = self._end_error(len(self._buf) if self._acc is None else len(self._acc))
        if err is not None:
            raise err
