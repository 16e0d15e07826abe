"""Planted bugs in the whole layer, each caught by a certification through the public API.

The broken implementations (``tests/plugins/planted_layer.py``) each declare a fixed structure, so
every case the search draws is of that structure; each is certified, in float64, against two
independent gradient oracles that compute every structure (finite differences and the torch
composite), and must fail on the quantity its bug reaches; where the diagnosis recognises the bug
(:mod:`harness.layer_diagnosis`), the diagnosis on top of the failure names it. The loop reference in
each structure, certified the same way, passes: the failures are the bugs, not the structure.
"""

from __future__ import annotations

import pytest

import harness
from harness.structure import Structure
from impls.loop import LoopLSTM
from tests.plugins import planted_layer as planted

ORACLES = ["finite-differences", "torch-composite"]

#: bug class -> quantities at least one of which must fail (derived from where the bug sits: a
#: forward bug shows in the outputs, a backward bug in the gradient it breaks).
BUGS = {
    planted.ReverseReadsPadding: {"y", "h_T"},
    planted.PaddedStepsUpdateState: {"h_T", "c_T"},
    planted.LengthsAssumedSorted: {"y", "h_T", "c_T"},
    planted.ReverseFinalAtWrongEnd: {"h_T"},
    planted.Layer1FedFinalState: {"y", "h_T", "c_T"},
    planted.ProjectionGradientMissing: {"dproj"},
    planted.GradientThroughClippedCells: {"dW", "dR", "db", "dx", "dh0", "dc0"},
    planted.CIFGSeparateForgetGate: {"y", "h_T", "c_T"},
    planted.DirectionParametersSwapped: {"y", "h_T", "c_T"},
    planted.ReverseFeaturesFirst: {"y"},
    planted.StatesDirectionMajor: {"y", "h_T", "c_T"},
    planted.FinalStatesDirectionsSwapped: {"h_T", "c_T"},
}

#: bug -> what the diagnosis on top of the failed certification says (harness.layer_diagnosis).
DIAGNOSED = {
    planted.ReverseFinalAtWrongEnd: "h_T of the reverse direction taken after t = T-1 (its first step)",
    planted.DirectionParametersSwapped: "the two directions' parameters swapped",
    planted.ReverseFeaturesFirst: "y's two directions swapped",
    planted.StatesDirectionMajor: "h_T in direction-major order",
    planted.FinalStatesDirectionsSwapped: "h_T's two directions swapped",
}


def _oracles():
    pytest.importorskip("torch")
    return ORACLES


@pytest.mark.parametrize("bug", list(BUGS), ids=lambda c: c.__name__)
def test_planted_layer_bug_is_caught(bug, tmp_path):
    result = harness.certify(bug(), dtypes=["float64"], oracles=_oracles(), max_examples=40,
                             report_dir=tmp_path / "report")
    assert not result.ok, f"{bug.__name__} was certified"
    failed = {r.quantity for r in result.failures if r.status == "fail"}
    assert failed & BUGS[bug], f"{bug.__name__}: failed on {sorted(failed)}, expected one of {sorted(BUGS[bug])}"
    if bug in DIAGNOSED:
        assert DIAGNOSED[bug] in result.diagnosis["headline"], result.diagnosis["text"]


@pytest.mark.parametrize("structure", list(dict.fromkeys(bug.structure for bug in BUGS)),
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_the_correct_layer_in_the_same_structure_is_certified(structure, tmp_path):
    class Correct:
        variant = "vanilla"
        name = "loop-" + structure.describe().replace(" ", "-")
        s: Structure = structure
        num_layers, bidirectional, accepts_lengths = s.num_layers, s.bidirectional, s.lengths
        proj_size, coupled_input_forget, cell_clip = s.proj_size, s.coupled_input_forget, s.cell_clip

        def __init__(self):
            self.inner = LoopLSTM().with_structure(self.s)

        def forward(self, x, h0, c0, params, lengths=None):
            return self.inner.forward(x, h0, c0, params, **({} if lengths is None else {"lengths": lengths}))

        def backward(self, dy, dh_T, dc_T, cache):
            return self.inner.backward(dy, dh_T, dc_T, cache)

    result = harness.certify(Correct(), dtypes=["float64"], oracles=_oracles(), max_examples=40,
                             report_dir=tmp_path / "report")
    assert result.ok, result.summary()
