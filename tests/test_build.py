"""The optional compiled build (setup.py: Cython compiles the hot modules from their .py).

Where an extension module was built beside its .py, it is the one imported, and
TCPCOPY_PURE=1 imports the .py instead; --version says which. In CI
(TC_REQUIRE_COMPILED=1, set by .ci/run, which has gcc and python3-dev) the extension must
have been built: a build that silently fell back to pure Python fails there.
"""

import ast
import importlib.machinery
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tc import REPO, tool_env, tool_path

CODE = ("import sys, tcpcopylib, importlib; "
        "[print(importlib.import_module(m).__file__) for m in tcpcopylib.COMPILED_MODULES]")


def _env(pure):
    return tool_env(TCPCOPY_PURE="1" if pure else None)


def _imported(pure):
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                       env=_env(pure), cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _built(mod):
    """The extension module files built beside mod's .py."""
    d = REPO / Path(*mod.split(".")[:-1])
    leaf = mod.rpartition(".")[2]
    return [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in d.glob(leaf + s)]


def _compiled_modules():
    sys.path.insert(0, str(REPO))
    import tcpcopylib

    return tcpcopylib.COMPILED_MODULES


def test_setup_compiles_the_listed_modules():
    text = (REPO / "setup.py").read_text()
    listed = ast.literal_eval(re.search(r"^COMPILED = (\[.*?\])", text, re.M | re.S).group(1))
    assert [p.removesuffix(".py").replace("/", ".") for p in listed] == \
        list(_compiled_modules())


@pytest.mark.parametrize("mod", _compiled_modules())
def test_the_compiled_module_is_imported_when_built(mod):
    built = _built(mod)
    if not built:
        if os.environ.get("TC_REQUIRE_COMPILED") == "1":
            pytest.fail(f"{mod} was not compiled, but CI requires the compiled build "
                        "(see pip install's warnings: Cython, gcc, python3-dev)")
        pytest.skip(f"{mod} is not compiled here (no C compiler or Cython at install)")
    i = list(_compiled_modules()).index(mod)
    assert _imported(pure=False)[i] in map(str, built)
    r = subprocess.run([tool_path("tc-session"), "--version"], capture_output=True,
                       text=True, env=_env(False), timeout=60)
    assert r.returncode == 0 and "compiled (Cython: " in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("mod", _compiled_modules())
def test_tcpcopy_pure_imports_the_python_source(mod):
    i = list(_compiled_modules()).index(mod)
    f = _imported(pure=True)[i]
    assert f == str(REPO / Path(*mod.split("."))) + ".py"
    r = subprocess.run([tool_path("tc-session"), "--version"], capture_output=True,
                       text=True, env=_env(True), timeout=60)
    assert r.returncode == 0 and r.stdout.rstrip().endswith(
        "pure Python (TCPCOPY_PURE=1)"), r.stdout + r.stderr


def test_engine_pxd_declares_every_attribute():
    """engine.pxd (the compiled build's declarations) lists the same attributes as
    engine.py: an attribute missing there would be an AttributeError in the compiled
    build only, and one missing in the pure build is caught here too."""
    src = (REPO / "tcpcopylib/session/engine.py").read_text()
    pxd = (REPO / "tcpcopylib/session/engine.pxd").read_text()
    tree = ast.parse(src)
    declared = {}
    cls = None
    for line in pxd.splitlines():
        if m := re.match(r"cdef class (\w+)", line):
            cls = m.group(1)
            declared[cls] = set()
        elif m := re.match(r"\s+cdef public \w+ (.*)", line):
            declared[cls] |= {a.strip() for a in m.group(1).split(",")}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in declared:
            continue
        want = set()
        for item in node.body:
            if isinstance(item, ast.Assign) and item.targets[0].id == "__slots__":
                want |= set(ast.literal_eval(item.value))
            if isinstance(item, ast.FunctionDef):
                for n in ast.walk(item):
                    if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) \
                            and isinstance(n.value, ast.Name) and n.value.id == "self":
                        want.add(n.attr)
        assert declared[node.name] == want, (
            f"engine.pxd's cdef class {node.name} differs from engine.py: missing "
            f"{sorted(want - declared[node.name])}, extra {sorted(declared[node.name] - want)}")
    assert set(declared) == {"Stats", "Seg", "Session", "Engine"}


def test_no_compiler_installs_the_pure_build(tmp_path):
    """Without a working C compiler the install succeeds with the pure-Python modules."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache", "run",
        "*.so", "*.c"))
    env = dict(os.environ, CC="/bin/false")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w",
                        str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("tcpcopylib-*.whl"))).namelist()
    assert "tcpcopylib/session/engine.py" in names
    assert not [n for n in names if n.endswith(".so")], names
    if "Cython" in r.stdout:  # else pip could not get Cython: pure Python all the same
        assert "installing the pure-Python modules only" in r.stdout + r.stderr
