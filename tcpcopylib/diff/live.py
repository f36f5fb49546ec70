"""tc-diff --live: compare as the inputs grow, each connection as soon as it is complete,
then forget it.

The inputs arrive side by side (tcpcopylib.diff.inputs reads each in its own thread) and
are fed here by kind: "orig" (the capture, both directions), "map" (sess records) and
"target" (the target's fb records). A *slot* is one captured connection and the sessions
that replay it (the k-th captured connection on a 4-tuple with the k-th session of each
replay on it, as offline). A slot is compared when

- its captured connection is complete (both sides closed, or idle for ``idle_s`` of the
  capture's clock),
- its primary session's sess record has arrived (the replayed session ended), and the
  target's half of each of its connections is closed (FIN or RST) or idle for ``idle_s``,
- and, when learning noise, every other replay seen so far has its session there too,
  or ``wait_s`` went by on the map's clock after the primary session ended.

A captured connection whose session does not come is *overdue* once the map's clock is
``wait_s`` past the time its replay should have ended (the capture-to-replay offset of
the latest pair); it is then reported missing (not_replayed). An input's clock is the
newest time in its records, running on with the wall clock while nothing arrives, so
that waits end both when a file is read at full speed and when a live input goes quiet.
At most ``hold`` slots wait: beyond, the oldest are compared with what they have.

Noise: the exchanges of a slot are judged with the noise learned so far, including from
the slot's own copies (which it waits for). Noise learned later is applied to the
aggregate at the end (the summary, --html, --stats-json, the exit status), not to lines
already written: the summary says how many exchanges that turned from different to same.
"""

from __future__ import annotations

import random
import time

from tcpcopylib.diff.core import Differ, InputError, Joined, Replay, check_sess
from tcpcopylib.diff.report import VERDICTS, endpoint_entry, latency_pairs
from tcpcopylib.reassembly import Reassembler

INF = float("inf")
LINGER_NS = 500_000_000   # a closed connection is handed over after this much quiet
SAMPLES = 20_000          # latency pairs kept per endpoint (a uniform sample beyond)
KEEP_BAD = 200            # differing exchanges kept with their details (the HTML's list)


class Clock:
    """One kind of input's clock (ns): the newest record time, running on with the wall
    clock while nothing arrives; infinite once every input of the kind ended."""

    __slots__ = ("ts", "mono", "open")

    def __init__(self):
        self.ts = None
        self.mono = 0.0
        self.open = 0  # inputs of this kind not ended yet

    def seen(self, ts) -> None:
        if ts and (self.ts is None or ts > self.ts):
            self.ts = ts
        self.mono = time.monotonic()

    @property
    def ended(self) -> bool:
        return self.open <= 0

    def now(self):
        if self.ended:
            return INF
        if self.ts is None:
            return None
        return self.ts + int((time.monotonic() - self.mono) * 1e9)

    def passed(self, t) -> bool:
        now = self.now()
        return now is not None and t is not None and now > t


class Slot:
    __slots__ = ("key", "conn", "replays")

    def __init__(self, key):
        self.key = key       # ((client, server), k)
        self.conn = None     # the captured Connection, once complete
        self.replays = {}    # replay number -> Replay


def _waits_for(slot: Slot) -> tuple:
    """The kinds of input whose records this slot holds while it waits for another's."""
    if slot.conn is None:
        return ("map",) if slot.replays else ()  # (a new slot: nothing yet)
    return ("orig",) if 0 not in slot.replays else ("orig", "map")  # (then: the replies)


class Aggregate:
    """What the summary and the HTML need, bounded: per endpoint the verdict counts, the
    sets of differing fields (re-judged with the final noise) and a sample of latency
    pairs; the first KEEP_BAD differing exchanges with their details."""

    def __init__(self, keep_bad: int = KEEP_BAD):
        self.eps: dict = {}
        self.noise_fields: set = set()
        self.bad: list = []
        self.keep_bad = keep_bad
        self.rnd = random.Random(0)

    def add(self, results) -> None:
        for r in results:
            ep = self.eps.get(r.endpoint)
            if ep is None:
                ep = self.eps[r.endpoint] = {"n": 0, "counts": {}, "sigs": {},
                                             "pairs": {"first": [], "last": []}}
            ep["n"] += 1
            ep["counts"][r.verdict] = ep["counts"].get(r.verdict, 0) + 1
            if r.verdict == "different":
                sig = frozenset(d.field for d in r.diffs if not d.noise)
                ep["sigs"][sig] = ep["sigs"].get(sig, 0) + 1
            for which, pairs in ep["pairs"].items():
                p = latency_pairs(r, which)
                if p is None:
                    continue
                if len(pairs) < SAMPLES:
                    pairs.append(p)
                else:  # reservoir sampling: every pair kept with the same chance
                    j = self.rnd.randrange(ep["n"])
                    if j < SAMPLES:
                        pairs[j] = p
            if len(self.noise_fields) < 1000:
                self.noise_fields.update(d.field for d in r.diffs if d.noise)
            if r.verdict in ("different", "missing") and len(self.bad) < self.keep_bad:
                self.bad.append(r)

    def digest(self, learned: dict) -> dict:
        """The report's digest (tcpcopylib.diff.report.digest), with the noise ``learned``
        by the end ({endpoint: {field: Diff}}) applied to the differing exchanges."""
        eps, relabelled = {}, 0
        tot = {v: 0 for v in VERDICTS}
        fields = set(self.noise_fields)
        for name in sorted(self.eps):
            ep = self.eps[name]
            counts = dict(ep["counts"])
            noise = learned.get(name, {})
            for sig, n in ep["sigs"].items():
                if sig and all(f in noise for f in sig):
                    counts["different"] -= n
                    counts["same"] = counts.get("same", 0) + n
                    relabelled += n
                    fields |= sig
            for v, n in counts.items():
                tot[v] = tot.get(v, 0) + n
            eps[name] = endpoint_entry(ep["n"], counts, ep["pairs"])
        bad = []
        for r in self.bad:
            if r.verdict == "same":  # (re-judged by an earlier digest)
                continue
            noise = learned.get(r.endpoint, {})
            real = [d for d in r.diffs if not d.noise]
            if r.verdict == "different" and real and all(d.field in noise for d in real):
                for d in real:
                    d.noise = "learned"
                r.verdict = "same"
                continue
            bad.append(r)
        tot["exchanges"] = sum(ep["n"] for ep in self.eps.values())
        tot["noise_fields"] = sorted(fields)
        return {"totals": tot, "endpoints": eps, "bad": bad,
                "bad_total": tot["different"] + tot["missing"], "relabelled": relabelled}


class LiveDiffer(Differ):
    """Differ fed record by record; ``emit(results)`` gets each slot's exchanges."""

    def __init__(self, opts, emit, wait_s: float = 5.0, idle_s: float = 10.0,
                 hold: int = 10_000):
        super().__init__(opts)
        self.emit = emit
        self.wait_ns, self.idle_ns = int(wait_s * 1e9), int(idle_s * 1e9)
        self.hold = hold
        self.clocks = {"orig": Clock(), "map": Clock(), "target": Clock()}
        self.server_ports: set = set()
        self.orig = Reassembler(self.server_ports, opts.limit, on_done=self._orig_done)
        self.target = Reassembler(set(), opts.limit, on_done=self._target_done)
        self.slots: dict = {}       # key -> Slot, oldest first
        self.orig_k: dict = {}      # (client, server) -> captured connections so far
        self.sess_k: dict = {}      # ((client, server), replay) -> sessions so far
        self.replay_ids: set = set()
        self.replies: dict = {}     # target (client, server) -> [Connection], unclaimed
        self.wanted: dict = {}      # target (client, server) -> slot key waiting for it
        self.touched: dict = {}     # slot keys to look at (a dict: ordered, no repeats)
        self.offset = None          # replay clock - capture clock, of the latest pair
        self.agg = Aggregate()
        self.sessions = self.fb = self.no_data = self.unclaimed = 0
        self.replies_with_payload = False
        self.matched = 0
        self.counts = {v: 0 for v in VERDICTS}
        self.exchanges = 0
        self.held = self.peak_held = 0
        # what waits for a partner, by the kind of input it came from: captured connections
        # (without their session, or with it, without the replies), sessions (without their
        # captured connection, or with it, without the replies), replies without a session
        self.backlog = {"orig": 0, "map": 0, "target": 0}

    # -- input ------------------------------------------------------------------------
    def add_input(self, kind: str) -> None:
        self.clocks[kind].open += 1

    def end_input(self, kind: str) -> None:
        self.clocks[kind].open -= 1
        if kind == "orig" and self.clocks[kind].ended:
            self.orig.finish()
        if kind == "target" and self.clocks[kind].ended:
            self.target.finish()
        self.touched.update(dict.fromkeys(self.slots))

    def feed(self, kind: str, index: int, items) -> None:
        clock = self.clocks[kind]
        if kind == "map":
            for rec in items:
                self._sess(rec, index)
                clock.seen(rec.get("ts") or rec.get("end"))
            return
        r = self.orig if kind == "orig" else self.target
        add = r.add
        for ts, ip in items:
            add(ts, ip)
        if items:
            clock.seen(max(ts for ts, _ in items))
        if kind == "target":
            self.fb += len(items)

    def _sess(self, rec: dict, index: int) -> None:
        check_sess(rec, "session map")
        copy = rec.get("copy", 0)
        rp = Replay(rec, index * 1000 + copy if isinstance(copy, int) else index * 1000)
        self.sessions += 1
        self.replay_ids.add(rp.replay)
        self.server_ports.add(rp.orig[1][1])
        self.target.server_ports.add(rec["target"][1])
        conn = self.orig.open.get(rp.orig)
        if conn is not None and conn.closed:  # (lingering for a last ACK: done now)
            self.orig.hand_over(conn)
        k = self.sess_k.get((rp.orig, rp.replay), 0)
        self.sess_k[(rp.orig, rp.replay)] = k + 1
        slot = self._slot((rp.orig, k))
        before = _waits_for(slot)
        slot.replays.setdefault(rp.replay, rp)
        self._recount(before, slot)
        for client, server, _ in rp.conns:
            self.target.server_ports.add(server[1])
            self.wanted[(client, server)] = slot.key
        self.touched[slot.key] = None

    def _recount(self, before, slot) -> None:
        """Keep ``backlog`` right as a slot changes (or goes: slot None)."""
        after = _waits_for(slot) if slot is not None else ()
        for kind in before:
            self.backlog[kind] -= 1
        for kind in after:
            self.backlog[kind] += 1

    def _slot(self, key) -> Slot:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key)
        return slot

    def _orig_done(self, conn) -> None:
        if not conn.c2s.segs:
            self.no_data += 1  # (offline leaves them out too)
            return
        tup = (conn.client, conn.server)
        k = self.orig_k.get(tup, 0)
        self.orig_k[tup] = k + 1
        slot = self._slot((tup, k))
        before = _waits_for(slot)
        slot.conn = conn
        self._recount(before, slot)
        self.touched[slot.key] = None

    def _target_done(self, conn) -> None:
        tup = (conn.client, conn.server)
        if conn.s2c.segs:
            self.replies_with_payload = True
        self.replies.setdefault(tup, []).append(conn)
        self.backlog["target"] += 1
        key = self.wanted.get(tup)
        if key is not None:
            self.touched[key] = None

    # -- when a slot is complete ---------------------------------------------------------
    def _replies_done(self, rp: Replay) -> bool:
        """Is the target's half of every connection of this session there (or given up)?"""
        tclock = self.clocks["target"]
        for client, server, _ in rp.conns:
            if self.replies.get((client, server)):
                continue
            conn = self.target.open.get((client, server))
            if conn is not None:
                if conn.s2c.fin or conn.s2c.rst or tclock.passed(conn.last_ts + self.idle_ns):
                    self.target.hand_over(conn)
                    continue
                return False
            if not tclock.passed(rp.rec.get("end", 0) + self.idle_ns):
                return False
        return True

    def _ready(self, slot: Slot) -> bool:
        conn, primary = slot.conn, slot.replays.get(0)
        if conn is None:
            return self.clocks["orig"].ended
        mclock = self.clocks["map"]
        if primary is None:
            return mclock.ended or (self.offset is not None and mclock.passed(
                conn.last_ts + self.offset + self.wait_ns))
        if not all(self._replies_done(rp) for rp in slot.replays.values()):
            return False
        if self.opts.learn_noise and not self.replay_ids <= slot.replays.keys():
            return mclock.passed(primary.rec.get("end", 0) + self.wait_ns)
        return True

    def _take_replies(self, rp: Replay, key) -> Joined:
        halves = []
        for client, server, t_syn in rp.conns:
            cands = self.replies.get((client, server))
            if self.wanted.get((client, server)) == key:
                del self.wanted[(client, server)]
            if not cands:
                continue
            best = min(cands, key=lambda c: abs(c.first_ts - (t_syn or 0)))
            cands.remove(best)
            self.backlog["target"] -= 1
            if not cands:
                del self.replies[(client, server)]
            halves.append(best.s2c)
        return Joined(halves)

    def _compare(self, slot: Slot) -> None:
        del self.slots[slot.key]
        self._recount(_waits_for(slot), None)
        conn = slot.conn
        for rp in slot.replays.values():
            rp.target_stream = self._take_replies(rp, slot.key)
        if conn is None:
            self.unmatched_sessions += len(slot.replays)
            return
        if conn.server[1] not in self.server_ports:
            return  # a connection to a port no session replays (offline leaves it out)
        self.matched += len(slot.replays)
        primary = slot.replays.get(0)
        if primary is not None and primary.conns and primary.conns[0][2]:
            self.offset = primary.conns[0][2] - conn.first_ts
        results = self.compare_connection(conn, slot.replays)
        self.apply_noise(results)
        self.connections += 1
        self.exchanges += len(results)
        for r in results:
            self.counts[r.verdict] = self.counts.get(r.verdict, 0) + 1
        self.agg.add(results)
        self.emit(results)

    def settle(self) -> None:
        """Compare the slots that something happened to, if they are complete."""
        for _ in range(4):  # (handing over replies touches slots again: once more)
            if not self.touched:
                break
            keys, self.touched = self.touched, {}
            for key in keys:
                slot = self.slots.get(key)
                if slot is not None and self._ready(slot):
                    self._compare(slot)

    def tick(self, cap: bool = True) -> None:
        """Every few tenths of a second: hand over quiet connections, give up waits that
        are over, keep at most ``hold`` slots (with ``cap``: no input paused to bring the
        number down), measure what is held."""
        for kind, r in (("orig", self.orig), ("target", self.target)):
            now = self.clocks[kind].now()
            if now is not None and now != INF:
                r.flush_closed(now, LINGER_NS)
                r.expire(now, self.idle_ns)
        mclock = self.clocks["map"]
        for tup in list(self.replies):
            if tup in self.wanted:
                continue  # a session waits for them (for its captured connection)
            keep = [c for c in self.replies[tup]
                    if not mclock.passed(c.last_ts + self.idle_ns + self.wait_ns)]
            self.unclaimed += len(self.replies[tup]) - len(keep)
            self.backlog["target"] -= len(self.replies[tup]) - len(keep)
            if keep:
                self.replies[tup] = keep
            else:
                del self.replies[tup]
        self.touched.update(dict.fromkeys(self.slots))
        self.settle()
        while cap and len(self.slots) > self.hold:
            self._compare(next(iter(self.slots.values())))
        self.held = self.held_bytes()
        self.peak_held = max(self.peak_held, self.held)

    def finish(self) -> None:
        """Every input ended (or the run is interrupted): compare what is left."""
        for clock in self.clocks.values():
            clock.open = 0
        self.orig.finish()
        self.target.finish()
        order = sorted(self.slots.values(),
                       key=lambda s: s.conn.number if s.conn is not None else INF)
        for slot in order:
            self._compare(slot)
        self.unclaimed += sum(len(v) for v in self.replies.values())
        self.replies.clear()
        self.backlog["target"] = 0
        self.held = self.held_bytes()
        if not self.sessions:
            raise InputError("the session maps hold no sess records (write them with "
                             "tc-session --sessions FILE)")
        if not self.matched:
            raise InputError("the session map matches no connection of the original capture "
                             "(another capture's map?)")
        if self.fb and not self.replies_with_payload:
            raise InputError("the target's replies carry no payload: capture them with "
                             "tc-intercept --payload all")

    # -- counters -----------------------------------------------------------------------
    def held_bytes(self) -> int:
        held = self.orig.held_bytes() + self.target.held_bytes()
        held += sum(s.conn.c2s.stored + s.conn.s2c.stored for s in self.slots.values()
                    if s.conn is not None)
        return held + sum(c.s2c.stored for cs in self.replies.values() for c in cs)

    def open_connections(self) -> int:
        return len(self.orig.open) + len(self.slots)

    def status(self) -> str:
        c = self.counts
        return (f"{self.open_connections()} open, {self.connections} compared "
                f"({self.exchanges} exchanges: {c['same']} same, {c['different']} "
                f"different, {c['missing']} missing), {self.held / 1e6:.1f} MB held")

    def stats(self) -> dict:
        return {"open_connections": self.open_connections(), "compared": self.connections,
                "held_bytes": self.held, "peak_held_bytes": self.peak_held,
                "sessions": self.sessions, "unclaimed_replies": self.unclaimed,
                "waiting": dict(self.backlog),
                "emitted": dict(self.counts, exchanges=self.exchanges)}


TICK = 0.25  # seconds between ticks (handing over quiet connections, waits, gates)


def gate(differ: LiveDiffer, feed) -> None:
    """Pause the regular files whose kind runs ahead (its backlog above half of hold), as
    long as another input can still bring what they wait for; resume the others."""
    ahead = {k for k, n in differ.backlog.items() if n > differ.hold // 2}
    for inp in feed.inputs:
        others = any(o.kind != inp.kind and not differ.clocks[o.kind].ended and
                     (o.gate.is_set() or o.kind not in ahead) for o in feed.inputs)
        if inp.regular and inp.kind in ahead and others:
            inp.gate.clear()
        else:
            inp.gate.set()


def run(differ: LiveDiffer, feed, flush) -> None:
    """Feed the inputs' batches to the differ until every input ended; ``flush()`` after
    each batch (the lines written). The caller calls differ.finish() after."""
    for inp in feed.inputs:
        differ.add_input(inp.kind)
    feed.start()
    next_tick = time.monotonic() + TICK
    while not all(c.ended for c in differ.clocks.values()):
        item = feed.get(TICK)
        if item is not None:
            kind, index, items = item
            if isinstance(items, BaseException):
                raise items
            if items is None:
                differ.end_input(kind)
            else:
                differ.feed(kind, index, items)
            differ.settle()
            gate(differ, feed)
        if item is None or time.monotonic() >= next_tick:
            gate(differ, feed)
            differ.tick(cap=all(inp.gate.is_set() for inp in feed.inputs))
            next_tick = time.monotonic() + TICK
        flush()


def run_inputs(differ: LiveDiffer, original: str, sessions, targets, follow_s, flush) -> None:
    """run() on these inputs (paths or '-'); follow_s: see tcpcopylib.diff.inputs."""
    from tcpcopylib.diff.inputs import Feed

    feed = Feed(follow_s)
    for kind, paths in (("orig", [original]), ("map", sessions), ("target", targets)):
        for i, path in enumerate(paths):
            feed.add(path, kind, i)
    run(differ, feed, flush)
