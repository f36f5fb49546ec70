"""Prometheus metrics of a tool: --metrics FILE (a textfile) and --metrics-listen ADDR (HTTP).

Nothing here runs per packet. Every tool already keeps its counters for --stats-json
(Tool.stats_dict()); an Exporter renders them in the Prometheus text exposition format
(version 0.0.4, which node_exporter's textfile collector and every Prometheus-compatible
scraper read) on its own schedule:

- rendered in the tool's main thread, from the SIGALRM timer Tool.main() already uses for
  --progress, every INTERVAL seconds and once more at exit (so a rendering sees the tool's
  counters between two Python steps, never half-updated by another thread, and libpcap
  handles are only touched by the thread that owns them); a rendering takes ~40 us;
- the textfile is written by a writer thread (file system latency stays out of the tool's
  loop) to a temporary name in the same directory, then renamed over FILE, so a reader
  (node_exporter, the tests) never sees a half-written file; the first and the last
  renderings are written by the main thread itself;
- the HTTP listener is one background thread that serves the latest rendering and nothing
  else: it reads no tool state. A scrape of a rendering older than FRESH seconds asks the
  main thread for a new one (SIGALRM to that thread) and waits for it at most WAIT seconds,
  so scrapes cost at most one rendering per FRESH seconds.
Both threads block every signal, so signals reach the main thread and interrupt its waits.

Names (tcpcopy(7), METRICS): every sample has the label stage="<tool without tc->", plus the
--metrics-label pairs. What a tool's stats_dict() holds is mapped by SPECS; a number SPECS
does not know is still exported, as tcpcopy_stat{key="<dotted key>"} (a gauge), so no
counter of --stats-json is ever missing here. At exit the values equal --stats-json's.

prometheus_client is not used: it costs ~100 ms of imports, its counters are incremented
per event (our hot paths keep their own), and its HTTP server answers any path with a
thread per connection. The tests parse our output with its parser.
"""

from __future__ import annotations

import bisect
import os
import sys
import threading
import time

from tcpcopylib import __version__

INTERVAL = float(os.environ.get("TC_METRICS_INTERVAL", "5"))  # seconds between renderings
FRESH = 1.0           # a scrape re-renders when the last rendering is older than this
WAIT = 1.0            # ... and waits this long for it (else serves the last one)
MAX_REQUEST = 4096    # bytes of an HTTP request head
CONN_TIMEOUT = 2.0    # seconds a connection may take to send its request head
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: feedback lag buckets (seconds): tc-session's delay between the assistant capturing a reply
#: and the session engine reading it
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0, 10.0)


class Histogram:
    """A fixed-bucket histogram (Prometheus semantics: a bucket counts values <= its bound)."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds=LAG_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.count += 1
        self.sum += v

    def as_dict(self) -> dict:
        """For --stats-json: cumulative bucket counts keyed by bound, count, sum_s."""
        cum, buckets = 0, {}
        for b, n in zip(self.bounds + (float("inf"),), self.counts):
            cum += n
            buckets["+Inf" if b == float("inf") else repr(b)] = cum
        return {"buckets": buckets, "count": self.count, "sum_s": round(self.sum, 9)}


# -- what each tool's stats_dict() means ---------------------------------------------------

#: family -> (type, help)
FAMILIES = {
    "tcpcopy_build_info": ("gauge", "Version of tcpcopylib and Python running this stage"),
    "tcpcopy_running": ("gauge", "1 while the tool runs; 0 in the rendering written at exit"),
    "tcpcopy_exit_status": ("gauge", "Exit status of the tool (only in the rendering at exit)"),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes"),
    "process_cpu_seconds_total": ("counter", "User and system CPU time spent in seconds"),
    "process_start_time_seconds": ("gauge", "Start time of the process since the epoch"),
    "tcpcopy_packets_in_total": ("counter", "Packets this stage took in"),
    "tcpcopy_packets_total": ("counter", "Packets this stage passed on (written, emitted, "
                                         "sent, delivered)"),
    "tcpcopy_bytes_total": ("counter", "Bytes of the packets this stage passed on"),
    "tcpcopy_records_in_total": ("counter", "Records this stage took in"),
    "tcpcopy_records_total": ("counter", "Records this stage passed on or showed"),
    "tcpcopy_skipped_total": ("counter", "Packets not passed on on purpose, by reason"),
    "tcpcopy_dropped_total": ("counter", "Packets lost, by reason (kernel, interface, "
                                         "slow client, hold overflow)"),
    "tcpcopy_send_errors_total": ("counter", "Datagrams tc-emit failed to send, by errno"),
    "tcpcopy_checksums_fixed_total": ("counter", "Datagrams sent with recomputed checksums"),
    "tcpcopy_truncated_packets_total": ("counter", "Packets captured shorter than on the wire"),
    "tcpcopy_supersegments_total": ("counter", "GRO/LRO super-segments captured"),
    "tcpcopy_supersegment_packets_total": ("counter", "Packets made from super-segments"),
    "tcpcopy_shed_sessions_total": ("counter", "Sessions shed over --max-memory"),
    "tcpcopy_shed_packets_total": ("counter", "Packets of shed sessions"),
    "tcpcopy_sessions_started_total": ("counter", "Sessions tc-session started"),
    "tcpcopy_sessions_total": ("counter", "Sessions ended, by outcome (tc-session(1))"),
    "tcpcopy_sessions_active": ("gauge", "Sessions live now"),
    "tcpcopy_sessions_active_peak": ("gauge", "The most sessions live at once"),
    "tcpcopy_session_events_total": ("counter", "tc-session events, by event (the counters "
                                                "of tc-session(1))"),
    "tcpcopy_gated_bytes_total": ("counter", "Request bytes held until the previous response"),
    "tcpcopy_feedback_packets_total": ("counter", "Replies tc-session read from tc-feedback"),
    "tcpcopy_feedback_unmatched_total": ("counter", "Replies matching no live session"),
    "tcpcopy_feedback_lag_seconds": ("histogram", "Age of the newest reply at each read of "
                                                  "the feedback socket (assistant capture "
                                                  "to tc-session; needs synchronised clocks)"),
    "tcpcopy_release_lateness_seconds": ("histogram", "How late tc-session sent client data "
                                                      "against its recorded timing"),
    "tcpcopy_feedback_held_total": ("counter", "Replies held for a claim not there yet"),
    "tcpcopy_feedback_held_delivered_total": ("counter", "Held replies delivered later"),
    "tcpcopy_feedback_held": ("gauge", "Replies held now"),
    "tcpcopy_feedback_clients_total": ("counter", "tc-session connections accepted"),
    "tcpcopy_feedback_clients": ("gauge", "tc-session connections now"),
    "tcpcopy_feedback_claims_total": ("counter", "Sessions claimed by tc-session clients"),
    "tcpcopy_feedback_releases_total": ("counter", "Claims released"),
    "tcpcopy_kernel_received_total": ("counter", "Packets the kernel handed to the capture"),
    "tcpcopy_pace_max_lateness_seconds": ("gauge", "Largest lateness of a record released"),
    "tcpcopy_stat": ("gauge", "A --stats-json number with no metric of its own, by key"),
    "tcpcopy_metrics_render_seconds_total": ("counter", "CPU time spent rendering, writing "
                                                        "and serving these metrics (to the "
                                                        "last rendering)"),
}

# (dotted stats key, family, labels, scale); a key ending in ".*" takes every key under it,
# the rest of the key going into the label given as "*"
_SESSION_EVENTS = ("syn_sent", "fake_syn", "retransmits", "rto_expired", "fast_retransmits",
                   "syn_retransmits", "acks_sent", "reconnections", "port_remaps",
                   "client_dups", "client_trimmed", "window_waits", "zero_window_probes",
                   "gate_quiet", "gate_timeout", "gate_closed", "early_reuses", "duplex")
SPECS = {
    "tc-capture": [
        ("frames", "tcpcopy_packets_in_total", {}),
        ("records", "tcpcopy_packets_total", {}),
        ("foreign", "tcpcopy_skipped_total", {"reason": "foreign"}),
        ("truncated", "tcpcopy_truncated_packets_total", {}),
        ("supersegs", "tcpcopy_supersegments_total", {}),
        ("split_records", "tcpcopy_supersegment_packets_total", {}),
        ("kernel_drops", "tcpcopy_dropped_total", {"reason": "kernel"}),
        ("if_drops", "tcpcopy_dropped_total", {"reason": "interface"}),
        ("shed_sessions", "tcpcopy_shed_sessions_total", {}),
        ("shed_packets", "tcpcopy_shed_packets_total", {}),
    ],
    "tc-readpcap": [
        ("read", "tcpcopy_packets_in_total", {}),
        ("emitted", "tcpcopy_packets_total", {}),
        ("bytes", "tcpcopy_bytes_total", {}),
        ("non_ip", "tcpcopy_skipped_total", {"reason": "non_ip"}),
        ("filtered", "tcpcopy_skipped_total", {"reason": "filtered"}),
    ],
    "tc-session": [
        ("pkts_in", "tcpcopy_packets_in_total", {}),
        ("pkts_out", "tcpcopy_packets_total", {}),
        ("bytes_out", "tcpcopy_bytes_total", {}),
        ("pkts_ignored", "tcpcopy_skipped_total", {"reason": "ignored"}),
        ("pkts_truncated", "tcpcopy_skipped_total", {"reason": "truncated"}),
        ("pkts_server", "tcpcopy_skipped_total", {"reason": "server_side"}),
        ("sessions", "tcpcopy_sessions_started_total", {}),
        ("outcomes.*", "tcpcopy_sessions_total", {"outcome": "*"}),
        ("active", "tcpcopy_sessions_active", {}),
        ("peak_active", "tcpcopy_sessions_active_peak", {}),
        ("gate_bytes", "tcpcopy_gated_bytes_total", {}),
        ("fb_in", "tcpcopy_feedback_packets_total", {}),
        ("fb_unmatched", "tcpcopy_feedback_unmatched_total", {}),
        *((k, "tcpcopy_session_events_total", {"event": k}) for k in _SESSION_EVENTS),
    ],
    "tc-pace": [
        ("records_in", "tcpcopy_records_in_total", {}),
        ("records_out", "tcpcopy_records_total", {}),
        ("max_late_ns", "tcpcopy_pace_max_lateness_seconds", {}, 1e-9),
    ],
    "tc-emit": [
        ("sent", "tcpcopy_packets_total", {}),
        ("errors.*", "tcpcopy_send_errors_total", {"error": "*"}),
        ("fixed", "tcpcopy_checksums_fixed_total", {}),
        ("skips.*", "tcpcopy_skipped_total", {"reason": "*"}),
        ("ignored", "tcpcopy_skipped_total", {"reason": "not_pkt"}),
        ("failed", None, {}),  # the sum of errors.*
    ],
    "tc-intercept": [
        ("captured", "tcpcopy_packets_in_total", {}),
        ("written", "tcpcopy_packets_total", {}),
        ("skipped", "tcpcopy_skipped_total", {"reason": "not_tcp"}),
        ("kernel_received", "tcpcopy_kernel_received_total", {}),
        ("kernel_drops", "tcpcopy_dropped_total", {"reason": "kernel"}),
        ("if_drops", "tcpcopy_dropped_total", {"reason": "interface"}),
    ],
    "tc-feedback": [
        ("replies", "tcpcopy_packets_in_total", {}),
        ("delivered", "tcpcopy_packets_total", {}),
        ("unclaimed", "tcpcopy_skipped_total", {"reason": "unclaimed"}),
        ("not_tcp", "tcpcopy_skipped_total", {"reason": "not_tcp"}),
        ("hold_overflow", "tcpcopy_dropped_total", {"reason": "hold_overflow"}),
        ("dropped_slow", "tcpcopy_dropped_total", {"reason": "slow_client"}),
        ("held", "tcpcopy_feedback_held_total", {}),
        ("held_delivered", "tcpcopy_feedback_held_delivered_total", {}),
        ("held_now", "tcpcopy_feedback_held", {}),
        ("clients", "tcpcopy_feedback_clients_total", {}),
        ("clients_now", "tcpcopy_feedback_clients", {}),
        ("claims", "tcpcopy_feedback_claims_total", {}),
        ("releases", "tcpcopy_feedback_releases_total", {}),
    ],
    "tc-dump": [
        ("records.*", "tcpcopy_records_total", {"type": "*"}),
    ],
}
#: stats keys that hold a histogram (Histogram.as_dict())
HISTOGRAMS = {"feedback_lag": "tcpcopy_feedback_lag_seconds",
              "release_lateness": "tcpcopy_release_lateness_seconds"}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the numbers of a stats dict (not bools, not text)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def stage_of(tool: str) -> str:
    return tool.removeprefix("tc-")


#: stats keys that hold the counters of a stage run in the tool's process (tc-session
#: --send: tc-emit's), exported as that stage's (stage label), under that key in --stats-json
CHAINED = {"tc-session": {"emit": "tc-emit"}}


def samples(tool: str, stats: dict) -> list:
    """(family, labels dict, value, stats key or None) of a tool's stats dict."""
    out = []
    chained = CHAINED.get(tool, {})
    for key, stage_tool in chained.items():
        if isinstance(stats.get(key), dict):
            for family, lab, v, k in samples(stage_tool, stats[key]):
                out.append((family, {"stage": stage_of(stage_tool), **lab}, v, f"{key}.{k}"))
    flat = flatten({k: v for k, v in stats.items() if k not in HISTOGRAMS and k not in chained})
    for spec in SPECS.get(tool, ()):
        key, family, labels = spec[:3]
        scale = spec[3] if len(spec) > 3 else 1
        if key.endswith(".*"):
            pre = key[:-1]
            keys = [k for k in flat if k.startswith(pre)]
        else:
            keys = [key] if key in flat else []
        for k in keys:
            v = flat.pop(k)
            if family is None:
                continue
            lab = {n: (k[len(key) - 1:] if x == "*" else x) for n, x in labels.items()}
            out.append((family, lab, v * scale if scale != 1 else v, k))
    for k, v in flat.items():  # numbers nobody mapped: still exported
        if k not in ("exit_status", "elapsed_s"):
            out.append(("tcpcopy_stat", {"key": k}, v, k))
    for key, family in HISTOGRAMS.items():
        h = stats.get(key)
        if isinstance(h, dict) and isinstance(h.get("buckets"), dict):
            for le, n in h["buckets"].items():
                out.append((family + "_bucket", {"le": le}, n, f"{key}.buckets.{le}"))
            out.append((family + "_count", {}, h.get("count", 0), f"{key}.count"))
            out.append((family + "_sum", {}, h.get("sum_s", 0.0), f"{key}.sum_s"))
    return out


def process_samples() -> list:
    """Resident memory, CPU time and start time of this process (the standard names)."""
    out = []
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        out.append(("process_resident_memory_bytes", {}, rss, None))
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    out.append(("process_cpu_seconds_total", {}, round(t.user + t.system, 3), None))
    return out


def check_label(text: str) -> tuple[str, str]:
    """--metrics-label KEY=VALUE -> (key, value); ValueError with the reason."""
    import re

    key, eq, value = text.partition("=")
    if not eq or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", key) or key.startswith("__"):
        raise ValueError(f"not KEY=VALUE with a Prometheus label name: {text!r}")
    if key in ("stage", "le", "key", "outcome", "reason", "event", "error", "type", "version",
               "python"):
        raise ValueError(f"label {key!r} is one tcpcopy sets itself")
    return key, value


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render(tool: str, stats: dict, labels: dict | None = None, start_time: float | None = None,
           running: bool = True, exit_status: int | None = None,
           render_s: float | None = None) -> str:
    """The Prometheus text of a tool's stats dict, with the process and build metrics."""
    base = {"stage": stage_of(tool), **(labels or {})}
    rows = [("tcpcopy_build_info", {"version": __version__,
                                    "python": "%d.%d.%d" % sys.version_info[:3]}, 1, None),
            ("tcpcopy_running", {}, 1 if running else 0, None)]
    if exit_status is not None:
        rows.append(("tcpcopy_exit_status", {}, exit_status, None))
    rows += process_samples()
    if start_time is not None:
        rows.append(("process_start_time_seconds", {}, round(start_time, 3), None))
    if render_s is not None:
        rows.append(("tcpcopy_metrics_render_seconds_total", {}, round(render_s, 6), None))
    rows += samples(tool, stats)
    by_family: dict = {}
    for family, lab, v, _k in rows:
        name = family
        for suffix in ("_bucket", "_count", "_sum"):
            if family.endswith(suffix) and family[:-len(suffix)] in FAMILIES:
                name = family[:-len(suffix)]
        by_family.setdefault(name, []).append((family, lab, v))
    lines = []
    for name, fam_rows in by_family.items():
        typ, help_ = FAMILIES.get(name, ("gauge", ""))
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {typ}")
        for family, lab, v in fam_rows:
            lab = {**base, **lab}
            text = ",".join(f'{k}="{_escape(x)}"' for k, x in lab.items())
            lines.append(f"{family}{{{text}}} {_value(v)}")
    return "\n".join(lines) + "\n"


# -- writing and serving --------------------------------------------------------------------

def write_atomically(path: str, text: str) -> None:
    """text into path by a temporary file in the same directory renamed over it."""
    d, base = os.path.split(os.path.abspath(path))
    # not *.prom, so node_exporter skips it; one per thread (the last write is the main one)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = text.encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def parse_listen(text: str) -> tuple:
    """HOST:PORT, [V6]:PORT or :PORT (all interfaces) -> (family, sockaddr)."""
    import socket

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    if not host:
        return socket.AF_INET, ("0.0.0.0", int(port))
    if ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: {text!r}")
    return socket.AF_INET, (host, int(port))


class Listener:
    """A minimal HTTP/1.0 server for GET /metrics, one connection at a time, in a thread.

    It serves ``get()`` (the latest rendering, bytes) and nothing else: other paths get 404,
    other methods 405, a request head over MAX_REQUEST bytes or not in CONN_TIMEOUT seconds
    is dropped, garbage gets 400. It never reads tool state, so a client can slow down
    scrapes, not the tool.
    """

    def __init__(self, address: str, get):
        import socket

        fam, sa = parse_listen(address)
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(sa)
        self.sock.listen(8)
        self.address = self.sock.getsockname()
        self.get = get
        self.served = 0
        self.serve_cpu = 0.0  # CPU seconds of this thread's requests
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="tc-metrics-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        import signal
        import socket

        # process-directed signals (SIGALRM, SIGINT, ...) must reach the main thread, whose
        # blocking calls they interrupt
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while not self._stop:
            try:
                conn, _ = self.sock.accept()  # close() wakes it (shutdown)
            except OSError:
                if self._stop:
                    return
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            t0 = time.thread_time()
            try:
                self._serve(conn)
            except Exception:  # noqa: BLE001 - a bad client never ends the listener
                pass
            finally:
                conn.close()
                self.serve_cpu += time.thread_time() - t0

    def _serve(self, conn) -> None:
        import socket

        deadline = time.monotonic() + CONN_TIMEOUT
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            left = deadline - time.monotonic()
            if left <= 0 or len(head) > MAX_REQUEST:
                return self._reply(conn, 400, b"request head too long or too slow\n")
            conn.settimeout(left)
            try:
                chunk = conn.recv(MAX_REQUEST + 1 - len(head))
            except socket.timeout:
                return self._reply(conn, 408, b"request timeout\n")
            if not chunk:
                return
            head += chunk
        line = head.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
        if len(line) != 3 or not line[2].startswith(b"HTTP/"):
            return self._reply(conn, 400, b"bad request\n")
        method, target = line[0], line[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            return self._reply(conn, 404, b"only /metrics is here\n")
        if method not in (b"GET", b"HEAD"):
            return self._reply(conn, 405, b"GET /metrics\n", b"Allow: GET, HEAD\r\n")
        body = self.get()
        self.served += 1
        self._reply(conn, 200, body, b"", CONTENT_TYPE, head_only=method == b"HEAD")

    @staticmethod
    def _reply(conn, code, body, extra=b"", ctype="text/plain; charset=utf-8",
               head_only=False) -> None:
        import socket

        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  408: "Request Timeout"}[code]
        head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
        conn.settimeout(CONN_TIMEOUT)
        conn.sendall(head + extra + b"\r\n" + (b"" if head_only else body))
        if code == 400:
            # unread request bytes would make close() reset the connection, and the reply
            # with it: read a little more first (bounded)
            try:
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(0.1)
                for _ in range(16):
                    if not conn.recv(MAX_REQUEST):
                        break
            except OSError:
                pass

    def close(self) -> None:
        import socket

        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() at once (Linux)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(2.0)


class Exporter:
    """A tool's metrics: render() from the main thread (timer, scrape requests, exit); each
    rendering written to the textfile by a writer thread (file system latency stays out of
    the tool's loop) and served by the HTTP listener."""

    def __init__(self, tool: str, collect, path: str | None = None, listen: str | None = None,
                 labels: dict | None = None, start_time: float | None = None, warn=None):
        self.tool = tool
        self.collect = collect  # () -> the tool's stats dict
        self.path = path
        self.labels = dict(labels or {})
        self.start_time = start_time if start_time is not None else time.time()
        self.warn = warn or (lambda msg: None)
        self.text = b""
        self.rendered_at = 0.0  # time.monotonic() of the last rendering
        self.written_at = 0.0   # ... and of the last one handed to the file
        self.renders = 0
        self.render_cpu = 0.0   # CPU seconds of the renderings (main thread)
        self.write_cpu = 0.0    # CPU seconds of the file writes (writer thread)
        self.wanted = False     # a scrape asked for a fresh rendering
        self._fresh = threading.Event()
        self._main = threading.main_thread().ident
        self._warned = False
        self._cond = threading.Condition()
        self._to_write = None   # the rendering the writer thread has not written yet
        self._stopping = False
        self._writer = None
        self.listener = Listener(listen, self._get) if listen else None

    @property
    def render_s(self) -> float:
        """CPU seconds of the metrics in all threads: renderings, file writes, requests."""
        serve = self.listener.serve_cpu if self.listener is not None else 0.0
        return self.render_cpu + self.write_cpu + serve

    def start(self) -> None:
        """The first rendering, written here (a FILE that cannot be written fails now), then
        the writer thread and the listener."""
        try:
            self.render(strict=True)
        except OSError as e:
            from tcpcopylib.errors import TcError

            path, self.path = self.path, None
            raise TcError(f"cannot write --metrics {path}: {e.strerror or e}") from None
        if self.path:
            self._writer = threading.Thread(target=self._write_loop, name="tc-metrics-file",
                                            daemon=True)
            self._writer.start()
        if self.listener is not None:
            self.listener.start()

    def render(self, final: bool = False, exit_status: int | None = None, stats=None,
               strict: bool = False) -> None:
        t0 = time.thread_time()
        self.wanted = False
        try:
            if stats is None:
                stats = self.collect()
            text = render(self.tool, stats, self.labels, self.start_time, running=not final,
                          exit_status=exit_status, render_s=self.render_s)
        except Exception as e:  # noqa: BLE001 - metrics never end a tool
            if strict:
                raise
            self._warn_once(f"cannot render metrics: {type(e).__name__}: {e}")
            return
        self.text = text.encode()
        self.rendered_at = time.monotonic()
        self.renders += 1
        self._fresh.set()
        self.render_cpu += time.thread_time() - t0
        # the file on its own schedule (a scrape's rendering only goes to the listener)
        if self.path and (self._writer is None or final
                          or self.rendered_at - self.written_at >= INTERVAL - 0.05):
            self.written_at = self.rendered_at
            if self._writer is not None:
                with self._cond:
                    self._to_write = text
                    self._cond.notify()
            else:  # the first and the last: written before going on
                self._write(text, strict)

    def _write(self, text: str, strict: bool = False) -> None:
        t0 = time.thread_time()
        try:
            write_atomically(self.path, text)
        except OSError as e:
            if strict:
                raise
            self._warn_once(f"cannot write --metrics {self.path}: {e.strerror or e}")
        finally:
            self.write_cpu += time.thread_time() - t0

    def _write_loop(self) -> None:
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            with self._cond:
                while self._to_write is None and not self._stopping:
                    self._cond.wait()
                text, self._to_write = self._to_write, None
                if text is None:
                    return
            self._write(text)

    def due(self) -> bool:
        """A scrape asked, or INTERVAL since the last rendering for the file (or at all)."""
        last = self.written_at if self.path else self.rendered_at
        return self.wanted or time.monotonic() - last >= INTERVAL - 0.05

    def _get(self) -> bytes:
        """The listener thread's view: the last rendering, refreshed if older than FRESH."""
        if time.monotonic() - self.rendered_at > FRESH:
            import signal

            self._fresh.clear()
            self.wanted = True
            try:
                signal.pthread_kill(self._main, signal.SIGALRM)
                self._fresh.wait(WAIT)
            except (OSError, ProcessLookupError):
                pass
        return self.text

    def _warn_once(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            self.warn(f"warning: {msg}")

    def close(self) -> None:
        """Stop the threads (what the writer holds is written first); render() after this
        writes the file itself."""
        if self.listener is not None:
            self.listener.close()
        w, self._writer = self._writer, None
        if w is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            w.join(5.0)
