"""The kit for writing tests of tcpcopylib's stages and tools (public; the project's own
tests use it, and so may tests of your own stages or of a pipeline built on the tools).

Tools, in process or as processes:
  ``call(["tc-dump", "--json"], input=data)`` runs a tool through its ``Tool.main()`` in
  this process (no interpreter start-up, so ten to fifty times faster than a process) and
  returns a ``subprocess.CompletedProcess`` with ``returncode``, ``stdout`` and ``stderr``
  as bytes, like ``run()``; ``chain(cmd1, cmd2, ...)`` is a pipeline of such calls. Use it wherever a test checks what a tool makes of its
  input and arguments. Use ``run()``, which starts the real executable, where the process
  itself is what is tested: signals, SIGPIPE and exit 141, a closed stdout, a terminal,
  pipelines, start-up time, network namespaces.
  ``tool_env()`` is the environment for tools started as processes; ``tool_path(name)``
  finds a tool (the checkout's bin/ first, then $PATH).

Streams: ``stream(records)`` encodes records as a stream section, ``decode(data)`` reads one
back the way a tool does, ``cbor_items(data)`` lists the CBOR items as written; a
``Collector`` stands in for the RecordWriter of a stage under test and keeps its records.

Capture files: ``pcap(packets)`` writes a classic pcap file (µs or ns, either byte order)
independently of tcpcopylib.pcapio, so that reader tests do not check the code against
itself.

The session engine: ``EngineRig`` runs a ``tcpcopylib.session.Engine`` on a fake clock, takes
captured client packets and target replies, and records every datagram sent and every
feedback claim; ``Seq`` and ``Isns`` are sequence numbers that wrap at 2**32 as on the wire.

Nothing here imports pytest; the module costs nothing to tools that do not import it.
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

#: the source tree this tcpcopylib was imported from, and its bin/ (where the tools run
#: from a checkout; None when tcpcopylib is installed without one)
REPO = Path(__file__).resolve().parent.parent
BIN: Path | None = REPO / "bin" if (REPO / "bin" / "_tc").exists() else None


# -- tools as processes ------------------------------------------------------------------

def tool_path(name: str) -> str:
    """The executable of tool `name` ("tc-dump"): the checkout's bin/ first, then $PATH."""
    if BIN is not None and (BIN / name).exists():
        return str(BIN / name)
    return shutil.which(name) or name


def tool_env(**changes) -> dict:
    """The environment for tools started as processes: the checkout's bin/ first on PATH and
    the checkout first on PYTHONPATH (so that `python3 -c` in a test imports this
    tcpcopylib), without PYTHONUNBUFFERED (the tools own their buffering; it would slow
    them) and TC_FEEDBACK (a caller's feedback address must not reach a test's tc-session).
    Then `changes`: NAME=value sets a variable, NAME=None removes it."""
    e = dict(os.environ)
    if BIN is not None:
        e["PATH"] = os.pathsep.join([str(BIN), e.get("PATH", "")])
        e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    for var in ("PYTHONUNBUFFERED", "TC_FEEDBACK"):
        e.pop(var, None)
    for k, v in changes.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = str(v)
    return e


def run(args, input: bytes | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a tool (args[0], like "tc-dump") as a process, stdout and stderr captured as bytes;
    keyword arguments go to subprocess.run (env defaults to tool_env())."""
    kw.setdefault("env", tool_env())
    return subprocess.run([tool_path(str(args[0])), *map(str, args[1:])], input=input,
                          capture_output=True, timeout=timeout, **kw)


# -- tools in process --------------------------------------------------------------------

def stop_process(p: subprocess.Popen, grace: float = 10) -> None:
    """End a process a test started: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def wait_listening(port: int, p: subprocess.Popen, timeout: float = 10,
                   host: str = "127.0.0.1") -> int:
    """Wait until the server ``p`` accepts connections on host:port; the port. Raises if
    the process ends first or after ``timeout`` seconds (with its stderr if piped)."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return port
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                err = p.stderr.read() if p.stderr and p.poll() is not None else b""
                raise RuntimeError(f"{p.args[0]} did not listen on {host}:{port} {err!r}")
            time.sleep(0.05)


def tool_class(name: str):
    """The Tool subclass of tool `name` ("tc-dump" -> tcpcopylib.cli.dump's Tool)."""
    from tcpcopylib.cli.common import Tool

    mod = importlib.import_module("tcpcopylib.cli." + name.removeprefix("tc-").replace("-", "_"))
    found = [c for c in vars(mod).values()
             if isinstance(c, type) and issubclass(c, Tool) and c.name == name]
    if not found:
        raise LookupError(f"{mod.__name__} has no Tool subclass named {name!r}")
    return found[0]


# what Tool.main() changes for the whole process, put back after each call()
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM, signal.SIGPIPE)


class CallTimeout(BaseException):
    """call()'s time limit passed (a BaseException: the tools' last line of defence, which
    turns an Exception into exit 1, must not catch it)."""


def _time_is_up(signum, frame):
    raise CallTimeout("the tool did not end in time")


def call(args, input: bytes | None = None, env: dict | None = None, stdout: int | None = None,
         timeout: float | None = 60, **tool_kw) -> subprocess.CompletedProcess:
    """Run a tool in this process: ``tool_class(args[0])(**tool_kw).main(args[1:])``.

    stdin holds `input` (None: empty), and is the process's fd 0 during the call, as for
    the tool run as a process ("-" and no file name read it); stdout is a file in memory,
    or the fd `stdout` (then the result's stdout has only what argparse printed); stderr
    collects the tool's messages and argparse's (usage errors; --help and --version
    print to stdout). `env`: variables set (None: removed) during the call. After `timeout`
    seconds CallTimeout is raised in the tool (by SIGALRM: a tool run with --progress or
    --metrics, which set the timer themselves, has none). Signal handlers, the interval
    timer, fd 0 and sys.std* are as before afterwards, whatever happened. An exception the
    tool does not turn into an exit status (with -vv) is raised.
    """
    cls = tool_class(str(args[0]))
    argv = [str(a) for a in args[1:]]
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    timer = signal.getitimer(signal.ITIMER_REAL)
    in_fd = os.memfd_create("stdin")
    out_fd = os.memfd_create("stdout")
    saved_fd0 = os.dup(0)
    saved_std = sys.stdin, sys.stdout, sys.stderr
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    py_out, py_err = io.StringIO(), io.StringIO()
    py_in = open(0, "r", closefd=False)  # (fd 0 is what it reads; the name is sys.stdin's)
    try:
        os.write(in_fd, input or b"")
        os.lseek(in_fd, 0, os.SEEK_SET)
        os.dup2(in_fd, 0)
        sys.stdin, sys.stdout, sys.stderr = py_in, py_out, py_err
        _set_env(env or {})
        if timeout:
            signal.signal(signal.SIGALRM, _time_is_up)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            status = cls(stdout_fd=out_fd if stdout is None else stdout, stderr=py_err,
                         **tool_kw).main(argv)
        except SystemExit as e:  # argparse: --help, --version, usage errors
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        os.lseek(out_fd, 0, os.SEEK_SET)
        out = b"".join(iter(lambda: os.read(out_fd, 1 << 20), b""))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _set_env(saved_env)
        sys.stdin, sys.stdout, sys.stderr = saved_std
        py_in.close()
        os.dup2(saved_fd0, 0)
        for fd in (saved_fd0, in_fd, out_fd):
            os.close(fd)
        signal.setitimer(signal.ITIMER_REAL, *timer)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess([args[0], *argv], status,
                                       out + py_out.getvalue().encode(),
                                       py_err.getvalue().encode())


def chain(*commands, input: bytes | None = None) -> subprocess.CompletedProcess:
    """`a | b | c` in this process: call() each command in turn on the stdout of the one
    before. Returns the last one's stdout, every stage's stderr and, as `set -o pipefail`
    does, the status of the last stage that failed (0 if none did)."""
    status, errs, data = 0, [], input
    for cmd in commands:
        r = call(cmd, input=data)
        status = r.returncode or status
        errs.append(r.stderr)
        data = r.stdout
    return subprocess.CompletedProcess(list(commands), status, data, b"".join(errs))


def _set_env(changes: dict) -> None:
    for k, v in changes.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)


# -- streams -----------------------------------------------------------------------------

def stream(records, tool: str = "test", **header_fields) -> bytes:
    """Records (dicts) encoded as one stream section, with a header from `tool`."""
    import cbor2

    from tcpcopylib.records import encode_section, header

    return encode_section(header(tool, **header_fields)) + b"".join(map(cbor2.dumps, records))


def decode(data: bytes, headers: bool = False) -> list[dict]:
    """A whole stream held in memory, read as a tool reads its input (batches expanded;
    with headers=True the section headers too)."""
    from tcpcopylib.records import RecordReader

    fd = os.memfd_create("stream")
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return list(RecordReader(fd, headers=headers))
    finally:
        os.close(fd)


class BufferWriter:
    """The RecordWriter surface of the stages that pack records into ``writer.buf`` inline
    (Capturer.batch, Interceptor), kept in memory: ``buf`` holds the encoded records."""

    def __init__(self):
        self.buf, self.records, self.bufsize = bytearray(), 0, 1 << 30

    def write_raw(self, b) -> None:
        self.buf += b
        self.records += 1

    def flush(self) -> None:
        pass


class Collector:
    """Stands in for a RecordWriter given to a stage and keeps what it writes: ``recs``,
    each record as a reader downstream would see it (encoded and decoded again; a batch
    stays one record), and ``headers``, those of the sections it starts."""

    def __init__(self):
        self.recs: list = []
        self.headers: list = []

    def write(self, rec: dict) -> None:
        import cbor2

        self.recs.append(cbor2.loads(cbor2.dumps(rec)))

    def write_raw(self, encoded: bytes) -> None:
        import cbor2

        self.recs.append(cbor2.loads(encoded))

    def new_section(self, hdr: dict) -> None:
        self.headers.append(hdr)

    def flush(self) -> None:
        pass


def cbor_items(data: bytes) -> list:
    """Every CBOR item of a stream as written (label, header, records; batches not
    expanded), for tests of the encoding itself."""
    import cbor2

    f, out = io.BytesIO(data), []
    dec = cbor2.CBORDecoder(f)
    while f.tell() < len(data):
        out.append(dec.decode())
    return out


# -- capture files -----------------------------------------------------------------------

def pcap(packets, linktype: int = 1, ns: bool = True, endian: str = "<",
         snaplen: int = 262144) -> bytes:
    """A classic pcap file. packets: (ts_ns, frame) or (ts_ns, frame, orig_len) each;
    ns=False writes microseconds (the nanoseconds below a µs are dropped); endian "<" or
    ">"; linktype 1 Ethernet, 101 raw IP, 113 Linux cooked, ..."""
    magic = 0xA1B23C4D if ns else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for p in packets:
        ts, frame = p[0], p[1]
        orig = p[2] if len(p) > 2 else len(frame)
        sec, frac = divmod(ts, 10**9)
        if not ns:
            frac //= 1000
        out.append(struct.pack(endian + "IIII", sec, frac, len(frame), orig) + frame)
    return b"".join(out)


# -- the session engine on a fake clock --------------------------------------------------

M32 = 0xFFFFFFFF
MS = 1_000_000          # ns
SEC = 1_000_000_000     # ns


class Seq(int):
    """A 32-bit TCP sequence number: adding and subtracting wrap mod 2**32 as on the wire."""

    def __add__(self, n):
        return Seq((int(self) + n) & M32)

    __radd__ = __add__

    def __sub__(self, n):
        return Seq((int(self) - n) & M32)

    def __repr__(self):
        return f"Seq({int(self)})"


class Isns(NamedTuple):
    """The three initial sequence numbers of a replayed session."""

    client: Seq   # the captured client's SYN
    target: Seq   # the target's SYN-ACK
    server: Seq   # the online server's SYN-ACK (the captured client's acks count from it)


def isns_of(client: int, target: int, server: int) -> Isns:
    return Isns(Seq(client), Seq(target), Seq(server))


#: sequence numbers far from 2**32 (tests/seqnums.py has cases that wrap)
FIXED_ISNS = isns_of(1000, 700000, 50000)


def _ip(text: str) -> bytes:
    from tcpcopylib.packet import ip_bytes

    return ip_bytes(text)


CLIENT, ONLINE, TARGET = _ip("10.9.0.2"), _ip("10.1.0.1"), _ip("10.2.0.5")
MSS_OPT = b"\x02\x04\x05\xb4"   # MSS 1460


class EngineRig:
    """A session Engine on a fake clock (integer ns in ``now``), without a network.

    ``client()`` feeds a captured client packet (CLIENT -> ONLINE:80 unless told),
    ``target()`` a target reply (TARGET:tport -> CLIENT), ``advance(ms)`` moves the clock
    and runs the engine's timers when due. Every datagram the engine sends must carry
    correct checksums and the current time; it is parsed (tcpcopylib.packet.parse_tcp)
    and kept in ``sent`` (all) and ``log``, in order with the feedback claims
    (("claim"|"release", 4-tuple) and ("pkt", packet)); ``pkts()`` returns those sent
    since its last call. ``warnings`` holds the engine's warnings.

    A scripted target: override ``respond(pkt)`` to return the datagrams the target
    answers a sent packet with; they are delivered by ``pump()``, which ``advance()``
    calls after every timer.
    """

    def __init__(self, isns: Isns = FIXED_ISNS, rules=None, alloc=None, tport: int = 80,
                 **cfg):
        from tcpcopylib.session import Config, Engine, Mapper, parse_target

        self.isns = isns
        self.now = 0
        self.tport = tport
        self.log: list = []
        self.sent: list = []
        self.warnings: list = []
        self.replies: list = []
        cfg.setdefault("rto_min", 200 * MS)
        self.e = Engine(Mapper(rules or parse_target(f"10.2.0.5:{tport}", False)), self._emit,
                        Config(**cfg), self, alloc)
        self.e.warn = self.warnings.append

    # the feedback claims interface (tc-session's feedback client)
    def claim(self, *tup):
        self.log.append(("claim", tup))

    def release(self, *tup):
        self.log.append(("release", tup))

    def _emit(self, data, sid, now):
        from tcpcopylib.packet import parse_tcp, tcp_checksum_ok

        assert tcp_checksum_ok(data), "a datagram with a bad checksum"
        assert now == self.now, f"sent at {now}, the clock says {self.now}"
        p = parse_tcp(data)
        self.sent.append(p)
        self.log.append(("pkt", p))
        self.replies += self.respond(p)

    def respond(self, pkt) -> list:
        """The target's answers to a packet sent (datagrams); none by default."""
        return []

    def pump(self, rounds: int = 100) -> None:
        """Deliver the target's answers until it says no more."""
        for _ in range(rounds):
            if not self.replies:
                return
            batch, self.replies = self.replies, []
            for r in batch:
                self.e.feedback_packet(r, self.now)

    def pkts(self) -> list:
        """Packets sent since the last call."""
        out = [x[1] for x in self.log if x[0] == "pkt"]
        self.log[:] = [x for x in self.log if x[0] != "pkt"]
        return out

    def client(self, flags, seq, ack=0, payload=b"", sport=5000, opts=None, dport=80,
               cip=CLIENT):
        """A captured client packet, cip:sport -> ONLINE:dport; TCP options `opts`, by
        default MSS 1460 on a SYN (as captured SYNs have) and none on other packets."""
        from tcpcopylib.packet import TH_SYN, build_tcp

        if opts is None:
            opts = MSS_OPT if flags & TH_SYN else b""
        self.e.client_packet(build_tcp(cip, ONLINE, sport, dport, seq, ack, flags, 65535, opts,
                                       payload), self.now)

    def target(self, flags, seq, ack, payload=b"", win=65535, opts=b"", dport=5000,
               hdr_only=False, cip=CLIENT):
        """A target reply, TARGET:tport -> cip:dport; hdr_only: feedback carrying the
        headers only, with the original length (tc-intercept without payload)."""
        from tcpcopylib.packet import build_tcp

        data = build_tcp(TARGET, cip, self.tport, dport, seq, ack, flags, win, opts, payload)
        if hdr_only:
            self.e.feedback_packet(data[:len(data) - len(payload)], self.now, len(data))
        else:
            self.e.feedback_packet(data, self.now)

    def advance(self, ms, max_timers: int = 100_000) -> None:
        """Move the clock `ms` milliseconds on, running each timer at its due time."""
        end = self.now + int(ms * MS)
        for _ in range(max_timers):
            d = self.e.next_deadline()
            if d is None or d > end:
                break
            self.now = max(self.now, d)
            self.e.on_timer(self.now)
            self.pump()
        self.now = end

    def outcomes(self) -> dict:
        """The session outcomes counted so far (those not zero)."""
        return {k: v for k, v in self.e.st.outcomes.items() if v}

    def open(self, sport=5000, synack_opts=MSS_OPT, client_opts=MSS_OPT, cack=None) -> list:
        """A captured SYN and, 1 ms later, handshake ACK (acking cack, by default the
        online server's SYN), the target's SYN-ACK with it (the target accepted no later
        than the online server: data keeps its due time); returns the packets sent."""
        from tcpcopylib.packet import TH_ACK, TH_SYN

        cisn, tisn, sisn = self.isns
        self.client(TH_SYN, cisn, 0, opts=client_opts, sport=sport)
        self.now += 1 * MS
        self.client(TH_ACK, cisn + 1, sisn + 1 if cack is None else cack, sport=sport)
        self.target(TH_SYN | TH_ACK, tisn, cisn + 1, opts=synack_opts, dport=sport)
        return self.pkts()
