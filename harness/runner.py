"""Which checks run, and the records they produce.

A *check* is one implementation against one oracle, in one dtype and direction, over Hypothesis
cases; it yields one :class:`~harness.compare.Record` per quantity. :func:`check_case` does a single
case; :func:`run_checks` drives Hypothesis over many, shrinks any failure to a minimal case, and
returns for every quantity either the minimal failing case's record or the worst passing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky

from harness.cases import PROFILES, Case, CaseSpec, build_case, case_specs
from harness.compare import (
    Record,
    Tolerance,
    compare_arrays,
    compare_projections,
    effective_dtype,
    render_message,
    tolerance,
)
from harness.conditioning import condition_number
from harness.contract import gradient_keys, output_specs, quantity_specs
from harness.subject import Execution, Subject
from oracles.base import Oracle, Reference

__all__ = ["check_case", "run_checks", "RunSettings", "quantities", "CheckFailed"]

FORWARD_QUANTITIES = tuple(s.name for s in output_specs())


def quantities(variant: str, direction: str) -> tuple[str, ...]:
    if direction == "forward":
        return FORWARD_QUANTITIES
    return tuple("d" + k for k in gradient_keys(variant))


def _case_info(case: Case) -> dict[str, Any]:
    info: dict[str, Any] = {"T": case.T, "B": case.B, "D": case.D, "H": case.H, "dtype": case.dtype}
    if case.spec is not None:
        info["seed"] = case.spec.seed
        info["spec"] = case.spec.to_dict()
    return info


def _records_for(
    base: dict[str, Any], names: Iterable[str], status: str, reason: str, case: Case | None, tb: str = ""
) -> list[Record]:
    out = []
    for q in names:
        rec = Record(**base, quantity=q, status=status, reason=reason, traceback=tb,
                     case=_case_info(case) if case is not None else {})
        rec.message = render_message(rec)
        out.append(rec)
    return out


def _shape_dtype_problem(name: str, value: np.ndarray, shape: tuple[int, ...], dtype: str) -> str | None:
    if value.shape != shape:
        return f"{name}: expected shape {shape}, got {value.shape}"
    if value.dtype != np.dtype(dtype):
        return f"{name}: expected dtype {dtype} (the dtype of the inputs), got {value.dtype}"
    return None


def tolerance_factors(case: Case, reference: Reference) -> dict[str, float]:
    """What widens the table's tolerance for this case and oracle, and by how much.

    * The LayerNorm condition number (:mod:`harness.conditioning`): rounding that any correct
      implementation suffers on near-constant rows.
    * 2 when the oracle computes in float32 like the implementation: the reference then carries
      float32 rounding of its own, and two independent errors within the table's bound differ by
      up to twice that bound.
    """
    factors: dict[str, float] = {}
    kappa = condition_number(case)
    if kappa > 1.0:
        factors["the case's LayerNorm condition number"] = kappa
    if case.dtype == "float32" and reference.compute_dtype == "float32":
        factors["an oracle that computes in float32 too"] = 2.0
    return factors


def _scaled(tol: Tolerance, factors: dict[str, float]) -> Tolerance:
    for why, factor in factors.items():
        tol = tol.scaled(factor, why)
    return tol


def compare_execution(
    execution: Execution,
    reference: Reference | None,
    case: Case,
    *,
    implementation: str,
    oracle: Oracle,
    directions: Sequence[str] = ("forward", "backward"),
    has_backward: bool = True,
) -> list[Record]:
    """Records for every quantity of ``directions``: validate the execution, then compare."""
    variant, T, B, H = case.variant, case.T, case.B, case.H
    specs = quantity_specs(variant)
    records: list[Record] = []
    factors: dict[str, float] | None = None  # computed once, when the first comparison needs it
    for direction in directions:
        base = dict(implementation=implementation, oracle=oracle.name, variant=variant,
                    dtype=case.dtype, direction=direction)
        names = quantities(variant, direction)
        # What stops this direction before any comparison, in order of precedence.
        if direction == "forward" and not oracle.gives_forward:
            records += _records_for(base, names, "skip", f"{oracle.name} gives no forward values", case)
            continue
        if direction == "backward":
            if not oracle.gives_gradients:
                why = oracle.limitation or f"{oracle.name} gives no gradients"
                records += _records_for(base, names, "skip", why, case)
                continue
            if not has_backward:
                records += _records_for(base, names, "skip",
                                        "the implementation has no backward: checked forward only", case)
                continue
        error = execution.forward_error or (execution.backward_error if direction == "backward" else None)
        if error:
            records += _records_for(base, names, "error", error, case, execution.traceback)
            continue
        contract = execution.forward_contract or (
            execution.backward_contract if direction == "backward" else None
        )
        mutated = [m for m in execution.mutated if direction == "backward" or m.endswith("(forward)")]
        if mutated and not contract:
            contract = "modified its input arrays in place: " + ", ".join(mutated)
        if contract:
            records += _records_for(base, names, "contract", contract, case)
            continue
        if reference is None:
            records += _records_for(base, names, "error", f"{oracle.name} produced no reference", case)
            continue
        tol_dtype = effective_dtype(case.dtype, reference.compute_dtype)
        if factors is None:
            factors = tolerance_factors(case, reference)
        if direction == "forward":
            assert execution.forward is not None and reference.outputs is not None
            actual = dict(zip(FORWARD_QUANTITIES, execution.forward))
            problems = [
                p for q in names
                if (p := _shape_dtype_problem(q, actual[q], specs[q].concrete_shape(T=T, B=B, D=case.D, H=H),
                                              case.dtype))
            ]
            if problems:
                records += _records_for(base, names, "contract", "; ".join(problems), case)
                continue
            tol = _scaled(tolerance(tol_dtype, "values"), factors)
            for q in names:
                rec = compare_arrays(actual[q], reference.outputs[q], spec=specs[q], H=H, tol=tol,
                                     tolerance_dtype=tol_dtype, base={**base, "quantity": q})
                rec.case = _case_info(case)
                rec.tolerance_factors = dict(factors)
                records.append(rec)
            continue
        grads = execution.gradients or {}
        keys = gradient_keys(variant)
        missing = [k for k in keys if k not in grads]
        extra = [k for k in grads if k not in keys]
        problems = []
        if missing or extra:
            problems.append(f"backward: expected keys {list(keys)}; missing {missing}, unexpected {extra}")
        for k in keys:
            if k in grads:
                want = specs["d" + k].concrete_shape(T=T, B=B, D=case.D, H=H)
                if p := _shape_dtype_problem(f"gradient {k!r}", grads[k], want, case.dtype):
                    problems.append(p)
        if problems:
            records += _records_for(base, names, "contract", "; ".join(problems), case)
            continue
        tol = _scaled(tolerance(tol_dtype, "gradients"), factors)
        for k in keys:
            q = "d" + k
            qbase = {**base, "quantity": q}
            if reference.gradients is not None:
                extra_err = (reference.gradient_error or {}).get(k, 0.0)
                rec = compare_arrays(grads[k], reference.gradients[k], spec=specs[q], H=H, tol=tol,
                                     tolerance_dtype=tol_dtype, extra=extra_err, base=qbase)
            else:
                assert reference.projections is not None
                proj = reference.projections[k]
                g = grads[k].astype(np.float64)
                axes = tuple(range(1, proj.directions.ndim))
                with np.errstate(invalid="ignore", over="ignore"):
                    actual_proj = np.tensordot(proj.directions, g, axes=(axes, tuple(range(g.ndim))))
                    scale = float(np.max(np.abs(proj.directions * g).sum(axis=axes)))
                rec = compare_projections(actual_proj, proj.values, proj.error_bound, tol=tol,
                                          tolerance_dtype=tol_dtype,
                                          scale=scale if np.isfinite(scale) else 1.0, base=qbase)
            rec.case = _case_info(case)
            rec.tolerance_factors = dict(factors)
            records.append(rec)
    return records


def check_case(
    subject: Subject,
    oracles: Sequence[Oracle],
    case: Case,
    *,
    references: dict[str, Reference] | None = None,
) -> list[Record]:
    """One case through the implementation once, compared with every oracle that supports it."""
    info = subject.info
    execution: Execution | None = None
    records: list[Record] = []
    for oracle in oracles:
        why = oracle.supports(info.variant, case.dtype)
        base = dict(implementation=info.name, oracle=oracle.name, variant=info.variant, dtype=case.dtype)
        if why:
            for direction in ("forward", "backward"):
                records += _records_for({**base, "direction": direction}, quantities(info.variant, direction),
                                        "skip", why, case)
            continue
        if execution is None:
            execution = subject.execute(case, backward=info.has_backward)
        ref = (references or {}).get(oracle.name)
        if ref is None:
            try:
                ref = oracle.reference(case)
            except Exception as exc:
                # Reported, never fatal; and an error, not a skip: a check that could not be made
                # must not leave the verdict "certified".
                for direction in ("forward", "backward"):
                    records += _records_for({**base, "direction": direction},
                                            quantities(info.variant, direction), "error",
                                            f"the oracle {oracle.name} failed on this case "
                                            f"(not the implementation): {type(exc).__name__}: {exc}",
                                            case)
                continue
        records += compare_execution(execution, ref, case, implementation=info.name, oracle=oracle,
                                     has_backward=info.has_backward)
    return records


@dataclass
class RunSettings:
    profile: str = "ci"
    max_examples: int | None = None
    seed: int | None = None
    max_T: int = 8
    max_B: int = 4
    max_D: int = 8
    max_H: int = 8
    case_dir: Path | None = None  # where minimal failing cases are saved as .npz
    replay_target: str | None = None  # what `lstm-harness replay` should load

    def hypothesis_settings(self) -> settings:
        kwargs = dict(PROFILES[self.profile])
        if self.max_examples is not None:
            kwargs["max_examples"] = self.max_examples
        kwargs["database"] = None
        kwargs["report_multiple_bugs"] = False
        kwargs["print_blob"] = False
        return settings(**kwargs)


class CheckFailed(Exception):
    """Raised inside the Hypothesis test so that it shrinks; carries the failing records."""

    def __init__(self, records: list[Record], case: Case):
        self.records = records
        self.case = case
        super().__init__("\n\n".join(r.message for r in records if not r.ok))


_Key = tuple[str, str, str]  # oracle, direction, quantity

#: Searches per check: after a failure is shrunk, the search starts again blind to the quantities
#: already known to fail, so that a second, independent discrepancy (another gradient, another
#: oracle) gets a minimal case of its own instead of hiding behind the first.
MAX_SEARCHES = 4


def _key(r: Record) -> _Key:
    return (r.oracle, r.direction, r.quantity)


@dataclass
class _Search:
    """One Hypothesis search: the worst passing record per key, and the shrunk failure if any."""

    worst: dict[_Key, Record] = field(default_factory=dict)
    examples: int = 0  # cases generated before the failure; shrinking attempts are not counted
    failure: CheckFailed | None = None
    flaky: str = ""


def _search(subject: Subject, oracles: Sequence[Oracle], strategy, run: RunSettings, ignore: set[_Key],
            progress: Callable[[int], None] | None, counted: int) -> _Search:
    out = _Search()

    def one(spec: CaseSpec) -> None:
        case = build_case(spec)
        records = check_case(subject, oracles, case)
        failing = [r for r in records if not r.ok and _key(r) not in ignore]
        if out.failure is None and not failing:
            out.examples += 1
            if progress:
                progress(counted + out.examples)
        if failing:
            raise CheckFailed(records, case)
        for r in records:
            _keep_worst(out.worst, r)

    test = given(strategy)(one)
    test = run.hypothesis_settings()(test)
    if run.seed is not None:
        test = hypothesis_seed(run.seed)(test)
    try:
        test()
    except CheckFailed as exc:
        out.failure = exc
    except Flaky as exc:  # the implementation gave different verdicts for the same case
        out.failure = _find_check_failed(exc)
        out.flaky = ("the failure did not reproduce when the same case ran again: the implementation is "
                     "nondeterministic or keeps state between calls")
        if out.failure is None:
            raise
    if out.failure is not None:
        out.examples += 1  # the case that failed first
    return out


def run_checks(
    subject: Subject,
    oracles: Sequence[Oracle],
    *,
    dtype: str,
    run: RunSettings | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Record]:
    """Cross-check one implementation in one dtype against ``oracles`` on Hypothesis cases.

    Returns one record per (oracle, direction, quantity): for a quantity that failed, the record of
    its minimal failing case (saved as ``.npz`` when ``run.case_dir`` is set); otherwise the worst
    passing record seen. ``examples`` on each record counts the cases generated, not shrinking.
    """
    run = run or RunSettings()
    info = subject.info
    strategy = case_specs(variants=(info.variant,), dtypes=(dtype,), max_T=run.max_T, max_B=run.max_B,
                          max_D=run.max_D, max_H=run.max_H, ln_eps=info.ln_eps)
    worst: dict[_Key, Record] = {}
    failed: dict[_Key, Record] = {}
    examples = 0
    for _ in range(MAX_SEARCHES):
        try:
            search = _search(subject, oracles, strategy, run, set(failed), progress, examples)
        except BaseException as exc:
            # Something outside the comparison stopped the search (a crashed or hung worker, an
            # interrupt): what earlier searches found is still true; hand it to the caller.
            exc.partial_records = _ordered({**worst, **failed}, examples, oracles, info.variant)  # type: ignore[attr-defined]
            raise
        examples += search.examples
        for r in search.worst.values():
            _keep_worst(worst, r)
        if search.failure is None:
            break
        case = search.failure.case
        case_file = ""
        if run.case_dir is not None:
            run.case_dir.mkdir(parents=True, exist_ok=True)
            path = run.case_dir / f"{_slug(info.name)}-{_case_tag(case)}.npz"
            case.save(path)
            case_file = str(path)
        for r in search.failure.records:
            if r.ok or _key(r) in failed:
                continue
            r.case_file = case_file
            if case_file:
                r.replay = f"lstm-harness replay {case_file} {run.replay_target or info.name} --oracle {r.oracle}"
            if search.flaky:
                r.reason = (r.reason + "; " if r.reason else "") + search.flaky
                r.message = render_message(r) + f"\nNote: {search.flaky}"
            failed[_key(r)] = r
        if {_key(r) for r in search.failure.records} <= failed.keys():
            break  # every quantity already fails: nothing left to find
    return _ordered({**worst, **failed}, examples, oracles, info.variant)


def _keep_worst(worst: dict[_Key, Record], r: Record) -> None:
    """Keep ``r`` if it is the worst record of its key so far (a comparison beats a skip)."""
    old = worst.get(_key(r))
    if old is None or (r.ratio or 0.0) > (old.ratio or 0.0) or (old.status == "skip" and r.status == "pass"):
        worst[_key(r)] = r


def _ordered(results: dict[_Key, Record], examples: int, oracles: Sequence[Oracle], variant: str) -> list[Record]:
    """Records in report order (oracle, forward first, quantity), each stamped with the case count."""
    for r in results.values():
        r.examples = examples
    order = {o.name: i for i, o in enumerate(oracles)}
    qorder = {q: i for d in ("forward", "backward") for i, q in enumerate(quantities(variant, d))}
    return sorted(results.values(),
                  key=lambda r: (order.get(r.oracle, 99), r.direction != "forward", qorder.get(r.quantity, 99)))


def _find_check_failed(exc: BaseException) -> CheckFailed | None:
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, CheckFailed):
            return e
        seen += list(getattr(e, "exceptions", ()))
        if e.__cause__ is not None:
            seen.append(e.__cause__)
        if e.__context__ is not None:
            seen.append(e.__context__)
    return None


def _case_tag(case: Case) -> str:
    """A file-name tag that tells cases apart: dtype, shape and seed."""
    seed = case.spec.seed if case.spec else 0
    return f"{case.dtype}-T{case.T}B{case.B}D{case.D}H{case.H}-seed{seed}"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60] or "impl"

