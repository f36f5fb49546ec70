"""HTTP/1.x: split a connection's bytes into messages and compare two responses.

Bodies are compared decoded (chunked transfer coding removed, gzip/deflate content
coding undone); JSON bodies are compared as data, path by path. Framing headers
(Content-Length, Transfer-Encoding) are not compared: the decoded bodies are.
"""

from __future__ import annotations

import re
import zlib

from tcpcopylib.diff.model import Diff, Message, first_difference

NAME = "http"
METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE",
           b"CONNECT", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK",
           b"UNLOCK", b"REPORT", b"SEARCH", b"PURGE")
FRAMING = ("content-length", "transfer-encoding")
MAX_HEAD = 64 << 10


def looks_like(client_bytes: bytes) -> bool:
    sp = client_bytes.find(b" ", 0, 16)
    return sp > 0 and client_bytes[:sp] in METHODS


class Unparsable(ValueError):
    pass


def _head(buf: bytes, pos: int):
    """(start line, [(name, value)], body offset) or None if the head is not complete."""
    end = buf.find(b"\r\n\r\n", pos, pos + MAX_HEAD)
    sep = 4
    if end < 0:
        end = buf.find(b"\n\n", pos, pos + MAX_HEAD)
        sep = 2
        if end < 0:
            if len(buf) - pos > MAX_HEAD:
                raise Unparsable(f"no end of HTTP head within {MAX_HEAD} bytes")
            return None
    lines = buf[pos:end].decode("latin-1").splitlines()
    if not lines:
        raise Unparsable("empty HTTP head")
    headers = []
    for ln in lines[1:]:
        name, colon, value = ln.partition(":")
        if not colon:
            raise Unparsable(f"not an HTTP header line: {ln[:60]!r}")
        headers.append((name.strip().lower(), value.strip()))
    return lines[0], headers, end + sep


def _chunked(buf: bytes, pos: int):
    """(decoded body, end offset) or None if incomplete."""
    out = bytearray()
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return None
        size_text = buf[pos:nl].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise Unparsable(f"bad chunk size {size_text[:20]!r}") from None
        pos = nl + 1
        if size == 0:  # trailers up to an empty line
            while True:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    return None
                line, pos = buf[pos:nl].strip(), nl + 1
                if not line:
                    return bytes(out), pos
        if len(buf) < pos + size + 1:
            return None
        out += buf[pos:pos + size]
        pos += size
        if buf[pos:pos + 2] == b"\r\n":
            pos += 2
        elif buf[pos:pos + 1] == b"\n":
            pos += 1
        else:
            if len(buf) < pos + 2:
                return None
            raise Unparsable("chunk not followed by CRLF")


def parse_message(buf: bytes, pos: int, request: bool, method: str = "", final: bool = True):
    """The message starting at pos: a Message, or None if incomplete (and not final).
    A response without length runs to the end of the stream."""
    h = _head(buf, pos)
    if h is None:
        if final and pos < len(buf):
            return Message(pos, len(buf), info={"incomplete": True})
        return None
    line, headers, body_at = h
    parts = line.split(" ", 2)
    info = {"line": line, "headers": headers}
    hd = {}
    for k, v in headers:
        hd[k] = f"{hd[k]}, {v}" if k in hd else v
    if request:
        if len(parts) < 3 or not parts[2].startswith("HTTP/"):
            raise Unparsable(f"not an HTTP request line: {line[:60]!r}")
        info["method"], info["target"] = parts[0], parts[1]
        no_body = False
    else:
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise Unparsable(f"not an HTTP status line: {line[:60]!r}")
        status = int(parts[1])
        info["status"] = status
        no_body = method == "HEAD" or status < 200 or status in (204, 304)
    te = hd.get("transfer-encoding", "").lower()
    if no_body:
        body, end = b"", body_at
    elif "chunked" in te:
        got = _chunked(buf, body_at)
        if got is None:
            if not final:
                return None
            body, end = buf[body_at:], len(buf)
            info["incomplete"] = True
        else:
            body, end = got
    elif "content-length" in hd:
        try:
            n = int(hd["content-length"].split(",")[0])
        except ValueError:
            raise Unparsable(f"bad Content-Length {hd['content-length'][:20]!r}") from None
        if len(buf) < body_at + n:
            if not final:
                return None
            info["incomplete"] = True
        body, end = buf[body_at:body_at + n], min(len(buf), body_at + n)
    elif request:
        body, end = b"", body_at
    else:
        if not final:
            return None
        body, end = buf[body_at:], len(buf)
    info["body"] = body
    return Message(pos, end, info=info)


def split_requests(data: bytes) -> list:
    """The requests of a client stream, as Messages (info: method, target, headers, body)."""
    out, pos = [], 0
    while pos < len(data):
        m = parse_message(data, pos, True)
        if m is None or m.end <= pos:
            break
        m.endpoint = endpoint(m.info.get("method", "?"), m.info.get("target", ""))
        out.append(m)
        pos = m.end
    return out


def split_responses(data: bytes, requests: list, **_) -> list:
    """One response Message per request (None where the stream has none); interim 1xx
    responses are skipped."""
    out, pos = [], 0
    for req in requests:
        m = None
        while pos < len(data):
            m = parse_message(data, pos, False, req.info.get("method", ""))
            pos = m.end
            if not 100 <= m.info.get("status", 200) < 200 or m.info.get("status") == 101:
                break
            m = None
        out.append(m)
    return out


# -- endpoint templates ------------------------------------------------------------------
_NUM = re.compile(r"^\d+$")
_ID = re.compile(r"^(?=.*\d)[0-9a-fA-F-]{8,}$|^[A-Za-z0-9_-]{20,}$")


def endpoint(method: str, target: str) -> str:
    """'GET /users/{n}/orders/{id}': numbers and ids in the path folded, query dropped."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if "://" in path:  # absolute form (proxies)
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    segs = [("{n}" if _NUM.match(s) else "{id}" if _ID.match(s) else s)
            for s in path.split("/")]
    return f"{method} {'/'.join(segs) or '/'}"


# -- comparison --------------------------------------------------------------------------
def decoded_body(info: dict) -> bytes:
    body = info.get("body", b"")
    enc = dict(info.get("headers", ())).get("content-encoding", "").lower()
    try:
        if enc in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if enc == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error:
        return body
    return body


def _headers(info: dict) -> dict:
    out: dict = {}
    for k, v in info.get("headers", ()):
        if k not in FRAMING:
            out.setdefault(k, []).append(v)
    return out


def _cookie_names(values) -> list:
    return sorted(v.split("=", 1)[0].strip() for v in values)


def _json(body: bytes, info: dict):
    ctype = dict(info.get("headers", ())).get("content-type", "").lower()
    text = body.lstrip()[:1]
    if "json" not in ctype and text not in (b"{", b"["):
        return None
    import json

    try:
        return json.loads(body)
    except ValueError:
        return None


def json_diffs(a, b, path: str = "$", out: list | None = None, limit: int = 50) -> list:
    """(path, a value, b value) for every place where the JSON values differ."""
    if out is None:
        out = []
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)) else \
                f"{path}[{k!r}]"
            if k not in a or k not in b:
                out.append((p, a.get(k, MISSING), b.get(k, MISSING)))
            else:
                json_diffs(a[k], b[k], p, out, limit)
    elif isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            if i >= len(a) or i >= len(b):
                out.append((f"{path}[{i}]", a[i] if i < len(a) else MISSING,
                            b[i] if i < len(b) else MISSING))
            else:
                json_diffs(a[i], b[i], f"{path}[{i}]", out, limit)
    elif a != b or type(a) is not type(b):
        out.append((path, a, b))
    return out


class _Missing:
    def __repr__(self):
        return "(absent)"


MISSING = _Missing()


def _show(v) -> str | None:
    if v is MISSING:
        return None
    import json

    return json.dumps(v, sort_keys=True)[:200]


TIMING_HEADERS = ("date", "server-timing", "x-response-time", "x-runtime", "age", "expires",
                  "x-request-id")


def compare(req: Message, a: Message, b: Message) -> list:
    """Differences between response a (original) and b (target), default noise marked."""
    out = []
    ia, ib = a.info, b.info
    if ia.get("status") != ib.get("status"):
        out.append(Diff("status", ia.get("status"), ib.get("status")))
    body_a, body_b = decoded_body(ia), decoded_body(ib)
    same_body = body_a == body_b
    ha, hb = _headers(ia), _headers(ib)
    for name in sorted(set(ha) | set(hb)):
        va, vb = ha.get(name), hb.get(name)
        if va == vb:
            continue
        noise = None
        if name in TIMING_HEADERS and va and vb:
            noise = "default"
        elif name in ("etag", "last-modified") and same_body:
            noise = "default"
        elif name == "set-cookie" and va and vb and _cookie_names(va) == _cookie_names(vb):
            noise = "default"
        out.append(Diff(f"header:{name}", ", ".join(va) if va else None,
                        ", ".join(vb) if vb else None, noise))
    if not same_body:
        ja, jb = _json(body_a, ia), _json(body_b, ib)
        if ja is not None and jb is not None:
            for path, x, y in json_diffs(ja, jb):
                out.append(Diff(f"body:{path}", _show(x), _show(y)))
        else:
            at, sa, sb = first_difference(body_a, body_b)
            out.append(Diff("body", sa, sb, at=at))
    if ia.get("incomplete") or ib.get("incomplete"):
        which = "original" if ia.get("incomplete") else "target"
        if not (ia.get("incomplete") and ib.get("incomplete")):
            out.append(Diff("complete", ia.get("incomplete") is None, ib.get("incomplete")
                            is None, detail=f"the {which} response is cut off"))
    return out
