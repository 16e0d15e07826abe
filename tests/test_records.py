"""Records (harness.records): plain data that round-trips through JSON, a message rendered from the
fields, the one status order, the verdict, report order and merging."""

import json
import math

import numpy as np

from harness.compare import TOLERANCES, compare_arrays
from harness.contract import quantities, quantity_specs
from harness.records import (
    STATUS_ORDER,
    STATUSES,
    Record,
    format_pair,
    keep_worst,
    merge_after_stop,
    order_records,
    status_rank,
    unit_outcome,
    verdict,
    worst_status,
)

SPECS = quantity_specs("vanilla")


def _rec(status="pass", quantity="y", direction="forward", oracle="o", dtype="float64", ratio=None, **kw):
    return Record(implementation=kw.pop("implementation", "i"), oracle=oracle, variant="vanilla", dtype=dtype,
                  direction=direction, quantity=quantity, status=status, ratio=ratio, **kw)


def _failing_y():
    expected = np.zeros((2, 1, 2))
    actual = expected + np.array([0.0, 1.0])
    return compare_arrays(actual, expected, spec=SPECS["y"], H=2, tol=TOLERANCES["float64"]["values"],
                          tolerance_dtype="float64", base=dict(implementation="impl", oracle="oracle",
                                                               variant="vanilla", dtype="float64",
                                                               direction="forward", quantity="y"))


def test_record_round_trips_through_json():
    rec = _failing_y()
    again = Record.from_dict(json.loads(rec.to_json()))
    assert again.to_dict() == rec.to_dict()
    assert again.worst["coords"] == {"t": 0, "batch": 0, "unit": 1}


def test_infinite_errors_survive_the_json_round_trip_and_render_the_same():
    rec = _failing_y()
    assert rec.max_rel_error == math.inf  # the error where expected is 0
    data = json.loads(rec.to_json())
    assert data["max_rel_error"] == 1e300  # strict JSON has no infinity
    again = Record.from_dict(data)
    assert again.max_rel_error == math.inf
    assert again.message == rec.message and "Greatest relative difference: inf" in again.message


def test_the_message_is_rendered_from_the_fields_and_follows_them():
    rec = _failing_y()
    assert rec.message.splitlines()[0] == "y from impl (float64) vs oracle: not close"
    rec.quantity = "h_T"
    assert rec.message.splitlines()[0] == "h_T from impl (float64) vs oracle: not close"
    rec.add_note("this case gave different results when run again")
    rec.add_note("this case gave different results when run again")  # a note is said once
    assert rec.message.endswith("\nNote: this case gave different results when run again")
    assert rec.message.count("Note:") == 1
    assert rec.to_dict()["message"] == rec.message and rec.to_dict()["notes"] == rec.notes


def test_an_error_and_a_skip_say_what_happened():
    error = _rec("error", reason="forward raised ValueError: no")
    assert error.message == "y from i (float64) vs o: raised an error\nforward raised ValueError: no"
    skip = _rec("skip", reason="o gives no gradients")
    assert skip.message == "y from i (float64) vs o: skipped (o gives no gradients)"


def test_one_status_order_worst_first():
    assert set(STATUS_ORDER) == set(STATUSES)
    assert [status_rank(s) for s in STATUS_ORDER] == list(range(len(STATUS_ORDER)))
    assert status_rank("no such status") == len(STATUS_ORDER)
    assert worst_status([_rec("pass"), _rec("fail"), _rec("skip")]) == "fail"
    assert worst_status([_rec("contract"), _rec("error")]) == "error"
    assert worst_status([]) == "skip"


def test_the_verdict():
    assert verdict([_rec("pass"), _rec("skip")]) == "certified"
    assert verdict([_rec("pass"), _rec("fail")]) == "discrepancies"
    assert verdict([_rec("pass"), _rec("error")]) == "error"
    assert verdict([_rec("fail"), _rec("contract")]) == "discrepancies"
    assert verdict([_rec("skip")]) == "error"  # a certification that checked nothing is not certified
    assert verdict([]) == "error"


def test_a_unit_of_skips_only_is_reported_skipped_not_as_an_error():
    def rec(status):
        return _rec(status, reason="o cannot compute a float64 case")

    assert unit_outcome([rec("skip"), rec("skip")]) == "skipped"
    assert verdict([rec("skip")]) == "error"  # a whole certification that checked nothing is still an error
    assert unit_outcome([rec("skip"), rec("pass")]) == "certified"
    assert unit_outcome([rec("skip"), rec("fail")]) == "discrepancies"
    assert unit_outcome([]) == "error"


def test_report_order_is_implementation_dtype_oracle_direction_quantity():
    backward = quantities("vanilla", "backward")
    records = [
        _rec(quantity="dW", direction="backward", oracle="b", dtype="float32"),
        _rec(quantity="dx", direction="backward", oracle="b"),
        _rec(quantity="y", oracle="b"),
        _rec(quantity="c_T", oracle="a"),
        _rec(quantity="y", oracle="a"),
        _rec(quantity="y", oracle="a", implementation="h"),
    ]
    ordered = order_records(records, ["a", "b"])
    got = [(r.implementation, r.dtype, r.oracle, r.direction, r.quantity) for r in ordered]
    assert got == [("h", "float64", "a", "forward", "y"),
                   ("i", "float64", "a", "forward", "y"),
                   ("i", "float64", "a", "forward", "c_T"),
                   ("i", "float64", "b", "forward", "y"),
                   ("i", "float64", "b", "backward", "dx"),
                   ("i", "float32", "b", "backward", "dW")]
    assert backward.index("dx") < backward.index("dW")


def test_keep_worst_keeps_the_largest_ratio_and_prefers_a_comparison_to_a_skip():
    worst = {}
    skip = _rec("skip")
    keep_worst(worst, skip)
    small = _rec("pass", ratio=0.1)
    keep_worst(worst, small)
    assert worst[small.key] is small
    keep_worst(worst, _rec("pass", ratio=0.01))
    assert worst[small.key] is small
    large = _rec("pass", ratio=0.5)
    keep_worst(worst, large)
    assert worst[small.key] is large


def test_merge_after_stop_keeps_earlier_discrepancies_and_the_stop_for_the_rest():
    earlier_fail = _rec("fail", quantity="dW", direction="backward", ratio=3.0, examples=5)
    earlier_pass = _rec("pass", quantity="y", ratio=0.2, examples=5)
    stopped = [_rec("error", quantity="dW", direction="backward", reason="crash", examples=7),
               _rec("pass", quantity="y", ratio=0.1, examples=7),
               _rec("error", quantity="dx", direction="backward", reason="crash", examples=7)]
    merged = {r.quantity: r for r in merge_after_stop([earlier_fail, earlier_pass], stopped)}
    assert merged["dW"] is earlier_fail  # a discrepancy found before the stop stands
    assert merged["y"] is earlier_pass  # both passed: the worse of the two
    assert merged["dx"].status == "error"
    assert {r.examples for r in merged.values()} == {7}


def test_a_pair_shows_where_the_numbers_part_and_no_negative_zero():
    assert format_pair(0.123456, 0.123457) == ("0.123456", "0.123457")
    assert format_pair(1.0, 1.0 + 2**-40) == ("1", "1.000000000001")
    assert format_pair(0.25, -0.0) == ("0.25", "0")  # -0.0 compares equal to 0.0: it is shown as 0
    assert format_pair(-0.0, -0.0) == ("0", "0")
    assert format_pair(None, 1.5) == ("None", "1.5")
