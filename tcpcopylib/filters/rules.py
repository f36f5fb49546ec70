"""tc-rewrite's rules: what they are, how they are written, and the raw-stream transform.

A rule is written as words, on the command line (``--replace OLD NEW``) or as a line of a
rule file (``replace OLD NEW``; shell quoting; ``#`` comments):

    replace OLD NEW          the bytes OLD by NEW (escapes: \\r \\n \\t \\\\ \\xHH)
    regex PATTERN REPL       a regular expression on bytes (Python syntax, \\1 and \\g<name>
                             in REPL)
    header-set NAME VALUE    HTTP: set the header (the first of that name replaced, others
                             removed; added if absent)
    header-remove NAME       HTTP: remove every header of that name
    host VALUE               HTTP: header-set Host VALUE
    url PATTERN REPL         HTTP: a regular expression on the request target

Any HTTP rule makes the client stream be read as HTTP/1.x requests (tcpcopylib.filters.http):
``replace`` and ``regex`` then apply to each request's header block and body (the body is
held whole and its Content-Length set, a chunked body chunk by chunk). Without HTTP rules
(or with --raw) they apply to the byte stream itself: ``RawTransform`` holds back only the
bytes where a match may begin that the next segment could complete.
"""

from __future__ import annotations

import shlex

from tcpcopylib.errors import UsageError
from tcpcopylib.filters.stream import Transform

HTTP_KINDS = ("header-set", "header-remove", "host", "url")
ARITY = {"replace": 2, "regex": 2, "header-set": 2, "header-remove": 1, "host": 1, "url": 2}


def unescape(text: str) -> bytes:
    """Bytes from a rule's text: UTF-8, with \\r \\n \\t \\\\ \\0 and \\xHH escapes."""
    out = bytearray()
    raw = text.encode()
    i = 0
    simple = {ord("r"): b"\r", ord("n"): b"\n", ord("t"): b"\t", ord("\\"): b"\\",
              ord("0"): b"\0"}
    while i < len(raw):
        b = raw[i]
        if b == 0x5C and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt in simple:
                out += simple[nxt]
                i += 2
                continue
            if nxt == ord("x") and len(raw[i + 2:i + 4]) == 2:
                try:
                    out.append(int(raw[i + 2:i + 4], 16))
                    i += 4
                    continue
                except ValueError:
                    pass
        out.append(b)
        i += 1
    return bytes(out)


class Rule:
    """One rule: its kind, its words as written (its name in the counters) and how many
    times it changed something."""

    def __init__(self, kind: str, words: list):
        self.kind = kind
        self.words = list(words)
        self.name = " ".join([kind, *(shlex.quote(w) for w in words)])
        self.count = 0


class Substitution(Rule):
    """replace / regex: a compiled pattern (the ``regex`` module, for partial matches)."""

    def __init__(self, kind: str, words: list):
        super().__init__(kind, words)
        import regex

        old, new = words
        if kind == "replace":
            self.pattern = regex.compile(regex.escape(unescape(old)))
            self.literal = unescape(new)
        else:
            try:
                self.pattern = regex.compile(unescape(old))
            except regex.error as e:
                raise UsageError(f"{self.name}: bad regular expression: {e}") from None
            self.literal = None
            self.template = unescape(new)
        if self.pattern.match(b"") is not None:
            raise UsageError(f"{self.name}: the pattern matches the empty string")

    def _repl(self, m) -> bytes:
        return self.literal if self.literal is not None else m.expand(self.template)

    def apply(self, buf: bytes) -> bytes:
        """Every match in a complete piece (a header block, a body) replaced."""
        out, n = self.pattern.subn(self._repl, buf)
        self.count += n
        return out

    def stream(self, buf: bytes, final: bool):
        """(rewritten, held): the matches in buf replaced, up to where a match may begin
        that more bytes could complete (held, unless final)."""
        out = []
        pos = 0
        n = len(buf)
        for m in self.pattern.finditer(buf, partial=not final):
            if m.partial:
                if m.start() < n:
                    out.append(buf[pos:m.start()])
                    return b"".join(out), buf[m.start():]
                break
            out.append(buf[pos:m.start()])
            out.append(self._repl(m))
            self.count += 1
            pos = m.end()
        out.append(buf[pos:])
        return b"".join(out), b""


def make_rule(kind: str, words: list) -> Rule:
    if kind not in ARITY:
        raise UsageError(f"unknown rule {kind!r} (one of {', '.join(ARITY)})")
    if len(words) != ARITY[kind]:
        raise UsageError(f"rule {kind} takes {ARITY[kind]} argument(s), not {len(words)}: "
                         f"{' '.join(words)}")
    if kind in ("replace", "regex"):
        return Substitution(kind, words)
    if kind == "url":
        return UrlRule(kind, words)
    if kind in ("header-set", "header-remove", "host"):
        name = "Host" if kind == "host" else words[0]
        if not name or any(ch in name for ch in " \t\r\n:"):
            raise UsageError(f"rule {kind}: bad header name {name!r}")
        if any(ch in w for w in words for ch in "\r\n"):
            raise UsageError(f"rule {kind}: a header cannot hold CR or LF")
    return Rule(kind, words)


class UrlRule(Rule):
    def __init__(self, kind, words):
        super().__init__(kind, words)
        import regex

        try:
            self.pattern = regex.compile(unescape(words[0]))
        except regex.error as e:
            raise UsageError(f"{self.name}: bad regular expression: {e}") from None
        self.template = unescape(words[1])


def read_rule_file(path: str) -> list[str]:
    """The lines of a rule file (tc-rewrite's, tc-select's); NoInputError if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as e:
        from tcpcopylib.errors import NoInputError

        raise NoInputError(f"{path}: {e.strerror or e}") from None


def parse_rule_file(path: str) -> list:
    """The rules of a rule file, in order (UsageError with the line for a bad one)."""
    rules = []
    for n, line in enumerate(read_rule_file(path), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise UsageError(f"{path}:{n}: {e}") from None
        if not words:
            continue
        try:
            rules.append(make_rule(words[0], words[1:]))
        except UsageError as e:
            raise UsageError(f"{path}:{n}: {e}") from None
    return rules


class RuleSet:
    """The rules in order, and the transform they make for a connection."""

    def __init__(self, rules: list, http: bool | None = None, max_header: int = 64 << 10):
        self.rules = rules
        self.http = any(r.kind in HTTP_KINDS for r in rules) if http is None else http
        self.subs = [r for r in rules if isinstance(r, Substitution)]
        self.max_header = max_header

    def make_transform(self, conn) -> Transform | None:
        if not self.rules:
            return None
        if self.http:
            from tcpcopylib.filters.http import HttpTransform

            return HttpTransform(self)
        return RawTransform(self.subs)

    def counts(self) -> dict:
        return {r.name: r.count for r in self.rules}


class RawTransform(Transform):
    """The substitutions, one after the other, on the client's byte stream."""

    def __init__(self, subs: list):
        self.subs = subs
        self.bufs = [b""] * len(subs)

    @property
    def held(self) -> int:
        return sum(len(b) for b in self.bufs)

    def _run(self, data: bytes, final: bool) -> bytes:
        for i, sub in enumerate(self.subs):
            buf = self.bufs[i] + data if self.bufs[i] else data
            data, self.bufs[i] = sub.stream(buf, final)
        return data

    def feed(self, data: bytes) -> bytes:
        return self._run(data, False)

    def end(self) -> bytes:
        return self._run(b"", True)
