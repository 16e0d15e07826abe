"""The registry (harness.registry): the one list of built-ins and oracles, loaded only when asked."""

import subprocess
import sys

import pytest

from harness import registry


def test_every_builtin_is_listed_with_its_availability():
    entries = registry.implementations()
    assert [e.name for e in entries] == list(registry.BUILTIN_IMPLEMENTATIONS)
    for entry in entries:
        if entry.unavailable is None:
            impl = entry.create()
            assert impl.forward and impl.variant in ("vanilla", "peephole", "layernorm")
        else:
            assert isinstance(entry.unavailable, str) and entry.unavailable


def test_every_oracle_once_in_report_order_and_by_name():
    names = [o.name for o in registry.oracles()]
    assert len(names) == len(set(names)) == len(registry.ORACLES)
    assert names[0] == "finite-differences"
    assert registry.oracle_by_name("finite-differences").name == "finite-differences"
    with pytest.raises(ValueError, match="oracle: expected one of finite-differences, .* got 'nope'"):
        registry.oracle_by_name("nope")


def test_listing_imports_no_framework():
    code = ("import sys; from harness import registry; registry.implementations(); registry.oracles(); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
