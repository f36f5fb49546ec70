"""Redis RESP (2 and 3): split commands and replies, compare reply type and value."""

from __future__ import annotations

from tcpcopylib.diff.model import Diff, Message

NAME = "resp"
MAX_DEPTH = 32
_AGGREGATES = {b"*": "array", b"%": "map", b"~": "set", b">": "push", b"|": "attribute"}
_LINES = {b"+": "simple", b"-": "error", b":": "integer", b",": "double", b"#": "boolean",
          b"(": "bignum", b"_": "null"}
_BULKS = {b"$": "bulk", b"=": "verbatim", b"!": "blob_error"}


def looks_like(client_bytes: bytes) -> bool:
    return client_bytes[:1] == b"*" and client_bytes[1:2].isdigit()


class Unparsable(ValueError):
    pass


class _Incomplete(Exception):
    pass


def parse_value(buf: bytes, pos: int, depth: int = 0):
    """(value, end): value is (type, payload) with payload bytes/int/None or a list of
    values (a map's as [key, value, key, value...]). Raises _Incomplete, Unparsable."""
    if depth > MAX_DEPTH:
        raise Unparsable("RESP nested too deep")
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        raise _Incomplete
    kind, text = buf[pos:pos + 1], buf[pos + 1:nl]
    end = nl + 2
    if kind in _LINES:
        name = _LINES[kind]
        if name == "integer":
            try:
                return (name, int(text)), end
            except ValueError:
                raise Unparsable(f"bad RESP integer {text[:20]!r}") from None
        return (name, None if name == "null" else bytes(text)), end
    try:
        n = int(text)
    except ValueError:
        raise Unparsable(f"bad RESP length {text[:20]!r} after {kind!r}") from None
    if kind in _BULKS:
        if n < 0:
            return ("null", None), end
        if len(buf) < end + n + 2:
            raise _Incomplete
        return (_BULKS[kind], bytes(buf[end:end + n])), end + n + 2
    if kind in _AGGREGATES:
        if n < 0:
            return ("null", None), end
        if kind == b"%" or kind == b"|":
            n *= 2
        items = []
        for _ in range(n):
            v, end = parse_value(buf, end, depth + 1)
            items.append(v)
        return (_AGGREGATES[kind], items), end
    raise Unparsable(f"not RESP: type byte {kind!r}")


def _messages(data: bytes, inline: bool) -> list:
    out, pos = [], 0
    while pos < len(data):
        if inline and data[pos:pos + 1] not in _AGGREGATES and data[pos:pos + 1] not in _BULKS:
            nl = data.find(b"\n", pos)  # an inline command: words on one line
            if nl < 0:
                break
            words = data[pos:nl].strip().split()
            out.append(Message(pos, nl + 1, {"value": ("array", [("bulk", w) for w in words])}))
            pos = nl + 1
            continue
        try:
            v, end = parse_value(data, pos)
        except _Incomplete:
            out.append(Message(pos, len(data), {"incomplete": True, "value": ("cut", None)}))
            break
        out.append(Message(pos, end, {"value": v}))
        pos = end
    return out


def split_requests(data: bytes) -> list:
    out = _messages(data, inline=True)
    for m in out:
        v = m.info["value"]
        words = v[1] if v[0] == "array" and v[1] else []
        name = words[0][1] if words and isinstance(words[0][1], bytes) else b"?"
        m.endpoint = name.decode("latin-1").upper()
    return out


def split_responses(data: bytes, requests: list, **_) -> list:
    """One reply per command, in order (RESP3 pushes are not replies: skipped)."""
    replies = [m for m in _messages(data, inline=False) if m.info["value"][0] != "push"]
    return [replies[i] if i < len(replies) else None for i in range(len(requests))]


def show(v) -> str:
    kind, p = v
    if isinstance(p, list):
        return "[" + ", ".join(show(x) for x in p[:20]) + (", …" if len(p) > 20 else "") + "]"
    if isinstance(p, bytes):
        return repr(p[:120])[1:] + ("…" if len(p) > 120 else "")
    return "nil" if p is None else str(p)


def _diffs(a, b, path: str, out: list) -> None:
    if a[0] != b[0]:
        out.append(Diff(f"resp:type{path}", a[0], b[0]))
        return
    pa, pb = a[1], b[1]
    if isinstance(pa, list) and isinstance(pb, list) and len(pa) == len(pb):
        for i, (x, y) in enumerate(zip(pa, pb)):
            _diffs(x, y, f"{path}[{i}]", out)
    elif pa != pb:
        out.append(Diff(f"resp:value{path}", show(a), show(b)))


def compare(req: Message, a: Message, b: Message) -> list:
    out: list = []
    _diffs(a.info["value"], b.info["value"], "", out)
    return out
