#!/usr/bin/env python3
"""How punctual is tc-pace? Replay a synthetic recording and measure each record's lateness.

A reader stamps the arrival time of every chunk it reads from tc-pace's stdout. For each
record, d = arrival - (ts - first ts) / speed; the anchor (unknown outside tc-pace) is
estimated as min(d), and a record's lateness is d - min(d). Target: within 2 ms.

    python3 bench/bench_pace.py [--seconds 60] [--rate 100] [--speed 4]
"""

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cbor2  # noqa: E402

from tcpcopylib.records import LABEL, encode_section, header  # noqa: E402


def recording(seconds: float, per_second: float, seed: int = 0) -> list[dict]:
    """Packet records with Poisson arrivals over `seconds`, stamped like a capture."""
    rng = random.Random(seed)
    t0 = time.time_ns() - int(seconds * 1e9) - 3600 * 10**9
    recs, t = [], 0.0
    while t < seconds:
        recs.append({"t": "pkt", "ts": t0 + int(t * 1e9), "data": bytes(60)})
        t += rng.expovariate(per_second)
    return recs


def _arrivals(data: bytes, chunks: list[tuple[int, int]]) -> list[int]:
    """Arrival time of each record: the stamp of the chunk that completed it."""
    assert data.startswith(LABEL)
    bio = io.BytesIO(data)
    bio.seek(len(LABEL))
    dec = cbor2.CBORDecoder(bio)
    dec.decode()  # header
    out, ci = [], 0
    while bio.tell() < len(data):
        if data.startswith(LABEL, bio.tell()):
            bio.seek(bio.tell() + len(LABEL))
            dec.decode()
            continue
        dec.decode()
        end = bio.tell()
        while chunks[ci][0] < end:
            ci += 1
        out.append(chunks[ci][1])
    return out


def measure(recs: list[dict], args: list[str], speed: float) -> list[float]:
    """Run tc-pace ARGS over recs (a file, like a recording): each record's d (see above) in
    seconds, relative to the first record's."""
    env = dict(os.environ, PATH=f"{REPO / 'bin'}:{os.environ.get('PATH', '')}")
    with tempfile.TemporaryFile() as f:
        f.write(encode_section(header("bench")) + b"".join(cbor2.dumps(r) for r in recs))
        f.seek(0)
        p = subprocess.Popen([str(REPO / "bin" / "tc-pace"), *args], stdin=f,
                             stdout=subprocess.PIPE, env=env)
        fd = p.stdout.fileno()
        buf, chunks, total = bytearray(), [], 0
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                now = time.monotonic_ns()
                if not chunk:
                    break
                buf += chunk
                total += len(chunk)
                chunks.append((total, now))
        finally:
            p.stdout.close()
            rc = p.wait(timeout=60)
        if rc != 0:
            raise RuntimeError(f"tc-pace exited {rc}")
    arrivals = _arrivals(bytes(buf), chunks)
    ts0, a0 = recs[0]["ts"], arrivals[0]
    return [((a - a0) - (r["ts"] - ts0) / speed) / 1e9 for r, a in zip(recs, arrivals)]


def sleep_baseline(recs: list[dict], speed: float, limit_s: float = 5.0) -> list[float]:
    """The machine's own floor: overshoot of time.sleep on the same schedule, in-process."""
    ts0, t0, out = recs[0]["ts"], time.monotonic_ns(), []
    for r in recs:
        due = t0 + (r["ts"] - ts0) / speed
        if due - t0 > limit_s * 1e9:
            break
        now = time.monotonic_ns()
        if due > now:
            time.sleep((due - now) / 1e9)
        out.append((time.monotonic_ns() - due) / 1e9)
    return out


def _summary(late: list[float]) -> str:
    late = sorted(late)

    def pct(q):
        return late[min(len(late) - 1, int(q * len(late)))] * 1e3

    return (f"min {late[0] * 1e3:.3f}  p50 {pct(0.5):.3f}  p90 {pct(0.9):.3f}  "
            f"p99 {pct(0.99):.3f}  max {late[-1] * 1e3:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="length of the recording")
    ap.add_argument("--rate", type=float, default=100, help="records per second (Poisson)")
    ap.add_argument("--speed", type=float, default=4)
    a = ap.parse_args()
    recs = recording(a.seconds, a.rate, seed=42)
    t = time.monotonic()
    d = measure(recs, ["--speed", str(a.speed)], a.speed)
    late = [x - min(d) for x in d]
    wall = time.monotonic() - t
    print(f"tc-pace --speed {a.speed:g}: {len(recs)} records, {a.seconds:g} s recording, "
          f"{wall:.2f} s wall (ideal {a.seconds / a.speed:.2f} s)")
    print(f"lateness ms:          {_summary(late)}")
    print(f"first record {-min(d) * 1e3:.3f} ms late; records released before the first "
          f"record's schedule: {sum(x < 0 for x in d)}")
    print(f"within 2 ms: {sum(x <= 2e-3 for x in late) / len(late) * 100:.2f}%")
    base = sleep_baseline(recs, a.speed)
    print(f"time.sleep floor ms:  {_summary(base)}  (in-process, first 5 s; load "
          f"{os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
