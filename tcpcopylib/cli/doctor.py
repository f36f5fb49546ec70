"""tc-doctor: check this host's set-up for its TCPCopy role; with --fix, repair it."""

from tcpcopylib.cli.common import Tool as _Tool


class Tool(_Tool):
    name = "tc-doctor"
    summary = ("Check that this host is set up for its role in a replay (online, target or "
               "assistant): each check prints ok, warn or fail, what it saw and the command "
               "that fixes it. Read-only unless --fix.")
    epilog = ("examples:\n"
              "  tc-doctor --role target --target 10.0.0.5:8080 --assistant 10.0.0.7 "
              "--client-net 192.0.2.0/24\n"
              "  tc-doctor --role assistant --assistant 10.0.0.7 --feedback tcp::36524\n"
              "  tc-doctor --role online --iface eth0 --target 10.0.0.5:8080 "
              "--client-net 192.0.2.0/24 --feedback tcp:10.0.0.7:36524 --probe\n"
              "exit status: 0 all ok, 1 warnings, 2 failures (or a usage error)")
    writes_records = False

    def __init__(self, *a, runner=None, tty=None, context_hook=None, **kw):
        super().__init__(*a, **kw)
        self.runner = runner            # tests: a fake command runner
        self.tty = tty                  # tests: a file object to ask on instead of /dev/tty
        self.context_hook = context_hook  # tests: adjust the Context (fake probes)
        self.counts = {}

    def add_arguments(self, p):
        from tcpcopylib.doctor import ROLES

        p.add_argument("--role", required=True, choices=ROLES,
                       help="the role of this host in the replay")
        p.add_argument("--target", metavar="HOST:PORT",
                       help="the service under test, as tc-session --target gets it")
        p.add_argument("--assistant", metavar="ADDR",
                       help="the assistant's address (the target routes the clients there)")
        p.add_argument("--feedback", metavar="ADDR",
                       help="tc-feedback's address, as tc-session --feedback gets it "
                            "(default: $TC_FEEDBACK)")
        p.add_argument("--key", metavar="FILE",
                       help="tc-feedback's shared key, as tc-session gets it (default: "
                            "$TC_FEEDBACK_KEY_FILE, or the key in $TC_FEEDBACK_KEY)")
        p.add_argument("--client-net", metavar="CIDR",
                       help="the replayed client addresses (the network the target routes "
                            "to the assistant)")
        p.add_argument("--iface", metavar="IFACE",
                       help="online: the capture interface; target: where the replayed "
                            "packets arrive (default: the interface of the target address)")
        p.add_argument("--json", action="store_true",
                       help="print the checks as one JSON object instead of text")
        p.add_argument("--fix", action="store_true",
                       help="print the fix commands of failed checks and apply them one by "
                            "one, asking on the terminal")
        p.add_argument("--yes", action="store_true",
                       help="with --fix: apply without asking")
        p.add_argument("--probe", action="store_true",
                       help="online: send one forged SYN to the target and watch its SYN-ACK "
                            "reach the assistant (via --feedback) and not this host")

    def run(self, args):
        from tcpcopylib import doctor
        from tcpcopylib.errors import UsageError
        from tcpcopylib.feedback import load_key

        if args.yes and not args.fix:
            raise UsageError("--yes goes with --fix")
        try:
            ctx = doctor.Context(args.role, target=args.target, assistant=args.assistant,
                                 feedback=args.feedback, client_net=args.client_net,
                                 iface=args.iface, key=load_key(args.key, warn=self.warn),
                                 runner=self.runner or doctor.run_command)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.context_hook:
            self.context_hook(ctx)
        fns = doctor.role_checks(args.role, args.probe)
        checks = [doctor.safe(fn, ctx) for fn in fns]
        report = {"role": args.role, "tool": self.name}
        say = None if args.json else (lambda text: print(text, flush=True))
        if args.fix:
            if say:
                say(doctor.format_text(checks))
            report["before"] = [c.to_dict() for c in checks]
            fixes = doctor.fix_all(
                ctx, fns, args.yes, lambda prompt: doctor.ask_on_tty(prompt, self.tty, self.warn),
                say)
            if say and not fixes:
                say("tc-doctor: nothing to fix with a command on this host")
            checks = [doctor.safe(fn, ctx) for fn in fns]
            if say:
                say("-- after the fixes:")
        verdict = doctor.worst(checks)
        status = doctor.EXIT[verdict]
        self.counts = {v: sum(c.verdict == v for c in checks)
                       for v in (doctor.OK, doctor.WARN, doctor.FAIL, doctor.SKIP)}
        if args.json:
            import json

            report.update(verdict=verdict, exit_status=status,
                          checks=[c.to_dict() for c in checks])
            if args.fix:
                report["fixes"] = fixes
            print(json.dumps(report, indent=1), flush=True)
        else:
            print(doctor.format_text(checks), flush=True)
            print(f"tc-doctor: {args.role}: {self.stats_line()}", flush=True)
        return status

    def stats_line(self):
        if not self.counts:
            return None
        return ", ".join(f"{n} {v}" for v, n in self.counts.items() if n)

    def stats_dict(self):
        return {"summary": self.stats_line(), **self.counts}


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
