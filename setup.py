"""Optional compiled build: the hot modules compiled by Cython from their unchanged .py.

pyproject.toml holds all the metadata; this file only adds the extension modules. The
compiled build is optional: without Cython, without a C compiler or Python's headers, or
with TCPCOPY_NO_COMPILE=1 at install time, the install goes on with the pure-Python
modules (a warning says why). At run time TCPCOPY_PURE=1 makes a compiled install import
the pure-Python modules instead; `tc-session --version` says which ones run.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# the modules compiled, as in tcpcopylib.COMPILED_MODULES (tests/test_build.py checks)
COMPILED = [
    "tcpcopylib/session/engine.py",
    "tcpcopylib/session/runner.py",
    "tcpcopylib/session/timing.py",
    "tcpcopylib/session/mapping.py",
    "tcpcopylib/emit.py",
    "tcpcopylib/wire.py",
    "tcpcopylib/packet.py",
    "tcpcopylib/streamparse.py",
    "tcpcopylib/records.py",
    "tcpcopylib/feedback.py",
    "tcpcopylib/capture.py",
    "tcpcopylib/pacing.py",
    "tcpcopylib/pcapio.py",
    "tcpcopylib/readpcap.py",
]

DIRECTIVES = {
    "language_level": 3,
    "annotation_typing": False,  # annotations stay documentation: no C types from them
    "nonecheck": True,           # None.attr raises AttributeError, as in Python
}


def _warn(msg):
    print(f"tcpcopylib: {msg}; installing the pure-Python modules only", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext whose failure (no compiler, no Python.h) leaves the pure-Python build."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:  # the modules' C compiles side by side (-j): one per core
            self.parallel = os.cpu_count() or 1

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 (distutils' errors have no common base)
            _warn(f"compiled build failed ({e})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            _warn(f"compiling {ext.name} failed ({e})")


def ext_modules():
    if os.environ.get("TCPCOPY_NO_COMPILE", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed")
        return []
    try:
        return cythonize(COMPILED, compiler_directives=DIRECTIVES, build_dir="build/cython",
                         quiet=True, nthreads=os.cpu_count() or 1)
    except Exception as e:  # noqa: BLE001 (a Cython error: the .py still runs)
        _warn(f"Cython failed ({e})")
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
