#!/usr/bin/env python3
"""What do --metrics and --metrics-listen cost a stage? tc-pace at 10,000 packets/s.

tc-pace replays a synthetic recording of RATE packets per second for SECONDS, alternately
without metrics and with --metrics FILE --metrics-listen ADDR and a scraper asking for
/metrics every second (a busy Prometheus: each scrape older than 1 s re-renders). Each run's
CPU time (user + system, from wait4) is compared:

- the ratio of the two CPU times per pair of runs (with / without), and its median: this
  includes the machine's noise (other processes, frequency), so look at the spread, and a
  fixed cost at start (importing the metrics and socket modules, binding, the first file),
  measured apart by pairs of short runs (--short seconds) and subtracted for the
  per-second cost;
- the exporter's own cost, measured inside the tool: tcpcopy_metrics_render_seconds_total
  (CPU time of its renderings in the main thread, its file writes in the writer thread
  and its HTTP requests in the listener thread) over
  process_cpu_seconds_total, from the last rendering. Target: under 1 %.

    python3 bench/bench_metrics.py [--seconds 10] [--rate 10000] [--repeat 3]
"""

import argparse
import os
import resource  # noqa: F401 - wait4's rusage
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cbor2  # noqa: E402

from tcpcopylib.records import encode_section, header  # noqa: E402


def recording(path: Path, seconds: float, rate: float) -> int:
    """pkt records RATE per second, evenly spaced, 60-byte datagrams; returns the count."""
    n = int(seconds * rate)
    step = int(1e9 / rate)
    t0 = time.time_ns() - 3600 * 10**9
    data = bytes(60)
    with open(path, "wb") as f:
        f.write(encode_section(header("bench")))
        f.write(b"".join(cbor2.dumps({"t": "pkt", "ts": t0 + i * step, "data": data})
                         for i in range(n)))
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scraper(port: int, stop: threading.Event, every: float = 1.0) -> list:
    got = []

    def loop():
        while not stop.wait(every):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
                    c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    data = b""
                    while chunk := c.recv(65536):
                        data += chunk
                got.append(len(data))
            except OSError:
                pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return got


def value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def run(rec: Path, with_metrics: bool, tmp: Path) -> dict:
    """One tc-pace run; its CPU seconds (and the exporter's own, with metrics)."""
    env = dict(os.environ, PATH=f"{REPO / 'bin'}:{os.environ.get('PATH', '')}")
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules byte-compiled once
    args = [str(REPO / "bin" / "tc-pace")]
    prom = tmp / "pace.prom"
    stop = threading.Event()
    scrapes = []
    if with_metrics:
        port = free_port()
        args += ["--metrics", str(prom), "--metrics-listen", f"127.0.0.1:{port}"]
    with open(rec, "rb") as f:
        t0 = time.monotonic()
        p = subprocess.Popen(args, stdin=f, stdout=subprocess.DEVNULL, env=env)
        if with_metrics:
            scrapes = scraper(port, stop)
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
    stop.set()
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, f"tc-pace exited {p.returncode}"
    out = {"cpu": ru.ru_utime + ru.ru_stime, "wall": wall}
    if with_metrics:
        text = prom.read_text()
        out["render_s"] = value(text, "tcpcopy_metrics_render_seconds_total")
        out["tool_cpu"] = value(text, "process_cpu_seconds_total")
        out["scrapes"] = len(scrapes)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--short", type=float, default=0.3, help="seconds of the short runs")
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="pairs of runs (alternating)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rec, short = tmp / "rec.cbor", tmp / "short.cbor"
        n = recording(rec, a.seconds, a.rate)
        recording(short, a.short, a.rate)
        print(f"tc-pace, {n} packets at {a.rate:,.0f}/s ({a.seconds:g} s per run), "
              f"{a.repeat} pairs of runs; with = --metrics FILE --metrics-listen ADDR, "
              f"scraped every 1 s")
        run(short, True, tmp)  # byte-compile once
        run(short, False, tmp)
        fixed = []
        for _ in range(max(5, a.repeat * 2)):
            fixed.append(run(short, True, tmp)["cpu"] - run(short, False, tmp)["cpu"])
        fixed_s = statistics.median(fixed)
        print(f"fixed cost at start ({a.short:g} s runs): median {fixed_s * 1e3:.1f} ms CPU "
              f"(min {min(fixed) * 1e3:.1f}, max {max(fixed) * 1e3:.1f})")
        ratios, own, marginal = [], [], []
        for i in range(a.repeat):
            base = run(rec, False, tmp)
            met = run(rec, True, tmp)
            ratio = met["cpu"] / base["cpu"]
            share = met["render_s"] / met["tool_cpu"]
            extra = (met["cpu"] - base["cpu"] - fixed_s) / base["cpu"]
            ratios.append(ratio)
            own.append(share)
            marginal.append(extra)
            print(f"pair {i + 1}: without {base['cpu']:.3f} s CPU ({base['wall']:.2f} s wall), "
                  f"with {met['cpu']:.3f} s CPU ({met['wall']:.2f} s wall, {met['scrapes']} "
                  f"scrapes): ratio {ratio:.4f}, {extra * 100:+.2f} % after the fixed cost; "
                  f"exporter's own CPU {met['render_s'] * 1e3:.2f} ms = {share * 100:.3f} % of "
                  f"the stage's")
        print(f"median CPU ratio with/without: {statistics.median(ratios):.4f} "
              f"(min {min(ratios):.4f}, max {max(ratios):.4f}; machine noise included)")
        print(f"median extra CPU after the fixed cost: {statistics.median(marginal) * 100:+.2f} %"
              f" (noise included)")
        print(f"median exporter share of the stage's CPU: {statistics.median(own) * 100:.3f} % "
              f"(target < 1 %)")


if __name__ == "__main__":
    main()
