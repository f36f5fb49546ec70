"""tc-diff after a socket-mode replay, on loopback, without root: the original capture is
made by a relay between a real client and a real HTTP server (tests/tapcap.py), the replay
is tc-session --socket (its --keep output: the session map and the target's answers), the
comparison is tc-diff's. Into the same server: no difference; into a server that answers
otherwise on some paths (diff_server.py --variant): exactly those exchanges differ.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import tapcap
import tc
from tcpcopylib.testing import stop_process, wait_listening

SERVER = tc.REPO / "tests" / "servers" / "diff_server.py"
# (path, Connection: close?) per connection; diff_server --variant answers /b with 404,
# /json/7 with another value and /c without its X-Feature header
CONNECTIONS = [[("/a", False), ("/b", False), ("/json/3", False)],
               [("/json/7", False), ("/c", False), ("/a", False)],
               [("/b", True)]]
VARIANT_PATHS = {"/b", "/c", "/json/7"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def servers():
    """start(variant) -> the port of a running diff_server.py; stopped at the end."""
    procs = []

    def start(variant=False):
        port = _free_port()
        p = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port),
                              *(["--variant"] if variant else [])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        return wait_listening(port, p)
    yield start
    for p in procs:
        stop_process(p)


def _get(sock, f, path, close):
    """One request and its whole answer (Content-Length framing, as diff_server sends)."""
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
    status = f.readline()
    n = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    body = f.read(n)
    assert status.startswith(b"HTTP/1.1 200") and len(body) == n, (path, status)


def record(tmp, port):
    """The client's connections through a tap relay to the server on PORT: a pcap of both
    directions, and the relay's port (the captured server port)."""
    tap = tapcap.Tap(port, tmp / "online")
    try:
        for conn in CONNECTIONS:
            with socket.create_connection(("127.0.0.1", tap.port), timeout=10) as s:
                f = s.makefile("rb")
                for path, close in conn:
                    _get(s, f, path, close)
                    time.sleep(0.02)  # a think time between requests, as a capture has
    finally:
        tap.stop()
    pcap = tmp / "orig.pcap"
    tapcap.pcap([tap.log_dir], pcap)
    return pcap, tap.port


def replay(tmp, pcap, captured_port, target_port, *opts):
    """tc-readpcap | tc-session --socket (no capability when run as root); its output."""
    env = tc.env()
    env["PYTHONPATH"] = str(tc.REPO)
    records = tmp / "orig.cbor"
    with open(records, "wb") as f:
        subprocess.run([tc.BIN / "tc-readpcap", pcap], stdout=f, check=True, env=env,
                       timeout=60)
    cmd = [tc.BIN / "tc-session", "--socket", "-x",
           f"{captured_port}-127.0.0.1:{target_port}", "--drain", "2", *opts, records]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--", *cmd]
    out = tmp / "replay.cbor"
    with open(out, "wb") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, timeout=120, env=env,
                           cwd=tmp)
    assert r.returncode == 0, r.stderr.decode()
    return out


def diff(pcap, smap, replies):
    r = tc.run(["tc-diff", pcap, "-s", smap, "-t", replies], timeout=120)
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    return r, lines


def _path(line) -> str:
    return line["request"].split()[1]


def test_socket_replay_into_the_same_server_has_no_difference(tmp_path, servers):
    port = servers()
    pcap, captured = record(tmp_path, port)
    out = replay(tmp_path, pcap, captured, port, "--keep")  # map and answers in one stream
    recs = tc.decode(out.read_bytes())
    sess = [x for x in recs if x["t"] == "sess"]
    assert len(sess) == len(CONNECTIONS) and {x["outcome"] for x in sess} == {"completed"}
    r, lines = diff(pcap, out, out)
    assert r.returncode == 0, r.stderr.decode()
    assert [_path(x) for x in lines] == [p for conn in CONNECTIONS for p, _ in conn]
    assert {x["verdict"] for x in lines} == {"same"}, lines
    # each exchange paired with its replayed connection, and timed on the replay's clock
    local = {f"{c[0]}:{c[1]}" for x in sess for c in x["conns"]}
    assert {x["replayed"] for x in lines} == local
    assert all(x["latency_ms"]["target"]["last"] is not None for x in lines)


def test_socket_replay_into_a_server_that_answers_otherwise_shows_those_exchanges(
        tmp_path, servers):
    port = servers()
    pcap, captured = record(tmp_path, port)
    variant = servers(variant=True)
    smap = tmp_path / "map.cbor"
    out = replay(tmp_path, pcap, captured, variant, "--keep", "--sessions", smap)
    # with --sessions FILE the map is there, and the --keep output holds no sess record
    assert not [x for x in tc.decode(out.read_bytes()) if x["t"] == "sess"]
    r, lines = diff(pcap, smap, out)
    assert r.returncode == 1, r.stderr.decode()
    assert len(lines) == sum(map(len, CONNECTIONS))
    different = sorted(_path(x) for x in lines if x["verdict"] == "different")
    assert different == sorted(p for conn in CONNECTIONS for p, _ in conn
                               if p in VARIANT_PATHS)
    assert {x["verdict"] for x in lines if _path(x) not in VARIANT_PATHS} == {"same"}
    fields = {d["field"] for x in lines for d in x["differences"]}
    assert {"status", "header:x-feature"} <= fields, fields


# -- the map's two feeds give the same record ------------------------------------------------

class _Session:
    """The fields of an engine Session that SessionMap.end reads."""

    def __init__(self, sid):
        from tcpcopylib.packet import ip_bytes

        self.sid, self.copy, self.created = sid, 0, 5
        self.ckey = (ip_bytes("10.1.0.1"), 4000, ip_bytes("10.1.0.2"), 80)
        self.tip, self.tport = ip_bytes("127.0.0.1"), 8080


def test_forged_datagrams_and_socket_calls_make_the_same_sess_record():
    """Forged mode's map reads connections and runs off the datagrams it emits (a SYN sent
    twice is one connection, a retransmission is no new run, a reconnection is a second
    connection that resends nothing new); socket mode says the same in calls."""
    from tcpcopylib.packet import TH_ACK, TH_PSH, TH_SYN, build_tcp, ip_bytes
    from tcpcopylib.session.sessmap import RUN_NS, SessionMap

    c, t = ip_bytes("127.0.0.1"), ip_bytes("127.0.0.1")
    isn = 0xFFFFFFF0  # the offsets cross 2^32 in sequence numbers

    def dg(port, seq, flags, n=0):
        return build_tcp(c, t, port, 8080, seq & 0xFFFFFFFF, 1, flags, payload=b"x" * n)

    forged = []
    m = SessionMap(forged.append)
    for data, now in [(dg(5001, isn, TH_SYN), 100), (dg(5001, isn, TH_SYN), 150),
                      (dg(5001, isn + 1, TH_ACK), 200),
                      (dg(5001, isn + 1, TH_PSH | TH_ACK, 10), 300),
                      (dg(5001, isn + 11, TH_PSH | TH_ACK, 20), 400),      # same run
                      (dg(5001, isn + 1, TH_PSH | TH_ACK, 10), 500),       # resent
                      (dg(5001, isn + 31, TH_PSH | TH_ACK, 5), 400 + RUN_NS + 1),
                      (dg(5002, isn + 30, TH_SYN), 3 * RUN_NS),            # reconnection
                      (dg(5002, isn + 31, TH_ACK), 3 * RUN_NS + 10),
                      (dg(5002, isn + 31, TH_PSH | TH_ACK, 5), 3 * RUN_NS + 20),
                      (dg(5002, isn + 36, TH_PSH | TH_ACK, 4), 3 * RUN_NS + 30)]:
        m.packet(data, 1, now)
    m.end(_Session(1), "reconnected", 9 * RUN_NS)

    calls = []
    m = SessionMap(calls.append, byte_counts=True)
    m.connecting(1, "127.0.0.1", 5001, 100)
    m.established(1, 200)
    m.sent(1, 0, 10, 300)
    m.sent(1, 10, 30, 400)
    m.sent(1, 0, 10, 500)
    m.received(1, 7)
    m.sent(1, 30, 35, 400 + RUN_NS + 1)
    m.connecting(1, "127.0.0.1", 5002, 3 * RUN_NS)
    m.established(1, 3 * RUN_NS + 10)
    m.sent(1, 30, 35, 3 * RUN_NS + 20)
    m.sent(1, 35, 39, 3 * RUN_NS + 30)
    m.received(1, 3)
    m.end(_Session(1), "reconnected", 9 * RUN_NS, "ECONNRESET")

    (a,), (b,) = forged, calls
    assert a["conns"] == [["127.0.0.1", 5001, 100, 200],
                          ["127.0.0.1", 5002, 3 * RUN_NS, 3 * RUN_NS + 10]]
    assert a["sent"] == [[0, 30, 300, 400], [30, 35, 400 + RUN_NS + 1, 400 + RUN_NS + 1],
                         [35, 39, 3 * RUN_NS + 30, 3 * RUN_NS + 30]]
    assert a["orig"] == ["10.1.0.1", 4000, "10.1.0.2", 80] and a["target"] == ["127.0.0.1", 8080]
    extra = {"bytes_sent": 39, "bytes_received": 10, "error": "ECONNRESET"}
    assert b == {**a, **extra} and not set(extra) & set(a)


def test_socket_mode_sessions_option_writes_the_map_to_a_file_or_into_the_output(tmp_path):
    """--sessions FILE (a stream of its own, its header saying socket mode) or '-' (the
    output stream), with or without --keep; a refused connection's record says why."""
    from tcpcopylib.packet import TH_ACK, TH_PSH, TH_SYN, build_tcp, ip_bytes

    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))  # bound, not listening: a connect() is refused
    port = spare.getsockname()[1]
    c, s = ip_bytes("10.1.0.1"), ip_bytes("10.1.0.2")
    t0 = 1_700_000_000 * 10**9
    recs = [{"t": "pkt", "ts": t0, "data": build_tcp(c, s, 4000, 80, 100, 0, TH_SYN)},
            {"t": "pkt", "ts": t0 + 10**6,
             "data": build_tcp(c, s, 4000, 80, 101, 1, TH_PSH | TH_ACK, payload=b"hi")}]
    smap = tmp_path / "map.cbor"
    try:
        runs = {opt: tc.run(["tc-session", "--socket", "--asap", "--drain", "1", "-x",
                             f"80-127.0.0.1:{port}", *opt], input=tc.stream(recs))
                for opt in (("--sessions", "-"), ("--sessions", smap))}
    finally:
        spare.close()
    for opt, r in runs.items():
        assert r.returncode == 0, (opt, r.stderr)
    (rec,) = [x for x in tc.decode(runs["--sessions", "-"].stdout) if x["t"] == "sess"]
    assert rec["orig"] == ["10.1.0.1", 4000, "10.1.0.2", 80] and rec["target"] == [
        "127.0.0.1", port]
    assert rec["outcome"] == "reset_by_target" and rec["error"] == "ECONNREFUSED"
    assert rec["bytes_sent"] == rec["bytes_received"] == 0 and rec["sent"] == []
    ((ip, local_port, t_syn, t_est),) = rec["conns"]
    assert ip == "127.0.0.1" and local_port > 0 and t_est is None
    assert tc.decode(runs["--sessions", smap].stdout) == []
    head, *in_file = tc.decode(smap.read_bytes(), headers=True)
    assert head["t"] == "header" and head["mode"] == "socket"
    assert [x["t"] for x in in_file] == ["sess"] and in_file[0]["error"] == "ECONNREFUSED"
