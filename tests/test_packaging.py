"""Packaging parity: entry points, bin/ symlinks, man pages (lint + option drift), import
budget, startup time, and the wheel's contents."""

import importlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from tc import BIN, REPO, call, tool_env, tool_path

from tcpcopylib.testing import tool_class

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]                       # {"tc-pace": "mod:main"}
DATA_FILES = PYPROJECT["tool"]["setuptools"]["data-files"]       # {"share/man/man1": [...]}
MAN_PAGES = sorted(p for pages in DATA_FILES.values() for p in pages if p.startswith("man/"))
HEAVY = ("dpkt", "pcapy", "asyncio", "importlib.metadata")


def _env(bytecode=False):
    return tool_env(**({"PYTHONDONTWRITEBYTECODE": None} if bytecode else {}))


def _page_of(tool):
    """The man page of a tool, from the data-files list (section 1 or 8)."""
    pages = [p for p in MAN_PAGES if Path(p).stem == tool]
    assert len(pages) == 1, f"{tool}: expected one man page in pyproject data-files, got {pages}"
    return REPO / pages[0]


def _is_stub(tool):
    r = call([tool, "--help"])
    return b"not implemented" in r.stdout + r.stderr


def _render(page):
    r = subprocess.run(["mandoc", "-Tascii", "-Owidth=200", str(page)], capture_output=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return re.sub(r".\x08", "", r.stdout.decode())  # drop bold/underline overstrikes


@pytest.mark.parametrize("tool", sorted(SCRIPTS))
def test_entry_point_bin_link_and_main(tool):
    mod, _, func = SCRIPTS[tool].partition(":")
    assert func == "main"
    # bin/_tc maps tc-NAME to tcpcopylib.cli.NAME (hyphens -> underscores)
    assert mod == "tcpcopylib.cli." + tool.removeprefix("tc-").replace("-", "_")
    link = BIN / tool
    assert link.is_symlink() and os.readlink(link) == "_tc", f"bin/{tool} must be a symlink to _tc"
    assert callable(importlib.import_module(mod).main)


def test_every_tool_has_a_man_page_entry():
    for tool in SCRIPTS:
        _page_of(tool)
    for section in ("man5/tcpcopy-records.5", "man7/tcpcopy.7"):
        assert f"man/{section}" in MAN_PAGES


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_exists_and_lints_clean(page):
    path = REPO / page
    if not path.exists():
        tool = path.stem
        if tool in SCRIPTS and _is_stub(tool):
            pytest.skip(f"{tool} is still the not-implemented stub, so {page} is not written yet")
        pytest.fail(f"{page} is listed in pyproject.toml but missing")
    r = subprocess.run(["mandoc", "-Tlint", "-W", "warning", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    text = _render(path)
    for section in ("NAME", "DESCRIPTION", "SEE ALSO"):
        assert re.search(rf"^{section}$", text, re.M), f"{page}: no {section} section"
    if path.stem in SCRIPTS:
        for section in ("SYNOPSIS", "OPTIONS", "EXIT STATUS", "EXAMPLES"):
            assert re.search(rf"^{section}$", text, re.M), f"{page}: no {section} section"


@pytest.mark.parametrize("tool", sorted(SCRIPTS))
def test_every_long_option_is_in_the_man_page(tool):
    """Drift: each --option of the tool's parser (argparse's own --help aside) is documented."""
    if _is_stub(tool):
        pytest.skip(f"{tool} is still the not-implemented stub")
    page = _page_of(tool)
    assert page.exists(), f"{tool} is built but {page.relative_to(REPO)} is missing"
    cls = tool_class(tool)
    parser = cls(stdout_fd=1).build_parser()
    options = {o for a in parser._actions for o in a.option_strings
               if o.startswith("--") and o != "--help"}
    text = _render(page)
    documented = set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", text))
    missing = sorted(options - documented)
    assert not missing, f"{page.name} does not document {missing}"


@pytest.mark.parametrize("tool", sorted(SCRIPTS))
def test_import_budget(tool):
    """Importing a tool's module (what --version and --help need) stays light."""
    mod = SCRIPTS[tool].partition(":")[0]
    code = (f"import sys, {mod}; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [], f"import {mod} pulls in {r.stdout.split()}"


def test_version_starts_fast():
    """tc-dump --version: a loose bound (bench/ has the real number); bytecode enabled."""
    cmd = [tool_path("tc-dump"), "--version"]
    env = _env(bytecode=True)
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
    assert first.returncode == 0 and "tc-dump" in first.stdout
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, timeout=30, check=True)
        times.append(time.perf_counter() - t)
    assert min(times) < 0.3, f"tc-dump --version took {min(times) * 1e3:.0f} ms at best"


def test_wheel_contains_the_package_and_man_pages(tmp_path):
    """pip wheel builds from (a copy of) the tree; the wheel holds tcpcopylib/ and the pages.

    A listed page that is missing (test_man_page_exists_and_lints_clean reports it) gets a
    placeholder in the copy, so that this test checks the packaging on its own.
    """
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache", "run"))
    for page in MAN_PAGES:
        if not (src / page).exists():
            tool = Path(page).stem
            (src / page).parent.mkdir(parents=True, exist_ok=True)
            (src / page).write_text(f'.TH {tool.upper()} 1\n.SH NAME\n{tool} \\- stub\n')
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list((tmp_path / "dist").glob("tcpcopylib-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    for mod in ("__init__", "records", "pacing", "cli/common", "cli/pace"):
        assert f"tcpcopylib/{mod}.py" in names
    for dest, pages in DATA_FILES.items():
        for page in pages:
            assert any(n.endswith(f".data/data/{dest}/{Path(page).name}") for n in names), page
    entry_points = next(n for n in names if n.endswith("dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    for tool, target in SCRIPTS.items():
        assert re.search(rf"^{re.escape(tool)}\s*=\s*{re.escape(target)}$", text, re.M)


def test_ci_runs_the_readme_commands():
    """.ci/run installs what the README says and runs .ci/test, which runs the README's test
    command with the netns tests required."""
    ci, test, readme = REPO / ".ci" / "run", REPO / ".ci" / "test", (REPO / "README.md").read_text()
    for f in (ci, test):
        assert os.access(f, os.X_OK)
        assert subprocess.run(["bash", "-n", str(f)], capture_output=True).returncode == 0
    script, test_script = ci.read_text(), test.read_text()
    assert re.search(r"^\.ci/test$", script, re.M)
    assert "```sh\npython3 -m pytest\n```" in readme
    assert re.search(r"^python3 -m pytest\b", test_script, re.M)
    assert "pip install -e '.[test]'" in readme and "-e '.[test]'" in script
    apt = re.search(r"apt-get install -y ([\w .-]+)", readme).group(1).split()
    assert re.search(r'^APT_PACKAGES="([^"]*)"', script, re.M).group(1).split() == apt
    assert "TC_REQUIRE_NETNS=1" in test_script


def test_readme_architecture_names_every_module():
    """The README's Architecture table gives every library module its one-line job: a new
    module without its line fails here."""
    readme = (REPO / "README.md").read_text()
    assert "## Architecture" in readme
    arch = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    lib = REPO / "tcpcopylib"
    missing = []
    for p in sorted(lib.rglob("*.py")):
        rel = p.relative_to(lib)
        if rel.parts[0] == "cli" or p.name == "__init__.py":
            continue
        name = str(rel) if rel.parts[0] != "diff" else "diff/"
        if f"`{name}`" not in arch and f"`{rel}`" not in arch:
            missing.append(str(rel))
    assert not missing, f"modules without a line in the README's Architecture: {missing}"
