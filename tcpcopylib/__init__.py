"""tcpcopylib: TCP stream replay for realistic testing of Internet servers.

One library under a family of small command-line filters (tc-readpcap, tc-capture,
tc-session, tc-pace, tc-emit, tc-intercept, tc-feedback, tc-dump) that exchange
records as a labeled CBOR sequence; see man/man5/tcpcopy-records.5.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# Modules that setup.py compiles with Cython when it can (from these same .py files).
COMPILED_MODULES = (
    "tcpcopylib.session.engine",
    "tcpcopylib.session.runner",
    "tcpcopylib.session.timing",
    "tcpcopylib.session.mapping",
    "tcpcopylib.emit",
    "tcpcopylib.wire",
    "tcpcopylib.packet",
    "tcpcopylib.streamparse",
    "tcpcopylib.records",
    "tcpcopylib.feedback",
    "tcpcopylib.capture",
    "tcpcopylib.pacing",
    "tcpcopylib.pcapio",
    "tcpcopylib.readpcap",
)


def pure_forced() -> bool:
    """TCPCOPY_PURE=1: import the pure-Python modules even where compiled ones exist."""
    return _os.environ.get("TCPCOPY_PURE", "") not in ("", "0")


class _PureFinder:
    """With TCPCOPY_PURE set: finds COMPILED_MODULES' .py file ahead of the extension
    module beside it (the normal import prefers the extension)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in COMPILED_MODULES or not path:
            return None
        import importlib.util

        leaf = name.rpartition(".")[2] + ".py"
        for d in path:
            f = _os.path.join(d, leaf)
            if _os.path.isfile(f):
                return importlib.util.spec_from_file_location(name, f)
        return None


if pure_forced() and _PureFinder not in _sys.meta_path:
    _sys.meta_path.insert(0, _PureFinder)


def build_info() -> str:
    """Which build runs: "compiled (Cython: session.engine)", "pure Python", ..."""
    import importlib
    import importlib.machinery

    compiled, pure = [], []
    for name in COMPILED_MODULES:
        f = getattr(importlib.import_module(name), "__file__", "") or ""
        short = name.removeprefix("tcpcopylib.")
        (compiled if f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) else pure
         ).append(short)
    if not compiled:
        return "pure Python (TCPCOPY_PURE=1)" if pure_forced() else "pure Python"
    return (f"compiled (Cython: {', '.join(compiled)})"
            + (f"; pure Python: {', '.join(pure)}" if pure else ""))
