#!/usr/bin/env python3
"""tc-session CPU cost per session and per client packet, without a lab.

    python3 bench/bench_engine.py [--sessions N] [--requests K] [--rate R] [--repeat N]
                                  [--cases engine,cli,cli-asap,nofb] [--compare DIR]
                                  [--profile FILE]

The sessions are bench_session.py's generated short HTTP sessions. The target is a fake
TCP server (FakeTarget: answers a SYN with a SYN-ACK, every request with the captured
response length, a FIN with a FIN-ACK; replies are headers only with their original
length, as tc-intercept sends them). Cases:

  engine    the Engine alone, in process, with a fake clock; the fake target's own time
            is left out (CPU us per session and per client packet);
  cli       tc-session as a process, input a record file paced at --rate sessions/s of
            recording time, feedback from a fake tc-feedback process that is the target
            (the whole tc-session path: select loop, stream parsing, record encoding,
            DueQueue, FeedbackClient decoding); CPU of tc-session only (wait4), less
            that of a run on an empty input (interpreter start-up);
  cli-asap  the same with --asap (input as fast as it can be read);
  nofb      tc-session --asap --no-feedback (parsing and encoding only; no session gets
            established).

--compare DIR measures another checkout alternately (the "before" column); --compare pure:
          this checkout with TCPCOPY_PURE=1 (its pure-Python engine against its compiled
          one, see setup.py).
--memory: bytes per idle session (every session open, before its FIN; tracemalloc), and
          the resident memory growth with them all open (RSS; try --sessions 100000).
--check DIR: is what the engine sends (bytes, session ids, times) the same as DIR's engine?
          (--check pure: the same as this checkout's pure-Python engine?)
--profile FILE: cProfile of one run of the first case written to FILE (this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGET = "10.200.9.1:8080"
TS0 = 1_700_000_000 * 10**9
SEC_NS = 10**9


# -- the fake target ---------------------------------------------------------------------------

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


class FakeTarget:
    """A TCP server per 4-tuple: SYN -> SYN-ACK, data -> ACK + response, FIN -> FIN-ACK.

    ``packet(data)`` returns the replies to one IPv4 datagram the target receives, as
    (headers, original length) pairs. Checksums are left 0 (tc-session does not check
    them), so the fake target stays cheap next to what is measured.
    """

    def __init__(self, resp_len):
        self.resp_len = resp_len
        self.conns = {}

    @staticmethod
    def _reply(src, dst, sport, dport, seq, ack, flags, opts=b""):
        tl = 40 + len(opts)
        return (_IP4.pack(0x45, 0, tl, 0, 0x4000, 64, 6, 0, src, dst)
                + _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                            (20 + len(opts)) << 2, flags, 65535, 0, 0) + opts)

    def packet(self, data):
        ihl = (data[0] & 15) * 4
        tot = (data[2] << 8) | data[3]
        src, dst = data[12:16], data[16:20]
        sport, dport, seq, _ack, off, f, _w, _c, _u = _TCP.unpack_from(data, ihl)
        plen = tot - ihl - (off >> 4) * 4
        key = (src, sport)
        if f & 0x04:  # RST
            self.conns.pop(key, None)
            return ()
        if f & 0x02:  # SYN
            isn = (sport * 7777 + 12345) & 0xFFFFFFFF
            self.conns[key] = c = [seq + 1, isn + 1]
            r = self._reply(dst, src, dport, sport, isn, c[0], 0x12, b"\x02\x04\x05\xb4")
            return ((r, len(r)),)
        c = self.conns.get(key)
        if c is None:
            return ()
        out = []
        if plen:
            c[0] = seq + plen
            r = self._reply(dst, src, dport, sport, c[1], c[0], 0x18)
            out.append((r, len(r) + self.resp_len))
            c[1] += self.resp_len
        if f & 0x01:  # FIN
            c[0] = seq + plen + 1
            r = self._reply(dst, src, dport, sport, c[1], c[0], 0x11)
            out.append((r, len(r)))
            c[1] += 1
            del self.conns[key]
        return out


def client_packets(sessions, rate, requests):
    """[(ts ns, IP datagram)] of the generated client packets, and the response length."""
    sys.path.insert(0, str(HERE))
    import bench_session

    ev = bench_session.session_events(sessions, rate, requests)
    resp_len = len(bench_session.http_exchange(0, 0)[1])
    return [(TS0 + round((ts - 1_700_000_000.0) * 1e9), frame[14:]) for ts, frame, c in ev
            if c], resp_len


# -- engine case (run in a child with the measured checkout first on sys.path) -----------------

def engine_child(repo, sessions, rate, requests, profile=None):
    sys.path.insert(0, str(repo))
    from tcpcopylib.session import Config, Engine, Mapper, parse_target

    pkts, resp_len = client_packets(sessions, rate, requests)
    target = FakeTarget(resp_len)
    out = []
    eng = Engine(Mapper(parse_target(TARGET, False)), lambda d, sid, now: out.append(d),
                 Config())
    clock = time.process_time_ns
    seen = []  # what the target got: its cost is measured again alone and left out

    def serve(now):
        while out:
            batch = out[:]
            out.clear()
            seen.extend(batch)
            for d in batch:
                for data, n in target.packet(d):
                    eng.feedback_packet(data, now, n)

    def run():
        for ts, data in pkts:
            now = ts - TS0
            eng.on_timer(now)
            serve(now)
            eng.client_packet(data, now)
            serve(now)
        for _ in range(100 * sessions):
            d = eng.next_deadline()
            if d is None:
                break
            eng.on_timer(d)
            serve(d)
        eng.close_all(eng.now)

    t0 = clock()
    if profile:
        import cProfile

        cProfile.runctx("run()", globals(), {"run": run}, profile)
    else:
        run()
    cpu = clock() - t0
    again = FakeTarget(resp_len)
    t0 = clock()
    for d in seen:
        again.packet(d)
    cpu -= clock() - t0
    oc = eng.st.outcomes
    print(json.dumps({"cpu_ns": cpu, "pkts": len(pkts),
                      "completed": oc["completed"] + oc["reconnected"]}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(repo, sessions, rate, requests, rss=False):
    """Bytes (tracemalloc) per idle session: every session open, its FIN not sent yet.
    With rss: the process's resident memory growth instead, no tracemalloc (the fake
    target's per-connection state included: an upper bound)."""
    sys.path.insert(0, str(repo))
    import gc
    import tracemalloc

    from tcpcopylib.session import Config, Engine, Mapper, parse_target

    pkts, resp_len = client_packets(sessions, rate, requests)
    pkts = [(ts, d) for ts, d in pkts if not d[33] & 0x01]  # no client FIN
    target = FakeTarget(resp_len)
    out = []

    class Claims:
        def claim(self, *tup):
            pass

        release = claim

    eng = Engine(Mapper(parse_target(TARGET, False)), lambda d, sid, now: out.append(d),
                 Config(), Claims())
    gc.collect()
    base = _rss()
    if not rss:
        tracemalloc.start()
    now = 0
    for ts, data in pkts:
        now = ts - TS0
        eng.on_timer(now)
        eng.client_packet(data, now)
        while out:
            batch = out[:]
            out.clear()
            for d in batch:
                for r, n in target.packet(d):
                    eng.feedback_packet(r, now, n)
    end = now + SEC_NS  # delayed ACKs and the like are over
    while (d := eng.next_deadline()) is not None and d <= end:
        eng.on_timer(d)
    out.clear()
    if rss:
        print(json.dumps({"rss": _rss() - base, "sessions": eng.active()}))
        return
    target = None
    gc.collect()
    cur = tracemalloc.get_traced_memory()[0]
    print(json.dumps({"bytes": cur, "sessions": eng.active()}))


def trace_child(repo):
    """A digest of everything the engine sends (bytes, sid, time) and counts, over lossy
    and lossless runs, with -n copies, with the recording's pauses stretched (delayed ACKs,
    gating by quiet time): equal digests = the same behaviour, packet for packet."""
    sys.path.insert(0, str(repo))
    import hashlib
    import zlib

    from tcpcopylib.session import Config, Engine, Mapper, parse_target

    digest = hashlib.sha256()
    for copies, drop, sessions, requests, stretch in ((1, 0.3, 400, 2, 1), (3, 0.2, 200, 3, 1),
                                                      (2, 0.0, 300, 1, 1), (1, 0.1, 200, 3, 80)):
        pkts, resp_len = client_packets(sessions, 3000, requests)
        pkts = [(TS0 + (ts - TS0) * stretch, d) for ts, d in pkts]
        target = FakeTarget(resp_len)
        out = []

        def emit(d, sid, now):
            out.append(d)
            digest.update(d)
            digest.update(f"{sid} {now}".encode())

        eng = Engine(Mapper(parse_target(TARGET, False)), emit,
                     Config(copies=copies, gate_timeout=300_000_000))

        def serve(now):
            while out:
                batch = out[:]
                out.clear()
                for d in batch:
                    if zlib.crc32(d) % 1000 < drop * 1000:
                        continue  # lost on the way
                    for data, n in target.packet(d):
                        eng.feedback_packet(data, now + 1000, n)

        def timers(until):
            while (d := eng.next_deadline()) is not None and (until is None or d <= until):
                eng.on_timer(d)
                serve(d)

        for ts, data in pkts:
            timers(ts - TS0)
            eng.client_packet(data, ts - TS0)
            serve(ts - TS0)
        timers(None)
        eng.close_all(eng.now)
        digest.update(json.dumps(eng.st.as_dict(), sort_keys=True).encode())
    print(digest.hexdigest())


# -- the fake tc-feedback process (cli cases) ----------------------------------------------------

def target_child(repo, sock_path, resp_len):
    """Serve feedback on sock_path; tc-session's output on stdin is what the target gets."""
    sys.path.insert(0, str(repo))
    import cbor2

    from tcpcopylib.intercept import encode_fb
    from tcpcopylib.records import LABEL, StreamDecoder

    target = FakeTarget(resp_len)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(sock_path)
    ls.listen(1)
    print("ready", flush=True)
    ls.settimeout(30)
    conn, _ = ls.accept()
    conn.setblocking(True)
    conn.sendall(LABEL + cbor2.dumps({"t": "header", "v": 1, "tool": "bench-target"}))
    conn.setblocking(False)
    dec = StreamDecoder("tc-session output")
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "in")
    sel.register(conn, selectors.EVENT_READ, "fb")
    buf = b""
    pending = bytearray()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if pending:
            try:
                n = conn.send(pending)
                del pending[:n]
            except BlockingIOError:
                pass
        for key, _ in sel.select(0.01 if pending else 1.0):
            if key.data == "fb":
                try:
                    if not conn.recv(1 << 16):
                        sel.unregister(conn)
                except BlockingIOError:
                    pass
                continue
            chunk = os.read(0, 1 << 17)
            if not chunk:
                return
            buf = buf + chunk if buf else chunk
            items, pos, err = dec.parse(buf)
            if err:
                raise err
            buf = buf[pos:]
            now = time.time_ns()
            for rec in items:
                if rec.get("t") == "pkt":
                    for data, n in target.packet(rec["data"]):
                        pending += encode_fb(now, data, n)


# -- cli cases -------------------------------------------------------------------------------

def write_records(repo, path, pkts, rate_scale):
    sys.path.insert(0, str(repo))
    import cbor2

    from tcpcopylib.records import LABEL

    with open(path, "wb") as f:
        f.write(LABEL + cbor2.dumps({"t": "header", "v": 1, "tool": "bench"}))
        f.write(b"".join(cbor2.dumps({"t": "pkt", "ts": ts, "data": d}) for ts, d in pkts))


def run_cli(repo, case, records, resp_len, tmp, timeout=300, profile=None):
    """(CPU s of tc-session, wall s, completed sessions)."""
    stats = tmp / "stats.json"
    stats.unlink(missing_ok=True)
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    argv = [sys.executable, *prof, str(repo / "bin" / "tc-session"), "--target", TARGET,
            "--stats-json", str(stats), "--drain", "10"]
    if case in ("cli-asap", "nofb"):
        argv.append("--asap")
    target = None
    if case == "nofb":
        argv += ["--no-feedback", str(records)]
        out = subprocess.DEVNULL
    else:
        sock = tmp / "fb.sock"
        sock.unlink(missing_ok=True)
        r, w = os.pipe()
        target = subprocess.Popen([sys.executable, __file__, "_target", str(REPO), str(sock),
                                   str(resp_len)], stdin=r, stdout=subprocess.PIPE)
        os.close(r)
        target.stdout.readline()
        argv += ["--feedback", f"unix:{sock}", str(records)]
        out = w
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE)
    if target is not None:
        os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
        time.sleep(0.01)
    wall = time.monotonic() - t0
    err = p.stderr.read().decode()
    if target is not None:
        try:
            target.wait(10)
        except subprocess.TimeoutExpired:
            target.kill()
            target.wait()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tc-session failed: {err}")
    st = json.loads(stats.read_text())
    oc = st["outcomes"]
    # the share of requests tc-session released within 1 ms of due (a CPU figure means
    # little without it: releasing late in batches is cheaper)
    late = st.get("release_lateness", {}).get("buckets") or {}
    on_time = 100.0 * late["0.001"] / late["+Inf"] if late.get("+Inf") else None
    return ru.ru_utime + ru.ru_stime, wall, oc["completed"] + oc["reconnected"], on_time


class _Build:
    """Run the tools of a checkout pure-Python (TCPCOPY_PURE=1) or as built."""

    def __init__(self, pure):
        self.pure = pure

    def __enter__(self):
        self.old = os.environ.pop("TCPCOPY_PURE", None)
        if self.pure:
            os.environ["TCPCOPY_PURE"] = "1"

    def __exit__(self, *exc):
        os.environ.pop("TCPCOPY_PURE", None)
        if self.old is not None:
            os.environ["TCPCOPY_PURE"] = self.old


def _checkout(arg):
    """(name, dir, pure) of a --compare/--check argument."""
    if str(arg) == "pure":
        return "pure", REPO, True
    return "compare", arg.resolve(), False


def measure(repo, case, a, records, resp_len, tmp):
    """(CPU us per session, CPU us per client packet, completed %, % of requests released
    within 1 ms of due or None)."""
    n = a.sessions
    if case == "engine":
        r = subprocess.run([sys.executable, __file__, "_engine", str(repo), str(n),
                            str(a.rate), str(a.requests)], capture_output=True, text=True,
                           check=True, timeout=600)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        cpu, pkts, done = d["cpu_ns"] / 1e9, d["pkts"], d["completed"]
        on_time = None
    else:
        cpu, _wall, done, on_time = run_cli(repo, case, records, resp_len, tmp)
        cpu -= run_cli(repo, "nofb", tmp / "empty.cbor", resp_len, tmp)[0]  # start-up
        pkts = a.pkts
    return cpu / n * 1e6, cpu / pkts * 1e6, 100.0 * done / n, on_time


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_engine":
        engine_child(Path(argv[1]), int(argv[2]), float(argv[3]), int(argv[4]),
                     argv[5] if len(argv) > 5 else None)
        return 0
    if argv and argv[0] == "_trace":
        trace_child(Path(argv[1]))
        return 0
    if argv and argv[0] == "_memory":
        memory_child(Path(argv[1]), int(argv[2]), float(argv[3]), int(argv[4]),
                     len(argv) > 5 and argv[5] == "rss")
        return 0
    if argv and argv[0] == "_target":
        target_child(Path(argv[1]), argv[2], int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--rate", type=float, default=2000.0,
                    help="sessions/s of recording time (cli case paces at it)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--cases", default="engine,cli,cli-asap,nofb")
    ap.add_argument("--compare", metavar="DIR", type=Path)
    ap.add_argument("--check", metavar="DIR", type=Path,
                    help="only compare what the engine sends with DIR's engine, packet for "
                         "packet (lossy and lossless runs, copies); exit 1 if they differ")
    ap.add_argument("--memory", action="store_true",
                    help="also print the bytes per idle session (tracemalloc)")
    ap.add_argument("--profile", metavar="FILE",
                    help="cProfile one run of the first case to FILE (this checkout)")
    a = ap.parse_args(argv)
    if a.check:
        _, other, pure = _checkout(a.check)
        digests = []
        for r, p in ((REPO, False), (other, pure)):
            with _Build(p):
                digests.append(subprocess.run([sys.executable, __file__, "_trace", str(r)],
                                              check=True, capture_output=True,
                                              text=True).stdout.split()[-1])
        same = digests[0] == digests[1]
        print(f"engine output {'identical to' if same else 'DIFFERS from'} {a.check}: "
              f"{digests[0][:16]} {digests[1][:16]}")
        return 0 if same else 1
    case0 = a.cases.split(",")[0]
    if a.profile and case0 == "engine":
        engine_child(REPO, a.sessions, a.rate, a.requests, a.profile)
        return 0
    pkts, resp_len = client_packets(a.sessions, a.rate, a.requests)
    a.pkts = len(pkts)
    repos = [("this", REPO, False)] + ([_checkout(a.compare)] if a.compare else [])
    print(f"{a.sessions} sessions x {a.requests} requests, {a.pkts} client packets "
          f"({a.pkts / a.sessions:.1f}/session); median of {a.repeat}; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    cols = "".join(f" {name + ' us/sess':>16} {name + ' us/pkt':>14} {'done%':>6}"
                   f" {'<=1ms%':>6}" for name, *_ in repos)
    print(f"{'case':<9}{cols}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = tmp / "in.cbor"
        write_records(REPO, records, pkts, 1)
        write_records(REPO, tmp / "empty.cbor", [], 1)
        if a.profile:
            print(run_cli(REPO, case0, records, resp_len, tmp, profile=a.profile))
            return 0
        for case in a.cases.split(","):
            runs = {name: [] for name, *_ in repos}
            for _ in range(a.repeat):
                for name, repo, pure in repos:  # interleaved
                    with _Build(pure):
                        runs[name].append(measure(repo, case, a, records, resp_len, tmp))
            row = ""
            for name, *_ in repos:
                us_s = statistics.median(r[0] for r in runs[name])
                us_p = statistics.median(r[1] for r in runs[name])
                done = min(r[2] for r in runs[name])
                on_time = [r[3] for r in runs[name] if r[3] is not None]
                row += (f" {us_s:>16.1f} {us_p:>14.2f} {done:>6.1f} "
                        + (f"{statistics.median(on_time):>6.1f}" if on_time else f"{'-':>6}"))
            print(f"{case:<9}{row}", flush=True)
    if a.memory:
        row = ""
        for name, repo, pure in repos:
            env = {k: v for k, v in os.environ.items() if k != "TCPCOPY_PURE"}
            if pure:
                env["TCPCOPY_PURE"] = "1"
            r = subprocess.run([sys.executable, __file__, "_memory", str(repo), str(a.sessions),
                                str(a.rate), str(a.requests)], capture_output=True, text=True,
                               check=True, timeout=600, env=env)
            d = json.loads(r.stdout.strip().splitlines()[-1])
            r = subprocess.run([sys.executable, __file__, "_memory", str(repo), str(a.sessions),
                                str(a.rate), str(a.requests), "rss"], capture_output=True,
                               text=True, check=True, timeout=600, env=env)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            row += (f" {name}: {d['bytes'] / max(1, d['sessions']):.0f} bytes/idle session; "
                    f"RSS +{m['rss'] / 2**20:.1f} MB with {m['sessions']} open "
                    f"(fake target included)")
        print(f"memory  {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
