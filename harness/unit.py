"""One unit of a certification: one implementation, one dtype, a group of oracles.

Each unit

1. runs a probe: case A, case B, case A again, and compares the two results for A bit for bit. A
   difference beyond tolerance is a contract violation ("gives different results for the same
   input"): the implementation is nondeterministic or keeps state between calls;
2. runs :func:`harness.runner.run_checks` (Hypothesis over cases, shrinking each failure);
3. runs the minimal failing case twice more, and notes when the two runs disagree.

A call that hangs or kills its worker process (:class:`harness.isolation.WorkerFailure`) stops the
unit at once: shrinking it would cost a restart or a whole timeout per attempt, so the case that
did it is reported as it is, with its replay command.

An implementation may declare *limits* (:class:`harness.Limits`, set by :mod:`harness.adapt`): one
with no initial cell state is checked with c0 = 0, and the quantities it cannot produce (dc0, or c_T)
are reported as not compared, with the reason, never compared against placeholders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from harness.cases import (
    UNSORTED_LENGTHS,
    Case,
    CaseSpec,
    build_case,
    case_file_name,
    drawable_features,
    load_case,
    replay_command,
    structure_fields,
)
from harness.check import check_case, structure_reason
from harness.compare import compare_arrays, tolerance
from harness.contract import DIRECTIONS, FORWARD_QUANTITIES, ImplementationInfo, quantities, quantity_specs
from harness.limits import Limits
from harness.records import Record, merge_after_stop, status_rank
from harness.runner import RunSettings, run_checks
from harness.structure import FEATURES
from harness.subject import Execution

__all__ = ["run_unit", "RestrictedSubject", "RestrictedOracle", "StoredSubject", "disagreement", "restricted",
           "mark_unchecked", "internal_error"]


# --------------------------------------------------------------------------------------------------
# Limits declared by adapters: quantities an implementation cannot produce


def _restrict_case(case: Case, zero: Sequence[str]) -> Case:
    if not zero:
        return case
    changes = {name: np.zeros_like(getattr(case, name)) for name in zero}
    return dataclasses.replace(case, **changes)


class RestrictedSubject:
    """The implementation as its limits declare it: the inputs it does not take held at zero, and what it
    cannot produce set to zeros (reported as not compared by :func:`mark_unchecked`)."""

    def __init__(self, subject: Any, limits: Limits):
        self.subject = subject
        self.info = subject.info
        self.zero = limits.zero
        self.unchecked = dict(limits.unchecked)

    def execute(self, case: Case, *, backward: bool) -> Execution:
        restricted = _restrict_case(case, self.zero)
        out = self.subject.execute(restricted, backward=backward)
        # What is not checked is compared as zeros on both sides, then reported as skipped.
        if out.forward is not None and "c_T" in self.unchecked and len(out.forward) == 3:
            y, h, c = out.forward
            out.forward = (y, h, np.zeros_like(c))
        if out.gradients is not None:
            for q in self.unchecked:
                if q.startswith("d") and q[1:] in out.gradients:
                    out.gradients[q[1:]] = np.zeros_like(out.gradients[q[1:]])
        return out


class RestrictedOracle:
    """An oracle seeing the case as the restricted implementation does (see :class:`RestrictedSubject`)."""

    def __init__(self, oracle: Any, limits: Limits):
        self._oracle = oracle
        self.zero = limits.zero
        self.unchecked = dict(limits.unchecked)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._oracle, name)

    def reference(self, case: Case) -> Any:
        ref = self._oracle.reference(_restrict_case(case, self.zero))
        if ref.outputs is not None and "c_T" in self.unchecked:
            ref.outputs["c_T"] = np.zeros_like(ref.outputs["c_T"])
        for q in self.unchecked:
            key = q[1:] if q.startswith("d") else None
            if key and ref.gradients is not None and key in ref.gradients:
                ref.gradients[key] = np.zeros_like(ref.gradients[key])
                if ref.gradient_error is not None and key in ref.gradient_error:
                    ref.gradient_error[key] = np.zeros_like(ref.gradient_error[key])
            if key and ref.projections is not None and key in ref.projections:
                p = ref.projections[key]
                p.values = np.zeros_like(p.values)
        return ref


def restricted(subject: Any, oracles: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The subject and oracles as the implementation's declared limits restrict them (unchanged if none)."""
    limits = subject.info.limits
    if not limits:
        return subject, list(oracles)
    return RestrictedSubject(subject, limits), [RestrictedOracle(o, limits) for o in oracles]


def mark_unchecked(records: list[Record], unchecked: Mapping[str, str]) -> None:
    """Turn the records of quantities the implementation cannot produce into skips with the reason."""
    for r in records:
        if r.quantity in unchecked:
            fresh = Record(implementation=r.implementation, oracle=r.oracle, variant=r.variant, dtype=r.dtype,
                           direction=r.direction, quantity=r.quantity, status="skip",
                           reason=f"not compared: {unchecked[r.quantity]}", case=r.case, examples=r.examples)
            r.__dict__.update(fresh.__dict__)


# --------------------------------------------------------------------------------------------------
# Stopping a unit after a hang or a crash


class _Fatal(Exception):
    """Raised through Hypothesis to end a unit after a WorkerFailure."""


#: Identical errors in a row after which a unit stops calling what raises them: every further call
#: (Hypothesis would make dozens while shrinking) only says the same again.
REPEATED_ERRORS = 3


class _Guard:
    """Passes executions through until one is a WorkerFailure, or the forward has raised the same error
    :data:`REPEATED_ERRORS` times in a row; from then on every call raises at once. A backward that keeps
    raising the same error is not called again: its error is repeated, and the forward is still checked."""

    def __init__(self, subject: Any):
        self.subject = subject
        self.info = subject.info
        self.fatal: tuple[Case, Execution] | None = None
        self.fatal_note = ""
        self.backward_stopped: tuple[str, str] | None = None  # the backward's repeated error and traceback
        self._last: dict[str, tuple[str, int]] = {}  # phase -> (error text, times in a row)

    def _repeated(self, phase: str, error: str | None) -> bool:
        if error is None:
            self._last.pop(phase, None)
            return False
        text, n = self._last.get(phase, ("", 0))
        n = n + 1 if text == error else 1
        self._last[phase] = (error, n)
        return n >= REPEATED_ERRORS

    def execute(self, case: Case, *, backward: bool) -> Execution:
        from harness.isolation import WorkerFailure

        if self.fatal is not None:
            raise _Fatal()
        out = self.subject.execute(case, backward=backward and self.backward_stopped is None)
        if isinstance(out, WorkerFailure):
            self.fatal = (case, out)
            self.fatal_note = ("this case was not shrunk: every attempt would cost a worker restart or a whole "
                               "timeout; it is the first case on which it happened")
            raise _Fatal()
        if self._repeated("forward", out.forward_error):
            self.fatal = (case, out)
            self.fatal_note = (f"the forward raised the same error on {REPEATED_ERRORS} calls in a row, so the unit "
                               f"stopped calling it; this is the last case it raised on")
            raise _Fatal()
        if backward and self.backward_stopped is not None and out.forward_error is None and out.forward is not None:
            out.backward_error, out.traceback = self.backward_stopped
            out.backward_ran = True
        elif backward and out.forward_error is None and self._repeated("backward", out.backward_error):
            self.backward_stopped = (out.backward_error or "", out.traceback)
        return out


class StoredSubject:
    """A Subject that returns one stored execution (to make records from a fatal one)."""

    def __init__(self, info: ImplementationInfo, execution: Execution):
        self.info = info
        self.execution = execution

    def execute(self, case: Case, *, backward: bool) -> Execution:
        return self.execution


# --------------------------------------------------------------------------------------------------
# Determinism


def _probe_spec(info: ImplementationInfo, dtype: str, seed: int | None) -> CaseSpec:
    # Distinct T, B, D, H so that a transposed axis cannot pass unnoticed; in the implementation's own
    # structure when it has a fixed one (a configurable one is probed in the default structure).
    fields = {} if info.configurable else structure_fields(info.structure)
    return CaseSpec(variant=info.variant, dtype=dtype, T=3, B=2, D=4, H=3, seed=(seed or 0) % 2**32,
                    weight_scale="unit", state="random", ln_eps=info.ln_eps, **fields)


def _execution_arrays(ex: Execution) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if ex.forward is not None:
        out.update(zip(FORWARD_QUANTITIES, ex.forward))
    if ex.gradients is not None:
        out.update({"d" + k: v for k, v in ex.gradients.items()})
    return out


def disagreement(first: Execution, second: Execution, case: Case, base: dict[str, Any]) -> list[Record]:
    """Records (status "contract") for every quantity two runs of the same case disagree on."""
    specs = quantity_specs(case.variant, case.structure)
    a, b = _execution_arrays(first), _execution_arrays(second)
    out: list[Record] = []
    for direction, err_a, err_b in (("forward", first.forward_error, second.forward_error),
                                    ("backward", first.backward_error, second.backward_error)):
        if (err_a is None) != (err_b is None):
            rec = Record(**base, direction=direction, quantity="y" if direction == "forward" else "dx",
                         status="contract",
                         reason=("gives different results for the same input: one call raised an error and "
                                 "another on the same case did not (" + (err_a or err_b or "") + "); the "
                                 "implementation is nondeterministic or keeps state between calls"))
            out.append(rec)
    for q in a:
        if q not in b or q not in specs or a[q].shape != b[q].shape:
            continue
        if np.array_equal(a[q], b[q], equal_nan=True):
            continue
        direction = "forward" if q in FORWARD_QUANTITIES else "backward"
        kind = "values" if direction == "forward" else "gradients"
        rec = compare_arrays(b[q], a[q], spec=specs[q], H=case.H, tol=tolerance(case.dtype, kind),
                             tolerance_dtype=case.dtype, base={**base, "direction": direction, "quantity": q},
                             lengths=case.lengths)
        if rec.status == "pass":
            rec.reason = (f"two calls on the same input differ in the last bits (up to {rec.max_abs_error:.2g}; "
                          f"within tolerance)")
            out.append(rec)
            continue
        where = ", ".join(f"{k}={v}" for k, v in (rec.worst or {}).get("coords", {}).items())
        rec.status = "contract"
        rec.reason = (f"gives different results for the same input: two calls on the same case (another case "
                      f"ran in between) differ in {q} by up to {rec.max_abs_error:.3g} (at {where}; "
                      f"{rec.mismatched} of {rec.total} elements beyond tolerance). The implementation is "
                      f"nondeterministic or keeps state between calls")
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------------
# One unit: one dtype against some oracles


def _save_case(case: Case, settings: RunSettings, info: ImplementationInfo, what: str) -> str:
    """Save a case the search did not save itself (the probe's, a crash's), named like the runner's
    minimal cases, with ``what`` it shows; "" when there is nowhere to save it."""
    if not settings.case_dir:
        return ""
    return str(case.save(settings.case_dir / case_file_name(info.name, case, what)))


def run_unit(subject: Any, oracles: Sequence[Any], dtype: str, settings: RunSettings,
             progress: Callable[[int], None] | None = None, *, apart: bool = False) -> tuple[list[Record], list[str]]:
    """Probe, Hypothesis run, re-run of the minimal failure: records and notes for one dtype.

    ``apart``: the unit holds some of the certification's oracles only (a parallel or split run, one
    search per unit), so its notes name them.

    Never raises for anything the implementation does: a crash or hang ends the unit with records
    (merged with what the search had found before it), and a failure of the harness itself becomes
    error records that say so.
    """
    info = subject.info
    inner, oracles = restricted(subject, oracles)
    guard = _Guard(inner)
    notes: list[str] = []
    unchecked = dict(info.limits.unchecked)
    seen = [0]

    def count(n: int) -> None:
        seen[0] = n
        if progress:
            progress(n)

    def finish(records: list[Record]) -> tuple[list[Record], list[str]]:
        if unchecked:
            mark_unchecked(records, unchecked)
        if guard.backward_stopped is not None:
            for r in records:
                if r.status == "error" and r.direction == "backward":
                    r.add_note(f"the backward raised the same error on {REPEATED_ERRORS} calls in a row, so the "
                               f"unit stopped calling it; the forward was still checked on every case")
        for r in records:
            if r.case_file:  # one way to write the command, whoever saved the case
                r.replay = replay_command(r.case_file, settings.replay_target, r.oracle)
        return records, sorted(set(notes))

    # 1. The probe: A, B, A.
    spec_a = _probe_spec(info, dtype, settings.seed)
    case_a, case_b = build_case(spec_a), build_case(spec_a.replace(seed=(spec_a.seed + 1) % 2**32))
    probe: list[Record] = []
    try:
        first = guard.execute(case_a, backward=info.has_backward)
        guard.execute(case_b, backward=info.has_backward)
        again = guard.execute(case_a, backward=info.has_backward)
        for oracle in oracles:
            if oracle.unsupported_reason(info.variant, dtype) or structure_reason(oracle, info.variant, dtype, case_a):
                continue
            base = dict(implementation=info.name, oracle=oracle.name, variant=info.variant, dtype=dtype)
            for rec in disagreement(first, again, case_a, base):
                if rec.quantity in unchecked:
                    continue
                if rec.status == "pass":
                    notes.append(f"{info.name} ({dtype}): {rec.quantity}: {rec.reason}")
                    continue
                probe.append(rec)
    except _Fatal:
        return finish(_fatal_records(guard, oracles, settings, 1))
    except Exception as exc:  # the harness's own failure: reported, never a traceback instead of a report
        return finish(internal_error(info, oracles, dtype, exc, 1))
    if probe:
        case_file = _save_case(case_a, settings, info, "nondeterministic")
        for rec in probe:
            rec.case = case_a.info()
            rec.case_file = case_file

    # 2. Hypothesis.
    stats: dict[str, Any] = {}
    try:
        records = run_checks(guard, oracles, dtype=dtype, run=settings, progress=count, stats=stats)
        checked = any(not o.unsupported_reason(info.variant, dtype) for o in oracles)  # cases compared at all
        shown = (drawable_features(info.variant, info.structures, max_H=settings.max_H) if info.configurable
                 else info.structure.features())
        if checked and shown:  # the cases by the structure features it computes, where it computes any
            notes.append(structure_note(info.name, dtype, stats,
                                        against=[o.name for o in oracles] if apart else None, shown=shown))
        if (stats.get("widened") or {}).get("cases"):
            notes.append(widened_note(info.name, dtype, stats))
    except Exception as exc:
        # What the searches before this one found is still true (run_checks hands it over).
        partial = list(getattr(exc, "partial_records", None) or [])
        if guard.fatal is not None:
            stopped = _fatal_records(guard, oracles, settings, seen[0])
        else:
            stopped = internal_error(info, oracles, dtype, exc, seen[0])
        records = merge_after_stop(partial, stopped)
    # 3. The minimal failing case, twice more.
    failing = next((r for r in records if not r.ok and r.case_file), None)
    if failing is not None and guard.fatal is None:
        try:
            case = load_case(failing.case_file)
            one = guard.execute(case, backward=info.has_backward)
            two = guard.execute(case, backward=info.has_backward)
            base = dict(implementation=info.name, oracle=failing.oracle, variant=info.variant, dtype=dtype)
            differ = [r for r in disagreement(one, two, case, base) if r.status == "contract"]
            if differ:
                names = ", ".join(r.quantity for r in differ)
                note = (f"this case gave different results when run again ({names} differ): the "
                        f"implementation is nondeterministic or keeps state between calls")
                for r in records:
                    if not r.ok:
                        r.add_note(note)
        except Exception:  # noqa: BLE001 - only a note is lost; the records stand
            pass
    # Merge the probe's contract records.
    by_key = {r.key: i for i, r in enumerate(records)}
    for rec in probe:
        rec.examples = seen[0]
        i = by_key.get(rec.key)
        if i is None:
            records.append(rec)
        elif status_rank(rec.status) < status_rank(records[i].status):
            old = records[i]
            if old.status == "fail":
                rec.reason += f" (the comparison with {old.oracle} also failed on its own minimal case)"
            records[i] = rec
    return finish(records)


class StructureNote(str):
    """A structure note (:func:`structure_note`) that keeps its numbers, so that the notes of one
    implementation and dtype from several searches (the units of a parallel run, one per oracle family)
    merge into one line (:func:`merge_search_notes`) instead of one line each."""

    name: str
    dtype: str
    cases: int
    features: dict[str, int]
    shown: tuple[str, ...]


class WidenedNote(str):
    """A :func:`widened_note` that keeps its numbers, to be summed like a :class:`StructureNote`."""

    name: str
    dtype: str
    cases: int
    widened: int
    factor: float


def widened_note(name: str, dtype: str, stats: Mapping[str, Any]) -> str:
    """The line a run's summary shows when some float32 cases passed only with their tolerance widened by
    the case's measured amplification of rounding (harness.conditioning): how many, of how many, and the
    largest factor, so that a reader sees how much of a certification rests on the widening."""
    widened = stats.get("widened") or {}
    n, cases, factor = int(widened.get("cases", 0)), int(stats.get("cases", 0)), float(widened.get("largest factor", 1))
    note = WidenedNote(f"{name} ({dtype}): {n} of {cases} cases passed with the tolerance widened (up to x "
                       f"{factor:.3g}) by the case's amplification of float32 rounding: the built-in LSTM, correct, "
                       f"errs past the table's tolerance on them too")
    note.name, note.dtype, note.cases, note.widened, note.factor = name, dtype, cases, n, factor
    return note


def merge_search_notes(notes: Sequence[str]) -> list[str]:
    """``notes`` with the structure notes of one implementation and dtype from several searches summed
    into one (``loop (float64): 300 cases in 5 searches by layer structure: ...``), and their widened
    notes likewise."""
    groups: dict[tuple[str, str], list[StructureNote]] = {}
    widened: dict[tuple[str, str], list[WidenedNote]] = {}
    for note in notes:
        if isinstance(note, StructureNote):
            groups.setdefault((note.name, note.dtype), []).append(note)
        elif isinstance(note, WidenedNote):
            widened.setdefault((note.name, note.dtype), []).append(note)
    out = [n for n in notes if not isinstance(n, (StructureNote, WidenedNote))]
    for (name, dtype), some in widened.items():
        out.append(widened_note(name, dtype, {"cases": sum(n.cases for n in some), "widened": {
            "cases": sum(n.widened for n in some), "largest factor": max(n.factor for n in some)}}))
    for (name, dtype), group in groups.items():
        if len(group) == 1:
            out.append(str(group[0]))
            continue
        features = {f: sum(n.features.get(f, 0) for n in group) for f in (*FEATURES, UNSORTED_LENGTHS)}
        cases = sum(n.cases for n in group)
        shown = [f for f in FEATURES if any(f in n.shown for n in group)]
        out.append(structure_note(name, dtype, {"cases": cases, "features": features}, shown=shown).replace(
            " cases by layer structure", f" cases in {len(group)} searches by layer structure", 1))
    return out


def structure_note(name: str, dtype: str, stats: Mapping[str, Any], *, against: Sequence[str] | None = None,
                   shown: Collection[str] = FEATURES) -> str:
    """The line a run's summary shows of the structures checked: ``loop (float64): 60 cases by layer
    structure: 7 stacked, 8 bidirectional, ...`` (cases per feature of harness.structure.FEATURES, those in
    ``shown``: the ones the implementation computes and its variant defines, so that a count of 0 means a
    feature it computes went unchecked); ``against``: the oracles of a search that had only some of them
    (``loop (float64, search vs jax-composite): ...``), since each such search draws its own cases."""
    features = stats.get("features") or {}
    words = {"layers": "stacked", "bidirectional": "bidirectional", "lengths": "with lengths",
             "proj": "projected", "cifg": "CIFG", "clip": "clipped"}
    unsorted = f" ({features.get(UNSORTED_LENGTHS, 0)} unsorted)"  # of those with lengths
    counts = ", ".join(f"{features.get(f, 0)} {words[f]}" + (unsorted if f == "lengths" else "")
                       for f in FEATURES if f in shown)
    which = f"{dtype}, search vs {', '.join(against)}" if against else dtype
    note = StructureNote(f"{name} ({which}): {stats.get('cases', 0)} cases by layer structure: {counts}")
    note.name, note.dtype, note.cases = name, dtype, int(stats.get("cases", 0))
    note.features = {f: int(features.get(f, 0)) for f in (*FEATURES, UNSORTED_LENGTHS)}
    note.shown = tuple(f for f in FEATURES if f in shown)
    return note


def _fatal_records(guard: _Guard, oracles: Sequence[Any], settings: RunSettings, examples: int) -> list[Record]:
    assert guard.fatal is not None
    case, execution = guard.fatal
    info = guard.info
    records = check_case(StoredSubject(info, execution), oracles, case)
    failure = getattr(execution, "failure", "")
    case_file = _save_case(case, settings, info, failure if failure in ("crash", "timeout") else "error")
    for r in records:
        r.examples = max(1, examples)
        if not r.ok:
            r.case_file = case_file
            r.add_note(guard.fatal_note)
    return records


def internal_error(info: ImplementationInfo, oracles: Sequence[Any], dtype: str, exc: BaseException,
                    examples: int) -> list[Record]:
    import traceback

    reason = f"the harness itself failed while checking: {type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    out = []
    for oracle in oracles:
        for direction in DIRECTIONS:
            for q in quantities(info.variant, direction, None if info.configurable else info.structure):
                out.append(Record(implementation=info.name, oracle=oracle.name, variant=info.variant, dtype=dtype,
                                  direction=direction, quantity=q, status="error", reason=reason, traceback=tb,
                                  examples=examples))
    return out


