"""diagnose names the convention of plugins written in other gate orders and layouts, says so when
the forward matches but the backward does not, and says where the closest convention departs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.adapt import adapt
from harness.api import certify
from harness.cli import main
from harness.diagnose import GATE_PERMUTATIONS, diagnose
from harness.plugins import load_target

FOREIGN = Path(__file__).parent / "plugins" / "foreign.py"


def test_all_24_gate_orders_are_tried():
    assert len(set(GATE_PERMUTATIONS)) == 24 and GATE_PERMUTATIONS[0] == "ifgo"


@pytest.mark.parametrize("name, keywords, words", [
    ("ifog", {"gate_order": "ifog"}, "its gate blocks are read as i, f, o, g"),
    ("tf1", {"gate_order": "igfo", "forget_bias": 1.0}, "it adds a forget bias of +1 itself"),
    ("transposed", {"transposed": True}, "its weights are transposed"),
    ("batch_major", {"batch_major": True}, "its sequences are batch-major"),
    ("keras_like", {"transposed": True, "batch_major": True}, "its weights are transposed"),
    ("onnx_order_transposed", {"gate_order": "iofg", "transposed": True}, "read as i, o, f, g"),
])
def test_convention_is_named(name, keywords, words):
    result = diagnose(f"{FOREIGN}:{name}")
    assert result.status == "convention"
    assert result.match.convention.keywords() == keywords
    text = result.text()
    assert "It matches the standard LSTM if" in text and words in text
    assert "Its backward pass matches too" in text
    # The suggested adapter really certifies it.
    impl, _ = load_target(f"{FOREIGN}:{name}")
    certified = certify(adapt(impl, **keywords), max_examples=10, oracles=["finite-differences"],
                        dtypes=["float64"])
    assert certified.verdict == "certified"


def test_other_variant_is_named():
    result = diagnose(f"{FOREIGN}:peephole_as_vanilla")
    assert result.status == "convention" and result.match.variant == "peephole"
    assert result.match.convention.is_standard
    assert "it computes the peephole variant, not vanilla" in result.text()
    assert "--variant peephole" in result.text()


def test_standard_implementation():
    result = diagnose("loop")
    assert result.status == "standard" and result.tried == 1
    assert "matches the standard LSTM as declared" in result.text()


def test_forward_matches_backward_does_not():
    result = diagnose(f"{FOREIGN}:tanh_bug")
    assert result.status == "backward"
    text = result.text()
    assert "Its forward pass matches the standard LSTM as declared" in text
    assert "Its backward pass departs" in text and "dW" in text


def test_nothing_matches_and_the_closest_departure_is_located():
    result = diagnose(f"{FOREIGN}:nonsense")
    assert result.status == "none" and result.match is None
    assert result.tried == 24 * 2 * 2 * 2 * 3
    assert result.closest is not None and result.closest.convention.is_standard
    text = result.text()
    assert "No convention tried makes it match" in text
    assert "It first departs at y at t=0" in text


@pytest.mark.parametrize("name, state, under", [
    ("ignores_c0", "c0", "as declared"),
    ("ignores_h0_transposed", "h0", "if its weights are transposed"),
])
def test_an_ignored_initial_state_is_named_when_nothing_matches(name, state, under):
    result = diagnose(f"{FOREIGN}:{name}")
    assert result.status == "none"
    assert result.hint.startswith(f"With {state} = 0 it matches the standard LSTM {under}"), result.hint
    assert result.hint in result.text() and result.to_dict()["hint"] == result.hint


def test_no_ignored_state_is_claimed_where_there_is_none():
    assert diagnose(f"{FOREIGN}:nonsense").hint == ""
    assert diagnose("loop").hint == ""


def test_cli_diagnose_exit_codes_and_json(capsys):
    assert main(["diagnose", "loop", "--in-process"]) == 0
    capsys.readouterr()
    assert main(["diagnose", f"{FOREIGN}:ifog", "--json"]) == 1  # isolated: the worker adapts it
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "convention" and data["match"]["convention"] == {"gate_order": "ifog"}
    assert data["match"]["adapt"] == "harness.adapt(impl, gate_order='ifog')"
    assert main(["diagnose", "no_such_module_xyz:X"]) == 2


def test_json_output_is_not_corrupted_by_what_the_implementation_prints(capfd):
    """The worker's standard output goes to stderr: --json stays parseable."""
    misbehaving = Path(__file__).parent / "plugins" / "misbehaving.py"
    assert main(["diagnose", f"{misbehaving}:Prints", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["status"] == "standard"
    assert "debug output of the implementation" in err


def test_bad_dtype_is_an_invalid_argument():
    from harness.api import InvalidArgument

    with pytest.raises(InvalidArgument, match="dtype: wrong-dtype declares float32"):
        diagnose(f"{Path(__file__).parent / 'plugins' / 'misbehaving.py'}:WrongDtype", dtype="float64")
