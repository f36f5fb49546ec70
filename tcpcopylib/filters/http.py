"""HTTP/1.x requests in a client's byte stream: the head parser (tc-select decides on it)
and the transform that applies tc-rewrite's rules request by request.

``HttpTransform`` follows the requests of one connection, pipelined or not: it holds a
request's header block until its blank line (a header split over segments is whole
here), applies the header rules and the substitutions to it, then passes the body on as
it comes, or, when substitutions apply to bodies, holds a Content-Length body whole (or
a chunked body a chunk at a time), rewrites it and sets its length. A stream that does
not start like an HTTP/1.x request, and anything after a CONNECT or an Upgrade, goes on
unchanged.
"""

from __future__ import annotations

import re

from tcpcopylib.filters.stream import Drop, Transform

# METHOD SP request-target SP HTTP/1.x (RFC 9112 section 3)
REQUEST_LINE = re.compile(rb"([A-Z][A-Z0-9_-]{0,31}) (\S+) (HTTP/1\.[0-9])")
# the first bytes of a request (tc-select: is this HTTP at all?)
REQUEST_START = re.compile(rb"[A-Z][A-Z0-9_-]{0,31} ")
# the start of a request line, or all of what arrived could begin one
_MAY_BE_REQUEST = re.compile(rb"(?:\r\n)*(?:[A-Z][A-Z0-9_-]{0,31}(?: |\Z)|\r?\Z)")

HEAD, BODY, BODY_HELD, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, PASS = range(8)


class Request:
    """A parsed request head: method, target (bytes), version, headers [(name, value)]
    as written (bytes), and the CRLFs that preceded it."""

    __slots__ = ("method", "target", "version", "headers", "lead")

    def get(self, name: bytes):
        """The value of the first header of that name (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def encode(self) -> bytes:
        lines = [b"%s %s %s" % (self.method, self.target, self.version)]
        lines += [k + b": " + v for k, v in self.headers]
        return self.lead + b"\r\n".join(lines) + b"\r\n\r\n"


def parse_head(block: bytes) -> Request | None:
    """A request's head from its bytes up to (without) the blank line's CRLFCRLF; None if
    it is not an HTTP/1.x request."""
    stripped = block.lstrip(b"\r\n")
    lines = stripped.split(b"\r\n")
    m = REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return None
    req = Request()
    req.lead = block[:len(block) - len(stripped)]
    req.method, req.target, req.version = m.groups()
    req.headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        req.headers.append((name, value.strip(b" \t")))
    return req


def may_be_request(buf: bytes) -> bool:
    """Could buf (a head not all here yet) be the start of an HTTP/1.x request?"""
    if _MAY_BE_REQUEST.match(buf) is None:
        return False
    start = len(buf) - len(buf.lstrip(b"\r\n"))
    eol = buf.find(b"\r\n", start)
    return eol < 0 or REQUEST_LINE.fullmatch(buf, start, eol) is not None


def find_head_end(buf, start: int = 0) -> int:
    """Where the blank line that ends a head starts in buf (its CRLFCRLF), -1 if none
    yet; CRLFs before a request line (allowed between requests) are skipped."""
    i = start
    while buf.startswith(b"\r\n", i):
        i += 2
    return buf.find(b"\r\n\r\n", i)


class HttpTransform(Transform):
    """tc-rewrite's rules (a RuleSet) on one connection's requests."""

    def __init__(self, ruleset):
        self.rs = ruleset
        self.subs = ruleset.subs
        self.buf = b""
        self.state = HEAD
        self.left = 0           # body or chunk bytes still to come
        self.head = None        # the rewritten head waiting for its held body

    @property
    def held(self) -> int:
        return len(self.buf) + (len(self.head.encode()) if self.head is not None else 0)

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data if self.buf else data
        out = []
        while buf:
            st = self.state
            if st == PASS:
                out.append(buf)
                buf = b""
            elif st == HEAD:
                end = find_head_end(buf)
                if end < 0 and not may_be_request(buf):
                    self.state = PASS  # not HTTP: the rest goes on as it is
                    continue
                if end < 0:
                    if len(buf) > self.rs.max_header:
                        raise Drop("request head too large")
                    break
                block, buf = buf[:end], buf[end + 4:]
                out.append(self._head(block))
            elif st == BODY:
                n = min(self.left, len(buf))
                out.append(buf[:n])
                buf = buf[n:]
                self.left -= n
                if not self.left:
                    self.state = HEAD
            elif st == BODY_HELD:
                if len(buf) < self.left:
                    break
                body, buf = self._subst(buf[:self.left]), buf[self.left:]
                self._set_length(self.head, len(body))
                out.append(self.head.encode() + body)
                self.head = None
                self.state = HEAD
            elif st in (CHUNK_SIZE, TRAILER):
                i = buf.find(b"\r\n")
                if i < 0:
                    if len(buf) > self.rs.max_header:
                        raise Drop("chunk size line too long")
                    break
                line, buf = buf[:i], buf[i + 2:]
                if st == TRAILER:
                    out.append(line + b"\r\n")
                    if not line:
                        self.state = HEAD
                    continue
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise Drop("bad chunk size") from None
                if size == 0:
                    out.append(line + b"\r\n")
                    self.state = TRAILER
                elif self.subs:
                    self.left = size
                    self.state = CHUNK_DATA
                else:
                    out.append(line + b"\r\n")
                    self.left = size + 2  # the data and its CRLF, passed as they come
                    self.state = CHUNK_END
            elif st == CHUNK_DATA:  # a chunk held whole, rewritten, its size written anew
                if len(buf) < self.left + 2:
                    break
                data, buf = self._subst(buf[:self.left]), buf[self.left + 2:]
                out.append(b"%x\r\n%s\r\n" % (len(data), data) if data else b"")
                self.state = CHUNK_SIZE
            else:  # CHUNK_END
                n = min(self.left, len(buf))
                out.append(buf[:n])
                buf = buf[n:]
                self.left -= n
                if not self.left:
                    self.state = CHUNK_SIZE
        self.buf = buf
        return b"".join(out)

    def end(self) -> bytes:
        if self.buf or self.head is not None:
            raise Drop("the connection ended inside a request")
        return b""

    def _subst(self, data: bytes) -> bytes:
        for sub in self.subs:
            data = sub.apply(data)
        return data

    def _head(self, block: bytes) -> bytes:
        """A complete head: rewritten, and the state for its body."""
        req = parse_head(block)
        if req is None:  # not HTTP (or not any more): the rest goes on as it is
            self.state = PASS
            return block + b"\r\n\r\n"
        self._apply(req)
        te = req.get(b"transfer-encoding")
        cl = req.get(b"content-length")
        if req.method == b"CONNECT" or req.get(b"upgrade") is not None:
            self.state = PASS
        elif te is not None and b"chunked" in te.lower():
            self.state = CHUNK_SIZE
        elif cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise Drop("bad Content-Length") from None
            if n and self.subs:
                self.head, self.left, self.state = req, n, BODY_HELD
                return b""
            self.left, self.state = n, BODY if n else HEAD
        return req.encode()

    def _apply(self, req: Request) -> None:
        for rule in self.rs.rules:
            kind = rule.kind
            if kind in ("header-set", "host"):
                name = b"Host" if kind == "host" else rule.words[0].encode()
                value = (rule.words[0] if kind == "host" else rule.words[1]).encode()
                _set_header(req, name, value)
                rule.count += 1
            elif kind == "header-remove":
                name = rule.words[0].encode().lower()
                n = len(req.headers)
                req.headers = [(k, v) for k, v in req.headers if k.lower() != name]
                rule.count += n - len(req.headers)
            elif kind == "url":
                req.target, n = rule.pattern.subn(rule.template, req.target)
                rule.count += n
            else:  # a substitution, on the header block as written
                text = rule.apply(req.encode()[len(req.lead):-4])
                new = parse_head(text)
                if new is None:
                    raise Drop(f"{rule.name} made the request head unreadable")
                new.lead = req.lead
                req.method, req.target, req.version, req.headers = (
                    new.method, new.target, new.version, new.headers)

    @staticmethod
    def _set_length(req: Request, n: int) -> None:
        _set_header(req, b"Content-Length", b"%d" % n)


def _set_header(req: Request, name: bytes, value: bytes) -> None:
    """The first header of that name gets this value, the others go; added if none."""
    low = name.lower()
    out, done = [], False
    for k, v in req.headers:
        if k.lower() == low:
            if not done:
                out.append((k, value))
                done = True
        else:
            out.append((k, v))
    if not done:
        out.append((name, value))
    req.headers = out
