#!/usr/bin/env python3
"""Throughput of the record stream hot paths: records/s and CPU us per record.

Cases (each on a synthetic stream of N small TCP packets, from a file):

    reader        RecordReader alone, in-process (CPU of the loop only)
    pace          tc-pace < FILE > /dev/null      (pass-through: ts 1 ns apart, never sleeps)
    pace-speed    tc-pace --speed 2 < FILE        (every ts rewritten)
    dump-pcap     tc-dump --pcap FILE > /dev/null
    dump-text     tc-dump FILE > /dev/null
    emit          tc-emit FILE, inside a fresh lab's online namespace (root only)

Streams: "readpcap" layout {t, ts, data} and "session" layout {t, ts, data, sid}. The CPU
of a tool run is user+sys of the child minus that of the same command on an empty stream
(interpreter start-up). ``--compare DIR`` runs every case alternately with another
checkout (e.g. ``git archive HEAD~3 | tar -x -C /tmp/base``) so before/after numbers come
from the same machine load.

    python3 bench/bench_stream.py [--count 200000] [--repeat 3] [--cases reader,pace,...]
                                  [--compare DIR] [--no-emit]

Measured (2 CPUs shared with other work, load ~2; --compare with the code before the
fast paths, interleaved; rec/s and CPU us/record, 100-byte packets):

    case        layout    after              before
    reader      readpcap  464,512   2.14     298,060   2.99
    reader      session   380,873   2.59     270,803   3.54
    pace        readpcap  220,209   4.28     132,863   7.39
    pace        session   188,274   5.13     126,770   7.80
    pace-speed  session   141,798   6.02     124,639   7.78
    dump-pcap   readpcap  279,454   3.52     201,537   4.85
    dump-pcap   session   207,063   4.44     173,353   5.12
    emit        readpcap   79,472  12.11      75,382  12.79   (CPU incl. kernel + target rx)
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cbor2  # noqa: E402

from tcpcopylib import packet  # noqa: E402
from tcpcopylib.records import encode_section, header  # noqa: E402

CASES = ("reader", "pace", "pace-speed", "dump-pcap", "dump-text", "emit")

READER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tcpcopylib.records import RecordReader
fd = __import__("os").open(sys.argv[2], 0)
t, w = time.process_time(), time.perf_counter()
n = 0
for rec in RecordReader(fd):
    n += 1
print(n, time.process_time() - t, time.perf_counter() - w)
"""


def write_stream(path: Path, count: int, layout: str, src="10.200.9.2", dst="10.200.1.2",
                 size: int = 100) -> None:
    """count TCP RST|ACK packets src -> dst:8080, ts 1 ns apart (never paced)."""
    s, d = packet.ip_bytes(src), packet.ip_bytes(dst)
    pkts = [packet.build_tcp(s, d, 10000 + i, 8080, i * 1000, 1, packet.TH_RST | packet.TH_ACK,
                             payload=bytes(max(0, size - 40 - i % 3))) for i in range(1000)]
    ts0 = 1_700_000_000_000_000_000
    with open(path, "wb") as f:
        f.write(encode_section(header("bench")))
        out = []
        for i in range(count):
            rec = {"t": "pkt", "ts": ts0 + i, "data": pkts[i % 1000]}
            if layout == "session":
                rec["sid"] = i % 5000
            out.append(cbor2.dumps(rec))
            if len(out) >= 10000:
                f.write(b"".join(out))
                out.clear()
        f.write(b"".join(out))


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_cmd(argv, stdin_path=None) -> tuple[float, float, str]:
    """(CPU s of the child, wall s, stderr)"""
    c0, t0 = _cpu_children(), time.perf_counter()
    with open(stdin_path or os.devnull, "rb") as fin, open(os.devnull, "wb") as fout:
        r = subprocess.run(argv, stdin=fin, stdout=fout, stderr=subprocess.PIPE, text=True,
                           timeout=900)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, argv))}\n{r.stderr}")
    return cpu, wall, r.stderr


class Bench:
    def __init__(self, args, tmp: Path):
        self.a, self.tmp = args, tmp
        self.files = {}
        for layout in ("readpcap", "session"):
            p = tmp / f"{layout}.cbor"
            write_stream(p, args.count, layout)
            self.files[layout] = p
        self.empty = tmp / "empty.cbor"
        self.empty.write_bytes(encode_section(header("bench")))
        self.lab = None

    def argv(self, repo: Path, case: str, layout: str, path: Path):
        """(argv, stdin path or None, in-lab?) of one case."""
        b = repo / "bin"
        if case == "reader":
            return [sys.executable, "-c", READER, str(repo), str(path)], None, False
        if case == "pace":
            return [str(b / "tc-pace")], path, False
        if case == "pace-speed":
            return [str(b / "tc-pace"), "--speed", "2"], path, False
        if case == "dump-pcap":
            return [str(b / "tc-dump"), "--pcap", str(path)], None, False
        if case == "dump-text":
            return [str(b / "tc-dump"), str(path)], None, False
        if case == "emit":
            return [str(b / "tc-emit"), "--stats", str(path)], None, True
        raise ValueError(case)

    def once(self, repo: Path, case: str, layout: str) -> tuple[float, float]:
        """(records/s, CPU us/record) of one run."""
        n = self.a.count
        argv, stdin, in_lab = self.argv(repo, case, layout, self.files[layout])
        if in_lab:
            argv = ["ip", "netns", "exec", self.lab.ns("online"), *argv]
        cpu, wall, err = run_cmd(argv, stdin)
        e_argv, e_stdin, _ = self.argv(repo, case, layout, self.empty)
        if in_lab:
            e_argv = ["ip", "netns", "exec", self.lab.ns("online"), *e_argv]
        cpu0, wall0, _ = run_cmd(e_argv, e_stdin)
        return n / max(1e-9, wall - wall0), max(0.0, cpu - cpu0) / n * 1e6

    def reader_once(self, repo: Path, layout: str) -> tuple[float, float]:
        argv, _, _ = self.argv(repo, "reader", layout, self.files[layout])
        r = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
        n, cpu, wall = r.stdout.split()
        n = int(n)
        if n != self.a.count:
            raise SystemExit(f"reader read {n} of {self.a.count} records")
        return n / float(wall), float(cpu) / n * 1e6

    def measure(self, repo: Path, case: str, layout: str) -> tuple[float, float]:
        if case == "reader":
            return self.reader_once(repo, layout)
        return self.once(repo, case, layout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000, help="records per stream")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    ap.add_argument("--layouts", default="readpcap,session")
    ap.add_argument("--compare", metavar="DIR", type=Path,
                    help="another checkout to measure alternately (the 'before' column)")
    ap.add_argument("--no-emit", action="store_true", help="skip the lab case")
    a = ap.parse_args()
    cases = [c for c in a.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}")
    if "emit" in cases and (a.no_emit or os.geteuid() != 0):
        cases.remove("emit")
        print("(emit skipped: needs root)" if not a.no_emit else "(emit skipped)")
    repos = [("this", REPO)] + ([("compare", a.compare.resolve())] if a.compare else [])
    print(f"{a.count} records per run, median of {a.repeat}; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    cols = "".join(f" {name + ' rec/s':>16} {name + ' us/rec':>15}" for name, _ in repos)
    print(f"{'case':<12} {'layout':<9}{cols}")
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(a, Path(tmp))
        lab = None
        try:
            if "emit" in cases:
                from tcpcopylib.lab import Lab

                lab = bench.lab = Lab().up()
                for layout in ("readpcap", "session"):
                    write_stream(bench.files[layout], a.count, layout,
                                 src=lab.client_ip, dst=lab.target_ip)
            for case in cases:
                for layout in a.layouts.split(","):
                    runs = {name: [] for name, _ in repos}
                    for _ in range(a.repeat):
                        for name, repo in repos:  # interleaved
                            runs[name].append(bench.measure(repo, case, layout))
                    row = ""
                    for name, _ in repos:
                        rate = statistics.median(r[0] for r in runs[name])
                        cpu = statistics.median(r[1] for r in runs[name])
                        row += f" {rate:>16,.0f} {cpu:>15.2f}"
                    print(f"{case:<12} {layout:<9}{row}", flush=True)
        finally:
            if lab is not None:
                lab.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
