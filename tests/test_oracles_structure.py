"""The framework oracles on whole layers (stacked, bidirectional, variable lengths, projection, CIFG,
cell clip): each against the torch composite for every feature it declares, forward and gradients,
both dtypes; the torch composite against torch.nn.LSTM and against a NumPy transcription of the
contract (values, and gradients by central differences) for what no framework kernel computes.
Deliberately wrong oracles (directions swapped, the reverse direction not restricted to the valid
length, padded steps updating the state, the gradient passed through clipped cells) must be caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import layouts
from harness.structure import FEATURES, Structure
from oracles.onnx_oracle import OnnxReferenceOracle, OnnxRuntimeOracle
from oracles.tf_oracle import KerasLSTMOracle, TFCompositeOracle
from oracles.torch_oracle import TorchCompositeOracle, TorchLSTMOracle
from tests.oracle_support import require, structured_mismatches
from tests.structured import structured_case

pytestmark = pytest.mark.frameworks

_COMPOSITE = TorchCompositeOracle()
_ORACLES = {o.name: o for o in (TorchLSTMOracle(), TFCompositeOracle(), KerasLSTMOracle(), OnnxRuntimeOracle(),
                                OnnxReferenceOracle())}

#: The structures each declared feature is checked in: alone, and combined with the others.
_BY_FEATURE = {
    "layers": [Structure(num_layers=2), Structure(num_layers=3, bidirectional=True)],
    "bidirectional": [Structure(bidirectional=True)],
    "lengths": [Structure(lengths=True), Structure(num_layers=2, bidirectional=True, lengths=True)],
    "proj": [Structure(proj_size=2), Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)],
    "cifg": [Structure(coupled_input_forget=True),
             Structure(num_layers=2, bidirectional=True, coupled_input_forget=True, lengths=True)],
    "clip": [Structure(cell_clip=0.5), Structure(bidirectional=True, cell_clip=0.5, coupled_input_forget=True,
                                                 lengths=True, proj_size=2)],
}


def _declared():
    for name in _ORACLES:
        for feature in FEATURES:
            for n, structure in enumerate(_BY_FEATURE[feature]):
                yield pytest.param(name, feature, n, structure, id=f"{name}-{feature}-{n}")


def _case(structure, variant, dtype, seed=0, **kw):
    return structured_case(structure, variant=variant, dtype=dtype, T=5, B=4, D=3, H=3, seed=seed, **kw)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, feature, n, structure", list(_declared()))
def test_oracle_agrees_with_the_torch_composite_on_every_declared_feature(name, feature, n, structure, dtype):
    oracle = require(_ORACLES[name])
    if feature not in oracle.structures:
        pytest.skip(f"{name} does not declare {feature}")
    # One variant per (structure, dtype), taking turns, keeps the traced TensorFlow functions few.
    variants = [v for v in oracle.variants if not structure.problems(v)]
    variant = variants[(n + (dtype == "float32")) % len(variants)]
    why = oracle.unsupported_reason(variant, dtype, structure)
    if why:
        assert dtype not in oracle.compute_dtypes and "compute" in why, why
        pytest.skip(why)
    case = _case(structure, variant, dtype, seed=len(name))
    ref, expected = oracle.reference(case), _COMPOSITE.reference(case)
    assert oracle.gives_gradients == (ref.gradients is not None)
    assert not structured_mismatches(case, ref, expected), (variant, structure.describe())


@pytest.mark.parametrize("name", sorted(set(_ORACLES) - {"tf-composite"}))
def test_unsupported_reason_names_the_missing_features(name):
    oracle = require(_ORACLES[name])
    everything = Structure(num_layers=2, bidirectional=True, lengths=True, proj_size=2, coupled_input_forget=True,
                           cell_clip=1.0)
    why = oracle.unsupported_reason("vanilla", oracle.compute_dtypes[0], everything)
    missing = [f for f in FEATURES if f not in oracle.structures]
    assert why is not None and all(f in why.split("(computes")[0] for f in missing), why
    assert oracle.structures_note and why.endswith(oracle.structures_note), why  # says why the framework cannot
    assert _COMPOSITE.unsupported_reason("vanilla", "float64", everything) is None


def test_declared_structures():
    assert _ORACLES["torch-nn-lstm"].structures == {"layers", "bidirectional", "lengths", "proj"}
    assert _ORACLES["tf-keras"].structures == {"layers", "bidirectional", "lengths"}
    assert _ORACLES["onnxruntime"].structures == {"layers", "bidirectional", "lengths", "cifg"}
    assert _ORACLES["onnx-reference"].structures == {"layers", "bidirectional"}
    assert _ORACLES["tf-composite"].structures == _COMPOSITE.structures == set(FEATURES)


@st.composite
def _structures(draw, features):
    """A structure using only ``features``, shrinking towards one layer, one direction, full length."""
    return Structure(
        num_layers=draw(st.integers(1, 3), label="num_layers") if "layers" in features else 1,
        bidirectional=draw(st.booleans(), label="bidirectional") if "bidirectional" in features else False,
        lengths=draw(st.booleans(), label="lengths") if "lengths" in features else False,
        proj_size=draw(st.integers(0, 2), label="proj_size") if "proj" in features else 0,
        coupled_input_forget=draw(st.booleans(), label="cifg") if "cifg" in features else False,
        cell_clip=draw(st.sampled_from([None, 0.5]), label="cell_clip") if "clip" in features else None,
    )


@pytest.mark.parametrize("name", ["torch-nn-lstm", "onnxruntime", "onnx-reference"])
def test_random_structures_agree_with_the_composite(name):
    oracle = require(_ORACLES[name])

    @settings(max_examples=min(settings.default.max_examples, 20), deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(structure=_structures(oracle.structures), variant=st.sampled_from(oracle.variants),
           dtype=st.sampled_from(oracle.compute_dtypes), T=st.integers(1, 5), B=st.integers(1, 3),
           seed=st.integers(0, 2**16))
    def check(structure, variant, dtype, T, B, seed):
        case = structured_case(structure, variant=variant, dtype=dtype, T=T, B=B, D=2, H=3, seed=seed)
        assert not structured_mismatches(case, oracle.reference(case), _COMPOSITE.reference(case))

    check()


# --------------------------------------------------------------------------------------------------
# The torch composite against an independent transcription of the contract


def _sig(z):
    return 1 / (1 + np.exp(-z))


def _numpy_layer(case):
    """The contract's whole layer in NumPy, written from LAYER_DESIGN's text alone (vanilla)."""
    s = case.structure
    lift = (lambda a: a) if s.layered else (lambda a: a[None])
    h0, c0 = lift(case.h0), lift(case.c0)
    T, B = case.T, case.B
    lengths = np.full(B, T) if case.lengths is None else case.lengths
    inp, hs, cs = case.x, [], []
    for k in range(s.num_layers):
        outs = []
        for d in range(s.dirs):
            p = layouts.cell_params(case.params, s, k, d)
            n = k * s.dirs + d
            y = np.zeros((T, B, h0.shape[-1]))
            for b in range(B):
                h, c = h0[n, b], c0[n, b]
                steps = range(lengths[b]) if d == 0 else range(lengths[b] - 1, -1, -1)
                for t in steps:
                    a = p["W"] @ inp[t, b] + p["R"] @ h + p["b"]
                    i, f, g, o = np.split(a, 4)
                    i, f, g, o = _sig(i), _sig(f), np.tanh(g), _sig(o)
                    if s.coupled_input_forget:
                        f = 1 - i
                    c = f * c + i * g
                    if s.cell_clip is not None:
                        c = np.clip(c, -s.cell_clip, s.cell_clip)
                    h = o * np.tanh(c)
                    if s.proj_size:
                        h = p["proj"] @ h
                    y[t, b] = h
                hs.append((n, b, h))
                cs.append((n, b, c))
            outs.append(y)
        inp = np.concatenate(outs, axis=2)
    h_T, c_T = np.zeros_like(h0), np.zeros_like(c0)
    for n, b, h in hs:
        h_T[n, b] = h
    for n, b, c in cs:
        c_T[n, b] = c
    un = (lambda a: a) if s.layered else (lambda a: a[0])
    return inp, un(h_T), un(c_T)


def _objective(case, y, h_T, c_T):
    return float(np.sum(case.dy * y) + np.sum(case.dh_T * h_T) + np.sum(case.dc_T * c_T))


_CONTRACT_STRUCTURES = [
    Structure(num_layers=2, bidirectional=True, lengths=True),
    Structure(bidirectional=True, proj_size=2, lengths=True),
    Structure(coupled_input_forget=True, num_layers=2),
    Structure(cell_clip=0.4, bidirectional=True, lengths=True),
]


@pytest.mark.parametrize("structure", _CONTRACT_STRUCTURES, ids=lambda s: s.describe().replace(" ", "-"))
def test_torch_composite_is_the_contract(structure):
    pytest.importorskip("torch")
    case = structured_case(structure, T=4, B=3, D=2, H=2, seed=3, lengths=[2, 4, 1] if structure.lengths else None)
    ref = _COMPOSITE.reference(case)
    for got, want in zip((ref.outputs["y"], ref.outputs["h_T"], ref.outputs["c_T"]), _numpy_layer(case), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    if structure.lengths:  # padded steps: y is 0, dx is 0
        pad = np.arange(case.T)[:, None] >= case.lengths[None, :]
        assert np.all(ref.outputs["y"][pad] == 0) and np.all(ref.gradients["x"][pad] == 0)
    if structure.cell_clip is not None:
        assert np.any(np.abs(ref.outputs["c_T"]) == structure.cell_clip), "the case should clip somewhere"
    # gradients by central differences on the NumPy transcription, along random directions
    rng = np.random.default_rng(0)
    for key, value in case.arrays().items():
        v = rng.standard_normal(value.shape)
        eps = 1e-6

        def at(delta, key=key, v=v):
            c = case.copy()
            if key in c.params:
                c.params[key] = c.params[key] + delta * v
            else:
                setattr(c, key, getattr(c, key) + delta * v)
            return _objective(c, *_numpy_layer(c))

        fd = (at(eps) - at(-eps)) / (2 * eps)
        assert abs(float(np.sum(ref.gradients[key] * v)) - fd) < 1e-6 * max(1.0, abs(fd)), key
    if structure.coupled_input_forget:  # the forget gate's rows exist, unused: gradient zero
        for name, g in ref.gradients.items():
            if name.rsplit(".", 1)[-1] in ("W", "R", "b"):
                H = case.H
                assert np.all(g[H : 2 * H] == 0), name


@pytest.mark.parametrize("name", ["torch-nn-lstm", "onnxruntime", "tf-keras"])
def test_lengths_of_every_order_agree_with_the_composite(name):
    """All full, all 1, unsorted and sorted lengths: packed sequences, sequence_lens and masks."""
    oracle = require(_ORACLES[name])
    structure = Structure(num_layers=2, bidirectional=True, lengths=True)
    dtype = oracle.compute_dtypes[0]
    for lengths in ([5, 5, 5, 5], [1, 1, 1, 1], [1, 3, 5, 2], [5, 4, 3, 1]):
        case = _case(structure, "vanilla", dtype, lengths=lengths)
        assert not structured_mismatches(case, oracle.reference(case), _COMPOSITE.reference(case)), lengths


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cudnn_lstm_computes_the_structures_it_inherits(dtype):
    """torch-cuda-lstm is nn.LSTM on CUDA, so it declares nn.LSTM's structures: checked where there is a GPU."""
    from oracles.torch_cuda_oracle import TorchCudaLSTMOracle

    oracle = require(TorchCudaLSTMOracle())
    assert oracle.structures == _ORACLES["torch-nn-lstm"].structures
    for structure in (Structure(num_layers=2, bidirectional=True, lengths=True),
                      Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)):
        case = _case(structure, "vanilla", dtype, lengths=[2, 5, 1, 3])
        assert not structured_mismatches(case, oracle.reference(case), _COMPOSITE.reference(case)), structure


@pytest.mark.parametrize("name", sorted(_ORACLES))
def test_structured_caches_keep_nothing_between_cases(name):
    """A cached module, model or traced function per structure: results do not depend on what ran before."""
    oracle = require(_ORACLES[name])
    dtype = oracle.compute_dtypes[0]
    first = _case(Structure(num_layers=2, bidirectional=True), "vanilla", dtype, seed=1)
    other = _case(Structure(bidirectional=True), "vanilla", dtype, seed=2)
    before = oracle.reference(first)
    oracle.reference(other)
    after = oracle.reference(first)
    for q in before.outputs:
        np.testing.assert_array_equal(before.outputs[q], after.outputs[q])
    for k in before.gradients or {}:
        np.testing.assert_array_equal(before.gradients[k], after.gradients[k])


# --------------------------------------------------------------------------------------------------
# Wrong oracles, caught


class _Wrong(TorchCompositeOracle):
    """The torch composite with one planted departure from the contract."""

    def __init__(self, how):
        self.how = how

    def reference(self, case):
        import oracles.torch_oracle as mod

        saved = (mod._reverse_valid, mod._cell_forward)
        try:
            if self.how == "reverse over the whole padded sequence":
                mod._reverse_valid = lambda torch, seq, lengths: torch.flip(seq, [0])
            elif self.how == "padded steps update the state":
                cell = saved[1]
                mod._cell_forward = lambda torch, v, x, h0, c0, p, eps, mask, s: cell(torch, v, x, h0, c0, p, eps,
                                                                                       None, s)
            return super().reference(case)
        finally:
            mod._reverse_valid, mod._cell_forward = saved


@pytest.mark.parametrize("how", ["reverse over the whole padded sequence", "padded steps update the state"])
def test_a_wrong_lengths_oracle_is_caught_by_nn_lstm(how):
    nn_lstm = require(_ORACLES["torch-nn-lstm"])
    case = _case(Structure(bidirectional=True, lengths=True), "vanilla", "float64", lengths=[2, 5, 3, 1])
    assert structured_mismatches(case, _Wrong(how).reference(case), nn_lstm.reference(case))


def test_onnx_with_directions_swapped_is_caught():
    ort = require(_ORACLES["onnxruntime"])
    structure = Structure(bidirectional=True, lengths=True)
    case = _case(structure, "vanilla", "float32")
    swapped = case.copy()
    for name in list(case.params):  # feed the reverse direction's weights to the forward one and back
        layer, direction, bare = name.split(".")[0], "reverse." in name, name.rsplit(".", 1)[-1]
        other = f"{layer}.{bare}" if direction else f"{layer}.reverse.{bare}"
        swapped.params[name] = case.params[other]
    assert not structured_mismatches(case, ort.reference(case), _COMPOSITE.reference(case))
    assert structured_mismatches(case, ort.reference(swapped), _COMPOSITE.reference(case))


def test_a_clip_passing_the_gradient_through_is_caught():
    """A straight-through clip (what TF's BlockLSTMGradV2 computes) differs from the contract's."""
    torch = pytest.importorskip("torch")

    case = _case(Structure(cell_clip=0.4), "vanilla", "float64")
    right = _COMPOSITE.reference(case)
    saved = torch.clamp
    try:
        torch.clamp = lambda c, lo, hi: c + (saved(c, lo, hi) - c).detach()
        straight = _COMPOSITE.reference(case)
    finally:
        torch.clamp = saved
    np.testing.assert_array_equal(straight.outputs["y"], right.outputs["y"])  # the same forward
    assert any(m.startswith(("dW", "dx")) for m in structured_mismatches(case, straight, right))


def test_torch_nn_lstm_refuses_a_projection_not_smaller_than_h_by_its_reason():
    """nn.LSTM requires proj_size < hidden_size: such a case is one the oracle does not compute (a skip with
    the reason), never an oracle failure; the drawn cases keep the projection smaller than H."""
    from harness.cases import case_specs
    from harness.check import structure_reason

    pytest.importorskip("torch")
    oracle = TorchLSTMOracle()
    case = structured_case(Structure(proj_size=3), T=2, B=2, D=2, H=3)
    assert "proj_size < hidden_size" in structure_reason(oracle, "vanilla", "float64", case)
    assert structure_reason(oracle, "vanilla", "float64", structured_case(Structure(proj_size=2), H=3)) == ""

    @settings(max_examples=200, database=None, deadline=None)
    @given(case_specs(variants=("vanilla",), dtypes=("float64",), structure=None))
    def drawn(spec):
        assert spec.proj_size < spec.H or spec.proj_size == 0

    drawn()
