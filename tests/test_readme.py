"""The README's example implementation is real: it meets the contract and passes, forward only."""

import re
from pathlib import Path

import pytest

from harness.contract import validate
from harness.runner import RunSettings, run_checks
from harness.subject import InProcessSubject
from oracles.finite_diff import FiniteDifferenceOracle

README = Path(__file__).resolve().parent.parent / "README.md"


def _example_source() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = [b for b in blocks if "class MyLSTM" in b]
    assert len(example) == 1, "the README should hold exactly one MyLSTM example"
    return example[0]


def test_example_is_short():
    assert len(_example_source().strip().splitlines()) <= 22


def test_example_implementation_certifies_forward_only():
    namespace: dict = {}
    exec(compile(_example_source(), "README-example", "exec"), namespace)
    impl = namespace["MyLSTM"]()
    info = validate(impl)
    assert not info.has_backward
    for dtype in ("float64", "float32"):
        records = run_checks(InProcessSubject(impl, info), [FiniteDifferenceOracle()], dtype=dtype,
                             run=RunSettings(max_examples=30))
        forward = [r for r in records if r.direction == "forward"]
        backward = [r for r in records if r.direction == "backward"]
        assert forward and all(r.status == "pass" for r in forward), [r.message for r in forward]
        assert backward and all(r.status == "skip" and "checked forward only" in r.reason for r in backward)


def _examples() -> dict[str, tuple[str, bool]]:
    """The README's complete adapt examples: blocks that start with ``# example: NAME`` (the object to
    certify), ``(forward only)`` when the example has no backward."""
    out = {}
    for block in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        first = block.splitlines()[0]
        if first.startswith("# example: "):
            name, _, rest = first[len("# example: "):].partition(" ")
            out[name] = (block, "forward only" in rest)
    return out


_FRAMEWORK = {"jax_lstm": "jax", "keras_style": "tensorflow", "lstm_module": "torch"}


def test_the_readme_has_its_complete_examples():
    assert {"columns", "jax_lstm", "keras_style", "lstm_module"} <= set(_examples())


@pytest.mark.parametrize("name", ["columns", "jax_lstm", "keras_style", "lstm_module"])
def test_each_complete_readme_example_certifies(name):
    if name in _FRAMEWORK:
        pytest.importorskip(_FRAMEWORK[name], reason=f"the example needs {_FRAMEWORK[name]}")
    from harness.api import certify

    source, forward_only = _examples()[name]
    namespace: dict = {}
    exec(compile(source, f"README-{name}", "exec"), namespace)
    result = certify(namespace[name], oracles=["finite-differences"], max_examples=3)
    assert result.verdict == "certified", result.details()
    assert result.settings["dtypes"] == ["float64", "float32"]
    backward = [r for r in result.records if r.direction == "backward"]
    if forward_only:
        assert all(r.status == "skip" for r in backward)
    else:
        assert backward and any(r.status == "pass" for r in backward)
