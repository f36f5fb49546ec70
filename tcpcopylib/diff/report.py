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


def endpoint_entry(n: int, counts: dict, pairs: dict) -> dict:
    """One endpoint's statistics from its exchange count, verdict counts and latency
    pairs ({"first"/"last": [(original ms, target ms)]}, exchanges with both sides)."""
    st: dict = {"n": n}
    for v in VERDICTS:
        st[v] = counts.get(v, 0)
    samples = {}
    for k, side in enumerate(("original", "target")):
        st[side] = {}
        for which in ("first", "last"):
            vals = sorted(p[k] for p in pairs[which])
            st[side][which] = {f"p{p}": percentile(vals, p) for p in PCTS}
            samples[(side, which)] = vals
    o, t = st["original"]["last"]["p50"], st["target"]["last"]["p50"]
    st["shift_ms"] = None if o is None or t is None else round(t - o, 3)
    st["cdf"] = {"original": samples[("original", "last")],
                 "target": samples[("target", "last")]}
    return st


def latency_pairs(r, which: str):
    """(original, target) ms of one exchange, or None unless both are measured."""
    o, t = r.lat_orig[which], r.lat_target[which]
    return None if o is None or t is None else (o, t)


def endpoint_stats(results) -> dict:
    """{endpoint: {"n", verdict counts, "original"/"target": {"first"/"last": {"p50",...}},
    "shift_ms": target p50 - original p50 of the last response byte, "cdf": sorted values}}"""
    groups: dict = {}
    for r in results:
        groups.setdefault(r.endpoint, []).append(r)
    out = {}
    for ep, rs in sorted(groups.items()):
        counts: dict = {}
        for r in rs:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        # latency only where both sides have it: the same exchanges on each side
        pairs = {w: [p for p in (latency_pairs(r, w) for r in rs) if p] for w in
                 ("first", "last")}
        out[ep] = endpoint_entry(len(rs), counts, pairs)
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


def digest(results) -> dict:
    """What the summary, --html and --stats-json show: {"totals", "endpoints", "bad" (the
    different and missing exchanges), "bad_total"}. tc-diff --live builds the same from
    its bounded aggregate (tcpcopylib.diff.live.Aggregate)."""
    bad = [r for r in results if r.verdict in ("different", "missing")]
    return {"totals": totals(results), "endpoints": endpoint_stats(results), "bad": bad,
            "bad_total": len(bad)}


def summary_lines(results, differ, max_listed: int = 20, dig: dict | None = None) -> list:
    """The text summary, of ``results`` or of a digest ``dig`` (then results is unused)."""
    dig = dig or digest(results)
    t = dig["totals"]
    lines = [f"{t['exchanges']} exchanges on {differ.connections} connections: "
             f"{t['same']} same, {t['different']} different, {t['missing']} missing"
             + (f", {t['no_original_response']} without an original response"
                if t["no_original_response"] else "")
             + (f"; {differ.unmatched_sessions} session(s) matched no captured connection"
                if differ.unmatched_sessions else "")]
    if dig.get("relabelled"):
        lines.append(f"{dig['relabelled']} exchange(s) written as different are the same "
                     f"with the noise learned after them (counted as same here)")
    if t["noise_fields"]:
        shown = ", ".join(t["noise_fields"][:12])
        more = len(t["noise_fields"]) - 12
        lines.append(f"noise (left out of the verdicts): {shown}"
                     + (f" and {more} more" if more > 0 else ""))
    lines.append("endpoint: exchanges, different, missing; last response byte p50/p90/p99 "
                 "ms original -> target (shift of p50)")
    for ep, st in dig["endpoints"].items():
        o, g = st["original"]["last"], st["target"]["last"]
        lines.append(f"  {ep}: {st['n']}, {st['different']}, {st['missing']}; "
                     f"{_f(o['p50'])}/{_f(o['p90'])}/{_f(o['p99'])} -> "
                     f"{_f(g['p50'])}/{_f(g['p90'])}/{_f(g['p99'])}"
                     f" ({'+' if (st['shift_ms'] or 0) >= 0 else ''}{_f(st['shift_ms'])})")
    bad, n_bad = dig["bad"], dig["bad_total"]
    for r in bad[:max_listed]:
        what = ", ".join(d.field for d in r.diffs if not d.noise) if r.verdict == \
            "different" else f"no response from the target (session {r.outcome})"
        lines.append(f"  {r.verdict}: {r.client} #{r.index} {r.request}: {what}")
    if n_bad > max_listed:
        lines.append(f"  ... and {n_bad - max_listed} more (see the JSON lines)")
    return lines
