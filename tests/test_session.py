"""Opening a certification (harness.session): arguments checked before any work, oracles chosen, units
planned, replay targets written."""

import pickle

import pytest

from harness.session import (
    InvalidArgument,
    check_settings,
    guess_target,
    oracle_from_payload,
    oracle_payload,
    oracle_portable,
    oracle_settings,
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
    (dict(max_examples=0), "max_examples: expected a positive int of at most 1,000,000 or None, got 0"),
    (dict(max_examples=10**7), "max_examples: expected a positive int of at most 1,000,000 or None, got 10000000"),
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


def _sent(oracle):
    """The oracle a parallel child makes from what this process sends it."""
    return oracle_from_payload(pickle.loads(pickle.dumps(oracle_payload(oracle))))


def test_a_registry_oracle_reaches_a_parallel_child_with_its_settings():
    default, configured = FiniteDifferenceOracle(), FiniteDifferenceOracle(directions=5, seed=7, chunk=64)
    default.availability()  # a probe's result is this process's own: it does not travel
    for oracle in (default, configured):
        assert oracle_payload(oracle)[0] == "name" and oracle_portable(oracle)
        copy = _sent(oracle)
        assert type(copy) is FiniteDifferenceOracle and copy is not oracle
        assert oracle_settings(copy) == oracle_settings(oracle)
    assert (_sent(configured).directions, _sent(configured).seed, _sent(configured).chunk) == (5, 7, 64)
    assert _sent(default).directions == 3 and "_availability" not in vars(_sent(default))
    # Settings that cannot be sent (a function defined here) keep the whole certification in this process.
    local = FiniteDifferenceOracle(lambda *args: None)
    assert not oracle_portable(local)
    job = _prepare(LoopLSTM(), oracles=[local])
    try:
        plan = plan_units([job], 2)
        assert not plan.parallel and any("the oracle finite-differences cannot be sent" in n for n in plan.notes[0])
    finally:
        job.close()


def test_a_configured_oracle_computes_as_configured_in_a_parallel_child(tmp_path):
    pytest.importorskip("torch")
    from harness import certify
    from harness.compare import FLOAT32_ORACLE
    from oracles.torch_oracle import TorchLSTMOracle

    # float32 cases in float64: no allowance for an oracle with float32 rounding of its own. A child that made
    # the registry's default oracle instead computed them in float32 and widened the tolerance.
    result = certify("impls.loop:LoopLSTM", oracles=[TorchLSTMOracle(native_float32=False), "finite-differences"],
                     jobs=2, dtypes=["float32"], max_examples=2, report_dir=tmp_path)
    assert result.verdict == "certified", result.summary(verbose=False)
    torch_records = [r for r in result.records if r.oracle == "torch-nn-lstm" and r.status == "pass"]
    assert torch_records and not any(FLOAT32_ORACLE in r.tolerance_factors for r in torch_records)


def test_replay_targets_and_guessed_targets():
    assert replay_target("my lstm.py:MyLSTM", None, isolate=False, timeout=None) == "'my lstm.py:MyLSTM' --in-process"
    assert replay_target("m:A", "peephole", isolate=True, timeout=5.0) == "m:A --variant peephole --timeout 5"
    assert replay_target(None, None, isolate=True, timeout=None) is None
    assert guess_target(LoopLSTM()) == "impls.loop:LoopLSTM"


def test_an_adapters_replay_arguments_are_its_objects_target_and_the_options_that_adapt_it():
    import pickle
    from types import MappingProxyType

    from harness import adapt
    from harness.session import adapted_arguments
    from tests.plugins import foreign

    bug = foreign.ifog_tanh_bug
    line = "tests.plugins.foreign:ifog_tanh_bug --gate-order ifog"
    assert adapted_arguments(adapt(bug, gate_order="ifog")) == line
    # What changes nothing a replay computes is left out: a name, an empty renaming, the defaults spelt out.
    assert adapted_arguments(adapt(bug, gate_order="ifog", name="mine", names={}, variant="vanilla",
                                   backward_takes=["dy", "dh_T", "dc_T", "cache"])) == line
    # What the command line cannot say for a Python TARGET: the adapter itself must be saved.
    assert adapted_arguments(adapt(bug, variant="peephole")) is None  # --variant would only declare it
    assert adapted_arguments(adapt(bug, ln_eps=1e-3)) is None
    assert adapted_arguments(adapt(bug, backward_takes=("dy", "cache"))) is None
    assert adapted_arguments(adapt(forward_fn=lambda x, h0, c0, W, R, b: None)) is None
    assert adapted_arguments(bug) is None  # not an adapter
    # The caller's values are not kept as they are: a generator or a mapping proxy would not pickle.
    adapted = adapt(bug, dtypes=(d for d in ["float64"]), names=MappingProxyType({"W": "W"}))
    assert adapted.given == {"names": {"W": "W"}} and adapted.given_others == ("dtypes",)
    assert pickle.loads(pickle.dumps(adapted)).given == adapted.given

