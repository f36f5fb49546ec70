"""tc-doctor in the namespace lab: a correct lab is all ok; each misconfiguration made on
purpose is found on the right role with the right fix; --fix --yes makes the same run clean
and a replay then completes."""

from __future__ import annotations

import json
import time

import pytest

import replay_harness as h
from tc import REPO

pytestmark = pytest.mark.netns

PCAP = REPO / "examples" / "http-lab.pcap"
PORT = 8080


def doctor(lab, role, *extra, fb=None, assistant=None, probe=False, v6=False):
    """Run tc-doctor --json in the role's namespace: (exit status, report, seconds)."""
    target = f"[{lab.target_ip6}]:{PORT}" if v6 else f"{lab.target_ip}:{PORT}"
    argv = [h.tool("tc-doctor"), "--role", role, "--json", "--target", target,
            "--client-net", lab.client_net6 if v6 else lab.client_net,
            "--assistant", assistant or (lab.assist_ip6 if v6 else lab.assist_ip)]
    if role == "online":
        argv += ["--iface", lab.online_cli_if]
    if fb and role in ("online", "assistant"):
        argv += ["--feedback", fb if role == "online" else f"tcp:127.0.0.1:{h.FEEDBACK_PORT}"]
    if probe:
        argv.append("--probe")
    t = time.monotonic()
    r = lab.run(role, [*argv, *extra], capture_output=True, text=True, env=h.tool_env(),
                timeout=60)
    took = time.monotonic() - t
    assert r.stdout, f"tc-doctor --role {role}: rc={r.returncode} {r.stderr}"
    return r.returncode, json.loads(r.stdout), took


def verdicts(report) -> dict:
    return {c["check"]: c["verdict"] for c in report["checks"]}


def failing(report) -> dict:
    return {c["check"]: c for c in report["checks"] if c["verdict"] in ("warn", "fail")}


@pytest.fixture
def keyed(tmp_path, monkeypatch):
    """A shared feedback key in $TC_FEEDBACK_KEY_FILE, as an operator would set it on every
    host: tc-feedback, tc-session and tc-doctor read it from there (the lab's feedback runs
    over TCP beyond loopback, where tc-doctor warns about a channel without a key)."""
    key = tmp_path / "feedback.key"
    key.write_text("lab-" + "k" * 40 + "\n")
    key.chmod(0o600)
    monkeypatch.setenv("TC_FEEDBACK_KEY_FILE", str(key))
    return key


@pytest.fixture
def setup(lab, keyed):
    """The lab with a server on the target and tc-intercept | tc-feedback on the assistant."""
    lab.start_server("target", port=PORT)
    procs, fb = h.start_feedback_tcp(lab, PORT)
    try:
        yield lab, fb
    finally:
        for p in procs.values():
            p.stop()


def test_correct_lab_is_all_ok_in_under_5_s(setup):
    lab, fb = setup
    total, reports = 0.0, {}
    for role in ("target", "assistant", "online"):
        rc, rep, took = doctor(lab, role, fb=fb, probe=role == "online")
        total += took
        reports[role] = rep
        assert rc == 0 and rep["verdict"] == "ok", rep
        assert set(verdicts(rep).values()) == {"ok"}, rep   # nothing skipped either
        if role != "target":
            assert "key proved" in {c["check"]: c for c in rep["checks"]}["feedback"]["seen"]
    assert set(verdicts(reports["online"])) >= {"offloads", "firewall", "mtu", "feedback",
                                                "probe"}
    assert set(verdicts(reports["target"])) >= {"route to clients", "rp_filter", "firewall",
                                                "listening", "mtu"}
    assert set(verdicts(reports["assistant"])) >= {"ip_forward", "feedback"}
    assert total < 5.0, f"three tc-doctor runs took {total:.2f} s"


def test_correct_lab_is_all_ok_over_ipv6(setup):
    """The same over IPv6 (ip6tables, ICMPv6 echo for the MTU, a forged IPv6 SYN)."""
    lab, fb = setup
    for role in ("target", "assistant", "online"):
        rc, rep, _ = doctor(lab, role, fb=fb, probe=role == "online", v6=True)
        assert rc == 0 and set(verdicts(rep).values()) == {"ok"}, rep
        assert "fd00:200:" in json.dumps(rep)


def _route_missing(lab):
    lab.run("target", ["ip", "route", "del", lab.client_net], check=True)


def _route_wrong(lab):
    lab.run("target", ["ip", "route", "replace", lab.client_net, "via", lab.online_ip],
            check=True)


def _forwarding(lab):
    lab.run("assistant", ["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)


def _reject(lab):
    lab.run("target", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(PORT), "-j",
                       "REJECT", "--reject-with", "tcp-reset"], check=True)


def _mtu(lab):
    lab.run("assistant", ["ip", "link", "set", "dev", lab.assist_if, "mtu", "1400"],
            check=True)


CASES = {
    # name: (make it, role that finds it, check, the fix it prints)
    "route-missing": (_route_missing, "target", "route to clients",
                      "ip route replace 10.200.9.0/24 via 10.200.1.3"),
    "route-wrong": (_route_wrong, "target", "route to clients",
                    "ip route replace 10.200.9.0/24 via 10.200.1.3"),
    "ip-forward": (_forwarding, "assistant", "ip_forward", "sysctl -w net.ipv4.ip_forward=0"),
    "iptables-reject": (_reject, "target", "firewall",
                        "iptables -t filter -D INPUT -p tcp -m tcp --dport 8080 -j REJECT "
                        "--reject-with tcp-reset"),
    "mtu-mismatch": (_mtu, "target", "mtu",
                     "ip route replace 10.200.9.0/24 via 10.200.1.3 mtu lock"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_misconfiguration_found_on_its_role_and_fixed(setup, case):
    lab, fb = setup
    make, role, check, fix = CASES[case]
    make(lab)
    for r in ("target", "assistant", "online"):
        rc, rep, _ = doctor(lab, r, fb=fb)
        bad = failing(rep)
        if r == role:
            assert rc == 2 and set(bad) == {check}, rep
            assert bad[check]["verdict"] == "fail"
            assert any(f.startswith(fix) for f in bad[check]["fix"]), bad[check]
        else:
            assert rc == 0 and not bad, (r, rep)   # the other roles see nothing wrong
    rc, rep, _ = doctor(lab, role, "--fix", "--yes", fb=fb)
    assert rc == 0 and rep["verdict"] == "ok", rep
    assert [f["check"] for f in rep["fixes"]] == [check] and rep["fixes"][0]["applied"]
    assert any(f["command"].startswith(fix) for f in rep["fixes"])
    rc, rep, _ = doctor(lab, role, fb=fb)   # the same run, now clean
    assert rc == 0 and set(verdicts(rep).values()) == {"ok"}, rep


@pytest.mark.parametrize("case,where", [("route-missing", "no SYN-ACK"),
                                        ("route-wrong", "came back to this host")])
def test_probe_sees_a_bad_route_end_to_end(setup, case, where):
    lab, fb = setup
    CASES[case][0](lab)
    rc, rep, _ = doctor(lab, "online", fb=fb, probe=True)
    assert rc == 2 and set(failing(rep)) == {"probe"}, rep
    assert where in failing(rep)["probe"]["seen"]


def test_probe_reports_a_reset(lab, keyed):
    """Nothing listens on the target port: the probe's SYN is answered with RST, which
    reaches the assistant; the probe says so (and the target's own run warns)."""
    procs, fb = h.start_feedback_tcp(lab, PORT)
    try:
        rc, rep, _ = doctor(lab, "online", fb=fb, probe=True)
        assert rc == 2 and "answered RST" in failing(rep)["probe"]["seen"], rep
        rc, rep, _ = doctor(lab, "target")
        assert rc == 1 and set(failing(rep)) == {"listening"}, rep
    finally:
        for p in procs.values():
            p.stop()


def _second_leg(lab):
    """The target reaches the assistant over a second link (10.200.2.0/24, as1 <-> tg1), and
    routes the clients there; replayed packets still arrive on lan0."""
    lab.run("target", ["ip", "link", "add", "as1", "type", "veth", "peer", "name", "tg1",
                       "netns", lab.ns("assistant")], check=True)
    lab.run("target", ["sh", "-ec", "ip addr add 10.200.2.2/24 dev as1; ip link set as1 up"],
            check=True)
    lab.run("assistant", ["sh", "-ec", "ip addr add 10.200.2.3/24 dev tg1; ip link set tg1 up"],
            check=True)
    lab.run("target", ["ip", "route", "replace", lab.client_net, "via", "10.200.2.3"],
            check=True)


def test_strict_rp_filter_where_it_matters(setup):
    """Strict rp_filter on a target whose route back to the clients leaves by another
    interface than the replayed packets arrive on: found and fixed on the target; where the
    route leaves by the same interface, strict filtering is (rightly) no finding."""
    lab, fb = setup
    lab.run("target", ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"], check=True)
    rc, rep, _ = doctor(lab, "target")
    assert rc == 0 and "in effect: 1" in next(c["seen"] for c in rep["checks"]
                                               if c["check"] == "rp_filter")
    _second_leg(lab)
    rc, rep, _ = doctor(lab, "target", assistant="10.200.2.3")
    bad = failing(rep)
    assert rc == 2 and set(bad) == {"rp_filter"}, rep
    assert "leaves by as1" in bad["rp_filter"]["seen"]
    assert bad["rp_filter"]["fix"] == ["sysctl -w net.ipv4.conf.all.rp_filter=2"]
    # the forged SYN is really dropped: the probe gets no SYN-ACK back at all
    rc, rep, _ = doctor(lab, "online", fb=fb, probe=True)
    assert rc == 2 and set(failing(rep)) == {"probe"}, rep
    rc, rep, _ = doctor(lab, "target", "--fix", "--yes", assistant="10.200.2.3")
    assert rc == 0, rep
    assert lab.sysctl("target", "net.ipv4.conf.all.rp_filter") == "2"
    rc, rep, _ = doctor(lab, "target", assistant="10.200.2.3")
    assert rc == 0 and set(verdicts(rep).values()) == {"ok"}, rep


def test_fix_everything_then_a_replay_completes(lab, tmp_path):
    """Four misconfigurations at once; tc-doctor --fix --yes on the target and the assistant
    repairs them; the example capture then replays with every session completed."""
    srv = h.start_recording_server(lab, "target", tmp_path / "pre", PORT)
    for make in (_route_missing, _forwarding, _reject, _mtu):
        make(lab)
    assert doctor(lab, "target")[0] == 2 and doctor(lab, "assistant")[0] == 2
    for role in ("target", "assistant"):
        rc, rep, _ = doctor(lab, role, "--fix", "--yes")
        assert rc == 0, rep
    for role in ("target", "assistant", "online"):
        assert doctor(lab, role)[0] == 0
    lab.stop(srv)
    rep = h.replay(lab, PCAP, tmp_path / "replay", port=PORT, trace=False)
    assert not rep.timed_out and rep.stats, rep.diagnostics()
    oc = rep.stats["outcomes"]
    done = oc.get("completed", 0) + oc.get("reconnected", 0)
    assert rep.stats["sessions"] > 0 and done == rep.stats["sessions"], (oc,
                                                                        rep.diagnostics())
    assert len(rep.logged()) == rep.stats["sessions"]


def test_runs_without_options_and_skips_what_it_cannot_check(lab):
    r = lab.run("target", [h.tool("tc-doctor"), "--role", "target"], capture_output=True,
                text=True, env=h.tool_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SKIP  route to clients: not checked: give --client-net CIDR" in r.stdout
