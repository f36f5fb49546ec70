#!/usr/bin/env python3
"""Broker benchmark: records/s through tc-publish -> NATS JetStream -> tc-subscribe, and the
online host's CPU per packet with and without the broker.

    python3 bench/bench_broker.py [--records 200000] [--rate 300] [--duration 8] [--skip-live]

1. Throughput (loopback, one nats-server with JetStream, file storage): the records of
   examples/http-lab.pcap repeated (timestamps shifted) to --records packets, then
   - tc-publish of them into a 3-partition stream (records/s, CPU of tc-publish),
   - tc-subscribe --all of all partitions in one process (records/s),
   - three tc-subscribe -p K/3 at once (records/s together: wall time of the slowest).
2. Online host CPU (namespace lab, needs root): a client at --rate requests/s for
   --duration s against the online host's server; the online host runs either
   - "publish":  tc-capture cli0 | tc-publish  (the broker on a host of its own), or
   - "pipe":     tc-capture cli0 | tc-session | tc-pace | tc-emit  (today's online host), or
   - "send":     tc-capture cli0 | tc-session --send,
   and the CPU (user + system) of those processes over the packets captured is printed per
   form, with the ratio publish / pipe and publish / send.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import natskit  # noqa: E402
from tcpcopylib.testing import decode, stream, tool_env, tool_path  # noqa: E402

CLK = 100  # USER_HZ


def cpu_s(pid) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK  # utime, stime


def children_cpu_s(ru0, ru1) -> float:
    return (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


def make_records(n: int) -> bytes:
    r = subprocess.run([tool_path("tc-readpcap"), str(REPO / "examples" / "http-lab.pcap")],
                       capture_output=True, env=tool_env(), check=True)
    base = [x for x in decode(r.stdout) if x["t"] == "pkt"]
    span = base[-1]["ts"] - base[0]["ts"] + 1_000_000
    recs = []
    for i in range(n):
        rec = base[i % len(base)]
        recs.append({"t": "pkt", "ts": rec["ts"] + span * (i // len(base)), "data": rec["data"]})
    return stream(recs)


def timed(argv, **kw):
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, env=tool_env(), **kw)
    wall = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, wall, children_cpu_s(ru0, ru1)


def throughput(n: int, tmp: Path) -> None:
    data = make_records(n)
    src = tmp / "in.cbor"
    src.write_bytes(data)
    srv = natskit.NatsServer(tmp, "bench", port=natskit.free_port(),
                             auth={"token": natskit.TOKEN}).start()
    try:
        conn = ["-s", srv.url, "--token-file", str(natskit.token_file(tmp))]
        r, wall, cpu = timed([tool_path("tc-publish"), *conn, "--stream", "b", "-P", "3",
                              "--stats-json", str(tmp / "pub.json"), str(src)],
                             capture_output=True)
        assert r.returncode == 0, r.stderr
        pub = json.loads((tmp / "pub.json").read_text())
        print(f"publish      {n} records in {wall:.2f} s: {n / wall:10,.0f} records/s, "
              f"{pub['messages']} messages, tc-publish CPU {cpu:.2f} s "
              f"({cpu / n * 1e6:.1f} us/record)")
        r, wall, cpu = timed([tool_path("tc-subscribe"), *conn, "--stream", "b", "--all",
                              "--until", "now", "-b", "256"], capture_output=True)
        assert r.returncode == 0, r.stderr
        got = sum(1 for x in decode(r.stdout) if x["t"] == "pkt")
        assert got == n, (got, n)
        # (--until: the last fetch waits 1 s for more, which is not throughput)
        wall -= 1.0
        print(f"subscribe    1 x all partitions: {n / wall:10,.0f} records/s "
              f"(CPU {cpu / n * 1e6:.1f} us/record)")
        t = time.perf_counter()
        ps = [subprocess.Popen([tool_path("tc-subscribe"), *conn, "--stream", "b", "-p",
                                f"{k}/3", "--all", "--until", "now", "-b", "256"],
                               stdout=subprocess.PIPE, env=tool_env()) for k in range(3)]
        outs = [b""] * 3

        def read(k):
            outs[k] = ps[k].communicate()[0]

        import threading

        readers = [threading.Thread(target=read, args=(k,)) for k in range(3)]
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        wall = time.perf_counter() - t - 1.0  # (with the three processes' start-up)
        got = sum(sum(1 for x in decode(o) if x["t"] == "pkt") for o in outs)
        assert got == n, (got, n)
        print(f"subscribe    3 x one partition at once: {n / wall:10,.0f} records/s together")
    finally:
        srv.stop()


def online_cpu(form: str, rate: float, duration: float, tmp: Path, publish_args=()) -> dict:
    import replay_harness as h
    from tcpcopylib.lab import Lab

    with Lab() as lab:
        procs, node = [], None
        try:
            h.start_recording_server(lab, "online", tmp / f"{form}-online")
            h.start_recording_server(lab, "target", tmp / f"{form}-target")
            cap_argv = [tool_path("tc-capture"), "-v", "--stats", "cli0", f"tcp dst port {h.PORT}"]
            if form == "publish":
                lab.add_host("n0", "10.200.1.30", "fd00:200:1::30")
                node = natskit.NatsServer(tmp, f"{form}-n0", ip="10.200.1.30",
                                          auth={"token": natskit.TOKEN}, lab=lab,
                                          host="n0").start()
                rest = [[tool_path("tc-publish"), "-s", node.url, "--token-file",
                         str(natskit.token_file(tmp)), "--stream", "live", "-P", "3",
                         *publish_args]]
            else:
                fb, addr = h.start_feedback_tcp(lab, h.PORT)
                procs += fb.values()
                ses = [tool_path("tc-session"), "--target", f"{lab.target_ip}:{h.PORT}",
                       "--feedback", addr]
                rest = [ses + ["--send"]] if form == "send" else \
                    [ses, [tool_path("tc-pace")], [tool_path("tc-emit")]]
            chain, prev = [], None
            for i, argv in enumerate([cap_argv, *rest]):
                last = i == len(rest)
                p = h.Proc(lab, "online", argv, stdin=prev.p.stdout if prev else subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL if last else subprocess.PIPE, env=tool_env())
                if prev:
                    prev.p.stdout.close()
                chain.append(p)
                prev = p
            procs += chain
            assert chain[0].wait_stderr(b"capturing on", 20), chain[0]
            time.sleep(1.0)  # start-up is not the steady state
            cpu0 = [cpu_s(p.pid) for p in chain]
            client = lab.run("client", [h.PY, str(h.SERVERS / "live_http_client.py"),
                                        "--server", f"{lab.online_cli_ip}:{h.PORT}",
                                        "--duration", str(duration), "--rate", str(rate),
                                        "--parallel", "8", "--requests", "5"],
                             capture_output=True, text=True, timeout=duration + 60)
            time.sleep(0.5)
            cpu1 = [cpu_s(p.pid) for p in chain]
            res = json.loads(client.stdout.strip().splitlines()[-1])
            chain[0].stop()
            for p in chain[1:]:
                p.wait(30)
            stats = [ln for ln in chain[0].stderr.splitlines() if "written" in ln]
            pkts = int(stats[-1].split("tc-capture: ", 1)[1].split()[0]) if stats else 0
            used = [b - a for a, b in zip(cpu0, cpu1)]
            return {"form": form, "cpu_s": sum(used), "capture_cpu_s": used[0],
                    "packets": pkts, "requests": res["requests"]}
        finally:
            for p in reversed(procs):
                p.stop()
            if node is not None:
                node.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--forms", default="publish,pipe,send",
                    help="online host forms to measure (publish, pipe, send)")
    ap.add_argument("--publish-args", default="",
                    help="extra tc-publish options for the publish form, e.g. '--linger 0'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as d:
        tmp = Path(d)
        throughput(args.records, tmp)
        if args.skip_live:
            return 0
        res = {}
        for form in args.forms.split(","):
            r = online_cpu(form, args.rate, args.duration, tmp, args.publish_args.split())
            per = r["cpu_s"] / max(1, r["packets"]) * 1e6
            res[form] = per
            print(f"online host  {form:8} {r['requests']:6} requests, {r['packets']:7} packets "
                  f"captured, CPU {r['cpu_s']:.2f} s: {per:6.1f} us/packet (tc-capture "
                  f"{r['capture_cpu_s'] / max(1, r['packets']) * 1e6:.1f}, the rest "
                  f"{(r['cpu_s'] - r['capture_cpu_s']) / max(1, r['packets']) * 1e6:.1f})",
                  flush=True)
        for other in ("pipe", "send"):
            if "publish" in res and other in res:
                print(f"ratio        publish / {other} {res['publish'] / res[other]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
