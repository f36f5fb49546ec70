#!/usr/bin/env python3
"""Request timing at the target against production, on larger samples than the lab tests.

    python3 bench/bench_timing.py [--kinds http,greeting,pipelined,ws] [--modes live,offline]
                                  [--scale N] [--repeat N] [--compare DIR]
                                  [--session-arg ARG] [--capture-arg ARG] [--intercept-arg ARG]
                                  [--wire] [--send] [--keep DIR]
                                  [--c-tcpcopy PATH --c-intercept PATH] [-v]

The set-up of tests/test_duplex_lab.py (reused from it by import: its servers behind the
tap relay on the online and the target host, its clients, its comparison): real clients
talk to the online host's relay; offline, tcpdump records them and tc-readpcap | tc-session
| tc-pace | tc-emit replays the pcap; live, tc-capture | tc-session | tc-pace | tc-emit
replays them as they come (tc-intercept | tc-feedback on the assistant). For each request
the relays logged, how much later (ms) it reached the target than due, counted from the
connection's accept: request/response kinds (http keep-alive, greeting, pipelined): due at
its recorded offset or right after the target's own answer to the one before, whichever
is later (tapcap.gated_late); duplex kinds (ws): its recorded offset (tapcap.offsets_late,
early counts as negative). Each kind and mode prints n, p50, p99 and max. With --wire the
times come from captures at the two servers' interfaces (tapcap.wire_connections: the
handshake's ACK, each segment), not from the relays' reads, which a busy relay makes late.

By default the clients send about 200 requests per kind (WORK; the test's 10 to 23);
--scale F multiplies that. Each run is a fresh lab in a child process, bounded (--timeout);
--repeat runs each kind and mode again, and --compare DIR runs another checkout's tools
too, alternately (DIR's tcpcopylib and bin/, this checkout's lab helpers); the figures of
both are printed side by side. --c-tcpcopy/--c-intercept: binaries of C TCPCopy 1.3 and
intercept 1.0 you built (this script neither fetches nor builds them) replay the live
runs too (`tcpcopy -x PORT-TARGET:PORT -s ASSISTANT`, `intercept -i lan0 -F ...`).
Needs root; the labs and every process are torn down at the end of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# kind -> (connections, requests or messages each): the clients' work by default (the lab
# test's is 2 connections of 4 to 10 each); --scale multiplies the second (pipelined: the
# first, as a connection's pipelined requests count as one)
WORK = {
    "http": (4, 50),
    "greeting": (4, 50),
    "pipelined": (100, 3),
    "ws": (4, 50),
    "redis": (4, 30),
    "sse": (4, 10),
}


def pct(xs, q):
    """As test_duplex_lab.p (the same definition of p50, p99)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# -- one run (in a child process: --one KIND MODE) ------------------------------------------

def one_run(a) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import replay_harness as h
    import tapcap
    import test_duplex_lab as lab_test
    from tcpcopylib.lab import Lab

    kind, mode = a.one
    server, client = lab_test.KINDS[kind]
    conns, each = WORK[kind]
    if kind == "pipelined":
        conns = max(1, round(conns * a.scale))
    else:
        each = max(1, round(each * a.scale))
    what = "--messages" if client[0] == "push" else "--requests"
    lab_test.KINDS[kind] = (server, [*client[:2], "--conns", str(conns), what, str(each)])
    port = lab_test.PORT
    out = {"kind": kind, "mode": mode, "form": a.form, "client": lab_test.KINDS[kind][1][2:]}
    with tempfile.TemporaryDirectory(prefix="bench-timing-") as wd, Lab() as lab:
        work_dir = Path(wd)
        stats, diag = None, ""
        wire = {}  # --wire: the captures at the online and the target server's interfaces
        if mode == "offline":
            online = lab_test.start_service(lab, "online", kind, work_dir)
            pcap = work_dir / f"{kind}.pcap"
            td = h.start_tcpdump(lab, "online", lab.online_cli_if, pcap, port)
            try:
                lab_test.run_clients(lab, kind)
            finally:
                h.stop_tcpdump(td)
                lab_test.stop_service(lab, online)
            run = work_dir / "run"
            run.mkdir()
            target = lab_test.start_service(lab, "target", kind, run, port)
            try:
                rep = h.replay(lab, pcap, run, port=port, start_target=False,
                               trace=bool(a.keep or a.wire),
                               session_args=["--drain", "5", "--any-port", *a.session_arg],
                               intercept_args=a.intercept_arg, timeout=a.timeout,
                               send=a.send)
            finally:
                lab_test.stop_service(lab, target)
            stats, diag = rep.stats, rep.diagnostics()
            online_dir, target_dir = work_dir / f"{kind}-online", run / f"{kind}-target"
            wire = {"online": pcap, "target": run / "target.pcap"}
        else:
            target = lab_test.start_service(lab, "target", kind, work_dir, port)
            online = lab_test.start_service(lab, "online", kind, work_dir, port)
            if a.form == "c":
                sys.path.insert(0, str(HERE))
                import bench_live

                bench_live.PORT = port
                live = bench_live.CTcpcopy(lab, a, work_dir)
            else:
                live = h.start_live(lab, work_dir, port=port,
                                    session_args=["--drain", "5", *a.session_arg],
                                    capture_args=a.capture_arg,
                                    intercept_args=a.intercept_arg, send=a.send)
            tds = []
            if a.wire:
                wire = {"online": work_dir / "online.pcap", "target": work_dir / "target.pcap"}
                tds = [h.start_tcpdump(lab, "online", lab.online_cli_if, wire["online"], port),
                       h.start_tcpdump(lab, "target", lab.target_if, wire["target"], port)]
            try:
                lab_test.run_clients(lab, kind, port)
                time.sleep(1.0)  # the replay's last requests reach the target
            finally:
                for td in tds:
                    h.stop_tcpdump(td)
                stats = live.stop()
                lab_test.stop_service(lab, online)
                lab_test.stop_service(lab, target)
            if a.form != "c":
                diag = live.diagnostics()
            online_dir, target_dir = work_dir / f"{kind}-online", work_dir / f"{kind}-target"
        if a.keep:  # (for a look at the relays' logs)
            import shutil

            shutil.copytree(online_dir, Path(a.keep) / "online", dirs_exist_ok=True)
            shutil.copytree(target_dir, Path(a.keep) / "target", dirs_exist_ok=True)
            for f in (work_dir / "run" / "target.pcap", work_dir / f"{kind}.pcap",
                      *wire.values()):
                if f.exists():  # (offline: the target's lan0 and the recording)
                    shutil.copy(f, Path(a.keep))
        if a.wire:
            rec, rep_ = (tapcap.wire_connections(wire["online"], port),
                         tapcap.wire_connections(wire["target"], port))
        else:
            rec, rep_ = tapcap.connections(online_dir), tapcap.connections(target_dir)
        out["connections"] = [len(rec), len(rep_)]
        try:
            if a.form == "c":  # (tcpcopy writes no stats: the comparison's own checks only)
                stats = {"outcomes": {"completed": len(rec)}}
            dx, gated = lab_test.compare_conns(kind, rec, rep_, stats, diag[-2000:])
            out["late"] = dx + gated
        except AssertionError as e:
            out["error"] = f"comparison failed: {str(e)[:600]}"
            out["late"] = []
        except ValueError as e:  # (gated_late: the target's reads grouped the requests
            # otherwise, e.g. two of them in one read: not the same request/response turns)
            out["error"] = f"requests not paired with the recording's: {e}"
            out["late"] = []
        if stats and a.form != "c":
            out["release_lateness"] = stats.get("release_lateness", {}).get("buckets")
    return out


# -- the runs ----------------------------------------------------------------------------------

def child(a, kind, mode, tree: Path, form: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--one", kind, mode,
            "--scale", str(a.scale), "--form", form, "--timeout", str(a.timeout),
            *(["--keep", f"{a.keep}/{kind}-{mode}-{form}"] if a.keep else []),
            *(["--wire"] if a.wire else []),
            *(["--send"] if a.send else []),
            *(f"--session-arg={x}" for x in a.session_arg),
            *(f"--capture-arg={x}" for x in a.capture_arg),
            *(f"--intercept-arg={x}" for x in a.intercept_arg)]
    if form == "c":
        argv += ["--c-tcpcopy", a.c_tcpcopy, "--c-intercept", a.c_intercept]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True,
                           timeout=a.timeout + 120)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "mode": mode, "late": [], "error": "timed out"}
    if a.verbose:
        sys.stderr.write(r.stderr)
    lines = r.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1])
    except (IndexError, ValueError):
        res = {"kind": kind, "mode": mode, "late": [],
               "error": f"exit {r.returncode}: {r.stderr.strip()[-600:]}"}
    res["seconds"] = time.monotonic() - t0
    return res


def line(label, late) -> str:
    if not late:
        return f"{label:<34} {'n':>5} {0:>5}"
    return (f"{label:<34} n {len(late):>5}  p50 {pct(late, .5):7.2f}  p99 {pct(late, .99):7.2f}"
            f"  max {max(late):7.2f}  min {min(late):7.2f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="http,greeting,pipelined,ws")
    ap.add_argument("--modes", default="live,offline")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies the clients' work (default 1: about 200 requests "
                         "per kind and mode)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--compare", metavar="DIR", type=Path,
                    help="another checkout, run alternately (the 'before')")
    ap.add_argument("--session-arg", action="append", default=[])
    ap.add_argument("--capture-arg", action="append", default=[])
    ap.add_argument("--intercept-arg", action="append", default=[])
    ap.add_argument("--c-tcpcopy", metavar="PATH")
    ap.add_argument("--c-intercept", metavar="PATH")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run at most")
    ap.add_argument("-v", "--verbose", action="store_true", help="the runs' stderr")
    ap.add_argument("--keep", metavar="DIR",
                    help="copy the relays' logs of the (last) run of each kind and mode to "
                         "DIR/online and DIR/target (offline: and a capture on the target's "
                         "lan0; --wire: its captures)")
    ap.add_argument("--wire", action="store_true",
                    help="times from captures at the online and the target server's "
                         "interfaces (tcpdump), not from the relays' reads: the replay's "
                         "timing without the relays' own delays")
    ap.add_argument("--send", action="store_true",
                    help="tc-session --send: tc-session sends (no tc-pace | tc-emit "
                         "processes after it), live and offline")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--form", default="ours", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one_run(a)), flush=True)
        return 0
    if bool(a.c_tcpcopy) != bool(a.c_intercept):
        ap.error("--c-tcpcopy and --c-intercept go together")
    kinds, modes = a.kinds.split(","), a.modes.split(",")
    if not set(kinds) <= set(WORK) or not set(modes) <= {"live", "offline"}:
        ap.error(f"--kinds: {', '.join(WORK)}; --modes: live, offline")
    trees = [("this", REPO)] + ([("compare", a.compare.resolve())] if a.compare else [])
    runs = []  # (kind, mode, tree name, tree, form): the trees (and C) alternate
    for _ in range(a.repeat):
        for kind in kinds:
            for mode in modes:
                for name, tree in trees:
                    runs.append((kind, mode, name, tree, "ours"))
                if a.c_tcpcopy and mode == "live":
                    runs.append((kind, mode, "C tcpcopy", REPO, "c"))
    print(f"request timing, target vs online (ms late; {', '.join(n for n, _ in trees)}"
          f"{', C tcpcopy' if a.c_tcpcopy else ''}; scale {a.scale}, {len(runs)} runs)",
          flush=True)
    results: dict = {}
    t0 = time.monotonic()
    for kind, mode, name, tree, form in runs:
        res = child(a, kind, mode, tree, form)
        results.setdefault((kind, mode, name), []).append(res)
        note = f"  ERROR {res['error']}" if res.get("error") else ""
        print(line(f"{kind} {mode} {name}", res["late"])
              + f"  ({res.get('seconds', 0):.0f} s){note}", flush=True)
        if res.get("release_lateness") and a.verbose:
            print(f"{'':34} tc-session release lateness buckets {res['release_lateness']}")
    if a.repeat > 1 or len(trees) > 1 or a.c_tcpcopy:
        print("all runs of each kind, mode and build:")
        for (kind, mode, name), rs in results.items():
            print(line(f"{kind} {mode} {name}", [x for r in rs for x in r["late"]]))
    print(f"{time.monotonic() - t0:.0f} s in all")
    return 1 if any(r.get("error") for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
