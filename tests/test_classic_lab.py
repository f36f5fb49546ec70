"""The classic protocol in the netns lab, with real servers: tc-session --feedback
classic:ASSISTANT:36524 replays through tc-intercept | tc-feedback --classic (--allow the
online host), across hosts over TCP, as an existing tcpcopy would reach it and as
tc-session reaches an existing intercept. Both of our ends meet here; the byte layouts are
test_classic.py's (fake peers from the specification).

online:    tc-readpcap cap.pcap | tc-session --feedback classic:ASSIST:36524 | tc-pace | tc-emit
           (live: tc-capture cli0 | tc-session ... while real clients run)
assistant: tc-intercept lan0 -F 'tcp and src port P' | tc-feedback --classic tcp::36524
           --allow ONLINE
"""

import pytest

import replay_harness as h
from test_live_e2e import assert_mirrored, assert_pipeline_ok, live_http
from test_replay_e2e import assert_identical, completed, failed, replay_ok

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("scenario", ["keepalive", "concurrent", "bigbody"])
def test_offline_replay_through_classic_feedback(lab, tmp_path, scenario):
    args, server_kw = h.SCENARIOS[scenario]
    rec = h.record(lab, tmp_path / "rec", scenario, *args, server_kw=server_kw)
    assert rec.client["n_errors"] == 0, rec.client
    n = rec.client["conns"]
    rep = h.replay(lab, rec.pcap, tmp_path / "replay", server_kw=server_kw, timeout=90,
                   feedback="classic")
    replay_ok(rep)
    assert_identical(rec, rep, n)
    assert completed(rep.stats) == n and failed(rep.stats) == 0, rep.stats
    fb = rep.procs["tc-feedback"].stderr
    assert "1 classic clients" in fb and f"{n} adds" in fb, fb


def test_live_http_through_classic_feedback(lab, tmp_path):
    sessions = 100
    res, live, onl, tgt = live_http(lab, tmp_path, ["--sessions", sessions, "--requests", 3,
                                                    "--post-every", 10], feedback="classic")
    assert_pipeline_ok(live)
    assert_mirrored(lab, res, live, onl, tgt, sessions // 2 * 3 + sessions // 2)
    assert live.stats["sessions"] == sessions, live.stats
    fb = live.procs["tc-feedback"].stderr
    assert "1 classic clients" in fb and f"{sessions} adds" in fb, fb


def test_classic_peer_not_in_allow_is_refused(lab, tmp_path):
    """tc-feedback --classic --allow ONLINE: the target host (not allowed) is refused;
    a tc-session there is turned away."""
    procs, addr = h.start_feedback_tcp(lab, h.PORT, classic=True)
    try:
        r = lab.run("target", [h.tool("tc-session"), "--target", f"{lab.target_ip}:{h.PORT}",
                               "--feedback", addr, "--feedback-retry", "0"],
                    input=b"", capture_output=True, timeout=30, env=h.tool_env())
    finally:
        procs["tc-intercept"].stop()
        procs["tc-feedback"].stop(timeout=8)
    assert "not in --allow" in procs["tc-feedback"].stderr, procs["tc-feedback"].stderr
