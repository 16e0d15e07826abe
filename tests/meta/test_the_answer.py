"""The answer to a failure, on the real command line and report: one finding per bug, its true size,
where it is, a short default output, and replay commands that reproduce every recorded number."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

import harness
from harness.cli import main
from harness.records import Record

HERE = Path(__file__).parent / "failure_answers.py"
ORACLES = ["--oracle", "finite-differences"] + (
    ["--oracle", "torch-composite"] if harness.registry.oracle_by_name("torch-composite").availability().available
    else [])


def _certify(cls: str, tmp_path: Path, capsys) -> tuple[int, str, dict]:
    code = main(["certify", f"{HERE}:{cls}", "--in-process", "--max-examples", "25", "--seed", "3", *ORACLES,
                 "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    return code, out, json.loads((tmp_path / "report.json").read_text())


def _replays_exactly(report: dict, target: str) -> None:
    """Every failing record, and every largest-error case, replays to the same numbers, bit for bit."""
    for data in report["records"]:
        if data["status"] != "fail":
            continue
        rec = Record.from_dict(data)
        runs = [(rec.case_file, rec.worst, rec.ratio)]
        if rec.worst_seen:
            runs.append((rec.worst_seen["case_file"], rec.worst_seen["worst"], rec.worst_seen["ratio"]))
        for case_file, worst, ratio in runs:
            again = harness.replay(case_file, target, oracles=[rec.oracle])
            same = next(r for r in again.records if r.quantity == rec.quantity and r.oracle == rec.oracle)
            assert same.status == "fail", (case_file, same.message)
            assert (same.worst["actual"], same.worst["expected"]) == (worst["actual"], worst["expected"]), case_file
            assert same.ratio == ratio


def test_a_ten_percent_forward_bug_is_one_finding_of_its_true_size(tmp_path, capsys):
    code, out, report = _certify("CandidateScaled", tmp_path, capsys)
    assert code == 1
    assert len(out.splitlines()) <= 40, out
    (finding,) = report["findings"]
    assert finding["kind"] == "discrepancy" and finding["directions"][0] == "forward"
    assert {"y", "h_T", "c_T"} <= set(finding["quantities"])
    assert finding["worst"]["ratio"] >= 100  # not the barely-over-tolerance error of a shrunk case
    assert "1. DISCREPANCY: forward: y, h_T, c_T depart" in out
    assert "Largest error: " in out and "Replay: lstm-harness replay " in out
    _replays_exactly(report, f"{HERE}:CandidateScaled")
    # The printed replay command is one a person can paste.
    command = next(line for line in out.splitlines() if line.strip().startswith("Replay: ")).split("Replay: ")[1]
    assert main(shlex.split(command)[1:]) == 1
    assert "Reproduced: the case still fails." in capsys.readouterr().out


def test_a_wrong_forget_gate_derivative_is_one_backward_finding_at_gate_f(tmp_path, capsys):
    code, out, report = _certify("WrongForgetDerivative", tmp_path, capsys)
    assert code == 1
    assert len(out.splitlines()) <= 40, out
    (finding,) = report["findings"]
    assert finding["kind"] == "discrepancy" and finding["directions"] == ["backward"]
    assert {"dW", "dR", "db"} <= set(finding["quantities"]) and "y" not in finding["quantities"]
    assert finding["gates"] == ["f"] and "at gate f" in finding["title"]
    assert "its forward pass matches" in finding["notes"]
    _replays_exactly(report, f"{HERE}:WrongForgetDerivative")


def test_a_backward_that_raises_is_one_error_finding(tmp_path, capsys):
    code, out, report = _certify("BackwardRaises", tmp_path, capsys)
    assert code == 1
    assert len(out.splitlines()) <= 40, out
    (finding,) = report["findings"]
    assert finding["kind"] == "error" and finding["directions"] == ["backward"]
    assert "operands could not be broadcast together in my backward" in finding["reason"]
    assert out.count("operands could not be broadcast together") == 1
    assert set(finding["dtypes"]) == {"float64", "float32"}


@pytest.mark.parametrize("cls", ["CandidateScaled"])
def test_verbose_prints_every_record(cls, tmp_path, capsys):
    main(["certify", f"{HERE}:{cls}", "--in-process", "--max-examples", "5", "--oracle", "finite-differences",
          "--dtype", "float64", "--report-dir", str(tmp_path), "-v"])
    out = capsys.readouterr().out
    assert "Every discrepancy and error:" in out
    assert any(line.split()[:5] == ["implementation", "dtype", "oracle", "direction", "quantity"]
               for line in out.splitlines())


def test_a_correct_lstm_in_another_convention_gets_the_diagnosis_on_top(tmp_path, capsys):
    code, out, report = _certify("GatesReadFIGO", tmp_path, capsys)
    assert code == 1
    first = next(line for line in out.splitlines() if line and not line.startswith("Certifying"))
    assert first.startswith("Diagnosis: it matches if its gate blocks are read as f, i, g, o"), out
    assert report["diagnosis"]["status"] == "convention"
    assert "gate_order='figo'" in report["diagnosis"]["text"]
