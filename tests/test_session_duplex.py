"""Duplex sessions (the server speaks on its own) in the tc-session engine, on a fake clock.

The rule (engine.py's docstring, tc-session(1) "Duplex sessions") is learned from the
captured client packets alone: their acks (the server bytes the client had seen) and their
times. Request/response sessions must stay gated exactly as before.
"""

from seqnums import isns  # noqa: F401 (isns: a fixture)

from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH
from tcpcopylib.session.engine import LATE_BOUNDS
from tcpcopylib.session.report import (end_logger, lateness, quantile_bound, stats_dict,
                                       summary_lines)
from tcpcopylib.testing import MS, SEC, EngineRig

DATA = TH_ACK | TH_PSH


def rig(isns, **cfg):
    """An EngineRig whose target acknowledges nothing and that retransmits nothing within
    a test (a long RTO): what it sends is what the gates released."""
    return EngineRig(isns, rto_min=60 * SEC, **cfg)


def opened(h, isns):
    """The captured handshake (SYN, the client's ACK 1 ms later) and the target's SYN-ACK
    as the captured ACK is due: the target accepts when the online server did."""
    CISN, TISN, SISN = isns
    h.client(0x02, CISN, 0)
    h.now += MS
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.target(0x12, TISN, CISN + 1)
    h.pkts()


def payloads(h):
    return [p.payload for p in h.pkts() if p.payload]


def subscribed(h, isns, push_every_ms=100):
    """A redis-like subscription: SUBSCRIBE, its 10-byte reply, then two pushes (20 and 30
    bytes) that the client acknowledged with pure ACKs, push_every_ms apart. Returns the
    captured ack after them."""
    CISN, TISN, SISN = isns
    opened(h, isns)
    h.client(DATA, CISN + 1, SISN + 1, b"SUBSCRIBE")
    assert payloads(h) == [b"SUBSCRIBE"]
    h.target(DATA, TISN + 1, CISN + 10, b"r" * 10)       # the target's reply
    h.advance(1)
    h.client(TH_ACK, CISN + 10, SISN + 11)              # the reply
    h.advance(push_every_ms)
    h.client(TH_ACK, CISN + 10, SISN + 31)              # push 1, unprompted
    h.advance(push_every_ms)
    h.client(TH_ACK, CISN + 10, SISN + 61)              # push 2, unprompted
    return SISN + 61


def test_a_server_pushing_twice_unprompted_makes_the_session_duplex(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    said = []
    h.e.on_end = end_logger(said.append, 2)
    cack = subscribed(h, isns)
    assert h.e.st.duplex == 1
    # the client's next command acknowledges 60 bytes the target never sent: not held
    h.client(DATA, CISN + 10, cack, b"PING")
    assert payloads(h) == [b"PING"]
    # nor its FIN, while the target keeps pushing (it never goes quiet)
    h.target(TH_ACK, TISN + 11, CISN + 14, b"p" * 7)
    h.client(TH_ACK | TH_FIN, CISN + 14, cack + 40)
    h.advance(10)
    h.target(TH_ACK, TISN + 18, CISN + 14, b"p" * 7)
    assert any(p.flags & TH_FIN for p in h.pkts())
    assert h.e.st.gate_bytes + h.e.st.gate_quiet + h.e.st.gate_timeout == 0
    h.e.close_all(h.now)
    assert len(said) == 1 and said[0].endswith(" (duplex)"), said


def test_client_data_held_before_the_session_turned_duplex_goes_when_it_does(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    h.client(DATA, CISN + 1, SISN + 1, b"SUBSCRIBE")
    h.advance(1)
    h.client(TH_ACK, CISN + 10, SISN + 11)
    h.advance(100)
    h.client(DATA, CISN + 10, SISN + 31, b"PING")       # after push 1: gated, as a request
    assert payloads(h) == [b"SUBSCRIBE"]
    h.advance(100)
    h.client(TH_ACK, CISN + 14, SISN + 51)              # push 2 (PING was data: prompted)
    assert payloads(h) == [] and h.e.st.duplex == 0
    h.advance(100)
    h.client(TH_ACK, CISN + 14, SISN + 71)              # push 3, unprompted
    assert payloads(h) == [] and h.e.st.duplex == 0
    h.advance(100)
    h.client(TH_ACK, CISN + 14, SISN + 91)              # push 4: twice in a row
    assert h.e.st.duplex == 1
    assert payloads(h) == [b"PING"]


def test_one_late_advance_is_a_delayed_ack_not_a_push(isns):
    """A response whose tail the client acknowledged 200 ms later (a delayed ACK) leaves
    the next request gated: one unprompted advance is not enough."""
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    h.client(DATA, CISN + 1, SISN + 1, b"req1")
    h.advance(1)
    h.client(TH_ACK, CISN + 5, SISN + 2897)
    h.advance(200)
    h.client(TH_ACK, CISN + 5, SISN + 3001)             # the odd last segment
    h.advance(300)
    h.client(DATA, CISN + 5, SISN + 3001, b"req2")
    assert payloads(h) == [b"req1"]
    h.target(DATA, TISN + 1, CISN + 5, b"r" * 3000)
    assert payloads(h) == [b"req2"]
    assert h.e.st.duplex == 0 and h.e.st.gate_bytes == 1


def test_the_servers_fin_is_no_push(isns):
    """An idle keep-alive connection closed by the server: the client's ack of the FIN
    (one byte) is not the server speaking."""
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    h.client(DATA, CISN + 1, SISN + 1, b"req1")
    h.advance(1)
    h.client(TH_ACK, CISN + 5, SISN + 101)
    h.advance(300)
    h.client(TH_ACK, CISN + 5, SISN + 201)              # unprompted, once
    h.advance(5000)
    h.client(TH_ACK, CISN + 5, SISN + 202)              # the server's FIN
    assert h.e.st.duplex == 0


def test_a_client_speaking_again_without_new_server_bytes_did_not_wait(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    h.client(DATA, CISN + 1, SISN + 1, b"msg1")
    h.advance(80)
    h.client(DATA, CISN + 5, SISN + 1, b"msg2")          # nothing new from the server
    assert h.e.st.duplex == 1
    h.advance(30)
    h.client(TH_ACK, CISN + 9, SISN + 41)                # a push
    h.advance(30)
    h.client(DATA, CISN + 9, SISN + 41, b"msg3")
    assert payloads(h) == [b"msg1", b"msg2", b"msg3"]


def test_a_pipelined_burst_is_no_duplex(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    for i in range(3):
        h.client(DATA, CISN + 1 + 4 * i, SISN + 1, b"req%d" % i)
        h.advance(2)
    h.advance(1)
    h.client(DATA, CISN + 13, SISN + 301, b"req3")
    assert payloads(h) == [b"req0", b"req1", b"req2"]
    assert h.e.st.duplex == 0


def test_the_gap_counts_twice_the_handshakes_round_trip(isns):
    """Over a long path (captured SYN to ACK 100 ms) pushes 200 ms apart are round trips,
    not silences: 50 ms + 2 x 100 ms is the gap that counts."""
    CISN, TISN, SISN = isns
    h = rig(isns)
    h.client(0x02, CISN, 0)
    h.advance(100)
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.target(0x12, TISN, CISN + 1)
    h.client(DATA, CISN + 1, SISN + 1, b"req")
    for k in range(1, 4):
        h.advance(200)
        h.client(TH_ACK, CISN + 4, SISN + 1 + 1000 * k)
    assert h.e.st.duplex == 0
    for k in range(4, 6):
        h.advance(300)
        h.client(TH_ACK, CISN + 4, SISN + 1 + 1000 * k)
    assert h.e.st.duplex == 1


def test_push_gap_zero_turns_detection_off(isns):
    CISN, TISN, SISN = isns
    h = rig(isns, push_gap=0)
    cack = subscribed(h, isns)
    h.client(DATA, CISN + 10, cack, b"PING")
    # gated as a request: the target sent 10 bytes of the 60 and went quiet long ago
    assert payloads(h) == [b"PING"]
    assert h.e.st.duplex == 0 and h.e.st.gate_quiet == 1


def test_an_http_upgrade_continues_duplex_once_the_target_answered(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    req = (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    h.client(DATA, CISN + 1, SISN + 1, req)
    c = CISN + 1 + len(req)
    h.advance(2)
    # the first frame followed the 101 (129 bytes) and a 300-byte push: it waits for the
    # target's 101, not for as many bytes (the target pushes what it pushes)
    h.client(DATA, c, SISN + 430, b"\x81\x02hi")
    assert payloads(h) == [req]
    h.target(DATA, TISN + 1, c, b"H" * 129)
    assert payloads(h) == [b"\x81\x02hi"]
    assert h.e.st.duplex == 1
    # later frames go on their timing, whatever the server pushed meanwhile
    h.advance(20)
    h.client(DATA, c + 4, SISN + 130 + 500, b"\x81\x02yo")
    assert payloads(h) == [b"\x81\x02yo"]


def test_a_request_mentioning_upgrade_in_its_body_only_is_no_upgrade(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    h.client(DATA, CISN + 1, SISN + 1, b"GET /?q=upgrade:x HTTP/1.1\r\nHost: x\r\n\r\n")
    h.advance(1)
    h.client(DATA, CISN + 40, SISN + 101, b"GET / HTTP/1.1\r\n\r\n")
    h.target(DATA, TISN + 1, CISN + 40, b"r" * 100)
    h.advance(5)
    h.client(DATA, CISN + 58, SISN + 201, b"GET / HTTP/1.1\r\n\r\n")
    assert len(payloads(h)) == 2 and h.e.st.duplex == 0


def test_release_lateness_is_counted_per_client_segment(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    h.client(DATA, CISN + 1, SISN + 1, b"req1")          # at once
    h.client(DATA, CISN + 5, SISN + 101, b"req2")        # waits for the response
    h.advance(30)
    h.target(DATA, TISN + 1, CISN + 5, b"r" * 100)
    assert payloads(h) == [b"req1", b"req2"]
    late = h.e.late
    assert sum(late) == 2
    assert late[0] == 1 and late[LATE_BOUNDS.index(50 * MS)] == 1
    assert h.e.late_sum == 30 * MS
    d = lateness(h.e)
    assert d["count"] == 2 and d["buckets"]["0.001"] == 1 and d["buckets"]["0.05"] == 2
    assert d["sum_s"] == 0.03 and d["buckets"]["+Inf"] == 2
    assert quantile_bound(d, 0.5) == "0.001" and quantile_bound(d, 0.99) == "0.05"
    h.e.claims = None  # (the rig's claims have no feedback client's counters)
    assert stats_dict(h.e)["release_lateness"] == d and stats_dict(h.e)["duplex"] == 0
    assert any(line.startswith("release lateness") and "p99 <= 50 ms" in line
               for line in summary_lines(h.e))


def test_duplex_data_keeps_its_offset_from_a_late_accept(isns):
    """The target accepted 30 ms after the online server did (the SYN-ACK came back late):
    client data goes 30 ms after it is due, at its offset from the accept, before the
    session turns duplex and after (a gated request's gate adds nothing to it:
    test_session_engine.py)."""
    CISN, TISN, SISN = isns
    h = rig(isns)
    h.client(0x02, CISN, 0)
    h.now += MS
    h.client(TH_ACK, CISN + 1, SISN + 1)
    h.advance(30)
    h.target(0x12, TISN, CISN + 1)
    h.pkts()
    h.client(DATA, CISN + 1, SISN + 1, b"msg1")
    assert payloads(h) == []                            # (not duplex yet: the same)
    h.advance(29)
    assert payloads(h) == []
    h.advance(1)
    assert payloads(h) == [b"msg1"]
    h.advance(50)
    h.client(DATA, CISN + 5, SISN + 1, b"msg2")         # 80 ms on, did not wait: duplex
    assert h.e.st.duplex == 1 and payloads(h) == []
    h.advance(29)
    assert payloads(h) == []
    h.advance(1)
    assert payloads(h) == [b"msg2"]
    assert h.e.late[LATE_BOUNDS.index(50 * MS)] == 2    # each 30 ms after it was due


def test_a_duplex_stream_respects_a_zero_window_and_keeps_no_pushed_bytes(isns):
    """Hours of pushes cost nothing: the target's data is acknowledged, not kept; client
    data that did not wait still waits for the target's window."""
    import tracemalloc

    CISN, TISN, SISN = isns
    h = rig(isns)
    cack = subscribed(h, isns)
    assert h.e.st.duplex == 1
    s = next(iter(h.e.sessions.values()))
    t = TISN + 11
    tracemalloc.start()
    for i in range(1000):  # the target pushes 1 MB, and shuts its window
        h.target(TH_ACK, t, CISN + 10, b"p" * 1000, win=0 if i == 999 else 65535)
        t += 1000
        h.advance(1)
        h.pkts()
        h.sent.clear()  # (the rig's own record of what was sent)
    grown = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert grown < 200_000, grown
    assert s.rcv_nxt == t - TISN - 1
    h.client(DATA, CISN + 10, cack + 1_000_000, b"PING")
    h.advance(1)
    assert payloads(h) == [] and h.e.st.window_waits >= 1
    h.target(TH_ACK, t, CISN + 10, win=65535)           # the window opens
    assert payloads(h) == [b"PING"]


def test_a_redis_subscribe_continues_duplex_once_answered(isns):
    """A subscriber's PINGs acknowledge the messages pushed to it: once SUBSCRIBE was
    answered, they go on their recorded timing, whatever the target pushed."""
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    sub = b"*2\r\n$9\r\nSUBSCRIBE\r\n$3\r\nch0\r\n"
    h.client(DATA, CISN + 1, SISN + 1, sub)
    c = CISN + 1 + len(sub)
    h.advance(1)
    h.client(TH_ACK, c, SISN + 31)                       # the 30-byte confirmation
    h.advance(60)
    ping = b"*1\r\n$4\r\nPING\r\n"
    h.client(DATA, c, SISN + 31 + 50, ping)              # after a 50-byte message
    assert payloads(h) == [sub]
    h.target(DATA, TISN + 1, c, b"c" * 30)              # the target's confirmation only
    assert payloads(h) == [ping] and h.e.st.duplex == 1
    h.advance(70)
    h.client(DATA, c + len(ping), SISN + 31 + 50 + 14 + 400, ping)
    assert payloads(h) == [ping]


def test_other_redis_commands_are_request_response(isns):
    CISN, TISN, SISN = isns
    h = rig(isns)
    opened(h, isns)
    get = b"*2\r\n$3\r\nGET\r\n$9\r\nSUBSCRIBE\r\n"         # a key named SUBSCRIBE
    h.client(DATA, CISN + 1, SISN + 1, get)
    h.advance(1)
    h.client(DATA, CISN + 1 + len(get), SISN + 11, get)
    assert payloads(h) == [get] and h.e.st.duplex == 0
