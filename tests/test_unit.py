"""One unit (harness.unit): the determinism probe, declared limits, a crash that stops the unit, the
replay commands every failing record carries."""

import numpy as np

from harness.adapt import adapt
from harness.cases import CaseSpec, build_case
from harness.contract import validate
from harness.limits import Limits
from harness.runner import RunSettings
from harness.subject import InProcessSubject
from harness.unit import RestrictedSubject, mark_unchecked, restricted, run_unit
from impls.loop import LoopLSTM
from oracles.finite_diff import FiniteDifferenceOracle
from tests.plugins.misbehaving import Nondeterministic, ReturnsNaN

FD = FiniteDifferenceOracle()


def _run(impl, tmp_path=None, **settings):
    run = RunSettings(max_examples=settings.pop("max_examples", 6), seed=0,
                      case_dir=tmp_path / "cases" if tmp_path else None, **settings)
    return run_unit(InProcessSubject(impl, validate(impl)), [FD], "float64", run)


def test_a_correct_implementation_passes_every_quantity():
    records, notes = _run(LoopLSTM())
    assert records and {r.status for r in records} == {"pass"}
    # the only note: how many cases each layer-structure feature had (the built-in is configurable)
    assert len(notes) == 1 and "cases by layer structure" in notes[0]


def test_the_probe_reports_a_nondeterministic_implementation_as_a_contract_breach(tmp_path):
    records, _ = _run(Nondeterministic(), tmp_path)
    contract = [r for r in records if r.status == "contract"]
    assert contract and all("gives different results for the same input" in r.reason for r in contract)
    assert all(r.case_file.endswith("-nondeterministic.npz") for r in contract)


def test_every_failing_record_carries_the_one_replay_command(tmp_path):
    records, _ = _run(ReturnsNaN(), tmp_path, replay_target="plugins/misbehaving.py:ReturnsNaN --in-process")
    bad = [r for r in records if not r.ok]
    assert bad
    for r in bad:
        assert r.replay == (f"lstm-harness replay {r.case_file} plugins/misbehaving.py:ReturnsNaN --in-process "
                            f"--oracle finite-differences")


def test_without_a_target_the_replay_command_says_what_to_do(tmp_path):
    records, _ = _run(ReturnsNaN(), tmp_path)
    bad = [r for r in records if not r.ok]
    assert bad and all(r.replay.startswith("save your implementation in a module to replay: lstm-harness replay ")
                       for r in bad)


class WrongDW(LoopLSTM):
    name = "wrong-dW"

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["W"] = grads["W"] * 1.1
        return grads


class BreaksAfter:
    """A subject whose own machinery fails after ``calls`` calls (not the implementation's fault)."""

    def __init__(self, impl, calls):
        self.inner = InProcessSubject(impl, validate(impl))
        self.info = self.inner.info
        self.calls = calls

    def execute(self, case, *, backward):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("the subject broke")
        return self.inner.execute(case, backward=backward)


def test_a_failure_of_the_harness_itself_is_reported_as_such_and_keeps_earlier_finds():
    run = RunSettings(max_examples=30, seed=0)
    records, _ = run_unit(BreaksAfter(LoopLSTM(), calls=1), [FD], "float64", run)
    assert records and {r.status for r in records} == {"error"}
    assert all(r.reason == "the harness itself failed while checking: RuntimeError: the subject broke"
               for r in records)
    # A discrepancy the search found before the harness broke stands, with its minimal case: count the
    # calls of a whole run (seeded, so the same calls again), then break the harness just before its end.
    counting = BreaksAfter(WrongDW(), calls=10**9)
    run_unit(counting, [FD], "float64", run)
    records, _ = run_unit(BreaksAfter(WrongDW(), calls=10**9 - counting.calls - 5), [FD], "float64", run)
    by_q = {r.quantity: r for r in records}
    assert by_q["dW"].status == "fail" and by_q["dW"].case
    assert any(r.status == "error" for r in records)


class NoInitialCell:
    """A course-style LSTM: no c0 (starts from zero), no c_T."""

    variant = "vanilla"
    name = "no-initial-cell"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = LoopLSTM().forward(x, h0, np.zeros_like(h0), params)
        return y, h, c, cache


def test_declared_limits_hold_inputs_at_zero_and_report_what_is_not_compared():
    impl = NoInitialCell()
    impl.limits = Limits(zero=("c0",), unchecked={"dc0": "no initial cell state"})
    info = validate(impl)
    assert info.limits.zero == ("c0",)
    subject, oracles = restricted(InProcessSubject(impl, info), [FD])
    assert isinstance(subject, RestrictedSubject) and oracles[0].zero == ("c0",)
    records, _ = run_unit(InProcessSubject(impl, info), [FD], "float64", RunSettings(max_examples=5, seed=0))
    forward = [r for r in records if r.direction == "forward"]
    assert forward and {r.status for r in forward} == {"pass"}  # passes only because c0 is held at zero
    # Without the declaration the same implementation fails: the limits are what made it checkable.
    impl.limits = Limits()
    records, _ = run_unit(InProcessSubject(impl, validate(impl)), [FD], "float64",
                          RunSettings(max_examples=5, seed=0))
    assert any(r.status == "fail" for r in records if r.direction == "forward")


def test_mark_unchecked_turns_records_into_skips_with_the_reason():
    impl = adapt(LoopLSTM(), final_cell=False)
    case = build_case(CaseSpec(T=2, B=1, D=2, H=3, seed=4))
    from harness.check import check_case

    records = check_case(InProcessSubject(impl, validate(impl)), [FD], case)
    mark_unchecked(records, validate(impl).limits.unchecked)
    c_T = next(r for r in records if r.quantity == "c_T")
    assert c_T.status == "skip" and c_T.reason.startswith("not compared: ")
    assert "final cell state" in c_T.message


class CountsCalls(LoopLSTM):
    """Counts its calls; the forward (or the backward) always raises the same error."""

    def __init__(self, where):
        self.where = where
        self.calls = {"forward": 0, "backward": 0}

    def forward(self, x, h0, c0, params):
        self.calls["forward"] += 1
        if self.where == "forward":
            raise ValueError("always the same")
        return super().forward(x, h0, c0, params)

    def backward(self, dy, dh_T, dc_T, cache):
        self.calls["backward"] += 1
        raise ValueError("always the same")


def test_a_forward_that_keeps_raising_the_same_error_is_not_called_again_and_again():
    impl = CountsCalls("forward")
    records, _ = _run(impl, max_examples=50)
    assert impl.calls["forward"] == 3  # the probe's three calls: then the unit stops
    assert {r.status for r in records} == {"error"}
    assert all(any("stopped calling it" in n for n in r.notes) for r in records)


def test_a_backward_that_keeps_raising_is_stopped_and_the_forward_still_checked():
    impl = CountsCalls("backward")
    records, _ = _run(impl, max_examples=30)
    assert impl.calls["backward"] == 3
    assert impl.calls["forward"] > 30  # every generated case still runs the forward
    forward = [r for r in records if r.direction == "forward"]
    backward = [r for r in records if r.direction == "backward"]
    assert {r.status for r in forward} == {"pass"} and {r.status for r in backward} == {"error"}
    assert all(any("forward was still checked" in n for n in r.notes) for r in backward)


def test_the_structure_note_names_the_features_the_implementation_computes():
    import pickle

    from harness.unit import merge_search_notes, structure_note

    fixed = structure_note("mine", "float64", {"cases": 6, "features": {"layers": 6, "lengths": 6}},
                           shown=("layers", "lengths"))
    assert fixed == "mine (float64): 6 cases by layer structure: 6 stacked, 6 with lengths (0 unsorted)"
    other = structure_note("mine", "float64", {"cases": 4, "features": {"proj": 2}}, shown=("proj",), against=["x"])
    merged = merge_search_notes([pickle.loads(pickle.dumps(fixed)), other])  # as a parallel child sends it
    assert merged == ["mine (float64): 10 cases in 2 searches by layer structure: 6 stacked, 6 with lengths "
                      "(0 unsorted), 2 projected"]


def test_a_layernorm_note_names_no_projection_or_clip_which_its_variant_does_not_define():
    from impls.layernorm import LoopLayerNormLSTM

    _, notes = _run(LoopLayerNormLSTM())
    (note,) = notes
    assert "stacked" in note and "CIFG" in note
    assert "projected" not in note and "clipped" not in note, note
