"""The tc-session engine against a scripted target, with a fake clock (no network).

Tests that take the ``isns`` fixture run once with sequence numbers far from 2**32 and once
per case where the client's, the target's or the online server's numbers cross it mid-session
(tests/seqnums.py); the module-level CISN, TISN and SISN are the fixed case.
"""

import pytest
from seqnums import FIXED, isns  # noqa: F401 (isns: a fixture)

from tcpcopylib.errors import UsageError
from tcpcopylib.packet import (TH_ACK, TH_ECE, TH_FIN, TH_PSH, TH_RST, TH_SYN, build_tcp,
                               ip_bytes, parse_options, parse_tcp)
from tcpcopylib.session import Config, Engine, Mapper, parse_target, parse_transfer
from tcpcopylib.session.timing import DueQueue
from tcpcopylib.streamparse import StreamParser
from tcpcopylib.testing import CLIENT as C
from tcpcopylib.testing import MS, MSS_OPT, SEC
from tcpcopylib.testing import ONLINE as O
from tcpcopylib.testing import TARGET as T
from tcpcopylib.testing import EngineRig

CISN, TISN, SISN = FIXED       # client's, target's, online server's ISN (captured acks)
MSS_512 = b"\x02\x04\x02\x00"


def ts_opt(val, ecr):
    """A timestamp option as Linux sends it: NOP, NOP, kind 8 (12 bytes)."""
    return b"\x01\x01\x08\x0a" + (val & 0xFFFFFFFF).to_bytes(4, "big") + \
        (ecr & 0xFFFFFFFF).to_bytes(4, "big")


def not_before(a, b):
    """a is b or later in 32-bit serial number order (RFC 1982)."""
    return (a - b) & 0xFFFFFFFF < 0x80000000


# -- handshake ------------------------------------------------------------------------

def test_captured_syn_forwarded_with_isn_options_and_claim_first(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    opts = MSS_OPT + b"\x01\x03\x03\x07"
    h.client(TH_SYN, CISN, 0, opts=opts)
    assert h.log[0] == ("claim", (C, 5000, T, 80))  # claimed before the SYN
    syn = h.log[1][1]
    assert syn.flags == TH_SYN and syn.seq == CISN and syn.options == opts
    assert (syn.src, syn.sport, syn.dst, syn.dport) == (C, 5000, T, 80)
    h.pkts()
    h.now += MS
    h.client(TH_ACK, CISN + 1, SISN + 1)
    assert h.pkts() == []  # captured handshake ACK is not forwarded
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    (ack,) = h.pkts()
    assert ack.flags == TH_ACK and ack.seq == CISN + 1 and ack.ack == TISN + 1
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"hello")
    (d,) = h.pkts()
    assert d.payload == b"hello" and d.seq == CISN + 1 and d.ack == TISN + 1
    assert h.e.st.syn_sent == 1 and h.e.st.fake_syn == 0


def test_ack_numbers_follow_target_bytes_and_fin(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 4, b"x" * 10)
    h.target(TH_ACK, TISN + 11, CISN + 4, b"y" * 10)  # second segment: ACK at once
    (a,) = h.pkts()
    assert a.flags == TH_ACK and a.ack == TISN + 1 + 20
    h.target(TH_ACK | TH_FIN, TISN + 21, CISN + 4)
    (a,) = h.pkts()
    assert a.ack == TISN + 22


def test_fake_syn_for_midstream_session(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"GET / HTTP/1.1\r\n\r\n")
    (syn,) = h.pkts()
    assert syn.flags == TH_SYN and syn.seq == CISN and syn.window == 65535
    assert parse_options(syn.options) == {"mss": 1460}
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    ack, data = h.pkts()
    assert ack.flags == TH_ACK and ack.seq == CISN + 1 and ack.ack == TISN + 1
    assert data.payload.startswith(b"GET") and data.seq == CISN + 1 and data.ack == TISN + 1
    assert h.e.st.fake_syn == 1


def test_only_syn_filters_midstream_sessions():
    h = EngineRig(only_syn=True)
    h.client(TH_ACK | TH_PSH, 90000, SISN, b"data")
    h.client(TH_ACK | TH_PSH, 90004, SISN, b"more")
    assert h.pkts() == []
    assert h.outcomes() == {"filtered": 1}


def test_pure_ack_before_syn_ack_and_unmapped_port_ignored():
    h = EngineRig()
    h.client(TH_ACK | TH_PSH, 1, 1, b"x", dport=81)
    assert h.pkts() == [] and h.e.st.pkts_ignored == 1


# -- gating ---------------------------------------------------------------------------

def test_next_request_waits_for_response_bytes(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    assert [p.payload for p in h.pkts()] == [b"req1"]
    # online, the server answered 100 bytes before req2
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")
    assert h.pkts() == []
    h.target(TH_ACK, TISN + 1, CISN + 5, b"r" * 60)
    assert [p.payload for p in h.pkts()] == []
    h.target(TH_ACK | TH_PSH, TISN + 61, CISN + 5, b"r" * 40)
    out = h.pkts()
    assert out[-1].payload == b"req2" and out[-1].ack == TISN + 101
    assert h.e.st.gate_bytes == 1


def test_response_shorter_than_online_released_after_quiet(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, quiet=100 * MS)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")
    h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 5, b"r" * 30, hdr_only=True)
    h.advance(90)
    assert not [p for p in h.pkts() if p.payload]
    h.advance(20)
    assert [p.payload for p in h.pkts() if p.payload] == [b"req2"]
    assert h.e.st.gate_quiet == 1


def test_a_response_one_byte_short_is_not_complete_and_a_one_byte_one_is(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")  # online: 100 bytes
    h.client(TH_ACK | TH_PSH, CISN + 9, SISN + 102, b"req3")  # online: 1 byte
    assert [p.payload for p in h.pkts()] == [b"req1"]
    h.target(TH_ACK, TISN + 1, CISN + 5, b"r" * 99)
    assert not [p for p in h.pkts() if p.payload]
    h.target(TH_ACK, TISN + 100, CISN + 5, b"r")
    assert [(p.payload, p.ack) for p in h.pkts() if p.payload] == [(b"req2", TISN + 101)]
    h.target(TH_ACK, TISN + 101, CISN + 9, b"s")
    assert [(p.payload, p.ack) for p in h.pkts() if p.payload] == [(b"req3", TISN + 102)]
    assert h.e.st.gate_bytes == 2 and h.e.st.gate_quiet == 0


def test_a_one_byte_response_is_a_response_the_quiet_rule_ends(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, quiet=100 * MS)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")
    h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 5, b"r")  # 1 of 100 bytes, then silence
    h.advance(110)
    assert [p.payload for p in h.pkts() if p.payload] == [b"req2"]
    assert h.e.st.gate_quiet == 1


def test_gating_never_deadlocks_when_target_acked_and_went_quiet(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, gate_timeout=2 * SEC)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"part1")
    h.client(TH_ACK | TH_PSH, CISN + 6, SISN + 300, b"part2")  # new captured ack
    h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 6)  # acked, no response
    h.advance(1900)
    assert not [p for p in h.pkts() if p.payload]
    h.advance(200)
    assert [p.payload for p in h.pkts() if p.payload] == [b"part2"]
    assert h.e.st.gate_timeout == 1


def test_quiet_gate_counts_from_the_last_byte_of_a_trickling_response(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, quiet=100 * MS)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")  # online: a 100-byte response
    h.pkts()
    for i in range(4):  # 40 bytes in pieces 60 ms apart: never 100 ms of silence
        h.advance(60)
        h.target(TH_ACK, TISN + 1 + 10 * i, CISN + 5, b"r" * 10)
        assert not [p for p in h.pkts() if p.payload], f"released before piece {i + 2}"
    h.advance(90)
    assert not [p for p in h.pkts() if p.payload]
    h.advance(20)  # 100 ms after the last piece
    assert [(p.payload, p.ack) for p in h.pkts() if p.payload] == [(b"req2", TISN + 41)]
    assert h.e.st.gate_quiet == 1


def test_gate_timeout_counts_from_the_targets_last_ack(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, gate_timeout=2 * SEC)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"part1")
    h.client(TH_ACK | TH_PSH, CISN + 6, SISN + 300, b"part2")
    h.pkts()
    # the target acknowledges part1 only after retransmissions, later than 2 s: until then
    # the response has not even begun, after it the timeout counts from the ack
    h.advance(2500)
    assert b"part2" not in [p.payload for p in h.pkts()]
    h.target(TH_ACK, TISN + 1, CISN + 6)
    h.advance(1900)
    assert b"part2" not in [p.payload for p in h.pkts()]
    h.advance(200)  # 2 s after the ack
    assert [p.payload for p in h.pkts() if p.payload] == [b"part2"]
    assert h.e.st.gate_timeout == 1


def test_client_fin_without_a_new_ack_waits_for_the_response(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, quiet=100 * MS)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 1)  # a half-close: the response came after

    def fins():
        return [p for p in h.pkts() if p.flags & TH_FIN]
    assert not fins()
    h.target(TH_ACK, TISN + 1, CISN + 4)  # the request arrived: its response is awaited
    assert not fins()
    h.advance(50)
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"r" * 30)
    h.advance(90)
    assert not fins()
    h.advance(20)  # quiet for 100 ms after the response
    (fin,) = fins()
    assert fin.seq == CISN + 4 and fin.ack == TISN + 31
    assert h.e.st.gate_quiet == 1


def test_pipelined_requests_and_segments_go_back_to_back(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    for i in range(3):
        h.client(TH_ACK | TH_PSH, CISN + 1 + 4 * i, SISN + 1, b"seg%d" % i)
    assert [p.payload for p in h.pkts()] == [b"seg0", b"seg1", b"seg2"]


def test_no_wait_sends_at_once(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, no_wait=True)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")
    assert [p.payload for p in h.pkts()] == [b"req1", b"req2"]


def test_no_wait_still_judges_the_last_request_by_its_own_captured_ack(isns):
    """-n/--no-wait: nothing waits, but the drain and the outcome still look at the last
    request's response only (the one the online server gave before it: not awaited)."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns, no_wait=True)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 51, b"req2")
    h.target(TH_ACK, TISN + 1, CISN + 9)
    h.advance(500)
    assert h.e.quiescent(h.now)
    h.e.close_all(h.now)
    assert h.outcomes() == {"completed": 1}


def test_a_request_keeps_its_offset_from_a_late_accept_and_a_gate_adds_nothing(isns):
    """The target accepted 30 ms after the online server did (its SYN-ACK came back late):
    each request goes at its recorded offset from the accept (when it was due, plus 30 ms),
    as duplex data does, and when the gate opens: the later of the two, not their sum.
    (Gated requests went when due, 30 ms early counted from the accept.)"""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.now += MS
    h.client(TH_ACK, CISN + 1, SISN + 1)  # the online server accepted at 1 ms
    h.advance(30)
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)  # the target at 31 ms
    h.pkts()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")  # 30 ms after the accept
    h.advance(15)
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")  # after a 100-byte answer
    h.advance(5)
    h.client(TH_ACK | TH_PSH, CISN + 9, SISN + 201, b"req3")  # after another
    h.advance(9)
    assert h.pkts() == []
    h.advance(1)
    assert [p.payload for p in h.pkts()] == [b"req1"]  # 30 ms after the target's accept
    h.advance(5)
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"a" * 100)  # complete, req2 not due
    assert [p.payload for p in h.pkts() if p.payload] == []
    h.advance(9)
    assert [p.payload for p in h.pkts() if p.payload] == []
    h.advance(1)
    assert [p.payload for p in h.pkts() if p.payload] == [b"req2"]  # at its offset
    h.advance(14)  # req3's offset has passed; its answer is late
    assert [p.payload for p in h.pkts() if p.payload] == []
    h.target(TH_ACK | TH_PSH, TISN + 101, CISN + 9, b"b" * 100)
    assert [p.payload for p in h.pkts() if p.payload] == [b"req3"]  # at once, not 30 ms on
    assert h.e.st.gate_bytes == 2


def test_offsets_count_between_due_times_not_when_records_came(isns):
    """Live input: each record is due at its capture time on the timing rule, but reaches
    the engine a little later, by a jitter of its own. Offsets from the accept count between
    due times: the handshake ACK that came 5 ms late does not move the data after it 5 ms
    early (nor would the old hold to the first record's latency hide it)."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    ack = build_tcp(C, O, 5000, 80, CISN + 1, SISN + 1, TH_ACK, 65535)
    h.now = 6 * MS
    h.e.client_packet(ack, h.now, 1 * MS)  # the online accept: 1 ms; handed over at 6 ms
    h.now = 7 * MS
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)  # the target's: 6 ms later
    h.pkts()
    h.now = 31 * MS + 200_000
    req = build_tcp(C, O, 5000, 80, CISN + 1, SISN + 1, TH_ACK | TH_PSH, 65535, b"", b"req")
    h.e.client_packet(req, h.now, 31 * MS)  # 30 ms after the accept online
    h.advance(5.7)
    assert h.pkts() == []
    h.advance(0.1)  # 37 ms: 30 ms after the target's accept
    assert [p.payload for p in h.pkts()] == [b"req"]
    h.target(TH_ACK, TISN + 1, CISN + 4)
    # a record handed over more than 20 ms late (a backlog) counts from when it came: the
    # session does not keep a lag we have caught up with
    h.now = 300 * MS
    late = build_tcp(C, O, 5000, 80, CISN + 4, SISN + 1, TH_ACK | TH_PSH, 65535, b"", b"r2")
    h.e.client_packet(late, h.now, 100 * MS)
    h.advance(5.9)
    assert h.pkts() == []
    h.advance(0.1)  # 6 ms (the target's late accept) after it came, not at once
    assert [p.payload for p in h.pkts()] == [b"r2"]


def test_greeting_waits_for_server_first_bytes(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open(cack=SISN + 1)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1 + 20, b"LOGIN")  # after a 20-byte greeting
    assert h.pkts() == []
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 1, b"g" * 20)
    out = h.pkts()
    assert out[-1].payload == b"LOGIN" and out[-1].ack == TISN + 21


def test_client_fin_waits_for_complete_response(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 1 + 3000)  # FIN after a 3000-byte reply
    (req,) = h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 4, b"r" * 1448)
    assert not [p for p in h.pkts() if p.flags & TH_FIN]
    h.target(TH_ACK, TISN + 1449, CISN + 4, b"r" * 1448)
    assert not [p for p in h.pkts() if p.flags & TH_FIN]
    h.advance(50)  # silence shorter than the quiet period: still no FIN
    assert not [p for p in h.pkts() if p.flags & TH_FIN]
    h.target(TH_ACK | TH_PSH, TISN + 2897, CISN + 4, b"r" * 104)
    fins = [p for p in h.pkts() if p.flags & TH_FIN]
    assert len(fins) == 1 and fins[0].seq == CISN + 4 and fins[0].ack == TISN + 3001
    h.target(TH_ACK | TH_FIN, TISN + 3001, CISN + 5)
    (last,) = h.pkts()
    assert last.flags == TH_ACK and last.ack == TISN + 3002
    assert h.outcomes() == {"completed": 1}
    assert h.e.active() == 0


# -- retransmission -------------------------------------------------------------------

def test_rto_retransmit_adaptive_and_backoff(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, rto_min=10 * MS)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.now += 50 * MS  # 50 ms RTT to the target (and online: it accepted no later)
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.pkts()
    h.advance(140)
    assert h.pkts() == []
    h.advance(20)  # RTO = srtt + 4 * rttvar = 50 + 100 = 150 ms, not 1 s
    (r,) = h.pkts()
    assert r.payload == b"req" and r.seq == CISN + 1
    h.advance(250)
    assert h.pkts() == []
    h.advance(60)  # backed off: 300 ms
    assert [p.payload for p in h.pkts()] == [b"req"]
    assert h.e.st.retransmits == 2 and h.e.st.rto_expired == 2


def test_rto_follows_the_rtt_of_data_too(isns):
    CISN, TISN, SISN = isns
    # (push_gap=0: req2, 100 ms after req1 with no answer between, would make the session
    # duplex; see test_session_duplex.py)
    h = EngineRig(isns, rto_min=10 * MS, push_gap=0)
    h.now = 5 * SEC  # (times are measured from the SYN, not from 0)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.now += 40 * MS  # SYN RTT 40 ms: RTO = 40 + 4 * 20 = 120 ms (online too: no late accept)
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.advance(100)
    h.target(TH_ACK, TISN + 1, CISN + 5)  # data RTT 100 ms: srtt 47.5, rttvar 30: 167.5 ms
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 1, b"req2")
    h.pkts()
    h.advance(160)
    assert h.pkts() == []
    h.advance(10)
    assert [(p.seq, p.payload) for p in h.pkts()] == [(CISN + 5, b"req2")]


def test_delayed_ack_and_acks_carried_by_data(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, delack=40 * MS)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.pkts()
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"a" * 5)  # one segment: the ACK waits
    h.advance(39)
    assert h.pkts() == []
    h.advance(2)
    assert [(p.flags, p.ack) for p in h.pkts()] == [(TH_ACK, TISN + 6)]
    h.target(TH_ACK | TH_PSH, TISN + 6, CISN + 5, b"b" * 5)
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 1, b"req2")  # carries the pending ACK
    assert [(p.payload, p.ack) for p in h.pkts()] == [(b"req2", TISN + 11)]
    h.advance(41)
    assert h.pkts() == []  # nothing left to ack
    h.target(TH_ACK | TH_PSH, TISN + 11, CISN + 9, b"c" * 5)  # one segment again: waits
    assert h.pkts() == []
    h.advance(41)
    assert [(p.flags, p.ack) for p in h.pkts()] == [(TH_ACK, TISN + 16)]
    assert h.e.st.acks_sent == 3  # (the handshake's, two delayed)


def test_each_rtt_sample_times_one_segment(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, rto_min=10 * MS)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.now += 40 * MS
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    for i in range(2):  # two requests, each acked 40 ms after it went: RTO 85 ms
        h.client(TH_ACK | TH_PSH, CISN + 1 + 4 * i, SISN + 1, b"req%d" % i)
        h.advance(40)
        h.target(TH_ACK, TISN + 1, CISN + 5 + 4 * i)
        h.advance(460)
    h.client(TH_ACK | TH_PSH, CISN + 9, SISN + 1, b"req2")
    h.pkts()
    h.advance(90)
    assert [p.payload for p in h.pkts()] == [b"req2"]


def test_retransmit_keeps_working_after_responses(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"resp")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 5, b"req2")
    h.pkts()
    h.advance(150)
    assert h.pkts() == []
    h.advance(100)  # RTO from the 1 ms SYN RTT is the 200 ms floor
    assert [p.payload for p in h.pkts() if p.payload] == [b"req2"]


def test_retransmissions_carry_the_fin_only_with_the_last_byte(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, no_wait=True)  # the FIN goes before the data is acknowledged
    h.open(synack_opts=MSS_512)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"z" * 600)
    h.client(TH_ACK | TH_FIN, CISN + 601, SISN + 1)

    def segs():
        return [(p.seq, len(p.payload), bool(p.flags & TH_FIN)) for p in h.pkts()]
    assert segs() == [(CISN + 1, 512, False), (CISN + 513, 88, False), (CISN + 601, 0, True)]
    h.advance(250)  # RTO
    assert segs() == [(CISN + 1, 512, False)]
    h.target(TH_ACK, TISN + 1, CISN + 513)  # partial acks: the next holes
    assert segs() == [(CISN + 513, 88, True)]
    h.target(TH_ACK, TISN + 1, CISN + 601)
    assert segs() == [(CISN + 601, 0, True)]
    h.target(TH_ACK | TH_FIN, TISN + 1, CISN + 602)
    assert [p.ack for p in h.pkts()] == [TISN + 2]
    assert h.outcomes() == {"completed": 1}


def test_a_fin_sent_at_once_is_retransmitted_after_the_rto(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"x" * 10)
    h.advance(100)  # the delayed ACK went: no timer but the idle one is left
    h.pkts()
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 11)  # the response is complete: at once
    (fin,) = h.pkts()
    assert fin.flags & TH_FIN and fin.seq == CISN + 4
    h.advance(190)
    assert h.pkts() == []
    h.advance(20)  # lost: the RTO (200 ms floor)
    (again,) = h.pkts()
    assert again.flags & TH_FIN and again.seq == CISN + 4


def test_data_sent_on_the_syn_ack_is_retransmitted_after_the_rto(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")  # mid-stream: our own SYN
    h.pkts()
    h.now += MS
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)  # the data goes now
    assert [p.payload for p in h.pkts()] == [b"", b"req"]
    h.advance(190)
    assert h.pkts() == []
    h.advance(20)  # the 200 ms RTO, not the SYN's 1 s
    assert [p.payload for p in h.pkts()] == [b"req"]


def test_dupacks_count_from_the_last_new_ack_and_each_loss_is_fast_retransmitted(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    for i in range(8):
        h.client(TH_ACK | TH_PSH, CISN + 1 + 10 * i, SISN + 1, bytes([65 + i]) * 10)
    h.pkts()
    for _ in range(2):
        h.target(TH_ACK, TISN + 1, CISN + 11)
    h.target(TH_ACK, TISN + 1, CISN + 21)  # new data acked: the count starts again
    h.target(TH_ACK, TISN + 1, CISN + 21)
    assert h.pkts() == []  # 1 duplicate, not 3
    for _ in range(2):
        h.target(TH_ACK, TISN + 1, CISN + 21)
    assert [p.seq for p in h.pkts()] == [CISN + 21]
    h.target(TH_ACK, TISN + 1, CISN + 81)  # all acked: recovery over
    h.client(TH_ACK | TH_PSH, CISN + 81, SISN + 1, b"x" * 10)
    h.client(TH_ACK | TH_PSH, CISN + 91, SISN + 1, b"y" * 10)
    h.pkts()
    for _ in range(3):  # a second loss: fast retransmitted as well
        h.target(TH_ACK, TISN + 1, CISN + 81)
    assert [(p.seq, p.payload[:1]) for p in h.pkts()] == [(CISN + 81, b"x")]
    assert h.e.st.fast_retransmits == 2 and h.e.st.rto_expired == 0


def test_recovery_ends_at_the_ack_of_what_was_outstanding_at_the_loss(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    for i in range(4):
        h.client(TH_ACK | TH_PSH, CISN + 1 + 10 * i, SISN + 1, bytes([65 + i]) * 10)
    for _ in range(4):
        h.target(TH_ACK, TISN + 1, CISN + 11)
    h.pkts()  # (the fast retransmission of CISN + 11; recovery up to CISN + 41)
    h.client(TH_ACK | TH_PSH, CISN + 41, SISN + 1, b"x" * 10)  # new data meanwhile
    h.client(TH_ACK | TH_PSH, CISN + 51, SISN + 1, b"y" * 10)
    h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 41)  # exactly the recovery point: over, no resend
    assert h.pkts() == []
    for _ in range(3):  # a new loss: fast retransmitted again
        h.target(TH_ACK, TISN + 1, CISN + 41)
    assert [p.seq for p in h.pkts()] == [CISN + 41]
    assert h.e.st.fast_retransmits == 2


def test_what_is_not_a_duplicate_ack(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK, TISN + 1, CISN + 4)
    for _ in range(3):  # nothing outstanding
        h.target(TH_ACK, TISN + 1, CISN + 4)
    h.client(TH_ACK | TH_PSH, CISN + 4, SISN + 1, b"more")
    for i in range(3):  # carrying data
        h.target(TH_ACK | TH_PSH, TISN + 1 + i, CISN + 4, b"d")
    for w in (1000, 2000, 3000):  # window updates
        h.target(TH_ACK, TISN + 4, CISN + 4, win=w)
    assert [p.payload for p in h.pkts() if p.payload] == [b"req", b"more"]
    assert h.e.st.fast_retransmits == 0 and h.e.st.retransmits == 0


def test_a_partial_ack_restarts_the_rto(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)  # RTO: the 200 ms floor
    h.open(synack_opts=MSS_512)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"z" * 600)
    h.pkts()
    h.advance(150)
    h.target(TH_ACK, TISN + 1, CISN + 513)  # the first segment
    h.advance(190)  # 340 ms: no RTO yet
    assert h.pkts() == []
    h.advance(20)
    assert [(p.seq, len(p.payload)) for p in h.pkts()] == [(CISN + 513, 88)]


def test_no_rtt_sample_from_a_retransmitted_segment(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, rto_min=10 * MS, push_gap=0)  # (as in the test above)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.now += 40 * MS  # RTO 120 ms
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.advance(125)  # retransmitted at 120 ms; the RTO backs off to 240 ms
    h.target(TH_ACK, TISN + 1, CISN + 5)  # which copy is acked? no sample (Karn)
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 1, b"req2")
    h.pkts()
    h.advance(230)
    assert h.pkts() == []
    h.advance(20)
    assert [p.payload for p in h.pkts()] == [b"req2"]


def test_fast_retransmit_on_three_dupacks(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    for i in range(4):
        h.client(TH_ACK | TH_PSH, CISN + 1 + 10 * i, SISN + 1, bytes([65 + i]) * 10)
    h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 11)  # first segment arrived, second lost
    for _ in range(2):
        h.target(TH_ACK, TISN + 1, CISN + 11)
    assert h.pkts() == []
    h.target(TH_ACK, TISN + 1, CISN + 11)
    (r,) = h.pkts()
    assert r.seq == CISN + 11 and r.payload.startswith(b"B" * 10)  # may re-segment
    assert h.e.st.fast_retransmits == 1
    h.target(TH_ACK, TISN + 1, CISN + 21)  # partial ack: the next hole goes at once
    (r,) = h.pkts()
    assert r.seq == CISN + 21


# -- the target's bytes ------------------------------------------------------------------

def test_target_data_overlapping_what_arrived_counts_only_the_new_bytes(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.pkts()
    h.target(TH_ACK, TISN + 1, CISN + 4, b"a" * 10)
    h.target(TH_ACK, TISN + 6, CISN + 4, b"a" * 15)  # re-segmented: 5 old bytes, 10 new
    assert [p.ack for p in h.pkts()] == [TISN + 21]
    h.target(TH_ACK, TISN + 1, CISN + 4, b"a" * 10)  # all old: a duplicate ack at once
    assert [p.ack for p in h.pkts()] == [TISN + 21]
    h.target(TH_ACK, TISN + 11, CISN + 4, b"a" * 10)  # all old, ending where we are
    assert [p.ack for p in h.pkts()] == [TISN + 21]


def test_target_fin_is_taken_in_sequence_only(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.pkts()
    h.target(TH_ACK | TH_FIN, TISN + 11, CISN + 4)  # the FIN overtook 10 bytes
    assert [(p.flags, p.ack) for p in h.pkts()] == [(TH_ACK, TISN + 1)]  # a dup ACK at once
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"x" * 10)
    h.target(TH_ACK | TH_FIN, TISN + 11, CISN + 4)  # sent again
    assert [p.ack for p in h.pkts()][-1] == TISN + 12
    h.target(TH_ACK | TH_FIN, TISN + 11, CISN + 4)  # again: our ACK was lost, ack again
    assert [(p.flags, p.ack) for p in h.pkts()] == [(TH_ACK, TISN + 12)]
    h.advance(100)
    assert h.pkts() == []


# -- flow control ---------------------------------------------------------------------

def test_never_more_in_flight_than_window_and_window_update_resumes(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, win=100, opts=MSS_OPT)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"a" * 300)
    sent = [p for p in h.pkts() if p.payload]
    assert sum(len(p.payload) for p in sent) == 100
    h.target(TH_ACK, TISN + 1, CISN + 101, win=0)  # zero window
    assert h.pkts() == []
    h.advance(1100)  # persist probe
    probes = h.pkts()
    assert probes and not probes[0].payload and probes[0].seq == CISN + 100
    h.target(TH_ACK, TISN + 1, CISN + 101, win=150)  # pure window update, same ack
    sent = [p for p in h.pkts() if p.payload]
    assert sum(len(p.payload) for p in sent) == 150 and sent[0].seq == CISN + 101
    assert h.e.st.zero_window_probes >= 1


def test_one_byte_of_window_is_used_and_each_wait_counted(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, win=100, opts=MSS_OPT)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"a" * 300)
    assert [len(p.payload) for p in h.pkts() if p.payload] == [100]
    assert h.e.st.window_waits == 1
    h.target(TH_ACK, TISN + 1, CISN + 2, win=100)  # 1 byte acked: 1 byte of window
    assert [(p.seq, len(p.payload)) for p in h.pkts()] == [(CISN + 101, 1)]
    assert h.e.st.window_waits == 2


def test_zero_window_probes_start_one_rto_after_the_first_wait_and_are_not_postponed(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)  # RTO: the 200 ms floor
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.now += MS
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, win=0, opts=MSS_OPT)  # a zero window at once
    h.pkts()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"a")
    assert h.pkts() == [] and h.e.st.window_waits == 1
    for _ in range(2):  # more data, same group: it waits too, the probe stays due
        h.advance(90)
        h.client(TH_ACK | TH_PSH, h.e.st.window_waits + CISN + 1, SISN + 1, b"b")
        assert h.pkts() == []
    h.advance(30)  # 210 ms after the first wait
    (probe,) = h.pkts()
    assert probe.flags == TH_ACK and not probe.payload and probe.seq == CISN
    assert h.e.st.zero_window_probes == 1
    h.advance(90)
    h.target(TH_ACK, TISN + 1, CISN + 1, win=1000)  # open: probing stops, the data goes
    assert [(p.seq, p.payload) for p in h.pkts()] == [
        (CISN + 1, b"a"), (CISN + 2, b"b"), (CISN + 3, b"b")]
    h.advance(390)  # its RTO (backed off to 400 ms) counts from now, not from the probe
    assert h.pkts() == []


def test_a_window_shut_by_the_last_ack_is_probed_one_rto_after_data_waits(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.target(TH_ACK, TISN + 1, CISN + 5, win=0)  # all acked, the window shut
    h.advance(100)
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 1, b"req2")  # waits from here
    h.pkts()
    h.advance(190)
    assert h.pkts() == []
    h.advance(20)
    (probe,) = h.pkts()
    assert not probe.payload and probe.seq == CISN + 4


def test_a_window_reopened_with_data_in_flight_keeps_its_rto(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"a" * 100)
    h.target(TH_ACK, TISN + 1, CISN + 51, win=0)  # half acked, the window shut
    h.target(TH_ACK, TISN + 1, CISN + 51, win=1000)  # reopened; 50 bytes still out
    h.pkts()
    h.advance(250)  # lost: the RTO resends them
    assert [(p.seq, len(p.payload)) for p in h.pkts()] == [(CISN + 51, 50)]


def test_window_scale_applies_only_when_both_negotiated(isns):
    CISN, TISN, SISN = isns
    wsopt = b"\x01\x03\x03\x02"  # wscale 2
    h = EngineRig(isns)
    h.open(client_opts=MSS_OPT + wsopt, synack_opts=MSS_OPT + wsopt)
    h.target(TH_ACK, TISN + 1, CISN + 1, win=100)  # 400 bytes
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"a" * 1000)
    assert sum(len(p.payload) for p in h.pkts()) == 400
    h = EngineRig(isns)
    h.open(client_opts=MSS_OPT, synack_opts=MSS_OPT + wsopt)  # client did not offer it
    h.target(TH_ACK, TISN + 1, CISN + 1, win=100)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"a" * 1000)
    assert sum(len(p.payload) for p in h.pkts()) == 100


def test_options_the_syn_did_not_offer_are_not_used(isns):
    CISN, TISN, SISN = isns
    ws14 = b"\x01\x03\x03\x0e"
    h = EngineRig(isns)  # timestamps in the SYN-ACK only: none in our segments
    h.open(client_opts=MSS_OPT, synack_opts=MSS_OPT + ts_opt(777, 0))
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    assert [p.options for p in h.pkts()] == [b""]
    h = EngineRig(isns)  # a window scale above 14 counts as 14 (RFC 7323)
    ws15 = b"\x01\x03\x03\x0f"
    h.open(client_opts=MSS_OPT + ws15, synack_opts=MSS_OPT + ws15)
    h.target(TH_ACK, TISN + 1, CISN + 1, win=1)  # 1 << 14 bytes
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"a" * 20000)
    assert sum(len(p.payload) for p in h.pkts()) == 16384
    # a reconnection's own SYN offers only an MSS, whatever the captured SYN did
    h = EngineRig(isns)
    h.open(client_opts=MSS_OPT + ws14 + ts_opt(5000, 0), synack_opts=MSS_OPT + ts_opt(9, 5000))
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"resp1", opts=ts_opt(10, 5000))
    h.target(TH_ACK | TH_FIN, TISN + 6, CISN + 5, opts=ts_opt(10, 5000))
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 6, b"a" * 1000)
    (syn,) = [p for p in h.pkts() if p.flags & TH_SYN]
    assert syn.options == MSS_OPT
    h.target(TH_SYN | TH_ACK, TISN, CISN + 5, win=100, opts=MSS_OPT + ws14 + ts_opt(11, 0),
             dport=syn.sport)
    sent = [p for p in h.pkts() if p.payload]
    assert sum(len(p.payload) for p in sent) == 100 and all(not p.options for p in sent)


def test_without_an_mss_option_segments_are_536_bytes(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open(synack_opts=b"")
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"z" * 1200)
    assert [len(p.payload) for p in h.pkts()] == [536, 536, 128]


def test_segments_larger_than_target_mss_are_split(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open(synack_opts=MSS_512)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"z" * 1200)
    assert [(len(p.payload), p.flags) for p in h.pkts()] == [
        (512, TH_ACK), (512, TH_ACK), (176, TH_ACK | TH_PSH)]  # PSH on the last piece
    h.client(TH_ACK, CISN + 1201, SISN + 1, b"y" * 600)  # captured without PSH: none
    assert [(len(p.payload), p.flags) for p in h.pkts()] == [(512, TH_ACK), (88, TH_ACK)]


def test_segments_and_retransmissions_leave_room_for_the_timestamp_option(isns):
    """The target's MSS counts the 12 bytes of the timestamp option too: with timestamps
    on, no segment, first or retransmitted, carries more than MSS - 12 data bytes."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open(client_opts=MSS_OPT + ts_opt(5000, 0), synack_opts=MSS_512 + ts_opt(777, 5000))
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"z" * 1200)

    def segs():
        return [(p.seq, len(p.payload), len(p.options)) for p in h.pkts()]
    assert segs() == [(CISN + 1, 500, 12), (CISN + 501, 500, 12), (CISN + 1001, 200, 12)]
    h.advance(250)  # RTO (the 200 ms floor): the first segment again, no larger, pushed
    (r,) = h.pkts()
    assert (r.seq, len(r.payload), len(r.options), r.flags) == (
        CISN + 1, 500, 12, TH_ACK | TH_PSH)
    h.target(TH_ACK, TISN + 1, CISN + 501, opts=ts_opt(800, 5200))  # partial ack: next hole
    assert segs() == [(CISN + 501, 500, 12)]
    h.target(TH_ACK, TISN + 1, CISN + 1001, opts=ts_opt(801, 5200))
    assert segs() == [(CISN + 1001, 200, 12)]
    h.target(TH_ACK, TISN + 1, CISN + 1201, opts=ts_opt(802, 5200))
    assert segs() == [] and h.e.st.rto_expired == 1 and h.e.st.retransmits == 3


@pytest.mark.parametrize("start", [0, 7 * SEC], ids=["at-0", "at-7s"])
@pytest.mark.parametrize("tsval", [5000, 2**32 - 5, 0x60000000, 0x90000000],
                         ids=["ts", "ts-wraps", "ts-2^30", "ts-2^31"])
def test_timestamps_echo_target_tsval_and_stay_monotonic(tsval, start):
    h = EngineRig()
    h.now = start
    h.open(client_opts=MSS_OPT + ts_opt(tsval, 0), synack_opts=MSS_OPT + ts_opt(777, tsval))
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.now += 10 * MS  # our TSval moves on by 10 (ms), across 2**32 in the "ts-wraps" case
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"a" * 5, opts=ts_opt(900, tsval + 1))
    h.target(TH_ACK | TH_PSH, TISN + 6, CISN + 4, b"a" * 5, opts=ts_opt(900, tsval + 1))
    vals = [parse_options(p.options)["ts"] for p in h.pkts() if p.flags == TH_ACK or p.payload]
    assert vals[-1][1] == 900 and vals[0][1] == 777
    assert all(not_before(b[0], a[0]) for a, b in zip(vals, vals[1:]))
    assert not_before(vals[0][0], tsval)
    # the client's clock: its SYN's TSval plus the ms since the SYN
    assert vals[-1][0] == (tsval + (h.now - start) // MS) & 0xFFFFFFFF


# -- capture defects ------------------------------------------------------------------

def test_duplicate_and_overlapping_captured_segments_are_trimmed(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"abcdef")
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"abcdef")     # retransmission
    h.client(TH_ACK | TH_PSH, CISN + 4, SISN + 1, b"defghi")     # overlap
    out = [p for p in h.pkts() if p.payload]
    assert [(p.seq, p.payload) for p in out] == [(CISN + 1, b"abcdef"), (CISN + 7, b"ghi")]
    assert h.e.st.client_dups == 1 and h.e.st.client_trimmed == 1


def test_gap_holds_later_data_until_filled(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 4, SISN + 1, b"def")
    assert h.pkts() == []
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"abc")
    assert [p.payload for p in h.pkts()] == [b"abc", b"def"]


def test_unfilled_gap_ends_as_capture_gap(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, gap_timeout=5 * SEC)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"abc")
    h.target(TH_ACK, TISN + 1, CISN + 4)
    h.client(TH_ACK | TH_PSH, CISN + 10, SISN + 1, b"later")
    h.pkts()
    h.advance(5100)
    assert any(p.flags & TH_RST for p in h.pkts())
    assert h.outcomes() == {"capture_gap": 1}


# -- closing --------------------------------------------------------------------------

def test_the_targets_fin_counts_as_a_byte_of_the_response(isns):
    """The captured ack counts the online server's FIN: a target that sends as many bytes
    and a FIN has completed the response by bytes (not just by closing)."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 12)  # after 10 bytes and the server's FIN
    h.target(TH_ACK | TH_PSH | TH_FIN, TISN + 1, CISN + 4, b"x" * 10)
    (fin,) = [p for p in h.pkts() if p.flags & TH_FIN]
    assert fin.seq == CISN + 4 and fin.ack == TISN + 12
    assert h.e.st.gate_bytes == 1 and h.e.st.gate_closed == 0
    h.advance(500)  # our FIN is never acked: cut short, the response was complete
    h.e.close_all(h.now)
    assert h.outcomes() == {"completed": 1}


def test_a_target_that_closed_first_is_given_the_linger_time_then_ended(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, linger=10 * SEC)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH | TH_FIN, TISN + 1, CISN + 4, b"resp")
    h.advance(9900)
    assert h.e.active() == 1
    h.advance(200)
    assert h.outcomes() == {"completed": 1}


def test_a_fin_released_after_the_targets_fin_keeps_the_response_count(isns):
    """The target closed first; the client's FIN (a new group) carries an older ack than
    an earlier pure ACK: the online server's last 10 bytes never came."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH | TH_FIN, TISN + 1, CISN + 4, b"x" * 10)
    h.client(TH_ACK, CISN + 4, SISN + 21)
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 11)
    assert [p for p in h.pkts() if p.flags & TH_FIN]
    h.advance(500)  # our FIN never acked
    h.e.close_all(h.now)
    assert h.outcomes() == {"unfinished": 1}


def test_target_closes_first_then_client_fin(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH | TH_FIN, TISN + 1, CISN + 4, b"resp")
    acks = h.pkts()[-1]
    assert acks.ack == TISN + 6 and not acks.flags & TH_RST
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 6)
    (fin,) = h.pkts()
    assert fin.flags & TH_FIN and fin.ack == TISN + 6
    h.target(TH_ACK, TISN + 6, CISN + 5)
    assert h.outcomes() == {"completed": 1}
    assert (C, 5000, T, 80) in h.e.time_wait  # the target holds TIME_WAIT: don't reuse


def test_rst_from_target(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK, TISN + 1, CISN + 4)
    h.pkts()
    h.target(TH_RST | TH_ACK, TISN + 1, CISN + 4)
    assert h.pkts() == []
    assert h.outcomes() == {"reset_by_target": 1}
    assert ("release", (C, 5000, T, 80)) in h.log


def test_an_rst_without_ack_does_not_refuse_our_syn(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.target(TH_RST, 0, CISN + 1)  # its ack field matches, but no ACK flag: not for us
    assert h.outcomes() == {}
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    assert b"req" in [p.payload for p in h.pkts()]


def test_a_syn_ack_with_more_flags_establishes(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.pkts()
    h.target(TH_SYN | TH_ACK | TH_ECE, TISN, CISN + 1, opts=MSS_OPT)  # ECN-setup SYN-ACK
    (ack,) = h.pkts()
    assert ack.flags == TH_ACK and ack.ack == TISN + 1


def test_connection_refused(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.pkts()
    h.target(TH_RST | TH_ACK, 0, CISN + 1)
    assert h.outcomes() == {"reset_by_target": 1}
    assert h.pkts() == []  # no RST for an RST


@pytest.mark.parametrize("wrong", ["synack-bad-ack", "ack-only"])
def test_only_a_syn_ack_acking_our_syn_establishes(isns, wrong):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.pkts()
    if wrong == "synack-bad-ack":
        h.target(TH_SYN | TH_ACK, TISN, CISN + 7, opts=MSS_OPT)
    else:  # e.g. a challenge ACK: the right number, no SYN
        h.target(TH_ACK, TISN, CISN + 1)
    (rst,) = h.pkts()
    assert rst.flags == TH_RST and rst.ack == 0 and rst.seq == (
        CISN + 7 if wrong == "synack-bad-ack" else CISN + 1)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    assert h.pkts() == []  # not established: the request waits
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    assert [p.payload for p in h.pkts()] == [b"", b"req"]


def test_rest_of_a_failed_session_is_ignored_not_a_new_session(isns):
    """Refused before its data was due (a target restarting): the captured connection's
    later packets are the failed session's, not a new mid-stream session's (one outcome,
    no fake SYN); its captured SYN again or FIN changes nothing; a new ISN is a new one."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.target(TH_RST | TH_ACK, 0, CISN + 1)
    h.pkts()
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)                         # SYN retransmitted
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 9)
    assert h.pkts() == [] and h.e.st.sessions == 1 and h.e.st.fake_syn == 0
    assert h.outcomes() == {"reset_by_target": 1} and h.e.st.pkts_ignored == 4
    h.client(TH_ACK, CISN + 5, SISN + 10)          # after the FIN: as any stray ACK
    assert h.pkts() == [] and h.e.st.sessions == 1
    h.client(TH_SYN, CISN + 100000, 0, opts=MSS_OPT)              # same 4-tuple, new ISN
    (syn,) = h.pkts()
    assert syn.flags == TH_SYN and syn.seq == CISN + 100000 and h.e.st.sessions == 2


def test_early_close_reconnects_on_a_new_port(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"resp1")
    h.target(TH_ACK | TH_FIN, TISN + 6, CISN + 5)  # target closes (keep-alive limit)
    h.pkts()
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 6, b"req2")
    out = h.pkts()
    rst = [p for p in out if p.flags & TH_RST]
    syn = [p for p in out if p.flags & TH_SYN]
    assert rst and rst[0].sport == 5000
    assert rst[0].seq == CISN + 5 and rst[0].ack == TISN + 7  # after resp1 and the FIN
    assert len(syn) == 1 and syn[0].seq == CISN + 4 and syn[0].sport != 5000
    newport = syn[0].sport
    assert ("claim", (C, newport, T, 80)) in h.log
    h.log.clear()
    tisn2 = TISN - 2  # the new connection's ISN (crossing 2**32 where TISN does)
    h.target(TH_SYN | TH_ACK, tisn2, CISN + 5, opts=MSS_OPT, dport=newport)
    out = h.pkts()
    assert [p.payload for p in out if p.payload] == [b"req2"]
    assert out[-1].sport == newport and out[-1].ack == tisn2 + 1 and out[-1].seq == CISN + 5
    h.target(TH_ACK | TH_PSH, tisn2 + 1, CISN + 9, b"resp2", dport=newport)
    h.client(TH_ACK | TH_FIN, CISN + 9, SISN + 11)
    h.target(TH_ACK | TH_FIN, tisn2 + 6, CISN + 10, dport=newport)
    assert h.e.st.reconnections == 1
    assert h.outcomes() == {"reconnected": 1}


def test_the_idle_timeout_counts_from_the_syn_ack(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, idle_timeout=5 * SEC)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.advance(3000)  # the SYN was retransmitted: the SYN-ACK comes at 3 s
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    h.advance(4900)
    assert h.e.active() == 1
    h.advance(200)  # 5 s after the SYN-ACK, nothing to send, nothing heard
    assert h.outcomes() == {"timed_out": 1}


def test_data_with_an_older_captured_ack_stays_in_its_group(isns):
    """A segment whose captured ack is older than the group's (a reordered capture) is
    part of the group being sent, not a new one."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"r" * 10)
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 11, b"req2")
    h.client(TH_ACK | TH_PSH, CISN + 9, SISN + 1, b"more")  # the ack before the response
    assert [p.payload for p in h.pkts() if p.payload] == [b"req1", b"req2", b"more"]


def test_no_synack_times_out_with_rst(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, connect_timeout=3 * SEC)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.pkts()
    h.advance(2900)
    out = h.pkts()
    assert all(p.flags == TH_SYN for p in out) and len(out) == 1  # retransmitted at 1 s
    h.advance(200)
    (rst,) = h.pkts()
    assert rst.flags & TH_RST and rst.seq == CISN + 1
    assert h.outcomes() == {"no_synack": 1}


def test_a_syn_cut_short_by_the_end_is_unfinished_one_sent_again_no_synack(isns):
    """At the end of the input, a session waiting for its SYN-ACK is "no_synack" (check the
    route) only if its SYN already went unanswered for an RTO and was sent again; one sent a
    moment before the end is "unfinished" (raise --drain), as the truth of it."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns, connect_timeout=30 * SEC)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.advance(1500)  # retransmitted at 1 s
    assert [p.flags for p in h.pkts()] == [TH_SYN, TH_SYN]
    h.e.close_all(h.now)
    assert h.outcomes() == {"no_synack": 1}
    h = EngineRig(isns, connect_timeout=30 * SEC)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.advance(100)
    assert [p.flags for p in h.pkts()] == [TH_SYN]
    h.e.close_all(h.now)
    assert h.outcomes() == {"unfinished": 1}


def test_idle_timeout_with_pending_data(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, idle_timeout=30 * SEC, keepalive_timeout=60 * SEC)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")  # waits for a response
    h.advance(29_000)
    assert h.e.active() == 1
    h.advance(2_000)
    assert h.outcomes() == {"timed_out": 1}


def test_close_all_resets_unfinished_sessions(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open(sport=5000)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req", sport=5000)
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"ok")
    h.open(sport=5001)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req", sport=5001)
    h.client(TH_ACK | TH_PSH, CISN + 4, SISN + 500, b"req2", sport=5001)
    h.pkts()
    h.now += 10 * MS
    assert not h.e.quiescent(h.now)
    h.e.close_all(h.now)
    rsts = [p for p in h.pkts() if p.flags & TH_RST]
    assert sorted(p.sport for p in rsts) == [5000, 5001]
    assert h.outcomes() == {"completed": 1, "unfinished": 1}


def test_client_rst_forwarded_after_response(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(TH_RST | TH_ACK, CISN + 4, SISN + 11)
    assert not [p for p in h.pkts() if p.flags & TH_RST]
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"x" * 10)
    (rst,) = [p for p in h.pkts() if p.flags & TH_RST]
    assert rst.seq == CISN + 4
    assert h.outcomes() == {"completed": 1}


def test_client_rst_goes_at_once_when_the_response_is_complete(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"x" * 10)
    h.pkts()
    h.client(TH_RST | TH_ACK, CISN + 4, SISN + 11)  # nothing awaited: no timer, no event
    (rst,) = h.pkts()
    assert rst.flags & TH_RST and rst.seq == CISN + 4
    assert h.outcomes() == {"completed": 1} and h.e.st.gate_bytes == 1


def test_client_rst_without_ack_flag_has_no_captured_ack(isns):
    """An RST without the ACK flag: its ack field is no captured ack (neither for gating
    nor as the online server's bytes seen)."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns, quiet=100 * MS)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"x" * 5)
    h.pkts()
    h.client(TH_RST, CISN + 4, SISN + 4)  # "acks" 3 bytes: ignored, the quiet rule holds
    assert h.pkts() == []
    h.advance(110)
    assert len([p for p in h.pkts() if p.flags & TH_RST]) == 1
    assert h.e.st.gate_quiet == 1 and h.e.st.gate_bytes == 0
    # a held RST without ACK: close_all judges the last response by the real acks
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"r" * 10)
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 11, b"req2")
    h.target(TH_ACK, TISN + 11, CISN + 9)  # no response to req2, as online
    h.client(TH_RST, CISN + 9, SISN + 5000)  # held: the gate timeout
    assert not [p for p in h.pkts() if p.flags & TH_RST]
    h.e.close_all(h.now)
    assert h.outcomes() == {"completed": 1}


@pytest.mark.parametrize("acks", [[10], [1], [2**31, 10], [10, 0]],
                         ids=["10", "1", "half-space-then-10", "10-then-older"])
def test_the_online_response_size_is_the_latest_captured_ack(isns, acks):
    """The drain's view of the last response: the latest captured ack in serial number
    order, however small its advance; an ack half the space away or an older one (a
    retransmission) is not later."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    for a in acks:
        h.client(TH_ACK, CISN + 4, SISN + 1 + a)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")  # a retransmission (older ack)
    h.target(TH_ACK, TISN + 1, CISN + 4)
    h.advance(500)
    assert not h.e.quiescent(h.now)
    h.e.close_all(h.now)
    assert h.outcomes() == {"unfinished": 1}


def test_segments_without_the_ack_flag_carry_no_captured_ack(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)  # (the handshake ACK is missing)
    h.client(TH_PSH, CISN + 1, SISN - 99)      # no ACK flag, no data: ignored
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    h.pkts()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")  # the first group: at once
    assert [p.payload for p in h.pkts()] == [b"req1"]
    h.client(TH_PSH, CISN + 5, SISN + 5000, b"more")  # no ACK flag: the same group
    assert [p.payload for p in h.pkts()] == [b"more"]
    assert h.e.st.gate_bytes + h.e.st.gate_quiet + h.e.st.gate_timeout == 0
    h.target(TH_ACK, TISN + 1, CISN + 9)
    h.advance(500)  # nor is its ack field a response the online server gave
    assert h.e.quiescent(h.now)
    h.e.close_all(h.now)
    assert h.outcomes() == {"completed": 1}


def test_data_and_fin_in_one_captured_segment(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH | TH_FIN, CISN + 1, SISN + 1, b"bye")
    (d,) = h.pkts()  # the FIN waits for the data's ack and the response, as a bare FIN
    assert d.payload == b"bye" and not d.flags & TH_FIN
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"ok")
    h.advance(110)  # quiet
    (fin,) = [p for p in h.pkts() if p.flags & TH_FIN]
    assert fin.seq == CISN + 4 and fin.ack == TISN + 3 and not fin.payload
    h.target(TH_ACK | TH_FIN, TISN + 3, CISN + 5)
    assert [p.ack for p in h.pkts()] == [TISN + 4]
    assert h.outcomes() == {"completed": 1}


@pytest.mark.parametrize("end", [TH_FIN, TH_RST | TH_ACK], ids=["fin", "rst"])
def test_nothing_the_client_sends_after_its_fin_or_rst_goes_out(isns, end):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(end | TH_ACK, CISN + 4, SISN + 11)  # held until the response
    h.client(TH_ACK | TH_PSH, CISN + 4, SISN + 11, b"late")   # at the FIN/RST's number
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 11, b"later")  # after it
    h.client(TH_ACK, CISN + 5, SISN + 11)                     # a pure ACK: no data
    assert [p.payload for p in h.pkts()] == [b"req"]
    assert h.e.st.client_dups == 2
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"x" * 10)
    (last,) = h.pkts()
    assert last.flags & end and not last.payload and last.seq == CISN + 4


def test_sessions_keyed_on_full_four_tuple():
    rules = parse_transfer("80-10.2.0.5:8080,81-10.2.0.5:8081")
    h = EngineRig(rules=rules)
    h.client(TH_ACK | TH_PSH, 100, SISN, b"a", dport=80)
    h.client(TH_ACK | TH_PSH, 900, SISN, b"b", dport=81)  # same client port, other service
    syns = h.pkts()
    assert [(p.seq, p.dport) for p in syns] == [(99, 8080), (899, 8081)]
    assert h.e.active() == 2


def test_sampling_is_deterministic_per_client():
    h = EngineRig(sample_pct=30)
    for port in range(6000, 6100):
        h.client(TH_SYN, CISN, 0, opts=MSS_OPT, sport=port)
    picked = {p.sport for p in h.pkts()}
    assert 10 < len(picked) < 60
    assert h.e.st.outcomes["filtered"] == 100 - len(picked)


# -- mapping, parsing, timing -----------------------------------------------------------

def test_transfer_list_parsing():
    r = parse_transfer("80-10.0.0.5:8080, 10.1.1.1:81-10.0.0.6:8081,"
                       "[2001:db8::1]:443-[2001:db8::5]:8443,82@00:11:22:33:44:55-10.0.0.7:80")
    assert [(x.online_port, x.target_port) for x in r] == [(80, 8080), (81, 8081),
                                                          (443, 8443), (82, 80)]
    m = Mapper(r)
    assert m.target(ip_bytes("192.0.2.1"), 80) == (ip_bytes("10.0.0.5"), 8080)
    assert m.target(ip_bytes("10.1.1.1"), 81) == (ip_bytes("10.0.0.6"), 8081)
    assert m.target(ip_bytes("10.1.1.2"), 81) is None  # other local address
    assert m.target(ip_bytes("2001:db8::1"), 443) == (ip_bytes("2001:db8::5"), 8443)
    assert m.target(ip_bytes("192.0.2.1"), 443) is None
    for bad in ("80", "80-10.0.0.5", "x-10.0.0.5:1", "80-10.0.0.5:0", "10.0.0.1:80-[::1]:80"):
        with pytest.raises(UsageError):
            parse_transfer(bad)


def test_target_and_any_port():
    m = Mapper(parse_target("10.0.0.5:8080", False))
    assert m.target(O, 8080) == (ip_bytes("10.0.0.5"), 8080) and m.target(O, 80) is None
    m = Mapper(parse_target("10.0.0.5", True))
    assert m.target(O, 443) == (ip_bytes("10.0.0.5"), 443)
    m = Mapper(parse_target("10.0.0.5:8080", True))
    assert m.target(O, 443) == (ip_bytes("10.0.0.5"), 8080)
    m = Mapper(parse_target("[2001:db8::5]:80", False))
    assert m.target(ip_bytes("2001:db8::1"), 80) == (ip_bytes("2001:db8::5"), 80)
    assert m.target(O, 80) is None  # an IPv4 session is not sent to an IPv6 target


def test_server_to_client_packets_ignored():
    h = EngineRig()
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.pkts()
    h.e.client_packet(build_tcp(O, C, 80, 5000, SISN, CISN + 1, TH_SYN | TH_ACK), h.now)
    h.e.client_packet(build_tcp(O, C, 80, 5000, SISN + 1, CISN + 1, TH_ACK, payload=b"x"),
                      h.now)
    assert h.pkts() == [] and h.e.st.pkts_server == 2 and h.e.active() == 1


def test_server_datagram_test_agrees_with_the_engine():
    """The raw-bytes test tc-session runs before queueing says "server->client" only for
    datagrams the engine itself counts as server->client; other forms go the parsed way."""
    v6 = ip_bytes("2001:db8::1")
    frag = bytearray(build_tcp(O, C, 80, 5000, 1, 1, TH_ACK))
    frag[7] = 8  # a non-first fragment: no TCP header where one is expected
    with_opts = bytearray(build_tcp(O, C, 80, 5000, 1, 1, TH_ACK))
    with_opts[0] = 0x46  # IP options: not the plain form the fast test reads
    datagrams = {
        "from service": build_tcp(O, C, 80, 5000, 1, 1, TH_ACK, payload=b"resp"),
        "SYN-ACK from service": build_tcp(O, C, 80, 5000, 1, 1, TH_SYN | TH_ACK),
        "to service": build_tcp(C, O, 5000, 80, 1, 1, TH_ACK, payload=b"req"),
        "other port": build_tcp(O, C, 81, 5000, 1, 1, TH_ACK),
        "IPv6 from service": build_tcp(v6, v6, 80, 5000, 1, 1, TH_ACK),
        "fragment": bytes(frag),
        "IP options": bytes(with_opts),
        "short": b"\x45\x00",
    }
    expect_fast = {"from service", "SYN-ACK from service"}
    for rules in (parse_target("10.2.0.5:80", False),
                  parse_transfer("10.1.0.1:80-10.2.0.5:80"),
                  parse_transfer("10.1.0.9:80-10.2.0.5:80")):
        test = Mapper(rules).server_datagram_test()
        exact_elsewhere = rules[0].online_ip == ip_bytes("10.1.0.9")
        for name, d in datagrams.items():
            fast = test(d)
            assert fast == (name in expect_fast and not exact_elsewhere), (rules, name)
            if fast:  # the engine, given it, counts it as server->client too
                e = Engine(Mapper(rules), lambda *a: None, Config())
                e.client_packet(d, 1)
                assert e.st.pkts_server == 1 and not e.sessions, name
    assert Mapper(parse_target("10.2.0.5", True)).server_datagram_test() is None  # any port


def test_ipv6_session(isns):
    CISN, TISN, SISN = isns
    c6, o6, t6 = (ip_bytes(x) for x in ("2001:db8::2", "2001:db8::1", "2001:db8::5"))
    out = []
    e = Engine(Mapper(parse_target("[2001:db8::5]:80", False)),
               lambda d, sid, now: out.append(parse_tcp(d)), Config())
    e.client_packet(build_tcp(c6, o6, 5000, 80, CISN + 1, SISN + 1, TH_ACK | TH_PSH,
                              payload=b"hi"), 0)
    e.feedback_packet(build_tcp(t6, c6, 80, 5000, TISN, CISN + 1, TH_SYN | TH_ACK,
                                options=MSS_OPT), 1)
    assert [(p.version, p.dst, p.flags, p.seq) for p in out] == [
        (6, t6, TH_SYN, CISN), (6, t6, TH_ACK, CISN + 1), (6, t6, TH_ACK | TH_PSH, CISN + 1)]
    assert out[-1].payload == b"hi" and out[-1].ack == TISN + 1


def test_due_queue_replays_recorded_offsets():
    q = DueQueue()
    q.push(1_000 * SEC, "a", now=50 * SEC)
    q.push(1_000 * SEC + 300 * MS, "b", now=50 * SEC + 1 * MS)
    q.push(1_000 * SEC + 200 * MS, "c", now=50 * SEC + 1 * MS)  # out of order: not earlier
    assert q.pop_due(50 * SEC) == ["a"]
    assert q.next_due() == 50 * SEC + 300 * MS
    assert q.pop_due(50 * SEC + 299 * MS) == []
    assert q.pop_due(50 * SEC + 300 * MS) == ["b", "c"]
    assert DueQueue(asap=True).due_time(5, now=77) == 77


def test_due_queue_keeps_its_anchor_for_live_records():
    """Unlike tc-pace, tc-session's input schedule does not move its anchor for live records
    that came quicker than the first: offsets from a connection's accept are counted
    between its due times, which would shift (test_offsets_count_between_due_times...)."""
    w = 1_800_000_000 * SEC  # the wall clock when the stream begins
    stamps = [w, w + 10 * MS, w + 20 * MS]
    reads = [w + 5 * MS, w + 10 * MS + 100_000, w + 20 * MS + 50_000]
    q, inline = DueQueue(), DueQueue()
    for ts, now in zip(stamps, reads):
        q.push(ts, ts, now)
        inline.push_records([(ts, ts)], now, None)
    want = [ts + 5 * MS for ts in stamps]  # the first record's latency, for all
    assert [due for due, _ in q.q] == want == [due for due, _ in inline.q]


def test_stream_parser_incremental():
    import cbor2

    from tcpcopylib.errors import StreamError
    from tcpcopylib.records import encode_section, header

    data = encode_section(header("t")) + b"".join(
        cbor2.dumps({"t": "pkt", "ts": i, "data": b"x" * i}) for i in range(20))
    p = StreamParser()
    got = []
    for i in range(0, len(data), 7):
        got += p.feed(data[i:i + 7])
    p.close()
    assert [r["ts"] for r in got] == list(range(20))
    p = StreamParser()
    p.feed(data[:-3])
    with pytest.raises(StreamError):
        p.close()
    with pytest.raises(StreamError):
        StreamParser().feed(b"GET / HTTP/1.0\r\n")


def test_tuple_in_time_wait_kept_for_captured_syn_avoided_by_fake_syn():
    h = EngineRig()
    h.e.time_wait[(C, 5000, T, 80)] = 10 * SEC
    h.e.time_wait[(C, 5001, T, 80)] = 10 * SEC
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT, sport=5000)           # as the client did
    h.client(TH_ACK | TH_PSH, 9, 9, b"mid", sport=5001)           # our own fake SYN
    a, b = h.pkts()
    assert a.sport == 5000 and b.sport != 5001
    assert h.e.st.port_remaps == 1


def test_captured_port_reuse_starts_a_new_session(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH | TH_FIN, TISN + 1, CISN + 4, b"resp")
    h.client(TH_ACK | TH_FIN, CISN + 4, SISN + 6)
    h.target(TH_ACK, TISN + 6, CISN + 5)
    assert h.outcomes() == {"completed": 1}
    h.pkts()
    h.client(TH_SYN, CISN + 100000, 0, opts=MSS_OPT)              # same 4-tuple, new ISN
    (syn,) = h.pkts()
    assert syn.sport == 5000 and syn.seq == CISN + 100000
    assert h.e.st.sessions == 2


def test_captured_syn_again_is_a_retransmission_unless_its_isn_changed(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT)  # the client's SYN retransmission, captured
    assert [(p.flags, p.seq) for p in h.pkts()] == [(TH_SYN, CISN)]
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT)
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    assert [p.payload for p in h.pkts() if p.payload] == [b"req"]
    assert h.e.st.sessions == 1 and h.outcomes() == {}
    h.client(TH_SYN, CISN + 100000, 0, opts=MSS_OPT)  # the port reused while still open
    rst, syn = h.pkts()
    assert rst.flags & TH_RST and rst.seq == CISN + 4
    assert syn.flags == TH_SYN and syn.seq == CISN + 100000
    assert h.e.st.sessions == 2 and h.outcomes() == {"unfinished": 1}


def test_a_captured_session_whose_port_is_reused_before_its_replay_ends_goes_on(isns):
    """Behind a busy capture the client may already have finished a connection and opened
    the next one on the same 4-tuple while the replay of the first still waits for the
    target: the first (its FIN captured: its script is whole) goes on to its end beside
    the new one, which gets another client port, instead of being cut short."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")  # after 100 bytes of answer
    h.client(TH_ACK | TH_FIN, CISN + 9, SISN + 201)
    assert [p.payload for p in h.pkts()] == [b"req1"]  # req2 waits for the answer
    h.client(TH_SYN, CISN + 100000, 0, opts=MSS_OPT)  # the 4-tuple again, a new ISN
    (syn,) = h.pkts()  # no RST for the first one
    assert syn.flags == TH_SYN and syn.seq == CISN + 100000 and syn.sport != 5000
    assert h.e.st.set_aside == 1 and h.e.active() == 2 and h.outcomes() == {}
    # the first session's answers reach it by its own client port
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"r" * 100)
    assert [p.payload for p in h.pkts() if p.payload] == [b"req2"]
    h.target(TH_ACK | TH_PSH, TISN + 101, CISN + 9, b"s" * 100)
    (fin,) = [p for p in h.pkts() if p.flags & TH_FIN]
    assert fin.sport == 5000 and fin.seq == CISN + 9
    h.target(TH_ACK | TH_FIN, TISN + 201, CISN + 10)
    h.pkts()
    assert h.outcomes() == {"completed": 1}
    # the new connection is a session of its own, on its own port
    h.now += MS
    h.client(TH_ACK, CISN + 100001, SISN + 5001)
    h.target(TH_SYN | TH_ACK, TISN + 7000, CISN + 100001, opts=MSS_OPT, dport=syn.sport)
    h.client(TH_ACK | TH_PSH, CISN + 100001, SISN + 5001, b"next")
    assert [(p.sport, p.payload) for p in h.pkts() if p.payload] == [(syn.sport, b"next")]
    assert h.e.st.sessions == 2


def test_a_session_whose_port_is_reused_before_its_end_was_captured_is_cut_short(isns):
    """Without its FIN or RST (lost by the capture, say) the old session cannot know its
    end: it ends with the outcome it has reached, the new one takes the 4-tuple."""
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 101, b"req2")
    h.pkts()
    h.client(TH_SYN, CISN + 100000, 0, opts=MSS_OPT)
    rst, syn = h.pkts()
    assert rst.flags & TH_RST and syn.flags == TH_SYN and syn.seq == CISN + 100000
    assert h.e.st.set_aside == 0 and h.outcomes() == {"unfinished": 1}


def test_drain_waits_for_the_last_response_the_client_acknowledged(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(TH_ACK, CISN + 4, SISN + 1 + 50)  # online, the client got 50 bytes back
    h.target(TH_ACK, TISN + 1, CISN + 4)
    h.advance(500)
    assert not h.e.quiescent(h.now)  # the response is still expected
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"r" * 50)
    h.advance(200)
    assert h.e.quiescent(h.now)
    h.e.close_all(h.now)
    assert h.outcomes() == {"completed": 1}


def test_last_request_without_response_is_unfinished(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.client(TH_ACK, CISN + 4, SISN + 1 + 50)
    h.target(TH_ACK, TISN + 1, CISN + 4)
    h.advance(500)
    h.e.close_all(h.now)
    assert h.outcomes() == {"unfinished": 1}


def test_a_later_request_without_its_response_is_unfinished(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req1")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 5, b"r" * 10)
    h.client(TH_ACK | TH_PSH, CISN + 5, SISN + 11, b"req2")
    h.client(TH_ACK, CISN + 9, SISN + 16)  # online, req2 got 5 bytes back
    h.target(TH_ACK, TISN + 11, CISN + 9)
    h.advance(500)
    assert not h.e.quiescent(h.now)
    h.e.close_all(h.now)
    assert h.outcomes() == {"unfinished": 1}


def test_data_resent_on_a_new_connection_has_no_captured_ack_to_wait_for(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_RST, TISN + 1, 0)  # reset before acking req: it goes again, reconnected
    (syn,) = [p for p in h.pkts() if p.flags & TH_SYN]
    h.target(TH_SYN | TH_ACK, TISN, CISN + 1, opts=MSS_OPT, dport=syn.sport)
    assert [p.payload for p in h.pkts() if p.payload] == [b"req"]
    h.target(TH_ACK, TISN + 1, CISN + 4, dport=syn.sport)
    h.advance(500)
    assert h.e.quiescent(h.now)
    h.e.close_all(h.now)
    assert h.outcomes() == {"reconnected": 1}


def test_any_port_replays_every_service_and_tells_directions():
    h = EngineRig(rules=parse_target("10.2.0.5", True))
    h.client(TH_SYN, CISN, 0, opts=MSS_OPT, sport=40000, dport=6379)
    h.e.client_packet(build_tcp(O, C, 6379, 40000, SISN, CISN + 1, TH_SYN | TH_ACK), h.now)
    h.client(TH_ACK | TH_PSH, 77, 9, b"mid", sport=40001, dport=443)   # mid-stream
    h.e.client_packet(build_tcp(O, C, 443, 40002, 5, 9, TH_ACK, payload=b"srv"), h.now)
    out = h.pkts()
    assert [(p.sport, p.dport, p.flags) for p in out] == [(40000, 6379, TH_SYN),
                                                          (40001, 443, TH_SYN)]
    assert h.e.st.pkts_server == 2


def test_truncated_captured_packet_is_not_sent(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, gap_timeout=SEC)
    h.open()
    full = build_tcp(C, O, 5000, 80, CISN + 1, SISN + 1, TH_ACK | TH_PSH, payload=b"x" * 100)
    h.e.client_packet(full[:80], h.now)  # snap length 80
    h.client(TH_ACK | TH_PSH, CISN + 101, SISN + 1, b"next")
    assert h.pkts() == [] and h.e.st.pkts_truncated == 1
    h.advance(1100)
    assert h.outcomes() == {"capture_gap": 1}


def test_keepalive_timeout_for_an_idle_session_with_nothing_pending(isns):
    CISN, TISN, SISN = isns
    h = EngineRig(isns, idle_timeout=30 * SEC, keepalive_timeout=60 * SEC)
    h.open()
    h.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"req")
    h.target(TH_ACK | TH_PSH, TISN + 1, CISN + 4, b"resp")
    h.advance(45_000)  # beyond -t: an idle keep-alive connection survives
    assert h.e.active() == 1
    h.advance(16_000)
    assert any(p.flags & TH_RST for p in h.pkts())
    assert h.outcomes() == {"completed": 1}
