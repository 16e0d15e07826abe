"""The HTML report: content, self-containment, escaping of untrusted text, figures, links and size.

Reports are built from real records: planted errors go through harness.compare.compare_arrays (so
the error maps are the ones a run produces), errors and skips are Records as the runner makes them,
and one test runs the runner on a deliberately broken implementation.
"""

from __future__ import annotations

import base64
import html
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from harness.compare import TOLERANCES, Record, compare_arrays
from harness.contract import GATES, quantity_specs
from reports.html import render_html, times, write_html  # imports jinja2 and matplotlib only when rendering
from reports.json import build_report

SPECS = quantity_specs("vanilla")
EVIL = "<script>alert(1)</script>"
CASE = {"T": 8, "B": 2, "D": 3, "H": 4, "dtype": "float64", "seed": 7,
        "spec": {"variant": "vanilla", "dtype": "float64", "T": 8, "B": 2, "D": 3, "H": 4, "seed": 7,
                 "weight_scale": "unit", "state": "random", "upstream": "all"}}


def _base(impl: str, direction: str, quantity: str, oracle: str = "finite-differences") -> dict:
    return dict(implementation=impl, oracle=oracle, variant="vanilla", dtype="float64",
                direction=direction, quantity=quantity)


def _compare(actual, expected, impl, direction, quantity, H):
    kind = "values" if direction == "forward" else "gradients"
    rec = compare_arrays(actual, expected, spec=SPECS[quantity], H=H, tol=TOLERANCES["float64"][kind],
                         tolerance_dtype="float64", base=_base(impl, direction, quantity))
    rec.case = dict(CASE)
    rec.examples = 12
    return rec


def _plain(impl, direction, quantity, status, reason, tb="", oracle="finite-differences") -> Record:
    rec = Record(**_base(impl, direction, quantity, oracle), status=status, reason=reason, traceback=tb,
                 case=dict(CASE))
    return rec


def planted_records(case_file: str = "") -> list[Record]:
    """Passing, failing (y from t=3 on; dW in the forget gate), erroring, contract and skipped records."""
    rng = np.random.default_rng(0)
    T, B, D, H = 8, 2, 3, 4
    records: list[Record] = []
    # "good": everything passes (tiny differences well within tolerance).
    y = rng.standard_normal((T, B, H))
    records.append(_compare(y + 1e-12, y, "good", "forward", "y", H))
    dW = rng.standard_normal((4 * H, D))
    records.append(_compare(dW, dW, "good", "backward", "dW", H))
    # "buggy": y wrong for unit 1 from t=3 on, dW wrong in the forget gate rows.
    bad_y = y.copy()
    bad_y[3:, :, 1] += 1e-3 * np.arange(1, T - 2)[:, None]
    rec_y = _compare(bad_y, y, "buggy", "forward", "y", H)
    bad_dW = dW.copy()
    bad_dW[H : 2 * H] *= 1.01  # rows of gate f
    rec_dW = _compare(bad_dW, dW, "buggy", "backward", "dW", H)
    for rec in (rec_y, rec_dW):
        rec.case_file = case_file
        rec.replay = f"lstm-harness replay {case_file} buggy --oracle finite-differences"
    records += [rec_y, rec_dW]
    # An implementation whose name and exception text carry markup: both must arrive escaped.
    tb = ('Traceback (implementation frames only):\n  File "plugin.py", line 3, in backward\n'
          f'    raise RuntimeError("{EVIL}")\nRuntimeError: {EVIL}\n')
    for q in ("dx", "dW"):
        records.append(_plain(EVIL, "backward", q, "error", f"backward raised RuntimeError: {EVIL}", tb))
    records.append(_compare(y, y, EVIL, "forward", "y", H))
    # A contract violation (expected versus received) and a skipped check.
    records.append(_plain("shapeless", "forward", "y", "contract",
                          "y: expected shape (8, 2, 4), got (8, 4, 2)"))
    records.append(_plain("good", "forward", "y", "skip", "torch is not installed", oracle="torch"))
    return records


def make_report(records: list[Record] | None = None) -> dict:
    records = planted_records() if records is None else records
    return build_report(
        records,
        command="run",
        target="tests:planted",
        settings={"profile": "ci", "max_examples": 12, "seed": 7, "dtypes": ["float64"]},
        implementations=[{"name": n, "variant": "vanilla", "dtypes": ["float64"], "backward": True,
                          "target": f"plugins:{n}"} for n in ("good", "buggy", EVIL, "shapeless")],
        oracles=[{"name": "finite-differences", "available": True, "reason": "", "versions": {},
                  "variants": ["vanilla"], "dtypes": ["float64"], "forward": True, "gradients": True,
                  "limitation": ""},
                 {"name": "torch", "available": False, "reason": "torch is not installed", "versions": {},
                  "variants": [], "dtypes": [], "forward": True, "gradients": True, "limitation": ""}],
    )


@pytest.fixture(autouse=True, scope="module")
def _renderer_installed():
    """Skip (with the reason) where the report extra is not installed; the builders above need neither."""
    pytest.importorskip("jinja2", reason="the HTML report needs jinja2 (pip install 'lstm-harness[report]')")
    pytest.importorskip("matplotlib", reason="the HTML report's figures need matplotlib")


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside chosen elements, from a page."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self._stack: list[str] = []
        self.text_by_id: dict[str, list[str]] = {}
        self._open_ids: list[tuple[str, int]] = []
        self._all: list[str] = []
        self.feed(page)
        self.all_text = " ".join(" ".join(self._all).split())

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag not in ("img", "br", "meta", "input", "hr", "link"):
            self._stack.append(tag)
            if "id" in a:
                self._open_ids.append((a["id"], len(self._stack)))
                self.text_by_id[a["id"]] = []

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass
            self._open_ids = [(i, d) for i, d in self._open_ids if d <= len(self._stack)]

    def handle_data(self, data):
        self._all.append(data)
        for i, _ in self._open_ids:
            self.text_by_id[i].append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def text(self, element_id: str) -> str:
        return " ".join(" ".join(self.text_by_id[element_id]).split())


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(make_report())


@pytest.fixture(scope="module")
def doc(page) -> Elements:
    return Elements(page)


def sections(doc: Elements) -> list[dict[str, str]]:
    """The per-record sections below the matrix (the findings at the top are articles too, without a status)."""
    return [a for a in doc.find("article") if "data-status" in a]


def test_header_shows_verdict_target_versions_environment_settings_and_tolerances(page, doc):
    report = make_report()
    assert doc.find("h1", id="verdict")[0]["data-verdict"] == "discrepancies"
    assert "Discrepancies found" in doc.text("verdict")
    assert "tests:planted" in page
    assert f"lstm-harness {report['tool']['version']}" in page
    env = report["environment"]
    assert env["python"] in page and env["cpu"] in page
    assert f"numpy</dt><dd>{env['packages']['numpy']}" in page
    for name, version in env["packages"].items():
        if version:
            assert html.escape(version) in page, name
    assert "cases per search</dt><dd>12 (set by --max-examples)" in page and "seed</dt><dd>fixed: 7" in page
    for dtype, table in TOLERANCES.items():
        for t in table.values():
            assert " ".join(t.reason.split()) in doc.all_text, dtype
    assert f"{TOLERANCES['float32']['gradients'].rtol:.1e}" in page


def test_matrix_has_a_row_per_implementation_and_oracle_and_a_cell_per_direction_and_dtype(doc):
    rows = doc.find("tr", **{"data-problems": "yes"}) + doc.find("tr", **{"data-problems": "no"})
    fd = "finite-differences"
    assert sorted((r["data-impl"], r["data-oracle"]) for r in rows) == sorted(
        [("good", fd), ("good", "torch"), ("buggy", fd), (EVIL, fd), ("shapeless", fd)])
    cells = [a for t, a in doc.tags if t == "td" and "data-status" in a]
    columns = {(c["data-direction"], c["data-dtype"]) for c in cells}
    assert columns == {("forward", "float64"), ("backward", "float64")}
    assert len(cells) == len(rows) * len(columns)

    def statuses(direction, oracle=fd):
        return {c["data-status"] for c in cells
                if c["data-direction"] == direction and c["data-oracle"] == oracle}

    (fail_fwd,) = doc.find("td", **{"data-status": "fail", "data-direction": "forward"})
    assert fail_fwd["class"] == "cell fail-high"  # 1.7e6 x tol
    assert statuses("forward") == {"pass", "fail", "contract"}
    assert statuses("backward") == {"pass", "fail", "error", "none"}
    assert statuses("forward", "torch") == {"skip"} and statuses("backward", "torch") == {"none"}
    skip = doc.find("td", **{"data-status": "skip"})[0]
    assert "torch is not installed" in skip["title"]  # the reason on hover
    contract = doc.find("td", **{"data-status": "contract"})[0]
    assert "expected shape (8, 2, 4)" in contract["title"]


def test_matrix_cell_shows_worst_error_as_multiple_of_tolerance(page):
    records = planted_records()
    rec_y = next(r for r in records if r.implementation == "buggy" and r.quantity == "y")
    assert rec_y.ratio > 1e3
    assert times(rec_y.ratio) in page
    assert times(rec_y.ratio).endswith("×")
    good = next(r for r in records if r.implementation == "good" and r.quantity == "y" and r.status == "pass")
    assert good.ratio < 0.1 and times(good.ratio) in page


def test_every_discrepancy_has_its_section(page, doc):
    articles = sections(doc)
    # buggy y, buggy dW, the two error records grouped into one section, the contract violation.
    assert len(articles) == 4
    kinds = sorted((a["data-impl"], a["data-status"], a["data-quantity"]) for a in articles)
    assert kinds == sorted([("buggy", "fail", "y"), ("buggy", "fail", "dW"), (EVIL, "error", "dx dW"),
                            ("shapeless", "contract", "y")])
    for rec in planted_records():
        if rec.status in ("fail", "contract"):
            assert " ".join(rec.message.split()) in doc.all_text, rec.label
        if rec.status == "error":  # one section for the group, naming every quantity
            assert rec.reason in doc.all_text and rec.quantity in {k[0]: k[2] for k in kinds}[EVIL].split()
    # Every matrix link points at a section that exists.
    ids = {a["id"] for a in articles}
    links = {a["href"][1:] for a in doc.find("a") if a.get("href", "").startswith("#d")}
    assert links and links <= ids


def test_failing_section_names_worst_element_first_timestep_case_and_replay(doc):
    y_id = next(a["id"] for a in sections(doc)
                if a["data-quantity"] == "y" and a["data-status"] == "fail")
    text = doc.text(y_id)
    assert "First timestep over tolerance: t=3" in text  # the message
    assert "first timestep over tolerance t=3" in text  # the decoded fact
    assert "unit=1" in text
    for k, v in (("T", 8), ("B", 2), ("D", 3), ("H", 4), ("seed", 7)):
        assert f"{k} {v}" in text
    assert "\"weight_scale\": \"unit\"" in text  # the case spec, as JSON
    assert "lstm-harness replay" in text
    dw_id = next(a["id"] for a in sections(doc) if a["data-quantity"] == "dW")
    assert "gate=f" in doc.text(dw_id)


def test_heatmaps_are_embedded_png_with_one_panel_per_gate_for_gradients(doc):
    images = doc.find("img")
    assert images and all(i["src"].startswith("data:image/png;base64,") for i in images)
    for img in images:
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    heatmaps = [i for i in images if i.get("class") == "heatmap"]
    assert len(heatmaps) == 2  # y and dW
    dW_alt = next(i["alt"] for i in heatmaps if "for dW" in i["alt"])
    # One panel per gate; only the forget gate's is over tolerance.
    # (H, D) = (4, 3) cells per gate; every element of the forget gate's rows was scaled by 1.01.
    for gate in GATES:
        assert f"gate {gate}: {12 if gate == 'f' else 0} of 12 cells over" in dW_alt
    y_alt = next(i["alt"] for i in heatmaps if "for y" in i["alt"])
    assert "y: 5 of 32 cells over tolerance" in y_alt  # t=3..7 of unit 1, max over batch
    # The error-against-timestep plot exists for y (a time axis) and not for dW.
    steps = [i for i in images if i.get("class") == "timestep"]
    assert len(steps) == 1 and "of y" in steps[0]["alt"]


def test_page_holds_no_url_and_loads_nothing(page, doc):
    lowered = page.lower()
    for needle in ("http://", "https://", "//cdn", "@import", "url(", "<link", "@font-face"):
        assert needle not in lowered, needle
    for tag, attrs in doc.tags:
        for name in ("src", "href", "action", "data", "poster"):
            value = attrs.get(name)
            if value is None:
                continue
            assert value.startswith(("data:", "#")) or "://" not in value or value.startswith("file:"), value
        if tag == "script":
            assert "src" not in attrs


def test_untrusted_plugin_text_is_escaped(page, doc):
    assert EVIL not in page
    assert html.escape(EVIL) in page  # name and exception message, shown as text
    assert len(doc.find("script")) == 1  # only the page's own inline script
    assert page.count("<script") == 1
    err_id = next(a["id"] for a in sections(doc) if a["data-status"] == "error")
    text = doc.text(err_id)
    assert f"backward raised RuntimeError: {EVIL}" in text  # decoded back to the original text
    assert "Traceback (implementation frames only)" in text


def test_contract_section_shows_expected_versus_received(doc):
    cid = next(a["id"] for a in sections(doc) if a["data-status"] == "contract")
    assert "y: expected shape (8, 2, 4), got (8, 4, 2)" in doc.text(cid)


def test_page_works_without_script_and_has_narrow_and_print_styles(page):
    # The filter bar is hidden until the script shows it; everything else is plain HTML.
    assert re.search(r'<div class="filters" id="filters" hidden>', page)
    assert "@media (max-width:" in page and "@media print" in page
    assert '<meta name="viewport"' in page


def test_a_cell_whose_cases_passed_only_widened_says_how_many():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((4, 2, 3))
    rec = _compare(y, y, "good", "forward", "y", 3)
    rec.examples, rec.widened_cases = 20, 3
    doc = Elements(render_html(make_report([rec])))
    (cell,) = [c for c in doc.find("td") if "cell" in c.get("class", "").split()]
    assert "3 of 20 cases passed only with the float32 tolerance widened" in cell["title"]
    assert "20 cases 3 widened" in doc.text("matrix-table")
    rec.widened_cases = 0
    assert "widened" not in Elements(render_html(make_report([rec]))).text("matrix-table")


def test_certified_report_says_so_and_has_no_sections():
    rng = np.random.default_rng(3)
    y = rng.standard_normal((4, 2, 3))
    page = render_html(make_report([_compare(y, y, "good", "forward", "y", 3)]))
    doc = Elements(page)
    assert doc.find("h1", id="verdict")[0]["data-verdict"] == "certified"
    assert not sections(doc)
    assert "No discrepancy" in page


def test_case_file_inside_report_dir_is_linked_relatively(tmp_path):
    report_dir = tmp_path / "lstm-report"
    case = report_dir / "cases" / "buggy-float64-7.npz"
    case.parent.mkdir(parents=True)
    case.write_bytes(b"npz")
    outside = tmp_path / "elsewhere" / "case.npz"
    records = planted_records(case_file=str(case))
    records[3].case_file = str(outside)  # dW: a case outside the report directory
    path = write_html(make_report(records), report_dir / "index.html")
    assert path == report_dir / "index.html" and path.is_file()
    links = [a["href"] for a in Elements(path.read_text(encoding="utf-8")).find("a", download="")]
    assert "cases/buggy-float64-7.npz" in links
    assert outside.as_uri() in links


def test_relative_case_file_is_found_from_the_report_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "cases").mkdir(parents=True)
    (tmp_path / "out" / "cases" / "c.npz").write_bytes(b"npz")
    page = render_html(make_report(planted_records(case_file="out/cases/c.npz")), base_dir=tmp_path / "out")
    assert 'href="cases/c.npz"' in page


def test_figures_are_capped_and_the_rest_is_counted():
    rng = np.random.default_rng(4)
    records = []
    for k in range(6):
        y = rng.standard_normal((5, 2, 3))
        bad = y.copy()
        bad[k % 5, 0, 0] += 1.0
        records.append(_compare(bad, y, f"impl{k}", "forward", "y", 3))
    page = render_html(make_report(records), max_plotted=2, max_sections=4)
    doc = Elements(page)
    assert len(doc.find("img", **{"class": "heatmap"})) == 2
    assert len(sections(doc)) == 4
    assert "Figures for 2 more discrepancies were left out" in page
    assert "2 further discrepancies (listed only)" in page
    assert len(doc.find("tr", **{"data-status": "fail"})) == 2 + 6  # overflow rows + all-checks rows


def test_many_passing_checks_stay_small():
    rng = np.random.default_rng(5)
    y = rng.standard_normal((6, 2, 4))
    records = [_compare(y, y, f"impl{k % 10}", "forward", q, 4) for k in range(600) for q in ("y",)]
    page = render_html(make_report(records))
    assert "<img" not in page and "<article" not in page
    assert len(page.encode()) < 400_000


def test_bad_input_is_rejected_with_the_argument_named(tmp_path):
    with pytest.raises(TypeError, match="report: expected a dict"):
        render_html([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schema_version 1, got 99"):
        render_html({**make_report(), "schema_version": 99})
    with pytest.raises(ValueError, match=r"missing \['records'\]"):
        render_html({"schema_version": 1, "verdict": "error"})
    with pytest.raises(ValueError, match="max_plotted: expected a non-negative int"):
        render_html(make_report(), max_plotted=-1)
    with pytest.raises(IsADirectoryError, match="path: expected a file name"):
        write_html(make_report(), tmp_path)


def test_report_of_a_broken_implementation_shows_the_gate_and_quantity(tmp_path):
    """End to end: the runner on a plugin whose recurrent-weight gradient is wrong in the forget gate."""
    from harness.contract import validate
    from harness.runner import RunSettings, run_checks
    from harness.subject import InProcessSubject
    from impls.loop import LoopLSTM
    from oracles.finite_diff import FiniteDifferenceOracle

    class ForgetGradBug(LoopLSTM):
        name = "forget-grad-bug"

        def backward(self, dy, dh_T, dc_T, cache):
            grads = super().backward(dy, dh_T, dc_T, cache)
            H = grads["R"].shape[0] // 4
            if H >= 2:  # so that the minimal case has a heatmap to draw (none is drawn for a 1 x 1 block)
                grads["R"] = grads["R"].copy()
                grads["R"][H : 2 * H] *= 1.01
            return grads

    impl = ForgetGradBug()
    records = run_checks(InProcessSubject(impl, validate(impl)), [FiniteDifferenceOracle()], dtype="float64",
                         run=RunSettings(max_examples=8, seed=0, case_dir=tmp_path / "report" / "cases"))
    failing = [r for r in records if r.status == "fail"]
    assert [r.quantity for r in failing] == ["dR"]
    report = build_report(records, command="certify", target="tests:ForgetGradBug", settings={"seed": 0},
                          implementations=[], oracles=[FiniteDifferenceOracle().describe()])
    path = write_html(report, tmp_path / "report" / "index.html")
    doc = Elements(path.read_text(encoding="utf-8"))
    (article,) = sections(doc)
    text = doc.text(article["id"])
    assert "dR from forget-grad-bug (float64) vs finite-differences: not close" in text
    assert "gate=f" in text
    (heatmap,) = doc.find("img", **{"class": "heatmap"})
    assert re.search(r"gate f: [1-9]\d* of \d+ cells over", heatmap["alt"])
    for gate in "igo":
        assert f"gate {gate}: 0 of" in heatmap["alt"]
    hrefs = [a["href"] for a in doc.find("a", download="")]
    assert hrefs and all(h.startswith("cases/") and (path.parent / h).is_file() for h in hrefs)


def test_write_html_creates_directories(tmp_path):
    path = write_html(make_report(), tmp_path / "a" / "b" / "index.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert isinstance(path, Path)


def test_content_security_policy_allows_only_the_pages_own_style_and_script(page):
    """Defence in depth behind escaping: the policy names the page's own style and script by hash."""
    import hashlib

    (policy,) = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    policy = html.unescape(policy)
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"
    for tag, directive in (("style", "style-src"), ("script", "script-src")):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
        assert directives[directive] == f"'sha256-{digest}'"
    assert "unsafe-inline" not in policy


def test_report_read_back_from_json_renders_the_same(tmp_path):
    """``lstm-harness report report.json`` re-renders from the file: NaN became null, inf 1e300."""
    from reports.json import read_report, write_report

    rng = np.random.default_rng(6)
    y = rng.standard_normal((5, 2, 3))
    bad = y.copy()
    bad[2, 1, 0] = np.inf
    records = planted_records() + [_compare(bad, y, "inf", "forward", "y", 3)]
    report = make_report(records)
    again = read_report(write_report(report, tmp_path / "report.json"))
    first, second = Elements(render_html(report)), Elements(render_html(again))
    assert [a["id"] for a in sections(first)] == [a["id"] for a in sections(second)]
    inf_id = next(a["id"] for a in sections(second) if a["data-impl"] == "inf")
    assert "|error| / allowed inf×" in second.text(inf_id)
    assert "first timestep over tolerance t=2" in second.text(inf_id)


def test_one_error_stopping_several_oracles_gets_one_section_naming_them():
    tb = "Traceback (implementation frames only):\nValueError: no\n"
    records = [_plain("raiser", "backward", q, "error", "backward raised ValueError: no", tb, oracle=o)
               for o in ("finite-differences", "torch") for q in ("dx", "dW")]
    doc = Elements(render_html(make_report(records)))
    (article,) = sections(doc)
    assert article["data-oracle"] == "finite-differences torch" and article["data-quantity"] == "dx dW"
    head = "dx, dW from raiser (float64) vs finite-differences, torch: raised an error"
    assert head in doc.text(article["id"])
    # Both matrix cells link to it, and so does the list of discrepancies.
    assert len(doc.find("td", **{"data-status": "error"})) == 2
    # (two cells, the list of discrepancies, the finding at the top)
    assert len([a for a in doc.find("a") if a.get("href") == f"#{article['id']}"]) == 2 + 1 + 1


def test_run_notes_and_the_resolved_certify_target_are_shown():
    report = make_report()
    report["notes"] = ["results differ in the last bit between runs <b>here</b>"]
    report["target_info"] = {"name": "mine", "variant": "peephole", "dtypes": ["float32"], "backward": False,
                             "target": "pkg.mod:Mine", "isolated": True,
                             "loaded": {"text": "pkg.mod:Mine", "kind": "module",
                                        "location": "/src/pkg/mod.py", "attribute": "Mine"}}
    page = render_html(report)
    doc = Elements(page)
    assert "results differ in the last bit between runs <b>here</b>" in doc.all_text  # as text
    assert "<b>here</b>" not in page
    for text in ("name mine", "variant peephole", "backward no (forward only)",
                 "loaded from module /src/pkg/mod.py, attribute Mine", "isolated yes (worker process)"):
        assert text in doc.all_text, text


def test_settings_show_the_memory_limit_in_gib_and_the_timeout_in_seconds():
    report = make_report()
    report["settings"] = {**report["settings"], "memory_limit": 3 * 2**30 // 2, "timeout": 60.0}
    page = render_html(report)
    assert "memory limit</dt><dd>1.5 GiB" in page and "timeout</dt><dd>60 s" in page
    report["settings"].update(memory_limit=None, timeout=None)
    page = render_html(report)
    assert "memory limit</dt><dd>none" in page and "timeout</dt><dd>none" in page


def test_a_first_timestep_without_a_saved_case_is_not_said_to_be_on_one():
    y = np.random.default_rng(3).standard_normal((6, 2, 4))
    bad = y.copy()
    bad[2:, :, 1] += 0.5
    record = _compare(bad, y, "buggy", "forward", "y", 4)  # no case file: nothing was saved
    record.case = {}
    (finding,) = make_report([record])["findings"]
    assert finding["first_bad_t"] == 2 and not finding["case_file"]
    text = Elements(render_html(make_report([record]))).text("f1")
    assert "First timestep over tolerance t=2" in text and "minimal case" not in text


def _seen(record: Record, larger: Record, case: dict, case_file: str = "") -> Record:
    """``record`` with ``larger`` as the largest error the search saw, the way the runner attaches it."""
    record.worst_seen = {"ratio": larger.ratio, "max_abs_error": larger.max_abs_error, "worst": larger.worst,
                         "first_bad_t": larger.first_bad_t, "error_map": larger.error_map, "case": case,
                         "case_file": case_file, "replay": f"lstm-harness replay {case_file} x"}
    return record


def _minimal_and_largest(tmp_path: Path) -> list[Record]:
    """A failure whose minimal case is 1x1x1x1 and whose largest error was seen on an 8-step case."""
    rng = np.random.default_rng(8)
    small = rng.standard_normal((1, 1, 1))
    minimal = _compare(small + 1e-6, small, "buggy", "forward", "y", 1)
    minimal.case = {"T": 1, "B": 1, "D": 1, "H": 1, "dtype": "float64", "seed": 0,
                    "spec": {**CASE["spec"], "T": 1, "B": 1, "D": 1, "H": 1, "weight_scale": "tiny"}}
    minimal.case_file = str(tmp_path / "cases" / "buggy-T1B1D1H1.npz")
    minimal.replay = f"lstm-harness replay {minimal.case_file} tests:buggy --oracle finite-differences"
    y = rng.standard_normal((8, 2, 4))
    bad = y.copy()
    bad[5:, :, 2] += 0.5
    larger = _compare(bad, y, "buggy", "forward", "y", 4)
    big_case = {**CASE, "spec": {**CASE["spec"], "weight_scale": "large"}}
    return [_seen(minimal, larger, big_case, str(tmp_path / "cases" / "buggy-T8B2D3H4-worst.npz"))]


def test_findings_come_first_with_the_largest_error_where_it_is_and_how_to_replay(tmp_path):
    records = _minimal_and_largest(tmp_path) + planted_records()[4:]  # plus the error, contract and skip
    for name in ("buggy-T1B1D1H1.npz", "buggy-T8B2D3H4-worst.npz"):
        (tmp_path / "cases").mkdir(exist_ok=True)
        (tmp_path / "cases" / name).write_bytes(b"npz")
    report = make_report(records)
    page = write_html(report, tmp_path / "index.html").read_text(encoding="utf-8")
    doc = Elements(page)
    found = report["findings"]
    assert [f["kind"] for f in found][0] == "discrepancy"
    # Document order: the findings, then the matrix, the per-record sections, and the run's metadata last.
    order = [page.index(f'id="{k}"') for k in ("answer", "f1", "matrix", "discrepancies", "run", "oracles")]
    assert order == sorted(order)
    assert page.index('id="f1"') < page.index("Tolerances") and page.index('id="f1"') < page.index("Environment")
    first = doc.text("f1")
    f = found[0]
    w = f["worst"]
    assert f["title"] in first
    assert times(w["ratio"]) in first and w["ratio"] > 1e3  # the largest error, not the minimal case's
    assert w["coords"]["unit"] == 2 and w["coords"]["t"] >= 5  # where the planted error is
    where = ", ".join(f"{k}={v}" for k, v in w["coords"].items())
    assert f"y at {where} (forward, float64, vs finite-differences)" in first
    assert "First timestep over tolerance t=0 of T=1 on the minimal case; t=5 of T=8 on the largest-error case" in first
    assert f["evidence"] in first
    assert f["replay"] in first and "from the folder where certify ran" in first
    hrefs = [a["href"] for a in doc.find("a", download="")]
    assert "cases/buggy-T1B1D1H1.npz" in hrefs and "cases/buggy-T8B2D3H4-worst.npz" in hrefs
    assert "cases/buggy-T1B1D1H1.npz relative to this report" in first  # the path beside the command
    assert "largest-error case T=8, B=2, D=3, H=4, large weights" in first
    # Every finding is shown, each before the matrix.
    for k in range(1, len(found) + 1):
        assert page.index(f'id="f{k}"') < page.index('id="matrix"')
        assert found[k - 1]["title"] in doc.text(f"f{k}")


def test_figures_are_drawn_on_the_largest_error_case_and_say_so(tmp_path):
    doc = Elements(render_html(make_report(_minimal_and_largest(tmp_path))))
    (section,) = sections(doc)
    text = doc.text(section["id"])
    assert "Drawn on the largest-error case (T=8, B=2, D=3, H=4, large weights" in text
    (heatmap,) = doc.find("img", **{"class": "heatmap"})
    assert "y: 3 of 32 cells over tolerance" in heatmap["alt"]  # t=5..7 of unit 2 (8 x 4 cells): the big case
    assert len(doc.find("img", **{"class": "timestep"})) == 1


def test_a_one_element_case_gets_no_figure_and_a_case_without_a_kept_map_is_named(tmp_path):
    (rec,) = _minimal_and_largest(tmp_path)
    rec.worst_seen = None  # only the 1x1 minimal case: a figure would be one rectangle
    doc = Elements(render_html(make_report([rec])))
    assert not doc.find("img")
    assert "No figure: that case has one element per panel" in doc.all_text
    (rec,) = _minimal_and_largest(tmp_path)
    del rec.worst_seen["error_map"]  # written before the largest case's map was kept
    doc = Elements(render_html(make_report([rec])))
    assert "the largest-error case (T=8, B=2, D=3, H=4, large weights" in doc.all_text
    assert "has no error map in report.json" in doc.all_text


def test_every_heatmap_and_timestep_plot_of_a_report_shares_one_scale(monkeypatch, tmp_path):
    from reports import plots

    used = []
    for name in ("heatmap_png", "timestep_png"):
        real = getattr(plots, name)

        def spy(*args, _real=real, **kwargs):
            used.append(kwargs["scale"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(plots, name, spy)
    records = planted_records() + _minimal_and_largest(tmp_path)
    records[-1].implementation = "other"
    page = render_html(make_report(records))
    assert len(used) >= 4 and len(set(used)) == 1  # 3 heatmaps, 2 timestep plots
    (scale,) = set(used)
    worst = max(p.worst for r in records if r.status == "fail"
                for p in plots.panels_of((r.worst_seen or {}).get("error_map") or r.error_map))
    assert worst > 1e3 and 10 ** scale[1] >= worst  # covers the largest cell of any figure
    assert page.count(f"10<sup>{scale[1]:.0f}</sup> × tolerance") == 3


def test_environment_names_real_distributions_and_calls_missing_only_what_none_provides():
    report = make_report()
    report["environment"] = {"python": "3.11.7", "packages": {"numpy": "2.4.6", "tensorflow-cpu": "2.21.0"},
                             "provides": {"numpy": ["numpy"], "tensorflow": ["tensorflow-cpu"]},
                             "missing": ["cupy"]}
    doc = Elements(render_html(report))
    assert "tensorflow-cpu 2.21.0 (provides import tensorflow)" in doc.all_text
    assert "Not installed (no distribution provides the import): cupy" in doc.all_text
    # A report written when every known name was listed, None for those not installed.
    report["environment"] = {"python": "3.11.7", "packages": {"tensorflow": None, "tensorflow-cpu": "2.21.0",
                                                              "cupy": None, "torch": None}}
    text = Elements(render_html(report)).all_text
    assert "Not installed (no distribution provides the import): cupy, torch" in text


def test_environment_records_what_is_importable_under_the_distributions_real_names():
    import importlib.metadata
    import importlib.util

    from reports.json import environment

    env = environment()
    for name, version in env["packages"].items():
        assert importlib.metadata.version(name) == version
        assert name == name.lower() and "_" not in name  # as the package index spells it
    for module, dists in env["provides"].items():
        assert importlib.util.find_spec(module) is not None and set(dists) <= set(env["packages"])
    for module in env["missing"]:
        assert importlib.util.find_spec(module) is None, module
    assert importlib.util.find_spec("numpy") and "numpy" in env["packages"]


@pytest.mark.parametrize(("given", "expected"), [
    ({"profile": "ci", "max_examples": None, "seed": None},
     ["cases per search {ci} (the ci profile's max_examples)", "derandomize yes",
      "seed derandomized: the same cases on every run"]),
    ({"profile": "dev", "max_examples": None, "seed": None},
     ["cases per search {dev} (the dev profile's max_examples)", "derandomize no",
      "seed random: a new seed on every run"]),
    ({"profile": "thorough", "max_examples": 15, "seed": 3},
     ["cases per search 15 (set by --max-examples)", "seed fixed: 3"]),
])
def test_run_settings_state_the_numbers_the_run_used(given, expected):
    from harness.cases import PROFILES

    report = make_report()
    report["settings"] = given  # as harness/api.py writes them; the rest comes from PROFILES
    text = Elements(render_html(report)).all_text
    for line in expected:
        assert line.format(**{k: v["max_examples"] for k, v in PROFILES.items()}) in text
    assert "profile default" not in text and "random (not fixed)" not in text


def test_a_long_name_wraps_between_words_never_inside_one():
    report = make_report([_compare(np.zeros((2, 1, 2)), np.zeros((2, 1, 2)), "LoopLayerNormLSTM", "forward",
                                   "y", 2)])
    report["target"] = "impls/loop_layernorm.py:LoopLayerNormLSTM"
    page = render_html(report)
    assert "Loop<wbr>Layer<wbr>Norm<wbr>LSTM" in page
    assert "impls/<wbr>loop_<wbr>layernorm.<wbr>py:<wbr>Loop<wbr>Layer<wbr>Norm<wbr>LSTM" in page
    assert "break-all" not in page


def test_the_diagnosis_headline_and_its_remedy_come_before_the_findings():
    report = make_report()
    report["diagnosis"] = {"headline": "it matches if its gate blocks are read as f, i, g, o", "status": "convention",
                           "match": {"as_declared": False, "adapt": "harness.adapt(impl, gate_order='figo')"},
                           "hint": "", "text": "Diagnosis of buggy (7 conventions tried)"}
    page = render_html(report)
    doc = Elements(page)
    assert "Diagnosis it matches if its gate blocks are read as f, i, g, o" in doc.text("diagnosis")
    assert "certify it as harness.adapt(impl, gate_order='figo')" in doc.text("diagnosis")
    assert "Diagnosis of buggy (7 conventions tried)" in doc.text("diagnosis")
    assert page.index('id="verdict"') < page.index('id="diagnosis"') < page.index('id="f1"')


def test_a_layer_finding_with_its_adapter_call_comes_first():
    from harness.diagnose import diagnose
    from tests.plugins.planted_layer import StatesDirectionMajor

    report = make_report()
    report["diagnosis"] = diagnose(StatesDirectionMajor()).to_dict()
    doc = Elements(render_html(report))
    assert "Diagnosis no convention explains it: h0 and c0 read in direction-major order" in doc.text("diagnosis")
    assert "certify it as harness.adapt(impl, state_order='direction-major')" in doc.text("diagnosis")
