"""--metrics FILE and --metrics-listen ADDR (tcpcopylib.metrics; tcpcopy(7), METRICS).

- rendering: what prometheus_client's own text parser reads back, every stats number mapped;
- the textfile is never half-written: a reader loop during writes always parses;
- a tc-readpcap | tc-pace | tc-dump pipeline on loopback, scraped over HTTP and read from
  its textfiles during the run: every metric there, counters only grow, and at exit the
  values equal --stats-json's;
- the listener refuses other paths and methods, survives garbage and slow clients;
- in the lab: a tc-session replay's sessions, outcomes and feedback lag, read the same way.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import replay_harness as h
from tc import REPO, call, stream, tool_env, tool_path
from tcpcopylib import metrics as m

PCAP = REPO / "examples" / "http-lab.pcap"


def parse(text: str) -> dict:
    """{(sample name, frozenset of labels but stage): value}, by prometheus_client's parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items()}
            key = (s.name, frozenset(labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def types(text: str) -> dict:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(samples: dict, name: str, **labels):
    for (n, lab), v in samples.items():
        if n == name and all((k, x) in lab for k, x in labels.items()):
            return v
    raise KeyError(f"{name} {labels} not in {sorted(n for n, _ in samples)}")


def by_key(tool: str, stats: dict) -> dict:
    """{stats key: (sample name, labels)} as metrics.samples() maps them."""
    out = {}
    for family, labels, _v, key in m.samples(tool, stats):
        out[key] = (family, labels)
    return out


def check_equal_to_stats(tool: str, samples: dict, stats: dict, labels=()) -> int:
    """Every number of --stats-json (but the run's own) is a sample of equal value."""
    flat = m.flatten({k: v for k, v in stats.items() if k not in m.HISTOGRAMS})
    for key in m.HISTOGRAMS:
        if key in stats:
            flat.update({f"{key}.{k}": v for k, v in m.flatten(stats[key]).items()})
    mapped = by_key(tool, stats)
    spec_scale = {s[0]: (s[3] if len(s) > 3 else 1) for s in m.SPECS.get(tool, ())}
    checked = 0
    for key, v in flat.items():
        if key in ("exit_status", "elapsed_s") or (tool == "tc-emit" and key == "failed"):
            continue
        assert key in mapped, f"{tool}: --stats-json {key} has no metric"
        family, lab = mapped[key]
        want = v * spec_scale.get(key, 1)
        got = value(samples, family, stage=m.stage_of(tool), **lab, **dict(labels))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (tool, key, got, want)
        checked += 1
    return checked


# -- rendering --------------------------------------------------------------------------------

SESSION_STATS = {
    "active": 2, "pkts_in": 10, "pkts_out": 12, "bytes_out": 999, "pkts_ignored": 1,
    "pkts_truncated": 0, "pkts_server": 4, "sessions": 3, "syn_sent": 3, "fake_syn": 1,
    "retransmits": 2, "gate_bytes": 100, "fb_in": 8, "fb_unmatched": 1, "peak_active": 3,
    "early_reuses": 0, "outcomes": {"completed": 1, "shed": 0, "reset_by_target": 0},
    "some_new_counter": 7, "summary": "text is not a number", "flag": True,
}


def test_render_parses_and_maps_every_number():
    hist = m.Histogram()
    for v in (0.0001, 0.0007, 0.003, 0.2, 30.0):
        hist.observe(v)
    stats = dict(SESSION_STATS, feedback_lag=hist.as_dict())
    text = m.render("tc-session", stats, {"site": 'a "quoted"\\ value\n'}, start_time=1.5)
    s = parse(text)
    t = types(text)
    assert t["tcpcopy_sessions"] == "counter" and t["tcpcopy_sessions_active"] == "gauge"
    assert t["tcpcopy_feedback_lag_seconds"] == "histogram"
    assert t["tcpcopy_build_info"] == "gauge" and t["process_resident_memory_bytes"] == "gauge"
    lab = {"stage": "session", "site": 'a "quoted"\\ value\n'}
    assert value(s, "tcpcopy_sessions_total", outcome="completed", **lab) == 1
    assert value(s, "tcpcopy_packets_total", **lab) == 12
    assert value(s, "tcpcopy_skipped_total", reason="server_side", **lab) == 4
    assert value(s, "tcpcopy_session_events_total", event="fake_syn", **lab) == 1
    assert value(s, "tcpcopy_stat", key="some_new_counter", **lab) == 7  # unmapped: kept
    assert value(s, "tcpcopy_build_info", version=m.__version__, **lab) == 1
    assert value(s, "process_start_time_seconds", **lab) == 1.5
    assert value(s, "tcpcopy_running", **lab) == 1
    buckets = {dict(k)["le"]: v for (n, k), v in s.items()
               if n == "tcpcopy_feedback_lag_seconds_bucket"}
    assert buckets["0.0005"] == 1 and buckets["0.001"] == 2 and buckets["0.005"] == 3
    assert buckets["10.0"] == 4 and buckets["+Inf"] == 5
    assert value(s, "tcpcopy_feedback_lag_seconds_count", **lab) == 5
    assert value(s, "tcpcopy_feedback_lag_seconds_sum", **lab) == pytest.approx(30.2038)
    assert check_equal_to_stats("tc-session", s, stats, {"site": lab["site"]}) >= 25
    assert not any(n == "tcpcopy_stat" and ("key", "flag") in k for n, k in s)
    final = parse(m.render("tc-session", stats, running=False, exit_status=3))
    assert value(final, "tcpcopy_running") == 0 and value(final, "tcpcopy_exit_status") == 3


@pytest.mark.parametrize("tool", sorted(m.SPECS))
def test_every_spec_key_renders(tool):
    """A stats dict holding every key a tool's SPECS name renders, parses, and maps back."""
    stats = {}
    for spec in m.SPECS[tool]:
        key = spec[0]
        if key.endswith(".*"):
            stats[key[:-2]] = {"a_reason": 3, "another": 4}
        else:
            stats[key] = 5
    s = parse(m.render(tool, stats))
    assert check_equal_to_stats(tool, s, stats) >= len(m.SPECS[tool]) - 1
    for name in {f for _, f, *_ in m.SPECS[tool] if f}:
        assert name in m.FAMILIES


def test_labels_and_addresses_are_checked():
    assert m.check_label("site=eu-1") == ("site", "eu-1")
    assert m.check_label("run=") == ("run", "")
    for bad in ("site", "1x=a", "a-b=c", "stage=x", "__name__=x", "le=1"):
        with pytest.raises(ValueError):
            m.check_label(bad)
    assert m.parse_listen("127.0.0.1:9464") == (socket.AF_INET, ("127.0.0.1", 9464))
    assert m.parse_listen("[::1]:80") == (socket.AF_INET6, ("::1", 80))
    assert m.parse_listen(":9464") == (socket.AF_INET, ("0.0.0.0", 9464))
    for bad in ("9464", "host:port", "::1:80", "a:70000"):
        with pytest.raises(ValueError):
            m.parse_listen(bad)


def test_textfile_is_never_half_written(tmp_path):
    """A reader loop while another thread rewrites the file: every read parses whole."""
    path = tmp_path / "x.prom"
    texts = [m.render("tc-session", dict(SESSION_STATS, pkts_in=i,
                                         outcomes={f"o{j}": j for j in range(i * 20)}))
             for i in range(1, 6)]  # of different lengths (up to ~10 KB)
    m.write_atomically(str(path), texts[0])
    stop = time.monotonic() + 1.5
    writes = 0

    def writer():
        nonlocal writes
        while time.monotonic() < stop:
            m.write_atomically(str(path), texts[writes % len(texts)])
            writes += 1

    t = threading.Thread(target=writer)
    t.start()
    reads = 0
    try:
        while time.monotonic() < stop:
            text = path.read_text()
            assert text in texts, "a read saw a file that was never written whole"
            parse(text)
            reads += 1
    finally:
        t.join()
    assert writes > 50 and reads > 50, (writes, reads)
    assert [p.name for p in tmp_path.iterdir()] == ["x.prom"]  # no temporary file left


# -- a pipeline on loopback --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(request)
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def scrape(port: int) -> str:
    code, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 200
    return body.decode()


class Watcher:
    """Reads some sources (callables returning metrics text) in a loop in a thread; keeps
    what parsed and checks that no counter goes down."""

    def __init__(self, sources: dict, every: float = 0.1):
        self.sources = sources
        self.seen: dict = {name: [] for name in sources}
        self.errors: list = []
        self.every = every
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        while not self._stop.is_set():
            for name, get in self.sources.items():
                try:
                    text = get()
                except (OSError, FileNotFoundError):
                    continue  # not started yet, or gone
                try:
                    self.seen[name].append((parse(text), types(text)))
                except Exception as e:  # noqa: BLE001 - reported by the test
                    self.errors.append(f"{name}: {e!r}: {text[:300]!r}")
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self.t.join(10)

    def check_monotonic(self, name: str) -> None:
        runs = self.seen[name]
        for (a, ta), (b, _) in zip(runs, runs[1:]):
            for key, v in a.items():
                fam = key[0]
                base = fam.removesuffix("_total")
                if key[0].endswith(("_total", "_bucket", "_count", "_sum")) or \
                        ta.get(base) == "counter":
                    assert key in b, f"{name}: {key} disappeared"
                    assert b[key] >= v, f"{name}: counter {key} went down {v} -> {b[key]}"


def read_file(path: Path):
    return lambda: path.read_text()


def test_pipeline_scraped_during_the_run(tmp_path):
    """tc-readpcap | tc-pace --speed 2 | tc-dump on loopback (3 s): each stage's metrics,
    over HTTP (tc-pace) and from textfiles, during the run and at exit."""
    port = free_port()
    files = {t: tmp_path / f"{t}.prom" for t in ("tc-readpcap", "tc-pace", "tc-dump")}
    sj = {t: tmp_path / f"{t}.json" for t in files}
    e = tool_env(TC_METRICS_INTERVAL="0.2")
    common = lambda t: ["--metrics", str(files[t]), "--stats-json", str(sj[t]),  # noqa: E731
                        "--metrics-label", "run=t1"]
    rp = subprocess.Popen([tool_path("tc-readpcap"), *common("tc-readpcap"), "-B", "4",
                           str(PCAP)], stdout=subprocess.PIPE, env=e)
    pace = subprocess.Popen([tool_path("tc-pace"), "--speed", "2", *common("tc-pace"),
                             "--metrics-listen", f"127.0.0.1:{port}"],
                            stdin=rp.stdout, stdout=subprocess.PIPE, env=e)
    rp.stdout.close()
    dump = subprocess.Popen([tool_path("tc-dump"), *common("tc-dump")], stdin=pace.stdout,
                            stdout=subprocess.DEVNULL, env=e)
    pace.stdout.close()
    sources = {t: read_file(p) for t, p in files.items()}
    sources["http"] = lambda: scrape(port)
    w = Watcher(sources)
    try:
        assert dump.wait(60) == 0 and pace.wait(10) == 0 and rp.wait(10) == 0
    finally:
        w.stop()
        for p in (rp, pace, dump):
            if p.poll() is None:
                p.kill()
    assert not w.errors, w.errors[:3]
    for name in ("tc-pace", "tc-dump", "http"):
        assert len(w.seen[name]) >= 5, f"{name}: read {len(w.seen[name])} times during the run"
        w.check_monotonic(name)
    # tc-pace's counters moved during the run (in the file and over HTTP)
    for name in ("tc-pace", "http"):
        ins = [value(s, "tcpcopy_records_in_total") for s, _ in w.seen[name]]
        assert any(0 < x < ins[-1] for x in ins) or 0 < ins[0] < 1392, ins
    # at exit: every stats-json number is in the file, with its value
    for tool, path in files.items():
        text = path.read_text()
        s = parse(text)
        stats = json.loads(sj[tool].read_text())
        assert check_equal_to_stats(tool, s, stats, {"run": "t1"}) >= 1
        assert value(s, "tcpcopy_running") == 0 and value(s, "tcpcopy_exit_status") == 0
        assert value(s, "process_resident_memory_bytes") > 1 << 20
        # every metric of the final file was there during the run (but the exit ones)
        during = {n for snap, _ in w.seen[tool] for n, _ in snap}
        assert {n for n, _ in s} - during <= {"tcpcopy_exit_status"}, tool
    assert value(parse(files["tc-readpcap"].read_text()), "tcpcopy_packets_total") == 1392
    assert value(parse(files["tc-dump"].read_text()), "tcpcopy_records_total",
                 type="pkt") == 1392


def test_listener_refuses_other_requests_and_survives_garbage(tmp_path):
    port = free_port()
    p = subprocess.Popen([tool_path("tc-pace"), "--metrics-listen", f"127.0.0.1:{port}"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=tool_env())
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                text = scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
                time.sleep(0.05)
        assert value(parse(text), "tcpcopy_running", stage="pace") == 1
        assert http(port, b"GET / HTTP/1.0\r\n\r\n")[0] == 404
        assert http(port, b"GET /metrics/../etc/passwd HTTP/1.0\r\n\r\n")[0] == 404
        assert http(port, b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")[0] == 405
        assert http(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")[0] == 400
        assert http(port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")[0] == 200
        assert http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n") == (200, b"")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            head = c.recv(4096).split(b"\r\n\r\n")[0]
        assert b"Content-Type: text/plain; version=0.0.4" in head
        code, body = http(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
        assert code == 400  # a head over 4 KiB
        # a client that connects and sends nothing, or half a line, is dropped after 2 s
        idle = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /met")
        t0 = time.monotonic()
        assert value(parse(scrape(port)), "tcpcopy_running") == 1
        assert time.monotonic() - t0 < 6
        idle.close()
        half.close()
        with socket.create_connection(("127.0.0.1", port)) as c:  # reset mid-request
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert p.poll() is None, "the tool ended"
        assert scrape(port)
    finally:
        p.stdin.write(stream([]))  # an empty stream, not empty input (that is exit 65)
        p.stdin.close()
        assert p.wait(10) == 0, p.stderr.read()


def test_metrics_option_errors(tmp_path):
    r = call(["tc-dump", "--metrics", tmp_path / "no" / "such" / "dir.prom"], input=b"")
    assert r.returncode == 1 and b"cannot write --metrics" in r.stderr, r.stderr
    r = call(["tc-dump", "--metrics-listen", "nowhere"], input=b"")
    assert r.returncode == 2 and b"--metrics-listen" in r.stderr, r.stderr
    r = call(["tc-dump", "--metrics", tmp_path / "m.prom", "--metrics-label", "stage=x"],
             input=b"")
    assert r.returncode == 2 and b"--metrics-label" in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = call(["tc-dump", "--metrics-listen", f"127.0.0.1:{busy.getsockname()[1]}"],
                 input=b"")
    assert r.returncode == 69 and b"--metrics-listen" in r.stderr, r.stderr


# -- a replay in the lab ------------------------------------------------------------------------

STAGES = ("tc-readpcap", "tc-session", "tc-pace", "tc-emit", "tc-intercept", "tc-feedback")


@pytest.mark.netns
def test_lab_replay_metrics_of_every_stage(lab, tmp_path, monkeypatch):
    """A replay of examples/http-lab.pcap in the lab, every stage (tc-intercept and
    tc-feedback on the assistant too) with --metrics and --stats-json: the textfiles read
    during the run, counters only grow, every metric there before the end; at exit equal to
    --stats-json; tc-session's sessions by outcome and feedback lag."""
    prom = {t: tmp_path / f"{t}.prom" for t in STAGES}
    sj = {t: tmp_path / f"{t}.json" for t in STAGES}

    class MetricsProc(h.Proc):  # every tool the harness starts gets the two options
        def __init__(self, lab, host, argv, *a, **kw):
            tool = Path(str(argv[0])).name
            if tool in prom:
                argv = [*argv, "--metrics", str(prom[tool]), "--stats-json", str(sj[tool]),
                        "--metrics-label", "replay=lab"]
            super().__init__(lab, host, argv, *a, **kw)

    monkeypatch.setattr(h, "Proc", MetricsProc)
    monkeypatch.setenv("TC_METRICS_INTERVAL", "0.25")  # the tools inherit it (tool_env)
    w = Watcher({t: read_file(p) for t, p in prom.items()}, every=0.1)
    try:
        rep = h.replay(lab, PCAP, tmp_path / "run")
    finally:
        w.stop()
    assert rep.rc("tc-session") == 0 and not rep.timed_out, rep.diagnostics()
    assert not w.errors, w.errors[:3]
    finals = {}
    for tool in STAGES:
        assert len(w.seen[tool]) >= 5, f"{tool}: read {len(w.seen[tool])} times"
        w.check_monotonic(tool)
        s = finals[tool] = parse(prom[tool].read_text())
        stats = json.loads(sj[tool].read_text())
        assert check_equal_to_stats(tool, s, stats, {"replay": "lab"}) >= 3, tool
        assert value(s, "tcpcopy_running") == 0 and value(s, "tcpcopy_exit_status") == 0, tool
        seen = {n for snap, _ in w.seen[tool] for n, _ in snap}
        assert {n for n, _ in s} - seen <= {"tcpcopy_exit_status"}, tool
    stats = json.loads(sj["tc-session"].read_text())  # (ours: the last --stats-json wins)
    s = finals["tc-session"]
    completed = value(s, "tcpcopy_sessions_total", outcome="completed")
    assert completed >= 1 and completed == stats["outcomes"]["completed"]
    assert value(s, "tcpcopy_feedback_lag_seconds_count") >= 1
    assert value(s, "tcpcopy_feedback_lag_seconds_bucket", le="+Inf") == stats[
        "feedback_lag"]["count"]
    # the replayed packets went through every stage
    assert value(finals["tc-readpcap"], "tcpcopy_packets_total") == 1392
    assert value(finals["tc-emit"], "tcpcopy_packets_total") == stats["pkts_out"]
    assert value(finals["tc-feedback"], "tcpcopy_packets_total") >= stats["fb_in"]
    assert value(finals["tc-intercept"], "tcpcopy_packets_total") >= stats["fb_in"]
    # during the run: sessions were live and packets counted before the end
    snaps = [snap for snap, _ in w.seen["tc-session"]
             if any(n == "tcpcopy_packets_total" for n, _ in snap)]
    assert any(0 < value(x, "tcpcopy_packets_total") < stats["pkts_out"] for x in snaps)
    assert any(value(x, "tcpcopy_sessions_active") > 0 for x in snaps)


@pytest.mark.netns
def test_lab_live_capture_metrics(lab, tmp_path, monkeypatch):
    """tc-capture's metrics in a live mirror (client -> online, captured and replayed):
    read during the run, only growing, equal to its --stats-json at exit."""
    prom, sj = tmp_path / "capture.prom", tmp_path / "capture.json"

    class MetricsProc(h.Proc):
        def __init__(self, lab, host, argv, *a, **kw):
            if Path(str(argv[0])).name == "tc-capture":
                argv = [*argv, "--metrics", str(prom), "--stats-json", str(sj)]
            super().__init__(lab, host, argv, *a, **kw)

    monkeypatch.setattr(h, "Proc", MetricsProc)
    monkeypatch.setenv("TC_METRICS_INTERVAL", "0.25")
    onl, tgt = tmp_path / "online", tmp_path / "target"
    h.start_recording_server(lab, "online", onl)
    h.start_recording_server(lab, "target", tgt)
    w = Watcher({"tc-capture": read_file(prom)}, every=0.1)
    live = h.start_live(lab, tmp_path / "live")
    try:
        r = lab.run("client", [h.PY, str(h.SERVERS / "live_http_client.py"), "--server",
                               f"{lab.online_cli_ip}:{h.PORT}", "--sessions", "30",
                               "--requests", "3", "--parallel", "4"],
                    capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        h.wait_settled(tgt, quiet=1.0, timeout=30)
        time.sleep(0.5)  # a rendering with the last packets, before the end
    finally:
        live.stop()
        w.stop()
    assert live.rc("tc-capture") == 0, live.diagnostics()
    assert not w.errors, w.errors[:3]
    assert len(w.seen["tc-capture"]) >= 5
    w.check_monotonic("tc-capture")
    s = parse(prom.read_text())
    stats = json.loads(sj.read_text())
    assert check_equal_to_stats("tc-capture", s, stats) >= 10
    assert value(s, "tcpcopy_packets_total", stage="capture") == stats["records"] > 30
    during = [value(x, "tcpcopy_packets_total") for x, _ in w.seen["tc-capture"]
              if any(n == "tcpcopy_packets_total" for n, _ in x)]
    assert any(0 < x for x in during), during


def test_grafana_dashboard_uses_our_metrics():
    """examples/grafana-dashboard.json: valid JSON, every metric it queries is one we write,
    every panel on the data source variable."""
    import re

    d = json.loads((REPO / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    assert len(exprs) >= 15 and d["uid"] and d["title"]
    names = {n for e in exprs for n in re.findall(r"\b((?:tcpcopy|process)_\w+)", e)}
    known = set(m.FAMILIES) | {f + "_bucket" for f, (t, _) in m.FAMILIES.items()
                               if t == "histogram"}
    assert names and names <= known, names - known
    for family in ("tcpcopy_packets_total", "tcpcopy_sessions_total", "tcpcopy_dropped_total",
                   "tcpcopy_feedback_lag_seconds_bucket", "process_resident_memory_bytes"):
        assert family in names
    assert all(p["datasource"]["uid"] == "${datasource}" for p in d["panels"])
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    # stage=~".+" for "All": process_* series of other exporters have no stage label
    assert variables["stage"]["allValue"] == ".+"
