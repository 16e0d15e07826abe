"""Calling an implementation under test, and turning whatever it does into plain data.

An :class:`Execution` is everything one forward (and backward) call produced, with nothing left that
belongs to the implementation: outputs converted to NumPy, exceptions turned into text with their
traceback shortened to the implementation's own frames, contract breaches described. The runner
then validates and compares it. Because an Execution is plain data it can come back from a worker
process just as well (``harness.isolation``), which is how a misbehaving implementation is kept from
taking the harness down with it.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import numpy as np

from harness.cases import Case
from harness.contract import ContractError, ImplementationInfo, to_numpy

__all__ = ["Execution", "Subject", "InProcessSubject", "MAX_TEXT", "bounded", "configured", "execute",
           "merge_backward",
           "run_backward", "run_forward", "short_traceback", "exits_raise", "ExitCalled"]

# The harness package's own folder, with a trailing separator so that a user's "harness_x/" is not it.
_HARNESS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


#: The most characters kept of any one text an implementation produces (an exception's message, a
#: traceback, a contract problem): enough to read, while a message of megabytes can neither flood a
#: report nor grow the harness's memory (a worker cuts it before sending it back).
MAX_TEXT = 4000


def bounded(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to about ``limit`` characters, its start and end kept, saying how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 4, limit // 4
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[len(text) - tail:]}"


@dataclass
class Execution:
    """What one call into an implementation produced. ``error`` and ``contract`` are text or None."""

    forward: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    forward_error: str | None = None
    forward_contract: str | None = None
    gradients: dict[str, np.ndarray] | None = None
    backward_error: str | None = None
    backward_contract: str | None = None
    backward_ran: bool = False
    mutated: list[str] = field(default_factory=list)  # "x (forward)", ...
    #: Gradient keys the backward returned as None: it does not compute them (e.g. autograd reached no leaf).
    not_computed: list[str] = field(default_factory=list)
    traceback: str = ""
    seconds: float = 0.0


class Subject(Protocol):
    """An implementation the runner can execute: in this process or in a worker."""

    info: ImplementationInfo

    def execute(self, case: Case, *, backward: bool) -> Execution: ...


def short_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without the harness's own frames: what the implementer needs."""
    frames = traceback.extract_tb(exc.__traceback__)
    kept = [f for f in frames if not os.path.abspath(f.filename).startswith(_HARNESS_DIR)]
    lines = traceback.format_list(kept or frames[-1:])
    lines += traceback.format_exception_only(type(exc), exc)
    return bounded("Traceback (implementation frames only):\n" + "".join(lines))


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__module__}.{type(value).__name__}"


class ExitCalled(SystemExit):
    """``os._exit`` called by an implementation running in the harness's own process (see :func:`exits_raise`)."""


def _exit_raises(status: int = 0) -> NoReturn:
    raise ExitCalled(status)


@contextlib.contextmanager
def exits_raise() -> Iterator[None]:
    """While the block runs, ``os._exit`` raises :class:`ExitCalled` instead of ending the process.

    In process, an implementation that calls ``os._exit(0)`` would end the harness with exit code 0 and
    no report, which a CI job reads as certified; so the call becomes an error of that call. (Code that
    reaches the C library's ``_exit`` directly is beyond this: isolate such code in a worker.)
    """
    real = os._exit
    os._exit = _exit_raises
    try:
        yield
    finally:
        os._exit = real


def plain_text(value: Any) -> str:
    """``value`` as an exact ``str``: a ``str`` subclass (``numpy.str_``, a ``StrEnum`` member, or one made
    to be sent) or whatever ``str()`` of anything else returns is copied into a plain one, which is all a
    worker sends back (:mod:`harness.replies`)."""
    return str.__str__(value if isinstance(value, str) else str(value))


def _called(call: str, problems: list[Any]) -> str:
    """A contract breach's problems as one text named by the call once ("forward: y: expected ..."), also
    where they name it themselves (an adapter's "forward: returned no final states ...")."""
    text = "; ".join(map(str, problems))
    return text if text.startswith(f"{call}:") else f"{call}: {text}"


def _raised(call: str, exc: BaseException) -> str:
    if isinstance(exc, ExitCalled):
        return f"{call} called os._exit({exc.code!r}), which would have ended the whole run"
    if isinstance(exc, SystemExit):
        return bounded(f"{call} called sys.exit({exc.code!r})")
    notes = [str(n) for n in getattr(exc, "__notes__", None) or ()]  # PEP 678: what was added to the exception
    return bounded(f"{call} raised {type(exc).__name__}: {exc}" + "".join(f"; {n}" for n in notes))


def _arrays(values: Any, names: Any) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Owned float NumPy copies of an implementation's outputs, or the contract problem.

    Copies, because an implementation may hand out (and later overwrite) its own buffers; floats
    only, because anything else cannot be compared and may not even cross a process boundary.
    """
    out = {}
    for name, value in zip(names, values):
        try:
            array = np.array(to_numpy(value), copy=True)
        except Exception as exc:
            return None, bounded(f"{name}: expected an array; {exc}")
        if array.dtype.kind != "f":
            return None, f"{name}: expected a floating-point array, got dtype {array.dtype}"
        out[name] = array
    return out, None


def configured(impl: Any, info: ImplementationInfo, case: Case) -> tuple[Any, Execution | None]:
    """The implementation that computes ``case``'s structure: ``impl.with_structure(case.structure)`` for
    a configurable one (see :mod:`harness.structure`) when the case is in another structure than its own,
    ``impl`` itself otherwise (the very object, so that state kept between calls stays visible); or, when
    configuring raised, None and the Execution that reports it."""
    if not info.configurable or case.structure == info.structure:
        return impl, None
    try:
        return impl.with_structure(case.structure), None
    except KeyboardInterrupt:
        raise  # a person stopping the run (or SIGTERM, harness.api.Interrupted)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and any class of the implementation's own
        out = Execution(forward_error=_raised(f"with_structure({case.structure.describe() or 'default'})", exc))
        out.traceback = short_traceback(exc)
        return None, out


def execute(impl: Any, info: ImplementationInfo, case: Case, *, backward: bool) -> Execution:
    """Run ``impl`` (configured for the case's structure) on ``case`` in this process. Never raises for
    anything the implementation does.

    ``sys.exit``, or any exception class of the implementation's own (a BaseException subclass too),
    is reported like an exception; KeyboardInterrupt is not caught, so that a person can still stop a run.
    """
    obj, failed = configured(impl, info, case)
    if failed is not None:
        return failed
    given = case.copy()  # the implementation gets its own copies; case keeps the originals
    out, result = run_forward(obj, case, given)
    if result is not None and backward and info.has_backward:
        out = merge_backward(out, run_backward(obj, case, given, result, case.copy()))
    return out


def run_forward(impl: Any, case: Case, given: Case) -> tuple[Execution, Any]:
    """Call ``impl.forward`` on the arrays of ``given`` (which ``case`` holds unchanged, to detect
    writes into them), with ``lengths=`` when the case's structure has lengths: the Execution, and the
    whole result when forward kept the contract (else None). ``impl`` is already configured for the
    case's structure (:func:`configured`).
    """
    import time

    out = Execution()
    names = ("x", "h0", "c0", *case.params)
    start = time.perf_counter()
    try:
        if case.structure.lengths:
            result = impl.forward(given.x, given.h0, given.c0, given.params, lengths=given.lengths)
        else:
            result = impl.forward(given.x, given.h0, given.c0, given.params)
    except ContractError as exc:  # an adapter (or the implementation) names a contract breach itself
        out.forward_contract = bounded(_called("forward", exc.problems))
        out.seconds = time.perf_counter() - start
        return out, None
    except KeyboardInterrupt:
        raise  # a person stopping the run (or SIGTERM, harness.api.Interrupted)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and any class of the implementation's own
        out.forward_error = _raised("forward", exc)
        out.traceback = short_traceback(exc)
        out.seconds = time.perf_counter() - start
        return out, None
    out.seconds = time.perf_counter() - start
    out.mutated += _mutations(case, given, names, "forward")
    if not isinstance(result, (tuple, list)) or len(result) != 4:
        out.forward_contract = (
            f"forward: expected a tuple (y, h_T, c_T, cache) of 4 items, got {_describe(result)}"
        )
        return out, None
    outputs, problem = _arrays(result[:3], ("y", "h_T", "c_T"))
    if problem:
        out.forward_contract = f"forward: {problem}"
        return out, None
    assert outputs is not None
    y, h_T, c_T = outputs.values()
    out.forward = (y, h_T, c_T)
    return out, result


def run_backward(impl: Any, case: Case, given: Case, result: Any, upstream: Case) -> Execution:
    """Call ``impl.backward`` with the upstream gradients of ``upstream`` and forward's cache: an
    Execution holding the backward fields only. Writes into ``given`` are blamed on backward only
    when they happen now."""
    import time

    out = Execution(backward_ran=True)
    names = ("x", "h0", "c0", *case.params)
    after_forward = given.copy()
    start = time.perf_counter()
    try:
        grads = impl.backward(upstream.dy, upstream.dh_T, upstream.dc_T, result[3])
    except ContractError as exc:
        out.backward_contract = bounded(_called("backward", exc.problems))
    except KeyboardInterrupt:
        raise  # a person stopping the run (or SIGTERM, harness.api.Interrupted)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and any class of the implementation's own
        out.backward_error = _raised("backward", exc)
        out.traceback = short_traceback(exc)
    else:
        out.mutated += _mutations(case, upstream, ("dy", "dh_T", "dc_T"), "backward")
        out.mutated += _mutations(after_forward, given, names, "backward")
        if not isinstance(grads, Mapping):
            out.backward_contract = f"backward: expected a dict of gradients by name, got {_describe(grads)}"
        else:
            returned = {plain_text(k): v for k, v in grads.items() if v is not None}
            out.not_computed = [plain_text(k) for k, v in grads.items() if v is None]
            gradients, problem = _arrays(returned.values(), [f"gradient {k!r}" for k in returned])
            if problem:
                out.backward_contract = f"backward: {problem}"
            else:
                assert gradients is not None
                out.gradients = dict(zip(returned, gradients.values()))
    out.seconds = time.perf_counter() - start
    return out


def merge_backward(forward: Execution, backward: Execution) -> Execution:
    """One Execution of a forward call and the backward call after it."""
    forward.backward_ran = backward.backward_ran
    forward.gradients = backward.gradients
    forward.not_computed = backward.not_computed
    forward.backward_error = backward.backward_error
    forward.backward_contract = backward.backward_contract
    forward.mutated = forward.mutated + [m for m in backward.mutated if m not in forward.mutated]
    forward.traceback = backward.traceback or forward.traceback
    forward.seconds += backward.seconds
    return forward


def _get(case: Case, name: str) -> np.ndarray:
    return case.params[name] if name in case.params else getattr(case, name)


def _mutations(original: Case, given: Case, names, when: str) -> list[str]:
    changed = []
    for name in names:
        if not np.array_equal(_get(original, name), _get(given, name), equal_nan=True):
            changed.append(f"{name} ({when})")
    return changed


class InProcessSubject:
    """Runs the implementation in this process: fast, for trusted (built-in) implementations."""

    def __init__(self, impl: Any, info: ImplementationInfo):
        self.impl = impl
        self.info = info

    def execute(self, case: Case, *, backward: bool) -> Execution:
        with exits_raise():
            return execute(self.impl, self.info, case, backward=backward)
