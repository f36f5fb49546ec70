"""Record streams through a NATS JetStream broker: the library of tc-publish and tc-subscribe.

The broker is a pipe between hosts that keeps what passed through it for a while:

    online host:  tc-capture eth0 | tc-publish --stream web
    replay host:  tc-subscribe --stream web --partition K/M | tc-session -f K/M ... | tc-emit

A stream of N partitions is one JetStream stream with the subjects ``tc.<stream>.p<k>``,
0 <= k < N (N is recorded in the stream's description). Every packet goes to the partition
of its connection (``partition_of``: a hash of both ends' address:port, the same whichever
way the packet goes), so a connection's packets travel in one subject, in order; other
records with a datagram (fb) go by the same key, records without one to partition 0.
A stream of replies (tc-publish --by-port-block M) goes by ``port_block_of`` instead: the
replay host K of tc-session -f K/M gets the replies to its own client ports. A message holds the records of one partition read in one go
(our layout: a "pkts" batch per up to MAX_BATCH_PKTS packets), so the broker's cost is per
chunk of input, not per packet; timestamps travel unchanged.

Delivery (see tc-publish(1) and tc-subscribe(1)):
- publish: each message carries Nats-Msg-Id ``<publisher id>:<k>:<n>`` (n counts the
  messages of partition k), so a publish retried after a lost acknowledgement (a broker
  node gone, a leader elected) is stored once; at most one message per partition is in
  flight, so retries never reorder a partition. Input is read only when the previous chunk
  is stored (backpressure reaches the capture as a full pipe, nothing is buffered here).
- subscribe: a pull consumer over the partitions of K/M, fetching a bounded batch; each
  message is written downstream, then acknowledged. Tc-Pub/Tc-Seq headers give each
  publisher's partition its order: a message redelivered (its ack lost, or not sent
  before the ack wait) or stored twice (past the broker's duplicate window) is dropped,
  so no record reaches a session twice; a gap (a fetch's answer lost with a broker node,
  its messages delivered again only after the ack wait) is filled by reading the
  stream directly before the later message is written; what the stream no longer holds
  is counted "lost".

nats-py is imported only inside the functions that connect (the tools' --help and
--version stay light, and a checkout without it fails with a clear message).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import struct
import time
import zlib

from tcpcopylib.errors import (NoPermissionError, StreamError, UnavailableError, UsageError)

SUBJECT_PREFIX = "tc"
DEFAULT_PARTITIONS = 16
DEFAULT_MAX_AGE = 24 * 3600.0  # seconds a stream keeps records
DEFAULT_URL = "nats://127.0.0.1:4222"
ENV_URL = "NATS_URL"
MAX_MESSAGE = 512 << 10  # bytes of records per message at most (the server's limit: 1 MiB)
PIPE_SIZE = 1 << 20  # tc-publish's input pipe, when it may grow it
PUBLISH_TIMEOUT = 2.0  # seconds for one publish's acknowledgement before a retry
DESCRIPTION = "tcpcopy record stream; partitions={n}"
_DESCRIPTION_RE = re.compile(r"partitions=(\d+)")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# message headers
H_MSG_ID = "Nats-Msg-Id"
H_PUB = "Tc-Pub"        # the publisher's id
H_SEQ = "Tc-Seq"        # the message's number in its partition, from this publisher (1, 2...)
H_RECORDS = "Tc-Records"  # records (a batch counts as its packets) in the message

_PORTS = struct.Struct("!HH")


# -- the session key -------------------------------------------------------------------------

def session_endpoints(data) -> bytes | None:
    """Both ends of the TCP connection of an IPv4/IPv6 datagram, as address+port bytes in
    a fixed order (the smaller end first): the same for both directions of a connection.
    Not TCP: the two addresses alone. None if it is not an IP datagram."""
    if not data:
        return None
    v = data[0] >> 4
    if v == 4:
        ihl = (data[0] & 15) * 4
        a, b = data[12:16], data[16:20]
        if data[9] == 6 and len(data) >= ihl + 4:
            a, b = a + data[ihl:ihl + 2], b + data[ihl + 2:ihl + 4]
    elif v == 6 and len(data) >= 40:
        a, b = data[8:24], data[24:40]
        if data[6] == 6 and len(data) >= 44:
            a, b = a + data[40:42], b + data[42:44]
    else:
        return None
    return bytes(a + b if a <= b else b + a)


def partition_of(data, n: int) -> int:
    """The partition (0 <= k < n) of the connection a datagram belongs to; 0 for what is
    not IP. One function for every owner of a connection, so none ever splits."""
    key = session_endpoints(data)
    return 0 if key is None or n == 1 else zlib.crc32(key) % n


def port_block_of(data, n: int) -> int:
    """The partition of a reply (an fb record's datagram) in a stream of replies: the K of
    the replay host (``tc-session -f K/n``) whose client port block holds the datagram's
    destination port, as tc-session's allocator assigns the blocks; 0 for what is not TCP
    or goes to a port in no block."""
    from tcpcopylib.session.alloc import block_of_port

    if not data:
        return 0
    v = data[0] >> 4
    if v == 4:
        ihl = (data[0] & 15) * 4
        if data[9] != 6 or len(data) < ihl + 4:
            return 0
        port = data[ihl + 2] << 8 | data[ihl + 3]
    elif v == 6 and len(data) >= 44 and data[6] == 6:
        port = data[42] << 8 | data[43]
    else:
        return 0
    k = block_of_port(port, n)
    return 0 if k is None else k


def parse_share(text: str, what: str = "--partition") -> tuple[int, int]:
    """'K/M' -> (K, M), 0 <= K < M <= 1024."""
    m = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)) <= 1024:
        raise UsageError(f"{what}: expected K/M with 0 <= K < M <= 1024, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def subject(stream: str, k: int) -> str:
    return f"{SUBJECT_PREFIX}.{stream}.p{k}"


def check_stream_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name or ""):
        raise UsageError(f"--stream: 1 to 64 letters, digits, '-' or '_', got {name!r}")
    return name


def js_stream_name(stream: str) -> str:
    """The JetStream stream holding our stream ``stream`` (upper case by NATS habit)."""
    return "TC_" + stream.upper().replace("-", "_")


# -- times and durations ---------------------------------------------------------------------

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'90', '90s', '1.5m', '2h', '7d', '250ms' -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)(ms|s|m|h|d)?", (text or "").strip())
    if not m:
        raise ValueError(f"not a duration (e.g. 90s, 10m, 2h, 7d): {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time as epoch seconds: ISO 8601 (no zone: UTC), '@EPOCH', 'now' or
    '-DURATION' (that long before now; on a command line --since=-10m)."""
    text = (text or "").strip()
    now = time.time() if now is None else now
    if text == "now":
        return now
    if text.startswith("-"):
        return now - parse_duration(text[1:])
    if text.startswith("@"):
        return float(text[1:])
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time (ISO 8601, @EPOCH or -DURATION): {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


# -- the connection ----------------------------------------------------------------------------

def add_connection_arguments(p) -> None:
    """The broker options both tools share: servers, credentials, TLS, the stream."""
    g = p.add_argument_group("broker")
    g.add_argument("-s", "--server", metavar="URL",
                   help=f"NATS servers, comma-separated (nats://HOST:PORT, tls://...); "
                        f"default ${ENV_URL}, else {DEFAULT_URL}")
    g.add_argument("--stream", default="tc", metavar="NAME",
                   help="the record stream (subjects tc.NAME.p<k>); default tc")
    g.add_argument("--token-file", metavar="FILE",
                   help="authenticate with the token in FILE")
    g.add_argument("--user", metavar="USER", help="authenticate as USER (with --password-file)")
    g.add_argument("--password-file", metavar="FILE", help="USER's password, in FILE")
    g.add_argument("--creds", metavar="FILE",
                   help="authenticate with a NATS credentials file (JWT and nkey seed)")
    g.add_argument("--nkey", metavar="FILE", help="authenticate with the nkey seed in FILE")
    g.add_argument("--no-auth", action="store_true",
                   help="connect without credentials (only for a broker that asks none: "
                        "refused for a server not on loopback without it)")
    g.add_argument("--tls-ca", metavar="FILE",
                   help="use TLS, trusting the certificate authorities in FILE")
    g.add_argument("--tls-cert", metavar="FILE",
                   help="client certificate (PEM) for TLS, with --tls-key")
    g.add_argument("--tls-key", metavar="FILE", help="the client certificate's key (PEM)")
    g.add_argument("--retry-for", metavar="DURATION", default="60s",
                   help="keep retrying a broker that does not answer for this long before "
                        "giving up with status 69 (default 60s)")


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror or e}") from None
    if not text:
        raise UsageError(f"{what} {path}: empty")
    return text


def _is_loopback(url: str) -> bool:
    host = re.sub(r"^[a-z]+://", "", url).rsplit("@", 1)[-1]
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def connect_options(args, name: str) -> dict:
    """nats.connect() keyword arguments from the shared options (files read, TLS context
    built); UsageError for a bad combination."""
    servers = [s.strip() for s in (args.server or os.environ.get(ENV_URL) or DEFAULT_URL)
               .split(",") if s.strip()]
    servers = [s if "://" in s else f"nats://{s}" for s in servers]
    if not servers:
        raise UsageError("--server: no server given")
    opts = {"servers": servers, "name": f"{name}@{socket.gethostname()}",
            "allow_reconnect": True, "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5, "connect_timeout": 2}
    given = 0
    if args.token_file:
        opts["token"] = _read_secret(args.token_file, "--token-file")
        given += 1
    if args.user or args.password_file:
        if not (args.user and args.password_file):
            raise UsageError("--user and --password-file go together")
        opts["user"] = args.user
        opts["password"] = _read_secret(args.password_file, "--password-file")
        given += 1
    if args.creds:
        if not os.path.isfile(args.creds):
            raise UsageError(f"--creds {args.creds}: no such file")
        opts["user_credentials"] = args.creds
        given += 1
    if args.nkey:
        if not os.path.isfile(args.nkey):
            raise UsageError(f"--nkey {args.nkey}: no such file")
        opts["nkeys_seed"] = args.nkey
        given += 1
    if given > 1:
        raise UsageError("give one of --token-file, --user/--password-file, --creds, --nkey")
    if not given and not args.no_auth and not all(_is_loopback(s) for s in servers):
        raise UsageError("no broker credentials: give --token-file, --user/--password-file, "
                         "--creds or --nkey (or --no-auth for a broker that asks none)")
    if args.tls_cert and not args.tls_key or args.tls_key and not args.tls_cert:
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_ca or args.tls_cert or any(s.startswith("tls://") for s in servers):
        import ssl

        try:
            ctx = ssl.create_default_context(cafile=args.tls_ca)
            if args.tls_cert:
                ctx.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"TLS: {e}") from None
        opts["tls"] = ctx
    try:
        opts["_retry_for"] = parse_duration(args.retry_for)
    except ValueError as e:
        raise UsageError(f"--retry-for: {e}") from None
    return opts


def _nats():
    try:
        import nats  # noqa: F401
        import nats.js.api  # noqa: F401
    except ImportError:
        raise UnavailableError("the NATS client is not installed: pip install "
                               "'tcpcopylib[nats]' (nats-py)") from None
    return nats


async def connect(opts: dict, warn=None):
    """A connected nats client. The first connection is tried for opts' retry time (the
    client's own reconnection goes on in the background); a refusal of the credentials
    ends it at once (NoPermissionError)."""
    import asyncio

    nats = _nats()
    opts = dict(opts)
    retry_for = opts.pop("_retry_for", 60.0)
    refused = asyncio.Event()
    errors: list = []
    reported = set()

    async def on_error(e):
        text = f"{type(e).__name__}: {e}"
        errors.append(text)
        if "authorization" in text.lower() or "authentication" in text.lower():
            refused.set()
        if warn is not None and text not in reported and len(reported) < 20:
            reported.add(text)
            warn(f"broker: {text}")

    connecting = asyncio.ensure_future(nats.connect(error_cb=on_error, **opts))
    waiting = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, waiting}, timeout=retry_for,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        return connecting.result()
    err = errors[-1] if errors else None
    if connecting.done() and not connecting.cancelled():
        e = connecting.exception()
        err = f"{type(e).__name__}: {e}"
    else:
        connecting.cancel()
    if refused.is_set():
        raise NoPermissionError(f"the broker refused the credentials ({err})")
    raise UnavailableError(f"cannot reach the broker at {','.join(opts['servers'])}"
                           + (f": {err}" if err else f" within {retry_for:g} s"))


async def with_retry(make, retry_for: float, what: str, warn=None):
    """``await make()``, tried again on broker errors (a cluster electing its leaders, a
    node going away) for at most retry_for seconds; then UnavailableError."""
    import asyncio

    nats = _nats()
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return await make()
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            if isinstance(e, nats.js.errors.BadRequestError):
                raise StreamError(f"{what}: {e}") from None
            if time.monotonic() >= deadline:
                raise UnavailableError(f"{what}: {type(e).__name__}: {e}") from None
            if warn is not None:
                warn(f"{what}: {type(e).__name__}: {e}; trying again")
            await asyncio.sleep(0.5)


async def stream_partitions(js, stream: str) -> int | None:
    """The partition count of an existing stream, None if there is no such stream."""
    nats = _nats()
    try:
        info = await js.stream_info(js_stream_name(stream))
    except nats.js.errors.NotFoundError:
        return None
    m = _DESCRIPTION_RE.search(info.config.description or "")
    if not m:
        raise StreamError(f"JetStream stream {js_stream_name(stream)} is not a tcpcopy "
                          f"record stream (no partitions= in its description)")
    return int(m.group(1))


async def ensure_stream(js, stream: str, partitions: int, max_age: float, replicas: int,
                        max_bytes: int | None = None) -> int:
    """Create the stream if it does not exist; its partition count (an existing stream's
    must equal ``partitions`` unless that is None)."""
    nats = _nats()
    have = await stream_partitions(js, stream)
    if have is not None:
        if partitions is not None and have != partitions:
            raise UsageError(f"stream {stream} has {have} partitions, not {partitions}")
        return have
    n = partitions or DEFAULT_PARTITIONS
    cfg = nats.js.api.StreamConfig(
        name=js_stream_name(stream), description=DESCRIPTION.format(n=n),
        subjects=[f"{SUBJECT_PREFIX}.{stream}.>"], max_age=max_age, num_replicas=replicas,
        storage=nats.js.api.StorageType.FILE, duplicate_window=min(120.0, max_age),
        max_bytes=max_bytes or -1, discard=nats.js.api.DiscardPolicy.OLD)
    try:
        await js.add_stream(cfg)
    except nats.js.errors.BadRequestError as e:  # two publishers created it at once
        if await stream_partitions(js, stream) is None:
            raise StreamError(f"cannot create stream {stream}: {e}") from None
    return n


# -- publish: records -> per-partition messages ----------------------------------------------------

class Partitioner:
    """The records of one chunk of input, split by partition and encoded as messages.

    ``add(items)`` takes what StreamDecoder.parse(AS_PKT) gives: (ts, data) tuples for
    packets, dicts for other records; ``messages()`` returns [(k, payload, records)], in
    partition order, each partition's messages in input order. With ``by_port_block``,
    the partition of a datagram is port_block_of's (the replies' stream), not its session's.
    """

    def __init__(self, n: int, by_port_block: bool = False):
        from tcpcopylib.records import MAX_BATCH_PKTS

        self.n = n
        self.key = port_block_of if by_port_block else partition_of
        self.batch = MAX_BATCH_PKTS
        self.parts: dict = {}  # k -> [encoded pieces, bytes, records, stamps, datas]

    def _part(self, k):
        p = self.parts.get(k)
        if p is None:
            p = self.parts[k] = [[], 0, 0, [], []]
        return p

    def _close_batch(self, p) -> None:
        from tcpcopylib.wire import encode_pkts

        if p[3]:
            piece = encode_pkts(p[3], p[4])
            p[0].append((piece, len(p[3])))
            p[1] += len(piece)
            p[3], p[4] = [], []

    def add(self, items) -> None:
        import cbor2

        n, key = self.n, self.key
        for it in items:
            if type(it) is tuple:
                ts, data = it
                p = self._part(key(data, n))
                p[3].append(ts)
                p[4].append(data)
                if len(p[3]) >= self.batch:
                    self._close_batch(p)
                continue
            data = it.get("data")
            k = key(data, n) if isinstance(data, (bytes, bytearray)) else 0
            p = self._part(k)
            self._close_batch(p)  # (keeps the partition's order)
            piece = cbor2.dumps(it)
            p[0].append((piece, 1))
            p[1] += len(piece)

    def messages(self) -> list:
        out = []
        for k in sorted(self.parts):
            p = self.parts[k]
            self._close_batch(p)
            buf, count = [], 0
            size = 0
            for piece, recs in p[0]:
                if buf and size + len(piece) > MAX_MESSAGE:
                    out.append((k, b"".join(buf), count))
                    buf, count, size = [], 0, 0
                buf.append(piece)
                count += recs
                size += len(piece)
            if buf:
                out.append((k, b"".join(buf), count))
        self.parts.clear()
        return out


def publisher_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{time.time_ns() & 0xFFFFFFFFFF:x}"


class PublishStats:
    def __init__(self):
        self.records = self.messages = self.bytes = 0
        self.retries = self.duplicates = 0


async def publish_round(js, stream: str, msgs: list, pub: str, seqs: dict, stats,
                        retry_for: float, warn=None) -> None:
    """Store messages of distinct partitions; each is retried (same Nats-Msg-Id) until the
    broker acknowledges it, for at most retry_for seconds without progress."""
    import asyncio

    nats = _nats()
    pending = []
    for k, payload, count in msgs:
        seqs[k] = seqs.get(k, 0) + 1
        hdr = {H_MSG_ID: f"{pub}:{k}:{seqs[k]}", H_PUB: pub, H_SEQ: str(seqs[k]),
               H_RECORDS: str(count)}
        pending.append((subject(stream, k), payload, hdr, count))
    deadline = time.monotonic() + retry_for
    while pending:
        results = await asyncio.gather(
            *(js.publish(s, p, timeout=PUBLISH_TIMEOUT, headers=dict(h))
              for s, p, h, _ in pending), return_exceptions=True)
        failed = []
        for m, r in zip(pending, results):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                if isinstance(r, nats.js.errors.BadRequestError) or getattr(
                        r, "code", None) in (400, 413):  # retrying would not help
                    raise StreamError(f"the broker refused a message on {m[0]}: {r}")
                failed.append((m, r))
                continue
            stats.messages += 1
            stats.records += m[3]
            stats.bytes += len(m[1])
            if r.duplicate:
                stats.duplicates += 1
        if not failed:
            return
        if len(failed) < len(pending):
            deadline = time.monotonic() + retry_for  # progress
        if time.monotonic() >= deadline:
            e = failed[0][1]
            raise UnavailableError(f"the broker stored nothing for {retry_for:g} s: "
                                   f"{type(e).__name__}: {e}")
        stats.retries += len(failed)
        if warn is not None and stats.retries in (1, 10, 100, 1000):
            warn(f"retrying {len(failed)} message(s) not acknowledged "
                 f"({type(failed[0][1]).__name__}); {stats.retries} retries so far")
        pending = [m for m, _ in failed]
        await asyncio.sleep(0.2)


class FdReader:
    """Chunks of a file descriptor for an asyncio loop, read in the loop's thread: a pipe
    or socket when it is readable (non-blocking), anything else directly.

    (A reader thread handing each chunk to the loop cost ~100 us of CPU per chunk: on a
    live capture, a chunk is a packet or two.)"""

    def __init__(self, fd: int, loop):
        self.fd, self.loop = fd, loop
        self.pollable = False
        try:
            loop.add_reader(fd, lambda: None)
            loop.remove_reader(fd)
            self.pollable = True
        except (PermissionError, OSError, ValueError):  # a regular file, /dev/null
            pass
        self._was_blocking = os.get_blocking(fd)
        if self.pollable:
            os.set_blocking(fd, False)
            try:  # room for a --linger's worth of input while we sleep (a pipe: 64 KiB)
                import fcntl

                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except (OSError, AttributeError):
                pass

    async def read(self, timeout: float | None = None) -> bytes | None:
        """The next chunk (b"" at the end); None if nothing came within ``timeout``."""
        from tcpcopylib.records import CHUNK

        if not self.pollable:
            return os.read(self.fd, CHUNK)
        try:
            return os.read(self.fd, CHUNK)
        except BlockingIOError:
            pass
        fut = self.loop.create_future()

        def ready():
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(self.fd, ready)
        timer = self.loop.call_later(timeout, ready) if timeout is not None else None
        try:
            await fut
        finally:
            self.loop.remove_reader(self.fd)
            if timer is not None:
                timer.cancel()
        try:
            return os.read(self.fd, CHUNK)
        except BlockingIOError:
            return None

    def read_ready(self, limit: int) -> list:
        """The chunks that can be read now without waiting, up to about ``limit`` bytes
        (a b"" chunk last at the end of the input)."""
        from tcpcopylib.records import CHUNK

        out, size = [], 0
        while size < limit:
            try:
                chunk = os.read(self.fd, CHUNK)
            except BlockingIOError:
                break
            out.append(chunk)
            if not chunk:
                break
            size += len(chunk)
        return out

    def close(self) -> None:
        if self.pollable and self._was_blocking:
            try:
                os.set_blocking(self.fd, True)
            except OSError:
                pass


# -- subscribe ---------------------------------------------------------------------------------

class SubscribeStats:
    def __init__(self):
        self.messages = self.records = self.bytes = 0
        self.redelivered = 0   # dropped: a message written already, delivered again
        self.duplicates = 0    # dropped: a message the stream stored twice
        self.lost = 0          # messages missing between two of one publisher's partition
        self.recovered = 0     # messages a delivery skipped, read from the stream instead
        self.late = 0          # messages written more than late_after after they were stored
        self.max_lag = 0.0     # seconds, the largest (write time - store time)


class Deduper:
    """What a subscriber has written, per (publisher, partition): the last message number
    and its stream sequence. ``check(stream_seq, pub, k, seq)`` says whether a message is
    new and how many of that publisher's messages of partition k are missing before it.

    A pull consumer delivers in stream order only while nothing is lost on the way: a
    fetch whose answer died with a broker node leaves its messages pending, and the later
    ones come first; the pending ones come again after the ack wait. So order and
    duplicates are judged per (publisher, partition), whose messages the stream holds in
    order (tc-publish has one in flight per partition), and a gap is for the caller to
    fill from the stream (``deliver`` reads the missing messages directly) before the
    message is written; only what the stream does not hold is counted lost.
    Messages without our headers (another publisher's) are judged by stream sequence."""

    def __init__(self, stats):
        self.stats = stats
        self.last_stream_seq = 0  # of messages without headers
        self.last: dict = {}  # (pub, k) -> (message number, stream sequence)

    def check(self, stream_seq: int, pub: str | None, k: int, seq: int | None) -> int | None:
        """None: drop it (written already); else the number of messages missing before it
        (0: it comes next). ``written`` must follow for each message written."""
        st = self.stats
        if pub is None or seq is None:
            if stream_seq <= self.last_stream_seq:
                st.redelivered += 1
                return None
            return 0
        last = self.last.get((pub, k))
        if last is None:
            return 0  # a publisher first seen mid-way: no gap
        if seq <= last[0]:
            if stream_seq <= last[1]:
                st.redelivered += 1  # delivered again
            else:
                st.duplicates += 1  # stored twice (a retry past the duplicate window)
            return None
        return seq - last[0] - 1

    def written(self, stream_seq: int, pub: str | None, k: int, seq: int | None) -> None:
        if pub is None or seq is None:
            self.last_stream_seq = max(self.last_stream_seq, stream_seq)
        else:
            self.last[(pub, k)] = (seq, stream_seq)

    def after(self, pub: str, k: int) -> tuple:
        """(message number, stream sequence) of the last written of (pub, k)."""
        return self.last[(pub, k)]


async def fetch_ready(psub, nc, batch: int, timeout: float) -> list:
    """Up to ``batch`` messages of a pull subscription, without waiting for the batch to
    fill: a pull of one that waits up to ``timeout`` (asyncio.TimeoutError if nothing
    comes), then a no-wait pull of what else the consumer has ready now.

    (nats-py's fetch(batch) waits until the batch is full or its timeout is over when the
    consumer has fewer messages: up to a second of delay for every live record.)"""
    import asyncio
    import json

    msgs = await psub.fetch(1, timeout=timeout)
    if batch <= 1:
        return msgs
    # the no-wait pull, to the consumer's next-message subject, answers to our inbox
    sub = psub._sub
    await nc.publish(psub._nms, json.dumps({"batch": batch - 1, "no_wait": True}).encode(),
                     reply=psub._deliver)
    while len(msgs) < batch:
        try:
            msg = await sub.next_msg(timeout=max(timeout, 1.0))
        except asyncio.TimeoutError:
            break
        status = msg.headers.get("Status") if msg.headers else None
        if status == "100":  # an idle heartbeat
            continue
        if status:  # 404 no more messages, 408 request over, 409 ...: this pull is done
            break
        msgs.append(msg)
    return msgs


def partition_from_subject(subj: str) -> int:
    try:
        return int(subj.rsplit(".p", 1)[1])
    except (IndexError, ValueError):
        return 0


def message_id(subj: str, hdr: dict) -> tuple:
    """(publisher, partition, message number) of a message; publisher and number are None
    without tc-publish's headers."""
    seq = hdr.get(H_SEQ)
    return (hdr.get(H_PUB), partition_from_subject(subj),
            int(seq) if seq and seq.isdigit() else None)


MAX_GAP_READS = 1024  # stream messages read at most to fill one gap in a delivery


async def read_missing(js, stream: str, subj: str, pub: str, after: tuple, seq: int,
                       stream_seq: int) -> list:
    """The messages of publisher ``pub`` on subject ``subj`` of JetStream stream ``stream``
    that come between ``after`` (message number, stream sequence: the last one written)
    and message ``seq`` (at ``stream_seq``), read from the stream directly, in order, as
    (message, number); those it does not hold (never stored, or dropped by its limits)
    are not in the list."""
    nats = _nats()
    want, at = after[0] + 1, after[1] + 1
    found = []
    for _ in range(MAX_GAP_READS):
        if at >= stream_seq or want >= seq:
            break
        try:
            raw = await js.get_msg(stream, seq=at, subject=subj, next=True)
        except nats.js.errors.NotFoundError:
            break
        if raw.seq >= stream_seq:
            break
        by, _, n = message_id(subj, raw.headers or {})
        if by == pub and n is not None and want <= n < seq:
            found.append((raw, n))
            want = n + 1
        at = raw.seq + 1
    return found


def _write_message(writer, st, data: bytes, hdr: dict, lag: float, late_after: float) -> None:
    writer.buf += data
    count = hdr.get(H_RECORDS, "0")
    st.records += int(count) if count.isdigit() else 0
    st.messages += 1
    st.bytes += len(data)
    if lag > st.max_lag:
        st.max_lag = lag
    if lag > late_after:
        st.late += 1


async def wait_stream(js, stream: str, retry_for: float, stop) -> int | None:
    """The stream's partition count, waiting (retry_for at most) for a publisher to create
    it; None if ``stop`` (an asyncio.Event) is set first."""
    import asyncio

    deadline = time.monotonic() + retry_for
    while not stop.is_set():
        n = await with_retry(lambda: stream_partitions(js, stream),
                             max(0.1, deadline - time.monotonic()), f"stream {stream}")
        if n is not None:
            return n
        if time.monotonic() >= deadline:
            raise UnavailableError(f"no stream {stream} on the broker after {retry_for:g} s")
        await asyncio.sleep(0.5)
    return None


def consumer_config(subjects: list, batch: int, ack_wait: float, since: float | None,
                    from_start: bool):
    """A pull consumer over ``subjects``: explicit acks, at most four batches unacknowledged,
    from now on (or from ``since``, or from the start); removed after 5 idle minutes."""
    nats = _nats()
    api = nats.js.api
    cfg = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait,
                             max_ack_pending=4 * batch, deliver_policy=api.DeliverPolicy.NEW,
                             inactive_threshold=300.0)
    if len(subjects) > 1:
        cfg.filter_subjects = subjects
    if since is not None:
        cfg.deliver_policy = api.DeliverPolicy.BY_START_TIME
        cfg.opt_start_time = datetime.datetime.fromtimestamp(since, datetime.timezone.utc)
    elif from_start:
        cfg.deliver_policy = api.DeliverPolicy.ALL
    return cfg


async def deliver(sub, nc, js, writer, st, batch: int, until: float | None,
                  late_after: float, retry_for: float, stop, info, dedup=None) -> None:
    """The subscriber's loop: fetch what is ready, write the new messages' records to
    ``writer`` (a RecordWriter), flush, then acknowledge; until ``stop`` is set or the
    messages pass ``until`` (epoch seconds of the broker's store time). ``dedup``: what
    was written before (a Deduper of ``st``; a new one by default)."""
    import asyncio

    nats = _nats()
    if dedup is None:
        dedup = Deduper(st)
    last_ok = time.monotonic()
    while not stop.is_set():
        try:
            msgs = await fetch_ready(sub, nc, batch, 1.0)
        except asyncio.TimeoutError:  # (nats' TimeoutError too): nothing to deliver
            msgs = []
        except nats.errors.Error as e:  # (a consumer without a leader for a while, ...)
            if time.monotonic() - last_ok > retry_for:
                raise UnavailableError(f"the broker delivered nothing for {retry_for:g} s: "
                                       f"{type(e).__name__}: {e}") from None
            info(f"fetch: {type(e).__name__}: {e}")
            await asyncio.sleep(0.2)
            continue
        last_ok = time.monotonic()
        if not msgs:
            if until is not None and time.time() > until:
                return  # all stored up to until is written
            continue
        done = False
        written = []
        now = time.time()
        for msg in msgs:
            md = msg.metadata
            stored = md.timestamp.timestamp()
            if until is not None and stored > until:
                done = True
                break
            hdr = msg.headers or {}
            pub, k, seq = message_id(msg.subject, hdr)
            stream_seq = md.sequence.stream
            missing = dedup.check(stream_seq, pub, k, seq)
            if missing:  # delivered out of order: the stream has the missing ones
                found = await with_retry(
                    lambda: read_missing(js, md.stream, msg.subject, pub, dedup.after(pub, k),
                                         seq, stream_seq),
                    retry_for, "reading the stream", info)
                for raw, n in found:
                    _write_message(writer, st, raw.data or b"", raw.headers or {},
                                   now - stored, late_after)
                    dedup.written(raw.seq, pub, k, n)
                st.recovered += len(found)
                st.lost += missing - len(found)
            if missing is not None:
                _write_message(writer, st, msg.data, hdr, now - stored, late_after)
                dedup.written(stream_seq, pub, k, seq)
            written.append(msg)
        writer.flush()  # downstream has the records (the pipe holds them) ...
        for msg in written:  # ... before the broker forgets them
            await msg.ack()
        if done:
            return
