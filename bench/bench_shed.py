#!/usr/bin/env python3
"""Shedding benchmark: the live pipeline past saturation, with and without shedding.

    python3 bench/bench_shed.py [--rates 500,1000,1500] [--duration 6] [--share 0.03]
                                [--modes shed,noshed] [--parallel 16]

For each client rate R (HTTP requests/s, half the sessions keep-alive with 2 requests,
half short), in a fresh namespace lab:

  client:    tests/servers/live_http_client.py --rate R (every answer checked)
  online:    recording server :8080, and tc-capture cli0 | tc-session | tc-pace | tc-emit,
             tc-session throttled to --share of a CPU while the client runs (SIGSTOP/
             SIGCONT on its CPU time: tests/throttle.py; a test knob, not a tool option)
  assistant: tc-intercept lan0 | tc-feedback
  target:    recording server :8080

and prints the sessions the online server accepted, those that reached the target whole,
partial ones (only part of their bytes arrived, or bytes that match nothing), lost ones
(absent at the target and not counted as shed), shed ones (tc-capture's + tc-session's, by
reason), the kernel's capture drops, the largest lag tc-capture and tc-session saw and
tc-capture's CPU per packet.
Mode "shed" is the default tools; "noshed" runs both with --shed-lag 0 (as before
shedding): what a saturated pipeline loses then. Needs root; every step is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import replay_harness as h  # noqa: E402
from throttle import Throttle  # noqa: E402

from tcpcopylib.lab import Lab  # noqa: E402


def shed_counts(live) -> dict:
    """Sessions shed by reason: tc-capture's ("capture:REASON") and tc-session's."""
    out = {}
    cap = capture_stats(live)
    for why, n in cap.get("shed_reasons", {}).items():
        out[f"capture:{why}"] = n
    for why, n in (live.stats or {}).get("shed_reasons", {}).items():
        out[f"session:{why}"] = n
    return out


def capture_stats(live) -> dict:
    """tc-capture's --stats-json (written by the runs here to live/capture.json)."""
    p = live.stats_json.parent / "capture.json"
    return json.loads(p.read_text()) if p.exists() else {}


def run_once(rate, a, workdir, mode) -> dict:
    workdir = Path(workdir)
    off = ["--shed-lag", "0"] if mode == "noshed" else []
    with Lab() as lab:
        onl, tgt = workdir / "online", workdir / "target"
        h.start_recording_server(lab, "online", onl)
        h.start_recording_server(lab, "target", tgt)
        # (--drain 30: tc-session may still be catching up when the capture ends)
        live = h.start_live(lab, workdir / "live", capture_args=[
            "--stats-json", workdir / "live" / "capture.json", *off],
            session_args=["--drain", 30, *off])
        try:
            with Throttle(live.procs["tc-session"].pid, a.share):
                r = lab.run("client", [h.PY, h.SERVERS / "live_http_client.py", "--server",
                                       f"{lab.online_cli_ip}:{h.PORT}", "--rate", rate,
                                       "--duration", a.duration, "--parallel", a.parallel,
                                       "--requests", 2], capture_output=True, text=True,
                            timeout=a.duration + 120)
            client = json.loads(r.stdout.strip().splitlines()[-1])
            h.wait_settled(tgt, quiet=2.0, timeout=120)  # the backlog, at full speed now
        finally:
            live.stop()
        cmp = h.compare_logs(onl, tgt)
    shed = shed_counts(live)
    cap = capture_stats(live)
    online = len(h.logged_streams(onl))
    partial = len(cmp.different) + len(cmp.extra)
    return {"rate": rate, "mode": mode, "client_errors": client["n_errors"],
            "online": online, "whole": cmp.identical, "partial": partial,
            "missing": len(cmp.missing), "shed": sum(shed.values()), "shed_by": shed,
            "lost": len(cmp.missing) - sum(shed.values()),
            "kernel_drops": cap.get("kernel_drops"),
            "capture_us_per_packet": cap.get("cpu_us_per_packet"),
            "capture_max_lag_ms": cap.get("max_lag_ms"),
            "session_max_lag_ms": (live.stats or {}).get("admission", {}).get("max_lag_ms"),
            "failed": {k: v for k, v in (live.stats or {}).get("outcomes", {}).items()
                       if v and k not in ("completed", "reconnected", "shed")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="500,1000,1500")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--share", type=float, default=0.03,
                    help="tc-session's CPU share while the client runs (default 0.03)")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--modes", default="shed,noshed")
    ap.add_argument("--json", action="store_true", help="one JSON line per run")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_shed: needs root (network namespaces)", file=sys.stderr)
        return 77
    print(f"{'rate':>5} {'mode':>6} {'online':>6} {'whole':>6} {'partial':>7} {'lost':>5} "
          f"{'shed':>5} {'kdrops':>6} {'lag ms cap/sess':>15} {'cap µs':>6}  shed by, failed")
    for rate in [float(x) for x in a.rates.split(",")]:
        for mode in a.modes.split(","):
            with tempfile.TemporaryDirectory(prefix="tc-bench-shed-") as d:
                res = run_once(rate, a, d, mode)
            if a.json:
                print(json.dumps(res), flush=True)
                continue
            print(f"{rate:5.0f} {mode:>6} {res['online']:6d} {res['whole']:6d} "
                  f"{res['partial']:7d} {res['lost']:5d} {res['shed']:5d} "
                  f"{res['kernel_drops']!s:>6} {res['capture_max_lag_ms']!s:>7}/"
                  f"{res['session_max_lag_ms']!s:<7} {res['capture_us_per_packet']!s:>6}  "
                  f"{res['shed_by']} {res['failed']}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
