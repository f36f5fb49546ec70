"""Every script in examples/ runs in the namespace lab and does what its comments say.

Each example examples/NAME.sh has a test here named test_NAME (dashes as underscores);
test_every_example_has_a_test fails when an example is added without one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tc import REPO, decode, tool_env
from tcpcopylib.demo import FB_PORT, WebServer, pcap_requests, server_kind, wait_settled

EXAMPLES = REPO / "examples"
PCAP = EXAMPLES / "http-lab.pcap"
PORT = 8080
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))


def run_script(lab, host, name, *args, timeout=60, **env) -> subprocess.CompletedProcess:
    return lab.run(host, [str(EXAMPLES / name), *map(str, args)], capture_output=True,
                   text=True, timeout=timeout, env=tool_env(**env))


class Background:
    """A script started in a lab host in its own process group (stopped with the group)."""

    def __init__(self, lab, host, name, args, tmp, **env):
        self.log = tmp / f"{name}-{host}.log"
        with open(self.log, "wb") as f:
            self.p = lab.popen(host, [str(EXAMPLES / name), *args], stdout=f, stderr=f,
                               env=tool_env(**env), start_new_session=True)

    def stop(self, timeout=15.0) -> str:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGINT)  # our own group (start_new_session)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        return self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_capturing(lab, host, tool, bg: Background, timeout=10.0):
    """Until a `tool` process in `host` has a socket open (its capture started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert bg.p.poll() is None, f"{tool} side exited: {bg.output()}"
        pids = subprocess.run(["ip", "netns", "pids", lab.ns(host)], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                if tool.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                       for fd in os.listdir(f"/proc/{pid}/fd")):
                    time.sleep(0.3)
                    return
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"{tool} did not start capturing in {host}: {bg.output()}")


@pytest.fixture
def assistant(lab, tmp_path):
    """live-mirror.sh assistant: tc-intercept | tc-feedback on the assistant host."""
    bg = Background(lab, "assistant", "live-mirror.sh", ["assistant"], tmp_path,
                    IFACE=lab.assist_if, PORT=PORT)
    try:
        lab.wait_listening("assistant", FB_PORT, 10, proc=bg.p)
        wait_capturing(lab, "assistant", "tc-intercept", bg)
        yield bg
    finally:
        bg.stop()


def target_server(lab, tmp_path, host="target") -> WebServer:
    return WebServer(lab, host, tmp_path, PORT, server_kind()).start()


def served_ok(srv: WebServer, n: int, client: str) -> bool:
    """n requests answered 200, all from the original client address."""
    info = srv.log_info()
    return info["statuses"] == {"200": n} and info["clients"] == {client: n}


# -- static checks -----------------------------------------------------------------------

def test_every_example_has_a_test():
    assert SCRIPTS, "no examples found"
    missing = [s.name for s in SCRIPTS
               if f"test_{s.stem.replace('-', '_')}" not in globals()]
    assert not missing, f"examples without a test in {__file__}: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_example_is_a_short_commented_script(script):
    text = script.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and lines[1].startswith("# ")
    assert len(lines) <= 40, f"{script.name}: {len(lines)} lines"
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_bundled_pcap_is_small_and_real():
    assert PCAP.stat().st_size < 200_000
    v = pcap_requests(PCAP, PORT)
    assert v["requests"] >= 100 and v["clients"] == 1


def test_scripts_print_usage_without_arguments():
    for s in SCRIPTS:
        r = subprocess.run([str(s)], capture_output=True, text=True, timeout=10,
                           env=tool_env())
        assert r.returncode != 0 and "usage" in r.stderr, (s.name, r.stderr)


# -- each example in the lab -------------------------------------------------------------

@pytest.mark.netns
def test_offline_replay(lab, tmp_path, assistant):
    srv = target_server(lab, tmp_path)
    want = pcap_requests(PCAP, PORT)["requests"]
    r = run_script(lab, "online", "offline-replay.sh", PCAP, f"{lab.target_ip}:{PORT}",
                   f"tcp:{lab.assist_ip}:{FB_PORT}", SPEED=4)
    assert r.returncode == 0, r.stderr
    assert wait_settled(srv.requests, quiet=0.5, timeout=5, want=want) == want, r.stderr
    assert re.search(r"tc-session: \d+ sessions .* 0 failed", r.stderr), r.stderr
    assert served_ok(srv, want, lab.client_ip), srv.log_info()


@pytest.mark.netns
def test_compare_responses(lab, tmp_path):
    """record both directions (tcpdump), the assistant step, the replay step, the diff step"""
    from replay_harness import start_tcpdump, stop_tcpdump

    online = WebServer(lab, "online", tmp_path, PORT, server_kind()).start()
    target_server(lab, tmp_path)
    pcap, m, replies = tmp_path / "both.pcap", tmp_path / "map.cbor", tmp_path / "replies.cbor"
    td = start_tcpdump(lab, "online", lab.online_cli_if, pcap, PORT)
    load = lab.run("client", [sys.executable, "-m", "tcpcopylib.demo", "_load",
                              f"{lab.online_cli_ip}:{PORT}", "--rate", "50", "--duration", "1"],
                   capture_output=True, text=True, timeout=60, cwd=str(REPO))
    stop_tcpdump(td)
    assert load.returncode == 0 and wait_settled(online.requests, quiet=0.3, timeout=5) == 50
    bg = Background(lab, "assistant", "compare-responses.sh",
                    ["assistant", lab.assist_if, str(PORT), str(replies)], tmp_path)
    try:
        lab.wait_listening("assistant", FB_PORT, 10, proc=bg.p)
        wait_capturing(lab, "assistant", "tc-intercept", bg)
        r = run_script(lab, "online", "compare-responses.sh", "replay", pcap,
                       f"{lab.target_ip}:{PORT}", m, f"tcp:{lab.assist_ip}:{FB_PORT}")
        assert r.returncode == 0, r.stderr
    finally:
        bg.stop()
    r = run_script(lab, "online", "compare-responses.sh", "diff", pcap, m, replies,
                   tmp_path / "report.html")
    assert r.returncode == 0, r.stderr
    assert "50 exchanges on" in r.stderr and "50 same, 0 different, 0 missing" in r.stderr
    assert (tmp_path / "report.html").stat().st_size > 1000


@pytest.mark.netns
def test_live_mirror(lab, tmp_path, assistant):
    online = WebServer(lab, "online", tmp_path, PORT, server_kind()).start()
    target = target_server(lab, tmp_path)
    r = run_script(lab, "target", "live-mirror.sh", "target", CLIENT_NET=lab.client_net,
                   ASSISTANT=lab.assist_ip)
    assert r.returncode == 0 and f"ip route replace {lab.client_net}" in r.stdout, r.stderr
    on = Background(lab, "online", "live-mirror.sh", ["online"], tmp_path,
                    IFACE=lab.online_cli_if, TARGET=lab.target_ip, ASSISTANT=lab.assist_ip,
                    PORT=PORT)
    try:
        wait_capturing(lab, "online", "tc-capture", on)
        load = lab.run("client", [sys.executable, "-m", "tcpcopylib.demo", "_load",
                                  f"{lab.online_cli_ip}:{PORT}", "--rate", "50",
                                  "--duration", "2"], capture_output=True, text=True,
                       timeout=60, cwd=str(REPO))
        assert load.returncode == 0, load.stderr
        n = wait_settled(online.requests, quiet=0.5, timeout=5)
        assert n == 100
        assert wait_settled(target.requests, quiet=1.0, timeout=15, want=n) == n, on.output()
    finally:
        out = on.stop()
    assert served_ok(online, 100, lab.client_ip), online.log_info()
    assert served_ok(target, 100, lab.client_ip), (target.log_info(), out)


@pytest.mark.netns
def test_tee_and_inspect(lab, tmp_path, assistant):
    srv = target_server(lab, tmp_path)
    out = tmp_path / "out"
    want = pcap_requests(PCAP, PORT)["requests"]
    r = run_script(lab, "online", "tee-and-inspect.sh", PCAP, f"{lab.target_ip}:{PORT}", out,
                   f"tcp:{lab.assist_ip}:{FB_PORT}", SPEED=4)
    assert r.returncode == 0, r.stderr
    assert wait_settled(srv.requests, quiet=0.5, timeout=5, want=want) == want, r.stderr
    read = [x for x in decode((out / "cap.cbor").read_bytes()) if x.get("t") == "pkt"]
    sent = [x for x in decode((out / "out.cbor").read_bytes()) if x.get("t") == "pkt"]
    assert len(read) > want and len(sent) > want
    assert len((out / "cap.txt").read_text().splitlines()) >= len(read)
    assert len((out / "out.jsonl").read_text().splitlines()) >= len(sent)
    td = subprocess.run(["tcpdump", "-nn", "-r", str(out / "out.pcap")], capture_output=True,
                        text=True)
    assert td.returncode == 0 and len(td.stdout.splitlines()) == len(sent), td.stderr
    assert f"> {lab.target_ip}.{PORT}:" in td.stdout
    assert served_ok(srv, want, lab.client_ip), srv.log_info()
    assert "first packets sent to the target:" in r.stdout


@pytest.mark.netns
@pytest.mark.parametrize("lab", [{"without_target_route": True}], indirect=True)
def test_same_machine(lab, tmp_path):
    srv = target_server(lab, tmp_path)
    want = pcap_requests(PCAP, PORT)["requests"]
    r = run_script(lab, "target", "same-machine.sh", PCAP, f"{lab.target_ip}:{PORT}",
                   lab.client_net, SPEED=4)
    assert r.returncode == 0, r.stderr
    assert wait_settled(srv.requests, quiet=0.5, timeout=5, want=want) == want, r.stderr
    assert re.search(r"tc-session: \d+ sessions .* 0 failed", r.stderr), r.stderr
    assert served_ok(srv, want, lab.client_ip), srv.log_info()
    # the black hole and its route are gone again
    assert lab.run("target", ["ip", "link", "show", "tcbh0"], capture_output=True).returncode
    routes = lab.run("target", ["ip", "route"], capture_output=True, text=True).stdout
    assert lab.client_net not in routes


# -- the classic protocol (tcpcopy 1.3 / intercept 1.0): tcpcopy(7), CLASSIC PROTOCOL --------

@pytest.mark.netns
def test_classic_to_intercept(lab, tmp_path):
    """tc-session --feedback classic: against a classic server on the assistant (here
    tc-feedback --classic, which speaks as intercept 1.0 does)."""
    srv = target_server(lab, tmp_path)
    want = pcap_requests(PCAP, PORT)["requests"]
    bg = Background(lab, "assistant", "classic-for-tcpcopy.sh",
                    [lab.assist_if, str(PORT), lab.online_ip], tmp_path)
    try:
        lab.wait_listening("assistant", FB_PORT, 10, proc=bg.p)
        wait_capturing(lab, "assistant", "tc-intercept", bg)
        r = run_script(lab, "online", "classic-to-intercept.sh", PCAP,
                       f"{lab.target_ip}:{PORT}", lab.assist_ip, SPEED=4)
    finally:
        out = bg.stop()
    assert r.returncode == 0, r.stderr
    assert wait_settled(srv.requests, quiet=0.5, timeout=5, want=want) == want, r.stderr
    assert re.search(r"tc-session: \d+ sessions .* 0 failed", r.stderr), r.stderr
    assert served_ok(srv, want, lab.client_ip), srv.log_info()
    assert "1 classic clients" in out, out


@pytest.mark.netns
def test_classic_for_tcpcopy(lab, tmp_path):
    """tc-feedback --classic --allow ONLINE on the assistant, with its native listener too
    (NATIVE): a classic client (tc-session --feedback classic:, as tcpcopy speaks) and a
    native one replay through the same capture; a host not allowed is turned away."""
    srv = target_server(lab, tmp_path)
    want = pcap_requests(PCAP, PORT)["requests"]
    bg = Background(lab, "assistant", "classic-for-tcpcopy.sh",
                    [lab.assist_if, str(PORT), lab.online_ip], tmp_path,
                    NATIVE="tcp::36525")
    try:
        lab.wait_listening("assistant", FB_PORT, 10, proc=bg.p)
        lab.wait_listening("assistant", 36525, 10, proc=bg.p)
        wait_capturing(lab, "assistant", "tc-intercept", bg)
        for feedback in (f"classic:{lab.assist_ip}", f"tcp:{lab.assist_ip}:36525"):
            r = run_script(lab, "online", "offline-replay.sh", PCAP, f"{lab.target_ip}:{PORT}",
                           feedback, SPEED=4)
            assert r.returncode == 0, r.stderr
            assert re.search(r"tc-session: \d+ sessions .* 0 failed", r.stderr), r.stderr
        refused = lab.run("target", [sys.executable, "-c", (
            "import socket,sys; s=socket.create_connection((sys.argv[1], 36524), 5); "
            "s.settimeout(5); sys.exit(0 if s.recv(1) == b'' else 1)"), lab.assist_ip],
            capture_output=True, text=True, timeout=30)
    finally:
        out = bg.stop()
    assert wait_settled(srv.requests, quiet=0.5, timeout=5, want=2 * want) == 2 * want, out
    assert served_ok(srv, 2 * want, lab.client_ip), srv.log_info()
    assert refused.returncode == 0, refused.stderr
    assert "1 classic clients" in out and "not in --allow" in out, out


@pytest.mark.netns
def test_rewrite_host(lab, tmp_path, assistant):
    """every request of the bundled capture reaches the target's nginx with the new Host,
    and the URL rule of RULES applied"""
    from test_filters_lab import NGINX_CONF

    ndir = tmp_path / "nginx"
    ndir.mkdir()
    (ndir / "nginx.conf").write_text(NGINX_CONF.format(dir=ndir, port=PORT))
    lab.start_server("target", ["nginx", "-c", str(ndir / "nginx.conf"), "-p", str(ndir)],
                     port=PORT, start_new_session=True)
    rules = tmp_path / "rules"
    rules.write_text("url '^/index\\.html$' /home.html   # the test site's start page\n")
    want = pcap_requests(PCAP, PORT)["requests"]
    r = run_script(lab, "online", "rewrite-host.sh", PCAP, f"{lab.target_ip}:{PORT}",
                   "replay.test.example", f"tcp:{lab.assist_ip}:{FB_PORT}", RULES=rules)
    assert r.returncode == 0, r.stderr
    log = ndir / "access.log"
    count = lambda: len(log.read_text().splitlines())  # noqa: E731
    assert wait_settled(count, quiet=0.5, timeout=5, want=want) == want, r.stderr
    lines = [ln.split("|") for ln in log.read_text().splitlines()]
    assert {ln[3] for ln in lines} == {"replay.test.example"}
    assert {ln[5] for ln in lines} == {"200"}
    uris = {ln[2] for ln in lines}
    assert "/home.html" in uris and "/index.html" not in uris, uris
    assert re.search(r"tc-rewrite: .*\[url .*\] [1-9]", r.stderr), r.stderr
    assert re.search(r"tc-session: \d+ sessions .* 0 failed", r.stderr), r.stderr


@pytest.mark.netns
def test_fleet_cluster(lab, tmp_path):
    """Three nodes on one host (the online namespace's loopback) form a JetStream cluster
    that asks a token: an R3 stream is stored and read back by partitions; no token, no
    entry."""
    import natskit

    env = {"DIR": tmp_path / "nats", "NATS_SERVER": natskit.nats_server_binary()}
    nodes = []
    try:
        for n in range(3):  # one after the other, as an operator would
            (tmp_path / f"n{n}").mkdir()
            nodes.append(Background(lab, "online", "fleet-cluster.sh", ["node", str(n)],
                                    tmp_path / f"n{n}", **env))
            lab.wait_listening("online", 4222 + n, 15, proc=nodes[n].p)
        servers = "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
        token = ["-s", servers, "--token-file", str(tmp_path / "nats" / "token"),
                 "--stream", "ex", "--retry-for", "60s"]
        records = lab.run("online", ["tc-readpcap", PCAP], capture_output=True,
                          env=tool_env(), timeout=60)
        want = sorted((r["ts"], r["data"]) for r in decode(records.stdout))
        r = lab.run("online", ["tc-publish", *token, "-P", "3", "--replicas", "3"],
                    input=records.stdout, capture_output=True, env=tool_env(), timeout=90)
        # (replicas 3: the three nodes are one cluster)
        assert r.returncode == 0, (r.stderr, [n.output()[-1500:] for n in nodes])
        got = []
        for k in range(3):
            s = lab.run("online", ["tc-subscribe", *token, "-p", f"{k}/3", "--all",
                                   "--until", "now"], capture_output=True, env=tool_env(),
                        timeout=90)
            assert s.returncode == 0, s.stderr
            got += [(x["ts"], x["data"]) for x in decode(s.stdout)]
        assert sorted(got) == want
        r = lab.run("online", ["tc-publish", "-s", servers, "--no-auth", "--stream", "ex",
                               "--retry-for", "5s"], input=records.stdout,
                    capture_output=True, env=tool_env(), timeout=60)
        assert r.returncode == 77, r.stderr
    finally:
        for node in nodes:
            node.stop()
