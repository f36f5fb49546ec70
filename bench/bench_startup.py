#!/usr/bin/env python3
"""Startup time of every tool: `tc-X --version`, min and median of N runs, bytecode enabled.

Budget (style-and-conventions.md 3.2): about 30 ms on this class of machine.

    python3 bench/bench_startup.py [-n 20]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="runs per tool")
    a = ap.parse_args()
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    tools = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    # bin/_tc runs `env python3`: a pyenv shim (a shell script) there adds ~40 ms by itself
    base = [("python3 -c pass", ["python3", "-c", "pass"]),
            ("sys.executable -c pass", [sys.executable, "-c", "pass"]),
            ("sys.executable bin/_tc (dump)",
             [sys.executable, str(REPO / "bin" / "tc-dump"), "--version"])]
    for name, cmd in base + [
            (f"{t} --version", [str(REPO / "bin" / t), "--version"]) for t in sorted(tools)]:
        subprocess.run(cmd, capture_output=True, env=env)  # warm: write bytecode, page cache
        times = []
        for _ in range(a.n):
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=env)
            times.append((time.perf_counter() - t) * 1e3)
        print(f"{name:30s} min {min(times):6.1f} ms   median {statistics.median(times):6.1f} ms")


if __name__ == "__main__":
    main()
