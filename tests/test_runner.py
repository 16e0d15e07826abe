"""The Hypothesis search: shrinking to a minimal case, the worst passing case, independent discrepancies,
what an interrupted search keeps."""

import numpy as np
import pytest

from harness.cases import load_case
from harness.contract import validate
from harness.runner import RunSettings, run_checks
from harness.subject import InProcessSubject
from impls.loop import LoopLSTM
from oracles.finite_diff import FiniteDifferenceOracle

FD = FiniteDifferenceOracle()


class NaNAfterT2(LoopLSTM):
    name = "nan-after-2"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        y = y.copy()
        y[2:] = np.nan
        return y, h, c, cache


def test_run_checks_shrinks_and_saves_a_replayable_case(tmp_path):
    impl = NaNAfterT2()
    records = run_checks(InProcessSubject(impl, validate(impl)), [FD], dtype="float64",
                         run=RunSettings(max_examples=50, case_dir=tmp_path, replay_target="my.module:Impl"))
    y = next(r for r in records if r.quantity == "y")
    assert y.status == "fail" and y.nonfinite > 0
    assert y.case["T"] == 3 and y.first_bad_t == 2  # the smallest T that shows the bug
    saved = load_case(y.case_file)
    assert saved.T == 3
    assert y.replay == f"lstm-harness replay {y.case_file} my.module:Impl --oracle finite-differences"
    # Other quantities of the same minimal case are reported too, and pass.
    assert next(r for r in records if r.quantity == "c_T").status == "pass"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_run_checks_reports_the_worst_passing_case(dtype):
    impl = LoopLSTM()
    stats: dict = {}
    records = run_checks(InProcessSubject(impl, validate(impl)), [FD], dtype=dtype,
                         run=RunSettings(max_examples=20, seed=1), stats=stats)
    # 20 drawn cases, and a few more with each structure feature the 20 had too few of
    assert stats["cases"] > 20
    assert all(r.status == "pass" and r.examples == stats["cases"] and r.dtype == dtype for r in records)


class TwoIndependentBugs(LoopLSTM):
    """dW is wrong on every case; y only when T >= 3: the first must not hide the second."""

    name = "two-bugs"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        if x.shape[0] >= 3:
            y = y.copy()
            y[2] += 0.1
        return y, h, c, cache

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["W"] = grads["W"] * 1.01
        return grads


def test_a_second_independent_discrepancy_gets_its_own_minimal_case(tmp_path):
    impl = TwoIndependentBugs()
    records = run_checks(InProcessSubject(impl, validate(impl)), [FD], dtype="float64",
                         run=RunSettings(max_examples=40, case_dir=tmp_path))
    by = {r.quantity: r for r in records}
    assert by["dW"].status == "fail" and by["y"].status == "fail"
    assert by["y"].case["T"] == 3 and by["y"].first_bad_t == 2
    assert by["dW"].case_file and by["y"].case_file and by["dW"].case_file != by["y"].case_file


def test_examples_count_generated_cases_not_shrinking():
    impl = NaNAfterT2()
    records = run_checks(InProcessSubject(impl, validate(impl)), [FD], dtype="float64",
                         run=RunSettings(max_examples=10))
    # The bug shows from T=3 on; whatever Hypothesis tried while shrinking is not a generated case.
    assert all(1 <= r.examples <= 10 * 4 for r in records)
    assert len({r.examples for r in records}) == 1


class CrashesOnLongSequences(LoopLSTM):
    """dW wrong everywhere; 'crashes' (an exception the runner does not handle) for T >= 6."""

    name = "bug-and-crash"

    def forward(self, x, h0, c0, params):
        if x.shape[0] >= 6:
            raise KeyboardInterrupt  # stands for a worker crash surfacing from the subject
        return super().forward(x, h0, c0, params)

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["W"] = grads["W"] * 1.1
        return grads


def test_an_interrupted_run_keeps_what_it_already_found():
    impl = CrashesOnLongSequences()
    with pytest.raises(KeyboardInterrupt) as err:
        run_checks(InProcessSubject(impl, validate(impl)), [FD], dtype="float64", run=RunSettings(max_examples=60))
    partial = err.value.partial_records
    dW = next(r for r in partial if r.quantity == "dW")
    assert dW.status == "fail" and dW.case["T"] < 6


class CountingFD(FiniteDifferenceOracle):
    """The finite-difference oracle, noting the digest of every case it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def reference(self, case):
        self.asked.append(case.digest())
        return super().reference(case)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_each_distinct_case_is_checked_once_and_counted_once(dtype):
    # Hypothesis draws some cases more than once; a repeat is neither run again nor counted, so a check's
    # count of cases is of distinct cases, the floor of each structure feature included.
    impl = LoopLSTM()
    oracle = CountingFD()
    stats: dict = {}
    records = run_checks(InProcessSubject(impl, validate(impl)), [oracle], dtype=dtype,
                         run=RunSettings(max_examples=60), stats=stats)
    assert len(oracle.asked) == len(set(oracle.asked)) == stats["cases"]
    assert all(r.examples == stats["cases"] for r in records)


@pytest.mark.parametrize("configurable", [False, True])
def test_a_search_checks_its_budget_of_distinct_cases(configurable):
    # Before, a 60-case search of a configurable implementation checked 27 distinct cases, and one in a
    # fixed structure about 42: the rest were repeats. Now the repeats are passed over and Hypothesis runs
    # again on fresh draws until the budget is met (the choices a case does not use are folded into its
    # seed, so that there are fewer repeats to pass over).
    import dataclasses

    impl = LoopLSTM()
    oracle = CountingFD()
    stats: dict = {}
    info = dataclasses.replace(validate(impl), configurable=configurable)
    run_checks(InProcessSubject(impl, info), [oracle], dtype="float64", run=RunSettings(max_examples=60),
               stats=stats)
    distinct = len(set(oracle.asked))
    if configurable:  # the budget, and the floor's cases of each structure feature drawn too rarely
        assert distinct == stats["cases"] >= 60
    else:
        assert distinct == stats["cases"] == 60


class AllWrongFromT3(LoopLSTM):
    """Every output and gradient doubled once T >= 3: one search finds it all."""

    name = "all-wrong-from-3"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        k = 2.0 if x.shape[0] >= 3 else 1.0
        return y * k, h * k, c * k, (cache, k)

    def backward(self, dy, dh_T, dc_T, cache):
        cache, k = cache
        return {name: g * k for name, g in super().backward(dy, dh_T, dc_T, cache).items()}


def test_a_failing_check_counts_the_cases_drawn_up_to_its_failure_not_those_tried_while_shrinking():
    impl = AllWrongFromT3()
    oracle = CountingFD()
    shapes: list[int] = []
    real = oracle.reference

    def reference(case):
        shapes.append(case.T)
        return real(case)

    oracle.reference = reference
    records = run_checks(InProcessSubject(impl, validate(impl)), [oracle], dtype="float64",
                         run=RunSettings(max_examples=60))
    assert all(r.status == "fail" for r in records)
    first_failing = next(i for i, T in enumerate(shapes) if T >= 3)
    # The cases before the first failing one, and that one; the passing cases shrinking tried come after.
    assert {r.examples for r in records} == {first_failing + 1}
    assert len(shapes) > first_failing + 1  # shrinking did try cases


def test_unsorted_lengths_get_a_floor_of_their_own_and_a_sorted_batch_assumption_is_caught():
    """Only "random" lengths over two rows and two steps are unsorted, a few of the drawn cases with lengths:
    a default search once drew one such case in 71 and certified an implementation that reads lengths as if
    the batch came sorted. They now get a search of their own up to the floor, configurable or not."""
    import dataclasses

    import harness
    from harness.cases import UNSORTED_LENGTHS
    from harness.runner import feature_floor
    from tests.plugins.planted_layer import LengthsAssumedSorted

    fd = [FiniteDifferenceOracle()]
    for impl in (LoopLSTM(), LoopLSTM(accepts_lengths=True)):
        info = validate(impl)
        if impl.accepts_lengths:  # a fixed structure with lengths, as declared
            info = dataclasses.replace(info, configurable=False)
        stats: dict = {}
        records = run_checks(InProcessSubject(impl, info), fd, dtype="float64", run=RunSettings(), stats=stats)
        assert all(r.status == "pass" for r in records)
        assert stats["features"].get(UNSORTED_LENGTHS, 0) >= feature_floor(60), stats["features"]
    result = harness.certify(LengthsAssumedSorted(), oracles=["finite-differences"], dtypes=["float64"],
                             write_report=False)
    assert result.verdict == "discrepancies", result.summary(verbose=False)
    failing = [r for r in result.records if r.status == "fail"]
    assert {"y", "h_T", "c_T"} & {r.quantity for r in failing}
    assert all(np.any(np.diff(r.case["lengths"]) > 0) for r in failing)  # each minimal case is unsorted


class SlightlyOffInFloat32(LoopLSTM):
    """Its y is off by 4e-4: more than the float32 values tolerance allows (5e-5 + 5e-5 |y|, |y| < 1), well
    inside 50 times it."""

    name = "slightly-off"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y + np.float32(4e-4), h, c, cache


def test_cases_that_pass_only_with_a_widened_tolerance_are_counted_and_said(monkeypatch):
    import harness
    import harness.check

    # Every case's amplification of float32 rounding, as if each were chaotic: x 50.
    monkeypatch.setattr(harness.check, "rounding_amplification", lambda case: {"values": 50.0, "gradients": 50.0})
    for impl, widened in ((SlightlyOffInFloat32(), True), (LoopLSTM(), False)):
        stats: dict = {}
        records = run_checks(InProcessSubject(impl, validate(impl)), [FD], dtype="float32",
                             run=RunSettings(max_examples=6, seed=3), stats=stats)
        assert all(r.status == "pass" for r in records)
        # The slightly-off one passes y only widened, in every case; the correct one never needs the widening.
        expected = stats["cases"] if widened else 0
        assert stats["widened"] == {"cases": expected, "largest factor": 50.0 if widened else 1.0}
        # Each record says it for its check: the forward widened in every case, the backward never.
        assert {(r.direction, r.widened_cases) for r in records} == {("forward", expected), ("backward", 0)}
    result = harness.certify(SlightlyOffInFloat32(), oracles=[FD], dtypes=["float32"], max_examples=6,
                             write_report=False)
    (note,) = [n for n in result.notes if "widened" in n]
    assert note.startswith(f"slightly-off (float32): {result.records[0].examples} of {result.records[0].examples} "
                           "cases passed with the tolerance widened (up to x 50)"), note


def test_widened_notes_of_several_searches_merge_into_one_line():
    import pickle

    from harness.unit import merge_search_notes, widened_note

    a = widened_note("loop", "float32", {"cases": 60, "widened": {"cases": 2, "largest factor": 12.0}})
    b = widened_note("loop", "float32", {"cases": 40, "widened": {"cases": 1, "largest factor": 196.0}})
    merged = merge_search_notes(["other", pickle.loads(pickle.dumps(a)), b])
    assert merged[0] == "other" and len(merged) == 2
    assert merged[1].startswith("loop (float32): 3 of 100 cases passed with the tolerance widened (up to x 196)")


def test_a_derandomized_search_draws_from_a_seed_of_its_own_not_from_the_runners_source():
    # Hypothesis's own derandomized seed is a digest of the test function's source text (here the runner's
    # nested ``one``): left to it, any edit to the runner would draw other cases for every certification.
    from hypothesis import settings

    from harness.runner import _run_seed

    derandomized = RunSettings(profile="ci")
    assert derandomized.hypothesis_settings().derandomize
    first = _run_seed(derandomized, 0)
    assert isinstance(first, int) and first == _run_seed(RunSettings(profile="ci"), 0)
    assert len({_run_seed(derandomized, k) for k in range(4)}) == 4  # each later run on a fresh stream
    assert _run_seed(RunSettings(profile="ci", seed=7), 0) == 7  # the user's seed, as given


    class Random(RunSettings):  # the thorough profile is random unless the loaded profile derandomizes it
        def hypothesis_settings(self):
            return settings(super().hypothesis_settings(), derandomize=False)

    assert _run_seed(Random(profile="thorough"), 0) is None and _run_seed(Random(), 1) is None  # random stays random


class TanhSlopeOfC(LoopLSTM):
    """The backward takes tanh's slope at c_t as 1 - c_t**2, not 1 - tanh(c_t)**2: a slip that shows in
    dx and dh0 on some cases only."""

    name = "tanh-slope-of-c"
    configurable = False

    def cell_backward(self, dh, dc, cache, weights):
        c = cache.f * cache.c_prev + cache.i * cache.g
        # what reaches c_t through h_t, with the wrong slope: dh * o * (1 - c^2) in place of (1 - tanh(c)^2)
        return super().cell_backward(dh, dc + dh * cache.o * (cache.tanh_c**2 - c**2), cache, weights)


def test_a_quantity_that_failed_on_any_case_is_never_reported_as_passing(monkeypatch, tmp_path):
    """A quantity can fail on a case seen only while shrinking another failure (whose minimal case it passes
    on), and not again in the searches after it: it is reported failing, on the case it failed on, not as
    the worst of the cases it passed on."""
    from harness import runner
    from oracles.torch_oracle import TorchLSTMOracle
    from tests.oracle_support import require

    torch_oracle = require(TorchLSTMOracle())
    seen_failing: dict = {}
    real = runner.check_case

    def spy(subject, oracles, case, **kwargs):
        records = real(subject, oracles, case, **kwargs)
        for r in records:
            if r.status == "fail":
                seen_failing[r.key] = max(seen_failing.get(r.key, 0.0), r.ratio or 0.0)
        return records

    monkeypatch.setattr(runner, "check_case", spy)
    impl = TanhSlopeOfC()
    records = run_checks(InProcessSubject(impl, validate(impl)), [torch_oracle, FD], dtype="float32",
                         run=RunSettings(max_examples=5, case_dir=tmp_path, replay_target="bugs:TanhSlopeOfC"))
    by_key = {r.key: r for r in records}
    assert seen_failing, "the planted bug was not caught at all"
    for key, ratio in seen_failing.items():
        r = by_key[key]
        assert r.status == "fail", (key, r.status, r.ratio, ratio)
        largest = max(r.ratio or 0.0, (r.worst_seen or {}).get("ratio") or 0.0)
        assert largest >= ratio * 0.999, (key, largest, ratio)  # the largest error seen is reported
        assert load_case(r.case_file).digest() in r.case_file  # its case is saved, under its own digest
