"""JUnit XML: one testcase per record, statuses mapped to failure / error / skipped, text intact."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from harness.compare import Record
from reports.junit import to_junit_xml, write_junit
from tests.test_report_html import EVIL, make_report, planted_records


def _parse(path) -> ET.Element:
    return ET.parse(path).getroot()  # raises on anything that is not well-formed XML


def _cases(root: ET.Element) -> list[ET.Element]:
    return root.findall("./testsuite/testcase")


def test_one_testcase_per_record_with_matching_counts(tmp_path):
    records = planted_records()
    path = write_junit(make_report(records), tmp_path / "out" / "junit.xml")
    assert path == tmp_path / "out" / "junit.xml"
    root = _parse(path)
    cases = _cases(root)
    assert len(cases) == len(records)
    keys = {(c.get("classname"), c.get("name")) for c in cases}
    assert len(keys) == len(records)  # every (implementation, oracle, dtype, direction, quantity) apart
    assert root.get("tests") == str(len(records))
    n_fail = sum(r.status in ("fail", "contract") for r in records)
    n_err = sum(r.status == "error" for r in records)
    n_skip = sum(r.status == "skip" for r in records)
    counts = (root.get("failures"), root.get("errors"), root.get("skipped"))
    assert counts == (str(n_fail), str(n_err), str(n_skip))
    assert len(root.findall(".//failure")) == n_fail
    assert len(root.findall(".//error")) == n_err
    assert len(root.findall(".//skipped")) == n_skip
    # Suite counts add up to the totals.
    for attr in ("tests", "failures", "errors", "skipped"):
        assert sum(int(s.get(attr)) for s in root.findall("testsuite")) == int(root.get(attr))


def test_elements_carry_the_record_messages(tmp_path):
    records = planted_records()
    root = _parse(write_junit(make_report(records), tmp_path / "junit.xml"))
    by_key = {(c.get("classname"), c.get("name")): c for c in _cases(root)}
    for r in records:
        key = (f"lstm_harness.{r.implementation}.{r.oracle}", f"{r.quantity} [{r.direction}, {r.dtype}]")
        case = by_key[key]
        if r.status == "fail":
            (el,) = case.findall("failure")
            assert el.get("type") == "discrepancy"
            assert r.message in el.text and el.get("message") == r.message.splitlines()[0]
            assert "Minimal case: T=8, B=2, D=3, H=4, float64, seed=7" in el.text
        elif r.status == "contract":
            (el,) = case.findall("failure")
            assert el.get("type") == "contract" and r.reason in el.text
        elif r.status == "error":
            (el,) = case.findall("error")
            assert el.get("type") == "RuntimeError"
            assert r.traceback.strip() in el.text
        elif r.status == "skip":
            (el,) = case.findall("skipped")
            assert el.get("message") == r.reason
        else:
            assert not case.findall("failure") and not case.findall("error") and not case.findall("skipped")


def test_markup_survives_as_text_and_control_characters_are_replaced(tmp_path):
    rec = Record(implementation=EVIL, oracle="o", variant="vanilla", dtype="float32", direction="forward",
                 quantity="y", status="error", reason="forward raised ValueError: bad \x1b[31mred\x00 & <b>")
    text = to_junit_xml(make_report([rec]))
    assert "<script>" not in text  # escaped in the document
    root = ET.fromstring(text.split("\n", 1)[1])
    (case,) = _cases(root)
    assert EVIL in case.get("classname")
    err = case.find("error")
    assert err.get("type") == "ValueError"
    assert "bad \ufffd[31mred\ufffd & <b>" in err.get("message")  # decoded back: markup intact, controls gone


def test_properties_record_the_run(tmp_path):
    root = _parse(write_junit(make_report(), tmp_path / "j.xml"))
    props = {p.get("name"): p.get("value") for p in root.find("testsuite").findall("./properties/property")}
    assert props["verdict"] == "discrepancies" and props["seed"] == "7" and props["profile"] == "ci"
    assert props["tool"].startswith("lstm-harness ")


def test_bad_input_is_rejected_with_the_argument_named(tmp_path):
    with pytest.raises(ValueError, match="report: expected a dict"):
        to_junit_xml({"records": "nope"})
    with pytest.raises(IsADirectoryError, match="path: expected a file name"):
        write_junit(make_report(), tmp_path)
    bad = make_report()
    bad["records"][0]["status"] = "maybe"
    with pytest.raises(ValueError, match="record status: expected one of"):
        to_junit_xml(bad)


def test_a_crafted_created_field_cannot_break_the_xml(tmp_path):
    import xml.etree.ElementTree as ET

    from reports.junit import to_junit_xml

    report = {"records": [], "created": '\x01\x02"><evil/>&', "settings": {}}
    report["records"].append({"implementation": "i", "oracle": "o", "variant": "vanilla", "dtype": "float64",
                              "direction": "forward", "quantity": "y", "status": "pass", "ratio": 0.1})
    root = ET.fromstring(to_junit_xml(report))  # well-formed
    assert root.find("testsuite").get("timestamp") is None  # not an ISO date and time: left out
    report["created"] = "2026-01-01T10:11:12+00:00"
    assert ET.fromstring(to_junit_xml(report)).find("testsuite").get("timestamp") == "2026-01-01T10:11:12"
