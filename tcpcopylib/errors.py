"""Errors raised by the library; each carries the exit status its tool reports.

Library code never exits: it raises one of these and the tool's main() maps it to a
one-line message and the status below (sysexits.h values, documented in tcpcopy(7)).
"""

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_SIGPIPE = 141


class TcError(Exception):
    """Base class: a runtime failure worth one line on stderr."""

    exit_code = EX_FAIL


class UsageError(TcError):
    """A bad option value found after argparse (a malformed address, say)."""

    exit_code = EX_USAGE


class StreamError(TcError):
    """Input is not a record stream, is truncated, or has a newer format version."""

    exit_code = EX_DATAERR


class CaptureFormatError(StreamError):
    """A file that is not a capture, or a capture cut off mid-packet."""


class NoInputError(TcError):
    """An input file or interface does not exist."""

    exit_code = EX_NOINPUT


class UnavailableError(TcError):
    """A peer (feedback socket, target) cannot be reached."""

    exit_code = EX_UNAVAILABLE


class PeerVersionError(TcError):
    """A peer on a socket speaks another format version."""

    exit_code = EX_PROTOCOL


class NoPermissionError(TcError):
    """Root or CAP_NET_RAW is needed (raw sockets, capture)."""

    exit_code = EX_NOPERM
