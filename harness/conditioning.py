"""How much rounding a case amplifies: the condition number its tolerances are scaled by.

A LayerNorm row is centred and divided by sqrt(var + eps). When the units of a row nearly agree
(variance comparable to eps or below) while its values sit far from zero, the subtraction of the
mean cancels their leading digits: a relative rounding error u in the row's values becomes

    u * rms(v) / sqrt(var(v) + eps)

in the normalized output, and the same factor multiplies what flows back through the row in the
backward pass. This is a property of the case, not of the implementation: every implementation
that forms W x_t + R h_{t-1} (or f * c_{t-1} + i * g) in the case's dtype before normalizing
inherits it, so the tolerance must too. The condition number of a case is

    kappa = max(1, max over timesteps, batch rows and LayerNorm rows k of sqrt(mean(v^2) / (var(v) + eps)))

computed in float64 from the LSTM equations on the case's exact values; vanilla and peephole cases
have kappa = 1. The comparison multiplies rtol and atol by kappa (:meth:`Tolerance.scaled`).

Measured with the float64 torch composite as reference, on 2000 generated float32
LayerNorm cases with ``rows="near_constant"``: worst error 2.7e3 (values) and 7.6e3 (gradients)
times the unscaled float32 tolerance, with kappa up to 1.2e4; divided by kappa, at most 0.52 and
0.70. On 2000 cases with ``rows="random"`` the worst unscaled error was 0.999 of the tolerance,
and 0.15 after scaling. Planted bugs (tests/meta/test_variant_bugs.py) stay caught: they show in
ordinary cases, where kappa is near 1.
"""

from __future__ import annotations

import numpy as np

from harness.cases import Case

__all__ = ["condition_number"]


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
