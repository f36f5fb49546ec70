#!/usr/bin/env python3
"""Mutation testing of chosen functions: does the quick unit suite notice a wrong line?

Not part of CI; run it on demand (issue 20's safety net)::

    python3 bench/mutate.py                      # every module below, ~1 test run per mutant
    python3 bench/mutate.py --module records --module feedback
    python3 bench/mutate.py --module pacing --function 'Pacer.plan' --max-mutants 20
    python3 bench/mutate.py --module capture --tests 'tests/test_capture.py -k split'
    python3 bench/mutate.py --module engine --list          # show the mutants, run nothing
    python3 bench/mutate.py --jobs 2 --json /tmp/mut.json   # two copies in parallel
    python3 bench/mutate.py --rerun /tmp/mut.json           # only that run's survivors

How: the checkout's tcpcopylib/, bin/ and tests/ (and pyproject.toml) are copied to a
temporary directory (one copy per job). For each mutant, ONE change is made to the AST of
one chosen function, the function's source lines in the copy are replaced by the mutated
function (ast.unparse, re-indented; the rest of the file is untouched) and the module's
quick tests run with ``python3 -m pytest -x`` in the copy (PYTHONPATH = the copy; tests/tc.py
and bin/_tc find the copy relative to themselves, so tools run as subprocesses use the
mutant too). A failing run kills the mutant; a passing one lets it survive; a run longer
than the timeout (default: 3 x the unmutated run + 10 s) is counted as timed out. Before
the mutants, each module's tests run once on the copy with every chosen function replaced
by its unparsed (unmutated) form, which must pass.

Mutations (see Mutator): arithmetic/bitwise operator swaps (+ -, * //, / *, << >>, & |),
removing a mask or modulus (``x & 0xFFFFFFFF``, ``x % 2**32`` -> ``x``), removing one side
of an ``|`` (a flag OR) or ``~``/unary minus, comparison swaps (< <=, > >=, == !=, is, in),
integer constant +1, True <-> False, ``and`` <-> ``or``, negating an if/while/ternary
condition, removing a ``not``, min <-> max, augmented-assignment operator swaps, and
dropping a statement (an augmented assignment, an assignment to an attribute or item, a
call statement).

Every test file a module's list names must exist (a missing one is an error, not a
silent skip that would let mutants through). On a loaded 2-core machine a
mutant takes 1-5 s (records, feedback, pacing, capture: about 40 min in all with --jobs 1);
--rerun JSON after adding tests takes minutes.

Mutants known to be equivalent (no observable difference: e.g. a fast path that only
declines and lets the general decoder answer the same) are listed in EQUIVALENT with the
reason and are not run; ``--all`` runs them too.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import fnmatch
import json
import os
import queue
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
          "-m", "not netns", "--no-header", "-o", "addopts="]

# the byte-at-a-time chunkings take 5 of test_records_fast's 9 s; the 7-byte ones stay
_NOT_STEP_1 = "".join(
    f" --deselect tests/test_records_fast.py::{t}[1]"
    for t in ("test_stream_parser_any_chunking",
              "test_pkt_mode_gives_ts_data_pairs_for_packets_and_records_for_the_rest"))

# module name -> list of (file, function patterns (qualnames, fnmatch), test arguments).
TARGETS: dict[str, list[tuple[str, list[str], str]]] = {
    "engine": [
        ("tcpcopylib/session/engine.py",
         ["_signed", "Engine._client_segment", "Engine._append", "Engine._hold_gap",
          "Engine._fill_from_ooo", "Engine._out", "Engine._tsopt", "Engine._ack_no",
          "Engine._seq", "Engine._send_syn", "Engine._send_segment", "Engine._push",
          "Engine._may_release", "Engine._response_complete", "Engine._fb_syn_sent",
          "Engine._fb_ack", "Engine._fb_data", "Engine._retransmit", "Engine._response_missing"],
         "tests/test_session_engine.py tests/test_session_shaping.py tests/test_session_fast.py"),
    ],
    # issue 20's aim: the engine's sequence arithmetic, gate and ack/retransmit logic only
    # (no packet building: _out, _send_syn; no out-of-order queue: _hold_gap, _fill_from_ooo)
    "engine-seq": [
        ("tcpcopylib/session/engine.py",
         ["_signed", "Engine._client_segment", "Engine._append", "Engine._seq",
          "Engine._ack_no", "Engine._tsopt", "Engine._send_segment", "Engine._push",
          "Engine._may_release", "Engine._response_complete", "Engine._fb_syn_sent",
          "Engine._fb_ack", "Engine._fb_data", "Engine._retransmit",
          "Engine._response_missing"],
         "tests/test_session_engine.py tests/test_session_shaping.py tests/test_session_fast.py"),
    ],
    "records": [
        ("tcpcopylib/wire.py",
         ["cbor_head", "encode_uint", "encode_text", "_general_pkt", "_capture_encoder",
          "encode_pkt_sid", "encode_fb", "scan_record", "record_of", "fast_record",
          "replace_ts", "is_batch", "batch_structs", "encode_pkts", "PendingBatch.*",
          "_bytes_head", "scan_batch", "_column", "batch_stamps", "batch_adds_up", "_split",
          "batch_columns", "pkt_records", "batch_records", "batch_packets", "claim_head",
          "claim_entry"],
         "tests/test_wire.py tests/test_records_fast.py tests/test_records.py" + _NOT_STEP_1),
        ("tcpcopylib/records.py", ["encode_section"],
         "tests/test_records_fast.py tests/test_records.py" + _NOT_STEP_1),
        ("tcpcopylib/intercept.py", ["fb_record"],
         "tests/test_records_fast.py tests/test_intercept.py" + _NOT_STEP_1),
    ],
    "pacing": [
        ("tcpcopylib/pacing.py", ["Timeline.*", "Pacer.plan", "Pacer.due", "Pacer.release"],
         "tests/test_pace.py -k 'not real_clock and not reshaped_timeline'"),
        ("tcpcopylib/session/timing.py", ["DueQueue.*"],
         "tests/test_session_engine.py tests/test_session_fast.py "
         "tests/test_pace.py::test_due_queue_push_records_is_push_inlined "
         "tests/test_pace.py::test_due_queue_schedule "
         "tests/test_pace.py::test_keep_ts_keeps_a_reshaped_ts_and_time_zero_is_a_time"),
    ],
    "alloc": [
        ("tcpcopylib/session/alloc.py",
         ["Allocator.allocate", "Allocator._from_space", "Allocator.release", "Allocator._gc",
          "Allocator.hint", "Pool.finish", "Pool.addr"],
         # (the -c pool's parsing and indexing, Pool.*, are tested in test_session_shaping;
         # its CLI exit-code test spends 2 s in subprocesses and tests no Pool arithmetic)
         "tests/test_session_alloc.py tests/test_session_shaping.py tests/test_session_engine.py "
         "-k 'not bad_shaping_values'"),
    ],
    "capture": [
        ("tcpcopylib/capture.py", ["split_segment"],
         "tests/test_capture_split.py tests/test_split_segment_edges.py tests/test_capture.py "
         "-k 'split and not gro_supersegments'"),
    ],
    "packet": [
        ("tcpcopylib/packet.py", ["ip_length", "parse_tcp", "parse_tcp_fast", "flow_bytes"],
         "tests/test_packet.py tests/test_feedback_routing.py"),
    ],
    "link": [
        ("tcpcopylib/link.py", ["_with_ethertype", "_null", "_loop", "ip_span", "bpf_dlt",
                                "_span_ethernet"],
         "tests/test_link.py tests/test_readpcap.py -k 'link or padding or filter'"),
    ],
    "feedback": [
        ("tcpcopylib/feedback.py",
         ["reply_key", "_key_parts", "claim_route_key", "_packed_ip", "_entry_route_key",
          "claim_keys"],
         "tests/test_feedback_routing.py tests/test_intercept.py tests/test_feedback.py "
         "-k 'routing or claim_records or read_replies or two_clients'"),
        ("tcpcopylib/wire.py", ["fb_spans", "fb_ts", "fb_prefix", "scan_claim", "_short_text",
                                "_port"],
         "tests/test_wire.py tests/test_feedback_routing.py tests/test_feedback.py "
         "-k 'fb_ or scan_ or claim or routing or read_replies or two_clients'"),
    ],
}

# (file, function qualname, mutation text) -> why the mutant cannot be told apart; the text
# may end with " @ " and the source line (stripped) where the text alone is ambiguous.
_NARROWED = ("the guard of a hand-made fast path narrowed: the values left out take the "
             "general encoder, which writes the same bytes")
_P, _T, _R, _F, _E = ("tcpcopylib/pacing.py", "tcpcopylib/session/timing.py",
                      "tcpcopylib/wire.py", "tcpcopylib/feedback.py",
                      "tcpcopylib/session/engine.py")
_A = "tcpcopylib/session/alloc.py"
_K = "tcpcopylib/packet.py"
EQUIVALENT: dict[tuple[str, str, str], str] = {
    (_P, "Pacer.plan", "gap > limit -> gap >= limit"):
        "at gap == limit the anchor moves by gap - limit = 0",
    (_P, "Pacer.due", "late > self.max_late_ns -> late >= self.max_late_ns"):
        "at late == max_late_ns the same value is stored",
    (_P, "Timeline.__init__", "self.anchor_ts = 0 -> pass"):
        "anchor_ts is read only once anchor_wall is set, and both are set together",
    (_P, "Timeline.__init__", "0 -> 1 @ self.anchor_ts = 0"):
        "as above: never read before it is set",
    (_T, "DueQueue.due_time", "due < self.last_due -> due <= self.last_due"):
        "at due == last_due the same value is stored",
    (_T, "DueQueue.push_records", "due < last -> due <= last"):
        "at due == last the same value is stored",
    **{(_R, "batch_structs", t): "the bound of a cache of Struct objects: the same structs "
       "either way (only memory differs)"
       for t in ("if len(_BATCH_FMT) > 4096 -> if not len(_BATCH_FMT) > 4096",
                 "len(_BATCH_FMT) > 4096 -> len(_BATCH_FMT) >= 4096", "4096 -> 4097",
                 "_BATCH_FMT.clear() -> pass")},
    **{("tcpcopylib/feedback.py", "_packed_ip", t): "the bound of a cache of packed addresses: "
       "the same addresses either way (only memory differs)"
       for t in ("if len(_PACKED) > 4096 -> if not len(_PACKED) > 4096",
                 "len(_PACKED) > 4096 -> len(_PACKED) >= 4096", "4096 -> 4097",
                 "_PACKED.clear() -> pass", "_PACKED[text] = ip -> pass")},
    (_R, "_short_text", "96 <= ib < 120 -> 96 < ib < 120"):
        "an empty text (0x60) is no address: ValueError either way",
    (_R, "_short_text", "96 -> 97 @ if 0x60 <= ib < 0x78:"): "the same as 96 <= ib -> 96 < ib",
    ("tcpcopylib/capture.py", "split_segment", "total < ihl + 20 -> total <= ihl + 20"):
        "a datagram of headers only (total = ihl + 20) goes back unchanged further on "
        "(mss <= 0: total > mtu)",
    ("tcpcopylib/capture.py", "split_segment", "20 -> 21 @ if total <= mtu or total < ihl + 20:"):
        "as total < ihl + 20 -> <=",
    ("tcpcopylib/capture.py", "split_segment", "hlen > total -> hlen >= total"):
        "hlen == total > mtu means mss < 0, returned unchanged by the same test",
    ("tcpcopylib/intercept.py", "fb_record", "1 -> 2"):
        "the default end -1 -> -2: any end < 0 means the end of the buffer",
    ("tcpcopylib/capture.py", "split_segment",
     "0 -> 1 @ ident = _U16.unpack_from(dgram, 4)[0] if v == 4 else 0"):
        "the IPv6 ident (else 0) is never used (the same text also names [0] -> [1], which "
        "an IndexError kills at once)",
    (_K, "ip_length", "0 -> 1 @ tot = _U16.unpack_from(buf, p + 2)[0] if n >= 4 else 0"):
        "a total length of 1 when the field is not there is below 20: 0 either way (the same "
        "text also names [0] -> [1], which an IndexError kills at once)",
    **{(_K, "flow_bytes", t): "20 bytes hold no ports: the n >= 24, n < ihl + 4 (or n >= 44) "
       "tests refuse them too" for t in ("n < 20 -> n <= 20", "20 -> 21 @ if n < 20:")},
    **{(file, f, f"1 -> 2 @ def {f}(data, off: int = 0, end: int = -1) -> {r} | None:"):
       "the default end -1 -> -2: any end < 0 means the end of the data"
       for file, f, r in ((_F, "reply_key", "tuple"), (_K, "flow_bytes", "bytes"))},
    **{(_K, "flow_bytes", t):
       "the IPv4 key without options is a fast path: the general slice gives the same bytes"
       for t in ("20 -> 21 @ if ihl == 20:  # the usual case: addresses and ports in one piece",
                 "ihl < 20 -> ihl <= 20",
                 "20 -> 21 @ if ihl < 20 or n < ihl + 4:")},
    # fast paths: a guard narrowed sends the values left out to the general encoder
    # (_general_pkt / cbor2.dumps), which writes the same bytes
    **{(_R, f, t): _NARROWED
       for f, t in (("_capture_encoder", "4294967295 -> 4294967296"),
                    ("_capture_encoder", "24 -> 25"),
                    ("encode_pkt_sid", "4294967295 -> 4294967296"),
                    ("encode_pkt_sid", "24 -> 25"), ("encode_pkt_sid", "0 -> 1"),
                    ("encode_fb", "4294967295 -> 4294967296"), ("encode_fb", "24 -> 25"))},
    # -- the engine (tcpcopylib/session/engine.py)
    (_E, "_signed", "d + 2147483648 -> d - 2147483648"):
        "-2**31 = 2**31 (mod 2**32): the same value once masked",
    (_E, "Engine._client_segment",
     "seq - s.base - s.exp + 2147483648 -> seq - s.base - s.exp - 2147483648"):
        "-2**31 = 2**31 (mod 2**32): the same offset once masked (an inlined _signed)",
    **{(_E, "Engine._client_segment", t): "s.ooo and s.gap_since are set together "
       "(_hold_gap) and cleared together (_fill_from_ooo); _finish's s.ooo = None ends the "
       "session, whose packets _client_segment drops first: either both are None or neither"
       for t in ("s.ooo is not None or s.gap_since is not None -> s.ooo is not None and "
                 "s.gap_since is not None", "s.ooo is not None -> s.ooo is None",
                 "s.gap_since is not None -> s.gap_since is None")},
    (_E, "Engine._client_segment",
     "0 < ack - s.max_cack & M32 < 2147483648 -> 0 <= ack - s.max_cack & M32 < 2147483648"):
        "at an equal ack the same value is stored",
    (_E, "Engine._append", "flags & (TH_FIN | TH_PSH) -> flags"):
        "a Seg's flags are only tested for TH_FIN, TH_PSH and TH_RST, and no RST reaches "
        "_append (_client_segment queues an RST itself); what is sent is masked again",
    **{(_E, "Engine._tsopt", t): "v == ts_last: the same value is stored"
       for t in ("_signed(v - s.ts_last) < 0 -> _signed(v - s.ts_last) <= 0",
                 "0 -> 1 @ if _signed(v - s.ts_last) < 0:")},
    (_E, "Engine._tsopt", "s.ts_last = v -> pass"):
        "the clamp never fires: ts_last starts at the SYN's TSval, v is that plus the ms "
        "since, and the engine's clock never goes back (it guards against one that does)",
    (_E, "Engine._send_segment", "end > s.snd_nxt -> end >= s.snd_nxt"):
        "queued data starts at snd_nxt or later, so a first transmission ends at snd_nxt only "
        "when it is empty without FIN, which is never sent (a bare segment is a FIN): it "
        "adds nothing to unacked and leaves snd_nxt as it is",
    **{(_E, "Engine._push", t): "dead branch: state CLOSED lasts only inside _target_reset, "
       "which moves on to NEW (_reconnect) or DONE (_finish) before _push can run"
       for t in ("if any((seg.data for seg in s.queue)) -> if not any((seg.data for seg in "
                 "s.queue))", "self._reconnect(s, now) -> pass")},
    (_E, "Engine._push", "False -> True @ sent_any = False"):
        "an extra _arm(): it adds a heap entry only for a deadline earlier than the one "
        "armed, and each timer tests its own time, so an early wake-up does nothing",
    (_E, "Engine._push", "arm and (sent_any or s.gate_at) -> arm or (sent_any or s.gate_at)"):
        "arm=False callers arm s right after the event (an extra _arm() changes nothing, as "
        "above)",
    (_E, "Engine._push", "q.clear() -> pass"): "_finish() clears the queue next",
    (_E, "Engine._may_release", "seg.data or not s.group_data -> seg.data and (not "
     "s.group_data)"):
        "the fast path's test narrowed: the segments left out have seg.cack == last_cack, "
        "no new group, and the general test below releases them too",
    (_E, "Engine._may_release",
     "_signed(seg.cack - s.last_cack) > 0 -> _signed(seg.cack - s.last_cack) >= 0"):
        "seg.cack != s.last_cack is tested first: the difference is never 0",
    (_E, "Engine._push", "seg.flags = TH_FIN -> pass"):
        "a bare segment goes as a FIN whatever its flags (only TH_RST is tested on it, and "
        "a segment of data and FIN has none)",
    **{(_E, f, t): "a stale gate_at only wakes the session early: the timer clears it and "
       "_push finds what it found when the gate was last tested (nothing changed since), "
       "and _response_complete sets a real deadline whenever one applies"
       for f, t in (("Engine._may_release", "s.gate_at = 0 -> pass"),
                    ("Engine._may_release", "0 -> 1 @ s.gate_at = 0"),
                    ("Engine._response_complete", "s.gate_at = 0 -> pass"))},
    (_E, "Engine._fb_syn_sent", "s.mark = 0 -> pass"):
        "mark is 0 already in SYN_SENT (_reset_conn; a reconnection resets it too)",
    (_E, "Engine._fb_syn_sent", "s.group_t = now -> pass"):
        "group_t only counts through max(last_rx, group_t) or max(last_data_rx, group_t), "
        "and last_rx is set to this same now here (last_data_rx, once data came, later)",
    (_E, "Engine._fb_syn_sent", "False -> True @ self._push(s, now, arm=False)"):
        "an extra _arm() before the one that follows (see Engine._push)",
    (_E, "Engine._fb_ack",
     "ack - s.base - una + 2147483648 -> ack - s.base - una - 2147483648"):
        "-2**31 = 2**31 (mod 2**32): the same offset once masked (an inlined _signed)",
    (_E, "Engine._fb_ack", "a > s.snd_nxt -> a >= s.snd_nxt"):
        "at a == snd_nxt the same value is stored",
    (_E, "Engine._fb_data",
     "seq - s.t_base - s.rcv_nxt + 2147483648 -> seq - s.t_base - s.rcv_nxt - 2147483648"):
        "-2**31 = 2**31 (mod 2**32): the same offset once masked (an inlined _signed)",
    **{(_E, "Engine._fb_data", f"2 -> 3 @ {t}"): "ack_pending is only tested >= 2 (then "
       "reset): 3 acts as 2" for t in (
           "s.ack_pending = 2", "s.ack_pending = 2  # duplicate or out of order: ack at once",
           "s.ack_pending = 2  # a FIN out of order or again (our ACK lost): ack at once")},
    (_E, "Engine._retransmit", "0 -> 1 @ flags = TH_PSH if data else 0"):
        "an empty retransmission is always of a FIN (something is outstanding and unacked "
        "holds every byte of it), which sets TH_FIN (1) just below",
    (_E, "Engine._response_missing", "_signed(s.max_cack - s.last_cack) - (s.rcv_nxt + s.t_fin "
     "- s.mark) -> _signed(s.max_cack - s.last_cack) + (s.rcv_nxt + s.t_fin - s.mark)"):
        "acted on only when the target sent nothing since the mark (_end_outcome and "
        "quiescent test rcv_nxt + t_fin == mark; quiescent's other case, within quiet of the "
        "last data, has already returned by last_rx): the term is 0 then",
    **{(_E, "Engine._may_release", t): "a new group's first segment is data, which sets "
       "group_data once sent and before anything behind it is looked at (unsent, for want "
       "of window, it takes the fast path next time either way), or a bare FIN or RST, "
       "after which nothing is queued"
       for t in ("s.group_data = False -> pass", "False -> True @ s.group_data = False")},
    (_E, "Engine._may_release", "s.group_t = now -> pass"):
        "group_t counts only through max(last_data_rx, group_t) when the target sent data "
        "since the release (so later than it), or max(last_rx, group_t) when all we sent is "
        "acked: the next group is tested only once q[0] is of it, i.e. once this group's "
        "data went (at or after the release) and, there, was acked (later again)",
    (_E, "Engine._fb_data",
     "s.ack_pending and (not s.delack_at) -> s.ack_pending or not s.delack_at"):
        "ack_pending is at least 1 here (a FIN alone sets 2), and 1 only just after going "
        "up from 0, when no delayed ACK is armed (_send_ack and _send_segment zero both): "
        "either test is not s.delack_at",
    (_E, "Engine._fb_syn_sent", "seq + 1 & M32 -> seq + 1"):
        "t_base is only used mod 2**32: in ack numbers (_out masks them) and in _fb_data's "
        "masked offset",
    # -- the allocator (tcpcopylib/session/alloc.py)
    (_A, "Pool.finish",
     "s <= merged[-1][0] + merged[-1][1] -> s < merged[-1][0] + merged[-1][1]"):
        "adjacent ranges kept apart hold the same addresses in the same order",
    (_A, "Pool.finish", "s <= x < s + n -> s <= x <= s + n"):
        "merged ranges neither overlap nor touch: the address just past one is in no range "
        "(not excluded either way), and its split leaves that range whole",
    (_A, "Pool.finish", "p[1] > 0 -> p[1] >= 0"):
        "a range of 0 addresses adds 0 to size, no exclusion falls in it, and addr() takes "
        "the last range with a given start index: the non-empty one after it",
    (_A, "Pool.finish", "self._cum = [] -> pass"):
        "finish() runs once per pool (parse_pool): _cum is still empty",
    (_A, "Pool.addr", "1 -> 2 @ mid = (lo + hi + 1) // 2"):
        "mid stays in (lo, hi]: the search ends at the same range",
    (_A, "Allocator.allocate", "True -> False @ def allocate(self, cip: bytes, cport: int, "
     "copy: int, now: int, taken, fake=True):"):
        "a default every caller overrides (the engine passes s.fake)",
    (_A, "Allocator.allocate",
     "self.live[width] >= pool.size * self.block -> self.live[width] > pool.size * self.block"):
        "a shortcut: at capacity every pair is live and the search finds none either",
    (_A, "Allocator.allocate", "(stable_hash(cip) + copy) % pool.size -> stable_hash(cip) + copy"):
        "the index is taken mod pool.size where it is used, (start + i) % pool.size",
    **{(_A, f, t): "Allocator.live (pairs live per family) feeds only allocate()'s "
       "at-capacity shortcut: without it the search finds no pair either"
       for f, t in (("Allocator._from_space", "self.live[len(addr)] += 1 -> pass"),
                    ("Allocator._from_space",
                     "self.live[len(addr)] += 1 -> self.live[len(addr)] -= 1"),
                    ("Allocator.release", "self.live[len(addr)] -= 1 -> pass"),
                    ("Allocator.release", "1 -> 2 @ self.live[len(addr)] -= 1"),
                    ("Allocator.release",
                     "self.live[len(addr)] -= 1 -> self.live[len(addr)] += 1"))},
    (_A, "Allocator.release", "self._releases += 1 -> self._releases -= 1"):
        "counting down, -4096 % 4096 == 0: the sweep comes every 4096 releases all the same",
    (_R, "scan_record", "5 -> 6"):
        "a map of 6 keys needs a third extra key: only sid and len are taken, no duplicate",
}


# -- mutations ---------------------------------------------------------------------------

_BINOP_SWAPS = {
    ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.FloorDiv], ast.Div: [ast.Mult],
    ast.FloorDiv: [ast.Mult], ast.Mod: [ast.FloorDiv], ast.LShift: [ast.RShift],
    # (| -> ^ is left out: the same wherever the bits are disjoint, as they are in every flag
    # set and byte assembly here (m | n of a CBOR head, b1 << 8 | b2, TH_FIN | TH_PSH))
    ast.RShift: [ast.LShift], ast.BitAnd: [ast.BitOr], ast.BitOr: [ast.BitAnd],
    ast.BitXor: [ast.BitOr], ast.Pow: [ast.Mult],
}
_CMP_SWAPS = {
    ast.Lt: [ast.LtE], ast.LtE: [ast.Lt], ast.Gt: [ast.GtE], ast.GtE: [ast.Gt],
    ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.Is: [ast.IsNot], ast.IsNot: [ast.Is],
    ast.In: [ast.NotIn], ast.NotIn: [ast.In],
}


def _src(node) -> str:
    s = ast.unparse(node).replace("\n", "; ")
    return s if len(s) <= 70 else s[:67] + "..."


@dataclass
class Site:
    """One mutation: the index of a node in the function's ast.walk() order and a kind."""
    index: int
    kind: str
    arg: object = None
    line: int = 0
    text: str = ""


class Mutator:
    """Lists the mutations of a function node and applies one to a (fresh) copy."""

    @staticmethod
    def sites(func) -> list[Site]:
        out = []
        docstrings = {id(d.body[0].value) for d in ast.walk(func)
                      if isinstance(d, (ast.FunctionDef, ast.ClassDef)) and d.body
                      and isinstance(d.body[0], ast.Expr)
                      and isinstance(d.body[0].value, ast.Constant)}
        # annotations are never evaluated (from __future__ import annotations): skip them
        annotations = {id(x) for d in ast.walk(func)
                       for a in ([getattr(d, "returns", None), getattr(d, "annotation", None)])
                       if a is not None for x in ast.walk(a)}
        for i, n in enumerate(ast.walk(func)):
            if id(n) in annotations:
                continue
            line = getattr(n, "lineno", 0)

            def add(kind, arg=None):
                out.append(Site(i, kind, arg, line))
            if isinstance(n, ast.BinOp):
                for new in _BINOP_SWAPS.get(type(n.op), ()):
                    add("binop", new)
                if isinstance(n.op, (ast.BitAnd, ast.Mod)):
                    add("left")  # mask / modulus removal
                if isinstance(n.op, ast.BitOr):
                    add("left")
                    add("right")
            elif isinstance(n, ast.UnaryOp):
                if isinstance(n.op, (ast.Not, ast.Invert, ast.USub)):
                    add("operand")
            elif isinstance(n, ast.Compare):
                for k, op in enumerate(n.ops):
                    for new in _CMP_SWAPS.get(type(op), ()):
                        add("cmp", (k, new))
            elif isinstance(n, ast.Constant) and id(n) not in docstrings:
                if isinstance(n.value, bool):
                    add("const", not n.value)
                elif isinstance(n.value, int):
                    add("const", n.value + 1)  # (one direction: -1 rarely adds a kill)
            elif isinstance(n, ast.BoolOp):
                add("boolop")
            elif isinstance(n, (ast.If, ast.While, ast.IfExp)) and not (
                    # the same as a comparison swap or removing the not
                    isinstance(n.test, ast.Compare) and len(n.test.ops) == 1
                    and type(n.test.ops[0]) in (ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In,
                                                ast.NotIn)
                    or isinstance(n.test, ast.UnaryOp) and isinstance(n.test.op, ast.Not)):
                add("negate")
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) \
                    and n.func.id in ("min", "max"):
                add("minmax")
            if isinstance(n, ast.AugAssign):
                for new in _BINOP_SWAPS.get(type(n.op), ()):
                    add("augop", new)
            if isinstance(n, (ast.FunctionDef, ast.If, ast.For, ast.While, ast.With, ast.Try,
                              ast.ExceptHandler)):
                for fld in ("body", "orelse", "finalbody"):
                    for k, st in enumerate(getattr(n, fld, ()) or ()):
                        if isinstance(st, ast.AugAssign) or \
                                isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) or \
                                isinstance(st, ast.Assign) and all(
                                    isinstance(t, (ast.Attribute, ast.Subscript))
                                    for t in st.targets):
                            out.append(Site(i, "drop", (fld, k), st.lineno))
        for s in out:
            s.text = Mutator.describe(func, s)
        out.sort(key=lambda s: s.line)
        return out

    @staticmethod
    def apply(func, site: Site):
        """Apply site to func (in place); returns (old node, new node) for the text."""
        n = list(ast.walk(func))[site.index]
        kind, arg = site.kind, site.arg
        parents = {id(c): (p, f) for p in ast.walk(func) for f, v in ast.iter_fields(p)
                   for c in (v if isinstance(v, list) else [v]) if isinstance(c, ast.AST)}

        def replace(old, new):
            p, f = parents[id(old)]
            v = getattr(p, f)
            if isinstance(v, list):
                v[v.index(old)] = new
            else:
                setattr(p, f, new)
            return old, new
        old = copy.deepcopy(n)
        if kind == "binop":
            n.op = arg()
        elif kind == "augop":
            n.op = arg()
            return old, n
        elif kind == "left":
            return replace(n, n.left)
        elif kind == "right":
            return replace(n, n.right)
        elif kind == "operand":
            return replace(n, n.operand)
        elif kind == "cmp":
            n.ops[arg[0]] = arg[1]()
        elif kind == "const":
            n.value = arg
        elif kind == "boolop":
            n.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()
        elif kind == "negate":
            n.test = ast.UnaryOp(ast.Not(), n.test)
            return ast.Expr(old.test), ast.Expr(n.test)
        elif kind == "minmax":
            n.func.id = "max" if n.func.id == "min" else "min"
        elif kind == "drop":
            fld, k = arg
            body = getattr(n, fld)
            st = body[k]
            body[k] = ast.Pass()
            return st, body[k]
        else:
            raise ValueError(kind)
        return old, n

    @staticmethod
    def describe(func, site: Site) -> str:
        f = copy.deepcopy(func)
        old, new = Mutator.apply(f, site)
        if site.kind == "negate":
            return f"if {_src(old)} -> if {_src(new)}"
        return f"{_src(old)} -> {_src(new)}"


# -- functions and mutants ----------------------------------------------------------------

def functions(tree) -> dict[str, ast.AST]:
    out = {}
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[n.name] = n
        elif isinstance(n, ast.ClassDef):
            for m in n.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{n.name}.{m.name}"] = m
    return out


def replaced_source(text: str, func, new_func) -> str:
    """text with func's lines (decorators included) replaced by new_func, unparsed."""
    lines = text.splitlines(keepends=True)
    start = min([func.lineno] + [d.lineno for d in func.decorator_list]) - 1
    indent = lines[func.lineno - 1][:func.col_offset]
    body = textwrap.indent(ast.unparse(new_func), indent) + "\n"
    return "".join(lines[:start]) + body + "".join(lines[func.end_lineno:])


@dataclass
class Mutant:
    module: str
    file: str
    func: str
    site: Site
    tests: str
    result: str = ""
    seconds: float = 0.0
    equivalent: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.site.line}"


@dataclass
class Target:
    module: str
    file: str
    funcs: list[str]
    tests: str
    mutants: list[Mutant] = field(default_factory=list)


def plan(args) -> list[Target]:
    out = []
    for mod in args.module or [m for m in TARGETS if m != "engine-seq"]:  # (in engine)
        if mod not in TARGETS:
            sys.exit(f"mutate: unknown module {mod!r} (one of {', '.join(TARGETS)})")
        for file, pats, tests in TARGETS[mod]:
            pats = args.function or pats
            text = (REPO / file).read_text()
            lines = text.splitlines()
            tree = ast.parse(text)
            funcs = functions(tree)
            names = [q for q in funcs if any(fnmatch.fnmatchcase(q, p) for p in pats)]
            if not names:
                continue
            t = Target(mod, file, names, args.tests or tests)
            missing = [a for a in shlex.split(t.tests) if a.startswith("tests/")
                       and not (REPO / a.split("::")[0]).exists()]
            if missing:
                sys.exit(f"mutate: {mod}: no such test file: {', '.join(missing)}")
            for q in names:
                for s in Mutator.sites(funcs[q]):
                    m = Mutant(mod, file, q, s, t.tests)
                    m.equivalent = EQUIVALENT.get((file, q, s.text)) or EQUIVALENT.get(
                        (file, q, f"{s.text} @ {lines[s.line - 1].strip()}"))
                    if m.equivalent is None or args.all:
                        t.mutants.append(m)
            out.append(t)
    if args.rerun:
        # only the mutants a previous run (--json) did not kill, known by (file, function,
        # mutation): line numbers may have moved
        prev = json.loads(Path(args.rerun).read_text())
        again = {(m["file"], m["function"], m["mutation"]) for m in prev
                 if m["result"] != "killed"}
        for t in out:
            t.mutants = [m for m in t.mutants if (m.file, m.func, m.site.text) in again]
    if args.max_mutants:
        rng = random.Random(args.seed)
        by_mod: dict[str, list[Mutant]] = {}
        for t in out:
            by_mod.setdefault(t.module, []).extend(t.mutants)
        keep = set()
        for ms in by_mod.values():
            if len(ms) > args.max_mutants:
                ms = rng.sample(ms, args.max_mutants)
            keep.update(map(id, ms))
        for t in out:
            t.mutants = [m for m in t.mutants if id(m) in keep]
    return out


# -- running ------------------------------------------------------------------------------

def make_copy(root: Path) -> Path:
    # no compiled modules (setup.py's in-place build): Python would import engine.*.so
    # before the mutated engine.py, and every mutant of the engine would survive
    for d in ("tcpcopylib", "bin", "tests"):
        shutil.copytree(REPO / d, root / d, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.c"))
    if (REPO / "pyproject.toml").exists():
        shutil.copy2(REPO / "pyproject.toml", root)
    return root


def run_tests(root: Path, tests: str, timeout: float, fork: bool = True) -> tuple[str, float, str]:
    """Run pytest on the copy at root: (result, seconds, output). With fork, in a child of
    this process (pytest already imported, no interpreter start-up: this process never
    imports tcpcopylib), else as a new interpreter."""
    args = shlex.split(tests)
    t0 = time.monotonic()
    if fork:
        code, out = _forked_pytest(root, PYTEST[3:] + args, timeout)
    else:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(root)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTEST_ADDOPTS", None)
        try:
            r = subprocess.run(PYTEST + args, cwd=root, env=env, capture_output=True,
                               timeout=timeout, start_new_session=True)
            code, out = r.returncode, r.stdout.decode(errors="replace")
        except subprocess.TimeoutExpired as e:
            code, out = None, (e.stdout or b"").decode(errors="replace")
    secs = time.monotonic() - t0
    if code is None:
        return "timeout", secs, out
    return {0: "survived", 1: "killed", 5: "no-tests"}.get(code, "killed"), secs, out


def _forked_pytest(root: Path, args: list, timeout: float):
    """(exit code or None on timeout, output) of pytest.main(args) in a forked child."""
    import pytest  # noqa: F401  (imported once, before any fork)
    try:
        import cbor2  # noqa: F401  (the library's one dependency: shared too)
    except ImportError:
        pass

    fd, log = tempfile.mkstemp(prefix="mutate-", suffix=".log")
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            os.setsid()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(root)
            os.environ["PYTHONPATH"] = str(root)  # for the tools the tests run
            os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
            os.environ.pop("PYTEST_ADDOPTS", None)
            sys.dont_write_bytecode = True
            sys.path[:] = [str(root)] + [p for p in sys.path
                                         if p not in ("", str(REPO), str(REPO / "bench"))]
            for name in [m for m in sys.modules if m == "tcpcopylib" or m.startswith(
                    ("tcpcopylib.", "conftest", "test_")) or m == "tc"]:
                del sys.modules[name]
            code = int(pytest.main(args))
        except BaseException:  # noqa: BLE001
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(fd)
    deadline = time.monotonic() + timeout
    status = None
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    out = Path(log).read_text(errors="replace")
    os.unlink(log)
    return status, out


def mutated_text(file: str, func: str, site: Site | None) -> str:
    text = (REPO / file).read_text()
    tree = ast.parse(text)
    f = functions(tree)[func]
    new = copy.deepcopy(f)
    if site is not None:
        Mutator.apply(new, site)
    return replaced_source(text, f, new)


def install(root: Path, file: str, text: str) -> None:
    p = root / file
    p.write_text(text)
    cache = p.parent / "__pycache__"
    if cache.is_dir():
        for c in cache.glob(p.stem + ".*"):
            c.unlink()


def baseline(root: Path, targets: list[Target], fork: bool) -> dict[str, float]:
    """Run each (module's) test set once against the unparsed, unmutated functions."""
    times = {}
    for t in targets:
        text = (REPO / t.file).read_text()
        tree = ast.parse(text)
        funcs = functions(tree)
        for q in sorted(t.funcs, key=lambda q: -funcs[q].lineno):  # bottom up: lines hold
            text = replaced_source(text, funcs[q], funcs[q])
        compile(text, t.file, "exec")
        install(root, t.file, text)
        if t.tests not in times:
            res, secs, out = run_tests(root, t.tests, 600, fork)
            if res != "survived":
                sys.exit(f"mutate: the tests fail without a mutation ({t.module}, {t.tests}):\n"
                         + out[-3000:])
            times[t.tests] = secs
        install(root, t.file, (REPO / t.file).read_text())
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--module", action="append", help=f"one of {', '.join(TARGETS)} (repeat)")
    ap.add_argument("--function", action="append",
                    help="function qualname or fnmatch pattern, e.g. 'Pacer.*' (repeat)")
    ap.add_argument("--tests", help="pytest arguments to run instead of the module's own")
    ap.add_argument("--max-mutants", type=int, default=0,
                    help="at most this many per module (a seeded random sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=0,
                    help="seconds per mutant (default 3 x the unmutated run + 10)")
    ap.add_argument("--all", action="store_true", help="also run mutants listed as equivalent")
    ap.add_argument("--rerun", metavar="JSON",
                    help="run only the mutants that survived (or timed out) in this --json "
                         "file of an earlier run (after adding tests)")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--json", help="write every mutant's result here")
    ap.add_argument("--no-fork", action="store_true",
                    help="run each test run as a new interpreter (slower; default: fork)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each mutant's result")
    args = ap.parse_args(argv)

    targets = plan(args)
    mutants = [m for t in targets for m in t.mutants]
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # remove the copies on kill
    if args.list:
        for m in mutants:
            print(f"{m.module:9} {m.where:40} {m.func:28} {m.site.text}")
        print(f"{len(mutants)} mutants")
        return 0
    print(f"mutate: {len(mutants)} mutants in {len(targets)} files, {args.jobs} job(s)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="tc-mutate-") as tmp:
        roots: queue.Queue = queue.Queue()
        for j in range(max(1, args.jobs)):
            roots.put(make_copy(Path(tmp) / f"copy{j}"))
        r0 = roots.get()
        chk = subprocess.run([sys.executable, "-c", "import tcpcopylib; print(tcpcopylib.__file__)"],
                             cwd=r0, env={**os.environ, "PYTHONPATH": str(r0)},
                             capture_output=True, text=True)
        if not chk.stdout.startswith(str(r0)):
            sys.exit(f"mutate: the copy's tcpcopylib is not the one imported: {chk.stdout}")
        times = baseline(r0, targets, not args.no_fork)
        roots.put(r0)
        done = [0]

        def one(m: Mutant):
            root = roots.get()
            try:
                install(root, m.file, mutated_text(m.file, m.func, m.site))
                limit = args.timeout or 3 * times[m.tests] + 10
                m.result, m.seconds, _ = run_tests(root, m.tests, limit, not args.no_fork)
            finally:
                install(root, m.file, (REPO / m.file).read_text())
                roots.put(root)
            done[0] += 1
            if args.verbose or m.result != "killed":
                print(f"  [{done[0]}/{len(mutants)}] {m.result:8} {m.where} {m.func}: "
                      f"{m.site.text}", flush=True)

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as ex:
            try:
                list(ex.map(one, mutants))
            except BaseException:  # SIGTERM, ^C: the mutants not started are not run
                ex.shutdown(wait=True, cancel_futures=True)
                raise
    report(targets, mutants, time.monotonic() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"module": m.module, "file": m.file, "line": m.site.line, "function": m.func,
              "mutation": m.site.text, "result": m.result, "seconds": round(m.seconds, 2)}
             for m in mutants], indent=1))
    return 0


def report(targets, mutants, secs) -> None:
    print(f"\n{'module':10} {'mutants':>7} {'killed':>7} {'survived':>8} {'timeout':>7}")
    mods = list(dict.fromkeys(t.module for t in targets))
    for mod in mods:
        ms = [m for m in mutants if m.module == mod]
        c = {k: sum(m.result == k for m in ms) for k in ("killed", "survived", "timeout")}
        print(f"{mod:10} {len(ms):7} {c['killed']:7} {c['survived']:8} {c['timeout']:7}")
    print(f"({secs:.0f} s)")
    surv = [m for m in mutants if m.result in ("survived", "no-tests")]
    if surv:
        print("\nsurvivors:")
        for m in surv:
            print(f"  {m.module:9} {m.where:38} {m.func}: {m.site.text}"
                  + (" (no tests ran)" if m.result == "no-tests" else ""))
    files = {t.file for t in targets}
    eq = [(k, v) for k, v in EQUIVALENT.items() if k[0] in files]
    if eq:
        print(f"\nnot run, listed as equivalent (EQUIVALENT in {Path(__file__).name}):")
        for (file, func, text), why in eq:
            print(f"  {file} {func}: {text}: {why}")


if __name__ == "__main__":
    sys.exit(main())
