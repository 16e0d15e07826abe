"""Diagnosis: under which convention does an implementation compute the standard LSTM?

When an implementation fails, it is often a correct LSTM in another convention: gate blocks in
another order, weights transposed, sequences batch-major, a forget bias of +1 added inside (TF1), or
another variant than it declares. :func:`diagnose` runs it under every combination of those
(through :func:`harness.adapt.adapt`, the same adapters a user would certify with), on two small
cases with distinct T, B, D, H (so that a transposed axis cannot pass unnoticed), and compares the
forward outputs with the finite-difference oracle's reference. The simplest convention under which
both cases match is the diagnosis; its backward pass is then checked under that convention too.
When nothing matches, the closest convention (smallest worst error relative to tolerance) is
reported with where it first departs, and the nearest conventions are tried once more on the same
cases with c0 = 0, then with h0 = 0: a match there says the implementation ignores that initial
state (a common bug, and one no convention explains).

Trials are ordered from the declared convention outwards: the declared variant first, then the
sequence layout, transposition, forget bias, and last the 24 gate orders, identity first.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.adapt import Convention
from harness.cases import Case, CaseSpec, build_case
from harness.check import compare_execution
from harness.contract import VARIANTS
from harness.records import Record, format_coords

__all__ = ["diagnose", "Diagnosis", "Trial", "GATE_PERMUTATIONS"]

#: All 24 orders of the four gate blocks, the canonical one first.
GATE_PERMUTATIONS: tuple[str, ...] = tuple("".join(p) for p in itertools.permutations("ifgo"))

#: Worker failures (crash, hang) after which the search gives up: each costs a restart or a timeout.
MAX_WORKER_FAILURES = 3
#: Initial states an implementation may ignore, tried (zeroed) when no convention matches.
IGNORABLE_STATES = {"c0": "initial cell state", "h0": "initial hidden state"}
#: How many of the nearest conventions the ignored-state check tries.
HINT_CONVENTIONS = 3


@dataclass
class Trial:
    """One convention tried: its worst forward error relative to tolerance, or the error it raised."""

    convention: Convention
    variant: str
    ratio: float | None = None  # worst forward |error| / allowed over the trial cases; None if it errored
    error: str = ""
    records: list[Record] = field(default_factory=list)  # forward records of the worst case

    @property
    def matches(self) -> bool:
        return self.ratio is not None and self.ratio <= 1.0

    def describe(self, declared: str) -> str:
        parts = []
        if self.variant != declared:
            parts.append(f"it computes the {self.variant} variant, not {declared}")
        conv = self.convention.describe()
        if conv:
            parts.append(conv)
        return "; ".join(parts) or "the convention it declares"

    def adapt_call(self, declared: str) -> str:
        kwargs = self.convention.keywords()
        if self.variant != declared:
            kwargs = {"variant": self.variant, **kwargs}
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return f"harness.adapt(impl{', ' + args if args else ''})"

    def first_departure(self) -> str:
        bad = [r for r in self.records if r.status == "fail"]
        if not bad:
            return ""
        r = max(bad, key=lambda rec: rec.ratio or 0.0)
        where = format_coords((r.worst or {}).get("coords", {}))
        first_t = f"; first timestep over tolerance t={r.first_bad_t}" if r.first_bad_t is not None else ""
        return (f"{r.quantity} at {where} (actual {r.worst.get('actual'):.6g}, expected "
                f"{r.worst.get('expected'):.6g}; {r.mismatched} of {r.total} elements over tolerance"
                f"{first_t})") if r.worst else r.quantity


@dataclass
class Diagnosis:
    """What :func:`diagnose` found. ``status``: "standard" (matches as declared, backward too),
    "backward" (forward matches as declared, backward does not), "convention" (matches only under
    another convention or variant), "none" (no convention tried matches)."""

    name: str
    declared_variant: str
    status: str
    match: Trial | None
    closest: Trial | None
    backward: list[Record]
    has_backward: bool
    tried: int
    note: str = ""
    hint: str = ""  # when nothing matches: an input it appears to ignore

    def _backward_text(self) -> str:
        if not self.has_backward:
            return "It has no backward, so only the forward pass was diagnosed."
        bad = [r for r in self.backward if not r.ok]
        if not bad:
            return "Its backward pass matches too, under the same convention."
        worst = max(bad, key=lambda r: (r.ratio or 0.0) if r.status == "fail" else float("inf"))
        if worst.status != "fail":
            return f"Its backward pass does not run under this convention: {worst.reason.splitlines()[0]}"
        where = format_coords((worst.worst or {}).get("coords", {}))
        names = ", ".join(dict.fromkeys(r.quantity for r in bad))
        return (f"Its backward pass departs: {names} not close (worst: {worst.quantity} at {where}, "
                f"{worst.ratio:.3g} x tolerance). Certify it to get the minimal failing case.")

    def text(self) -> str:
        head = f"Diagnosis of {self.name} (declared variant: {self.declared_variant}; {self.tried} conventions tried)"
        lines = [head]
        if self.status == "standard":
            lines.append("It matches the standard LSTM as declared: no other convention is needed.")
            lines.append(self._backward_text())
        elif self.status == "backward":
            lines.append("Its forward pass matches the standard LSTM as declared.")
            lines.append(self._backward_text())
        elif self.status == "convention":
            assert self.match is not None
            lines.append(f"It matches the standard LSTM if {self.match.describe(self.declared_variant)}.")
            if self.match.convention.is_standard:
                lines.append(f"Declare variant = {self.match.variant!r} in the implementation, or certify it with "
                             f"--variant {self.match.variant}.")
            else:
                lines.append(f"Certify it as it is with {self.match.adapt_call(self.declared_variant)}.")
            lines.append(self._backward_text())
        else:
            lines.append("No convention tried makes it match the standard LSTM.")
            if self.closest is not None:
                c = self.closest
                lines.append(f"Closest: {c.describe(self.declared_variant)} (worst forward error {c.ratio:.3g} x "
                             f"tolerance).")
                departure = c.first_departure()
                if departure:
                    lines.append(f"It first departs at {departure}.")
            if self.hint:
                lines.append(self.hint)
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def trial(t: Trial | None) -> dict[str, Any] | None:
            if t is None:
                return None
            return {"variant": t.variant, "convention": t.convention.keywords(), "ratio": t.ratio,
                    "description": t.describe(self.declared_variant), "adapt": t.adapt_call(self.declared_variant),
                    "first_departure": t.first_departure(), "error": t.error}

        return {"name": self.name, "declared_variant": self.declared_variant, "status": self.status,
                "match": trial(self.match), "closest": trial(self.closest), "tried": self.tried, "hint": self.hint,
                "backward": [r.to_dict() for r in self.backward], "text": self.text()}


def _distance(trial: Trial) -> tuple[float, float]:
    """How far a convention is from matching: the sooner y departs, the farther; then the share of
    mismatched forward elements. Ties go to the simpler convention (``min`` keeps the first)."""
    y = next((r for r in trial.records if r.quantity == "y"), None)
    T = (y.case.get("T") if y is not None and y.case else None) or 0
    good_prefix = T if y is None or y.first_bad_t is None else y.first_bad_t
    total = sum(r.total for r in trial.records) or 1
    share = sum(r.mismatched for r in trial.records) / total
    return (-good_prefix, round(share, 2))


def _trial_cases(variant: str, dtype: str, ln_eps: float) -> list[Case]:
    # T, B, D, H all distinct, and D != 4H: a misread axis shows as an error or a mismatch.
    return [build_case(CaseSpec(variant=variant, dtype=dtype, T=3, B=2, D=5, H=4, seed=seed, weight_scale="unit",
                                state="random", ln_eps=ln_eps)) for seed in (11, 12)]


def _candidates(declared: str) -> list[tuple[str, Convention]]:
    variants = [declared] + [v for v in VARIANTS if v != declared]
    out = []
    for variant in variants:
        for batch_major in (False, True):
            for transposed in (False, True):
                for forget_bias in (0.0, 1.0):
                    for order in GATE_PERMUTATIONS:
                        out.append((variant, Convention(gate_order=order, transposed=transposed,
                                                        forget_bias=forget_bias, batch_major=batch_major)))
    return out


def _run_trial(trial: Trial, run: Any, cases: list[Case], references: list[Any], *, name: str, oracle: Any) -> int:
    """Fill in ``trial`` from the forward outputs of ``run`` on ``cases``; returns how many calls crashed
    or hung the worker. One mismatching case rejects the convention."""
    from harness.isolation import WorkerFailure

    failures, worst = 0, 0.0
    for case, ref in zip(cases, references):
        execution = run.execute(case, backward=False)
        if isinstance(execution, WorkerFailure):
            failures += 1
        recs = compare_execution(execution, ref, case, implementation=name, oracle=oracle, directions=("forward",))
        if any(r.status in ("error", "contract") for r in recs):
            trial.error = next(r.reason for r in recs if r.status in ("error", "contract"))
            trial.ratio = None
            break
        ratio = max((r.ratio or 0.0) for r in recs)
        if ratio >= worst:
            worst, trial.records = ratio, recs
        trial.ratio = worst
        if ratio > 1.0:
            break
    return failures


def _ignored_state(nearest: list[Trial], runner: Any, cases: dict[str, list[Case]], oracle: Any, *, name: str,
                   declared: str) -> str:
    """When nothing matched: whether one of the nearest conventions matches once an initial state is
    zero in the trial cases, which says the implementation ignores that input (a common bug)."""
    for state, words in IGNORABLE_STATES.items():
        zeroed: dict[str, tuple[list[Case], list[Any]]] = {}  # variant -> the cases and their references
        for near in nearest:
            if near.variant not in zeroed:
                zc = [dataclasses.replace(c, **{state: np.zeros_like(getattr(c, state))}) for c in cases[near.variant]]
                zeroed[near.variant] = (zc, [oracle.reference(c) for c in zc])
            trial = Trial(near.convention, near.variant)
            try:
                _run_trial(trial, runner(near.variant, near.convention), *zeroed[near.variant], name=name,
                           oracle=oracle)
            except Exception:  # noqa: BLE001 - a hint is optional; the diagnosis stands without it
                continue
            if trial.matches:
                standard = trial.variant == declared and trial.convention.is_standard
                under = "as declared" if standard else f"if {trial.describe(declared)}"
                return (f"With {state} = 0 it matches the standard LSTM {under}: it ignores its {words} "
                        f"{state}, or takes it from somewhere else. Certify it to see the failing case.")
    return ""


def diagnose(impl: Any, *, variant: str | None = None, dtype: str | None = None, isolate: bool = False,
             timeout: float | None = None, memory_limit: int | None = None) -> Diagnosis:
    """Find the convention under which ``impl`` (an object or a TARGET string) matches the standard LSTM.

    ``variant`` is what it is meant to be (default: what it declares). ``dtype`` of the trial cases
    defaults to the most precise one it declares. With ``isolate=True`` it runs in a worker process.
    Bad arguments raise :class:`harness.session.InvalidArgument` (a ``ValueError``).
    """
    from harness.adapt import adapt
    from harness.contract import validate
    from harness.session import InvalidArgument, open_subject
    from harness.subject import InProcessSubject
    from oracles.finite_diff import FiniteDifferenceOracle

    try:
        subject, _ = open_subject(impl, variant=variant, isolate=isolate, timeout=timeout,
                                  memory_limit=memory_limit)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    oracle = FiniteDifferenceOracle()
    try:
        info = subject.info
        declared = info.variant
        if dtype is not None and dtype not in info.dtypes:
            raise InvalidArgument(f"dtype: {info.name} declares {', '.join(info.dtypes)}; got {dtype!r}")
        use_dtype = dtype or ("float64" if "float64" in info.dtypes else info.dtypes[0])
        cases = {v: _trial_cases(v, use_dtype, info.ln_eps) for v in VARIANTS}
        references = {v: [oracle.reference(c) for c in cs] for v, cs in cases.items()}
        base_obj = getattr(subject, "impl", None)

        def runner(v: str, conv: Convention) -> Any:
            kwargs = {"variant": v, **conv.keywords()}
            if isolate:
                return subject.adapted(**kwargs)
            adapted = adapt(base_obj, **kwargs)
            return InProcessSubject(adapted, validate(adapted))

        trials: list[Trial] = []
        failures = 0
        match: Trial | None = None
        note = ""
        for v, conv in _candidates(declared):
            trial = Trial(conv, v)
            trials.append(trial)
            try:
                run = runner(v, conv)
            except Exception as exc:  # adapt() refused this combination, or the worker died adapting it
                trial.error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, RuntimeError):
                    failures += 1
                    if failures >= MAX_WORKER_FAILURES:
                        note = (f"Stopped after {failures} crashes or timeouts of the implementation; the "
                                f"conventions not yet tried were not diagnosed.")
                        break
                continue
            failures += _run_trial(trial, run, cases[v], references[v], name=info.name, oracle=oracle)
            if trial.matches:
                match = trial
                break
            if failures >= MAX_WORKER_FAILURES:
                note = (f"Stopped after {failures} crashes or timeouts of the implementation; the conventions "
                        f"not yet tried were not diagnosed.")
                break
        backward: list[Record] = []
        if match is not None and info.has_backward:
            run = runner(match.variant, match.convention)
            for case, ref in zip(cases[match.variant], references[match.variant]):
                execution = run.execute(case, backward=True)
                backward += compare_execution(execution, ref, case, implementation=info.name, oracle=oracle,
                                              directions=("backward",))
        if match is None:
            status = "none"
        elif match.variant == declared and match.convention.is_standard:
            status = "standard" if all(r.ok for r in backward) else "backward"
        else:
            status = "convention"
        ran = [t for t in trials if t.ratio is not None]
        closest = min(ran, key=_distance) if ran and match is None else None
        hint = ""
        if match is None and failures < MAX_WORKER_FAILURES:
            nearest = sorted(ran, key=_distance)[:HINT_CONVENTIONS] or [Trial(Convention(), declared)]
            hint = _ignored_state(nearest, runner, cases, oracle, name=info.name, declared=declared)
        if match is None and not ran:
            first = next((t for t in trials if t.error), None)
            note = (note + " " if note else "") + (
                f"Every trial failed to run; under the declared convention: {first.error}" if first else "")
        return Diagnosis(name=info.name, declared_variant=declared, status=status, match=match, closest=closest,
                         backward=backward, has_backward=info.has_backward, tried=len(trials), note=note.strip(),
                         hint=hint)
    finally:
        close = getattr(subject, "close", None)
        if close:
            close()
