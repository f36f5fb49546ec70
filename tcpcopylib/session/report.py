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
    if fb_lag is not None:
        d["feedback_lag"] = fb_lag.as_dict()
    if sent is not None:
        d["emit"] = {**sent.emitter.as_dict(), "ignored": sent.ignored}
    return d


def end_logger(warn, verbose: int):
    """An engine on_end(session, outcome) for -v: a line per failed session (-vv: per
    session), through warn(msg)."""
    from tcpcopylib.packet import endpoint_str
    from tcpcopylib.session.engine import FAILURES, OUTCOMES

    def log_end(s, outcome) -> None:
        if outcome in FAILURES or verbose >= 2:
            hint = OUTCOMES[outcome]
            moved = (s.cip, s.cport) != s.ckey[:2]
            warn(f"session {s.sid} {endpoint_str(s.ckey[0], s.ckey[1])}"
                 + (f" (as {endpoint_str(s.cip, s.cport)})" if moved else "")
                 + f" -> {endpoint_str(s.tip, s.tport)}: {outcome}"
                 + (f" ({hint})" if hint and outcome in FAILURES else ""))

    return log_end
