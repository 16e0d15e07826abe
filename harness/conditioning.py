"""How much rounding a case amplifies: what its tolerances are scaled by.

Two measures, both properties of the case (its numbers), never of the implementation under test.

**The LayerNorm condition number** (:func:`condition_number`). A LayerNorm row is centred and divided
by sqrt(var + eps). When the units of a row nearly agree (variance comparable to eps or below) while
its values sit far from zero, the subtraction of the mean cancels their leading digits: a relative
rounding error u in the row's values becomes

    u * rms(v) / sqrt(var(v) + eps)

in the normalized output, and the same factor multiplies what flows back through the row in the
backward pass. Every implementation that forms W x_t + R h_{t-1} (or f * c_{t-1} + i * g) in the
case's dtype before normalizing inherits it, so the tolerance must too. The condition number is

    kappa = max(1, max over timesteps, batch rows and LayerNorm rows k of sqrt(mean(v^2) / (var(v) + eps)))

computed in float64 from the LSTM equations on the case's exact values; vanilla and peephole cases
have kappa = 1. The comparison multiplies rtol and atol by kappa (:meth:`Tolerance.scaled`).
Measured with the float64 torch composite as reference, on 2000 generated float32 LayerNorm cases
with ``rows="near_constant"``: worst error 2.7e3 (values) and 7.6e3 (gradients) times the unscaled
float32 tolerance, with kappa up to 1.2e4; divided by kappa, at most 0.52 and 0.70. On 2000 cases
with ``rows="random"`` the worst unscaled error was 0.999 of the tolerance, and 0.15 after scaling.
Planted bugs (tests/meta/test_variant_bugs.py) stay caught: they show in ordinary cases, where kappa
is near 1.

**The recurrence's amplification of float32 rounding** (:func:`rounding_amplification`). With
saturating recurrent weights and gates in transition, a step can multiply a perturbation of h_{t-1}
by more than one; over a sequence, and through a stack of layers in both directions, rounding grows
from step to step. No fixed float32 tolerance holds for every such case: in one drawn case (3 layers,
both directions, T = 7, saturating weights) moving the inputs by their float32 rounding moves the
exact y by 1.7e-3, where the table allows 6.9e-5. There is no formula for this growth (it is a
product of step Jacobians), so it is measured: the built-in stacked LSTM of the case's variant, a
correct float32 computation, runs the case :data:`YARDSTICK_RUNS` times in float32, each time on the
inputs moved by one ulp in random directions (another rounding of the same case), and once in
float64. Its worst error, as a multiple of the table's tolerance (already scaled by kappa), times
:data:`YARDSTICK_MARGIN`, is the factor, per kind (values, gradients), when above 1.

This is consulted only where a float32 comparison fails against the unwidened tolerance
(:func:`harness.check.compare_execution`): a well-conditioned case keeps the table's bound whatever
the implementation, and a bug (1e-2 and more for the planted ones) shows in the many cases whose
yardstick error is far below the tolerance, where the factor is 1. Float64 is not measured: its
table leaves about 1e7 times its unit roundoff, and the worst float64 case measured used 4e-6 of it.

Calibration (float32, 7000 cases drawn with ``structure=None`` and T up to 24, against the float64
torch composite; docs/measurements.md has the table): correct implementations (the built-in loops and
stacked versions, torch.nn.LSTM in float32) erred up to 19.7 (values) and 8.7 (gradients) times the
table's tolerance, and at most 0.22 and 0.27 of the widened one. A single float32 run as the yardstick
was not enough: one rounding of a chaotic case can be lucky (the loop erred 45 times the stacked
version's error on one case), hence several runs on moved inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from harness.cases import Case
from harness.compare import allowed_error, tolerance

__all__ = ["condition_number", "rounding_amplification", "AMPLIFICATION", "YARDSTICK_RUNS", "YARDSTICK_MARGIN"]

#: The tolerance factor's name (Record.tolerance_factors) for :func:`rounding_amplification`.
AMPLIFICATION = "the case's amplification of float32 rounding (a correct float32 LSTM's own error on it)"
#: Float32 runs of the yardstick, each on the case's inputs moved by one ulp in random directions.
YARDSTICK_RUNS = 4
#: The widened tolerance is this many times the yardstick's worst error (see the calibration above).
YARDSTICK_MARGIN = 4.0
#: Factors kept per process, by case digest: one failing case is compared with several oracles.
_KEPT = 256
_kept: OrderedDict[str, dict[str, float]] = OrderedDict()


def condition_number(case: Case) -> float:
    """kappa of ``case`` (see the module docstring); 1.0 for variants without LayerNorm."""
    if case.variant != "layernorm":
        return 1.0
    from oracles.equations import lstm_forward  # the equations every oracle's forward is checked against

    c64 = case.astype("float64")
    kappa = 1.0

    def observe(v: np.ndarray) -> None:  # v (B, H): one LayerNorm input, before normalizing
        nonlocal kappa
        mean = v.mean(axis=-1, keepdims=True)
        var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
        kappa = max(kappa, float(np.sqrt((v**2).mean(axis=-1, keepdims=True) / (var + c64.ln_eps)).max()))

    lstm_forward("layernorm", c64.x, c64.h0, c64.c0, c64.params, ln_eps=c64.ln_eps, observe=observe,
                 structure=c64.structure, lengths=c64.lengths)
    return kappa


def rounding_amplification(case: Case) -> dict[str, float]:
    """{"values": factor, "gradients": factor} for a float32 ``case``, each at least 1 (see the module
    docstring); both 1.0 for another dtype, and where the yardstick cannot run the case (an unwidened
    tolerance never hides a bug)."""
    if case.dtype != "float32":
        return {"values": 1.0, "gradients": 1.0}
    digest = case.digest()
    kept = _kept.get(digest)
    if kept is None:
        try:
            kept = _measured(case, digest)
        except Exception:  # the yardstick is built in and certified; should it fail here, nothing is widened
            kept = {"values": 1.0, "gradients": 1.0}
        _kept[digest] = kept
        while len(_kept) > _KEPT:
            _kept.popitem(last=False)
    _kept.move_to_end(digest)
    return dict(kept)


def _yardstick(case: Case) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The built-in stacked LSTM of the case's variant on ``case``: outputs by name, and gradients."""
    from impls.layernorm import StackedLayerNormLSTM
    from impls.peephole import StackedPeepholeLSTM
    from impls.stacked import StackedLSTM

    cls = {"vanilla": StackedLSTM, "peephole": StackedPeepholeLSTM, "layernorm": StackedLayerNormLSTM}[case.variant]
    impl: Any = cls().with_structure(case.structure)
    impl.ln_eps = case.ln_eps
    kw = {} if case.lengths is None else {"lengths": case.lengths}
    y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params, **kw)
    grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    return {"y": y, "h_T": h_T, "c_T": c_T}, grads


def _worst_ratio(actual: dict[str, np.ndarray], exact: dict[str, np.ndarray], kind: str, kappa: float) -> float:
    """max |actual - exact| / allowed over every finite element of every quantity, allowed as a comparison
    allows it (:func:`harness.compare.allowed_error`) with the table's tolerance times kappa."""
    tol = tolerance("float32", kind).scaled(kappa, "the case's LayerNorm condition number")
    worst = 0.0
    for name, e in exact.items():
        finite = np.isfinite(e)
        if not finite.any():
            continue
        a = np.asarray(actual[name], dtype=np.float64)
        ratio = np.abs(a[finite] - e[finite]) / allowed_error(e, tol)[finite]
        worst = max(worst, float(np.nanmax(ratio, initial=0.0)))  # NaN: a rounding that went wrong, not growth
    return worst


def _measured(case: Case, digest: str) -> dict[str, float]:
    kappa = condition_number(case)
    rng = np.random.default_rng(int(digest, 16))  # the same moves for the same case, in every process
    worst = {"values": 0.0, "gradients": 0.0}
    with np.errstate(all="ignore"):  # the overflow regime: exp overflows on purpose there
        exact_values, exact_grads = _yardstick(case.astype("float64"))
        for _ in range(YARDSTICK_RUNS):
            moved = case.copy()
            # One ulp up or down per element: float32 rounding of the inputs, drawn again.
            moved.x, moved.h0, moved.c0 = (_ulp_moved(a, rng) for a in (case.x, case.h0, case.c0))
            moved.params = {name: _ulp_moved(a, rng) for name, a in case.params.items()}
            values, grads = _yardstick(moved)
            worst["values"] = max(worst["values"], _worst_ratio(values, exact_values, "values", kappa))
            worst["gradients"] = max(worst["gradients"], _worst_ratio(grads, exact_grads, "gradients", kappa))
    return {kind: max(1.0, YARDSTICK_MARGIN * w) for kind, w in worst.items()}


def _ulp_moved(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``a`` with every element moved one ulp towards +inf or -inf, at random (zeros stay zero: an exact
    zero state is not rounded in any implementation)."""
    toward = np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(a.dtype)
    return np.where(a == 0, a, np.nextafter(a, toward))
