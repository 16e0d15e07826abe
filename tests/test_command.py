"""The command protocol: a C++ LSTM (examples/tmva_lstm) and a NumPy script certified as programs,
from the command line, from Python and from pytest; a planted backward bug caught; a program that
fails, writes the wrong shape, writes garbage or writes nothing gives error and contract records."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import harness
from harness.api import certify
from harness.cases import CaseSpec, build_case
from harness.cli import main
from harness.command_protocol import STDERR_LIMIT, CommandError, CommandLSTM, command
from harness.contract import ContractError

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tmva_lstm"
SCRIPT = Path(__file__).parent / "commands" / "numpy_lstm.py"
FD = ["--oracle", "finite-differences"]
_ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # the harness of this checkout, from any directory


@pytest.fixture(scope="module")
def tmva(tmp_path_factory):
    """The example built twice with the system compiler: correct, and with the planted bug."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler: g++ is not on PATH, so the C++ example cannot be built")
    out = tmp_path_factory.mktemp("tmva")
    built = {}
    for name, flags in (("tmva_lstm", []), ("tmva_lstm_planted", ["-DPLANTED_BUG_FORGET_DERIVATIVE"])):
        built[name] = out / name
        subprocess.run([compiler, "-O2", "-std=c++17", *flags, "-o", str(built[name]), str(EXAMPLE / "main.cpp")],
                       check=True, capture_output=True, timeout=300)
    return built


def _script() -> list[str]:
    return [sys.executable, str(SCRIPT)]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", "certify", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=_ENV)


# --------------------------------------------------------------------------------------------------
# The C++ example


def test_cpp_example_certifies_through_the_command_line(tmva, tmp_path):
    proc = _cli("--command", str(tmva["tmva_lstm"]), "--per-gate", "separate", "--max-examples", "6", *FD,
                "--report-dir", str(tmp_path / "report"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Verdict: certified" in proc.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    records = report["records"]
    assert {r["dtype"] for r in records} == {"float64", "float32"}
    assert {r["quantity"] for r in records} >= {"y", "c_T", "dx", "dW", "dR", "db", "dc0"}
    assert all(r["status"] == "pass" for r in records)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpp_example_certifies_from_python(tmva, dtype):
    impl = command(str(tmva["tmva_lstm"]), per_gate="separate")
    result = certify(impl, dtypes=[dtype], max_examples=10, oracles=["finite-differences"], profile="ci")
    assert result.verdict == "certified", result.details()
    assert {r.direction for r in result.records} == {"forward", "backward"}


def test_the_planted_forget_derivative_bug_is_caught_in_the_backward(tmva, tmp_path):
    proc = _cli("--command", str(tmva["tmva_lstm_planted"]), "--per-gate", "separate", "--max-examples", "10",
                "--dtype", "float64", *FD, "--report-dir", str(tmp_path / "report"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Verdict: discrepancies" in proc.stdout
    records = json.loads((tmp_path / "report" / "report.json").read_text())["records"]
    failing = [r for r in records if r["status"] == "fail"]
    assert failing and {r["direction"] for r in failing} == {"backward"}
    assert {"dW", "db"} <= {r["quantity"] for r in failing}
    assert all(r["status"] == "pass" for r in records if r["direction"] == "forward")
    (finding,) = json.loads((tmp_path / "report" / "report.json").read_text())["findings"]
    assert finding["gates"] == ["f"] and "at gate f" in proc.stdout  # the forget gate's blocks depart
    # Each failure names the command that replays it, and that command reproduces it.
    line = next(x.strip() for x in proc.stdout.splitlines() if x.strip().startswith("Replay: "))
    assert f"--command {tmva['tmva_lstm_planted']} --per-gate separate" in line
    replay = subprocess.run([sys.executable, "-m", "harness", *shlex.split(line.removeprefix("Replay: lstm-harness "))],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_ENV)
    assert replay.returncode == 1 and "Reproduced: the case still fails." in replay.stdout, replay.stderr


def test_read_in_the_wrong_layout_the_example_is_not_certified(tmva):
    # Without --per-gate it is handed W.npy, R.npy, b.npy and finds no W_i.npy: an error with its stderr.
    result = certify(command(str(tmva["tmva_lstm"])), dtypes=["float64"], max_examples=2,
                     oracles=["finite-differences"])
    assert result.verdict == "error"
    reason = next(r.reason for r in result.records if r.status == "error")
    assert "exited with status 1" in reason and "cannot open" in reason and "W_i.npy" in reason


# --------------------------------------------------------------------------------------------------
# A Python script as the command


def test_the_readme_program_certifies_forward_only(tmp_path):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Any language: the command protocol"):]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "request.json" in b]
    program = tmp_path / "my_lstm.py"
    program.write_text(blocks[0], encoding="utf-8")
    result = certify(harness.command([sys.executable, str(program)], backward=False), max_examples=4,
                     oracles=["finite-differences"])
    assert result.verdict == "certified", result.details()
    assert {r.dtype for r in result.records if r.status == "pass"} == {"float64", "float32"}


@pytest.mark.parametrize("isolate", [False, True])
def test_numpy_script_certifies(isolate):
    result = certify(CommandLSTM(_script()), max_examples=5, oracles=["finite-differences"], isolate=isolate)
    assert result.verdict == "certified", result.details()
    assert result.implementation["name"] == "python numpy_lstm.py"


def test_forward_only_command_is_checked_forward_only():
    result = certify(command(_script(), backward=False), max_examples=3, oracles=["finite-differences"],
                     dtypes=["float64"])
    assert result.verdict == "certified", result.details()
    backward = [r for r in result.records if r.direction == "backward"]
    assert backward and all(r.status == "skip" for r in backward)


def _sh(script: str) -> list[str]:
    """A program written in sh: REQUEST_DIR and RESPONSE_DIR are its $1 and $2 (instant, unlike Python)."""
    return ["sh", "-c", script, "sh"]


_NOISY_EXIT = _sh('echo "numpy_lstm: refusing on purpose" >&2; head -c 12000 /dev/zero | tr "\\0" n >&2; exit 3')
_NOTHING = ["true"]
_GARBAGE = _sh('for f in y h_T c_T; do echo "not an array" > "$2/$f.npy"; done')


def _wrong_shapes(folder: Path) -> list[str]:
    for name, shape in (("y", (1, 1, 1000)), ("h_T", (1, 1000)), ("c_T", (1, 1000))):
        np.save(folder / f"{name}.npy", np.zeros(shape))
    return _sh(f"cp {shlex.quote(str(folder))}/*.npy \"$2\"/")


@pytest.mark.parametrize("misbehave, status, words", [
    ("exit", "error", ["exited with status 3", "refusing on purpose", "characters left out"]),
    ("nothing", "contract", ["wrote no y.npy into RESPONSE_DIR", "it wrote: nothing"]),
    ("wrong-shape", "contract", ["y: expected shape", "got (1, 1, 1000)"]),
    ("garbage", "contract", ["y.npy is not a readable .npy file"]),
])
def test_a_misbehaving_command_gives_records_not_a_crash(misbehave, status, words, tmp_path):
    argv = {"exit": _NOISY_EXIT, "nothing": _NOTHING, "garbage": _GARBAGE}.get(misbehave) or _wrong_shapes(tmp_path)
    result = certify(CommandLSTM(argv), dtypes=["float64"], max_examples=2, oracles=["finite-differences"],
                     isolate=True, timeout=120)
    assert result.verdict == "error"
    forward = [r for r in result.records if r.direction == "forward"]
    assert forward and {r.status for r in forward} == {status}
    reason = forward[0].reason
    for w in words:
        assert w in reason, reason
    if misbehave == "exit":  # 12 KB of stderr, bounded
        assert len(reason) < STDERR_LIMIT + 1000


def test_the_request_and_the_files_handed_over(tmp_path, monkeypatch):
    """request.json says what is asked; every input, parameter and upstream gradient is a .npy file in
    the request's dtype; both directories are removed after the call."""
    log = tmp_path / "seen.jsonl"
    spy = tmp_path / "spy.py"
    spy.write_text(
        "import json, sys, pathlib, numpy as np\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "import numpy_lstm\n"
        "req = pathlib.Path(sys.argv[-2])\n"
        "files = {p.name: str(np.load(p).dtype) for p in req.glob('*.npy')}\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps({'request': json.loads((req / 'request.json').read_text()), 'files': files,\n"
        "                         'dirs': sys.argv[-2:]}) + '\\n')\n"
        "sys.exit(numpy_lstm.main(sys.argv[1:]))\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    case = build_case(CaseSpec(variant="vanilla", dtype="float32", T=2, B=1, D=3, H=2, seed=1))
    impl = CommandLSTM([sys.executable, str(spy)], ln_eps=1e-3)
    y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
    assert y.shape == (2, 1, 2) and y.dtype == np.float32
    grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    assert set(grads) == {"x", "h0", "c0", "W", "R", "b"} and grads["W"].shape == (8, 3)
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["request"] == {"variant": "vanilla", "dtype": "float32", "gradients": False, "ln_eps": 1e-3,
                                "structure": {"num_layers": 1, "bidirectional": False, "proj_size": 0,
                                              "coupled_input_forget": False, "cell_clip": None, "lengths": False}}
    assert first["files"] == {f"{k}.npy": "float32" for k in ("x", "h0", "c0", "W", "R", "b")}
    assert second["request"]["gradients"] is True
    assert set(second["files"]) == set(first["files"]) | {"dy.npy", "dh_T.npy", "dc_T.npy"}
    assert all(Path(d).parent.parent == scratch for d in first["dirs"])
    assert list(scratch.iterdir()) == []  # every temporary directory removed


def test_errors_are_raised_as_the_contract_says():
    case = build_case(CaseSpec(variant="vanilla", dtype="float64", T=1, B=1, D=1, H=1, seed=0))
    with pytest.raises(CommandError, match="exited with status 3"):
        CommandLSTM(_NOISY_EXIT).forward(case.x, case.h0, case.c0, case.params)
    with pytest.raises(ContractError, match="wrote no y.npy"):
        CommandLSTM(_NOTHING).forward(case.x, case.h0, case.c0, case.params)
    folder = [sys.executable, "-c", "import os, sys; os.mkdir(os.path.join(sys.argv[-1], 'y.npy'))"]
    with pytest.raises(ContractError, match=r"y.npy in RESPONSE_DIR is a directory, not an array file\n  - the "
                                            r"command wrote no h_T.npy"):
        CommandLSTM(folder).forward(case.x, case.h0, case.c0, case.params)


def test_objects_pickle_for_the_worker_and_carry_their_replay_arguments():
    impl = command(_script(), per_gate="hx", names={"W_i": "Wi"}, variant="peephole")
    again = pickle.loads(pickle.dumps(impl))
    assert again.variant == "peephole" and again.convention.per_gate == "hx"
    assert again.replay_arguments.endswith("--variant peephole --per-gate hx --names W_i=Wi")
    # One shell word for the whole command line, each of its own words quoted (a path may hold a space).
    assert again.replay_arguments.startswith(f"--command {shlex.quote(shlex.join(_script()))}")


@pytest.mark.parametrize("kwargs, message", [
    ({"cmd": ""}, "command: expected a command line"),
    ({"cmd": "./no-such-program-here"}, "command: './no-such-program-here' is not an executable file"),
    ({"cmd": "no-such-program-here"}, "command: 'no-such-program-here' is not found on PATH"),
    ({"cmd": "true", "variant": "gru"}, "variant: expected one of"),
    ({"cmd": "true", "call": None}, "call: not a convention keyword"),
])
def test_bad_arguments_say_what_to_pass(kwargs, message):
    with pytest.raises(ValueError, match=message):
        command(**kwargs)


@pytest.mark.parametrize("argv, message", [
    (["certify", "loop", "--command", "true"], "expected TARGET or --command, not both"),
    (["certify"], "expected TARGET or --command"),
    (["certify", "loop", "--forward-only"], "--forward-only: applies to --command"),
    (["certify", "--command", "true", "--step"], "--step: applies to a Python TARGET"),
    (["certify", "--command", "true", "--layout", "TBX"], "--layout: expected the axes of a sequence"),
    (["certify", "--command", "true", "--gate-order", "ifgx"], "--gate-order: expected a permutation"),
    (["certify", "--command", "true", "--per-gate", "hx", "--bias", "folded"], "--per-gate: has one bias per gate"),
    (["certify", "--command", "true", "--bias", "folded", "--column-bias"], "--column-bias: a bias folded"),
    (["certify", "--command", "true", "--batch-major", "--layout", "DBT"], "--batch-major: True is layout='BTD'"),
    (["run", "--impl", "loop", "--layout", "BTD"], "--layout: in run, applies to the --command program"),
    (["certify", "--command", "no-such-program-here"], "--command: 'no-such-program-here' is not found on PATH"),
    (["certify", "--command", "true", "--names", "W"], "--names: expected OURS=THEIRS pairs"),
])
def test_command_line_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_pytest_plugin_certifies_a_command(pytester):
    result = pytester.runpytest("--lstm-command", shlex.join(_script()), "--lstm-max-examples", "2",
                                "--lstm-oracle", "finite-differences", "-v", "-p", "no:randomly",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)  # one test per unit: float64 and float32
    result.stdout.fnmatch_lines(["*lstm-certify?command*numpy_lstm.py?::float64-vs-finite-differences PASSED*"])
    failing = pytester.runpytest("--lstm-command", "true",
                                 "--lstm-max-examples", "2", "--lstm-oracle", "finite-differences",
                                 "-p", "no:randomly", "-p", "no:cacheprovider")
    failing.assert_outcomes(failed=2)
    failing.stdout.fnmatch_lines(["*wrote no y.npy*"])


def test_a_crash_names_the_signal():
    case = build_case(CaseSpec(variant="vanilla", dtype="float64", T=1, B=1, D=1, H=1, seed=0))
    with pytest.raises(CommandError, match=r"was killed by SIGSEGV \(signal 11\); stderr was empty"):
        CommandLSTM(_sh("kill -SEGV $$")).forward(case.x, case.h0, case.c0, case.params)


@pytest.mark.parametrize("flags, options", [
    (["--feature-first"], ["--layout", "DBT"]),
    (["--no-h0"], ["--no-initial-hidden"]),
    (["--feature-first", "--no-h0"], ["--layout", "dbt", "--no-initial-hidden"]),
])
def test_layout_and_initial_state_options_certify_a_command_and_without_them_it_fails(flags, options, tmp_path,
                                                                                       capsys):
    cmd = shlex.join([*_script(), *flags])
    common = [*FD, "--max-examples", "4", "--dtype", "float64", "--in-process"]
    assert main(["certify", "--command", cmd, *options, *common, "--report-dir", str(tmp_path / "a")]) == 0
    assert "Verdict: certified" in capsys.readouterr().out
    # Without them it is not certified: checked by the search alone (a failing certify also runs the convention
    # search, a process per trial for a program, which a test need not wait for).
    from harness.contract import validate
    from harness.runner import RunSettings, run_checks
    from harness.subject import InProcessSubject
    from oracles.finite_diff import FiniteDifferenceOracle

    plain = command(cmd)
    records = run_checks(InProcessSubject(plain, validate(plain)), [FiniteDifferenceOracle()], dtype="float64",
                         run=RunSettings(max_examples=4, case_dir=tmp_path / "cases"))
    assert any(r.status in ("fail", "error", "contract") for r in records)
    if flags == ["--no-h0"]:  # it runs, and ignores the h0 it is given: y departs
        assert "y" in {r.quantity for r in records if r.status == "fail"}


def test_run_checks_a_command_with_its_convention(tmp_path, capsys):
    cmd = shlex.join([*_script(), "--feature-first"])
    assert main(["run", "--command", cmd, "--layout", "DBT", *FD, "--max-examples", "3", "--dtype", "float64",
                 "--report-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [i["target"] for i in report["implementations"]] == [f"--command {shlex.quote(cmd)} --layout DBT"]
    assert main(["run", "--command", cmd, *FD, "--max-examples", "3", "--dtype", "float64", "--force",
                 "--report-dir", str(tmp_path)]) == 1


def test_a_program_that_prints_without_end_costs_the_harness_only_the_end_of_it(monkeypatch):
    """Its output is read as it comes and only the end kept: 50 MB on stdout is not held in memory (held
    whole, a gigabyte raised MemoryError under the worker's memory cap), and the message ends with its end."""
    import harness.command_protocol as protocol

    kept: list[int] = []
    real = protocol._run

    def run(argv):
        returncode, stdout, stderr = real(argv)
        kept.append(len(stdout))
        return returncode, stdout, stderr

    monkeypatch.setattr(protocol, "_run", run)
    loud = [sys.executable, "-c", "import sys; [sys.stdout.write('x' * 1000 + '\\n') for _ in range(50_000)]; "
                                  "print('the last line'); sys.exit(3)"]
    case = build_case(CaseSpec(variant="vanilla", dtype="float64", T=1, B=1, D=1, H=1, seed=0))
    with pytest.raises(CommandError, match=r"exited with status 3; stderr was empty; stdout:\n(.|\n)*the last line"):
        CommandLSTM(loud).forward(case.x, case.h0, case.c0, case.params)
    assert kept == [protocol.OUTPUT_TAIL]


def test_a_stopped_call_stops_the_program_too(monkeypatch):
    """Ctrl-C or SIGTERM while a program runs (in process): the program is killed, not waited for."""
    import time

    import harness.command_protocol as protocol

    real_wait = subprocess.Popen.wait
    waits: list[int] = []

    def wait(self, timeout=None):
        waits.append(1)
        if len(waits) == 1:
            raise KeyboardInterrupt  # what the harness's SIGTERM handler raises too (harness.api.Interrupted)
        return real_wait(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        protocol._run([sys.executable, "-c", "import time; time.sleep(60)"])
    assert time.monotonic() - start < 20
