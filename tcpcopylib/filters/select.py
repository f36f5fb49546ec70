"""tc-select: keep or drop whole sessions, decided on the first request of each.

A rule is ``keep RULE`` or ``drop RULE``, the first that matches decides; none matching:
the default (drop if any keep rule was given, else keep). RULE is one of

    http:METHODS GLOB     HTTP/1.x: the method (one, a comma list, or *) and the request
                          target's path matched by a shell pattern ("POST /api/*")
    header:NAME=GLOB      HTTP/1.x: a header's value by a shell pattern
    redis:CMD[,CMD...]    RESP: the first command's name (case-insensitive)
    bytes:REGEX           a regular expression on the first request's bytes

The first request is an HTTP request's head (up to its blank line), a RESP command
array, or else the bytes of the client's first write (up to a segment with PSH). Until
it has arrived, every record of the connection (the client's and, in a capture with
both directions, the server's) is held; then they all go on, or none does: a session is
replayed whole or not at all; a dropped session leaves a "filtered" record (its
addresses and the rule), which tc-session counts with the outcome "filtered". Held bytes are bounded per connection (``max_hold``: past
it the decision is made on what is there) and the connections waiting at once
(``max_pending``: the oldest is decided first).
"""

from __future__ import annotations

import fnmatch
import re

from tcpcopylib.errors import UsageError
from tcpcopylib.filters.http import REQUEST_START, find_head_end, may_be_request, parse_head
from tcpcopylib.filters.stream import M32, client_side
from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, parse_tcp_fast

KINDS = ("http", "header", "redis", "bytes")
MAX_DECIDED = 200_000  # decisions remembered (the rest of a session follows its first)


class First:
    """A connection's first request: kind "http" (req: a filters.http.Request), "redis"
    (args: the command's arguments) or "bytes"; data: its bytes."""

    __slots__ = ("kind", "req", "args", "data")

    def __init__(self, kind, data, req=None, args=None):
        self.kind, self.data, self.req, self.args = kind, data, req, args


def resp_command(buf: bytes):
    """The arguments of the RESP command array at buf's start; None if not all there,
    False if it is not one."""
    i = buf.find(b"\r\n")
    if i < 0:
        return None if len(buf) < 32 else False
    try:
        n = int(buf[1:i])
    except ValueError:
        return False
    pos, args = i + 2, []
    for _ in range(n):
        j = buf.find(b"\r\n", pos)
        if j < 0:
            return None
        if buf[pos:pos + 1] != b"$":
            return False
        try:
            size = int(buf[pos + 1:j])
        except ValueError:
            return False
        start = j + 2
        if len(buf) < start + size + 2:
            return None
        args.append(buf[start:start + size])
        pos = start + size + 2
    return args


def first_request(buf: bytes, pushed: bool, final: bool) -> First | None:
    """The first request at the start of a client's bytes, or None if more is needed
    (``pushed``: a segment with PSH arrived; ``final``: no more will come)."""
    if REQUEST_START.match(buf):
        end = find_head_end(buf)
        if end >= 0:
            req = parse_head(buf[:end])
            if req is not None:
                return First("http", buf[:end + 4], req=req)
            return First("bytes", buf)
        return First("bytes", buf) if final else None
    if not final and len(buf) < 33 and may_be_request(buf):
        return None  # the start of a method: wait for the rest of the line
    if buf.startswith(b"*"):
        args = resp_command(buf)
        if args:
            return First("redis", buf, args=args)
        if args is None and not final:
            return None
    if pushed or final or len(buf) > 65536:
        return First("bytes", buf)
    return None


class SelectRule:
    """One keep/drop rule; ``count``: the sessions it decided."""

    def __init__(self, action: str, text: str):
        if action not in ("keep", "drop"):
            raise UsageError(f"{action!r}: a rule starts with keep or drop")
        self.action, self.text = action, text
        self.name = f"{action} {text}"
        self.count = 0
        kind, sep, arg = text.partition(":")
        if not sep or kind not in KINDS:
            raise UsageError(f"rule {text!r}: KIND:ARG with KIND one of {', '.join(KINDS)}")
        self.kind = kind
        if kind == "http":
            methods, _, glob = arg.strip().partition(" ")
            self.methods = None if methods in ("", "*") else {
                m.encode().upper() for m in methods.split(",")}
            self.glob = glob.strip() or "*"
        elif kind == "header":
            name, eq, glob = arg.partition("=")
            if not eq or not name.strip():
                raise UsageError(f"rule {text!r}: header:NAME=GLOB")
            self.header, self.glob = name.strip().encode(), glob
        elif kind == "redis":
            self.commands = {c.strip().upper().encode() for c in arg.split(",") if c.strip()}
            if not self.commands:
                raise UsageError(f"rule {text!r}: redis:CMD[,CMD...]")
        else:
            try:
                self.pattern = re.compile(arg.encode(), re.DOTALL)
            except re.error as e:
                raise UsageError(f"rule {text!r}: bad regular expression: {e}") from None

    def matches(self, first: First) -> bool:
        k = self.kind
        if k == "bytes":
            return self.pattern.search(first.data) is not None
        if k == "redis":
            return first.kind == "redis" and first.args[0].upper() in self.commands
        if first.kind != "http":
            return False
        req = first.req
        if k == "http":
            if self.methods is not None and req.method not in self.methods:
                return False
            path = req.target.split(b"?", 1)[0].decode("latin-1")
            return fnmatch.fnmatchcase(path, self.glob)
        value = req.get(self.header)
        return value is not None and fnmatch.fnmatchcase(value.decode("latin-1"), self.glob)


def parse_rules_file(path: str) -> list:
    """keep/drop rules, one a line ("keep http:POST /api/*"); # comments."""
    from tcpcopylib.filters.rules import read_rule_file

    rules = []
    for n, line in enumerate(read_rule_file(path), 1):
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith(
            ("keep bytes:", "drop bytes:")) else line.strip()
        if not line:
            continue
        action, _, text = line.partition(" ")
        try:
            rules.append(SelectRule(action, text.strip()))
        except UsageError as e:
            raise UsageError(f"{path}:{n}: {e}") from None
    return rules


class _Pending:
    __slots__ = ("items", "base", "segs", "buf", "pushed", "held")

    def __init__(self, base):
        self.items = []
        self.base = base
        self.segs = {}    # offset -> payload, beyond what buf holds
        self.buf = b""    # the client's bytes in order from offset 0
        self.pushed = False
        self.held = 0


class Selector:
    """Holds each connection's items until its first request decides; ``packet(ts, data,
    item)`` returns the items to write now (``item`` is the caller's: a record and its
    bytes, say), and for a dropped session ``make_record(key, rule name)`` if given."""

    def __init__(self, rules: list, default_keep: bool | None = None, server_ports=(),
                 max_hold: int = 1 << 20, max_pending: int = 10_000, on_decide=None,
                 make_record=None):
        self.rules = rules
        self.default_keep = (not any(r.action == "keep" for r in rules)
                             if default_keep is None else default_keep)
        self.server_ports = frozenset(server_ports)
        self.max_hold, self.max_pending = max_hold, max_pending
        self.on_decide = on_decide      # on_decide(key, keep, rule or None)
        # make_record(key, rule name): the item that stands for a dropped session
        self.make_record = make_record
        self.pending: dict = {}         # client 4-tuple -> _Pending
        self.decided: dict = {}         # client 4-tuple -> (keep, base)
        self.sessions = self.kept = self.filtered = 0
        self.by_default = 0
        self.pkts_dropped = 0

    def known(self, key) -> bool:
        return key in self.pending or key in self.decided

    def packet(self, ts, data, item) -> list:
        p = parse_tcp_fast(data)
        if p is None:
            return [item]
        src, dst, ihl, sport, dport, seq, ack, doff, flags, _win, plen = p
        key = (src, sport, dst, dport)
        rkey = (dst, dport, src, sport)
        pend = self.pending.get(key)
        if pend is not None:
            return self._client(key, pend, item, data, p)
        pend = self.pending.get(rkey)
        if pend is not None:  # the server's packet of a connection not decided yet
            pend.items.append(item)
            pend.held += len(data)  # (against the same bound as the client's bytes)
            if pend.held > self.max_hold:
                return self._decide(rkey, final=True)
            return []
        syn = flags & (TH_SYN | TH_ACK) == TH_SYN
        d = self.decided.get(key)
        if d is not None and not (syn and seq != (d[1] - 1) & M32):
            return self._decided(d[0], item)
        d = self.decided.get(rkey)
        if d is not None and not syn:
            return self._decided(d[0], item)
        if not client_side(key, flags, self.server_ports, self.known):
            return [item]
        if not syn and not plen and not flags & (TH_FIN | TH_RST):
            return [item]  # a pure ACK before anything: nothing to decide on
        self.decided.pop(key, None)
        if len(self.pending) >= self.max_pending:
            out = self._decide(next(iter(self.pending)), final=True)
        else:
            out = []
        self.sessions += 1
        pend = self.pending[key] = _Pending((seq + 1) & M32 if syn else seq)
        if syn:
            pend.items.append(item)
            return out
        return out + self._client(key, pend, item, data, p)

    def _decided(self, keep, item):
        if keep:
            return [item]
        self.pkts_dropped += 1
        return []

    def _client(self, key, pend, item, data, p):
        src, dst, ihl, sport, dport, seq, ack, doff, flags, _win, plen = p
        pend.items.append(item)
        final = bool(flags & (TH_FIN | TH_RST))
        if plen:
            off = ((seq - pend.base + 0x80000000) & M32) - 0x80000000
            have = len(pend.buf)
            if off + plen > have and off < have + self.max_hold:
                payload = bytes(data[ihl + doff:ihl + doff + plen])
                if off <= have:
                    pend.buf += payload[have - off:]
                    while pend.segs:  # what waited for this hole
                        o = min(pend.segs)
                        if o > len(pend.buf):
                            break
                        seg = pend.segs.pop(o)
                        pend.buf += seg[len(pend.buf) - o:] if o + len(seg) > len(
                            pend.buf) else b""
                else:
                    pend.segs[off] = payload
                pend.held += plen
            if flags & TH_PSH:
                pend.pushed = True
        if pend.held > self.max_hold:
            final = True
        first = first_request(pend.buf, pend.pushed and not pend.segs, final)
        if first is None:
            return []
        return self._decide(key, first=first)

    def _decide(self, key, first=None, final=False) -> list:
        pend = self.pending.pop(key)
        if first is None:
            first = first_request(pend.buf, True, True) or First("bytes", pend.buf)
        rule = next((r for r in self.rules if r.matches(first)), None)
        keep = self.default_keep if rule is None else rule.action == "keep"
        if rule is None:
            self.by_default += 1
        else:
            rule.count += 1
        if len(self.decided) >= MAX_DECIDED:
            del self.decided[next(iter(self.decided))]
        self.decided[key] = (keep, pend.base)
        if self.on_decide is not None:
            self.on_decide(key, keep, rule)
        if keep:
            self.kept += 1
            return pend.items
        self.filtered += 1
        self.pkts_dropped += len(pend.items)
        if self.make_record is None:
            return []
        return [self.make_record(key, rule.name if rule else self._default_name())]

    def finish(self) -> list:
        """End of input: the connections still waiting are decided on what they have."""
        out = []
        for key in list(self.pending):
            out += self._decide(key, final=True)
        return out

    def _default_name(self) -> str:
        return "default " + ("keep" if self.default_keep else "drop")

    def counts(self) -> dict:
        d = {r.name: r.count for r in self.rules}
        d[self._default_name()] = self.by_default
        return d


def filtered_record(key, rule: str) -> dict:
    """The record of a session dropped by tc-select (tcpcopy-records(5), filtered)."""
    from tcpcopylib.packet import endpoint_str

    return {"t": "filtered", "by": "tc-select", "rule": rule,
            "client": endpoint_str(key[0], key[1]), "server": endpoint_str(key[2], key[3])}
