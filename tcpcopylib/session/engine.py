"""The TCP client simulation behind tc-session.

One ``Engine`` replays many captured client connections against a target. It is
driven from outside (the CLI's select loop, or a test with a fake clock):

* ``client_packet(data, now, due)`` -- a captured client->server datagram, due at ``due``
  (its input timestamp on the timing rule; now if not given) and handed over now;
* ``feedback_packet(data, now, orig_len)`` -- a reply of the target (tc-feedback);
* ``next_deadline()`` / ``on_timer(now)`` -- the engine's timers;
* ``emit(data, sid, now)`` -- callback receiving every datagram to send to the target;
* ``claims`` -- an object with claim()/release() (tcpcopylib.feedback.FeedbackClient).

Times are integers in ns. Sequence numbers are kept as *offsets*: client data offset 0
is the byte after the client's SYN (captured or faked), target offset 0 the byte after
the target's SYN-ACK; Python ints never wrap, the 32-bit wire values are derived.

Request/response gating ("response complete" rule, see tc-session(1)): captured client
data is grouped by its captured ack number (the online server's bytes the client had
seen). A group whose captured ack differs from the previous group's followed a server
response online, so it waits until the target's response to the previous group is
complete: the target sent at least as many bytes as the online server did (the ack
advance), or it sent some data and then went quiet for ``quiet`` ns, or it sent nothing,
has acknowledged everything and stayed silent for ``gate_timeout`` ns (no deadlock), or
it closed. A client FIN or RST waits the same way.

No client data goes before its recorded offset from the connection's accept (_before_offset):
when it was due, plus ``est_lag``, how much later the target accepted the replayed
connection than the online server accepted the captured one (our handshake ACK waits for
the SYN-ACK's way back through the feedback). Gated data goes at the later of that time and
the gate's opening, not at their sum (the response it waited for was late by as much).
Offsets count between due times (client_packet's ``due``: the input timestamps on the
timing rule), not between the times the records reached the engine, whose jitter (a live
capture's, up to ``JITTER``) would move them.

Duplex sessions (the server speaks on its own; tc-session(1), DUPLEX SESSIONS): the gate
above assumes that the server bytes the client had seen answered the client. Servers that
push (WebSocket, redis SUBSCRIBE, Server-Sent Events, chat and game servers) break that:
the client's acks advance with every push, and its data, sent on its own timer, would wait
for the target to push as many bytes or to go quiet. Whether the server speaks on its own
is learned per connection from the captured client packets alone (their acks and times,
so pcaps and live capture alike): the client's ack advancing is the server having spoken.
A new advance that comes with no client data since the previous one, and more than
``push_gap`` + 2 x the handshake's round trip (as captured) after it, was not the rest of
a response (a response's segments come round trips apart, not longer): the server spoke
unprompted; twice in a row (once may be a delayed ACK of a response's tail) makes it
duplex. So does the client speaking again with no new server bytes, more than the same
time after its previous data (it did not wait for a response; a pipelined burst is
quicker), and an HTTP/1.1 request asking for an Upgrade (WebSocket, h2c), or a redis
SUBSCRIBE, PSUBSCRIBE or SSUBSCRIBE (in RESP), once the server answered it (the next advance) and the target did too (the data that followed the answer
online waits for the target's first bytes after the request, not for as many as the online
server sent: some may have been pushes). From then on the session is duplex: its client
data is released on its recorded timing (at its recorded offset from the accept, as above),
as the original client sent it without waiting for the server; the data before that point
was gated as above. Advances
of one byte (the server's FIN) do not count; ``push_gap`` 0 turns detection off.
"""

from __future__ import annotations

import heapq
import itertools
import struct

from tcpcopylib.packet import (TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, parse_options,
                               parse_tcp_fast)
from tcpcopylib.session.alloc import Allocator, sample_share

M32 = 0xFFFFFFFF
MS = 1_000_000
SEC = 1_000_000_000
WINDOW = 65535          # the window we advertise: we are an infinite sink
TIME_WAIT = 60 * SEC    # Linux TCP_TIMEWAIT_LEN
COMPACT_MIN = 4096      # timer heap entries before ended sessions' ones are dropped
JITTER = 20 * MS        # client_packet: a record handed over later than this after it was
                        # due (a backlog, an overloaded tc-session) counts from when it came

_TSOPT = struct.Struct("!BBBBII")
# whole headers as sent (TCP without options): IPv4 + TCP, IPv6 + TCP
_OUT4 = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_OUT6 = struct.Struct("!IHBB16s16sHHIIBBHHH")
_MSS_OPT = struct.Struct("!BBH")

# Checksums (RFC 1071) as integer arithmetic: 2**16 == 1 (mod 0xFFFF), so the one's
# complement sum of big-endian 16-bit words is the value of the bytes mod 0xFFFF, and
# the checksum is minus that sum mod 0xFFFF (0 for a sum that is a multiple of 0xFFFF,
# exactly as folding and complementing gives for a non-zero sum).

# connection states (to the target)
NEW, SYN_SENT, ESTAB, CLOSED, DONE = range(5)

# Session.duplex: gated request/response; an HTTP Upgrade asked for; answered online (duplex
# once the gate released the data that followed the answer); duplex (client data released
# on its recorded timing, see the module docstring)
GATED, UPGRADE_ASKED, UPGRADE_ANSWERED, DUPLEX = range(4)
# redis commands (the first of a RESP array) that turn the connection into a
# subscriber's, which the server pushes messages to: as an HTTP Upgrade
_SUBSCRIBE_COMMANDS = frozenset((b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"subscribe",
                                 b"psubscribe", b"ssubscribe"))

# Engine.late, how late client data went out against the time it was due (handed to the
# engine): the upper bounds of its buckets, in ns
LATE_BOUNDS = (MS, 2 * MS, 5 * MS, 10 * MS, 20 * MS, 50 * MS, 100 * MS, 200 * MS,
               500 * MS, SEC, 5 * SEC)

# outcomes, with the hint printed next to failures
OUTCOMES = {
    "completed": "",
    "reconnected": "completed on a new connection after the target closed early",
    "closed_early": "the target closed before the client did; data was left unsent",
    "reset_by_target": "the target reset the connection (nothing listening on the target "
                       "port? server error?)",
    "no_synack": "never established, no SYN-ACK: check the route to the assistant "
                 "(ip route on the target), tc-intercept and tc-feedback",
    "capture_gap": "packets missing from the capture: check capture drops and offloads",
    "timed_out": "the target went silent (-t/-k)",
    "unfinished": "input ended or a signal arrived first: raise --drain",
    "filtered": "not replayed (-r sampling, --only-syn, tc-select)",
    "shed": "not replayed: tc-session was overloaded when it began (see the shed "
            "reasons: lag, backlog, max-sessions, memory)",
    "pool_exhausted": "not replayed: every client address:port of the -c pool was in use "
                      "(give -c more addresses, or lower -n)",
}
FAILURES = ("closed_early", "reset_by_target", "no_synack", "capture_gap", "timed_out",
            "unfinished")
NOT_REPLAYED = ("filtered", "shed", "pool_exhausted")


class Config:
    """Engine parameters (times in ns)."""

    def __init__(self, **kw):
        self.no_wait = False
        self.only_syn = False
        self.fake_mss = 1460
        self.quiet = 100 * MS           # response over after this much target silence
        self.push_gap = 50 * MS         # duplex detection, see the module docstring (0: off)
        self.gate_timeout = 5 * SEC     # held data released after this (no deadlock)
        self.connect_timeout = 6 * SEC  # no SYN-ACK
        self.idle_timeout = 600 * SEC   # -t
        self.keepalive_timeout = 720 * SEC  # -k
        self.gap_timeout = 10 * SEC     # a capture gap not filled by then ends the session
        self.linger = 10 * SEC          # after a one-sided close
        self.delack = 40 * MS
        self.rto_init = SEC
        self.rto_min = 200 * MS
        self.rto_max = 60 * SEC
        self.max_reconnects = 5
        self.sample_pct = 100
        self.ramp = 0                   # -g: the sampled share grows from 1 % over this
        self.copies = 1                 # -n: connections per captured session
        self.max_sessions = None        # --max-sessions: new ones are shed at this many
        for k, v in kw.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown engine option {k}")
            setattr(self, k, v)


class Stats:
    __slots__ = ("pkts_in", "pkts_ignored", "pkts_truncated", "pkts_server", "pkts_out", "bytes_out",
                 "sessions", "syn_sent", "fake_syn", "retransmits", "rto_expired",
                 "fast_retransmits", "syn_retransmits", "fb_in", "fb_unmatched",
                 "acks_sent", "reconnections", "port_remaps", "client_dups",
                 "client_trimmed", "window_waits", "zero_window_probes", "gate_bytes",
                 "gate_quiet", "gate_timeout", "gate_closed", "peak_active", "duplex",
                 "set_aside", "outcomes")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)
        self.outcomes = dict.fromkeys(OUTCOMES, 0)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__ if k != "outcomes"}
        d["outcomes"] = dict(self.outcomes)
        return d


class Seg:
    """Captured client data (or a bare FIN/RST) waiting to be sent."""

    __slots__ = ("off", "data", "flags", "cack", "due")

    def __init__(self, off, data, flags, cack, due=None):
        self.off = off      # client offset of data[0]
        self.data = data    # bytes
        self.flags = flags  # TH_FIN / TH_RST / TH_PSH
        self.cack = cack    # captured ack number (32-bit) or None
        self.due = due      # when it was due (ns), None once counted in Engine.late


class Session:
    __slots__ = (
        "sid", "key", "ckey", "copy", "cip", "cport", "tip", "tport", "state", "created",
        # client sequence space
        "base", "syn_off", "syn_opts", "syn_win", "fake", "exp", "ooo", "queue",
        "fin_off", "client_rst", "gap_since",
        # sending
        "snd_una", "snd_nxt", "unacked", "fin_sent", "ip_id", "req_sent",
        # target sequence space
        "t_base", "rcv_nxt", "t_fin", "t_wnd", "t_wscale", "t_mss", "ts_ok", "ts_recent",
        "ts_base", "ts_t0", "ts_last", "ack_pending", "t_fin_first",
        # timers and RTT
        "srtt", "rttvar", "rto", "rtt_off", "rtt_t", "rto_at", "delack_at", "gate_at",
        "linger_at", "syn_t0", "wake", "dupacks", "recover", "last_rx", "last_data_rx",
        # gating
        "last_cack", "mark", "group_t", "group_data",
        "reconnects", "psum", "ipsum", "max_cack",
        # duplex detection (module docstring): GATED, UPGRADE_*, DUPLEX; when the
        # client's ack last advanced, when it last sent new data, whether it did since
        # that advance, unprompted advances in a row, the silence that counts
        "duplex", "srv_t", "cli_t", "cli_spoke", "pushes", "push_gap",
        # when the captured connection was accepted (its handshake ACK was due), and how
        # much later the target accepted ours: duplex data keeps its offset from the accept
        "hs_t", "est_lag",
        # socket mode (tcpcopylib.session.sockets): the connection's socket and its state
        "conn",
    )

    def __init__(self, sid, key, now, ckey=None, copy=0):
        self.sid = sid
        self.key = key              # in Engine.sessions: ckey, or (ckey, copy) for copies
        self.ckey = ckey or key     # the captured 4-tuple
        self.copy = copy            # -n: which copy of the captured session
        self.cip = self.ckey[0]     # the client address and port as replayed (_attach)
        self.cport = self.ckey[1]
        self.tip = None
        self.tport = None
        self.state = NEW
        self.created = now
        self.base = None
        self.syn_off = -1
        self.syn_opts = None
        self.syn_win = WINDOW
        self.fake = False
        self.exp = 0
        self.ooo = None
        self.queue = []  # of Seg; a list: short, and an empty deque costs 760 bytes
        self.fin_off = None
        self.client_rst = False
        self.gap_since = None
        self.reconnects = 0
        self.srtt = None
        self.rttvar = 0
        self.rto = 0
        self.ip_id = 0
        self.last_cack = None
        self.max_cack = None  # highest captured ack: the online server's bytes seen
        self.duplex = GATED
        self.srv_t = None
        self.cli_t = 0
        self.cli_spoke = False
        self.pushes = 0
        self.push_gap = 0
        self.hs_t = now
        self.est_lag = 0
        self.wake = None
        self.conn = None
        self._reset_conn(now)

    def _reset_conn(self, now):
        """Per-connection state (a reconnection starts it afresh)."""
        self.snd_una = self.snd_nxt = self.syn_off + 1
        self.unacked = bytearray()
        self.fin_sent = False
        self.req_sent = False
        self.t_base = 0
        self.rcv_nxt = 0
        self.t_fin = False
        self.t_fin_first = False
        self.t_wnd = WINDOW
        self.t_wscale = 0
        self.t_mss = 536
        self.ts_ok = False
        self.ts_recent = 0
        self.ts_base = 0
        self.ts_t0 = now
        self.ts_last = 0
        self.ack_pending = 0
        self.rtt_off = None
        self.rtt_t = 0
        self.rto_at = 0
        self.delack_at = 0
        self.gate_at = 0
        self.linger_at = 0
        self.syn_t0 = now
        self.dupacks = 0
        self.recover = None
        self.last_rx = now
        self.last_data_rx = 0
        self.mark = 0
        self.group_t = now
        self.group_data = False


def _queued_data(queue):
    """Does a Seg of queue hold data (not only a FIN/RST)? (A function, not a generator
    expression in the methods: those stay C-callable when compiled, see engine.pxd.)"""
    for seg in queue:
        if seg.data:
            return True
    return False


def _signed(d):
    """A 32-bit difference as a signed int."""
    return ((d + 0x80000000) & M32) - 0x80000000


_OPTIONS_SEEN: dict = {}  # options bytes -> parse_options() result (read only)


def _options(opts: bytes) -> dict:
    """parse_options(), remembered: SYN and SYN-ACK options repeat from session to session
    (the same few TCP stacks) unless they carry timestamps. The dict must not be changed."""
    o = _OPTIONS_SEEN.get(opts)
    if o is None:
        if len(_OPTIONS_SEEN) >= 1024:
            _OPTIONS_SEEN.clear()
        o = _OPTIONS_SEEN[opts] = parse_options(opts)
    return o


def _ts_option(opts: bytes):
    """(tsval, tsecr) from raw TCP options, or None (fast path for the usual layout)."""
    if len(opts) >= 12 and opts[0] == 1 and opts[1] == 1 and opts[2] == 8:
        return struct.unpack_from("!II", opts, 4)
    if len(opts) < 10:
        return None  # too short for a timestamp option (10 bytes)
    o = parse_options(opts)
    return o.get("ts")


class Engine:
    def __init__(self, mapper, emit, config: Config | None = None, claims=None,
                 alloc: Allocator | None = None):
        self.mapper = mapper
        self.emit = emit
        self.cfg = config or Config()
        self.claims = claims
        self.alloc = alloc or Allocator()
        self.st = Stats()
        self.sessions = {}      # captured 4-tuple (copies: (4-tuple, copy)) -> Session
        self.by_target = {}     # (cip, cport, tip, tport) as sent -> Session
        self.time_wait = {}     # target tuples the target holds in TIME_WAIT -> expiry
        self.filtered = set()   # captured 4-tuples not replayed
        self.shed_keys = set()  # hash() of session keys shed (--max-memory, pool): small
        # hash() of session keys -> client base, of sessions that failed while their
        # captured connection went on: its later packets are ignored (see _finish)
        self.failed_keys = {}
        # set from outside (admission.Admission): None, or why new sessions are shed
        self.shedding = None
        self.shed_reasons = {}  # reason -> sessions shed for it
        self.on_shed = None     # optional callback(session key, reason, now)
        self.t0 = None          # first captured packet (-g)
        self.warn = None        # optional callback(message), each kind said once
        self._warned = set()
        self.heap = []
        self._tick = itertools.count()
        self._compact_min = self._compact_at = COMPACT_MIN  # see _compact()
        self.next_sid = 1
        self.now = 0
        # release lateness: counts per LATE_BOUNDS bucket (the last: above them), sum in ns
        self.late = [0] * (len(LATE_BOUNDS) + 1)
        self.late_sum = 0
        self.on_end = None      # optional callback(session, outcome), e.g. for -v

    # == input ==========================================================================
    def client_packet(self, data, now: int, due=None) -> None:
        """A captured packet, handed over now. ``due``: when it was due (its timestamp on
        the timing rule, tcpcopylib.session.timing): client data keeps its offset from the
        accept counted between due times (_before_offset), so that how late each record
        reached us (a live capture's jitter) does not move it. None, later than now, or
        more than JITTER before it (a backlog: a session does not keep the lag it began
        with once we catch up): now."""
        self.now = now
        if due is None or not now - JITTER <= due <= now:
            due = now
        self.st.pkts_in += 1
        p = parse_tcp_fast(data)
        if p is None:
            self.st.pkts_ignored += 1
            return
        src, dst, ihl, sport, dport, seq, ack, doff, flags, win, plen = p
        if ihl + doff + plen > len(data):
            # cut by the capture's snap length: sending it would corrupt the stream;
            # dropped, it leaves a gap that ends the session as "capture_gap"
            self.st.pkts_truncated += 1
            return
        key = (src, sport, dst, dport)
        if self.t0 is None:
            self.t0 = now
        s = self.sessions.get(key)
        if s is not None and self.cfg.copies == 1 and not flags & TH_SYN:  # the usual case
            self._client_segment(s, seq, ack, flags,
                                 bytes(data[ihl + doff:ihl + doff + plen]) if plen else b"", now,
                                 due)
            return
        payload = None  # (not copied for the server->client packets of a capture)
        for copy in range(self.cfg.copies):  # -n: each copy is a session of its own
            k = (key, copy) if copy else key
            if copy:
                s = self.sessions.get(k)
            if s is None:
                s = self._new_session(key, k, copy, data, p, now)
                if s is False:
                    return  # not replayed at all
                if s is None:
                    continue
            elif flags & TH_SYN:
                if not flags & TH_ACK and s.base is not None and seq != (s.base - 1) & M32:
                    # the client reused the 4-tuple for a new connection
                    if s.fin_off is not None or s.client_rst:
                        self._set_aside(s)  # the old one has its whole script: it goes on
                    else:
                        self._finish(s, self._end_outcome(s), now)
                    self.failed_keys.pop(hash(k), None)
                    if self._new_session(key, k, copy, data, p, now) is False:
                        return
                continue
            if payload is None:
                payload = bytes(data[ihl + doff:ihl + doff + plen]) if plen else b""
            self._client_segment(s, seq, ack, flags, payload, now, due)

    def _new_session(self, key, k, copy, data, p, now):
        """A new session for copy `copy` of captured key; None if the packet was consumed
        (a SYN, or the session is shed), False if the captured session is not replayed."""
        src, dst, ihl, sport, dport, seq, ack, doff, flags, win, plen = p
        st = self.st
        if self._is_server_side(key, flags):  # first: a capture's other half, the usual case
            st.pkts_server += 1
            return False
        if key in self.filtered:
            if flags & (TH_FIN | TH_RST):
                self.filtered.discard(key)
            st.pkts_ignored += 1
            return False
        if self.shed_keys and hash(k) in self.shed_keys:
            if flags & (TH_FIN | TH_RST):
                self.shed_keys.discard(hash(k))
            st.pkts_ignored += 1
            return None
        if self.failed_keys and hash(k) in self.failed_keys:
            base = self.failed_keys[hash(k)]
            if flags & (TH_SYN | TH_ACK) != TH_SYN or base is None or seq == (base - 1) & M32:
                # the rest of a connection whose session failed: not a new session
                if flags & (TH_FIN | TH_RST):
                    del self.failed_keys[hash(k)]
                st.pkts_ignored += 1
                return None
            del self.failed_keys[hash(k)]  # a new connection on the 4-tuple
        target = self.mapper.target(dst, dport)
        if target is None:
            st.pkts_ignored += 1
            return False
        syn = flags & (TH_SYN | TH_ACK) == TH_SYN
        if not syn and (plen == 0 or self.cfg.only_syn) or not self._sampled(src, sport, now):
            if syn or plen:
                self.filtered.add(key)
                st.outcomes["filtered"] += 1
            st.pkts_ignored += 1
            return False
        why = self.shedding
        if not why and self.cfg.max_sessions and len(self.sessions) >= self.cfg.max_sessions:
            why = "max-sessions"
        if why:
            self._shed(k, flags, "shed", f"overloaded ({why}): new sessions are shed "
                       f"(outcome \"shed\") while it lasts; see tc-session(1), SHEDDING",
                       why, now)
            return None
        s = Session(self.next_sid, k, now, key, copy)
        if syn:
            s.base = (seq + 1) & M32
            s.syn_opts = bytes(data[ihl + 20:ihl + doff])
            s.syn_win = win
            # our TSvals start from the SYN's and never go before it (_tsopt)
            s.ts_last = s.ts_base = (_ts_option(s.syn_opts) or (0, 0))[0]
        else:
            s.base = seq  # mid-stream: offset 0 is the first captured byte
            s.fake = True
        if not self._attach(s, target[0], target[1], now):
            self._shed(k, flags, "pool_exhausted", "every client address:port of the -c "
                       "pool is in use: sessions are not replayed (outcome "
                       "\"pool_exhausted\"); give -c more addresses or lower -n")
            return None
        self.next_sid += 1
        st.sessions += 1
        self.sessions[k] = s
        if len(self.sessions) > st.peak_active:
            st.peak_active = len(self.sessions)
        if syn:
            self._send_syn(s, now)
            return None  # the SYN is consumed
        return s

    def _shed(self, k, flags, outcome, warning, reason=None, now=0):
        """Session k is not replayed: counted once (by ``reason`` too, if given), its
        later packets ignored."""
        self.st.outcomes[outcome] += 1
        self.st.pkts_ignored += 1
        if not flags & (TH_FIN | TH_RST):
            if len(self.shed_keys) >= 1 << 20:  # bounded: forget them all (rare)
                self.shed_keys.clear()
            self.shed_keys.add(hash(k))
        if reason is not None:
            self.shed_reasons[reason] = self.shed_reasons.get(reason, 0) + 1
            if self.on_shed is not None:
                self.on_shed(k, reason, now)
        if (reason or outcome) not in self._warned:
            self._warned.add(reason or outcome)
            if self.warn is not None:
                self.warn("warning: " + warning)

    def count_server_side(self, n: int) -> None:
        """n server->client packets taken out of the input before client_packet()
        (Mapper.server_datagram_test): counted as that would have."""
        self.st.pkts_in += n
        self.st.pkts_server += n

    def _is_server_side(self, key, flags) -> bool:
        """A server->client packet of a capture holding both directions."""
        src, sport, dst, dport = key
        if (dst, dport, src, sport) in self.sessions:
            return True
        if self.mapper.is_service(src, sport):
            return True
        if self.mapper.any_port and not flags & TH_SYN:
            return dport > sport  # mid-stream, direction unknown: the lower port serves
        return False

    def share(self, now) -> float:
        """The percentage of sessions replayed now (-r, ramped up by -g)."""
        pct = self.cfg.sample_pct
        ramp = self.cfg.ramp
        if ramp and self.t0 is not None and now - self.t0 < ramp:
            pct = 1 + (pct - 1) * (now - self.t0) / ramp
        return pct

    def _sampled(self, ip, port, now) -> bool:
        pct = self.share(now)
        return pct >= 100 or sample_share(ip, port) < pct

    def _set_aside(self, s) -> None:
        """The client opened a new connection on s's captured 4-tuple while s is still being
        replayed (we run behind the capture, and the client reuses its ports fast: under
        load, a few hundred ms apart). The online connection is over and its FIN or RST
        is queued in s, so s goes on to its end under a key of its own (its packets are
        all here; the target's replies find it by its own client port, by_target), and the
        new connection gets a session and a client port of its own. (It was cut short as
        unfinished before: a loss at the target that the capture had not made.)"""
        del self.sessions[s.key]
        s.key = (s.key, "set aside", s.sid)
        self.sessions[s.key] = s
        self.st.set_aside += 1

    def _attach(self, s, tip, tport, now) -> bool:
        """Give s a client address:port free towards tip:tport and claim the 4-tuple;
        False if the -c pool has none left."""
        by_target, time_wait = self.by_target, self.time_wait

        # A captured SYN reusing a tuple is what the online client did (the server's
        # TIME_WAIT accepts a newer SYN): keep it. Our own choices avoid TIME_WAIT.
        def taken(addr, port, strict):
            tup = (addr, port, tip, tport)
            return tup in by_target or strict and time_wait.get(tup, 0) > now

        got = self.alloc.allocate(s.ckey[0], s.ckey[1], s.copy, now, taken, s.fake)
        if got is None:
            return False
        cip, cport = got
        tup = (cip, cport, tip, tport)
        if cport != self.alloc.hint(s.ckey[1]):
            self.st.port_remaps += 1
        if len(time_wait) > 50000:
            self.time_wait = {k: v for k, v in time_wait.items() if v > now}
        s.cip, s.tip, s.tport, s.cport = cip, tip, tport, cport
        # constant parts of the checksums (see _out): the pseudo-header and the ports;
        # the IPv4 header's version/ihl, DF, ttl/protocol and addresses
        addrs = int.from_bytes(cip + tip, "big")
        s.psum = addrs + 6 + cport + tport
        s.ipsum = 0x4500 + 0x4000 + 0x4006 + addrs
        self.by_target[tup] = s
        if self.claims is not None:
            self.claims.claim(cip, cport, tip, tport)
        return True

    def _detach(self, s):
        tup = (s.cip, s.cport, s.tip, s.tport)
        if self.by_target.get(tup) is s:
            del self.by_target[tup]
            self.alloc.release(s.cip, s.cport, (s.ckey[0], s.ckey[1], s.copy), self.now)
            if self.claims is not None:
                self.claims.release(*tup)

    def _client_segment(self, s, seq, ack, flags, payload, now, due):
        """Queue captured data/FIN/RST in sequence order, trimming duplicates (due: see
        client_packet)."""
        if s.state == DONE:
            return
        if s.fin_off is not None or s.client_rst:
            if payload:
                self.st.client_dups += 1
            return  # nothing after the client's FIN/RST
        if flags & TH_RST:
            s.client_rst = True
            s.queue.append(Seg(s.exp, b"", TH_RST, ack if flags & TH_ACK else None))
            self._push(s, now)
            return
        went_duplex = False
        if flags & TH_ACK and (s.max_cack is None or 0 < (ack - s.max_cack) & M32 < 0x80000000):
            # (a later ack: _signed(ack - max_cack) > 0, inline): the server spoke
            if s.max_cack is None:  # the first ack: the handshake's, when a SYN was seen
                gap = self.cfg.push_gap
                s.push_gap = gap + 2 * (now - s.created) if gap and not s.fake else gap
                if not s.fake:
                    s.hs_t = due
            elif s.duplex != DUPLEX and (ack - s.max_cack) & M32 != 1:
                went_duplex = self._server_spoke(s, now)
            s.max_cack = ack
        cack = ack if flags & TH_ACK else s.last_cack
        if not payload and not flags & TH_FIN:
            # a pure ACK: never forwarded; before any data it tells the online server's
            # ISN, which lets us spot greetings (server speaks first)
            if s.last_cack is None and not s.queue and s.exp == 0 and flags & TH_ACK:
                s.last_cack = ack
            elif went_duplex and s.queue:
                self._push(s, now)  # what the gate held goes now
            return
        off = s.exp + ((seq - s.base - s.exp + 0x80000000) & M32) - 0x80000000  # _signed()
        if payload and s.duplex != DUPLEX and off + len(payload) > s.exp:
            self._client_spoke(s, payload, now)  # (new data, not a retransmission)
        if off > s.exp:
            self._hold_gap(s, off, payload, flags, cack, now, due)
            return
        self._append(s, off, payload, flags, cack, due)
        if s.ooo is not None or s.gap_since is not None:  # else _fill_from_ooo is a no-op
            self._fill_from_ooo(s)
        self._push(s, now)

    def _server_spoke(self, s, now) -> bool:
        """The client's ack advanced (the session not duplex yet): True if it turns duplex
        now (the module docstring's rule). One unprompted advance is not enough: the tail
        of a response acknowledged by a delayed ACK (up to 200 ms later) looks the same."""
        if s.duplex == UPGRADE_ASKED and s.cli_spoke:
            s.duplex = UPGRADE_ANSWERED  # the data after the answer waits for the target's
        if s.cli_spoke:
            s.pushes = 0  # a response (or its beginning)
        elif s.srv_t is not None and s.push_gap and now - s.srv_t > s.push_gap:
            s.pushes += 1
            if s.pushes >= 2:
                return self._go_duplex(s)
        s.srv_t = now
        s.cli_spoke = False
        return False

    def _client_spoke(self, s, payload, now):
        """New client data (the session not duplex yet): the client speaking again with no
        new server bytes since its last data, more than push_gap after it, did not wait for
        the server (duplex); an HTTP Upgrade request is noted."""
        if s.cli_spoke and s.push_gap and now - s.cli_t > s.push_gap:
            self._go_duplex(s)
            return
        s.cli_spoke = True
        s.cli_t = now
        if s.duplex != GATED or not s.push_gap:
            return
        if payload.startswith(b"GET ") and b"pgrade:" in payload \
                and b"\r\nupgrade:" in payload[:8192].lower():
            s.duplex = UPGRADE_ASKED
        elif payload.startswith(b"*"):
            parts = payload[:48].split(b"\r\n", 3)  # *N, $len, the command's name, ...
            if len(parts) > 2 and parts[2] in _SUBSCRIBE_COMMANDS:
                s.duplex = UPGRADE_ASKED  # a redis client turning into a subscriber

    def _go_duplex(self, s) -> bool:
        s.duplex = DUPLEX
        self.st.duplex += 1
        return True

    def _append(self, s, off, payload, flags, cack, due):
        end = off + len(payload)
        if end < s.exp or end == s.exp and not flags & TH_FIN:
            self.st.client_dups += 1
            return
        if off < s.exp:
            self.st.client_trimmed += 1
            payload = payload[s.exp - off:]
            off = s.exp
        s.queue.append(Seg(off, payload, flags & (TH_FIN | TH_PSH), cack, due if payload else None))
        s.exp = end
        if flags & TH_FIN:
            s.fin_off = end

    def _hold_gap(self, s, off, payload, flags, cack, now, due):
        if s.ooo is None:
            s.ooo = []
        s.ooo.append((off, payload, flags, cack, due))
        s.ooo.sort(key=lambda x: x[0])
        if s.gap_since is None:
            s.gap_since = now
            self._arm(s)

    def _fill_from_ooo(self, s):
        ooo = s.ooo
        while ooo and ooo[0][0] <= s.exp and s.fin_off is None:
            self._append(s, *ooo.pop(0))
        if not ooo:
            s.ooo = None
            s.gap_since = None

    # == sending ========================================================================
    def _out(self, s, seq, ack, flags, payload=b"", options=b"", window=WINDOW):
        """Build one datagram from s's addresses (checksums computed) and emit it."""
        s.ip_id = ip_id = (s.ip_id + 1) & 0xFFFF
        seq &= M32
        ack &= M32
        olen = len(options)
        if olen & 3:
            options += b"\1" * (4 - (olen & 3))
            olen = len(options)
        tl = 20 + olen + len(payload)
        doff_flags = (20 + olen) << 10 | flags
        # the TCP checksum (see _OUT4): pseudo-header and ports, length, header, options
        # (a multiple of 4 bytes), payload (an odd one padded with a zero byte)
        c = s.psum + tl + seq + ack + doff_flags + window
        if olen:
            c += int.from_bytes(options, "big")
        if payload:
            c += int.from_bytes(payload, "big") << ((len(payload) & 1) << 3)
        if len(s.cip) == 4:
            pkt = _OUT4.pack(0x45, 0, 20 + tl, ip_id, 0x4000, 64, 6,
                             -(s.ipsum + 20 + tl + ip_id) % 0xFFFF, s.cip, s.tip,
                             s.cport, s.tport, seq, ack, doff_flags >> 8, flags, window,
                             -c % 0xFFFF, 0)
        else:
            pkt = _OUT6.pack(0x60000000, tl, 6, 64, s.cip, s.tip, s.cport, s.tport, seq, ack,
                             doff_flags >> 8, flags, window, -c % 0xFFFF, 0)
        if olen:
            pkt += options
        if payload:
            pkt += payload
        st = self.st
        st.pkts_out += 1
        st.bytes_out += len(pkt)
        self.emit(pkt, s.sid, self.now)

    def _tsopt(self, s, now):
        if not s.ts_ok:
            return b""
        v = (s.ts_base + (now - s.ts_t0) // MS) & M32
        if _signed(v - s.ts_last) < 0:
            v = s.ts_last
        s.ts_last = v
        return _TSOPT.pack(1, 1, 8, 10, v, s.ts_recent)

    def _ack_no(self, s):
        return s.t_base + s.rcv_nxt + s.t_fin

    def _seq(self, s, off):
        return s.base + off

    def _send_syn(self, s, now, retransmit=False):
        if s.fake:
            opts = _MSS_OPT.pack(2, 4, self.cfg.fake_mss)
            win = WINDOW
        else:
            opts, win = s.syn_opts, s.syn_win
        if not retransmit:
            s.state = SYN_SENT
            s.syn_t0 = now
            s.rto = self.cfg.rto_init
            if s.fake:
                self.st.fake_syn += 1
            self.st.syn_sent += 1
        else:
            self.st.syn_retransmits += 1
            self.st.retransmits += 1
        self._out(s, self._seq(s, s.syn_off), 0, TH_SYN, b"", opts, win)
        s.rto_at = now + s.rto
        self._arm(s)

    def _send_ack(self, s, now):
        self.st.acks_sent += 1
        s.ack_pending = 0
        s.delack_at = 0
        # _seq() and _ack_no() inline (hot path)
        self._out(s, s.base + s.snd_nxt, s.t_base + s.rcv_nxt + s.t_fin, TH_ACK, b"",
                  self._tsopt(s, now) if s.ts_ok else b"")

    def _send_rst(self, s):
        self._out(s, self._seq(s, s.snd_nxt), self._ack_no(s), TH_RST | TH_ACK)

    def _send_segment(self, s, off, data, flags, now, retransmit=False):
        """One data (and/or FIN) segment at client offset off."""
        self._out(s, s.base + off, s.t_base + s.rcv_nxt + s.t_fin, flags | TH_ACK, data,
                  self._tsopt(s, now) if s.ts_ok else b"")  # _seq(), _ack_no() inline
        s.ack_pending = 0
        s.delack_at = 0
        end = off + len(data) + (1 if flags & TH_FIN else 0)
        if not retransmit:
            if end > s.snd_nxt:
                s.unacked += data
                s.snd_nxt = end
            if s.rtt_off is None:
                s.rtt_off, s.rtt_t = end, now
        if not s.rto_at:
            s.rto_at = now + s.rto

    def _push(self, s, now, arm=True):
        """Send what may be sent now: the heart of request/response gating. arm=False:
        the caller arms s's timer itself when the event is over."""
        if s.state != ESTAB:
            if s.state == NEW:
                if s.queue:
                    self._send_syn(s, now)
            elif s.state == CLOSED:
                if _queued_data(s.queue):
                    self._reconnect(s, now)
            return
        q = s.queue
        if s.t_fin and q and q[0].data and not s.fin_sent:
            # the target closed before the client's remaining data went out
            self._reconnect(s, now)
            return
        no_wait = self.cfg.no_wait
        sent_any = False
        while q:
            seg = q[0]
            if not seg.data and s.snd_una < s.snd_nxt and not no_wait:
                break  # a FIN/RST goes once every byte before it is acknowledged
            if not self._may_release(s, seg, now):
                break
            if seg.flags & TH_RST:
                self._send_rst(s)
                q.clear()
                self._finish(s, "reconnected" if s.reconnects else "completed", now,
                             rst=False)
                return
            if not seg.data:  # a bare FIN
                self._send_segment(s, seg.off, b"", TH_FIN, now)
                s.fin_sent = True
                q.pop(0)
                sent_any = True
                continue
            avail = s.t_wnd - (s.snd_nxt - s.snd_una)
            if avail <= 0:
                self.st.window_waits += 1
                if s.snd_una == s.snd_nxt and not s.rto_at:
                    s.rto_at = now + s.rto  # persist timer: probe the zero window
                    sent_any = True  # (so that it is armed below)
                break
            if seg.due is not None:
                self._note_late(seg, now)
            n = min(len(seg.data), avail, s.t_mss - (12 if s.ts_ok else 0))
            last = n == len(seg.data)
            self._send_segment(s, seg.off, seg.data[:n], seg.flags & TH_PSH if last else 0,
                               now)
            s.req_sent = s.group_data = sent_any = True
            if not last:
                seg.data = seg.data[n:]
                seg.off += n
            elif seg.flags & TH_FIN:
                # data+FIN captured together: the FIN follows as a bare FIN, gated
                seg.off += n
                seg.data = b""
                seg.flags = TH_FIN
            else:
                q.pop(0)
        if arm and (sent_any or s.gate_at):
            self._arm(s)

    def _note_late(self, seg, now):
        """seg's data goes out for the first time: count how late (Engine.late)."""
        late = now - seg.due
        seg.due = None
        self.late_sum += late
        i = 0
        for bound in LATE_BOUNDS:
            if late <= bound:
                break
            i += 1
        self.late[i] += 1

    def _may_release(self, s, seg, now) -> bool:
        """Gating: may the head of the queue go now? Not before its recorded offset from the
        accept (_before_offset), and then, unless the session is duplex, when the gate says
        so: the later of the two, never their sum."""
        if seg.due is not None and now < seg.due + s.est_lag:  # _before_offset(), inline
            s.gate_at = seg.due + s.est_lag
            return False
        if s.duplex == DUPLEX:
            # sent without waiting for the server, at its recorded offset (a new group for
            # _response_missing's bookkeeping)
            s.gate_at = 0
            if seg.cack is not None and seg.cack != s.last_cack:
                self._new_group(s, seg, now)
            return True
        if seg.cack == s.last_cack and (seg.data or not s.group_data):
            return True  # the same group (or no ack known at all): the usual case
        if self.cfg.no_wait:
            s.last_cack = seg.cack
            return True
        bare = not seg.data
        new_group = seg.cack is not None and s.last_cack is not None and \
            seg.cack != s.last_cack and _signed(seg.cack - s.last_cack) > 0
        if not new_group and not (bare and s.group_data):
            if s.last_cack is None:
                s.last_cack = seg.cack
            return True
        expected = _signed(seg.cack - s.last_cack) if new_group else None
        if s.duplex == UPGRADE_ANSWERED and new_group and s.rcv_nxt + s.t_fin > s.mark:
            # the target answered the Upgrade (its first bytes: the 101): the rest of the
            # online advance may be pushes, which the target's need not match (the data
            # is past its offset from the accept, checked above)
            reason = "gate_bytes"
        else:
            reason = self._response_complete(s, expected, now)
        if reason is None:
            return False
        setattr(self.st, reason, getattr(self.st, reason) + 1)
        s.gate_at = 0
        if s.duplex == UPGRADE_ANSWERED:
            self._go_duplex(s)  # the target answered the Upgrade too
        if new_group:
            self._new_group(s, seg, now)
        return True

    def _new_group(self, s, seg, now):
        """seg, whose captured ack advanced, is released: the target's answer to it counts
        from here."""
        s.last_cack = seg.cack
        s.mark = s.rcv_nxt + s.t_fin
        s.group_t = now
        s.group_data = False

    def _before_offset(self, s, seg, now) -> bool:
        """True (s's timer set) while client data is before its recorded offset from the
        connection's accept: when it was due, plus how much later the target accepted our
        connection than the online server accepted the captured one (the SYN-ACK's way
        back through the feedback)."""
        if seg.due is not None and now < seg.due + s.est_lag:
            s.gate_at = seg.due + s.est_lag
            return True
        return False

    def _response_complete(self, s, expected, now):
        """The reason the target's response counts as complete, or None (timer armed)."""
        got = s.rcv_nxt + s.t_fin - s.mark
        if expected and got >= expected:
            return "gate_bytes"
        if s.t_fin:
            return "gate_closed"
        cfg = self.cfg
        if got > 0:
            when = max(s.last_data_rx, s.group_t) + cfg.quiet
            reason = "gate_quiet"
        elif s.snd_una < s.snd_nxt:
            s.gate_at = 0  # the target has not even got the request: acks re-check
            return None
        else:
            when = max(s.last_rx, s.group_t) + cfg.gate_timeout
            reason = "gate_timeout"
        if now >= when:
            return reason
        s.gate_at = when  # (armed by _push, or by its caller at the end of the event)
        return None

    # == feedback =======================================================================
    def feedback_packet(self, data, now: int, orig_len=None) -> None:
        self.now = now
        st = self.st
        st.fb_in += 1
        p = parse_tcp_fast(data, orig_len)
        if p is None:
            st.fb_unmatched += 1
            return
        src, dst, ihl, sport, dport, seq, ack, doff, flags, win, plen = p
        s = self.by_target.get((dst, dport, src, sport))
        if s is None or s.state in (NEW, DONE):
            st.fb_unmatched += 1
            return
        if s.state == SYN_SENT:
            self._fb_syn_sent(s, seq, ack, flags, win, bytes(data[ihl + 20:ihl + doff]), now)
            return
        if s.state == CLOSED:
            if not flags & TH_RST:
                self._out(s, ack, 0, TH_RST)  # a straggler of the old connection
            return
        if flags & TH_RST:
            self._target_reset(s, now)
            return
        s.last_rx = now
        if flags & TH_SYN:
            if flags & TH_ACK:
                self._send_ack(s, now)  # our handshake ACK was lost
            return
        if s.ts_ok and doff > 20:
            ts = _ts_option(bytes(data[ihl + 20:ihl + doff]))
            if ts:
                s.ts_recent = ts[0]
        self._fb_ack(s, ack, win, plen, flags, now)
        if plen or flags & TH_FIN:
            self._fb_data(s, seq, plen, flags, now)
        if s.state == ESTAB:
            if s.queue:
                self._push(s, now, arm=False)  # (armed below)
            if s.fin_sent:
                self._check_closed(s, now)
        self._arm(s)

    def _fb_syn_sent(self, s, seq, ack, flags, win, opts, now):
        syn_ack = (self._seq(s, s.syn_off) + 1) & M32
        if flags & TH_RST:
            if flags & TH_ACK and ack == syn_ack:
                self._finish(s, "reset_by_target", now, rst=False)  # refused
            return
        if flags & (TH_SYN | TH_ACK) != TH_SYN | TH_ACK or ack != syn_ack:
            # e.g. a challenge ACK from an old connection still on this 4-tuple
            self._out(s, ack, 0, TH_RST)
            return
        s.state = ESTAB
        if not s.reconnects and now > s.hs_t:
            s.est_lag = now - s.hs_t
        s.t_base = (seq + 1) & M32
        s.last_rx = now
        o = _options(opts)
        s.t_mss = o.get("mss", 536)
        if "wscale" in o or "ts" in o:  # what the SYN offered matters
            mine = _options(s.syn_opts) if s.syn_opts and not s.fake else {}
            if "wscale" in o and "wscale" in mine:
                s.t_wscale = min(o["wscale"], 14)
            if "ts" in o and "ts" in mine:
                s.ts_ok = True
                s.ts_recent = o["ts"][0]
        s.t_wnd = win  # never scaled in a SYN-ACK
        if s.rto == self.cfg.rto_init:  # Karn: not after a SYN retransmission
            self._rtt_sample(s, now - s.syn_t0)
        s.rto_at = 0
        s.mark = 0
        s.group_t = now
        self._send_ack(s, now)
        self._push(s, now, arm=False)
        self._arm(s)

    def _fb_ack(self, s, ack, win, plen, flags, now):
        una = s.snd_una
        a = una + ((ack - s.base - una + 0x80000000) & M32) - 0x80000000  # _signed(), _seq()
        if a > s.snd_nxt:
            a = s.snd_nxt  # acks data we never sent: ignore the excess
        new_wnd = win << s.t_wscale
        if a > una:
            acked = a - una
            del s.unacked[:acked]
            s.snd_una = a
            s.dupacks = 0
            if s.rtt_off is not None and a >= s.rtt_off:
                self._rtt_sample(s, now - s.rtt_t)
                s.rtt_off = None
            if a >= s.snd_nxt:
                s.rto_at = 0
                s.recover = None
            else:
                s.rto_at = now + s.rto
                if s.recover is not None:
                    if a < s.recover:
                        self._retransmit(s, now)  # partial ack: the next hole
                    else:
                        s.recover = None
        elif (a == una and una < s.snd_nxt and not plen and not flags & TH_FIN
              and new_wnd == s.t_wnd):
            s.dupacks += 1
            if s.dupacks == 3 and s.recover is None:
                self.st.fast_retransmits += 1
                s.recover = s.snd_nxt
                self._retransmit(s, now)
        if new_wnd and not s.t_wnd and s.snd_una == s.snd_nxt:
            s.rto_at = 0  # the window opened: stop probing
        s.t_wnd = new_wnd

    def _fb_data(self, s, seq, plen, flags, now):
        off = s.rcv_nxt + ((seq - s.t_base - s.rcv_nxt + 0x80000000) & M32) - 0x80000000
        if plen:
            if off <= s.rcv_nxt < off + plen:
                s.rcv_nxt = off + plen
                s.last_data_rx = now
                s.ack_pending += 1
            else:
                s.ack_pending = 2  # duplicate or out of order: ack at once
        if flags & TH_FIN and off + plen == s.rcv_nxt and not s.t_fin:
            s.t_fin = True
            s.t_fin_first = not s.fin_sent
            s.ack_pending = 2
            if not s.fin_sent:
                s.linger_at = now + self.cfg.linger
        elif not plen:
            s.ack_pending = 2  # a FIN out of order or again (our ACK lost): ack at once
        if s.ack_pending >= 2:
            self._send_ack(s, now)
        elif s.ack_pending and not s.delack_at:
            s.delack_at = now + self.cfg.delack

    def _rtt_sample(self, s, r):
        """RFC 6298 §2."""
        if s.srtt is None:
            s.srtt = r
            s.rttvar = r // 2
        else:
            s.rttvar = (3 * s.rttvar + abs(s.srtt - r)) // 4
            s.srtt = (7 * s.srtt + r) // 8
        cfg = self.cfg
        rto = s.srtt + (4 * s.rttvar if 4 * s.rttvar > MS else MS)
        if rto < cfg.rto_min:
            rto = cfg.rto_min
        s.rto = rto if rto < cfg.rto_max else cfg.rto_max

    def _retransmit(self, s, now):
        self.st.retransmits += 1
        s.rtt_off = None  # Karn: no RTT sample from retransmitted data
        mss = s.t_mss - (12 if s.ts_ok else 0)
        data = bytes(s.unacked[:mss])
        flags = TH_PSH if data else 0
        if s.fin_sent and s.snd_una + len(data) + 1 == s.snd_nxt:
            flags |= TH_FIN
        self._send_segment(s, s.snd_una, data, flags, now, retransmit=True)

    def _target_reset(self, s, now):
        s.state = CLOSED
        if s.queue and _queued_data(s.queue) or s.unacked:
            self._reconnect(s, now, rst=False)
        elif s.fin_sent and s.snd_una == s.snd_nxt or s.t_fin:
            self._finish(s, "reconnected" if s.reconnects else "completed", now, rst=False)
        else:
            self._finish(s, "reset_by_target", now, rst=False)

    def _check_closed(self, s, now):
        """Both FINs exchanged and acknowledged: the connection is over."""
        if not (s.fin_sent and s.t_fin and s.snd_una == s.snd_nxt):
            if s.fin_sent and s.snd_una == s.snd_nxt and not s.linger_at:
                s.linger_at = now + self.cfg.linger  # waiting for the target's FIN
            return
        if s.t_fin_first:
            self.time_wait[(s.cip, s.cport, s.tip, s.tport)] = now + TIME_WAIT
        self._finish(s, "reconnected" if s.reconnects else "completed", now, rst=False)

    def _reconnect(self, s, now, rst=True):
        """The target closed early: carry the rest on a new connection (new port)."""
        if s.reconnects >= self.cfg.max_reconnects:
            self._finish(s, "closed_early", now, rst=rst)
            return
        if rst and s.state == ESTAB:
            self._send_rst(s)
        self.st.reconnections += 1
        s.reconnects += 1
        if s.unacked:  # sent but never acknowledged: resend on the new connection
            s.queue.insert(0, Seg(s.snd_una, bytes(s.unacked), TH_PSH, None))
        s.fin_sent = False
        s.last_cack = None  # the old response is over: release the rest at once
        old = (s.cip, s.cport, s.tip, s.tport)
        self._detach(s)
        self.time_wait[old] = now + TIME_WAIT  # never reuse the old tuple soon
        s.syn_off = s.snd_una - 1
        s._reset_conn(now)
        s.fake = True
        s.state = NEW
        if not self._attach(s, s.tip, s.tport, now):  # the -c pool is full
            self._finish(s, "closed_early", now, rst=False)
            return
        self._send_syn(s, now)

    # == timers =========================================================================
    def _arm(self, s):
        if s.state == DONE:
            return
        cfg = self.cfg
        if s.state == SYN_SENT:
            idle = s.syn_t0 + cfg.connect_timeout
        elif s.queue or s.unacked or not s.req_sent:
            idle = s.last_rx + cfg.idle_timeout
        else:
            idle = s.last_rx + cfg.keepalive_timeout
        w = idle
        t = s.rto_at  # the timers, 0 when not armed (one by one: no tuple per call)
        if t and t < w:
            w = t
        t = s.delack_at
        if t and t < w:
            w = t
        t = s.gate_at
        if t and t < w:
            w = t
        t = s.linger_at
        if t and t < w:
            w = t
        if s.gap_since is not None and s.gap_since + cfg.gap_timeout < w:
            w = s.gap_since + cfg.gap_timeout
        # Only an earlier deadline needs a heap entry: a later one is found when the
        # current entry fires (an early wake-up does nothing and re-arms).
        if s.wake is None or w < s.wake:
            s.wake = w
            h = self.heap
            heapq.heappush(h, (w, next(self._tick), s))
            if len(h) >= self._compact_at:
                self._compact()

    def _compact(self):
        """Drop the heap entries of ended sessions (skipped anyway when they come due):
        otherwise each ended session stays in memory until its last deadline, up to -k
        seconds later, and the heap grows with the session rate."""
        h = self.heap
        h[:] = [e for e in h if e[2].state != DONE]  # in place: on_timer holds h
        heapq.heapify(h)
        self._compact_at = max(2 * len(h), self._compact_min)

    def next_deadline(self):
        h = self.heap
        while h:
            w, _, s = h[0]
            if s.wake == w and s.state != DONE:
                return w
            heapq.heappop(h)
        return None

    def on_timer(self, now: int) -> None:
        self.now = now
        h = self.heap
        while h and h[0][0] <= now:
            w, _, s = heapq.heappop(h)
            if s.wake != w or s.state == DONE:
                continue
            s.wake = None
            self._session_timer(s, now)
            if s.state != DONE:
                self._arm(s)

    def _session_timer(self, s, now):
        cfg = self.cfg
        if s.state == SYN_SENT:
            if now >= s.syn_t0 + cfg.connect_timeout:
                self._out(s, self._seq(s, s.syn_off + 1), 0, TH_RST)
                self._finish(s, "no_synack", now, rst=False)
            elif s.rto_at and now >= s.rto_at:
                s.rto = min(s.rto * 2, cfg.rto_max)
                self._send_syn(s, now, retransmit=True)
            return
        if s.gap_since is not None and now >= s.gap_since + cfg.gap_timeout:
            self._finish(s, "capture_gap", now)
            return
        if s.state == ESTAB:
            if s.rto_at and now >= s.rto_at:
                s.rto_at = 0
                if s.snd_una < s.snd_nxt:
                    self.st.rto_expired += 1
                    s.rto = min(s.rto * 2, cfg.rto_max)
                    s.recover = s.snd_nxt
                    self._retransmit(s, now)
                elif s.queue and s.t_wnd <= s.snd_nxt - s.snd_una:
                    self.st.zero_window_probes += 1
                    self._out(s, self._seq(s, s.snd_nxt - 1), self._ack_no(s), TH_ACK)
                    s.rto = min(s.rto * 2, cfg.rto_max)
                    s.rto_at = now + s.rto
            if s.delack_at and now >= s.delack_at:
                self._send_ack(s, now)
            if s.gate_at and now >= s.gate_at:
                s.gate_at = 0
                self._push(s, now, arm=False)  # (on_timer arms it after)
                if s.state != ESTAB:
                    return
            if s.linger_at and now >= s.linger_at:
                s.linger_at = 0
                if not s.queue or not _queued_data(s.queue):
                    # one side closed long ago and nothing is left: end it
                    self._finish(s, "reconnected" if s.reconnects else "completed", now)
                    return
        if s.state in (ESTAB, CLOSED):
            self._check_idle(s, now)

    def _check_idle(self, s, now):
        cfg = self.cfg
        busy = s.queue or s.unacked or not s.req_sent
        limit = cfg.idle_timeout if busy else cfg.keepalive_timeout
        if now >= s.last_rx + limit:
            self._finish(s, "timed_out" if busy else "completed", now)

    # == ending =========================================================================
    def _end_outcome(self, s) -> str:
        """The outcome of a session cut short (end of input, signal, tuple reuse)."""
        if s.state in (NEW, SYN_SENT):
            # a SYN sent again and still unanswered: no SYN-ACK (the route, the target);
            # one sent less than an RTO before the end: cut short, like one not begun
            retried = s.state == SYN_SENT and s.rto > self.cfg.rto_init
            return "no_synack" if retried else "unfinished"
        if s.ooo:
            return "capture_gap"
        if _queued_data(s.queue) or s.unacked:
            return "unfinished"
        if self._response_missing(s) > 0 and s.rcv_nxt + s.t_fin == s.mark:
            return "unfinished"  # the last request never got a response
        return "reconnected" if s.reconnects else "completed"

    def _response_missing(self, s) -> int:
        """Bytes the online server sent for the last released group (as the client's
        later acks show) that the target has not sent (yet)."""
        if s.max_cack is None or s.last_cack is None or s.duplex == DUPLEX:
            return 0  # (a duplex session's server bytes need not answer anything)
        return _signed(s.max_cack - s.last_cack) - (s.rcv_nxt + s.t_fin - s.mark)

    def _finish(self, s, outcome, now, rst=True):
        if s.state == DONE:
            return
        if rst and s.state == ESTAB and not (s.fin_sent and s.t_fin):
            self._send_rst(s)
        elif rst and s.state == SYN_SENT:  # a SYN-ACK may be on its way: abort it
            self._out(s, self._seq(s, s.syn_off + 1), 0, TH_RST)
        s.state = DONE
        self._detach(s)
        if outcome in FAILURES and s.fin_off is None and not s.client_rst:
            # The captured connection goes on: its later packets are this session's (ignored
            # until its FIN/RST), not a new one's, which would replay a stream's rest from its
            # middle and count the captured session twice.
            if len(self.failed_keys) >= 65536:
                del self.failed_keys[next(iter(self.failed_keys))]  # forget the oldest
            self.failed_keys[hash(s.key)] = s.base
        if self.sessions.get(s.key) is s:
            del self.sessions[s.key]
        self.st.outcomes[outcome] += 1
        if self.on_end is not None:
            self.on_end(s, outcome)
        s.queue.clear()
        s.unacked = bytearray()
        s.ooo = None

    def quiescent(self, now) -> bool:
        """True if no session is waiting for anything that is still likely to come."""
        q = self.cfg.quiet
        for s in self.sessions.values():
            if s.state in (NEW, SYN_SENT) or s.queue or s.unacked:
                return False
            if s.fin_sent and not s.t_fin:
                return False
            if now < s.last_rx + q:
                return False
            if self._response_missing(s) > 0 and (s.rcv_nxt + s.t_fin == s.mark
                                                  or now < s.last_data_rx + q):
                return False  # the last response is still expected
        return True

    def close_all(self, now) -> None:
        """End every session (RST to the target where still open)."""
        self.now = now
        for s in list(self.sessions.values()):
            self._finish(s, self._end_outcome(s), now)
        self.heap.clear()

    # == reporting ======================================================================
    def active(self) -> int:
        return len(self.sessions)

    def stats_line(self) -> str:
        st = self.st
        done = sum(st.outcomes.values()) - sum(st.outcomes[k] for k in NOT_REPLAYED)
        failed = sum(st.outcomes[k] for k in FAILURES)
        shed = st.outcomes["shed"] + st.outcomes["pool_exhausted"]
        return (f"{st.sessions} sessions ({self.active()} active, {done} ended, "
                f"{st.outcomes['completed'] + st.outcomes['reconnected']} completed, "
                f"{failed} failed{f', {shed} shed' if shed else ''}), "
                f"{st.pkts_in} packets in, {st.pkts_out} out, "
                f"{st.retransmits} retransmitted, {st.fb_in} feedback")

    def summary(self) -> str:
        st = self.st
        lines = [self.stats_line(), "outcomes:", *outcome_lines(st.outcomes)]
        lines.append(
            f"packets: {st.pkts_in} in ({st.pkts_ignored} ignored, {st.pkts_server} "
            f"server->client, {st.pkts_truncated} truncated), {st.pkts_out} out, {st.syn_sent} SYN ({st.fake_syn} fake), "
            f"{st.acks_sent} ACKs made")
        lines.append(
            f"retransmissions: {st.retransmits} ({st.rto_expired} timeouts, "
            f"{st.fast_retransmits} fast, {st.syn_retransmits} SYN); "
            f"reconnections: {st.reconnections}; client duplicates: {st.client_dups} "
            f"dropped, {st.client_trimmed} trimmed")
        lines.append(
            f"gating: {st.gate_bytes} by bytes, {st.gate_quiet} after quiet, "
            f"{st.gate_timeout} by timeout, {st.gate_closed} on close, {st.duplex} sessions "
            f"duplex (released on their recorded timing); window waits "
            f"{st.window_waits}, zero-window probes {st.zero_window_probes}")
        lines.append(f"feedback: {st.fb_in} received, {st.fb_unmatched} unmatched")
        lines.append(f"client ports: {st.port_remaps} moved, {self.alloc.early_reuses} reused "
                     f"early; {st.set_aside} sessions went on beside a newer connection on "
                     f"their captured 4-tuple; at most {st.peak_active} sessions live at once")
        return "\n".join(lines)


def outcome_lines(outcomes: dict, hints: dict = OUTCOMES) -> list:
    """The summary's outcome table: one line per outcome seen (and "completed"), failures
    with their hint."""
    return [f"  {k:<16} {outcomes[k]:>9}" + (f"  ({hint})" if hint and outcomes[k] else "")
            for k, hint in hints.items() if outcomes[k] or k == "completed"]
