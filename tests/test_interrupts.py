"""A real command-line process under signals, hostile in-process implementations and bad options: nothing
finished is lost, the exit code tells the truth, and bad input is refused before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main

PLUGINS = Path(__file__).parent / "plugins"
ROOT = Path(__file__).parent.parent
FD = ["--oracle", "finite-differences"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_the_partial_report_and_exits_with_its_code(sig, code, tmp_path):
    report = tmp_path / "report"
    # The child starts as a foreground command does, with SIGINT at its default: a test run started in the
    # background (`cmd &`, nohup) inherits SIGINT ignored, and a command that ignores it rightly keeps on.
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "certify", f"{PLUGINS / 'hostile.py'}:SlowInFloat32", "--in-process",
         "--max-examples", "8", *FD, "--report-dir", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Wait until the float64 unit has finished (its line on stderr), then signal during float32.
    deadline = time.monotonic() + 240
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "float64" in line and "cases in" in line:
            break
        if proc.poll() is not None:
            break
    assert "float64" in seen, seen
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err)
    data = json.loads((report / "report.json").read_text())
    assert data["interrupted"] is True and data["verdict"] == "error"
    assert {r["dtype"] for r in data["records"]} == {"float64"}  # the finished unit, nothing invented
    assert all(r["status"] == "pass" for r in data["records"] if r["status"] != "skip")
    assert "INTERRUPTED by" in out and f"interrupted by {signal.Signals(sig).name}" in err


def test_os_exit_zero_in_process_is_an_error_not_a_silent_pass(tmp_path, capsys):
    code = main(["certify", f"{PLUGINS / 'hostile.py'}:ExitsZeroOnThirdCall", "--in-process", "--max-examples",
                 "3", *FD, "--dtype", "float64", "--report-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "called os._exit(0), which would have ended the whole run" in out


def test_sys_exit_at_import_is_a_load_error(capsys, tmp_path):
    code = main(["certify", f"{PLUGINS / 'exits_at_import.py'}:X", "--in-process", "--report-dir", str(tmp_path)])
    assert code == 2
    assert "SystemExit" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--timeout", "inf"], "--timeout: expected a positive, finite number"),
    (["--timeout", "nan"], "--timeout: expected a positive, finite number"),
    (["--timeout", "1e9"], "--timeout: expected at most 604800 seconds"),
    (["--memory-limit", "inf"], "--memory-limit: expected a positive, finite number"),
    (["--junit-xml", "/dev/full"], "--junit-xml: expected a path to a file"),
    (["--report-dir", "/proc/no-such/dir"], "--report-dir: cannot write into"),
    (FD, "--oracle: expected each oracle once (they are told apart by name), got 'finite-differences' more"),
])
def test_bad_output_and_limit_options_exit_2_before_any_work(args, message, tmp_path, capsys):
    argv = ["certify", "impls.loop:LoopLSTM", "--max-examples", "2", *FD, *args]
    if "--report-dir" not in args:
        argv += ["--report-dir", str(tmp_path / "r")]
    if "--junit-xml" in args or "--report-dir" in args:
        argv.append("--in-process")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "r" / "report.json").exists()


def test_a_users_directory_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "index.html").write_text("mine")
    code = main(["certify", "impls.loop:LoopLSTM", "--in-process", "--max-examples", "2", *FD,
                 "--report-dir", str(tmp_path)])
    assert code == 2 and "pass --force" in capsys.readouterr().err
    assert (tmp_path / "index.html").read_text() == "mine"
    assert main(["certify", "impls.loop:LoopLSTM", "--in-process", "--max-examples", "2", *FD, "--dtype",
                 "float64", "--report-dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "report.json").is_file()


def test_an_implementation_that_changes_directory_cannot_move_the_report(tmp_path, monkeypatch, capsys):
    import harness.api

    monkeypatch.chdir(tmp_path)
    real = harness.api.run_unit

    def wandering(*args, **kwargs):
        os.chdir("/")
        return real(*args, **kwargs)

    monkeypatch.setattr(harness.api, "run_unit", wandering)
    assert main(["certify", "impls.loop:LoopLSTM", "--in-process", "--max-examples", "2", *FD, "--dtype",
                 "float64"]) == 0
    assert (tmp_path / "lstm-report" / "report.json").is_file()


def test_an_implementations_own_base_exception_in_process_is_its_error_not_the_harnesss(tmp_path, capsys):
    """Only KeyboardInterrupt (a person, or SIGTERM) stops a run; any other BaseException the implementation
    raises is an error of its call, reported, with the forward still compared."""
    code = main(["certify", f"{PLUGINS / 'hostile.py'}:RaisesItsOwnBaseException", "--in-process", "--max-examples",
                 "2", "--oracle", "finite-differences", "--dtype", "float64", "--report-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "backward raised Abort: gave up" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {r["status"] for r in report["records"] if r["direction"] == "forward"} == {"pass"}
