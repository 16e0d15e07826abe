"""The finite-difference oracle on functions whose derivatives are known in closed form."""

import numpy as np
import pytest

from harness.cases import CaseSpec, build_case
from harness.check import check_case
from harness.contract import validate
from harness.subject import InProcessSubject
from impls.loop import LoopLSTM
from oracles.equations import lstm_forward
from oracles.finite_diff import STEP, FiniteDifferenceOracle


def known_forward(variant, x, h0, c0, params, *, ln_eps=1e-5):
    """A smooth LSTM-shaped function with hand-derivable gradients (batched over leading axes).

    y_t = sin(x_t W1^T) + h0 * c0,  h_T = h0^3,  c_T = exp(c0) * b1,  with W1 = W[:H], b1 = b[:H].
    """
    H = h0.shape[-1]
    W1T = np.swapaxes(params["W"][..., :H, :], -1, -2)[..., None, :, :]  # (..., 1, D, H)
    y = np.sin(x @ W1T) + (h0 * c0)[..., None, :, :]  # (..., T, B, H)
    return y, h0**3, np.exp(c0) * params["b"][..., None, :H]


def known_gradient(case):
    x, h0, c0, W, b = case.x, case.h0, case.c0, case.params["W"], case.params["b"]
    H = case.H
    W1, b1 = W[:H], b[:H]
    inner = case.dy * np.cos(x @ W1.T)  # (T, B, H)
    dW = np.zeros_like(W)
    dW[:H] = np.einsum("tbh,tbd->hd", inner, x)
    db = np.zeros_like(b)
    db[:H] = (case.dc_T * np.exp(c0)).sum(axis=0)
    return {
        "x": inner @ W1,
        "h0": case.dy.sum(axis=0) * c0 + case.dh_T * 3 * h0**2,
        "c0": case.dy.sum(axis=0) * h0 + case.dc_T * np.exp(c0) * b1,
        "W": dW,
        "R": np.zeros_like(case.params["R"]),
        "b": db,
    }


@pytest.fixture
def case():
    return build_case(CaseSpec(T=3, B=2, D=3, H=4, seed=7))


def test_step_comes_from_the_error_model():
    assert STEP == pytest.approx((3 * np.finfo(float).eps) ** (1 / 3))


def test_full_gradient_matches_the_closed_form_within_its_own_bound(case):
    ref = FiniteDifferenceOracle(known_forward).reference(case)
    exact = known_gradient(case)
    for key, g in exact.items():
        err = np.abs(ref.gradients[key] - g)
        assert (err <= ref.gradient_error[key]).all(), key  # the bound really bounds
        assert ref.gradient_error[key].max() < 1e-6, key  # and is tight enough to be useful
        assert err.max() < 1e-8, key


def test_projections_match_the_closed_form_within_their_bound(case):
    ref = FiniteDifferenceOracle(known_forward, full_limit=0, directions=4).reference(case)
    assert ref.gradients is None
    for key, g in known_gradient(case).items():
        proj = ref.projections[key]
        exact = np.tensordot(proj.directions, g, axes=g.ndim)
        assert proj.values.shape == (4,)
        assert (np.abs(proj.values - exact) <= proj.error_bound).all(), key


def test_forward_outputs_are_the_function_values(case):
    ref = FiniteDifferenceOracle(known_forward).reference(case)
    y, h_T, c_T = known_forward("vanilla", case.x, case.h0, case.c0, case.params)
    np.testing.assert_array_equal(ref.outputs["y"], y)
    np.testing.assert_array_equal(ref.outputs["c_T"], c_T)


def test_unbatched_forward_of_an_implementation_gives_the_same_gradient():
    """gradcheck style: a user's own forward, called once per perturbation."""
    case = build_case(CaseSpec(T=2, B=2, D=2, H=3, seed=3))
    impl = LoopLSTM()

    def impl_forward(variant, x, h0, c0, params, *, ln_eps):
        return impl.forward(x, h0, c0, params)[:3]

    own = FiniteDifferenceOracle(impl_forward, batched=False).reference(case)
    equations = FiniteDifferenceOracle().reference(case)
    for key in own.gradients:
        bound = own.gradient_error[key] + equations.gradient_error[key]
        assert (np.abs(own.gradients[key] - equations.gradients[key]) <= bound).all(), key


def test_argument_validation():
    with pytest.raises(ValueError, match="directions: expected an int >= 1, got 0"):
        FiniteDifferenceOracle(directions=0)
    with pytest.raises(ValueError, match="full_limit: expected an int >= 0"):
        FiniteDifferenceOracle(full_limit=-1)


class SlightlyWrongW(LoopLSTM):
    name = "slightly-wrong-dW"

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["W"] = grads["W"] * (1 + 1e-4)
        return grads


@pytest.mark.parametrize("full_limit", [4096, 0], ids=["elementwise", "projections"])
def test_a_small_gradient_error_is_caught_on_the_right_quantity_only(full_limit):
    case = build_case(CaseSpec(T=3, B=2, D=3, H=4, seed=1))
    impl = SlightlyWrongW()
    records = check_case(InProcessSubject(impl, validate(impl)), [FiniteDifferenceOracle(full_limit=full_limit)],
                         case)
    failing = {r.quantity for r in records if r.status == "fail"}
    assert failing == {"dW"}
    assert all(r.status == "pass" for r in records if r.quantity != "dW")


# LayerNorm rows of tiny weights have variance below eps: L bends on a scale smaller than the
# error-model step, where a single-step quotient was off by up to 300x (reported against torch's
# and the hand-written gradients, which agree with each other).
SHARP_LAYERNORM = [
    CaseSpec(variant="layernorm", T=1, B=3, D=3, H=3, seed=512, weight_scale="tiny", state="zero",
             extra_scale="zero", gain="unit"),
    CaseSpec(variant="layernorm", T=5, B=1, D=1, H=2, seed=4, weight_scale="tiny", state="zero",
             extra_scale="zero", gain="unit"),
]


@pytest.mark.parametrize("spec", SHARP_LAYERNORM, ids=["T1-H3", "T5-H2"])
def test_step_ladder_gives_no_false_alarm_where_the_function_bends_sharply(spec):
    from impls.layernorm import StackedLayerNormLSTM

    impl = StackedLayerNormLSTM()
    records = check_case(InProcessSubject(impl, validate(impl)), [FiniteDifferenceOracle()], build_case(spec))
    assert all(r.status == "pass" for r in records), "\n\n".join(r.message for r in records if not r.ok)


def test_step_ladder_keeps_the_bound_tight_on_smooth_cases(case):
    ref = FiniteDifferenceOracle().reference(case)
    for key, bound in ref.gradient_error.items():
        assert bound.max() < 1e-7, key


@pytest.mark.parametrize("spec", [CaseSpec(T=3, B=2, D=3, H=4, seed=7), *SHARP_LAYERNORM],
                         ids=["smooth", "T1-H3", "T5-H2"])
def test_the_small_steps_are_taken_only_where_they_can_change_the_result(spec, monkeypatch):
    """Against the whole ladder at every coordinate: the same values (the settled ones are provably
    what the whole ladder keeps), bounds at most as wide, and fewer evaluations where L is smooth."""
    from oracles import finite_diff

    counts = []
    real = FiniteDifferenceOracle._objective

    def counting(self, case, perturbations):
        counts.append(len(perturbations))
        return real(self, case, perturbations)

    monkeypatch.setattr(FiniteDifferenceOracle, "_objective", counting)
    first, ladder = finite_diff.FIRST_RUNGS, finite_diff.LADDER
    case = build_case(spec)
    lazy = FiniteDifferenceOracle().reference(case)
    lazy_evals, counts[:] = sum(counts), []
    monkeypatch.setattr(finite_diff, "FIRST_RUNGS", finite_diff.LADDER)
    full = FiniteDifferenceOracle().reference(case)
    n = sum(a.size for a in case.arrays().values())
    assert sum(counts) == 2 * ladder * n
    for key, value in full.gradients.items():
        np.testing.assert_array_equal(lazy.gradients[key], value, err_msg=key)
        # the bound's rounding term uses the largest |terms of L| over the steps taken: a few fewer
        assert np.all(lazy.gradient_error[key] <= full.gradient_error[key] * (1 + 1e-9)), key
    if spec.variant == "vanilla":
        assert lazy_evals == 2 * first * n  # nothing bends: no coordinate needs more
    else:
        assert 2 * first * n < lazy_evals < 2 * ladder * n


# Small cases of every variant with B > 1, so that moves of x, h0 and c0 are folded into batch rows.
# (With B = 1 a forward called once per point multiplies single rows, which NumPy does with another
# BLAS routine than the batch's product of many rows: the same up to rounding, not to the last bit.)
FIXED = [
    CaseSpec(variant="vanilla", T=3, B=3, D=2, H=3, seed=11),
    CaseSpec(variant="peephole", T=2, B=2, D=3, H=2, seed=12, weight_scale="large"),
    CaseSpec(variant="layernorm", T=2, B=3, D=2, H=3, seed=13, gain="random"),
]
FIXED_IDS = ["vanilla", "peephole", "layernorm"]
ROW_KEYS = ("x", "h0", "c0")


def one_at_a_time(case, **kwargs):
    """The reference for the batched evaluation: the equations called once per point, on the whole case."""
    return FiniteDifferenceOracle(lstm_forward, batched=False, **kwargs).reference(case)


@pytest.mark.parametrize("spec", FIXED, ids=FIXED_IDS)
def test_the_forward_with_evaluation_axes_is_the_forward_of_each_copy_to_the_last_bit(spec):
    case = build_case(spec)
    rng = np.random.default_rng(0)
    for key in ("W", "R", case.variant == "layernorm" and "gamma" or "b"):
        copies = case.params[key] + 1e-3 * rng.standard_normal((5, *case.params[key].shape))  # (5, *shape)
        y, h_T, c_T = lstm_forward(spec.variant, case.x, case.h0, case.c0, {**case.params, key: copies})
        for e in range(5):
            one = lstm_forward(spec.variant, case.x, case.h0, case.c0, {**case.params, key: copies[e]})
            for batched, single in zip((y[e], h_T[e], c_T[e]), one):
                np.testing.assert_array_equal(batched, single, err_msg=key)
    # Batch rows never meet: reversing them reverses the outputs, bit for bit.
    y, h_T, c_T = lstm_forward(spec.variant, case.x, case.h0, case.c0, case.params)
    flipped = lstm_forward(spec.variant, case.x[:, ::-1], case.h0[::-1], case.c0[::-1], case.params)
    for whole, reversed_ in zip((y, h_T, c_T), flipped):
        np.testing.assert_array_equal(whole, np.flip(reversed_, axis=-2))


@pytest.mark.parametrize("spec", FIXED, ids=FIXED_IDS)
def test_batched_whole_gradient_is_the_one_at_a_time_gradient(spec):
    """Moves of the weights: the same operations on the same numbers, so the same bits. Coordinates
    of x, h0 and c0 are evaluated on their own batch row: L's terms from the other rows, which
    cancel in the difference, are left out, so the value moves by rounding only (measured: 1.2% of
    the bound at most) and the bound, whose rounding term scales with |terms of L|, can only shrink."""
    case = build_case(spec)
    batched, single = FiniteDifferenceOracle().reference(case), one_at_a_time(case)
    for key, g in single.gradients.items():
        bound = single.gradient_error[key]
        if key in ROW_KEYS:
            assert np.all(np.abs(batched.gradients[key] - g) <= 0.1 * bound), key
            assert np.all(batched.gradient_error[key] <= bound), key
            assert batched.gradient_error[key].sum() < 0.8 * bound.sum(), key  # narrower, not only equal
        else:
            np.testing.assert_array_equal(batched.gradients[key], g, err_msg=key)
            np.testing.assert_array_equal(batched.gradient_error[key], bound, err_msg=key)


@pytest.mark.parametrize("spec", FIXED, ids=FIXED_IDS)
def test_batched_projections_are_the_one_at_a_time_projections_to_the_last_bit(spec):
    """A random direction moves every batch row, so every input goes through the whole batch."""
    case = build_case(spec)
    batched, single = FiniteDifferenceOracle(full_limit=0).reference(case), one_at_a_time(case, full_limit=0)
    for key, p in single.projections.items():
        np.testing.assert_array_equal(batched.projections[key].directions, p.directions, err_msg=key)
        np.testing.assert_array_equal(batched.projections[key].values, p.values, err_msg=key)
        np.testing.assert_array_equal(batched.projections[key].error_bound, p.error_bound, err_msg=key)


def _layer_norm_by_mean(v, gamma, beta, eps):
    """LayerNorm with the row sums of ``mean``, as the equations computed it before einsum."""
    mean = v.mean(axis=-1, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
    return (v - mean) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("spec", [FIXED[2], FIXED[2].replace(T=3, B=2, seed=21, weight_scale="small")],
                         ids=["random-gain", "small-weights"])
def test_layernorm_row_sums_by_einsum_leave_the_bounds_as_wide_as_by_mean(spec, monkeypatch):
    """einsum adds a row in another order than ``mean``: the values move by rounding and the bounds'
    measured part (the ladder's disagreement, itself rounding noise on a smooth case) moves a little
    either way. Against the sums of ``mean``: values within a tenth of the bound, bounds no wider
    in total over each input, no element more than a quarter wider (measured: 7% at most)."""
    from oracles import equations

    case = build_case(spec)
    ours = FiniteDifferenceOracle().reference(case)
    monkeypatch.setattr(equations, "_layer_norm", _layer_norm_by_mean)
    before = FiniteDifferenceOracle().reference(case)
    for key, bound in before.gradient_error.items():
        assert np.all(np.abs(ours.gradients[key] - before.gradients[key]) <= 0.1 * bound), key
        assert ours.gradient_error[key].sum() <= 1.01 * bound.sum(), key
        assert np.all(ours.gradient_error[key] <= 1.25 * bound), key
