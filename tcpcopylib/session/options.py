"""tc-session's options: declared (add_arguments, the table tc-session(1) documents),
checked and turned into an Engine (build_engine: the mapping, the client address
allocator and the Config)."""

from __future__ import annotations

import argparse

from tcpcopylib.errors import UsageError
from tcpcopylib.tool import MAX_SPEED, MIN_SPEED, number_arg

SEC = 1_000_000_000
MAX_BATCH_PKTS = 63     # -B at most: records.MAX_BATCH_PKTS (not imported: cbor2 loads slowly)


def add_arguments(p) -> None:
    """tc-session's own options on the argparse parser ``p``, in groups, as its --help and
    man page show them."""
    _mapping(p.add_argument_group("mapping"))
    _shaping(p.add_argument_group("shaping"))
    _feedback(p.add_argument_group("feedback"))
    _behaviour(p.add_argument_group("session behaviour"))
    _output(p.add_argument_group("output"))
    _send(p.add_argument_group("sending in this process (--send; tc-emit's options)"))
    _capture(p.add_argument_group("capturing in this process (--capture; tc-capture's "
                                  "options)"))
    _socket_mode(p.add_argument_group("socket mode (tc-session(1), SOCKET MODE)"))
    p.add_argument_group("processes").add_argument(
        "--shards", type=int, default=1, metavar="N",
        help="split the sessions over N processes (one per core; each connection stays "
             "in one), each with its own port block of -f, feedback connection and "
             "output; stdout stays one stream (tc-session(1), SHARDS)")
    p.add_argument_group("statistics").add_argument(
        "--stats-every", type=float, metavar="N", help="print the summary every N seconds")
    p.add_argument("file", nargs="?", default="-", help="input stream (default stdin)")


def _mapping(g) -> None:
    """Which captured sessions are replayed, and onto which target."""
    g.add_argument("--target", metavar="HOST:PORT",
                   help="replay sessions to captured server port PORT onto HOST:PORT "
                        "([v6]:PORT for IPv6)")
    g.add_argument("-x", "--transfer", metavar="LIST",
                   help="TCPCopy transfer list: [IP:]PORT-IP:PORT,... (first match wins)")
    g.add_argument("--any-port", action="store_true",
                   help="with --target: replay every TCP session; --target HOST keeps "
                        "each server port, HOST:PORT sends all to PORT")
    g.add_argument("-O", "--only-syn", action="store_true",
                   help="replay only sessions whose SYN was captured")
    g.add_argument("-r", "--sample", type=int, default=100, metavar="PCT",
                   help="replay only PCT%% of the sessions (deterministic per client "
                        "address and port, the same on every run and host)")
    g.add_argument("-g", "--ramp", type=float, metavar="SECONDS",
                   help="the replayed share grows from 1%% to PCT (-r, default 100) "
                        "over SECONDS from the first packet")


def _shaping(g) -> None:
    """From which client addresses, how many copies, how much memory."""
    g.add_argument("-c", "--client-pool", metavar="LIST",
                   help="replay from client addresses of this pool: addresses, "
                        "CIDR networks, FIRST-LAST ranges, a.b.c.x (= .1-.254); the "
                        "target needs a route for it via the assistant")
    g.add_argument("-n", "--copies", type=int, default=1, metavar="N",
                   help="replay each captured session N times, each copy its own "
                        "connection (default 1)")
    g.add_argument("-f", "--instance", metavar="K[/M]",
                   help="instance K of M (default M 16) replaying into one target: "
                        "client ports come from block K of M of 1024-65535")
    g.add_argument("-m", "--max-memory", type=float, metavar="MB",
                   help="while the resident memory is above MB, shed new sessions "
                        "(outcome shed, reason memory) instead of growing")
    g.add_argument("--shed-lag", type=number_arg(float, 0, True, 1e9), metavar="MS",
                   help="while the input packets are more than MS late (counted from when "
                        "they reached this input), shed new sessions (outcome shed, reason "
                        "lag) so that the admitted ones stay whole; "
                        "default 2000 for a live input (tc-capture), off for a recording; "
                        "0: off")
    g.add_argument("--shed-backlog", type=number_arg(int, 1, True, 1 << 30), metavar="KIB",
                   help="while more than KIB of input waits in the pipe, shed new sessions "
                        "(reason backlog); default off")
    g.add_argument("--max-sessions", type=number_arg(int, 1, True, 1 << 40), metavar="N",
                   help="while N sessions are live, shed new ones (reason max-sessions); "
                        "default no limit")


def _feedback(g) -> None:
    """The connection to tc-feedback (the target's replies)."""
    g.add_argument("--feedback", metavar="ADDR",
                   help="tc-feedback address: unix:/path or tcp:HOST:PORT "
                        "(default $TC_FEEDBACK, else tcp:127.0.0.1:36524); "
                        "classic:HOST[:PORT] for an existing intercept 1.0 (IPv4, "
                        "default port 36524)")
    g.add_argument("--key", metavar="FILE",
                   help="shared key file of tc-feedback --key (default "
                        "$TC_FEEDBACK_KEY_FILE, else the key $TC_FEEDBACK_KEY): both ends "
                        "prove they hold it")
    g.add_argument("--feedback-retry", type=float, default=30.0, metavar="SECONDS",
                   help="when the connection to tc-feedback is lost, keep reconnecting "
                        "(and claiming the live sessions again) this long before giving "
                        "up with exit 69 (default 30; 0 = give up at once)")
    g.add_argument("--no-feedback", action="store_true",
                   help="run without a feedback channel (no session gets established; "
                        "for inspecting the SYNs)")


def _behaviour(g) -> None:
    """Gating, timeouts, the fake SYN, reconnections, the drain and the pace."""
    g.add_argument("-W", "--no-wait", action="store_true",
                   help="do not hold a request until the response to the previous one")
    g.add_argument("--quiet", type=float, default=100, metavar="MS",
                   help="a response is complete after the target was silent this long "
                        "(default 100 ms)")
    g.add_argument("--push-gap", type=float, default=50, metavar="MS",
                   help="duplex sessions: client or server speaking again, unprompted, after "
                        "this much (plus 2 round trips) makes a session duplex, its data "
                        "released on its recorded timing (default 50; 0: never)")
    g.add_argument("--gate-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="release held data anyway when the target acked everything and "
                        "sent nothing for this long (default 5)")
    g.add_argument("-t", "--timeout", type=float, default=600, metavar="SECONDS",
                   help="end a busy session after this much target silence (default 600)")
    g.add_argument("-k", "--keepalive", type=float, default=None, metavar="SECONDS",
                   help="end an idle session after this much silence (default -t + 120)")
    g.add_argument("--connect-timeout", type=float, default=6.0, metavar="SECONDS",
                   help="give up on a SYN without SYN-ACK after this long (default 6)")
    g.add_argument("--gap-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="end a session whose capture misses bytes after this long "
                        "(default 10)")
    g.add_argument("-D", "--mss", type=int, default=1460,
                   help="MSS option of fake SYNs (default 1460)")
    g.add_argument("--max-reconnects", type=int, default=5, metavar="N",
                   help="new connections per session when the target closes early "
                        "(default 5; 0 disables)")
    g.add_argument("--drain", type=float, default=5.0, metavar="SECONDS",
                   help="after the input ends, wait this long for the last responses "
                        "before resetting unfinished sessions (default 5)")
    g.add_argument("--asap", action="store_true",
                   help="send records when read, not at their recorded pace")
    g.add_argument("-a", "--speed", type=number_arg(float, MIN_SPEED, True, MAX_SPEED),
                   default=1.0, metavar="F", help="replay the recording F times faster "
                   f"(TCPCopy's -a; F < 1: slower; {MIN_SPEED:g}..{MAX_SPEED:g}); default 1")
    g.add_argument("--max-gap", type=number_arg(float, 0, True, 1e9), metavar="S",
                   help="shorten gaps between consecutive packet timestamps to S seconds "
                        "(recording time, before -a), as tc-pace --max-gap; a wait of "
                        "more than an hour is warned about")


def _output(g) -> None:
    g.add_argument("-B", "--batch", type=number_arg(int, 1, True, MAX_BATCH_PKTS), default=1,
                   metavar="N",
                   help="up to N packets per record (\"pkts\" with a sid column, the "
                        "packets of one turn of the loop): less work here and in "
                        "tc-emit; all tc-* tools read batches, scripts see "
                        f"tcpcopy-records(5); 1..{MAX_BATCH_PKTS} (a record stays below "
                        f"the record size limit); default 1")
    g.add_argument("--sessions", metavar="FILE",
                   help="write the session map, one \"sess\" record per replayed session "
                        "(for tc-diff), to FILE, or with '-' into the output stream")


class _SendAction(argparse.Action):
    """--send: nothing is written to stdout, so it may be a terminal."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.send = namespace.allow_tty = True


def _send(g) -> None:
    from tcpcopylib.cli.emit import add_sender_arguments

    g.add_argument("--send", action=_SendAction,
                   help="send the packets from this process, as `| tc-pace | tc-emit` "
                        "would (the same packets in the same order, without the hops' "
                        "delay; less CPU; nothing on stdout); needs root or CAP_NET_RAW")
    add_sender_arguments(g)


def check_send(args) -> None:
    """--send and the options that go with it (UsageError)."""
    from tcpcopylib.cli.emit import check_sender_arguments

    if not args.send:
        if args.interface or args.dst_mac or args.src_mac:
            raise UsageError("-o/--dst-mac/--src-mac go with --send")
        return
    if args.socket:
        raise UsageError("--send goes with forged mode, not --socket")
    if args.batch != 1:
        raise UsageError("-B/--batch shapes the record output; --send writes none")
    if args.sessions == "-":
        raise UsageError("--sessions -: --send writes no output stream; give a FILE")
    check_sender_arguments(args)


def _capture(g) -> None:
    from tcpcopylib.capture import DEFAULT_BUFFER_KIB, ENGINES

    # The pcap engine's ring holds 128 blocks per 32 MiB, each handed over on the block
    # timer (one kernel tick): a few thousand packets a second fill a block's first few
    # KiB only, so the ring holds time, about 0.13 to 0.5 s per 32 MiB, not bytes. In
    # tc-session the capture waits while the engine works and the machine is busy: 4
    # times tc-capture's buffer holds 0.5 to 2 s, longer than its lag before shedding
    # (500 ms), so overload sheds whole sessions before the kernel drops packets
    # (bench_live --forms one at 4,000 sessions/s: 148 to 7,192 packets dropped in 6 of
    # 9 runs with 32 MiB, none in 5 runs with 128 MiB).
    CAPTURE_BUFFER_KIB = 4 * DEFAULT_BUFFER_KIB

    g.add_argument("--capture", metavar="IFACE",
                   help="capture on IFACE in this process, as `tc-capture IFACE |` before "
                        "it would (the same records, without the hop; less CPU); no FILE; "
                        "ends at SIGINT/SIGTERM; needs root or CAP_NET_RAW")
    g.add_argument("--capture-filter", metavar="EXPR", default="",
                   help="with --capture: BPF filter (tcpdump language), as tc-capture -F; "
                        "default 'tcp'")
    g.add_argument("--capture-engine", choices=sorted(ENGINES), default="pcap",
                   help="with --capture: as tc-capture --engine (default pcap)")
    g.add_argument("--capture-buffer", type=number_arg(int, 1, True, 1 << 22),
                   default=CAPTURE_BUFFER_KIB, metavar="KIB",
                   help=f"with --capture: kernel capture buffer in KiB, as tc-capture -B "
                        f"(default {CAPTURE_BUFFER_KIB}: {CAPTURE_BUFFER_KIB // DEFAULT_BUFFER_KIB}"
                        f" times tc-capture's, for the session work stalls the capture "
                        f"in this process; see tc-session(1))")


def check_capture(args) -> None:
    """--capture and the options that go with it (UsageError)."""
    if not args.capture:
        if args.capture_filter:
            raise UsageError("--capture-filter goes with --capture")
        return
    if args.file != "-":
        raise UsageError("--capture IFACE is the input: no FILE")
    if args.socket or args.shards != 1:
        raise UsageError("--capture goes with forged mode in one process (not with --socket "
                         "or --shards)")


def _socket_mode(g) -> None:
    g.add_argument("--socket", action="store_true",
                   help="replay each session through an ordinary TCP connection from "
                        "this host (-c: its local addresses); no tc-emit, tc-intercept, "
                        "tc-feedback or root needed")
    g.add_argument("--keep", action="store_true",
                   help="with --socket: write the replayed connections to stdout (pkt: "
                        "bytes sent, fb: the target's answers; and the sess records of "
                        "the session map unless --sessions FILE takes them; "
                        "tcpcopy-records(5))")


def build_engine(args, emit, claims):
    """The engine tc-session's options describe (checked: UsageError), sending with
    emit(data, sid, now) and claiming sessions with ``claims`` (a FeedbackClient or None)."""
    from tcpcopylib.session import Config, Engine, Mapper, parse_target, parse_transfer

    if bool(args.target) == bool(args.transfer):
        raise UsageError("give exactly one of --target HOST:PORT and -x LIST")
    if args.any_port and not args.target:
        raise UsageError("--any-port goes with --target")
    if not 0 < args.sample <= 100:
        raise UsageError("-r/--sample takes a percentage in 1..100")
    if args.ramp is not None and not 0 < args.ramp <= 1e9:
        raise UsageError("-g/--ramp takes a positive number of seconds")
    if args.max_memory is not None and not 0 < args.max_memory <= 1e9:
        raise UsageError("-m/--max-memory takes a positive number of MB")
    if not args.copies >= 1:
        raise UsageError("-n/--copies takes a number of copies >= 1")
    if not 88 <= args.mss <= 65495:
        raise UsageError("--mss out of range")
    for name in ("gate_timeout", "timeout", "keepalive", "connect_timeout", "gap_timeout",
                 "stats_every"):
        v = getattr(args, name)
        if v is not None and not 0 < v <= 1e9:  # (not NaN, and a finite number of ns)
            raise UsageError(f"--{name.replace('_', '-')} must be positive (at most 1e9)")
    if not (0 <= args.quiet <= 1e9 and 0 <= args.push_gap <= 1e9 and 0 <= args.drain <= 1e9) \
            or args.max_reconnects < 0:
        raise UsageError("--quiet, --push-gap, --drain and --max-reconnects cannot be "
                         "negative (nor "
                         "NaN, nor more than 1e9 s)")
    rules = (parse_target(args.target, args.any_port) if args.target
             else parse_transfer(args.transfer))
    alloc = build_allocator(args, rules)
    ka = args.keepalive if args.keepalive is not None else args.timeout + 120
    cfg = Config(
        no_wait=args.no_wait, only_syn=args.only_syn, fake_mss=args.mss,
        quiet=int(args.quiet * 1e6), push_gap=int(args.push_gap * 1e6), gate_timeout=int(args.gate_timeout * SEC),
        connect_timeout=int(args.connect_timeout * SEC),
        idle_timeout=int(args.timeout * SEC), keepalive_timeout=int(ka * SEC),
        gap_timeout=int(args.gap_timeout * SEC), max_reconnects=args.max_reconnects,
        sample_pct=args.sample, ramp=int((args.ramp or 0) * SEC), copies=args.copies,
        max_sessions=args.max_sessions)
    return Engine(Mapper(rules), emit, cfg, claims, alloc)

def build_admission(args):
    """The admission.Admission of --shed-lag, --shed-backlog and -m (--max-sessions is
    the engine's own check, exact to the session: Config.max_sessions)."""
    from tcpcopylib.session.admission import Admission

    return Admission(
        lag_ms=args.shed_lag, backlog=args.shed_backlog and args.shed_backlog << 10,
        max_rss=int(args.max_memory * (1 << 20)) if args.max_memory else None)


def build_allocator(args, rules):
    """-c, -n and -f: the client address:port allocator, checked against the targets."""
    from tcpcopylib.session.alloc import Allocator, parse_instance, parse_pool

    k, m = parse_instance(args.instance) if args.instance else (0, 1)
    targets = {r.target_ip for r in rules}
    pools = (parse_pool(args.client_pool, exclude=targets)
             if args.client_pool is not None else None)
    alloc = Allocator(pools, k, m)
    fam = {4: "IPv4", 16: "IPv6"}
    for width in sorted({len(ip) for ip in targets}):
        cap = alloc.capacity(width)
        if cap == 0:
            raise UsageError(f"-c has no {fam[width]} address for an {fam[width]} target")
        if args.copies > (cap or alloc.block):
            raise UsageError(f"-n {args.copies}: more copies than client address:port "
                             f"pairs ({cap or alloc.block}) for one session")
    return alloc
