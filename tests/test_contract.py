"""The contract: the validator's messages, input checks, output conversion; what loading an implementation
imports."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.contract import (
    ContractError,
    check_inputs,
    gradient_keys,
    quantity_specs,
    to_numpy,
    validate,
)
from impls.loop import LoopLSTM
from impls.stacked import StackedLSTM


class Minimal:
    variant = "vanilla"

    def forward(self, x, h0, c0, params):
        return x, h0, c0, None


def test_builtins_meet_the_contract():
    for impl in (LoopLSTM(), StackedLSTM()):
        info = validate(impl)
        assert info.variant == "vanilla"
        assert info.dtypes == ("float64", "float32")
        assert info.has_backward


def test_defaults_for_optional_attributes():
    info = validate(Minimal())
    assert info.name == "Minimal"
    assert info.dtypes == ("float64", "float32")
    assert not info.has_backward
    assert info.ln_eps == 1e-5


def test_variant_override():
    assert validate(Minimal(), variant="peephole").variant == "peephole"


def _problems(obj, **kw):
    with pytest.raises(ContractError) as err:
        validate(obj, **kw)
    return err.value.problems, str(err.value)


def test_missing_forward_and_variant_are_both_reported():
    problems, text = _problems(object())
    assert any(p.startswith("forward: missing") for p in problems)
    assert any(p.startswith("variant: missing") for p in problems)
    assert "does not meet the lstm-harness contract" in text


def test_unknown_variant_names_the_choices():
    class Bad(Minimal):
        variant = "gru"

    problems, _ = _problems(Bad())
    assert problems == ["variant: expected one of ['layernorm', 'peephole', 'vanilla'], got 'gru'"]


def test_wrong_forward_signature():
    class Bad(Minimal):
        def forward(self, x, h0):
            return x

    problems, _ = _problems(Bad())
    assert len(problems) == 1 and problems[0].startswith("forward: expected forward(x, h0, c0, params)")


def test_backward_not_callable_and_bad_dtypes_and_eps():
    class Bad(Minimal):
        backward = 3
        dtypes = ("float16",)
        ln_eps = -1.0

    problems, _ = _problems(Bad())
    assert any(p.startswith("backward: expected a callable") for p in problems)
    assert any("dtypes: expected a subset of" in p and "float16" in p for p in problems)
    assert any(p.startswith("ln_eps: expected a positive float") for p in problems)


def _inputs(T=3, B=2, D=4, H=5):
    x = np.zeros((T, B, D))
    h0 = np.zeros((B, H))
    params = {"W": np.zeros((4 * H, D)), "R": np.zeros((4 * H, H)), "b": np.zeros(4 * H)}
    return x, h0, h0.copy(), params


def test_check_inputs_returns_the_dimensions():
    assert check_inputs("vanilla", *_inputs()) == (3, 2, 4, 5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, np.zeros((3, 2))), r"x: expected shape \(T, B, D\), got \(3, 2\)"),
        (lambda a: a.__setitem__(2, np.zeros((3, 5))), r"c0: expected shape \(2, 5\) \(B, H\), got \(3, 5\)"),
        (lambda a: a[3].pop("b"), r"params: expected keys \('W', 'R', 'b'\).*missing \['b'\]"),
        (lambda a: a[3].__setitem__("R", np.zeros((20, 4))),
         r"params\['R'\]: expected shape \(20, 5\) \('4H', 'H'\), got \(20, 4\)"),
    ],
)
def test_check_inputs_names_argument_expected_and_received(mutate, message):
    args = list(_inputs())
    mutate(args)
    with pytest.raises(ValueError, match=message):
        check_inputs("vanilla", *args)


def test_builtin_forward_rejects_inconsistent_inputs_with_the_same_message():
    x, h0, c0, params = _inputs()
    params["W"] = np.zeros((20, 3))
    for impl in (LoopLSTM(), StackedLSTM()):
        with pytest.raises(ValueError, match=r"params\['W'\]: expected shape \(20, 4\)"):
            impl.forward(x, h0, c0, params)


def test_gradient_keys_and_quantities_follow_the_variant():
    assert gradient_keys("vanilla") == ("x", "h0", "c0", "W", "R", "b")
    assert gradient_keys("peephole")[-3:] == ("p_i", "p_f", "p_o")
    assert "dgamma" in quantity_specs("layernorm") and "db" not in quantity_specs("layernorm")
    with pytest.raises(ValueError, match="variant: expected one of"):
        gradient_keys("gru")


class _ArrayLike:
    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a


class _DLPackOnly:
    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class _FakeCupy:
    __cuda_array_interface__ = {}

    def __init__(self, a):
        self.a = a

    def get(self):
        return self.a


@pytest.mark.parametrize("wrap", [lambda a: a, _ArrayLike, _DLPackOnly, _FakeCupy, lambda a: a.tolist()])
def test_to_numpy_accepts_every_documented_kind(wrap):
    a = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(to_numpy(wrap(a)), a)


def test_to_numpy_rejects_other_objects():
    with pytest.raises(TypeError, match="expected a NumPy array or something convertible"):
        to_numpy(object())


def test_the_built_in_implementations_load_without_the_rest_of_the_harness():
    """A worker process, and each call of a program that computes with the built-ins, imports an implementation
    and the contract; the package's public names (certify, adapt, ...) are imported on first use."""
    code = ("import sys; import impls.stacked, impls.peephole, impls.layernorm; "
            "print(sorted(m for m in ('harness.api', 'harness.adapt', 'harness.runner', 'hypothesis') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "[]"
    # The submodules harness.adapt and harness.cases, loaded first, leave the package's functions of those names.
    code = "import harness.adapt, harness.cases, harness; print(type(harness.adapt).__name__, harness.cases.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "function cases"
    import harness
    from harness.api import certify

    assert harness.certify is certify and "certify" in dir(harness)
    with pytest.raises(AttributeError, match="module 'harness' has no attribute 'certfy'"):
        harness.certfy  # noqa: B018
