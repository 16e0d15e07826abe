"""A correct implementation passes 1000 generated cases in each dtype without a single false alarm."""

import pytest

from harness.contract import validate
from harness.runner import RunSettings, run_checks
from harness.subject import InProcessSubject
from impls.loop import LoopLSTM
from impls.stacked import StackedLSTM
from oracles.finite_diff import FiniteDifferenceOracle


@pytest.mark.parametrize("impl", [LoopLSTM(), StackedLSTM()], ids=lambda i: i.name)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_thousand_cases_without_a_false_alarm(impl, dtype):
    subject = InProcessSubject(impl, validate(impl))
    records = run_checks(subject, [FiniteDifferenceOracle()], dtype=dtype,
                         run=RunSettings(profile="ci", max_examples=1000))
    bad = [r.message for r in records if r.status != "pass"]
    assert not bad, "\n\n".join(bad)
    assert {r.examples for r in records} == {1000}
    # Every quantity of both directions was compared, and the worst case kept a margin.
    assert len(records) == 9
    assert max(r.ratio for r in records) < 0.5
