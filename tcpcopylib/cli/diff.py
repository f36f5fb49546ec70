"""tc-diff: compare the target's responses with the original's, exchange by exchange."""

from __future__ import annotations

import json
import os

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import number_arg

EX_DIFFERENT = 1  # as diff(1) and cmp(1): the inputs differ


class Tool(BaseTool):
    name = "tc-diff"
    summary = ("Did the target answer like production? Pairs each replayed connection with "
               "its original, splits both into exchanges (HTTP/1.x, Redis RESP, or bytes "
               "by turns), compares the responses, and reports latency side by side: JSON "
               "lines per exchange on stdout, a summary on stderr.")
    epilog = """example:
  tc-readpcap prod.pcap | tc-session --target 10.0.0.5:8080 --sessions map.cbor -n 2 \\
      | tc-pace | tc-emit
  tc-intercept eth1 -F 'tcp and src port 8080' --payload all | tee replies.cbor \\
      | tc-feedback --listen tcp::36524                              (on the assistant)
  tc-diff prod.pcap --sessions map.cbor --target replies.cbor --html report.html > x.jsonl

exit status: 0 every exchange the same (noise aside), 1 differences or missing responses,
2 usage, 65 inputs that are not streams or captures or do not belong together, 66 an
input file that cannot be opened. See tc-diff(1)."""
    writes_records = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.differ = None
        self.results = []

    def add_arguments(self, p):
        p.add_argument("original", metavar="ORIGINAL",
                       help="the original capture with both directions: a pcap/pcapng file "
                            "or a record stream of pkt records")
        p.add_argument("-s", "--sessions", action="append", required=True, metavar="MAP",
                       help="session map: a stream with the sess records of tc-session "
                            "--sessions; repeat for another replay of the same capture "
                            "(noise learning)")
        p.add_argument("-t", "--target", action="append", required=True, metavar="REPLIES",
                       help="the target's replies: fb records of tc-intercept --payload all "
                            "(or a pcap of them); repeatable")
        p.add_argument("--proto", choices=("auto", "http", "resp", "raw"), default="auto",
                       help="how to split exchanges (default auto: by the first bytes)")
        p.add_argument("-i", "--ignore", action="append", default=[], metavar="FIELD",
                       help="leave differences in FIELD out of the verdicts (a glob: "
                            "'header:x-trace-*', 'body:$.meta.*', 'resp:value'); repeatable")
        p.add_argument("--no-learn", action="store_true",
                       help="do not learn noise from the other replays (copies, maps)")
        p.add_argument("--html", metavar="FILE",
                       help="also write a self-contained HTML report to FILE")
        p.add_argument("--list", type=number_arg(int, 0, True), default=20, metavar="N",
                       help="list at most N differing exchanges in the summary (default 20)")
        p.add_argument("--max-stream", type=number_arg(float, 0, False, 2047), default=64,
                       metavar="MB", help="keep at most MB of each direction of a connection "
                       "(default 64)")
        g = p.add_argument_group("live (streaming) mode, see tc-diff(1), LIVE")
        g.add_argument("--live", action="store_true", help="read the inputs side by side as "
                       "they grow (FIFOs, '-'); compare each connection once complete")
        g.add_argument("--follow", type=number_arg(float, 0, False), metavar="S", help="read "
                       "regular files as they grow, until none grew for S s (implies --live)")
        g.add_argument("--wait", type=number_arg(float, 0, True), default=5.0, metavar="S",
                       help="wait S s more (map's clock) for a session or copy (default 5)")
        g.add_argument("--idle", type=number_arg(float, 0, False), default=10.0, metavar="S",
                       help="a connection quiet for S s is complete (default 10)")
        g.add_argument("--hold", type=number_arg(int, 1, True), default=10000, metavar="N",
                       help="at most N connections wait for partners (default 10000)")

    def run(self, args):
        from tcpcopylib.diff.core import Differ, Options
        from tcpcopylib.diff.report import summary_lines

        for path in [args.original, *args.sessions, *args.target]:
            if path != "-" and not os.path.exists(path):
                from tcpcopylib.errors import NoInputError

                raise NoInputError(f"{path}: no such file")
        opts = Options(args.proto, args.ignore, int(args.max_stream * 2**20), not args.no_learn)
        out = os.fdopen(os.dup(self.stdout_fd), "w", buffering=1 << 16)
        with out:
            def emit(results):
                for r in results:
                    out.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")
            if args.live or args.follow is not None:
                self.run_live(args, opts, emit, out.flush)
            else:
                self.differ = Differ(opts)
                self.results = self.differ.run(args.original, args.sessions, args.target)
                emit(self.results)
        dig = self.digest()
        for line in summary_lines(self.results, self.differ, args.list, dig):
            self.warn(line)
        if args.html:
            from tcpcopylib.diff.html import write_html

            write_html(args.html, self.results, self.differ, dig)
            self.info(f"wrote {args.html}")
        return EX_DIFFERENT if dig["bad_total"] else 0

    def run_live(self, args, opts, emit, flush):
        import signal

        from tcpcopylib.cli.common import Interrupted
        from tcpcopylib.diff import live

        self.differ = live.LiveDiffer(opts, emit, args.wait, args.idle, args.hold)
        try:
            live.run_inputs(self.differ, args.original, args.sessions, args.target,
                            args.follow, flush)
        except Interrupted:  # Ctrl-C ends the inputs: compare what came, then report
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        self.differ.finish()
        flush()

    def digest(self):
        from tcpcopylib.diff.report import digest

        if hasattr(self.differ, "agg"):  # live: the bounded aggregate, final noise applied
            return self.differ.agg.digest(self.differ.noise)
        return digest(self.results)

    def stats_line(self):
        if self.differ is None:
            return None
        if hasattr(self.differ, "agg"):
            return f"{self.differ.status()}, {self.elapsed():.2f} s"
        from tcpcopylib.diff.report import totals

        t = totals(self.results)
        return (f"{t['exchanges']} exchanges: {t['same']} same, {t['different']} different, "
                f"{t['missing']} missing, {self.elapsed():.2f} s")

    def stats_dict(self):
        if self.differ is None:
            return super().stats_dict()
        dig = self.digest()
        eps = {k: {x: y for x, y in v.items() if x != "cdf"}
               for k, v in dig["endpoints"].items()}
        live = {"live": self.differ.stats()} if hasattr(self.differ, "agg") else {}
        return {**dig["totals"], "endpoints": eps, **live, "summary": self.stats_line()}


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
