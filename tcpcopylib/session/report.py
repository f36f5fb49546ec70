"""What tc-session tells about its sessions: the summary (--stats, --stats-every), the
counters (--stats-json, metrics) and, with -v, a line per session that ended badly.

The engine is a forged-mode Engine (tcpcopylib.session.engine) or one with the same
counters (socket mode's)."""

from __future__ import annotations


def summary_lines(engine, sent=None) -> list[str]:
    """The multi-line summary: its first line is engine.stats_line(), the --stats line;
    ``sent``: the runner.SendOutput of --send, if any (a line of tc-emit's counters)."""
    lines = engine.summary().splitlines()
    if engine.shed_reasons:
        lines.append("shed: " + ", ".join(f"{n} ({why})" for why, n in
                                          sorted(engine.shed_reasons.items())))
    late = lateness(engine)
    if late["count"]:
        lines.append(f"release lateness (against the recorded timing): {late['count']} client "
                     f"segments, p50 {_ms(quantile_bound(late, 0.5))}, p99 "
                     f"{_ms(quantile_bound(late, 0.99))}, max {_ms(quantile_bound(late, 1))}")
    if sent is not None:
        lines.append(f"sending: {sent.emitter.summary()}, ignored records {sent.ignored}")
    fb = engine.claims
    if fb is not None and (fb.reconnects or fb.refused):
        lines.append(f"feedback: {fb.reconnects} reconnect(s), {fb.refused} claim(s) "
                     f"refused by tc-feedback (owned by another client)")
    return lines


def stats_dict(engine, fb_lag=None, sent=None, admission=None) -> dict:
    """--stats-json: the --stats line, every counter and the outcome counts (see
    tc-session(1)); ``fb_lag``: the metrics.Histogram of the feedback lag, if any;
    ``sent``: the runner.SendOutput of --send, whose counters (tc-emit's) go under
    "emit"; ``admission``: the admission.Admission, whose limit and largest lag go under
    "admission"."""
    fb = engine.claims
    d = {"summary": engine.stats_line(), "active": engine.active(), **engine.st.as_dict(),
         "early_reuses": engine.alloc.early_reuses,
         "feedback_reconnects": fb.reconnects if fb is not None else 0,
         "feedback_claims_refused": fb.refused if fb is not None else 0,
         "shed_reasons": dict(engine.shed_reasons)}
    if admission is not None:
        d["admission"] = admission.as_dict()
    d["release_lateness"] = lateness(engine)
    if fb_lag is not None:
        d["feedback_lag"] = fb_lag.as_dict()
    if sent is not None:
        d["emit"] = {**sent.emitter.as_dict(), "ignored": sent.ignored}
    return d


def lateness(engine) -> dict:
    """How late client data went out against the time it was due (its recorded timing:
    when the engine was handed it; a gated request also waits for the response before it):
    the engine's histogram (engine.LATE_BOUNDS) as metrics.Histogram.as_dict() has it:
    cumulative counts keyed by the bucket's upper bound in seconds, count, sum_s."""
    from tcpcopylib.session.engine import LATE_BOUNDS

    counts = getattr(engine, "late", None) or [0] * (len(LATE_BOUNDS) + 1)
    buckets, cum = {}, 0
    for b, n in zip([repr(b / 1e9) for b in LATE_BOUNDS] + ["+Inf"], counts):
        cum += n
        buckets[b] = cum
    return {"buckets": buckets, "count": cum,
            "sum_s": round(getattr(engine, "late_sum", 0) / 1e9, 9)}


def quantile_bound(hist: dict, q: float) -> str:
    """The upper bound ("0.005", "+Inf") of the bucket of lateness() holding quantile q."""
    for bound, cum in hist["buckets"].items():
        if cum >= q * hist["count"]:
            return bound
    return "+Inf"


def _ms(bound: str) -> str:
    return "more than 5 s" if bound == "+Inf" else f"<= {float(bound) * 1000:g} ms"


def end_logger(warn, verbose: int):
    """An engine on_end(session, outcome) for -v: a line per failed session (-vv: per
    session; "(duplex)" after the outcome of a session that ran duplex), through warn(msg)."""
    from tcpcopylib.packet import endpoint_str
    from tcpcopylib.session.engine import DUPLEX, FAILURES, OUTCOMES

    def log_end(s, outcome) -> None:
        if outcome in FAILURES or verbose >= 2:
            hint = OUTCOMES[outcome]
            moved = (s.cip, s.cport) != s.ckey[:2]
            warn(f"session {s.sid} {endpoint_str(s.ckey[0], s.ckey[1])}"
                 + (f" (as {endpoint_str(s.cip, s.cport)})" if moved else "")
                 + f" -> {endpoint_str(s.tip, s.tport)}: {outcome}"
                 + (" (duplex)" if s.duplex == DUPLEX else "")
                 + (f" ({hint})" if hint and outcome in FAILURES else ""))

    return log_end
