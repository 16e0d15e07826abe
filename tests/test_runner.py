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
