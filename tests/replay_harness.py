"""End-to-end replay harness: record real traffic in the lab, replay it, compare streams.

Pieces (each usable on its own):
  - pcap reading; TCP stream reassembly (tcpcopylib.reassembly): ``tcp_streams(pcap, server_port)``
  - the recording servers' logs: ``logged_streams(log_dir)``
  - comparison: ``compare_streams(captured, logged)``
  - lab orchestration: ``record()`` (real client -> online server under tcpdump) and
    ``replay()`` (tc-readpcap | tc-session | tc-pace | tc-emit on online, tc-intercept |
    tc-feedback on the assistant, recording server on the target).
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tcpcopylib.reassembly import HalfStream, tcp_streams
from tcpcopylib.testing import REPO, tool_env
from tcpcopylib.testing import tool_path as tool

SERVERS = REPO / "tests" / "servers"
PY = sys.executable

# ---------------------------------------------------------------------------------------
# pcap -> TCP streams
# ---------------------------------------------------------------------------------------

_SYN, _FIN, _RST = 0x02, 0x01, 0x04


def pcap_ip_packets(path):
    """Yield (ts_float, ip_datagram_bytes) from a pcap/pcapng file (any common link type)."""
    import dpkt

    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
        dlt = reader.datalink()
        for ts, buf in reader:
            ip = _strip_link(dlt, buf)
            if ip:
                yield ts, ip


def _strip_link(dlt, buf):
    if dlt == 1:  # Ethernet, possibly VLAN-tagged
        off, etype = 14, int.from_bytes(buf[12:14], "big")
        while etype in (0x8100, 0x88A8) and len(buf) >= off + 4:
            etype = int.from_bytes(buf[off + 2:off + 4], "big")
            off += 4
        return buf[off:] if etype in (0x0800, 0x86DD) else None
    if dlt == 113:  # Linux cooked v1
        return buf[16:] if int.from_bytes(buf[14:16], "big") in (0x0800, 0x86DD) else None
    if dlt == 276:  # Linux cooked v2
        return buf[20:] if int.from_bytes(buf[0:2], "big") in (0x0800, 0x86DD) else None
    if dlt in (12, 14, 101, 228, 229):  # raw IP
        return buf
    if dlt in (0, 108):  # BSD loopback
        return buf[4:]
    raise ValueError(f"unsupported pcap link type {dlt}")


def parse_tcp(ip: bytes):
    """(src_ip_str, dst_ip_str, sport, dport, seq, ack, flags, payload) or None."""
    v = ip[0] >> 4
    if v == 4:
        if ip[9] != 6:
            return None
        ihl = (ip[0] & 0x0F) * 4
        total = int.from_bytes(ip[2:4], "big")
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(
            socket.AF_INET, ip[16:20])
        tcp = ip[ihl:total]
    elif v == 6:
        if ip[6] != 6:  # no extension headers in our lab traffic
            return None
        plen = int.from_bytes(ip[4:6], "big")
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(
            socket.AF_INET6, ip[24:40])
        tcp = ip[40:40 + plen]
    else:
        return None
    sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
    seq, ack = int.from_bytes(tcp[4:8], "big"), int.from_bytes(tcp[8:12], "big")
    off = (tcp[12] >> 4) * 4
    return src, dst, sport, dport, seq, ack, tcp[13], bytes(tcp[off:])


# TCP stream reassembly is the library's (tc-diff uses the same): Stream is one direction
# of a connection, tcp_streams(pcap, port, "c2s"|"s2c") every connection's half.
Stream = HalfStream


def syn_times(pcap, server_port: int) -> dict:
    """{(client_ip, client_port): time of the first SYN (no ACK) to server_port}."""
    out = {}
    for ts, ip in pcap_ip_packets(pcap):
        t = parse_tcp(ip)
        if t and t[3] == server_port and t[6] & 0x12 == _SYN:
            out.setdefault((_norm_ip(t[0]), t[2]), ts)
    return out


def capture_summary(pcap, server_port: int) -> dict:
    """Counts useful in assertion messages."""
    ss = tcp_streams(pcap, server_port)
    return {"connections": len(ss), "with_syn": sum(s.syn for s in ss),
            "bytes": sum(len(s.bytes) for s in ss),
            "holes": sum(len(s.data()[1]) for s in ss)}


# ---------------------------------------------------------------------------------------
# recording-server logs
# ---------------------------------------------------------------------------------------

@dataclass
class Logged:
    order: int
    ip: str
    port: int
    data: bytes


def logged_streams(log_dir) -> list[Logged]:
    """The connections a recording server accepted, in accept order."""
    out = []
    for p in Path(log_dir).glob("*.bin"):
        n, ip, port = p.stem.split("_", 2) if p.stem.count("_") == 2 else _v6_name(p.stem)
        out.append(Logged(int(n), ip.replace("_", ":"), int(port), p.read_bytes()))
    out.sort(key=lambda c: c.order)
    return out


def _v6_name(stem):
    n, rest = stem.split("_", 1)
    ip, _, port = rest.rpartition("_")
    return n, ip, port


def _norm_ip(ip: str) -> str:
    ip = ip.removeprefix("::ffff:") if "." in ip else ip
    return str(ipaddress.ip_address(ip))


@dataclass
class Comparison:
    identical: int = 0
    missing: list = field(default_factory=list)    # captured streams nothing of arrived
    different: list = field(default_factory=list)  # (key, detail): partly delivered
    extra: list = field(default_factory=list)      # (key, detail): logged data matching nothing
    remapped: list = field(default_factory=list)   # (captured key, logged key) port changes
    connections: int = 0                           # logged connections with data
    empty_skipped: int = 0
    allow_remap: bool = False

    @property
    def ok(self) -> bool:
        return not (self.missing or self.different or self.extra
                    or (self.remapped and not self.allow_remap))

    def describe(self, limit=5) -> str:
        return (f"identical={self.identical} missing={len(self.missing)} "
                f"different={len(self.different)} extra={len(self.extra)} "
                f"remapped={len(self.remapped)} connections={self.connections} "
                f"empty_skipped={self.empty_skipped}; missing[:{limit}]={self.missing[:limit]} "
                f"different[:{limit}]={self.different[:limit]} extra[:{limit}]={self.extra[:limit]}"
                f" remapped[:{limit}]={self.remapped[:limit]}")


def first_difference(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k] != b[k]), n)
    return (f"len {len(a)} vs {len(b)}, first difference at {i}: "
            f"{a[max(0, i - 16):i + 24]!r} vs {b[max(0, i - 16):i + 24]!r}")


class _Want:
    __slots__ = ("key", "data", "pos", "conns")

    def __init__(self, key, data):
        self.key, self.data, self.pos, self.conns = key, data, 0, []


def compare_streams(captured: list[Stream], logged: list[Logged], skip_empty: bool = True,
                    allow_remap: bool = False) -> Comparison:
    """Every captured client stream must arrive, byte for byte, at the server.

    Logged connections are matched to captured streams by content, in accept order: a
    connection's bytes must continue some stream of the same client IP exactly where its
    delivered part ends (so a stream may be split over several connections: reconnections).
    A connection from the captured client port is preferred; one from another port is a
    "remap" (allowed only with allow_remap). Captured streams with no payload are skipped.
    """
    res = Comparison(allow_remap=allow_remap)
    wants: dict = {}
    for s in captured:
        data = s.bytes
        if not data and skip_empty:
            res.empty_skipped += 1
            continue
        key = (_norm_ip(s.client[0]), s.client[1])
        wants.setdefault(key[0], []).append(_Want(key, data))
    for c in logged:
        if not c.data:
            continue
        res.connections += 1
        ckey = (_norm_ip(c.ip), c.port)
        cands = [w for w in wants.get(ckey[0], ())
                 if w.data.startswith(c.data, w.pos) and len(w.data) - w.pos >= len(c.data)]
        same = [w for w in cands if w.key == ckey]
        pick = (same or cands or [None])[0]
        if pick is None:
            near = [w for w in wants.get(ckey[0], ()) if w.key == ckey]
            detail = first_difference(near[0].data[near[0].pos:], c.data) if near else \
                f"{len(c.data)} bytes: {c.data[:48]!r}"
            res.extra.append((ckey, detail))
            continue
        if pick.key != ckey:
            res.remapped.append((pick.key, ckey))
        pick.pos += len(c.data)
        pick.conns.append(c)
    for ws in wants.values():
        for w in ws:
            if w.pos == len(w.data):
                res.identical += 1
            elif w.pos == 0:
                res.missing.append(w.key)
            else:
                res.different.append((w.key, f"only {w.pos} of {len(w.data)} bytes arrived "
                                      f"(over {len(w.conns)} connections); next: "
                                      f"{w.data[w.pos:w.pos + 48]!r}"))
    return res


# ---------------------------------------------------------------------------------------
# lab orchestration
# ---------------------------------------------------------------------------------------

PORT = 8080


class Proc:
    """A process started in a lab host, with its stderr collected by a thread."""

    def __init__(self, lab, host, argv, stdin=None, stdout=None, name=None, **kw):
        import threading

        self.name = name or Path(str(argv[0])).name
        self.p = lab.popen(host, argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, **kw)
        self.err = bytearray()
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        for chunk in iter(lambda: self.p.stderr.read1(65536), b""):
            self.err.extend(chunk)

    @property
    def pid(self):
        return self.p.pid

    def wait_stderr(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.err:
                return True
            if self.p.poll() is not None:
                time.sleep(0.05)
                return needle in self.err
            time.sleep(0.02)
        return False

    def wait(self, timeout: float) -> int | None:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig=signal.SIGTERM, timeout=3.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            if self.wait(timeout) is None:
                self.p.kill()
                self.p.wait(3)
        self._t.join(2)
        return self.p.returncode

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def __repr__(self):
        return f"<{self.name} pid={self.pid} rc={self.p.returncode} stderr={self.stderr[-800:]!r}>"


def server_cmd(log_dir, port=PORT, mode="http", delay=0.0, close_after_first=False, ready=None):
    argv = [PY, str(SERVERS / "recording_server.py"), "--listen", f"[::]:{port}",
            "--log-dir", str(log_dir), "--mode", mode]
    if delay:
        argv += ["--delay", str(delay)]
    if close_after_first:
        argv.append("--close-after-first")
    if ready:
        argv += ["--ready", str(ready)]
    return argv


def start_recording_server(lab, host, log_dir, port=PORT, **kw):
    """A recording server in `host`, listening on [::]:port (v4 and v6); stopped at teardown."""
    return lab.start_server(host, server_cmd(log_dir, port, **kw), port=port, timeout=10)


@dataclass
class Recording:
    pcap: Path
    online_logs: Path
    client: dict
    tcpdump: str
    port: int

    def streams(self) -> list[Stream]:
        return tcp_streams(self.pcap, self.port)


def start_tcpdump(lab, host, iface, pcap, port, timeout=10.0) -> Proc:
    td = Proc(lab, host, ["tcpdump", "-i", iface, "-n", "-s", "0", "-U", "--immediate-mode",
                          "-B", "32768",
                          "-w", str(pcap), f"tcp port {port}"])
    if not td.wait_stderr(b"listening on", timeout):
        td.stop()
        raise RuntimeError(f"tcpdump did not start: {td!r}")
    return td


def stop_tcpdump(td: Proc) -> str:
    time.sleep(0.5)  # let the last packets (final ACKs) through
    td.stop(signal.SIGINT)
    return td.stderr


def tcpdump_counts(stderr: str) -> dict:
    """{"captured": n, "received by filter": n, "dropped by kernel": n} from tcpdump's exit."""
    import re

    return {m.group(2): int(m.group(1))
            for m in re.finditer(r"^(\d+) packets? (captured|received by filter|dropped by kernel)",
                                 stderr, re.M)}


# The lab recordings of issue 4's test (1): traffic client arguments, recording-server options
SCENARIOS = {
    "keepalive": (["--conns", 3, "--requests", 4], {}),
    "close": (["--conns", 4], {}),
    "bigbody": (["--conns", 1, "--body-size", 1 << 20], {}),
    "pipelined": (["--conns", 2, "--requests", 5], {}),
    "greeting": (["--conns", 2, "--requests", 3], {"mode": "greeting"}),
    "concurrent": (["--conns", 200, "--requests", 2], {}),
}


def record(lab, workdir, scenario, *client_args, port=PORT, v6=False, server_kw=None,
           midconn=False, timeout=120.0) -> Recording:
    """Record a real client talking to a recording server on online (tcpdump on cli0).

    midconn: tcpdump starts only after every connection is established (the client is run
    with --hold-after-connect), so the capture has no SYNs.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pcap = workdir / f"{scenario}.pcap"
    logs = workdir / f"online-{scenario}"
    srv = start_recording_server(lab, "online", logs, port, **(server_kw or {}))
    addr = f"[{lab.online_cli_ip6}]:{port}" if v6 else f"{lab.online_cli_ip}:{port}"
    argv = [PY, str(SERVERS / "traffic_client.py"), scenario, "--server", addr,
            *map(str, client_args)]
    td = None
    try:
        if midconn:
            hold = workdir / f"{scenario}.go"
            argv += ["--hold-after-connect", str(hold)]
            cl = lab.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            while not Path(str(hold) + ".connected").exists():
                if time.monotonic() > deadline or cl.poll() is not None:
                    cl.kill()
                    raise RuntimeError(f"client never connected: {cl.communicate()}")
                time.sleep(0.02)
            time.sleep(0.2)  # handshakes fully done on the wire
            td = start_tcpdump(lab, "online", lab.online_cli_if, pcap, port)
            hold.write_text("go\n")
            out, err = cl.communicate(timeout=timeout)
            rc = cl.returncode
        else:
            td = start_tcpdump(lab, "online", lab.online_cli_if, pcap, port)
            r = lab.run("client", argv, capture_output=True, timeout=timeout)
            out, err, rc = r.stdout, r.stderr, r.returncode
        tdout = stop_tcpdump(td)
        td = None
    finally:
        if td is not None:
            td.stop(signal.SIGINT)
        lab.stop(srv)
    lines = out.decode().strip().splitlines()
    if rc != 0 or not lines:
        raise RuntimeError(f"traffic client failed rc={rc}: {out!r} {err!r}")
    res = json.loads(lines[-1])
    n = tcpdump_counts(tdout)
    if n.get("dropped by kernel"):
        raise RuntimeError(f"tcpdump lost packets: {tdout}")
    # "received by filter" can exceed "captured" by packets that came after tcpdump was told
    # to stop (a late retransmission); what matters is that the capture holds every stream the
    # online server received, which is checked against the server's own logs.
    problem = recording_problem(pcap, logs, port)
    if problem:
        raise RuntimeError(f"the recording is incomplete: {problem}\ntcpdump: {tdout}")
    return Recording(pcap, logs, res, tdout, port)


def recording_problem(pcap, log_dir, port) -> str:
    """'' when every connection the recording server logged is in the capture, byte for
    byte, with no holes, and the capture holds no other stream."""
    streams = tcp_streams(pcap, port)
    holes = [s.client for s in streams if s.data()[1]]
    if holes:
        return f"holes in the streams of {holes[:5]}"
    res = compare_streams(streams, logged_streams(log_dir))
    return "" if res.ok and res.identical == res.connections else res.describe()


# ---------------------------------------------------------------------------------------
# replay: tc-readpcap | tc-session | tc-pace | tc-emit  ->  target  ->  assistant
# ---------------------------------------------------------------------------------------

@dataclass
class Replay:
    target_logs: Path
    stats: dict | None
    procs: dict
    elapsed: float
    timed_out: bool
    target_nstat: dict = field(default_factory=dict)

    def rc(self, name):
        return self.procs[name].p.returncode

    def diagnostics(self) -> str:
        return "\n".join([f"target TCP counters: {self.target_nstat}",
                          *(repr(p) for n, p in self.procs.items() if n != "tcpdump")])

    def logged(self) -> list[Logged]:
        return logged_streams(self.target_logs)


def wait_settled(log_dir, quiet=0.5, timeout=10.0) -> int:
    """Wait until the bytes a recording server logged stop growing; returns the total."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        total = sum(p.stat().st_size for p in Path(log_dir).glob("*.bin"))
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.05)
    return last


def start_feedback(lab, workdir, port, sock_name="fb.sock", v6=False, replies=None,
                   intercept_args=(), one_process=False):
    """tc-intercept lan0 | tc-feedback --listen unix:SOCK in the assistant; returns procs, addr.
    replies: a file that keeps the target's replies with payload (--payload all | tee);
    intercept_args: more tc-intercept options. one_process: `tc-feedback --capture lan0`
    instead of the pipe (procs then holds only tc-feedback)."""
    sock = Path(workdir) / sock_name
    sock.unlink(missing_ok=True)
    env = tool_env()
    if one_process:
        assert not replies and not intercept_args, "one_process takes no tee nor options"
        fb = Proc(lab, "assistant", [tool("tc-feedback"), "--capture", lab.assist_if,
                                     "--capture-filter", f"tcp and src port {port}",
                                     "--listen", f"unix:{sock}", "--stats", "-v"],
                  env=env, name="tc-feedback")
        deadline = time.monotonic() + 10
        while not sock.exists() or not fb.wait_stderr(b"capturing on", 0.05):
            if time.monotonic() > deadline or fb.p.poll() is not None:
                fb.stop()
                raise RuntimeError(f"tc-feedback --capture did not start: {fb!r}")
            time.sleep(0.02)
        return {"tc-feedback": fb}, f"unix:{sock}"
    ic = Proc(lab, "assistant", [tool("tc-intercept"), lab.assist_if, "-F",
                                 f"tcp and src port {port}", "--stats", "-v",
                                 "--stats-interval", "3600",
                                 *(["--payload", "all"] if replies else []),
                                 *map(str, intercept_args)],
              stdout=subprocess.PIPE, env=env, name="tc-intercept")
    src = ic
    if replies:
        src = Proc(lab, "assistant", ["tee", str(replies)], stdin=ic.p.stdout,
                   stdout=subprocess.PIPE, name="tee")
        ic.p.stdout.close()
    fb = Proc(lab, "assistant", [tool("tc-feedback"), "--listen", f"unix:{sock}", "--stats"],
              stdin=src.p.stdout, env=env, name="tc-feedback")
    src.p.stdout.close()
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline or fb.p.poll() is not None or ic.p.poll() is not None:
            ic.stop()
            fb.stop()
            raise RuntimeError(f"feedback side did not start: {ic!r} {fb!r}")
        time.sleep(0.02)
    if not ic.wait_stderr(b"capturing on", 10):  # -v: said once the capture is open
        ic.stop()
        fb.stop()
        raise RuntimeError(f"tc-intercept did not start capturing: {ic!r}")
    return {"tc-intercept": ic, "tc-feedback": fb}, f"unix:{sock}"


DRAIN = 30  # tc-session --drain for replays (seconds)


def replay(lab, pcap, workdir, port=PORT, target_port=None, v6=False, server_kw=None,
           session_args=(), pace_args=(), timeout=120.0, start_target=True,
           emit_args=(), trace=True, readpcap_args=(), replies=None,
           send=False, feedback="unix", filters=(), intercept_args=()) -> Replay:
    """Replay pcap into a recording server on the target; every process bounded and stopped.

    trace: tcpdump on the target's lan0 writes WORKDIR/target.pcap (for diagnosis).
    replies: a file for the target's replies with payload (for tc-diff).
    send: the chain in one process, tc-readpcap | tc-session --send [EMIT_ARGS] (no
    tc-pace, no tc-emit: pace_args must be empty).
    feedback: "unix" (tc-feedback --listen unix:), "capture" (the same, the assistant in
    one process: tc-feedback --capture), or "classic" (tc-feedback --classic over TCP,
    tc-session --feedback classic:).
    filters: (tool, args) stages between tc-readpcap and tc-session (tc-rewrite, ...).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tport = target_port or port
    logs = workdir / "target"
    srv = start_recording_server(lab, "target", logs, tport, **(server_kw or {})) \
        if start_target else None
    stats_json = workdir / "session-stats.json"
    stats_json.unlink(missing_ok=True)
    procs: dict = {}
    timed_out = False
    t0 = time.monotonic()
    try:
        if trace:
            procs["tcpdump"] = start_tcpdump(lab, "target", lab.target_if,
                                             workdir / "target.pcap", tport)
        if feedback == "classic":
            fbprocs, addr = start_feedback_tcp(lab, tport, classic=True)
        else:
            fbprocs, addr = start_feedback(lab, workdir, tport, replies=replies,
                                           intercept_args=intercept_args,
                                           one_process=feedback == "capture")
        procs.update(fbprocs)
        target = f"[{lab.target_ip6}]:{tport}" if v6 else f"{lab.target_ip}:{tport}"
        env = tool_env()
        # A generous --drain: under machine load the last responses may come late, and the
        # drain ends early anyway once every session is quiescent.
        drain = [] if "--drain" in map(str, session_args) else ["--drain", str(DRAIN)]
        chain = [("tc-readpcap", [*map(str, readpcap_args), str(pcap)]),
                 ("tc-session", ["--target", target, "--feedback", addr, *drain,
                                 "--stats-json", str(stats_json), *map(str, session_args)]),
                 ("tc-pace", list(map(str, pace_args))),
                 ("tc-emit", list(map(str, emit_args)))]
        if send:
            assert not pace_args, "tc-session --send has no tc-pace after it"
            chain = [*chain[:1], (chain[1][0], [*chain[1][1], "--send", *map(str, emit_args)])]
        chain[1:1] = [(name, list(map(str, args))) for name, args in filters]
        prev = None
        for i, (name, args) in enumerate(chain):
            last = i == len(chain) - 1
            p = Proc(lab, "online", [tool(name), "--stats", *args],
                     stdin=prev.p.stdout if prev else subprocess.DEVNULL,
                     stdout=None if last else subprocess.PIPE, env=env, name=name)
            if prev:
                prev.p.stdout.close()
            procs[name] = p
            prev = p
        if procs[chain[-1][0]].wait(timeout) is None:
            timed_out = True
        elapsed = time.monotonic() - t0
        if srv is not None:
            wait_settled(logs)
        nstat = netstat_counters(lab, "target")
    finally:
        for name in ("tc-readpcap", *(f[0] for f in filters), "tc-session", "tc-pace",
                     "tc-emit", "tc-intercept"):
            if name in procs:
                procs[name].stop()
        if "tc-feedback" in procs:
            procs["tc-feedback"].stop(timeout=8)
        if "tee" in procs:  # (at EOF already: tc-intercept is gone)
            procs["tee"].stop()
        if "tcpdump" in procs:
            procs["tcpdump"].stop(signal.SIGINT)
        if srv is not None:
            lab.stop(srv)
    stats = json.loads(stats_json.read_text()) if stats_json.exists() else None
    return Replay(logs, stats, procs, elapsed, timed_out, nstat)


NSTAT_KEYS = ("TcpExtListenDrops", "TcpExtListenOverflows", "TcpExtTCPReqQFullDrop",
              "TcpExtTCPBacklogDrop", "TcpExtPAWSEstab", "TcpExtTW", "TcpExtTWRecycled",
              "TcpExtTCPTimeWaitOverflow", "TcpExtTCPChallengeACK", "TcpExtTCPSynRetrans",
              "TcpAttemptFails", "TcpEstabResets", "TcpRetransSegs", "TcpInSegs", "TcpOutRsts",
              "TcpInErrs", "TcpPassiveOpens", "TcpExtSyncookiesSent")


def netstat_counters(lab, host) -> dict:
    """Non-zero TCP counters of a lab host (nstat -as), for diagnostics."""
    r = lab.run(host, ["nstat", "-asz", *NSTAT_KEYS], capture_output=True, text=True)
    out = {}
    for ln in r.stdout.splitlines():
        f = ln.split()
        if len(f) >= 2 and f[1].isdigit() and int(f[1]):
            out[f[0]] = int(f[1])
    return out


# ---------------------------------------------------------------------------------------
# live: tc-capture IFACE | tc-session | tc-pace | tc-emit on online, real clients meanwhile
# ---------------------------------------------------------------------------------------

LIVE_CHAIN = ("tc-capture", "tee", "tc-session", "tc-pace", "tc-emit")


@dataclass
class Live:
    """A running live pipeline (start_live); stop() ends it from the capture on."""

    procs: dict
    stats_json: Path
    target_logs: Path | None
    stats: dict | None = None
    stopped: bool = False

    def stop(self, timeout=30.0) -> dict | None:
        """SIGTERM to tc-capture: the rest drains and ends on EOF; then the feedback side."""
        if self.stopped:
            return self.stats
        self.stopped = True
        try:
            chain = [n for n in self.procs if n not in ("tc-intercept", "tc-feedback")]
            if chain:  # the capture stage (tc-session itself with --capture) ends first
                self.procs[chain[0]].stop(timeout=5 if chain[0] == "tc-capture" else timeout)
            deadline = time.monotonic() + timeout
            for name in chain[1:]:  # (in pipeline order: filters included)
                self.procs[name].wait(max(0.1, deadline - time.monotonic()))
        finally:
            for name in [n for n in self.procs if n != "tc-feedback"]:
                self.procs[name].stop()
            if "tc-feedback" in self.procs:
                self.procs["tc-feedback"].stop(timeout=8)
        if self.stats_json.exists():
            self.stats = json.loads(self.stats_json.read_text())
        return self.stats

    def rc(self, name):
        return self.procs[name].p.returncode

    def diagnostics(self) -> str:
        return "\n".join(repr(p) for p in self.procs.values())

    def capture_counts(self) -> dict:
        """tc-capture's last stats line as {"packets written": n, "dropped by kernel": n, ...}."""
        import re

        first = "tc-capture" if "tc-capture" in self.procs else "tc-session"  # (--capture)
        lines = [ln for ln in self.procs[first].stderr.splitlines() if "written" in ln]
        if not lines:
            return {}
        out = {}
        for part in lines[-1].rsplit(": ", 1)[-1].split(", "):
            m = re.fullmatch(r"(\d+) ([a-z][A-Za-z -]*?)(?: into \d+)?(?: \(.*\))?", part)
            if m:  # integer counts only (not the elapsed time or CPU cost)
                out[m.group(2)] = int(m.group(1))
        return out


def start_live(lab, workdir, port=PORT, target_port=None, v6=False, iface=None, tee=None,
               capture_args=(), capture_filter=None, session_args=(), pace_args=(),
               emit_args=(), feedback=True, feedback_env=False, replies=None,
               send=False, filters=(), intercept_args=()) -> Live:
    """Start, on online: tc-capture IFACE | [tee FILE |] tc-session | tc-pace | tc-emit
    (send: tc-capture IFACE | [tee FILE |] tc-session --send [EMIT_ARGS], in one process;
    send="capture": tc-session --capture IFACE --send [EMIT_ARGS], one process for all).

    The feedback side (tc-intercept | tc-feedback) runs in the assistant, reached over a
    Unix socket (feedback=True) or across hosts over TCP (feedback="tcp", or "classic":
    tc-feedback --classic, tc-session --feedback classic:); feedback=False
    runs tc-session --no-feedback; feedback_env passes the address in $TC_FEEDBACK instead
    of --feedback; replies: a file for the target's replies with payload (as replay()).
    IFACE defaults to
    the online host's client-facing interface, the capture filter (capture_filter; "" for
    none) to 'tcp dst port PORT'; capture_args are options put before IFACE.
    Returns once tc-capture is capturing; the caller starts the target's server and ends
    the pipeline with Live.stop() (always: use try/finally).
    filters: (tool, args) stages between the capture (and tee) and tc-session.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tport = target_port or port
    stats_json = workdir / "session-stats.json"
    stats_json.unlink(missing_ok=True)
    procs: dict = {}
    live = Live(procs, stats_json, None)
    ok = False
    try:
        if feedback in ("tcp", "classic"):
            fbprocs, addr = start_feedback_tcp(lab, tport, classic=feedback == "classic")
            procs.update(fbprocs)
        elif feedback:
            fbprocs, addr = start_feedback(lab, workdir, tport, replies=replies,
                                           intercept_args=intercept_args,
                                           one_process=feedback == "capture")
            procs.update(fbprocs)
        target = f"[{lab.target_ip6}]:{tport}" if v6 else f"{lab.target_ip}:{tport}"
        env = tool_env()
        fbargs = ["--feedback", addr] if feedback else ["--no-feedback"]
        if feedback and feedback_env:  # the documented short pipeline: no --feedback
            env["TC_FEEDBACK"], fbargs = addr, []
        cap_filter = f"tcp dst port {port}" if capture_filter is None else capture_filter
        chain = [("tc-capture", [tool("tc-capture"), "-v", "--stats", *map(str, capture_args),
                                 iface or lab.online_cli_if, *([cap_filter] if cap_filter else [])]),
                 ("tee", ["tee", str(tee)]) if tee else None,
                 ("tc-session", [tool("tc-session"), "--stats", "--target", target, *fbargs,
                                 "--stats-json", str(stats_json), *map(str, session_args)]),
                 ("tc-pace", [tool("tc-pace"), "--stats", *map(str, pace_args)]),
                 ("tc-emit", [tool("tc-emit"), "--stats", *map(str, emit_args)])]
        if send:
            assert not pace_args, "tc-session --send has no tc-pace after it"
            chain[2][1].extend(["--send", *map(str, emit_args)])
            chain = chain[:3]
        if send == "capture":
            assert not (tee or capture_args or filters), "one process: no stage in between"
            chain[2][1].extend(["-v", "--capture", iface or lab.online_cli_if,
                                "--capture-filter", cap_filter or "tcp"])
            chain = chain[2:]
        chain[2:2] = [(name, [tool(name), "--stats", *map(str, args)]) for name, args in filters]
        chain = [c for c in chain if c]
        prev = None
        for i, (name, argv) in enumerate(chain):
            last = i == len(chain) - 1
            p = Proc(lab, "online", argv, stdin=prev.p.stdout if prev else subprocess.DEVNULL,
                     stdout=None if last else subprocess.PIPE, env=env, name=name)
            if prev:
                prev.p.stdout.close()
            procs[name] = p
            prev = p
        if not procs[chain[0][0]].wait_stderr(b"capturing on", 15):
            raise RuntimeError(f"tc-capture did not start: {live.diagnostics()}")
        ok = True
        return live
    finally:
        if not ok:
            live.stop(timeout=5)


FEEDBACK_PORT = 36524


def start_feedback_tcp(lab, port, listen_port=FEEDBACK_PORT, classic=False):
    """tc-intercept lan0 | tc-feedback --listen tcp::LISTEN_PORT in the assistant (the
    documented cross-host set-up); returns procs and tc-session's --feedback address.
    classic: tc-feedback --classic tcp::LISTEN_PORT --allow ONLINE instead, the protocol
    of tcpcopy 1.3 / intercept 1.0 (tcpcopylib.classic)."""
    env = tool_env()
    serve = (["--classic", f"tcp::{listen_port}", "--allow", lab.online_ip] if classic
             else ["--listen", f"tcp::{listen_port}"])
    ic = Proc(lab, "assistant", [tool("tc-intercept"), lab.assist_if, "-F",
                                 f"tcp and src port {port}", "--stats", "-v",
                                 "--stats-interval", "3600"],
              stdout=subprocess.PIPE, env=env, name="tc-intercept")
    fb = Proc(lab, "assistant", [tool("tc-feedback"), *serve, "--stats"],
              stdin=ic.p.stdout, env=env, name="tc-feedback")
    ic.p.stdout.close()
    try:
        lab.wait_listening("assistant", listen_port, 10, proc=fb.p)
        if not ic.wait_stderr(b"capturing on", 10):
            raise RuntimeError("tc-intercept did not start capturing")
    except Exception as e:
        ic.stop()
        fb.stop()
        raise RuntimeError(f"feedback side did not start: {e}: {ic!r} {fb!r}") from None
    scheme = "classic" if classic else "tcp"
    return {"tc-intercept": ic, "tc-feedback": fb}, f"{scheme}:{lab.assist_ip}:{listen_port}"


@dataclass
class LoggedStream:
    """A server's per-connection log seen as a captured client stream (for compare_streams)."""

    client: tuple
    data: bytes

    @property
    def bytes(self) -> bytes:
        return self.data


def compare_logs(online_dir, target_dir, allow_remap=False) -> Comparison:
    """What the online recording server received, connection by connection, must have
    reached the target's recording server byte for byte (from the same client addresses)."""
    want = [LoggedStream((c.ip, c.port), c.data) for c in logged_streams(online_dir)]
    return compare_streams(want, logged_streams(target_dir), allow_remap=allow_remap)


# ---------------------------------------------------------------------------------------
# sequence numbers across 2^32: rewrite a recording's ISNs
# ---------------------------------------------------------------------------------------

M32 = 0xFFFFFFFF


def _pcap_records(raw: bytes):
    """(link type, [(offset of the frame in raw, caplen)]) of a classic pcap file."""
    import struct

    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        e = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        e = ">"
    else:
        raise ValueError("not a classic pcap file (pcapng is not rewritten)")
    linktype = struct.unpack_from(e + "I", raw, 20)[0] & 0x0FFFFFFF
    out, off = [], 24
    while off + 16 <= len(raw):
        caplen = struct.unpack_from(e + "I", raw, off + 8)[0]
        out.append((off + 16, caplen))
        off += 16 + caplen
    return linktype, out


def _tcp_at(buf: bytearray, ipo: int):
    """(ihl, tcp header offset, doff, payload length) of the IP datagram at ipo, or None."""
    v = buf[ipo] >> 4
    if v == 4 and buf[ipo + 9] == 6:
        ihl = (buf[ipo] & 0x0F) * 4
        tot = int.from_bytes(buf[ipo + 2:ipo + 4], "big")
    elif v == 6 and buf[ipo + 6] == 6:
        ihl, tot = 40, 40 + int.from_bytes(buf[ipo + 4:ipo + 6], "big")
    else:
        return None
    t = ipo + ihl
    doff = (buf[t + 12] >> 4) * 4
    return ihl, t, doff, tot - ihl - doff


def _connections(raw, server_port):
    """Walk a pcap: yields (ip offset in raw, connection number, client, direction, seq,
    ack, flags, payload) per TCP packet to or from server_port; connections are numbered
    in order of first packet, and a client SYN on a 4-tuple that carried data or a FIN/RST
    starts a new connection (as tcp_streams does)."""
    linktype, recs = _pcap_records(raw)
    current = {}  # (client, server) -> [number, carried data or FIN/RST]
    n = 0
    for fo, caplen in recs:
        frame = raw[fo:fo + caplen]
        ip = _strip_link(linktype, frame)
        if not ip:
            continue
        t = parse_tcp(ip)
        if t is None:
            continue
        src, dst, sport, dport, seq, ack, flags, payload = t
        if dport == server_port:
            client, server, d = (src, sport), (dst, dport), "c2s"
        elif sport == server_port:
            client, server, d = (dst, dport), (src, sport), "s2c"
        else:
            continue
        key = (client, server)
        c = current.get(key)
        if d == "c2s" and flags & 0x12 == _SYN and c is not None and c[1]:
            c = None
        if c is None:
            c = current[key] = [n, False]
            n += 1
        if flags & (_FIN | _RST) or payload:
            c[1] = True
        yield fo + caplen - len(ip), c[0], client, d, seq, ack, flags, payload


def rewrite_isns(src, dst, server_port: int = PORT, at: float = 0.5) -> list[dict]:
    """Copy the pcap src to dst with each connection's sequence numbers moved so that both
    directions cross 2^32 inside their data, `at` of the way into the stream (in the middle
    of the segment holding that byte, so one segment spans the wrap).

    Each direction's seq (and the other direction's ack, and SACK blocks) gets its own
    offset per connection; IPv4 and TCP checksums are recomputed. Only classic pcap with
    the link types of _strip_link. Returns one dict per connection: client, and per
    direction ("c2s", "s2c") the stream length, the new sequence number of the first
    stream byte and the offset in the stream of the byte whose sequence number is 0.
    """
    from tcpcopylib.packet import fix_checksums

    raw = bytearray(Path(src).read_bytes())
    conns = []  # per connection: client, {direction: first stream byte's seq, segments}
    for _, n, client, d, seq, ack, flags, payload in _connections(raw, server_port):
        if n == len(conns):
            conns.append((client, {"c2s": [None, []], "s2c": [None, []]}))
        base_segs = conns[n][1][d]
        if flags & _SYN:
            base_segs[0] = (seq + 1) & M32
        elif payload:
            if base_segs[0] is None:
                base_segs[0] = seq
            base_segs[1].append(((seq - base_segs[0]) & M32, len(payload)))
    out, deltas = [], []
    for client, dirs in conns:
        info, delta = {"client": client}, {}
        for d, (base, segs) in dirs.items():
            length = max((o + k for o, k in segs), default=0)
            if base is None or length < 2:
                delta[d] = 0
                info[d] = {"length": length, "first": base, "cross_at": None}
                continue
            o, k = next((o, k) for o, k in sorted(segs) if o + k > length * at and k >= 2)
            cross = o + k // 2
            first = (-cross) & M32  # the byte at offset `cross` gets sequence number 0
            delta[d] = (first - base) & M32
            info[d] = {"length": length, "first": first, "cross_at": cross}
        out.append(info)
        deltas.append(delta)
    for ipo, n, _, d, seq, ack, flags, _ in _connections(bytes(raw), server_port):
        other = "s2c" if d == "c2s" else "c2s"
        tcpo = _tcp_at(raw, ipo)[1]
        raw[tcpo + 4:tcpo + 8] = ((seq + deltas[n][d]) & M32).to_bytes(4, "big")
        if flags & 0x10:
            raw[tcpo + 8:tcpo + 12] = ((ack + deltas[n][other]) & M32).to_bytes(4, "big")
        _shift_sack(raw, tcpo, deltas[n][other])
        ihl, _, doff, plen = _tcp_at(raw, ipo)
        dgram = fix_checksums(bytearray(raw[ipo:ipo + ihl + doff + plen]))
        raw[ipo:ipo + len(dgram)] = dgram
    Path(dst).write_bytes(bytes(raw))
    return out


def _shift_sack(buf: bytearray, tcpo: int, delta: int) -> None:
    """Add delta to the edges of a SACK option (kind 5) in the TCP header at tcpo."""
    end = tcpo + (buf[tcpo + 12] >> 4) * 4
    i = tcpo + 20
    while i < end:
        kind = buf[i]
        if kind == 0:
            return
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or buf[i + 1] < 2:
            return
        ln = buf[i + 1]
        if kind == 5:
            for e in range(i + 2, min(i + ln, end) - 3, 4):
                v = (int.from_bytes(buf[e:e + 4], "big") + delta) & M32
                buf[e:e + 4] = v.to_bytes(4, "big")
        i += ln


def seq_wraps(pcap, server_port: int = PORT) -> list[dict]:
    """Per connection, per direction: how the wire sequence numbers of the data cross 2^32,
    read from the pcap alone. {"client", "c2s": {"before", "after", "acks_before",
    "acks_after"}, "s2c": {...}}: stream bytes sent with sequence numbers below 2^32 and
    from 0 on (counted from each data segment's seq and length, unwrapped from the first
    data segment), and acknowledgments of this direction's data seen by the peer on each
    side of 2^32 (acks in [2^31, 2^32) and in [0, 2^31))."""
    raw = Path(pcap).read_bytes()
    res = {}
    for _, n, client, d, seq, ack, flags, payload in _connections(raw, server_port):
        r = res.setdefault(n, {"client": client})
        st = r.setdefault(d, {"before": 0, "after": 0, "acks_before": 0, "acks_after": 0,
                              "_first": None})
        if payload:
            if st["_first"] is None:
                st["_first"] = seq
            # seq as an integer continuing the first data segment's (no mod 2^32)
            s = st["_first"] + ((seq - st["_first"] + 0x80000000) & M32) - 0x80000000
            e = s + len(payload)
            st["before"] += max(0, min(e, 1 << 32) - s)
            st["after"] += max(0, e - max(s, 1 << 32))
        other = "s2c" if d == "c2s" else "c2s"
        if flags & 0x10:
            ot = r.setdefault(other, {"before": 0, "after": 0, "acks_before": 0,
                                      "acks_after": 0, "_first": None})
            ot["acks_before" if ack >= 0x80000000 else "acks_after"] += 1
    out = []
    for r in res.values():
        for d in ("c2s", "s2c"):
            r.setdefault(d, {"before": 0, "after": 0, "acks_before": 0, "acks_after": 0})
            r[d].pop("_first", None)
        out.append(r)
    return out
