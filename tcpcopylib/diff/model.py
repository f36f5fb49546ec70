"""What the comparers share: a message's place in its stream, and one difference."""

from __future__ import annotations


class Message:
    """A request or response: bytes [start, end) of its direction's stream; ``info`` is
    what the protocol parsed out of it; ``endpoint`` (requests) its template."""

    __slots__ = ("start", "end", "info", "endpoint")

    def __init__(self, start: int, end: int, info=None, endpoint: str = ""):
        self.start = start
        self.end = end
        self.info = info if info is not None else {}
        self.endpoint = endpoint

    def __repr__(self):
        return f"<Message {self.start}..{self.end} {self.endpoint}>"


class Diff:
    """One difference between the original response (a) and the target's (b).

    ``field`` names what differs ("status", "header:etag", "body:$.items[2].id",
    "resp:value", "bytes", ...); ``noise`` is None for a real difference, else why it is
    left out of the verdict: "default" (the built-in list), "learned" (it differs
    between two replays too), "ignored" (--ignore).
    """

    __slots__ = ("field", "a", "b", "noise", "at", "detail")

    def __init__(self, field: str, a, b, noise: str | None = None, at: int | None = None,
                 detail: str = ""):
        self.field = field
        self.a = a
        self.b = b
        self.noise = noise
        self.at = at
        self.detail = detail

    def as_dict(self) -> dict:
        d = {"field": self.field, "original": self.a, "target": self.b}
        if self.noise:
            d["noise"] = self.noise
        if self.at is not None:
            d["at"] = self.at
        if self.detail:
            d["detail"] = self.detail
        return d

    def __repr__(self):
        return f"Diff({self.field!r}, {self.a!r}, {self.b!r}, noise={self.noise!r})"


def first_difference(a: bytes, b: bytes, context: int = 24):
    """(offset of the first differing byte, a around it, b around it) as text."""
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first: long equal prefixes are common
    step = 4096
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    lo = max(0, i - context)

    def show(x: bytes) -> str:
        part = x[lo:i + context]
        text = repr(part)[2:-1]
        return ("…" if lo else "") + text + ("…" if i + context < len(x) else "") + \
            f" ({len(x)} bytes)"
    return i, show(a), show(b)
