"""The README's example implementation is real: it meets the contract and passes, forward only."""

import re
from pathlib import Path

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
