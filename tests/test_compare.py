"""The comparison: closeness rule, coordinate decoding, records, messages, error maps."""

import json

import numpy as np
import pytest

from harness.compare import (
    TOLERANCES,
    compare_arrays,
    compare_projections,
    decode_index,
    effective_dtype,
    tolerance,
)
from harness.contract import quantity_specs

SPECS = quantity_specs("vanilla")
BASE = dict(implementation="impl", oracle="oracle", variant="vanilla", dtype="float64", direction="forward")
TOL = TOLERANCES["float64"]["values"]


def _compare(actual, expected, quantity, H, tol=TOL, extra=0.0):
    return compare_arrays(actual, expected, spec=SPECS[quantity], H=H, tol=tol, tolerance_dtype="float64",
                          extra=extra, base={**BASE, "quantity": quantity})


def test_identical_arrays_pass_with_zero_error():
    y = np.random.default_rng(0).standard_normal((5, 3, 4))
    rec = _compare(y.copy(), y, "y", 4)
    assert rec.status == "pass"
    assert rec.max_abs_error == 0.0 and rec.mismatched == 0 and rec.total == 60
    assert rec.error_map is None


def test_planted_error_in_y_is_located_in_time_batch_and_unit():
    rng = np.random.default_rng(1)
    T, B, H = 6, 3, 5
    expected = rng.standard_normal((T, B, H))
    actual = expected.copy()
    actual[4, 1, 2] += 1e-3
    actual[5, 1, 2] += 1e-6  # a later, smaller error: the first timestep is still t=4
    rec = _compare(actual, expected, "y", H)
    assert rec.status == "fail"
    assert rec.mismatched == 2
    assert rec.worst["coords"] == {"t": 4, "batch": 1, "unit": 2}
    assert rec.first_bad_t == 4 and rec.last_bad_t == 5
    assert rec.max_abs_error == pytest.approx(1e-3)


def test_planted_error_in_dW_decodes_gate_unit_and_input():
    H, D = 4, 3
    expected = np.random.default_rng(2).standard_normal((4 * H, D))
    actual = expected.copy()
    row = 1 * H + 2  # gate f (second block), unit 2
    actual[row, 0] += 0.5
    rec = compare_arrays(actual, expected, spec=SPECS["dW"], H=H, tol=TOLERANCES["float64"]["gradients"],
                         tolerance_dtype="float64", base={**BASE, "direction": "backward", "quantity": "dW"})
    assert rec.worst["coords"] == {"gate": "f", "unit": 2, "input": 0}
    assert rec.first_bad_t is None  # dW has no time axis
    panels = rec.error_map["panels"]
    assert [p["title"] for p in panels] == ["gate i", "gate f", "gate g", "gate o"]
    hot = np.array(panels[1]["values"])
    assert hot.shape == (H, D) and hot[2, 0] > 1 and (np.delete(hot.ravel(), 2 * D) <= 1).all()
    assert all(np.max(p["values"]) <= 1 for k, p in enumerate(panels) if k != 1)


def test_decode_layernorm_rows_and_recurrent_units():
    specs = quantity_specs("layernorm")
    assert decode_index((4, 1), specs["dgamma"], H=3) == {"row": "c", "unit": 1}
    assert decode_index((15, 2), SPECS["dR"], H=4) == {"gate": "o", "unit": 3, "unit_in": 2}
    assert decode_index((11, 0), SPECS["dR"], H=4) == {"gate": "g", "unit": 3, "unit_in": 0}
    assert decode_index((9,), SPECS["db"], H=4) == {"gate": "g", "unit": 1}


def test_tolerance_boundary_follows_the_documented_rule():
    # allowed = atol * max(1, max|expected|) + rtol * |expected|, derived here independently.
    expected = np.array([[0.0, 10.0]])  # (B=1, H=2): h_T-shaped
    scale = 10.0
    allowed = TOL.atol * scale + TOL.rtol * np.abs(expected)
    inside = expected + 0.99 * allowed
    outside = expected.copy()
    outside[0, 0] += 1.01 * allowed[0, 0]
    assert _compare(inside, expected, "h_T", 2).status == "pass"
    rec = _compare(outside, expected, "h_T", 2)
    assert rec.status == "fail" and rec.worst["coords"] == {"batch": 0, "unit": 0}
    assert rec.ratio == pytest.approx(1.01)
    assert rec.atol_scale == scale


def test_extra_allowance_from_the_oracle_is_added():
    expected = np.zeros((1, 2))
    actual = expected + 1e-6
    assert _compare(actual, expected, "h_T", 2).status == "fail"
    assert _compare(actual, expected, "h_T", 2, extra=np.full((1, 2), 2e-6)).status == "pass"


def test_nan_and_inf_where_the_oracle_is_finite_are_located_mismatches():
    expected = np.zeros((3, 2, 2))
    actual = expected.copy()
    actual[2, 0, 1] = np.nan
    actual[1, 1, 0] = np.inf
    rec = _compare(actual, expected, "y", 2)
    assert rec.status == "fail"
    assert rec.nonfinite == 2 and rec.mismatched == 2
    assert rec.first_bad_t == 1
    assert rec.worst["coords"]["t"] in (1, 2)
    json.loads(rec.to_json())  # strict JSON even with NaN and Inf inside


def test_matching_nonfinite_values_are_equal():
    expected = np.array([[np.nan, np.inf]])
    assert _compare(expected.copy(), expected, "h_T", 2).status == "pass"
    assert _compare(np.array([[np.nan, -np.inf]]), expected, "h_T", 2).status == "fail"


def test_message_has_the_assert_close_shape():
    expected = np.zeros((5, 2, 3))
    actual = expected.copy()
    actual[3, 1, 2] = 0.25
    rec = _compare(actual, expected, "y", 3)
    lines = rec.message.splitlines()
    assert lines[0] == "y from impl (float64) vs oracle: not close"
    assert lines[1] == "Mismatched elements: 1 / 30 (3.3%)"
    assert "at t=3, batch=1, unit=2" in rec.message
    assert "First timestep over tolerance: t=3" in rec.message
    assert "rtol=1.0e-09, atol=1.0e-09" in rec.message


def test_projection_comparison_names_the_direction():
    expected = np.array([1.0, 2.0, 3.0])
    actual = np.array([1.0, 2.5, 3.0])
    rec = compare_projections(actual, expected, np.zeros(3), tol=TOLERANCES["float64"]["gradients"],
                              tolerance_dtype="float64", scale=3.0,
                              base={**BASE, "direction": "backward", "quantity": "dW"})
    assert rec.status == "fail" and rec.method == "projection"
    assert rec.worst["coords"] == {"random_direction": 1}
    assert "Mismatched directional derivatives: 1 / 3" in rec.message


def test_effective_dtype_is_the_lower_precision():
    assert effective_dtype("float64", "float64") == "float64"
    assert effective_dtype("float64", "float32") == "float32"
    assert effective_dtype("float32", "float64") == "float32"


def test_tolerance_table_is_complete_documented_and_ordered():
    for dtype in ("float64", "float32"):
        values, grads = tolerance(dtype, "values"), tolerance(dtype, "gradients")
        assert values.reason and grads.reason
        assert grads.rtol >= values.rtol and grads.atol >= values.atol
    assert tolerance("float32", "values").rtol > tolerance("float64", "values").rtol
    with pytest.raises(ValueError, match="dtype: expected one of"):
        tolerance("float16", "values")
    with pytest.raises(ValueError, match="kind: expected 'values' or 'gradients'"):
        tolerance("float64", "weights")


def test_large_maps_are_pooled_but_keep_the_hot_cell():
    T, B, H = 200, 1, 100
    expected = np.zeros((T, B, H))
    actual = expected.copy()
    actual[150, 0, 77] = 1.0
    rec = _compare(actual, expected, "y", H)
    panel = rec.error_map["panels"][0]
    values = np.array(panel["values"])
    assert values.shape[0] <= 48 and values.shape[1] <= 48
    assert values.max() > 1
    assert panel["shape"] == [T, H]
