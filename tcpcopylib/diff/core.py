"""tc-diff's engine: pair each replayed connection with its original, split both into
exchanges, compare the responses, learn noise from a second replay, time everything.

Inputs (see tc-diff(1)):
- the original capture, both directions (a pcap, or a record stream of pkt records);
- the session map: "sess" records written by tc-session --sessions (tcpcopy-records(5));
- the target's replies with their payload: "fb" records of tc-intercept --payload all.

A captured connection is replayed once per copy (tc-session -n) and per replay (several
--sessions files): replay 0 (first file, copy 0) is compared with the original; every other
replay is compared with replay 0, and what differs there is *noise* for that endpoint
(Diffy's method): left out of every verdict of that endpoint.
"""

from __future__ import annotations

import bisect
import fnmatch

from tcpcopylib.diff import http, raw, resp
from tcpcopylib.diff.model import Message
from tcpcopylib.errors import StreamError
from tcpcopylib.reassembly import CAPTURE_KINDS, Reassembler, file_packets

PROTOCOLS = {"http": http, "resp": resp, "raw": raw}
FAILED = ("closed_early", "reset_by_target", "no_synack", "capture_gap", "timed_out",
          "unfinished")


class InputError(StreamError):
    """Inputs that are not what tc-diff needs, or that do not belong together (exit 65)."""


# -- the session map -----------------------------------------------------------------------
class Replay:
    """One replayed session (a sess record): which capture, where, how it ended."""

    __slots__ = ("rec", "replay", "orig", "conns", "outcome", "sent_offs", "sent_t",
                 "target_stream")

    def __init__(self, rec: dict, replay: int):
        self.rec = rec
        self.replay = replay  # (file index, copy) folded into one number, 0 = primary
        o = rec["orig"]
        self.orig = ((o[0], o[1]), (o[2], o[3]))
        self.conns = [((c[0], c[1]), (rec["target"][0], rec["target"][1]), c[2])
                      for c in rec.get("conns", ())]
        self.outcome = rec.get("outcome", "?")
        bursts = rec.get("sent") or []
        self.sent_offs = [b[0] for b in bursts]
        self.sent_t = bursts
        self.target_stream = None

    def sent_time(self, offset: int):
        """When tc-session first sent client stream byte ``offset`` (ns), or None."""
        i = bisect.bisect_right(self.sent_offs, offset) - 1
        if i < 0:
            return None
        b = self.sent_t[i]
        return b[3] if offset < b[1] else None


def check_sess(rec: dict, where: str) -> dict:
    o, tgt = rec.get("orig"), rec.get("target")
    if not (isinstance(o, list) and len(o) == 4 and isinstance(tgt, list) and len(tgt) == 2
            and isinstance(rec.get("conns", []), list)):
        raise InputError(f"{where}: malformed sess record (orig: [client ip, port, server "
                         f"ip, port], target: [ip, port], conns: [...])")
    return rec


def load_sessions(paths) -> list:
    """Replay objects from the sess records of the given streams (other records ignored)."""
    out = []
    for i, path in enumerate(paths):
        found = []

        def take(rec, path=path, found=found):
            if rec.get("t") == "sess":
                found.append(check_sess(rec, path))
        for _ in file_packets(path, kinds=(), on_other=take):
            pass
        if not found:
            raise InputError(f"{path}: no sess records (write them with tc-session "
                             f"--sessions FILE)")
        for rec in found:
            copy = rec.get("copy", 0)
            out.append(Replay(rec, i * 1000 + copy if isinstance(copy, int) else i * 1000))
    return out


# -- the target's replies ----------------------------------------------------------------
class Joined:
    """The target's response stream of one session: its connections' server halves one
    after the other (a session that reconnected goes on on a new connection)."""

    def __init__(self, halves):
        parts, self.offsets, self.stamps = [], [], []
        base = 0
        for h in halves:
            data, _, offs, stamps = h._assemble()
            self.offsets += [base + o for o in offs]
            self.stamps += stamps
            parts.append(data)
            base += len(data)
        self.bytes = b"".join(parts)

    def time_at(self, offset: int):
        i = bisect.bisect_right(self.offsets, offset) - 1
        return self.stamps[i] if i >= 0 else None


class TargetReplies:
    def __init__(self, paths, target_ports, limit):
        self.by_tuple: dict = {}
        self.used: set = set()  # id() of the connections already given to a session
        self.fb = self.cut = 0
        self.r = Reassembler(target_ports, limit)
        for path in paths:
            for ts, ip in file_packets(path, kinds=("fb",)):
                self.fb += 1
                self.r.add(ts, ip)
        for conn in self.r.connections():
            self.by_tuple.setdefault((conn.client, conn.server), []).append(conn)

    def stream_for(self, rp: Replay) -> Joined:
        halves = []
        for client, server, t_syn in rp.conns:
            cands = self.by_tuple.get((client, server), [])
            best = None
            for c in cands:  # the connection on that 4-tuple that began nearest the SYN
                if id(c) in self.used:
                    continue
                if best is None or abs(c.first_ts - (t_syn or 0)) < abs(best.first_ts -
                                                                         (t_syn or 0)):
                    best = c
            if best is not None:
                self.used.add(id(best))
                halves.append(best.s2c)
        return Joined(halves)


# -- the comparison --------------------------------------------------------------------------
class Options:
    def __init__(self, proto: str = "auto", ignore=(), limit: int = 64 << 20,
                 learn_noise: bool = True):
        self.proto = proto
        self.ignore = list(ignore)
        self.limit = limit
        self.learn_noise = learn_noise


class Result:
    """One exchange: a request of the original and its responses."""

    __slots__ = ("conn", "index", "client", "server", "replayed", "sid", "outcome", "proto",
                 "endpoint", "verdict", "diffs", "lat_orig", "lat_target", "request",
                 "orig_text", "target_text")

    def as_dict(self) -> dict:
        real = [d.as_dict() for d in self.diffs if not d.noise]
        noise = [d.as_dict() for d in self.diffs if d.noise]
        return {"conn": self.conn, "exchange": self.index, "client": self.client,
                "server": self.server, "replayed": self.replayed, "sid": self.sid,
                "outcome": self.outcome, "proto": self.proto, "endpoint": self.endpoint,
                "request": self.request, "verdict": self.verdict, "differences": real,
                "noise": noise,
                "latency_ms": {"original": self.lat_orig, "target": self.lat_target}}


def _ep(addr) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _ms(t0, t1):
    return None if t0 is None or t1 is None else round((t1 - t0) / 1e6, 3)


def _latency(req_time, resp_msg, stream) -> dict:
    if resp_msg is None or resp_msg.end <= resp_msg.start:
        return {"first": None, "last": None}
    return {"first": _ms(req_time, stream.time_at(resp_msg.start)),
            "last": _ms(req_time, stream.time_at(resp_msg.end - 1))}


def _request_text(data: bytes) -> str:
    line = data[:200].split(b"\n", 1)[0].rstrip(b"\r")
    return repr(line[:120])[2:-1]


class Differ:
    def __init__(self, opts: Options):
        self.opts = opts
        self.noise: dict = {}      # endpoint -> {field: example}
        self.results: list = []
        self.unmatched_sessions = 0
        self.connections = 0

    def proto_of(self, client_bytes: bytes):
        if self.opts.proto != "auto":
            return PROTOCOLS[self.opts.proto]
        for p in (http, resp):
            if p.looks_like(client_bytes):
                return p
        return raw

    def run(self, original: str, sessions: list, targets: list) -> list:
        replays = load_sessions(sessions)
        by_orig: dict = {}
        for rp in replays:
            by_orig.setdefault(rp.orig, []).append(rp)
        server_ports = {rp.orig[1][1] for rp in replays}
        target_ports = {rp.conns[0][1][1] for rp in replays if rp.conns} | {
            rp.rec["target"][1] for rp in replays}
        orig = Reassembler(server_ports, self.opts.limit)
        for ts, ip in file_packets(original, kinds=CAPTURE_KINDS):
            orig.add(ts, ip)
        conns = [c for c in orig.connections() if c.server[1] in server_ports and c.c2s.segs]
        if not conns:
            raise InputError(f"{original}: no connection to the replayed server ports "
                             f"{sorted(server_ports)} (is it the capture that was replayed?)")
        if not any(c.s2c.syn or c.s2c.segs for c in conns):
            raise InputError(f"{original}: no server->client packets (capture both "
                             f"directions: tcpdump, or tc-capture --server-half)")
        tr = TargetReplies(targets, target_ports, self.opts.limit)
        if tr.fb and not any(c.s2c.segs for c in tr.r.connections()):
            raise InputError("the target's replies carry no payload: capture them with "
                             "tc-intercept --payload all")
        # the k-th captured connection on a 4-tuple is the k-th session replaying it
        nth: dict = {}
        pairs = []
        matched = 0
        for conn in conns:
            k = nth.get((conn.client, conn.server), 0)
            nth[(conn.client, conn.server)] = k + 1
            mine = by_orig.get((conn.client, conn.server), [])
            per_replay: dict = {}
            for rp in mine:
                per_replay.setdefault(rp.replay, []).append(rp)
            chosen = {r: lst[k] for r, lst in per_replay.items() if k < len(lst)}
            matched += len(chosen)
            for rp in chosen.values():
                rp.target_stream = tr.stream_for(rp)
            pairs.append((conn, chosen))
        if replays and not matched:
            raise InputError("the session map matches no connection of the original capture "
                             "(another capture's map?)")
        self.unmatched_sessions = len(replays) - matched
        self.connections = len(pairs)
        for conn, chosen in pairs:
            self.results += self.compare_connection(conn, chosen)
        self.apply_noise(self.results)
        return self.results

    def _split_target(self, proto, requests, rp: Replay):
        stream = rp.target_stream
        data = stream.bytes
        if proto is raw:
            msgs = raw.split_at_times(stream, [rp.sent_time(m.start) for m in requests])
        else:
            try:
                msgs = proto.split_responses(data, requests)
            except (http.Unparsable, resp.Unparsable) as e:
                msgs = [Message(0, len(data), {"unparsable": str(e), "bytes": data})] + \
                    [None] * (len(requests) - 1)
        for m in msgs:
            if m is not None:
                m.info.setdefault("bytes", data[m.start:m.end])
        return msgs

    def compare_connection(self, conn, chosen: dict) -> list:
        """The Results of one captured connection, given the Replays of it ({replay:
        Replay}, with their target_stream); learns noise from the other replays; the
        verdicts of comparable exchanges stay None until apply_noise."""
        out = []
        cdata = conn.c2s.bytes
        sdata = conn.s2c.bytes
        proto = self.proto_of(cdata)
        try:
            if proto is raw:
                requests, orig_resps = raw.split_by_turns(conn.c2s, conn.s2c)
            else:
                requests = proto.split_requests(cdata)
                orig_resps = proto.split_responses(sdata, requests)
        except (http.Unparsable, resp.Unparsable):
            proto = raw
            requests, orig_resps = raw.split_by_turns(conn.c2s, conn.s2c)
        for m in orig_resps:
            if m is not None:
                m.info.setdefault("bytes", sdata[m.start:m.end])
        primary = chosen.get(0)
        targets = {r: self._split_target(proto, requests, rp) for r, rp in chosen.items()
                   if rp.target_stream is not None}
        for i, req in enumerate(requests):
            res = Result()
            res.conn, res.index, res.proto = conn.number, i, proto.NAME
            res.client, res.server = _ep(conn.client), _ep(conn.server)
            res.endpoint = req.endpoint or raw.first_word(cdata[req.start:req.end])
            res.request = _request_text(cdata[req.start:req.end])
            res.diffs = []
            a = orig_resps[i] if i < len(orig_resps) else None
            t_req = conn.c2s.time_at(req.end - 1)
            res.lat_orig = _latency(t_req, a, conn.s2c)
            res.lat_target = {"first": None, "last": None}
            res.orig_text = a.info["bytes"][:4096] if a is not None else b""
            res.target_text = b""
            if primary is None:
                res.replayed, res.sid, res.outcome = None, None, "not_replayed"
                res.verdict = "missing"
                out.append(res)
                continue
            res.replayed = _ep(primary.conns[0][0]) if primary.conns else None
            res.sid, res.outcome = primary.rec.get("sid"), primary.outcome
            b = targets[0][i] if i < len(targets.get(0, ())) else None
            if b is not None:
                res.lat_target = _latency(primary.sent_time(req.end - 1), b,
                                          primary.target_stream)
                res.target_text = b.info["bytes"][:4096]
            if a is None:
                res.verdict = "no_original_response" if b is None else "different"
                if b is not None:
                    from tcpcopylib.diff.model import Diff

                    res.diffs.append(Diff("response", None, "(a response)"))
            elif b is None or b.info.get("unparsable") or (
                    b.end <= b.start and a.end > a.start):
                res.verdict = "missing"
                if b is not None and b.info.get("unparsable"):
                    from tcpcopylib.diff.model import Diff

                    res.verdict = "different"
                    res.diffs.append(Diff("response", "(parsed)", "(unparsable)",
                                          detail=b.info["unparsable"]))
            else:
                res.diffs = proto.compare(req, a, b)
                res.verdict = None  # after noise
            # the other replays of the same capture: what differs between them is noise
            if self.opts.learn_noise and b is not None and res.verdict is None:
                for r, msgs in targets.items():
                    c = msgs[i] if r and i < len(msgs) else None
                    if c is None or c.info.get("unparsable"):
                        continue
                    for d in proto.compare(req, b, c):
                        self.noise.setdefault(res.endpoint, {}).setdefault(d.field, d)
            out.append(res)
        return out

    def apply_noise(self, results) -> None:
        """Mark the differences that are noise (--ignore, or learned so far), then the
        verdicts still open."""
        for res in results:
            learned = self.noise.get(res.endpoint, {})
            for d in res.diffs:
                if d.noise:
                    continue
                if any(fnmatch.fnmatchcase(d.field, pat) for pat in self.opts.ignore):
                    d.noise = "ignored"
                elif d.field in learned:
                    d.noise = "learned"
            if res.verdict is None:
                res.verdict = "different" if any(not d.noise for d in res.diffs) else "same"
