"""Socket mode (tc-session --socket): each captured session replayed through an ordinary
TCP connection from this host to the target.

``SocketEngine`` is the forged engine (engine.Engine) with another transport: the captured
client packets are taken apart, queued, gated and timed by the very same code (sessions,
-r/-n/-O, request/response gating from the captured acks with --quiet and --gate-timeout,
half-close, reconnection after an early close, timeouts and outcomes); only the edges
differ. Where the forged engine makes a SYN, data segments, ACKs and RSTs and learns the
target's bytes from feedback, this one connects a non-blocking socket, writes the bytes a
gate releases, and reads the target's answer from the socket; the kernel does
segmentation, acknowledgement, windows and retransmission.

The engine's fields keep their meaning, in bytes of the stream: ``rcv_nxt`` counts the
bytes read from the target and ``t_fin`` its end of stream; ``snd_nxt`` the bytes written
(+1 for our FIN) and ``snd_una`` the part the target acknowledged, which the kernel tells
(SIOCOUTQ) when something waits on it; ``unacked`` holds the written bytes not yet
acknowledged (at most a socket send buffer), resent on a new connection as in forged mode.
``rto_at``, the retransmission timer in forged mode, is here the time to look again at the
acknowledged bytes while a gate, a FIN or an RST waits for them.

``SocketStage`` is tc-session's stage with this engine: forged mode's loop
(runner.SessionRunner) runs it, and watches every connection through the engine's one
epoll set. ``run(tool, args)`` wires tc-session --socket.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import termios

from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, endpoint_str, ip_str
from tcpcopylib.session.alloc import stable_hash
from tcpcopylib.session.engine import (_OUT4, _OUT6, CLOSED, DONE, ESTAB, FAILURES, M32,
                                       MS, NEW, OUTCOMES, SYN_SENT, WINDOW, Engine,
                                       outcome_lines)
from tcpcopylib.session.runner import SessionStage

ACK_POLL = 10 * MS      # while something waits for the target's ACK: look again after this
READ_SIZE = 1 << 18     # one recv()
WRITE_MAX = 1 << 20     # bytes of queued segments gathered into one write
READS_PER_EVENT = 8     # recv() calls per readiness event (then the other sessions' turn)
KEEP_SEG = 65000        # payload per kept datagram (an IP datagram holds < 64 KiB)
SIOCOUTQ = termios.TIOCOUTQ  # bytes written and not yet acknowledged (+1 for a FIN)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_LINGER0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST
_INT = struct.Struct("i")
_EV_IN = select.EPOLLIN | select.EPOLLRDHUP
_EV_OUT = select.EPOLLOUT

# the outcomes' hints, as forged mode's (engine.OUTCOMES) where they still hold
HINTS = dict(OUTCOMES)
HINTS.update({
    "reset_by_target": "the target refused (nothing listening?) or reset the connection",
    "no_synack": "never established: the target did not answer the SYN in "
                 "--connect-timeout (address, route, firewall?) or was unreachable",
    "timed_out": "the target went silent (-t/-k), or the kernel gave up retransmitting",
    "pool_exhausted": "not replayed: no local address:port or file descriptor was left "
                      "(give -c more local addresses, raise ulimit -n, or lower -n)",
})
# errno -> outcome of a connection that failed to establish
_CONNECT_OUTCOME = {errno.ECONNREFUSED: "reset_by_target", errno.ECONNRESET: "reset_by_target"}
# errors of socket() or connect() that mean "no resources left here", not "target down"
_NO_RESOURCE = (errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENOMEM,
                errno.EADDRINUSE)


class Conn:
    """The socket of a session's current connection (Session.conn)."""

    __slots__ = ("sock", "fd", "events", "blocked", "abort", "error", "t_syn", "t_est",
                 "reads_done")

    def __init__(self, sock, now):
        self.sock = sock
        self.fd = sock.fileno()
        self.events = 0         # epoll interest registered (0: not registered)
        self.blocked = False    # a write was cut short: wait until writable
        self.abort = False      # close with an RST (SO_LINGER 0)
        self.error = None       # errno that ended it, or None
        self.t_syn = now        # connect() called
        self.t_est = None       # established
        self.reads_done = False  # the target's end of stream was read


class SocketStats:
    """Socket mode's own counters, beside forged mode's (engine.Stats, the same
    --stats-json keys; compiled, it cannot be subclassed)."""

    __slots__ = ("connects", "connect_failures", "bytes_sent", "bytes_received", "ack_polls",
                 "socket_errors")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)
        self.socket_errors = {}  # errno name -> count

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["socket_errors"] = dict(self.socket_errors)
        return d


def _errname(code) -> str:
    return errno.errorcode.get(code, str(code))


class SocketEngine(Engine):
    """The engine with sockets as its transport (see the module's docstring).

    ``ep`` is the epoll object the connections are registered with (the caller polls it
    and hands each event of a connection to ``socket_event``); ``pools`` the -c local
    addresses ({4 or 16: alloc.Pool}) or None (the kernel picks the source address);
    ``keep`` a callback(record) that receives the replayed connections as records (the
    bytes sent as "pkt", the target's answers as "fb": tcpcopy-records(5)), or None;
    ``smap`` a sessmap.SessionMap told what each session does (its "sess" records, written
    by ``end_session``), or None."""

    def __init__(self, mapper, config=None, ep=None, pools=None, keep=None, smap=None):
        super().__init__(mapper, self._no_packet, config)
        self.sst = SocketStats()
        self.ep = ep if ep is not None else select.epoll()
        self.pools = pools
        self.keep = keep
        self.smap = smap
        self.by_fd = {}
        self._rbuf = bytearray(READ_SIZE)
        self._rview = memoryview(self._rbuf)

    @staticmethod
    def _no_packet(data, sid, now):
        raise AssertionError("socket mode makes no packets")  # (see _out)

    # == the engine's edges: connection, sending, closing ==============================
    def _attach(self, s, tip, tport, now) -> bool:
        """A socket for s towards tip:tport, connecting (the SYN leaves now); False if no
        local resource is left (the engine counts the session as pool_exhausted)."""
        if self.time_wait:
            self.time_wait.clear()  # the kernel keeps TIME_WAIT here, not the engine
        fam = socket.AF_INET if len(tip) == 4 else socket.AF_INET6
        sock = local = None
        try:
            # non-blocking from the start (setblocking() would be one more syscall)
            sock = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # bytes at their time
            local = self._local_address(s, len(tip))
            if local is not None:
                if fam == socket.AF_INET:  # the port at connect(): per target, not per address
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((ip_str(local), 0))
            err = sock.connect_ex((ip_str(tip), tport))
        except OSError as e:
            err = e.errno
        if err in _NO_RESOURCE or sock is None:
            self._count_error(err)
            if sock is not None:
                sock.close()
            self._warn_once(err, f"warning: cannot open a connection: {os.strerror(err)} "
                            f"({_errname(err)}); sessions are not replayed meanwhile")
            return False
        conn = Conn(sock, now)
        if err not in (0, errno.EINPROGRESS):
            conn.error = err  # (reported by _send_syn)
        s.conn = conn
        s.tip, s.tport = tip, tport
        # the local port is the kernel's choice, made by connect() (0 if it failed at once)
        try:
            s.cip, s.cport = _packed(sock.getsockname())
        except OSError:
            s.cip, s.cport = local or s.ckey[0], 0
        self.by_fd[conn.fd] = s
        self.sst.connects += 1
        if self.smap is not None:
            self.smap.connecting(s.sid, ip_str(s.cip), s.cport, now)
        return True

    def _local_address(self, s, width):
        """The -c address of s: sticky per captured client address, copies spread."""
        if self.pools is None:
            return None
        pool = self.pools.get(width)
        if pool is None or not pool.size:
            return None
        return pool.addr((stable_hash(s.ckey[0]) + s.copy) % pool.size)

    def _detach(self, s):
        conn = s.conn
        if conn is None or conn.sock is None:
            return
        self.by_fd.pop(conn.fd, None)
        conn.events = 0  # (close() takes the socket out of the epoll set: no epoll_ctl)
        if conn.abort:
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            except OSError:
                pass
            if conn.t_est is not None:
                self._keep_pkt(s, b"", TH_RST | TH_ACK, self.now)
        conn.sock.close()
        conn.sock = None  # (the Conn stays: its error is the session's reason)

    def _send_syn(self, s, now, retransmit=False):
        """The connect() is under way since _attach: wait for it (no SYN retransmission
        here: the kernel's)."""
        s.state = SYN_SENT
        s.syn_t0 = now
        if s.fake:
            self.st.fake_syn += 1
        self.st.syn_sent += 1
        conn = s.conn
        if conn.error is not None:  # connect() failed at once (no route, ...)
            self._connect_failed(s, conn.error, now)
            return
        self._watch(s, _EV_OUT)
        self._arm(s)

    def _out(self, s, seq, ack, flags, payload=b"", options=b"", window=0):
        """No packet is made in socket mode. The engine's only call that can come here is
        the RST of a connect that timed out; closing the socket (_detach) aborts it."""

    def _send_rst(self, s):
        if s.conn is not None:
            s.conn.abort = True  # _detach closes with an RST

    def _push(self, s, now, arm=True):
        """Write what the gates release (engine._may_release, shared with forged mode)."""
        if s.state != ESTAB:
            if s.state == NEW:
                if s.queue:
                    self._send_syn(s, now)
            elif s.state == CLOSED and any(seg.data for seg in s.queue):
                self._reconnect(s, now)
            return
        q = s.queue
        if s.t_fin and q and q[0].data and not s.fin_sent:
            self._sync_acked(s)  # (what the target has is not sent again)
            self._reconnect(s, now)  # the target closed before the client's rest went out
            return
        conn = s.conn
        if q and s.snd_una < s.snd_nxt and (q[0].cack != s.last_cack or not q[0].data):
            self._sync_acked(s)  # a gate may ask whether the target has the request
        no_wait = self.cfg.no_wait
        while q and not conn.blocked:
            seg = q[0]
            if not self._may_release(s, seg, now):
                break
            if seg.flags & TH_RST:
                # the client's RST: not before the target has every byte (it would drop them)
                if s.snd_una < s.snd_nxt and not no_wait:
                    self._sync_acked(s)
                    if s.snd_una < s.snd_nxt:
                        break
                self._send_rst(s)
                q.clear()
                self._finish(s, "reconnected" if s.reconnects else "completed", now,
                             rst=False)
                return
            if not seg.data:  # a bare FIN: after the written bytes, in the kernel's order
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError as e:
                    self._broken(s, e.errno, now)
                    return
                self._keep_pkt(s, b"", TH_FIN | TH_ACK, now)
                s.snd_nxt += 1
                s.fin_sent = True
                q.pop(0)
                continue
            # the head and the data of its group queued behind it: one write
            if seg.due is not None:
                self._note_late(seg, now)
            bufs = [seg.data]
            size = len(seg.data)
            k = 1
            while k < len(q) and size < WRITE_MAX and not q[k - 1].flags & TH_FIN:
                nxt = q[k]
                if not nxt.data or nxt.cack != s.last_cack:  # (_may_release's fast path)
                    break
                if self._before_offset(s, nxt, now):
                    break  # (as _may_release: not before its offset from the accept)
                if nxt.due is not None:
                    self._note_late(nxt, now)
                bufs.append(nxt.data)
                size += len(nxt.data)
                k += 1
            try:
                n = conn.sock.sendmsg(bufs) if k > 1 else conn.sock.send(seg.data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._broken(s, e.errno, now)
                return
            if n:
                self.sst.bytes_sent += n
                s.req_sent = s.group_data = True
                self._written(s, n, now)
            if n < size:
                conn.blocked = True
        if s.state != ESTAB:
            return
        if q and not conn.blocked and not s.gate_at and s.snd_una < s.snd_nxt \
                or s.fin_sent and s.snd_una < s.snd_nxt:
            self._poll_acks(s, now)  # a gate (or the close) waits for the target's ACK
        self._watch(s, (0 if conn.reads_done else _EV_IN) | (_EV_OUT if conn.blocked else 0))
        if arm:
            self._arm(s)

    def _written(self, s, n, now):
        """n bytes of the queue's head segments went to the kernel."""
        if self.smap is not None:
            self.smap.sent(s.sid, s.snd_nxt, s.snd_nxt + n, now)
        q = s.queue
        while n:
            seg = q[0]
            data = seg.data
            m = len(data)
            if n < m:
                self._keep_pkt(s, data[:n], TH_PSH | TH_ACK, now)
                s.unacked += data[:n]
                s.snd_nxt += n
                seg.data = data[n:]
                seg.off += n
                return
            self._keep_pkt(s, data, TH_PSH | TH_ACK, now)
            s.unacked += data
            s.snd_nxt += m
            n -= m
            if seg.flags & TH_FIN:
                seg.off += m
                seg.data = b""
                seg.flags = TH_FIN  # the FIN follows, gated as a bare FIN
                return
            q.pop(0)

    # == events from the socket =========================================================
    def socket_event(self, fd, events, now) -> None:
        """epoll reported events on fd."""
        s = self.by_fd.get(fd)
        if s is None:
            return
        self.now = now
        conn = s.conn
        if s.state == SYN_SENT:
            # a failed connect() shows as EPOLLERR: only then ask why (SO_ERROR)
            err = (conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                   if events & (select.EPOLLERR | select.EPOLLHUP) else 0)
            if err:
                self._connect_failed(s, err, now)
            else:
                self._established(s, now)
            return
        if events & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP):
            self._read(s, now)
            if s.state != ESTAB:
                return
        if events & select.EPOLLOUT:
            conn.blocked = False
        pushed = bool(s.queue or conn.blocked)
        if pushed:
            self._push(s, now, arm=False)  # (it sets the epoll interest)
            if s.state != ESTAB:
                return
        if s.fin_sent:
            self._sync_acked(s)
            self._check_closed(s, now)
            if s.state == DONE:
                return  # (closed: no epoll_ctl for a socket close() takes out)
        if not pushed:
            self._watch(s, 0 if conn.reads_done else _EV_IN)
        self._arm(s)

    def _established(self, s, now):
        conn = s.conn
        conn.t_est = now
        s.state = ESTAB
        if not s.reconnects and now > s.hs_t:
            s.est_lag = now - s.hs_t  # (engine._may_release: duplex data's offset)
        s.last_rx = now
        s.t_base = 1  # the target's bytes count from 1 in kept records (its ISN is 0)
        s.mark = 0
        s.group_t = now  # (s.cip, s.cport: connect() chose them, _attach read them)
        if self.smap is not None:
            self.smap.established(s.sid, now)
        if self.keep is not None:
            self._keep_handshake(s, now)
        self._watch(s, _EV_IN)
        self._push(s, now, arm=False)
        if s.state != DONE:
            self._arm(s)

    def _connect_failed(self, s, err, now):
        s.conn.error = err
        self._count_error(err)
        self.sst.connect_failures += 1
        self._finish(s, _CONNECT_OUTCOME.get(err, "no_synack"), now, rst=False)

    def _read(self, s, now):
        conn = s.conn
        sock, buf, view = conn.sock, self._rbuf, self._rview
        got = 0
        for _ in range(READS_PER_EVENT):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as e:
                self._broken(s, e.errno, now)
                return
            if not n:
                self._target_eof(s, now)
                break
            if self.keep is not None:
                self._keep_fb(s, bytes(view[:n]), TH_PSH | TH_ACK, now)
            s.rcv_nxt += n
            got += n
            if n < READ_SIZE:
                break
        if got:
            s.last_rx = s.last_data_rx = now
            self.sst.bytes_received += got
            if self.smap is not None:
                self.smap.received(s.sid, got)

    def _target_eof(self, s, now):
        """The target's FIN (as engine._fb_data takes it)."""
        s.conn.reads_done = True
        s.last_rx = now
        if s.t_fin:
            return
        self._keep_fb(s, b"", TH_FIN | TH_ACK, now)
        s.t_fin = True
        s.t_fin_first = not s.fin_sent
        if not s.fin_sent:
            s.linger_at = now + self.cfg.linger
        # (the epoll interest without EPOLLIN: socket_event sets it, if still open)

    def _broken(self, s, err, now):
        """The connection failed under us: a reset (forged mode's path for an RST), or the
        kernel gave up (ETIMEDOUT)."""
        self._sync_acked(s)  # (the kernel still counts what the target had acknowledged)
        s.conn.error = err
        self._count_error(err)
        if self.keep is not None and s.conn.t_est is not None:
            self._keep_fb(s, b"", TH_RST, now)
        if err == errno.ETIMEDOUT:
            self._finish(s, "timed_out", now, rst=False)
        else:
            self._target_reset(s, now)

    # == acknowledged bytes =============================================================
    def _sync_acked(self, s):
        """snd_una from the kernel: what it still holds is not acknowledged."""
        conn = s.conn
        if s.snd_una >= s.snd_nxt or conn is None or conn.sock is None:
            return
        try:
            outq = _INT.unpack(fcntl.ioctl(conn.fd, SIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return
        acked = s.snd_nxt - s.snd_una - outq
        if acked > 0:
            del s.unacked[:acked]  # (the FIN is not in unacked: del stops at its end)
            s.snd_una += acked

    def _poll_acks(self, s, now):
        if not s.rto_at:
            s.rto_at = now + ACK_POLL

    def _session_timer(self, s, now):
        if s.state == SYN_SENT and now >= s.syn_t0 + self.cfg.connect_timeout:
            s.conn.error = errno.ETIMEDOUT  # (the engine ends it as no_synack)
        if s.state == ESTAB and s.rto_at and now >= s.rto_at:  # the acknowledgement poll
            s.rto_at = 0
            self.sst.ack_polls += 1
            self._sync_acked(s)
            if s.queue:
                self._push(s, now, arm=False)
            elif s.fin_sent and s.snd_una < s.snd_nxt:
                self._poll_acks(s, now)
            if s.state == ESTAB and s.fin_sent:
                self._check_closed(s, now)
            if s.state != ESTAB:
                return
        super()._session_timer(s, now)

    def _check_idle(self, s, now):
        self._sync_acked(s)
        super()._check_idle(s, now)

    def _end_outcome(self, s):
        self._sync_acked(s)
        return super()._end_outcome(s)

    def quiescent(self, now) -> bool:
        for s in self.sessions.values():
            self._sync_acked(s)
        return super().quiescent(now)

    # == helpers ========================================================================
    def _watch(self, s, events):
        """Set the epoll interest of s's socket."""
        conn = s.conn
        if events == conn.events:
            return
        try:
            if not conn.events:
                self.ep.register(conn.fd, events)
            elif events:
                self.ep.modify(conn.fd, events)
            else:
                self.ep.unregister(conn.fd)
        except OSError:
            return
        conn.events = events

    def _count_error(self, err):
        name = _errname(err)
        self.sst.socket_errors[name] = self.sst.socket_errors.get(name, 0) + 1

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            if self.warn is not None:
                self.warn(message)

    def reason(self, s) -> str:
        """Why session s ended as it did, for people: the socket error or the hint."""
        conn = s.conn
        if conn is not None and conn.error is not None:
            return f"{_errname(conn.error)}: {os.strerror(conn.error)}"
        return ""

    # == kept records (--keep) ==========================================================
    def _keep_handshake(self, s, now):
        t_syn = s.conn.t_syn
        isn = s.base + s.syn_off  # our SYN's number: the captured one (or as forged mode)
        self.keep({"t": "pkt", "ts": t_syn, "sid": s.sid, "data": _datagram(
            s.cip, s.tip, s.cport, s.tport, isn, 0, TH_SYN)})
        synack = _datagram(s.tip, s.cip, s.tport, s.cport, 0, isn + 1, TH_SYN | TH_ACK)
        self.keep({"t": "fb", "ts": now, "sid": s.sid, "data": synack, "len": len(synack)})
        self.keep({"t": "pkt", "ts": now, "sid": s.sid, "data": _datagram(
            s.cip, s.tip, s.cport, s.tport, isn + 1, 1, TH_ACK)})

    def _keep_pkt(self, s, data, flags, now):
        """Bytes (or a FIN/RST) sent to the target, as pkt records."""
        if self.keep is None:
            return
        seq, ack = s.base + s.snd_nxt, s.t_base + s.rcv_nxt + s.t_fin
        for i in range(0, max(len(data), 1), KEEP_SEG):
            chunk = bytes(data[i:i + KEEP_SEG])
            self.keep({"t": "pkt", "ts": now, "sid": s.sid, "data": _datagram(
                s.cip, s.tip, s.cport, s.tport, seq + i, ack, flags, payload=chunk)})

    def _keep_fb(self, s, data, flags, now):
        """Bytes (or a FIN/RST) the target sent, as fb records."""
        if self.keep is None:
            return
        seq, ack = s.t_base + s.rcv_nxt, s.base + s.snd_nxt
        for i in range(0, max(len(data), 1), KEEP_SEG):
            d = _datagram(s.tip, s.cip, s.tport, s.cport, seq + i, ack, flags,
                          payload=data[i:i + KEEP_SEG])
            self.keep({"t": "fb", "ts": now, "sid": s.sid, "data": d, "len": len(d)})

    def end_session(self, s, outcome) -> None:
        """Session s ended: its "sess" record (with the socket error, if one ended it)."""
        if self.smap is not None:
            conn = s.conn
            err = conn.error if conn is not None else None
            self.smap.end(s, outcome, self.now, None if err is None else _errname(err))

    # == reporting ======================================================================
    def stats_line(self) -> str:
        st, sst = self.st, self.sst
        failed = sum(st.outcomes[k] for k in FAILURES)
        return (f"{st.sessions} sessions ({self.active()} active, "
                f"{st.outcomes['completed'] + st.outcomes['reconnected']} completed, "
                f"{failed} failed), {st.pkts_in} packets in, {sst.connects} connections, "
                f"{sst.bytes_sent} bytes sent, {sst.bytes_received} received")

    def summary(self) -> str:
        st, sst = self.st, self.sst
        errs = ", ".join(f"{k} {v}" for k, v in sorted(sst.socket_errors.items())) or "none"
        return "\n".join([
            self.stats_line(), "outcomes:", *outcome_lines(st.outcomes, HINTS),
            f"packets: {st.pkts_in} in ({st.pkts_ignored} ignored, {st.pkts_server} "
            f"server->client, {st.pkts_truncated} truncated)",
            f"connections: {sst.connects} opened ({st.fake_syn} for sessions seen "
            f"mid-stream), {sst.connect_failures} failed to connect; reconnections: "
            f"{st.reconnections}; socket errors: {errs}",
            f"gating: {st.gate_bytes} by bytes, {st.gate_quiet} after quiet, "
            f"{st.gate_timeout} by timeout, {st.gate_closed} on close; acknowledgement "
            f"polls {sst.ack_polls}; client duplicates: {st.client_dups} dropped, "
            f"{st.client_trimmed} trimmed",
            f"at most {st.peak_active} sessions live at once"])


def _datagram(src, dst, sport, dport, seq, ack, flags, payload=b"") -> bytes:
    """A TCP datagram (no options) with its checksums, for the kept records: the engine's
    integer checksum arithmetic (engine._out), linear in C for large payloads."""
    seq &= M32
    ack &= M32
    tl = 20 + len(payload)
    addrs = int.from_bytes(src + dst, "big")
    c = addrs + 6 + sport + dport + tl + seq + ack + (5 << 12 | flags) + WINDOW
    if payload:
        c += int.from_bytes(payload, "big") << ((len(payload) & 1) << 3)
    if len(src) == 4:
        head = _OUT4.pack(0x45, 0, 20 + tl, 0, 0x4000, 64, 6,
                          -(0x4500 + 0x4000 + 0x4006 + addrs + 20 + tl) % 0xFFFF, src, dst,
                          sport, dport, seq, ack, 0x50, flags, WINDOW, -c % 0xFFFF, 0)
    else:
        head = _OUT6.pack(0x60000000, tl, 6, 64, src, dst, sport, dport, seq, ack, 0x50, flags,
                          WINDOW, -c % 0xFFFF, 0)
    return head + payload if payload else head


def _packed(sockname) -> tuple:
    host, port = sockname[:2]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.inet_pton(fam, host), port


# == tc-session --socket ================================================================

class SocketStage(SessionStage):
    """tc-session's stage with a SocketEngine: the runner (runner.SessionRunner) watches
    the connections through the engine's epoll set and hands their events here."""

    def fileno(self) -> int:
        return self.engine.ep.fileno()

    def on_ready(self, now: int) -> None:
        socket_event = self.engine.socket_event
        for fd, events in self.engine.ep.poll(0):
            socket_event(fd, events, now)


# forged-mode options that have no meaning here: (dest, default, option)
_FORGED_ONLY = (("feedback", None, "--feedback"), ("key", None, "--key"),
                ("no_feedback", False, "--no-feedback"), ("instance", None, "-f"),
                ("batch", 1, "-B"), ("mss", 1460, "-D/--mss"))


def _raise_fd_limit():
    """Thousands of connections need as many descriptors: the soft limit up to the hard."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else 1 << 20, hard))
        except (ValueError, OSError):
            pass


def socket_engine(args, keep=None, smap=None) -> SocketEngine:
    """A SocketEngine from tc-session's options (forged mode's checks, and those for
    --socket); ``keep`` and ``smap`` as SocketEngine's."""
    from tcpcopylib.errors import UsageError
    from tcpcopylib.session.options import build_engine

    for dest, default, opt in _FORGED_ONLY:
        if getattr(args, dest, default) != default:
            raise UsageError(f"{opt} is for forged mode; --socket connects by itself")
    forged = build_engine(args, None, None)  # the options' checks, mapping, Config
    return SocketEngine(forged.mapper, forged.cfg, None, forged.alloc.pools, keep, smap)


def run(tool, args) -> int:
    """tc-session --socket: read packet records, replay each session through a socket;
    stdout gets the records tc-session does not use and, with --keep, the replayed
    connections; --sessions (or --keep alone: into stdout) the session map (see
    tc-session(1), SOCKET MODE). The loop is forged mode's (runner.SessionRunner), on a
    SocketStage."""
    from tcpcopylib.records import StageWriter, header
    from tcpcopylib.session.options import build_admission
    from tcpcopylib.session.runner import PacketOutput, SessionRunner
    from tcpcopylib.session.sessmap import SessionMap
    from tcpcopylib.session.timing import DueQueue

    writer = StageWriter(tool.stdout_fd, tool.name, bufsize=1 << 62, mode="socket")
    dest = args.sessions or ("-" if args.keep else None)
    smap = (SessionMap.for_option(dest, writer.write, header(tool.name, mode="socket"),
                                  byte_counts=True) if dest else None)
    engine = tool.engine = socket_engine(args, writer.write if args.keep else None, smap)
    _raise_fd_limit()
    engine.warn = tool.warn
    forged_stats = tool.stats_dict
    # --stats-json: forged mode's keys, then socket mode's own
    tool.stats_dict = lambda: {**forged_stats(), **engine.sst.as_dict()}

    def on_end(s, outcome):
        engine.end_session(s, outcome)
        if outcome in FAILURES and args.verbose or args.verbose >= 2:
            why = engine.reason(s) or (HINTS[outcome] if outcome in FAILURES else "")
            local = f" (as {endpoint_str(s.cip, s.cport)})" if s.cport else ""
            tool.warn(f"session {s.sid} {endpoint_str(s.ckey[0], s.ckey[1])}{local} -> "
                      f"{endpoint_str(s.tip, s.tport)}: {outcome}" + (f" ({why})" if why else ""))

    engine.on_end = on_end
    if smap is not None:
        engine.on_shed = smap.engine_on_shed(engine)
    tool.admission = build_admission(args)
    in_fd = tool.open_input(args.file)
    due = DueQueue(asap=args.asap, speed=args.speed, max_gap=args.max_gap, warn=tool.warn)
    runner = SessionRunner(
        SocketStage(engine, due, PacketOutput(writer)), drain=args.drain,
        admission=tool.admission, stats_every=args.stats_every,
        on_stats=tool._print_summary, warn=tool.warn)
    runner.catch_signals()
    try:
        runner.run(in_fd, "<stdin>" if args.file == "-" else args.file)
    finally:
        engine.ep.close()
        if smap is not None:
            smap.close()
    if args.stats:
        tool._print_summary()
        args.stats = False  # Tool.main would print the one-line version too
    return 0
