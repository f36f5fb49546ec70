"""The namespace lab: reachability, TCPCopy routing of the target's replies, teardown."""

import errno
import os
import secrets
import socket
import subprocess
import sys

import pytest

from tc import REPO, tool_env
from tcpcopylib.lab import Lab, cleanup_stale, netns_list

pytestmark = pytest.mark.netns

FETCH = ("import sys, urllib.request; "
         "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())")


def fetch(lab, host, url):
    return lab.run(host, [sys.executable, "-c", FETCH, url], capture_output=True, text=True,
                   timeout=10)


def test_client_reaches_online_v4_and_v6(lab, tmp_path):
    (tmp_path / "index.html").write_text("hello from online\n")
    lab.start_server("online", port=8080, directory=tmp_path)
    for url in (f"http://{lab.online_cli_ip}:8080/", f"http://[{lab.online_cli_ip6}]:8080/"):
        r = fetch(lab, "client", url)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "hello from online"


def test_online_reaches_target(lab, tmp_path):
    (tmp_path / "index.html").write_text("target\n")
    lab.start_server("target", port=8080, directory=tmp_path)
    for url in (f"http://{lab.target_ip}:8080/", f"http://[{lab.target_ip6}]:8080/"):
        r = fetch(lab, "online", url)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "target"


def test_client_cannot_reach_lan(lab):
    """online forwards nothing: the client has no path to the target."""
    with lab.enter("client"):
        s = socket.socket()
    s.settimeout(1)
    with s, pytest.raises(OSError) as ei:
        s.connect((lab.target_ip, 8080))
    assert ei.value.errno == errno.ENETUNREACH


def _connect_from_target(lab, family, dst):
    """A TCP connect from the target to a client address: it must never complete."""
    with lab.enter("target"):
        s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(0.6)
    try:
        s.connect((dst, 8080))
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
    return "connected"


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_target_replies_die_on_assistant(lab, v6):
    lab.start_server("client", port=8080)  # something to answer, if packets got there
    client = lab.client_ip6 if v6 else lab.client_ip
    bpf = f"tcp and host {client}"
    with lab.sniff("assistant", lab.assist_if, bpf) as asn, \
            lab.sniff("client", lab.client_if, bpf) as cli, \
            lab.sniff("online", lab.online_if, bpf) as onl:
        res = _connect_from_target(lab, socket.AF_INET6 if v6 else socket.AF_INET, client)
        assert res == "timeout"
        got_asn = asn.frames(0.1)
        assert got_asn, "the target's SYN did not reach the assistant"
        assert all(ptype == 0 for ptype, _ in got_asn)  # addressed to the assistant's MAC
        assert cli.frames() == []
        assert onl.frames() == []


@pytest.mark.parametrize("lab", [{"without_target_route": True}], indirect=True)
def test_without_target_route(lab):
    assert lab.route_ok() == []
    assert _connect_from_target(lab, socket.AF_INET, lab.client_ip) == "ENETUNREACH"
    assert _connect_from_target(lab, socket.AF_INET6, lab.client_ip6) == "ENETUNREACH"


def test_invariants_and_offloads(lab):
    assert lab.route_ok() == []
    out = lab.run("online", ["ethtool", "-k", lab.online_if], capture_output=True,
                  text=True).stdout
    assert "tx-checksumming: off" in out
    assert "tcp-segmentation-offload: off" in out


@pytest.mark.parametrize("lab", [{"offloads": True}], indirect=True)
def test_offloads_kept(lab):
    out = lab.run("online", ["ethtool", "-k", lab.online_if], capture_output=True,
                  text=True).stdout
    assert "tx-checksumming: on" in out


def test_teardown_removes_everything_even_after_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with Lab() as lab:
            names = lab.namespaces
            p = lab.start_server("online", port=8080, directory=tmp_path)
            assert set(names) <= set(netns_list())
            raise RuntimeError("boom")
    assert not set(names) & set(netns_list())
    assert p.poll() is not None


def test_parallel_labs_do_not_clash():
    with Lab() as a, Lab() as b:
        assert not set(a.namespaces) & set(b.namespaces)
        assert a.route_ok() == [] and b.route_ok() == []
    assert not (set(a.namespaces) | set(b.namespaces)) & set(netns_list())


def test_cleanup_stale_removes_dead_owners():
    # a lab name whose owner pid cannot be alive (above the kernel's largest pid, 2**22),
    # unique to this run: concurrent runs each make their own
    dead = f"tcl{2**22 + os.getpid()}x{secrets.randbelow(10**9)}-client"
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        with Lab() as mine:
            assert dead not in netns_list()  # up() removed it
            # Any concurrent run's Lab.up() also removes stale namespaces, ours included: if
            # one takes it first, make it again (that run's cleanup worked; ours must too).
            for _ in range(20):
                subprocess.run(["ip", "netns", "add", dead], check=True)
                removed = cleanup_stale()
                if dead in removed:
                    break
                assert dead not in netns_list(), "cleanup_stale() left a dead owner's namespace"
            assert dead in removed and dead not in netns_list()
            assert set(mine.namespaces) <= set(netns_list())  # our pid is alive
    finally:
        subprocess.run(["ip", "netns", "del", dead], capture_output=True)
    assert dead not in netns_list()


def test_cli_up_status_down():
    name = f"tclcli{os.getpid()}"
    cmd = [sys.executable, "-m", "tcpcopylib.lab"]
    env = tool_env()
    try:
        r = subprocess.run([*cmd, "up", "--name", name], capture_output=True, text=True, timeout=30,
                           cwd=REPO, env=env)
        assert r.returncode == 0, r.stderr
        assert f"{name}-target" in netns_list()
        r = subprocess.run([*cmd, "status", "--name", name], capture_output=True, text=True,
                           env=env)
        assert "via 10.200.1.3" in r.stdout
        r = subprocess.run([*cmd, "up", "--name", name], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and "exist already" in r.stderr
    finally:
        r = subprocess.run([*cmd, "down", "--name", name], capture_output=True, text=True, env=env)
    assert r.returncode == 0
    assert not [n for n in netns_list() if n.startswith(f"{name}-")]
