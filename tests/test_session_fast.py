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
