#!/usr/bin/env python3
"""tc-session --shards N against one process: time per session and the speedup.

    python3 bench/bench_shards.py [--shards N] [--sessions S] [--requests K] [--repeat R]
                                  [--taskset CPUS]

The workload is bench_engine.py's (bench_session.py's short HTTP sessions, written as a
record file); the target is bench_engine's FakeTarget in a process of its own that reads
tc-session's output and writes the replies as fb records into a real tc-feedback, which
serves them to tc-session (one feedback connection per shard):

    tc-session --asap --shards N --feedback unix:S FILE | target | tc-feedback --listen unix:S

Each run is timed from tc-session's start to its exit (every session answered, the
drain ended early by quiescence), less a run of the same shard count on an empty input
(start-up and exit). Printed per shard count (median of --repeat runs, alternated):

  wall us/sess   wall time per session: the throughput on this machine, where the target
                 and tc-feedback share the cores with tc-session;
  cpu us/sess    tc-session's CPU time per session (parent and shards: wait4 counts the
                 children the parent reaped), the cost of splitting it;
  busiest        CPU us per session of the busiest tc-session process (with --shards: the
                 parent or the busiest shard, from --stats-json's parent_cpu_s and
                 shard_cpu_s): the throughput on idle cores, one per process, is bounded
                 by it;
  on N cores     the larger of busiest and cpu / N: the bound on N idle cores (N the
                 shard count; the parent shares them);
  target+fb cpu  CPU us per session of the fake target and tc-feedback (on this machine
                 they take cores from tc-session).

and the speedups: wall (this machine, as loaded as it is) and on idle cores (one
process's CPU per session over the busiest process's, and over the N-core bound). The
load average is printed with them.
--taskset CPUS pins tc-session (and its shards) to those CPUs, e.g. 0,1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_engine  # noqa: E402  (the workload, the fake target)


def target_child(resp_len: int) -> None:
    """stdin: tc-session's output; stdout: the fake target's replies as fb records."""
    sys.path.insert(0, str(REPO))
    from tcpcopylib.intercept import encode_fb
    from tcpcopylib.records import LABEL, StreamDecoder

    import cbor2

    target = bench_engine.FakeTarget(resp_len)
    dec = StreamDecoder("tc-session output")
    out = LABEL + cbor2.dumps({"t": "header", "v": 1, "tool": "bench-target"})
    os.write(1, out)
    buf = b""
    while True:
        chunk = os.read(0, 1 << 17)
        if not chunk:
            return
        buf = buf + chunk if buf else chunk
        items, pos, err = dec.parse(buf)
        if err:
            raise err
        buf = buf[pos:]
        now = time.time_ns()
        out = bytearray()
        for rec in items:
            if rec.get("t") == "pkt":
                for data, n in target.packet(rec["data"]):
                    out += encode_fb(now, data, n)
        view = memoryview(out)
        while view:
            view = view[os.write(1, view):]


def _build() -> str:
    """Which build of the engine tc-session runs (this checkout's, compiled or not)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", "import tcpcopylib; print(tcpcopylib."
                           "build_info())"], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


def run_once(shards: int, records: Path, resp_len: int, tmp: Path, taskset: str | None,
             timeout: float = 600) -> dict:
    """One replay: wall s, CPU s of tc-session (and shards), the stats."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TC_FEEDBACK", None)
    sock = tmp / "fb.sock"
    sock.unlink(missing_ok=True)
    stats = tmp / "stats.json"
    stats.unlink(missing_ok=True)
    fb = subprocess.Popen([sys.executable, str(REPO / "bin" / "tc-feedback"), "--listen",
                           f"unix:{sock}"], stdin=subprocess.PIPE, env=env,
                          stderr=subprocess.DEVNULL)
    target = subprocess.Popen([sys.executable, __file__, "_target", str(resp_len)],
                              stdin=subprocess.PIPE, stdout=fb.stdin, env=env)
    fb.stdin.close()
    deadline = time.monotonic() + 30
    while not sock.exists():
        if time.monotonic() > deadline:
            raise SystemExit("tc-feedback did not listen")
        time.sleep(0.02)
    argv = [sys.executable, str(REPO / "bin" / "tc-session"), "--target", bench_engine.TARGET,
            "--asap", "--feedback", f"unix:{sock}", "--drain", "10", "--stats-json",
            str(stats), "--shards", str(shards), str(records)]
    if taskset:
        argv = ["taskset", "-c", taskset, *argv]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=target.stdin, stderr=subprocess.PIPE, env=env)
    target.stdin.close()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
        time.sleep(0.005)
    wall = time.monotonic() - t0
    err = p.stderr.read().decode()
    others = 0.0  # CPU of the fake target and tc-feedback, which share the machine
    for q in (target, fb):
        deadline = time.monotonic() + 10
        while True:
            pid, _, qru = os.wait4(q.pid, os.WNOHANG)
            if pid:
                others += qru.ru_utime + qru.ru_stime
                break
            if time.monotonic() > deadline:
                q.kill()
            time.sleep(0.005)
        q.returncode = 0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tc-session --shards {shards} failed: {err}")
    st = json.loads(stats.read_text())
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "stats": st, "others": others}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_target":
        target_child(int(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=4000)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--taskset", metavar="CPUS")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="also print each sharded run's CPU per process")
    a = ap.parse_args(argv)
    pkts, resp_len = bench_engine.client_packets(a.sessions, a.rate, a.requests)
    n = a.sessions
    print(f"{n} sessions x {a.requests} requests, {len(pkts)} client packets; "
          f"median of {a.repeat}; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; {_build()}"
          + (f"; taskset {a.taskset}" if a.taskset else ""))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = tmp / "in.cbor"
        bench_engine.write_records(REPO, records, pkts, 1)
        empty = tmp / "empty.cbor"
        bench_engine.write_records(REPO, empty, [], 1)
        runs = {1: [], a.shards: []}
        for _ in range(a.repeat):
            for k in runs:  # alternated, so that a change in the load hits both
                r = run_once(k, records, resp_len, tmp, a.taskset)
                e = run_once(k, empty, resp_len, tmp, a.taskset)  # start-up and exit
                st, est = r["stats"], e["stats"]
                done = st["outcomes"]["completed"] + st["outcomes"]["reconnected"]
                if done != n:
                    raise SystemExit(f"--shards {k}: {done} of {n} sessions completed")
                cpu = r["cpu"] - e["cpu"]
                if k > 1:
                    parent = st["parent_cpu_s"] - est["parent_cpu_s"]
                    shard = [x - y for x, y in zip(st["shard_cpu_s"], est["shard_cpu_s"])]
                    busiest = max(parent, *shard)
                else:
                    busiest = cpu
                # on k idle cores: the busiest process, or the CPU shared over the cores
                on_k = max(busiest, cpu / k)
                runs[k].append((r["wall"] - e["wall"], cpu, busiest, on_k,
                                r["others"] - e["others"]))
                if k > 1 and a.verbose:
                    print(f"  --shards {k}: CPU s beyond start-up: parent {parent:.3f}, "
                          f"shards {', '.join(f'{x:.3f}' for x in shard)}; records "
                          f"{st['shard_records']}")
        print(f"{'shards':>6} {'wall us/sess':>13} {'cpu us/sess':>12} {'busiest':>8} "
              f"{'on N cores':>11} {'target+fb cpu':>14}")
        for k, rs in runs.items():
            row = [statistics.median(x[i] for x in rs) / n * 1e6 for i in range(5)]
            rows[k] = row
            print(f"{k:>6} {row[0]:>13.1f} {row[1]:>12.1f} {row[2]:>8.1f} {row[3]:>11.1f} "
                  f"{row[4]:>14.1f}")
    one, many = rows[1], rows[a.shards]
    print(f"speedup with {a.shards} shards: wall {one[0] / many[0]:.2f}x (this machine, "
          f"target and tc-feedback included); on idle cores: {one[1] / many[2]:.2f}x with "
          f"a core per process, {one[1] / many[3]:.2f}x on {a.shards} cores; load average "
          f"now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
