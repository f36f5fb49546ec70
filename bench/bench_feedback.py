#!/usr/bin/env python3
"""Replies/s and CPU per reply through tc-intercept | tc-feedback to one FeedbackClient.

Two network namespaces joined by a veth pair (offloads off): tcpreplay sends prebuilt
target replies (Ethernet, to the assistant's MAC, for client addresses the assistant does
not own, so its kernel drops them as a real assistant does) at a fixed rate or top speed;
in the assistant namespace ``tc-intercept veth -F 'tcp and src port 8080' | tc-feedback``
serves them on a Unix socket to a FeedbackClient in this process, which claimed every
connection. Prints, per run: offered rate, delivered replies/s, kernel drops, losses, and
each tool's CPU per reply (start-up excluded) and wake-ups.

    python3 bench/bench_feedback.py                 # 50k pps, then top speed
    python3 bench/bench_feedback.py --rates 20000 100000 top --count 300000
    python3 bench/bench_feedback.py --pipe --claims --rates 5000 --repeat 3 --compare ../old

--pipe (no root): tc-feedback alone, fed through a pipe by this process, which writes
--batch records at a time at each rate (like tc-intercept's 1 ms batches at a low rate)
and reads them back as the client; prints tc-feedback's CPU per reply (on-CPU time from
/proc/PID/schedstat, start-up excluded) and wake-ups; --claims adds a release and a claim
per 5 records, as a replay does. --compare DIR alternates each run
with DIR's tools (another checkout), with or without --pipe: before/after in the same
conditions.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tcpcopylib.feedback import FeedbackClient  # noqa: E402
from tcpcopylib.packet import TH_ACK, build_tcp, ip_bytes  # noqa: E402

GEN_MAC, AS_MAC = "02:00:00:00:0b:01", "02:00:00:00:0b:02"
TARGET, CLIENT_NET = "10.201.1.2", "10.201.9."
KEYS = 2000


def connect_client(addr: str) -> FeedbackClient:
    """A FeedbackClient connected to tc-feedback at addr, retried while it starts (<= 5 s)."""
    c = FeedbackClient(addr, "bench")
    for _ in range(250):
        try:
            c.connect(timeout=2)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.02)
    return c


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def make_pcap(path: str, n: int) -> list:
    """n reply frames over KEYS connections; returns the connections (for claims)."""
    import dpkt

    conns = [(ip_bytes(CLIENT_NET + str(1 + i % 200)), 10000 + i) for i in range(KEYS)]
    dst, src = bytes.fromhex(AS_MAC.replace(":", "")), bytes.fromhex(GEN_MAC.replace(":", ""))
    tip = ip_bytes(TARGET)
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f)
        for i in range(n):
            cip, cport = conns[i % KEYS]
            ip = build_tcp(tip, cip, 8080, cport, 1000 + i, 5000, TH_ACK, payload=b"x" * 40)
            w.writepkt(dst + src + b"\x08\x00" + ip, ts=i * 1e-6)
    return conns


def _cpu(pid: int, system_only: bool = False) -> float:
    """user + system (or only system) CPU seconds of a live process."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[12]) + (0 if system_only else int(f[11]))) / os.sysconf("SC_CLK_TCK")


def _oncpu(pid: int) -> float:
    """Seconds a live process has run on a CPU (nanosecond scheduler accounting)."""
    return int(open(f"/proc/{pid}/schedstat").read().split()[0]) / 1e9


def _wakeups(pid: int) -> int:
    """Voluntary context switches of a live process (about one per wake-up)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def run_one(ns_gen, ns_as, pcap, conns, rate, count, per_file, tmp, buffer_kib,
            repo=REPO) -> dict:
    addr = f"unix:{tmp}/fb.sock"
    env = dict(os.environ, PATH=f"{repo}/bin:{os.environ['PATH']}")
    icpt = subprocess.Popen(["ip", "netns", "exec", ns_as, sys.executable, f"{repo}/bin/tc-intercept",
                             "bas0", "-F", "tcp and src port 8080", "-v", "--stats",
                             "-B", str(buffer_kib)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    fbk = subprocess.Popen([sys.executable, f"{repo}/bin/tc-feedback", "--listen", addr,
                            "--stats", "--hold-ms", "100"],
                           stdin=icpt.stdout, stderr=subprocess.PIPE, env=env)
    icpt.stdout.close()
    try:
        if b"capturing on" not in icpt.stderr.readline():
            raise SystemExit("tc-intercept did not start")
        c = connect_client(addr)
        for cip, cport in conns:
            c.claim(cip, cport, ip_bytes(TARGET), 8080)
        c.flush()
        time.sleep(0.3)
        loops = max(1, count // per_file)
        speed = ["--topspeed"] if rate == "top" else [f"--pps={rate}"]
        t_start = time.monotonic()
        cpu0 = time.process_time()
        # start-up (imports, claims) excluded: only what the replies cost
        cpu_i0, cpu_f0 = _oncpu(icpt.pid), _oncpu(fbk.pid)
        wake_i0, wake_f0 = _wakeups(icpt.pid), _wakeups(fbk.pid)
        sys_i0, sys_f0 = _cpu(icpt.pid, True), _cpu(fbk.pid, True)
        gen = subprocess.Popen(["ip", "netns", "exec", ns_gen, "tcpreplay", "-q", "-K",
                                "-i", "bgen0", f"--loop={loops}", *speed, pcap],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got, first, last = 0, None, None
        expect = loops * per_file
        idle_since = time.monotonic()
        while got < expect:
            r, _, _ = select.select([c], [], [], 0.2)
            if r:
                n = len(c.read_available())
                if n:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    got += n
                    idle_since = now
                    continue
            if gen.poll() is not None and time.monotonic() - idle_since > 1.5:
                break
            if time.monotonic() - t_start > 120:
                break
        out = gen.communicate(timeout=60)[0]
        client_cpu = time.process_time() - cpu0
        c.close()
        cpu = {"intercept": _oncpu(icpt.pid) - cpu_i0, "feedback": _oncpu(fbk.pid) - cpu_f0,
               "client": client_cpu}
        wake = {"intercept": _wakeups(icpt.pid) - wake_i0, "feedback": _wakeups(fbk.pid) - wake_f0}
        sys_cpu = {"intercept": _cpu(icpt.pid, True) - sys_i0,
                   "feedback": _cpu(fbk.pid, True) - sys_f0}
    finally:
        if icpt.poll() is None:
            icpt.terminate()
        icpt.wait(10)
        fbk.wait(20)
    ierr, ferr = icpt.stderr.read().decode(), fbk.stderr.read().decode()
    m = re.search(r"(\d+) received, (\d+) dropped, (\d+) dropped by interface", ierr)
    offered = re.search(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps", out)
    return {
        "rate": rate, "sent": expect, "delivered": got,
        "offered_pps": float(offered.group(1)) if offered else float("nan"),
        "delivered_per_s": (got - 1) / (last - first) if last and last > first else 0.0,
        "kernel_recv": int(m.group(1)) if m else -1, "kernel_drop": int(m.group(2)) if m else -1,
        "cpu_us": {k: v / got * 1e6 if got else 0.0 for k, v in cpu.items()},
        "wakeups": wake,
        "sys_us": {k: v / got * 1e6 if got else 0.0 for k, v in sys_cpu.items()},
        "fb_stats": [ln for ln in ferr.splitlines() if "replies in" in ln][-1:],
    }


def pipe_one(repo: str, rate: int, batch: int, count: int, tmp: str, claims: bool = False) -> dict:
    """tc-feedback of checkout `repo` fed `batch` records at a time at `rate` records/s;
    with `claims`, the client also releases and claims again one connection per 5 records
    (what a replayed session costs: ~5 replies, one claim, one release)."""
    from tcpcopylib.intercept import encode_fb
    from tcpcopylib.records import encode_section, header

    addr = f"unix:{tmp}/fbp.sock"
    conns = [(ip_bytes(CLIENT_NET + str(1 + i % 200)), 10000 + i) for i in range(KEYS)]
    tip = ip_bytes(TARGET)
    recs = [encode_fb(1_700_000_000_000_000_000 + i,
                      build_tcp(tip, conns[i % KEYS][0], 8080, conns[i % KEYS][1], 1000 + i,
                                5000, TH_ACK, payload=b"x" * 40)[:40], 80)
            for i in range(KEYS)]
    chunks = [b"".join(recs[(i * batch + j) % KEYS] for j in range(batch))
              for i in range(KEYS)]
    r_fd, w_fd = os.pipe()
    fbk = subprocess.Popen([sys.executable, f"{repo}/bin/tc-feedback", "--listen", addr,
                            "--stats", "--hold-ms", "100"], stdin=r_fd, stderr=subprocess.PIPE)
    os.close(r_fd)
    try:
        os.write(w_fd, encode_section(header("bench")))
        c = connect_client(addr)
        for cip, cport in conns:
            c.claim(cip, cport, tip, 8080)
        c.flush()
        time.sleep(0.3)
        cpu0, wake0 = _oncpu(fbk.pid), _wakeups(fbk.pid)
        writes = count // batch
        period = batch / rate
        got, t0 = 0, time.monotonic()
        deadline = t0 + writes * period + 10
        for i in range(writes):
            if claims:
                for j in range(max(1, batch // 5)):
                    cip, cport = conns[(i * batch + j * 5) % KEYS]
                    c.release(cip, cport, tip, 8080)
                    c.claim(cip, cport, tip, 8080)
                c.flush()
            os.write(w_fd, chunks[i % KEYS])
            due = t0 + (i + 1) * period
            while True:
                left = due - time.monotonic()
                if left <= 0:
                    break
                if select.select([c], [], [], left)[0]:
                    got += len(c.read_replies())
        while got < writes * batch and time.monotonic() < deadline:
            if select.select([c], [], [], 0.5)[0]:
                got += len(c.read_replies())
        wall = time.monotonic() - t0
        cpu, wake = _oncpu(fbk.pid) - cpu0, _wakeups(fbk.pid) - wake0
        c.close()
    finally:
        os.close(w_fd)
        fbk.wait(20)
    return {"sent": writes * batch, "got": got, "wall": wall,
            "cpu_us": cpu / max(got, 1) * 1e6, "wakeups": wake}


def main_pipe(args):
    tmp = tempfile.mkdtemp(prefix="bench_fbp")
    repos = [("this", REPO)] + ([("compare", args.compare)] if args.compare else [])
    print(f"tc-feedback fed through a pipe, {args.batch} records per write, 1 client, "
          f"{KEYS} claimed connections{', a release+claim per 5 records' if args.claims else ''}"
          f"; load average {os.getloadavg()[0]:.1f} before")
    rates = [r for r in args.rates if r != "top"]  # a pipe has no top speed: paced writes
    if not rates:
        raise SystemExit("bench_feedback: --pipe needs --rates with a number")
    try:
        for rate in rates:
            for rnd in range(args.repeat):
                for name, repo in repos:
                    r = pipe_one(repo, int(rate), args.batch, args.count, tmp, args.claims)
                    print(f"rate {rate:>7} {name:>7}: {r['got']:,}/{r['sent']:,} replies in "
                          f"{r['wall']:.1f} s, tc-feedback {r['cpu_us']:.2f} us CPU per reply, "
                          f"{r['wakeups'] / max(r['got'], 1):.2f} wake-ups per reply",
                          flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", nargs="+", default=["50000", "top"],
                    help="packets/s for each run, or 'top' (default: 50000 top)")
    ap.add_argument("--count", type=int, default=250_000, help="replies per run")
    ap.add_argument("-B", "--buffer", type=int, default=65536,
                    help="tc-intercept's kernel buffer in KiB (default 65536, its default)")
    ap.add_argument("--pipe", action="store_true",
                    help="tc-feedback alone, fed through a pipe (no root, no capture)")
    ap.add_argument("--batch", type=int, default=5,
                    help="--pipe: records per write (default 5)")
    ap.add_argument("--claims", action="store_true",
                    help="--pipe: a release and a claim per 5 records too (as in a replay)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per rate (default 1)")
    ap.add_argument("--compare", metavar="DIR",
                    help="alternate with DIR's tc-intercept and tc-feedback (another checkout)")
    args = ap.parse_args()
    if args.pipe:
        return main_pipe(args)
    if os.geteuid() != 0 or not shutil.which("tcpreplay"):
        raise SystemExit("needs root and tcpreplay (apt-get install tcpreplay)")
    tag = f"tcbf{os.getpid()}"
    ns_gen, ns_as = f"{tag}-gen", f"{tag}-as"
    tmp = tempfile.mkdtemp(prefix="bench_fb")
    per_file = min(args.count, 50_000)
    try:
        sh("ip", "netns", "add", ns_gen)
        sh("ip", "netns", "add", ns_as)
        sh("ip", "-n", ns_gen, "link", "add", "bgen0", "type", "veth", "peer", "name", "bas0",
           "netns", ns_as)
        for ns, dev, mac in ((ns_gen, "bgen0", GEN_MAC), (ns_as, "bas0", AS_MAC)):
            sh("ip", "-n", ns, "link", "set", dev, "address", mac)
            if shutil.which("ethtool"):
                sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off",
                   "gro", "off", "tx", "off", check=False)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns_as, "addr", "add", "10.201.1.3/24", "dev", "bas0")
        sh("ip", "netns", "exec", ns_as, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        pcap = os.path.join(tmp, "replies.pcap")
        conns = make_pcap(pcap, per_file)
        print(f"tc-intercept | tc-feedback -> 1 client, {KEYS} claimed connections, "
              f"94-byte frames, {os.cpu_count()} CPUs, capture buffer {args.buffer} KiB, "
              f"load average {os.getloadavg()[0]:.1f} before")
        repos = [("", REPO)] + ([(" compare", args.compare)] if args.compare else [])
        for rate, _rnd, (name, repo) in ((r, k, x) for r in args.rates
                                         for k in range(args.repeat) for x in repos):
            r = run_one(ns_gen, ns_as, pcap, conns, rate, args.count, per_file, tmp, args.buffer,
                        repo)
            lost = r["sent"] - r["delivered"]
            print(f"rate {rate:>7}{name}: offered {r['offered_pps']:>9,.0f} pps, delivered "
                  f"{r['delivered']:,}/{r['sent']:,} at {r['delivered_per_s']:>9,.0f} replies/s, "
                  f"kernel drops {r['kernel_drop']:,} (of {r['kernel_recv']:,}), lost {lost:,}")
            print("    CPU per reply (of it system): " + ", ".join(
                f"{k} {v:.2f} us" + (f" ({r['sys_us'][k]:.2f})" if k in r["sys_us"] else "")
                for k, v in r["cpu_us"].items())
                  + "; wake-ups: " + ", ".join(f"{k} {v:,}" for k, v in r["wakeups"].items()))
            for ln in r["fb_stats"]:
                print("   ", ln)
    finally:
        for ns in (ns_gen, ns_as):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
