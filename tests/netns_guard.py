"""pytest plugin: network-namespace tests run in CI or the run fails.

Loaded by tests/conftest.py (``pytest_plugins``). Tests marked ``netns`` need root and
network namespaces. On a developer machine without them they skip with the reason. With
``TC_REQUIRE_NETNS=1`` (set by .ci/test) a netns test that does not run fails the run:

- a skip in any phase -- the unavailable-namespaces skip below, a ``skip``/``skipif``
  marker, ``pytest.skip()`` in the test or in a fixture, an xfail -- is reported as a
  failure of that test;
- the netns tests collected (before any ``-m``, ``-k``, ``--deselect``, ``--lf`` or
  other plugin removes some) are counted against the netns tests whose call phase ran;
  any difference (deselected, or not reached after ``-x``) fails the session.

Each netns test also carries a junit property ``netns`` (its node id), which .ci/test
checks against ``pytest --collect-only -m netns`` on its own.
"""

import os
import shutil
import subprocess

import pytest

MARK = "netns"
_STATE = "netns_guard_state"


def netns_unavailable_reason():
    """Why network-namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, raw sockets)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns unusable: {r.stderr.strip()}"
    return None


def required():
    return os.environ.get("TC_REQUIRE_NETNS") == "1"


class _State:
    def __init__(self):
        self.collected = []      # node ids of every netns test collected, before deselection
        self.selected = []       # node ids of the netns tests left to run
        self.deselected = []     # node ids of netns tests reported through pytest_deselected
        self.ran = set()         # node ids of netns tests whose call phase ran
        self.problem = None      # the session-level failure message, if any


def _is_netns(item):
    return item.get_closest_marker(MARK) is not None


def pytest_configure(config):
    setattr(config, _STATE, _State())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    # outermost wrapper: sees the list before the mark plugin, --lf or any other wrapper
    # takes tests out, and after
    state = getattr(config, _STATE)
    state.collected = [it.nodeid for it in items if _is_netns(it)]
    yield
    state.selected = [it.nodeid for it in items if _is_netns(it)]
    for it in items:
        if _is_netns(it):
            it.user_properties.append((MARK, it.nodeid))


def pytest_deselected(items):
    if not items:
        return
    state = getattr(items[0].config, _STATE)
    state.deselected += [it.nodeid for it in items if _is_netns(it)]


def pytest_runtest_setup(item):
    if not _is_netns(item):
        return
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # outermost wrapper: sees the report after the skipping plugin has made it an xfail
    outcome = yield
    if not _is_netns(item):
        return
    rep = outcome.get_result()
    if rep.when == "call":
        getattr(item.config, _STATE).ran.add(item.nodeid)
    if not (rep.skipped and required()):
        return
    if hasattr(rep, "wasxfail"):
        why = f"xfail: {rep.wasxfail}" if rep.wasxfail else "xfail"
        del rep.wasxfail
    elif isinstance(rep.longrepr, tuple):
        why = rep.longrepr[2]
    else:
        why = str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = (f"netns test skipped in {rep.when}, but TC_REQUIRE_NETNS=1 requires it "
                    f"to run: {why}")


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    state = getattr(config, _STATE)
    if not required() or config.option.collectonly:
        return
    not_run = [n for n in state.collected if n not in state.ran]
    if not not_run:
        return
    selected = set(state.selected)
    lines = [f"{len(state.collected)} netns tests collected, {len(state.ran)} ran; "
             f"TC_REQUIRE_NETNS=1 requires every one to run. Not run:"]
    for n in not_run:
        how = "deselected" if n in state.deselected or n not in selected else "did not run"
        lines.append(f"  {n} ({how})")
    state.problem = "\n".join(lines)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    problem = getattr(config, _STATE).problem
    if problem:
        terminalreporter.section("netns tests not run", sep="=", red=True, bold=True)
        terminalreporter.line(problem, red=True)
