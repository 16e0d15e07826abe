"""The worker process: same Execution as in process; hangs, crashes, exits and memory exhaustion
become error Executions with a clear reason; the worker is kept between cases and restarted after
it died."""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.api import certify
from harness.cases import CaseSpec, build_case
from harness.contract import validate
from harness.isolation import IsolatedSubject, WorkerFailure, WorkerLoadError, describe_exit
from harness.subject import Execution, execute
from impls.loop import LoopLSTM

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the worker process is started with POSIX fd passing")

MISBEHAVING = Path(__file__).parent / "plugins" / "misbehaving.py"
SHORT = build_case(CaseSpec(T=3, B=2, D=4, H=3, seed=5))
LONG = build_case(CaseSpec(T=7, B=2, D=4, H=3, seed=6))


def subject(name: str, **kwargs) -> IsolatedSubject:
    return IsolatedSubject(f"{MISBEHAVING}:{name}", **kwargs)


def test_same_execution_as_in_process():
    impl = LoopLSTM()
    here = execute(impl, validate(impl), SHORT, backward=True)
    with IsolatedSubject("impls.loop:LoopLSTM") as s:
        there = s.execute(SHORT, backward=True)
        again = s.execute(SHORT, backward=True)
        pid = s._proc.popen.pid
        assert s._proc.popen.pid == pid and s.restarts == 0  # one worker for both cases
    for a, b in zip(here.forward, there.forward):
        assert np.array_equal(a, b)
    assert set(here.gradients) == set(there.gradients)
    for k in here.gradients:
        assert np.array_equal(here.gradients[k], there.gradients[k])
        assert np.array_equal(again.gradients[k], there.gradients[k])


def test_an_object_can_be_isolated_too():
    with IsolatedSubject(LoopLSTM()) as s:
        assert s.info.name == "loop"
        assert s.execute(SHORT, backward=False).forward is not None


def test_exception_keeps_the_implementations_frames_only():
    with subject("Raises") as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.forward_error == "forward raised ValueError: cannot handle an input of shape (3, 2, 4)"
    assert "_deep_helper" in ex.traceback and "misbehaving.py" in ex.traceback
    assert "harness/subject.py" not in ex.traceback and "harness/isolation.py" not in ex.traceback


def test_segfault_is_reported_and_the_worker_restarted():
    with subject("CrashesOnLongSequences") as s:
        assert s.execute(SHORT, backward=True).forward_error is None
        crashed = s.execute(LONG, backward=True)
        assert isinstance(crashed, WorkerFailure) and crashed.failure == "crash"
        assert "the worker process running forward died: killed by SIGSEGV" in crashed.forward_error
        assert "misbehaving.py" in crashed.traceback  # faulthandler's stack of the worker
        after = s.execute(SHORT, backward=True)
        assert after.forward_error is None and after.gradients is not None
        assert s.restarts == 1


def test_crash_in_backward_keeps_the_forward_outputs():
    with subject("SegfaultsInBackward") as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.forward_error is None and ex.forward is not None
    assert "running backward died" in ex.backward_error


def test_hang_is_stopped_by_the_timeout_and_the_worker_restarted():
    with subject("HangsOnLongSequences", timeout=0.5) as s:
        hung = s.execute(LONG, backward=True)
        assert isinstance(hung, WorkerFailure) and hung.failure == "timeout"
        assert hung.forward_error.startswith("forward did not return within 0.5 s")
        assert s.execute(SHORT, backward=True).forward_error is None


def test_hang_in_backward_is_blamed_on_backward():
    with subject("HangsInBackward", timeout=0.5) as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.forward is not None and ex.forward_error is None
    assert ex.backward_error.startswith("backward did not return within 0.5 s")


def test_os_exit_and_sys_exit():
    with subject("Exits") as s:
        ex = s.execute(SHORT, backward=True)
    assert "it exited with status 3" in ex.forward_error and "os._exit(3)" in ex.forward_error
    assert "address space" not in ex.forward_error
    with subject("Exits", memory_limit=2 * 1024**3) as s:  # under a cap, the cap may be why: it is said
        ex = s.execute(SHORT, backward=True)
    assert ex.forward_error.endswith("(its address space was limited to 2 GiB beyond what loading the implementation "
                                     "took, --memory-limit: native code that cannot allocate may end the process so)")
    with subject("CallsSysExit") as s:
        ex = s.execute(SHORT, backward=True)
        assert ex.forward_error == "forward called sys.exit('giving up')"
        assert s.execute(SHORT, backward=True).forward_error is not None and s.restarts == 0


def test_memory_exhaustion_meets_the_address_space_limit():
    with subject("ExhaustsMemory", memory_limit=1024**3) as s:
        ex = s.execute(SHORT, backward=True)
    assert "MemoryError" in ex.forward_error
    assert "may reserve 1.0 GiB beyond what loading it took" in ex.forward_error


def test_load_errors_come_back_as_worker_load_errors():
    with pytest.raises(WorkerLoadError) as exc:
        subject("NoForward")
    assert exc.value.kind == "contract" and "forward: missing" in str(exc.value)
    with pytest.raises(WorkerLoadError) as exc:
        subject("NoSuchThing")
    assert exc.value.kind == "load" and "has no attribute 'NoSuchThing'" in str(exc.value)


def test_close_ends_the_worker():
    s = subject("Correct")
    popen = s._proc.popen
    s.close()
    assert popen.poll() is not None


def test_unpicklable_object_is_refused_with_advice():
    impl = LoopLSTM()
    impl.hook = lambda: None  # lambdas cannot be pickled
    with pytest.raises(ValueError, match="needs a TARGET string"):
        IsolatedSubject(impl)


def test_describe_exit():
    assert "SIGSEGV" in describe_exit(-11)
    assert "status 3" in describe_exit(3)


def test_an_unreadable_reply_is_a_failure_of_the_running_call(monkeypatch):
    """Whatever goes wrong while reading the worker's reply ends that call, never the harness."""
    import pickle

    with subject("Correct") as s:
        first = s._proc

        def unreadable(maxlength=None):
            raise pickle.UnpicklingError("invalid load key")

        monkeypatch.setattr(s._conn, "recv_bytes", unreadable)
        ex = s.execute(SHORT, backward=True)
        assert isinstance(ex, WorkerFailure) and ex.failure == "crash"
        assert "sent back a reply that could not be read (UnpicklingError: invalid load key)" in ex.forward_error
        assert first.popen.poll() is not None  # the worker was stopped
        monkeypatch.undo()
        again = s.execute(SHORT, backward=True)
        assert again.forward_error is None and again.gradients is not None and s.restarts == 1


def test_outputs_of_a_class_the_parent_never_imported_come_back_as_plain_arrays(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("_lstm_harness_target_")]:
        monkeypatch.delitem(sys.modules, name)  # as in a fresh process: the plugin file is not imported here
    with subject("SubclassOutputs") as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.forward_error is None and ex.backward_error is None, (ex.forward_error, ex.backward_error)
    assert all(type(a) is np.ndarray for a in ex.forward) and ex.gradients is not None


@pytest.mark.parametrize("name, reason", [
    ("ExitsInBackward", "the worker process running backward died: it exited with status 3"),
    ("InterruptsInBackward", "backward raised KeyboardInterrupt: backward interrupted itself"),
])
def test_a_backward_that_ends_badly_keeps_the_forward_outputs(name, reason):
    impl = LoopLSTM()
    expected = execute(impl, validate(impl), SHORT, backward=False).forward
    with subject(name) as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.forward_error is None and ex.forward_contract is None
    assert all(np.array_equal(a, b) for a, b in zip(ex.forward, expected))
    assert ex.backward_ran and reason in ex.backward_error


def _gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # killed but not yet reaped by its new parent: a zombie is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int) -> bool:
    import time

    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _gone(pid)


@pytest.mark.parametrize("name", ["SpawnsAndHangs", "SpawnsInItsOwnSessionAndHangs"])
def test_killing_the_worker_kills_the_processes_the_implementation_started(name, tmp_path, monkeypatch):
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("LSTM_HARNESS_TEST_PIDFILE", str(pidfile))
    with subject(name, timeout=1.0) as s:
        ex = s.execute(SHORT, backward=False)
    assert isinstance(ex, WorkerFailure) and ex.failure == "timeout"
    pid = int(pidfile.read_text())
    assert _wait_gone(pid), f"process {pid} that the implementation started is still running"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard process (a subreaper) is Linux only")
def test_closing_the_subject_kills_a_daemon_the_implementation_left_behind(tmp_path, monkeypatch):
    import os

    pidfile = tmp_path / "pid"
    monkeypatch.setenv("LSTM_HARNESS_TEST_PIDFILE", str(pidfile))
    with subject("SpawnsAndReturns") as s:
        assert s.execute(SHORT, backward=True).forward_error is None
        pid = int(pidfile.read_text())
        # The pid is written as soon as the shell forked; setsid(1) may not have run yet: give it time.
        deadline = time.monotonic() + 10
        while not _gone(pid) and os.getsid(pid) == os.getsid(s._proc.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _gone(pid) and os.getsid(pid) != os.getsid(s._proc.popen.pid)  # a session of its own
    assert _wait_gone(pid), f"process {pid} that the implementation left running outlived the subject"


def test_what_the_implementation_prints_goes_to_stderr(capfd):
    with subject("Prints") as s:
        assert s.execute(SHORT, backward=False).forward_error is None
    out, err = capfd.readouterr()
    assert "debug output of the implementation" not in out
    assert "debug output of the implementation" in err


def test_adapting_in_a_worker_that_cannot_answer_is_an_error_not_a_crash(monkeypatch):
    with subject("Correct") as s:
        def unreadable(maxlength=None):
            raise EOFError

        monkeypatch.setattr(s._conn, "recv_bytes", unreadable)
        with pytest.raises(RuntimeError, match="adapting the implementation: the worker process died"):
            s.adapted(gate_order="ifog")
        monkeypatch.undo()
        view = s.adapted(gate_order="ifog")  # a fresh worker
        assert view.execute(SHORT, backward=False).forward is not None


@pytest.mark.parametrize("timeout", [0, -1.0, True, "3", float("nan")])
def test_bad_timeouts_are_refused_before_a_worker_starts(timeout):
    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds or None"):
        IsolatedSubject("impls.loop:LoopLSTM", timeout=timeout)


def test_the_load_timeout_follows_the_per_call_timeout(monkeypatch):
    import time

    import harness.isolation

    monkeypatch.setattr(harness.isolation, "MIN_LOAD_TIMEOUT", 2.0)
    start = time.monotonic()
    with pytest.raises(WorkerLoadError, match=r"loading the implementation took longer than 3 s"):
        subject("HangsWhileLoading", timeout=3.0)
    assert time.monotonic() - start < 30  # not the old fixed 120 s
    with subject("Correct", timeout=0.1) as s:  # a short per-call timeout still leaves loading its floor
        assert s.load_timeout == 2.0
    with subject("Correct") as s:
        assert s.load_timeout is None  # no per-call limit, no load limit
    with subject("Correct", timeout=1.0, load_timeout=7.0) as s:
        assert s.load_timeout == 7.0


def test_a_bad_load_timeout_is_refused():
    with pytest.raises(ValueError, match="load_timeout: expected a positive number"):
        IsolatedSubject("impls.loop:LoopLSTM", load_timeout=0)


def test_printable_shows_control_characters_as_escapes():
    from harness.records import printable

    assert printable("\x1b[2J\x1b[H") == "\\x1b[2J\\x1b[H"  # clear screen, cursor home
    assert printable("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"  # window title
    assert printable("step 1\rVerdict") == "step 1\\x0dVerdict"
    assert printable("Verdict: \x1b[32mcertified\x1b[0m") == "Verdict: \\x1b[32mcertified\\x1b[0m"
    assert printable("\x9b2J and \u202eevil") == "\\x9b2J and \\u202eevil"  # C1 CSI, right-to-left override
    assert printable("line 1\n\tline 2 µ ü") == "line 1\n\tline 2 µ ü"  # newline, tab and text are kept


def test_what_the_implementation_prints_reaches_the_terminal_escaped(capfd):
    from tests.plugins.misbehaving import TERMINAL_TRICKS

    with subject("DrivesTheTerminal") as s:
        ex = s.execute(SHORT, backward=False)
    assert ex.forward_error == f"forward raised ValueError: {TERMINAL_TRICKS}"  # the data keeps the raw text
    out, err = capfd.readouterr()
    assert "\x1b" not in out + err and "\r" not in err and "\x07" not in err
    assert "\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07\\x0dVerdict: \\x1b[32mcertified\\x1b[0m" in err


def test_a_huge_exception_message_is_cut_in_the_worker():
    from harness.subject import MAX_TEXT

    with subject("RaisesHugeMessage") as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.forward_error.startswith("forward raised ValueError: start of the message xxx")
    assert ex.forward_error.endswith("xxx end of the message")
    assert "characters cut ...]" in ex.forward_error and len(ex.forward_error) < MAX_TEXT + 100
    assert "characters cut ...]" in ex.traceback and len(ex.traceback) < MAX_TEXT + 100


def test_a_reply_over_the_cap_is_an_error_of_that_call_and_the_worker_is_restarted():
    with subject("ReturnsHugeGradient") as s:
        first = s._proc
        ex = s.execute(SHORT, backward=True)
        assert isinstance(ex, WorkerFailure) and ex.failure == "crash"
        assert ex.forward is not None and ex.forward_error is None  # forward's outputs came back before
        assert "a reply over the cap of 16 MiB for this case, refused unread" in ex.backward_error
        assert first.popen.poll() is not None  # stopped
        again = s.execute(SHORT, backward=False)
        assert again.forward is not None and s.restarts == 1


def test_writes_into_the_inputs_are_seen_by_the_parent_whatever_the_worker_reports():
    with subject("MutatesInputAndHidesIt") as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.mutated == ["x (forward)"]
    with subject("MutatesUpstream") as s:
        ex = s.execute(SHORT, backward=True)
    assert ex.mutated == ["dy (backward)"]


def test_messages_from_the_implementation_do_not_extend_the_deadline():
    import time

    with subject("FakesProgressAndHangs", timeout=1.0) as s:
        start = time.monotonic()
        ex = s.execute(SHORT, backward=True)
        elapsed = time.monotonic() - start
    assert isinstance(ex, WorkerFailure) and ex.failure == "timeout"
    assert ex.forward_error.startswith("forward did not return within 1 s")
    assert "message(s) that were not a reply" in ex.forward_error
    assert elapsed < 30  # generous: the messages arrive every 0.2 s, and used to restart the clock forever


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard process is Linux only")
def test_the_worker_parent_is_a_guard_not_the_harness():
    import os

    with subject("Correct") as s:
        guard = s._proc.popen.pid
        children = [p for p in os.listdir("/proc") if p.isdigit()
                    and Path(f"/proc/{p}/stat").exists()
                    and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(guard)]
        assert len(children) == 1 and guard != os.getpid()  # the worker, whose getppid() is the guard


FORGING = Path(__file__).parent / "plugins" / "forging.py"


@pytest.mark.parametrize("forger", ["OnTheSocket", "InAGradientsName", "InAnOutputsDtype"])
def test_an_implementation_cannot_run_code_in_the_harness_to_forge_its_verdict(forger, tmp_path, monkeypatch):
    """What a worker sends is read as plain data: an object whose unpickling would run the implementation's
    code (and make every record pass) is refused, and the call that sent it is an error."""
    mark = tmp_path / "forged"
    monkeypatch.setenv("LSTM_HARNESS_FORGERY_MARK", str(mark))
    result = certify(f"{FORGING}:{forger}", oracles=["finite-differences"], dtypes=["float64"], max_examples=3,
                     isolate=True, report_dir=tmp_path / "report")
    assert result.verdict != "certified", result.summary()
    ran = mark.read_text().split() if mark.exists() else []
    assert str(os.getpid()) not in ran  # the forgery never ran in the harness's process
    if forger == "OnTheSocket":  # the one that reaches the harness: refused unread
        assert any("not a reply in the harness's format" in (r.reason or "") for r in result.records), \
            result.details()


def test_replies_are_read_as_plain_data_only():
    from harness import replies

    good = Execution(forward=(np.zeros((2, 1, 3)), np.zeros((1, 3), ">f8"), np.asfortranarray(np.ones((1, 3)))),
                     gradients={np.str_("W"): np.ones(2, np.float32)}, mutated=["x (forward)"])
    blob = replies.Blob()
    message, arrays = replies.loads(replies.dumps(["result", replies.encode_execution(good, blob)], blob))
    back = replies.decode_execution(message[1], arrays, "forward")
    assert back.gradients["W"].tolist() == [1.0, 1.0] and back.gradients["W"].dtype == np.float32
    assert type(next(iter(back.gradients))) is str and back.forward[1].dtype == np.dtype(">f8")
    assert back.mutated == ["x (forward)"] and back.forward[2].tolist() == [[1.0, 1.0, 1.0]]
    # No pickle is read at all: not an object's, nor a tuple nested a million deep (hashed recursively by
    # CPython), nor a memo index that makes the unpickler fill gigabytes.
    for raw in (pickle.dumps(os.system), pickle.dumps(np.zeros(2)), b"\x80\x02})" + b"\x85" * 1_000_000 + b"Ns.",
                b"\x80\x03Nr" + (2**27).to_bytes(4, "little") + b"."):
        with pytest.raises(ValueError, match="not a reply in the harness's format"):
            replies.loads(raw)
    with pytest.raises(RecursionError):  # JSON nested past the parser's depth: the caller reports it unreadable
        replies.loads(replies.MAGIC + (200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000)
    blob = replies.Blob()
    data = replies.encode_execution(good, blob)
    arrays = memoryview(b"".join(blob.parts))
    for broken, message_ in ((dict(data, gradients={"W": None}), "gradient 'W': expected an array"),
                             (dict(data, forward=None), "forward: neither outputs nor the error"),
                             (dict(data, forward=[["|O", [1], 0, 8]] * 3), "y: expected a floating-point"),
                             (dict(data, forward=[["<f8", [2], 0, 8]] * 3), "y: its bytes do not fill"),
                             (dict(data, forward=[["<f8", [1], len(arrays), 8]] * 3), "y: its bytes do not fill"),
                             (dict(data, seconds="1"), "not of their types"), ({**data, "extra": 1}, "expected an")):
        with pytest.raises(ValueError, match=message_):
            replies.decode_execution(broken, arrays, "forward")
    info = replies.encode_info(validate(LoopLSTM()))
    assert replies.decode_info(json.loads(json.dumps(info))) == validate(LoopLSTM())
    for broken, message_ in ((dict(info, limits={"zero": [], "unchecked": {"y": "no y"}}), "unchecked: expected"),
                             (dict(info, structure={**info["structure"], "num_layers": 0}), "num_layers: expected"),
                             (dict(info, variant="other"), "not a variant"),
                             (dict(info, dtypes=["float16"]), "dtypes")):
        with pytest.raises(ValueError, match=message_):
            replies.decode_info(broken)


def test_run_isolates_a_users_target_beside_the_built_ins(tmp_path, monkeypatch, capsys):
    """``run --impl TARGET`` runs the built-ins in process and a TARGET of the user's in a worker, as certify
    does: its forgery does not run here, and the run's verdict is its own."""
    from harness.cli import main

    mark = tmp_path / "forged"
    monkeypatch.setenv("LSTM_HARNESS_FORGERY_MARK", str(mark))
    code = main(["run", "--impl", "loop", "--impl", f"{FORGING}:OnTheSocket", "--oracle", "finite-differences",
                 "--dtype", "float64", "--max-examples", "2", "--report-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert str(os.getpid()) not in (mark.read_text().split() if mark.exists() else [])
    assert "not a reply in the harness's format" in out
