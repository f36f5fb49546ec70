"""Socket mode (tc-session --socket) on loopback alone: no namespaces, no root.

Captures are made of real connections: real clients (tests/servers/traffic_client.py,
redis-cli, redis-benchmark) talk to real servers (recording_server.py, redis-server)
through a relay that logs both directions (tests/servers/tap_proxy.py); tests/tapcap.py
turns the logs into a pcap. The replay goes through tc-readpcap | tc-session --socket into
the same servers behind another relay, whose logs show what the target received and when.
Run as root, the replay stage runs without any capability, to show that it needs no rights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict

import pytest

import tapcap
import tc
from tcpcopylib.packet import tcp_checksum_ok
from tcpcopylib.testing import stop_process, wait_listening

PY = sys.executable
SERVERS = tc.REPO / "tests" / "servers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Processes a test started; stopped (only these) at the end."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            stop_process(p)


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    ps.stop()


def recording_server(procs, tmp, name, mode="http") -> int:
    ready = tmp / f"{name}.ready"
    p = procs.start([PY, str(SERVERS / "recording_server.py"), "--listen", "127.0.0.1:0",
                     "--log-dir", str(tmp / name), "--mode", mode, "--ready", str(ready)])
    return tapcap.wait_ready(str(ready), p)


def redis_server(procs, tmp) -> int:
    port = _free_port()
    d = tmp / "redis"
    d.mkdir()
    p = procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(d)])
    return wait_listening(port, p)


def client(*args, timeout=120):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def traffic(scenario, port, *extra):
    out = json.loads(client(PY, str(SERVERS / "traffic_client.py"), scenario, "--server",
                            f"127.0.0.1:{port}", *extra).splitlines()[-1])
    assert not out["errors"], out


def run_replay(tmp, pcap, rules, *opts, timeout=120):
    """tc-readpcap, then tc-session --socket on its output (two steps, so that the replay's
    first sessions do not share the CPU with tc-readpcap's start: the timing measured is
    the replay's). Run as root, tc-session runs without any capability (no raw sockets, no
    CAP_NET_ADMIN: what a normal user has)."""
    env = tc.env()
    env["PYTHONPATH"] = str(tc.REPO)
    records = tmp / (pcap.stem + ".cbor")
    with open(records, "wb") as f:
        subprocess.run([tc.BIN / "tc-readpcap", pcap], stdout=f, check=True, env=env,
                       timeout=timeout)
    stats = tmp / "stats.json"
    cmd = [tc.BIN / "tc-session", "--socket", "-x", rules, "--stats", "--stats-json", stats,
           "-v", *opts, records]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr.decode()
    return r, json.loads(stats.read_text())


def pair(online, target):
    """Recorded and replayed connections paired: same client bytes, in start order."""
    by_bytes = defaultdict(list)
    for c in sorted(target, key=lambda c: c.accept):
        by_bytes[c.c2s].append(c)
    out = []
    for c in sorted(online, key=lambda c: c.accept):
        out.append((c, by_bytes[c.c2s].pop(0)))
    return out


def lateness(rec, rep) -> list[float]:
    """For each request: how much later (ms) it reached the target than it was due there,
    counted from the connection's start: at its recorded offset, or, if it waited for an
    answer and the target answered later than that, right after the target's answer (the
    replay waits for the target's own answer, as it must)."""
    out = []
    for (due, _), (got, answer) in zip(rec.requests(), rep.requests(), strict=True):
        out.append((got - max(due, answer or 0)) / 1e6)
    return out


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def test_a_mix_of_protocols_replays_byte_identical_and_on_time(tmp_path, procs):
    http = recording_server(procs, tmp_path, "http")
    greet = recording_server(procs, tmp_path, "greet", "greeting")
    redis = redis_server(procs, tmp_path)
    upstream = {"http": http, "greet": greet, "redis": redis}
    online = {k: tapcap.Tap(p, tmp_path / f"on-{k}") for k, p in upstream.items()}
    try:
        # HTTP keep-alive, Connection: close, 1 MB bodies, pipelining; a greeting protocol;
        # redis: single commands, repeated commands on one connection, pipelining
        traffic("mixed", online["http"].port, "--conns", "2", "--requests", "8")
        traffic("greeting", online["greet"].port, "--conns", "4", "--requests", "8")
        rp = str(online["redis"].port)
        client("redis-cli", "-p", rp, "set", "greeting", "hello")
        client("redis-cli", "-p", rp, "-r", "10", "-i", "0.01", "incr", "counter")
        client("redis-benchmark", "-p", rp, "-n", "100", "-c", "2", "-P", "5", "-t",
               "set,get", "-q")
    finally:
        for t in online.values():
            t.stop()
    pcap = tmp_path / "mix.pcap"
    tapcap.pcap([t.log_dir for t in online.values()], pcap)
    # The timing is measured on a machine others share: a replay during which the CPUs
    # were saturated (other processes' bursts delay the relays, the servers and the replay
    # alike) is run again, at most twice; every run must be byte-exact and complete.
    # The default limit catches what a wrong gate or a wrong due time costs (a request held
    # for a response that came, or for --gate-timeout: 100 ms and more) and not a loaded
    # machine's jitter; on a quiet machine TC_TIMING_P99_MS=5 holds (p99 1.6-3.4 ms measured).
    limit = float(os.environ.get("TC_TIMING_P99_MS", "25"))
    for attempt in range(3):
        late = replay_mix(tmp_path / f"run{attempt}", pcap, online, upstream)
        print(f"\nrun {attempt + 1}: request lateness over {len(late)} requests: p50 "
              f"{late[len(late) // 2]:.2f} ms, p99 {p99(late):.2f} ms, max {late[-1]:.2f} ms, "
              f"min {late[0]:.2f} ms")
        if p99([abs(x) for x in late]) <= limit:
            break
    assert p99([abs(x) for x in late]) <= limit


def replay_mix(tmp, pcap, online, upstream) -> list[float]:
    """Replay the recorded mix into the same servers behind new relays; check every
    connection and --keep's records; the requests' lateness (ms), sorted."""
    tmp.mkdir()
    target = {k: tapcap.Tap(p, tmp / f"tg-{k}") for k, p in upstream.items()}
    rules = ",".join(f"{online[k].port}-127.0.0.1:{target[k].port}" for k in upstream)
    try:
        r, st = run_replay(tmp, pcap, rules, "--keep")
    finally:
        time.sleep(0.2)
        for t in target.values():
            t.stop()
    late = []
    for k in upstream:
        rec, rep = online[k].connections(), target[k].connections()
        assert len(rec) >= 3 and len(rep) == len(rec), k
        # every connection's client bytes, byte for byte, and nothing else
        assert sorted(c.c2s for c in rep) == sorted(c.c2s for c in rec), k
        for a, b in pair(rec, rep):
            assert b.closes() == a.closes(), (k, a.name, a.events, b.events)
            late += lateness(a, b)
    n = sum(len(t.connections()) for t in target.values())
    assert st["outcomes"]["completed"] == n == st["sessions"], st
    assert st["connects"] == n and st["bytes_sent"] > 2 << 20

    # --keep: both halves of every replayed connection, as the target's relay saw them,
    # and the session map (sess records: --keep without --sessions puts them in the output)
    recs = tc.decode(r.stdout)
    sessions = {x["sid"]: x for x in recs if x["t"] == "sess"}
    assert len(sessions) == n and {x["outcome"] for x in sessions.values()} == {"completed"}
    by_local = {}
    for t in target.values():
        for c in t.connections():
            by_local[f"{c.peer[0]}:{c.peer[1]}"] = c
    sent, answered = defaultdict(bytes), defaultdict(bytes)
    for x in recs:
        if x["t"] in ("pkt", "fb"):
            assert tcp_checksum_ok(x["data"])
            hl = (x["data"][0] & 15) * 4
            payload = x["data"][hl + (x["data"][hl + 12] >> 4) * 4:]
            (sent if x["t"] == "pkt" else answered)[x["sid"]] += payload
    for sid, s in sessions.items():
        ((ip, port, _, _),) = s["conns"]
        c = by_local[f"{ip}:{port}"]
        assert sent[sid] == c.c2s and answered[sid] == c.s2c, s
        assert (s["bytes_sent"], s["bytes_received"]) == (len(c.c2s), len(c.s2c)), s
    return sorted(late)


class ResettingServer:
    """A real listener that reads a request and answers with an RST."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.resets = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.settimeout(5)
            try:
                c.recv(65536)
            except OSError:
                pass
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            c.close()
            self.resets += 1

    def close(self):
        self.sock.close()


def test_refused_and_reset_sessions_end_with_their_outcome_and_the_rest_goes_on(
        tmp_path, procs):
    http = recording_server(procs, tmp_path, "http")
    online = [tapcap.Tap(http, tmp_path / f"on{i}") for i in range(3)]
    try:
        for t in online:
            traffic("close", t.port, "--conns", "4")
            traffic("keepalive", t.port, "--conns", "2", "--requests", "3")
    finally:
        for t in online:
            t.stop()
    pcap = tmp_path / "cap.pcap"
    tapcap.pcap([t.log_dir for t in online], pcap)
    refusing = _free_port()  # nothing listens there
    resetter = ResettingServer()
    good = tapcap.Tap(http, tmp_path / "good")
    rules = (f"{online[0].port}-127.0.0.1:{refusing},{online[1].port}-127.0.0.1:"
             f"{resetter.port},{online[2].port}-127.0.0.1:{good.port}")
    try:
        r, st = run_replay(tmp_path, pcap, rules, "--max-reconnects", "1")
    finally:
        good.stop()
        resetter.close()
    err = r.stderr.decode()
    # the healthy third: every session completed, byte for byte
    assert sorted(c.c2s for c in good.connections()) == \
        sorted(c.c2s for c in online[2].connections())
    assert st["sessions"] == 18
    out = st["outcomes"]
    assert out["completed"] == 6, st
    # refused: each session's outcome, and the reason, on its own -v line
    refused = [ln for ln in err.splitlines() if f"127.0.0.1:{refusing}: " in ln]
    assert len(refused) == 6 and all("reset_by_target (ECONNREFUSED" in ln for ln in refused)
    # reset after the first request: each session ends reset_by_target, or, when more of
    # its requests were already due (a keep-alive session), reconnects for them
    # (--max-reconnects 1), is reset again and ends closed_early
    reset = [ln for ln in err.splitlines() if f"127.0.0.1:{resetter.port}: " in ln]
    assert len(reset) == 6 and all("(ECONNRESET" in ln for ln in reset), reset
    assert all(": reset_by_target (" in ln or ": closed_early (" in ln for ln in reset), reset
    assert sum(": reset_by_target (" in ln for ln in reset) >= 4  # (the single requests)
    assert out["reset_by_target"] + out["closed_early"] == 12
    assert st["socket_errors"]["ECONNREFUSED"] == 6 and st["socket_errors"]["ECONNRESET"] >= 6
    assert "outcomes:" in err and "reset_by_target" in err


def test_forged_only_options_are_refused_with_socket():
    for opt in (["--feedback", "unix:/x"], ["-B", "4"], ["-f", "1/4"], ["--no-feedback"]):
        r = tc.run(["tc-session", "--socket", "--target", "127.0.0.1:80", *opt], input=b"")
        assert r.returncode == 2 and b"forged mode" in r.stderr, (opt, r.stderr)
    r = tc.run(["tc-session", "--keep", "--target", "127.0.0.1:80"], input=b"")
    assert r.returncode == 2 and b"--keep goes with --socket" in r.stderr


def test_each_connection_costs_few_syscalls(tmp_path, procs):
    """The kernel does the TCP work; what socket mode asks of it per connection is kept
    small (bench/bench_socket.py measured these calls as most of its CPU): one socket(),
    non-blocking from its creation (no FIONBIO); the local address asked once; SO_ERROR only
    of a connect() that failed (none here); no epoll_ctl to take out a socket being closed
    (close() does it)."""
    import shutil

    from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_SYN, build_tcp, ip_bytes

    strace = shutil.which("strace")
    assert strace, "strace missing (apt-get install strace, as .ci/run does)"
    port = recording_server(procs, tmp_path, "target")
    cli, srv = ip_bytes("10.1.0.7"), ip_bytes("10.1.0.80")
    n, t0, recs, wanted = 20, 1_700_000_000 * 10**9, [], []
    for i in range(n):
        sport, isn, ts = 30000 + i, 1000 * i, t0 + i * 2_000_000
        req = f"GET /s{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        wanted.append(req)
        for k, (seq, flags, payload) in enumerate([
                (isn, TH_SYN, b""), (isn + 1, TH_ACK, b""), (isn + 1, TH_PSH | TH_ACK, req),
                (isn + 1 + len(req), TH_FIN | TH_ACK, b"")]):
            ack = 0 if flags == TH_SYN else 501
            recs.append({"t": "pkt", "ts": ts + k * 100_000, "data": build_tcp(
                cli, srv, sport, 80, seq, ack, flags, payload=payload)})
    records = tmp_path / "gen.cbor"
    records.write_bytes(tc.stream(recs))
    trace, stats = tmp_path / "trace", tmp_path / "stats.json"
    env = tc.env()
    env["PYTHONPATH"] = str(tc.REPO)
    r = subprocess.run([strace, "-f", "-qq", "-o", trace, "-e",
                        "trace=socket,ioctl,getsockname,getsockopt,epoll_ctl",
                        tc.BIN / "tc-session", "--socket", "-x", f"80-127.0.0.1:{port}",
                        "--stats-json", stats, records],
                       capture_output=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr.decode()
    st = json.loads(stats.read_text())
    assert st["outcomes"]["completed"] == n and st["connects"] == n, st
    got = sorted(p.read_bytes() for p in (tmp_path / "target").glob("*.bin"))
    assert got == sorted(wanted)
    calls = [ln.split(None, 1)[1] for ln in trace.read_text().splitlines()
             if " " in ln and "resumed>" not in ln]
    tcp_sockets = [c for c in calls if c.startswith("socket(AF_INET, SOCK_STREAM")]
    assert len(tcp_sockets) == n and all("SOCK_NONBLOCK" in c for c in tcp_sockets), \
        tcp_sockets[:3]
    fds = {c.rsplit("=", 1)[1].strip() for c in tcp_sockets}  # (the loop's own fds differ)
    assert not [c for c in calls if c.startswith("ioctl(") and "FIONBIO" in c
                and c[6:].split(",", 1)[0] in fds]
    assert sum(c.startswith("getsockname(") for c in calls) == n
    assert not [c for c in calls if "SO_ERROR" in c]
    ctl = [c for c in calls if c.startswith("epoll_ctl(")]
    assert not [c for c in ctl if "EPOLL_CTL_DEL" in c], ctl[:6]
    assert len(ctl) <= 2 * n, ctl[:6]  # the connect watched for EPOLLOUT, then EPOLLIN
