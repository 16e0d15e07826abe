"""What a worker process sends back to the harness: plain data, made into the harness's objects here.

The implementation under test runs in the worker, so whatever the worker sends may be made by it: an
object whose ``__reduce__`` calls ``exec``, a NumPy dtype whose state points its object field at any
address, a ``Limits`` whose pickled state skips the checks of its constructor. Unpickled in the
harness's process, such a reply runs the implementation's code there, crashes it, or forges the
verdict. So the worker encodes what it sends (:func:`encode_info`, :func:`encode_execution`) as
Python's own plain types only (dicts, lists, tuples, strings, bytes, numbers, booleans, None), arrays
as their dtype's name, shape and bytes; the harness unpickles a reply refusing every class
(:func:`loads`: no ``find_class`` is answered), then builds its objects through their constructors
from checked values (:func:`decode_info`, :func:`decode_execution`). A reply that fails any of this is
reported as unreadable, an error of the call that sent it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import re
from typing import Any

import numpy as np

from harness.contract import DEFAULT_DTYPES, VARIANTS, ImplementationInfo
from harness.limits import Limits
from harness.structure import FEATURES, Structure
from harness.subject import Execution

__all__ = ["loads", "encode_execution", "decode_execution", "encode_info", "decode_info", "plain_text"]


class _NoClassUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}; a worker sends plain data only (see harness.replies), and unpickling "
            f"an object could run the implementation's code in the harness's process")


def loads(data: bytes) -> Any:
    """``pickle.loads`` of a worker's reply that constructs no object of any class: only the types pickle
    writes without naming a class (containers, strings, bytes, numbers, booleans, None)."""
    return _NoClassUnpickler(io.BytesIO(data)).load()


def plain_text(value: Any) -> str:
    """``value`` as an exact ``str`` (a ``str`` subclass such as ``numpy.str_`` or a ``StrEnum`` member copied)."""
    return str.__str__(value if isinstance(value, str) else str(value))


# --------------------------------------------------------------------------------------------------
# Arrays: (dtype name, shape, bytes)

#: The dtypes an array from a worker may have: floating point of any width, either byte order (what the
#: harness's worker keeps of an implementation's outputs, subject._arrays; the contract checks the rest).
_FLOAT_DTYPE = re.compile(r"[<>]f(2|4|8|10|12|16)")
_MAX_NDIM = 8


def _encode_array(a: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    a = np.asarray(a)
    return (a.dtype.str, tuple(int(n) for n in a.shape), a.tobytes(order="C"))


def _decode_array(value: Any, what: str) -> np.ndarray:
    if type(value) is not tuple or len(value) != 3:
        raise ValueError(f"{what}: expected an array as (dtype, shape, bytes)")
    dtype, shape, data = value
    if type(dtype) is not str or not _FLOAT_DTYPE.fullmatch(dtype):
        raise ValueError(f"{what}: expected a floating-point dtype, got {dtype!r:.40}")
    if type(shape) is not tuple or len(shape) > _MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"{what}: expected a shape of at most {_MAX_NDIM} sizes")
    dt = np.dtype(dtype)
    if type(data) is not bytes or len(data) != math.prod(shape) * dt.itemsize:
        raise ValueError(f"{what}: its bytes do not fill its shape and dtype")
    return np.frombuffer(data, dtype=dt).reshape(shape).copy()


# --------------------------------------------------------------------------------------------------
# Execution

_TEXTS = ("forward_error", "forward_contract", "backward_error", "backward_contract")


def encode_execution(ex: Execution) -> dict[str, Any]:
    """An Execution as plain data, in the worker (which made it: its arrays are NumPy float arrays)."""
    return {
        "forward": None if ex.forward is None else [None if a is None else _encode_array(a) for a in ex.forward],
        "gradients": None if ex.gradients is None else {plain_text(k): _encode_array(v)
                                                        for k, v in ex.gradients.items()},
        **{name: None if getattr(ex, name) is None else plain_text(getattr(ex, name)) for name in _TEXTS},
        "backward_ran": bool(ex.backward_ran),
        "mutated": [plain_text(m) for m in ex.mutated],
        "not_computed": [plain_text(n) for n in ex.not_computed],
        "traceback": plain_text(ex.traceback),
        "seconds": float(ex.seconds),
    }


def _texts(value: Any) -> bool:
    return type(value) is list and all(type(v) is str for v in value)


def decode_execution(data: Any, phase: str) -> Execution:
    """The Execution a worker sent as plain data for a call of ``phase`` ("forward" or "backward");
    ``ValueError`` saying what is not as the worker makes it."""
    names = [f.name for f in dataclasses.fields(Execution)]
    if type(data) is not dict or sorted(data) != sorted(names):
        raise ValueError(f"expected an execution's fields {names}")
    forward = data["forward"]
    if forward is not None:
        if type(forward) is not list or len(forward) != 3:
            raise ValueError("forward: expected None or 3 arrays (y, h_T, c_T)")
        forward = tuple(_decode_array(a, name) for a, name in zip(forward, ("y", "h_T", "c_T"), strict=True))
    grads = data["gradients"]
    if grads is not None:
        if type(grads) is not dict or not all(type(k) is str for k in grads):
            raise ValueError("gradients: expected arrays by name")
        grads = {k: _decode_array(v, f"gradient {k!r:.40}") for k, v in grads.items()}
    for name in _TEXTS:
        if data[name] is not None and type(data[name]) is not str:
            raise ValueError(f"{name}: expected None or a text")
    if phase == "forward" and forward is None and data["forward_error"] is None and data["forward_contract"] is None:
        raise ValueError("forward: neither outputs nor the error that stopped them")
    if type(data["backward_ran"]) is not bool or type(data["traceback"]) is not str \
            or type(data["seconds"]) is not float or not _texts(data["mutated"]) or not _texts(data["not_computed"]):
        raise ValueError("backward_ran, traceback, seconds, mutated, not_computed: not of their types")
    return Execution(**{**data, "forward": forward, "gradients": grads})


# --------------------------------------------------------------------------------------------------
# ImplementationInfo


def encode_info(info: ImplementationInfo) -> dict[str, Any]:
    """What ``validate`` read off the implementation, as plain data, in the worker."""
    return {
        "name": plain_text(info.name), "variant": plain_text(info.variant),
        "dtypes": [plain_text(d) for d in info.dtypes], "has_backward": bool(info.has_backward),
        "ln_eps": float(info.ln_eps),
        "limits": {"zero": [plain_text(q) for q in info.limits.zero],
                   "unchecked": {plain_text(q): plain_text(why) for q, why in info.limits.unchecked.items()}},
        "structure": {f.name: getattr(info.structure, f.name) for f in dataclasses.fields(Structure)},
        "configurable": bool(info.configurable), "structures": sorted(plain_text(f) for f in info.structures),
        "dtypes_declared": bool(info.dtypes_declared),
    }


def decode_info(data: Any) -> ImplementationInfo:
    """The ImplementationInfo a worker sent as plain data, rebuilt through the constructors and checked
    as ``validate`` checks it; ``ValueError`` saying what is wrong."""
    keys = ["name", "variant", "dtypes", "has_backward", "ln_eps", "limits", "structure", "configurable",
            "structures", "dtypes_declared"]
    if type(data) is not dict or sorted(data) != sorted(keys):
        raise ValueError(f"expected an implementation's description {keys}")
    if type(data["name"]) is not str or data["variant"] not in VARIANTS:
        raise ValueError("name, variant: not a text, or not a variant")
    dtypes = data["dtypes"]
    if not _texts(dtypes) or not dtypes or not set(dtypes) <= set(DEFAULT_DTYPES):
        raise ValueError(f"dtypes: expected some of {DEFAULT_DTYPES}")
    eps = data["ln_eps"]
    if type(eps) is not float or not math.isfinite(eps) or eps <= 0:
        raise ValueError("ln_eps: expected a positive finite float")
    limits = data["limits"]
    if type(limits) is not dict or sorted(limits) != ["unchecked", "zero"] or not _texts(limits["zero"]) \
            or type(limits["unchecked"]) is not dict \
            or not all(type(k) is str and type(v) is str for k, v in limits["unchecked"].items()):
        raise ValueError("limits: expected the quantities held at zero and the unchecked ones with their reasons")
    structure = data["structure"]
    if type(structure) is not dict:
        raise ValueError("structure: expected its fields")
    built = Structure.from_dict(structure)  # ValueError for an unknown field
    problems = built.problems(data["variant"])
    if problems:
        raise ValueError(f"structure: {'; '.join(problems)}")
    features = data["structures"]
    if not _texts(features) or not set(features) <= set(FEATURES):
        raise ValueError(f"structures: expected features among {FEATURES}")
    flags = (data["has_backward"], data["configurable"], data["dtypes_declared"])
    if not all(type(f) is bool for f in flags):
        raise ValueError("has_backward, configurable, dtypes_declared: expected booleans")
    return ImplementationInfo(
        name=data["name"], variant=data["variant"], dtypes=tuple(dtypes), has_backward=data["has_backward"],
        ln_eps=eps, limits=Limits(zero=tuple(limits["zero"]), unchecked=dict(limits["unchecked"])),
        structure=built, configurable=data["configurable"], structures=frozenset(features),
        dtypes_declared=data["dtypes_declared"])
