"""tc-pace: release records at their recorded pace, reshaped by speed, gap clamp, rate cap, delay."""

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import MAX_SPEED, MIN_SPEED
from tcpcopylib.cli.common import number_arg as _number
from tcpcopylib.errors import UsageError


class Tool(BaseTool):
    name = "tc-pace"
    summary = ("Release records when due: at the recorded pace, reshaped by --speed and\n"
               "--max-gap, capped by --rate, shifted by --delay. Records without a ts pass\n"
               "through untouched, in order. See tc-pace(1).")
    epilog = ("examples:\n"
              "  tc-readpcap day.pcap | tc-pace --speed 2 --max-gap 1 | tc-session ...\n"
              "  tc-capture eth0 | tc-session ... | tc-pace --rate 500 --delay 50 | tc-emit\n"
              "  tc-pace cap.cbor | tc-dump          # watch a recording in real time")

    def __init__(self, *a, clock=None, sleep=None, **kw):
        super().__init__(*a, **kw)
        self.clock, self.sleep = clock, sleep
        self.pacer = self.runner = None

    def add_arguments(self, p):
        p.add_argument("input", nargs="?", default="-", metavar="FILE",
                       help="record stream to read (default: stdin)")
        p.add_argument("--speed", type=_number(float, MIN_SPEED, True, MAX_SPEED), default=1.0,
                       metavar="F", help=f"replay F times faster (F < 1: slower; "
                       f"{MIN_SPEED:g}..{MAX_SPEED:g}); default 1")
        p.add_argument("--max-gap", type=_number(float, 0, True, 1e9), metavar="S",
                       help="shorten gaps between consecutive timestamps to S seconds "
                            "(recording time, before --speed)")
        p.add_argument("--rate", type=_number(float, 1e-6, True, 1e9), metavar="N",
                       help="release at most N timed records per second (queue, never drop)")
        p.add_argument("--delay", type=_number(float, 0, True, 1e9), default=0.0, metavar="MS",
                       help="add MS milliseconds of latency to every timed record")
        p.add_argument("--keep-ts", action="store_true",
                       help="leave ts as read instead of rewriting it to the planned release time")

    def run(self, args):
        import time

        from tcpcopylib.pacing import Pacer, PaceRunner

        try:
            self.pacer = pacer = Pacer(
                speed=args.speed, max_gap=args.max_gap, rate=args.rate,
                delay=args.delay / 1000.0,
                clock=self.clock or time.monotonic_ns, sleep=self.sleep or time.sleep)
        except ValueError as e:
            raise UsageError(str(e)) from None
        pacer.warn = self.warn
        fd = self.open_input(args.input)
        self.runner = PaceRunner(pacer, self.stdout_fd, self.name, keep_ts=args.keep_ts)
        self.runner.run(fd, "<stdin>" if args.input == "-" else args.input)
        # (empty input: the reader raised StreamError, nothing written, exit 65)

    @property
    def records_in(self) -> int:
        return 0 if self.runner is None else self.runner.records_in

    @property
    def records_out(self) -> int:
        return 0 if self.runner is None else self.runner.records_out

    def stats_line(self):
        p = self.pacer
        late = 0.0 if p is None else p.max_late_ns / 1e6
        return (f"records in {self.records_in} out {self.records_out}, "
                f"max lateness {late:.3f} ms, elapsed {self.elapsed():.3f} s")

    def stats_dict(self) -> dict:
        p = self.pacer
        return {"records_in": self.records_in, "records_out": self.records_out,
                "max_late_ns": 0 if p is None else p.max_late_ns, "summary": self.stats_line()}


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
