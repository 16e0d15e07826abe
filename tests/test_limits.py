"""Limits (harness.limits): a typed declaration of what an implementation cannot do, validated."""

import pickle

import pytest

import harness
from harness.contract import ContractError, validate
from harness.limits import Limits
from impls.loop import LoopLSTM


def test_the_default_declares_nothing():
    assert not Limits() and Limits().to_dict() == {"zero": [], "unchecked": {}}
    assert validate(LoopLSTM()).limits == Limits()


def test_names_are_checked_with_what_was_expected():
    with pytest.raises(ValueError, match=r"zero: expected names from .*'c0'.*got \['c1'\]"):
        Limits(zero=("c1",))
    with pytest.raises(ValueError, match=r"unchecked: expected quantities from .*got \['dW'\]"):
        Limits(unchecked={"dW": "why"})
    with pytest.raises(ValueError, match="needs the reason"):
        Limits(unchecked={"dc0": ""})


def test_limits_are_immutable_hashable_and_travel_to_a_worker():
    limits = Limits(zero=("c0", "c0", "dc_T"), unchecked={"dc0": "no c0"})
    assert limits.zero == ("c0", "dc_T")
    with pytest.raises(TypeError):
        limits.unchecked["c_T"] = "no"  # type: ignore[index]
    assert pickle.loads(pickle.dumps(limits)) == limits
    assert hash(limits) == hash(Limits(zero=("c0", "dc_T"), unchecked={"dc0": "no c0"}))


def test_an_attribute_of_the_wrong_type_is_a_contract_error():
    impl = LoopLSTM()
    impl.limits = {"zero": ["c0"]}
    with pytest.raises(ContractError, match="limits: expected a harness.Limits"):
        validate(impl)


def test_adapt_declares_limits_and_the_public_api_names_them():
    adapted = harness.adapt(LoopLSTM(), initial_cell=False, final_cell=False)
    limits = validate(adapted).limits
    assert "c0" in limits.zero and set(limits.unchecked) == {"dc0", "c_T"}
    assert harness.Limits is Limits and "Limits" in harness.__all__
