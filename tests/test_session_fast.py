"""tc-session's hand-made encodings equal what cbor2 writes."""

import random

import cbor2

from tcpcopylib.cli.session import encode_pkt


def test_encode_pkt_is_cbor2_byte_for_byte():
    rnd = random.Random(7)
    sizes = [0, 1, 23, 24, 40, 255, 256, 1500, 65535, 65536]
    sids = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
    stamps = [0, 23, 2**32 - 1, 2**32, 1_700_000_000_123_456_789, 2**64 - 1]
    for n in sizes:
        for sid in sids:
            for ts in stamps:
                data = rnd.randbytes(n)
                want = cbor2.dumps({"t": "pkt", "ts": ts, "data": data, "sid": sid})
                assert encode_pkt(ts, data, sid) == want, (n, sid, ts)


def test_ended_sessions_leave_the_timer_heap():
    """An ended session's timer entries are dropped (not kept until they come due, up to
    -k seconds later): the heap stays small and the session is freed."""
    import gc

    from test_session_engine import CISN, TH_ACK, TH_RST, TH_SYN, H

    from tcpcopylib.session.engine import Session

    h = H()
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
