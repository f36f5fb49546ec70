"""tc-capture: live capture of client->server TCP packets as "pkt" records."""

from __future__ import annotations

import argparse
import os
import signal
import time

from tcpcopylib.cli.common import Tool as BaseTool
from tcpcopylib.errors import NoInputError, UsageError

STATS_EVERY_S = 5.0


class _OutputAction(argparse.Action):
    """-w FILE: a file output lets stdout be a terminal."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        namespace.allow_tty = value != "-"


class Tool(BaseTool):
    name = "tc-capture"
    summary = ("Capture the client->server TCP packets arriving at this host on IFACE and "
               "write them as \"pkt\" records (raw IP datagrams, link layer stripped).")
    epilog = """examples:
  tc-capture eth0 | tc-session --target 10.0.0.5:8080 | tc-pace | tc-emit
  tc-capture -i eth0 -F 'tcp dst port 80' -c 1000 -w cap.cbor
  tc-capture any 'tcp dst port 80' --stats | tc-dump"""
    interrupt_is_success = True

    def add_arguments(self, p) -> None:
        p.add_argument("words", nargs="*", metavar="IFACE [EXPR]",
                       help="interface (or 'any'), then optionally a filter expression "
                            "(with -i, all words are the filter)")
        p.add_argument("-i", "--interface", metavar="IFACE",
                       help="interface to capture on ('any' for all)")
        p.add_argument("-F", "--filter", metavar="EXPR",
                       help="BPF filter (tcpdump language) narrowing what is captured; "
                            "default 'tcp'")
        p.add_argument("-c", "--count", type=int, default=0, metavar="COUNT",
                       help="stop after writing COUNT packet records")
        p.add_argument("-w", "--write", default="-", metavar="FILE", action=_OutputAction,
                       help="write the stream to FILE instead of stdout ('-')")
        p.add_argument("--engine", choices=("pcap", "afpacket"), default="pcap",
                       help="capture engine: libpcap via pcapy-ng (default) or an AF_PACKET "
                            "socket")
        p.add_argument("--mtu", type=int, default=0, metavar="BYTES",
                       help="split GRO/LRO super-segments longer than this (default: the "
                            "interface MTU; 1500 for 'any')")
        p.add_argument("-s", "--snaplen", type=int, default=262144, metavar="BYTES",
                       help="bytes captured per packet (default 262144)")
        p.add_argument("-m", "--max-memory", type=int, default=0, metavar="MB",
                       help="above MB of resident memory, shed new sessions (counted) "
                            "instead of growing (default: no limit)")
        p.add_argument("-B", "--buffer-size", type=int, default=32768, metavar="KIB",
                       help="kernel capture buffer in KiB (default 32768)")

    def _resolve(self, args) -> tuple[str, str]:
        words = list(args.words)
        iface = args.interface
        if iface is None:
            if not words:
                raise UsageError("no interface given (tc-capture IFACE, or -i IFACE)")
            iface = words.pop(0)
        expr = " ".join(words)
        if expr and args.filter:
            raise UsageError("give the filter either as -F EXPR or as trailing words, not both")
        expr = args.filter or expr
        if args.count < 0 or args.snaplen < 68 or args.buffer_size < 1:
            raise UsageError("-c must be >= 0, -s >= 68, -B >= 1")
        if args.max_memory < 0:
            raise UsageError("-m/--max-memory takes a size in MB (0: no limit)")
        if args.mtu and args.mtu < 68:
            raise UsageError("--mtu must be at least 68")
        return iface, expr

    def run(self, args):
        from tcpcopylib import capture as cap
        from tcpcopylib.link import LINKTYPE_RAW
        from tcpcopylib.records import RecordWriter, header

        iface, expr = self._resolve(args)
        self.shed_warned = False
        self.capturer = None
        self.engine = None
        bpf = expr or "tcp"
        engine = cap.open_engine(args.engine, iface, bpf, args.snaplen, args.buffer_size)
        self.engine = engine
        self.if_drops0 = cap.interface_rx_drops(iface)
        self.iface = iface
        mtu = args.mtu or (cap.interface_mtu(iface) if iface != "any" else cap.DEFAULT_MTU)
        out_fd, close_out = self.stdout_fd, False
        if args.write != "-":
            try:
                out_fd = os.open(args.write, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as e:
                engine.close()
                raise NoInputError(f"{args.write}: {e.strerror}") from None
            close_out = True
        hdr = header(self.name, source=iface, filter=expr, linktype=LINKTYPE_RAW,
                     snaplen=args.snaplen, mtu=mtu, engine=engine.name, ts_clock="realtime")
        writer = RecordWriter(out_fd, hdr)
        capturer = cap.Capturer(writer, mtu=mtu, count=args.count,
                                max_rss=args.max_memory << 20)
        self.capturer = capturer
        self.info(f"capturing on {iface} ({engine.name}, linktype {engine.linktype}, "
                  f"filter {bpf!r}, mtu {mtu}, {len(capturer.local)} local addresses)")

        # Signals only set a flag (and wake select through the pipe): the loop stops
        # between batches, so a record is never cut in half, then flushes.
        stop_sig = []
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        old_wakeup = signal.set_wakeup_fd(wfd)

        def on_signal(signum, frame):
            stop_sig.append(signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        next_report = [time.monotonic() + STATS_EVERY_S]

        def tick(now):
            if capturer.shed_sessions and not self.shed_warned:
                self.shed_warned = True
                self.warn(f"warning: over --max-memory {args.max_memory} MB: shedding new "
                          f"sessions (counted in --stats)")
            if args.verbose and now >= next_report[0]:
                next_report[0] = now + STATS_EVERY_S
                self.warn(self.stats_line())

        try:
            writer.flush()  # the header goes out at once: downstream sees a stream start
            cap.capture_loop(engine, capturer, lambda: bool(stop_sig), tick, extra_fds=(rfd,))
        finally:
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
            try:
                writer.flush()
            finally:
                self.final_drops = engine.drops()
                engine.close()
                self.engine = None
                if close_out:
                    os.close(out_fd)
        if not args.stats:  # like tcpdump: counts at the end (--stats prints them via main)
            self.warn(self.stats_line())
        return 0

    def _drops(self):
        if self.engine is not None:
            return self.engine.drops()
        return getattr(self, "final_drops", (0, 0))

    def counters(self) -> dict | None:
        c = getattr(self, "capturer", None)
        if c is None:
            return None
        from tcpcopylib.capture import interface_rx_drops

        kdrop, pcap_ifdrop = self._drops()  # ps_drop, ps_ifdrop
        ifdrop = max(pcap_ifdrop, interface_rx_drops(self.iface) - self.if_drops0)
        return {"records": c.records, "frames": c.frames, "foreign": c.foreign,
                "supersegs": c.supersegs, "split_records": c.split_records,
                "truncated": c.truncated, "kernel_drops": kdrop, "if_drops": ifdrop,
                "shed_sessions": c.shed_sessions, "shed_packets": c.shed_packets,
                "cpu_us_per_packet": round(_cpu_seconds() * 1e6 / max(c.frames, 1), 3)}

    def stats_line(self):
        d = self.counters()
        if d is None:
            return None
        return (f"{d['records']} packets written, {d['frames']} captured, {d['foreign']} not "
                f"inbound TCP to this host, {d['supersegs']} super-segments split into "
                f"{d['split_records']}, {d['truncated']} truncated, {d['shed_sessions']} "
                f"sessions shed ({d['shed_packets']} packets), {d['kernel_drops']} "
                f"dropped by kernel, {d['if_drops']} dropped by interface, "
                f"{self.elapsed():.2f} s, {d['cpu_us_per_packet']:.2f} µs CPU per packet")

    def stats_dict(self) -> dict:
        d = self.counters() or {}
        d["summary"] = self.stats_line()
        return d


def _cpu_seconds() -> float:
    """User + system CPU time of this process (the production-safety figure in --stats)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
