"""tc-diff's reports: per-endpoint latency percentiles and the text summary."""

from __future__ import annotations

import math

VERDICTS = ("same", "different", "missing", "no_original_response")
PCTS = (50, 90, 99)


def percentile(sorted_values: list, p: float):
    """Nearest-rank percentile of an already sorted list (None if empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def endpoint_stats(results) -> dict:
    """{endpoint: {"n", verdict counts, "original"/"target": {"first"/"last": {"p50",...}},
    "shift_ms": target p50 - original p50 of the last response byte, "cdf": sorted values}}"""
    groups: dict = {}
    for r in results:
        groups.setdefault(r.endpoint, []).append(r)
    out = {}
    for ep, rs in sorted(groups.items()):
        st: dict = {"n": len(rs)}
        for v in VERDICTS:
            st[v] = sum(r.verdict == v for r in rs)
        samples = {}
        for side, attr in (("original", "lat_orig"), ("target", "lat_target")):
            st[side] = {}
            for which in ("first", "last"):
                # latency only where both sides have it: the same exchanges on each side
                vals = sorted(getattr(r, attr)[which] for r in rs
                              if r.lat_orig[which] is not None and
                              r.lat_target[which] is not None)
                st[side][which] = {f"p{p}": percentile(vals, p) for p in PCTS}
                samples[(side, which)] = vals
        o, t = st["original"]["last"]["p50"], st["target"]["last"]["p50"]
        st["shift_ms"] = None if o is None or t is None else round(t - o, 3)
        st["cdf"] = {"original": samples[("original", "last")],
                     "target": samples[("target", "last")]}
        out[ep] = st
    return out


def totals(results) -> dict:
    t = {v: 0 for v in VERDICTS}
    for r in results:
        t[r.verdict] = t.get(r.verdict, 0) + 1
    t["exchanges"] = len(results)
    t["noise_fields"] = sorted({d.field for r in results for d in r.diffs if d.noise})
    return t


def _f(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def summary_lines(results, differ, max_listed: int = 20) -> list:
    t = totals(results)
    lines = [f"{t['exchanges']} exchanges on {differ.connections} connections: "
             f"{t['same']} same, {t['different']} different, {t['missing']} missing"
             + (f", {t['no_original_response']} without an original response"
                if t["no_original_response"] else "")
             + (f"; {differ.unmatched_sessions} session(s) matched no captured connection"
                if differ.unmatched_sessions else "")]
    if t["noise_fields"]:
        shown = ", ".join(t["noise_fields"][:12])
        more = len(t["noise_fields"]) - 12
        lines.append(f"noise (left out of the verdicts): {shown}"
                     + (f" and {more} more" if more > 0 else ""))
    lines.append("endpoint: exchanges, different, missing; last response byte p50/p90/p99 "
                 "ms original -> target (shift of p50)")
    for ep, st in endpoint_stats(results).items():
        o, g = st["original"]["last"], st["target"]["last"]
        lines.append(f"  {ep}: {st['n']}, {st['different']}, {st['missing']}; "
                     f"{_f(o['p50'])}/{_f(o['p90'])}/{_f(o['p99'])} -> "
                     f"{_f(g['p50'])}/{_f(g['p90'])}/{_f(g['p99'])}"
                     f" ({'+' if (st['shift_ms'] or 0) >= 0 else ''}{_f(st['shift_ms'])})")
    bad = [r for r in results if r.verdict in ("different", "missing")]
    for r in bad[:max_listed]:
        what = ", ".join(d.field for d in r.diffs if not d.noise) if r.verdict == \
            "different" else f"no response from the target (session {r.outcome})"
        lines.append(f"  {r.verdict}: {r.client} #{r.index} {r.request}: {what}")
    if len(bad) > max_listed:
        lines.append(f"  ... and {len(bad) - max_listed} more (see the JSON lines)")
    return lines
