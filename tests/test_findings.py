"""Findings (harness.findings): records grouped by root cause, with the evidence and the largest error."""

from harness.findings import Finding, findings, render_findings
from harness.records import Record


def _rec(status, quantity="y", direction="forward", oracle="fd", dtype="float64", ratio=None, gate=None, t=None,
         **kw):
    coords = {"t": 0, "batch": 0, "unit": 1} if gate is None else {"gate": gate, "unit": 1, "input": 0}
    worst = {"coords": coords, "actual": 1.0, "expected": 1.5, "index": [0, 0, 1]} if status == "fail" else None
    return Record(implementation="impl", oracle=oracle, variant="vanilla", dtype=dtype, direction=direction,
                  quantity=quantity, status=status, ratio=ratio, worst=worst, first_bad_t=t, **kw)


def test_one_error_is_one_finding_whatever_it_stopped():
    records = [_rec("error", q, d, o, dt, reason="backward raised ValueError: bad\nTraceback ...")
               for q, d in (("dx", "backward"), ("dW", "backward")) for o in ("fd", "torch")
               for dt in ("float64", "float32")]
    records.append(_rec("pass", ratio=0.1))
    (f,) = findings(records)
    assert f.kind == "error" and f.records == 8 and f.dtypes == ["float64", "float32"]
    assert f.disagreeing == ["fd", "torch"] and f.reason.startswith("backward raised ValueError: bad")


def test_a_forward_bug_folds_the_gradients_that_follow_from_it():
    records = [_rec("fail", "y", ratio=50.0, t=2), _rec("fail", "c_T", ratio=80.0),
               _rec("fail", "dW", "backward", ratio=9.0, gate="g"), _rec("fail", "y", dtype="float32", ratio=3.0)]
    (f,) = findings(records)
    assert f.kind == "discrepancy" and f.title.startswith("forward: y, c_T depart")
    assert f.worst["quantity"] == "c_T" and f.worst["ratio"] == 80.0 and f.first_bad_t == 2
    assert f.dtypes == ["float64", "float32"]
    assert any("its gradients (dW) depart too" in n for n in f.notes)


def test_the_first_bad_timestep_is_the_minimal_cases_and_says_so():
    # float64 shrank to a T=2 case that departs at t=1; float32's larger case departs at t=0. The finding
    # shows and replays the smallest saved case, so its first timestep is that case's, and it says so.
    small = {"T": 2, "B": 1, "D": 1, "H": 1}
    records = [_rec("fail", "y", ratio=50.0, t=1, case=small, case_file="small.npz"),
               _rec("fail", "y", dtype="float32", ratio=60.0, t=0, case={"T": 5, "B": 2, "D": 3, "H": 4},
                    case_file="large.npz")]
    (f,) = findings(records)
    assert f.case_file == "small.npz" and f.first_bad_t == 1
    assert "  First timestep over tolerance: t=1 of T=2, on the minimal case" in f.lines()
    # Without saved cases, the earliest over every record.
    (g,) = findings([_rec("fail", "y", ratio=50.0, t=1), _rec("fail", "y", dtype="float32", ratio=6.0, t=0)])
    assert g.first_bad_t == 0 and "  First timestep over tolerance: t=0" in g.lines()


def test_an_oracle_disagreements_first_timestep_is_its_minimal_cases_too():
    small, large = {"T": 2, "B": 1, "D": 1, "H": 1}, {"T": 9, "B": 2, "D": 3, "H": 4}
    records = [_rec("pass", "y", oracle=o, dtype=dt, ratio=0.1)
               for o in ("fd", "torch") for dt in ("float64", "float32")]
    records += [_rec("fail", "y", oracle="tf", ratio=4.0, t=1, case=small, case_file="small.npz"),
               _rec("fail", "y", oracle="tf", dtype="float32", ratio=9.0, t=7, case=large, case_file="large.npz")]
    (f,) = findings(records, ["fd", "torch", "tf"])
    assert f.kind == "oracle disagreement" and f.case_file == "small.npz" and f.worst["ratio"] == 9.0
    assert f.first_bad_t == 1 and "  First timestep over tolerance: t=1 of T=2, on the minimal case" in f.lines()


def test_replay_lines_that_need_the_implementation_saved_say_so():
    from harness.cases import NO_TARGET, replay_command

    assert replay_command("c.npz", None, "fd").startswith("save your implementation in a module to replay: ")
    for target in (NO_TARGET, f"{NO_TARGET} --gate-order ifog"):  # an adapter's object that no TARGET loads
        assert replay_command("c.npz", target, "fd").startswith("save the object you gave harness.adapt in a module")
    assert replay_command("c.npz", "pkg.mod:obj --gate-order ifog", "fd") == \
        "lstm-harness replay c.npz pkg.mod:obj --gate-order ifog --oracle fd"


def test_a_backward_bug_names_its_gate_and_says_the_forward_matches():
    records = [_rec("pass", "y", ratio=0.01), _rec("fail", "dW", "backward", ratio=40.0, gate="f"),
               _rec("fail", "db", "backward", ratio=30.0, gate="f")]
    (f,) = findings(records)
    assert f.title == "backward: dW, db depart at gate f (float64)" and f.gates == ["f"]
    assert "its forward pass matches" in f.notes


def test_a_lone_oracle_against_two_that_agree_is_an_oracle_disagreement():
    records = [_rec("pass", "dW", "backward", "fd", ratio=0.1), _rec("pass", "dW", "backward", "torch", ratio=0.2),
               _rec("fail", "dW", "backward", "tf", ratio=4.0, gate="o")]
    (f,) = findings(records, ["fd", "torch", "tf"])
    assert f.kind == "oracle disagreement" and f.disagreeing == ["tf"] and f.agreeing == ["fd", "torch"]
    # With only one oracle agreeing, the implementation stays the suspect.
    (g,) = findings(records[1:])
    assert g.kind == "discrepancy"


def test_an_oracle_skipped_in_both_dtypes_is_said_once_with_the_counts_summed():
    why = "keras does not compute cifg"
    records = [_rec("fail", q, oracle="keras", dtype=dt, ratio=9.0, skipped_cases={why: n})
               for q in ("y", "h_T", "c_T") for dt, n in (("float64", 12), ("float32", 7))]
    records += [_rec("fail", "y", oracle="fd", dtype="float64", ratio=9.0),
                _rec("fail", "y", oracle="torch", dtype="float32", ratio=9.0,
                     skipped_cases={"torch does not compute clip": 3, why.replace("keras", "torch"): 2})]
    (f,) = findings(records)
    skips = [n for n in f.notes if "was skipped on" in n]
    # Three quantities of one dtype share that dtype's count: 12 + 7, not 3 * (12 + 7).
    assert skips == [f"keras was skipped on 19 cases (shrinking included) whose structure it does not compute: {why}",
                     "torch was skipped on 5 cases (shrinking included) whose structure it does not compute: torch "
                     "does not compute clip (3 cases); torch does not compute cifg (2 cases)"]
    # Each record's own message keeps its own dtype's count.
    assert "keras was skipped on 7 cases" in records[1].message and "Note: " in records[1].message


def test_the_largest_error_seen_leads_and_a_moved_weight_scale_is_said():
    minimal = _rec("fail", ratio=1.6, case={"T": 1, "B": 1, "D": 1, "H": 1, "spec": {"weight_scale": "tiny"}},
                   case_file="c/min.npz", replay="lstm-harness replay c/min.npz m:A --oracle fd")
    minimal.worst_seen = {"ratio": 3.9e7, "max_abs_error": 0.1, "worst": {"coords": {"t": 0}, "actual": 1.1,
                                                                          "expected": 1.2},
                          "case": {"T": 2, "spec": {"weight_scale": "saturating"}}, "case_file": "c/big.npz"}
    (f,) = findings([minimal])
    assert f.worst["ratio"] == 3.9e7 and f.worst["case_file"] == "c/big.npz"
    assert f.case_file == "c/min.npz" and f.replay.endswith("--oracle fd")
    assert any("largest with saturating weights" in n and "only 1.6x" in n for n in f.notes)
    text = render_findings([f])
    assert "Largest error: 3.9e+07x tolerance in y" in text and "Replay: lstm-harness replay c/min.npz" in text
    # Errors of the same size as shown say nothing about the scale: no note.
    minimal.ratio, minimal.worst_seen["ratio"] = 1.41e9, 1.42e9
    (g,) = findings([minimal])
    assert not any("largest with" in n for n in g.notes)


def test_findings_round_trip_through_a_dict():
    (f,) = findings([_rec("fail", ratio=2.0)])
    assert Finding.from_dict(f.to_dict()) == f


def _gate_map(quantity, **tops):
    """An error map of a (4H, D) gradient with each gate's largest |error| / allowed."""
    return {"quantity": quantity, "panels": [{"title": f"gate {g}", "rows": "unit", "cols": "input", "shape": [1, 2],
                                              "values": [[0.5, tops.get(g, 0.1)]]} for g in "ifgo"]}


def test_a_bug_over_tolerance_at_several_gates_lists_them_beside_the_headlines_one():
    """The headline names the worst element's gate; a bug in what the gates share (dc) reaches others too,
    and the note lists each over tolerance with its largest error, from the minimal and the largest case."""
    records = [_rec("fail", "dW", "backward", ratio=1600.0, gate="g", error_map=_gate_map("dW", g=10.0, f=3.0),
                    worst_seen={"ratio": 1600.0, "error_map": _gate_map("dW", g=1600.0, f=1400.0, i=160.0)}),
               _rec("fail", "db", "backward", ratio=20.0, gate="g", error_map=_gate_map("db", g=20.0, o=0.5))]
    (f,) = findings(records)
    assert f.title == "backward: dW, db depart at gate g (float64)"
    assert "by gate, the largest error over tolerance: g (1600x), f (1400x), i (160x)" in f.notes
    # One gate over tolerance, the headline's: nothing more to say.
    (one,) = findings([_rec("fail", "dW", "backward", ratio=40.0, gate="f", error_map=_gate_map("dW", f=40.0))])
    assert not any(n.startswith("by gate") for n in one.notes)
