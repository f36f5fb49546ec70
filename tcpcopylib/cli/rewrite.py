"""tc-rewrite: change client requests in flight (bytes, regex, HTTP headers, URL, Host)."""

import argparse

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import UsageError


class _RuleAction(argparse.Action):
    """Each rule option appends (kind, words) to args.rules: the order given is kept."""

    def __call__(self, parser, namespace, values, option_string=None):
        rules = getattr(namespace, "rules", None) or []
        rules.append((self.const, list(values) if isinstance(values, list) else [values]))
        namespace.rules = rules


def size_arg(text):
    """An argparse type: a number of bytes, with an optional suffix k, M or G (x 1024**n)."""
    from tcpcopylib.cli.common import number_arg

    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    return int(number_arg(float, 1, True, 1 << 40)(text[:-1] if mult > 1 else text) * mult)


class Tool(BaseTool):
    name = "tc-rewrite"
    summary = ("Rewrite the client's data of every connection in flight: bytes and regular\n"
               "expressions, HTTP headers, URL and Host; lengths may change (the sequence\n"
               "numbers of the rest of the connection follow). Everything else passes\n"
               "unchanged. See tc-rewrite(1).")
    epilog = ("examples:\n"
              "  tc-readpcap prod.pcap | tc-rewrite --host test.example --replace tok=PROD"
              " tok=TEST \\\n      | tc-session --target 10.0.0.5:8080 | tc-emit\n"
              "  tc-capture eth0 | tc-rewrite -f rules.txt | tc-session ...")

    def __init__(self, *a, make_transform=None, **kw):
        super().__init__(*a, **kw)
        self.user_transform = make_transform  # a user filter (tcpcopylib.filters.Filter)
        self.rewriter = self.ruleset = None
        self.records_in = 0

    def add_arguments(self, p):
        p.add_argument("input", nargs="?", default="-", metavar="FILE",
                       help="record stream to read (default: stdin)")
        if self.user_transform is None:
            rule = p.add_argument_group("rules (applied in the order given)")
            rule.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"),
                              action=_RuleAction, const="replace",
                              help="replace the bytes OLD by NEW (\\r \\n \\t \\xHH escapes)")
            rule.add_argument("--regex", nargs=2, metavar=("PATTERN", "REPL"),
                              action=_RuleAction, const="regex",
                              help="replace matches of a regular expression (\\1 in REPL)")
            rule.add_argument("--header-set", nargs=2, metavar=("NAME", "VALUE"),
                              action=_RuleAction, const="header-set",
                              help="HTTP: set header NAME to VALUE (added if absent)")
            rule.add_argument("--header-remove", metavar="NAME", action=_RuleAction,
                              const="header-remove", help="HTTP: remove header NAME")
            rule.add_argument("--host", metavar="VALUE", action=_RuleAction, const="host",
                              help="HTTP: set the Host header")
            rule.add_argument("--url", nargs=2, metavar=("PATTERN", "REPL"),
                              action=_RuleAction, const="url",
                              help="HTTP: rewrite the request target with a regular "
                                   "expression")
            rule.add_argument("-f", "--rules", metavar="FILE", action=_RuleAction,
                              const="file", help="read rules from FILE (one per line, as "
                              "`replace OLD NEW`; see tc-rewrite(1))")
            mode = p.add_mutually_exclusive_group()
            mode.add_argument("--http", action="store_true", default=None,
                              help="read client streams as HTTP/1.x requests (the default "
                                   "with an HTTP rule): substitutions apply to heads and "
                                   "bodies, Content-Length follows")
            mode.add_argument("--raw", dest="http", action="store_false",
                              help="apply substitutions to the byte stream, even with "
                                   "HTTP rules")
        p.add_argument("-p", "--port", type=int, action="append", default=[],
                       metavar="PORT", help="a server port (tells a capture's directions "
                       "apart when a connection's SYN was not captured; default: the "
                       "lower port serves); repeatable")
        p.add_argument("--max-hold", type=size_arg, default=8 << 20, metavar="BYTES",
                       help="bytes one connection may hold (a body being rewritten, "
                            "out-of-order data); past it the connection is not replayed "
                            "(or is cut by an RST): default 8M")
        p.add_argument("--max-total", type=size_arg, default=256 << 20, metavar="BYTES",
                       help="bytes all connections may hold together (default 256M)")

    def run(self, args):
        from tcpcopylib.filters.stream import StreamRewriter
        from tcpcopylib.filters.pipe import run_rewriter
        from tcpcopylib.records import StageWriter

        if self.user_transform is not None:
            make = self.user_transform
        else:
            from tcpcopylib.filters.rules import RuleSet, make_rule, parse_rule_file

            rules = []
            for kind, words in getattr(args, "rules", None) or []:
                if kind == "file":
                    rules += parse_rule_file(words[0])
                else:
                    rules.append(make_rule(kind, words))
            if not rules:
                raise UsageError("no rules: give --replace, --regex, --header-set, "
                                 "--header-remove, --host, --url or -f FILE")
            self.ruleset = RuleSet(rules, args.http)
            make = self.ruleset.make_transform
        if not all(0 < p < 65536 for p in args.port):
            raise UsageError("--port: a port is 1..65535")
        fd = self.open_input(args.input)
        self.rewriter = StreamRewriter(make, args.port, args.max_hold, args.max_total,
                                       on_end=self._ended)
        writer = StageWriter(self.stdout_fd, self.name)
        try:
            self.records_in = run_rewriter(self.rewriter, fd, writer,
                                           "<stdin>" if args.input == "-" else args.input)
        finally:
            writer.flush()

    def _ended(self, conn, how) -> None:
        if how != "done":
            self.info(f"connection {conn.client} -> {conn.server}: {how}")

    def stats_line(self):
        st = self.rewriter.st if self.rewriter else None
        if st is None:
            return f"records in 0, elapsed {self.elapsed():.3f} s"
        rules = ""
        if self.ruleset is not None:
            rules = ", rewrites " + ", ".join(
                f"[{name}] {n}" for name, n in self.ruleset.counts().items())
        return (f"records in {self.records_in}, connections {st.conns} ({st.dropped} "
                f"dropped, {st.cut} cut), bytes in {st.bytes_in} out {st.bytes_out}, "
                f"retransmissions dropped {st.retrans_dropped}{rules}, "
                f"elapsed {self.elapsed():.3f} s")

    def stats_dict(self) -> dict:
        d = {"records_in": self.records_in, "summary": self.stats_line()}
        if self.rewriter is not None:
            d.update(self.rewriter.st.as_dict())
        if self.ruleset is not None:
            d["rules"] = self.ruleset.counts()
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
