"""Certifying one implementation: :func:`certify` (public, also what ``lstm-harness certify`` runs) and
:func:`replay` (one saved case, exactly as it was checked).

A certification is a set of *units*, one per dtype (or per dtype and oracle when run in parallel).
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
import os
import pickle
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

import numpy as np

from harness.cases import PROFILES, Case, CaseSpec, build_case, load_case
from harness.compare import Record, compare_arrays, render_message, tolerance
from harness.contract import DEFAULT_DTYPES, VARIANTS, ContractError, ImplementationInfo, quantity_specs, validate
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
from harness.subject import Execution, InProcessSubject
from harness.summary import STATUS_ORDER, details, summary_table, unit_outcome, verdict

__all__ = ["certify", "replay", "CertifyResult", "ReplayResult", "InvalidArgument", "open_subject",
           "select_oracles", "write_reports", "Progress"]


class InvalidArgument(ValueError):
    """A bad argument to :func:`certify` or :func:`replay` (found before any check runs); the
    command line turns it into exit code 2. Any other error comes from the run itself."""


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class CertifyResult:
    """What :func:`certify` found: the records (the same the reports are made from) and the verdict."""

    records: list[Record]
    verdict: str  # "certified", "discrepancies" or "error"
    implementation: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None
    report_path: Path | None = None  # report.json, when report_dir was given
    report_files: dict[str, Path] = field(default_factory=dict)  # "json", "html", "junit"
    report_problems: list[str] = field(default_factory=list)  # why a file could not be written

    @property
    def ok(self) -> bool:
        return self.verdict == "certified"

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if not r.ok]

    def summary(self) -> str:
        return summary_table(self.records, per_quantity=True)

    def details(self) -> str:
        return details(self.records)

    def assert_certified(self) -> None:
        """Raise ``AssertionError`` with the summary and every discrepancy unless certified."""
        if not self.ok:
            raise AssertionError(
                f"{self.implementation.get('name')} is not certified (verdict: {self.verdict})\n\n"
                f"{self.summary()}\n\n{self.details()}"
            )

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class ReplayResult:
    records: list[Record]
    case: Case
    verdict: str

    @property
    def ok(self) -> bool:
        """The case passes: something was compared and nothing failed (all skips is not a pass)."""
        return self.verdict == "certified"


# --------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A progress display on stderr, so that a long run does not look hung.

    On a terminal one status line is rewritten (units running, cases each, seconds); elsewhere (CI
    logs) a line per finished unit, and a "still checking" line at most every ``heartbeat`` seconds.
    """

    def __init__(self, label: str, *, stream: Any = None, enabled: bool = True, heartbeat: float = 30.0):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.heartbeat = heartbeat
        self.start_time = time.monotonic()
        self.running: dict[str, tuple[int, float]] = {}
        self._last_draw = 0.0
        self._last_beat = time.monotonic()

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def begin(self, unit: str) -> None:
        self.running[unit] = (0, time.monotonic())
        self._draw(force=True)

    def update(self, unit: str, cases: int) -> None:
        started = self.running.get(unit, (0, time.monotonic()))[1]
        self.running[unit] = (cases, started)
        self._draw()

    def end(self, unit: str, cases: int, outcome: str) -> None:
        started = self.running.pop(unit, (0, time.monotonic()))[1]
        line = f"  {self.label} {unit}: {cases} cases in {time.monotonic() - started:.1f}s, {outcome}"
        self._write(("\r\033[K" if self.tty else "") + line + "\n")
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.running:
            return
        parts = ", ".join(f"{u} {n} cases" for u, (n, _) in self.running.items())
        if self.tty:
            if force or now - self._last_draw > 0.2:
                self._last_draw = now
                self._write(f"\r\033[K  {self.label}: {parts} ({now - self.start_time:.0f}s)")
        elif now - self._last_beat > self.heartbeat:
            self._last_beat = now
            self._write(f"  {self.label}: still checking: {parts} ({now - self.start_time:.0f}s)\n")

    def close(self) -> None:
        if self.tty and self.running:
            self._write("\r\033[K")


# --------------------------------------------------------------------------------------------------
# Opening the implementation


def _limits_of(subject: Any) -> dict[str, Any]:
    """What an adapter declared it cannot produce (see :mod:`harness.adapt`); read in the worker when
    the implementation is isolated (``IsolatedSubject.limits``), else off the object itself."""
    limits = getattr(subject, "limits", None)
    if limits is None:
        limits = getattr(getattr(subject, "impl", None), "lstm_harness_limits", None)
    return dict(limits) if isinstance(limits, dict) else {}


def open_subject(impl: Any, *, variant: str | None = None, isolate: bool = False,
                 timeout: float | None = None, memory_limit: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A Subject for ``impl`` (an object or a TARGET string) and a description of what was loaded.

    Raises :class:`harness.plugins.LoadError` or :class:`harness.contract.ContractError` when the
    target cannot be used; ``ValueError`` for bad arguments.
    """
    from harness.plugins import LoadError, load_implementation

    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)} or None, got {variant!r}")
    if isolate:  # the timeout is checked by IsolatedSubject
        from harness.isolation import IsolatedSubject, WorkerLoadError

        guessed = impl if isinstance(impl, str) else _guess_target(impl)
        source = _portable(impl, guessed) or impl  # an object the worker cannot unpickle goes by its target
        try:
            subject = IsolatedSubject(source, variant=variant, timeout=timeout, memory_limit=memory_limit)
        except WorkerLoadError as exc:
            if exc.kind == "contract":
                raise ContractError(exc.problems, subject=exc.subject) from None
            raise LoadError(str(exc)) from None
        described = {"target": guessed, "loaded": subject.target, "isolated": True}
        return subject, described
    if timeout is not None:
        raise ValueError("timeout: a per-call timeout needs the implementation in a worker process; "
                         "pass isolate=True as well (or no timeout)")
    if memory_limit is not None:
        raise ValueError("memory_limit: a memory cap needs the implementation in a worker process; "
                         "pass isolate=True as well (or no memory_limit)")
    if isinstance(impl, str):
        obj, info, target = load_implementation(impl, variant=variant)
        described = {"target": impl, "loaded": target.to_dict(), "isolated": False}
    else:
        obj, info = impl, validate(impl, variant=variant)
        described = {"target": _guess_target(impl), "loaded": None, "isolated": False}
    return InProcessSubject(obj, info), described


def _guess_target(obj: Any) -> str | None:
    """A TARGET string that loads the same implementation again, if there is one: a module-level name
    bound to the object, else its class when that takes no arguments and the object has no state of
    its own (so that a fresh instance is the same implementation)."""
    import inspect

    cls = obj if inspect.isclass(obj) else type(obj)
    module = sys.modules.get(getattr(cls, "__module__", "") or "")
    if module is None or module.__name__ == "__main__":
        return None
    if module.__name__.startswith("_lstm_harness_target_") and getattr(module, "__file__", None):
        prefix = module.__file__
    else:
        prefix = module.__name__
    for name, value in vars(module).items():
        if value is obj and not name.startswith("_"):
            return f"{prefix}:{name}"
    if getattr(module, cls.__qualname__, None) is cls and (obj is cls or not getattr(obj, "__dict__", None)):
        try:
            needs = [p for p in inspect.signature(cls).parameters.values()
                     if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        except (TypeError, ValueError):
            needs = []
        if not needs:
            return f"{prefix}:{cls.__qualname__}"
    return None


def select_oracles(oracles: Sequence[Any] | None, variant: str) -> list[Any]:
    """Oracle objects from names or objects; default: every available oracle covering ``variant``."""
    from harness import registry

    if oracles is None:
        return [o for o in registry.oracles() if o.availability().available and variant in o.variants]
    if isinstance(oracles, str):
        oracles = [oracles]
    known = {o.name: o for o in registry.oracles()}
    out = []
    for item in oracles:
        if isinstance(item, str):
            if item not in known:
                raise ValueError(f"oracles: expected names from {', '.join(known)} (or oracle objects), "
                                 f"got {item!r}")
            out.append(known[item])
        elif hasattr(item, "reference") and hasattr(item, "supports"):
            out.append(item)
        else:
            raise ValueError(f"oracles: expected oracle names or objects, got {type(item).__name__}")
    return out


# --------------------------------------------------------------------------------------------------
# Limits declared by adapters: quantities an implementation cannot produce


def _restrict_case(case: Case, zero: Sequence[str]) -> Case:
    if not zero:
        return case
    changes = {name: np.zeros_like(getattr(case, name)) for name in zero}
    return dataclasses.replace(case, **changes)


class _RestrictedSubject:
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


class _RestrictedOracle:
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


def _mark_unchecked(records: list[Record], unchecked: dict[str, str]) -> None:
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


class _Stored:
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


def _disagreement(first: Execution, second: Execution, case: Case, base: dict[str, Any]) -> list[Record]:
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
class _UnitSettings:
    profile: str = "ci"
    max_examples: int | None = None
    seed: int | None = None
    case_dir: str | None = None
    replay_target: str | None = None

    def run_settings(self) -> RunSettings:
        return RunSettings(profile=self.profile, max_examples=self.max_examples, seed=self.seed,
                           case_dir=Path(self.case_dir) if self.case_dir else None,
                           replay_target=self.replay_target)


def _save_case(case: Case, settings: _UnitSettings, info: ImplementationInfo, what: str) -> str:
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


def _replay_command(case_file: str, settings: _UnitSettings, oracle: str) -> str:
    if not case_file:
        return ""
    command = (f"lstm-harness replay {shlex.quote(case_file)} {settings.replay_target or NO_TARGET} "
               f"--oracle {shlex.quote(oracle)}")
    if settings.replay_target:
        return command
    return f"save your implementation in a module to replay: {command}"


def _rank(status: str) -> int:
    return STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)


def run_unit(subject: Any, oracles: Sequence[Any], dtype: str, settings: _UnitSettings,
             progress: Callable[[int], None] | None = None) -> tuple[list[Record], list[str]]:
    """Probe, Hypothesis run, re-run of the minimal failure: records and notes for one dtype.

    Never raises for anything the implementation does: a crash or hang ends the unit with records
    (merged with what the search had found before it), and a failure of the harness itself becomes
    error records that say so.
    """
    limits = _limits_of(subject)
    info = subject.info
    inner: Any = _RestrictedSubject(subject, limits) if limits else subject
    oracles = [_RestrictedOracle(o, limits) for o in oracles] if limits else list(oracles)
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
            _mark_unchecked(records, unchecked)
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
            for rec in _disagreement(first, again, case_a, base):
                if rec.quantity in unchecked:
                    continue
                if rec.status == "pass":
                    notes.append(f"{info.name} ({dtype}): {rec.quantity}: {rec.reason}")
                    continue
                probe.append(rec)
    except _Fatal:
        return finish(_fatal_records(guard, oracles, settings, 1))
    except Exception as exc:  # the harness's own failure: reported, never a traceback instead of a report
        return finish(_internal_error(info, oracles, dtype, exc, 1))
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
            stopped = _internal_error(info, oracles, dtype, exc, seen[0])
        records = _merge_partial(partial, stopped)
    # 3. The minimal failing case, twice more.
    failing = next((r for r in records if not r.ok and r.case_file), None)
    if failing is not None and guard.fatal is None:
        try:
            case = load_case(failing.case_file)
            one = guard.execute(case, backward=info.has_backward)
            two = guard.execute(case, backward=info.has_backward)
            base = dict(implementation=info.name, oracle=failing.oracle, variant=info.variant, dtype=dtype)
            differ = [r for r in _disagreement(one, two, case, base) if r.status == "contract"]
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


def _fatal_records(guard: _Guard, oracles: Sequence[Any], settings: _UnitSettings, examples: int) -> list[Record]:
    assert guard.fatal is not None
    case, execution = guard.fatal
    info = guard.info
    records = check_case(_Stored(info, execution), oracles, case)
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


def _internal_error(info: ImplementationInfo, oracles: Sequence[Any], dtype: str, exc: BaseException,
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


# --------------------------------------------------------------------------------------------------
# Running units, here or in parallel child processes


def _order(records: list[Record], oracles: Sequence[Any], variant: str) -> list[Record]:
    oorder = {o.name: i for i, o in enumerate(oracles)}
    dorder = {d: i for i, d in enumerate(DEFAULT_DTYPES)}
    qorder = {q: i for d in ("forward", "backward") for i, q in enumerate(quantities(variant, d))}
    return sorted(records, key=lambda r: (r.implementation, dorder.get(r.dtype, 9), oorder.get(r.oracle, 99),
                                          r.direction != "forward", qorder.get(r.quantity, 99)))


def _oracle_payload(oracle: Any) -> Any:
    """A registry oracle travels by name (the child makes its own); any other one pickled."""
    from harness import registry

    for known in registry.oracles():
        if known.name == oracle.name and type(known) is type(oracle):
            return ("name", oracle.name)
    return ("pickled", pickle.dumps(oracle))


def _oracle_portable(oracle: Any) -> bool:
    """Whether a parallel child process can make the same oracle: a registry one by its name, any
    other one only when it pickles by reference to an importable module (not ``__main__``)."""
    try:
        kind, _ = _oracle_payload(oracle)
    except Exception:
        return False
    return kind == "name" or _portable(oracle, None) is not None


def _oracle_from_payload(payload: Any) -> Any:
    kind, value = payload
    if kind == "name":
        from harness.registry import oracle_by_name

        return oracle_by_name(value)
    return pickle.loads(value)


def _unit_child(conn: Any, payload: dict[str, Any]) -> None:
    """Entry point of a parallel child: run the units it is sent, one after another, send the records.

    Subjects are opened on first use and kept, so a child that is sent several units of the same
    implementation loads it once.
    """
    from harness.plugins import LoadError

    oracles = {name: _oracle_from_payload(p) for name, p in payload["oracles"].items()}
    subjects: dict[bytes, Any] = {}
    conn.send(("ready",))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, unit_id, opening, dtype, names, settings = message
            key = pickle.dumps(opening)
            if key not in subjects:
                try:
                    subjects[key], _ = open_subject(opening["impl"], variant=opening["variant"],
                                                    isolate=opening["isolate"], timeout=opening["timeout"],
                                                    memory_limit=opening["memory_limit"])
                except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
                    conn.send(("failed", unit_id, str(exc) if isinstance(exc, (LoadError, ContractError))
                               else f"{type(exc).__name__}: {exc}"))
                    continue

            def progress(n: int, unit_id: int = unit_id) -> None:
                conn.send(("progress", unit_id, n))

            records, notes = run_unit(subjects[key], [oracles[n] for n in names], dtype,
                                      _UnitSettings(**settings), progress)
            conn.send(("done", unit_id, records, notes))
    finally:
        for subject in subjects.values():
            close = getattr(subject, "close", None)
            if close:
                close()


@dataclass
class _Job:
    """One implementation to certify, with everything decided before any check runs."""

    subject: Any
    described: dict[str, Any]
    info: ImplementationInfo
    dtypes: list[str]
    oracles: list[Any]
    settings: _UnitSettings
    opening: dict[str, Any]  # how a parallel child opens it: impl (TARGET or object), variant, isolate, ...
    parallel: bool  # whether the implementation can be sent to another process

    def close(self) -> None:
        close = getattr(self.subject, "close", None)
        if close:
            close()


def _prepare(impl: Any, *, variant: str | None, dtypes: Sequence[str] | None, oracles: Sequence[Any] | None,
             max_examples: int | None, profile: str, seed: int | None, timeout: float | None, isolate: bool,
             report_dir: Any, memory_limit: int | None) -> _Job:
    if dtypes is not None:
        dtypes = [dtypes] if isinstance(dtypes, str) else list(dtypes)
        bad = [d for d in dtypes if d not in DEFAULT_DTYPES]
        if bad or not dtypes:
            raise ValueError(f"dtypes: expected a non-empty subset of {DEFAULT_DTYPES}, got {dtypes!r}")
    subject, described = open_subject(impl, variant=variant, isolate=isolate, timeout=timeout,
                                      memory_limit=memory_limit)
    try:
        info = subject.info
        chosen = [d for d in info.dtypes if dtypes is None or d in dtypes]
        if dtypes is not None and not chosen:
            raise ValueError(f"dtypes: {info.name} declares {', '.join(info.dtypes)}; none of {dtypes} is "
                             f"among them")
        selected = select_oracles(oracles, info.variant)
    except Exception:
        close = getattr(subject, "close", None)
        if close:
            close()
        raise
    target = described["target"]
    # Every failure gets a saved case and a replay command: beside the report, or in a fresh
    # temporary directory (made only when a case is saved; CertifyResult.notes says where).
    case_dir = (Path(report_dir) / "cases" if report_dir is not None
                else Path(tempfile.gettempdir()) / f"lstm-harness-cases-{os.getpid()}-{time.time_ns():x}")
    settings = _UnitSettings(profile=profile, max_examples=max_examples, seed=seed, case_dir=str(case_dir),
                             replay_target=_replay_target(target, variant, isolate, timeout))
    portable = _portable(impl, target)
    opening = {"impl": portable, "variant": variant, "isolate": isolate, "timeout": timeout,
               "memory_limit": memory_limit}
    return _Job(subject, described, info, chosen, selected, settings, opening, portable is not None)


def _run_jobs(jobs_list: list[_Job], jobs: int, display: Progress) -> list[tuple[list[Record], list[str]]]:
    """Every unit of every job: here, one after another, or spread over ``jobs`` child processes."""
    portable_oracles = all(_oracle_portable(o) for j in jobs_list for o in j.oracles)
    parallel = jobs > 1 and all(j.parallel for j in jobs_list) and portable_oracles
    named = len(jobs_list) > 1
    units: list[tuple[int, str, list[Any], str]] = []  # job index, dtype, oracles, label
    for index, job in enumerate(jobs_list):
        split = parallel and len(job.oracles) > 1
        groups = [[o] for o in job.oracles] if split else [job.oracles]
        for dtype in job.dtypes:
            for group in groups:
                label = (f"{job.info.name} " if named else "") + dtype + (f" vs {group[0].name}" if split else "")
                units.append((index, dtype, group, label))
    results: list[tuple[list[Record], list[str]]] = [([], []) for _ in jobs_list]
    if jobs > 1 and not parallel:
        for job, (_, notes) in zip(jobs_list, results):
            if not job.parallel:
                notes.append("jobs: the implementation object cannot be sent to other processes (pass a TARGET "
                             "string instead); everything was checked in this process")
            stuck = [o.name for o in job.oracles if not _oracle_portable(o)]
            if stuck:
                notes.append(f"jobs: the oracle {', '.join(stuck)} cannot be sent to other processes (define its "
                             f"class in an importable module, not in __main__); everything was checked in this "
                             f"process")
    if parallel and len(units) > 1:
        for job in jobs_list:
            job.close()  # the children open their own
        done = _run_parallel(jobs_list, units, jobs, display)
        for (index, _, _, _), (records, notes) in zip(units, done):
            results[index][0].extend(records)
            results[index][1].extend(notes)
        return results
    for index, dtype, group, label in units:
        job = jobs_list[index]
        display.begin(label)
        records, notes = run_unit(job.subject, group, dtype, job.settings,
                                  lambda n, label=label: display.update(label, n))
        display.end(label, max((r.examples for r in records), default=0), unit_outcome(records))
        results[index][0].extend(records)
        results[index][1].extend(notes)
    return results


#: Parallel child processes that may die one after another, none finishing a unit in between, before
#: the remaining units are given up (reported as errors) instead of starting yet another child.
MAX_CHILD_DEATHS = 3


def _run_parallel(jobs_list: list[_Job], units: list[tuple[int, str, list[Any], str]], jobs: int,
                  display: Progress) -> list[tuple[list[Record], list[str]]]:
    """Hand the units to up to ``jobs`` child processes, each taking the next one when it is done.

    A child that dies costs the unit it was running (error records that say so) and is replaced;
    after :data:`MAX_CHILD_DEATHS` deaths in a row with no unit finished, the units left are given
    up the same way. Raises :class:`harness.plugins.LoadError` when a child cannot load the
    implementation.
    """
    from harness.isolation import ChildProcess, describe_exit
    from harness.plugins import LoadError

    oracles = {o.name: o for job in jobs_list for o in job.oracles}
    payload = {"oracles": {name: _oracle_payload(o) for name, o in oracles.items()}}
    pending = list(range(len(units)))
    done: dict[int, tuple[list[Record], list[str]]] = {}
    counts: dict[int, int] = {}
    busy: dict[Any, int] = {}
    stopped: set[Any] = set()  # children told to stop: their end is not a death
    deaths = 0  # in a row, with no unit finished in between

    def start() -> Any:
        return ChildProcess("harness.api", "_unit_child", payload)

    def assign(child: Any) -> None:
        if not pending:
            stopped.add(child)
            child.conn.send(("stop",))
            return
        unit_id = pending.pop(0)
        index, dtype, group, label = units[unit_id]
        job = jobs_list[index]
        busy[child] = unit_id
        display.begin(label)
        child.conn.send(("run", unit_id, job.opening, dtype, [o.name for o in group],
                         dataclasses.asdict(job.settings)))

    def lose(unit_id: int, why: str) -> None:
        index, dtype, group, label = units[unit_id]
        records = _internal_error(jobs_list[index].info, group, dtype, RuntimeError(why), counts.get(unit_id, 0))
        done[unit_id] = (records, [])
        display.end(label, counts.get(unit_id, 0), "error")

    children = [start() for _ in range(min(jobs, len(units)))]
    alive = list(children)
    try:
        while alive:
            by_conn = {c.conn: c for c in alive}
            for conn in wait_connections(list(by_conn), timeout=1.0):
                child = by_conn[conn]
                try:
                    message = conn.recv()
                except Exception:  # noqa: BLE001 - the end of the child, or a message that cannot be read
                    message = ("died",)
                kind = message[0]
                if kind == "ready":
                    assign(child)
                elif kind == "progress":
                    counts[message[1]] = message[2]
                    display.update(units[message[1]][3], message[2])
                elif kind == "done":
                    deaths = 0
                    unit_id = busy.pop(child)
                    done[unit_id] = (message[2], message[3])
                    display.end(units[unit_id][3], counts.get(unit_id, 0), unit_outcome(message[2]))
                    assign(child)
                elif kind == "failed":
                    raise LoadError(f"a parallel worker process could not load the implementation: {message[2]}\n"
                                    f"It loaded in this process: run with one job (-n 1) to check it here")
                else:
                    alive.remove(child)
                    child.join(1.0)
                    child.kill()
                    if child in stopped:
                        continue
                    deaths += 1
                    why = (f"the parallel worker process died: {describe_exit(child.exitcode)} (what it printed "
                           f"on standard error says why)")
                    if child in busy:
                        lose(busy.pop(child), why)
                    if deaths >= MAX_CHILD_DEATHS:
                        gave_up = (f"{why}; the parallel worker processes died {deaths} times in a row without "
                                   f"finishing a unit, so this unit was not checked: run with one job (jobs=1, "
                                   f"-n 1) to check it in this process")
                        for unit_id in pending + list(busy.values()):
                            lose(unit_id, gave_up)
                        pending.clear()
                        busy.clear()
                        alive.clear()
                        break
                    if pending and len(alive) < min(jobs, len(pending)):
                        children.append(start())
                        alive.append(children[-1])
    finally:
        for child in children:
            child.kill()
    return [done[i] for i in range(len(units))]


# --------------------------------------------------------------------------------------------------
# certify


def _check_settings(profile: str, max_examples: Any, seed: Any, jobs: Any) -> None:
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {sorted(PROFILES)}, got {profile!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples: expected a positive int or None, got {max_examples!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: expected an int or None, got {seed!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")


def certify(
    impl: Any,
    *,
    variant: str | None = None,
    dtypes: Sequence[str] | None = None,
    oracles: Sequence[Any] | None = None,
    max_examples: int | None = None,
    profile: str = "ci",
    seed: int | None = None,
    timeout: float | None = None,
    isolate: bool = False,
    report_dir: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    memory_limit: int | None = None,
    progress: bool | Progress = False,
    junit_xml: str | os.PathLike[str] | None = None,
    write_report: bool = True,
    command: str = "certify",
) -> CertifyResult:
    """Certify one implementation: every check, every declared dtype, every chosen oracle.

    ``impl`` is an implementation object or a TARGET string (``package.module:attribute``,
    ``path/to/file.py:attribute`` or an entry-point name). ``variant`` overrides the declared one;
    ``dtypes`` defaults to every dtype the implementation declares; ``oracles`` (names or objects)
    to every available oracle that covers the variant. ``isolate=True`` runs the implementation in
    a worker process (needed for ``timeout``, seconds per call, and ``memory_limit``, bytes), which
    survives crashes and hangs. ``jobs`` > 1 checks each (dtype, oracle) pair in up to ``jobs``
    parallel processes. ``report_dir`` receives ``report.json``, ``index.html`` and the failing cases
    (``cases/*.npz``; only the cases with ``write_report=False``); without it the failing cases go
    to a fresh temporary directory that ``notes`` names, so that every failure can be replayed.
    ``junit_xml`` names a JUnit XML file. ``progress=True`` shows progress on stderr.

    Raises :class:`harness.plugins.LoadError` or :class:`harness.contract.ContractError` when the
    implementation cannot be loaded or does not meet the contract, :class:`InvalidArgument` (a
    ``ValueError``) for bad arguments, all before any check runs. Nothing the implementation does
    while it is checked raises: it becomes records.
    """
    return certify_many([impl], variant=variant, dtypes=dtypes, oracles=oracles, max_examples=max_examples,
                        profile=profile, seed=seed, timeout=timeout, isolate=isolate, report_dir=report_dir,
                        jobs=jobs, memory_limit=memory_limit, progress=progress, junit_xml=junit_xml,
                        write_report=write_report, command=command)[0]


def certify_many(impls: Sequence[Any], *, variant: str | None = None, dtypes: Sequence[str] | None = None,
                 oracles: Sequence[Any] | None = None, max_examples: int | None = None, profile: str = "ci",
                 seed: int | None = None, timeout: float | None = None, isolate: bool = False,
                 report_dir: str | os.PathLike[str] | None = None, jobs: int = 1, memory_limit: int | None = None,
                 progress: bool | Progress = False, junit_xml: str | os.PathLike[str] | None = None,
                 write_report: bool = True, command: str = "certify") -> list[CertifyResult]:
    """:func:`certify` for several implementations at once (what ``lstm-harness run`` does): with
    ``jobs`` > 1 every (implementation, dtype, oracle) unit goes to one shared pool of processes.
    Each result has its own report; ``report_dir`` and ``junit_xml`` are for a single implementation."""
    prepared: list[_Job] = []
    try:
        # Everything that can be wrong with the arguments shows here, before any check runs.
        try:
            _check_settings(profile, max_examples, seed, jobs)
            if len(impls) > 1 and write_report and (report_dir is not None or junit_xml is not None):
                raise ValueError("report_dir: one report per directory; with several implementations pass "
                                 "write_report=False and build the combined report from the results")
            for impl in impls:
                prepared.append(_prepare(impl, variant=variant, dtypes=dtypes, oracles=oracles,
                                         max_examples=max_examples, profile=profile, seed=seed, timeout=timeout,
                                         isolate=isolate, report_dir=report_dir, memory_limit=memory_limit))
        except ValueError as exc:  # InvalidArgument included: the same message, one type for the caller
            raise InvalidArgument(str(exc)) from None
        label = f"{command} {prepared[0].info.name}" if len(prepared) == 1 else command
        display = progress if isinstance(progress, Progress) else Progress(label, enabled=bool(progress))
        outcomes = _run_jobs(prepared, jobs, display)
        display.close()
    finally:
        for job in prepared:
            job.close()
    settings_base = {"profile": profile, "max_examples": max_examples, "seed": seed, "timeout": timeout,
                     "isolate": isolate, "jobs": jobs, "memory_limit": memory_limit, "variant": variant}
    return [_finish(job, records, notes, settings_base, command=command, report_dir=report_dir,
                    write_report=write_report, junit_xml=junit_xml)
            for job, (records, notes) in zip(prepared, outcomes)]


def _finish(job: _Job, records: list[Record], notes: list[str], settings_base: dict[str, Any], *, command: str,
            report_dir: Any, write_report: bool, junit_xml: Any) -> CertifyResult:
    info = job.info
    records = _order(records, job.oracles, info.variant)
    impl_dict = {"name": info.name, "variant": info.variant, "dtypes": list(info.dtypes),
                 "backward": info.has_backward, "target": job.described["target"] or info.name,
                 "loaded": job.described.get("loaded"), "isolated": job.described["isolated"]}
    notes = sorted(set(notes))
    if not job.oracles:
        notes.append(f"no available oracle covers the {info.variant} variant: nothing could be compared")
    if report_dir is None and any(r.case_file for r in records):
        notes.append(f"the minimal failing cases were saved in {job.settings.case_dir} (give a report directory "
                     f"to keep them beside the report)")
    settings_dict = {**settings_base, "dtypes": job.dtypes, "oracles": [o.name for o in job.oracles]}
    result = CertifyResult(records=records, verdict=verdict(records), implementation=impl_dict,
                           settings=settings_dict, notes=notes)
    from reports.json import build_report

    result.report = build_report(records, command=command, target=impl_dict["target"], settings=settings_dict,
                                 implementations=[impl_dict], oracles=[o.describe() for o in job.oracles],
                                 target_info=impl_dict, notes=notes)
    if report_dir is not None and write_report:
        result.report_files = write_reports(result.report, report_dir, junit=junit_xml,
                                            note=result.report_problems.append)
        result.report_path = result.report_files["json"]
    elif junit_xml is not None:
        from reports.junit import write_junit

        result.report_files["junit"] = write_junit(result.report, junit_xml)
    return result


def _portable(impl: Any, target: str | None) -> Any:
    """What a parallel child process can load: the TARGET string, else the object itself when it pickles
    by reference to an importable module (so it keeps its state), else the guessed target, else None."""
    if isinstance(impl, str):
        return impl
    module = getattr(type(impl), "__module__", "") or ""
    importable = module != "__main__" and not module.startswith("_lstm_harness_target_")
    if importable and _picklable(impl):
        return impl
    return target


def _picklable(obj: Any) -> bool:
    if isinstance(obj, str):
        return True
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


def _replay_target(target: str | None, variant: str | None, isolate: bool, timeout: float | None) -> str | None:
    if not target:
        return None
    text = shlex.quote(target)
    if variant:
        text += f" --variant {variant}"
    if not isolate:
        text += " --in-process"
    elif timeout is not None:
        text += f" --timeout {timeout:g}"
    return text


# --------------------------------------------------------------------------------------------------
# Reports on disk


def write_reports(report: dict[str, Any], report_dir: str | os.PathLike[str], *, html: bool = True,
                  junit: str | os.PathLike[str] | None = None,
                  note: Callable[[str], None] | None = None) -> dict[str, Path]:
    """``report.json`` (always), ``index.html`` (when the ``report`` extra is installed) and JUnit XML.

    ``note`` receives one line for what could not be written and why; the JSON is written first, so
    it is there whatever else fails.
    """
    from reports.json import write_report

    say = note or (lambda text: print(text, file=sys.stderr))
    out = {"json": write_report(report, Path(report_dir) / "report.json")}
    if html:
        path = write_html_report(report, Path(report_dir) / "index.html", note=say)
        if path is not None:
            out["html"] = path
    if junit is not None:
        try:
            from reports.junit import write_junit
        except ImportError as exc:
            say(f"note: the JUnit XML report could not be written: {exc}")
        else:
            out["junit"] = write_junit(report, junit)
    return out


def write_html_report(report: dict[str, Any], path: str | os.PathLike[str],
                      note: Callable[[str], None]) -> Path | None:
    try:
        from reports.html import write_html

        return write_html(report, path)
    except ImportError as exc:
        missing = getattr(exc, "name", "") or ""
        if missing.split(".")[0] in ("jinja2", "matplotlib", "markupsafe"):
            note(f"note: the HTML report needs the report extra (pip install 'lstm-harness[report]'); "
                 f"{missing} is not installed. report.json was written.")
        else:
            note(f"note: the HTML report could not be written: {exc}")
    except Exception as exc:  # a renderer bug must not cost the run its report.json
        note(f"note: the HTML report could not be written: {type(exc).__name__}: {exc}")
    return None


# --------------------------------------------------------------------------------------------------
# replay


def replay(case: str | os.PathLike[str] | Case, impl: Any, *, oracles: Sequence[Any] | None = None,
           variant: str | None = None, isolate: bool = False, timeout: float | None = None,
           memory_limit: int | None = None) -> ReplayResult:
    """Run one saved case through ``impl`` and the oracles exactly as certify did, twice.

    The second run is compared bit for bit with the first, so a record of "gives different results
    for the same input" replays too. ``variant`` defaults to the case's.
    """
    if not isinstance(case, Case):
        path = Path(case)
        if not path.is_file():
            raise InvalidArgument(f"case: expected a .npz case file written by lstm-harness, got {str(case)!r} "
                                  f"(no such file)")
        try:
            case = load_case(path)
        except Exception as exc:
            raise InvalidArgument(f"case: {path} is not a case file written by lstm-harness "
                                  f"({type(exc).__name__}: {exc})") from None
    try:
        subject, _ = open_subject(impl, variant=variant or case.variant, isolate=isolate, timeout=timeout,
                                  memory_limit=memory_limit)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    try:
        info = subject.info
        try:
            selected = select_oracles(oracles, info.variant)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        limits = _limits_of(subject)
        inner: Any = _RestrictedSubject(subject, limits) if limits else subject
        wrapped = [_RestrictedOracle(o, limits) for o in selected] if limits else selected
        first = inner.execute(case, backward=info.has_backward)
        records = check_case(_Stored(info, first), wrapped, case)
        from harness.isolation import WorkerFailure

        if not isinstance(first, WorkerFailure):
            second = inner.execute(case, backward=info.has_backward)
            for oracle in selected:
                if oracle.supports(info.variant, case.dtype):
                    continue
                base = dict(implementation=info.name, oracle=oracle.name, variant=info.variant,
                            dtype=case.dtype)
                for rec in _disagreement(first, second, case, base):
                    if rec.status == "contract":
                        records.append(rec)
        if limits.get("unchecked"):
            _mark_unchecked(records, dict(limits["unchecked"]))
    finally:
        close = getattr(subject, "close", None)
        if close:
            close()
    for r in records:
        r.case = _case_info(case)
    return ReplayResult(records=_order(records, selected, info.variant), case=case, verdict=verdict(records))
