"""Planted bugs in a hand-written vanilla LSTM must each be caught, on the right quantity."""

import pytest

from harness.contract import validate
from harness.runner import RunSettings, run_checks
from harness.subject import InProcessSubject
from oracles.finite_diff import FiniteDifferenceOracle
from tests.meta.broken_vanilla import BUGS, StudentLSTM

GRADIENTS = {"dx", "dh0", "dc0", "dW", "dR", "db"}

# bug -> (quantities that must fail, quantities that must pass). A bug in one gradient's formula
# must leave every other quantity correct; a bug upstream in BPTT corrupts what flows from it.
EXPECTED = {
    "gates_swapped": ({"y", "h_T", "c_T"}, set()),
    "no_h_to_c": ({"dc0", "dW", "db"}, {"y", "h_T", "c_T"}),
    "tanh_derivative": ({"dc0", "dW", "db"}, {"y", "h_T", "c_T"}),
    "dR_uses_h_t": ({"dR"}, {"y", "h_T", "c_T"} | GRADIENTS - {"dR"}),
    "db_batch_row": ({"db"}, {"y", "h_T", "c_T"} | GRADIENTS - {"db"}),
    "dc0_without_f": ({"dc0"}, {"y", "h_T", "c_T"} | GRADIENTS - {"dc0"}),
}


def _run(impl, dtype, max_examples=100):
    subject = InProcessSubject(impl, validate(impl))
    return run_checks(subject, [FiniteDifferenceOracle()], dtype=dtype,
                      run=RunSettings(profile="ci", max_examples=max_examples))


def test_the_bug_list_is_complete():
    assert set(EXPECTED) == set(BUGS)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_correct_student_passes(dtype):
    records = _run(StudentLSTM(), dtype, max_examples=60)
    assert records and all(r.status == "pass" for r in records), "\n".join(r.message for r in records if not r.ok)


@pytest.mark.parametrize("bug", sorted(BUGS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_planted_bug_is_caught_on_the_right_quantity(bug, dtype):
    records = _run(StudentLSTM(bug), dtype)
    status = {r.quantity: r.status for r in records}
    must_fail, must_pass = EXPECTED[bug]
    failing = {q for q, s in status.items() if s == "fail"}
    assert must_fail <= failing, f"{bug}: expected {sorted(must_fail)} to fail, got {status}"
    assert not (must_pass & failing), f"{bug}: {sorted(must_pass & failing)} should pass, got {status}"
    # Each failure comes with a minimal case and a located worst element.
    for r in records:
        if r.status == "fail":
            assert r.case["T"] >= 1 and r.worst["coords"], r.message
            assert "not close" in r.message


def test_shrinking_gives_a_minimal_case():
    """The db bug needs two batch rows and nothing else: Hypothesis must shrink to B == 2."""
    records = _run(StudentLSTM("db_batch_row"), "float64")
    db = next(r for r in records if r.quantity == "db")
    assert db.case["B"] == 2
    assert db.case["T"] == 1
