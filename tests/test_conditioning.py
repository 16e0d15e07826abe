"""The LayerNorm condition number of a case, measured on the LSTM equations through their observe hook."""

from __future__ import annotations

import numpy as np
import pytest

from harness.cases import CaseSpec, build_case
from harness.conditioning import condition_number
from oracles.equations import lstm_forward


def _case(variant="layernorm", **kw):
    return build_case(CaseSpec(variant=variant, T=3, B=2, D=3, H=5, seed=kw.pop("seed", 2), **kw))


def test_observe_sees_every_layernorm_input_and_changes_nothing():
    c = _case()
    seen = []
    with_hook = lstm_forward("layernorm", c.x, c.h0, c.c0, c.params, ln_eps=c.ln_eps, observe=seen.append)
    without = lstm_forward("layernorm", c.x, c.h0, c.c0, c.params, ln_eps=c.ln_eps)
    assert len(seen) == 5 * c.T  # four gates and the cell, per timestep
    assert all(v.shape == (c.B, c.H) for v in seen)
    for a, b in zip(with_hook, without):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["vanilla", "peephole"])
def test_no_layernorm_no_amplification(variant):
    assert condition_number(_case(variant)) == 1.0


def test_near_constant_rows_are_ill_conditioned():
    """kappa = max sqrt(mean(v^2) / (var(v) + eps)) over the LayerNorm inputs v; recomputed here from
    the observed inputs, and large when W's and R's rows of a gate nearly agree."""
    for rows, at_least in (("random", 1.0), ("near_constant", 10.0)):
        c = _case(rows=rows).astype("float64")
        seen = []
        lstm_forward("layernorm", c.x, c.h0, c.c0, c.params, ln_eps=c.ln_eps, observe=seen.append)
        expected = max(1.0, max(float(np.max(np.sqrt((v**2).mean(-1) / (v.var(-1) + c.ln_eps)))) for v in seen))
        kappa = condition_number(c)
        assert kappa == pytest.approx(expected, rel=1e-12)
        assert kappa >= at_least
