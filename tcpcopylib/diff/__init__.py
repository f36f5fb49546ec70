"""tc-diff: did the target answer like production? Response comparison and latency.

Modules: core (pairing, splitting, noise), http, resp, raw (the comparers), report (text
summary, percentiles), html (the --html page), model (Message, Diff).
"""
