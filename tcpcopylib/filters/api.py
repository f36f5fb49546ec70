"""The user filter API: a stage of the pipe written in a few lines of Python.

    from tcpcopylib.filters import Filter

    class TestTenant(Filter):
        def data(self, conn, data, end):
            if b"\\r\\n\\r\\n" not in data and not end:
                return None                      # wait: the whole head, then decide
            if conn.first and data.startswith(b"GET /health"):
                conn.drop()                      # not replayed at all
            return data.replace(b"tenant=prod", b"tenant=test")

    if __name__ == "__main__":
        raise SystemExit(TestTenant().main())

``data(conn, data, end)`` gets a connection's client bytes in order (retransmissions and
reordering already dealt with): everything not given back yet. It returns the bytes to
send in their place (any length: tc-session's sequence numbers follow), or None to wait
for more (the same bytes come back with the next ones; ``end`` is True when no more will
come, and then None means "unchanged"). ``conn.drop()`` drops the connection (whole, if
nothing of it went out yet; else it ends with an RST); ``conn.tag(text)`` adds a "tag"
key to its records. ``conn.state`` is a dict of the filter's own. See tcpcopy(7), USER
FILTERS, and examples/user-filter.py.
"""

from __future__ import annotations

from tcpcopylib.filters.stream import Drop, Transform
from tcpcopylib.packet import endpoint_str


class ConnView:
    """What a user filter sees of a connection."""

    __slots__ = ("_conn", "state", "first")

    def __init__(self, conn):
        self._conn = conn
        self.state = {}
        self.first = True  # nothing given back yet

    @property
    def client(self) -> str:
        return endpoint_str(*self._conn.client)

    @property
    def server(self) -> str:
        return endpoint_str(*self._conn.server)

    def drop(self, reason: str = "dropped by the filter"):
        raise Drop(reason)

    def tag(self, text: str) -> None:
        self._conn.tag = str(text)


class UserTransform(Transform):
    def __init__(self, flt, conn):
        self.flt = flt
        self.view = ConnView(conn)
        self.buf = b""

    @property
    def held(self) -> int:
        return len(self.buf)

    def _call(self, end: bool) -> bytes:
        out = self.flt.data(self.view, self.buf, end)
        if out is None:
            if not end:
                return b""
            out = self.buf
        self.buf = b""
        self.view.first = False
        return bytes(out)

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        return self._call(False)

    def end(self) -> bytes:
        return self._call(True) if self.buf else b""


class Filter:
    """Subclass and override data(); main() runs it as a stage (stdin to stdout)."""

    #: the name in messages and in the stream's header
    name = "tc-user-filter"

    def data(self, conn: ConnView, data: bytes, end: bool):
        return data

    def transform(self, conn) -> Transform:
        return UserTransform(self, conn)

    def main(self, argv=None) -> int:
        from tcpcopylib.cli.rewrite import Tool

        tool = Tool(make_transform=self.transform)
        tool.name = self.name
        return tool.main(argv)
