"""A rewriting stage in a pipe: records in, records out, through a StreamRewriter.

Records that are not client packets of a rewritten connection are written as they were
read (their bytes, where the reader kept them); a rewritten packet's record keeps its
other keys and gets the new "ts"/"data" (and "tag" if the connection has one); "len"
(a capture's cut) goes, since a rewritten datagram is whole.
"""

from __future__ import annotations

from tcpcopylib.records import HEADER, RecordReader, StageWriter
from tcpcopylib.wire import T_PKT, encode_pkt


def pkt_bytes(rec: dict, ts: int, data: bytes, tag) -> bytes:
    """The record of a rewritten packet, from the record it replaces."""
    if tag is None and all(k in ("t", "ts", "data", "len") for k in rec):
        return encode_pkt(ts, data)
    import cbor2

    new = {k: v for k, v in rec.items() if k != "len"}
    new["ts"], new["data"] = ts, data
    if tag is not None:
        new["tag"] = tag
    return cbor2.dumps(new)


def run_rewriter(rewriter, fd: int, writer: StageWriter, name: str) -> int:
    """Pass the stream on fd through rewriter to writer; returns the records read."""
    reader = RecordReader(fd, on_idle=writer.flush, headers=True, name=name)
    last_ts = 0
    rec = {"t": T_PKT}
    n = 0
    for rec_in, raw in reader.iter_raw():
        n += 1
        if raw is HEADER:
            writer.section(rec_in)
            continue
        data = rec_in.get("data")
        if rec_in.get("t") == T_PKT and type(data) is bytes:
            ts = rec_in.get("ts", 0)
            if type(ts) is int and ts > last_ts:
                last_ts = ts
            out = rewriter.packet(ts, data)
            if out is not None:
                rec = rec_in
                for t, d, tag in out:
                    writer.write_raw(pkt_bytes(rec_in, t, d, tag))
                continue
        if raw is not None:
            writer.write_raw(raw)
        else:
            writer.write(rec_in)
    for t, d, tag in rewriter.finish(last_ts):
        writer.write_raw(pkt_bytes(rec, t, d, tag))
    return n
