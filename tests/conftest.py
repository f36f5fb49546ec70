"""Shared test fixtures.

Tests marked ``netns`` need root and network namespaces. On a developer machine
without them they skip with the reason; in CI (TC_REQUIRE_NETNS=1, set by .ci/run)
a skip is turned into a failure so the lab tests can never silently not run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "bin"
sys.path.insert(0, str(REPO / "tests"))


def _netns_unavailable_reason():
    if os.geteuid() != 0:
        return "needs root (network namespaces, raw sockets)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns unusable: {r.stderr.strip()}"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("netns") is None:
        return
    reason = _netns_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("TC_REQUIRE_NETNS") == "1":
        pytest.fail(f"netns test cannot run but CI requires it: {reason}")
    pytest.skip(reason)


@pytest.fixture
def tool_env():
    """Environment for running the checkout's tools as subprocesses."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.pop("PYTHONUNBUFFERED", None)
    return env


@pytest.fixture
def lab(request):
    """A fresh namespace lab (tcpcopylib.lab.Lab, ~0.5 s), always torn down.

    Parametrize indirectly with a dict of Lab() keyword arguments, e.g.
    ``@pytest.mark.parametrize("lab", [{"without_target_route": True}], indirect=True)``.
    """
    from tcpcopylib.lab import Lab

    kw = getattr(request, "param", None) or {}
    with Lab(**kw) as the_lab:
        yield the_lab
