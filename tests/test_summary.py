"""The terminal summary (harness.summary): one row per group, skips listed once per reason, every
discrepancy's message with its case and replay command."""

from harness.records import Record
from harness.summary import details, summary_table


def _rec(status, quantity="y", direction="forward", oracle="o", ratio=None, **kw):
    return Record(implementation="impl", oracle=oracle, variant="vanilla", dtype="float64", direction=direction,
                  quantity=quantity, status=status, ratio=ratio, **kw)


def test_one_row_per_direction_with_the_worst_status_and_error():
    records = [_rec("pass", ratio=0.01), _rec("fail", quantity="h_T", ratio=3.5),
               _rec("pass", quantity="dx", direction="backward", ratio=0.2)]
    lines = summary_table(records).splitlines()
    assert lines[0].split() == ["implementation", "dtype", "oracle", "direction", "status", "worst", "error",
                                "cases", "note"]
    assert "FAIL" in lines[2] and "3.5x tol (h_T)" in lines[2] and "not close: h_T" in lines[2]
    assert "pass" in lines[3] and "0.20x tol (dx)" in lines[3]


def test_rows_of_skips_only_are_listed_once_per_reason():
    records = [_rec("pass", ratio=0.1), _rec("skip", oracle="tf", reason="tf-keras unavailable: not installed"),
               _rec("skip", oracle="tf", quantity="h_T", reason="tf-keras unavailable: not installed")]
    text = summary_table(records)
    assert "tf-keras unavailable" not in text.split("Not checked")[0]
    assert "  - tf-keras unavailable: not installed (1 rows)" in text


def test_nothing_compared_says_so():
    assert summary_table([_rec("skip", reason="r")]).startswith("(nothing was compared)")


def test_details_give_each_discrepancy_once_with_case_and_replay():
    err = dict(reason="forward raised ValueError: bad", case={"T": 2, "B": 1, "D": 3, "H": 4, "dtype": "float64",
                                                               "seed": 7}, replay="lstm-harness replay c.npz m:A")
    records = [_rec("error", **err), _rec("error", quantity="h_T", **err), _rec("pass", ratio=0.1)]
    text = details(records)
    assert text.count("forward raised ValueError: bad") == 1  # one error, not one per quantity
    assert "Minimal case: T=2, B=1, D=3, H=4, float64, seed=7" in text
    assert "Replay: lstm-harness replay c.npz m:A" in text


def test_a_cell_whose_cases_passed_only_widened_is_marked_and_the_mark_explained():
    from harness.summary import checked_table

    plain = [_rec("pass", ratio=0.1, examples=20), _rec("pass", "dx", "backward", ratio=0.2, examples=20)]
    assert "*" not in checked_table(plain)
    widened = [_rec("pass", ratio=0.16, examples=20, widened_cases=3),
               _rec("pass", "dx", "backward", ratio=0.2, examples=20)]
    lines = checked_table(widened).splitlines()
    assert lines[2].split()[1:5] == ["pass", "0.16*", "pass", "0.20"]  # forward marked, backward not
    assert lines[-1].startswith("(*: some of its float32 cases passed only with the tolerance widened")
