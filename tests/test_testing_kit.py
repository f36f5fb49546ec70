"""The testing kit itself (tcpcopylib/testing.py): a tool called in process gives what the
process gives, and leaves this process as it found it."""

import os
import signal
import sys

import pytest
from tc import call, chain, run, stream

from tcpcopylib.testing import CallTimeout

T0 = 1_700_000_000 * 10**9
PKTS = [{"t": "pkt", "ts": T0 + i, "data": b"E" + bytes(39)} for i in range(5)]


@pytest.mark.parametrize("args, data", [
    (["tc-dump", "--stats"], stream(PKTS)),
    (["tc-pace", "--keep-ts"], stream(PKTS)),
    (["tc-dump", "--json"], b"not a stream"),
    (["tc-dump", "--no-such-option"], b""),
    (["tc-pace", "--help"], b""),
], ids=["dump", "pace", "bad-input", "usage", "help"])
def test_in_process_is_the_process(args, data):
    """Exit status, stdout and stderr as the executable gives them (but for times)."""
    inproc, proc = call(args, input=data), run(args, input=data)
    assert inproc.returncode == proc.returncode
    assert inproc.stdout == proc.stdout
    strip = (lambda b: b.rsplit(b",", 1)[0]) if "--stats" in args else (lambda b: b)
    assert strip(inproc.stderr) == strip(proc.stderr)


def _state():
    return ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1,
                                               signal.SIGALRM, signal.SIGPIPE)},
            signal.getitimer(signal.ITIMER_REAL), os.fstat(0).st_ino,
            (sys.stdin, sys.stdout, sys.stderr), os.environ.get("TC_KIT_PROBE"))


def test_call_leaves_the_process_as_it_was():
    before = _state()
    r = call(["tc-pace", "--progress"], input=stream(PKTS), env={"TC_KIT_PROBE": "1"})
    assert r.returncode == 0, r.stderr
    call(["tc-dump"], input=b"garbage")
    call(["tc-dump", "--version"])
    assert _state() == before


def test_timeout_stops_a_tool_that_waits():
    later = stream([PKTS[0], dict(PKTS[1], ts=T0 + 3600 * 10**9)])  # an hour later
    before = _state()
    with pytest.raises(CallTimeout):
        call(["tc-pace"], input=later, timeout=0.3)
    assert _state() == before


def test_chain_is_a_pipeline_with_pipefail():
    r = chain(["tc-pace"], ["tc-dump", "--json"], input=stream(PKTS))
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 6  # a header and 5 records
    bad = chain(["tc-pace"], ["tc-dump"], input=b"garbage")
    assert bad.returncode == 65 and bad.stderr.startswith(b"tc-pace: error:")
    assert b"tc-dump: error: <stdin>: empty input" in bad.stderr
