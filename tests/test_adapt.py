"""Adapters: the README's three worked examples certify, foreign conventions certify once adapted
(and fail when adapted wrongly), conversions are exact inverses, bad arguments say what to pass."""

from __future__ import annotations

import importlib.util
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest

from harness.adapt import Adapted, Convention, adapt
from harness.api import certify
from harness.cases import CaseSpec, build_case

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
        mine["b_hh"] = mine["b_ih"]  # each bias receives the whole gradient
    back = conv.grads_from(mine, variant, D=3, H=4)
    assert set(back) == set(params)
    for k in params:
        assert back[k].dtype == params[k].dtype
        np.testing.assert_array_equal(back[k], params[k])


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
