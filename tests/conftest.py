"""Shared test fixtures.

Tests marked ``netns`` need root and network namespaces. On a developer machine
without them they skip with the reason; in CI (TC_REQUIRE_NETNS=1, set by .ci/test)
a netns test that is skipped, xfailed or deselected fails the run, so the lab tests can
never silently not run (the plugin tests/netns_guard.py).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tc, capfiles, replay_harness...

pytest_plugins = ["netns_guard"]


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
