#!/usr/bin/env python3
"""Soak: a million sessions through tc-session and tc-feedback, memory watched as it goes.

    python3 bench/soak.py [--sessions 1000000] [--rate 2000] [--requests 1] [--every 10]

The pipeline is the assistant path of a real replay with the network left out:

    generator | tc-session --feedback unix:S | fake target | tc-feedback --listen unix:S
                     ^------------------------------------------------------'

The generator writes bench_session.py's short HTTP sessions (every one with its own client
address and port) as pkt records, slice by slice, so that its own memory stays small; the
fake target (bench_engine.FakeTarget) answers every packet tc-session sends with the
replies a kernel would send, as fb records for tc-feedback. tc-session paces the records
at their recorded times (--rate sessions per second of recording time).

Every --every seconds a line: sessions written, tc-session's open sessions and outcomes so
far (its --stats-every lines), and the resident memory (VmRSS) of tc-session and
tc-feedback. At the end: each process's exit code (a crash is any other than 0), the
outcomes, and the memory growth from the end of the warm-up (the first --warmup share of
the sessions) to the end: "flat" when it is under --flat-mb.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import bench_engine  # noqa: E402  (FakeTarget, TARGET)
import bench_session  # noqa: E402  (session_events)

SLICE = 5000  # sessions generated at a time


def generator(sessions: int, rate: float, requests: int) -> None:
    """Write the client packets of every session as pkt records on stdout."""
    import cbor2

    from tcpcopylib.records import LABEL

    out = sys.stdout.buffer
    out.write(LABEL + cbor2.dumps({"t": "header", "v": 1, "tool": "soak"}))
    for first in range(0, sessions, SLICE):
        n = min(SLICE, sessions - first)
        ev = bench_session.session_events(n, rate, requests, first=first)
        out.write(b"".join(cbor2.dumps({"t": "pkt", "ts": round(ts * 1e9), "data": frame[14:]})
                           for ts, frame, from_client in ev if from_client))
    out.flush()


def fake_target(resp_len: int) -> None:
    """tc-session's packets on stdin, the target's replies as fb records on stdout."""
    import cbor2

    from tcpcopylib.intercept import encode_fb
    from tcpcopylib.records import LABEL, RecordReader

    target = bench_engine.FakeTarget(resp_len)
    out = sys.stdout.buffer
    out.write(LABEL + cbor2.dumps({"t": "header", "v": 1, "tool": "soak-target"}))
    out.flush()
    for rec in RecordReader(0, name="tc-session output"):
        if rec.get("t") != "pkt":
            continue
        now = time.time_ns()
        replies = target.packet(rec["data"])
        if replies:
            out.write(b"".join(encode_fb(now, d, n) for d, n in replies))
            out.flush()


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=2000.0, help="sessions per second")
    ap.add_argument("--requests", type=int, default=1, help="requests per session")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between lines")
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="share of the run before memory is taken as the baseline")
    ap.add_argument("--flat-mb", type=float, default=10.0,
                    help="the most growth after warm-up that counts as flat")
    ap.add_argument("--json", type=Path, help="write the samples and verdict here")
    a = ap.parse_args(argv)
    resp_len = len(bench_session.http_exchange(0, 0)[1])
    tmp = Path(tempfile.mkdtemp(prefix="tc-soak-"))
    sock, stats = tmp / "fb.sock", tmp / "session.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    bin_ = REPO / "bin"
    procs = {}
    try:
        # tc-feedback first: tc-session connects to it at start
        procs["target"] = subprocess.Popen([*me, "_target", str(resp_len)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs["tc-feedback"] = subprocess.Popen(
            [str(bin_ / "tc-feedback"), "--listen", f"unix:{sock}", "--stats"],
            stdin=procs["target"].stdout, stderr=subprocess.DEVNULL)
        procs["target"].stdout.close()
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        procs["gen"] = subprocess.Popen([*me, "_gen", str(a.sessions), str(a.rate),
                                         str(a.requests)], stdout=subprocess.PIPE)
        procs["tc-session"] = subprocess.Popen(
            [str(bin_ / "tc-session"), "--target", bench_engine.TARGET,
             "--feedback", f"unix:{sock}", "--stats-json", str(stats), "--drain", "10"],
            stdin=procs["gen"].stdout, stdout=procs["target"].stdin)
        procs["gen"].stdout.close()
        procs["target"].stdin.close()
        return watch(a, procs, stats)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def watch(a, procs, stats: Path) -> int:
    session, feedback = procs["tc-session"], procs["tc-feedback"]
    t0 = time.monotonic()
    duration = a.sessions / a.rate
    warm_at = t0 + a.warmup * duration
    base = None
    samples = []
    print(f"soak: {a.sessions:,} sessions at {a.rate:,.0f}/s (~{duration:,.0f} s), "
          f"{a.requests} request(s) each", flush=True)
    print(f"{'s':>6} {'tc-session MB':>14} {'tc-feedback MB':>15}", flush=True)
    deadline = t0 + duration * 3 + 120
    next_line = t0 + a.every
    while session.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        now = time.monotonic()
        if now < next_line:
            continue
        next_line += a.every
        s, f = rss_mb(session.pid), rss_mb(feedback.pid)
        if s is None or f is None:
            continue
        samples.append({"s": round(now - t0, 1), "session_mb": s, "feedback_mb": f})
        if base is None and now >= warm_at:
            base = samples[-1]
        print(f"{now - t0:6.0f} {s:14.1f} {f:15.1f}", flush=True)
    if session.poll() is None:
        print("soak: tc-session did not finish in time", file=sys.stderr)
        return 1
    # tc-session has ended: the rest of the pipeline drains and ends with it
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            codes[name] = p.wait(15)
    # tc-feedback ends on SIGTERM or at the end of its input: both are clean
    clean = {n: c in (0, -signal.SIGTERM) if n == "tc-feedback" else c == 0
             for n, c in codes.items()}
    st = json.loads(stats.read_text()) if stats.exists() else {}
    oc = {k: v for k, v in st.get("outcomes", {}).items() if v}
    done = oc.get("completed", 0) + oc.get("reconnected", 0)
    last = samples[-1] if samples else None
    verdict = {"sessions": a.sessions, "completed": done, "outcomes": oc, "exit_codes": codes,
               "crashes": sum(not ok for ok in clean.values()), "wall_s": time.monotonic() - t0}
    if base and last:
        for who in ("session_mb", "feedback_mb"):
            verdict[f"{who}_growth_after_warmup"] = round(last[who] - base[who], 1)
        verdict["flat"] = all(verdict[f"{w}_growth_after_warmup"] < a.flat_mb
                              for w in ("session_mb", "feedback_mb"))
    print(json.dumps(verdict, indent=1))
    if a.json:
        a.json.write_text(json.dumps({"samples": samples, "verdict": verdict}, indent=1))
    return 0 if verdict["crashes"] == 0 and done == a.sessions and verdict.get("flat") else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_gen":
        generator(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_target":
        fake_target(int(sys.argv[2]))
    else:
        sys.exit(main())
