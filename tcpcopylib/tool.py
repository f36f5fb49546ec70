"""The Tool base class: shared flags, stream I/O, errors -> exit codes, signals.

Every tc-* tool (tcpcopylib.cli.*) subclasses Tool, adds its own arguments and implements
run(args); tcpcopylib.cli.common is the import point the tools use.
Library code raises tcpcopylib.errors.TcError subclasses; only Tool.main() turns them
into a one-line message on stderr and an exit status (see tcpcopy(7), EXIT STATUS).

Keep this module light: tools import dpkt, pcapy, sockets etc. inside run(), so that
`tc-dump --version` starts fast.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time

from tcpcopylib import __version__
from tcpcopylib.errors import EX_FAIL, EX_OK, EX_USAGE, NoInputError, TcError


# seconds between status lines with --progress (the environment variable is for tests)
PROGRESS_INTERVAL = float(os.environ.get("TC_PROGRESS_INTERVAL", "5"))


def _version_action():
    import argparse

    class VersionAction(argparse.Action):
        """--version: the version and which build runs (tcpcopylib.build_info(), which
        imports the compiled modules: only when asked, so that start-up stays light)."""

        def __call__(self, parser, namespace, values, option_string=None):
            from tcpcopylib import build_info

            print(f"{parser.prog} (tcpcopylib) {__version__}, {build_info()}")
            parser.exit()

    return VersionAction


def number_arg(kind, low, inclusive, high=None):
    """An argparse type: a finite number of `kind` above `low` (or equal, if inclusive)
    and at most `high` (if given: a bound on what makes sense, so that the arithmetic done
    with the value stays finite)."""
    def parse(text):
        import argparse

        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (v >= low if inclusive else v > low) or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {low}: {text!r}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}: {text!r}")
        return v
    return parse


# replay speed factors (tc-pace --speed, tc-session -a): 1000 times slower at most (a
# factor near 0 made every wait overflow or last for ever), a billion times faster
MIN_SPEED, MAX_SPEED = 1e-3, 1e9


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; sources stop cleanly, filters exit 130/143."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


class Tool:
    name = "tc-?"
    summary = ""
    epilog = None
    #: sources (tc-readpcap, tc-capture) exit 0 after a Ctrl-C, like tcpdump
    interrupt_is_success = False
    #: tools that write records to stdout refuse a terminal there
    writes_records = True

    def __init__(self, stdout_fd: int | None = None, stderr=None):
        if stdout_fd is None:
            if sys.stdout is None:  # started with stdout closed (`>&-`): writes fail (EBADF)
                stdout_fd = 1
                _hold_closed_fd(1)  # and no input file may land on fd 1
            else:
                stdout_fd = sys.stdout.fileno()
        self.stdout_fd = stdout_fd
        self.stderr = stderr if stderr is not None else sys.stderr
        self.started = time.monotonic()
        self.args = None
        self.metrics = None  # a tcpcopylib.metrics.Exporter with --metrics/--metrics-listen
        self._exit_stats = None
        self._progress = False
        self._next_progress = 0.0

    # -- to override -------------------------------------------------------------
    def add_arguments(self, parser) -> None:
        pass

    def run(self, args) -> int | None:
        raise NotImplementedError

    def stats_line(self) -> str | None:
        """One-line summary for --stats, --progress and SIGUSR1; None if the tool has none."""
        return None

    def stats_dict(self) -> dict:
        """Counters for --stats-json; tools with structured counters extend this."""
        return {"summary": self.stats_line()}

    # -- shared ------------------------------------------------------------------
    def build_parser(self):
        import argparse

        p = argparse.ArgumentParser(
            prog=self.name, description=self.summary, epilog=self.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-V", "--version", action=_version_action(), nargs=0,
                       help="show the version and the build (compiled or pure Python) "
                            "and exit")
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="more detail on stderr; -vv also shows tracebacks")
        p.add_argument("--stats", action="store_true",
                       help="print a summary line on stderr at exit")
        p.add_argument("--stats-json", metavar="FILE",
                       help="write the counters as a JSON object to FILE at exit")
        p.add_argument("--progress", action="store_true",
                       help=f"print a status line on stderr every {PROGRESS_INTERVAL:g} s "
                            "(default when stderr is a terminal)")
        p.add_argument("--metrics", metavar="FILE",
                       help="write Prometheus metrics to FILE every few seconds and at exit "
                            "(atomically, for node_exporter's textfile collector); see "
                            "tcpcopy(7), METRICS")
        p.add_argument("--metrics-listen", metavar="ADDR",
                       help="serve Prometheus metrics at http://ADDR/metrics "
                            "(HOST:PORT, [V6]:PORT or :PORT), e.g. 127.0.0.1:9464")
        p.add_argument("--metrics-label", metavar="KEY=VALUE", action="append", default=[],
                       help="add this label to every metric (to tell instances apart); "
                            "repeatable")
        self.add_arguments(p)
        return p

    def warn(self, msg: str) -> None:
        print(f"{self.name}: {msg}", file=self.stderr, flush=True)

    def info(self, msg: str, level: int = 1) -> None:
        if self.args is not None and self.args.verbose >= level:
            self.warn(msg)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def open_input(self, path: str) -> int:
        """An fd for a named input ('-' = stdin); missing file -> NoInputError (66)."""
        if path == "-":
            return sys.stdin.fileno()
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NoInputError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise NoInputError(f"{path}: is a directory") from None
        except PermissionError:
            raise NoInputError(f"{path}: permission denied") from None
        except OSError as e:
            raise NoInputError(f"{path}: {e.strerror or e}") from None
        import stat

        if stat.S_ISDIR(os.fstat(fd).st_mode):  # (open() succeeds, read() would fail)
            os.close(fd)
            raise NoInputError(f"{path}: is a directory")
        return fd

    def record_writer(self, hdr: dict):
        from tcpcopylib.records import RecordWriter

        return RecordWriter(self.stdout_fd, hdr)

    def _print_stats(self, *_):
        line = self.stats_line()
        if line:
            self.warn(line)

    def _on_alarm(self, *_):
        """The SIGALRM timer: --progress lines and metrics renderings, each when due."""
        if self._progress and time.monotonic() >= self._next_progress - 0.05:
            self._next_progress = time.monotonic() + PROGRESS_INTERVAL
            self._print_stats()
        m = self.metrics
        if m is not None and m.due():
            m.render()

    def _open_metrics(self, args):
        """--metrics, --metrics-listen, --metrics-label: an Exporter, not yet started."""
        if not (args.metrics or args.metrics_listen):
            return None
        from tcpcopylib.errors import UnavailableError, UsageError
        from tcpcopylib.metrics import Exporter, check_label

        labels = {}
        for text in args.metrics_label:
            try:
                k, v = check_label(text)
            except ValueError as e:
                raise UsageError(f"--metrics-label: {e}") from None
            labels[k] = v
        try:
            return Exporter(self.name, self.stats_dict, path=args.metrics,
                            listen=args.metrics_listen, labels=labels, warn=self.warn,
                            start_time=time.time() - self.elapsed())
        except ValueError as e:
            raise UsageError(f"--metrics-listen: {e}") from None
        except OSError as e:
            raise UnavailableError(f"--metrics-listen {args.metrics_listen}: "
                                   f"{e.strerror or e}") from None

    def _stats_at_exit(self) -> dict:
        """stats_dict() once at exit: --stats-json and the last metrics show the same."""
        if self._exit_stats is None:
            self._exit_stats = self.stats_dict()
        return self._exit_stats

    def _end_metrics(self, status: int) -> None:
        m, self.metrics = self.metrics, None
        if m is not None:
            m.close()
            try:
                m.render(final=True, exit_status=status, stats=self._stats_at_exit())
            except Exception as e:  # noqa: BLE001 - at exit, a warning at most
                self.warn(f"warning: metrics at exit: {e}")

    def main(self, argv=None) -> int:
        """Parse argv, run, and turn what happened into an exit status (after --stats,
        --stats-json and the last metrics)."""
        parser = self.build_parser()
        args = parser.parse_args(argv)
        self.args = args
        if self.writes_records and os.isatty(self.stdout_fd) and not getattr(
                args, "allow_tty", False):
            self.warn("error: refusing to write a binary record stream to a terminal; "
                      "pipe it into tc-dump or another tc-* tool")
            return EX_USAGE
        try:
            self.metrics = self._open_metrics(args)
        except TcError as e:
            self.warn(f"error: {e}")
            return e.exit_code
        self._install_signals(args)
        status = self._run_to_status(args)
        if status is None:  # died of SIGPIPE (reported already)
            return 141
        self._report(args, status)
        return status

    def _install_signals(self, args) -> None:
        """SIGINT/SIGTERM stop run(), SIGUSR1 prints the stats line, and a timer for
        --progress and metrics."""
        signal.signal(signal.SIGTERM, _raise_interrupted)
        signal.signal(signal.SIGINT, _raise_interrupted)
        signal.signal(signal.SIGUSR1, self._print_stats)  # dd's convention: report, go on
        self._progress = args.progress or (hasattr(self.stderr, "isatty")
                                           and self.stderr.isatty())
        if self._progress or self.metrics is not None:
            # A timer signal, so no tool loop needs to know about progress or metrics:
            # blocking reads and sleeps resume after the handler (PEP 475).
            from tcpcopylib.metrics import INTERVAL

            period = min(([PROGRESS_INTERVAL] if self._progress else [])
                         + ([INTERVAL] if self.metrics is not None else []))
            self._next_progress = time.monotonic() + PROGRESS_INTERVAL
            signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, period, period)

    def _run_to_status(self, args) -> int | None:
        """run(args), its errors turned into an exit status; None when it died of SIGPIPE
        (_die_of_sigpipe reported and, on fd 1, raised the signal).

        The objects made before run() (the modules imported, the parser: the start-up
        heap) are taken out of the cyclic garbage collector's reach (gc.freeze), for good:
        a full collection walks every object it tracks, 2 to 4 ms for a tool's start-up
        heap (up to 25 on a busy machine), at a moment of its own choosing, often as a
        replay starts, and so does the one at exit (tc-readpcap exits while the replay
        goes on): a request due then went out that much later. Objects made later are
        collected as usual. (A caller running a tool in process may gc.unfreeze().)"""
        gc.freeze()
        try:
            try:
                if self.metrics is not None:
                    self.metrics.start()
                return self.run(args) or EX_OK
            finally:
                # Ignore a second signal while we wrap up.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Interrupted as e:
            return EX_OK if self.interrupt_is_success else 128 + e.signum
        except BrokenPipeError:
            self._die_of_sigpipe(args)
            return None
        except TcError as e:
            self.warn(f"error: {e}")
            return e.exit_code
        except OSError as e:
            if e.errno == 32:  # EPIPE surfacing as a plain OSError
                self._die_of_sigpipe(args)
                return None
            if args.verbose >= 2:
                raise
            self.warn(f"error: cannot write to stdout: {e.strerror}" if e.errno == 9 else
                      f"error: {e}")
            return EX_FAIL
        except Exception as e:  # noqa: BLE001 - the last line of defence: no tracebacks
            if args.verbose >= 2:
                raise
            self.warn(f"error: {type(e).__name__}: {e} (-vv for a traceback)")
            return EX_FAIL

    def _report(self, args, status: int) -> None:
        """--stats and --stats-json, at exit (whatever the exit)."""
        if args.stats:
            self._print_stats()
        if args.stats_json:
            self._write_stats_json(args.stats_json, status)
        self._end_metrics(status)

    def _write_stats_json(self, path: str, status: int) -> None:
        import json

        d = {"tool": self.name, "version": __version__, "exit_status": status,
             "elapsed_s": round(self.elapsed(), 6)}
        try:
            d.update(self._stats_at_exit())
            with open(path, "w") as f:
                json.dump(d, f, indent=1, sort_keys=True)
                f.write("\n")
        except (OSError, TypeError, ValueError) as e:
            self.warn(f"warning: cannot write --stats-json {path}: {e}")

    def _die_of_sigpipe(self, args=None) -> int:
        """Downstream closed the pipe: exit quietly with 141, as C filters do (after
        --stats, --stats-json and the last metrics, which do not go to stdout)."""
        try:
            if args is not None:
                self._report(args, 141)
            else:
                self._end_metrics(141)
        except Exception:  # noqa: BLE001 - dying of SIGPIPE matters more
            pass
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stdout_fd)
        except OSError:
            pass
        if self.stdout_fd == 1:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGPIPE)
        return 141


def _hold_closed_fd(fd: int) -> None:
    """Open /dev/null read-only on the closed ``fd``: writes to it fail with EBADF, as
    they would have, and no file opened later gets that number."""
    try:
        os.fstat(fd)
        return
    except OSError:
        pass
    try:
        got = os.open(os.devnull, os.O_RDONLY)
        if got != fd:
            os.dup2(got, fd)
            os.close(got)
    except OSError:
        pass

