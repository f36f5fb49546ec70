"""tc-rewrite and tc-select in the netns lab, against real servers (the issue's list):

1. a rewrite that lengthens and one that shortens the Host header and a token in POST
   bodies (Content-Length adjusted): the target receives, connection by connection, the
   recorded stream rewritten, byte for byte (keep-alive of 100 requests, a 1 MB body,
   pipelined requests), tc-session ends every session as completed, with no RST and no
   retransmission storm; nginx as the target answers every request 200 with the new Host
   and the new lengths;
2. a head split over two TCP segments in the capture is still rewritten (in 1);
3. tc-select keeping POST /api/* and redis SET/INCR: the target receives exactly those
   sessions, each whole (a recording server for HTTP, redis-server for redis);
4. the user filter of examples/user-filter.py in a live pipeline; tc-rewrite and tc-select
   live too.
IPv6: the shortening rewrite and the live selection.
"""

import json
import signal
import time

import pytest

import replay_harness as h
from tc import REPO

pytestmark = pytest.mark.netns

CLIENT = str(h.SERVERS / "rewrite_client.py")
KEEPALIVE, BIG, PIPELINED = 100, 1 << 20, 10
N_REQUESTS = KEEPALIVE + 2 + PIPELINED + 2


def record_http(lab, workdir, v6=False, argv=None, port=h.PORT):
    """The rewrite client (or argv) against a recording server on online, under tcpdump:
    (pcap, online log dir, client result)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pcap, logs = workdir / "rec.pcap", workdir / "online"
    srv = h.start_recording_server(lab, "online", logs, port)
    addr = f"[{lab.online_cli_ip6}]:{port}" if v6 else f"{lab.online_cli_ip}:{port}"
    td = h.start_tcpdump(lab, "online", lab.online_cli_if, pcap, port)
    try:
        r = lab.run("client", [h.PY, *(argv or [CLIENT, "--keepalive", KEEPALIVE, "--big",
                                                BIG, "--pipelined", PIPELINED]),
                               "--server", addr], capture_output=True, text=True, timeout=120)
        h.stop_tcpdump(td)
        td = None
    finally:
        if td is not None:
            td.stop(signal.SIGINT)
        lab.stop(srv)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res["errors"], res
    problem = h.recording_problem(pcap, logs, port)
    assert not problem, problem
    return pcap, logs, res


def rewritten(stream: bytes, host: bytes, token: bytes) -> bytes:
    """What the target must receive for a recorded client stream (the test's own
    reading of the rules): Host replaced, the token replaced in bodies, Content-Length
    following."""
    out, rest = [], stream
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        n = next((int(ln.split(b":")[1]) for ln in lines
                  if ln.lower().startswith(b"content-length:")), 0)
        body, rest = rest[:n].replace(b"token=PRODSECRET", token), rest[n:]
        lines = [b"Host: " + host if ln.lower().startswith(b"host:") else
                 b"Content-Length: %d" % len(body) if ln.lower().startswith(
                     b"content-length:") else ln for ln in lines]
        out.append(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    return b"".join(out)


def by_port(logged) -> dict:
    return {c.port: c.data for c in logged}


def split_head_in_capture(pcap) -> bool:
    """Does a client segment of the capture end inside the Host header?"""
    for _ts, ip in h.pcap_ip_packets(pcap):
        t = h.parse_tcp(ip)
        if t is not None and t[-1].endswith(b"Host: prod"):
            return True
    return False


REWRITES = {  # name: (host, token, v6)
    "lengthen": (b"a-much-longer-host-name.test.internal.example",
                 b"token=THE-LONGER-TEST-TOKEN-0123456789", False),
    "shorten-ipv6": (b"t.ex", b"token=T", True),
}


@pytest.mark.parametrize("how", REWRITES)
def test_rewrite_host_and_body_token_reach_the_target_byte_for_byte(lab, tmp_path, how):
    host, token, v6 = REWRITES[how]
    pcap, online, res = record_http(lab, tmp_path / "rec", v6=v6)
    assert res["answers"] == res["requests"] == N_REQUESTS
    assert split_head_in_capture(pcap), "the capture does not split the head"
    rstats = tmp_path / "rewrite.json"
    rep = h.replay(lab, pcap, tmp_path / "replay", v6=v6, filters=[(
        "tc-rewrite", ["--host", host.decode(), "--replace", "token=PRODSECRET",
                       token.decode(), "--stats-json", rstats])])
    assert not rep.timed_out, rep.diagnostics()
    want = {c.port: rewritten(c.data, host, token) for c in h.logged_streams(online)}
    got = by_port(rep.logged())
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for port, data in want.items():
        assert got[port] == data, (port, h.first_difference(data, got[port]))
    assert {k for k, v in rep.stats["outcomes"].items() if v} == {"completed"}, rep.stats
    # no RST, no retransmission storm
    assert rep.target_nstat.get("TcpOutRsts", 0) == 0, rep.target_nstat
    assert rep.target_nstat.get("TcpEstabResets", 0) == 0, rep.target_nstat
    assert rep.stats["retransmits"] <= 10, rep.stats
    rs = json.loads(rstats.read_text())
    tokens = sum(c.data.count(b"token=PRODSECRET") for c in h.logged_streams(online))
    assert rs["rules"] == {f"host {host.decode()}": N_REQUESTS,
                           f"replace token=PRODSECRET {token.decode()}": tokens}, rs
    assert rs["cut"] == rs["dropped"] == 0


NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format lab '$remote_port|$request_method|$request_uri|$host|$content_length|$status';
    access_log {dir}/access.log lab;
    client_body_temp_path {dir}/body;
    client_max_body_size 4m;
    keepalive_requests 1000;
    server {{
        listen {port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def test_rewrite_into_nginx_every_request_answered_with_the_new_values(lab, tmp_path):
    host, token, _ = REWRITES["lengthen"]
    pcap, online, _ = record_http(lab, tmp_path / "rec")
    ndir = tmp_path / "nginx"
    ndir.mkdir()
    (ndir / "nginx.conf").write_text(NGINX_CONF.format(dir=ndir, port=h.PORT))
    srv = lab.start_server("target", ["nginx", "-c", str(ndir / "nginx.conf"), "-p",
                                      str(ndir)], port=h.PORT, start_new_session=True)
    try:
        rep = h.replay(lab, pcap, tmp_path / "replay", start_target=False, filters=[(
            "tc-rewrite", ["--host", host.decode(), "--replace", "token=PRODSECRET",
                           token.decode()])])
        deadline = time.monotonic() + 10
        while (len((ndir / "access.log").read_text().splitlines()) < N_REQUESTS
               and time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        lab.stop(srv)
    lines = [ln.split("|") for ln in (ndir / "access.log").read_text().splitlines()]
    assert len(lines) == N_REQUESTS, (len(lines), rep.diagnostics())
    assert {ln[3] for ln in lines} == {host.decode()}
    assert {ln[5] for ln in lines} == {"200"}, lines
    # the lengths nginx read are the rewritten ones
    want = []
    for c in h.logged_streams(online):
        for req in rewritten(c.data, host, token).split(b"HTTP/1.1\r\n")[1:]:
            cl = [ln for ln in req.split(b"\r\n") if ln.startswith(b"Content-Length: ")]
            want.append(cl[0].split(b": ")[1].decode() if cl else "-")
    assert sorted(ln[4] for ln in lines) == sorted(want)
    assert {k for k, v in rep.stats["outcomes"].items() if v} == {"completed"}, rep.stats
    assert rep.target_nstat.get("TcpEstabResets", 0) == 0, rep.target_nstat


# -- 3: tc-select ---------------------------------------------------------------------------

SELECT_RULES = ["--keep", "http:POST /api/*", "--keep", "redis:SET,INCR"]

HTTP_SESSIONS = [  # (first request, more requests): kept if the first is POST /api/*
    (b"POST /api/orders", [b"GET /after"]), (b"GET /health", [b"POST /api/x"]),
    (b"POST /api/users/7", []), (b"GET /index.html", []), (b"POST /upload", [b"GET /"]),
    (b"POST /api/orders?x=1", [b"POST /api/more", b"GET /z"]),
]


def test_select_http_sessions_whole(lab, tmp_path):
    script = tmp_path / "sessions.py"
    script.write_text(SESSION_CLIENT)
    pcap, online, _ = record_http(lab, tmp_path / "rec", argv=[str(script)])
    sstats = tmp_path / "select.json"
    rep = h.replay(lab, pcap, tmp_path / "replay", filters=[
        ("tc-select", [*SELECT_RULES, "--stats-json", sstats])])
    assert not rep.timed_out, rep.diagnostics()
    onl = h.logged_streams(online)
    want = {c.port: c.data for c in onl if c.data.startswith(b"POST /api/")}
    assert len(want) == 3 and len(onl) == len(HTTP_SESSIONS)
    assert by_port(rep.logged()) == want  # exactly those sessions, each whole
    st = json.loads(sstats.read_text())
    assert st["kept"] == 3 and st["outcomes"] == {"filtered": 3}, st
    assert st["rules"]["keep http:POST /api/*"] == 3 and st["rules"]["default drop"] == 3
    # tc-session counts the dropped ones from tc-select's "filtered" records
    assert {k: v for k, v in rep.stats["outcomes"].items() if v} == {
        "completed": 3, "filtered": 3}, rep.stats


SESSION_CLIENT = """
import json, socket, sys
server = sys.argv[sys.argv.index("--server") + 1]
host, _, port = server.rpartition(":")
sessions = %r
n = 0
for first, more in sessions:
    s = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
    for line in [first, *more]:
        method, path = line.split(b" ")
        body = b"a=1" if method == b"POST" else b""
        req = method + b" " + path + b" HTTP/1.1\\r\\nHost: lab\\r\\n"
        req += (b"Content-Length: 3\\r\\n" if body else b"") + b"\\r\\n" + body
        s.sendall(req)
        buf = b""
        while b"\\r\\n\\r\\n" not in buf:
            buf += s.recv(65536)
        head, _, rest = buf.partition(b"\\r\\n\\r\\n")
        size = int([l for l in head.split(b"\\r\\n") if l.lower().startswith(
            b"content-length")][0].split(b":")[1])
        while len(rest) < size:
            rest += s.recv(65536)
        n += 1
    s.close()
print(json.dumps({"requests": n, "answers": n, "errors": []}))
""" % (HTTP_SESSIONS,)

REDIS_PORT = 6379
REDIS_SESSIONS = [  # each a connection; kept if its first command is SET or INCR
    [["SET", "kept:a", "1"], ["SET", "kept:b", "2"]],
    [["GET", "kept:a"], ["SET", "dropped:1", "x"]],
    [["INCR", "counter"], ["INCR", "counter"], ["SET", "kept:c", "3"]],
    [["DEL", "nothing"], ["INCR", "dropped:2"]],
    [["set", "kept:d", "4"]],
    [["PING"], ["SET", "dropped:3", "y"]],
]


def start_redis(lab, host, ip, workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    return lab.start_server(host, ["redis-server", "--port", str(REDIS_PORT), "--bind",
                                   f"{ip} 127.0.0.1", "--protected-mode", "no", "--save", "",
                                   "--appendonly", "no", "--daemonize", "no", "--dir",
                                   str(workdir), "--logfile", str(workdir / "redis.log")],
                            port=REDIS_PORT, timeout=10)


def redis_keys(lab, host) -> dict:
    r = lab.run(host, ["redis-cli", "-h", "127.0.0.1", "-p", str(REDIS_PORT), "--no-raw",
                       "eval", "local o={} for _,k in ipairs(redis.call('keys','*')) do "
                       "o[#o+1]=k o[#o+1]=redis.call('get',k) end return o", "0"],
                capture_output=True, text=True, timeout=10)
    vals = [v.split(") ", 1)[1].strip('"') for v in r.stdout.splitlines() if ") " in v]
    return dict(zip(vals[::2], vals[1::2]))


REDIS_CLIENT = """
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
n = 0
for cmds in %r:
    s = socket.create_connection((host, port), timeout=10)
    for c in cmds:
        s.sendall(b"*%%d\\r\\n" %% len(c) + b"".join(b"$%%d\\r\\n%%s\\r\\n" %% (len(a), a.encode())
                                                  for a in c))
        buf = b""
        while not buf.endswith(b"\\r\\n"):
            buf += s.recv(4096)
        n += 1
    s.close()
print(json.dumps({"commands": n}))
""" % (REDIS_SESSIONS,)


def test_select_redis_set_and_incr_sessions_only(lab, tmp_path):
    online = start_redis(lab, "online", lab.online_cli_ip, tmp_path / "r-online")
    pcap = tmp_path / "redis.pcap"
    td = h.start_tcpdump(lab, "online", lab.online_cli_if, pcap, REDIS_PORT)
    script = tmp_path / "redis_client.py"
    script.write_text(REDIS_CLIENT)
    try:
        r = lab.run("client", [h.PY, str(script), lab.online_cli_ip, str(REDIS_PORT)],
                    capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        h.stop_tcpdump(td)
        td = None
    finally:
        if td is not None:
            td.stop(signal.SIGINT)
    all_keys = redis_keys(lab, "online")
    lab.stop(online)
    assert {"kept:a", "dropped:1", "dropped:2", "dropped:3", "counter"} <= all_keys.keys()
    target = start_redis(lab, "target", lab.target_ip, tmp_path / "r-target")
    try:
        sstats = tmp_path / "select.json"
        rep = h.replay(lab, pcap, tmp_path / "replay", port=REDIS_PORT, start_target=False,
                       filters=[("tc-select", [*SELECT_RULES, "--stats-json", sstats])])
        assert not rep.timed_out, rep.diagnostics()
        deadline = time.monotonic() + 10
        while redis_keys(lab, "target").get("kept:d") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        got = redis_keys(lab, "target")
    finally:
        lab.stop(target)
    # exactly the kept sessions, each whole (the INCR session's SET included)
    assert got == {"kept:a": "1", "kept:b": "2", "counter": "2", "kept:c": "3",
                   "kept:d": "4"}, got
    st = json.loads(sstats.read_text())
    assert st["kept"] == 3 and st["outcomes"] == {"filtered": 3}, st
    assert st["rules"]["keep redis:SET,INCR"] == 3
    assert {k: v for k, v in rep.stats["outcomes"].items() if v} == {
        "completed": 3, "filtered": 3}, rep.stats


# -- 4: the user filter, live ---------------------------------------------------------------

def test_user_filter_example_live(lab, tmp_path):
    """tc-capture | examples/user-filter.py | tc-session | tc-pace | tc-emit: the health
    checks never reach the target, the tenant is rewritten in the rest."""
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    script = tmp_path / "sessions.py"
    sessions = [(b"POST /api/t?tenant=prod", [b"GET /a?tenant=prod"]), (b"GET /health", []),
                (b"GET /b?tenant=prod", [])]
    script.write_text(SESSION_CLIENT.replace(repr(HTTP_SESSIONS), repr(sessions)))
    live = h.start_live(lab, tmp_path / "live", filters=[
        (str(REPO / "examples" / "user-filter.py"), [])])
    try:
        r = lab.run("client", [h.PY, str(script), "--server",
                               f"{lab.online_cli_ip}:{h.PORT}"],
                    capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        h.wait_settled(tgt, quiet=1.0, timeout=20)
    finally:
        live.stop()
    got = sorted(c.data for c in h.logged_streams(tgt))
    want = sorted(c.data.replace(b"tenant=prod", b"tenant=test")
                  for c in h.logged_streams(onl) if not c.data.startswith(b"GET /health"))
    assert len(want) == 2 and got == want, (got, want, live.diagnostics())


def test_rewrite_live(lab, tmp_path):
    """tc-capture | tc-rewrite | tc-session | tc-pace | tc-emit while the client runs:
    the target receives each connection rewritten, byte for byte, the client sees
    nothing."""
    host, token, _ = REWRITES["lengthen"]
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    live = h.start_live(lab, tmp_path / "live", filters=[
        ("tc-rewrite", ["--host", host.decode(), "--replace", "token=PRODSECRET",
                        token.decode()])])
    try:
        r = lab.run("client", [h.PY, CLIENT, "--keepalive", 30, "--big", 200_000,
                               "--pipelined", 5, "--server", f"{lab.online_cli_ip}:{h.PORT}"],
                    capture_output=True, text=True, timeout=120)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert not res["errors"] and res["answers"] == res["requests"], res
        h.wait_settled(tgt, quiet=1.0, timeout=30)
    finally:
        live.stop()
    want = {c.port: rewritten(c.data, host, token) for c in h.logged_streams(onl)}
    got = by_port(h.logged_streams(tgt))
    assert got == want, live.diagnostics()
    assert {k for k, v in live.stats["outcomes"].items() if v} == {"completed"}, live.stats


def test_select_live_ipv6(lab, tmp_path):
    """tc-capture | tc-select | tc-session ... over IPv6, while the client runs: the
    health checks never reach the target, the other sessions do, whole."""
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    script = tmp_path / "sessions.py"
    script.write_text(SESSION_CLIENT)
    live = h.start_live(lab, tmp_path / "live", v6=True, filters=[
        ("tc-select", ["--drop", "http:GET /health*", "--drop", "http:* /index.html"])])
    try:
        r = lab.run("client", [h.PY, str(script), "--server",
                               f"[{lab.online_cli_ip6}]:{h.PORT}"],
                    capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        h.wait_settled(tgt, quiet=1.0, timeout=20)
    finally:
        live.stop()
    want = {c.port: c.data for c in h.logged_streams(onl)
            if not c.data.startswith((b"GET /health", b"GET /index.html"))}
    assert len(want) == len(HTTP_SESSIONS) - 2
    assert by_port(h.logged_streams(tgt)) == want, live.diagnostics()
    assert {k: v for k, v in live.stats["outcomes"].items() if v} == {
        "completed": len(want), "filtered": 2}, live.stats
