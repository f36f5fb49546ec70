#!/usr/bin/env python3
"""Offline replay at -a 10: a recording of about a million packets replayed ten times faster.

    python3 bench/bench_offline.py [--sessions 92000] [--rate 1000] [--requests 2]
                                   [--speed 10] [--forms pipe,send,shards2] [--batch 32]
                                   [--repeat N] [--profile DIR] [--keep DIR]

Builds a pcap of N short HTTP/1.1 sessions (bench_session.generate_pcap: K requests each,
12 packets per session with K = 2, both directions; the defaults make 1.1 million packets
over 92 s of recording), then, in a fresh namespace lab with nginx on the target:

  pipe:  tc-readpcap [-B N] F | tc-session -a S [-B N] --target T | tc-pace | tc-emit
  send:  tc-readpcap [-B N] F | tc-session -a S --send --target T

(-B 1 runs the pipeline exactly as tc-session(1) writes it, without batches) and prints
the wall time from start to the last tool's exit against the goal, recording duration /
S x 1.1, the completion (requests the target logged / requests in the recording),
tc-session's outcomes, each tool's CPU seconds and context switches. --profile DIR runs
tc-session under cProfile (DIR/session.prof; slower). Needs root; every run is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_session as bs  # same directory: the generator, the target, reap()

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import replay_harness as h  # noqa: E402
from tcpcopylib.lab import Lab  # noqa: E402

PORT = bs.PORT


def chain(form, pcap, target, addr, stats_json, speed, batch, profile):
    b = ["-B", str(batch)] if batch > 1 else []
    session = ["tc-session", "--target", target, "--feedback", addr, "--stats-json",
               str(stats_json), "-a", str(speed), "--drain", "10"]
    if form == "send":
        return [["tc-readpcap", *b, str(pcap)], [*session, "--send"]]
    if form.startswith("shards"):  # shardsN: tc-session --send --shards N
        return [["tc-readpcap", *b, str(pcap)], [*session, "--send", "--shards", form[6:]]]
    return [["tc-readpcap", *b, str(pcap)], [*session, *b], ["tc-pace"], ["tc-emit"]]


def run_once(form, pcap, speed, batch, workdir, timeout, profile=None, assistant="pipe"):
    with Lab() as lab:
        srv, log = bs.start_target(lab, "nginx", workdir)
        fbprocs, addr = h.start_feedback(lab, workdir, PORT, one_process=assistant == "one")
        stats_json = Path(workdir) / "stats.json"
        env = h.tool_env()
        procs, prev = [], None
        argvs = chain(form, pcap, f"{lab.target_ip}:{PORT}", addr, stats_json, speed, batch,
                      profile)
        t0 = time.monotonic()
        for i, argv in enumerate(argvs):
            last = i == len(argvs) - 1
            exe = [h.tool(argv[0])]
            if profile and argv[0] == "tc-session":
                exe = [sys.executable, "-m", "cProfile", "-o", str(Path(profile) /
                       "session.prof"), h.tool(argv[0])]
            p = h.Proc(lab, "online", [*exe, "--stats", *argv[1:]],
                       stdin=prev.p.stdout if prev else subprocess.DEVNULL,
                       stdout=None if last else subprocess.PIPE, env=env, name=argv[0])
            if prev:
                prev.p.stdout.close()
            procs.append(p)
            prev = p
        cpu = {}
        done = bs.reap(procs[-1], timeout, cpu)
        wall = time.monotonic() - t0
        for p in procs[:-1]:
            bs.reap(p, 5, cpu)
        for p in fbprocs.values():
            # os.kill, then wait4 (bs.reap): Popen.terminate() would reap it first and its
            # CPU time would be lost
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            bs.reap(p, 8, cpu)
        cpu["target"] = sum(bs.tree_cpu(srv.pid))
        lab.stop(srv)
        stats = json.loads(stats_json.read_text()) if stats_json.exists() else {}
        errs = {p.name: p.stderr.strip().splitlines()[-3:] for p in procs
                if p.p.returncode not in (0, None)}
        return done, wall, stats, bs.target_requests("nginx", log), cpu, errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=92000)
    ap.add_argument("--rate", type=float, default=1000.0, help="sessions/s recorded")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--speed", type=float, default=10.0)
    ap.add_argument("--forms", default="pipe,send")
    ap.add_argument("--batch", type=int, default=32,
                    help="-B N for tc-readpcap and tc-session (1: none; default 32)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--profile", metavar="DIR", help="cProfile tc-session into DIR")
    ap.add_argument("--keep", metavar="DIR", help="keep the work directory (and the pcap)")
    ap.add_argument("--assistant", choices=("pipe", "one"), default="pipe",
                    help="tc-intercept | tc-feedback (pipe, the default) or tc-feedback "
                         "--capture (one process)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_offline: needs root (network namespaces)", file=sys.stderr)
        return 77
    work = Path(a.keep or tempfile.mkdtemp(prefix="tc-bench-offline-"))
    work.mkdir(parents=True, exist_ok=True)
    pcap = work / f"gen-{a.sessions}-{a.rate:g}-{a.requests}.pcap"
    events = bs.session_events(1, 1, a.requests)
    if not pcap.exists():
        bs.generate_pcap(pcap, a.sessions, a.rate, a.requests)
    packets = a.sessions * len(events)
    duration = (a.sessions - 1) / a.rate + events[-1][0] - events[0][0]
    goal = duration / a.speed * 1.1
    print(f"recording: {packets} packets, {a.sessions} sessions x {a.requests} requests, "
          f"{duration:.1f} s; -a {a.speed:g}: goal {goal:.2f} s wall at 100 %; "
          f"-B {a.batch}; assistant {a.assistant}")
    for form in a.forms.split(","):
        for _ in range(a.repeat):
            rd = work / form
            shutil.rmtree(rd, ignore_errors=True)
            rd.mkdir()
            if a.profile:
                Path(a.profile).mkdir(parents=True, exist_ok=True)
            done, wall, st, (nreq, nsess, span), cpu, errs = run_once(
                form, pcap, a.speed, a.batch, rd, a.timeout, a.profile, a.assistant)
            wakeups = cpu.pop("_wakeups", {})
            sys_s = cpu.pop("_sys", {})
            outs = {k: v for k, v in st.get("outcomes", {}).items() if v}
            print(f"{form:>5}: wall {wall:6.2f} s ({wall / goal * 1.1:.2f} x duration/"
                  f"{a.speed:g}; goal {goal:.2f}) completion "
                  f"{100.0 * nreq / (a.sessions * a.requests):6.2f} %  outcomes {outs}"
                  + ("" if done else "  TIMED OUT") + (f"  errors {errs}" if errs else ""),
                  flush=True)
            print("       CPU s (system): " + ", ".join(
                f"{k.removeprefix('tc-')} {v:.2f} ({sys_s.get(k, 0):.2f})"
                for k, v in cpu.items()), flush=True)
            print("       context switches (voluntary, involuntary): " + ", ".join(
                f"{k.removeprefix('tc-')} {v[0]} {v[1]}" for k, v in wakeups.items()),
                flush=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
