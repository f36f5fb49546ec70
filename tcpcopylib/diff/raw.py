"""Any other TCP protocol: exchanges from turn-taking in time, compared byte for byte.

A request is the client's bytes up to the moment the server answered; its response is
what the server sent until the client spoke again. The original's turns come from the
capture's timestamps, the target's from the times tc-session sent each request.
"""

from __future__ import annotations

from tcpcopylib.diff.model import Diff, Message, first_difference

NAME = "raw"


def first_word(data: bytes) -> str:
    word = data[:32].split(None, 1)[0] if data[:32].strip() else b""
    if word and all(32 < c < 127 for c in word[:16]):
        return word[:16].decode("ascii")
    return "raw"


def runs(half):
    """[(offset, ts)] of the runs of a HalfStream-like object (each run's first arrival)."""
    c = half._assemble() if hasattr(half, "_assemble") else None
    if c is not None:
        return list(zip(c[2], c[3]))
    return list(zip(half.offsets, half.stamps))


def split_by_turns(client, server) -> tuple[list, list]:
    """(requests, responses) of the original, from the two halves' arrival times."""
    data = client.bytes
    if not data:
        return [], []
    events = [(ts, 0, off) for off, ts in runs(client)] + \
        [(ts, 1, off) for off, ts in runs(server)]
    events.sort()
    starts = []  # client offsets where a request starts
    server_seen = True
    for ts, side, off in events:
        if side == 0:
            if server_seen:
                starts.append(off)
                server_seen = False
        else:
            server_seen = bool(starts)  # server bytes before any request: a greeting
    requests = [Message(s, e, endpoint=first_word(data[s:e]))
                for s, e in zip(starts, starts[1:] + [len(data)])]
    times = [client.time_at(m.start) for m in requests]
    return requests, split_at_times(server, times)


def split_at_times(server, request_times: list) -> list:
    """The server's bytes cut where each next request was sent: bytes that arrived
    before request i+1 (and after request i) answer request i."""
    data = server.bytes
    r = runs(server)
    out = []
    for i, t0 in enumerate(request_times):
        t1 = request_times[i + 1] if i + 1 < len(request_times) else None
        start = end = None
        for j, (off, ts) in enumerate(r):
            if ts is None or t0 is None or ts < t0 or (t1 is not None and ts >= t1):
                continue
            run_end = r[j + 1][0] if j + 1 < len(r) else len(data)
            start = off if start is None else start
            end = run_end
        out.append(Message(start, end) if start is not None else None)
    return out


def compare(req: Message, a: Message, b: Message) -> list:
    a, b = a.info["bytes"], b.info["bytes"]
    if a == b:
        return []
    at, sa, sb = first_difference(a, b)
    return [Diff("bytes", sa, sb, at=at)]
