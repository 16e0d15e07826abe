"""JUnit XML for CI systems: one ``testcase`` per record, rendered from ``report.json``.

A record is one (implementation, oracle, dtype, direction, quantity); it becomes one testcase in the
implementation's ``testsuite``. The mapping of statuses follows what JUnit readers show:

    pass      -> a plain testcase
    fail      -> <failure type="discrepancy">     (the implementation computes the wrong numbers)
    contract  -> <failure type="contract">        (it returned the wrong shape, dtype, keys, ...)
    error     -> <error type="ExceptionName">     (it raised on valid input)
    skip      -> <skipped message="reason">

The element text is the record's message (the ``assert_close``-shaped text), then the minimal case,
the traceback and the replay command, so a CI page shows what the terminal summary shows.
XML is written by :mod:`xml.etree.ElementTree` (which escapes markup); characters that XML 1.0 cannot
hold at all (control characters from a plugin's exception text) are replaced first.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.files import write_atomically
from harness.records import Record

__all__ = ["to_junit_xml", "write_junit"]

# Everything XML 1.0 forbids: C0 controls except tab, newline and return; surrogates; U+FFFE, U+FFFF.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def _clean(text: Any) -> str:
    return _INVALID_XML.sub("\ufffd", str(text))


def _detail(r: Record) -> str:
    lines = [r.message]
    if r.status == "error" and r.reason and r.reason not in r.message:
        lines.append(r.reason)
    case = r.case or {}
    if case:
        shape = ", ".join(f"{k}={case.get(k)}" for k in ("T", "B", "D", "H"))
        lines.append(f"Minimal case: {shape}, {case.get('dtype')}, seed={case.get('seed')}")
    if r.traceback:
        lines.append(r.traceback.rstrip())
    if r.replay:
        lines.append(f"Replay: {r.replay}")
    if r.case_file:
        lines.append(f"Case file: {r.case_file}")
    return "\n".join(lines)


def _exception_type(reason: str) -> str:
    """``forward raised ValueError: ...`` -> ``ValueError``; anything else -> ``error``."""
    m = re.match(r"(?:forward|backward) raised ([\w.]+)", reason or "")
    return m.group(1) if m else "error"


def _first_line(text: str, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _testcase(r: Record) -> ET.Element:
    case = ET.Element("testcase", {
        "classname": _clean(f"lstm_harness.{r.implementation}.{r.oracle}"),
        "name": _clean(f"{r.quantity} [{r.direction}, {r.dtype}]"),
        "time": "0",
    })
    if r.status == "fail":
        el = ET.SubElement(case, "failure",
                           {"type": "discrepancy", "message": _clean(_first_line(r.message))})
        el.text = _clean(_detail(r))
    elif r.status == "contract":
        el = ET.SubElement(case, "failure", {"type": "contract", "message": _clean(_first_line(r.reason))})
        el.text = _clean(_detail(r))
    elif r.status == "error":
        el = ET.SubElement(case, "error", {"type": _clean(_exception_type(r.reason)),
                                           "message": _clean(_first_line(r.reason))})
        el.text = _clean(_detail(r))
    elif r.status == "skip":
        ET.SubElement(case, "skipped", {"message": _clean(r.reason or "skipped")})
    elif r.status != "pass":
        raise ValueError(
            f"record status: expected one of pass, fail, error, contract, skip, got {r.status!r}"
        )
    if r.status == "pass" and r.message:  # "close (worst error 0.0093 of the allowed, ...)"
        out = ET.SubElement(case, "system-out")
        out.text = _clean(r.message)
    return case


def to_junit_xml(report: Mapping[str, Any]) -> str:
    """The JUnit XML document for ``report`` (a dict read from report.json)."""
    if not isinstance(report, Mapping) or not isinstance(report.get("records"), list):
        raise ValueError(
            "report: expected a dict read from report.json with a list 'records', "
            f"got {type(report).__name__}"
        )
    records = [Record.from_dict(d) for d in report["records"]]
    created = str(report.get("created", ""))[:19]
    # JUnit wants an ISO 8601 date and time; anything else in the field is left out, not passed on.
    timestamp = created if _TIMESTAMP.fullmatch(created) else ""
    root = ET.Element("testsuites", {"name": "lstm-harness"})
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    by_impl: dict[str, list[Record]] = {}
    for r in records:
        by_impl.setdefault(r.implementation, []).append(r)
    settings = report.get("settings") or {}
    tool = report.get("tool") or {}
    for impl, group in by_impl.items():
        counts = {
            "tests": len(group),
            "failures": sum(r.status in ("fail", "contract") for r in group),
            "errors": sum(r.status == "error" for r in group),
            "skipped": sum(r.status == "skip" for r in group),
        }
        for k, v in counts.items():
            totals[k] += v
        suite = ET.SubElement(root, "testsuite", {
            "name": _clean(f"lstm-harness: {impl}"),
            **{k: str(v) for k, v in counts.items()},
            "time": "0",
            **({"timestamp": timestamp} if timestamp else {}),
        })
        props = ET.SubElement(suite, "properties")
        for name, value in (("tool", f"{tool.get('name', 'lstm-harness')} {tool.get('version', '')}".strip()),
                            ("command", report.get("command")), ("target", report.get("target")),
                            ("verdict", report.get("verdict")), ("profile", settings.get("profile")),
                            ("max_examples", settings.get("max_examples")), ("seed", settings.get("seed"))):
            if value is not None:
                ET.SubElement(props, "property", {"name": name, "value": _clean(value)})
        for r in group:
            suite.append(_testcase(r))
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", "0")
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the JUnit XML of ``report`` to ``path`` (directories created); returns the path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path: expected a file name such as {path / 'junit.xml'}, got a directory")
    text = to_junit_xml(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)
    return path
