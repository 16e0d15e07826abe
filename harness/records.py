"""Records: the one form in which every outcome of a check travels, and what is derived from them.

A :class:`Record` is plain data (a dataclass that round-trips through JSON): one comparison of one
quantity, or one check that could not compare (an error, a contract breach, a skip with its
reason). Its :attr:`Record.message`, in the shape of ``torch.testing.assert_close``, is rendered
from its fields and structured :attr:`Record.notes` whenever it is read, so nothing ever edits
message text. The terminal summary, ``report.json``, the HTML and the JUnit XML are all rendered
from records.

This module also holds what every layer above agrees on: the statuses and their one order, the
verdict, the order records are reported in, and how records of one quantity are merged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.contract import DEFAULT_DTYPES, DIRECTIONS, quantities
from harness.structure import Structure, parse_prefix

__all__ = [
    "Record",
    "RecordKey",
    "STATUSES",
    "STATUS_ORDER",
    "status_rank",
    "worst_status",
    "verdict",
    "unit_outcome",
    "keep_worst",
    "order_records",
    "merge_after_stop",
    "format_coords",
    "format_direction_steps",
    "format_ratio",
    "format_pair",
    "printable",
    "render_message",
    "skipped_note",
    "skipped_notes",
    "json_safe",
]

STATUSES = ("pass", "fail", "error", "contract", "skip")
#: Worst first: a group of records shows its worst member's status, and reports sort by it.
STATUS_ORDER = ("error", "contract", "fail", "pass", "skip")

#: What identifies a record within one unit of work (one implementation and dtype).
RecordKey = tuple[str, str, str]  # oracle, direction, quantity


def status_rank(status: str) -> int:
    """0 for the worst status (``error``); unknown statuses rank after every known one."""
    return STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)


@dataclass
class Record:
    """The outcome of one comparison (or of one check that could not compare). Plain data."""

    implementation: str
    oracle: str
    variant: str
    dtype: str
    direction: str  # "forward" or "backward"
    quantity: str  # y, h_T, c_T, dx, dh0, dc0, dW, ...
    status: str  # one of STATUSES
    method: str = "elementwise"  # or "projection" (finite differences along random directions)
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    ratio: float | None = None  # worst |error| / allowed; <= 1 passes
    mismatched: int = 0
    total: int = 0
    nonfinite: int = 0  # NaN/Inf in actual where expected is finite
    worst: dict[str, Any] | None = None  # index, coords, actual, expected, allowed
    first_bad_t: int | None = None
    last_bad_t: int | None = None
    #: In a bidirectional structure, where each direction first departs in its own reading order:
    #: direction name -> {"t": timestep, "step": steps it had taken} (harness.compare.first_bad_by_direction).
    first_bad_by_direction: dict[str, dict[str, int]] | None = None
    rtol: float | None = None
    atol: float | None = None
    atol_scale: float | None = None
    tolerance_dtype: str | None = None
    #: Factors rtol and atol above already include, by reason: the case's LayerNorm condition number and,
    #: in a float32 case that failed without it, the recurrence's measured amplification of float32
    #: rounding (harness.conditioning); 2 when the oracle computes in the same low precision as the
    #: implementation (both sides then carry that precision's rounding); max |c| for a peephole gradient.
    tolerance_factors: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why skipped, or the error / contract text
    traceback: str = ""
    case: dict[str, Any] = field(default_factory=dict)  # T, B, D, H, dtype, spec
    error_map: dict[str, Any] | None = None  # panels of |error| / allowed, for heatmaps
    examples: int = 1  # cases this record summarizes (the worst, or the minimal failing one)
    case_file: str = ""
    replay: str = ""
    #: For a failure: the largest error the search saw for this quantity, when it is larger than the minimal
    #: case's (shrinking looks for the smallest case that fails, not the one that fails most): ratio,
    #: max_abs_error, worst (coordinates, actual, expected, allowed), first_bad_t, case, case_file, replay.
    worst_seen: dict[str, Any] | None = None
    #: Observations about this record beyond its comparison (a failure that did not reproduce, a
    #: case that was not shrunk); each is one line of the message, after "Note: ".
    notes: list[str] = field(default_factory=list)
    #: The cases of this check its oracle was skipped on (shrinking included) because it does not compute
    #: their layer structure, by reason. Kept as counts, not note text, so that a finding or a summary
    #: spanning both dtypes says it once with the counts summed (:func:`skipped_note`).
    skipped_cases: dict[str, int] = field(default_factory=dict)
    #: Of the ``examples`` cases, how many passed this check's direction (every quantity of it against this
    #: oracle) only with the float32 tolerance widened by the case's amplification of rounding
    #: (harness.conditioning); the same number on every record of that direction.
    widened_cases: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "skip")

    @property
    def key(self) -> RecordKey:
        return (self.oracle, self.direction, self.quantity)

    @property
    def headline_ratio(self) -> float | None:
        """The largest error relative to tolerance known for this quantity: the worst seen, else this case's."""
        seen = (self.worst_seen or {}).get("ratio")
        if seen is not None and (self.ratio is None or seen > self.ratio):
            return float(seen)
        return self.ratio

    @property
    def label(self) -> str:
        return f"{self.quantity} from {self.implementation} ({self.dtype}) vs {self.oracle}"

    @property
    def message(self) -> str:
        """The ``assert_close``-shaped text, rendered from the fields (see :func:`render_message`)."""
        return render_message(self)

    def add_note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus the rendered ``message``, in strict-JSON-safe values."""
        return json_safe({**dataclasses.asdict(self), "message": self.message})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """The record from :meth:`to_dict`'s output; derived keys (``message``) are recomputed."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _from_json_safe(v) for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


def json_safe(value: Any) -> Any:
    """``value`` with NaN as None and infinities as +-1e300, so that strict JSON accepts it."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return 1e300 if value > 0 else -1e300
        return value
    if isinstance(value, np.floating):
        return json_safe(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _from_json_safe(value: Any) -> Any:
    """Undo :func:`json_safe`'s stand-in for infinity (+-1e300), so that a record read back from
    report.json renders the same message as the one written."""
    if isinstance(value, float) and abs(value) >= 1e300:
        return math.copysign(math.inf, value)
    if isinstance(value, dict):
        return {k: _from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Statuses and the verdict


def worst_status(records: Iterable[Record]) -> str:
    statuses = {r.status for r in records}
    return min(statuses, key=status_rank, default="skip")


def verdict(records: Sequence[Record], *, interrupted: bool = False) -> str:
    """``certified`` (nothing failed and something passed), ``discrepancies`` or ``error``. A run that was
    ``interrupted`` is never certified: what did not run was not checked."""
    statuses = {r.status for r in records}
    if statuses & {"error", "contract"}:
        return "error" if not statuses & {"fail"} else "discrepancies"
    if "fail" in statuses:
        return "discrepancies"
    if "pass" not in statuses or interrupted:
        return "error"
    return "certified"


def unit_outcome(records: Sequence[Record]) -> str:
    """One unit's word on the progress line: its verdict, or ``skipped`` when no oracle of it could
    check the dtype (its records are all skips, each with the reason the summary lists)."""
    if records and all(r.status == "skip" for r in records):
        return "skipped"
    return verdict(records)


# --------------------------------------------------------------------------------------------------
# Choosing, ordering and merging records


def keep_worst(worst: dict[RecordKey, Record], r: Record) -> None:
    """Keep ``r`` if it is the worst record of its key so far (a comparison beats a skip)."""
    old = worst.get(r.key)
    if old is None or (r.ratio or 0.0) > (old.ratio or 0.0) or (old.status == "skip" and r.status == "pass"):
        worst[r.key] = r


def order_records(records: Iterable[Record], oracles: Sequence[str] = ()) -> list[Record]:
    """Records in report order: implementation, dtype (float64 first), oracle (in the order of
    ``oracles``, unknown ones last), forward before backward, then each direction's quantity order."""
    oorder = {name: i for i, name in enumerate(oracles)}
    dorder = {d: i for i, d in enumerate(DEFAULT_DTYPES)}

    def quantity_rank(r: Record) -> tuple[int, int, int]:
        try:
            names = quantities(r.variant, r.direction)
        except (KeyError, ValueError):
            return (0, 0, 99)
        layer, direction, bare = parse_prefix(r.quantity[1:]) if r.quantity.startswith("d") else (None, None, "")
        if layer is not None:  # a prefixed parameter's gradient: after the inputs', cell by cell
            name = "d" + bare
            return (1 + layer, direction or 0, names.index(name) if name in names else 98)
        return (0, 0, names.index(r.quantity) if r.quantity in names else 99)

    def rank(r: Record) -> tuple[Any, ...]:
        direction = DIRECTIONS.index(r.direction) if r.direction in DIRECTIONS else len(DIRECTIONS)
        return (r.implementation, dorder.get(r.dtype, 9), oorder.get(r.oracle, 99), direction, quantity_rank(r))

    return sorted(records, key=rank)


def merge_after_stop(partial: Sequence[Record], stopped: Sequence[Record]) -> list[Record]:
    """One record per quantity after a search was stopped (a crash, a hang, the harness's own error).

    ``partial`` is what the searches before it found: a discrepancy found there (with its own
    minimal case) stands; for every other quantity the record of what stopped the search does,
    unless both passed, when the worse of the two does.
    """
    found = {r.key: r for r in partial}
    out: dict[RecordKey, Record] = {}
    for r in stopped:
        earlier = found.pop(r.key, None)
        if earlier is not None and not earlier.ok:
            out[r.key] = earlier
        elif earlier is not None and r.status == "pass" and earlier.status == "pass":
            worst = {r.key: r}
            keep_worst(worst, earlier)
            out[r.key] = worst[r.key]
        else:
            out[r.key] = r
    out.update({k: r for k, r in found.items() if not r.ok})
    examples = max((r.examples for r in out.values()), default=0)
    for r in out.values():
        r.examples = examples
    return list(out.values())


# --------------------------------------------------------------------------------------------------
# The message


def format_coords(coords: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in coords.items())


def format_direction_steps(by_direction: Mapping[str, Mapping[str, int]] | None) -> str:
    """``forward t=3 (step 3), reverse t=5 (step 0): the reverse direction departs first``; "" for None."""
    if not by_direction:
        return ""
    parts = []
    for name, where in by_direction.items():
        step = where.get("step", 0)
        parts.append(f"{name} t={where.get('t')} ({'a padded step' if step < 0 else f'step {step}'})")
    text = ", ".join(parts)
    steps = {name: where.get("step", 0) for name, where in by_direction.items()}
    first = min(steps.values())
    leaders = [name for name, step in steps.items() if step == first]
    if len(by_direction) == 1:
        text += f": only the {leaders[0]} direction departs"
    elif len(leaders) == 1:
        text += f": the {leaders[0]} direction departs first"
    else:
        text += ": both directions depart at the same step"
    return text


# C0 controls but newline and tab, DEL, C1 controls, and the Unicode controls that reorder text on screen.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character but newline and tab shown as an escape (ESC as ``\\x1b``).

    What an implementation says (exception text, what it prints) reaches a person's terminal through
    the harness; this keeps it from clearing the screen, retitling the window, moving the cursor or
    colouring a forged verdict. Every terminal renderer calls it; the JSON report keeps the raw text.
    """
    return _CONTROLS.sub(_escape, text)



def format_ratio(ratio: float | None) -> str:
    """An error relative to tolerance, with two significant digits that are never rounded away:
    ``1.027`` is ``1.0``, not ``1``; ``3.9e+07``; infinity (a NaN or Inf where the oracle is finite)."""
    if ratio is None:
        return "?"
    if math.isinf(ratio) or ratio >= 1e300:
        return "inf"
    if 10 <= ratio < 1e5:  # whole numbers read better than exponents here: 1200, not 1.2e+03
        return f"{float(f'{ratio:.2g}'):.0f}"
    text = f"{ratio:#.2g}"
    return text.rstrip(".") if "e" not in text else text


def format_pair(actual: float | None, expected: float | None) -> tuple[str, str]:
    """``actual`` and ``expected`` with as many significant digits as it takes to show where they part
    (at least 4, at most 17), so that two different numbers never print alike."""
    if actual is None or expected is None:
        return (_plain(actual), _plain(expected))
    actual, expected = actual + 0.0, expected + 0.0  # -0.0 prints as 0: the comparison does not tell them apart
    for digits in range(4, 18):
        a, e = f"{actual:.{digits}g}", f"{expected:.{digits}g}"
        if a != e or actual == expected:
            return a, e
    return repr(actual), repr(expected)


def _plain(value: Any) -> str:
    return "None" if value is None else f"{value:.8g}"


def _ratio(ratio: float | None) -> str:
    text = format_ratio(ratio)
    return "infinitely many times" if text == "inf" else f"{text} times"


def render_message(rec: Record) -> str:
    """The ``torch.testing.assert_close``-shaped text of a record, made from its fields only."""
    notes = [*rec.notes, skipped_note(rec.oracle, rec.skipped_cases)] if rec.skipped_cases else rec.notes
    return "\n".join([_message_body(rec), *(f"Note: {note}" for note in notes)])


def skipped_note(oracle: str, cases: Mapping[str, int]) -> str:
    """How many cases ``oracle`` was skipped on and why, from reason -> cases (:attr:`Record.skipped_cases`)."""
    total = sum(cases.values())
    why = "; ".join(cases) if len(cases) == 1 else "; ".join(f"{reason} ({n} cases)" for reason, n in cases.items())
    return (f"{oracle} was skipped on {total} case{'s' if total != 1 else ''} (shrinking included) whose structure "
            f"it does not compute: {why}")


def skipped_notes(records: Iterable[Record]) -> list[str]:
    """One :func:`skipped_note` per oracle of ``records``, its counts summed over the units (implementation
    and dtype) the records come from: the records of one unit share one count, whatever their quantity."""
    per_unit = {(r.implementation, r.dtype, r.oracle): r.skipped_cases for r in records if r.skipped_cases}
    by_oracle: dict[str, dict[str, int]] = {}
    for (_, _, oracle), cases in per_unit.items():
        into = by_oracle.setdefault(oracle, {})
        for reason, n in cases.items():
            into[reason] = into.get(reason, 0) + n
    return [skipped_note(oracle, cases) for oracle, cases in by_oracle.items()]


def _message_body(rec: Record) -> str:
    head = rec.label
    if rec.status == "skip":
        return f"{head}: skipped ({rec.reason})"
    if rec.status in ("error", "contract"):
        kind = "raised an error" if rec.status == "error" else "broke the contract"
        return f"{head}: {kind}\n{rec.reason}"
    what = "directional derivatives" if rec.method == "projection" else "elements"
    if rec.status == "pass":
        return (
            f"{head}: close (worst error {rec.ratio or 0.0:.2g} of the allowed, "
            f"{rec.max_abs_error or 0.0:.2g} absolute, over {rec.total} {what})"
        )
    w = rec.worst or {}
    where = format_coords(w.get("coords", {}))
    pct = 100.0 * rec.mismatched / max(rec.total, 1)
    lines = [
        f"{head}: not close",
        f"Mismatched {what}: {rec.mismatched} / {rec.total} ({pct:.1f}%)",
    ]
    if rec.nonfinite:
        lines.append(f"Non-finite values where the oracle is finite: {rec.nonfinite}")
    actual, expected = format_pair(w.get("actual"), w.get("expected"))
    lines.append(
        f"Worst element: |error| {w.get('abs_error', float('nan')):.3g} at {where} "
        f"(actual {actual}, expected {expected}; {_ratio(rec.ratio)} the {w.get('allowed', float('nan')):.3g} "
        f"allowed)"
    )
    among = " among finite elements" if rec.nonfinite else ""
    lines.append(f"Greatest absolute difference{among}: {rec.max_abs_error or 0.0:.3g}")
    lines.append(f"Greatest relative difference{among}: {rec.max_rel_error or 0.0:.3g}")
    if rec.first_bad_t is not None:
        lines.append(f"First timestep over tolerance: t={rec.first_bad_t}")
    if rec.first_bad_by_direction:
        lines.append(f"First step over tolerance by direction: {format_direction_steps(rec.first_bad_by_direction)}")
    scale = f" x {rec.atol_scale:.3g}" if rec.atol_scale and rec.atol_scale != 1.0 else ""
    factors = "; ".join(f"x {v:.3g} for {k}" for k, v in rec.tolerance_factors.items())
    cond = f" (including {factors})" if factors else ""
    lines.append(f"Tolerance ({rec.tolerance_dtype}): rtol={rec.rtol or 0.0:.1e}, atol={rec.atol or 0.0:.1e}"
                 f"{scale}{cond}")
    seen = rec.worst_seen
    if seen and seen.get("ratio") is not None:
        sw = seen.get("worst") or {}
        s_actual, s_expected = format_pair(sw.get("actual"), sw.get("expected"))
        spec = (seen.get("case") or {}).get("spec") or {}
        scale_note = f", weights {spec['weight_scale']}" if spec.get("weight_scale") else ""
        lines.append(f"Largest error seen: {_ratio(seen['ratio'])} the allowed, |error| "
                     f"{seen.get('max_abs_error', float('nan')):.3g} at {format_coords(sw.get('coords', {}))} "
                     f"(actual {s_actual}, expected {s_expected}) on a larger case "
                     f"({_case_text(seen.get('case') or {})}{scale_note})")
    return "\n".join(lines)


def _case_text(case: Mapping[str, Any]) -> str:
    parts = [f"{k}={case[k]}" for k in ("T", "B", "D", "H") if k in case]
    if case.get("structure"):
        parts.append(Structure.from_dict(case["structure"]).describe())
    return ", ".join(parts)
