"""Dtypes as written: an implementation that does not declare its dtypes is certified in the dtypes it
computes in (code that allocates with np.zeros computes in float64 whatever it is given), and the
report says so and how to fix or declare it; declared dtypes keep the strict contract."""

from __future__ import annotations

import numpy as np
import pytest

from harness.adapt import adapt
from harness.api import certify
from harness.cli import main


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _zeros_forward(x, h0, c0, W, R, b, bug=None):
    """Course code in the contract's layout that allocates its output with np.zeros: float64 always."""
    T, B, D = x.shape
    H = h0.shape[1]
    y = np.zeros((T, B, H))  # no dtype: float64 whatever x is
    h, c = h0, c0
    for t in range(T):
        a = x[t] @ W.T + h @ R.T + b  # (B, 4H)
        i, f, g, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])
        c = (1 - f if bug == "one_minus_f" else f) * c + i * g
        h = o * np.tanh(c)
        y[t] = h
    return y, h, c


class ZerosLSTM:
    variant = "vanilla"

    def __init__(self, bug=None):
        self.bug = bug
        self.name = f"zeros-{bug or 'correct'}"

    def forward(self, x, h0, c0, p):
        return (*_zeros_forward(x, h0, c0, p["W"], p["R"], p["b"], self.bug), None)


def _certify(impl, **kwargs):
    return certify(impl, oracles=["finite-differences"], max_examples=kwargs.pop("max_examples", 8), **kwargs)


def test_undeclared_dtypes_are_certified_as_written_and_the_note_says_how_to_fix_it():
    result = _certify(ZerosLSTM())
    assert result.verdict == "certified", result.details()
    assert result.settings["dtypes"] == ["float64"]
    assert {r.dtype for r in result.records} == {"float64"}
    note = next(n for n in result.notes if n.startswith("dtypes:"))
    assert "given float32 inputs it returns y in float64" in note and "certified in float64 only" in note
    assert "x.dtype" in note and "dtypes = ('float64',)" in note


class BigEndianZeros(ZerosLSTM):
    """The np.zeros course code (float64 whatever it is given), its outputs handed back big-endian."""

    def forward(self, x, h0, c0, p):
        *outputs, cache = super().forward(x, h0, c0, p)
        return (*(a.astype(">f8") for a in outputs), cache)


def test_the_byte_order_of_what_it_returns_is_not_its_dtype():
    # Big-endian float64 is float64: certified in float64 as written, float32 left out with the note.
    result = _certify(BigEndianZeros(), max_examples=3)
    assert result.verdict == "certified", result.details()
    assert result.settings["dtypes"] == ["float64"]
    assert any("given float32 inputs it returns y in >f8" in n for n in result.notes)


def test_a_planted_bug_is_still_caught_in_the_dtype_it_computes_in():
    result = _certify(ZerosLSTM("one_minus_f"))
    assert result.verdict == "discrepancies"
    assert result.settings["dtypes"] == ["float64"]
    assert {r.quantity for r in result.records if r.status == "fail"} >= {"y"}


def test_declared_dtypes_keep_the_strict_contract():
    declared = ZerosLSTM()
    declared.dtypes = ("float64", "float32")
    result = _certify(declared, max_examples=3)
    assert result.verdict != "certified"
    assert any(r.status == "contract" and r.dtype == "float32" and "expected dtype float32" in r.reason
               for r in result.records)
    assert not any(n.startswith("dtypes:") for n in result.notes)
    # The same through an adapter given dtypes=
    strict = _certify(adapt(forward_fn=_zeros_forward, final_cell=True, dtypes=("float64", "float32")),
                      max_examples=3)
    assert strict.verdict != "certified"


def test_a_dtype_asked_for_by_name_is_checked_and_the_note_says_why_it_fails():
    result = _certify(ZerosLSTM(), dtypes=["float32"], max_examples=3)
    assert result.verdict != "certified"
    assert any("float32 was asked for and is checked, and will fail" in n for n in result.notes)


def test_functions_that_compute_in_the_dtype_of_x_keep_both_dtypes():
    def forward(x, h0, c0, W, R, b):
        y, h, c = _zeros_forward(x, h0, c0, W, R, b)
        return y.astype(x.dtype), h, c, None

    result = _certify(adapt(forward_fn=forward))
    assert result.verdict == "certified", result.details()
    assert result.settings["dtypes"] == ["float64", "float32"]
    assert not any(n.startswith("dtypes:") for n in result.notes)


def test_the_command_line_prints_the_note(tmp_path, capsys):
    target = f"{__file__}:ZerosLSTM"
    assert main(["certify", target, "--max-examples", "3", "--oracle", "finite-differences",
                 "--report-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dtypes float64," in out and "certified in float64 only" in out


@pytest.mark.parametrize("bad", [("float16",)])
def test_bad_declared_dtypes_are_still_a_contract_error(bad):
    from harness.contract import ContractError

    impl = ZerosLSTM()
    impl.dtypes = bad
    with pytest.raises(ContractError, match="dtypes: expected a subset"):
        _certify(impl)
