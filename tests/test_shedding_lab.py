"""Shedding in the lab: the live pipeline past saturation keeps every replayed session whole.

online:    tc-capture cli0 | tc-session | tc-pace | tc-emit, with tc-session held to 2 % of
           a CPU while the real clients run (tests/throttle.py: SIGSTOP/SIGCONT in turns,
           a test knob), far below what the clients send
assistant: tc-intercept | tc-feedback;  target: the recording server

The tools run with their defaults. Each session the online server accepted must either
have reached the target byte for byte or be absent from it, counted as shed (by
tc-capture or tc-session, with a reason); none partial, none lost without a count, no
capture drop, and the real clients notice nothing. (bench/bench_shed.py prints the same at
several loads, and without shedding.)
"""

import json

import pytest
import replay_harness as h
from throttle import Throttle

pytestmark = pytest.mark.netns


def test_overloaded_live_pipeline_sheds_whole_sessions_and_replays_the_rest_exactly(
        lab, tmp_path):
    onl, tgt = tmp_path / "online", tmp_path / "target"
    cap_json = tmp_path / "capture.json"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    # --drain 30: at the end tc-session may still be catching up (it ends once settled).
    # -B 131072: libpcap's ring is made of 256 KiB blocks, each handed over after 1 ms, so
    # at a few thousand packets/s the default 32 MiB (128 blocks) lasts only ~130 ms of
    # tc-capture not being scheduled; on a busy 2-core machine that happens, and the
    # kernel drops packets that no shedding could save (see tc-capture(8), -B).
    live = h.start_live(lab, tmp_path / "live",
                        capture_args=["--stats-json", cap_json, "-B", 131072],
                        session_args=["--drain", 30])
    try:
        with Throttle(live.procs["tc-session"].pid, share=0.02):
            r = lab.run("client", [h.PY, h.SERVERS / "live_http_client.py", "--server",
                                   f"{lab.online_cli_ip}:{h.PORT}", "--rate", 1500,
                                   "--duration", 4, "--parallel", 16, "--requests", 2],
                        capture_output=True, text=True, timeout=120)
        client = json.loads(r.stdout.strip().splitlines()[-1])
        h.wait_settled(tgt, quiet=2.0, timeout=120)  # the backlog, at full speed now
    finally:
        live.stop()
    assert client["n_errors"] == 0, client
    cap = json.loads(cap_json.read_text())
    st = live.stats
    assert st is not None, live.diagnostics()
    shed = cap["shed_sessions"] + st["outcomes"]["shed"]
    cmp = h.compare_logs(onl, tgt)
    online = len(h.logged_streams(onl))
    info = (f"{cmp.describe()}\ncapture: {cap}\nsession: {st['summary']} "
            f"{st['shed_reasons']}")
    # overloaded: sessions were shed, others replayed
    assert shed > 0 and cmp.identical > 0, info
    # every session either whole at the target or absent from it, and each absent one shed
    assert not cmp.different and not cmp.extra and not cmp.remapped, info
    assert cap["kernel_drops"] == 0, info
    assert len(cmp.missing) == shed == online - cmp.identical, info
    # counted by reason, in both tools
    assert sum(cap["shed_reasons"].values()) == cap["shed_sessions"], info
    assert sum(st["shed_reasons"].values()) == st["outcomes"]["shed"], info
    failed = {k: v for k, v in st["outcomes"].items()
              if v and k not in ("completed", "reconnected", "shed")}
    assert not failed, info
