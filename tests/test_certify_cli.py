"""`lstm-harness certify`, `replay`, `report` and `run` from the command line: exit codes, the report
files, replayable cases, parallel jobs, usage errors."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import registry
from harness.cli import main

MISBEHAVING = Path(__file__).parent / "plugins" / "misbehaving.py"
FD = ["--oracle", "finite-differences"]
HAVE_HTML = importlib.util.find_spec("jinja2") is not None and importlib.util.find_spec("matplotlib") is not None


def _available_builtins():
    return [e.name for e in registry.implementations() if e.unavailable is None]


@pytest.mark.parametrize("name", _available_builtins())
def test_builtins_certify(name, tmp_path, capsys):
    code = main(["certify", name, "--in-process", "--max-examples", "5", *FD, "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Verdict: certified" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "certified" and report["command"] == "certify"


def test_certify_with_every_default_writes_the_documented_report(tmp_path, capsys):
    """Isolated (the default), every available oracle; report.json, index.html and JUnit XML."""
    junit = tmp_path / "junit.xml"
    code = main(["certify", "loop", "--max-examples", "3", "--report-dir", str(tmp_path), "--junit-xml", str(junit)])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema_version"] == 1 and report["tool"]["name"] == "lstm-harness"
    assert report["verdict"] == "certified"
    assert report["target_info"]["target"] == "loop" and report["target_info"]["isolated"] is True
    assert report["target_info"]["loaded"]["kind"] == "entry point"
    assert report["settings"]["timeout"] == 60.0 and report["settings"]["isolate"] is True
    assert {"python", "cpu", "packages"} <= set(report["environment"])
    expected = {o.name for o in registry.oracles() if o.availability().available and "vanilla" in o.variants}
    assert set(report["settings"]["oracles"]) == expected
    record = report["records"][0]
    for key in ("implementation", "oracle", "variant", "dtype", "direction", "quantity", "status", "rtol",
                "atol", "case", "replay"):
        assert key in record
    assert junit.is_file() and "<testsuite" in junit.read_text()
    if HAVE_HTML:
        assert (tmp_path / "index.html").is_file()
    else:
        assert "report extra" in captured.err
    assert "cases in" in captured.err  # the progress display


def test_discrepancy_exit_1_and_the_case_replays(tmp_path, capsys):
    target = f"{MISBEHAVING}:ReturnsNaN"
    assert main(["certify", target, "--in-process", "--max-examples", "5", *FD, "--dtype", "float64",
                 "--report-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Verdict: discrepancies" in out and "FAIL" in out
    report = json.loads((tmp_path / "report.json").read_text())
    failing = [r for r in report["records"] if r["status"] == "fail"]
    assert failing and all(r["quantity"] == "y" for r in failing)
    command = shlex.split(failing[0]["replay"])
    assert command[:2] == ["lstm-harness", "replay"] and Path(command[2]).is_file()
    assert main(command[1:]) == 1  # reproduces
    assert "Reproduced: the case still fails." in capsys.readouterr().out
    assert main(["replay", command[2], "loop", "--in-process", *FD]) == 0  # a correct one passes it
    assert "The case passes" in capsys.readouterr().out


def test_nondeterminism_replays(tmp_path, capsys):
    assert main(["certify", f"{MISBEHAVING}:Nondeterministic", "--in-process", "--max-examples", "3", *FD,
                 "--dtype", "float64", "--report-dir", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    record = next(r for r in report["records"] if "different results" in r["reason"])
    capsys.readouterr()
    assert main(shlex.split(record["replay"])[1:]) == 1
    assert "gives different results for the same input" in capsys.readouterr().out


def test_crash_and_hang_exit_1_with_report(tmp_path, capsys):
    assert main(["certify", f"{MISBEHAVING}:Segfaults", "--max-examples", "3", *FD, "--dtype", "float32",
                 "--report-dir", str(tmp_path / "a")]) == 1
    assert "killed by SIGSEGV" in capsys.readouterr().out
    assert main(["certify", f"{MISBEHAVING}:Hangs", "--timeout", "0.5", "--max-examples", "3", *FD,
                 "--dtype", "float64", "--report-dir", str(tmp_path / "b")]) == 1
    assert "did not return within 0.5 s" in capsys.readouterr().out
    for sub in ("a", "b"):
        assert json.loads((tmp_path / sub / "report.json").read_text())["verdict"] == "error"


@pytest.mark.parametrize("args, message", [
    (["certify", "loop", "--in-process", "--timeout", "3"], "--timeout: a per-call timeout needs"),
    (["certify", "loop", "--in-process", "--oracle", "no-such-oracle"], "--oracle: expected names from"),
    (["certify", f"{MISBEHAVING}:WrongDtype", "--in-process", "--dtype", "float64"], "--dtype: wrong-dtype declares"),
    (["replay", "no_such_case.npz", "loop", "--in-process"], "CASE.npz: expected a .npz case file"),
    (["report", "no_such_report.json"], "report.json: expected an existing file"),
])
def test_usage_errors_exit_2(args, message, capsys, tmp_path):
    assert main([*args, "--report-dir", str(tmp_path)] if args[0] == "certify" else args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, error", [
    (["certfy", "loop"], "lstm-harness: error: argument COMMAND: invalid choice: 'certfy' (choose from 'list', 'run', "
                         "'certify', 'diagnose', 'replay', 'report') (did you mean 'certify'?)"),
    (["certify", "loop", "--max-examples", "0"],
     "lstm-harness certify: error: argument --max-examples: expected a positive integer, got 0"),
    (["certify", "loop", "--max-examples", "10000000"],
     "lstm-harness certify: error: argument --max-examples: expected at most 1,000,000 cases per check, got 10000000"),
    (["certify", "loop", "--profle", "dev"],
     "lstm-harness certify: error: unrecognized arguments: --profle dev (did you mean '--profile'?)"),
    (["list", "--jsn"], "lstm-harness list: error: unrecognized arguments: --jsn (did you mean '--json'?)"),
    (["--bogus", "certify", "loop"], "lstm-harness: error: unrecognized arguments: --bogus"),  # before the command
    (["certify", "loop", "--dtype", "float16"],  # not a misspelling of float64: no guess
     "lstm-harness certify: error: argument --dtype: invalid choice: 'float16' (choose from 'float64', 'float32')"),
])
def test_argument_errors_are_two_lines_with_the_nearest_spelling(args, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    command = " ".join(["lstm-harness", *(a for a in args[:1] if a in ("certify", "list"))])
    assert capsys.readouterr().err.splitlines() == [error, f"(`{command} --help` describes every option)"]


def test_version(capsys):
    from harness import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"lstm-harness {__version__}\n"


def test_report_rerenders(tmp_path, capsys):
    pytest.importorskip("jinja2", reason="the HTML report needs the report extra")
    pytest.importorskip("matplotlib", reason="the HTML report needs the report extra")
    assert main(["certify", "loop", "--in-process", "--max-examples", "2", *FD, "--report-dir", str(tmp_path)]) == 0
    out = tmp_path / "again.html"
    assert main(["report", str(tmp_path / "report.json"), "-o", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_run_still_works_and_writes_both_reports(tmp_path, capsys):
    code = main(["run", "--impl", "loop", *FD, "--max-examples", "3", "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "Verdict: certified" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"] == "run" and report["implementations"][0]["target"] == "impls.loop:LoopLSTM"
    if HAVE_HTML:
        assert (tmp_path / "index.html").is_file()


def test_console_entry_point_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness", "certify", f"{MISBEHAVING}:Exits", "--max-examples",
                           "2", *FD, "--dtype", "float64", "--report-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "exited with status 3" in proc.stdout
    assert "exits float64" in proc.stderr  # progress goes to stderr, results to stdout


def test_replay_where_nothing_is_compared_is_not_a_pass(tmp_path, capsys):
    from harness.cases import CaseSpec, build_case

    path = tmp_path / "layernorm.npz"
    build_case(CaseSpec(variant="layernorm", T=2, B=2, D=3, H=4, seed=1)).save(path)
    # torch-nn-lstm has no LayerNorm variant (or no torch here): every record is a skip.
    assert main(["replay", str(path), "loop-layernorm", "--in-process", "--oracle", "torch-nn-lstm"]) == 1
    out = capsys.readouterr().out
    assert "Nothing was compared" in out and "The case passes" not in out


def test_an_error_inside_the_run_is_not_reported_as_bad_usage(monkeypatch, tmp_path):
    import harness.api

    def broken(*args, **kwargs):
        raise ValueError("boom from inside the run")

    monkeypatch.setattr(harness.api, "run_unit", broken)
    with pytest.raises(ValueError, match="boom from inside the run"):
        main(["certify", "loop", "--in-process", "--max-examples", "2", *FD, "--report-dir", str(tmp_path)])


def test_every_failure_has_a_saved_case_without_a_report_dir():
    from harness.api import certify

    result = certify(f"{MISBEHAVING}:ReturnsNaN", max_examples=3, oracles=["finite-differences"],
                     dtypes=["float64"])
    bad = result.failures
    assert bad and all(Path(r.case_file).is_file() for r in bad)
    folder = str(Path(bad[0].case_file).parent)
    assert any(folder in note for note in result.notes)
    assert all(shlex.split(r.replay)[:2] == ["lstm-harness", "replay"] for r in bad)


def test_an_adapted_object_replays_with_the_options_that_adapt_it(tmp_path, capsys):
    from harness import adapt
    from harness.api import certify
    from tests.plugins import foreign

    settings = dict(max_examples=3, oracles=["finite-differences"], dtypes=["float64"])
    result = certify(adapt(foreign.ifog_tanh_bug, gate_order="ifog"), report_dir=tmp_path / "a", **settings)
    (bad, *_) = result.failures
    assert bad.direction == "backward"  # read in its own gate order, its forward matches
    assert bad.replay == (f"lstm-harness replay {shlex.quote(bad.case_file)} tests.plugins.foreign:ifog_tanh_bug "
                          f"--gate-order ifog --in-process --oracle finite-differences")  # objects run here
    # The command as printed replays the same failure: without --gate-order the forward would fail first.
    assert main(shlex.split(bad.replay)[1:]) == 1
    out = capsys.readouterr().out
    assert "Reproduced: the case still fails." in out and "backward" in out and "forward: y" not in out

    # An object no TARGET loads: the placeholder, and the options all the same.
    local = foreign.ForeignLSTM(order="ifog", bug="tanh_derivative", name="local")
    (bad, *_) = certify(adapt(local, gate_order="ifog"), report_dir=tmp_path / "b", **settings).failures
    assert bad.replay == (f"save the object you gave harness.adapt in a module to replay: lstm-harness replay "
                          f"{shlex.quote(bad.case_file)} MODULE:ATTRIBUTE --gate-order ifog --in-process "
                          f"--oracle finite-differences")

    # Functions have no command-line form: the adapter itself is what must be saved.
    wrong = foreign.ForeignLSTM(bug="output_tanh")
    functions = adapt(forward_fn=lambda x, h0, c0, W, R, b: wrong.forward(x, h0, c0, {"W": W, "R": R, "b": b}),
                      name="functions")
    (bad, *_) = certify(functions, report_dir=tmp_path / "c", **settings).failures
    assert bad.replay.startswith("save your implementation in a module to replay: lstm-harness replay ")
    assert "MODULE:ATTRIBUTE --oracle" in bad.replay


def test_an_object_no_target_loads_says_how_to_replay(tmp_path):
    from harness.api import certify, replay
    from impls.loop import LoopLSTM

    class LocalNaN(LoopLSTM):  # defined in a function: no TARGET string can load it
        name = "local-nan"

        def forward(self, x, h0, c0, params):
            y, h, c, cache = super().forward(x, h0, c0, params)
            return y * np.nan, h, c, cache

    result = certify(LocalNaN(), max_examples=2, oracles=["finite-differences"], dtypes=["float64"],
                     report_dir=tmp_path)
    bad = result.failures
    assert bad and all(r.replay.startswith("save your implementation in a module to replay: lstm-harness replay ")
                       for r in bad)
    assert "MODULE:ATTRIBUTE" in bad[0].replay
    again = replay(bad[0].case_file, LocalNaN(), oracles=["finite-differences"])
    assert not again.ok and again.records[0].case.get("spec") == bad[0].case.get("spec") is not None


def _walk(parser, path="lstm-harness"):
    """Every (parser path, parser) below and including ``parser``."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_command_option_and_positional_has_help():
    import argparse

    from harness.cli import build_parser

    missing = []
    for path, parser in _walk(build_parser()):
        if path != "lstm-harness" and not parser.description:
            missing.append(f"{path}: no description")
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.metavar or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                missing += [f"{path} {name}: no help line" for name in action.choices if name not in helped]
    assert not missing, missing


@pytest.fixture
def user_packages(tmp_path, monkeypatch):
    """Two entry points another package registers: one loads, one names a module that is not there."""
    (tmp_path / "user_lstm_pkg.py").write_text(
        "from impls.loop import LoopLSTM\n\n\nclass UserLSTM(LoopLSTM):\n    name = 'user-lstm'\n"
        "    dtypes = ('float64',)\n")
    dist = tmp_path / "user_lstm_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-lstm-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lstm_harness.implementations]\nuser-lstm = user_lstm_pkg:UserLSTM\n"
                                           "broken-lstm = no_such_module_xyz:LSTM\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_list_shows_entry_point_implementations_loaded_or_why_not(user_packages, capsys):
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["implementations"]}
    assert rows["loop"]["source"] == "built-in" and rows["loop"]["variant"] == "vanilla"
    user = rows["user-lstm"]
    assert user["source"] == "entry point" and user["available"] is True
    assert user["variant"] == "vanilla" and user["dtypes"] == ["float64"] and user["backward"] is True
    broken = rows["broken-lstm"]
    assert broken["available"] is False and "no_such_module_xyz" in broken["reason"]
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    user_line = next(line for line in lines if line.split()[:1] == ["user-lstm"])
    assert "available" in user_line and "vanilla" in user_line and "float64" in user_line
    broken_line = next(line for line in lines if line.split()[:1] == ["broken-lstm"])
    assert "unavailable" in broken_line and "no_such_module_xyz" in broken_line


def test_run_impl_takes_any_target(user_packages, tmp_path, capsys):
    code = main(["run", "--impl", "user-lstm", "--impl", f"{MISBEHAVING}:Correct", *FD, "--dtype", "float64",
                 "--max-examples", "2", "--report-dir", str(tmp_path / "report")])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [i["target"] for i in report["implementations"]] == ["user-lstm", f"{MISBEHAVING}:Correct"]
    assert {r["implementation"] for r in report["records"]} == {"user-lstm", "correct"}


def test_run_impl_that_cannot_be_loaded_is_a_usage_error(capsys):
    assert main(["run", "--impl", "no_such_module_xyz:LSTM", *FD]) == 2
    assert "--impl: cannot import module 'no_such_module_xyz'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Convention options read a Python TARGET as harness.adapt would (in the worker that runs it)

FOREIGN = Path(__file__).parent / "plugins" / "foreign.py"
_CELL = ["--step", "--gate-order", "ifog", "--transposed", "--names", "W=Wx,R=Wh"]


@pytest.mark.parametrize("attribute, options", [
    ("ifog", ["--gate-order", "ifog"]),
    ("batch_major", ["--layout", "BTD"]),
    ("transposed", ["--transposed"]),
    ("course_cell", _CELL),
])
def test_convention_options_certify_a_python_target(attribute, options, tmp_path, capsys):
    target = f"{FOREIGN}:{attribute}"
    common = ["--max-examples", "4", *FD, "--report-dir"]
    assert main(["certify", target, *options, *common, str(tmp_path / "a")]) == 0
    assert "Verdict: certified" in capsys.readouterr().out
    if attribute != "course_cell":  # as it is (a cell cannot even be called as a sequence)
        assert main(["certify", target, "--dtype", "float64", *common, str(tmp_path / "b")]) == 1


def test_a_planted_bug_in_a_cell_is_caught_and_replays_with_its_options(tmp_path, capsys):
    target = f"{FOREIGN}:course_cell_planted"
    assert main(["certify", target, *_CELL, "--in-process", "--dtype", "float64", "--max-examples", "5", *FD,
                 "--report-dir", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    failing = [r for r in report["records"] if r["status"] == "fail"]
    assert failing and {r["direction"] for r in failing} == {"backward"}
    replay = shlex.split(failing[0]["replay"])
    assert replay[3:5] == [target, "--gate-order"] and "--step" in replay
    capsys.readouterr()
    assert main(replay[1:]) == 1
    assert "Reproduced: the case still fails." in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--layout", "TB"], "--layout: expected the axes of a sequence"),
    (["--gate-order", "ifgx"], "--gate-order: expected a permutation"),
    (["--per-gate", "hx", "--gate-order", "ifog"], "--per-gate: each gate's weights are named"),
    (["--forget-bias", "nan"], "--forget-bias: expected a finite float"),
    (["--names", "W"], "--names: expected OURS=THEIRS pairs"),
])
def test_convention_options_usage_errors_exit_2(args, message, capsys, tmp_path):
    assert main(["certify", f"{FOREIGN}:ifog", *args, "--report-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["certify", "run"])
@pytest.mark.parametrize("junit, message", [
    ("r/report.json", "is where the report in"),
    ("r", "is where the report in"),
    ("r/cases/junit.xml", "is where the report in"),
    (".", "is a directory above the report directory"),
])
def test_a_junit_path_among_the_reports_own_files_is_refused_before_any_work(command, junit, message, tmp_path,
                                                                              capsys, monkeypatch):
    """Written last, it would have replaced report.json, or failed once the run was done."""
    monkeypatch.chdir(tmp_path)
    target = ["loop"] if command == "certify" else ["--impl", "loop"]
    assert main([command, *target, *FD, "--max-examples", "2", "--report-dir", "r", "--junit-xml", junit]) == 2
    assert f"--junit-xml: '{tmp_path / junit if junit != '.' else tmp_path}' {message}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # left as it was found


def test_a_merged_reports_default_junit_path_is_named_by_the_option_given(tmp_path, capsys):
    """``report A.json -o FILE``: the JUnit XML goes to FILE/junit.xml by default, so FILE is what is wrong."""
    assert main(["certify", "loop", *FD, "--max-examples", "1", "--dtype", "float64", "--report-dir",
                 str(tmp_path / "a")]) == 0
    (tmp_path / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a" / "report.json"), "-o", str(tmp_path / "notes.txt")]) == 2
    assert f"-o: expected a directory, got '{tmp_path / 'notes.txt'}', which is a file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_run_keeps_the_built_ins_in_process_and_isolates_a_users_target():
    """The main job's speed: the built-ins (selected by name, run by their TARGET) stay in process."""
    import argparse

    from harness.cli import _run_selection

    chosen = _run_selection(argparse.Namespace(impl=["loop", f"{MISBEHAVING}:Correct"], dtype=None))
    assert chosen == {"impls.loop:LoopLSTM": False, f"{MISBEHAVING}:Correct": True}
