"""Live replay end to end: real clients talk to the online server while

online:    tc-capture cli0 'tcp dst port P' | tc-session --target T --feedback unix:SOCK
           | tc-pace | tc-emit
assistant: tc-intercept lan0 -F 'tcp and src port P' | tc-feedback --listen unix:SOCK

mirrors their traffic to the target. The online and target servers are the same kind of
recording server (or redis-server): what the target received, connection by connection,
must equal what the online server received, and the real clients must not notice.
"""

import json
import re
import shutil
import subprocess
import time

import pytest

import replay_harness as h

pytestmark = pytest.mark.netns

CLIENT = str(h.SERVERS / "live_http_client.py")


def failed(stats):
    return {k: v for k, v in stats["outcomes"].items() if v and k not in ("completed",
                                                                          "reconnected")}


def resets(lab, host) -> int:
    """RSTs a lab host's kernel sent (TcpOutRsts) plus connections it saw reset."""
    c = h.netstat_counters(lab, host)
    return c.get("TcpOutRsts", 0) + c.get("TcpEstabResets", 0)


def index_outcomes(log_dir) -> dict:
    """{how: count} from a recording server's connections.log."""
    out: dict = {}
    for ln in (log_dir / "connections.log").read_text().splitlines():
        how = ln.split()[-1]
        out[how] = out.get(how, 0) + 1
    return out


def run_client(lab, *args, timeout=120, v6=False):
    server = f"[{lab.online_cli_ip6}]:{h.PORT}" if v6 else f"{lab.online_cli_ip}:{h.PORT}"
    r = lab.run("client", [h.PY, CLIENT, "--server", server, *map(str, args)],
                capture_output=True, text=True, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    assert lines, f"client printed nothing: rc={r.returncode} {r.stderr[-2000:]}"
    return json.loads(lines[-1])


def live_http(lab, tmp_path, client_args, v6=False, **live_kw):
    """Recording servers on online and target, the live pipeline, the client; returns
    (client result, stopped Live, online log dir, target log dir)."""
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    live = h.start_live(lab, tmp_path / "live", v6=v6, **live_kw)
    try:
        res = run_client(lab, *client_args, v6=v6)
        h.wait_settled(tgt, quiet=1.0, timeout=30)
    finally:
        live.stop()
    return res, live, onl, tgt


def assert_pipeline_ok(live):
    for name in h.LIVE_CHAIN:
        if name in live.procs:
            assert live.rc(name) == 0, f"{name} exited {live.rc(name)}\n{live.diagnostics()}"
    assert live.stats is not None, live.diagnostics()
    cap = live.capture_counts()
    assert cap.get("dropped by kernel") == 0, cap


def assert_mirrored(lab, res, live, onl, tgt, n_requests):
    # the real clients saw nothing unusual
    assert res["n_errors"] == 0, res
    assert res["answers"] == res["requests"] == n_requests, res
    assert "reset" not in index_outcomes(onl), index_outcomes(onl)
    assert resets(lab, "client") == 0 and resets(lab, "online") == 0, (
        h.netstat_counters(lab, "client"), h.netstat_counters(lab, "online"))
    # the target got every connection's bytes, from the client's own address and port
    cmp = h.compare_logs(onl, tgt)
    assert cmp.ok and cmp.identical == res["sessions"], (
        f"{cmp.describe()}\n{live.stats}\n{live.diagnostics()}")
    assert not failed(live.stats), f"{live.stats}\n{live.diagnostics()}"


# -- 1, 2: >= 1,000 HTTP requests, keep-alive and short connections ------------------------

SESSIONS, PER_SESSION = 400, 5   # 200 x 5 keep-alive + 200 short = 1,200 requests


@pytest.mark.parametrize("lab", [{}, {"offloads": True}], indirect=True,
                         ids=["offloads-off", "offloads-default"])
def test_live_http_mirrored_byte_identical(lab, tmp_path):
    res, live, onl, tgt = live_http(
        lab, tmp_path, ["--sessions", SESSIONS, "--requests", PER_SESSION, "--parallel", 8,
                        "--post-every", 10, "--body-size", 30000])
    assert_pipeline_ok(live)
    n = SESSIONS // 2 * PER_SESSION + SESSIONS // 2
    assert n >= 1000
    assert_mirrored(lab, res, live, onl, tgt, n)
    assert live.stats["sessions"] == SESSIONS, live.stats
    # 30 kB POST bodies cross the capture as several segments (or GRO super-segments)
    cap = live.capture_counts()
    assert cap["packets written"] >= SESSIONS * 3, cap
    if lab.offloads:  # the client's TSO hands the capture 30 kB super-segments
        assert cap["super-segments split"] > 0, cap



@pytest.mark.parametrize("send", [False, True, "capture"], ids=["pipe", "send", "one"])
def test_live_http_ipv6(lab, tmp_path, send):
    """Also with tc-capture | tc-session --send (no tc-pace, no tc-emit), and with
    tc-session --capture IFACE --send (one process)."""
    sessions = 60
    res, live, onl, tgt = live_http(lab, tmp_path, ["--sessions", sessions, "--requests", 3,
                                                    "--post-every", 10], v6=True, send=send)
    assert_pipeline_ok(live)
    assert ("tc-emit" in live.procs) != bool(send)
    assert ("tc-capture" in live.procs) != (send == "capture")
    assert_mirrored(lab, res, live, onl, tgt, sessions // 2 * 3 + sessions // 2)
    peers = {c.ip for c in h.logged_streams(tgt)}
    assert peers == {lab.client_ip6}, peers
    if send:
        assert live.stats["emit"]["sent"] == live.stats["pkts_out"], live.stats
    if send == "capture":  # the capture's counters, in tc-session's --stats-json
        cap = live.stats["capture"]
        assert cap["records"] >= sessions * 3 and cap["kernel_drops"] == 0, cap
        assert live.capture_counts()["packets written"] == cap["records"], live.capture_counts()


# -- 3: redis-server online and on the target, redis-benchmark as the client ---------------

REDIS_PORT = 6379


def start_redis(lab, host, ip, workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    return lab.start_server(host, [
        "/usr/bin/redis-server", "--port", REDIS_PORT, "--bind", f"{ip} 127.0.0.1",
        "--protected-mode", "no", "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--dir", workdir, "--logfile", workdir / "redis.log"], port=REDIS_PORT, timeout=10)


def redis_cli(lab, host, *args) -> str:
    """redis-cli over the host's own loopback (never captured: the capture is on cli0)."""
    r = lab.run(host, ["redis-cli", "-h", "127.0.0.1", "-p", REDIS_PORT, *args],
                capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r
    return r.stdout


def commandstats(lab, host) -> dict:
    """{command: calls} from INFO commandstats (the INFO asking is left out)."""
    out = redis_cli(lab, host, "INFO", "commandstats")
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^cmdstat_([\w|]+):calls=(\d+)", out, re.M)
            if m.group(1) != "info"}


def wait_same(fn, timeout=20.0):
    """Poll fn() -> (a, b) until a == b (bounded); returns the last pair."""
    deadline = time.monotonic() + timeout
    while True:
        a, b = fn()
        if a == b or time.monotonic() > deadline:
            return a, b
        time.sleep(0.3)


def test_live_redis_every_command_reaches_target(lab, tmp_path):
    assert shutil.which("redis-benchmark"), "redis-benchmark missing: apt-get install redis-tools"
    start_redis(lab, "online", lab.online_cli_ip, tmp_path / "redis-online")
    start_redis(lab, "target", lab.target_ip, tmp_path / "redis-target")
    live = h.start_live(lab, tmp_path / "live", port=REDIS_PORT)
    try:
        bench = lab.run("client", [
            "redis-benchmark", "-h", lab.online_cli_ip, "-p", REDIS_PORT, "-c", 8, "-n", 500,
            "-r", 100, "-t", "set,get,incr,lpush,rpop,sadd,hset,mset", "--csv"],
            capture_output=True, text=True, timeout=120)
        pipelined = lab.run("client", [
            "redis-benchmark", "-h", lab.online_cli_ip, "-p", REDIS_PORT, "-c", 4, "-n", 400,
            "-r", 100, "-P", 8, "-t", "set,incr", "--csv"],
            capture_output=True, text=True, timeout=120)
        online, target = wait_same(lambda: (commandstats(lab, "online"),
                                            commandstats(lab, "target")))
    finally:
        live.stop()
    for r in (bench, pipelined):
        assert r.returncode == 0 and "ERR" not in r.stdout + r.stderr, r
    assert bench.stdout.count("\n") >= 9 and pipelined.stdout.count("\n") >= 3, (
        bench.stdout, pipelined.stdout)
    assert_pipeline_ok(live)
    # every command the benchmark sent online arrived at the target (the data need not be
    # equal: replayed connections interleave differently, e.g. RPOP before a LPUSH)
    assert sum(v for k, v in online.items() if k != "config|get") >= 8 * 500 + 2 * 400, online
    assert target == online, (f"target {target}\nonline {online}\n{live.stats}\n"
                              f"{live.diagnostics()}")
    assert not failed(live.stats), f"{live.stats}\n{live.diagnostics()}"
    assert resets(lab, "client") == 0, h.netstat_counters(lab, "client")


# -- 4: connections opened before the capture started ---------------------------------------

def test_live_sessions_open_before_capture_replayed_from_next_request(lab, tmp_path):
    conns, later = 10, 3
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    hold = tmp_path / "go"
    cl = lab.popen("client", [h.PY, CLIENT, "--server", f"{lab.online_cli_ip}:{h.PORT}",
                              "--hold", hold, "--hold-conns", conns, "--requests", later],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = None
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "go.ready").exists():
            assert time.monotonic() < deadline and cl.poll() is None, cl.communicate()
            time.sleep(0.02)
        time.sleep(0.2)  # the first answers' ACKs are on the wire before the capture
        # tc-session as in the manual's short pipeline: the feedback address in $TC_FEEDBACK
        live = h.start_live(lab, tmp_path / "live", feedback_env=True)
        hold.write_text("go\n")
        out, err = cl.communicate(timeout=60)
        h.wait_settled(tgt, quiet=1.0, timeout=30)
    finally:
        if cl.poll() is None:
            cl.kill()
            cl.wait()
        if live is not None:
            live.stop()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n_errors"] == 0 and res["answers"] == conns * (later + 1), (res, err)
    assert_pipeline_ok(live)
    assert live.stats["fake_syn"] == conns and live.stats["syn_sent"] == conns, live.stats
    assert not failed(live.stats), f"{live.stats}\n{live.diagnostics()}"
    # the target got each connection from its second request on, from the same client port
    want = []
    for c in h.logged_streams(onl):
        first, sep, rest = c.data.partition(b"\r\n\r\n")
        assert sep and b" /h" in first and b"/r0 " in first, c.data[:80]
        want.append(h.LoggedStream((c.ip, c.port), rest))
    assert len(want) == conns
    got = h.logged_streams(tgt)
    cmp = h.compare_streams(want, got)
    assert cmp.ok and cmp.identical == conns and len(got) == conns, (
        f"{cmp.describe()}\n{live.stats}\n{live.diagnostics()}")
    assert all(c.data.count(b"GET ") == later and b"/r0 " not in c.data for c in got)


# -- 5: tee the capture; tc-dump it; tc-readpcap of a simultaneous tcpdump agrees -----------
# (feedback here crosses hosts over TCP: tc-feedback --listen tcp::36524 on the assistant)

def test_live_tee_capture_matches_tcpdump(lab, tmp_path):
    import tc

    cap, pcap = tmp_path / "cap.cbor", tmp_path / "td.pcap"
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    td = h.Proc(lab, "online", ["tcpdump", "-i", lab.online_cli_if, "-Q", "in", "-n", "-s", "0",
                                "-U", "--immediate-mode", "-B", "32768", "-w", pcap,
                                f"tcp and dst host {lab.online_cli_ip} and dst port {h.PORT}"])
    live = None
    try:
        assert td.wait_stderr(b"listening on", 10), td
        live = h.start_live(lab, tmp_path / "live", tee=cap, feedback="tcp")
        res = run_client(lab, "--sessions", 40, "--requests", 3, "--post-every", 5)
        h.wait_settled(tgt, quiet=1.0, timeout=30)
    finally:
        if live is not None:
            live.stop()
        tdout = h.stop_tcpdump(td)
    assert res["n_errors"] == 0, res
    assert_pipeline_ok(live)
    assert live.rc("tee") == 0, live.diagnostics()
    n = h.tcpdump_counts(tdout)
    assert n.get("dropped by kernel") == 0 and n["captured"] > 0, tdout
    assert h.compare_logs(onl, tgt).identical == 40

    teed = [r for r in tc.decode(cap.read_bytes()) if r.get("t") == "pkt"]
    rp = tc.call(["tc-readpcap", pcap])
    assert rp.returncode == 0, rp.stderr
    from_pcap = [r for r in tc.decode(rp.stdout) if r.get("t") == "pkt"]
    assert len(teed) == live.capture_counts()["packets written"] == n["captured"]
    # the same datagrams (two capture sockets may interleave the two cores' packets
    # differently, so as multisets), each stamped at about the same time (each socket takes
    # its own kernel timestamp: microseconds apart)
    assert sorted(r["data"] for r in teed) == sorted(r["data"] for r in from_pcap)
    ts_pcap = {r["data"]: r["ts"] for r in from_pcap}
    late = [r["ts"] - ts_pcap[r["data"]] for r in teed
            if abs(r["ts"] - ts_pcap[r["data"]]) > 50_000_000]
    assert not late, late[:10]

    dump = tc.call(["tc-dump", cap])
    assert dump.returncode == 0, dump.stderr
    lines = dump.stdout.decode().splitlines()
    pkt_lines = [ln for ln in lines if f"> {lab.online_cli_ip}.{h.PORT}" in ln]
    assert len(pkt_lines) == len(teed), lines[:10]
    assert all(f"{lab.client_ip}." in ln for ln in pkt_lines), pkt_lines[:5]
    assert sum("Flags [S]," in ln for ln in pkt_lines) == 40, pkt_lines[:5]
    assert lines[0].startswith("# header") and "tool=tc-capture" in lines[0], lines[0]
