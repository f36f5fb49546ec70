"""tc-subscribe: the records of a NATS JetStream stream's partitions out, live or from the past."""

from __future__ import annotations

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import number_arg
from tcpcopylib.errors import UsageError


class Tool(BaseTool):
    name = "tc-subscribe"
    summary = ("Write the records that tc-publish stored in a NATS JetStream stream: the\n"
               "partitions of share K/M, live (records stored from now on) or from a point\n"
               "in the past (--since, --until). Each message is written, then acknowledged;\n"
               "one delivered again is dropped. See tc-subscribe(1).")
    epilog = ("examples:\n"
              "  tc-subscribe -s nats://b1:4222 --token-file tok --stream web --partition 0/3 \\\n"
              "      | tc-session --target 10.0.0.5:80 -f 0/6 | tc-emit\n"
              "  tc-subscribe --stream web --since 2026-12-03T18:00 --until 2026-12-03T19:00 "
              "... | tc-session ...")
    interrupt_is_success = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stats = None

    def add_arguments(self, p) -> None:
        from tcpcopylib import broker

        broker.add_connection_arguments(p)
        p.add_argument("-p", "--partition", default="0/1", metavar="K/M",
                       help="take the partitions k with k mod M = K (default 0/1: all)")
        p.add_argument("--since", metavar="TIME",
                       help="start with the records stored at TIME (ISO 8601, UTC unless a "
                            "zone is given; @EPOCH; -DURATION: that long ago) instead of "
                            "those stored from now on")
        p.add_argument("--until", metavar="TIME",
                       help="end (exit 0) at the first record stored after TIME, or once "
                            "everything stored up to TIME is written")
        p.add_argument("--all", action="store_true",
                       help="start with the oldest record the stream holds")
        p.add_argument("--name", metavar="NAME",
                       help="the durable consumer (default for a live subscriber: "
                            "tc-subscribe-KofM, so that a restarted or standby subscriber "
                            "goes on where this one stopped); with --since/--until/--all "
                            "none unless given")
        p.add_argument("-b", "--batch", type=number_arg(int, 1, True, 4096), default=64,
                       metavar="N", help="fetch at most N messages at a time (default 64)")
        p.add_argument("--ack-wait", default="30s", metavar="DURATION",
                       help="the broker delivers again what is not acknowledged after "
                            "this long (default 30s)")
        p.add_argument("--late-after", default="5s", metavar="DURATION",
                       help="count as late a message written more than this after it "
                            "was stored (default 5s)")

    def run(self, args):
        import asyncio
        import time

        from tcpcopylib import broker

        opts = broker.connect_options(args, self.name)
        broker.check_stream_name(args.stream)
        share = broker.parse_share(args.partition)
        now = time.time()
        try:
            since = broker.parse_time(args.since, now) if args.since else None
            until = broker.parse_time(args.until, now) if args.until else None
        except ValueError as e:
            raise UsageError(f"--since/--until: {e}") from None
        if since is not None and args.all:
            raise UsageError("--since and --all: give one")
        if since is not None and until is not None and until < since:
            raise UsageError("--until is before --since")
        try:
            ack_wait = broker.parse_duration(args.ack_wait)
            late_after = broker.parse_duration(args.late_after)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.stats = broker.SubscribeStats()
        return asyncio.run(self._subscribe(args, opts, share, since, until, ack_wait,
                                           late_after))

    async def _subscribe(self, args, opts, share, since, until, ack_wait, late_after):
        import asyncio
        import signal

        from tcpcopylib import broker
        from tcpcopylib.records import RecordWriter, header

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # stop between batches, all acked
            loop.add_signal_handler(sig, stop.set)
        retry_for = opts["_retry_for"]
        nc = await broker.connect(opts, warn=self.warn)
        try:
            js = nc.jetstream()
            n = await broker.wait_stream(js, args.stream, retry_for, stop)
            if n is None:
                return 0
            k, m = share
            parts = [p for p in range(n) if p % m == k]
            if not parts:
                raise UsageError(f"--partition {k}/{m}: the stream has only {n} partitions")
            subjects = [broker.subject(args.stream, p) for p in parts]
            cfg = broker.consumer_config(subjects, args.batch, ack_wait, since, args.all)
            durable = args.name
            if durable is None and since is None and until is None and not args.all:
                durable = f"tc-subscribe-{k}of{m}"
            sub = await broker.with_retry(
                lambda: js.pull_subscribe(subjects[0], durable=durable,
                                          stream=broker.js_stream_name(args.stream),
                                          config=cfg),
                retry_for, "consumer", self.warn if args.verbose else None)
            self.info(f"subscribed to stream {args.stream}, partitions "
                      f"{','.join(map(str, parts))} of {n}"
                      + (f" (consumer {durable})" if durable else ""))
            writer = RecordWriter(self.stdout_fd, header(
                self.name, upstream="tc-publish", stream=args.stream,
                partition=f"{k}/{m}", partitions=n))
            writer.flush()  # the header now: downstream starts before the first record
            await broker.deliver(sub, nc, js, writer, self.stats, args.batch, until,
                                 late_after, retry_for, stop, self.info)
        finally:
            try:
                await asyncio.wait_for(nc.close(), 5)  # (flushes the last acks)
            except Exception:  # noqa: BLE001 - closing after an error: the error matters
                pass
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return 0

    def stats_line(self):
        s = self.stats
        if s is None:
            return None
        return (f"{s.records} records in {s.messages} messages ({s.bytes} bytes) written, "
                f"{s.redelivered} redelivered and {s.duplicates} duplicate messages dropped, "
                f"{s.recovered} read again after a gap in the delivery, {s.lost} lost, "
                f"{s.late} late (max lag {s.max_lag:.3f} s), "
                f"{self.elapsed():.2f} s")

    def stats_dict(self) -> dict:
        s = self.stats
        d = {"summary": self.stats_line()}
        if s is not None:
            d.update(records=s.records, messages=s.messages, bytes=s.bytes,
                     redelivered=s.redelivered, duplicates=s.duplicates,
                     recovered=s.recovered, lost=s.lost, late=s.late,
                     max_lag_s=round(s.max_lag, 6))
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
