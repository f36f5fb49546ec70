#!/usr/bin/env python3
"""Throughput of tc-readpcap alone and of tc-readpcap | tc-dump --pcap.

bench_readpcap.py [--count 1000000] [--size 100] [--runs 3]
Writes an Ethernet pcap of COUNT TCP frames (IP length SIZE) in /tmp, times each
pipeline RUNS times (best run reported: wall-clock rate and CPU per packet, which is less
sensitive to other load on the machine) and removes the file.
"""

import argparse
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tcpcopylib.packet import build_tcp  # noqa: E402


def write_pcap(path: str, count: int, size: int) -> None:
    eth = b"\x02\x00\x00\x00\x00\x05\x02\x00\x00\x00\x00\x01\x08\x00"
    src, dst = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.5")
    # 256 distinct frames, repeated: the reader's cost does not depend on the content
    frames = [eth + build_tcp(src, dst, 40000 + i, 8080, i * 1000, 1, 0x18,
                              payload=b"x" * (size - 40)) for i in range(256)]
    rec = struct.Struct("<IIII").pack
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        parts = []
        for i in range(count):
            fr = frames[i & 255]
            parts.append(rec(1700000000 + i // 100000, (i % 100000) * 10, len(fr), len(fr)))
            parts.append(fr)
            if len(parts) >= 20000:
                f.write(b"".join(parts))
                parts.clear()
        f.write(b"".join(parts))


def timed(cmd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes of the pipeline)."""
    env = dict(os.environ, PATH=f"{REPO / 'bin'}:{os.environ.get('PATH', '')}")
    env.pop("PYTHONUNBUFFERED", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=100, help="IP datagram length")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    fd, path = tempfile.mkstemp(prefix="bench_readpcap.", suffix=".pcap", dir="/tmp")
    os.close(fd)
    try:
        t = time.perf_counter()
        write_pcap(path, a.count, a.size)
        print(f"wrote {a.count} frames of {a.size + 14} B ({os.path.getsize(path) >> 20} MiB) "
              f"in {time.perf_counter() - t:.1f} s")
        cases = [
            ("tc-readpcap > /dev/null", f"tc-readpcap {path} > /dev/null"),
            ("tc-readpcap | tc-dump --pcap > /dev/null",
             f"tc-readpcap {path} | tc-dump --pcap > /dev/null"),
        ]
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        for label, cmd in cases:
            wall, cpu = min(timed(cmd) for _ in range(a.runs))
            print(f"{label:45s} {wall:6.2f} s  {a.count / wall / 1000:5.0f} k packets/s  "
                  f"(CPU {cpu * 1e6 / a.count:.2f} us/packet, all processes)")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
