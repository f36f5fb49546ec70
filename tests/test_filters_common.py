"""What every filter does alike, tested once for every filter (issue 15, item 6).

The filters are the tools that read an input stream: record streams (tc-session, tc-pace,
tc-emit, tc-dump, tc-feedback, tc-rewrite, tc-select) and capture files (tc-readpcap). tc-capture and
tc-intercept read network interfaces, not a stream: they are in the --help/--version
test only. For each filter:

- garbage in: exit 65 and one line on stderr, nothing on stdout;
- empty input: exit 65 (every writer starts its stream with a label and header, so an
  empty input means the stage before failed);
- downstream closed: exit 141 without a word more than --stats, with --stats-json still
  written (real processes in a real pipeline: the signal is the point);
- --help and --version;
- the --stats-json schema: tool, version, exit_status, elapsed_s, summary (the --stats
  line), and counters (numbers that are not negative, or maps of them).

Everything but the pipeline runs in process (tcpcopylib.testing.call).
"""

import json
import random
import re
import subprocess
from dataclasses import dataclass

import pytest

import capfiles as cf
from tc import call, pcap, stream, tool_env, tool_path
from tcpcopylib import __version__
from tcpcopylib.packet import TH_SYN, build_tcp


def _pkts(n: int, kind: str = "pkt") -> list:
    """n captured SYNs, each of its own session (one a client port)."""
    return [{"t": kind, "ts": cf.TS0 + i, "data": build_tcp(
        cf.A4, cf.B4, 1024 + i % 60000, 80, 1000, 0, TH_SYN, options=b"\x02\x04\x05\xb4")}
        for i in range(n)]


@dataclass
class Filter:
    args: list          # the arguments it needs to run at all ({tmp} is tmp_path)
    reads: str          # "records" or "capture"
    writes: bool        # writes a stream to stdout (so can be cut off by downstream)

    def input(self, n: int) -> bytes:
        """A good input of about n packets."""
        if self.reads == "capture":
            return pcap([(cf.TS0 + i, cf.eth(0x0800, cf.ip4(i % 50))) for i in range(n)])
        return stream(_pkts(n, "fb" if self.args[:1] == ["--listen"] else "pkt"))

    def argv(self, tmp_path) -> list:
        return [a.format(tmp=tmp_path) for a in self.args]


FILTERS = {
    "tc-readpcap": Filter([], "capture", True),
    "tc-session": Filter(["--no-feedback", "--target", "10.0.0.1:80", "--drain", "0"],
                         "records", True),
    "tc-pace": Filter(["--speed", "1e9"], "records", True),
    "tc-emit": Filter([], "records", False),  # (good input: a header only, nothing sent)
    "tc-dump": Filter([], "records", True),
    "tc-rewrite": Filter(["--host", "test.example"], "records", True),
    "tc-select": Filter(["--drop", "redis:PING"], "records", True),
    "tc-feedback": Filter(["--listen", "unix:{tmp}/fb.sock", "--hold-ms", "10"], "records",
                          False),
}
WRITERS = [name for name, f in FILTERS.items() if f.writes]
ALL_TOOLS = [*FILTERS, "tc-capture", "tc-intercept", "tc-doctor", "tc-publish", "tc-subscribe"]


def good_input(name: str) -> bytes:
    return stream([]) if name == "tc-emit" else FILTERS[name].input(3)


def _filter_call(name, tmp_path, data, *extra):
    return call([name, *FILTERS[name].argv(tmp_path), *extra], input=data)


GARBAGE = {
    "text": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "random": random.Random(15).randbytes(3000),
    "cut-stream": stream([{"t": "pkt", "ts": 1, "data": b"E" * 40}])[:-2],
}


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("name", FILTERS)
def test_garbage_in_is_65_and_one_line(name, garbage, tmp_path):
    r = _filter_call(name, tmp_path, GARBAGE[garbage])
    err = r.stderr.decode()
    assert r.returncode == 65, err
    assert err.startswith(f"{name}: error: <stdin>: ") and err.count("\n") == 1, err
    if FILTERS[name].reads == "records":
        assert "record stream" in err or "truncated" in err or "cut off" in err, err


@pytest.mark.parametrize("name", FILTERS)
def test_bad_input_writes_nothing(name, tmp_path):
    for data in (GARBAGE["text"], b""):
        r = _filter_call(name, tmp_path, data)
        assert r.returncode == 65 and r.stdout == b"", r.stderr


@pytest.mark.parametrize("name", FILTERS)
def test_empty_input_is_65_and_one_line(name, tmp_path):
    r = _filter_call(name, tmp_path, b"")
    err = r.stderr.decode()
    assert r.returncode == 65, err
    assert err.count("\n") == 1 and "empty" in err, err
    if FILTERS[name].reads == "records":
        assert "empty input, not a record stream" in err


@pytest.mark.parametrize("name", WRITERS)
def test_downstream_closed_is_141_quietly_with_stats_written(name, tmp_path):
    """`tool --stats --stats-json F < input | head -c 10`: the tool dies of SIGPIPE (141
    under pipefail), says nothing but its --stats line, and F says exit_status 141."""
    src, js = tmp_path / "in", tmp_path / "stats.json"
    src.write_bytes(FILTERS[name].input(20_000))
    argv = " ".join([tool_path(name), *FILTERS[name].argv(tmp_path), "--stats",
                     "--stats-json", str(js)])
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {argv} < {src} | head -c 10 "
                        ">/dev/null"], capture_output=True, env=tool_env(), timeout=60)
    stats = json.loads(js.read_text())
    assert r.returncode == 141, r.stderr
    assert stats["exit_status"] == 141
    lines = r.stderr.decode().splitlines()
    assert lines and all(ln.startswith(f"{name}: ") for ln in lines), lines
    assert "error" not in r.stderr.decode() and b"Traceback" not in r.stderr


@pytest.mark.parametrize("name", ALL_TOOLS)
def test_help_and_version(name):
    h = call([name, "--help"])
    assert h.returncode == 0 and h.stderr == b""
    text = h.stdout.decode()
    assert text.startswith(f"usage: {name} ")
    for option in ("--version", "--stats", "--stats-json"):
        assert option in text
    for flag in ("--version", "-V"):
        v = call([name, flag])
        assert v.returncode == 0 and v.stderr == b""
        assert v.stdout.decode().startswith(f"{name} (tcpcopylib) {__version__}, ")


def _shape(text: str) -> str:
    return re.sub(r"\d[\d.,]*", "#", text)


def _counters_ok(value) -> bool:
    """A counter: a number, not negative (not a bool); or a map of counters."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _counters_ok(v) for k, v in value.items())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


@pytest.mark.parametrize("good", [True, False], ids=["good-input", "garbage"])
@pytest.mark.parametrize("name", FILTERS)
def test_stats_json_schema(name, good, tmp_path):
    js = tmp_path / "stats.json"
    data = good_input(name) if good else GARBAGE["text"]
    r = _filter_call(name, tmp_path, data, "--stats", "--stats-json", js)
    assert r.returncode == (0 if good else 65), r.stderr
    d = json.loads(js.read_text())
    assert d.pop("tool") == name and d.pop("version") == __version__
    assert d.pop("exit_status") == r.returncode
    elapsed = d.pop("elapsed_s")
    assert isinstance(elapsed, float) and 0 <= elapsed < 60
    summary = d.pop("summary")
    # (the --stats line is made again at exit: its rates and times may have moved on)
    assert isinstance(summary, str) and _shape(f"{name}: {summary}\n") in _shape(
        r.stderr.decode())
    assert d, "no counters"
    bad = {k: v for k, v in d.items() if not _counters_ok(v)}
    assert not bad, f"not counters: {bad}"
