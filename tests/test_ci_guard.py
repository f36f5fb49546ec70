"""CI cannot pass with a netns test that did not run.

Each test builds a tiny project in tmp_path with the checkout's own pytest configuration
(pyproject.toml), tests/conftest.py, tests/netns_guard.py and .ci/test, adds a synthetic test
module, runs pytest (or .ci/test) on it in a subprocess and checks the exit status. Every
failing case has a control that runs the same module the way it must pass.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from netns_guard import netns_unavailable_reason
from tc import REPO

needs_netns = pytest.mark.skipif(netns_unavailable_reason() is not None,
                                 reason=f"the synthetic netns tests would skip here: "
                                        f"{netns_unavailable_reason()}")


def make_project(root: Path, test_modules: str | dict, conftest: str | None = None) -> Path:
    """A copy of the checkout's test setup with synthetic test modules (text, or {name: text})."""
    (root / "tests").mkdir(parents=True)
    (root / ".ci").mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(REPO / "tests" / "netns_guard.py", root / "tests" / "netns_guard.py")
    shutil.copy(REPO / ".ci" / "test", root / ".ci" / "test")
    conftest_text = (REPO / "tests" / "conftest.py").read_text() if conftest is None else conftest
    (root / "tests" / "conftest.py").write_text(conftest_text)
    if isinstance(test_modules, str):
        test_modules = {"test_synth": test_modules}
    for name, text in test_modules.items():
        (root / "tests" / f"{name}.py").write_text(textwrap.dedent(text))
    # python3 in .ci/test is the interpreter running this test
    (root / "bin").mkdir()
    (root / "bin" / "python3").symlink_to(sys.executable)
    return root


def env_for(root: Path, require: bool = True, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k != "TC_REQUIRE_NETNS"}
    env["PATH"] = f"{root / 'bin'}:{env.get('PATH', '')}"
    if require:
        env["TC_REQUIRE_NETNS"] = "1"
    env.update(extra)
    return env


def run_pytest(root: Path, *args, require: bool = True, **extra):
    extra.setdefault("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # faster; the project needs none
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=root, env=env_for(root, require, **extra),
                          capture_output=True, text=True, timeout=120)


def run_ci(root: Path, **extra):
    return subprocess.run(["bash", str(root / ".ci" / "test")], cwd=root,
                          env=env_for(root, **extra), capture_output=True, text=True,
                          timeout=240)


PASSING = """
    import pytest

    @pytest.mark.netns
    def test_lab_a():
        pass

    @pytest.mark.netns
    def test_lab_b():
        pass

    def test_unit():
        pass
"""

# ways a netns test gets skipped; each module also holds a netns test that runs
SKIPS = {
    "skip marker": """
        @pytest.mark.netns
        @pytest.mark.skip(reason="not today")
        def test_lab_skipped():
            pass
    """,
    "skipif marker": """
        @pytest.mark.netns
        @pytest.mark.skipif(True, reason="not here")
        def test_lab_skipped():
            pass
    """,
    "class pytestmark": """
        class TestLab:
            pytestmark = [pytest.mark.netns, pytest.mark.skip(reason="class skipped")]

            def test_lab_skipped(self):
                pass
    """,
    "pytest.skip in the test": """
        @pytest.mark.netns
        def test_lab_skipped():
            pytest.skip("tcpdump missing")
    """,
    "importorskip in the test": """
        @pytest.mark.netns
        def test_lab_skipped():
            pytest.importorskip("no_such_module_for_tcpcopylib")
    """,
    "pytest.skip in a fixture": """
        @pytest.fixture
        def server():
            pytest.skip("nginx missing")

        @pytest.mark.netns
        def test_lab_skipped(server):
            pass
    """,
    "pytest.skip in a fixture's teardown": """
        @pytest.fixture
        def server():
            yield
            pytest.skip("could not stop nginx")

        @pytest.mark.netns
        def test_lab_skipped(server):
            pass
    """,
    "xfail": """
        @pytest.mark.netns
        @pytest.mark.xfail(reason="flaky")
        def test_lab_skipped():
            assert False
    """,
}


def skip_module(case: str) -> str:
    return textwrap.dedent("""
        import pytest

        @pytest.mark.netns
        def test_lab_runs():
            pass
    """) + textwrap.dedent(SKIPS[case])


@needs_netns
def test_positive_control_all_netns_tests_run(tmp_path):
    r = run_pytest(make_project(tmp_path, PASSING))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 passed" in r.stdout


def outcomes(junit: Path) -> dict:
    """{(module, test name): set of the result tags (failure, error, skipped) in its testcase}"""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        key = (case.get("classname").split(".")[1], case.get("name"))  # tests.MODULE[.Class]
        out[key] = {child.tag for child in case} & {"failure", "error", "skipped"}
    return out


@needs_netns
def test_a_skipped_netns_test_fails_the_run(tmp_path):
    # one module per way of skipping, all in one project (one pytest run per mode)
    modules = {f"test_synth_{i}": skip_module(case) for i, case in enumerate(sorted(SKIPS))}
    root = make_project(tmp_path, modules)
    # control: without TC_REQUIRE_NETNS each module passes with its test skipped (or xfailed)
    r = run_pytest(root, "--junitxml=plain.xml", require=False)
    assert r.returncode == 0, r.stdout + r.stderr
    got = outcomes(root / "plain.xml")
    assert len(got) == 2 * len(SKIPS), got
    for mod in modules:
        assert got[mod, "test_lab_runs"] == set(), mod
        assert got[mod, "test_lab_skipped"] == {"skipped"}, mod
    r = run_pytest(root, "--junitxml=required.xml")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("but TC_REQUIRE_NETNS=1 requires it to run") >= len(SKIPS), r.stdout
    got = outcomes(root / "required.xml")
    assert len(got) == 2 * len(SKIPS), got
    for mod, case in zip(modules, sorted(SKIPS)):
        assert got[mod, "test_lab_runs"] == set(), case
        assert got[mod, "test_lab_skipped"] & {"failure", "error"}, case
        assert "skipped" not in got[mod, "test_lab_skipped"], case


@needs_netns
@pytest.mark.parametrize("args, extra", [
    (["-m", "not netns"], {}),
    (["-k", "not test_lab_b"], {}),
    (["--deselect", "tests/test_synth.py::test_lab_a"], {}),
    ([], {"PYTEST_ADDOPTS": "-m 'not netns'"}),
    (["-x"], {"_FAIL_FIRST": "1"}),
], ids=["-m", "-k", "--deselect", "PYTEST_ADDOPTS", "-x"])
def test_a_netns_test_not_run_fails_the_run(tmp_path, args, extra):
    module = PASSING
    if extra.pop("_FAIL_FIRST", None):
        # -x stops at the first failure: the netns tests after it never run
        module = "def test_0_fails():\n    assert False\n" + textwrap.dedent(PASSING)
    root = make_project(tmp_path, module)
    r = run_pytest(root, *args, **extra)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "netns tests not run" in r.stdout, r.stdout
    if module is PASSING:
        assert r.returncode == 1
        # control: the same selection passes where netns tests are not required
        r = run_pytest(root, *args, require=False, **extra)
        assert r.returncode in (0, 5), r.stdout + r.stderr


# --- .ci/test ---------------------------------------------------------------------------

FAILING_UNIT = textwrap.dedent(PASSING) + """
def test_unit_broken():
    assert False
"""

# a plugin in the environment that reports every failure as a pass
EVIL_PLUGIN = """
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        rep.outcome = "passed"
"""

# a conftest whose netns tests are required but which turns their failure back into a skip
# (stands for any way the plugin's conversion could be lost)
UNDO_CONFTEST = """
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest_plugins = ["netns_guard"]


class Undo:
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        if rep.failed and "TC_REQUIRE_NETNS=1" in str(rep.longrepr):
            rep.outcome = "skipped"
            rep.longrepr = (str(item.path), 1, "undone")


def pytest_configure(config):
    # registered after netns_guard, so its wrapper is the outermost
    config.pluginmanager.register(Undo())
"""

# the netns marker registered without the netns_guard plugin
BARE_CONFTEST = """
"""


@needs_netns
def test_ci_positive_control(tmp_path):
    r = run_ci(make_project(tmp_path, PASSING))
    assert r.returncode == 0, r.stdout + r.stderr
    assert ".ci/test: 2 netns tests collected, 2 in the report, 0 of them skipped" in r.stdout


@needs_netns
@pytest.mark.parametrize("extra", [
    {"PYTEST_ADDOPTS": "-k 'not broken'"},
    {"PYTEST_ADDOPTS": "--deselect tests/test_synth.py::test_unit_broken"},
    {"PYTEST_PLUGINS": "evil_plugin"},
], ids=["PYTEST_ADDOPTS -k", "PYTEST_ADDOPTS --deselect", "PYTEST_PLUGINS"])
def test_ci_ignores_the_pytest_environment(tmp_path, extra):
    root = make_project(tmp_path, FAILING_UNIT)
    (root / "evil_plugin.py").write_text(EVIL_PLUGIN)
    # control: the environment does hide the broken (non-netns) test from a plain pytest run
    r = run_pytest(root, require=True, **extra)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_ci(root, **extra)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "test_unit_broken FAILED" in r.stdout or "FAILED tests/test_synth.py::test_unit_broken" \
        in r.stdout, r.stdout


@needs_netns
def test_ci_checks_the_report_for_skipped_netns_tests(tmp_path):
    root = make_project(tmp_path, skip_module("pytest.skip in the test"), conftest=UNDO_CONFTEST)
    # control: pytest itself passes (the skip is back)
    r = run_pytest(root)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout + r.stderr
    r = run_ci(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ".ci/test: netns tests skipped: tests/test_synth.py::test_lab_skipped" in r.stderr


@needs_netns
def test_ci_checks_the_report_against_the_collected_netns_tests(tmp_path):
    root = make_project(tmp_path, PASSING, conftest=BARE_CONFTEST)
    r = run_pytest(root)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_ci(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ".ci/test: 2 netns tests not in the report" in r.stderr
