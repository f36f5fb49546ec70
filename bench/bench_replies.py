#!/usr/bin/env python3
"""Replies in the fleet: tc-feedback direct vs through the broker, latency and CPU per reply.

    python3 bench/bench_replies.py [--rates 500,2000] [--duration 5] [--sessions 2000]

On loopback. A generator stands for tc-intercept: it writes fb records (replies to the
client ports of --sessions claimed sessions, in turn) at a steady rate, each stamped with
the wall clock when written ("ts"). A FeedbackClient (tc-session's own end of the channel)
claims the sessions and reads the replies; a reply's latency is the time it is read minus
its "ts". The two routes:

    direct:  generator | tc-feedback --listen tcp:127.0.0.1:P      <- client
    broker:  generator | tc-publish --stream replies --by-port-block 1
             tc-subscribe --stream replies -p 0/1 | tc-feedback --listen unix:S  <- client
             (one nats-server with JetStream, file storage)

Printed per route and rate: replies delivered, latency p50/p99/max, and the CPU (user +
system) of the route's processes (tc-feedback; or tc-publish, nats-server, tc-subscribe
and tc-feedback) per reply, with the ratios broker / direct.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import natskit  # noqa: E402
from tcpcopylib.feedback import FeedbackClient  # noqa: E402
from tcpcopylib.packet import TH_ACK, build_tcp  # noqa: E402
from tcpcopylib.records import RecordWriter, header  # noqa: E402
from tcpcopylib.testing import tool_env, tool_path  # noqa: E402
from tcpcopylib.wire import encode_fb  # noqa: E402

CLK = 100  # USER_HZ
CLIENT, TARGET = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
PORT0 = 20000


def cpu_s(pid) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK  # utime, stime


def wait_for(path_or_port, timeout=15.0):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if isinstance(path_or_port, int):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", path_or_port)) == 0:
                    return
        elif os.path.exists(path_or_port):
            return
        time.sleep(0.05)
    raise SystemExit(f"not ready: {path_or_port}")


def replies(sessions):
    """The datagrams of one reply per session, in turn (ACK+PSH with a little payload)."""
    return [build_tcp(TARGET, CLIENT, 80, PORT0 + i, 5000, 1000, TH_ACK, payload=b"ok")
            for i in range(sessions)]


def run_route(route, rate, duration, sessions, work, url=None, conn=()):
    env = tool_env()
    procs = []
    if route == "direct":
        port = natskit.free_port()
        addr = f"tcp:127.0.0.1:{port}"
        fb = subprocess.Popen([tool_path("tc-feedback"), "--listen", addr],
                              stdin=subprocess.PIPE, env=env, stderr=subprocess.DEVNULL)
        procs.append(fb)
        feed = fb.stdin
        wait_for(port)
    else:
        sock = str(work / f"fb-{rate}.sock")
        addr = f"unix:{sock}"
        pub = subprocess.Popen([tool_path("tc-publish"), *conn, "--stream", "replies",
                                "--by-port-block", "1"],
                               stdin=subprocess.PIPE, env=env)
        time.sleep(1.0)  # the stream exists before the subscriber looks
        sub = subprocess.Popen([tool_path("tc-subscribe"), *conn, "--stream", "replies",
                                "-p", "0/1"], stdout=subprocess.PIPE, env=env)
        fb = subprocess.Popen([tool_path("tc-feedback"), "--listen", addr],
                              stdin=sub.stdout, env=env, stderr=subprocess.DEVNULL)
        sub.stdout.close()
        procs += [pub, sub, fb]
        feed = pub.stdin
        wait_for(sock)
        time.sleep(1.0)  # the consumer is there
    client = FeedbackClient(addr, name="bench")
    client.connect()
    for i in range(sessions):
        client.claim(CLIENT, PORT0 + i, TARGET, 80)
    client.flush()
    time.sleep(0.5)
    datas = replies(sessions)
    writer = RecordWriter(feed.fileno(), header("tc-intercept"))
    writer.flush()
    pids = [p.pid for p in procs] + ([nats_pid] if route == "broker" else [])
    cpu0 = sum(cpu_s(p) for p in pids)
    lat = []
    tick = 0.005  # a write every 5 ms, as a capture writes what one read gave
    per_tick = max(1, round(rate * tick))
    total = int(rate * duration)
    sent = 0
    t0 = time.monotonic()
    poll = select.poll()
    poll.register(client.fileno(), select.POLLIN)

    def receive(wait_ms):
        if poll.poll(wait_ms):
            now = time.time_ns()
            for r in client.read_available():
                lat.append(now - r["ts"])

    while sent < total:
        due = t0 + (sent // per_tick) * tick
        while time.monotonic() < due:
            receive(max(0, int((due - time.monotonic()) * 1000)))
        ts = time.time_ns()
        for _ in range(per_tick):
            d = datas[sent % sessions]
            writer.buf += encode_fb(ts, d, len(d))
            sent += 1
        writer.flush()
    end = time.monotonic() + 5.0
    while len(lat) < sent and time.monotonic() < end:
        receive(100)
    cpu1 = sum(cpu_s(p) for p in pids)
    client.close()
    feed.close()
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6) if lat else (lambda q: 0)
    return {"sent": sent, "got": len(lat), "p50": pct(0.5), "p99": pct(0.99),
            "max": lat[-1] / 1e6 if lat else 0, "cpu_us": (cpu1 - cpu0) / max(1, sent) * 1e6}


nats_pid = None


def main():
    global nats_pid
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="500,2000")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--sessions", type=int, default=2000)
    a = ap.parse_args()
    rates = [int(x) for x in a.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        natskit.nats_server_binary()
        srv = natskit.NatsServer(work, "n0", port=natskit.free_port(),
                                 auth={"token": natskit.TOKEN})
        srv.start()
        nats_pid = srv.proc.pid
        conn = ["-s", srv.url, "--token-file", str(natskit.token_file(work))]
        try:
            rows = []
            for rate in rates:
                d = run_route("direct", rate, a.duration, a.sessions, work)
                b = run_route("broker", rate, a.duration, a.sessions, work, conn=conn)
                rows.append((rate, d, b))
        finally:
            srv.stop()
    print(f"{'rate/s':>7} {'route':>7} {'got/sent':>12} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'CPU us/reply':>13}")
    for rate, d, b in rows:
        for name, r in (("direct", d), ("broker", b)):
            print(f"{rate:>7} {name:>7} {r['got']:>6}/{r['sent']:<5} {r['p50']:>8.2f} "
                  f"{r['p99']:>8.2f} {r['max']:>8.2f} {r['cpu_us']:>13.1f}")
        print(f"{rate:>7} {'b/d':>7} {'':>12} {b['p50'] / max(d['p50'], 1e-3):>8.1f} "
              f"{b['p99'] / max(d['p99'], 1e-3):>8.1f} {'':>8} "
              f"{b['cpu_us'] / max(d['cpu_us'], 1e-3):>13.1f}")


if __name__ == "__main__":
    main()
