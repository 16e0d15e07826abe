"""What a worker process sends back to the harness: data in a format the harness parses itself.

The implementation under test runs in the worker, so whatever the worker sends may be made by it. As
a pickle, a reply can run the implementation's code in the harness's process (an object whose
``__reduce__`` calls ``exec``), crash it (a NumPy dtype whose state points an object field anywhere;
a tuple nested a million deep, which CPython hashes recursively) or fill its memory (a memo index of
2**30), and no class allow-list stops the last two. So no reply is a pickle: the worker writes a
message as JSON (:func:`dumps`) followed by the bytes of its arrays, each array in the JSON as its
dtype's name, shape and the place of its bytes; the harness parses it (:func:`loads`: the JSON
parser's own depth and number limits hold) and builds its objects through their constructors from
checked values (:func:`decode_info`, :func:`decode_execution`). Anything that fails is reported as
an unreadable reply, an error of the call that sent it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from harness.contract import DEFAULT_DTYPES, VARIANTS, ImplementationInfo
from harness.limits import Limits
from harness.structure import FEATURES, Structure
from harness.subject import Execution, plain_text

__all__ = ["Blob", "dumps", "loads", "encode_execution", "decode_execution", "encode_info", "decode_info",
           "texts"]

#: What every reply starts with: the format's name and version.
MAGIC = b"LSTMH\x01"


class Blob:
    """The bytes of a message's arrays, in the order they were added."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        """Append ``data``; where it lies, [offset, length], for the JSON to name."""
        at = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return at


def dumps(message: Any, blob: Blob | None = None) -> bytes:
    """A message (lists, dicts with text keys, texts, numbers, booleans, None) and its arrays' bytes."""
    header = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return b"".join([MAGIC, len(header).to_bytes(8, "little"), header, *(blob.parts if blob else [])])


def loads(data: bytes) -> tuple[Any, memoryview]:
    """A message the worker made with :func:`dumps`, and the bytes its arrays lie in. ``ValueError``
    (or ``RecursionError`` for JSON nested beyond the parser's depth) when it is not one."""
    start = len(MAGIC) + 8
    if len(data) < start or not data.startswith(MAGIC):
        raise ValueError("not a reply in the harness's format (a worker sends JSON and bytes, never a pickle)")
    size = int.from_bytes(data[len(MAGIC):start], "little")
    if size > len(data) - start:
        raise ValueError("its header runs past its end")
    return json.loads(data[start:start + size].decode("utf-8")), memoryview(data)[start + size:]


# --------------------------------------------------------------------------------------------------
# Arrays: (dtype name, shape, bytes)

#: The dtypes an array from a worker may have: floating point of each width NumPy has here, either byte
#: order (what the harness's worker keeps of an implementation's outputs; the contract checks the rest).
_FLOAT_DTYPES = frozenset(f"{order}f{np.dtype(t).itemsize}" for order in "<>"
                          for t in (np.float16, np.float32, np.float64, np.longdouble))
_MAX_NDIM = 8


def _encode_array(a: np.ndarray, blob: Blob) -> list[Any]:
    a = np.asarray(a)
    return [a.dtype.str, [int(n) for n in a.shape], *blob.add(a.tobytes(order="C"))]


def _decode_array(value: Any, data: memoryview, what: str) -> np.ndarray:
    if type(value) is not list or len(value) != 4:
        raise ValueError(f"{what}: expected an array as [dtype, shape, offset, length]")
    dtype, shape, offset, length = value
    if type(dtype) is not str or dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: expected a floating-point dtype, got {dtype!r:.40}")
    if type(shape) is not list or len(shape) > _MAX_NDIM or not all(type(n) is int and 0 <= n < 2**40 for n in shape):
        raise ValueError(f"{what}: expected a shape of at most {_MAX_NDIM} sizes")
    dt = np.dtype(dtype)
    if type(offset) is not int or type(length) is not int or not 0 <= offset <= offset + length <= len(data) \
            or length != math.prod(shape) * dt.itemsize:
        raise ValueError(f"{what}: its bytes do not fill its shape and dtype")
    return np.frombuffer(data, dtype=dt, count=math.prod(shape), offset=offset).reshape(shape).copy()


# --------------------------------------------------------------------------------------------------
# Execution

_TEXTS = ("forward_error", "forward_contract", "backward_error", "backward_contract")


def encode_execution(ex: Execution, blob: Blob) -> dict[str, Any]:
    """An Execution as plain data, its arrays' bytes into ``blob``, in the worker (which made it: its arrays
    are NumPy float arrays)."""
    return {
        "forward": None if ex.forward is None else [_encode_array(a, blob) for a in ex.forward],
        "gradients": None if ex.gradients is None else {plain_text(k): _encode_array(v, blob)
                                                        for k, v in ex.gradients.items()},
        **{name: None if getattr(ex, name) is None else plain_text(getattr(ex, name)) for name in _TEXTS},
        "backward_ran": bool(ex.backward_ran),
        "mutated": [plain_text(m) for m in ex.mutated],
        "not_computed": [plain_text(n) for n in ex.not_computed],
        "traceback": plain_text(ex.traceback),
        "seconds": float(ex.seconds),
    }


def texts(value: Any) -> bool:
    """Whether ``value`` is a list of exact ``str``: what a message holds where the harness reads text."""
    return type(value) is list and all(type(v) is str for v in value)


def decode_execution(data: Any, arrays: memoryview, phase: str) -> Execution:
    """The Execution a worker sent as plain data (its arrays in ``arrays``) for a call of ``phase``
    ("forward" or "backward"); ``ValueError`` saying what is not as the worker makes it."""
    names = {f.name for f in dataclasses.fields(Execution)}
    if type(data) is not dict or set(data) != names:
        raise ValueError(f"expected an execution's fields {sorted(names)}")
    forward = data["forward"]
    if forward is not None:
        if type(forward) is not list or len(forward) != 3:
            raise ValueError("forward: expected None or 3 arrays (y, h_T, c_T)")
        forward = tuple(_decode_array(a, arrays, name) for a, name in zip(forward, ("y", "h_T", "c_T"), strict=True))
    grads = data["gradients"]
    if grads is not None:
        if type(grads) is not dict:
            raise ValueError("gradients: expected arrays by name")
        grads = {k: _decode_array(v, arrays, f"gradient {k!r:.40}") for k, v in grads.items()}
    for name in _TEXTS:
        if data[name] is not None and type(data[name]) is not str:
            raise ValueError(f"{name}: expected None or a text")
    if phase == "forward" and forward is None and data["forward_error"] is None and data["forward_contract"] is None:
        raise ValueError("forward: neither outputs nor the error that stopped them")
    if type(data["backward_ran"]) is not bool or type(data["traceback"]) is not str \
            or type(data["seconds"]) not in (int, float) or not texts(data["mutated"]) \
            or not texts(data["not_computed"]):
        raise ValueError("backward_ran, traceback, seconds, mutated, not_computed: not of their types")
    return Execution(**{**data, "forward": forward, "gradients": grads, "seconds": float(data["seconds"])})


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
        "structure": info.structure.to_dict(),
        "configurable": bool(info.configurable), "structures": sorted(plain_text(f) for f in info.structures),
        "dtypes_declared": bool(info.dtypes_declared),
    }


def decode_info(data: Any) -> ImplementationInfo:
    """The ImplementationInfo a worker sent as plain data, rebuilt through the constructors and checked
    as ``validate`` checks it; ``ValueError`` saying what is wrong."""
    keys = {"name", "variant", "dtypes", "has_backward", "ln_eps", "limits", "structure", "configurable",
            "structures", "dtypes_declared"}
    if type(data) is not dict or set(data) != keys:
        raise ValueError(f"expected an implementation's description {sorted(keys)}")
    if type(data["name"]) is not str or type(data["variant"]) is not str or data["variant"] not in VARIANTS:
        raise ValueError("name, variant: not a text, or not a variant")
    dtypes = data["dtypes"]
    if not texts(dtypes) or not dtypes or not set(dtypes) <= set(DEFAULT_DTYPES):
        raise ValueError(f"dtypes: expected some of {DEFAULT_DTYPES}")
    eps = data["ln_eps"]
    if type(eps) not in (int, float) or not math.isfinite(eps) or eps <= 0:
        raise ValueError("ln_eps: expected a positive finite float")
    limits = data["limits"]
    if type(limits) is not dict or set(limits) != {"unchecked", "zero"} or not texts(limits["zero"]) \
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
    if not texts(features) or not set(features) <= set(FEATURES):
        raise ValueError(f"structures: expected features among {FEATURES}")
    flags = (data["has_backward"], data["configurable"], data["dtypes_declared"])
    if not all(type(f) is bool for f in flags):
        raise ValueError("has_backward, configurable, dtypes_declared: expected booleans")
    return ImplementationInfo(
        name=data["name"], variant=data["variant"], dtypes=tuple(dtypes), has_backward=data["has_backward"],
        ln_eps=float(eps), limits=Limits(zero=tuple(limits["zero"]), unchecked=dict(limits["unchecked"])),
        structure=built, configurable=data["configurable"], structures=frozenset(features),
        dtypes_declared=data["dtypes_declared"])
