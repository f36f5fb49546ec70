"""Request timing in the namespace lab, forged mode, offline and live: duplex sessions
(servers that speak on their own) and request/response, greeting and pipelined sessions.

On the online host and on the target host the same real server runs behind a relay that
logs, per connection, every byte of each direction and when it arrived
(tests/servers/tap_proxy.py on the service port, the server on 127.0.0.1): a WebSocket
server pushing frames of random size on its own timer (tests/servers/push_server.py),
redis-server with subscribers and a publisher, Server-Sent Events and long polls, and the
recording server (HTTP keep-alive, pipelined; a greeting protocol). Real clients on the
client host (push_clients.py, traffic_client.py) talk to the online host.

offline: tcpdump on cli0, then tc-readpcap | tc-session | tc-pace | tc-emit (+ tc-intercept
| tc-feedback on the assistant); live: tc-capture cli0 | tc-session | tc-pace | tc-emit while
the clients run. Each client message must reach the target byte-exact and, counted from
the connection's accept, as soon after as it reached the online server (a request/response
request: or right after the target's own answer to the one before, when that came later).
The bounds (p99) default to values that catch a wrong gate, not a loaded machine's jitter:
TC_DUPLEX_P99_MS (default 40; the issue's bound is 20) and TC_TIMING_P99_MS (default 25;
5 on a quiet machine). The measured p50/p99 are printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import replay_harness as h
import tapcap
from tapcap import gated_late, is_duplex_kind, offsets_late

pytestmark = pytest.mark.netns

PY = sys.executable
SERVERS = Path(__file__).resolve().parent / "servers"
PORT = 8081          # the service port (the relay), online and target
BACKEND = 9001       # the real server behind the relay, on 127.0.0.1

# kind -> (server argv, client argv after the script, or traffic_client scenario + args)
KINDS = {
    "ws": ([PY, str(SERVERS / "push_server.py"), "--mode", "ws", "--listen",
            f"127.0.0.1:{BACKEND}"], ["push", "ws", "--conns", "2", "--messages", "10"]),
    "redis": (["redis-server", "--port", str(BACKEND), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"], ["push", "redis", "--conns", "2", "--messages", "6"]),
    "sse": ([PY, str(SERVERS / "push_server.py"), "--mode", "sse", "--listen",
             f"127.0.0.1:{BACKEND}"], ["push", "sse", "--conns", "2", "--messages", "5"]),
    "http": (None, ["traffic", "keepalive", "--conns", "2", "--requests", "5"]),
    "pipelined": (None, ["traffic", "pipelined", "--conns", "2", "--requests", "5"]),
    "greeting": ("greeting", ["traffic", "greeting", "--conns", "2", "--requests", "4"]),
}


def start_service(lab, host, kind, workdir, port=PORT) -> list:
    """The kind's server on 127.0.0.1:BACKEND in host and a relay on [::]:port logging to
    workdir/KIND-HOST; returns both processes (the relay first)."""
    server, _ = KINDS[kind]
    if server is None or server == "greeting":
        server = [PY, str(SERVERS / "recording_server.py"), "--listen", f"127.0.0.1:{BACKEND}",
                  "--log-dir", str(workdir / f"rec-{kind}-{host}"),
                  "--mode", "greeting" if server else "http"]
    if server[0] == "redis-server":
        d = workdir / f"redis-{host}"
        d.mkdir(exist_ok=True)
        server = [*server, "--dir", str(d)]
    srv = lab.start_server(host, server, port=BACKEND, timeout=10)
    tap = lab.start_server(host, [PY, str(SERVERS / "tap_proxy.py"), "--listen",
                                  f"[::]:{port}", "--upstream", f"127.0.0.1:{BACKEND}",
                                  "--log-dir", str(workdir / f"{kind}-{host}")],
                           port=port, timeout=10)
    return [tap, srv]


def stop_service(lab, procs) -> None:
    time.sleep(0.3)  # the last bytes relayed and logged
    for p in procs:
        lab.stop(p)


def run_clients(lab, kind, port=PORT) -> None:
    args = KINDS[kind][1]
    server = f"{lab.online_cli_ip}:{port}"
    if args[0] == "push":
        argv = [PY, str(SERVERS / "push_clients.py"), args[1], "--server", server, *args[2:]]
    else:
        argv = [PY, str(SERVERS / "traffic_client.py"), args[1], "--server", server, *args[2:]]
    r = lab.run("client", argv, capture_output=True, timeout=120)
    out = r.stdout.decode().strip().splitlines()
    assert r.returncode == 0 and out, (argv, r.stdout, r.stderr)
    assert not json.loads(out[-1]).get("errors"), out[-1]


def compare(kind, online_dir, target_dir, stats, diag=""):
    """Every connection's client bytes at the target exact; the lateness (ms) of its
    requests: (duplex ones, request/response ones)."""
    return compare_conns(kind, tapcap.connections(online_dir), tapcap.connections(target_dir),
                         stats, diag)


def compare_conns(kind, rec, rep, stats, diag=""):
    """compare() on connections (tapcap.Conn) read from the relays' logs or a capture."""
    assert len(rec) >= 2 and len(rep) == len(rec), (kind, len(rec), len(rep), stats, diag)
    assert sorted(c.c2s for c in rep) == sorted(c.c2s for c in rec), (kind, stats, diag)
    assert stats is not None and stats["outcomes"]["completed"] == len(rec), (stats, diag)
    by_bytes = {}
    for c in sorted(rep, key=lambda c: c.accept):
        by_bytes.setdefault(c.c2s, []).append(c)
    dx, gated, worst = [], [], []
    for a in sorted(rec, key=lambda c: c.accept):
        b = by_bytes[a.c2s].pop(0)
        late = offsets_late(a, b) if is_duplex_kind(kind, a) else gated_late(a, b)
        (dx if is_duplex_kind(kind, a) else gated).extend(late)
        if late:
            i = max(range(len(late)), key=lambda i: abs(late[i]))
            worst.append((round(late[i], 2), a.name, i, len(late)))
    print(f"\n{kind}: the worst request of each connection (ms, connection, index, of): "
          f"{sorted(worst, key=lambda w: -abs(w[0]))[:4]}", file=sys.stderr)
    return dx, gated


def p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def within_bounds(kind, mode, dx, gated, stats) -> bool:
    """Duplex requests: |offset difference| (early is as wrong as late); request/response
    requests: how late (one that reached the target early, counted from the accept, did so
    by the jitter of the relays' accept times, read in user space: every client message
    keeps its recorded offset from the target's accept, duplex or gated)."""
    dx_limit = float(os.environ.get("TC_DUPLEX_P99_MS", "40"))
    gated_limit = float(os.environ.get("TC_TIMING_P99_MS", "25"))
    print(f"\n{kind} {mode}: duplex requests {len(dx)} p50 {p(dx, .5):.2f} p99 {p(dx, .99):.2f}"
          f" min {p(dx, 0):.2f} ms; request/response requests {len(gated)} p50 "
          f"{p(gated, .5):.2f} p99 {p(gated, .99):.2f} min {p(gated, 0):.2f} ms; "
          f"{stats.get('duplex')} duplex sessions; release lateness "
          f"{stats.get('release_lateness', {}).get('buckets')}", file=sys.stderr)
    return (p([abs(x) for x in dx], .99) <= dx_limit
            and p([max(x, 0) for x in gated], .99) <= gated_limit)


def check_duplex_count(kind, stats, conns):
    if kind in ("ws", "redis"):  # after a 101, or a SUBSCRIBE's confirmation
        assert stats["duplex"] == sum(is_duplex_kind(kind, c) for c in conns), stats
    elif kind in ("http", "pipelined", "greeting"):
        assert stats["duplex"] == 0, stats


@pytest.mark.parametrize("kind", list(KINDS))
def test_offline_replay_keeps_each_requests_offset(lab, tmp_path, kind):
    work = tmp_path
    online = start_service(lab, "online", kind, work)
    pcap = work / f"{kind}.pcap"
    td = h.start_tcpdump(lab, "online", lab.online_cli_if, pcap, PORT)
    try:
        run_clients(lab, kind)
    finally:
        h.stop_tcpdump(td)
        stop_service(lab, online)
    # a shared machine: a replay over the bounds is run again, at most twice (to another
    # target port: the target still holds the last replay's connections in TIME_WAIT)
    for attempt in range(3):
        run = work / f"run{attempt}"
        run.mkdir()
        tport = PORT + 10 * attempt
        target = start_service(lab, "target", kind, run, tport)
        try:
            rep = h.replay(lab, pcap, run, port=PORT, target_port=tport, start_target=False,
                           trace=False, session_args=["--drain", "5", "--any-port"])
        finally:
            stop_service(lab, target)
        assert not rep.timed_out and rep.rc("tc-session") == 0, rep.diagnostics()
        dx, gated = compare(kind, work / f"{kind}-online", run / f"{kind}-target", rep.stats,
                            rep.diagnostics())
        check_duplex_count(kind, rep.stats, tapcap.connections(work / f"{kind}-online"))
        if within_bounds(kind, "offline", dx, gated, rep.stats):
            return
    pytest.fail(f"{kind}: request timing over the bounds in 3 replays (see stderr)")


@pytest.mark.parametrize("kind", list(KINDS))
def test_live_replay_keeps_each_requests_offset(lab, tmp_path, kind):
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        port = PORT + 10 * attempt  # (no TIME_WAIT of the last attempt on either host)
        target = start_service(lab, "target", kind, run, port)
        online = start_service(lab, "online", kind, run, port)
        live = h.start_live(lab, run, port=port, session_args=["--drain", "5"])
        try:
            run_clients(lab, kind, port)
            time.sleep(1.0)  # the replay's last requests reach the target
        finally:
            stats = live.stop()
            stop_service(lab, online)
            stop_service(lab, target)
        assert live.rc("tc-session") == 0, live.diagnostics()
        dx, gated = compare(kind, run / f"{kind}-online", run / f"{kind}-target", stats,
                            live.diagnostics())
        check_duplex_count(kind, stats, tapcap.connections(run / f"{kind}-online"))
        if within_bounds(kind, "live", dx, gated, stats):
            return
    pytest.fail(f"{kind}: live request timing over the bounds twice (see stderr)")
