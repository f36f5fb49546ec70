"""Behaviour every tool gets from the Tool base class: stats JSON, progress, SIGUSR1, SIGPIPE."""

import json
import os
import signal
import subprocess
import time

from tc import BIN, env, run, stream


def _pkts(n):
    return [{"t": "pkt", "ts": i * 1000, "data": b"E" + bytes(19)} for i in range(n)]


def test_stats_json_written_at_exit(tmp_path):
    out = tmp_path / "s.json"
    r = run(["tc-dump", "--stats-json", out], input=stream(_pkts(7)))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["tool"] == "tc-dump" and d["exit_status"] == 0
    assert "7 pkt" in d["summary"]


def test_stats_json_records_the_failure_status(tmp_path):
    out = tmp_path / "s.json"
    r = run(["tc-dump", "--stats-json", out], input=b"garbage, not a stream")
    assert r.returncode == 65
    assert json.loads(out.read_text())["exit_status"] == 65


def _start_pace(extra_env=None, args=()):
    e = env()
    e.update(extra_env or {})
    p = subprocess.Popen([str(BIN / "tc-pace"), *args], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e)
    p.stdin.write(stream(_pkts(3)))
    p.stdin.flush()
    return p


def test_sigusr1_prints_counters_and_continues():
    p = _start_pace()
    try:
        time.sleep(0.5)  # let it read the three records and block on stdin
        p.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        assert p.poll() is None, "SIGUSR1 must not end the tool"
        p.stdin.close()
        assert p.wait(timeout=10) == 0
        err = p.stderr.read().decode()
        assert "tc-pace: records in 3 out 3" in err
    finally:
        if p.poll() is None:
            p.kill()


def test_progress_prints_status_lines_periodically():
    p = _start_pace({"TC_PROGRESS_INTERVAL": "0.2"}, ["--progress"])
    try:
        time.sleep(1.0)
        p.stdin.close()
        assert p.wait(timeout=10) == 0
        lines = [ln for ln in p.stderr.read().decode().splitlines() if "records in" in ln]
        assert len(lines) >= 2, lines
    finally:
        if p.poll() is None:
            p.kill()


def test_downstream_closing_gives_141_and_no_traceback():
    data = stream(_pkts(50_000))
    r = subprocess.run(f"set -o pipefail; {BIN}/tc-dump | head -1 >/dev/null",
                       shell=True, executable="/bin/bash", input=data, capture_output=True,
                       env=env(), timeout=60)
    assert r.returncode == 141
    assert b"Traceback" not in r.stderr and r.stderr == b""


def test_records_never_go_to_a_terminal():
    master, slave = os.openpty()
    try:
        r = subprocess.run([str(BIN / "tc-pace")], input=stream([]), stdout=slave,
                           stderr=subprocess.PIPE, env=env(), timeout=30)
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode == 2
    assert b"refusing to write a binary record stream to a terminal" in r.stderr
