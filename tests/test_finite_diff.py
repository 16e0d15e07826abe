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


#: Near-constant rows under saturating weights, drawn by the thorough profile: in the gate g rows of W
#: the spread is 1e-5 under a step of 1e-4, and the two largest steps agree with each other (-4103 at
#: W[8, 0]) on the far side of a bend that only steps of 1e-6 resolve (-78360). The bound once came
#: from that pair alone (5360) and the oracle reported a correct implementation 14 times over.
FALSE_PLATEAU = CaseSpec(variant="layernorm", T=2, B=1, D=1, H=4, seed=1875887670, weight_scale="saturating",
                         state="zero", extra_scale="zero", upstream="all", rows="near_constant")


def test_a_false_plateau_of_large_steps_gets_the_bound_the_finer_steps_show():
    from impls.layernorm import LoopLayerNormLSTM, StackedLayerNormLSTM

    case = build_case(FALSE_PLATEAU)
    loop = LoopLayerNormLSTM()
    y, h, c, cache = loop.forward(case.x, case.h0, case.c0, case.params)
    exact = loop.backward(case.dy, case.dh_T, case.dc_T, cache)
    ref = FiniteDifferenceOracle().reference(case)
    for key, value in ref.gradients.items():
        assert np.all(np.abs(value - exact[key]) <= ref.gradient_error[key] + 1e-9 * np.abs(exact[key])), key
    assert abs(ref.gradients["W"][8, 0] - exact["W"][8, 0]) > 1e4  # the plateau is there, and the bound holds it
    impl = StackedLayerNormLSTM()
    records = check_case(InProcessSubject(impl, validate(impl)), [FiniteDifferenceOracle()], case)
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


# ----------------------------------------------------------------------------------------------
# The whole LSTM layer: stacked layers, both directions, lengths, projection, CIFG, clip

from harness.structure import FEATURES, Structure  # noqa: E402
from oracles import finite_diff  # noqa: E402
from tests.structured import structured_case  # noqa: E402
from tests.torch_layer import TORCH_STRUCTURES, torch_reference  # noqa: E402

TORCH_STRUCTURES = {
    **TORCH_STRUCTURES,
    "three-layers-reverse-lengths": Structure(num_layers=3, bidirectional=True, lengths=True),
}


def beyond_bound(value, expected, bound, *, rel=1e-12):
    """Where |value - expected| exceeds the oracle's bound plus rounding of the expected value's own size."""
    return np.abs(value - expected) > bound + rel * np.maximum(1.0, np.abs(expected))


def test_the_oracle_computes_every_structure_feature():
    fd = FiniteDifferenceOracle()
    assert fd.structures == frozenset(FEATURES)
    everything = Structure(num_layers=2, bidirectional=True, proj_size=2, coupled_input_forget=True, cell_clip=3.0,
                           lengths=True)
    assert fd.unsupported_reason("peephole", "float32", everything) is None
    with pytest.raises(ValueError, match="structure: proj_size: a projection is not defined for the layernorm"):
        fd.reference(structured_case(Structure(proj_size=2), variant="layernorm"))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(TORCH_STRUCTURES))
def test_whole_gradient_matches_torch_lstm_within_its_bound(name, dtype):
    case = structured_case(TORCH_STRUCTURES[name], dtype=dtype, T=5, B=3, D=3, H=3, seed=4,
                           lengths=[2, 5, 1] if TORCH_STRUCTURES[name].lengths else None)
    outputs, grads = torch_reference(case)  # on the float64 upcast of the same numbers
    ref = FiniteDifferenceOracle().reference(case)
    assert ref.gradients is not None and set(ref.gradients) == set(case.arrays()) == set(grads)
    for q, value in outputs.items():
        np.testing.assert_allclose(ref.outputs[q], value, rtol=0, atol=1e-13, err_msg=q)
    for key, g in grads.items():
        assert not beyond_bound(ref.gradients[key], g, ref.gradient_error[key]).any(), key
        assert ref.gradient_error[key].max() < 1e-6, key  # tight enough to catch a real error


@pytest.mark.parametrize("name", ["all", "lengths"])
def test_projections_match_torch_lstm_within_their_bound(name):
    case = structured_case(TORCH_STRUCTURES[name], T=4, B=3, D=3, H=3, seed=5, lengths=[4, 1, 3])
    _, grads = torch_reference(case)
    ref = FiniteDifferenceOracle(full_limit=0, directions=3).reference(case)
    assert set(ref.projections) == set(grads)
    for key, g in grads.items():
        p = ref.projections[key]
        exact = np.tensordot(p.directions, g, axes=g.ndim)
        assert not beyond_bound(p.values, exact, p.error_bound).any(), key
    # x has padded steps: one more direction, on them alone, with derivative exactly 0
    p = ref.projections["x"]
    assert len(p.values) == 4 and p.values[-1] == 0.0 and p.error_bound[-1] == 0.0
    padded = np.arange(case.T)[:, None] >= case.lengths[None, :]  # (T, B)
    assert np.all(p.directions[-1][~padded] == 0.0) and np.all(p.directions[-1][padded] != 0.0)


def test_padded_steps_of_x_are_exactly_zero_and_differencing_them_agrees(monkeypatch):
    """The oracle does not difference x where no step exists (the equations never read it: exactly 0,
    bound 0); differenced anyway, every quotient there is exactly 0 too, as the masks make L bitwise
    independent of those coordinates."""
    case = structured_case(Structure(bidirectional=True, lengths=True), T=5, B=3, D=2, H=3, seed=6,
                           lengths=[3, 5, 1])
    padded = np.arange(5)[:, None] >= case.lengths[None, :]
    ref = FiniteDifferenceOracle().reference(case)
    assert np.all(ref.gradients["x"][padded] == 0.0) and np.all(ref.gradient_error["x"][padded] == 0.0)
    assert np.all(ref.gradients["x"][~padded] != 0.0)
    assert "exactly 0 by construction, not differenced: 12 of x" in ref.notes
    monkeypatch.setattr(finite_diff, "_unread", lambda case: {})
    differenced = FiniteDifferenceOracle().reference(case)
    assert np.all(differenced.gradients["x"][padded] == 0.0)
    np.testing.assert_array_equal(differenced.gradients["x"][~padded], ref.gradients["x"][~padded])


@pytest.mark.parametrize("variant", ["vanilla", "peephole", "layernorm"])
def test_cifg_forget_block_gradient_is_exactly_zero_and_the_rest_is_differenced(variant):
    s = Structure(bidirectional=True, coupled_input_forget=True)
    case = structured_case(s, variant=variant, T=3, B=2, D=2, H=3, seed=7)
    ref = FiniteDifferenceOracle().reference(case)
    H = case.H
    for prefix in ("l0.", "l0.reverse."):
        for bare in ("W", "R", "b"):
            if prefix + bare in ref.gradients:
                g = ref.gradients[prefix + bare]
                assert np.all(g[H : 2 * H] == 0) and np.all(ref.gradient_error[prefix + bare][H : 2 * H] == 0)
                assert np.abs(g[:H]).min() > 0 and np.abs(g[2 * H :]).min() > 0
        if variant == "peephole":
            assert np.all(ref.gradients[prefix + "p_f"] == 0)
        if variant == "layernorm":
            assert np.all(ref.gradients[prefix + "gamma"][1] == 0) and np.all(ref.gradients[prefix + "beta"][1] == 0)
            assert np.abs(ref.gradients[prefix + "gamma"][[0, 2, 3, 4]]).min() > 0


def _clip_case(clip, *, T=1, seed=8, variant="vanilla"):
    return structured_case(Structure(cell_clip=clip), variant=variant, T=T, B=3, D=2, H=4, seed=seed,
                           weight_scale=3.0)


def _pre_clip_cells(case):
    """The cell states before the clip (or where it would be), step by step, from the equations' hook."""
    seen = []
    lstm_forward(case.variant, case.x, case.h0, case.c0, case.params,
                 structure=case.structure.replace(cell_clip=case.structure.cell_clip or 1e300),
                 clipped=lambda c, valid: seen.append(c))
    return np.stack(seen)  # (T, B, H)


def test_gradient_through_a_clipped_cell_is_zero():
    """T = 1 vanilla: c_1 = clip(f * c0 + i * g), and c0 reaches L only through c_1 (element by element),
    so dc0 is exactly 0 where the cell was clipped and not elsewhere. The clip is chosen so that about half
    the cells are cut, every one far from the boundary."""
    plain = _clip_case(None)
    c = np.abs(_pre_clip_cells(plain)[0])
    clip = float(np.median(c))
    assert np.abs(c - clip).min() > 1e-3
    case = _clip_case(clip)
    ref = FiniteDifferenceOracle().reference(case)
    cut = c > clip
    assert cut.any() and (~cut).any()
    assert np.all(np.abs(ref.gradients["c0"][cut]) <= ref.gradient_error["c0"][cut])
    assert np.all(np.abs(ref.gradients["c0"][~cut]) > 10 * ref.gradient_error["c0"][~cut])
    assert np.all(np.abs(ref.outputs["c_T"]) <= clip)
    assert "crossed" not in ref.notes and f"cell_clip={clip:g}" in ref.notes
    # a clip no cell reaches changes nothing: the plain LSTM's gradient, bit for bit
    far = FiniteDifferenceOracle().reference(_clip_case(1e6))
    plain_ref = FiniteDifferenceOracle().reference(plain)
    for key, g in plain_ref.gradients.items():
        np.testing.assert_array_equal(far.gradients[key], g, err_msg=key)


def test_a_step_across_the_clip_boundary_is_left_out_not_reported_as_a_value():
    """A cell 1e-8 inside the clip (the largest is cut by 1e-8, every other cell is inside): the ladder's
    points on the other side see another function (a kink). The oracle notices (another set of clipped
    cells than at the case), leaves those points out and says so; every value keeps a bound that holds.
    Rows other than the cut cell's see the plain LSTM (torch.nn.LSTM, exact); the cut cell's dc0 is one
    of its one-sided derivatives (0 above, the plain one below) or unbounded."""
    plain = _clip_case(None, seed=9)
    c = np.abs(_pre_clip_cells(plain)[0])
    case = _clip_case(float(c.max()) - 1e-8, seed=9)
    _, exact = torch_reference(plain)
    ref = FiniteDifferenceOracle().reference(case)
    assert "perturbed points crossed it" in ref.notes, ref.notes
    b, j = np.unravel_index(np.argmax(c), c.shape)
    rows = np.arange(case.B) != b
    for key, sel in (("x", (slice(None), rows)), ("h0", (rows,)), ("c0", (rows,))):
        g, bound = ref.gradients[key], ref.gradient_error[key]
        assert np.all(np.isfinite(g)), key
        # the clip moves the cut cell by 1e-8, and L with it by about as much: a relative 1e-7 covers it
        assert not beyond_bound(g[sel], exact[key][sel], bound[sel], rel=1e-7).any(), key
    g, bound = ref.gradients["c0"][b, j], ref.gradient_error["c0"][b, j]
    assert np.isinf(bound) or abs(g) <= bound or abs(g - exact["c0"][b, j]) <= bound


def test_without_the_crossing_detection_the_kink_would_be_a_false_alarm(monkeypatch):
    plain = _clip_case(None, seed=9)
    c = np.abs(_pre_clip_cells(plain)[0])
    case = _clip_case(float(c.max()) - 1e-8, seed=9)
    b, j = np.unravel_index(np.argmax(c), c.shape)
    honest = FiniteDifferenceOracle().reference(case)
    monkeypatch.setattr(finite_diff._Crossings, "any", lambda self: np.zeros(self.E, dtype=bool))
    blind = FiniteDifferenceOracle().reference(case)
    assert "crossed" not in blind.notes
    # The one-sided truths at the cut cell are 0 (clipped side) and the plain derivative (inside); a blind
    # quotient averages them, and its bound (from rungs that all straddle the kink) does not cover either.
    _, exact = torch_reference(plain)
    g, bound = blind.gradients["c0"][b, j], blind.gradient_error["c0"][b, j]
    assert abs(g - 0.0) > bound and abs(g - exact["c0"][b, j]) > bound
    h, hb = honest.gradients["c0"][b, j], honest.gradient_error["c0"][b, j]
    assert abs(h - 0.0) <= hb or abs(h - exact["c0"][b, j]) <= hb


# Deliberately broken forwards: their gradients (by finite differences of themselves, as a user's own
# forward would be checked) must disagree with the equations' beyond both bounds, on the quantities the
# bug touches.

def _reverse_h_T_at_the_last_step(variant, x, h0, c0, params, *, ln_eps, structure, lengths):
    """Bug: the reverse direction's h_T taken at t = T-1 (its first step) instead of after t = 0."""
    y, h_T, c_T = lstm_forward(variant, x, h0, c0, params, ln_eps=ln_eps, structure=structure, lengths=lengths)
    H_out = h0.shape[-1]
    h_T = h_T.copy()
    h_T[..., 1, :, :] = y[..., -1, :, H_out:]
    return y, h_T, c_T


def _padded_steps_update_the_state(variant, x, h0, c0, params, *, ln_eps, structure, lengths):
    """Bug: the lengths ignored; every row runs all T steps (then y is zeroed where no step exists)."""
    y, h_T, c_T = lstm_forward(variant, x, h0, c0, params, ln_eps=ln_eps, structure=structure.replace(lengths=False))
    return y * (np.arange(x.shape[-3])[:, None] < lengths[None, :])[..., None], h_T, c_T


def _cifg_with_a_separate_forget_gate(variant, x, h0, c0, params, *, ln_eps, structure, lengths):
    return lstm_forward(variant, x, h0, c0, params, ln_eps=ln_eps, lengths=lengths,
                        structure=structure.replace(coupled_input_forget=False))


def _layer_1_fed_h_T(variant, x, h0, c0, params, *, ln_eps, structure, lengths):
    """Bug: layer 1 reads layer 0's final state at every step instead of its outputs y."""
    first = Structure(lengths=structure.lengths)
    own = {k[3:]: v for k, v in params.items() if k.startswith("l0.")}
    _, h_T0, c_T0 = lstm_forward(variant, x, h0[0], c0[0], own, ln_eps=ln_eps, structure=first, lengths=lengths)
    fed = np.broadcast_to(h_T0, x.shape[:-1] + h_T0.shape[-1:])
    upper = {k[3:]: v for k, v in params.items() if k.startswith("l1.")}
    y, h_T1, c_T1 = lstm_forward(variant, fed, h0[1], c0[1], upper, ln_eps=ln_eps, structure=first, lengths=lengths)
    return y, np.stack([h_T0, h_T1]), np.stack([c_T0, c_T1])


BROKEN = {
    "reverse-h_T-at-T-1": (_reverse_h_T_at_the_last_step, Structure(bidirectional=True), {"h0", "c0", "x"}),
    "padded-steps-update": (_padded_steps_update_the_state, Structure(lengths=True), {"h0", "c0", "x"}),
    "cifg-separate-forget": (_cifg_with_a_separate_forget_gate, Structure(coupled_input_forget=True), {"W", "b"}),
    "layer-1-fed-h_T": (_layer_1_fed_h_T, Structure(num_layers=2), {"x", "l0.W", "l1.W"}),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_forward_is_told_apart_by_its_gradient(name):
    broken, structure, touched = BROKEN[name]
    case = structured_case(structure, T=4, B=3, D=2, H=3, seed=10, lengths=[2, 4, 1] if structure.lengths else None)
    right = FiniteDifferenceOracle().reference(case)
    wrong = FiniteDifferenceOracle(broken, batched=False, name="broken").reference(case)
    apart = {k for k, g in right.gradients.items()
             if beyond_bound(wrong.gradients[k], g, right.gradient_error[k] + wrong.gradient_error[k], rel=1e-9).any()}
    assert touched <= apart, (name, apart)


def test_a_missing_projection_gradient_is_caught_against_the_oracle():
    case = structured_case(Structure(bidirectional=True, proj_size=2), T=3, B=2, D=2, H=3, seed=11)
    ref = FiniteDifferenceOracle().reference(case)
    _, grads = torch_reference(case)
    for key in ("l0.proj", "l0.reverse.proj"):
        assert not beyond_bound(ref.gradients[key], grads[key], ref.gradient_error[key]).any()
        assert beyond_bound(ref.gradients[key], np.zeros_like(grads[key]), ref.gradient_error[key]).all()


def test_structured_rows_are_evaluated_like_the_whole_batch():
    """Moves of x, h0 and c0 run as batch rows (with each row's length and the states' leading axis):
    the same gradient as the one-at-a-time evaluation on the whole case, within a tenth of its bound."""
    case = structured_case(Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True), T=4, B=3,
                           D=2, H=3, seed=12, lengths=[4, 2, 1])
    batched = FiniteDifferenceOracle().reference(case)
    single = FiniteDifferenceOracle(lstm_forward, batched=False).reference(case)
    for key, g in single.gradients.items():
        bound = single.gradient_error[key]
        if key in ROW_KEYS:
            assert np.all(np.abs(batched.gradients[key] - g) <= 0.1 * bound + 1e-15), key
        else:
            np.testing.assert_array_equal(batched.gradients[key], g, err_msg=key)


def test_the_structured_forward_with_evaluation_axes_is_the_forward_of_each_copy():
    case = structured_case(Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True,
                                     coupled_input_forget=True, cell_clip=1.0), variant="peephole", T=4, B=3, D=2,
                           H=3, seed=13)
    rng = np.random.default_rng(1)
    kw = dict(structure=case.structure, lengths=case.lengths)
    for key in ("x", "h0", "l0.W", "l1.reverse.proj"):
        base = case.arrays()[key]
        copies = base + 1e-3 * rng.standard_normal((4, *base.shape))
        a = {**case.arrays(), key: copies}
        y, h_T, c_T = lstm_forward(case.variant, a["x"], a["h0"], a["c0"], {k: a[k] for k in case.params}, **kw)
        for e in range(4):
            b = {**case.arrays(), key: copies[e]}
            one = lstm_forward(case.variant, b["x"], b["h0"], b["c0"], {k: b[k] for k in case.params}, **kw)
            for batched, single in zip((y[e], h_T[e], c_T[e]), one, strict=True):
                np.testing.assert_array_equal(batched, single, err_msg=key)


def test_clip_with_a_step_no_row_reaches():
    """Lengths all 1 with T = 2: step 1 exists for no row, so it has no cell to measure the clip's margin
    on. The oracle must still answer, and agree with the loop reference (found by the search: it raised
    on an empty minimum)."""
    case = structured_case(Structure(cell_clip=5.0, lengths=True), T=2, B=1, D=1, H=1, seed=3, lengths=[1])
    ref = FiniteDifferenceOracle().reference(case)
    impl = LoopLSTM().with_structure(case.structure)
    y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params, lengths=case.lengths)
    np.testing.assert_allclose(ref.outputs["y"], y, rtol=1e-12, atol=1e-15)
    grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    for key, g in grads.items():
        assert np.all(np.abs(ref.gradients[key] - g) <= ref.gradient_error[key] + 1e-12), key
    np.testing.assert_array_equal(ref.gradients["x"][1], 0)
