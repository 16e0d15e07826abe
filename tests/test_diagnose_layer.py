"""diagnose on implementations of a fixed layer structure: trial cases in their own structure, and what the
outputs of a bidirectional layer or one with lengths show (the reverse direction's final state taken at the
wrong end, the two directions swapped in y, in the states or in the parameters, states in direction-major
order, final states taken with the padded steps run), each named with its coordinates; a correct layer of
any structure is "standard" with no hint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.cases import CaseSpec, build_case, structure_fields
from harness.cli import main
from harness.diagnose import diagnose
from harness.layer_diagnosis import LayerFact, recognise
from harness.structure import Structure
from impls.loop import LoopLSTM
from tests.plugins import planted_layer as planted

PLANTED = Path(planted.__file__)


def _fixed(structure: Structure, name: str = "fixed-loop"):
    """The loop reference configured for ``structure``, declared as a fixed-structure implementation."""

    class Fixed:
        variant = "vanilla"
        configurable = False
        num_layers, bidirectional, accepts_lengths = structure.num_layers, structure.bidirectional, structure.lengths
        proj_size, coupled_input_forget, cell_clip = (structure.proj_size, structure.coupled_input_forget,
                                                      structure.cell_clip)

        def __init__(self):
            self.name = name
            self.inner = LoopLSTM().with_structure(structure)

        def forward(self, x, h0, c0, params, lengths=None):
            return self.inner.forward(x, h0, c0, params, **({} if lengths is None else {"lengths": lengths}))

        def backward(self, dy, dh_T, dc_T, cache):
            return self.inner.backward(dy, dh_T, dc_T, cache)

    return Fixed()


class ReverseFinalsAtFirstStep(planted._Planted):
    """Every reverse cell's h_T and c_T are its state after its first step (t = lengths[b]-1), not after t = 0.
    Forward only: the state after one step is computed by a one-step sequence from the right input."""

    structure = Structure(num_layers=2, bidirectional=True, lengths=True)

    def forward(self, x, h0, c0, params, lengths=None):
        y, h_T, c_T, _ = self.inner.forward(x, h0, c0, params, lengths=lengths)
        h_T, c_T = h_T.copy(), c_T.copy()
        rows = np.arange(x.shape[1])
        for k in range(2):
            below = {n: v for n, v in params.items() if n.startswith("l0.")}
            inp = x if k == 0 else LoopLSTM(bidirectional=True, accepts_lengths=True).forward(
                x, h0[:2], c0[:2], below, lengths=lengths)[0]
            first = inp[np.asarray(lengths) - 1, rows][None]  # (1, B, D_k): where the reverse direction starts
            own = {n.split(".", 2)[2]: v for n, v in params.items() if n.startswith(f"l{k}.reverse.")}
            _, h_T[2 * k + 1], c_T[2 * k + 1], _ = LoopLSTM().forward(first, h0[2 * k + 1], c0[2 * k + 1], own)
        return y, h_T, c_T, None


class StatesIndexedReverseFirst(planted._Planted):
    """h0, c0 read and h_T, c_T written with the reverse direction at index 2k and the forward one at 2k+1."""

    structure = Structure(num_layers=2, bidirectional=True)

    def forward(self, x, h0, c0, params, lengths=None):
        swap = [1, 0, 3, 2]
        y, h_T, c_T, cache = self.inner.forward(x, h0[swap], c0[swap], params)
        return y, h_T[swap], c_T[swap], cache


class StatesRunThroughPadding(planted._Planted):
    """y as the contract says, but every cell's h_T and c_T taken with each row run through all T steps: the
    forward direction on through the padding to t = T-1, the reverse one from t = T-1 over it (a layer that
    masks y but not its states)."""

    structure = Structure(num_layers=2, bidirectional=True, lengths=True)

    def forward(self, x, h0, c0, params, lengths=None):
        y, h_T, c_T, _ = self.inner.forward(x, h0, c0, params, lengths=lengths)
        h_T, c_T = h_T.copy(), c_T.copy()
        for k in range(2):
            below = {n: v for n, v in params.items() if n.startswith("l0.")}
            inp = x if k == 0 else LoopLSTM(bidirectional=True, accepts_lengths=True).forward(
                x, h0[:2], c0[:2], below, lengths=lengths)[0]  # the masked y of layer 0
            for d, seq in ((0, inp), (1, inp[::-1])):
                prefix = f"l{k}.reverse." if d else f"l{k}."
                own = {n[len(prefix):]: v for n, v in params.items()
                       if n.startswith(prefix) and (d or not n.startswith(f"l{k}.reverse."))}
                _, h_T[2 * k + d], c_T[2 * k + d], _ = LoopLSTM().forward(seq, h0[2 * k + d], c0[2 * k + d], own)
        return y, h_T, c_T, None


#: planted bug -> the facts its diagnosis must name, from how it is planted (cells as (layer, direction)).
BUGS = {
    planted.ReverseFinalAtWrongEnd: [LayerFact("first-step", "h_T", ((0, 1),))],
    ReverseFinalsAtFirstStep: [LayerFact("first-step", "h_T", ((0, 1), (1, 1))),
                               LayerFact("first-step", "c_T", ((0, 1), (1, 1)))],
    planted.DirectionParametersSwapped: [LayerFact("params")],
    planted.ReverseFeaturesFirst: [LayerFact("concat"), LayerFact("swapped", "y")],
    # index 1 and 2 trade places between the two orders: (layer 0, reverse) and (layer 1, forward)
    planted.StatesDirectionMajor: [LayerFact("direction-major"),
                                   LayerFact("direction-major", "h_T", ((0, 1), (1, 0))),
                                   LayerFact("direction-major", "c_T", ((0, 1), (1, 0)))],
    StatesIndexedReverseFirst: [LayerFact("states"),
                                LayerFact("swapped", "h_T", ((0, 0), (0, 1), (1, 0), (1, 1))),
                                LayerFact("swapped", "c_T", ((0, 0), (0, 1), (1, 0), (1, 1)))],
    planted.FinalStatesDirectionsSwapped: [LayerFact("swapped", "h_T", ((0, 0), (0, 1))),
                                           LayerFact("swapped", "c_T", ((0, 0), (0, 1)))],
    planted.PaddedStepsUpdateState: [LayerFact("padded", "h_T", ((0, 0),)), LayerFact("padded", "c_T", ((0, 0),))],
    StatesRunThroughPadding: [LayerFact("padded", "h_T", ((0, 0), (0, 1), (1, 0), (1, 1))),
                              LayerFact("padded", "c_T", ((0, 0), (0, 1), (1, 0), (1, 1)))],
}


@pytest.mark.parametrize("bug", list(BUGS), ids=lambda c: c.__name__)
def test_a_planted_layer_bug_is_named(bug):
    found = diagnose(bug())
    assert found.status == "none", found.text()
    assert found.layer is not None and found.layer.complete
    assert found.layer.facts == BUGS[bug]
    assert found.tried == 1  # explained as declared: no cell convention is tried
    assert found.headline() == f"no convention explains it: {found.layer.headline()}"
    for line in found.layer.lines():
        assert line in found.text()
    assert found.to_dict()["layer"]["facts"][0]["kind"] == BUGS[bug][0].kind
    fixes = {planted.StatesDirectionMajor: "harness.adapt(impl, state_order='direction-major')",
             planted.ReverseFeaturesFirst: "harness.adapt(impl, y_directions='reverse-first')"}
    assert found.layer.fix == fixes.get(bug, "")


@pytest.mark.parametrize("bug, words", [
    (planted.ReverseFinalAtWrongEnd,
     "h_T[layer 0, reverse] (index 1) equals the reverse direction's hidden state after t = T-1 (its first step), "
     "not after t = 0"),
    (ReverseFinalsAtFirstStep,
     "c_T[layer 1, reverse] (index 3) equals the reverse direction's cell state after t = lengths[b]-1 (its first "
     "step), not after t = 0"),
    (planted.DirectionParametersSwapped,
     "it runs each layer's forward direction with the reverse direction's parameters (l{k}.reverse.*)"),
    (planted.ReverseFeaturesFirst, "y has the reverse direction's features first"),
    (planted.StatesDirectionMajor,
     "h_T[layer 0, reverse] (index 1) equals the final hidden state of layer 1, forward (direction-major index 1)"),
    (planted.FinalStatesDirectionsSwapped,
     "h_T[layer 0, forward] (index 0) equals the reverse direction's final hidden state"),
    (planted.PaddedStepsUpdateState,
     "h_T equals the final hidden state with every row run on through the padded steps to t = T-1, not held "
     "after t = lengths[b]-1"),
    (StatesRunThroughPadding,
     "c_T[layer 1, reverse] (index 3) equals the reverse direction's final cell state with every row started at "
     "t = T-1, over the padded steps, not at t = lengths[b]-1"),
])
def test_the_finding_is_said_with_its_coordinates(bug, words):
    assert words in diagnose(bug()).text()


@pytest.mark.parametrize("bug, call, options", [
    (planted.StatesDirectionMajor, "harness.adapt(impl, state_order='direction-major')",
     "--state-order direction-major"),
    (planted.ReverseFeaturesFirst, "harness.adapt(impl, y_directions='reverse-first')",
     "--y-directions reverse-first"),
])
def test_an_order_the_adapter_declares_prints_the_adapter_call(bug, call, options):
    text = diagnose(bug()).text()
    assert f"Certify it as it is with {call}, or on the command line with the options {options}." in text
    # The printed call, evaluated on the implementation, certifies it (forward and backward).
    import harness
    from harness.api import certify

    adapted = eval(call, {"harness": harness, "impl": bug()})  # noqa: S307 - printed text
    result = certify(adapted, oracles=["finite-differences"], max_examples=5, dtypes=["float64"])
    assert result.verdict == "certified", result.details()


@pytest.mark.parametrize("structure", [
    Structure(bidirectional=True, lengths=True),
    Structure(num_layers=2, bidirectional=True, proj_size=2),
    Structure(num_layers=3, bidirectional=True),
    Structure(num_layers=2, coupled_input_forget=True, cell_clip=2.0, lengths=True),
], ids=lambda s: s.describe().replace(" ", "-"))
def test_a_correct_fixed_layer_is_standard_with_no_hint(structure):
    found = diagnose(_fixed(structure))
    assert found.status == "standard", found.text()
    assert found.layer is None and found.hint == "" and found.tried == 1
    assert "Its backward pass matches too" in found.text()


def test_a_configured_loop_is_diagnosed_in_its_own_structure():
    found = diagnose(LoopLSTM(num_layers=2, bidirectional=True))
    assert found.status == "standard" and found.layer is None, found.text()


def test_readings_go_simplest_first():
    from harness.layer_diagnosis import _readings

    found = _readings(Structure(num_layers=2, bidirectional=True))
    assert found[:5] == [(), ("params",), ("states",), ("direction-major",), ("concat",)]
    assert len(found) == 12 and len(set(found)) == 12
    assert _readings(Structure(bidirectional=True)) == [(), ("params",), ("states",), ("params", "states")]


def test_nothing_is_recognised_in_correct_outputs():
    s = Structure(num_layers=2, bidirectional=True, lengths=True)
    cases = [build_case(CaseSpec(T=3, B=2, D=5, H=4, seed=seed, **structure_fields(s))) for seed in (1, 2)]
    loop = LoopLSTM().with_structure(s)
    outputs = [loop.forward(c.x, c.h0, c.c0, c.params, lengths=c.lengths)[:3] for c in cases]
    assert recognise(cases, outputs) is None


def test_a_layer_bug_the_search_cannot_explain_stops_with_the_reason():
    found = diagnose(planted.Layer1FedFinalState())
    assert found.status == "none" and found.layer is None
    assert found.tried == 1  # adapters apply cell conventions to one cell: none is tried on a whole layer
    assert "The cell conventions (gate order, layout, transposition, biases, variant) were not searched" in found.text()
    assert "adapters apply them to one cell, and planted-layer-Layer1FedFinalState computes the layer structure " \
           "layers=2" in found.text()


class _WrongEndAndForwardCellOff(planted.ReverseFinalAtWrongEnd):
    """The reverse h_T at the wrong end, and besides, the forward direction's c_T off."""

    def forward(self, x, h0, c0, params, lengths=None):
        y, h_T, c_T, cache = super().forward(x, h0, c0, params)
        c_T = c_T.copy()
        c_T[0] += 0.5
        return y, h_T, c_T, cache


def test_a_partial_explanation_is_said_as_one():
    found = diagnose(_WrongEndAndForwardCellOff())
    assert found.layer is not None and not found.layer.complete
    assert found.layer.facts == [LayerFact("first-step", "h_T", ((0, 1),))]
    assert "Part of it is explained by its layer structure (the rest departs otherwise):" in found.text()
    assert found.headline().startswith("no convention explains it; closest:")
    # the reverse direction's final state is the one after t = 0
    assert "It first departs at h_T (after the reverse direction's last step, t=0) at layer=0, direction=reverse" \
        in found.text()


class _IgnoresH0(planted._Planted):
    structure = Structure(num_layers=2, bidirectional=True)

    def forward(self, x, h0, c0, params, lengths=None):
        return self.inner.forward(x, np.zeros_like(h0), c0, params)


def test_an_ignored_initial_state_of_a_layer_is_named():
    found = diagnose(_IgnoresH0())
    assert found.layer is None
    assert found.hint.startswith("With h0 = 0 it matches the standard LSTM as declared"), found.text()


def test_cli_diagnose_shows_the_layer_finding(capsys):
    target = f"{PLANTED}:StatesDirectionMajor"
    assert main(["diagnose", target, "--in-process"]) == 1
    out = capsys.readouterr().out
    assert "Its layer structure explains it" in out and "direction-major index 1" in out
    assert main(["diagnose", f"{PLANTED}:ReverseFinalAtWrongEnd", "--json"]) == 1  # in a worker
    data = json.loads(capsys.readouterr().out)
    assert data["layer"]["complete"] and data["layer"]["facts"][0]["cells"] == [{"layer": 0, "direction": "reverse"}]
    assert data["headline"].startswith("no convention explains it: h_T of the reverse direction taken after t = T-1")
