"""tc-session's fast paths: the timer heap, the due queue. (Its record encoder,
wire.encode_pkt_sid: test_wire.py's golden test.)"""

import random


def test_ended_sessions_leave_the_timer_heap():
    """An ended session's timer entries are dropped (not kept until they come due, up to
    -k seconds later): the heap stays small and the session is freed."""
    import gc

    from tcpcopylib.packet import TH_ACK, TH_RST, TH_SYN
    from tcpcopylib.session.engine import Session
    from tcpcopylib.testing import EngineRig

    h = EngineRig()
    CISN = h.isns.client
    h.e._compact_min = h.e._compact_at = 256  # as COMPACT_MIN, smaller: a faster test
    n = 1500
    for i in range(n):
        sport = 10_000 + i
        h.client(TH_SYN, CISN, 0, sport=sport)
        h.target(TH_RST | TH_ACK, 0, CISN + 1, dport=sport)  # refused: the session ends
        h.pkts()
    assert h.e.st.outcomes["reset_by_target"] == n and not h.e.sessions
    assert len(h.e.heap) < 600
    gc.collect()
    assert sum(isinstance(o, Session) for o in gc.get_objects()) < 600


def test_push_records_equals_push_one_by_one():
    from tcpcopylib.session.timing import DueQueue

    rnd = random.Random(5)
    recs = []
    for i in range(300):
        kind = rnd.random()
        if kind < 0.1:
            recs.append({"t": "stats", "n": i})
        elif kind < 0.15:
            recs.append({"t": "pkt", "ts": 5, "data": "not bytes"})
        else:
            ts = rnd.choice([None, 1.5, 10**18 + rnd.randrange(-10**9, 10**9)])
            recs.append({"t": "pkt", "ts": ts, "data": bytes([i % 256])})
            if rnd.random() < 0.5 and type(ts) is int:  # as StreamParser.feed(AS_PKT) gives
                recs[-1] = (ts, bytes([i % 256]))
    assert sum(type(r) is tuple for r in recs) > 30
    for asap, speed in ((False, 1.0), (True, 1.0), (False, 2.5)):
        a, b = DueQueue(asap, speed), DueQueue(asap, speed)
        other_a, other_b = [], []
        for k in range(0, 300, 37):
            now = 10**18 + k * 1000
            a.push_records(recs[k:k + 37], now, other_a.append)
            for rec in recs[k:k + 37]:
                if type(rec) is tuple:
                    b.push(*rec, now)
                elif rec["t"] != "pkt":
                    other_b.append(rec)
                elif isinstance(rec["data"], bytes):
                    b.push(rec["ts"], rec["data"], now)
        assert list(a.q) == list(b.q) and other_a == other_b
        assert a.last_due == b.last_due


def test_speed_divides_the_recorded_offsets():
    from tcpcopylib.session.timing import DueQueue

    now = 10**18
    for speed, want in ((1.0, [0, 300, 900]), (3.0, [0, 100, 300]), (0.5, [0, 600, 1800])):
        q = DueQueue(speed=speed)
        q.push_records([(5 * 10**17 + ms * 10**6, b"p") for ms in (0, 300, 900)], now,
                       None)
        assert [(due - now) // 10**6 for due, _ in q.q] == want, speed


def test_push_records_drop_keeps_the_anchor():
    """Dropped packets (the server->client half) are not queued, but the first of them
    still anchors the timeline: the packets after it keep their recorded offsets."""
    from tcpcopylib.session.timing import DueQueue

    q = DueQueue()
    now = 10**18
    recs = [(1000, b"s1"), (1500, b"c1"), {"t": "note"}, (2500, b"s2"), (3000, b"c2")]
    other = []
    dropped = q.push_records(recs, now, other.append, lambda d: d[:1] == b"s")
    assert dropped == 2 and other == [{"t": "note"}]
    assert list(q.q) == [(now + 500, b"c1"), (now + 2000, b"c2")]
