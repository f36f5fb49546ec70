#!/usr/bin/env python3
"""Socket mode beside forged mode: sessions/s and CPU per session on the same capture.

    python3 bench/bench_socket.py [--sessions N] [--rate R] [--requests K] [--speeds 2,4]
                                  [--repeat N] [--server nginx|python] [--builds compiled,pure]

Generates the recording of bench_session.py (N short HTTP/1.1 sessions of K requests,
client closes first, arriving at R/s), then for each speed S, in a fresh namespace lab and
alternating the two modes:

  forged: tc-readpcap -B 32 gen.pcap | tc-session -a S -B 32 --target T | tc-emit
          (and on the assistant: tc-intercept | tc-feedback)
  socket: tc-readpcap -B 32 gen.pcap | tc-session --socket -a S --target T

both from the online host into the same target (nginx), and prints per run the sessions/s
and requests/s the target served (between its first and last logged request), the
sessions completed, and the CPU seconds per 1,000 sessions of the replay's own processes
(wait4: user + system, the system part in brackets; forged mode counts tc-readpcap,
tc-session, tc-emit, tc-intercept and tc-feedback, socket mode tc-readpcap and tc-session;
the target's CPU is apart). Then the ratios forged / socket. Needs root for the lab (socket mode itself does not).

Both modes run on the same build of the engine, one build at a time (--builds: "compiled",
the Cython-built engine, which socket mode's SocketEngine subclasses like any Python class,
and "pure", TCPCOPY_PURE=1; default both if the compiled build is there); within a build the
two modes alternate, the one that goes first changing with each repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_session as bs  # noqa: E402  (its recording, lab target, CPU accounting)
from bench_session import PORT, h, reap  # noqa: E402
from tcpcopylib.lab import Lab  # noqa: E402

FORGED_TOOLS = ("tc-readpcap", "tc-session", "tc-emit", "tc-intercept", "tc-feedback")


def run_socket(pcap, speed, kind, workdir, timeout):
    """One socket-mode run: (wall, stats, target (requests, sessions, span), errors, cpu)."""
    with Lab() as lab:
        srv, log = bs.start_target(lab, kind, workdir)
        stats_json = Path(workdir) / "stats.json"
        env = h.tool_env()
        rp = h.Proc(lab, "online", [h.tool("tc-readpcap"), "-B", "32", str(pcap)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                    name="tc-readpcap")
        ts = h.Proc(lab, "online", [h.tool("tc-session"), "--socket", "--target",
                                    f"{lab.target_ip}:{PORT}", "-a", str(speed), "--stats",
                                    "--stats-json", str(stats_json)],
                    stdin=rp.p.stdout, stdout=subprocess.DEVNULL, env=env, name="tc-session")
        rp.p.stdout.close()
        t0 = time.monotonic()
        cpu = {}
        reap(ts, timeout, cpu)
        wall = time.monotonic() - t0
        reap(rp, 5, cpu)
        cpu["_server"] = bs.tree_cpu(srv.pid)
        lab.stop(srv)
        stats = json.loads(stats_json.read_text()) if stats_json.exists() else {}
        errs = {p.name: p.stderr.strip().splitlines()[-3:] for p in (rp, ts)
                if p.p.returncode not in (0, None)}
        return wall, stats, bs.target_requests(kind, log), errs, cpu


def run_forged(pcap, speed, kind, workdir, timeout):
    done, wall, stats, served, errs, cpu = bs.run_once(
        pcap, speed, kind, workdir, timeout, ["-B", "32"], None, "tc-session", ["-B", "32"])
    return wall, stats, served, errs, cpu


def engine_build() -> str:
    """Which engine the tools run ("compiled" or "pure"), as tc-session --version says."""
    out = subprocess.run([h.tool("tc-session"), "--version"], capture_output=True, text=True,
                         env=h.tool_env()).stdout
    return "compiled" if "compiled" in out else "pure"


def report(mode, speed, wall, stats, served, errs, cpu, sessions):
    nreq, nsess, span = served
    span = max(span, 1e-3)
    tools = FORGED_TOOLS if mode == "forged" else FORGED_TOOLS[:2]
    own = sum(cpu.get(t, 0.0) for t in tools)
    completed = stats.get("outcomes", {}).get("completed", 0)
    per_k = 1000 * own / max(completed, 1)
    sys_s = cpu.get("_sys", {})
    parts = " ".join(f"{t.removeprefix('tc-')} {cpu.get(t, 0.0):.2f} [{sys_s.get(t, 0.0):.2f}]"
                     for t in tools)
    print(f"{mode:>6} x{speed:<4g} {nsess / span:>10.0f} {nreq / span:>9.0f} "
          f"{completed:>6}/{sessions:<6} {own:>7.2f} {per_k:>9.3f}  ({parts}; target "
          f"{sum(cpu.get('_server', (0, 0))):.2f})" + (f"  errors: {errs}" if errs else ""))
    return nsess / span, per_k


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=6000)
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="session arrivals per second in the recording (default 1000)")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--speeds", default="1,2")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--server", choices=("nginx", "python"),
                    default="nginx" if shutil.which("nginx") else "python")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--builds", default=None,
                    help="engine builds to run, in order: compiled,pure (default both when "
                         "the compiled build is there, else pure)")
    ap.add_argument("--keep", help="keep the work directory here")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_socket: needs root (network namespaces)", file=sys.stderr)
        return 77
    work = Path(a.keep or tempfile.mkdtemp(prefix="tc-bench-socket-"))
    work.mkdir(parents=True, exist_ok=True)
    pcap = work / "gen.pcap"
    pkts, _ = bs.generate_pcap(pcap, a.sessions, a.rate, a.requests)
    print(f"recording: {a.sessions} sessions x {a.requests} requests, {pkts} client packets, "
          f"{a.rate:.0f} sessions/s; target {a.server}")
    print(f"{'mode':>6} {'speed':<5} {'sessions/s':>10} {'req/s':>9} {'completed':>13} "
          f"{'CPU s':>7} {'CPU s/1k':>9}  (per tool)")
    os.environ.pop("TCPCOPY_PURE", None)
    builds = (a.builds.split(",") if a.builds else
              ["compiled", "pure"] if engine_build() == "compiled" else ["pure"])
    res: dict = {}
    for build in builds:
        if build == "pure":
            os.environ["TCPCOPY_PURE"] = "1"  # (the tools' environment: h.tool_env)
        else:
            os.environ.pop("TCPCOPY_PURE", None)
        runs = engine_build()
        if runs != build:
            print(f"bench_socket: asked for the {build} engine, the tools run the {runs} one",
                  file=sys.stderr)
            return 1
        print(f"-- engine: {build}")
        for speed in [float(x) for x in a.speeds.split(",")]:
            for rep in range(max(a.repeat, 1)):
                modes = [("forged", run_forged), ("socket", run_socket)]
                for mode, fn in modes if rep % 2 == 0 else modes[::-1]:
                    rd = work / f"{build}-{mode}-{speed:g}"
                    shutil.rmtree(rd, ignore_errors=True)
                    rd.mkdir()
                    out = fn(pcap, speed, a.server, rd, a.timeout)
                    res.setdefault((build, mode, speed), []).append(
                        report(mode, speed, *out, a.sessions))
    os.environ.pop("TCPCOPY_PURE", None)
    print("ratios forged / socket (medians):")
    for build, _, speed in sorted({(b, 0, s) for b, _, s in res}):
        f, s = res[(build, "forged", speed)], res[(build, "socket", speed)]
        rate_f = statistics.median(x[0] for x in f)
        rate_s = statistics.median(x[0] for x in s)
        cpu_f = statistics.median(x[1] for x in f)
        cpu_s = statistics.median(x[1] for x in s)
        print(f"  {build} x{speed:g}: sessions/s {rate_f:.0f} vs {rate_s:.0f} "
              f"({rate_s / max(rate_f, 1e-9):.2f}x); CPU per 1,000 sessions {cpu_f:.3f} s vs "
              f"{cpu_s:.3f} s: socket mode {cpu_f / max(cpu_s, 1e-9):.1f}x lighter")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
