"""One case: run the implementation once, compare it with every oracle that covers the case.

:func:`check_case` is the unit of evidence: one case through the implementation (an
:class:`~harness.subject.Execution`, plain data) and through each oracle (a
:class:`~oracles.base.Reference`), validated against the contract and compared quantity by quantity
into :class:`~harness.records.Record` objects. Nothing here searches or repeats; the Hypothesis
search (:mod:`harness.runner`) calls this for every case it draws.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np

from harness.cases import Case
from harness.compare import FLOAT32_ORACLE, Tolerance, compare_arrays, compare_projections, effective_dtype, tolerance
from harness.conditioning import AMPLIFICATION, condition_number, rounding_amplification
from harness.contract import (
    DIRECTIONS,
    FORWARD_QUANTITIES,
    ArraySpec,
    gradient_keys,
    is_dtype,
    quantities,
    quantity_specs,
)
from harness.records import Record
from harness.structure import parse_prefix
from harness.subject import Execution, Subject
from oracles.base import Oracle, Reference

__all__ = ["check_case", "compare_execution", "records_for", "tolerance_factors", "structure_reason",
           "sharing_references", "SHARED_CASE_BYTES", "SHARED_REFERENCES"]


# --------------------------------------------------------------------------------------------------
# References shared by the units of one run

#: Cases of at most this many bytes (all their arrays) have their references kept while sharing.
SHARED_CASE_BYTES = 1 << 18
#: References kept per oracle while sharing, the least recently used dropped first.
SHARED_REFERENCES = 1024

_shared: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], Reference]] | None = None


@contextmanager
def sharing_references() -> Iterator[None]:
    """While open, :func:`check_case` reuses the reference an oracle object gave for a case with the same
    content (:meth:`harness.cases.Case.digest`: every array, the variant, dtype, structure and lengths).

    The units of one run certify several implementations of a variant (``loop`` and ``stacked``, a user's
    version and its adapter) on the same derandomized cases, and each oracle computed each case again for
    each of them. A reference depends only on the case's numbers and on the oracle's settings, which do
    not change while a run lasts; it is read, never changed, by the comparisons. Small cases only
    (:data:`SHARED_CASE_BYTES`), at most :data:`SHARED_REFERENCES` per oracle, and nothing outlives the
    outermost block: a later run, with an oracle reconfigured in between, starts afresh.
    """
    global _shared
    outer = _shared
    if outer is None:
        _shared = weakref.WeakKeyDictionary()
    try:
        yield
    finally:
        _shared = outer


def _reference(oracle: Any, case: Case, digest: str | None) -> Reference:
    """``oracle.reference(case)``, or the one it gave for the same case while sharing; ``digest`` is the
    case's, or None for a case too large to keep (:data:`SHARED_CASE_BYTES`)."""
    shared = _shared
    if shared is None or digest is None:
        return oracle.reference(case)
    try:
        kept = shared.setdefault(oracle, OrderedDict())
    except TypeError:  # an oracle object that cannot be weakly referenced or hashed: nothing is kept
        return oracle.reference(case)
    key = (digest, case.variant, case.dtype, case.T, case.B, case.D, case.H)
    ref = kept.get(key)
    if ref is not None:
        kept.move_to_end(key)
        return ref
    ref = oracle.reference(case)
    kept[key] = ref
    while len(kept) > SHARED_REFERENCES:
        kept.popitem(last=False)
    return ref


def records_for(
    base: dict[str, Any], names: Iterable[str], status: str, reason: str, case: Case | None, tb: str = "",
    *, case_info: dict[str, Any] | None = None,
) -> list[Record]:
    """One record per quantity in ``names`` that could not be compared (a skip, error or contract).
    ``case_info``: ``case.info()`` when the caller has it already (it hashes every array)."""
    if case_info is None:
        case_info = case.info() if case is not None else {}
    return [Record(**base, quantity=q, status=status, reason=reason, traceback=tb, case=case_info)
            for q in names]


def _shape_dtype_problem(name: str, value: np.ndarray, shape: tuple[int, ...], dtype: str) -> str | None:
    if value.shape != shape:
        return f"{name}: expected shape {shape}, got {value.shape}"
    if not is_dtype(value.dtype, dtype):
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
        factors[FLOAT32_ORACLE] = 2.0
    return factors


#: Why a peephole weight's gradient gets a wider tolerance (see :func:`_cell_magnitude`).
PEEPHOLE_CELL = "the cell state's magnitude, which peephole weights multiply"


def _cell_magnitude(case: Case, reference: Reference) -> float:
    """How large the cell state runs in this case: max |c| over c0 and the reference's c_T (at least 1).
    A peephole weight's gradient sums (gate derivative) * c_{t-1} over steps and rows, so its rounding,
    in any correct implementation, is relative to |c| where the other gradients' terms are of order 1: a
    case with cell states in the hundreds (the overflow regime) needs that much more room."""
    seen = [float(np.max(np.abs(case.c0), initial=0.0))]
    if reference.outputs is not None:
        seen.append(float(np.max(np.abs(reference.outputs["c_T"]), initial=0.0)))
    return max(1.0, *seen)


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
    directions: Sequence[str] = DIRECTIONS,
    has_backward: bool = True,
    unchecked: Collection[str] = (),
    case_info: dict[str, Any] | None = None,
) -> list[Record]:
    """Records for every quantity of ``directions``: validate the execution, then compare.

    ``unchecked``: quantities the implementation declared it cannot produce (its limits); their shape
    and dtype are not held against it (they are reported as not compared). ``case_info``: ``case.info()``
    when the caller has it already; every record of the case shares it.
    """
    if case_info is None:
        case_info = case.info()
    variant, T, B, H, structure = case.variant, case.T, case.B, case.H, case.structure
    specs = quantity_specs(variant, structure)
    records: list[Record] = []
    factors: dict[str, float] | None = None  # computed once, when the first comparison needs it
    for direction in directions:
        base = dict(implementation=implementation, oracle=oracle.name, variant=variant,
                    dtype=case.dtype, direction=direction)
        names = quantities(variant, direction, structure)
        # What stops this direction before any comparison, in order of precedence.
        if direction == "forward" and not oracle.gives_forward:
            records += records_for(base, names, "skip", f"{oracle.name} gives no forward values", case,
                                   case_info=case_info)
            continue
        if direction == "backward":
            if not oracle.gives_gradients:
                why = oracle.limitation or f"{oracle.name} gives no gradients"
                records += records_for(base, names, "skip", why, case, case_info=case_info)
                continue
            if not has_backward:
                records += records_for(base, names, "skip",
                                        "the implementation has no backward: checked forward only", case,
                                        case_info=case_info)
                continue
        error = execution.forward_error or (execution.backward_error if direction == "backward" else None)
        if error:
            records += records_for(base, names, "error", error, case, execution.traceback)
            continue
        contract = execution.forward_contract or (
            execution.backward_contract if direction == "backward" else None
        )
        mutated = [m for m in execution.mutated if direction == "backward" or m.endswith("(forward)")]
        if mutated and not contract:
            contract = "modified its input arrays in place: " + ", ".join(mutated)
        if contract:
            records += records_for(base, names, "contract", contract, case, case_info=case_info)
            continue
        if reference is None:
            records += records_for(base, names, "error", f"{oracle.name} produced no reference", case,
                                   case_info=case_info)
            continue
        tol_dtype = effective_dtype(case.dtype, reference.compute_dtype)
        if factors is None:
            factors = tolerance_factors(case, reference)
        if direction == "forward":
            assert execution.forward is not None and reference.outputs is not None
            actual = dict(zip(FORWARD_QUANTITIES, execution.forward))
            problems = [
                p for q in names if q not in unchecked
                and (p := _shape_dtype_problem(q, actual[q], specs[q].concrete_shape(T=T, B=B, D=case.D, H=H),
                                               case.dtype))
            ]
            if problems:
                records += records_for(base, names, "contract", "; ".join(problems), case, case_info=case_info)
                continue
            compare = partial(_compare_values, actual, reference, names, specs, case, tol_dtype, base, case_info)
            records += _judged(compare, case, tol_dtype, "values", factors)
            continue
        grads = execution.gradients or {}
        keys = gradient_keys(variant, structure)
        not_computed = [k for k in execution.not_computed if k in keys]
        missing = [k for k in keys if k not in grads and k not in not_computed]
        extra = [k for k in grads if k not in keys]
        problems = []
        if missing or extra:
            problems.append(f"backward: expected keys {list(keys)}; missing {missing}, unexpected {extra}")
        for k in keys:
            if k in grads and "d" + k not in unchecked:
                want = specs["d" + k].concrete_shape(T=T, B=B, D=case.D, H=H)
                if p := _shape_dtype_problem(f"gradient {k!r}", grads[k], want, case.dtype):
                    problems.append(p)
        if problems:
            records += records_for(base, names, "contract", "; ".join(problems), case, case_info=case_info)
            continue
        compare = partial(_compare_gradients, grads, reference, keys, not_computed, specs, case, tol_dtype, base,
                          case_info)
        records += _judged(compare, case, tol_dtype, "gradients", factors)
    return records


def _judged(compare: Callable[[dict[str, float]], list[Record]], case: Case, tol_dtype: str, kind: str,
            factors: dict[str, float]) -> list[Record]:
    """``compare(factors)``; where a float32 comparison fails, again with the tolerance widened by the case's
    measured amplification of float32 rounding (:func:`harness.conditioning.rounding_amplification`), when
    the case has any. Measured only here: a search draws many cases, few of them fail, and a bug fails
    just the same in the well-conditioned cases, where the factor is 1."""
    records = compare(factors)
    if tol_dtype == "float32" and any(r.status == "fail" for r in records):
        amplification = rounding_amplification(case)[kind]
        if amplification > 1.0:
            records = compare({**factors, AMPLIFICATION: amplification})
    return records


def _compare_values(actual: dict[str, np.ndarray], reference: Reference, names: Sequence[str],
                    specs: dict[str, ArraySpec], case: Case, tol_dtype: str, base: dict[str, Any],
                    case_info: dict[str, Any], factors: dict[str, float]) -> list[Record]:
    """One record per forward quantity of ``names``, with the table's tolerance times ``factors``."""
    assert reference.outputs is not None
    tol = _scaled(tolerance(tol_dtype, "values"), factors)
    records = []
    for q in names:
        rec = compare_arrays(actual[q], reference.outputs[q], spec=specs[q], H=case.H, tol=tol,
                             tolerance_dtype=tol_dtype, base={**base, "quantity": q}, lengths=case.lengths)
        rec.case = case_info
        rec.tolerance_factors = dict(factors)
        records.append(rec)
    return records


def _compare_gradients(grads: dict[str, np.ndarray], reference: Reference, keys: Sequence[str],
                       not_computed: Collection[str], specs: dict[str, ArraySpec], case: Case, tol_dtype: str,
                       base: dict[str, Any], case_info: dict[str, Any], factors: dict[str, float]) -> list[Record]:
    """One record per gradient of ``keys``, with the table's tolerance times ``factors`` (and, for a peephole
    weight, times the cell state's magnitude)."""
    tol = _scaled(tolerance(tol_dtype, "gradients"), factors)
    records: list[Record] = []
    for k in keys:
        q = "d" + k
        qbase = {**base, "quantity": q}
        own, tol_k = dict(factors), tol
        if parse_prefix(k)[2] in ("p_i", "p_f", "p_o"):
            own[PEEPHOLE_CELL] = _cell_magnitude(case, reference)
            tol_k = tol.scaled(own[PEEPHOLE_CELL], PEEPHOLE_CELL)
        if k in not_computed:
            records += records_for(base, [q], "contract",
                                   f"{q}: not computed: the backward returned None for it, so there is nothing "
                                   f"to compare (an implementation that cannot produce {q} declares it in its "
                                   f"limits, harness.Limits(unchecked={{{q!r}: why}}))", case)
            continue
        if reference.gradients is not None:
            extra_err = (reference.gradient_error or {}).get(k, 0.0)
            rec = compare_arrays(grads[k], reference.gradients[k], spec=specs[q], H=case.H, tol=tol_k,
                                 tolerance_dtype=tol_dtype, extra=extra_err, base=qbase, lengths=case.lengths)
        else:
            assert reference.projections is not None
            proj = reference.projections[k]
            g = grads[k].astype(np.float64)
            axes = tuple(range(1, proj.directions.ndim))
            with np.errstate(invalid="ignore", over="ignore"):
                actual_proj = np.tensordot(proj.directions, g, axes=(axes, tuple(range(g.ndim))))
                scale = float(np.max(np.abs(proj.directions * g).sum(axis=axes)))
            rec = compare_projections(actual_proj, proj.values, proj.error_bound, tol=tol_k,
                                      tolerance_dtype=tol_dtype,
                                      scale=scale if np.isfinite(scale) else 1.0, base=qbase)
        rec.case = case_info
        rec.tolerance_factors = own
        records.append(rec)
    return records


def structure_reason(oracle: Oracle, variant: str, dtype: str, case: Case) -> str:
    """Why ``oracle`` does not compute ``case``'s layer structure ("" when it does, or when the case is
    in the default structure, which every oracle computes)."""
    if case.structure.is_default:
        return ""
    if hasattr(oracle, "case_reason"):  # an oracle of the user's own may predate it
        return oracle.case_reason(case) or ""
    return oracle.unsupported_reason(variant, dtype, case.structure) or ""


def check_case(
    subject: Subject,
    oracles: Sequence[Oracle],
    case: Case,
    *,
    references: dict[str, Reference] | None = None,
    skipped: dict[str, dict[str, int]] | None = None,
) -> list[Record]:
    """One case through the implementation once, compared with every oracle that supports it.

    An oracle that does not compute the case's layer structure gives skip records with the reason; or,
    when ``skipped`` is given (a search over many cases), no records, and the case is counted there
    instead: ``skipped[oracle][reason] += 1``.
    """
    info = subject.info
    execution: Execution | None = None
    records: list[Record] = []
    case_info = case.info()
    small = sum(a.nbytes for a in (*case.arrays().values(), *case.upstream)) <= SHARED_CASE_BYTES
    digest = case_info["digest"] if small else None  # the key of its references while sharing
    for oracle in oracles:
        why = oracle.unsupported_reason(info.variant, case.dtype)
        base = dict(implementation=info.name, oracle=oracle.name, variant=info.variant, dtype=case.dtype)
        if not why:
            why = structure_reason(oracle, info.variant, case.dtype, case)
            if why and skipped is not None:
                counts = skipped.setdefault(oracle.name, {})
                counts[why] = counts.get(why, 0) + 1
                continue
        if why:
            for direction in DIRECTIONS:
                records += records_for({**base, "direction": direction},
                                        quantities(info.variant, direction, case.structure), "skip", why, case,
                                        case_info=case_info)
            continue
        if execution is None:
            execution = subject.execute(case, backward=info.has_backward)
        ref = (references or {}).get(oracle.name)
        if ref is None:
            try:
                ref = _reference(oracle, case, digest)
            except Exception as exc:
                # Reported, never fatal; and an error, not a skip: a check that could not be made
                # must not leave the verdict "certified".
                for direction in DIRECTIONS:
                    records += records_for({**base, "direction": direction},
                                            quantities(info.variant, direction, case.structure), "error",
                                            f"the oracle {oracle.name} failed on this case "
                                            f"(not the implementation): {type(exc).__name__}: {exc}",
                                            case, case_info=case_info)
                continue
        records += compare_execution(execution, ref, case, implementation=info.name, oracle=oracle,
                                     has_backward=info.has_backward, unchecked=tuple(info.limits.unchecked),
                                     case_info=case_info)
    return records
