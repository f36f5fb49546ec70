"""tc-select: keep or drop whole sessions by their first request (HTTP, redis, bytes)."""

import argparse

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import UsageError


class _RuleAction(argparse.Action):
    """--keep/--drop/-f append to args.rules in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        rules = getattr(namespace, "rules", None) or []
        rules.append((self.const, values))
        namespace.rules = rules


class Tool(BaseTool):
    name = "tc-select"
    summary = ("Keep or drop whole sessions, decided on the first request of each: HTTP\n"
               "method and URL, header values, redis commands, a regular expression on the\n"
               "bytes. A session goes on whole or not at all; other records pass unchanged.\n"
               "See tc-select(1).")
    epilog = ("examples:\n"
              "  tc-readpcap prod.pcap | tc-select --keep 'http:POST /api/*' \\\n"
              "      --keep redis:SET,INCR | tc-session --target 10.0.0.5:8080 | tc-emit\n"
              "  tc-capture eth0 | tc-select --drop 'http:GET /health*' | tc-session ...")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.selector = None
        self.records_in = 0

    def add_arguments(self, p):
        p.add_argument("input", nargs="?", default="-", metavar="FILE",
                       help="record stream to read (default: stdin)")
        p.add_argument("--keep", metavar="RULE", action=_RuleAction, const="keep",
                       help="keep the sessions whose first request matches RULE "
                            "(http:METHODS GLOB, header:NAME=GLOB, redis:CMD[,CMD], "
                            "bytes:REGEX); repeatable, the first rule that matches decides")
        p.add_argument("--drop", metavar="RULE", action=_RuleAction, const="drop",
                       help="drop the sessions whose first request matches RULE")
        p.add_argument("-f", "--rules", metavar="FILE", action=_RuleAction, const="file",
                       help="read rules from FILE, one a line: keep RULE or drop RULE")
        p.add_argument("--default", choices=("keep", "drop"),
                       help="what happens to a session no rule matches (default: drop if "
                            "there is a --keep rule, else keep)")
        p.add_argument("-p", "--port", type=int, action="append", default=[],
                       metavar="PORT", help="a server port (tells directions apart when "
                       "a connection's SYN was not captured); repeatable")
        from tcpcopylib.cli.rewrite import size_arg

        p.add_argument("--max-hold", type=size_arg, default=1 << 20, metavar="BYTES",
                       help="client bytes held per connection while its first request "
                            "arrives; past it the decision is made on what is there "
                            "(suffixes k, M, G; default 1M)")

    def run(self, args):
        from tcpcopylib.filters.select import (SelectRule, Selector, filtered_record,
                                               parse_rules_file)
        from tcpcopylib.records import HEADER, RecordReader, StageWriter
        from tcpcopylib.wire import T_PKT

        rules = []
        for action, value in getattr(args, "rules", None) or []:
            if action == "file":
                rules += parse_rules_file(value)
            else:
                rules.append(SelectRule(action, value))
        if not rules:
            raise UsageError("no rules: give --keep RULE, --drop RULE or -f FILE")
        if not all(0 < p < 65536 for p in args.port):
            raise UsageError("--port: a port is 1..65535")
        default = None if args.default is None else args.default == "keep"
        self.selector = sel = Selector(
            rules, default, args.port, args.max_hold, on_decide=self._decided,
            make_record=lambda key, rule: (filtered_record(key, rule), None))
        fd = self.open_input(args.input)
        writer = StageWriter(self.stdout_fd, self.name)

        def write(items):
            for rec, raw in items:
                if raw is not None:
                    writer.write_raw(raw)
                else:
                    writer.write(rec)

        reader = RecordReader(fd, on_idle=writer.flush, headers=True,
                              name="<stdin>" if args.input == "-" else args.input)
        try:
            for item in reader.iter_raw():
                self.records_in += 1
                rec, raw = item
                if raw is HEADER:
                    writer.section(rec)
                elif rec.get("t") == T_PKT and type(rec.get("data")) is bytes:
                    write(sel.packet(rec.get("ts"), rec["data"], item))
                else:
                    write((item,))
            write(sel.finish())
        finally:
            writer.flush()

    def _decided(self, key, keep, rule) -> None:
        if self.args is not None and self.args.verbose >= 2:
            from tcpcopylib.packet import endpoint_str

            self.warn(f"{endpoint_str(key[0], key[1])} -> {endpoint_str(key[2], key[3])}: "
                      f"{'kept' if keep else 'filtered'} by "
                      f"{rule.name if rule else 'the default'}")

    def stats_line(self):
        s = self.selector
        if s is None:
            return f"records in {self.records_in}, elapsed {self.elapsed():.3f} s"
        rules = ", ".join(f"[{k}] {n}" for k, n in s.counts().items())
        return (f"records in {self.records_in}, sessions {s.sessions}: kept {s.kept}, "
                f"filtered {s.filtered} ({rules}), packets dropped {s.pkts_dropped}, "
                f"elapsed {self.elapsed():.3f} s")

    def stats_dict(self) -> dict:
        d = {"records_in": self.records_in, "summary": self.stats_line()}
        s = self.selector
        if s is not None:
            d.update(sessions=s.sessions, kept=s.kept, pkts_dropped=s.pkts_dropped,
                     outcomes={"filtered": s.filtered}, rules=s.counts())
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
