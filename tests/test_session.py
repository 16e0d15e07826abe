"""Opening a certification (harness.session): arguments checked before any work, oracles chosen, units
planned, replay targets written."""

import pytest

from harness.session import (
    InvalidArgument,
    check_settings,
    guess_target,
    plan_units,
    prepare,
    replay_target,
    select_oracles,
)
from impls.loop import LoopLSTM
from oracles.finite_diff import FiniteDifferenceOracle


def _prepare(impl, **kw):
    args = dict(variant=None, dtypes=None, oracles=["finite-differences"], max_examples=2, profile="dev", seed=0,
                timeout=None, isolate=False, report_dir=None, memory_limit=None)
    return prepare(impl, **{**args, **kw})


@pytest.mark.parametrize("kwargs, message", [
    (dict(profile="fast"), "profile: expected one of"),
    (dict(max_examples=0), "max_examples: expected a positive int"),
    (dict(seed="1"), "seed: expected an int or None"),
    (dict(jobs=0), "jobs: expected an int >= 1"),
])
def test_bad_settings_name_the_argument(kwargs, message):
    args = dict(profile="ci", max_examples=None, seed=None, jobs=1) | kwargs
    with pytest.raises(ValueError, match=message):
        check_settings(**args)


def test_invalid_argument_is_a_value_error():
    assert issubclass(InvalidArgument, ValueError)


def test_oracles_by_name_or_object_and_a_clear_error_otherwise():
    fd = FiniteDifferenceOracle()
    assert [o.name for o in select_oracles(["finite-differences"], "vanilla")] == ["finite-differences"]
    assert select_oracles([fd], "vanilla") == [fd]
    with pytest.raises(ValueError, match="oracles: expected names from .* got 'nope'"):
        select_oracles(["nope"], "vanilla")
    with pytest.raises(ValueError, match="oracles: expected oracle names or objects, got int"):
        select_oracles([3], "vanilla")
    # records, findings and parallel units tell oracles apart by name: one name twice is refused
    for twice in (["finite-differences", "finite-differences"], ["finite-differences", fd]):
        with pytest.raises(ValueError, match="expected each oracle once .* got 'finite-differences' more than once"):
            select_oracles(twice, "vanilla")
    default = select_oracles(None, "peephole")
    assert default and all("peephole" in o.variants and o.availability().available for o in default)


def test_dtypes_are_checked_against_what_the_implementation_declares():
    with pytest.raises(ValueError, match=r"dtypes: expected a non-empty subset"):
        _prepare(LoopLSTM(), dtypes=["float16"])
    impl = LoopLSTM()
    impl.dtypes = ("float64",)
    with pytest.raises(ValueError, match="declares float64; none of"):
        _prepare(impl, dtypes=["float32"])


def test_units_one_per_dtype_here_per_dtype_and_family_in_parallel_and_per_oracle_split():
    job = _prepare("impls.loop:LoopLSTM", oracles=["finite-differences", "torch-nn-lstm", "torch-composite"])
    try:
        here = plan_units([job], 1)
        assert not here.parallel and [(u.dtype, len(u.oracles)) for u in here.units] == [("float64", 3),
                                                                                          ("float32", 3)]
        spread = plan_units([job], 2)  # the two torch oracles share their import: one unit
        assert spread.parallel
        assert [u.name for u in spread.units] == ["float64-vs-finite-differences",
                                                  "float64-vs-torch-nn-lstm+torch-composite",
                                                  "float32-vs-finite-differences",
                                                  "float32-vs-torch-nn-lstm+torch-composite"]
        assert spread.units[1].label == "float64 vs torch-nn-lstm, torch-composite"
        split = plan_units([job], 1, split=True)
        assert [u.name for u in split.units] == [f"{d}-vs-{o}" for d in ("float64", "float32")
                                                 for o in ("finite-differences", "torch-nn-lstm", "torch-composite")]
    finally:
        job.close()


def test_an_object_that_cannot_travel_is_planned_here_with_a_note():
    class Local(LoopLSTM):  # defined in a function: another process cannot load it
        def __init__(self):
            self.state = 1

    job = _prepare(Local())
    try:
        plan = plan_units([job], 2)
        assert not plan.parallel
        assert any("cannot be sent to other processes" in n for n in plan.notes[0])
    finally:
        job.close()


def test_replay_targets_and_guessed_targets():
    assert replay_target("my lstm.py:MyLSTM", None, isolate=False, timeout=None) == "'my lstm.py:MyLSTM' --in-process"
    assert replay_target("m:A", "peephole", isolate=True, timeout=5.0) == "m:A --variant peephole --timeout 5"
    assert replay_target(None, None, isolate=True, timeout=None) is None
    assert guess_target(LoopLSTM()) == "impls.loop:LoopLSTM"
