"""python3 -m tcpcopylib.demo: the one-command demo, shortened, checked against the servers'
access logs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tc import REPO, tool_env
from tcpcopylib.demo import GOAL_PCT, format_report, goal

PCAP = REPO / "examples" / "http-lab.pcap"


def demo(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcpcopylib.demo", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
                          env=tool_env())


def diag(r, work: Path) -> str:
    """The demo's output and its tools' stderr, for assertion messages."""
    logs = "".join(f"\n--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                   for f in sorted(Path(work).glob("*.stderr")))
    return f"rc={r.returncode}\n{r.stdout}\n{r.stderr}{logs}"


def log_lines(path) -> int:
    """Request lines in an access log (nginx's and http.server's both quote the request line
    and follow it with the status)."""
    return len(re.findall(r'"[A-Z]+ \S+ HTTP/[\d.]+" \d{3}', Path(path).read_text()))


def lab_namespaces(name) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(name + "-")]


def check_report(rep, work: Path):
    s = rep["sessions"]
    assert s["replayed"] > 0 and s["completion_pct"] >= GOAL_PCT, s
    assert s["completed"] + sum(s["failed"].values()) + sum(s["other"].values()) == s["seen"]
    # the report's counts are the target server's own (its access log)
    assert rep["target"]["requests"] == log_lines(work / "target-server" / "access.log")
    assert rep["target"]["requests"] == rep["online"]["requests"]
    assert rep["goal_met"] is True
    assert rep["namespaces_left"] == [] and lab_namespaces(rep["lab"]) == []
    assert rep["duration_s"] < 120


@pytest.mark.netns
@pytest.mark.parametrize("server,duration,rate", [("nginx", 5, 100), ("python", 2, 50)])
def test_live_demo(tmp_path, server, duration, rate):
    work, js = tmp_path / "work", tmp_path / "report.json"
    r = demo("--duration", duration, "--rate", rate, "--server", server, "--json", js,
             "--workdir", work)
    assert r.returncode == 0, diag(r, work)
    rep = json.loads(js.read_text())
    check_report(rep, work)
    assert rep["mode"] == "live"
    assert rep["online"]["requests"] == log_lines(work / "online-server" / "access.log")
    c = rep["client"]
    assert rep["server"] == server
    assert c["errors"] == 0 and c["ok"] == rep["online"]["requests"] >= 0.9 * duration * rate
    assert 0 < c["keepalive_connections"] < c["connections"]  # both kinds of connection
    assert rep["sessions"]["seen"] == c["connections"]
    # the target saw the original client address
    assert rep["target"]["clients"] == {"10.200.9.2": rep["target"]["requests"]}
    assert rep["target"]["statuses"] == {"200": rep["target"]["requests"]}
    # the printed report shows the JSON report's session counts and a completion that meets
    # the goal (the "(goal >= ...)" text alone is printed in every report)
    m = re.search(r"^tc-session +(\d+) sessions seen, (\d+) replayed, (\d+) completed = "
                  r"([\d.]+) % \(goal >= ([\d.]+) %\)", r.stdout, re.M)
    assert m, r.stdout
    s = rep["sessions"]
    assert [int(x) for x in m.groups()[:3]] == [s["seen"], s["replayed"], s["completed"]]
    assert float(m.group(5)) == GOAL_PCT
    shown = float(m.group(4))
    assert shown >= GOAL_PCT and abs(shown - s["completion_pct"]) < 0.011, (shown, s)
    assert "result         OK" in r.stdout


@pytest.mark.netns
def test_pcap_demo(tmp_path):
    work, js = tmp_path / "work", tmp_path / "report.json"
    r = demo("--pcap", PCAP, "--json", js, "--workdir", work)
    assert r.returncode == 0, diag(r, work)
    rep = json.loads(js.read_text())
    check_report(rep, work)
    assert rep["mode"] == "pcap" and rep["online"]["requests"] == 300
    assert "tc-readpcap" in r.stdout


@pytest.mark.netns
def test_sigterm_tears_everything_down(tmp_path):
    work = tmp_path / "work"
    p = subprocess.Popen([sys.executable, "-m", "tcpcopylib.demo", "--duration", "60",
                          "--rate", "50", "--workdir", str(work)], cwd=str(REPO),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (work / "tc-emit.stderr").exists():  # the pipeline is starting
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)  # the load is running
        name = f"tcl{p.pid}x1"
        assert len(lab_namespaces(name)) == 5
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert lab_namespaces(name) == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(work) not in ps  # no tool of this demo (their arguments name the workdir)


def test_usage_errors(tmp_path):
    assert demo("--duration", 0).returncode == 2
    assert demo("--pcap", tmp_path / "nope.pcap").returncode in (66, 77)
    assert demo("--pcap", PCAP, "--record", tmp_path / "x.pcap").returncode == 2


def _report(completed, seen, target, online):
    return {"mode": "live", "duration_s": 9.0, "namespaces_left": [],
            "online": {"requests": online}, "target": {"requests": target, "clients": {}},
            "sessions": {"seen": seen, "replayed": seen, "completed": completed,
                         "failed": {"no_synack": seen - completed} if seen > completed else {},
                         "other": {}, "active_at_exit": 0, "retransmits": 0,
                         "reconnections": 0,
                         "completion_pct": round(100.0 * completed / seen, 3)}}


def test_goal_and_report_text():
    ok = _report(1000, 1000, 2000, 2000)
    assert goal(ok) == [] and "result         OK" in format_report(ok)
    low = _report(998, 1000, 2000, 2000)
    assert goal(low) and "MISSED: completion 99.800 %" in format_report(low)
    assert "no_synack 2" in format_report(low)
    edge = _report(9989, 9999, 2000, 2000)  # 99.8999 % is not shown as 99.90 %
    assert goal(edge) and "completed = 99.89 %" in format_report(edge)
    short = _report(1000, 1000, 1999, 2000)
    assert goal(short) == ["target served 1999 requests, online 2000"]


def test_pcap_port_and_requests_any_link(tmp_path):
    """--pcap finds the capture's server port and counts its HTTP requests (cooked v2 link)."""
    from capfiles import A4, B4, TS0, pcap, sll2

    from tcpcopylib.demo import pcap_requests, pcap_server_port
    from tcpcopylib.packet import build_tcp

    pkts = [build_tcp(A4, B4, 40001, 80, 1, 0, 0x02),             # SYN to 80
            build_tcp(A4, B4, 40001, 80, 2, 9, 0x18, payload=b"GET / HTTP/1.1\r\n\r\n"),
            build_tcp(B4, A4, 80, 40001, 9, 20, 0x18, payload=b"HTTP/1.1 200 OK\r\n\r\n"),
            build_tcp(A4, B4, 40002, 8080, 1, 0, 0x18, payload=b"POST /x HTTP/1.1\r\n\r\n")]
    f = tmp_path / "c.pcap"
    f.write_bytes(pcap([(TS0 + i * 10**9, sll2(0x0800, p)) for i, p in enumerate(pkts)],
                       linktype=276))
    assert pcap_server_port(f) == 80
    assert pcap_requests(f, 80) == {"requests": 1, "clients": 1, "span_s": 1.0}
    assert pcap_requests(f, 8080)["requests"] == 1


def test_requirements_checked_like_tc_doctor():
    """What the demo needs, checked with tc-doctor's check_programs: without ethtool it goes
    on with the kernel's veth offloads and says so; without ip/ss/sysctl it stops (69)."""
    import argparse

    from tcpcopylib.demo import DemoError, requirements

    live = argparse.Namespace(record=None)
    everything = {p: f"/usr/bin/{p}" for p in ("ip", "ss", "sysctl", "ethtool", "tcpdump")}
    assert requirements(live, which=everything.get) == ({"offloads": False}, [])
    no_ethtool = dict(everything, ethtool=None)
    kw, notes = requirements(live, which=no_ethtool.get)
    assert kw == {"offloads": True}
    assert len(notes) == 1 and notes[0].startswith("ethtool not found") and "kernel" in notes[0]
    with pytest.raises(DemoError) as e:
        requirements(live, which=dict(everything, ss=None).get)
    assert "ss not found" in str(e.value) and e.value.code == 69
    with pytest.raises(DemoError, match="tcpdump not found"):
        requirements(argparse.Namespace(record="x.pcap"),
                     which=dict(everything, tcpdump=None).get)


def _path_without(tmp_path, *hidden) -> str:
    """A PATH of one directory with a link to every program on this PATH but `hidden`
    (a fresh machine without them, as far as the demo can tell)."""
    d = tmp_path / "path"
    d.mkdir()
    for dirname in os.environ["PATH"].split(":"):
        if not os.path.isdir(dirname):
            continue
        for name in os.listdir(dirname):
            src = os.path.join(dirname, name)
            if name not in hidden and not (d / name).exists() and os.access(src, os.X_OK):
                (d / name).symlink_to(src)
    return str(d)


@pytest.mark.netns
def test_quick_start_without_ethtool(tmp_path):
    """The README's quick start on a machine without ethtool: the demo runs, with the
    kernel's veth offloads, says so, and meets its goal."""
    work, js = tmp_path / "work", tmp_path / "report.json"
    env = tool_env(PATH=_path_without(tmp_path, "ethtool"))
    probe = subprocess.run(["sh", "-c", "command -v ethtool"], env=env, capture_output=True)
    assert probe.returncode != 0  # really hidden
    r = subprocess.run([sys.executable, "-m", "tcpcopylib.demo", "--duration", "2", "--rate",
                        "50", "--server", "python", "--json", str(js), "--workdir", str(work)],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert r.returncode == 0, diag(r, work)
    assert "ethtool not found" in r.stdout and "kernel" in r.stdout
    assert "veth offloads: kernel default (no ethtool)" in r.stdout
    rep = json.loads(js.read_text())
    assert rep["offloads"] == "kernel default"
    check_report(rep, work)
