"""Socket mode (tc-session --socket) in the namespace lab, live and offline.

Live: real clients in the client host talk to a real server on the online host (the
recording server, or redis-server) while, on the online host,

    tc-capture cli0 'tcp dst port P' | tc-session --socket --target TARGET:P

replays their connections into the same kind of server on the target host, across the
lab's LAN. Nothing else runs: no tc-emit, no tc-intercept, no tc-feedback, and the lab is
built without the target's route to the client network (socket mode needs none: the
target answers the online host's own address). Offline: a tcpdump recording of real
traffic, tc-readpcap REC.pcap | tc-session --socket, IPv4 and IPv6.

What the target receives is compared connection by connection with what the online
server received (or what the recording holds): socket mode connects from the online
host's address with ports of its kernel's choosing, so connections are matched by their
bytes, as multisets: every session's bytes arrive whole, on one connection each.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import replay_harness as h
from tcpcopylib.testing import tool_env
from tcpcopylib.testing import tool_path as tool
from test_live_e2e import (REDIS_PORT, commandstats, index_outcomes, resets, run_client,
                           start_redis, wait_same)

pytestmark = pytest.mark.netns

NO_ROUTE = [{"without_target_route": True}]
TIMEOUT = 120


def start_socket_live(lab, workdir, port=h.PORT, v6=False, session_args=()) -> h.Live:
    """On online: tc-capture cli0 'tcp dst port PORT' | tc-session --socket --target T.
    Returns once tc-capture captures; end it with Live.stop() (SIGTERM to tc-capture,
    tc-session drains and exits at EOF)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stats_json = workdir / "session-stats.json"
    target = f"[{lab.target_ip6}]:{port}" if v6 else f"{lab.target_ip}:{port}"
    env = tool_env()
    procs: dict = {}
    live = h.Live(procs, stats_json, None)
    ok = False
    try:
        cap = h.Proc(lab, "online", [tool("tc-capture"), "-v", "--stats", lab.online_cli_if,
                                     f"tcp dst port {port}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                     name="tc-capture")
        procs["tc-capture"] = cap
        procs["tc-session"] = h.Proc(
            lab, "online", [tool("tc-session"), "--socket", "--target", target, "--stats",
                            "--stats-json", str(stats_json), "-v", *map(str, session_args)],
            stdin=cap.p.stdout, stdout=subprocess.DEVNULL, env=env, name="tc-session")
        cap.p.stdout.close()
        if not cap.wait_stderr(b"capturing on", 15):
            raise RuntimeError(f"tc-capture did not start: {live.diagnostics()}")
        ok = True
        return live
    finally:
        if not ok:
            live.stop(timeout=5)


def assert_all_completed(stats, n_sessions, diag=""):
    assert stats is not None, f"no --stats-json written\n{diag}"
    outcomes = {k: v for k, v in stats["outcomes"].items() if v}
    assert stats["sessions"] == n_sessions, (stats, diag)
    assert outcomes == {"completed": n_sessions}, (outcomes, diag)
    assert stats["connects"] == n_sessions and stats["connect_failures"] == 0, stats
    assert not stats["socket_errors"], stats


def assert_same_connections(want: list[bytes], target_dir, replay_ip, diag=""):
    """The target's connections carry exactly the wanted byte streams (as a multiset), all
    from the replay host's address."""
    got = h.logged_streams(target_dir)
    assert {h._norm_ip(c.ip) for c in got} == {replay_ip}, [c.ip for c in got][:5]
    want_c = Counter(d for d in want if d)
    got_c = Counter(c.data for c in got if c.data)
    missing, extra = want_c - got_c, got_c - want_c
    assert not missing and not extra, (
        f"{sum(missing.values())} streams missing, e.g. {[d[:80] for d in missing][:3]}; "
        f"{sum(extra.values())} unexpected, e.g. {[d[:80] for d in extra][:3]}\n{diag}")
    return sum(want_c.values())


def no_target_route(lab):
    routes = lab.run("target", ["ip", "-4", "route"], capture_output=True, text=True).stdout
    routes += lab.run("target", ["ip", "-6", "route"], capture_output=True, text=True).stdout
    assert lab.client_net not in routes and lab.client_net6.split("/")[0] not in routes, routes


# -- live: HTTP keep-alive and short connections, IPv4 and IPv6 -----------------------------

@pytest.mark.parametrize("lab", NO_ROUTE, indirect=True)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_live_socket_http_byte_identical(lab, tmp_path, v6):
    no_target_route(lab)
    sessions, per_session = (200, 4) if not v6 else (60, 3)
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    live = start_socket_live(lab, tmp_path / "live", v6=v6)
    try:
        res = run_client(lab, "--sessions", sessions, "--requests", per_session,
                         "--parallel", 8, "--post-every", 10, "--body-size", 30000, v6=v6)
        h.wait_settled(tgt, quiet=1.0, timeout=30)
    finally:
        live.stop()
    diag = live.diagnostics()
    n_requests = sessions // 2 * per_session + sessions // 2
    # the real clients saw nothing unusual
    assert res["n_errors"] == 0 and res["answers"] == res["requests"] == n_requests, res
    assert "reset" not in index_outcomes(onl), index_outcomes(onl)
    assert resets(lab, "client") == 0 and resets(lab, "online") == 0
    for name in ("tc-capture", "tc-session"):
        assert live.rc(name) == 0, f"{name} exited {live.rc(name)}\n{diag}"
    assert live.capture_counts().get("dropped by kernel") == 0, live.capture_counts()
    # every request at the target, byte-identical, from the online host's own address
    want = [c.data for c in h.logged_streams(onl)]
    assert len(want) == sessions
    replay_ip = lab.online_ip6 if v6 else lab.online_ip
    assert assert_same_connections(want, tgt, replay_ip, diag) == sessions
    assert_all_completed(live.stats, sessions, diag)
    assert live.stats["bytes_sent"] == sum(map(len, want)), live.stats
    # nothing of the replay went near the assistant: no tc-emit, no forged packets
    assert resets(lab, "target") == 0, h.netstat_counters(lab, "target")


# -- live: redis-server online and on the target, redis-benchmark as the client -------------

@pytest.mark.parametrize("lab", NO_ROUTE, indirect=True)
def test_live_socket_redis_every_command(lab, tmp_path):
    assert shutil.which("redis-benchmark"), "redis-benchmark missing: apt-get install redis-tools"
    start_redis(lab, "online", lab.online_cli_ip, tmp_path / "redis-online")
    start_redis(lab, "target", lab.target_ip, tmp_path / "redis-target")
    live = start_socket_live(lab, tmp_path / "live", port=REDIS_PORT)
    try:
        bench = lab.run("client", [
            "redis-benchmark", "-h", lab.online_cli_ip, "-p", REDIS_PORT, "-c", 8, "-n", 400,
            "-r", 100, "-t", "set,get,incr,lpush,rpop,sadd,hset,mset", "--csv"],
            capture_output=True, text=True, timeout=TIMEOUT)
        pipelined = lab.run("client", [
            "redis-benchmark", "-h", lab.online_cli_ip, "-p", REDIS_PORT, "-c", 4, "-n", 400,
            "-r", 100, "-P", 8, "-t", "set,incr", "--csv"],
            capture_output=True, text=True, timeout=TIMEOUT)
        online, target = wait_same(lambda: (commandstats(lab, "online"),
                                            commandstats(lab, "target")))
    finally:
        live.stop()
    diag = live.diagnostics()
    for r in (bench, pipelined):
        assert r.returncode == 0 and "ERR" not in r.stdout + r.stderr, r
    for name in ("tc-capture", "tc-session"):
        assert live.rc(name) == 0, f"{name} exited {live.rc(name)}\n{diag}"
    assert sum(v for k, v in online.items() if k != "config|get") >= 8 * 400 + 2 * 400, online
    assert target == online, f"target {target}\nonline {online}\n{live.stats}\n{diag}"
    # redis-benchmark's connections (its CONFIG GET one included) all completed
    assert live.stats["sessions"] >= 8 * 8 + 2 * 4, live.stats
    assert_all_completed(live.stats, live.stats["sessions"], diag)


# -- offline: tc-readpcap of a lab recording | tc-session --socket, IPv4 and IPv6 ------------

OFFLINE_MIX = (("keepalive", ["--conns", 3, "--requests", 4]),
               ("pipelined", ["--conns", 2, "--requests", 5]),
               ("close", ["--conns", 4]),
               ("bigbody", ["--conns", 1, "--body-size", 1 << 20]))


@pytest.mark.parametrize("lab", NO_ROUTE, indirect=True)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_offline_socket_recording_byte_identical(lab, tmp_path, v6):
    recs = [h.record(lab, tmp_path / "rec", name, *args, v6=v6) for name, args in OFFLINE_MIX]
    for r in recs:
        assert r.client["n_errors"] == 0, r.client
    want = [s.bytes for r in recs for s in r.streams()]
    n = sum(r.client["conns"] for r in recs)
    assert len(want) == n
    tgt = tmp_path / "target"
    h.start_recording_server(lab, "target", tgt)
    target = f"[{lab.target_ip6}]:{h.PORT}" if v6 else f"{lab.target_ip}:{h.PORT}"
    stats_json = tmp_path / "stats.json"
    env = tool_env()
    # the recordings follow each other with the lab's set-up between them: --max-gap
    rp = h.Proc(lab, "online", [tool("tc-readpcap"), *(r.pcap for r in recs)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env, name="tc-readpcap")
    ts = h.Proc(lab, "online", [tool("tc-session"), "--socket", "--target", target,
                                "--max-gap", "0.3", "--stats", "-v", "--stats-json",
                                stats_json],
                stdin=rp.p.stdout, stdout=subprocess.DEVNULL, env=env, name="tc-session")
    rp.p.stdout.close()
    try:
        assert ts.wait(TIMEOUT) == 0, ts
        assert rp.wait(5) == 0, rp
    finally:
        ts.stop()
        rp.stop()
    h.wait_settled(tgt, quiet=0.5, timeout=10)
    diag = f"{rp!r}\n{ts!r}"
    replay_ip = lab.online_ip6 if v6 else lab.online_ip
    assert assert_same_connections(want, tgt, replay_ip, diag) == n
    stats = json.loads(stats_json.read_text())
    assert_all_completed(stats, n, diag)
    assert stats["fake_syn"] == 0 and stats["bytes_sent"] == sum(map(len, want)), stats
