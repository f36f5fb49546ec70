"""The fleet through NATS JetStream, in network namespaces (tcpcopy(7), FLEET):

    client ──► online (:8080)  tc-capture cli0 | tc-publish ─┐          ┌─ n0 ─┐
    client ──► on2    (:8080)  tc-capture cli0 | tc-publish ─┼─► broker │  n1  │ (JetStream,
                                                              │          └─ n2 ─┘  R3 stream)
    r0, r1, r2: tc-subscribe -p K/3 | tc-session -f K/6 --send ─► target (:8080)
    target ─► assistant: tc-intercept | tc-feedback (tcp:36524) ─► the three tc-session

Every broker node and every host is a namespace of its own; the broker asks a user and
password of clients (and of its cluster routes). What the target's recording server logs,
connection by connection, must be what the online servers received (content-matched: -f
moves the client ports into each replay host's block), none twice, none missing:

1. live, three replay hosts: every session complete and byte-exact;
2. a broker node killed and restarted mid-run: the same;
3. a replay host killed mid-run and restarted (on a port block of its own): its open
   sessions end with an outcome, the sessions after the restart complete;
4. the stored minute replayed with --since/--until: the same target log as live.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

import natskit
import replay_harness as h
from tc import tool_env, tool_path

pytestmark = pytest.mark.netns

CLIENT = str(h.SERVERS / "live_http_client.py")
NODES = {"n0": "10.200.1.30", "n1": "10.200.1.31", "n2": "10.200.1.32"}
REPLAYERS = {"r0": "10.200.1.40", "r1": "10.200.1.41", "r2": "10.200.1.42"}
ON2_IP = "10.200.1.20"
ON2_CLI_NET, ON2_CLI_IP, CLIENT2_IP = "10.200.8.0/24", "10.200.8.1", "10.200.8.2"
USER, PASSWORD = "tcfleet", "tc-test-fleet-3c9a71"
SESSIONS = 80  # per online host: 40 keep-alive of 3 requests + 40 short


CAUGHT_UP = """
import asyncio, sys, time
import nats

async def main():
    nc = await nats.connect({urls!r}, user={user!r}, password={password!r})
    js = nc.jetstream()
    deadline = time.monotonic() + {timeout}
    while True:
        left = {{}}
        for k in range(3):
            try:
                ci = await js.consumer_info({stream!r}, f"tc-subscribe-{{k}}of3")
                n = ci.num_pending + ci.num_ack_pending
            except Exception as e:
                n = type(e).__name__
            if n:
                left[k] = n
        if not left:
            return 0
        if time.monotonic() > deadline:
            print(left)
            return 1
        await asyncio.sleep(0.5)

sys.exit(asyncio.run(main()))
"""


class Fleet:
    """The hosts, the cluster and the feedback side; pipelines started by the tests."""

    def __init__(self, lab, tmp_path: Path):
        self.lab, self.tmp = lab, tmp_path
        self.procs: list = []
        for name, ip in {**NODES, "on2": ON2_IP, **REPLAYERS}.items():
            lab.add_host(name, ip, ip.replace("10.200.1.", "fd00:200:1::"))
        # the second online host's clients: a link client (up1) -- on2 (cli0); the target
        # routes their addresses to the assistant, as the first's
        subprocess.run(["ip", "-n", lab.ns("client"), "link", "add", "up1", "type", "veth",
                        "peer", "name", "cli0", "netns", lab.ns("on2")], check=True)
        for host, dev, addr in (("client", "up1", CLIENT2_IP), ("on2", "cli0", ON2_CLI_IP)):
            subprocess.run(["ip", "-n", lab.ns(host), "addr", "add", f"{addr}/24", "dev", dev],
                           check=True)
            subprocess.run(["ip", "-n", lab.ns(host), "link", "set", dev, "up"], check=True)
            subprocess.run(["ip", "netns", "exec", lab.ns(host), "ethtool", "-K", dev,
                            "tso", "off", "gso", "off", "gro", "off"], capture_output=True)
        subprocess.run(["ip", "-n", lab.ns("target"), "route", "add", ON2_CLI_NET, "via",
                        lab.assist_ip], check=True)
        self.password = tmp_path / "nats.password"
        self.password.write_text(PASSWORD + "\n")
        self.password.chmod(0o600)
        self.nodes = {}
        for name, ip in NODES.items():
            peers = [p for n, p in NODES.items() if n != name]
            self.nodes[name] = natskit.NatsServer(
                tmp_path, name, ip=ip, auth={"user": USER, "password": PASSWORD},
                cluster=("tcfleet", peers), lab=lab, host=name)
        for node in self.nodes.values():
            node.start(timeout=20)
        self.urls = ",".join(n.url for n in self.nodes.values())
        fb, self.feedback = h.start_feedback_tcp(lab, h.PORT)
        self.procs += fb.values()

    def broker_args(self, stream):
        return ["-s", self.urls, "--user", USER, "--password-file", str(self.password),
                "--stream", stream, "--retry-for", "60s"]

    def proc(self, host, argv, **kw):
        p = h.Proc(self.lab, host, argv, env=tool_env(), **kw)
        self.procs.append(p)
        return p

    def start_publishers(self, stream):
        """tc-capture cli0 | tc-publish on both online hosts; returns them once the stream
        exists and both capture."""
        pubs = []
        for host in ("online", "on2"):
            cap = self.proc(host, [tool_path("tc-capture"), "-v", "--stats", "cli0",
                                   f"tcp dst port {h.PORT}"], stdout=subprocess.PIPE,
                            name=f"tc-capture@{host}")
            pub = self.proc(host, [tool_path("tc-publish"), "-v", "--stats",
                                   *self.broker_args(stream), "-P", "3", "--replicas", "3",
                                   "--stats-json", str(self.tmp / f"pub-{host}.json")],
                            stdin=cap.p.stdout, name=f"tc-publish@{host}")
            cap.p.stdout.close()
            pubs.append((cap, pub))
        for cap, pub in pubs:
            assert cap.wait_stderr(b"capturing on", 20), cap
            assert pub.wait_stderr(b"publishing to stream", 60), pub
        return pubs

    def start_replayer(self, k, stream, tag, sub_args=(), block=None):
        """tc-subscribe -p K/3 | tc-session -f B/6 --send on replay host rK: client ports
        from block B (default K) of 6, so that a replacement can take a block the dead
        one never used (K + 3)."""
        host = f"r{k}"
        sub = self.proc(host, [tool_path("tc-subscribe"), "-v", "--stats",
                               *self.broker_args(stream), "-p", f"{k}/3", "--ack-wait", "3s",
                               *sub_args], stdout=subprocess.PIPE,
                        name=f"tc-subscribe@{host}")
        ses = self.proc(host, [tool_path("tc-session"), "--stats", "--target",
                               f"{self.lab.target_ip}:{h.PORT}",
                               "-f", f"{k if block is None else block}/6",
                               "--feedback", self.feedback, "--drain", "10",
                               # (records held up by a broker election arrive seconds late:
                               # not tc-session's own lag, which it sheds for by default)
                               "--stats-json", str(self.tmp / f"session-{tag}-{k}.json"),
                               "--send"], stdin=sub.p.stdout, name=f"tc-session@{host}")
        sub.p.stdout.close()
        return sub, ses

    def wait_subscribed(self, replayers):
        for sub, _ in replayers:
            assert sub.wait_stderr(b"subscribed to stream", 60), sub

    def run_clients(self, sessions=SESSIONS, background=False, rate=50):
        """The two clients (one per online host), in parallel, at most ``rate`` requests/s
        each (160 requests: ~3 s, so that what the tests break happens mid-run); their
        JSON results."""
        ps = [self.lab.popen("client", [h.PY, CLIENT, "--server", f"{srv}:{h.PORT}",
                                        "--sessions", str(sessions), "--requests", "3",
                                        "--parallel", "4", "--rate", str(rate)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for srv in (self.lab.online_cli_ip, ON2_CLI_IP)]
        if background:
            return ps
        return self.client_results(ps)

    @staticmethod
    def client_results(ps):
        out = []
        for p in ps:
            stdout, stderr = p.communicate(timeout=120)
            lines = stdout.strip().splitlines()
            assert lines, f"client printed nothing: {stderr[-2000:]}"
            res = json.loads(lines[-1])
            assert res["n_errors"] == 0 and res["answers"] == res["requests"], res
            out.append(res)
        return out

    def stop_publishers(self, pubs):
        for cap, pub in pubs:
            cap.stop(timeout=5)
        for cap, pub in pubs:
            assert pub.wait(30) == 0, pub

    def wait_caught_up(self, stream, timeout=60.0):
        """Until the three live consumers have nothing pending or unacknowledged (asked
        from the online host with nats-py): the replay has caught up with what was stored.
        A consumer whose leader was on a killed node has none for some seconds."""
        script = CAUGHT_UP.format(urls=self.urls.split(","), user=USER, password=PASSWORD,
                                  stream=f"TC_{stream.upper()}", timeout=timeout)
        r = self.lab.run("online", [h.PY, "-c", script], capture_output=True, text=True,
                         timeout=timeout + 30, env=tool_env())
        assert r.returncode == 0, f"not caught up: {r.stdout[-1500:]} {r.stderr[-1500:]}"

    def stop_replayers(self, replayers):
        """SIGTERM to each tc-subscribe (exit 0, all acknowledged); tc-session drains."""
        for sub, _ in replayers:
            sub.stop(timeout=10)
        for sub, ses in replayers:
            assert sub.p.returncode == 0, sub
            assert ses.wait(40) == 0, ses

    def session_stats(self, tag):
        return [json.loads((self.tmp / f"session-{tag}-{k}.json").read_text())
                for k in range(3)]

    def diagnostics(self):
        return "\n".join([*(repr(p) for p in self.procs),
                          *(f"{n}: {node.log_tail(1500)}" for n, node in self.nodes.items())])

    def close(self):
        for p in reversed(self.procs):
            p.stop(timeout=5)
        for node in self.nodes.values():
            node.stop()


@pytest.fixture
def fleet(lab, tmp_path):
    natskit.nats_server_binary()
    f = Fleet(lab, tmp_path)
    try:
        yield f
    finally:
        f.close()


def start_online_servers(fleet, tag):
    dirs = {host: fleet.tmp / f"{tag}-{host}" for host in ("online", "on2")}
    for host, d in dirs.items():
        h.start_recording_server(fleet.lab, host, d)
    return dirs


def online_streams(dirs, skip=0):
    """What the online servers received, as client streams (after the first ``skip``
    connections each accepted)."""
    out = []
    for d in dirs.values():
        out += [h.LoggedStream((c.ip, c.port), c.data) for c in h.logged_streams(d)[skip:]]
    return out


def assert_replayed(fleet, online_dirs, target_dir, stats=None):
    want = online_streams(online_dirs)
    assert len(want) == 2 * SESSIONS, len(want)
    cmp = h.compare_streams(want, h.logged_streams(target_dir), allow_remap=True)
    # every session byte for byte, none twice (an extra connection), none missing
    assert cmp.ok and cmp.identical == len(want), f"{cmp.describe()}\n{fleet.diagnostics()}"
    if stats is not None:
        assert sum(s["sessions"] for s in stats) == len(want), stats
        for s in stats:
            bad = {k: v for k, v in s["outcomes"].items() if v and k != "completed"}
            assert not bad, (s["outcomes"], fleet.diagnostics())
            assert s["sessions"] > 0  # each replay host had its share


def live_run(fleet, stream, tag, during=None):
    """Online servers, publishers, three replayers, the clients; ``during(clients)`` runs
    while the clients do. Returns (online dirs, target dir, session stats, replay times)."""
    online = start_online_servers(fleet, tag)
    target = fleet.tmp / f"{tag}-target"
    srv = h.start_recording_server(fleet.lab, "target", target)
    pubs = fleet.start_publishers(stream)
    replayers = [fleet.start_replayer(k, stream, tag) for k in range(3)]
    fleet.wait_subscribed(replayers)
    t0 = time.time()
    clients = fleet.run_clients(background=True)
    extra = during(replayers) if during else None
    fleet.client_results(clients)
    fleet.stop_publishers(pubs)
    t1 = time.time()
    fleet.wait_caught_up(stream)
    h.wait_settled(target, quiet=2.0, timeout=60)
    fleet.stop_replayers(extra or replayers)
    fleet.lab.stop(srv)
    return online, target, t0, t1


def test_live_fleet_every_session_once_byte_exact(fleet):
    online, target, _, _ = live_run(fleet, "live", "live")
    assert_replayed(fleet, online, target, fleet.session_stats("live"))
    for host in ("online", "on2"):
        pub = json.loads((fleet.tmp / f"pub-{host}.json").read_text())
        assert pub["exit_status"] == 0 and pub["records"] > 0 and pub["partitions"] == 3, pub


def test_a_broker_node_killed_and_restarted_mid_run(fleet):
    def kill_a_node(replayers):
        time.sleep(1.0)
        node = fleet.nodes["n1"]
        node.stop(signal.SIGKILL)
        time.sleep(2.0)
        node.start(timeout=20)
        return None

    online, target, _, _ = live_run(fleet, "nodekill", "nodekill", during=kill_a_node)
    assert_replayed(fleet, online, target, fleet.session_stats("nodekill"))


def test_a_replay_host_killed_and_restarted_mid_run(fleet):
    """r1's pipeline dies (SIGKILL) while sessions are open; a new one takes its partition
    (the durable consumer) and its block of ports. The sessions open at the kill end with
    an outcome in the new tc-session; every session after the restart completes."""
    stream, tag = "hostkill", "hostkill"
    online = start_online_servers(fleet, tag)
    target = fleet.tmp / f"{tag}-target"
    srv = h.start_recording_server(fleet.lab, "target", target)
    pubs = fleet.start_publishers(stream)
    replayers = [fleet.start_replayer(k, stream, tag) for k in range(3)]
    fleet.wait_subscribed(replayers)
    clients = fleet.run_clients(background=True)
    time.sleep(1.0)
    sub, ses = replayers[1]
    sub.stop(signal.SIGKILL)
    ses.stop(signal.SIGKILL)
    time.sleep(1.0)
    # the replacement takes another block of ports: the target still holds the
    # connections the dead one left open (nobody will close them for it)
    replayers[1] = fleet.start_replayer(1, stream, tag + "-restarted", block=4)
    fleet.wait_subscribed(replayers[1:2])
    fleet.client_results(clients)
    fleet.wait_caught_up(stream)  # (the dead one's unacknowledged messages, redelivered)
    h.wait_settled(target, quiet=2.0, timeout=60)
    before = len(h.logged_streams(target))
    fleet.run_clients()  # the sessions after the restart (the same requests as before)
    fleet.stop_publishers(pubs)
    fleet.wait_caught_up(stream)
    h.wait_settled(target, quiet=2.0, timeout=60)
    fleet.stop_replayers(replayers)
    fleet.lab.stop(srv)
    later = online_streams(online, skip=SESSIONS)
    assert len(later) == 2 * SESSIONS
    cmp = h.compare_streams(later, h.logged_streams(target)[before:], allow_remap=True)
    assert cmp.ok and cmp.identical == len(later), f"{cmp.describe()}\n{fleet.diagnostics()}"
    restarted = json.loads((fleet.tmp / f"session-{tag}-restarted-1.json").read_text())
    assert restarted["sessions"] > 0
    # every session of the new tc-session ended with an outcome, whatever it was
    assert sum(restarted["outcomes"].values()) == restarted["sessions"], restarted
    for k in (0, 2):  # the others never noticed
        s = json.loads((fleet.tmp / f"session-{tag}-{k}.json").read_text())
        bad = {o: v for o, v in s["outcomes"].items() if v and o != "completed"}
        assert not bad, s["outcomes"]


def test_a_stored_minute_replays_like_the_live_replay(fleet):
    online, live_target, t0, t1 = live_run(fleet, "stored", "stored")
    assert_replayed(fleet, online, live_target)
    # The same 4-tuples again, seconds later: the target must not hold them in TIME_WAIT
    # (a replay of yesterday would not meet them); tcp_max_tw_buckets is per namespace.
    fleet.lab.run("target", ["sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0"], check=True)
    time.sleep(1.0)
    again = fleet.tmp / "stored-again"
    srv = h.start_recording_server(fleet.lab, "target", again)
    replayers = [fleet.start_replayer(k, "stored", "again",
                                      sub_args=["--since", f"@{t0 - 0.5}",
                                                "--until", f"@{t1}"])
                 for k in range(3)]
    for sub, ses in replayers:  # they end by themselves at --until
        assert sub.wait(60) == 0, sub
        assert ses.wait(60) == 0, ses
    h.wait_settled(again, quiet=1.0, timeout=30)
    fleet.lab.stop(srv)
    cmp = h.compare_logs(live_target, again)  # same ports: the same -f blocks
    assert cmp.ok and cmp.identical == 2 * SESSIONS, f"{cmp.describe()}\n{fleet.diagnostics()}"
    assert_replayed(fleet, online, again, fleet.session_stats("again"))


def test_replies_through_the_broker_reach_their_port_block(lab, tmp_path):
    """The replies' broker route (tcpcopy(7), FLEET): the assistant publishes tc-intercept's
    fb records by port block (tc-publish --by-port-block 2); the replay host of block 1
    subscribes to its partition into its own tc-feedback, and its tc-session -f 1/2 gets
    its sessions' replies from there. One broker node, ~50 sessions: every session
    completed, byte for byte."""
    natskit.nats_server_binary()
    lab.add_host("n0", NODES["n0"], NODES["n0"].replace("10.200.1.", "fd00:200:1::"))
    password = tmp_path / "nats.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    node = natskit.NatsServer(tmp_path, "n0", ip=NODES["n0"],
                              auth={"user": USER, "password": PASSWORD}, lab=lab, host="n0")
    node.start(timeout=20)
    broker = ["-s", node.url, "--user", USER, "--password-file", str(password),
              "--stream", "replies", "--retry-for", "30s"]
    procs = []

    def proc(host, argv, **kw):
        p = h.Proc(lab, host, argv, env=tool_env(), **kw)
        procs.append(p)
        return p

    try:
        online_dir, target_dir = tmp_path / "online", tmp_path / "target"
        h.start_recording_server(lab, "online", online_dir)
        srv = h.start_recording_server(lab, "target", target_dir)
        ic = proc("assistant", [tool_path("tc-intercept"), lab.assist_if, "-F",
                                f"tcp and src port {h.PORT}"], stdout=subprocess.PIPE)
        pub = proc("assistant", [tool_path("tc-publish"), "-v", *broker, "--by-port-block",
                                 "2", "--stats-json", str(tmp_path / "pub.json")],
                   stdin=ic.p.stdout)
        ic.p.stdout.close()
        assert pub.wait_stderr(b"publishing to stream", 40), pub
        sock = tmp_path / "fb.sock"
        sub = proc("online", [tool_path("tc-subscribe"), "-v", *broker, "-p", "1/2",
                              "--stats-json", str(tmp_path / "sub.json")],
                   stdout=subprocess.PIPE)
        fb = proc("online", [tool_path("tc-feedback"), "--listen", f"unix:{sock}"],
                  stdin=sub.p.stdout)
        sub.p.stdout.close()
        assert sub.wait_stderr(b"subscribed to stream", 40), sub
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        cap = proc("online", [tool_path("tc-capture"), "-v", lab.online_cli_if,
                              f"tcp dst port {h.PORT}"], stdout=subprocess.PIPE)
        ses = proc("online", [tool_path("tc-session"), "--target",
                              f"{lab.target_ip}:{h.PORT}", "-f", "1/2", "--feedback",
                              f"unix:{sock}", "--drain", "10", "--send", "--stats-json",
                              str(tmp_path / "session.json")], stdin=cap.p.stdout)
        cap.p.stdout.close()
        assert cap.wait_stderr(b"capturing on", 20), cap
        c = lab.popen("client", [h.PY, CLIENT, "--server", f"{lab.online_cli_ip}:{h.PORT}",
                                 "--sessions", "50", "--requests", "3", "--parallel", "4",
                                 "--rate", "50"], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
        out, err = c.communicate(timeout=120)
        res = json.loads(out.strip().splitlines()[-1])
        assert res["n_errors"] == 0 and res["answers"] == res["requests"], (res, err[-1500:])
        h.wait_settled(target_dir, quiet=2.0, timeout=60)
        cap.stop(timeout=5)
        assert ses.wait(40) == 0, ses
        lab.stop(srv)
        cmp = h.compare_logs(online_dir, target_dir, allow_remap=True)
        assert cmp.ok and cmp.identical == 50, cmp.describe()
        st = json.loads((tmp_path / "session.json").read_text())
        assert st["sessions"] == 50, st
        assert {k: v for k, v in st["outcomes"].items() if v} == {"completed": 50}, st
        sub.stop(timeout=10)
        ic.stop(timeout=5)
        assert pub.wait(30) == 0, pub
        published = json.loads((tmp_path / "pub.json").read_text())
        written = json.loads((tmp_path / "sub.json").read_text())
        # the replies went through the broker: block 1's are there, and only they reach
        # block 1's subscriber (the published count includes the other block's, if any)
        assert published["partitions"] == 2 and 0 < written["records"] <= published["records"]
    finally:
        for p in reversed(procs):
            p.stop(timeout=5)
        node.stop()
