"""tc-publish: records in, stored in a NATS JetStream stream, partitioned by session."""

from __future__ import annotations

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.cli.common import number_arg
from tcpcopylib.errors import UsageError


class Tool(BaseTool):
    name = "tc-publish"
    summary = ("Store the records read in a NATS JetStream stream, each connection's packets\n"
               "in the partition of its session key, in order; tc-subscribe reads them back\n"
               "on other hosts. See tc-publish(1).")
    epilog = ("examples:\n"
              "  tc-capture eth0 | tc-publish -s nats://b1:4222,nats://b2:4222 "
              "--token-file tok --stream web\n"
              "  tc-readpcap day.pcap | tc-publish --stream day --partitions 3 --no-auth\n"
              "  tc-intercept eth0 | tc-publish --stream replies --by-port-block 4 ...   "
              "(replies for tc-session -f K/4)")
    writes_records = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stats = None
        self.partitions = None

    def add_arguments(self, p) -> None:
        from tcpcopylib import broker

        p.add_argument("input", nargs="?", default="-", metavar="FILE",
                       help="record stream to read (default: stdin)")
        broker.add_connection_arguments(p)
        g = p.add_argument_group("the stream (when tc-publish creates it)")
        g.add_argument("-P", "--partitions", type=number_arg(int, 1, True, 1024), metavar="N",
                       help=f"partitions of a new stream (default {broker.DEFAULT_PARTITIONS}); "
                            "an existing stream must have N")
        g.add_argument("--max-age", default="24h", metavar="DURATION",
                       help="a new stream keeps records this long (default 24h)")
        g.add_argument("--max-bytes", type=number_arg(int, 1, True), metavar="N",
                       help="a new stream keeps at most N bytes (the oldest go first)")
        g.add_argument("--replicas", type=number_arg(int, 1, True, 5), default=1, metavar="R",
                       help="copies of a new stream on R broker nodes (1-5; default 1)")
        g.add_argument("--by-port-block", type=number_arg(int, 1, True, 256), metavar="M",
                       help="a stream of replies (tc-intercept's fb records) for replay "
                            "hosts running tc-session -f K/M: M partitions, a reply in "
                            "partition K when its destination (the replayed client port) "
                            "is in block K; what is in no block goes to partition 0")
        p.add_argument("--linger", type=number_arg(float, 0, True, 10000), metavar="MS",
                       help="gather what is read within MS milliseconds into one message "
                       "per partition (default 20, with --by-port-block 0; 0: publish each "
                       "read at once): fewer, larger messages, less CPU per packet")
        p.add_argument("--id", metavar="ID",
                       help="this publisher's id in message ids (default HOST-PID-TIME): "
                            "the broker drops a message whose id it stored in the last 2 min")

    def run(self, args):
        import asyncio

        from tcpcopylib import broker

        opts = broker.connect_options(args, self.name)
        broker.check_stream_name(args.stream)
        try:
            max_age = broker.parse_duration(args.max_age)
        except ValueError as e:
            raise UsageError(f"--max-age: {e}") from None
        if args.by_port_block is not None:
            if args.partitions not in (None, args.by_port_block):
                raise UsageError("--by-port-block M makes M partitions: leave out -P or "
                                 "give the same M")
            args.partitions = args.by_port_block
        if args.linger is None:  # a reply waits in no linger: the session waits for it
            args.linger = 0.0 if args.by_port_block is not None else 20.0
        fd = self.open_input(args.input)
        self.stats = broker.PublishStats()
        return asyncio.run(self._publish(fd, args, opts, max_age))

    async def _publish(self, fd, args, opts, max_age):
        import asyncio

        from tcpcopylib import broker
        from tcpcopylib.records import AS_PKT
        from tcpcopylib.streamparse import StreamParser

        retry_for = opts["_retry_for"]
        nc = await broker.connect(opts, warn=self.warn)
        reader = None
        try:
            js = nc.jetstream(timeout=broker.PUBLISH_TIMEOUT)
            n = self.partitions = await broker.with_retry(
                lambda: broker.ensure_stream(js, args.stream, args.partitions, max_age,
                                             args.replicas, args.max_bytes),
                retry_for, f"stream {args.stream}", self.warn if args.verbose else None)
            self.info(f"publishing to stream {args.stream} ({n} partitions)")
            parser = StreamParser("<stdin>" if args.input == "-" else args.input)
            part = broker.Partitioner(n, by_port_block=args.by_port_block is not None)
            pub = args.id or broker.publisher_id()
            seqs: dict = {}
            loop = asyncio.get_running_loop()
            reader = broker.FdReader(fd, loop)
            linger = args.linger / 1000.0
            ended = False
            while not ended:
                # a chunk, then after --linger what else has come by then (up to
                # MAX_MESSAGE): when the input trickles (a live capture), fewer and larger
                # messages and one wake-up per --linger instead of one per packet
                chunks = [await reader.read()]
                if chunks[0]:
                    if linger and reader.pollable:  # (a file has it all there already)
                        await asyncio.sleep(linger)
                    chunks += reader.read_ready(broker.MAX_MESSAGE)
                for chunk in chunks:
                    if not chunk:
                        parser.close()
                        ended = True
                        break
                    part.add(parser.feed(chunk, AS_PKT))
                msgs = part.messages()
                while msgs:  # rounds of distinct partitions: one in flight per partition
                    now, later, seen = [], [], set()
                    for m in msgs:
                        (later if m[0] in seen else now).append(m)
                        seen.add(m[0])
                    await broker.publish_round(js, args.stream, now, pub, seqs, self.stats,
                                               retry_for, self.warn)
                    msgs = later
        finally:
            if reader is not None:
                reader.close()
            try:
                await asyncio.wait_for(nc.close(), 5)
            except Exception:  # noqa: BLE001 - closing after an error: the error matters
                pass

    def stats_line(self):
        s = self.stats
        if s is None:
            return None
        return (f"{s.records} records in {s.messages} messages ({s.bytes} bytes) stored, "
                f"{s.retries} retries, {s.duplicates} duplicates dropped by the broker, "
                f"{self.elapsed():.2f} s")

    def stats_dict(self) -> dict:
        s = self.stats
        d = {"summary": self.stats_line(), "partitions": self.partitions or 0}
        if s is not None:
            d.update(records=s.records, messages=s.messages, bytes=s.bytes,
                     retries=s.retries, duplicates=s.duplicates)
        return d


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
