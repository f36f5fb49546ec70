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
        self.records_in = self.records_out = 0
        self.pacer = None

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
        import struct
        import time

        from tcpcopylib.pacing import Pacer
        from tcpcopylib.errors import StreamError
        from tcpcopylib.records import (HEADER, T_PKTS, RecordReader, RecordWriter, batch_records,
                                        batch_stamps, batch_structs, fast_record,
                                        merged_header)

        try:
            self.pacer = pacer = Pacer(
                speed=args.speed, max_gap=args.max_gap, rate=args.rate,
                delay=args.delay / 1000.0,
                clock=self.clock or time.monotonic_ns, sleep=self.sleep or time.sleep)
        except ValueError as e:
            raise UsageError(str(e)) from None
        pacer.warn = self.warn
        fd = self.open_input(args.input)
        name = "<stdin>" if args.input == "-" else args.input
        writer = None
        # Records in the common layout are forwarded as the bytes read, their ts patched in
        # place: out is a copy of the chunk being released, out[mark:cur] the records released
        # but not yet in the writer's buffer, cur the start of the next record.
        out = None
        mark = cur = 0

        def take():
            """out[mark:cur] into the writer's buffer."""
            nonlocal mark
            if cur > mark:
                writer.buf += memoryview(out)[mark:cur]
                mark = cur

        def flush():
            take()
            if writer is not None:
                writer.flush()

        reader = RecordReader(fd, on_idle=flush, headers=True, name=name)
        due, keep_ts = pacer.due, args.keep_ts
        patch_ts = struct.Struct(">Q").pack_into
        # A batch (pkts) moves as one item, every ts shifted with its first, unless records
        # are rate-capped or gaps clamped: then each of its packets is paced on its own.
        whole_batches = args.rate is None and args.max_gap is None
        speed = args.speed
        try:
            for buf, items in reader.iter_spans():
                out = bytearray(buf)
                mark = cur = 0
                for kind, ts, ts_at, stop, count, rec in items:  # (records.SPAN_KIND)
                    if rec is not None:  # decoded by cbor2 (a header too): re-encoded
                        take()
                        mark = cur = stop
                        if kind is HEADER:
                            hdr = merged_header(self.name, rec)
                            if writer is None:
                                writer = RecordWriter(self.stdout_fd, hdr)
                            else:
                                writer.new_section(hdr)
                            continue
                        self.records_in += 1
                        rts = rec.get("ts")
                        if type(rts) is int:
                            if not -(1 << 64) < rts < 1 << 64:
                                raise StreamError(f"{name}: record {self.records_in}: ts does "
                                                  f"not fit in 64 bits")
                            new_ts = due(rts, flush)
                            if not keep_ts:
                                rec["ts"] = new_ts
                        writer.write(rec)
                        self.records_out += 1
                        continue
                    if kind == T_PKTS:
                        n = count
                        self.records_in += n
                        self.records_out += n
                        stamps = batch_stamps(out, ts_at, n)
                        if whole_batches:  # one due(); every ts shifted with the first
                            new0 = due(ts, flush)
                            if (new0 != ts or speed != 1) and not keep_ts:
                                new = [new0 + (t - ts if speed == 1 else
                                               round((t - ts) / speed)) for t in stamps]
                                if min(new) < 0 or max(new) > 0xFFFFFFFFFFFFFFFF:
                                    raise StreamError("a timestamp out of range after pacing")
                                batch_structs(n)[0].pack_into(out, ts_at, *new)
                        else:  # rate cap or gap clamp: each packet goes when it is due
                            take()
                            for rec in batch_records(buf, cur, stop):  # (with their sid)
                                new_ts = due(rec["ts"], flush)
                                if not keep_ts:
                                    rec["ts"] = new_ts
                                writer.write(rec)
                            mark = stop
                        cur = stop
                        continue
                    self.records_in += 1
                    new_ts = due(ts, flush)
                    if new_ts != ts and not keep_ts:
                        if 0xFFFFFFFF < new_ts <= 0xFFFFFFFFFFFFFFFF:
                            patch_ts(out, ts_at, new_ts)
                        else:  # another length: re-encoded
                            take()
                            rec = fast_record(buf, cur, stop)[0]
                            rec["ts"] = new_ts
                            writer.write(rec)
                            mark = stop
                    cur = stop
                    self.records_out += 1
                take()
                if len(writer.buf) >= writer.bufsize:
                    writer.flush()
        finally:
            flush()  # what was released before an error or a signal still goes out
        # (empty input: the reader raised StreamError, nothing written, exit 65)

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
