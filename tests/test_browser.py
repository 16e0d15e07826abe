"""The report as a person sees it: opened in a real headless Chromium.

The DOM after load must hold the matrix and every discrepancy section, the page's own script must
have run (and nothing else), and the browser must not report a blocked load or script (the page's
Content-Security-Policy logs any attempt). On a failing report at 1366x768 the first finding lies
within the first screen and the matrix shows every oracle without clipping. Screenshots (the first
screen, wide and narrow) and a print-to-PDF are kept as artifacts under $LSTM_HARNESS_ARTIFACTS (or
pytest's tmp_path).

Needs Debian's ``chromium`` (``.ci/install-browser.sh``). Without it the tests skip and say why;
with LSTM_HARNESS_REQUIRE_BROWSER=1 (set by CI once the browser is installed) they fail instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
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
    rows = {a["data-impl"] for t, a in dom.tags if t == "tr" and "data-impl" in a}
    assert rows == {"good", "buggy", EVIL, "shapeless", EVIL_ATTR}
    articles = [a for a in dom.find("article") if "data-status" in a]  # the sections, not the findings
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


#: Oracles of a full run: the matrix must show every one of them at 1366 px.
ORACLES = ("finite-differences", "torch-nn-lstm", "torch-composite", "tf-keras", "tf-block-lstm-v2", "tf-composite",
           "onnxruntime", "onnx-reference", "jax-composite")
#: Reads the layout after load into an attribute of <body> that --dump-dom shows. Added to a copy of the
#: page (with its hash in the page's Content-Security-Policy), never to the report itself.
MEASURE = """(function () {
  function rect(el) {
    var r = el.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right};
  }
  function measure() {
    var box = document.getElementById("matrix-box");
    var finding = document.querySelector("article.finding");
    var headers = Array.prototype.slice.call(document.querySelectorAll("#matrix-table th.oracle"));
    document.body.setAttribute("data-measure", JSON.stringify({
      viewport: [window.innerWidth, window.innerHeight],
      page_width: document.documentElement.scrollWidth,
      finding: finding ? rect(finding) : null,
      finding_parts: finding ? Array.prototype.map.call(finding.querySelectorAll(".big, pre.cmd"), rect) : [],
      box: {rect: rect(box), scroll_width: box.scrollWidth, client_width: box.clientWidth,
            overflow_x: getComputedStyle(box).overflowX},
      oracles: headers.map(function (th) { return {name: th.textContent.trim(), rect: rect(th)}; })
    }));
  }
  measure();
  window.addEventListener("load", measure);
})();"""


@pytest.fixture(scope="module")
def failing_page(tmp_path_factory) -> Path:
    """A failing certify report with every oracle of a full run, as the first screen must show it."""
    pytest.importorskip("jinja2", reason="the HTML report needs jinja2 (pip install 'lstm-harness[report]')")
    pytest.importorskip("matplotlib", reason="the HTML report's figures need matplotlib")
    import dataclasses

    from reports.html import write_html

    out = tmp_path_factory.mktemp("failing")
    case = out / "cases" / "buggy-float64-T8B2D3H4.npz"
    case.parent.mkdir()
    case.write_bytes(b"placeholder")
    planted = [r for r in planted_records(case_file=str(case)) if r.implementation == "buggy"]
    records = []
    for oracle in ORACLES:
        for dtype in ("float64", "float32"):
            records += [dataclasses.replace(r, oracle=oracle, dtype=dtype) for r in planted]
    report = make_report(records)
    report["target"] = "impls/loop_layernorm.py:LoopLayerNormLSTM"
    report["oracles"] = [{"name": o, "available": True} for o in ORACLES]
    return write_html(report, out / "index.html")


def _measured_copy(page: Path) -> Path:
    """A copy of ``page`` beside it that runs MEASURE too (its hash added to the policy)."""
    text = page.read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(MEASURE.encode("utf-8")).digest()).decode("ascii")
    policy = re.search(r"script-src (&#39;|')sha256-[^&']+(&#39;|')", text)  # the attribute is escaped
    assert policy, "the page's Content-Security-Policy names its script by hash"
    quote = policy.group(1)
    text = text.replace(policy.group(0), f"{policy.group(0)} {quote}sha256-{digest}{quote}", 1)
    text = text.replace("</body>", f"<script>{MEASURE}</script>\n</body>", 1)
    copy = page.with_name("measured.html")
    copy.write_text(text, encoding="utf-8")
    return copy


def test_first_screen_shows_the_first_finding_and_the_matrix_every_oracle(browser, failing_page, artifacts,
                                                                         tmp_path):
    width, height = 1366, 768
    shot = artifacts / "report-first-screen.png"
    shot.unlink(missing_ok=True)
    proc = _run(browser, tmp_path / "shot", f"--window-size={width},{height}", f"--screenshot={shot}",
                failing_page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    assert _png_size(shot) == (width, height)

    proc = _run(browser, tmp_path / "dom", f"--window-size={width},{height}", "--dump-dom",
                _measured_copy(failing_page).as_uri())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (body,) = _Dom(proc.stdout).find("body")
    m = json.loads(body["data-measure"])
    assert m["viewport"][0] == width, m["viewport"]
    view_h = m["viewport"][1]
    # The answer is on the first screen: the first finding, its largest error and its replay command.
    finding = m["finding"]
    assert finding is not None, "no finding on a failing report"
    assert 0 <= finding["top"] and finding["bottom"] <= view_h, finding
    assert len(m["finding_parts"]) == 2 and all(p["bottom"] <= view_h for p in m["finding_parts"])
    # The page never scrolls sideways; the matrix fits, or scrolls inside its own box.
    assert m["page_width"] <= width, m["page_width"]
    box = m["box"]
    assert box["rect"]["right"] <= width
    assert box["scroll_width"] <= box["client_width"] or box["overflow_x"] in ("auto", "scroll"), box
    # Every oracle has its row, and its header lies within the box's scrollable width.
    assert [o["name"] for o in m["oracles"]] == list(ORACLES)
    for o in m["oracles"]:
        r = o["rect"]
        assert r["right"] > r["left"] and box["rect"]["left"] <= r["left"] <= box["rect"]["left"] + box["scroll_width"]
        assert r["right"] <= width, o  # at 1366 px every oracle is visible without scrolling at all
    assert not _console_problems(proc.stderr), _console_problems(proc.stderr)


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
