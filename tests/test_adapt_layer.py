"""harness.adapt for whole layers: PyTorch-style layer modules (nn.LSTM's names and attributes, packed
lengths) and the order of a layered state's (num_layers * dirs) axis (``state_order``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import adapt
from harness.adapt import Convention
from harness.api import certify
from harness.cli import main
from harness.contract import gradient_keys, validate
from harness.layouts import state_order_from, state_order_index, state_order_to, swap_directions
from harness.structure import Structure
from impls.loop import LoopLSTM
from tests.plugins import direction_major
from tests.structured import structured_case

PLUGINS = Path(__file__).parent / "plugins"
FD = ["finite-differences"]

# --------------------------------------------------------------------------------------------------
# The state order: a permutation of the leading axis, against tables written out by hand

# position in its order -> the contract's index (layer * dirs + direction)
_TABLES = [
    (2, 2, "direction-major", [0, 2, 1, 3]),  # l0 fwd, l1 fwd, l0 rev, l1 rev
    (3, 2, "direction-major", [0, 2, 4, 1, 3, 5]),
    (3, 1, "direction-major", [0, 1, 2]),  # one direction: the two orders agree
    (1, 2, "direction-major", [0, 1]),  # one layer: likewise
    (2, 2, "layer-major", [0, 1, 2, 3]),
]


@pytest.mark.parametrize("L, dirs, order, table", _TABLES)
def test_state_order_index_is_the_hand_table(L, dirs, order, table):
    assert state_order_index(L, dirs, order).tolist() == table


@pytest.mark.parametrize("L, dirs, order, table", _TABLES)
def test_state_order_round_trip(L, dirs, order, table):
    canon = np.random.default_rng(0).standard_normal((L * dirs, 3, 4))
    mine = state_order_to(canon, L, dirs, order)
    for position, index in enumerate(table):
        np.testing.assert_array_equal(mine[position], canon[index])
    np.testing.assert_array_equal(state_order_from(mine, L, dirs, order), canon)
    assert mine is not canon and not np.shares_memory(mine, canon)


def test_state_order_agrees_with_a_stack_that_keeps_its_states_direction_major():
    canon = np.random.default_rng(1).standard_normal((4, 2, 3))
    np.testing.assert_array_equal(state_order_to(canon, 2, 2, "direction-major"),
                                  direction_major._to_direction_major(canon))


@pytest.mark.parametrize("call, message", [
    (lambda: state_order_index(2, 2, "sideways"), r"state_order: expected one of \('layer-major', 'direction-major'\)"),
    (lambda: state_order_to(np.zeros((3, 2, 4)), 2, 2, "direction-major"),
     r"h0: expected a state of shape \(num_layers \* dirs, B, H\) = \(4, B, H\), got shape \(3, 2, 4\)"),
    (lambda: state_order_from(np.zeros((2, 4)), 1, 2, "direction-major", name="c_T"), r"c_T: expected a state"),
])
def test_state_order_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_swap_directions_swaps_the_halves_and_is_its_own_inverse():
    y = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # H_out = 2 per direction
    swapped = swap_directions(y)
    np.testing.assert_array_equal(swapped[..., :2], y[..., 2:])
    np.testing.assert_array_equal(swapped[..., 2:], y[..., :2])
    np.testing.assert_array_equal(swap_directions(swapped), y)
    W = np.arange(8 * 6, dtype=float).reshape(8, 6)
    np.testing.assert_array_equal(swap_directions(W, axis=1)[:, :3], W[:, 3:])
    with pytest.raises(ValueError, match=r"l1.W: expected an even size \(two directions' features\) along axis 1"):
        swap_directions(np.zeros((8, 5)), axis=1, name="l1.W")


@pytest.mark.parametrize("structure", [Structure(), Structure(proj_size=2),
                                       Structure(num_layers=2, bidirectional=True, proj_size=2)])
def test_torch_names_are_to_torchs_keys_and_from_torchs_names(structure):
    from harness.layouts import from_torch, to_torch, torch_names

    params = structured_case(structure).params
    names = torch_names(structure)
    torch_dict = to_torch(params, structure)
    assert set(names) == set(torch_dict)
    assert set(names.values()) == set(params) == set(from_torch(torch_dict, structure))
    for theirs, ours in names.items():
        if not theirs.startswith("bias_hh"):  # the hidden bias half is 0 in to_torch
            np.testing.assert_array_equal(torch_dict[theirs], params[ours])
    if structure.layered:
        assert names["weight_hr_l1_reverse"] == "l1.reverse.proj" and names["bias_hh_l0"] == "l0.b"


def test_the_convention_names_the_state_order():
    conv = Convention(state_order="direction-major")
    assert conv.keywords() == {"state_order": "direction-major"}
    assert "direction-major" in conv.describe()
    assert Convention().keywords() == {} and Convention(state_order="layer-major").is_standard


# --------------------------------------------------------------------------------------------------
# A layered NumPy implementation whose states are direction-major


def test_a_direction_major_stack_is_caught_as_it_is_and_certified_adapted():
    as_it_is = certify(direction_major.stack, oracles=FD, max_examples=2, dtypes=["float64"])
    assert as_it_is.verdict == "discrepancies"
    assert {"h_T", "c_T", "dh0", "dc0"} <= {r.quantity for r in as_it_is.records if r.status == "fail"}
    adapted = adapt(direction_major.stack, state_order="direction-major")
    info = validate(adapted)
    assert info.structure == Structure(num_layers=2, bidirectional=True)
    result = certify(adapted, oracles=FD, max_examples=3)
    assert result.verdict == "certified", result.details()
    assert {"dl1.reverse.W", "dh0", "h_T"} <= {r.quantity for r in result.records if r.status == "pass"}


def test_a_reverse_first_stack_is_caught_as_it_is_and_certified_adapted():
    as_it_is = certify(direction_major.reverse_first, oracles=FD, max_examples=2, dtypes=["float64"])
    assert as_it_is.verdict == "discrepancies" and "y" in {r.quantity for r in as_it_is.records if r.status == "fail"}
    result = certify(adapt(direction_major.reverse_first, y_directions="reverse-first"), oracles=FD, max_examples=3)
    assert result.verdict == "certified", result.details()


@pytest.mark.parametrize("stack, keywords", [
    (direction_major.stack, {"state_order": "direction-major"}),
    (direction_major.reverse_first, {"y_directions": "reverse-first"}),
])
def test_the_adapted_stack_computes_what_the_loop_computes(stack, keywords):
    s = Structure(num_layers=2, bidirectional=True)
    case = structured_case(s, seed=3)
    loop = LoopLSTM().with_structure(s)
    adapted = adapt(stack, **keywords)
    # readapted (as harness.diagnose re-reads an adapter) it is the same
    for impl in (adapted, adapt(adapt(stack), **keywords)):
        y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        y0, h0_T, c0_T, cache0 = loop.forward(case.x, case.h0, case.c0, case.params)
        for got, want in ((y, y0), (h_T, h0_T), (c_T, c0_T)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        grads, want = impl.backward(case.dy, case.dh_T, case.dc_T, cache), loop.backward(case.dy, case.dh_T,
                                                                                        case.dc_T, cache0)
        assert set(grads) == set(want)
        for key in want:
            np.testing.assert_allclose(grads[key], want[key], rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("keywords, message", [
    ({"state_order": "sideways"}, r"state_order: expected one of \('layer-major', 'direction-major'\)"),
    ({"gate_order": "ifog"}, r"gate_order: not supported for a whole layer \(layers=2 bidirectional\)"),
    ({"names": {"W": "kernel"}}, r"names: not supported for a whole layer"),
    ({"layout": "DBT"}, r"layout: a whole layer's states keep their \(num_layers \* dirs, B, H\) shape"),
    ({"lengths": "packed"}, r"lengths: expected None, or 'packed' for a PyTorch-style layer module"),
    ({"y_directions": "backward-first"}, r"y_directions: expected one of \('forward-first', 'reverse-first'\)"),
])
def test_bad_keywords_for_a_layered_object(keywords, message):
    with pytest.raises(ValueError, match=message):
        adapt(direction_major.stack, **keywords)


def test_an_adapted_layer_is_read_again_in_its_layout_and_orders_only():
    adapted = adapt(direction_major.stack)
    with pytest.raises(ValueError, match=r"transposed: a whole layer's parameters \(layers=2 bidirectional\) are "
                                         r"passed on by name"):
        adapt(adapted, transposed=True)


def test_a_single_layer_that_takes_lengths_keeps_its_structure_and_convention_through_the_adapter():
    s = Structure(lengths=True, coupled_input_forget=True)
    inner = LoopLSTM().with_structure(s)

    class Transposed:  # the loop behind weights kept transposed: the cell's convention still applies
        variant, accepts_lengths, coupled_input_forget = "vanilla", True, True

        def forward(self, x, h0, c0, params, lengths):
            return inner.forward(x, h0, c0, {k: v.T if v.ndim == 2 else v for k, v in params.items()},
                                 lengths=lengths)

    adapted = adapt(Transposed(), transposed=True)
    assert validate(adapted).structure == s
    result = certify(adapted, oracles=FD, max_examples=3)
    assert result.verdict == "certified", result.details()


def test_state_order_on_a_single_layer_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"state_order: applies to a layered implementation .* LoopLSTM declares "
                                         r"one layer and one direction, so its states are \(B, H\)"):
        adapt(direction_major.one_layer, state_order="direction-major")
    with pytest.raises(ValueError, match="state_order: applies to a layered implementation"):
        adapt(adapt(direction_major.one_layer), state_order="direction-major")
    with pytest.raises(ValueError, match="state_order: expected one of"):  # an unknown order is named first
        adapt(direction_major.one_layer, state_order="reversed")
    with pytest.raises(ValueError, match=r"y_directions: applies to a bidirectional implementation, whose y holds "
                                         r"two directions' features; LoopLSTM declares one direction"):
        adapt(direction_major.one_layer, y_directions="reverse-first")


# --------------------------------------------------------------------------------------------------
# On the command line

_STACK = f"{PLUGINS / 'direction_major.py'}:stack"


def test_the_state_order_option_certifies_a_direction_major_target(tmp_path, capsys):
    common = ["--max-examples", "2", "--oracle", "finite-differences", "--dtype", "float64", "--in-process",
              "--report-dir"]
    assert main(["certify", _STACK, "--state-order", "direction-major", *common, str(tmp_path / "a")]) == 0
    assert "Verdict: certified" in capsys.readouterr().out
    assert main(["certify", _STACK, *common, str(tmp_path / "b")]) == 1


def test_the_y_directions_option_certifies_a_reverse_first_target(tmp_path, capsys):
    target = f"{PLUGINS / 'direction_major.py'}:reverse_first"
    assert main(["certify", target, "--y-directions", "reverse-first", "--max-examples", "2", "--oracle",
                 "finite-differences", "--in-process", "--report-dir", str(tmp_path)]) == 0
    assert "Verdict: certified" in capsys.readouterr().out
    assert main(["certify", target, "--y-directions", "upside-down", "--report-dir", str(tmp_path)]) == 2
    assert "--y-directions: expected one of ('forward-first', 'reverse-first')" in capsys.readouterr().err


@pytest.mark.parametrize("target, message", [
    (_STACK, "--state-order: expected one of ('layer-major', 'direction-major')"),
    (f"{PLUGINS / 'direction_major.py'}:one_layer", "state_order: applies to a layered implementation"),
])
def test_the_state_order_option_usage_errors_exit_2(target, message, tmp_path, capsys):
    order = "sideways" if target == _STACK else "direction-major"
    assert main(["certify", target, "--state-order", order, "--report-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# PyTorch-style layer modules

TORCH_ORACLES = ["finite-differences", "torch-composite"]


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch", reason="PyTorch-style layer modules need PyTorch")
    torch.manual_seed(0)
    return torch


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("settings, lengths, structure", [
    ({}, None, Structure()),
    ({"proj_size": 2, "batch_first": True}, None, Structure(proj_size=2)),
    ({"num_layers": 2, "bidirectional": True, "proj_size": 2}, "packed",
     Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)),
], ids=["one-layer", "proj-batch-first", "stacked-bidirectional-proj-packed"])
def test_nn_lstm_certifies_in_its_structure(torch, settings, lengths, structure):
    module = torch.nn.LSTM(3, 4, **settings)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    adapted = adapt(module, lengths=lengths)
    assert validate(adapted).structure == structure
    result = certify(adapted, oracles=TORCH_ORACLES, max_examples=3)
    assert result.verdict == "certified", result.details()
    assert result.settings["dtypes"] == ["float64", "float32"]
    passed = {(r.oracle, r.quantity) for r in result.records if r.status == "pass"}
    gradients = {"d" + k for k in gradient_keys("vanilla", structure)}
    for oracle in TORCH_ORACLES:
        assert {(oracle, q) for q in gradients | {"y", "h_T", "c_T"}} <= passed
    # the module itself is left as it was: its weights and its sizes
    assert module.input_size == 3 and module.hidden_size == 4
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_command_line_takes_a_pytorch_layer_as_it_is(torch, tmp_path, capsys):
    import json

    from harness.plugins import load_target

    models = tmp_path / "models.py"
    models.write_text("import torch\nfrom torch import nn\n\n"
                      "class Flipped(nn.LSTM):  # each layer's final states of the two directions swapped\n"
                      "    def forward(self, x, hx=None):\n"
                      "        y, (h, c) = super().forward(x, hx)\n"
                      "        flip = lambda s: s.reshape(self.num_layers, 2, *s.shape[1:]).flip(1).reshape(s.shape)\n"
                      "        return y, (flip(h), flip(c))\n\n"
                      "torch.manual_seed(0)\n"
                      "plain = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)\n"
                      "flipped = Flipped(3, 4, num_layers=2, bidirectional=True)\n")
    common = ["--oracle", "finite-differences", "--max-examples", "2", "--dtype", "float64"]

    def certify_cli(*args: str) -> tuple[int, dict]:
        out = tmp_path / f"report{len(list(tmp_path.iterdir()))}"
        code = main(["certify", *args, *common, "--report-dir", str(out)])
        return code, json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}

    # No options: nn.LSTM's own convention, its structure read off its attributes (batch_first included).
    code, report = certify_cli(f"{models}:plain")
    assert code == 0 and report["verdict"] == "certified"
    structures = {json.dumps(r["case"]["structure"], sort_keys=True) for r in report["records"]}
    assert [json.loads(s) for s in structures] == [Structure(num_layers=2, bidirectional=True).to_dict()]
    # --lengths packed: it is handed packed sequences, every case has lengths.
    code, report = certify_cli(f"{models}:plain", "--lengths", "packed")
    assert code == 0 and all(r["case"]["lengths"] is not None for r in report["records"])
    # A wrong one is caught, and its replay command loads it the same way.
    code, report = certify_cli(f"{models}:flipped")
    assert code == 1 and "h_T" in {r["quantity"] for r in report["records"] if r["status"] == "fail"}
    replay = next(r["replay"] for r in report["records"] if r["status"] == "fail")
    assert main(replay.split()[1:]) == 1
    # The module as made, for a caller that adapts it with options of its own.
    assert type(load_target(f"{models}:plain", as_is=True)[0]).__name__ == "LSTM"
    capsys.readouterr()
    # --lengths packed is for such a module only, and exits 2 naming it.
    assert main(["certify", "impls.loop:LoopLSTM", "--lengths", "packed", *common]) == 2
    assert "lengths: expected None, or 'packed' for a PyTorch-style layer module" in capsys.readouterr().err
    assert main(["certify", "--command", "prog", "--lengths", "packed"]) == 2
    assert "--lengths: applies to a PyTorch-style layer TARGET" in capsys.readouterr().err


def test_a_hand_written_module_on_the_command_line_is_told_the_options_it_needs(torch, tmp_path, capsys):
    target = f"{PLUGINS / 'foreign_torch.py'}:HandWrittenLSTM"
    assert main(["certify", target, "--report-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert ("hint: HandWrittenLSTM is a PyTorch nn.Module (parameters weight_ih (16, 3), weight_hh (16, 4), "
            "bias (16,))") in err and "--names W=<its input weights>" in err
    assert not (tmp_path / "a").exists()  # refused before any work
    assert main(["certify", target, "--layout", "BTD", "--names", "W=weight_ih,R=weight_hh,b=bias", "--max-examples",
                 "2", "--oracle", "finite-differences", "--dtype", "float64", "--report-dir", str(tmp_path / "b")]) == 0


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_nn_lstm_through_the_adapter_computes_what_the_loop_computes(torch):
    s = Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)
    case = structured_case(s, seed=5, T=5, B=3, lengths=[2, 5, 1])
    adapted = adapt(torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
                    lengths="packed")
    loop = LoopLSTM().with_structure(s)
    out = adapted.forward(case.x, case.h0, case.c0, case.params, lengths=case.lengths)
    want = loop.forward(case.x, case.h0, case.c0, case.params, lengths=case.lengths)
    for name, got, expected in zip(("y", "h_T", "c_T"), out[:3], want[:3]):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12, err_msg=name)
    grads = adapted.backward(case.dy, case.dh_T, case.dc_T, out[3])
    expected = loop.backward(case.dy, case.dh_T, case.dc_T, want[3])
    assert set(grads) == set(expected)
    for key in expected:
        np.testing.assert_allclose(grads[key], expected[key], rtol=1e-9, atol=1e-11, err_msg=key)


def test_a_hand_written_stack_with_nn_lstm_names_certifies_in_either_state_order(torch):
    from tests.plugins.torch_stack import HandStackedLSTM

    plain = adapt(HandStackedLSTM(3, 4, num_layers=2, bidirectional=True))
    assert certify(plain, oracles=TORCH_ORACLES, max_examples=2, dtypes=["float64"]).verdict == "certified"
    confused = HandStackedLSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, state_order="direction-major")
    as_it_is = certify(adapt(confused), oracles=FD, max_examples=2, dtypes=["float64"])
    assert as_it_is.verdict == "discrepancies"
    assert "h_T" in {r.quantity for r in as_it_is.records if r.status == "fail"}
    result = certify(adapt(confused, state_order="direction-major"), oracles=TORCH_ORACLES, max_examples=2)
    assert result.verdict == "certified", result.details()


@pytest.mark.parametrize("planted, caught", [
    ("FlippedReverseLSTM", {"h_T"}),
    ("NoisyGradientLSTM", {"dl1.R"}),
])
def test_planted_bugs_in_nn_lstm_subclasses_are_caught(torch, planted, caught):
    from tests.plugins import torch_stack

    module = getattr(torch_stack, planted)(3, 4, num_layers=2, bidirectional=True)
    result = certify(adapt(module), oracles=FD, max_examples=2, dtypes=["float64"])
    assert result.verdict == "discrepancies"
    failed = {r.quantity for r in result.records if r.status == "fail"}
    assert caught <= failed
    if planted == "NoisyGradientLSTM":  # its forward is right: only that gradient departs
        assert failed == caught


def test_a_module_that_ignores_bias_hh_is_caught(torch):
    # nn.LSTM's two biases are given uneven shares of b, so a module that adds one of them only is wrong
    from tests.plugins.torch_stack import HandStackedLSTM

    s = Structure(num_layers=2)
    case = structured_case(s, seed=7)
    adapted = adapt(HandStackedLSTM(3, 4, num_layers=2, ignores_bias_hh=True))
    y, *_ = adapted.forward(case.x, case.h0, case.c0, case.params)
    want, *_ = LoopLSTM().with_structure(s).forward(case.x, case.h0, case.c0, case.params)
    assert np.abs(y - want).max() > 1e-3


def _renamed_layers(torch):
    m = torch.nn.LSTM(3, 4, num_layers=2)
    m.num_layers = 3
    return m


def _wrong_hidden_size(torch):
    m = torch.nn.LSTM(3, 4)
    m.hidden_size = 5
    return m


@pytest.mark.parametrize("make, keywords, message", [
    (_renamed_layers, {}, r"impl: LSTM's attributes \(num_layers=3, bidirectional=False, proj_size=0\) disagree "
                          r"with its parameters: missing \['weight_ih_l2'"),
    (_wrong_hidden_size, {}, r"hidden_size: LSTM says hidden_size=5, but weight_ih_l0 has 16 rows"),
    (lambda torch: torch.nn.LSTM(3, 4, bias=False), {}, r"impl: LSTM has no biases \(bias=False\)"),
    (lambda torch: torch.nn.LSTM(3, 4), {"state_order": "direction-major"}, "state_order: applies to a layered"),
    (lambda torch: torch.nn.LSTM(3, 4, num_layers=2), {"gate_order": "ifog"},
     r"gate_order: not supported for a whole layer \(layers=2\); its parameters are passed on by name as they are "
     r"\(nn.LSTM's prefixed names\)"),
    (lambda torch: torch.nn.LSTM(3, 4, batch_first=True), {"layout": "DBT"},
     r"layout: got 'DBT', but the module says batch_first=True, so its sequences are BTD; leave the layout out"),
    (lambda torch: torch.nn.LSTM(3, 4), {"batch_major": True},  # named as it was given
     r"batch_major: True is 'BTD', but the module says batch_first=False, so its sequences are TBD"),
    (lambda torch: torch.nn.LSTM(3, 4), {"variant": "peephole"}, r"variant: a PyTorch-style layer module computes "
                                                                 r"the vanilla cell"),
    (lambda torch: torch.nn.LSTM(3, 4), {"lengths": "padded"}, r"lengths: expected None, or 'packed'"),
])
def test_bad_modules_and_keywords_name_the_argument(torch, make, keywords, message):
    with pytest.raises(ValueError, match=message):
        adapt(make(torch), **keywords)


def test_a_module_that_changes_a_weight_in_place_is_reported_under_the_contracts_name(torch):
    class ScalesItsWeight(torch.nn.LSTM):
        def forward(self, x, hx=None):
            with torch.no_grad():
                self.weight_hh_l1_reverse.mul_(2.0)
            return super().forward(x, hx)

    # the change reaches the caller's array under the contract's name, where the harness reports it
    s = Structure(num_layers=2, bidirectional=True)
    case = structured_case(s, seed=2)
    given = {k: v.copy() for k, v in case.params.items()}
    adapt(ScalesItsWeight(3, 4, num_layers=2, bidirectional=True)).forward(case.x, case.h0, case.c0, given)
    for key, value in case.params.items():
        np.testing.assert_array_equal(given[key], 2.0 * value if key == "l1.reverse.R" else value, err_msg=key)
