#!/usr/bin/env python3
"""tc-emit send rate into the namespace lab (needs root). Target: >= 150k packets/s.

Builds a fresh lab, writes a pcap of TCP RST|ACK packets client -> target:8080 (the target
drops them without a reply), then runs, inside the online namespace:

    tc-readpcap FILE | tc-emit --stats                      (raw IP socket)
    tc-readpcap FILE | tc-emit --stats -o lan0 --dst-mac M  (AF_PACKET)
    tc-emit --stats FILE.cbor                               (emit alone, stream from a file)

and prints packets/s (from tc-emit's --stats line and from wall time), how many the
target's lan0 received, and the CPU time of all processes per packet (user + sys, which
includes the target's receive path: a veth transmit runs it on the sender's CPU). Two
"ceiling" rows send pre-built packets from a bare Python loop, for comparison on a loaded
machine.

    python3 bench/bench_emit.py [--count 300000] [--sizes 100,1500] [--repeat 3]
"""

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tcpcopylib import packet  # noqa: E402
from tcpcopylib.lab import Lab  # noqa: E402

BIN = REPO / "bin"


def write_pcap(path, count: int, ip_size: int, lab: Lab) -> None:
    src, dst = packet.ip_bytes(lab.client_ip), packet.ip_bytes(lab.target_ip)
    eth = (bytes.fromhex(lab.target_mac.replace(":", "")) +
           bytes.fromhex(lab.online_mac.replace(":", "")) + b"\x08\x00")
    payload = bytes(max(0, ip_size - 40))
    rec = struct.Struct("<IIII")
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(count):
            ip = packet.build_tcp(src, dst, 10000 + i % 50000, 8080, i * 1000, 1,
                                  packet.TH_RST | packet.TH_ACK, payload=payload)
            frame = eth + ip
            f.write(rec.pack(1_700_000_000 + i // 100000, i % 1000000, len(frame), len(frame)))
            f.write(frame)


CEILING = """
import socket, sys, time
sys.path.insert(0, {repo!r})
from tcpcopylib import packet
src, dst = packet.ip_bytes({src!r}), packet.ip_bytes({dst!r})
pkts = [packet.build_tcp(src, dst, 10000 + i, 8080, i, 1, packet.TH_RST | packet.TH_ACK,
                         payload=bytes({pay})) for i in range(1000)]
if {link!r}:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(({iface!r}, 0))
    eth = bytes.fromhex({mac!r}) + s.getsockname()[4] + b"\\x08\\x00"
    pkts = [eth + p for p in pkts]
    send = s.send
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    send = lambda p, a=({dst!r}, 0): s.sendto(p, a)
t = time.perf_counter()
for _ in range({loops}):
    for p in pkts:
        send(p)
dt = time.perf_counter() - t
print("tc-emit: sent %d, %.0f pkt/s" % ({loops} * 1000, {loops} * 1000 / dt), file=sys.stderr)
"""


def ceiling_cmd(lab: Lab, size: int, count: int, link: bool) -> str:
    code = CEILING.format(repo=str(REPO), src=lab.client_ip, dst=lab.target_ip,
                          pay=max(0, size - 40), link=link, iface=lab.online_if,
                          mac=lab.target_mac.replace(":", ""), loops=max(1, count // 1000))
    return f"{sys.executable} -c {shlex.quote(code)}"


def rx_packets(lab: Lab) -> int:
    out = subprocess.run(["ip", "-n", lab.ns("target"), "-s", "-j", "link", "show",
                          lab.target_if], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def run_once(lab: Lab, cmd: str) -> tuple[float, float, int, float]:
    """(rate from --stats, rate from wall time, packets the target got, CPU us per packet)"""
    before = rx_packets(lab)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(["ip", "netns", "exec", lab.ns("online"), "sh", "-c", cmd],
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {cmd}\n{r.stderr}")
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("tc-emit: sent")][-1]
    sent = int(re.search(r"sent (\d+)", line).group(1))
    rate = float(re.search(r"([\d,]+) pkt/s", line).group(1).replace(",", ""))
    return rate, sent / wall, rx_packets(lab) - before, cpu / sent * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300_000)
    ap.add_argument("--sizes", default="100,1500", help="IP datagram sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_emit: needs root (network namespaces, raw sockets)", file=sys.stderr)
        return 77
    print(f"tc-emit into the lab, {a.count} packets per run, median of {a.repeat}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'case':<44} {'size':>5} {'pkt/s (stats)':>14} {'pkt/s (wall)':>13} "
          f"{'target rx':>10} {'CPU us/pkt':>11}")
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in a.sizes.split(",")):
            pcap = Path(tmp) / f"rst{size}.pcap"
            cbor = Path(tmp) / f"rst{size}.cbor"
            write_pcap(pcap, a.count, size, lab)
            subprocess.run(f"{BIN}/tc-readpcap {pcap} > {cbor}", shell=True, check=True)
            cases = {
                "ceiling: python sendto loop, no records": ceiling_cmd(lab, size, a.count, False),
                "ceiling: python AF_PACKET send loop": ceiling_cmd(lab, size, a.count, True),
                "tc-readpcap | tc-emit": f"{BIN}/tc-readpcap {pcap} | {BIN}/tc-emit --stats",
                "tc-readpcap | tc-emit -o lan0 (AF_PACKET)":
                    f"{BIN}/tc-readpcap {pcap} | {BIN}/tc-emit --stats -o {lab.online_if} "
                    f"--dst-mac {lab.target_mac}",
                "tc-emit FILE.cbor": f"{BIN}/tc-emit --stats {cbor}",
            }
            for name, cmd in cases.items():
                runs = [run_once(lab, cmd) for _ in range(a.repeat)]
                med = statistics.median(r[0] for r in runs)
                wall = statistics.median(r[1] for r in runs)
                rx = min(r[2] for r in runs)
                cpu = statistics.median(r[3] for r in runs)
                print(f"{name:<44} {size:>5} {med:>14,.0f} {wall:>13,.0f} {rx:>10,} {cpu:>11.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
