"""Adapters: the README's three worked examples certify, foreign conventions certify once adapted
(and fail when adapted wrongly), conversions are exact inverses, bad arguments say what to pass."""

from __future__ import annotations

import importlib.util
import sys
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest

from harness import layouts as L
from harness.adapt import Adapted, Convention, adapt
from harness.api import certify
from harness.cases import CaseSpec, build_case
from harness.contract import ContractError
from impls.loop import LoopLSTM

PLUGINS = Path(__file__).parent / "plugins"
FOREIGN = PLUGINS / "foreign.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_adapt_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


foreign = _load(FOREIGN)


def _certify(impl, **kwargs):
    return certify(impl, max_examples=kwargs.pop("max_examples", 15), oracles=["finite-differences"],
                   profile="ci", **kwargs)


def test_course_exercise_certifies_with_limits_reported():
    result = _certify(f"{FOREIGN}:course")
    assert result.verdict == "certified", result.details()
    skipped = {r.quantity: r.reason for r in result.records if r.status == "skip"}
    assert set(skipped) == {"c_T", "dc0"}
    assert "final cell state" in skipped["c_T"] and "no initial cell state" in skipped["dc0"]


def test_bias_folded_certifies():
    result = _certify(f"{FOREIGN}:folded")
    assert result.verdict == "certified", result.details()
    assert all(r.status == "pass" for r in result.records)


def test_torch_module_with_autograd_backward_certifies():
    pytest.importorskip("torch", reason="the nn.Module adapter needs PyTorch")
    result = _certify(f"{PLUGINS / 'foreign_torch.py'}:module", max_examples=8, isolate=True)
    assert result.verdict == "certified", result.details()
    wrong = _certify(f"{PLUGINS / 'foreign_torch.py'}:wrong_order", max_examples=8, dtypes=["float64"])
    assert wrong.verdict == "discrepancies"
    assert {r.quantity for r in wrong.records if r.status == "fail"} >= {"y", "dW"}


@pytest.mark.parametrize("name, keywords", [
    ("ifog", {"gate_order": "ifog"}),
    ("tf1", {"gate_order": "icfo", "forget_bias": 1.0}),  # c read as g: TF1's letters work as they are
    ("transposed", {"transposed": True}),
    ("batch_major", {"batch_major": True}),
    ("onnx_order_transposed", {"gate_order": "iofc", "transposed": True}),
])
def test_foreign_conventions_certify_once_adapted(name, keywords):
    impl = getattr(foreign, name)
    assert _certify(impl, dtypes=["float64"]).verdict != "certified"  # as it is, it does not match
    result = _certify(adapt(impl, **keywords))
    assert result.verdict == "certified", result.details()


def test_a_wrong_convention_is_caught():
    result = _certify(adapt(foreign.ifog, gate_order="iofg"), dtypes=["float64"])
    assert result.verdict == "discrepancies"


def _random_params(variant: str, dtype="float64"):
    case = build_case(CaseSpec(variant=variant, dtype=dtype, T=2, B=2, D=3, H=4, seed=3, extra_scale="unit",
                               gain="random"))
    return case.params, case


_COMBOS = [(variant, order, transposed, bias)
           for variant in ("vanilla", "peephole", "layernorm")
           for order in ("ifgo", "ifog", "icfo", "iofc", "ogif")
           for transposed in (False, True)
           for bias in (("single",) if variant == "layernorm" else ("single", "separate", "folded"))]


@pytest.mark.parametrize("variant, order, transposed, bias", _COMBOS)
def test_gradient_conversion_inverts_the_parameter_conversion(variant, order, transposed, bias):
    """A parameter-shaped array sent through params_to and back through grads_from is unchanged (the
    conversions are permutations and transpositions; the gradient goes the opposite way)."""
    conv = Convention(gate_order=order, transposed=transposed, bias=bias)
    params, _ = _random_params(variant)
    mine = conv.params_to(params, variant)
    assert set(mine) == set(conv.param_keys(variant))
    if bias == "separate":
        # The parameters split b; the gradient of each is the whole of db.
        mine["b_ih"] = mine["b_hh"] = L.permute_gates(params["b"], "ifgo", order)
    back = conv.grads_from(mine, variant, D=3, H=4)
    assert set(back) == set(params)
    for k in params:
        assert back[k].dtype == params[k].dtype
        np.testing.assert_array_equal(back[k], params[k])


@pytest.mark.parametrize("variant, order, transposed, bias", _COMBOS)
@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
def test_params_from_inverts_params_to(variant, order, transposed, bias, forget_bias):
    conv = Convention(gate_order=order, transposed=transposed, bias=bias, forget_bias=forget_bias)
    params, _ = _random_params(variant)
    back = conv.params_from(conv.params_to(params, variant), variant, D=3, H=4)
    assert set(back) == set(params)
    for k in params:
        np.testing.assert_allclose(back[k], params[k], rtol=1e-15, atol=1e-15)


def test_separate_biases_get_uneven_shares():
    """With b_hh = 0, an implementation that ignores b_hh would compute the right values."""
    params, _ = _random_params("vanilla")
    mine = Convention(bias="separate").params_to(params, "vanilla")
    np.testing.assert_allclose(mine["b_ih"] + mine["b_hh"], params["b"], rtol=1e-15)
    assert np.all(np.abs(mine["b_hh"]) > 0.1 * np.abs(params["b"]))
    assert np.all(np.abs(mine["b_ih"]) > 0.1 * np.abs(params["b"]))


class _PyTorchStyleBiases:
    """A correct LSTM with b_ih and b_hh as PyTorch has them; ``bug`` plants one of two mistakes."""

    variant = "vanilla"

    def __init__(self, bug=None):
        from impls.loop import LoopLSTM

        self.inner = LoopLSTM()
        self.bug = bug
        self.name = f"two-biases-{bug}"

    def forward(self, x, h0, c0, p):
        b = p["b_ih"] if self.bug == "ignores_b_hh" else p["b_ih"] + p["b_hh"]
        if self.bug == "moves_bias_in_place":  # b_ih + b_hh unchanged: nothing to write back
            p["b_ih"] += 0.5
            p["b_hh"] -= 0.5
        return self.inner.forward(x, h0, c0, {"W": p["W"], "R": p["R"], "b": b})

    def backward(self, dy, dh_T, dc_T, cache):
        g = self.inner.backward(dy, dh_T, dc_T, cache)
        b = g.pop("b")
        g["b_ih"], g["b_hh"] = b, (b * 0.5 if self.bug == "half_d_b_hh" else b.copy())
        return g


def test_separate_biases_certify_and_each_mistake_is_caught():
    assert _certify(adapt(_PyTorchStyleBiases(), bias="separate"), max_examples=5).verdict == "certified"
    ignores = _certify(adapt(_PyTorchStyleBiases("ignores_b_hh"), bias="separate"), dtypes=["float64"])
    assert ignores.verdict == "discrepancies"
    assert {r.quantity for r in ignores.records if r.status == "fail"} >= {"y", "h_T", "c_T"}
    half = _certify(adapt(_PyTorchStyleBiases("half_d_b_hh"), bias="separate"), dtypes=["float64"], max_examples=3)
    assert half.verdict == "error"
    assert {r.status for r in half.records if r.direction == "forward"} == {"pass"}
    reason = next(r.reason for r in half.records if r.status == "error")
    assert "the gradients of b_ih and b_hh differ" in reason


def test_gate_order_moves_the_blocks():
    params, _ = _random_params("vanilla")
    H = 4
    for order in ("".join(p) for p in permutations("ifgo")):
        mine = Convention(gate_order=order).params_to(params, "vanilla")
        for k, gate in enumerate(order):
            src = "ifgo".index(gate)
            np.testing.assert_array_equal(mine["W"][k * H:(k + 1) * H], params["W"][src * H:(src + 1) * H])


def test_forget_bias_is_subtracted_from_the_forget_block():
    params, _ = _random_params("vanilla")
    mine = Convention(forget_bias=1.0).params_to(params, "vanilla")
    np.testing.assert_allclose(mine["b"][4:8], params["b"][4:8] - 1.0)
    np.testing.assert_array_equal(mine["b"][:4], params["b"][:4])
    ln, _ = _random_params("layernorm")
    mine = Convention(forget_bias=1.0, gate_order="fgio").params_to(ln, "layernorm")
    np.testing.assert_allclose(mine["beta"][0], ln["beta"][1] - 1.0)  # f is the first block there
    np.testing.assert_array_equal(mine["beta"][4], ln["beta"][4])  # the cell row stays last


def test_adapted_object_declares_what_it_wraps():
    a = adapt(foreign.ifog, gate_order="ifog")
    assert isinstance(a, Adapted)
    assert (a.name, a.variant, a.dtypes) == ("foreign-ifog", "vanilla", ("float64", "float32"))
    assert callable(a.backward)
    no_backward = adapt(foreign.peephole_as_vanilla, variant="peephole")
    assert not hasattr(no_backward, "backward")
    assert "gate blocks are read as i, f, o, g" in repr(a)


@pytest.mark.parametrize("kwargs, message", [
    ({"gate_order": "ifgx"}, "gate_order: expected a permutation of the gates"),
    ({"bias": "twice"}, "bias: expected one of"),
    ({"transposed": "yes"}, "transposed: expected True or False"),
    ({"names": {"Wx": "W"}}, "names: expected keys among ['W', 'R', 'b']"),
    ({"backward_takes": ("dh", "cache")}, "backward_takes: expected names from"),
    ({"variant": "gru"}, "variant: expected one of"),
])
def test_bad_arguments_say_what_to_pass(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        adapt(foreign.ifog, **kwargs)


def test_forward_fn_arity_and_exclusive_arguments():
    with pytest.raises(ValueError, match="forward_fn: expected a function taking"):
        adapt(forward_fn=lambda x, h0: None)
    with pytest.raises(ValueError, match="either impl"):
        adapt(foreign.ifog, forward_fn=foreign.lstm_forward)
    with pytest.raises(ValueError, match="either impl"):
        adapt()
    with pytest.raises(ValueError, match="layernorm variant has no bias"):
        adapt(foreign.ifog, variant="layernorm", bias="separate")


def test_two_item_forward_needs_final_cell_false():
    a = adapt(forward_fn=foreign.lstm_forward, gate_order="ifog", transposed=True, batch_major=True,
              initial_cell=False, names={"W": "Wx", "R": "Wh"})
    _, case = _random_params("vanilla")
    with pytest.raises(TypeError, match="final_cell=False"):
        a.forward(case.x, case.h0, case.c0, case.params)


# --------------------------------------------------------------------------------------------------
# PyTorch modules that return only y, or (y, h_T)


def _time_major_module(returns: str, ignores_h0: bool = False):
    torch = pytest.importorskip("torch", reason="the nn.Module adapter needs PyTorch")
    from torch import nn

    class Module(nn.Module):
        def __init__(self, input_size=3, hidden_size=4):
            super().__init__()
            H = hidden_size
            self.weight_ih = nn.Parameter(torch.randn(4 * H, input_size) * 0.1)
            self.weight_hh = nn.Parameter(torch.randn(4 * H, H) * 0.1)
            self.bias = nn.Parameter(torch.zeros(4 * H))

        def forward(self, x, state):  # x (T, B, D)
            h, c = state
            if ignores_h0:  # a common bug: the state is reset inside the module
                h = torch.zeros_like(h)
            outs = []
            for t in range(x.shape[0]):
                i, f, g, o = (x[t] @ self.weight_ih.T + h @ self.weight_hh.T + self.bias).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            y = torch.stack(outs)
            return y if returns == "y" else (y, h)

    return Module()


_TORCH_NAMES = {"W": "weight_ih", "R": "weight_hh", "b": "bias"}


@pytest.mark.parametrize("returns", ["y", "y, h_T"])
def test_torch_module_without_final_states_certifies(returns):
    """h_T is y[T-1]; its upstream gradient must reach autograd through dy's last step."""
    module = adapt(_time_major_module(returns), final_cell=False, names=_TORCH_NAMES)
    result = _certify(module, dtypes=["float64"], max_examples=5)
    assert result.verdict == "certified", result.details()
    assert {r.quantity for r in result.records if r.status == "skip"} == {"c_T"}


def test_a_gradient_autograd_does_not_compute_is_reported_not_computed_never_as_zeros():
    module = adapt(_time_major_module("y", ignores_h0=True), final_cell=False, names=_TORCH_NAMES)
    result = _certify(module, dtypes=["float64"], max_examples=3)
    dh0 = [r for r in result.records if r.quantity == "dh0"]
    assert dh0 and all(r.status == "contract" and r.reason.startswith("dh0: not computed") for r in dh0)
    assert all(r.worst is None for r in dh0)  # nothing was compared against a placeholder
    assert result.verdict != "certified"


def test_torch_module_without_c_T_must_say_final_cell_false():
    module = adapt(_time_major_module("y"), names=_TORCH_NAMES)
    _, case = _random_params("vanilla")
    with pytest.raises(ContractError, match="no final cell state c_T; adapt it with final_cell=False"):
        module.forward(case.x, case.h0, case.c0, case.params)


# --------------------------------------------------------------------------------------------------
# Contract violations behind an adapter: in-place changes to the converted inputs, extra gradients


class _TransposedBatchMajor:
    """A correct LSTM with weights (D, 4H), (H, 4H) and batch-major sequences; ``misbehave`` plants one
    contract violation."""

    variant = "vanilla"

    def __init__(self, misbehave=None):
        from impls.loop import LoopLSTM

        self.inner = LoopLSTM()
        self.misbehave = misbehave
        self.name = f"transposed-{misbehave}"

    def forward(self, x, h0, c0, p):
        out = self.inner.forward(np.ascontiguousarray(np.swapaxes(x, 0, 1)), h0, c0,
                                 {"W": np.ascontiguousarray(p["W"].T), "R": np.ascontiguousarray(p["R"].T),
                                  "b": p["b"]})
        y, h, c, cache = out
        if self.misbehave == "scales_W":
            p["W"] *= 0.5
        if self.misbehave == "zeroes_x":
            x[0] = 0.0
        if self.misbehave == "keeps_x_for_backward":
            cache = (cache, x)
        y = np.ascontiguousarray(np.swapaxes(y, 0, 1))
        if self.misbehave == "last_y_only":
            return y[:, -1], h, c, cache  # (B, H): the last step's output, not the sequence
        if self.misbehave in ("no_cache", "cache_on_self"):
            self.kept = cache
            return y, h, c
        return y, h, c, cache

    def backward(self, dy, dh_T, dc_T, cache):
        if self.misbehave == "cache_on_self":
            cache = self.kept  # what its forward did not return, it kept: a backward that works
        if self.misbehave == "keeps_x_for_backward":
            cache, x = cache
            x += 1.0  # modifies forward's input later, through its cache
        if self.misbehave == "zeroes_dy":
            dy[...] = 0.0
        g = self.inner.backward(np.ascontiguousarray(np.swapaxes(dy, 0, 1)), dh_T, dc_T, cache)
        g["x"] = np.swapaxes(g["x"], 0, 1)
        g["W"], g["R"] = g["W"].T, g["R"].T
        if self.misbehave == "extra_gradient":
            g["dbias"] = g["b"]
        return g


def _adapted(misbehave=None):
    return adapt(_TransposedBatchMajor(misbehave), transposed=True, batch_major=True)


@pytest.mark.parametrize("misbehave", [None, "cache_on_self"])
def test_transposed_batch_major_base_certifies(misbehave):
    assert _certify(_adapted(misbehave), max_examples=5).verdict == "certified"


@pytest.mark.parametrize("misbehave, statuses, reason", [
    ("scales_W", {"forward": "contract"}, "modified its input arrays in place: W (forward)"),
    ("zeroes_x", {"forward": "contract"}, "modified its input arrays in place: x (forward)"),
    ("keeps_x_for_backward", {"forward": "pass", "backward": "contract"}, "x (backward)"),
    ("zeroes_dy", {"forward": "pass", "backward": "contract"}, "dy (backward)"),
    ("extra_gradient", {"forward": "pass", "backward": "contract"}, "unexpected ['dbias']"),
    # the forward's fault, said of the forward, in the sequence's own layout, with y's features H
    ("last_y_only", {"forward": "contract"}, "forward: y: expected a sequence of shape (B, T, H), got shape"),
    ("no_cache", {"forward": "pass", "backward": "contract"},
     "backward: given cache=None (its forward returned no cache: (y, h_T, c_T)), it raised"),
])
def test_adapters_pass_contract_violations_on(misbehave, statuses, reason):
    result = _certify(_adapted(misbehave), dtypes=["float64"], max_examples=3)
    assert result.verdict == "error", result.summary()
    for direction, status in statuses.items():
        assert {r.status for r in result.records if r.direction == direction} == {status}, result.summary()
    assert any(reason in r.reason for r in result.records if not r.ok), result.details()


@pytest.mark.parametrize("misbehave, call, changed", [
    ("zeroes_x", "forward", {"x"}),
    ("scales_W", "forward", {"W"}),
    ("keeps_x_for_backward", "backward", {"x"}),
    ("zeroes_dy", "backward", {"dy"}),
])
def test_changes_to_the_converted_inputs_reach_the_callers_arrays(misbehave, call, changed):
    """What execute() compares is the adapter's own input arrays: the change must show there."""
    _, case = _random_params("vanilla")  # T = B = 2: the batch-major x is a converted copy, not a view
    given = case.copy()
    adapted = _adapted(misbehave)
    out = adapted.forward(given.x, given.h0, given.c0, given.params)
    if call == "backward":
        adapted.backward(given.dy, given.dh_T, given.dc_T, out[3])

    def value(c, name):
        return c.params[name] if name in c.params else getattr(c, name)

    names = ("x", "h0", "c0", "dy", "dh_T", "dc_T", *case.params)
    assert {n for n in names if not np.array_equal(value(given, n), value(case, n))} == changed


def test_an_in_place_change_that_converts_back_to_nothing_is_still_reported():
    result = _certify(adapt(_PyTorchStyleBiases("moves_bias_in_place"), bias="separate"), dtypes=["float64"],
                      max_examples=2)
    assert result.verdict == "error"
    reasons = {r.reason for r in result.records if r.direction == "forward"}
    assert any("modified its input arrays in place" in r for r in reasons), reasons


def test_a_contract_message_never_names_what_the_adapter_declared_absent():
    def forward_fn(x, h0, W, R, b):  # no c0, no c_T; computes in float64 whatever it is given
        y, h, _, _ = LoopLSTM().forward(x.astype(np.float64), h0.astype(np.float64), np.zeros(h0.shape),
                                        {"W": W.astype(np.float64), "R": R.astype(np.float64),
                                         "b": b.astype(np.float64)})
        return y, None

    course = adapt(forward_fn=forward_fn, initial_cell=False, final_cell=False, name="float64-only")
    result = _certify(course, dtypes=["float32"], max_examples=3)
    contract = [r for r in result.records if r.status == "contract" and r.direction == "forward"]
    assert contract and all("y: expected dtype float32" in r.reason for r in contract)
    assert not any("c_T" in r.reason for r in contract)


# --------------------------------------------------------------------------------------------------
# One matrix and one bias per gate

_DLAI_NAMES = {"W_i": "Wi", "W_f": "Wf", "W_g": "Wc", "W_o": "Wo", "b_i": "bi", "b_f": "bf", "b_g": "bc", "b_o": "bo"}


class _DeepLearningAIStyle:
    """deeplearning.ai's LSTM: per gate, Wf (H, H+D) over concat(a_prev, x_t) and bf (H,), written step
    by step with its backward by hand. ``bug="forget_derivative"`` takes dL/df from c_t instead of c_{t-1}."""

    variant = "vanilla"

    def __init__(self, bug=None):
        self.bug = bug
        self.name = f"deeplearning-ai-{bug or 'correct'}"

    def forward(self, x, a0, c0, p):
        H = a0.shape[1]
        a, c, ys, steps = a0, c0, [], []
        for t in range(x.shape[0]):
            concat = np.concatenate([a, x[t]], axis=1)  # (B, H+D)
            ft = _sigmoid(concat @ p["Wf"].T + p["bf"])
            it = _sigmoid(concat @ p["Wi"].T + p["bi"])
            cct = np.tanh(concat @ p["Wc"].T + p["bc"])
            ot = _sigmoid(concat @ p["Wo"].T + p["bo"])
            c_next = ft * c + it * cct
            a = ot * np.tanh(c_next)
            steps.append((concat, c, c_next, ft, it, cct, ot))
            c = c_next
            ys.append(a)
        return np.stack(ys), a, c, (steps, dict(p), H)

    def backward(self, dy, da_T, dc_T, cache):
        steps, p, H = cache
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        da_next, dc_next, dx = da_T, dc_T, []
        for t in reversed(range(len(steps))):
            concat, c_prev, c_t, ft, it, cct, ot = steps[t]
            da = dy[t] + da_next
            dc = dc_next + da * ot * (1 - np.tanh(c_t) ** 2)
            pre = {"o": da * np.tanh(c_t) * ot * (1 - ot),
                   "c": dc * it * (1 - cct ** 2),
                   "i": dc * cct * it * (1 - it),
                   "f": dc * (c_t if self.bug == "forget_derivative" else c_prev) * ft * (1 - ft)}
            dconcat = np.zeros_like(concat)
            for gate, d in pre.items():  # d: (B, H), the gradient of the gate's pre-activation
                grads["W" + gate] += d.T @ concat
                grads["b" + gate] += d.sum(axis=0)
                dconcat += d @ p["W" + gate]
            da_next, dc_next = dconcat[:, :H], dc * ft
            dx.append(dconcat[:, H:])
        return {"x": np.stack(dx[::-1]), "h0": da_next, "c0": dc_next, **grads}


def _sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))  # the logistic function, without exp's overflow far from 0


def test_per_gate_weights_over_h_then_x_certify_and_a_wrong_derivative_is_caught():
    good = adapt(_DeepLearningAIStyle(), per_gate="hx", names=_DLAI_NAMES)
    result = _certify(good, max_examples=8)
    assert result.verdict == "certified", result.details()
    wrong = _certify(adapt(_DeepLearningAIStyle("forget_derivative"), per_gate="hx", names=_DLAI_NAMES),
                     dtypes=["float64"], max_examples=15)
    assert wrong.verdict == "discrepancies"
    failing = {r.quantity for r in wrong.records if r.status == "fail"}
    assert failing and all(r.direction == "backward" for r in wrong.records if r.status == "fail")
    assert "dW" in failing
    # Read as [x; h] instead of [h; x], the same correct implementation is caught forward.
    flipped = _certify(adapt(_DeepLearningAIStyle(), per_gate="xh", names=_DLAI_NAMES), dtypes=["float64"])
    assert flipped.verdict == "discrepancies"
    assert "y" in {r.quantity for r in flipped.records if r.status == "fail"}


_PER_GATE = [(variant, form, transposed) for variant in ("vanilla", "peephole", "layernorm")
             for form in L.PER_GATE_FORMS for transposed in (False, True)]


@pytest.mark.parametrize("variant, form, transposed", _PER_GATE)
@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
def test_per_gate_conversions_are_inverse(variant, form, transposed, forget_bias):
    conv = Convention(per_gate=form, transposed=transposed, forget_bias=forget_bias)
    params, _ = _random_params(variant)
    mine = conv.params_to(params, variant)
    assert set(mine) == set(conv.param_keys(variant))
    back = conv.params_from(mine, variant, D=3, H=4)
    grads = conv.grads_from(Convention(per_gate=form, transposed=transposed).params_to(params, variant),
                            variant, D=3, H=4)
    for k in params:
        np.testing.assert_allclose(back[k], params[k], rtol=1e-15, atol=1e-15)
        np.testing.assert_array_equal(grads[k], params[k])
    assert conv.canonical_names("W_f", variant) == (("W",) if form == "separate" else ("W", "R"))
    assert conv.canonical_names("b_o", variant) == ("b",)


@pytest.mark.parametrize("kwargs, message", [
    ({"per_gate": "hxh"}, "per_gate: expected None or one of"),
    ({"per_gate": "hx", "gate_order": "ifog"}, "per_gate: each gate's weights are named"),
    ({"per_gate": "separate", "bias": "separate"}, "per_gate: has one bias per gate"),
])
def test_per_gate_bad_arguments_say_what_to_pass(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapt(foreign.ifog, **kwargs)


# --------------------------------------------------------------------------------------------------
# No initial hidden state (and no initial cell state)


class _NoInitialStates:
    """A loop LSTM that takes no h0 (and, with ``cell=False``, no c0): it starts from zero itself.
    ``bug="warm_start"`` starts from h = 0.1 instead, as a hand-written "small nonzero init" would."""

    variant = "vanilla"

    def __init__(self, cell=True, bug=None):
        self.cell, self.bug = cell, bug
        self.name = f"no-h0-{'c0' if cell else 'no-c0'}-{bug or 'correct'}"
        self.loop = LoopLSTM()

    def forward(self, x, *states_and_params):
        *states, params = states_and_params
        B, H = x.shape[1], params["R"].shape[1]
        h0 = np.full((B, H), 0.1 if self.bug == "warm_start" else 0.0, dtype=x.dtype)
        c0 = states[0] if self.cell else np.zeros((B, H), dtype=x.dtype)
        return self.loop.forward(x, h0, c0, params)

    def backward(self, dy, dh_T, dc_T, cache):
        grads = self.loop.backward(dy, dh_T, dc_T, cache)
        del grads["h0"]
        if not self.cell:
            del grads["c0"]
        return grads


@pytest.mark.parametrize("cell", [True, False])
def test_no_initial_hidden_state_certifies_with_its_limits(cell):
    adapted = adapt(_NoInitialStates(cell=cell), initial_hidden=False, initial_cell=cell)
    assert adapted.limits.zero == (("h0",) if cell else ("h0", "c0"))
    result = _certify(adapted, max_examples=8)
    assert result.verdict == "certified", result.details()
    skipped = {r.quantity: r.reason for r in result.records if r.status == "skip"}
    assert set(skipped) == ({"dh0"} if cell else {"dh0", "dc0"})
    assert "no initial hidden state" in skipped["dh0"] and "initial_hidden=False" in skipped["dh0"]
    assert "no initial hidden state (h0 = 0)" in repr(adapted)


def test_an_initial_hidden_state_that_is_not_zero_is_caught():
    result = _certify(adapt(_NoInitialStates(bug="warm_start"), initial_hidden=False), dtypes=["float64"])
    assert result.verdict == "discrepancies"
    assert "y" in {r.quantity for r in result.records if r.status == "fail"}


def test_forward_fn_without_initial_states_takes_x_and_the_parameters():
    loop = LoopLSTM()

    def forward_fn(x, W, R, b):
        B, H = x.shape[1], R.shape[1]
        zero = np.zeros((B, H), dtype=x.dtype)
        return loop.forward(x, zero, zero, {"W": W, "R": R, "b": b})

    def backward_fn(dy, dh_T, dc_T, cache):
        g = loop.backward(dy, dh_T, dc_T, cache)
        return g["x"], g["W"], g["R"], g["b"]

    adapted = adapt(forward_fn=forward_fn, backward_fn=backward_fn, initial_hidden=False, initial_cell=False)
    result = _certify(adapted, max_examples=8)
    assert result.verdict == "certified", result.details()
    with pytest.raises(ValueError, match=r"forward_fn: expected a function taking \(x, h0, W, R, b\)"):
        adapt(forward_fn=forward_fn, initial_cell=False)


# --------------------------------------------------------------------------------------------------
# Sequence layouts: feature-first (D, B, T) as deeplearning.ai writes it


class _FeatureFirst:
    """deeplearning.ai's sequence shapes: x (n_x, m, T_x), a0 (n_a, m), a (n_a, m, T_x); per gate Wf
    (n_a, n_a + n_x) over concat(a_prev, x_t); the cell starts at zero. ``forward(x, a0, parameters)
    -> (a, caches)``, ``backward(da, caches)`` -> gradients by name. ``bug="no_recurrent_da"``
    makes the classic mistake of taking da_next from da[:, :, t] alone, dropping the gradient that
    flows back from step t+1."""

    variant = "vanilla"

    def __init__(self, bug=None, column=False):
        self.bug = bug
        self.column = column  # the course's biases as columns: bf (n_a, 1), dbf (n_a, 1)
        self.name = f"feature-first-{bug or 'correct'}"

    def forward(self, x, a0, p):
        n_a, m = a0.shape
        T_x = x.shape[2]
        a = np.zeros((n_a, m, T_x), dtype=x.dtype)
        a_prev, c_prev, caches = a0, np.zeros_like(a0), []
        b = {g: p["b" + g] if self.column else p["b" + g][:, None] for g in "fico"}  # (n_a, 1)
        if self.column:
            assert all(v.shape == (n_a, 1) for v in b.values())
        for t in range(T_x):
            concat = np.concatenate([a_prev, x[:, :, t]], axis=0)  # (n_a + n_x, m)
            ft = _sigmoid(p["Wf"] @ concat + b["f"])
            it = _sigmoid(p["Wi"] @ concat + b["i"])
            cct = np.tanh(p["Wc"] @ concat + b["c"])
            ot = _sigmoid(p["Wo"] @ concat + b["o"])
            c_next = ft * c_prev + it * cct
            a_prev = ot * np.tanh(c_next)
            caches.append((concat, c_prev, c_next, ft, it, cct, ot))
            a[:, :, t], c_prev = a_prev, c_next
        return a, (caches, dict(p), n_a)

    def backward(self, da, cache):
        caches, p, n_a = cache
        grads = {"d" + k: np.zeros_like(v) for k, v in p.items()}
        dx = np.zeros((caches[0][0].shape[0] - n_a,) + da.shape[1:], dtype=da.dtype)
        da_prevt, dc_prevt = np.zeros_like(da[:, :, 0]), np.zeros_like(da[:, :, 0])
        for t in reversed(range(da.shape[2])):
            concat, c_prev, c_t, ft, it, cct, ot = caches[t]
            da_next = da[:, :, t] if self.bug == "no_recurrent_da" else da[:, :, t] + da_prevt
            dc = dc_prevt + da_next * ot * (1 - np.tanh(c_t) ** 2)
            pre = {"o": da_next * np.tanh(c_t) * ot * (1 - ot), "c": dc * it * (1 - cct ** 2),
                   "i": dc * cct * it * (1 - it), "f": dc * c_prev * ft * (1 - ft)}  # (n_a, m) each
            dconcat = np.zeros_like(concat)
            for gate, d in pre.items():
                grads["dW" + gate] += d @ concat.T
                grads["db" + gate] += d.sum(axis=1, keepdims=self.column)
                dconcat += p["W" + gate].T @ d
            da_prevt, dc_prevt = dconcat[:n_a], dc * ft
            dx[:, :, t] = dconcat[n_a:]
        return {"dx": dx, "dh0": da_prevt, **grads}


_FEATURE_FIRST = dict(layout="DBT", per_gate="hx", names=_DLAI_NAMES, initial_cell=False, final_cell=False,
                      backward_takes=("dy", "cache"))


def test_feature_first_sequences_and_states_certify():
    adapted = adapt(_FeatureFirst(), **_FEATURE_FIRST)
    assert "laid out as (D, B, T) in, (H, B, T) out; its states are (H, B)" in repr(adapted)
    result = _certify(adapted, max_examples=10)
    assert result.verdict == "certified", result.details()
    # Read as time-major, the same correct implementation cannot even be called.
    as_time_major = _certify(adapt(_FeatureFirst(), **{**_FEATURE_FIRST, "layout": "TBD"}), dtypes=["float64"],
                             max_examples=3)
    assert as_time_major.verdict != "certified"


def test_feature_first_missing_recurrent_gradient_is_caught():
    result = _certify(adapt(_FeatureFirst("no_recurrent_da"), **_FEATURE_FIRST), dtypes=["float64"])
    assert result.verdict == "discrepancies"
    failing = {r.quantity for r in result.records if r.status == "fail"}
    assert {"dx", "dW"} <= failing and all(r.direction == "backward" for r in result.records if r.status == "fail")


def test_column_biases_certify_and_a_missing_recurrent_gradient_is_caught():
    good = _certify(adapt(_FeatureFirst(column=True), **_FEATURE_FIRST, column_bias=True), max_examples=8)
    assert good.verdict == "certified", good.details()
    assert "its biases are columns" in repr(adapt(_FeatureFirst(column=True), **_FEATURE_FIRST, column_bias=True))
    bad = _certify(adapt(_FeatureFirst("no_recurrent_da", column=True), **_FEATURE_FIRST, column_bias=True),
                   dtypes=["float64"], max_examples=8)
    assert bad.verdict == "discrepancies"
    # Without column_bias the same code is handed (H,) biases, which it refuses.
    assert _certify(adapt(_FeatureFirst(column=True), **_FEATURE_FIRST), dtypes=["float64"],
                    max_examples=3).verdict != "certified"


@pytest.mark.parametrize("keywords", [{}, {"per_gate": "separate"}, {"bias": "separate", "gate_order": "ifog"}])
def test_column_bias_conversions_are_inverse(keywords):
    params, _ = _random_params("vanilla")
    conv = Convention(column_bias=True, **keywords)
    mine = conv.params_to(params, "vanilla")
    assert all(v.ndim == 2 and v.shape[1] == 1 for k, v in mine.items() if k.startswith("b"))
    back = conv.params_from(mine, "vanilla", D=params["W"].shape[1], H=params["R"].shape[1])
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    with pytest.raises(ValueError, match="column_bias: a bias folded"):
        Convention(column_bias=True, bias="folded")


def test_layout_keyword_and_batch_major_are_one_convention():
    assert Convention(batch_major=True) == Convention(layout="BTD") == Convention(layout="btd", batch_major=True)
    assert Convention(layout="BTD").batch_major and Convention(layout="BTD").keywords() == {"batch_major": True}
    assert Convention(layout="DBT").keywords() == {"layout": "DBT"}
    assert Convention(layout="DBT").states_transposed and not Convention(layout="BDT").states_transposed
    with pytest.raises(ValueError, match="batch_major: True is layout='BTD', so it cannot go with layout='DBT'"):
        Convention(batch_major=True, layout="DBT")
    with pytest.raises(ValueError, match="layout: expected the axes of a sequence"):
        adapt(foreign.ifog, layout="NCHW")
    result = _certify(adapt(foreign.batch_major, layout="BTD"), max_examples=5)
    assert result.verdict == "certified", result.details()


def test_changes_to_transposed_states_reach_the_callers_arrays():
    class ScalesA0(_FeatureFirst):
        def forward(self, x, a0, p):
            a0 *= 2.0
            return super().forward(x, a0, p)

    result = _certify(adapt(ScalesA0(), **_FEATURE_FIRST), dtypes=["float64"], max_examples=3)
    contract = [r.reason for r in result.records if r.status == "contract"]
    assert contract and any("modified its input arrays in place: h0 (forward)" in r for r in contract), contract


# --------------------------------------------------------------------------------------------------
# One-timestep cells: the adapter runs the time loop and the backward through time


def _course_step_forward(x, prev_h, prev_c, Wx, Wh, b):
    """The course exercise's step: x (N, D), Wx (D, 4H), Wh (H, 4H), b (4H,); gates i, f, o, g."""
    H = prev_h.shape[1]
    a = x @ Wx + prev_h @ Wh + b  # (N, 4H)
    i, f, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H]), _sigmoid(a[:, 2 * H:3 * H])
    g = np.tanh(a[:, 3 * H:])
    next_c = f * prev_c + i * g
    next_h = o * np.tanh(next_c)
    return next_h, next_c, (x, prev_h, prev_c, Wx, Wh, i, f, o, g, next_c)


def _course_step_backward(dnext_h, dnext_c, cache, bug=None):
    x, prev_h, prev_c, Wx, Wh, i, f, o, g, next_c = cache
    tc = np.tanh(next_c)
    dc = dnext_c + dnext_h * o * (1 - tc ** 2)
    da = np.concatenate([dc * g * i * (1 - i), dc * prev_c * f * (1 - f), dnext_h * tc * o * (1 - o),
                         dc * i * (1 - g ** 2)], axis=1)  # (N, 4H)
    dprev_c = dc if bug == "dprev_c_without_f" else dc * f
    return da @ Wx.T, da @ Wh.T, dprev_c, x.T @ da, prev_h.T @ da, da.sum(axis=0)


_COURSE_STEP = dict(gate_order="ifog", transposed=True, names={"W": "Wx", "R": "Wh"})


def test_course_step_functions_certify():
    adapted = adapt(step_forward=_course_step_forward, step_backward=_course_step_backward, **_COURSE_STEP)
    assert "one-timestep cell" in repr(adapted) and not adapted.limits
    result = _certify(adapted, max_examples=10)
    assert result.verdict == "certified", result.details()
    assert all(r.status == "pass" for r in result.records)


def test_a_step_backward_that_drops_the_forget_gate_on_dprev_c_is_caught():
    def step_backward(dnext_h, dnext_c, cache):
        return _course_step_backward(dnext_h, dnext_c, cache, bug="dprev_c_without_f")

    result = _certify(adapt(step_forward=_course_step_forward, step_backward=step_backward, **_COURSE_STEP),
                      dtypes=["float64"])
    assert result.verdict == "discrepancies"
    failing = {r.quantity for r in result.records if r.status == "fail"}
    assert "dc0" in failing and {"dx", "dW"} & failing
    assert all(r.direction == "backward" for r in result.records if r.status == "fail")


def test_step_cells_compose_with_the_other_keywords():
    # Read in the wrong gate order, the same correct step is caught forward; re-adapting (as diagnose
    # does) keeps the time loop.
    wrong = adapt(step_forward=_course_step_forward, step_backward=_course_step_backward, transposed=True,
                  names={"W": "Wx", "R": "Wh"})
    assert _certify(wrong, dtypes=["float64"], max_examples=5).verdict == "discrepancies"
    fixed = adapt(wrong, gate_order="ifog", transposed=True)
    assert "one-timestep cell" in repr(fixed)
    assert _certify(fixed, max_examples=5).verdict == "certified"
    # Without initial states the loop starts from the zeros the harness holds them at.
    zero = adapt(step_forward=_course_step_forward, step_backward=_course_step_backward, initial_hidden=False,
                 initial_cell=False, **_COURSE_STEP)
    result = _certify(zero, max_examples=5)
    assert result.verdict == "certified", result.details()
    assert {r.quantity for r in result.records if r.status == "skip"} == {"dh0", "dc0"}


class _DeepLearningAICell:
    """deeplearning.ai's cell, one timestep: xt (n_x, m), a_prev and c_prev (n_a, m), Wf (n_a, n_a + n_x)
    over concat(a_prev, xt); ``forward`` -> (a_next, c_next, cache), ``backward(da_next, dc_next, cache)``
    -> {"dxt", "da_prev", "dc_prev", "dWf", "dbf", ...}. ``bug="forget_derivative"`` takes dL/df from
    c_next instead of c_prev."""

    variant = "vanilla"

    def __init__(self, bug=None):
        self.bug = bug
        self.name = f"dlai-cell-{bug or 'correct'}"

    def forward(self, xt, a_prev, c_prev, p):
        concat = np.concatenate([a_prev, xt], axis=0)  # (n_a + n_x, m)
        ft = _sigmoid(p["Wf"] @ concat + p["bf"][:, None])
        it = _sigmoid(p["Wi"] @ concat + p["bi"][:, None])
        cct = np.tanh(p["Wc"] @ concat + p["bc"][:, None])
        ot = _sigmoid(p["Wo"] @ concat + p["bo"][:, None])
        c_next = ft * c_prev + it * cct
        a_next = ot * np.tanh(c_next)
        return a_next, c_next, (concat, c_prev, c_next, ft, it, cct, ot, p)

    def backward(self, da_next, dc_next, cache):
        concat, c_prev, c_next, ft, it, cct, ot, p = cache
        n_a = c_prev.shape[0]
        dc = dc_next + da_next * ot * (1 - np.tanh(c_next) ** 2)
        pre = {"o": da_next * np.tanh(c_next) * ot * (1 - ot), "c": dc * it * (1 - cct ** 2),
               "i": dc * cct * it * (1 - it),
               "f": dc * (c_next if self.bug == "forget_derivative" else c_prev) * ft * (1 - ft)}
        grads, dconcat = {}, np.zeros_like(concat)
        for gate, d in pre.items():
            grads["dW" + gate], grads["db" + gate] = d @ concat.T, d.sum(axis=1)
            dconcat += p["W" + gate].T @ d
        return {"dxt": dconcat[n_a:], "da_prev": dconcat[:n_a], "dc_prev": dc * ft, **grads}


_DLAI_CELL = dict(step=True, layout="DBT", per_gate="hx", names=_DLAI_NAMES)


def test_a_feature_first_cell_object_certifies_and_a_wrong_derivative_is_caught():
    result = _certify(adapt(_DeepLearningAICell(), **_DLAI_CELL), max_examples=10)
    assert result.verdict == "certified", result.details()
    wrong = _certify(adapt(_DeepLearningAICell("forget_derivative"), **_DLAI_CELL), dtypes=["float64"])
    assert wrong.verdict == "discrepancies"
    failing = {r.quantity for r in wrong.records if r.status == "fail"}
    assert "dW" in failing and all(r.direction == "backward" for r in wrong.records if r.status == "fail")


def test_a_failing_step_names_its_timestep():
    def step_forward(x, prev_h, prev_c, Wx, Wh, b):
        if np.any(prev_h != 0):  # from t=1 on the state is no longer the zero the harness starts from
            raise FloatingPointError("overflow in the gates")
        return _course_step_forward(x, prev_h, prev_c, Wx, Wh, b)

    adapted = adapt(step_forward=step_forward, step_backward=_course_step_backward, initial_hidden=False,
                    initial_cell=False, **_COURSE_STEP)
    result = _certify(adapted, dtypes=["float64"], max_examples=5)
    errors = [r for r in result.records if r.status == "error"]
    assert errors and all(r.reason.startswith("forward raised FloatingPointError: overflow in the gates")
                          for r in errors)
    if sys.version_info >= (3, 11):  # the step travels as an exception note, shown in the reason and the traceback
        assert all("in step_forward at timestep t=1 of T=" in r.reason and "in step_forward at timestep t=1 of T="
                   in r.traceback and "the adapter calls it once per timestep" in r.traceback
                   for r in errors), errors[0].traceback

    def wrong_shape(x, prev_h, prev_c, Wx, Wh, b):
        h, c, cache = _course_step_forward(x, prev_h, prev_c, Wx, Wh, b)
        return np.concatenate([h, h], axis=1), c, cache  # (N, 2H)

    result = _certify(adapt(step_forward=wrong_shape, **_COURSE_STEP), dtypes=["float64"], max_examples=3)
    contract = [r.reason for r in result.records if r.status == "contract"]
    assert contract and any("step_forward at t=0: returned next_h of shape" in r for r in contract), contract


@pytest.mark.parametrize("kwargs, message", [
    ({"step_forward": _course_step_forward, "forward_fn": _course_step_forward}, "got forward_fn and step_forward"),
    ({"step_backward": _course_step_backward, "forward_fn": _course_step_forward}, "step_backward: goes with"),
    ({"step_forward": lambda x, h, c: None}, r"step_forward: expected a function taking \(x_t, prev_h, prev_c, W"),
    ({"step_forward": _course_step_forward, "backward_takes": ("dy", "cache")}, "backward_takes: does not apply"),
])
def test_step_arguments_say_what_to_pass(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapt(**kwargs)
    with pytest.raises(ValueError, match="step: True says that impl is a one-timestep cell object"):
        adapt(forward_fn=_course_step_forward, step=True)


def test_torch_module_with_feature_first_sequences_and_states_certifies():
    torch = pytest.importorskip("torch", reason="the nn.Module adapter needs PyTorch")
    from torch import nn

    class FeatureFirst(nn.Module):  # x (D, B, T), states (H, B), columns are batch elements
        def __init__(self, input_size=3, hidden_size=4):
            super().__init__()
            self.weight_ih = nn.Parameter(torch.randn(4 * hidden_size, input_size))
            self.weight_hh = nn.Parameter(torch.randn(4 * hidden_size, hidden_size))
            self.bias = nn.Parameter(torch.zeros(4 * hidden_size))

        def forward(self, x, state):
            h, c = state
            outs = []
            for t in range(x.shape[2]):
                i, f, g, o = (self.weight_ih @ x[:, :, t] + self.weight_hh @ h + self.bias[:, None]).chunk(4, dim=0)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            return torch.stack(outs, dim=2), (h, c)

    result = _certify(adapt(FeatureFirst(), layout="DBT", names=_TORCH_NAMES), dtypes=["float64"], max_examples=5)
    assert result.verdict == "certified", result.details()
    assert all(r.status == "pass" for r in result.records)


def test_a_cell_that_changes_its_timestep_of_x_is_reported_under_x():
    def step_forward(x, prev_h, prev_c, Wx, Wh, b):
        out = _course_step_forward(x, prev_h, prev_c, Wx, Wh, b)
        x *= 0.5  # the cell is handed x[t] itself: the change is x's
        return out

    result = _certify(adapt(step_forward=step_forward, step_backward=_course_step_backward, **_COURSE_STEP),
                      dtypes=["float64"], max_examples=3)
    contract = [r.reason for r in result.records if r.status == "contract"]
    assert contract and any("modified its input arrays in place" in r and "x (forward)" in r for r in contract), \
        contract


def test_a_parameter_name_left_unmapped_is_named_with_the_mapping_it_needs():
    """The cell reads p["Wh"], and names= maps only W: its KeyError says what it was given and how to map."""
    from tests.plugins.foreign import CourseCell

    cell = adapt(CourseCell(), step=True, gate_order="ifog", transposed=True, names={"W": "Wx"})
    result = _certify(cell, dtypes=["float64"], max_examples=2)
    errors = {r.reason for r in result.records if r.status == "error" and r.direction == "forward"}
    assert errors and all(e.startswith("forward raised KeyError: 'Wh'; ") and "'Wh' is not among the parameters it "
                          "was given (Wx, R, b); if it names one of them, map it with names= (on the command line "
                          "--names), e.g. R=Wh" in e for e in errors), errors
