"""tc-session's options (an argparse namespace, see tcpcopylib.cli.session) checked and
turned into an Engine: the mapping, the client address allocator and the Config."""

from __future__ import annotations

from tcpcopylib.errors import UsageError

SEC = 1_000_000_000


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
    if not (0 <= args.quiet <= 1e9 and 0 <= args.drain <= 1e9) or args.max_reconnects < 0:
        raise UsageError("--quiet, --drain and --max-reconnects cannot be negative (nor "
                         "NaN, nor more than 1e9 s)")
    rules = (parse_target(args.target, args.any_port) if args.target
             else parse_transfer(args.transfer))
    alloc = build_allocator(args, rules)
    ka = args.keepalive if args.keepalive is not None else args.timeout + 120
    cfg = Config(
        no_wait=args.no_wait, only_syn=args.only_syn, fake_mss=args.mss,
        quiet=int(args.quiet * 1e6), gate_timeout=int(args.gate_timeout * SEC),
        connect_timeout=int(args.connect_timeout * SEC),
        idle_timeout=int(args.timeout * SEC), keepalive_timeout=int(ka * SEC),
        gap_timeout=int(args.gap_timeout * SEC), max_reconnects=args.max_reconnects,
        sample_pct=args.sample, ramp=int((args.ramp or 0) * SEC), copies=args.copies)
    return Engine(Mapper(rules), emit, cfg, claims, alloc)

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
