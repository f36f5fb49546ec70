#!/usr/bin/env python3
"""Benchmark tc-capture: packets/s captured, kernel drops, CPU per packet.

Builds two namespaces joined by one veth (offloads off), then blasts TCP RST segments
addressed to the capturing side's local address into it (the kernel drops them silently,
so the receiver does only the capture work), with tcpreplay --topspeed if installed
(apt-get install tcpreplay), else a Python AF_PACKET sender. tc-capture runs on the
receiving veth and writes to /dev/null. Everything is torn down at the end.

    python3 bench/bench_capture.py [--packets N] [--size BYTES]
                                   [--engine pcap|afpacket|ring|all] [--pps RATE]
                                   [--repeat R] [--deliver] [--drain] [--latency N]
                                   [--server-half [--as-server]]

--engine all runs pcap, afpacket and ring in turn (each repeat runs all three, so that a
change of load on a shared machine hits them alike); the load average is printed with
each run. --latency N measures, before the CPU runs, the latency of each engine: N marked
frames 1-3 ms apart, each timed from the sender's send() to the moment its record is read
from tc-capture's stdout; on an idle link, then under each tcpreplay load of
--latency-load PPS... (with tc-capture's CPU per packet during that run). --tool
tc-intercept measures tc-intercept instead (the load's packets are all TCP: it writes
each as a reply).

--server-half runs tc-capture --server-half (the load stays client packets: the cost of
that mode's general path for the client half); with --as-server the frames are a local
server's answers instead (from RX's address and a listening port, written as s2c records).

Two modes. Live (default): tcpreplay sends while tc-capture reads; on a 2-core machine
the sender and the capture share the CPUs, so the offered rate is the sender's limit.
--drain: tc-capture is stopped (SIGSTOP) while the load fills its ring, then continued;
the time to write every record is its capacity (keep --packets within the ring).

Measured on the 2-vCPU dev VM while other test suites ran (load average 4-7), pcap engine:
  live, 100 B, tcpreplay top speed / --pps 300000: 73-209 kpps offered, all captured,
      0 kernel drops, 1.8-2.1 us CPU per packet
  --drain, 100 B (150k-250k packets): 260-600 kpps, 0 drops, 1.35-2.0 us/pkt
  --drain, 1500 B (60k packets): 250-410 kpps, 0 drops, 1.7-2.5 us/pkt
  --drain --engine afpacket, 100 B: 45-120 kpps, ~8 us/pkt (one recvfrom per packet)

The three engines side by side (--engine all, 100 B, tcpreplay; same VM, load average
0.9-2.2; CPU in us per packet, two runs each; latency p50/p99 in ms, 300 marked packets):

  tc-capture        20 kpps    100 kpps   300 kpps   --drain     idle p50/p99  100 kpps p50/p99
  pcap              4.2-4.5    1.4-1.5    1.0-1.2    0.67-0.73   0.67/1.15     0.73/1.2-1.4
  afpacket          19         8-10       4.3-4.5    4.2-4.5     0.12/0.4-1.9  0.2-0.4/2.1-3.2
  ring (0.1 ms linger) 10-12   3.0-3.5    1.2-1.4    0.87-1.27   0.13/0.25-0.8 0.25/0.9-3.3
  tc-intercept
  pcap              2.6-3.3    1.0-1.2                           0.60/1.13     0.67/1.8
  afpacket          17         6.8-7.2                           0.11/0.28     0.36/57
  ring (no linger)  15-16      5.7-5.9                           0.13/0.27     0.14/0.73

The ring is immediate (libpcap's pcap engine waits for its 1 ms block timer) but costs more
CPU per packet than pcap, the more so the smaller its batches (1.2-1.7x at 300 kpps and in
--drain, 2-3x at 20-100 kpps with tc-capture's linger, 5x in tc-intercept, which does not
linger); afpacket costs more still.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tcpcopylib.packet import TH_ACK, TH_RST, build_tcp, ip_bytes  # noqa: E402

NS_TX, NS_RX = f"tcb{os.getpid()}-tx", f"tcb{os.getpid()}-rx"
TX_IP, RX_IP = "10.201.0.2", "10.201.0.1"
TX_MAC, RX_MAC = "02:00:00:00:c0:02", "02:00:00:00:c0:01"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def lab_up():
    sh("ip", "netns", "add", NS_TX)
    sh("ip", "netns", "add", NS_RX)
    sh("ip", "-n", NS_TX, "link", "add", "tx0", "type", "veth", "peer", "name", "rx0",
       "netns", NS_RX)
    for ns, dev, mac, ip in ((NS_TX, "tx0", TX_MAC, TX_IP), (NS_RX, "rx0", RX_MAC, RX_IP)):
        sh("ip", "-n", ns, "link", "set", dev, "address", mac)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "sh", "-c",
           f"for f in tso gso gro tx rx sg; do ethtool -K {dev} $f off 2>/dev/null; done; true")


def lab_down():
    for ns in (NS_TX, NS_RX):
        sh("ip", "netns", "del", ns, check=False)


def frames(n_flows: int, size: int, dst_mac: str, as_server: bool = False) -> list[bytes]:
    """Ethernet frames: RST|ACK from TX to RX:8080.

    With RX's MAC the receiving kernel runs its IP/TCP input (and drops the RST quietly);
    with a foreign MAC it drops the frame right after the capture taps, which is the
    cheapest load for the sender (the capture path is the same either way).
    """
    mac = lambda s: bytes.fromhex(s.replace(":", ""))  # noqa: E731
    out = []
    payload = b"x" * max(0, size - 14 - 40)
    for i in range(n_flows):
        ip = build_tcp(ip_bytes(TX_IP), ip_bytes(RX_IP), 10000 + i, 8080, 1000 * i, 1,
                       TH_RST | TH_ACK, payload=payload)
        if as_server:  # RX:8080's answer (captured as it comes in: the path is the same)
            ip = build_tcp(ip_bytes(RX_IP), ip_bytes(TX_IP), 8080, 10000 + i, 1000 * i, 1,
                           TH_RST | TH_ACK, payload=payload)
        out.append(mac(dst_mac) + mac(TX_MAC) + b"\x08\x00" + ip)
    return out


def write_pcap(path: Path, fr: list[bytes], count: int) -> None:
    import dpkt

    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f)
        t = time.time()
        for i in range(count):
            w.writepkt(fr[i % len(fr)], t + i * 1e-6)


WRITTEN = r"(\d+) packets written, (?:\d+ server to client, )?"  # (the stats line)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def blast_python(fr: list[bytes], count: int, pps: int) -> None:
    """Fallback sender: AF_PACKET send() in the TX namespace (a child process)."""
    code = f"""
import socket, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(("tx0", 0))
fr = {fr!r}; n = len(fr); send = s.send; pps = {pps}
t0 = time.monotonic()
for i in range({count}):
    send(fr[i % n])
    if pps and i % 256 == 0:
        ahead = i / pps - (time.monotonic() - t0)
        if ahead > 0: time.sleep(ahead)
"""
    sh("ip", "netns", "exec", NS_TX, sys.executable, "-c", code)


ENGINES = ("pcap", "afpacket", "ring")
# tc-intercept's stats line: captured, written, kernel drops, interface drops
INTERCEPT_STATS = (r"(\d+) packets captured, (\d+) replies written.* (\d+) dropped, "
                   r"(-?\d+) dropped by interface")


def tool_cmd(args, engine: str, out: str) -> list[str]:
    """The command line of the tool measured (--tool), writing its stream to ``out``."""
    if args.tool == "tc-intercept":
        return ["ip", "netns", "exec", NS_RX, str(REPO / "bin" / "tc-intercept"), "rx0",
                "-F", "tcp", "--engine", engine, "--stats"]
    return ["ip", "netns", "exec", NS_RX, str(REPO / "bin" / "tc-capture"), "rx0",
            "--engine", engine, "-w", out, "--stats",
            *(["--server-half"] if args.server_half else [])]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def latency_run(args, engine: str, pcap: Path | None, n: int, background_pps: int = 0):
    """Lone-packet latencies (ms) through the tool with --engine ENGINE: n marked frames
    sent 1-3 ms apart (at random: no lock-step with a timer), each timed from the sender's
    send() to the moment its record is read from the tool's stdout (a pipe). With
    ``background_pps``, tcpreplay sends the load at that rate meanwhile (latency under
    load). Returns (latencies, the tool's CPU microseconds per record over the run, about:
    records are counted by their IPv4 header's first bytes)."""
    import random
    import select
    import socket

    from tcpcopylib.lab import in_netns

    p = subprocess.Popen(tool_cmd(args, engine, "-"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    bg = None
    with in_netns(NS_TX):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        tx.bind(("tx0", 0))
    fd = p.stdout.fileno()
    lat = []
    try:
        os.read(fd, 4096)  # the stream header: the capture is open
        if background_pps and pcap is not None:
            bg = subprocess.Popen(["ip", "netns", "exec", NS_TX, "tcpreplay", "-K", "--pps",
                                   str(background_pps), "--loop", "0", "-i", "tx0", str(pcap)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            end = time.monotonic() + 1.0  # the load runs; its records are read meanwhile
            while time.monotonic() < end:
                if select.select([fd], [], [], 0.1)[0]:
                    os.read(fd, 1 << 20)
        cpu0, rec0 = cpu_seconds(p.pid), 0
        mac = lambda s: bytes.fromhex(s.replace(":", ""))  # noqa: E731
        dst = RX_MAC if args.deliver else "02:00:00:00:00:99"
        tail = b""
        for i in range(n):
            seq = 0x5EC00000 + i  # (the load's are below 64000: no record looks like it)
            marker = struct.pack("!HHI", 9999, 8080, seq)  # TCP ports and sequence number
            ip = build_tcp(ip_bytes(TX_IP), ip_bytes(RX_IP), 9999, 8080, seq, 1,
                           TH_RST | TH_ACK, payload=b"x" * 46)
            frame = mac(dst) + mac(TX_MAC) + b"\x08\x00" + ip
            t0 = time.perf_counter()
            tx.send(frame)
            while True:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise SystemExit(f"tc-capture exited: {p.stderr.read().decode()}")
                rec0 += data.count(b"\x45\x00")  # (about one per record: for the CPU share)
                if marker in tail[-32:] + data:
                    break
                tail = data
            lat.append((time.perf_counter() - t0) * 1e3)
            time.sleep(random.uniform(0.001, 0.003))
        cpu = cpu_seconds(p.pid) - cpu0
    finally:
        tx.close()
        if bg is not None:
            bg.terminate()
            bg.wait()
        p.terminate()
        p.communicate(timeout=20)
    return lat, cpu / max(rec0, 1) * 1e6


def one_run(args, pcap: Path | None, fr) -> dict:
    out = open(os.devnull, "wb")  # (tc-intercept writes to stdout)
    p = subprocess.Popen(tool_cmd(args, args.engine, "/dev/null"), stdout=out,
                         stderr=subprocess.PIPE, text=True)
    out.close()
    try:
        time.sleep(1.0)  # start-up (imports, ring set-up) is not measured
        if p.poll() is not None:
            raise SystemExit(f"tc-capture exited early: {p.stderr.read()}")
        cpu0 = cpu_seconds(p.pid)
        t0 = time.monotonic()
        if pcap is not None:
            rate = ["--pps", str(args.pps)] if args.pps else ["--topspeed"]
            rate.append("-K")  # preload the file: no disk reads while sending
            r = sh("ip", "netns", "exec", NS_TX, "tcpreplay", *rate, "-i", "tx0",
                   str(pcap), check=False)
            if r.returncode != 0:
                raise SystemExit(f"tcpreplay failed: {r.stderr.strip()}")
            m = re.search(r"sent in ([\d.]+) seconds", r.stdout)
            send_s = float(m.group(1)) if m else None  # without the preload time
        else:
            send_s = None
            blast_python(fr, args.packets, args.pps)
        t_send = send_s or time.monotonic() - t0
        time.sleep(0.5)  # let the capture drain its ring
        cpu = cpu_seconds(p.pid) - cpu0
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    if args.tool == "tc-intercept":
        m = re.search(INTERCEPT_STATS, err)
    else:
        m = re.search(WRITTEN + r"(\d+) captured.* (\d+) dropped by kernel, "
                      r"(-?\d+) dropped by interface", err)
    if not m:
        raise SystemExit(f"no stats from {args.tool}: {err}")
    written, captured, kdrop, ifdrop = map(int, m.groups())
    if args.tool == "tc-intercept":
        written, captured = captured, written  # (its order: captured, then written)
    return {"sent": args.packets, "send_s": t_send, "offered_pps": args.packets / t_send,
            "written": written, "captured_pps": written / t_send, "kernel_drops": kdrop,
            "if_drops": ifdrop, "cpu_s": cpu, "cpu_us_per_pkt": cpu / max(written, 1) * 1e6}


def wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def drain_run(args, pcap: Path | None, fr) -> dict:
    """Capacity without the sender in the way: stop tc-capture (SIGSTOP), let the load fill
    its ring, continue it and time until it has written every record (watching the bytes
    it wrote in /proc/PID/io), taking its CPU time at that moment."""
    from tcpcopylib.capture import encode_pkt

    expected = args.packets * len(encode_pkt(1 << 60, fr[0][14:]))
    cmd = ["ip", "netns", "exec", NS_RX, str(REPO / "bin" / "tc-capture"), "rx0",
           "--engine", args.engine, "-w", "/dev/null", "--stats", "-B", str(args.buffer_kib),
           *(["--server-half"] if args.server_half else [])]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        base = wchar(p.pid)  # the stream header
        cpu0 = cpu_seconds(p.pid)
        p.send_signal(signal.SIGSTOP)
        if pcap is not None:
            sh("ip", "netns", "exec", NS_TX, "tcpreplay", "-K", "--topspeed", "-i", "tx0",
               str(pcap))
        else:
            blast_python(fr, args.packets, 0)
        t0 = time.monotonic()
        p.send_signal(signal.SIGCONT)
        done = False
        while time.monotonic() - t0 < 30:
            if wchar(p.pid) - base >= expected:
                done = True
                break
            time.sleep(0.001)
        dt = time.monotonic() - t0
        cpu = cpu_seconds(p.pid) - cpu0
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    m = re.search(WRITTEN + r"(\d+) captured.* (\d+) dropped by kernel", err)
    if not m:
        raise SystemExit(f"no stats from tc-capture: {err}")
    written, _captured, kdrop = map(int, m.groups())
    return {"written": written, "kernel_drops": kdrop, "drain_s": dt, "complete": done,
            "pps": written / dt, "cpu_s": cpu, "cpu_us_per_pkt": cpu / max(written, 1) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=100, help="frame size (default 100)")
    ap.add_argument("--engine", choices=(*ENGINES, "all"), default="pcap")
    ap.add_argument("--latency", type=int, default=0, metavar="N",
                    help="first measure each engine's lone-packet latency with N frames")
    ap.add_argument("--latency-load", type=int, nargs="*", default=[], metavar="PPS",
                    help="with --latency, measure it again under a tcpreplay load of PPS "
                         "(needs tcpreplay)")
    ap.add_argument("--pps", type=int, default=0, help="offered rate (default: top speed)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--python-sender", action="store_true", help="do not use tcpreplay")
    ap.add_argument("--deliver", action="store_true",
                    help="address frames to RX's MAC, so its IP/TCP input runs too (slower "
                         "sender); default: a foreign MAC, dropped after the capture taps")
    ap.add_argument("--drain", action="store_true",
                    help="measure capacity: fill the stopped capture's ring, then time the "
                         "drain (COUNT must fit in -B)")
    ap.add_argument("--buffer-kib", type=int, default=262144,
                    help="tc-capture -B for --drain (default 262144)")
    ap.add_argument("--server-half", action="store_true", help="tc-capture --server-half")
    ap.add_argument("--tool", choices=("tc-capture", "tc-intercept"), default="tc-capture",
                    help="the tool measured (tc-intercept: live and --latency runs, not "
                         "--drain; it keeps the load's packets, all TCP, as replies)")
    ap.add_argument("--as-server", action="store_true",
                    help="with --server-half: the frames are a local server's answers")
    args = ap.parse_args()
    if args.as_server and not args.server_half:
        ap.error("--as-server needs --server-half")
    if args.tool == "tc-intercept" and (args.drain or args.server_half):
        ap.error("--tool tc-intercept: no --drain, no --server-half")
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 77
    fr = frames(64, args.size, RX_MAC if args.deliver else "02:00:00:00:00:99", args.as_server)
    use_tcpreplay = shutil.which("tcpreplay") and not args.python_sender
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still tear the lab down
    lab_up()
    listener = None
    try:
        if args.as_server:  # the server whose port --server-half keeps
            listener = subprocess.Popen(
                ["ip", "netns", "exec", NS_RX, sys.executable, "-c", "import socket, time; "
                 "s = socket.socket(); s.bind(('', 8080)); s.listen(); time.sleep(3600)"])
            time.sleep(0.5)
        with tempfile.TemporaryDirectory() as d:
            pcap = None
            if use_tcpreplay:
                pcap = Path(d) / "load.pcap"
                write_pcap(pcap, fr, args.packets)
            engines = ENGINES if args.engine == "all" else (args.engine,)
            for bg in (0, *args.latency_load) if args.latency else ():
                for engine in engines:
                    lat, cpu = latency_run(args, engine, pcap, args.latency, bg)
                    lat.sort()
                    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
                    load = f"under {bg / 1e3:g} kpps" if bg else "idle link"
                    print(f"latency {engine:8s} {load}: p50 {q(0.5):.3f} ms, p90 {q(0.9):.3f} "
                          f"ms, p99 {q(0.99):.3f} ms, max {lat[-1]:.3f} ms ({len(lat)} marked "
                          f"packets{f', {cpu:.2f} us CPU/pkt' if bg else ''}; load average "
                          f"{loadavg()})", flush=True)
            print(f"{args.tool} bench: engine {args.engine}, {args.packets} x {args.size} B "
                  f"frames, sender {'tcpreplay' if use_tcpreplay else 'python AF_PACKET'}, "
                  f"rate {args.pps or 'top speed'}, "
                  f"{'delivered to RX' if args.deliver else 'foreign MAC'}"
                  f"{', --server-half' if args.server_half else ''}"
                  f"{' (server answers)' if args.as_server else ''}")
            for i in range(args.repeat * len(engines)):
                args.engine = engines[i % len(engines)]
                run = f"run {i // len(engines) + 1} {args.engine:8s}"
                if args.drain:
                    r = drain_run(args, pcap, fr)
                    if not r["complete"]:
                        print(f"{run}: the ring overflowed while stopped "
                              f"({r['kernel_drops']} drops): use fewer --packets or more "
                              f"--buffer-kib", flush=True)
                        continue
                    print(f"{run}: drained {r['written']} packets in {r['drain_s']:.2f} s "
                          f"= {r['pps'] / 1e3:7.1f} kpps, kernel drops {r['kernel_drops']}, "
                          f"{args.tool} CPU {r['cpu_s']:.2f} s = {r['cpu_us_per_pkt']:.2f} "
                          f"us/pkt (load average {loadavg()})", flush=True)
                    continue
                r = one_run(args, pcap, fr)
                print(f"{run}: offered {r['offered_pps'] / 1e3:7.1f} kpps, captured "
                      f"{r['captured_pps'] / 1e3:7.1f} kpps ({r['written']}/{r['sent']}), "
                      f"kernel drops {r['kernel_drops']}, interface drops {r['if_drops']}, "
                      f"{args.tool} CPU {r['cpu_s']:.2f} s = {r['cpu_us_per_pkt']:.2f} us/pkt "
                      f"(load average {loadavg()})", flush=True)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        lab_down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
