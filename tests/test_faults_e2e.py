"""Faults in the lab, in the middle of a replay (issue 14, "Fault tests in the lab").

online:    tc-readpcap cap.pcap | tc-session -vv ... | tc-pace | tc-emit
assistant: tc-intercept lan0 | tc-feedback --listen unix:SOCK
target:    tests/servers/recording_server.py, answering each request after 0.4 s

The recording: 16 one-request connections (the "close" scenario) 0.2 s apart, each
answered by the online server after 0.4 s, so about 10 s of replay with one session
in flight at almost any moment. tc-session -vv says each session's outcome on a line of
its own; every captured session must have exactly one. A fault is made once the target
has logged a few connections:

* the target's server is killed (SIGKILL, a crash) and started again 1.5 s later;
* the path from the target to the assistant is cut for 5 s (the switch port of the
  assistant set down, then up: the target's replies, hence the feedback, are lost).

Nothing may be silent: a session either delivers its whole captured stream to the target
(byte for byte, completed) or ends with a counted failure; the pipeline goes on; the
sessions that begin after the fault is over complete byte-exact.
"""

import re
import signal
import threading
import time

import pytest

import replay_harness as h

pytestmark = pytest.mark.netns

N = 16
TIMEOUT = 150
DELAY = 0.4
_END = re.compile(r"session \d+ (\S+):(\d+)(?: \(as (\S+):(\d+)\))? -> \S+: (\w+)")


def record(lab, tmp_path):
    rec = h.record(lab, tmp_path / "rec", "close", "--conns", N, "--gap", 0.2,
                   server_kw={"delay": DELAY})
    assert rec.client["n_errors"] == 0 and rec.client["answers"] == N, rec.client
    return rec


def replay_in_thread(lab, pcap, workdir, session_args=()):
    """h.replay() in a thread (the caller runs the target's server); returns (thread,
    box) where box["rep"] is the Replay once the thread is done."""
    box = {}

    def run():
        try:
            box["rep"] = h.replay(lab, pcap, workdir, start_target=False, timeout=TIMEOUT,
                                  session_args=["-vv", *session_args])
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def wait_logged(log_dir, n, timeout=60.0, with_data=True):
    """Wait until the recording server in log_dir logged n connections (the n-th with
    data); returns the time (time.time()) it happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(log_dir.glob("*.bin")) if log_dir.exists() else []
        if len(files) >= n and (not with_data or files[n - 1].stat().st_size > 0):
            return time.time()
        time.sleep(0.01)
    raise AssertionError(f"the target never logged {n} connections in {timeout} s")


def finish(t, box):
    t.join(TIMEOUT + 60)
    assert not t.is_alive(), "the replay thread did not end"
    if "error" in box:
        raise box["error"]
    rep = box["rep"]
    assert not rep.timed_out, f"replay did not finish in time\n{rep.diagnostics()}"
    for name in ("tc-readpcap", "tc-session", "tc-pace", "tc-emit"):
        assert rep.rc(name) == 0, f"{name} exited {rep.rc(name)}\n{rep.diagnostics()}"
    assert rep.stats is not None, rep.diagnostics()
    return rep


def outcomes_by_client(rep) -> dict:
    """{(client ip, captured port): [(outcome, (ip, port) as replayed), ...]} from
    tc-session -vv's lines."""
    out = {}
    for m in _END.finditer(rep.procs["tc-session"].stderr):
        ip, port, as_ip, as_port, outcome = m.groups()
        sent = (as_ip, int(as_port)) if as_ip else (ip, int(port))
        out.setdefault((ip, int(port)), []).append((outcome, sent))
    return out


def logged(*dirs):
    """The connections of several recording-server log directories, in order."""
    out = []
    for i, d in enumerate(dirs):
        for c in h.logged_streams(d):
            c.order += i * 1_000_000
            out.append(c)
    return out


def session_times(pcap) -> dict:
    """{(client ip, port as replayed): (first, last packet time)} at the target."""
    out = {}
    for ts, ip in h.pcap_ip_packets(pcap):
        t = h.parse_tcp(ip)
        if t and t[3] == h.PORT:
            k = (h._norm_ip(t[0]), t[2])
            a, _ = out.get(k, (ts, ts))
            out[k] = (a, ts)
    return out


OK = ("completed", "reconnected")


def check_accounting(rec, rep, dirs, t_from, t_to):
    """The checks both faults share. The fault lasted from t_from to t_to (time.time()).
    Returns (comparison, {captured client: outcome}, {"before"|"during"|"after": [client]})."""
    streams = rec.streams()
    keys = sorted((h._norm_ip(s.client[0]), s.client[1]) for s in streams)
    assert len(keys) == N
    st = rep.stats
    ends = outcomes_by_client(rep)
    assert st["sessions"] == N and sum(st["outcomes"].values()) == N, (
        f"{st}\n{ends}\n{rep.diagnostics()}")
    assert sorted(ends) == keys and all(len(v) == 1 for v in ends.values()), (
        f"not one outcome line per session: {ends}\n{rep.diagnostics()}")
    sent = {k: v[0][1] for k, v in ends.items()}
    ends = {k: v[0][0] for k, v in ends.items()}
    # the -vv lines and the counters agree
    assert {o: sum(1 for v in ends.values() if v == o) for o in set(ends.values())} == {
        o: n for o, n in st["outcomes"].items() if n}, (ends, st)
    res = h.compare_streams(streams, logged(*dirs), allow_remap=True)
    assert not res.extra, f"bytes the capture does not hold reached the target: {res.describe()}"
    bad = {k for k, _ in res.different} | set(res.missing)
    # when each session ran at the target (from the port it was replayed from)
    times = session_times(rep.target_logs.parent / "target.pcap")
    phase = {"before": [], "during": [], "after": []}
    for k in keys:
        first, last = times.get(sent[k], (None, None))
        p = ("after" if first is not None and first >= t_to else
             "before" if last is not None and last <= t_from else "during")
        phase[p].append(k)
    for k in phase["before"] + phase["after"]:
        assert ends[k] in OK and k not in bad, (
            f"session {k} ran wholly outside the fault but ended {ends[k]}"
            f"{' and its bytes differ' if k in bad else ''}: {res.describe()}\n{st}\n"
            f"{rep.diagnostics()}")
    # nothing silent: a session whose stream did not arrive whole ended with a failure
    for k in bad:
        assert ends[k] not in OK, (
            f"session {k} ended {ends[k]} but its stream did not arrive whole: "
            f"{res.describe()}\n{st}\n{rep.diagnostics()}")
    return res, ends, phase


def test_target_restarted_mid_replay(lab, tmp_path):
    rec = record(lab, tmp_path)
    logs_a, logs_b = tmp_path / "target-a", tmp_path / "target-b"
    srv = h.start_recording_server(lab, "target", logs_a, delay=DELAY)
    t, box = replay_in_thread(lab, rec.pcap, tmp_path / "replay")
    try:
        # the 5th connection's request is in, its answer due in 0.4 s: crash now
        wait_logged(logs_a, 5)
        srv.send_signal(signal.SIGKILL)
        srv.wait(5)
        t_kill = time.time()
        time.sleep(1.5)
        srv = h.start_recording_server(lab, "target", logs_b, delay=DELAY)
        t_back = time.time()
        rep = finish(t, box)
        h.wait_settled(logs_b)
    finally:
        lab.stop(srv)
        t.join(TIMEOUT + 60)
    res, ends, phase = check_accounting(rec, rep, (logs_a, logs_b), t_kill, t_back)
    assert len(phase["before"]) >= 4 and len(phase["after"]) >= 3, phase
    st = rep.stats
    # the sessions that came while the target was down were refused, and said so
    assert st["outcomes"]["reset_by_target"] >= 1, (phase, ends, st)
    # the session in flight (its request delivered, the answer due) saw the target close
    # (the kernel's FIN for the killed server) and sent its FIN on that: its outcome is
    # "completed", as every captured byte reached the target; the missing answer shows
    # only in this counter
    assert st["gate_closed"] >= 1, st
    for k in phase["during"]:
        assert ends[k] in (*OK, "reset_by_target"), (k, ends[k], st)


def test_assistant_unreachable_for_5_s(lab, tmp_path):
    """The target's replies are lost for 5 s (its path to the assistant is down): the
    sessions in flight retransmit and recover, or end with a counted reason."""
    rec = record(lab, tmp_path)
    logs = tmp_path / "target"
    port = "sw-as"  # the assistant's port on the lab's switch
    assert port in lab.switch_ports
    srv = h.start_recording_server(lab, "target", logs, delay=DELAY)
    t, box = replay_in_thread(lab, rec.pcap, tmp_path / "replay")
    cut = False
    try:
        # the 4th connection's request is in, its answer due in 0.4 s: cut now
        wait_logged(logs, 4)
        lab.run("switch", ["ip", "link", "set", port, "down"], check=True)
        cut, t_cut = True, time.time()
        time.sleep(5)
        lab.run("switch", ["ip", "link", "set", port, "up"], check=True)
        cut, t_back = False, time.time()
        rep = finish(t, box)
        h.wait_settled(logs)
    finally:
        if cut:
            lab.run("switch", ["ip", "link", "set", port, "up"])
        lab.stop(srv)
        t.join(TIMEOUT + 60)
    res, ends, phase = check_accounting(rec, rep, (logs,), t_cut, t_back)
    st = rep.stats
    assert len(phase["before"]) >= 3 and len(phase["after"]) >= 3, phase
    # what was lost was sent again: SYNs of the sessions that began in the outage (their
    # SYN-ACKs were lost), data the target's acknowledgment of was lost
    assert st["syn_retransmits"] >= 1 and st["retransmits"] >= st["syn_retransmits"], st
    # a lost reply path can only leave a session never established (no SYN-ACK within
    # --connect-timeout); every other session in the outage recovered, byte for byte
    for k in phase["during"]:
        assert ends[k] in (*OK, "no_synack"), (k, ends[k], st)
    assert any(ends[k] in OK for k in phase["during"]), (phase, ends)
    # every reply the target sent again after the outage was delivered (none unmatched)
    assert st["fb_unmatched"] == 0, st
