"""Workload shaping end to end in the lab: -n copies, -c pools, -r sampling, -f instances.

Captures are synthetic (client-side packets only, built with tcpcopylib.packet.build_tcp and
written as a raw-IP pcap): session i of a capture sends one unique HTTP request with
"Connection: close"; the server on the target answers and closes, and logs every
connection's bytes. The checks compare that log with the requests.

online:    tc-readpcap cap.pcap | tc-session --target T [shaping] | tc-pace | tc-emit
assistant: tc-intercept lan0 | tc-feedback --listen unix:SOCK
target:    tests/servers/counting_server.py (light: thousands of connections on 2 busy cores)

The replays get generous --drain/--connect-timeout: other tests may load the machine.
"""

import collections
import json
import resource
import subprocess
import time

import pytest

import replay_harness as h
from tcpcopylib import testing
from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_SYN, build_tcp, ip_bytes
from tcpcopylib.session.alloc import sample_share

pytestmark = pytest.mark.netns

ONLINE, ONLINE6 = "10.200.1.1", "fd00:200:1::1"
MSS = b"\x02\x04\x05\xb4"
SISN = 50000


def write_pcap(path, packets):
    """A LINKTYPE_RAW (101) µs pcap of (ts_seconds, ip_datagram), in the given order."""
    path.write_bytes(testing.pcap([(round(ts * 1e6) * 1000, data) for ts, data in packets],
                                  linktype=101, ns=False, snaplen=65535))


def request(tag):
    return (f"GET /{tag} HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n").encode()


def synth(path, sessions, t0=1_700_000_000.0):
    """sessions: (client_ip, client_port, payload, t_syn, t_data, t_fin) -> pcap at path.

    Each session: SYN, handshake ACK, the request, later a FIN acknowledging a response.
    """
    pkts = []
    for ip, port, payload, ts, td, tf in sessions:
        c, s = ip_bytes(ip), ip_bytes(ONLINE6 if ":" in ip else ONLINE)
        isn = (port * 7919 + 12345) & 0xFFFFFFFF
        pkts += [(t0 + ts, build_tcp(c, s, port, h.PORT, isn, 0, TH_SYN, 64240, MSS)),
                 (t0 + ts + 0.001, build_tcp(c, s, port, h.PORT, isn + 1, SISN + 1, TH_ACK)),
                 (t0 + td, build_tcp(c, s, port, h.PORT, isn + 1, SISN + 1, TH_ACK | TH_PSH,
                                     64240, b"", payload)),
                 (t0 + tf, build_tcp(c, s, port, h.PORT, isn + 1 + len(payload), SISN + 200,
                                     TH_ACK | TH_FIN))]
    pkts.sort(key=lambda p: p[0])
    write_pcap(path, pkts)


def ok(rep, n, not_replayed=0):
    assert not rep.timed_out, f"replay did not finish in time\n{rep.diagnostics()}"
    for name in ("tc-readpcap", "tc-session", "tc-pace", "tc-emit"):
        assert rep.rc(name) == 0, f"{name} exited {rep.rc(name)}\n{rep.diagnostics()}"
    st = rep.stats
    assert st is not None, rep.diagnostics()
    oc = st["outcomes"]
    bad = {k: v for k, v in oc.items() if v and k not in ("completed", "filtered")}
    assert oc["completed"] == n and not bad, (oc, rep.diagnostics())
    return st


SLACK = ["--drain", "30", "--connect-timeout", "30"]


def start_target(lab, log):
    return lab.start_server("target", [h.PY, str(h.SERVERS / "counting_server.py"), "--port",
                                       str(h.PORT), "--log", str(log)], port=h.PORT, timeout=10)


def read_log(log, want, timeout=15.0):
    """(ip, port, data) per logged connection with data; waits for `want` lines (the log
    is written when a connection closes, flushed every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = []
    for ln in lines:
        ip, port, _how, hexdata = (ln.split(" ") + [""])[:4]
        if hexdata:
            out.append((h._norm_ip(ip), int(port), bytes.fromhex(hexdata)))
    return out


def replay(lab, pcap, workdir, args, want, timeout=240, v6=False):
    """h.replay() into the counting server; returns (Replay, logged connections)."""
    log = workdir / "target.log"
    workdir.mkdir(parents=True, exist_ok=True)
    srv = start_target(lab, log)
    try:
        rep = h.replay(lab, pcap, workdir, session_args=[*SLACK, *args], trace=False,
                       start_target=False, timeout=timeout, v6=v6)
        read_log(log, want)  # every connection closed and logged
    finally:
        lab.stop(srv)
    return rep, read_log(log, want, timeout=0)


def no_collision(logged):
    pairs = [(ip, port) for ip, port, _ in logged]
    assert len(pairs) == len(set(pairs)), collections.Counter(pairs).most_common(3)


@pytest.fixture
def many_fds():
    """Children (the target's server) may hold thousands of sockets and log files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- 1: -n 50 on a 200-session capture ----------------------------------------------------

def test_copies_50_of_200_sessions_10000_identical_streams(lab, tmp_path, many_fds):
    sessions = []
    for i in range(200):  # 20 client addresses x 10 ports, one session every 25 ms
        t = i * 0.025
        sessions.append((f"10.200.9.{10 + i % 20}", 41000 + i, request(f"copy/{i}"),
                         t, t + 0.01, t + 0.6))
    pcap = tmp_path / "n.pcap"
    synth(pcap, sessions)
    rep, logged = replay(lab, pcap, tmp_path / "rep", ["-n", "50"], 10_000)
    st = ok(rep, 10_000)
    assert st["sessions"] == 10_000
    got = collections.Counter(d for _, _, d in logged)
    assert got == {p: 50 for _, _, p, *_ in sessions}, (len(logged), len(got))
    no_collision(logged)
    # every copy left from its session's own client address
    want_ip = {p: ip for ip, _, p, *_ in sessions}
    assert all(want_ip[d] == ip for ip, _, d in logged)


# -- 2: a pool of 2 addresses, 5,000 concurrent sessions on one client port -------------------

def test_pool_of_two_addresses_5000_concurrent_same_port(lab, tmp_path, many_fds):
    pool = ("10.200.50.1", "10.200.50.2")
    r = lab.run("target", ["ip", "route", "add", "10.200.50.0/24", "via", lab.assist_ip],
                capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sessions = []
    for i in range(5000):  # SYNs over 2 s, requests after 2.5 s, FINs after 4.5 s
        sessions.append((f"10.77.{i // 250}.{i % 250 + 1}", 40000, request(f"pool/{i}"),
                         i * 0.0004, 2.5 + i * 0.0002, 4.5 + i * 0.0002))
    pcap = tmp_path / "c.pcap"
    synth(pcap, sessions)
    rep, logged = replay(lab, pcap, tmp_path / "rep", ["-c", ",".join(pool)], 5000)
    st = ok(rep, 5000)
    assert collections.Counter(d for _, _, d in logged) == {p: 1 for _, _, p, *_ in sessions}
    assert {ip for ip, _, _ in logged} == set(pool)
    no_collision(logged)
    assert st["early_reuses"] == 0
    assert st["peak_active"] > 4500, st  # they were live at the same time


def test_ipv6_pool_with_copies(lab, tmp_path):
    r = lab.run("target", ["ip", "-6", "route", "add", "fd00:200:50::/64", "via",
                           lab.assist_ip6], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sessions = [(f"fd00:200:9::{0x100 + i:x}", 40000 + i % 7, request(f"v6/{i}"),
                 i * 0.005, i * 0.005 + 0.005, i * 0.005 + 0.5) for i in range(300)]
    pcap = tmp_path / "v6.pcap"
    synth(pcap, sessions)
    rep, logged = replay(lab, pcap, tmp_path / "rep", ["-c", "fd00:200:50::/120", "-n", "3"],
                         900, v6=True)
    ok(rep, 900)
    assert collections.Counter(d for _, _, d in logged) == {p: 3 for _, _, p, *_ in sessions}
    assert all(ip.startswith("fd00:200:50::") for ip, _, _ in logged), logged[:3]
    no_collision(logged)


# -- 3: -r 25 over 4,000 sessions, twice ---------------------------------------------------

def test_sample_25_percent_same_set_twice(lab, tmp_path):
    sessions = []
    for i in range(4000):
        t = i * 0.001
        sessions.append((f"10.200.9.{10 + i % 200}", 30000 + i, request(f"r/{i}"),
                         t, t + 0.005, t + 0.5))
    pcap = tmp_path / "r.pcap"
    synth(pcap, sessions)
    want = {p for ip, port, p, *_ in sessions if sample_share(ip_bytes(ip), port) < 25}
    assert 900 <= len(want) <= 1100
    sets = []
    for run in ("one", "two"):
        rep, logged = replay(lab, pcap, tmp_path / run, ["-r", "25"], len(want), timeout=120)
        st = ok(rep, len(want))
        assert st["outcomes"]["filtered"] == 4000 - len(want)
        got = collections.Counter(d for _, _, d in logged)
        assert set(got.values()) == {1}
        sets.append(set(got))
    assert sets[0] == sets[1] == want


# -- 4: two online hosts into one target through one tc-feedback ---------------------------

def test_two_online_hosts_one_target_one_feedback(lab, tmp_path, many_fds):
    lab.add_host("online2", "10.200.1.11", "fd00:200:1::11")
    log = tmp_path / "target.log"
    srv = start_target(lab, log)
    procs = {}
    try:
        fb, addr = h.start_feedback(lab, tmp_path, h.PORT)
        procs.update(fb)
        chains = {}
        for k, (host, tag) in enumerate((("online", "A"), ("online2", "B"))):
            # both online hosts served the same clients, from the same ports
            sessions = [(f"10.200.9.{10 + i % 50}", 42000 + i, request(f"{tag}/{i}"),
                         i * 0.002, i * 0.002 + 0.005, i * 0.002 + 0.5) for i in range(1000)]
            pcap = tmp_path / f"{tag}.pcap"
            synth(pcap, sessions)
            js = tmp_path / f"{tag}.json"
            chain = [("tc-readpcap", [str(pcap)]),
                     ("tc-session", ["--target", f"{lab.target_ip}:{h.PORT}", "--feedback",
                                     addr, "-f", f"{k}/2", "--stats-json", str(js), *SLACK]),
                     ("tc-pace", []), ("tc-emit", [])]
            prev = None
            for i, (name, args) in enumerate(chain):
                last = i == len(chain) - 1
                p = h.Proc(lab, host, [h.tool(name), "--stats", *args],
                           stdin=prev.p.stdout if prev else subprocess.DEVNULL,
                           stdout=None if last else subprocess.PIPE, env=h.tool_env(),
                           name=f"{name}@{host}")
                if prev:
                    prev.p.stdout.close()
                procs[p.name] = p
                prev = p
            chains[tag] = (k, sessions, js, prev)
        deadline = time.monotonic() + 120
        for tag, (_k, _s, _js, emit) in chains.items():
            assert emit.wait(max(1, deadline - time.monotonic())) is not None, procs
        read_log(log, 2000)
    finally:
        for p in procs.values():
            p.stop(timeout=8)
        lab.stop(srv)
    diag = "\n".join(repr(p) for p in procs.values())
    logged = read_log(log, 2000, timeout=0)
    no_collision(logged)
    by_data = {s[2]: (tag, k) for tag, (k, ss, _js, _e) in chains.items() for s in ss}
    assert collections.Counter(d for _, _, d in logged) == {p: 1 for p in by_data}, diag
    for ip, port, d in logged:  # each instance's connections from its own port block
        k = by_data[d][1]
        assert 1024 + k * 32256 <= port < 1024 + (k + 1) * 32256, (ip, port, d)
    for tag, (_k, _ss, js, _e) in chains.items():
        st = json.loads(js.read_text())
        oc = st["outcomes"]
        assert oc["completed"] == 1000 and sum(oc.values()) == 1000, (tag, oc, diag)
