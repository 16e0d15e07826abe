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


# --------------------------------------------------------------------------------------------------
# The recurrence's amplification of float32 rounding

#: Drawn by the thorough profile: three bidirectional layers of saturating weights, where a correct float32
#: LSTM errs beyond the table's tolerance (moving the inputs by their rounding moves the exact y 25 times
#: further than the table allows).
CHAOTIC = CaseSpec(variant="vanilla", dtype="float32", T=7, B=1, D=3, H=7, seed=2992130081,
                   weight_scale="saturating", state="zero", upstream="y_only", num_layers=3, bidirectional=True)


def _check(impl, case, oracle=None):
    from harness.check import check_case
    from harness.contract import validate
    from harness.subject import InProcessSubject
    from oracles.finite_diff import FiniteDifferenceOracle

    return check_case(InProcessSubject(impl, validate(impl)), [oracle or FiniteDifferenceOracle()], case)


def test_float64_and_well_conditioned_cases_are_not_widened():
    from harness.conditioning import rounding_amplification

    assert rounding_amplification(build_case(CHAOTIC.replace(dtype="float64"))) == {"values": 1.0, "gradients": 1.0}
    for spec in (CaseSpec(dtype="float32"), CaseSpec(variant="layernorm", dtype="float32", T=5, H=6),
                 CaseSpec(variant="peephole", dtype="float32", weight_scale="large", num_layers=2)):
        assert rounding_amplification(build_case(spec)) == {"values": 1.0, "gradients": 1.0}, spec


def test_a_chaotic_case_is_widened_by_a_correct_float32_lstms_own_error(monkeypatch):
    """The loop (not the yardstick, which is the stacked LSTM) fails the table's float32 tolerance on the
    case and passes the widened one; the factor is what the yardstick's own worst error says, recomputed
    here from its float32 and float64 runs."""
    import harness.check
    from harness.conditioning import AMPLIFICATION, YARDSTICK_MARGIN, YARDSTICK_RUNS, rounding_amplification
    from impls.loop import LoopLSTM
    from impls.stacked import StackedLSTM

    case = build_case(CHAOTIC)
    factors = rounding_amplification(case)
    assert factors["values"] > 10 and factors["gradients"] > 1
    assert rounding_amplification(case) == factors  # kept, and the same again

    # The stacked LSTM's float32 error on the case itself is a lower bound of what the yardstick saw on its
    # moved inputs: the factor is at least the margin times it.
    impl = StackedLSTM().with_structure(case.structure)
    y32 = impl.forward(case.x, case.h0, case.c0, case.params)[0]
    c64 = case.astype("float64")
    y64 = impl.forward(c64.x, c64.h0, c64.c0, c64.params)[0]
    allowed = 5e-5 * max(1.0, float(np.abs(y64).max())) + 5e-5 * np.abs(y64)
    assert float((np.abs(y32 - y64) / allowed).max()) > 1  # the table's tolerance cannot hold here
    assert factors["values"] >= YARDSTICK_MARGIN * float((np.abs(y32 - y64) / allowed).max())
    assert YARDSTICK_RUNS >= 2

    records = _check(LoopLSTM(), case)
    assert all(r.status == "pass" for r in records), [r.message for r in records if r.status != "pass"]
    y = next(r for r in records if r.quantity == "y")
    assert y.tolerance_factors[AMPLIFICATION] == factors["values"]
    assert y.rtol == pytest.approx(5e-5 * factors["values"])

    monkeypatch.setattr(harness.check, "rounding_amplification", lambda case: {"values": 1.0, "gradients": 1.0})
    unwidened = {r.quantity: r for r in _check(LoopLSTM(), case)}
    assert unwidened["y"].status == "fail" and AMPLIFICATION not in unwidened["y"].tolerance_factors


def test_only_a_failing_float32_comparison_is_measured(monkeypatch):
    import harness.check
    from harness.conditioning import AMPLIFICATION
    from impls.stacked import StackedLSTM
    from tests.meta.broken_vanilla import StudentLSTM

    measured = []
    monkeypatch.setattr(harness.check, "rounding_amplification",
                        lambda case: measured.append(case) or {"values": 1.0, "gradients": 1.0})
    case = build_case(CaseSpec(dtype="float32", T=4, B=2, D=3, H=4, seed=5))
    assert all(r.status == "pass" for r in _check(StackedLSTM(), case)) and not measured
    assert all(r.status == "pass" for r in _check(StackedLSTM(), case.astype("float64"))) and not measured
    # A bug fails in a well-conditioned case: measured, the factor is 1, and the bug stays caught.
    records = _check(StudentLSTM("gates_swapped"), case)
    assert measured and {r.quantity for r in records if r.status == "fail"} >= {"y", "h_T", "c_T"}
    assert not any(AMPLIFICATION in r.tolerance_factors for r in records)


def test_the_widening_stays_a_few_times_a_correct_lstms_own_error(monkeypatch):
    """In a case where correct float32 LSTMs err about 20 times the table's gradient tolerance, the
    tolerance is widened to pass them, not to hundreds of times their error, and gross bugs stay caught.
    (One layer, as the planted LSTM computes; a case the calibration drew. A bug whose error there is
    comparable to a correct LSTM's own is caught in the well-conditioned cases, where the factor is 1:
    tests/meta.)"""
    import harness.check
    from harness.conditioning import AMPLIFICATION, rounding_amplification
    from tests.meta.broken_vanilla import StudentLSTM

    case = build_case(CaseSpec(dtype="float32", T=21, B=2, D=1, H=7, seed=330737387, weight_scale="saturating",
                               state="zero", upstream="all"))
    factors = rounding_amplification(case)
    assert all(r.status == "pass" for r in _check(StudentLSTM(), case))
    for bug in ("gates_swapped", "tanh_derivative"):
        assert any(r.status == "fail" and AMPLIFICATION in r.tolerance_factors
                   for r in _check(StudentLSTM(bug), case)), bug

    monkeypatch.setattr(harness.check, "rounding_amplification", lambda case: {"values": 1.0, "gradients": 1.0})
    own = {"values": 0.0, "gradients": 0.0}
    for r in _check(StudentLSTM(), case):
        kind = "values" if r.direction == "forward" else "gradients"
        own[kind] = max(own[kind], r.ratio)
    assert own["values"] > 1 and own["gradients"] > 1  # the table's float32 tolerance cannot hold here
    for kind in own:
        assert own[kind] <= factors[kind] <= 16 * own[kind], (kind, own, factors)
