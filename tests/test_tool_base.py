"""Behaviour every tool gets from the Tool base class: progress, SIGUSR1, no records to a
terminal (stats JSON, bad input and SIGPIPE for every filter: test_filters_common.py)."""

import os
import signal
import subprocess
import time

from tc import stream, tool_env, tool_path


def _pkts(n):
    return [{"t": "pkt", "ts": i * 1000, "data": b"E" + bytes(19)} for i in range(n)]


def _start_pace(extra_env=None, args=()):
    p = subprocess.Popen([tool_path("tc-pace"), *args], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=tool_env(**(extra_env or {})))
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


def test_records_never_go_to_a_terminal():
    master, slave = os.openpty()
    try:
        r = subprocess.run([tool_path("tc-pace")], input=stream([]), stdout=slave,
                           stderr=subprocess.PIPE, env=tool_env(), timeout=30)
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode == 2
    assert b"refusing to write a binary record stream to a terminal" in r.stderr


def test_start_up_heap_is_out_of_the_collectors_reach_while_a_tool_runs():
    """Tool.main freezes what was made before run() (gc.freeze), so that no full
    collection walks it in the middle of a replay, nor at the tool's exit."""
    import gc
    import io

    from tcpcopylib.tool import Tool

    made_at_start_up = [[]]  # a container: tracked by the collector
    seen = {}

    def walked_by_collections(obj) -> bool:
        return any(o is obj for o in gc.get_objects())  # (the frozen ones are not listed)

    class Probe(Tool):
        name = "tc-probe"
        writes_records = False

        def run(self, args):
            seen["walked"] = walked_by_collections(made_at_start_up)
            seen["made_in_run_walked"] = walked_by_collections(made_in_run := [[]])
            del made_in_run

    assert walked_by_collections(made_at_start_up)
    try:
        assert Probe(stdout_fd=1, stderr=io.StringIO()).main([]) == 0
        assert seen == {"walked": False, "made_in_run_walked": True}
        assert not walked_by_collections(made_at_start_up)  # (nor by the one at exit)
    finally:
        gc.unfreeze()  # this test process's heap as it was
