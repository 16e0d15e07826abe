"""The report as a person sees it: opened in a real headless Chromium.

The DOM after load must hold the matrix and every discrepancy section, the page's own script must
have run (and nothing else), and the browser must not report a blocked load or script (the page's
Content-Security-Policy logs any attempt). Screenshots (wide and narrow) and a print-to-PDF are kept
as artifacts under $LSTM_HARNESS_ARTIFACTS (or pytest's tmp_path).

Needs Debian's ``chromium`` (``.ci/install-browser.sh``). Without it the tests skip and say why;
with LSTM_HARNESS_REQUIRE_BROWSER=1 (set by CI once the browser is installed) they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.test_report_html import EVIL, make_report, planted_records

pytestmark = pytest.mark.browser

# Markup that would act if it were ever parsed: it marks the body. Escaped, it stays text.
EVIL_ATTR = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars")


def find_browser() -> str | None:
    """$LSTM_HARNESS_BROWSER, else /usr/bin/chromium, else chromium (or a Chrome) on PATH."""
    configured = os.environ.get("LSTM_HARNESS_BROWSER")
    if configured:
        return shutil.which(configured) or (configured if os.access(configured, os.X_OK) else None)
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    pytest.importorskip("jinja2", reason="the HTML report needs jinja2 (pip install 'lstm-harness[report]')")
    pytest.importorskip("matplotlib", reason="the HTML report's figures need matplotlib")
    path = find_browser()
    if path is None:
        why = ("no headless Chromium found (looked for $LSTM_HARNESS_BROWSER, /usr/bin/chromium, chromium, "
               "chromium-browser, google-chrome on PATH); install it with .ci/install-browser.sh "
               "(apt-get install chromium)")
        if os.environ.get("LSTM_HARNESS_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " but LSTM_HARNESS_REQUIRE_BROWSER=1")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    configured = os.environ.get("LSTM_HARNESS_ARTIFACTS")
    path = Path(configured) if configured else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    pytest.importorskip("jinja2", reason="the HTML report needs jinja2 (pip install 'lstm-harness[report]')")
    pytest.importorskip("matplotlib", reason="the HTML report's figures need matplotlib")
    from harness.compare import Record
    from reports.html import write_html

    out = tmp_path_factory.mktemp("report")
    case = out / "cases" / "buggy-float64-7.npz"
    case.parent.mkdir()
    case.write_bytes(b"placeholder")
    records = planted_records(case_file=str(case))
    rec = Record(implementation=EVIL_ATTR, oracle="finite-differences", variant="vanilla", dtype="float64",
                 direction="forward", quantity="y", status="error",
                 reason=f"forward raised KeyError: {EVIL_ATTR}")
    return write_html(make_report(records + [rec]), out / "index.html")


def _run(browser: str, profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{browser} did not finish in {timeout}s: {' '.join(cmd)}\n{exc.stderr or ''}")


class _Dom(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _console_problems(stderr: str) -> list[str]:
    words = ("Content Security Policy", "Refused", "Uncaught", "ERR_")
    return [line for line in stderr.splitlines() if "CONSOLE" in line and any(w in line for w in words)]


def test_dom_holds_the_matrix_and_every_discrepancy_section(browser, report_page, tmp_path):
    proc = _run(browser, tmp_path / "profile", "--dump-dom", report_page.as_uri())
    assert proc.returncode == 0, proc.stderr[-3000:]
    dom = _Dom(proc.stdout)
    (root,) = dom.find("html")
    assert "js" in root["class"].split() and "no-js" not in root["class"].split()  # the page's script ran
    assert dom.find("div", id="filters")[0].get("hidden") is None  # and showed the filter bar
    assert dom.find("table", id="matrix-table")
    rows = [a["data-impl"] for t, a in dom.tags if t == "tr" and "data-impl" in a]
    assert sorted(rows) == sorted(["good", "buggy", EVIL, "shapeless", EVIL_ATTR])
    articles = dom.find("article")
    # y and dW of "buggy", the grouped errors of EVIL, the error of EVIL_ATTR, the contract violation.
    assert len(articles) == 5
    assert {a["data-status"] for a in articles} == {"fail", "error", "contract"}
    assert len(dom.find("img", **{"class": "heatmap"})) == 2
    # Untrusted markup stayed text: no handler ran, no element was created from it.
    (body,) = dom.find("body")
    assert "data-pwned" not in body
    assert len(dom.find("script")) == 1
    assert not dom.find("img", src="x")
    assert EVIL.replace("<", "&lt;").replace(">", "&gt;") in proc.stdout
    assert not _console_problems(proc.stderr), _console_problems(proc.stderr)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize(("label", "width", "height"), [("wide", 1280, 2400), ("narrow", 420, 2400)])
def test_screenshot_is_taken(browser, report_page, artifacts, tmp_path, label, width, height):
    shot = artifacts / f"report-{label}.png"
    shot.unlink(missing_ok=True)
    proc = _run(browser, tmp_path / "profile", f"--window-size={width},{height}", f"--screenshot={shot}",
                report_page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    assert _png_size(shot) == (width, height)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert not _console_problems(proc.stderr), _console_problems(proc.stderr)


def test_page_prints_to_pdf(browser, report_page, artifacts, tmp_path):
    pdf = artifacts / "report-print.pdf"
    pdf.unlink(missing_ok=True)
    proc = _run(browser, tmp_path / "profile", "--no-pdf-header-footer", f"--print-to-pdf={pdf}",
                report_page.as_uri())
    assert proc.returncode == 0 and pdf.is_file(), proc.stderr[-3000:]
    data = pdf.read_bytes()
    pages = re.findall(rb"/Type\s*/Page(?!s)", data)
    assert data[:5] == b"%PDF-" and len(pages) >= 2, f"{len(pages)} pages"  # the report spans pages
