"""The harness's processes end without the interpreter's teardown, and lose nothing by it: exit status,
buffered output and exit handlers are as a normal exit has them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# A script whose global object says, from its __del__, whether the interpreter tore the modules down.
SCRIPT = """
import atexit, sys
from harness.quick_exit import run_then_exit

class Torn:
    def __del__(self):
        sys.stderr.write("torn down\\n")

torn = Torn()

def run():
    atexit.register(lambda: print("handler registered in run", flush=True))
    sys.stdout.write("buffered, no newline")
    {body}

{call}
"""


def _script(body: str, call: str = "run_then_exit(run)") -> subprocess.CompletedProcess:
    code = SCRIPT.format(body=body, call=call)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


@pytest.mark.parametrize("body, status", [("return 0", 0), ("return 3", 3), ("return None", 0),
                                          ("sys.exit(4)", 4), ("return 256 + 5", 5)])
def test_the_status_is_run_s_and_output_and_handlers_are_kept(body, status):
    proc = _script(body)
    assert proc.returncode == status
    assert proc.stdout == "buffered, no newlinehandler registered in run\n"
    assert "torn down" not in proc.stderr  # the teardown was skipped


def test_a_normal_exit_of_the_same_script_does_tear_down():
    # The control: without run_then_exit the object's __del__ does run at exit, so its absence above means
    # the teardown was skipped.
    proc = _script("return 0", call="sys.exit(run())")
    assert proc.returncode == 0
    assert "torn down" in proc.stderr


def test_an_exception_gets_the_usual_exit():
    proc = _script("raise RuntimeError('planted')")
    assert proc.returncode == 1
    assert "RuntimeError: planted" in proc.stderr
    assert proc.stdout == "buffered, no newlinehandler registered in run\n"


def test_a_message_given_to_sys_exit_is_printed_with_status_1():
    proc = _script("sys.exit('a message')")
    assert proc.returncode == 1
    assert "a message" in proc.stderr


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_the_command_whose_reader_went_away_exits_141_without_a_traceback(unbuffered):
    # Buffered (the default for a pipe), the closed pipe shows at the last flush; unbuffered, at the first print.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen([sys.executable, "-m", "harness", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    proc.stdout.close()  # before the command has printed anything: its first write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert b"Traceback" not in err and b"BrokenPipe" not in err
