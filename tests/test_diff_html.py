"""tc-diff --html in a real headless browser (Debian's chromium): the page renders, its
script runs without errors, the charts are there; a screenshot is kept for people."""

import os
import re
import shutil
import subprocess

import pytest

import tc
from test_diff import _scenario

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    not CHROMIUM and not os.environ.get("TC_REQUIRE_NETNS"),
    reason="chromium is not installed (.ci/run installs it)")


def browse(page, *args):
    """(DOM after the scripts ran, the browser's log) of a local page."""
    r = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--enable-logging=stderr", "--v=0", "--window-size=1200,1600", *args,
                        f"file://{page}"], capture_output=True, text=True, timeout=120)
    return r.stdout, r.stderr


def script_errors(log: str) -> list:
    return [ln for ln in log.splitlines() if "CONSOLE" in ln and "Uncaught" in ln]


def test_the_checks_catch_a_broken_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>noSuchFunction();</script></body></html>")
    _, log = browse(bad, "--dump-dom")
    assert script_errors(log), log[-2000:]


def test_report_renders_with_charts_and_no_script_errors(tmp_path):
    def tweak(c, i, answer):
        return answer.replace(b"200 X", b"503 X") if (c, i) == (1, 0) else answer
    page = tmp_path / "report.html"
    r = tc.run(["tc-diff", *_scenario(tmp_path, n_conns=6, target_tweak=tweak, delay=50),
                "--html", page])
    assert r.returncode == 1 and page.exists(), r.stderr
    assert "http://" not in page.read_text() and "https://" not in page.read_text()
    dom, log = browse(page, "--dump-dom")
    assert not script_errors(log), script_errors(log)
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    assert len(re.findall(r"<svg\b", dom)) == 3  # one chart per endpoint
    assert len(re.findall(r'<polyline class="cdf-(original|target)"', dom)) == 6
    assert re.search(r'<span id="shown">1</span>', dom)
    assert "GET /slow" in dom and "503 X" in dom and "body of /a/1" in dom
    shot = tmp_path / "report.png"
    _, log = browse(page, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
