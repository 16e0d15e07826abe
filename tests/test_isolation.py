"""The worker process: same Execution as in process; hangs, crashes, exits and memory exhaustion
become error Executions with a clear reason; the worker is kept between cases and restarted after
it died."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from harness.cases import CaseSpec, build_case
from harness.contract import validate
from harness.isolation import IsolatedSubject, WorkerFailure, WorkerLoadError, describe_exit
from harness.subject import execute
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
