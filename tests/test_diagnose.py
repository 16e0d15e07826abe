"""diagnose names the convention of plugins written in other gate orders and layouts, says so when
the forward matches but the backward does not, and says where the closest convention departs.
It applies an adapter's declared limits as certify does, re-adapts what an adapter wraps, names an
ignored initial state under any convention, and lists every reason trials could not run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from harness.adapt import adapt
from harness.api import certify
from harness.cli import main
from harness.diagnose import GATE_PERMUTATIONS, diagnose, diagnose_subject
from harness.plugins import load_target
from harness.session import open_subject
from impls.loop import LoopLSTM
from tests.plugins.foreign import ForeignLSTM, lstm_backward, lstm_forward

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
    assert "(declared variant: vanilla; 1 convention tried)" in result.text()


def test_forward_matches_backward_does_not():
    result = diagnose(f"{FOREIGN}:tanh_bug")
    assert result.status == "backward"
    text = result.text()
    assert "Its forward pass matches the standard LSTM as declared" in text
    assert "Its backward pass departs" in text and "dW" in text


def test_nothing_matches_and_the_closest_departure_is_located():
    result = diagnose(f"{FOREIGN}:nonsense")
    assert result.status == "none" and result.match is None
    # orders, forget bias, transposed, layouts, variants (trials ran: no other bias forms are tried)
    assert result.tried == 24 * 2 * 2 * 3 * 3
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


# --------------------------------------------------------------------------------------------------
# Declared limits and adapters


def test_course_exercise_adapter_matches_as_declared_with_its_limits():
    """Its c_T is a placeholder and it has no c0: compared as certify compares them, it matches."""
    result = diagnose(f"{FOREIGN}:course")
    assert result.status == "standard", result.text()
    assert result.match.as_declared and result.tried == 1
    skipped = {r.quantity: r.reason for r in result.backward if r.status == "skip"}
    assert set(skipped) == {"dc0"} and "no initial cell state" in skipped["dc0"]
    assert all(r.status == "pass" for r in result.backward if r.quantity != "dc0")


def test_course_exercise_adapter_in_a_worker(capsys):
    assert main(["diagnose", f"{FOREIGN}:course", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "standard" and data["headline"].startswith("course-exercise matches")


_WRONG_PAIR = '''
import sys
sys.path.insert(0, {plugins!r})
from foreign import lstm_backward, lstm_forward
from harness.adapt import adapt

# The course exercise, with transposed=True forgotten.
pair = adapt(forward_fn=lstm_forward, backward_fn=lstm_backward, name="pair", gate_order="ifog",
             batch_major=True, initial_cell=False, final_cell=False, backward_takes=("dy", "cache"),
             names={{"W": "Wx", "R": "Wh"}})
'''


def test_function_pair_adapter_is_diagnosed_through_what_it_wraps(tmp_path):
    """The functions behind a wrongly declared adapter are read in every convention (an adapter around
    the adapter could never read them transposed), with the adapter's limits; in a worker too."""
    wrong = adapt(forward_fn=lstm_forward, backward_fn=lstm_backward, name="pair", gate_order="ifog",
                  batch_major=True, initial_cell=False, final_cell=False, backward_takes=("dy", "cache"),
                  names={"W": "Wx", "R": "Wh"})
    found = {"gate_order": "ifog", "transposed": True, "batch_major": True}
    result = diagnose(wrong)
    assert result.status == "convention", result.text()
    # The whole convention, the adapter's own cell states included: the printed call evaluates on it as it is.
    assert result.match.convention.keywords() == {**found, "initial_cell": False, "final_cell": False}
    assert "Its backward pass matches too" in result.text()
    certified = certify(adapt(wrong, **found), max_examples=10, oracles=["finite-differences"], dtypes=["float64"])
    assert certified.verdict == "certified", certified.details()
    assert {r.quantity for r in certified.records if r.status == "skip"} == {"c_T", "dc0"}

    module = tmp_path / "pair_module.py"
    module.write_text(_WRONG_PAIR.format(plugins=str(FOREIGN.parent)))
    isolated = diagnose(f"{module}:pair", isolate=True)
    assert isolated.status == "convention" and isolated.match.convention.keywords() == found


def test_an_adapter_keeps_its_interface_when_adapted_again():
    course = load_target(f"{FOREIGN}:course")[0]
    again = adapt(course, gate_order="ifgo")
    assert again.limits == course.limits and again.convention.transposed is False
    assert again.convention.initial_cell is False and again._names == course._names
    with pytest.raises(ValueError, match="names: an adapter passed to adapt"):
        adapt(course, names={"W": "Wx"})


# --------------------------------------------------------------------------------------------------
# Ignored initial states, under every convention


class _IgnoresStates(ForeignLSTM):
    """A foreign LSTM that starts from zero whatever ``states`` it is given."""

    def __init__(self, states, **kwargs):
        super().__init__(**kwargs)
        self.states = states

    def forward(self, x, h0, c0, params):
        h0 = np.zeros_like(h0) if "h0" in self.states else h0
        c0 = np.zeros_like(c0) if "c0" in self.states else c0
        return super().forward(x, h0, c0, params)


@pytest.mark.parametrize("states, order, zero, words, under", [
    (("h0",), "ifgo", "h0 = 0", "its initial hidden state h0", "as declared"),
    (("h0", "c0"), "igfo", "h0 = 0 and c0 = 0", "its initial hidden state h0 and its initial cell state c0",
     "if its gate blocks are read as i, g, f, o"),
])
def test_ignored_initial_states_are_found_under_any_convention(states, order, zero, words, under):
    result = diagnose(_IgnoresStates(states, order=order, name="ignores"))
    assert result.status == "none"
    assert result.ignored is not None and result.ignored.states == states
    assert result.hint.startswith(f"With {zero} it matches the standard LSTM {under}: it ignores {words}"), \
        result.hint
    assert result.headline().startswith(f"no convention explains it: it ignores {words}")
    assert result.to_dict()["ignored_states"] == list(states)


# --------------------------------------------------------------------------------------------------
# Where it first departs; why trials failed


class _LastStepBug:
    """Right but for the last step: y[T-1] (= h_T) a little off, c_T far off."""

    name = "last-step-bug"
    variant = "vanilla"
    dtypes = ("float64",)

    def forward(self, x, h0, c0, params):
        y, h_T, c_T, cache = LoopLSTM().forward(x, h0, c0, params)
        y = y.copy()
        y[-1, 1, 2] += 1e-3
        return y, y[-1].copy(), c_T + 1.0, cache


def test_first_departure_is_the_earliest_in_time_not_the_worst():
    result = diagnose(_LastStepBug())
    closest = result.closest
    assert result.status == "none" and closest.as_declared
    assert closest.worst_quantity == "c_T"
    departure = closest.departure
    assert (departure.quantity, departure.t) == ("y", 2)
    assert departure.coords == {"t": 2, "batch": 1, "unit": 2}
    assert "It first departs at y at t=2, batch=1, unit=2" in result.text()
    assert result.headline() == ("no convention explains it; closest: the convention it declares, first departs "
                                 "at y, t=2 of T=3")


class _RaisesByConvention:
    """Raises a different error for each kind of trial."""

    name = "raises"
    variant = "vanilla"
    dtypes = ("float64",)

    def forward(self, x, h0, c0, params):
        if "b" not in params:
            raise KeyError("no bias")
        if "p_i" in params:
            raise ValueError("peephole weights given")
        if params["W"].shape[0] != 4 * h0.shape[1]:
            raise ValueError("weights transposed")
        raise ArithmeticError("always broken")


def test_every_distinct_reason_trials_failed_is_listed_with_its_count():
    result = diagnose(_RaisesByConvention())
    assert result.status == "none" and result.closest is None and result.mismatched == 0
    # No trial ran: the one bias is also read as two summed biases and as folded (two variants each).
    assert result.tried == 24 * 2 * 2 * 3 * (3 + 2 + 2)
    # Most frequent first; ties in the order the search met them (as declared first, then the variants).
    assert result.failures == [("forward raised KeyError: 'no bias'", 288 + 4 * 288),  # separate, folded too
                               ("forward raised ValueError: peephole weights given", 288),
                               ("forward raised ValueError: weights transposed", 192),  # (H, B) states too
                               ("forward raised ArithmeticError: always broken", 96)]
    text = result.text()
    assert "2016 of 2016 trials could not run:" in text
    for reason, n in result.failures:
        assert f"  {n} x {reason}" in text
    assert result.to_dict()["failures"][0] == {"reason": "forward raised KeyError: 'no bias'", "trials": 1440}


# --------------------------------------------------------------------------------------------------
# An opened subject; the headline


def test_diagnose_subject_takes_an_opened_subject_and_leaves_it_open():
    from harness.cases import CaseSpec, build_case

    subject, _ = open_subject(f"{FOREIGN}:ifog", isolate=True)
    try:
        result = diagnose_subject(subject)
        assert result.status == "convention" and result.match.convention.keywords() == {"gate_order": "ifog"}
        case = build_case(CaseSpec(variant="vanilla", dtype="float64", T=2, B=1, D=3, H=2, seed=0))
        assert subject.execute(case, backward=False).forward is not None
    finally:
        subject.close()


def test_diagnose_subject_refuses_what_is_not_an_opened_subject():
    from harness.api import InvalidArgument

    class NotOpened:
        info = open_subject("loop")[0].info

    with pytest.raises(InvalidArgument, match="subject: expected an opened implementation"):
        diagnose_subject(NotOpened())


@pytest.mark.parametrize("target, headline", [
    (f"{FOREIGN}:ifog", "it matches if its gate blocks are read as i, f, o, g"),
    (f"{FOREIGN}:tanh_bug", "forward matches; its backward departs first at dx, t=2 of T=3"),
    ("loop", "loop matches the standard LSTM as declared; its backward matches too"),
])
def test_headline(target, headline):
    assert diagnose(target).headline() == headline


def test_cli_diagnose_help_describes_target(capsys):
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    assert re.search(r"positional arguments:\s+TARGET\s+the implementation to diagnose", capsys.readouterr().out)


# --------------------------------------------------------------------------------------------------
# Per-gate concatenation orders and sequence layouts, on adapters as a user would write them; the
# adapt(...) call the diagnosis prints, evaluated, certifies


def _printed_call_certifies(diagnosis, impl):
    import harness
    from harness.api import certify

    call = diagnosis.match.adapt_call(diagnosis.declared_variant)
    assert call.startswith("harness.adapt(impl")
    adapted = eval(call, {"harness": harness, "impl": impl})  # noqa: S307 - the text the diagnosis prints
    result = certify(adapted, oracles=["finite-differences"], max_examples=5, dtypes=["float64"])
    assert result.verdict == "certified", result.details()
    return call


def test_per_gate_matrices_over_x_then_h_are_found_and_the_printed_call_certifies():
    from tests.test_adapt import _DLAI_NAMES, _DeepLearningAIStyle

    declared = adapt(_DeepLearningAIStyle(), per_gate="xh", names=_DLAI_NAMES)  # the code uses [h; x]
    found = diagnose(declared)
    assert found.status == "convention", found.text()
    assert found.match.convention.per_gate == "hx"
    assert "per_gate='hx'" in _printed_call_certifies(found, declared)
    assert "over [h; x]" in found.text()


def test_feature_first_sequences_are_found_and_the_printed_call_certifies():
    from tests.test_adapt import _FEATURE_FIRST, _FeatureFirst

    declared = adapt(_FeatureFirst(), **{**_FEATURE_FIRST, "layout": "TBD"})  # the code is (D, B, T)
    found = diagnose(declared)
    assert found.status == "convention", found.text()
    assert found.match.convention.layout == "DBT"
    assert "layout='DBT'" in _printed_call_certifies(found, declared)


def test_the_printed_command_line_options_certify_the_target(tmp_path, capsys):
    target = f"{FOREIGN}:ifog"
    assert main(["diagnose", target, "--in-process"]) == 1
    out = capsys.readouterr().out
    options = re.search(r"on the command line with the options (.*)\.$", out, flags=re.M).group(1)
    assert options == "--gate-order ifog"
    assert main(["certify", target, *options.split(), "--in-process", "--max-examples", "4", "--oracle",
                 "finite-differences", "--report-dir", str(tmp_path)]) == 0


def test_diagnose_takes_the_convention_options_and_a_command(capsys):
    # Read as declared in the options, a target that matches them is standard.
    assert main(["diagnose", f"{FOREIGN}:ifog", "--gate-order", "ifog", "--in-process"]) == 0
    assert "matches the standard LSTM as declared" in capsys.readouterr().out
    assert main(["diagnose", "--command", "true", "--step"]) == 2
    assert "--step: applies to a Python TARGET" in capsys.readouterr().err


def test_two_summed_biases_and_a_folded_bias_are_found_and_the_printed_call_certifies():
    from tests.plugins.foreign import FoldedLSTM
    from tests.test_adapt import _PyTorchStyleBiases

    two = diagnose(_PyTorchStyleBiases())  # declared as it is: one bias b, but the code reads b_ih + b_hh
    assert two.status == "convention", two.text()
    assert two.match.convention.bias == "separate" and "separate input and hidden biases" in two.text()
    assert "bias='separate'" in _printed_call_certifies(two, _PyTorchStyleBiases())
    assert "--bias separate" in two.text()
    # The minimal NumPy LSTM's WLSTM (1+D+H, 4H), gates i, f, o, g, behind an adapter that says one bias.
    declared = adapt(FoldedLSTM(), names={"W": "WLSTM"}, transposed=True)
    folded = diagnose(declared)
    assert folded.status == "convention", folded.text()
    assert (folded.match.convention.bias, folded.match.convention.gate_order) == ("folded", "ifog")
    _printed_call_certifies(folded, declared)
    # A planted bug is not explained away: no bias form makes an LSTM that ignores b_hh match.
    assert diagnose(_PyTorchStyleBiases("ignores_b_hh")).status == "none"


@pytest.mark.parametrize("isolate", [False, True])
def test_a_parallel_run_diagnoses_as_one_process_does(isolate):
    """A parallel run closes the implementation here while its children check; the convention search after it
    opens it again (it said "could not run: FileNotFoundError" of the closed worker's shared memory)."""
    found = {jobs: certify(f"{FOREIGN}:ifog", jobs=jobs, isolate=isolate, max_examples=5,
                           oracles=["finite-differences"]).diagnosis for jobs in (1, 2)}
    assert found[1] is not None and "its gate blocks are read as i, f, o, g" in found[1]["text"]
    assert found[2] == found[1]


def test_the_printed_fix_keeps_the_options_the_target_was_given(tmp_path, capsys):
    """A TARGET read with options (--step --names ...) that is right about its interface and wrong about
    its convention: the printed options are the whole set that certifies it, the given ones included."""
    target = f"{FOREIGN}:CourseCell"
    assert main(["diagnose", target, "--step", "--names", "W=Wx,R=Wh"]) == 1
    out = capsys.readouterr().out
    options = re.search(r"on the command line with the options (.*)\.$", out, flags=re.M).group(1)
    assert options == "--step --names W=Wx,R=Wh --gate-order ifog --transposed"
    assert "harness.adapt(impl, step=True, names={'W': 'Wx', 'R': 'Wh'}, gate_order='ifog', transposed=True)" in out
    assert main(["certify", target, *options.split(), "--max-examples", "4", "--oracle", "finite-differences",
                 "--report-dir", str(tmp_path)]) == 0
