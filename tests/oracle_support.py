"""Helpers shared by the oracle and layout tests: availability skips and assert_close-shaped checks."""

from __future__ import annotations

import numpy as np
import pytest

from harness.cases import Case
from harness.check import tolerance_factors
from harness.compare import compare_arrays, effective_dtype, tolerance
from harness.contract import gradient_keys, quantity_specs
from oracles.base import Oracle, Reference


def require(oracle: Oracle) -> Oracle:
    """Skip the calling test, with the reason, when ``oracle``'s framework is missing."""
    avail = oracle.availability()
    if not avail.available:
        pytest.skip(f"{oracle.name} unavailable: {avail.reason}")
    return oracle


def assert_close(actual, expected, *, quantity: str, variant: str, H: int, dtype: str, kind: str,
                 actual_name: str = "actual", expected_name: str = "expected", extra=0.0,
                 factors: dict[str, float] | None = None) -> None:
    """Compare like the harness does and fail with the harness's own assert_close-shaped message.

    ``factors`` are the runner's tolerance factors for the case (:func:`harness.runner.tolerance_factors`).
    """
    spec = quantity_specs(variant)[quantity]
    tol = tolerance(dtype, kind)
    for why, factor in (factors or {}).items():
        tol = tol.scaled(factor, why)
    base = dict(implementation=actual_name, oracle=expected_name, variant=variant, dtype=dtype,
                direction="forward" if kind == "values" else "backward", quantity=quantity)
    rec = compare_arrays(np.asarray(actual), np.asarray(expected), spec=spec, H=H, tol=tol,
                         tolerance_dtype=dtype, extra=extra, base=base)
    assert rec.status == "pass", rec.message


def is_close(actual, expected, *, quantity: str, variant: str, H: int, dtype: str, kind: str) -> bool:
    """True when the harness's comparison passes (for tests that a wrong thing is caught)."""
    spec = quantity_specs(variant)[quantity]
    rec = compare_arrays(np.asarray(actual), np.asarray(expected), spec=spec, H=H, tol=tolerance(dtype, kind),
                         tolerance_dtype=dtype,
                         base=dict(implementation="a", oracle="b", variant=variant, dtype=dtype,
                                   direction="forward", quantity=quantity))
    return rec.status == "pass"


def assert_outputs_close(y, h_T, c_T, expected: tuple, *, case: Case, dtype: str, what: str, against: str):
    for q, a, e in zip(("y", "h_T", "c_T"), (y, h_T, c_T), expected, strict=True):
        assert_close(a, e, quantity=q, variant=case.variant, H=case.H, dtype=dtype, kind="values",
                     actual_name=what, expected_name=against)


def assert_references_agree(case: Case, a: Reference, a_name: str, b: Reference, b_name: str) -> None:
    """Every quantity both references give, compared at the lowest precision involved.

    A finite-difference reference's own error bound (``gradient_error``) widens the tolerance,
    exactly as the runner does.
    """
    dtype = effective_dtype(case.dtype, a.compute_dtype, b.compute_dtype)
    # The same widening the runner applies (LayerNorm conditioning; both sides in float32).
    # a plays the implementation (its compute dtype), b the oracle: x2 only when both are float32.
    factors = tolerance_factors(case.astype(a.compute_dtype), b)
    if a.outputs is not None and b.outputs is not None:
        for q in ("y", "h_T", "c_T"):
            assert_close(a.outputs[q], b.outputs[q], quantity=q, variant=case.variant, H=case.H, dtype=dtype,
                         kind="values", actual_name=a_name, expected_name=b_name, factors=factors)
    if a.gradients is not None and b.gradients is not None:
        for k in gradient_keys(case.variant):
            extra = (a.gradient_error or {}).get(k, 0.0) + (b.gradient_error or {}).get(k, 0.0)
            assert_close(a.gradients[k], b.gradients[k], quantity="d" + k, variant=case.variant, H=case.H,
                         dtype=dtype, kind="gradients", actual_name=a_name, expected_name=b_name, extra=extra,
                         factors=factors)


def structured_mismatches(case: Case, a: Reference, b: Reference) -> list[str]:
    """Every quantity of a structured case (any layer structure) where ``a`` and ``b`` differ beyond the
    tolerance table at the lowest precision involved (doubled when both computed in float32): each as
    ``"dl1.reverse.W: 3.1e-02 > 1.0e-05 allowed"``. Outputs and every gradient key both give."""
    dtype = effective_dtype(case.dtype, a.compute_dtype, b.compute_dtype)
    factor = 2.0 if a.compute_dtype == b.compute_dtype == "float32" else 1.0
    pairs = []
    if a.outputs is not None and b.outputs is not None:
        pairs += [(q, a.outputs[q], b.outputs[q], "values") for q in ("y", "h_T", "c_T")]
    if a.gradients is not None and b.gradients is not None:
        assert set(a.gradients) == set(b.gradients), (sorted(a.gradients), sorted(b.gradients))
        pairs += [("d" + k, a.gradients[k], b.gradients[k], "gradients") for k in b.gradients]
    out = []
    for name, x, e, kind in pairs:
        tol = tolerance(dtype, kind)
        x, e = np.asarray(x, np.float64), np.asarray(e, np.float64)
        assert x.shape == e.shape, f"{name}: shapes {x.shape} vs {e.shape}"
        allowed = factor * (tol.atol * max(1.0, float(np.max(np.abs(e), initial=0.0))) + tol.rtol * np.abs(e))
        diff = np.abs(x - e)
        if np.any(diff > allowed):
            worst = np.unravel_index(np.argmax(diff - allowed), diff.shape)
            out.append(f"{name}: {diff[worst]:.1e} > {allowed[worst]:.1e} allowed at {tuple(map(int, worst))}")
    return out
