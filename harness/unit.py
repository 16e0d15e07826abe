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

Adapters (:mod:`harness.adapt`) may declare *limits*: an implementation with no initial cell state
is checked with c0 = 0, and the quantities it cannot produce (dc0, or c_T) are reported as skipped
with the reason, never compared against placeholders.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.cases import Case, CaseSpec, build_case, load_case
from harness.compare import Record, compare_arrays, render_message, tolerance
from harness.contract import ImplementationInfo, quantity_specs
from harness.runner import (
    FORWARD_QUANTITIES,
    RunSettings,
    _case_info,
    _case_tag,
    _keep_worst,
    _key,
    _slug,
    check_case,
    quantities,
    run_checks,
)
from harness.subject import Execution
from harness.summary import STATUS_ORDER

__all__ = ["run_unit", "UnitSettings", "RestrictedSubject", "RestrictedOracle", "StoredSubject", "disagreement",
           "limits_of", "mark_unchecked", "internal_error"]


# --------------------------------------------------------------------------------------------------
# Limits declared by adapters: quantities an implementation cannot produce


def limits_of(subject: Any) -> dict[str, Any]:
    """What an adapter declared it cannot produce (see :mod:`harness.adapt`); read in the worker when
    the implementation is isolated (``IsolatedSubject.limits``), else off the object itself."""
    limits = getattr(subject, "limits", None)
    if limits is None:
        limits = getattr(getattr(subject, "impl", None), "lstm_harness_limits", None)
    return dict(limits) if isinstance(limits, dict) else {}


def _restrict_case(case: Case, zero: Sequence[str]) -> Case:
    if not zero:
        return case
    changes = {name: np.zeros_like(getattr(case, name)) for name in zero}
    return dataclasses.replace(case, **changes)


class RestrictedSubject:
    def __init__(self, subject: Any, limits: dict[str, Any]):
        self.subject = subject
        self.info = subject.info
        self.zero = tuple(limits.get("zero", ()))
        self.unchecked = dict(limits.get("unchecked", {}))

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
    def __init__(self, oracle: Any, limits: dict[str, Any]):
        self._oracle = oracle
        self.zero = tuple(limits.get("zero", ()))
        self.unchecked = dict(limits.get("unchecked", {}))

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


def mark_unchecked(records: list[Record], unchecked: dict[str, str]) -> None:
    for r in records:
        if r.quantity in unchecked:
            fresh = Record(implementation=r.implementation, oracle=r.oracle, variant=r.variant, dtype=r.dtype,
                           direction=r.direction, quantity=r.quantity, status="skip",
                           reason=f"not compared: {unchecked[r.quantity]}", case=r.case, examples=r.examples)
            fresh.message = render_message(fresh)
            r.__dict__.update(fresh.__dict__)


# --------------------------------------------------------------------------------------------------
# Stopping a unit after a hang or a crash


class _Fatal(Exception):
    """Raised through Hypothesis to end a unit after a WorkerFailure."""


class _Guard:
    """Passes executions through until one is a WorkerFailure; from then on every call raises at once."""

    def __init__(self, subject: Any):
        self.subject = subject
        self.info = subject.info
        self.fatal: tuple[Case, Execution] | None = None

    def execute(self, case: Case, *, backward: bool) -> Execution:
        from harness.isolation import WorkerFailure

        if self.fatal is not None:
            raise _Fatal()
        out = self.subject.execute(case, backward=backward)
        if isinstance(out, WorkerFailure):
            self.fatal = (case, out)
            raise _Fatal()
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
    # Distinct T, B, D, H so that a transposed axis cannot pass unnoticed.
    return CaseSpec(variant=info.variant, dtype=dtype, T=3, B=2, D=4, H=3, seed=(seed or 0) % 2**32,
                    weight_scale="unit", state="random", ln_eps=info.ln_eps)


def _execution_arrays(ex: Execution) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if ex.forward is not None:
        out.update(zip(FORWARD_QUANTITIES, ex.forward))
    if ex.gradients is not None:
        out.update({"d" + k: v for k, v in ex.gradients.items()})
    return out


def disagreement(first: Execution, second: Execution, case: Case, base: dict[str, Any]) -> list[Record]:
    """Records (status "contract") for every quantity two runs of the same case disagree on."""
    specs = quantity_specs(case.variant)
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
            rec.message = render_message(rec)
            out.append(rec)
    for q in a:
        if q not in b or q not in specs or a[q].shape != b[q].shape:
            continue
        if np.array_equal(a[q], b[q], equal_nan=True):
            continue
        direction = "forward" if q in FORWARD_QUANTITIES else "backward"
        kind = "values" if direction == "forward" else "gradients"
        rec = compare_arrays(b[q], a[q], spec=specs[q], H=case.H, tol=tolerance(case.dtype, kind),
                             tolerance_dtype=case.dtype, base={**base, "direction": direction, "quantity": q})
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
        rec.message = render_message(rec)
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------------
# One unit: one dtype against some oracles


@dataclass
class UnitSettings:
    profile: str = "ci"
    max_examples: int | None = None
    seed: int | None = None
    case_dir: str | None = None
    replay_target: str | None = None

    def run_settings(self) -> RunSettings:
        return RunSettings(profile=self.profile, max_examples=self.max_examples, seed=self.seed,
                           case_dir=Path(self.case_dir) if self.case_dir else None,
                           replay_target=self.replay_target)


def _save_case(case: Case, settings: UnitSettings, info: ImplementationInfo, what: str) -> str:
    """Save a case the search did not save itself (the probe's, a crash's), named like the runner's
    minimal cases, with ``what`` it shows; "" when there is nowhere to save it."""
    if not settings.case_dir:
        return ""
    path = Path(settings.case_dir) / f"{_slug(info.name)}-{_case_tag(case)}-{what}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    case.save(path)
    return str(path)


#: What the replay commands name when no TARGET string loads the implementation (an object defined
#: in a script, or with state of its own).
NO_TARGET = "MODULE:ATTRIBUTE"


def _replay_command(case_file: str, settings: UnitSettings, oracle: str) -> str:
    if not case_file:
        return ""
    command = (f"lstm-harness replay {shlex.quote(case_file)} {settings.replay_target or NO_TARGET} "
               f"--oracle {shlex.quote(oracle)}")
    if settings.replay_target:
        return command
    return f"save your implementation in a module to replay: {command}"


def _rank(status: str) -> int:
    return STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)


def run_unit(subject: Any, oracles: Sequence[Any], dtype: str, settings: UnitSettings,
             progress: Callable[[int], None] | None = None) -> tuple[list[Record], list[str]]:
    """Probe, Hypothesis run, re-run of the minimal failure: records and notes for one dtype.

    Never raises for anything the implementation does: a crash or hang ends the unit with records
    (merged with what the search had found before it), and a failure of the harness itself becomes
    error records that say so.
    """
    limits = limits_of(subject)
    info = subject.info
    inner: Any = RestrictedSubject(subject, limits) if limits else subject
    oracles = [RestrictedOracle(o, limits) for o in oracles] if limits else list(oracles)
    guard = _Guard(inner)
    notes: list[str] = []
    unchecked = dict(limits.get("unchecked", {}))
    seen = [0]

    def count(n: int) -> None:
        seen[0] = n
        if progress:
            progress(n)

    def finish(records: list[Record]) -> tuple[list[Record], list[str]]:
        if unchecked:
            mark_unchecked(records, unchecked)
        for r in records:
            if r.case_file:  # one way to write the command, whoever saved the case
                r.replay = _replay_command(r.case_file, settings, r.oracle)
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
            if oracle.supports(info.variant, dtype):
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
            rec.case = _case_info(case_a)
            rec.case_file = case_file

    # 2. Hypothesis.
    try:
        records = run_checks(guard, oracles, dtype=dtype, run=settings.run_settings(), progress=count)
    except Exception as exc:
        # What the searches before this one found is still true (run_checks hands it over).
        partial = list(getattr(exc, "partial_records", None) or [])
        if guard.fatal is not None:
            stopped = _fatal_records(guard, oracles, settings, seen[0])
        else:
            stopped = internal_error(info, oracles, dtype, exc, seen[0])
        records = _merge_partial(partial, stopped)
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
                note = (f"Note: this case gave different results when run again ({names} differ): the "
                        f"implementation is nondeterministic or keeps state between calls")
                for r in records:
                    if not r.ok and note not in r.reason:
                        r.reason = (r.reason + "; " if r.reason else "") + note
                        r.message = render_message(r) + "\n" + note
        except Exception:  # noqa: BLE001 - only a note is lost; the records stand
            pass
    # Merge the probe's contract records.
    by_key = {_key(r): i for i, r in enumerate(records)}
    for rec in probe:
        rec.examples = seen[0]
        i = by_key.get(_key(rec))
        if i is None:
            records.append(rec)
        elif _rank(rec.status) < _rank(records[i].status):
            old = records[i]
            if old.status == "fail":
                rec.reason += f" (the comparison with {old.oracle} also failed on its own minimal case)"
                rec.message = render_message(rec)
            records[i] = rec
    return finish(records)


def _merge_partial(partial: Sequence[Record], stopped: Sequence[Record]) -> list[Record]:
    """One record per quantity after a search was stopped (a crash, a hang, the harness's own error).

    ``partial`` is what the searches before it found: a discrepancy found there (with its own
    minimal case) stands; for every other quantity the record of what stopped the search does,
    unless both passed, when the worse of the two does.
    """
    found = {_key(r): r for r in partial}
    out: dict[Any, Record] = {}
    for r in stopped:
        earlier = found.pop(_key(r), None)
        if earlier is not None and not earlier.ok:
            out[_key(r)] = earlier
        elif earlier is not None and r.status == "pass" and earlier.status == "pass":
            worst: dict[Any, Record] = {_key(r): r}
            _keep_worst(worst, earlier)
            out[_key(r)] = worst[_key(r)]
        else:
            out[_key(r)] = r
    out.update({k: r for k, r in found.items() if not r.ok})
    examples = max((r.examples for r in out.values()), default=0)
    for r in out.values():
        r.examples = examples
    return list(out.values())


def _fatal_records(guard: _Guard, oracles: Sequence[Any], settings: UnitSettings, examples: int) -> list[Record]:
    assert guard.fatal is not None
    case, execution = guard.fatal
    info = guard.info
    records = check_case(StoredSubject(info, execution), oracles, case)
    case_file = _save_case(case, settings, info, "crash" if getattr(execution, "failure", "") == "crash"
                           else "timeout")
    note = ("This case was not shrunk: every attempt would cost a worker restart or a whole timeout; it is the "
            "first case on which it happened.")
    for r in records:
        r.examples = max(1, examples)
        if not r.ok:
            r.case_file = case_file
            if note not in r.reason:
                r.reason = f"{r.reason}\n{note}"
                r.message = render_message(r)
    return records


def internal_error(info: ImplementationInfo, oracles: Sequence[Any], dtype: str, exc: BaseException,
                    examples: int) -> list[Record]:
    import traceback

    reason = f"the harness itself failed while checking: {type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    out = []
    for oracle in oracles:
        for direction in ("forward", "backward"):
            for q in quantities(info.variant, direction):
                rec = Record(implementation=info.name, oracle=oracle.name, variant=info.variant, dtype=dtype,
                             direction=direction, quantity=q, status="error", reason=reason, traceback=tb,
                             examples=examples)
                rec.message = render_message(rec)
                out.append(rec)
    return out


