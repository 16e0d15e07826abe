"""What the harness reads back from a worker process: plain data, and nothing that runs code.

The implementation under test runs in the worker, so it can write anything on the worker's socket or
hand back objects made to be sent: a class whose ``__reduce__`` calls ``exec``, in an output's dtype
metadata or as a ``str`` subclass used as a gradient's key. Unpickled as they are, such objects run
the implementation's code in the harness's own process, where it can rewrite how records are made
and forge the verdict. So a reply is unpickled knowing only the classes the harness itself sends
(:data:`READABLE`: its own plain records, NumPy arrays and dtypes), and what it holds is checked for
the types the harness reads from it (:func:`execution_problem`, :func:`info_problem`) before it is
believed. A reply that fails either is reported as unreadable, an error of the call that sent it.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any

import numpy as np

from harness.contract import ImplementationInfo
from harness.limits import Limits
from harness.structure import Structure
from harness.subject import Execution

__all__ = ["READABLE", "loads", "execution_problem", "info_problem"]

#: The (module, name) pairs a worker's reply may refer to: what the harness's worker sends (an
#: Execution, an ImplementationInfo with its Limits and Structure, NumPy arrays, dtypes and scalars),
#: under NumPy 2's module names and NumPy 1's. Anything else is refused before it is constructed.
READABLE = frozenset({
    ("harness.subject", "Execution"),
    ("harness.contract", "ImplementationInfo"),
    ("harness.limits", "Limits"),
    ("harness.structure", "Structure"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
})


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in READABLE:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which is not among the plain data a worker sends; unpickling "
                f"it could run the implementation's code in the harness's process")
        return super().find_class(module, name)


def loads(data: bytes) -> Any:
    """``pickle.loads`` of a worker's reply, refusing every class outside :data:`READABLE`."""
    return _PlainDataUnpickler(io.BytesIO(data)).load()


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is str for v in value)


def execution_problem(execution: Execution) -> str:
    """What is wrong with an Execution read from a worker ("" when nothing): its fields must hold what
    the harness's own worker puts there, arrays as plain ``numpy.ndarray`` and names as exact ``str``."""
    names = {f.name for f in dataclasses.fields(Execution)}
    extra = sorted(set(vars(execution)) - names)
    if extra:
        return f"unexpected attributes {extra}"
    forward = execution.forward
    if forward is not None and not (isinstance(forward, (tuple, list)) and len(forward) == 3
                                    and all(a is None or type(a) is np.ndarray for a in forward)):
        return "forward: expected None or 3 arrays"
    grads = execution.gradients
    if grads is not None and not (type(grads) is dict and all(type(k) is str and (v is None or type(v) is np.ndarray)
                                                              for k, v in grads.items())):
        return "gradients: expected None or arrays by name"
    for name in ("forward_error", "forward_contract", "backward_error", "backward_contract"):
        if getattr(execution, name) is not None and type(getattr(execution, name)) is not str:
            return f"{name}: expected None or a text"
    if type(execution.backward_ran) is not bool or type(execution.traceback) is not str \
            or type(execution.seconds) not in (int, float) or not _texts(execution.mutated) \
            or not _texts(execution.not_computed):
        return "backward_ran, traceback, seconds, mutated, not_computed: not of their types"
    return ""


def info_problem(info: Any) -> str:
    """What is wrong with an ImplementationInfo read from a worker ("" when nothing)."""
    if type(info) is not ImplementationInfo:
        return f"expected an ImplementationInfo, got {type(info).__name__}"
    if type(info.name) is not str or type(info.variant) is not str or type(info.dtypes) is not tuple \
            or not all(type(d) is str for d in info.dtypes) or type(info.has_backward) is not bool \
            or type(info.ln_eps) not in (int, float) or type(info.limits) is not Limits \
            or type(info.structure) is not Structure or info.structure.problems() \
            or type(info.configurable) is not bool or type(info.structures) is not frozenset \
            or not all(type(f) is str for f in info.structures) or type(info.dtypes_declared) is not bool:
        return "its fields are not of their types"
    return ""
