"""Running an implementation under test in a worker process, so that nothing it does can take the
harness down.

:class:`IsolatedSubject` is a :class:`~harness.subject.Subject`: the runner hands it a case, it sends
the case to a worker process, the worker calls the very same :func:`harness.subject.execute` an
in-process run would, and the plain-data :class:`~harness.subject.Execution` comes back through a
socket. What the worker cannot send back is described instead, as an error of the call that was
running:

* a call that does not return within ``timeout`` seconds: the worker is killed ("hang");
* a worker that dies: a signal (segmentation fault in native code, abort) or an exit status
  (``os._exit``, ``sys.exit`` is caught before it gets that far); the Python stack at the moment of a
  fatal signal comes back too, from :mod:`faulthandler`;
* memory exhaustion: once the implementation is loaded, the worker's address space is capped
  (``RLIMIT_AS``) at what it has mapped plus ``memory_limit``, so a runaway allocation raises
  ``MemoryError`` in the implementation instead of taking the machine's memory.

The worker is kept between cases (starting one costs about half a second) and started again, lazily,
after it died or was killed. Such failures come back as a :class:`WorkerFailure`, an Execution that
says what happened, so that the caller can stop shrinking a case whose every attempt costs a restart
or a full timeout.
"""

from __future__ import annotations

import codecs
import faulthandler
import json
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from harness.cases import Case
from harness.contract import ContractError, ImplementationInfo, validate
from harness.quick_exit import run_then_exit
from harness.replies import Blob, decode_execution, decode_info, dumps, encode_execution, encode_info, loads, texts
from harness.structure import Structure
from harness.subject import Execution, bounded, configured, merge_backward, run_backward, run_forward

__all__ = ["IsolatedSubject", "MIN_LOAD_TIMEOUT", "ReplyTooLarge", "WorkerFailure", "WorkerLoadError",
           "check_timeout", "default_memory_limit", "describe_exit", "reply_cap", "DEFAULT_TIMEOUT", "GIB"]

GIB = 1024**3
#: Seconds per call into an isolated implementation, unless the user says otherwise (CLI and pytest plugin).
DEFAULT_TIMEOUT = 60.0

#: The least time loading an implementation is given, in seconds, however short the per-call timeout:
#: importing PyTorch or TensorFlow alone takes seconds on a busy machine.
MIN_LOAD_TIMEOUT = 20.0


def default_memory_limit() -> int:
    """Bytes of address space an implementation may add once loaded: half the machine's memory, at
    least 4 GiB.

    The cap is on address space (``RLIMIT_AS``), which counts memory that was reserved and never
    touched, so it is generous; what it must prevent is one implementation taking all the memory of
    a machine that others share.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * GIB
    return max(4 * GIB, total // 2)


#: The most of the guard's status file read (it holds an exit status and a line of text).
_GUARD_STATUS_BYTES = 4096


@dataclass
class WorkerFailure(Execution):
    """The worker could not report an Execution: it was killed after a timeout, or it died."""

    failure: str = ""  # "timeout" or "crash"


class WorkerLoadError(Exception):
    """The worker could not load the implementation; ``kind`` is "load" or "contract"."""

    def __init__(self, kind: str, message: str, problems: list[str] | None = None,
                 subject: str = "implementation"):
        super().__init__(message)
        self.kind = kind
        self.problems = problems or []
        self.subject = subject


_SIGNALS = {
    signal.SIGSEGV: "a segmentation fault: native code read or wrote memory it does not own",
    signal.SIGABRT: "an abort, e.g. a failed assertion in native code",
    signal.SIGFPE: "a floating-point exception in native code",
    signal.SIGILL: "an illegal instruction in native code",
    signal.SIGKILL: "killed from outside, e.g. by the system when memory ran out",
}
if hasattr(signal, "SIGBUS"):
    _SIGNALS[signal.SIGBUS] = "a bus error in native code"


def describe_exit(exitcode: int | None) -> str:
    """What a worker's exit code means, in words."""
    if exitcode is None:
        return "it stopped responding"
    if exitcode < 0:
        try:
            known = signal.Signals(-exitcode)
        except ValueError:
            name, why = f"signal {-exitcode}", ""
        else:
            name, why = known.name, _SIGNALS.get(known, "")
        return f"killed by {name} (signal {-exitcode}{': ' + why if why else ''})"
    return (f"it exited with status {exitcode} (the implementation ended the process itself, "
            f"e.g. with os._exit({exitcode}))")


# --------------------------------------------------------------------------------------------------
# The worker side


class _SharedArrays:
    """The arrays of a case in a file that parent and worker both map.

    The implementation is handed views into this file, so the parent sees every write into its
    inputs with its own eyes, after each call, comparing against its own copy: no check that runs
    in the worker (where the implementation could disable it) decides whether inputs were changed.
    The file only grows, so a mapping of an older, smaller size stays valid.
    """

    def __init__(self, path: str):
        self.path = path

    @staticmethod
    def layout(case: Case) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
        """(name, dtype, shape, offset) of each array, and the bytes they take, 64-byte aligned."""
        entries, offset = [], 0
        for name, array in (*case.arrays().items(), ("dy", case.dy), ("dh_T", case.dh_T), ("dc_T", case.dc_T)):
            entries.append((name, array.dtype.str, tuple(array.shape), offset))
            offset += -(-array.nbytes // 64) * 64
        return entries, max(offset, 64)

    def map(self, size: int) -> mmap.mmap:
        with open(self.path, "r+b") as fh:
            if os.fstat(fh.fileno()).st_size < size:
                fh.truncate(size)
            return mmap.mmap(fh.fileno(), size)

    @staticmethod
    def views(buffer: Any, entries: list[tuple[str, str, tuple[int, ...], int]]) -> dict[str, np.ndarray]:
        return {name: np.ndarray(shape, dtype=np.dtype(dtype), buffer=buffer, offset=offset)
                for name, dtype, shape, offset in entries}

    @staticmethod
    def case_of(views: dict[str, np.ndarray], meta: dict[str, Any]) -> Case:
        core = ("x", "h0", "c0", "dy", "dh_T", "dc_T")
        lengths = meta.get("lengths")
        return Case(meta["variant"], meta["dtype"], x=views["x"], h0=views["h0"], c0=views["c0"],
                    params={k: v for k, v in views.items() if k not in core},
                    dy=views["dy"], dh_T=views["dh_T"], dc_T=views["dc_T"], ln_eps=meta["ln_eps"], spec=meta["spec"],
                    structure=meta.get("structure") or Structure(),
                    lengths=None if lengths is None else np.asarray(lengths, dtype=np.int64))


def _load_in_worker(source: dict[str, Any]) -> tuple[Any, ImplementationInfo, dict | None]:
    from harness.plugins import AdaptedTarget, load_target, parse_target

    if source.get("target") is not None:
        obj, target = load_target(source["target"])
        target_dict = target.to_dict()
    else:
        obj = pickle.loads(source["pickled"])
        target_dict = None
        if isinstance(obj, AdaptedTarget):  # a TARGET read in a convention: loaded and adapted here
            target_dict = parse_target(obj.target).to_dict()
            obj = obj.load()
    return obj, validate(obj, variant=source.get("variant")), target_dict


def _address_space() -> int:
    """Bytes of address space this process has mapped now (0 where /proc is not there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _cap_memory(extra: int) -> None:
    """Cap the address space at what is mapped now plus ``extra`` bytes.

    Applied after the implementation is loaded, so that what importing it reserves (frameworks map
    gigabytes they never touch, BLAS maps a buffer per thread) does not count against the budget.
    """
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _address_space() + extra
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # no resource module (Windows), or not permitted: run without the cap


def _worker_main(conn: Any, payload: tuple[dict[str, Any], int | None, str, str]) -> None:
    """Load the implementation, then run forward and backward calls until told to stop or killed."""
    source, memory_limit, fault_path, shared_path = payload
    shared = _SharedArrays(shared_path)
    pending: tuple[Any, ImplementationInfo, Case, Case, Any] | None = None  # a forward's, for its backward
    fault_file = open(fault_path, "w")  # noqa: SIM115 - kept open for faulthandler until the end
    faulthandler.enable(file=fault_file, all_threads=False)
    from harness.plugins import LoadError

    try:
        impl, info, target = _load_in_worker(source)
    except LoadError as exc:
        _send(conn, ["load-error", "load", bounded(str(exc)), [], ""])
        return
    except ContractError as exc:
        _send(conn, ["load-error", "contract", bounded(str(exc)), [bounded(str(p)) for p in exc.problems[:50]],
                     bounded(str(exc.subject), 200)])
        return
    except BaseException as exc:  # noqa: BLE001 - anything the user's module does while loading
        text = bounded(f"loading the implementation raised {type(exc).__name__}: {exc}")
        _send(conn, ["load-error", "load", text, [], ""])
        return
    if memory_limit:
        _cap_memory(memory_limit)
    adapted: dict[Any, tuple[Any, ImplementationInfo]] = {}
    _send(conn, ["ready", encode_info(info), target])
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "adapt":
            problem = _adapt_into(adapted, impl, message[1])
            if problem:
                _send(conn, ["adapt-error", problem])
            else:
                _, wrapped_info = adapted[message[1]]
                _send(conn, ["adapted", encode_info(wrapped_info)])
            continue
        if message[0] == "forward":
            _, meta, entries, size, key = message
            if key is not None and key not in adapted:  # a restarted worker adapts again, lazily
                problem = _adapt_into(adapted, impl, key)
                if problem:
                    pending = None
                    _send_result(conn, Execution(forward_error=f"adapting the implementation failed: {problem}"))
                    continue
            given = _SharedArrays.case_of(_SharedArrays.views(shared.map(size), entries), meta)
            case = given.copy()  # the worker's own check: the parent checks the shared arrays too
            try:
                subject, subject_info = adapted[key] if key is not None else (impl, info)
                obj, failed = configured(subject, subject_info, case)
                if failed is not None:
                    execution, result = failed, None
                else:
                    execution, result = run_forward(obj, case, given)
            except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt and the like from the implementation
                obj, execution, result = None, _exit_execution("forward", exc, None), None
            pending = (obj, adapted[key][1] if key is not None else info, case, given, result)
        else:  # "backward", right after a forward that returned
            if pending is None or pending[4] is None:
                execution = Execution()
            else:
                obj, obj_info, case, given, result = pending
                pending = None
                execution = Execution()
                if obj_info.has_backward:
                    try:
                        execution = run_backward(obj, case, given, result, given)
                    except BaseException as exc:  # noqa: BLE001
                        execution = _exit_execution("backward", exc, None)
                        execution.forward_contract = None
        try:
            _send_result(conn, execution)
        except Exception as exc:  # e.g. MemoryError while encoding or pickling
            _send_result(conn, Execution(
                forward_error=f"the worker could not send the result back: {bounded(_unreadable(exc))}"))


def _send(conn: Any, message: Any, blob: Blob | None = None) -> None:
    """A message to the harness, in the format it parses itself (:mod:`harness.replies`), never a pickle."""
    conn.send_bytes(dumps(message, blob))


def _send_result(conn: Any, execution: Execution) -> None:
    blob = Blob()
    _send(conn, ["result", encode_execution(execution, blob)], blob)


def _adapt_into(adapted: dict[Any, tuple[Any, ImplementationInfo]], impl: Any, key: Any) -> str:
    """``harness.adapt(impl, **dict(key))`` into ``adapted``; "" on success, else what went wrong."""
    from harness.adapt import adapt

    try:
        wrapped = adapt(impl, **dict(key))
        adapted[key] = (wrapped, validate(wrapped))
    except Exception as exc:
        return bounded(f"{type(exc).__name__}: {exc}")
    return ""


def _exit_execution(phase: str, exc: BaseException, outputs: Any) -> Execution:
    """What an exception that execute() lets through (KeyboardInterrupt, GeneratorExit) came to, for
    the call that raised it; forward's outputs are kept when it was backward, so forward is still
    compared."""
    from harness.subject import short_traceback

    out = _phase_failure(phase, outputs, bounded(f"{phase} raised {type(exc).__name__}: {exc}"), Execution())
    out.traceback = short_traceback(exc)
    return out


def _phase_failure(phase: str, outputs: Any, why: str, out: Execution) -> Execution:
    """``out`` made into the failure of ``phase``: an error of forward, or of backward after a
    forward whose ``outputs`` (y, h_T, c_T) are still compared."""
    if phase == "backward":
        out.forward = outputs
        if outputs is None:
            out.forward_contract = "forward: expected a tuple (y, h_T, c_T, cache) of 4 arrays"
        out.backward_ran = True
        out.backward_error = why
    else:
        out.forward_error = why
    return out


# --------------------------------------------------------------------------------------------------
# The parent side


class ChildProcess:
    """A fresh Python interpreter running ``module.function(conn)``, talking over a socket pair.

    Started with ``subprocess``, not :mod:`multiprocessing`: nothing of the parent is inherited (no
    threads of a framework oracle, no OpenMP pool that a fork could deadlock) and the parent's
    ``__main__`` is never re-imported, so a user's script needs no ``if __name__ == "__main__"`` guard.
    The child gets the parent's ``sys.path`` first thing, so it finds what the parent finds. On Linux
    it dies with the parent (``PR_SET_PDEATHSIG``), even while stuck in a hanging implementation.

    The child leads a process group of its own (a new session), and :meth:`kill` kills the whole
    group: processes the implementation started (which do not inherit ``PR_SET_PDEATHSIG``) go with
    it. Its standard output and error are relayed to the parent's standard error, control characters
    escaped (:func:`harness.records.printable`): whatever an implementation prints must neither mix
    with the harness's own output (``--json``) nor drive the terminal.
    """

    def __init__(self, module: str, function: str, payload: Any, *, guarded: bool = False):
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = ("import sys; from harness.isolation import _child_main; "
                f"_child_main(int(sys.argv[1]), {module!r}, {function!r})")
        argv = [sys.executable, "-c", code, str(fd)]
        self._status_path = ""
        if guarded and _GUARD:
            handle, self._status_path = tempfile.mkstemp(prefix="lstm-harness-guard-", suffix=".json")
            os.close(handle)
            argv = [sys.executable, "-S", _GUARD_SCRIPT, self._status_path, *argv]
        self.popen = subprocess.Popen(argv, pass_fds=(fd,), env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=hasattr(os, "killpg"))
        child_sock.close()
        self._relay = threading.Thread(target=_relay, args=(self.popen.stdout, _stderr_fd()), daemon=True,
                                       name="lstm-harness-worker-output")
        self._relay.start()
        self.conn = Connection(parent_sock.detach())
        self.conn.send((list(sys.path), payload))

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        """The child's exit code; behind a guard, the worker's (the guard reports it)."""
        code = self.popen.poll()
        status = self._guard_status()
        return status.get("exit", code) if code is not None else None

    @property
    def note(self) -> str:
        """What the guard saw besides an exit: a signal the implementation sent to its parent."""
        return str(self._guard_status().get("note", ""))

    def _guard_status(self) -> dict[str, Any]:
        """What the guard wrote: {"exit": int, "note": str}, or {} when it wrote nothing readable. The file
        is in /tmp, where the implementation can reach it: it is opened without following a link, read
        up to a few KiB, and believed only with those types."""
        if not self._status_path:
            return {}
        try:
            fd = os.open(self._status_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as fh:
                status = json.loads(fh.read(_GUARD_STATUS_BYTES).decode("utf-8") or "{}")
        except (OSError, ValueError, RecursionError):
            return {}
        if type(status) is not dict:
            return {}
        return {k: v for k, v in status.items() if (k == "exit" and type(v) is int) or (k == "note" and type(v) is str)}

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """Kill the child and every process in its group (what the implementation started too); a
        guard is asked first, as it also kills what left the group (a new session) and was adopted."""
        if self._status_path and self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.join(5.0)
        if hasattr(os, "killpg"):
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)  # the group outlives its leader while members remain
            except (ProcessLookupError, PermissionError):
                pass
        if self.popen.poll() is None:
            self.popen.kill()
        self.join(5.0)
        self._relay.join(1.0)  # what it printed before it ended is out before the caller reports on it
        try:
            self.conn.close()
        except OSError:
            pass
        if self._status_path:
            try:
                os.unlink(self._status_path)
            except OSError:
                pass
            self._status_path = ""


# The worker's parent on Linux is a guard (harness/_guard.py, run as a script so that it starts in a
# few tens of milliseconds: it imports nothing but the standard library). Elsewhere (no prctl, no
# sigtimedwait) the worker is the harness's child, and only its process group is killed with it.
_GUARD = sys.platform.startswith("linux") and hasattr(signal, "sigtimedwait")
_GUARD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_guard.py")


def _relay(pipe: Any, fd: int) -> None:
    """Copy what the worker writes to ``fd``, a chunk at a time, control characters escaped."""
    from harness.records import printable

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := pipe.read1(65536):
            data = memoryview(printable(decoder.decode(chunk)).encode("utf-8", errors="replace"))
            while fd != subprocess.DEVNULL and data:
                data = data[os.write(fd, data):]
    except (OSError, ValueError):
        pass  # the terminal went away, or the pipe was closed
    finally:
        pipe.close()


def _stderr_fd() -> int:
    """Where a child's standard output goes: this process's standard error."""
    for get in (lambda: sys.stderr.fileno(), lambda: 2):
        try:
            fd = get()
            os.fstat(fd)
            return fd
        except (AttributeError, OSError, ValueError):  # no stderr, or one without a file descriptor
            continue
    return subprocess.DEVNULL


def _child_main(fd: int, module: str, function: str) -> None:
    """Entry point of a :class:`ChildProcess`."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
        except Exception:
            pass
    conn = Connection(fd)
    path, payload = conn.recv()
    sys.path[:] = path + [p for p in sys.path if p not in path]
    import importlib

    run_then_exit(lambda: getattr(importlib.import_module(module), function)(conn, payload))


def check_timeout(timeout: Any, name: str = "timeout") -> None:
    """A timeout is a positive number of seconds, or None for no limit."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"{name}: expected a positive number of seconds or None, got {timeout!r}")


class IsolatedSubject:
    """A Subject whose implementation runs in a worker process.

    ``impl`` is a TARGET string (loaded in the worker, see :mod:`harness.plugins`) or an object that
    can be pickled. ``timeout`` is in seconds per call (forward, then backward), None for no limit.
    ``load_timeout`` bounds starting the worker and loading (or adapting) the implementation; by
    default it follows ``timeout``, but never below :data:`MIN_LOAD_TIMEOUT` (importing a framework
    takes seconds), and there is no limit when ``timeout`` is None. ``memory_limit`` is in bytes (None:
    no cap). Raises :class:`WorkerLoadError` (or
    :class:`~harness.plugins.LoadError` / :class:`~harness.contract.ContractError` translated by the
    caller) when the implementation cannot be loaded.
    """

    def __init__(self, impl: Any, *, variant: str | None = None, timeout: float | None = None,
                 memory_limit: int | None = None, load_timeout: float | None = None):
        check_timeout(timeout)
        check_timeout(load_timeout, "load_timeout")
        if isinstance(impl, str):
            self._source: dict[str, Any] = {"target": impl, "variant": variant}
        else:
            try:
                self._source = {"pickled": pickle.dumps(impl), "variant": variant}
            except Exception as exc:
                raise ValueError(
                    f"impl: running an implementation in a worker process needs a TARGET string "
                    f"('package.module:attribute' or 'path/to/file.py:attribute') or an object that can be "
                    f"pickled; {type(impl).__name__} cannot be pickled ({type(exc).__name__}: {exc}). "
                    f"Pass the target string, or isolate=False"
                ) from None
        self.timeout = timeout
        self.memory_limit = memory_limit
        if load_timeout is None and timeout is not None:
            load_timeout = max(float(timeout), MIN_LOAD_TIMEOUT)
        self.load_timeout = load_timeout
        self.restarts = 0
        self._proc: Any = None
        self._conn: Any = None
        fd, self._fault_path = tempfile.mkstemp(prefix="lstm-harness-fault-", suffix=".txt")
        os.close(fd)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, shared_path = tempfile.mkstemp(prefix="lstm-harness-arrays-", dir=shm)
        os.close(fd)
        self._shared = _SharedArrays(shared_path)
        self.target: dict | None = None
        self._adapted: dict[Any, ImplementationInfo] = {}
        self.info: ImplementationInfo = self._start()

    # -- lifecycle

    def _start(self) -> ImplementationInfo:
        open(self._fault_path, "w").close()
        proc = ChildProcess("harness.isolation", "_worker_main",
                            (self._source, self.memory_limit, self._fault_path, self._shared.path), guarded=True)
        parent = proc.conn
        self._proc, self._conn = proc, parent
        deadline = None if self.load_timeout is None else time.monotonic() + self.load_timeout
        while True:
            if parent.poll(0.05):
                try:
                    message, _ = _receive(parent, _CONTROL_CAP)
                except ReplyTooLarge as exc:
                    self._kill()
                    raise WorkerLoadError("load", f"the worker process sent {exc}") from None
                except (EOFError, OSError):
                    message = None
                except Exception as exc:  # a reply this process cannot unpickle
                    self._kill()
                    raise WorkerLoadError("load", f"the worker process loaded the implementation, but its "
                                                  f"description could not be read back: {_unreadable(exc)}") from None
                break
            if not proc.is_alive() and not parent.poll(0):
                message = None
                break
            if deadline is not None and time.monotonic() > deadline:
                self._kill()
                raise WorkerLoadError("load", f"loading the implementation took longer than "
                                              f"{self.load_timeout:g} s in the worker process (the load "
                                              f"timeout, which follows the per-call timeout)")
        if message is None:
            proc.join(1.0)
            text = describe_exit(proc.exitcode)
            fault = self._fault_text()
            self._kill()
            raise WorkerLoadError("load", f"the worker process died while loading the implementation: "
                                          f"{text}" + (f"\n{fault}" if fault else ""))
        try:
            info, self.target = _loaded(message)
        except WorkerLoadError:
            self._kill()
            raise
        return info

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        self._conn = None
        if proc is not None:
            proc.kill()

    def close(self) -> None:
        """Stop the worker (politely, then by force) and remove its files."""
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(("stop",))
                self._proc.join(2.0)
            except (OSError, BrokenPipeError):
                pass
        self._kill()
        for path in (self._fault_path, self._shared.path):
            try:
                os.unlink(path)
            except OSError:
                pass

    def __enter__(self) -> IsolatedSubject:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten subject must not leave a worker behind
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        raise TypeError("an IsolatedSubject owns a worker process and cannot be pickled; pass the target")

    # -- conventions (used by harness.diagnose)

    def adapted(self, **convention: Any) -> _View:
        """A Subject that runs ``harness.adapt(impl, **convention)`` in the same worker."""
        key = tuple(sorted(convention.items()))
        if key not in self._adapted:
            self._ensure()
            reply = self._request(("adapt", key), self.load_timeout, "adapting the implementation")
            if type(reply) is list and len(reply) == 2 and reply[0] == "adapt-error" and type(reply[1]) is str:
                raise ValueError(reply[1])
            try:
                if type(reply) is not list or len(reply) != 2 or reply[0] != "adapted":
                    raise ValueError(f"expected ['adapted', description], got a {type(reply).__name__}")
                self._adapted[key] = decode_info(reply[1])
            except Exception as exc:  # noqa: BLE001 - whatever the values make the checks raise
                self._kill()
                raise RuntimeError(f"adapting the implementation: the worker process sent an unexpected reply "
                                   f"({bounded(str(exc), 300)}); it was stopped") from None
        return _View(self, key, self._adapted[key])

    def _request(self, message: Any, timeout: float | None, what: str) -> Any:
        """Send ``message`` and wait for the reply; a worker that dies, does not answer within
        ``timeout`` or answers something unreadable is stopped, and RuntimeError says which."""
        conn, proc = self._conn, self._proc
        deadline = None if timeout is None else time.monotonic() + timeout
        why = ""
        try:
            conn.send(message)
            while not why:
                if conn.poll(0.05):
                    return _receive(conn, _CONTROL_CAP)[0]
                if not proc.is_alive() and not conn.poll(0):
                    why = f"the worker process died: {describe_exit(proc.exitcode)}"
                elif deadline is not None and time.monotonic() > deadline:
                    why = f"the worker process did not answer within {timeout:g} s"
        except ReplyTooLarge as exc:
            why = f"the worker process sent {exc}"
        except (EOFError, OSError):
            proc.join(1.0)
            why = f"the worker process died: {describe_exit(proc.exitcode)}"
        except Exception as exc:
            why = f"the worker's reply could not be read: {_unreadable(exc)}"
        self._kill()
        raise RuntimeError(f"{what}: {why}; it was stopped")

    # -- execution

    def _ensure(self) -> None:
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            self.restarts += 1
            self.info = self._start()

    def _fault_text(self) -> str:
        try:
            with open(self._fault_path, encoding="utf-8", errors="replace") as fh:
                text = fh.read().strip()
        except OSError:
            return ""
        here = os.path.dirname(os.path.abspath(__file__))
        lines = [ln for ln in text.splitlines() if here not in ln and "multiprocessing" not in ln]
        return "\n".join(lines)

    def execute(self, case: Case, *, backward: bool, _key: Any = None) -> Execution:
        """Forward, then backward (when asked for and forward returned): one request each, each with
        the whole per-call timeout, which only this process keeps. Writes into the inputs are found
        here, in the shared arrays, whatever the worker reports."""
        try:
            self._ensure()
        except WorkerLoadError as exc:
            return WorkerFailure(forward_error=f"the worker process could not be restarted: {exc}",
                                 failure="crash")
        start = time.monotonic()
        entries, size = _SharedArrays.layout(case)
        buffer = self._shared.map(size)
        views = _SharedArrays.views(buffer, entries)
        originals = {**case.arrays(), "dy": case.dy, "dh_T": case.dh_T, "dc_T": case.dc_T}
        for name, view in views.items():
            view[...] = originals[name]
        meta = {"variant": case.variant, "dtype": case.dtype, "ln_eps": case.ln_eps, "spec": case.spec,
                "structure": case.structure,
                "lengths": None if case.lengths is None else [int(n) for n in case.lengths]}
        cap = reply_cap(case)
        out = self._call(("forward", meta, entries, size, _key), "forward", None, cap, start)
        if isinstance(out, WorkerFailure):
            return out
        inputs = list(case.arrays())
        _note_writes(out, views, originals, inputs, "forward")
        if backward and out.forward is not None:
            after_forward = {name: views[name].copy() for name in inputs}
            back = self._call(("backward",), "backward", out.forward, cap, start)
            if isinstance(back, WorkerFailure):
                back.mutated = out.mutated
                return back
            out = merge_backward(out, back)
            _note_writes(out, views, originals, ("dy", "dh_T", "dc_T"), "backward")
            _note_writes(out, views, after_forward, inputs, "backward")
        del views  # the mapping can close once no array looks into it
        return out

    def _call(self, message: Any, phase: str, outputs: Any, cap: int, start: float) -> Execution:
        """Send one request and wait, until ``timeout``, for its result. Anything else the worker sends
        meanwhile (an implementation can write on the worker's socket too) is dropped: it neither
        answers the call nor extends its time."""
        conn, proc = self._conn, self._proc
        try:
            conn.send(message)
        except (OSError, BrokenPipeError):
            return self._died(phase, outputs, start)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        dropped = 0
        while True:
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            ready = False
            try:
                ready = conn.poll(wait)
            except (OSError, EOFError):
                return self._died(phase, outputs, start)
            if ready:
                try:
                    message, arrays = _receive(conn, cap)
                except ReplyTooLarge as exc:
                    return self._unreadable(phase, outputs, start, str(exc))
                except (EOFError, OSError):
                    return self._died(phase, outputs, start)
                except Exception as exc:  # e.g. an object this process cannot unpickle
                    return self._unreadable(phase, outputs, start, _unreadable(exc))
                if type(message) is list and len(message) == 2 and message[0] == "result":
                    try:
                        execution = decode_execution(message[1], arrays, phase)
                    except Exception as exc:  # noqa: BLE001 - whatever the values make the checks raise
                        return self._unreadable(phase, outputs, start, f"a result not as the worker makes it: "
                                                                       f"{bounded(str(exc), 300)}")
                    self._note_memory(execution)
                    return execution
                dropped += 1
            elif not proc.is_alive():
                if conn.poll(0):
                    continue  # the result arrived just before the exit
                return self._died(phase, outputs, start)
            if deadline is not None and time.monotonic() >= deadline:
                self._kill()
                why = (f"{phase} did not return within {self.timeout:g} s (the timeout per call); the worker "
                       f"process running it was stopped. The implementation hangs, or is far too slow for "
                       f"this case")
                if dropped:
                    why += f". Meanwhile the worker's socket carried {dropped} message(s) that were not a reply"
                return self._failure(phase, outputs, why, "timeout", start)

    def _note_memory(self, execution: Execution) -> None:
        if not self.memory_limit:
            return
        note = (f" (the implementation may reserve {self.memory_limit / GIB:.1f} GiB beyond what loading it "
                f"took: the worker's address space is limited to that; it tried to use more)")
        for attr in ("forward_error", "backward_error"):
            text = getattr(execution, attr)
            if text and "MemoryError" in text and "limited to" not in text:
                setattr(execution, attr, text + note)

    def _died(self, phase: str, outputs: Any, start: float) -> WorkerFailure:
        proc = self._proc
        if proc is not None:
            proc.join(2.0)
        exitcode = proc.exitcode if proc is not None else None
        note = proc.note if proc is not None else ""
        fault = self._fault_text()
        self._kill()
        why = f"the worker process running {phase} died: {note or describe_exit(exitcode)}"
        if self.memory_limit and not note:
            why += (f" (its address space was limited to {self.memory_limit / GIB:.2g} GiB beyond what loading the "
                    f"implementation took, --memory-limit: native code that cannot allocate may end the process so)")
        out = self._failure(phase, outputs, why, "crash", start)
        if fault:
            out.traceback = "Stack of the worker when it died (faulthandler):\n" + fault
        return out

    def _unreadable(self, phase: str, outputs: Any, start: float, what: str) -> WorkerFailure:
        self._kill()
        why = (f"the worker process running {phase} sent back a reply that could not be read ({what}); the "
               f"worker was stopped")
        return self._failure(phase, outputs, why, "crash", start)

    @staticmethod
    def _failure(phase: str, outputs: Any, why: str, kind: str, start: float) -> WorkerFailure:
        out = WorkerFailure(failure=kind, seconds=time.monotonic() - start)
        return _phase_failure(phase, outputs, why, out)  # type: ignore[return-value]


#: The largest reply read from a worker while loading or adapting (a description and a few names).
_CONTROL_CAP = 16 * 1024**2


def reply_cap(case: Case) -> int:
    """The largest reply to one case read from a worker, in bytes: room for outputs and gradients in
    twice the case's precision, and for the bounded texts. A larger reply is refused unread, so that
    whatever an implementation returns, the harness's memory stays flat."""
    return 16 * 1024**2 + 4 * sum(a.nbytes for a in (*case.arrays().values(), *case.upstream))


class ReplyTooLarge(OSError):
    """A worker announced a reply over the cap; it was not read (and the connection is unusable)."""


def _receive(conn: Connection, cap: int) -> tuple[Any, memoryview]:
    """The next message on ``conn`` and the bytes of its arrays; refused before it is read when it is over
    ``cap`` bytes, and refused (``ValueError``) when it is not in the format a worker writes
    (:mod:`harness.replies`)."""
    try:
        data = conn.recv_bytes(cap)
    except OSError as exc:
        if str(exc) == "bad message length":  # what Connection says of a message over maxlength
            raise ReplyTooLarge(f"a reply over the cap of {cap / 1024**2:.0f} MiB for this case, refused "
                                f"unread") from None
        raise
    return loads(data)  # JSON and bytes, never a pickle: see harness.replies


def _loaded(message: Any) -> tuple[ImplementationInfo, dict | None]:
    """What a worker said once it loaded the implementation: ("ready", description, target) -> the
    implementation's description and its target; ("load-error", kind, text, [problems], subject), or
    anything else, -> :class:`WorkerLoadError`."""
    if type(message) is list and len(message) == 5 and message[0] == "load-error" \
            and texts([message[1], message[2], message[4]]) and texts(message[3]):
        raise WorkerLoadError(message[1], message[2], message[3], message[4] or "implementation")
    try:
        if type(message) is not list or len(message) != 3 or message[0] != "ready":
            raise ValueError(f"expected ['ready', description, target], got a {type(message).__name__}")
        target = message[2]
        if target is not None and (type(target) is not dict or not texts([*target, *target.values()])):
            raise ValueError("target: expected texts by name")
        return decode_info(message[1]), target
    except Exception as exc:  # noqa: BLE001 - whatever the values make the checks raise
        raise WorkerLoadError("load", f"the worker process sent an unexpected reply while loading: "
                                      f"{bounded(str(exc), 300)}") from None


def _unreadable(exc: BaseException) -> str:
    return bounded(f"{type(exc).__name__}: {exc}", 1000)


def _note_writes(out: Execution, views: dict[str, np.ndarray], before: dict[str, np.ndarray], names: Any,
                 when: str) -> None:
    """Add to ``out.mutated`` each of ``names`` whose shared array no longer holds ``before``'s values."""
    for name in names:
        entry = f"{name} ({when})"
        if entry not in out.mutated and not np.array_equal(views[name], before[name], equal_nan=True):
            out.mutated.append(entry)


class _View:
    """An adapted implementation that runs in the same worker as its :class:`IsolatedSubject`."""

    def __init__(self, parent: IsolatedSubject, key: Any, info: ImplementationInfo):
        self._parent = parent
        self._key = key
        self.info = info

    def execute(self, case: Case, *, backward: bool) -> Execution:
        return self._parent.execute(case, backward=backward, _key=self._key)
