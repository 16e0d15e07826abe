"""One report from the parts of a certification that ran apart: the shards of a CI matrix
(``lstm-harness certify --shard K/N``), or the units that pytest-xdist spread over workers and hosts.

A certification cut for distribution has one unit per dtype and oracle, named like ``float64-vs-torch``
(:attr:`harness.session.Unit.name`); each part's ``report.json`` says under ``units`` which units the
whole has (``planned``) and which it holds (``run``). :func:`merge_reports` checks that the parts belong
together (the same harness version, target and settings; no unit twice), puts their records in report
order, computes the findings and the verdict over all of them, and says which units no part holds:
a merged report with a unit missing is never certified.

Records of a unit depend only on the implementation, the oracle, the dtype and the settings (a fixed
``seed``, or a derandomized profile such as ``ci``, which derives it from the check itself), never on
which process or host ran the unit. :func:`content` is what "the same records" means when two runs are
compared: every field of every record, the verdict, the counts and the findings, except the paths that
depend on where a run wrote its files (``case_file``, ``replay`` and the ``message`` that quotes it,
wherever they appear: in records, their ``worst_seen``, and findings). Numbers are compared exactly: the
same code on the same machine computes the same bits in any process; hosts with other CPUs, BLAS builds
or library versions may differ in the last bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harness.findings import findings
from harness.records import Record, order_records
from reports.json import build_report

__all__ = ["MergeError", "merge_reports", "part_note", "content", "SAME_SETTINGS"]


class MergeError(ValueError):
    """Parts that cannot make one report; the message names the files and what differs."""


#: The settings that decide which cases a unit checks: parts that differ in one of them are refused.
SAME_SETTINGS = ("profile", "max_examples", "seed", "variant", "dtypes", "oracles", "examples_per_search",
                 "derandomize")


def part_note(units: dict[str, Any] | None) -> str | None:
    """The note a report holding only part of its certification carries, or None for a whole one."""
    if not units or units.get("run") == units.get("planned"):
        return None
    what = f"shard {units['shard']}" if units.get("shard") else "part"
    if not units.get("run"):
        return (f"this {what} holds no unit: the certification has only {len(units['planned'])}, so nothing was "
                f"checked here; use at most {len(units['planned'])} shards")
    return (f"this report is one {what} of the certification ({len(units['run'])} of {len(units['planned'])} "
            f"units): its verdict speaks for these units only; merge the parts with `lstm-harness report`")


def _differ(parts: Sequence[tuple[str, dict[str, Any]]], what: str, value: Any) -> None:
    seen: dict[str, list[str]] = {}
    for name, report in parts:
        seen.setdefault(repr(value(report)), []).append(name)
    if len(seen) > 1:
        shown = "; ".join(f"{', '.join(names)}: {text}" for text, names in seen.items())
        raise MergeError(f"the reports cannot be merged: they differ in {what} ({shown})")


def _check(parts: Sequence[tuple[str, dict[str, Any]]]) -> None:
    if not parts:
        raise MergeError("expected at least one report.json to merge, got none")
    whole = [name for name, report in parts if not isinstance(report.get("units"), dict)]
    if whole and len(parts) > 1:
        raise MergeError(f"the reports cannot be merged: {', '.join(whole)} holds no list of units (it was not "
                         f"made by `certify --shard K/N` or the pytest plugin), so what it covers is unknown")
    _differ(parts, "the harness version", lambda r: (r.get("tool") or {}).get("version"))
    _differ(parts, "the command", lambda r: r.get("command"))
    _differ(parts, "the target", lambda r: r.get("target"))
    _differ(parts, "the implementation", lambda r: {k: (r.get("target_info") or {}).get(k)
                                                      for k in ("name", "variant", "dtypes", "backward")})
    for key in SAME_SETTINGS:
        _differ(parts, f"the setting {key!r}", lambda r, key=key: (r.get("settings") or {}).get(key))
    _differ(parts, "the units planned", lambda r: (r.get("units") or {}).get("planned"))
    owner: dict[str, str] = {}
    for name, report in parts:
        for unit in (report.get("units") or {}).get("run") or []:
            if unit in owner:
                raise MergeError(f"the reports cannot be merged: the unit {unit} is in both {owner[unit]} and {name}; "
                                 f"pass each part once (a shard that ran twice: keep one of its reports)")
            owner[unit] = name


def _shard_index(report: dict[str, Any]) -> tuple[int, int]:
    shard = (report.get("units") or {}).get("shard")
    if isinstance(shard, str) and "/" in shard:
        k, _, n = shard.partition("/")
        if k.isdigit() and n.isdigit():
            return int(n), int(k)
    return 0, 0


def merge_reports(parts: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One report from ``parts`` ((file name, report dict) pairs, as ``reports.json.read_report`` loads
    them). :class:`MergeError` when they do not belong together."""
    _check(parts)
    parts = sorted(parts, key=lambda p: _shard_index(p[1]))  # shards in order; other parts as given
    first = parts[0][1]
    settings = dict(first.get("settings") or {})
    oracle_names = list(settings.get("oracles") or [])
    records = order_records([Record.from_dict(r) for _, report in parts for r in report["records"]], oracle_names)
    planned = list((first.get("units") or {}).get("planned") or [])
    held = {u for _, report in parts for u in (report.get("units") or {}).get("run") or []}
    missing = [u for u in planned if u not in held]
    drop = {part_note(report.get("units")) for _, report in parts}
    notes = sorted({n for _, report in parts for n in report.get("notes") or [] if n not in drop})
    if missing:
        notes.append(_missing_note(parts, missing, len(planned)))
    by_name: dict[str, dict[str, Any]] = {}
    for _, report in parts:
        for o in report.get("oracles") or []:
            by_name.setdefault(o.get("name", ""), o)
    oracles = [by_name[n] for n in oracle_names if n in by_name] + [o for n, o in by_name.items()
                                                                   if n not in oracle_names]
    units = None
    if planned:
        units = {"planned": planned, "run": [u for u in planned if u in held], "shard": None,
                 "parts": [{"file": name, "shard": (report.get("units") or {}).get("shard"),
                            "run": (report.get("units") or {}).get("run"), "created": report.get("created"),
                            "environment": {k: (report.get("environment") or {}).get(k)
                                            for k in ("python", "platform", "cpu", "gpu")}}
                           for name, report in parts]}
    interrupted = bool(missing) or any(report.get("interrupted") for _, report in parts)
    return build_report(records, command=str(first.get("command") or "certify"), target=str(first.get("target")),
                        settings=settings, implementations=list(first.get("implementations") or []),
                        oracles=oracles, target_info=first.get("target_info"), notes=notes,
                        found=findings(records, oracle_names),
                        diagnosis=next((r["diagnosis"] for _, r in parts if r.get("diagnosis")), None),
                        interrupted=interrupted, units=units, environment_info=first.get("environment"))


def _missing_note(parts: Sequence[tuple[str, dict[str, Any]]], missing: list[str], planned: int) -> str:
    counts = {_shard_index(report)[0] for _, report in parts} - {0}
    shards = ""
    if len(counts) == 1:
        n = counts.pop()
        present = {_shard_index(report)[1] for _, report in parts}
        absent = [f"{k}/{n}" for k in range(1, n + 1) if k not in present]
        if absent:
            shards = f" (the shard{'s' if len(absent) > 1 else ''} {', '.join(absent)} missing)"
    return (f"incomplete: {len(missing)} of {planned} units are in no report{shards}: {', '.join(missing)}; "
            f"what they would check was not checked, so the certification is not certified")


_PATHS = ("case_file", "replay", "message")


def content(report: dict[str, Any]) -> dict[str, Any]:
    """What two reports of the same certification must agree on, wherever and however their units ran:
    the verdict, the counts, every record and every finding, without the paths of saved cases (the keys
    ``case_file``, ``replay`` and ``message``, at any depth: see the module's doc)."""
    def bare(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: bare(v) for k, v in value.items() if k not in _PATHS}
        if isinstance(value, list):
            return [bare(v) for v in value]
        return value

    return {"verdict": report.get("verdict"), "counts": report.get("counts"),
            "records": bare(report.get("records") or []), "findings": bare(report.get("findings") or [])}
