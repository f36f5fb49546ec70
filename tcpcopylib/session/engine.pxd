# Cython declarations for engine.py, used only when setup.py compiles it (pure-Python
# mode: engine.py itself is compiled unchanged; without a C compiler, or with
# TCPCOPY_PURE=1, engine.py runs as it is and this file plays no part).
#
# The classes become extension types with the same attributes and the hot methods become
# C-callable, so that `s.snd_nxt` is a pointer read instead of an attribute lookup. The
# attributes are Python objects (the arithmetic and the values stay Python's); only those
# that engine.py always sets to one container type (or None) say which, so that Cython
# uses the list/dict/set C API on them (assigning another type would be a TypeError).
# Keep the attribute lists equal to the __slots__ and the `self.x = ...` of engine.py's
# classes: tests/test_build.py checks it (an attribute missing here is an AttributeError in
# the compiled build only). Methods holding a closure or generator expression cannot be
# cpdef (Cython): they stay def.
cimport cython

ctypedef long long i64  # (64 bits: offsets outgrow 2^32 on long streams; times in ns)

cpdef _signed(d)
cpdef bint _queued_data(list queue)
cpdef _ts_option(opts)

@cython.final  # (not subclassed: calls skip the override check)
cdef class Stats:
    # counters: always ints (i64 below: C integers, incremented without a Python int each)
    cdef public i64 pkts_in, pkts_ignored, pkts_truncated, pkts_server, pkts_out, bytes_out
    cdef public i64 sessions, syn_sent, fake_syn, retransmits, rto_expired, fast_retransmits
    cdef public i64 syn_retransmits, fb_in, fb_unmatched, acks_sent, reconnections, port_remaps
    cdef public i64 client_dups, client_trimmed, window_waits, zero_window_probes, gate_bytes, gate_quiet
    cdef public i64 gate_timeout, gate_closed, peak_active, duplex, set_aside
    cdef public object outcomes

@cython.final  # (not subclassed: calls skip the override check)
cdef class Seg:
    cdef public object off, data, flags, cack, due

@cython.final  # (not subclassed: calls skip the override check)
cdef class Session:
    cdef public object sid, key, ckey, copy, cip, cport
    cdef public object tip, tport, state, base
    cdef public list ooo
    cdef public list queue
    cdef public object syn_opts, fake
    cdef public bytearray unacked
    cdef public object fin_off, client_rst, gap_since
    cdef public object fin_sent, req_sent, t_fin, ts_ok
    cdef public object t_fin_first, srtt, rtt_off, wake, recover, last_cack
    cdef public object group_data, max_cack, conn, duplex, srv_t, cli_spoke
    # (psum, ipsum: the addresses as one int, 256 bits in IPv6)
    cdef public object psum, ipsum
    # always ints (never None nor a bool): C integers. Offsets and sequence numbers
    # (client and target), window, MSS, timestamps, counters; times in ns, 0 when not
    # armed
    cdef public i64 created, syn_off, syn_win, exp, snd_una, snd_nxt, ip_id
    cdef public i64 t_base, rcv_nxt, t_wnd, t_wscale, t_mss, ts_recent, ts_base, ts_t0, ts_last
    cdef public i64 ack_pending, rttvar, rto, rtt_t, rto_at, delack_at, gate_at, linger_at
    cdef public i64 syn_t0, dupacks, last_rx, last_data_rx, mark, group_t, reconnects
    cdef public i64 cli_t, pushes, push_gap, hs_t, est_lag
    cpdef _reset_conn(self, i64 now)

cdef class Engine:
    cdef public Stats st
    cdef public dict sessions
    cdef public object mapper, emit, cfg, claims, alloc
    cdef public dict by_target
    cdef public dict time_wait
    cdef public set filtered
    cdef public set shed_keys
    cdef public dict failed_keys
    cdef public object shedding, t0, on_shed
    cdef public dict shed_reasons
    cdef public list heap
    cdef public object warn, _warned, _tick, _compact_min, _compact_at
    cdef public object next_sid, on_end
    # now: ns, an int, as every method's now below (C integers: no Python int per sum)
    cdef public i64 now
    cdef public list late
    cdef public object late_sum
    cpdef client_packet(self, data, i64 now, due=*)
    cpdef _new_session(self, key, k, copy, data, p, i64 now)
    cpdef _is_server_side(self, key, flags)
    cpdef _detach(self, Session s)
    cpdef _client_segment(self, Session s, seq, ack, flags, payload, i64 now, due)
    cpdef _server_spoke(self, Session s, i64 now)
    cpdef _client_spoke(self, Session s, payload, i64 now)
    cpdef _go_duplex(self, Session s)
    cpdef _append(self, Session s, off, payload, flags, cack, due)
    cpdef _fill_from_ooo(self, Session s)
    @cython.locals(ip_id=i64, olen=Py_ssize_t, tl=Py_ssize_t, doff_flags=i64)
    cpdef _out(self, Session s, seq, ack, flags, payload=*, options=*, window=*)
    cpdef _tsopt(self, Session s, i64 now)
    cpdef _ack_no(self, Session s)
    cpdef _seq(self, Session s, off)
    cpdef _send_syn(self, Session s, i64 now, retransmit=*)
    cpdef _send_ack(self, Session s, i64 now)
    cpdef _send_rst(self, Session s)
    cpdef _send_segment(self, Session s, off, data, flags, i64 now, retransmit=*)
    @cython.locals(seg=Seg, avail=i64, n=i64)
    cpdef _push(self, Session s, i64 now, arm=*)
    cpdef _note_late(self, Seg seg, i64 now)
    cpdef _may_release(self, Session s, Seg seg, i64 now)
    cpdef _new_group(self, Session s, Seg seg, i64 now)
    cpdef _before_offset(self, Session s, Seg seg, i64 now)
    cpdef _response_complete(self, Session s, expected, i64 now)
    cpdef feedback_packet(self, data, i64 now, orig_len=*)
    cpdef _fb_syn_sent(self, Session s, seq, ack, flags, win, opts, i64 now)
    cpdef _fb_ack(self, Session s, ack, win, plen, flags, i64 now)
    cpdef _fb_data(self, Session s, seq, plen, flags, i64 now)
    cpdef _rtt_sample(self, Session s, r)
    cpdef _retransmit(self, Session s, i64 now)
    cpdef _target_reset(self, Session s, i64 now)
    cpdef _check_closed(self, Session s, i64 now)
    cpdef _reconnect(self, Session s, i64 now, rst=*)
    cpdef _arm(self, Session s)
    @cython.locals(s=Session)
    cpdef next_deadline(self)
    @cython.locals(s=Session)
    cpdef on_timer(self, i64 now)
    cpdef _session_timer(self, Session s, i64 now)
    cpdef _check_idle(self, Session s, i64 now)
    cpdef _response_missing(self, Session s)
    cpdef _finish(self, Session s, outcome, i64 now, rst=*)
