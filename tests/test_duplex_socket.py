"""Duplex sessions (servers that speak on their own) recorded and replayed on loopback,
in socket mode (tc-session --socket: the gates are forged mode's, no root needed).

Real servers and clients: a WebSocket server pushing frames of random size on its own
timer with WebSocket clients sending on theirs (the `websockets` package), redis-server
with SUBSCRIBE and PSUBSCRIBE clients and a publisher on another connection, a
Server-Sent Events stream and long polls (tests/servers/push_server.py, push_clients.py),
and, in the same capture, request/response HTTP, a greeting protocol and pipelining
(recording_server.py, traffic_client.py). Relays (tests/servers/tap_proxy.py) log both
directions with times; tests/tapcap.py turns the logs into a pcap with the client's ACKs
of server data. The replay goes into the same servers behind new relays, whose logs show
when each client message arrived, against its recorded offset from the connection's start.
"""

from __future__ import annotations

import os
import sys

import pytest

import tapcap
from tapcap import gated_late, is_duplex_kind, offsets_late
from test_socket_mode import (PY, SERVERS, client, p99, pair, procs, recording_server,  # noqa: F401
                              redis_server, run_replay, traffic)

pytest.importorskip("websockets")


def push_server(procs, tmp, name, mode) -> int:  # noqa: F811 (procs: the fixture)
    ready = tmp / f"{name}.ready"
    p = procs.start([PY, str(SERVERS / "push_server.py"), "--listen", "127.0.0.1:0",
                     "--mode", mode, "--ready", str(ready)])
    return tapcap.wait_ready(str(ready), p)


def push_clients(mode, port, *extra):
    import json

    out = json.loads(client(PY, str(SERVERS / "push_clients.py"), mode, "--server",
                            f"127.0.0.1:{port}", *extra).splitlines()[-1])
    assert not out["errors"] and out["conns"] > 0, out


def summary(xs) -> str:
    xs = sorted(xs)
    return (f"{len(xs)} requests: p50 {xs[len(xs) // 2]:.2f} ms, p99 {p99(xs):.2f} ms, "
            f"max {xs[-1]:.2f} ms")


def test_duplex_and_request_response_sessions_replay_byte_exact_and_on_time(tmp_path, procs):  # noqa: F811
    upstream = {"ws": push_server(procs, tmp_path, "ws", "ws"),
                "sse": push_server(procs, tmp_path, "sse", "sse"),
                "redis": redis_server(procs, tmp_path),
                "http": recording_server(procs, tmp_path, "http"),
                "greet": recording_server(procs, tmp_path, "greet", "greeting")}
    online = {k: tapcap.Tap(p, tmp_path / f"on-{k}") for k, p in upstream.items()}
    try:
        push_clients("ws", online["ws"].port, "--conns", "3", "--messages", "12")
        push_clients("redis", online["redis"].port, "--conns", "3", "--messages", "8")
        push_clients("sse", online["sse"].port, "--conns", "2", "--messages", "6")
        traffic("mixed", online["http"].port, "--conns", "2", "--requests", "6")
        traffic("greeting", online["greet"].port, "--conns", "2", "--requests", "6")
    finally:
        for t in online.values():
            t.stop()
    pcap = tmp_path / "duplex.pcap"
    tapcap.pcap([t.log_dir for t in online.values()], pcap, acks=True)
    kinds = {k: [is_duplex_kind(k, c) for c in online[k].connections()] for k in upstream}
    n_duplex_kind = sum(sum(v) for v in kinds.values())
    # Timing on a shared machine: a run whose p99 is over the limit (CPU bursts of other
    # processes) is run again, at most twice; every run must be byte-exact and complete.
    # Defaults catch a wrong gate (a request held for pushes: 100 ms and more) but not a
    # loaded machine's jitter; the bounds are TC_DUPLEX_P99_MS=20, TC_TIMING_P99_MS=5.
    duplex_limit = float(os.environ.get("TC_DUPLEX_P99_MS", "40"))
    gated_limit = float(os.environ.get("TC_TIMING_P99_MS", "25"))
    for attempt in range(3):
        dx, gated, st = replay(tmp_path / f"run{attempt}", pcap, online, upstream)
        print(f"\nrun {attempt + 1}: duplex sessions {summary(dx)}; request/response "
              f"sessions {summary(gated)}; release lateness {st['release_lateness']}",
              file=sys.stderr)
        if p99([abs(x) for x in dx]) <= duplex_limit and \
                p99([abs(x) for x in gated]) <= gated_limit:
            break
    assert p99([abs(x) for x in dx]) <= duplex_limit
    assert p99([abs(x) for x in gated]) <= gated_limit
    # every WebSocket session and redis subscriber turned duplex (after its Upgrade, its
    # SUBSCRIBE); the event streams may have (their pushes); no request/response session did
    assert sum(kinds["ws"]) + sum(kinds["redis"]) <= st["duplex"] <= n_duplex_kind, \
        (st["duplex"], kinds)


def replay(tmp, pcap, online, upstream):
    """Replay into the same servers behind new relays: every connection's client bytes
    exact, every session completed; the lateness (ms) of duplex and request/response
    sessions' requests, and the stats."""
    import time

    tmp.mkdir()
    target = {k: tapcap.Tap(p, tmp / f"tg-{k}") for k, p in upstream.items()}
    rules = ",".join(f"{online[k].port}-127.0.0.1:{target[k].port}" for k in upstream)
    try:
        r, st = run_replay(tmp, pcap, rules, "--drain", "3")
    finally:
        time.sleep(0.3)
        for t in target.values():
            t.stop()
    dx, gated, worst = [], [], []
    for k in upstream:
        rec, rep = online[k].connections(), target[k].connections()
        assert len(rep) == len(rec) >= 2, k
        assert sorted(c.c2s for c in rep) == sorted(c.c2s for c in rec), k
        for a, b in pair(rec, rep):
            if is_duplex_kind(k, a):
                late = offsets_late(a, b)
                dx += late
                worst.append((max(late), k, a.name, late.index(max(late)), len(late)))
            else:
                late = gated_late(a, b)
                gated += late
                if late:
                    worst.append((max(late), k, a.name, late.index(max(late)), len(late)))
    n = sum(len(t.connections()) for t in target.values())
    assert st["outcomes"]["completed"] == n == st["sessions"], st
    print("worst request per connection (ms, server, connection, index, of):",
          sorted(worst, reverse=True)[:4], file=sys.stderr)
    return dx, gated, st
