"""The one-command demo: live TCP replay in a namespace lab, with a report (needs root).

    python3 -m tcpcopylib.demo [--duration S] [--rate N] [--json FILE] [--workdir DIR]
    python3 -m tcpcopylib.demo --pcap FILE        # offline: replay a capture instead
    python3 -m tcpcopylib.demo --record FILE      # write such a capture (real client, real server)

Live mode builds the lab (tcpcopylib.lab), starts a web server (nginx if installed, else
Python's http.server) on the online and the target host, drives a bounded HTTP load from the
client host (keep-alive and short connections), and runs the README's pipelines:

    online:    tc-capture cli0 | tc-session --target TARGET:PORT --feedback ADDR | tc-pace | tc-emit
    assistant: tc-intercept lan0 -F 'tcp and src port PORT' | tc-feedback --listen ADDR

The report compares tc-session's outcomes (--stats-json) with both servers' access logs.
Everything started is stopped by PID and the namespaces are removed, also on Ctrl-C/SIGTERM.
Exit status: 0 goal met (>= 99.9 % of sessions completed, target count == online count),
1 goal missed, 2 usage, 66 no such pcap, 77 not root, 69 the lab or a server failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PORT = 8080
FB_PORT = 36524
GOAL_PCT = 99.9
KEEPALIVE_REQUESTS = 20   # requests per keep-alive connection before the client closes it
FILES = {"index.html": 612, "small.txt": 64, "page.html": 6000}  # served files and sizes
REPO_BIN = Path(__file__).resolve().parent.parent / "bin"
# tc-session's own lists, so a new outcome cannot be missed
from tcpcopylib.session.engine import FAILURES as FAILED_OUTCOMES  # noqa: E402
from tcpcopylib.session.engine import NOT_REPLAYED  # noqa: E402


class DemoError(Exception):
    def __init__(self, msg, code=69):
        super().__init__(msg)
        self.code = code


class _Stop(BaseException):
    """SIGTERM arrived: unwind through the finally blocks."""


# ---------------------------------------------------------------------------------------
# the load generator (runs inside the client namespace as `python3 -m tcpcopylib.demo _load`)
# ---------------------------------------------------------------------------------------

def _read_response(sock, buf: bytes) -> tuple[int, bytes]:
    """Read one HTTP response (Content-Length bodies); returns (status, rest of buffer)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed before a response")
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    status = int(head.split(None, 2)[1])
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    need = int(m.group(1)) if m else 0
    while len(buf) < need:
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed mid-body")
        buf += data
    return status, buf[need:]


def load(host: str, port: int, rate: float, duration: float, workers: int = 8) -> dict:
    """Send about rate*duration GET requests on schedule: even ones on keep-alive connections
    (KEEPALIVE_REQUESTS each, closed by the client), odd ones each on its own short
    connection ("Connection: close"). Every wait is bounded."""
    import socket

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    lock = threading.Lock()
    st = {"requests": 0, "ok": 0, "errors": 0, "connections": 0, "keepalive_connections": 0}
    errors: list[str] = []
    ticket = [0]
    t0 = time.monotonic() + 0.05
    hard_end = t0 + duration + 10
    paths = ["/" + n for n in FILES]

    def count(**kw):
        with lock:
            for k, v in kw.items():
                st[k] += v

    def connect():
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((host, port))
        count(connections=1)
        return s

    def worker():
        ka, ka_used, buf = None, 0, b""
        while True:
            with lock:
                i = ticket[0]
                ticket[0] += 1
            due = t0 + i / rate
            if due >= t0 + duration or time.monotonic() > hard_end:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            short = i % 2 == 1
            req = (f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: demo\r\n"
                   + ("Connection: close\r\n" if short else "") + "\r\n").encode()
            count(requests=1)
            try:
                if short:
                    with connect() as s:
                        s.sendall(req)
                        status, _ = _read_response(s, b"")
                else:
                    if ka is None:
                        ka, ka_used, buf = connect(), 0, b""
                        count(keepalive_connections=1)
                    ka.sendall(req)
                    status, buf = _read_response(ka, buf)
                    ka_used += 1
                    if ka_used >= KEEPALIVE_REQUESTS:
                        ka.close()
                        ka = None
                count(ok=int(status == 200), errors=int(status != 200))
            except (OSError, EOFError, ValueError, IndexError) as e:
                count(errors=1)
                with lock:
                    if len(errors) < 5:
                        errors.append(f"{type(e).__name__}: {e}")
                if ka is not None and not short:
                    ka.close()
                    ka = None
        if ka is not None:
            ka.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, hard_end + 6 - time.monotonic()))
    st["elapsed"] = round(time.monotonic() - t0, 3)
    st["first_errors"] = errors
    return st


def _load_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tcpcopylib.demo _load")
    p.add_argument("server", help="HOST:PORT ([v6]:PORT)")
    p.add_argument("--rate", type=float, default=300)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--workers", type=int, default=8)
    a = p.parse_args(argv)
    host, _, port = a.server.rpartition(":")
    print(json.dumps(load(host.strip("[]"), int(port), a.rate, a.duration, a.workers)),
          flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# web servers with an access log
# ---------------------------------------------------------------------------------------

NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    log_format demo '$msec $remote_addr:$remote_port "$request" $status $body_bytes_sent';
    access_log {dir}/access.log demo;
    client_body_temp_path {dir}/body;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    server {{
        listen {port};
        listen [::]:{port} ipv6only=on;
        root {dir}/www;
    }}
}}
"""

_PY_LOG_RE = re.compile(r'^(?:::ffff:)?(\S+) .*"[A-Z]+ \S+ HTTP/[\d.]+" (\d{3})', re.M)


class WebServer:
    """nginx (or http.server) in one lab host, serving FILES from its own directory."""

    def __init__(self, lab, host: str, workdir: Path, port: int, kind: str):
        self.lab, self.host, self.port, self.kind = lab, host, port, kind
        self.dir = workdir / f"{host}-server"
        (self.dir / "www").mkdir(parents=True, exist_ok=True)
        for name, size in FILES.items():
            line = name.encode() + b"\n"
            (self.dir / "www" / name).write_bytes(line * (size // len(line)))
        self.log = self.dir / "access.log"
        self.log.touch()
        self.proc = None

    def start(self):
        if self.kind == "nginx":
            conf = self.dir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=self.dir, port=self.port))
            argv = ["nginx", "-c", str(conf), "-p", str(self.dir)]
            self.proc = self.lab.start_server(self.host, argv, port=self.port,
                                              start_new_session=True)
        else:
            argv = [sys.executable, "-m", "http.server", str(self.port), "--bind", "::",
                    "--protocol", "HTTP/1.1", "--directory", str(self.dir / "www")]
            with open(self.log, "ab") as log:  # http.server logs requests on stderr
                self.proc = self.lab.start_server(self.host, argv, port=self.port,
                                                  stderr=log, start_new_session=True)
        return self

    def requests(self) -> int:
        """Requests in the access log."""
        text = self.log.read_text(errors="replace")
        if self.kind == "nginx":
            return sum(1 for ln in text.splitlines() if ln.strip())
        return len(_PY_LOG_RE.findall(text))

    def log_info(self) -> dict:
        """Per-status counts, client addresses, and the log's rate (nginx: from $msec)."""
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        info = {"requests": self.requests(), "statuses": {}, "clients": {}}
        if self.kind != "nginx":
            for ip, status in _PY_LOG_RE.findall("\n".join(lines)):
                info["clients"][ip] = info["clients"].get(ip, 0) + 1
                info["statuses"][status] = info["statuses"].get(status, 0) + 1
            return info
        if not lines:
            return info
        ts = []
        for ln in lines:
            parts = ln.split()
            ts.append(float(parts[0]))
            ip = parts[1].rpartition(":")[0]
            info["clients"][ip] = info["clients"].get(ip, 0) + 1
            info["statuses"][parts[-2]] = info["statuses"].get(parts[-2], 0) + 1
        span = max(ts) - min(ts)
        info["span_s"] = round(span, 3)
        info["rate"] = round((len(ts) - 1) / span, 1) if span > 0 else None
        return info


def server_kind() -> str:
    """nginx if installed, else Python's http.server."""
    return "nginx" if shutil.which("nginx") else "python"


def wait_settled(count, quiet=1.0, timeout=15.0, want=None) -> int:
    """Poll count() until it reaches `want` or stops changing for `quiet` s (bounded)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = count()
        if want is not None and n >= want:
            return n
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.1)
    return last


# ---------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------

_LINK_HEADER = {1: 14, 113: 16, 276: 20, 0: 4, 108: 4}  # Ethernet, cooked v1/v2, loopback
_METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")


def _pcap_tcp(path: Path):
    """Yield (ts, ip, tcp) dpkt objects of a capture's TCP packets (plain Ethernet, cooked,
    loopback or raw IP links; that is enough for a report)."""
    import dpkt

    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        rd = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
        skip = _LINK_HEADER.get(rd.datalink(), 0)
        for ts, buf in rd:
            ip = buf[skip:]
            try:
                pkt = dpkt.ip.IP(ip) if ip[0] >> 4 == 4 else dpkt.ip6.IP6(ip)
            except (dpkt.UnpackError, IndexError):
                continue
            if isinstance(pkt.data, dpkt.tcp.TCP):
                yield float(ts), pkt, pkt.data  # ns pcaps give a Decimal


def pcap_server_port(path: Path) -> int:
    """The port most SYNs (else most HTTP requests) of a capture go to; PORT if none."""
    syns, reqs = {}, {}
    for _, _, tcp in _pcap_tcp(path):
        if tcp.flags & 0x12 == 0x02:
            syns[tcp.dport] = syns.get(tcp.dport, 0) + 1
        elif tcp.data[:8].split(b" ", 1)[0] in _METHODS:
            reqs[tcp.dport] = reqs.get(tcp.dport, 0) + 1
    counts = syns or reqs
    return max(counts, key=counts.get) if counts else PORT


def pcap_requests(path: Path, port: int) -> dict:
    """HTTP requests and client addresses in a capture (client->server segments that start
    with a method)."""
    n, clients, first, last = 0, set(), None, None
    for ts, pkt, tcp in _pcap_tcp(path):
        if tcp.dport != port:
            continue
        clients.add(pkt.src)
        first = ts if first is None else first
        last = ts
        if tcp.data[:8].split(b" ", 1)[0] in _METHODS:
            n += 1
    return {"requests": n, "clients": len(clients),
            "span_s": round((last - first), 3) if first is not None else 0.0}


def requirements(a, which=shutil.which) -> tuple[dict, list[str]]:
    """What this run needs on the machine, checked as tc-doctor checks programs: the Lab()
    keyword arguments to use and notes for the user; DemoError if something required is
    missing. Without ethtool the veth offloads stay as the kernel sets them (tc-capture
    splits the super-segments they make), and the demo says so."""
    from tcpcopylib.doctor import FAIL, WARN, check_programs

    required = ("ip", "ss", "sysctl") + (("tcpdump",) if a.record else ())
    checks = check_programs(required=required, optional=("ethtool",), which=which)
    missing = [c for c in checks if c.verdict == FAIL]
    if missing:
        raise DemoError("; ".join(c.seen for c in missing) + " (apt-get install iproute2 "
                        "procps" + (" tcpdump" if a.record else "") + ")")
    no_ethtool = any(c.name == "program ethtool" and c.verdict == WARN for c in checks)
    notes = ["ethtool not found: the lab's veth offloads are left as the kernel sets them "
             "(tc-capture splits the super-segments they make); apt-get install ethtool to "
             "turn them off"] if no_ethtool else []
    return {"offloads": no_ethtool}, notes


class Proc:
    """A process in a lab host, its stderr in a file, stopped by PID."""

    def __init__(self, lab, host, argv, log: Path, env, **kw):
        self.name = Path(argv[0]).name
        self.log = log
        with open(log, "wb") as err:
            self.p = lab.popen(host, argv, stderr=err, env=env, start_new_session=True, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        return self.p.returncode

    def wait(self, timeout):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self, tail=600) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-tail:]
        return ""


class Demo:
    def __init__(self, args, out=sys.stdout):
        self.a = args
        self.out = out
        self.procs: list[Proc] = []
        self.lab = None
        self.env = dict(os.environ)
        if REPO_BIN.is_dir():
            self.env["PATH"] = f"{REPO_BIN}:{self.env.get('PATH', '')}"
        self.env.pop("TC_FEEDBACK", None)
        self.env.pop("PYTHONUNBUFFERED", None)

    def say(self, msg):
        print(msg, file=self.out, flush=True)

    def tool(self, name) -> str:
        path = shutil.which(name, path=self.env["PATH"])
        if path is None:
            raise DemoError(f"{name} not found (pip install -e . or run from the checkout)")
        return path

    def start(self, host, argv, name, **kw) -> Proc:
        p = Proc(self.lab, host, argv, self.work / f"{name}.stderr", self.env, **kw)
        self.procs.append(p)
        return p

    def server_kind(self) -> str:
        if self.a.server != "auto":
            return self.a.server
        return server_kind()

    # -- pieces --------------------------------------------------------------------------
    def start_feedback(self):
        lab, port = self.lab, self.a.port
        ic = self.start("assistant", [self.tool("tc-intercept"), lab.assist_if, "-F",
                                      f"tcp and src port {port}", "--stats"],
                        "tc-intercept", stdout=subprocess.PIPE)
        fb = self.start("assistant", [self.tool("tc-feedback"), "--listen", f"tcp::{FB_PORT}",
                                      "--stats"], "tc-feedback", stdin=ic.p.stdout,
                        stdout=subprocess.DEVNULL)
        ic.p.stdout.close()
        lab.wait_listening("assistant", FB_PORT, 10, proc=fb.p)
        self._wait_capturing("assistant", lab.assist_if, ic)
        return ic, fb

    def _wait_capturing(self, host, iface, proc: Proc, timeout=10.0):
        """Until the process has a packet socket open (its capture started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.p.poll() is not None:
                raise DemoError(f"{proc.name} exited ({proc.p.returncode}): {proc.stderr()}")
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{proc.p.pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{proc.p.pid}/fd/{fd}").startswith("socket:"):
                            time.sleep(0.2)
                            return
            time.sleep(0.05)
        raise DemoError(f"{proc.name} did not start capturing on {host}:{iface}")

    def drive_load(self, lab, a) -> dict:
        """Run the bounded HTTP load from the client host; its JSON summary line."""
        r = lab.run("client", [sys.executable, "-m", "tcpcopylib.demo", "_load",
                               f"{lab.online_cli_ip}:{a.port}", "--rate", str(a.rate),
                               "--duration", str(a.duration)],
                    capture_output=True, text=True, timeout=a.duration + 40, env=self.env,
                    cwd=str(Path(__file__).resolve().parent.parent))
        if r.returncode != 0:
            raise DemoError(f"load client failed ({r.returncode}): {r.stderr[-500:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def start_pipeline(self, source_argv, source_name):
        """source | tc-session | tc-pace | tc-emit on the online host; returns the procs."""
        lab, port = self.lab, self.a.port
        target = f"{lab.target_ip}:{port}"
        self.session_json = self.work / "session-stats.json"
        chain = [(source_name, source_argv),
                 ("tc-session", [self.tool("tc-session"), "--target", target, "--feedback",
                                 f"tcp:{lab.assist_ip}:{FB_PORT}", "--stats-json",
                                 str(self.session_json), "--stats"]),
                 ("tc-pace", [self.tool("tc-pace"), "--stats"]),
                 ("tc-emit", [self.tool("tc-emit"), "--stats"])]
        procs, prev = [], None
        for i, (name, argv) in enumerate(chain):
            last = i == len(chain) - 1
            p = self.start("online", argv, name,
                           stdin=prev.p.stdout if prev else subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL if last else subprocess.PIPE)
            if prev:
                prev.p.stdout.close()
            procs.append(p)
            prev = p
        shell = " | ".join(" ".join([Path(argv[0]).name, *argv[1:]]) for _, argv in chain)
        return procs, shell

    def finish_pipeline(self, procs, stop_source: bool, timeout=30.0):
        """Stop the source (live) or let it end (pcap); wait for the stages to drain."""
        if stop_source:
            procs[0].stop(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for p in procs:
            if p.wait(max(0.1, deadline - time.monotonic())) is None:
                self.say(f"demo: {p.name} still running after {timeout:.0f} s; stopping it")
                p.stop()
        return {p.name: p.p.returncode for p in procs}

    # -- modes ---------------------------------------------------------------------------
    def run(self) -> dict:
        from tcpcopylib.lab import Lab

        t_start = time.monotonic()
        a = self.a
        lab_kw, notes = requirements(a)
        for note in notes:
            self.say(f"demo: {note}")
        keep = a.workdir is not None
        self.work = Path(a.workdir) if keep else Path(tempfile.mkdtemp(prefix="tc-demo-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o755)
        self.lab = Lab(**lab_kw)
        if a.port is None:
            a.port = pcap_server_port(Path(a.pcap)) if a.pcap else PORT
        report = {"mode": "record" if a.record else "pcap" if a.pcap else "live",
                  "lab": self.lab.name, "workdir": str(self.work), "port": a.port,
                  "offloads": "kernel default" if lab_kw["offloads"] else "off"}
        try:
            self.lab.up()
            if a.pcap:
                self.run_pcap(report)
            elif a.record:
                self.run_record(report)
            else:
                self.run_live(report)
        finally:
            for p in reversed(self.procs):
                p.stop()
            self.lab.down()
            if not keep:
                shutil.rmtree(self.work, ignore_errors=True)
        report["namespaces_left"] = [ns for ns in self.lab.namespaces
                                     if os.path.exists(f"/run/netns/{ns}")]
        report["duration_s"] = round(time.monotonic() - t_start, 2)
        return report

    def run_live(self, report):
        a, lab = self.a, self.lab
        kind = self.server_kind()
        online = WebServer(lab, "online", self.work, a.port, kind).start()
        target = WebServer(lab, "target", self.work, a.port, kind).start()
        self.say(f"lab {lab.name}: {kind} on online {lab.online_cli_ip}:{a.port} and target "
                 f"{lab.target_ip}:{a.port}; client {lab.client_ip}")
        ic, fb = self.start_feedback()
        cap = [self.tool("tc-capture"), lab.online_cli_if, "--stats"]
        procs, shell = self.start_pipeline(cap, "tc-capture")
        self._wait_capturing("online", lab.online_cli_if, procs[0])
        self.say(f"online:    {shell}")
        self.say(f"assistant: tc-intercept {lab.assist_if} -F 'tcp and src port {a.port}' | "
                 f"tc-feedback --listen tcp::{FB_PORT}")
        self.say(f"client:    {a.rate:g} requests/s for {a.duration:g} s "
                 f"(half keep-alive, half short connections) ...")
        report["client"] = self.drive_load(lab, a)
        n_online = wait_settled(online.requests, quiet=0.5, timeout=5)
        wait_settled(target.requests, quiet=1.5, timeout=20, want=n_online)
        report["rc"] = self.finish_pipeline(procs, stop_source=True)
        report["rc"].update({"tc-intercept": ic.stop(signal.SIGINT), "tc-feedback": fb.stop()})
        report["online"] = online.log_info()
        report["target"] = target.log_info()
        report["target"]["access_log"] = str(target.log)
        report["online"]["access_log"] = str(online.log)
        report["server"] = kind
        self._session(report)

    def run_pcap(self, report):
        a, lab = self.a, self.lab
        pcap = Path(a.pcap).resolve()
        kind = self.server_kind()
        report["pcap"] = str(pcap)
        report["online"] = pcap_requests(pcap, a.port)
        # replies to whatever client addresses the capture holds go to the assistant
        for fam, via in (("-4", lab.assist_ip), ("-6", lab.assist_ip6)):
            lab.run("target", ["ip", fam, "route", "replace", "default", "via", via, "dev",
                               lab.target_if], check=True)
        target = WebServer(lab, "target", self.work, a.port, kind).start()
        self.say(f"lab {lab.name}: {kind} on target {lab.target_ip}:{a.port}; replaying "
                 f"{pcap.name} ({report['online']['requests']} requests, "
                 f"{report['online']['clients']} client addresses, "
                 f"{report['online']['span_s']:g} s)")
        ic, fb = self.start_feedback()
        procs, shell = self.start_pipeline([self.tool("tc-readpcap"), str(pcap), "--stats"],
                                           "tc-readpcap")
        self.say(f"online:    {shell}")
        report["rc"] = self.finish_pipeline(procs, stop_source=False,
                                            timeout=report["online"]["span_s"] + 40)
        wait_settled(target.requests, quiet=0.5, timeout=5, want=report["online"]["requests"])
        report["rc"].update({"tc-intercept": ic.stop(signal.SIGINT), "tc-feedback": fb.stop()})
        report["target"] = target.log_info()
        report["target"]["access_log"] = str(target.log)
        report["server"] = kind
        self._session(report)

    def run_record(self, report):
        """Record what tc-capture would see (client->server packets, as tcpdump on the online
        host's client side) while the load runs."""
        a, lab = self.a, self.lab
        kind = self.server_kind()
        online = WebServer(lab, "online", self.work, a.port, kind).start()
        out = Path(a.record).resolve()
        td = self.start("online", ["tcpdump", "-i", lab.online_cli_if, "-n", "-s", "0", "-U",
                                   "--immediate-mode", "-Z", "root", "-w", str(out),
                                   f"tcp dst port {a.port}"],
                        "tcpdump")
        deadline = time.monotonic() + 10
        while b"listening on" not in td.log.read_bytes():
            if time.monotonic() > deadline or td.p.poll() is not None:
                raise DemoError(f"tcpdump did not start: {td.stderr()}")
            time.sleep(0.05)
        self.say(f"recording {out} on online {lab.online_cli_if}: {a.rate:g} requests/s for "
                 f"{a.duration:g} s ...")
        report["client"] = self.drive_load(lab, a)
        time.sleep(0.5)
        td.stop(signal.SIGINT)
        report["online"] = online.log_info()
        report["pcap"] = str(out)
        report["pcap_bytes"] = out.stat().st_size
        report["pcap_view"] = pcap_requests(out, a.port)

    def _session(self, report):
        try:
            st = json.loads(self.session_json.read_text())
        except (OSError, ValueError) as e:
            raise DemoError(f"tc-session wrote no --stats-json ({e}); its stderr: "
                            f"{self.work / 'tc-session.stderr'}") from None
        oc = st.get("outcomes", {})
        seen = st.get("sessions", 0)
        replayed = seen - sum(oc.get(k, 0) for k in NOT_REPLAYED)
        completed = oc.get("completed", 0) + oc.get("reconnected", 0)
        report["sessions"] = {
            "seen": seen, "replayed": replayed, "completed": completed,
            "failed": {k: v for k, v in oc.items() if v and k in FAILED_OUTCOMES},
            "other": {k: v for k, v in oc.items()
                      if v and k not in FAILED_OUTCOMES + ("completed", "reconnected")},
            "active_at_exit": st.get("active", 0),
            "completion_pct": round(100.0 * completed / replayed, 3) if replayed else 0.0,
            "retransmits": st.get("retransmits", 0), "reconnections": st.get("reconnections", 0),
        }
        report["tc_session_stats"] = st


def goal(report) -> list[str]:
    """What keeps the report from meeting the goal (empty: met)."""
    if report["mode"] == "record":
        c = report["client"]
        return [] if report["pcap_view"]["requests"] and not c["errors"] else [
            f"{report['pcap_view']['requests']} requests recorded, {c['errors']} client errors"]
    s, problems = report["sessions"], []
    if s["replayed"] == 0:
        problems.append("no session was replayed")
    elif 100.0 * s["completed"] / s["replayed"] < GOAL_PCT:
        problems.append(f"completion {100.0 * s['completed'] / s['replayed']:.3f} % "
                        f"< {GOAL_PCT} %")
    c = report.get("client")
    if c and c["errors"]:
        problems.append(f"{c['errors']} client requests failed or were not answered 200 "
                        f"(see the online access log)")
    if report["target"]["requests"] != report["online"]["requests"]:
        problems.append(f"target served {report['target']['requests']} requests, online "
                        f"{report['online']['requests']}")
    return problems


def format_report(r) -> str:
    lines = [f"== tcpcopylib demo ({r['mode']}) ==" if r["mode"] != "record" else
             "== tcpcopylib demo (record) =="]
    c = r.get("client")
    if c:
        lines.append(f"client load    {c['requests']} requests in {c['elapsed']:.1f} s "
                     f"({c['requests'] / max(c['elapsed'], 1e-9):.0f}/s), {c['connections']} "
                     f"connections ({c['keepalive_connections']} keep-alive), "
                     f"{c['errors']} errors")
    if r["mode"] == "record":
        v = r["pcap_view"]
        lines.append(f"recorded       {r['pcap']}: {r['pcap_bytes']} bytes, {v['requests']} "
                     f"requests, {v['span_s']:g} s")
        lines.append(f"duration       {r['duration_s']:.1f} s")
        return "\n".join(lines)
    on, tg, s = r["online"], r["target"], r["sessions"]
    src = "in the capture" if r["mode"] == "pcap" else "in its access log"
    lines.append(f"online         {on['requests']} requests {src}")
    shown = math.floor(10000.0 * s["completed"] / max(s["replayed"], 1)) / 100
    fails = ", ".join(f"{k} {v}" for k, v in s["failed"].items()) or "none"
    lines.append(f"tc-session     {s['seen']} sessions seen, {s['replayed']} replayed, "
                 f"{s['completed']} completed = {shown:.2f} % "
                 f"(goal >= {GOAL_PCT} %); failed: {fails}")
    if s["retransmits"] or s["reconnections"]:
        lines.append(f"               {s['retransmits']} retransmissions, "
                     f"{s['reconnections']} reconnections")
    pct = 100.0 * tg["requests"] / on["requests"] if on["requests"] else 0.0
    rate = f", {tg['rate']:g} requests/s" if tg.get("rate") else ""
    who = ", ".join(f"{ip} ({n})" for ip, n in sorted(tg.get("clients", {}).items()))
    lines.append(f"target         {tg['requests']} requests in its access log = {pct:.2f} % of "
                 f"online{rate}" + (f"; clients seen: {who}" if who else ""))
    lines.append(f"duration       {r['duration_s']:.1f} s; namespaces left: "
                 f"{len(r['namespaces_left'])}"
                 + ("; veth offloads: kernel default (no ethtool)"
                    if r.get("offloads") == "kernel default" else ""))
    problems = goal(r)
    lines.append("result         " + ("OK" if not problems else "MISSED: " + "; ".join(problems)))
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python3 -m tcpcopylib.demo",
        description="Live TCP replay in a namespace lab: real clients -> nginx on 'online', "
                    "mirrored by tc-capture | tc-session | tc-pace | tc-emit onto nginx on "
                    "'target', feedback via tc-intercept | tc-feedback on 'assistant'; then a "
                    "report. Needs root.",
        epilog="examples:\n  python3 -m tcpcopylib.demo\n"
               "  python3 -m tcpcopylib.demo --duration 5 --rate 100 --json report.json\n"
               "  python3 -m tcpcopylib.demo --pcap examples/http-lab.pcap\n"
               "  python3 -m tcpcopylib.demo --record my.pcap --duration 3 --rate 50",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, metavar="S",
                   help="seconds of client load (default 20)")
    p.add_argument("--rate", type=float, default=300.0, metavar="N",
                   help="client requests per second (default 300)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pcap", metavar="FILE",
                      help="replay this capture (tc-readpcap) instead of live traffic")
    mode.add_argument("--record", metavar="FILE",
                      help="only record a capture of the client load (tcpdump) into FILE")
    p.add_argument("--port", type=int,
                   help=f"server port on online and target (default {PORT}; with --pcap: "
                        "the port the capture's SYNs go to)")
    p.add_argument("--server", choices=("auto", "nginx", "python"), default="auto",
                   help="web server: nginx if installed (auto), or Python's http.server")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--workdir", metavar="DIR",
                   help="keep logs, access logs and tc-session's stats in DIR "
                        "(default: a temporary directory, removed)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        return _load_main(argv[1:])
    a = build_parser().parse_args(argv)
    if a.duration <= 0 or a.rate <= 0:
        print("demo: error: --duration and --rate must be positive", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("demo: error: needs root (network namespaces, raw sockets)", file=sys.stderr)
        return 77
    if a.pcap and not os.path.isfile(a.pcap):
        print(f"demo: error: {a.pcap}: no such file", file=sys.stderr)
        return 66

    def on_signal(signum, frame):
        # a second Ctrl-C / SIGTERM must not cut the teardown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else _Stop()

    old = signal.signal(signal.SIGTERM, on_signal), signal.signal(signal.SIGINT, on_signal)
    demo = Demo(a)
    try:
        report = demo.run()
    except (KeyboardInterrupt, _Stop):
        print("demo: interrupted; everything stopped and removed", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # noqa: BLE001 - a lab or server failure, one line
        from tcpcopylib.lab import LabError

        if not isinstance(e, (LabError, subprocess.SubprocessError, OSError)):
            raise
        print(f"demo: error: {e}", file=sys.stderr)
        return 69
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    print(format_report(report), flush=True)
    if a.json:
        report["goal_met"] = not goal(report)
        Path(a.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return 0 if not goal(report) else 1


if __name__ == "__main__":
    raise SystemExit(main())
