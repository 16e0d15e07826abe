"""Findings: the records of a certification grouped by root cause, computed once, shown by every renderer.

One bug shows in many records: every quantity downstream of it, against every oracle, in every dtype.
A person needs one answer per bug. The grouping rules:

* An **error** or a **contract** breach (the implementation raised, crashed, hung, returned the wrong
  shape, gave different results for the same input) is one finding per distinct message, whatever
  the oracles, quantities and dtypes it stopped.
* A **discrepancy** is one finding per implementation and direction that departs first: when its
  forward departs, the gradients depart too (they are the derivative of another function), so the
  backward is folded into the forward finding; otherwise the backward is its own finding. Both dtypes
  are one finding when both depart the same way.
* An **oracle disagreement** is a quantity on which exactly one oracle disagrees with the
  implementation while at least two others that compared it agree: evidence against that oracle (or
  its tolerance), not against the implementation; it is reported apart and does not lead.

Each finding carries its evidence (which oracles disagree, which agree), its largest error with where
it is (quantity, gate, timestep, unit), the first timestep over tolerance, and the minimal case with
its replay command.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.compare import FLOAT32_ORACLE
from harness.contract import DEFAULT_DTYPES, DIRECTIONS
from harness.records import (
    Record,
    format_coords,
    format_direction_steps,
    format_pair,
    format_ratio,
    skipped_notes,
    status_rank,
)
from harness.structure import Structure

__all__ = ["Finding", "KINDS", "findings", "render_findings"]

#: Kinds of finding, in the order a report lists them.
KINDS = ("discrepancy", "error", "contract", "oracle disagreement")

#: Agreeing oracles that make a lone disagreeing oracle the suspect.
_AGREEING_FOR_DISAGREEMENT = 2


@dataclass
class Finding:
    """One root cause. Plain data; ``to_dict`` is what report.json holds under ``findings``."""

    kind: str  # one of KINDS
    implementation: str
    title: str  # one line: what departs, where
    dtypes: list[str]
    directions: list[str]
    quantities: list[str]
    gates: list[str]  # gates of the worst elements, where the quantity has gates
    disagreeing: list[str]  # oracles that disagree with the implementation
    agreeing: list[str]  # oracles that compared the same quantities and agree with it
    evidence: str  # the sentence that says how sure this is
    worst: dict[str, Any]  # the largest error: quantity, dtype, oracle, ratio, abs_error, coords, actual, expected...
    first_bad_t: int | None
    reason: str  # for errors and contract breaches: the message (first lines)
    case: dict[str, Any]  # the minimal case (shapes, spec, digest)
    case_file: str
    replay: str
    records: int  # how many records it stands for
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def lines(self) -> list[str]:
        """The finding as a person reads it: the title, then the evidence, where, and how to replay."""
        out = [f"{self.kind.upper()}: {self.title}"]
        if self.reason:
            out += [f"  {line}" for line in self.reason.splitlines()[:4]]
        w = self.worst
        if w.get("ratio") is not None:
            where = format_coords(w.get("coords") or {})
            actual, expected = format_pair(w.get("actual"), w.get("expected"))
            on = _case_text(w.get("case") or {})
            out.append(f"  Largest error: {format_ratio(w['ratio'])}x tolerance in {w['quantity']} ({w['dtype']}, vs "
                       f"{w['oracle']}) at {where}: actual {actual}, expected {expected}"
                       + (f" [{on}]" if on else ""))
        if self.first_bad_t is not None:
            of = f" of T={self.case['T']}, on the minimal case" if self.case.get("T") else ""
            out.append(f"  First timestep over tolerance: t={self.first_bad_t}{of}")
        if w.get("first_bad_by_direction"):
            out.append(f"  First step over tolerance by direction: "
                       f"{format_direction_steps(w['first_bad_by_direction'])}")
        if self.evidence:
            out.append(f"  {self.evidence}")
        out += [f"  Note: {n}" for n in self.notes]
        if self.case:
            out.append(f"  Minimal case: {_case_text(self.case)}")
        if self.replay:
            out.append(f"  Replay: {self.replay}")
        return out


def _case_text(case: Mapping[str, Any]) -> str:
    parts = [f"{k}={case[k]}" for k in ("T", "B", "D", "H") if k in case]
    spec = case.get("spec") or {}
    if case.get("structure"):
        parts.append(Structure.from_dict(case["structure"]).describe())
    if spec.get("weight_scale"):
        parts.append(f"weights {spec['weight_scale']}")
    if case.get("dtype"):
        parts.append(str(case["dtype"]))
    return ", ".join(parts)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _ordered(values: Iterable[str], order: Sequence[str] = ()) -> list[str]:
    rank = {v: i for i, v in enumerate(order)}
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: (rank.get(v, len(rank)), seen.index(v)))


def _headline(records: Sequence[Record]) -> dict[str, Any]:
    """The largest error among ``records`` (the worst seen on any case when the search kept one)."""
    scored = [r for r in records if r.headline_ratio is not None]
    if not scored:
        return {}
    r = max(scored, key=lambda rec: rec.headline_ratio or 0.0)
    seen = r.worst_seen if r.worst_seen and r.headline_ratio != r.ratio else None
    source = seen or {"worst": r.worst, "max_abs_error": r.max_abs_error, "first_bad_t": r.first_bad_t,
                      "first_bad_by_direction": r.first_bad_by_direction,
                      "case": r.case, "case_file": r.case_file, "replay": r.replay}
    w = source.get("worst") or {}
    return {"quantity": r.quantity, "dtype": r.dtype, "oracle": r.oracle, "direction": r.direction,
            "ratio": r.headline_ratio, "abs_error": source.get("max_abs_error"), "coords": w.get("coords") or {},
            "actual": w.get("actual"), "expected": w.get("expected"), "allowed": w.get("allowed"),
            "first_bad_t": source.get("first_bad_t"), "first_bad_by_direction": source.get("first_bad_by_direction"),
            "case": source.get("case") or {},
            "case_file": source.get("case_file", ""), "replay": source.get("replay", ""),
            "minimal_ratio": r.ratio}


def _minimal(records: Sequence[Record]) -> Record | None:
    """The record with the smallest saved case (the reproducer)."""
    saved = [r for r in records if r.case_file]
    if not saved:
        return None

    def size(r: Record) -> tuple[int, ...]:
        c = r.case or {}
        return (int(c.get("T", 0)) * int(c.get("B", 0)) * int(c.get("D", 0)) * int(c.get("H", 0)),
                status_rank(r.status))

    return min(saved, key=size)


def _scale_note(head: Mapping[str, Any], minimal: Record | None) -> list[str]:
    """When shrinking moved the weight scale, say at which scale the error is largest."""
    big = ((head.get("case") or {}).get("spec") or {}).get("weight_scale")
    small = ((minimal.case if minimal else {}).get("spec") or {}).get("weight_scale")
    if big and small and big != small and head.get("minimal_ratio") is not None \
            and format_ratio(head["ratio"]) != format_ratio(head["minimal_ratio"]):  # (same size: nothing to say)
        return [f"the error is largest with {big} weights ({format_ratio(head['ratio'])}x tolerance); the minimal "
                f"case, with {small} weights, shows only {format_ratio(head['minimal_ratio'])}x: judge the bug by "
                f"the largest error"]
    return []


def findings(records: Sequence[Record], oracles: Sequence[str] = ()) -> list[Finding]:
    """Group ``records`` into findings, one per root cause (see the module's docstring)."""
    out: list[Finding] = []
    by_impl: dict[str, list[Record]] = {}
    for r in records:
        by_impl.setdefault(r.implementation, []).append(r)
    for impl, recs in by_impl.items():
        out += _errors(impl, recs, oracles)
        out += _discrepancies(impl, recs, oracles)
    return sorted(out, key=lambda f: KINDS.index(f.kind))


def _errors(impl: str, recs: Sequence[Record], oracles: Sequence[str]) -> list[Finding]:
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in recs:
        if r.status in ("error", "contract"):
            groups.setdefault((r.status, _first_line(r.reason)), []).append(r)
    out = []
    for (status, _), group in groups.items():
        minimal = _minimal(group) or group[0]
        directions = _ordered((r.direction for r in group), DIRECTIONS)
        dtypes = _ordered((r.dtype for r in group), DEFAULT_DTYPES)
        what = "raised an error" if status == "error" else "broke the contract"
        oracles_hit = _ordered((r.oracle for r in group), oracles)
        out.append(Finding(
            kind=status, implementation=impl,
            title=f"{impl} {what} in its {' and '.join(directions)} ({', '.join(dtypes)})",
            dtypes=dtypes, directions=directions,
            quantities=_ordered(r.quantity for r in group), gates=[], disagreeing=oracles_hit, agreeing=[],
            evidence=f"Every check it stopped says the same ({len(group)} records, {len(oracles_hit)} oracle"
                     f"{'s' if len(oracles_hit) != 1 else ''}).",
            worst={}, first_bad_t=None, reason="\n".join(minimal.reason.strip().splitlines()[:6]),
            case=minimal.case, case_file=minimal.case_file, replay=minimal.replay, records=len(group),
            notes=_notes(group),
        ))
    return out


def _discrepancies(impl: str, recs: Sequence[Record], oracles: Sequence[str]) -> list[Finding]:
    fails = [r for r in recs if r.status == "fail"]
    if not fails:
        return []
    # Who compared what: (dtype, direction, quantity) -> oracles that passed, oracles that failed.
    passed: dict[tuple[str, str, str], list[str]] = {}
    failed: dict[tuple[str, str, str], list[Record]] = {}
    for r in recs:
        key = (r.dtype, r.direction, r.quantity)
        if r.status == "pass":
            passed.setdefault(key, []).append(r.oracle)
        elif r.status == "fail":
            failed.setdefault(key, []).append(r)
    lone: list[Record] = []  # a single oracle against several that agree with the implementation
    real: list[Record] = []
    for key, group in failed.items():
        if len(group) == 1 and len(passed.get(key, [])) >= _AGREEING_FOR_DISAGREEMENT:
            lone += group
        else:
            real += group
    out: list[Finding] = []
    forward_dtypes = {r.dtype for r in real if r.direction == "forward"}
    if real:
        # The first direction that departs is the root cause: forward when it departs (in any dtype).
        lead = "forward" if forward_dtypes else "backward"
        out.append(_discrepancy(impl, real, lead, recs, passed, oracles))
    for oracle in _ordered((r.oracle for r in lone), oracles):
        group = [r for r in lone if r.oracle == oracle]
        agreeing = _ordered((o for r in group for o in passed.get((r.dtype, r.direction, r.quantity), [])), oracles)
        quantities = _ordered(r.quantity for r in group)
        head = _headline(group)
        minimal = _minimal(group)
        out.append(Finding(
            kind="oracle disagreement", implementation=impl,
            title=f"{oracle} alone disagrees about {', '.join(quantities)} "
                  f"({', '.join(_ordered((r.dtype for r in group), DEFAULT_DTYPES))})",
            dtypes=_ordered((r.dtype for r in group), DEFAULT_DTYPES),
            directions=_ordered((r.direction for r in group), DIRECTIONS), quantities=quantities,
            gates=_gates(group), disagreeing=[oracle], agreeing=agreeing,
            evidence=f"{', '.join(agreeing)} agree with the implementation on the same quantities: the fault is "
                     f"more likely {oracle}'s (or its tolerance) than the implementation's.",
            worst=head, first_bad_t=_first_bad_t(group, minimal), reason="",
            case=minimal.case if minimal else {}, case_file=minimal.case_file if minimal else "",
            replay=minimal.replay if minimal else "", records=len(group),
        ))
    return out


def _notes(records: Sequence[Record]) -> list[str]:
    """The notes of a finding's records, each once, then how many cases each oracle was skipped on, summed
    over dtypes (one note per oracle where each dtype's record has its own count)."""
    return list(dict.fromkeys(n for r in records for n in r.notes)) + skipped_notes(records)


def _gates(records: Iterable[Record]) -> list[str]:
    return _ordered((g for r in records if (g := ((r.worst or {}).get("coords") or {}).get("gate"))), "ifgo")


def _discrepancy(impl: str, real: Sequence[Record], lead: str, recs: Sequence[Record],
                 passed: Mapping[tuple[str, str, str], list[str]], oracles: Sequence[str]) -> Finding:
    leading = [r for r in real if r.direction == lead]
    following = [r for r in real if r.direction != lead]
    quantities = _ordered(r.quantity for r in leading)
    dtypes = _ordered((r.dtype for r in real), DEFAULT_DTYPES)
    gates = _gates(leading)
    head = _headline(leading)
    minimal = _minimal(leading)
    where = f" at gate {gates[0]}" if len(gates) == 1 else (f" at gates {', '.join(gates)}" if gates else "")
    verb = "departs" if len(quantities) == 1 else "depart"
    title = f"{lead}: {', '.join(quantities)} {verb}{where} ({', '.join(dtypes)})"
    disagreeing = _ordered((r.oracle for r in real), oracles)
    agreeing = _ordered((o for r in leading for o in passed.get((r.dtype, r.direction, r.quantity), [])), oracles)
    if agreeing:
        evidence = (f"{len(disagreeing)} oracle{'s' if len(disagreeing) != 1 else ''} disagree with the implementation "
                    f"({', '.join(disagreeing)}); {', '.join(agreeing)} agree with it on some of these.")
    else:
        spread = _oracle_spread(leading)
        agree = f"; they agree with one another to {spread:.1g} at the worst element" if spread is not None else ""
        evidence = (f"Every oracle that compared {'it' if len(quantities) == 1 else 'them'} disagrees with the "
                    f"implementation ({', '.join(disagreeing)}){agree}.")
    notes = _scale_note(head, minimal)
    if lead == "forward":
        if following:
            notes.append(f"its gradients ({', '.join(_ordered(r.quantity for r in following))}) depart too, as they "
                         f"must when the forward does")
    else:
        forward_ok = [r for r in recs if r.direction == "forward" and r.status == "pass"]
        if forward_ok:
            notes.append("its forward pass matches")
    notes += _gates_note(leading, gates)
    notes += _notes(real)
    return Finding(
        kind="discrepancy", implementation=impl, title=title, dtypes=dtypes,
        directions=_ordered((r.direction for r in real), DIRECTIONS), quantities=quantities, gates=gates,
        disagreeing=disagreeing, agreeing=agreeing, evidence=evidence, worst=head,
        first_bad_t=_first_bad_t(leading, minimal), reason="",
        case=minimal.case if minimal else {}, case_file=minimal.case_file if minimal else "",
        replay=minimal.replay if minimal else "", records=len(real), notes=notes,
    )


def _gate_spread(records: Iterable[Record]) -> dict[str, float]:
    """The largest |error| / allowed at each gate over the error maps of ``records`` (their minimal and
    largest cases), for the quantities laid out by gate (dW, dR, db and the variants' own)."""
    out: dict[str, float] = {}
    for r in records:
        for error_map in (r.error_map, (r.worst_seen or {}).get("error_map")):
            for panel in (error_map or {}).get("panels", []):
                title = str(panel.get("title", ""))
                if title.startswith("gate "):
                    top = max((v for row in panel.get("values", []) for v in row), default=0.0)
                    out[title[5:]] = max(out.get(title[5:], 0.0), float(top))
    return out


def _gates_note(records: Sequence[Record], headline: Sequence[str]) -> list[str]:
    """When more gates are over tolerance than the headline's (the gates of the worst elements), each of
    them with its largest error: a bug in what the gates share (dc, dh) shows at several, one in a gate's
    own formula mostly at that gate."""
    over = {g: v for g, v in _gate_spread(records).items() if v > 1.0}
    if len(over) < 2 or set(over) <= set(headline):
        return []
    shown = ", ".join(f"{g} ({format_ratio(v)}x)" for g, v in sorted(over.items(), key=lambda kv: -kv[1]))
    return [f"by gate, the largest error over tolerance: {shown}"]


def _first_bad_t(records: Sequence[Record], minimal: Record | None) -> int | None:
    """The first timestep over tolerance on the minimal case (the one the finding shows and replays);
    without a saved case, over every record."""
    on_minimal = [r for r in records if minimal is not None and r.case_file == minimal.case_file]
    ts = [r.first_bad_t for r in on_minimal or records if r.first_bad_t is not None]
    return min(ts) if ts else None


def _oracle_spread(records: Sequence[Record]) -> float | None:
    """How far the oracles' expected values lie apart at the same element of the same case, at most;
    None when no two oracles share one (different cases, or one oracle). Oracles that compute in float32
    are left out: their rounding is known and says nothing about agreement."""
    by_element: dict[tuple[str, str, str, tuple[int, ...]], list[float]] = {}
    for r in records:
        w = r.worst or {}
        digest = (r.case or {}).get("digest")
        if digest is None or w.get("expected") is None or r.method != "elementwise":
            continue
        if FLOAT32_ORACLE in r.tolerance_factors:  # its rounding is known: it says nothing about agreement
            continue
        by_element.setdefault((r.dtype, r.quantity, digest, tuple(w.get("index") or ())), []).append(w["expected"])
    spreads = [max(v) - min(v) for v in by_element.values() if len(v) > 1]
    return max(spreads) if spreads else None


def render_findings(found: Sequence[Finding]) -> str:
    """The findings as the terminal shows them, most important first."""
    if not found:
        return ""
    blocks = [f"Findings ({len(found)}):"]
    for i, f in enumerate(found, 1):
        lines = f.lines()
        blocks.append(f"{i}. {lines[0]}")
        blocks += lines[1:]
    return "\n".join(blocks)
