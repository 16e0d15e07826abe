"""The contract every LSTM implementation and oracle speaks.

Shapes are time-major: ``x`` (T, B, D); ``h0``, ``c0`` (B, H); outputs ``y`` (T, B, H), ``h_T`` and
``c_T`` (B, H). Gate blocks of every (4H, ...) parameter are stacked in the order i, f, g, o.

A *variant* is a name plus its parameter set (:data:`VARIANTS`). Each parameter carries, beside its
shape, the names of its axes, so that a discrepancy anywhere can be decoded into named coordinates
(``gate=f, unit=2, input=0``) by :mod:`harness.compare` without special cases.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from harness.limits import Limits
from harness.structure import Structure

__all__ = [
    "GATES",
    "LN_ROWS",
    "VARIANTS",
    "DEFAULT_DTYPES",
    "DEFAULT_LN_EPS",
    "ArraySpec",
    "VariantSpec",
    "LSTMImplementation",
    "ImplementationInfo",
    "ContractError",
    "validate",
    "check_inputs",
    "check_dtype",
    "check_upstream",
    "input_specs",
    "output_specs",
    "gradient_keys",
    "param_shapes",
    "quantity_specs",
    "quantities",
    "DIRECTIONS",
    "FORWARD_QUANTITIES",
    "to_numpy",
]

GATES: tuple[str, ...] = ("i", "f", "g", "o")
#: Rows of the LayerNorm gains and shifts: one per gate, then the cell state.
LN_ROWS: tuple[str, ...] = ("i", "f", "g", "o", "c")
DEFAULT_DTYPES: tuple[str, ...] = ("float64", "float32")
DEFAULT_LN_EPS = 1e-5


@dataclass(frozen=True)
class ArraySpec:
    """One named array: its shape in symbols and the name of each axis.

    Shape symbols are ``T``, ``B``, ``D``, ``H``, ``4H`` or a literal integer string such as ``"5"``.
    Axis names are the coordinates a discrepancy is reported in: ``t``, ``batch``, ``unit``,
    ``input`` (an element of x_t), ``unit_in`` (an element of h_{t-1}), ``gate_unit`` (a row of a
    stacked (4H, ...) block, decoded to gate and unit) and ``ln_row`` (a LayerNorm row i, f, g, o, c).
    """

    name: str
    shape: tuple[str, ...]
    axes: tuple[str, ...]

    def concrete_shape(self, *, T: int, B: int, D: int, H: int) -> tuple[int, ...]:
        sizes = {"T": T, "B": B, "D": D, "H": H, "4H": 4 * H}
        return tuple(sizes[s] if s in sizes else int(s) for s in self.shape)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    params: tuple[ArraySpec, ...]
    equations: str

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param_shapes(self, *, D: int, H: int) -> dict[str, tuple[int, ...]]:
        return {p.name: p.concrete_shape(T=0, B=0, D=D, H=H) for p in self.params}


_W = ArraySpec("W", ("4H", "D"), ("gate_unit", "input"))
_R = ArraySpec("R", ("4H", "H"), ("gate_unit", "unit_in"))
_b = ArraySpec("b", ("4H",), ("gate_unit",))

VARIANTS: dict[str, VariantSpec] = {
    "vanilla": VariantSpec(
        "vanilla",
        (_W, _R, _b),
        "a_t = W x_t + R h_{t-1} + b; i,f,o = sigmoid(a_i,a_f,a_o); g = tanh(a_g); "
        "c_t = f*c_{t-1} + i*g; h_t = o*tanh(c_t)",
    ),
    "peephole": VariantSpec(
        "peephole",
        (
            _W,
            _R,
            _b,
            ArraySpec("p_i", ("H",), ("unit",)),
            ArraySpec("p_f", ("H",), ("unit",)),
            ArraySpec("p_o", ("H",), ("unit",)),
        ),
        "i = sigmoid(a_i + p_i*c_{t-1}); f = sigmoid(a_f + p_f*c_{t-1}); g = tanh(a_g); "
        "c_t = f*c_{t-1} + i*g; o = sigmoid(a_o + p_o*c_t); h_t = o*tanh(c_t)",
    ),
    "layernorm": VariantSpec(
        "layernorm",
        (
            _W,
            _R,
            ArraySpec("gamma", ("5", "H"), ("ln_row", "unit")),
            ArraySpec("beta", ("5", "H"), ("ln_row", "unit")),
        ),
        "a_t = W x_t + R h_{t-1}; i,f,o = sigmoid(LN_k(a_k)); g = tanh(LN_g(a_g)); "
        "c_t = LN_c(f*c_{t-1} + i*g); h_t = o*tanh(c_t)",
    ),
}

_INPUTS = (
    ArraySpec("x", ("T", "B", "D"), ("t", "batch", "input")),
    ArraySpec("h0", ("B", "H"), ("batch", "unit")),
    ArraySpec("c0", ("B", "H"), ("batch", "unit")),
)
_OUTPUTS = (
    ArraySpec("y", ("T", "B", "H"), ("t", "batch", "unit")),
    ArraySpec("h_T", ("B", "H"), ("batch", "unit")),
    ArraySpec("c_T", ("B", "H"), ("batch", "unit")),
)


def _variant(variant: str) -> VariantSpec:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}"
        ) from None


def param_shapes(variant: str, structure: Structure | None = None, *, D: int, H: int) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``variant`` in ``structure`` (default: one layer, one direction) by its name, in
    report order: cell by cell (layer, then direction, as :meth:`Structure.cells` lists them), each
    cell's parameters in the variant's order, then ``proj`` when there is a projection."""
    structure = structure or Structure()
    own = _variant(variant).param_shapes(D=D, H=H)
    out: dict[str, tuple[int, ...]] = {}
    for layer, _direction, prefix in structure.cells():
        for name, shape in structure.cell_param_shapes(own, layer=layer, D=D, H=H).items():
            out[prefix + name] = shape
    return out


def input_specs() -> tuple[ArraySpec, ...]:
    return _INPUTS


def output_specs() -> tuple[ArraySpec, ...]:
    return _OUTPUTS


def gradient_keys(variant: str) -> tuple[str, ...]:
    """Keys of the dict ``backward`` returns: the inputs, then the variant's parameters."""
    return tuple(s.name for s in _INPUTS) + _variant(variant).param_names


def quantity_specs(variant: str) -> dict[str, ArraySpec]:
    """Every compared quantity by its report name: ``y``, ``h_T``, ``c_T``, ``dx``, ``dW``, ..."""
    specs = {s.name: s for s in _OUTPUTS}
    for s in _INPUTS + _variant(variant).params:
        specs["d" + s.name] = ArraySpec("d" + s.name, s.shape, s.axes)
    return specs


#: The two directions of a check, in report order.
DIRECTIONS: tuple[str, ...] = ("forward", "backward")
#: What a forward pass returns, in order: the quantities of the forward direction.
FORWARD_QUANTITIES: tuple[str, ...] = tuple(s.name for s in _OUTPUTS)


def quantities(variant: str, direction: str) -> tuple[str, ...]:
    """The quantities one direction of a check compares, in report order: ``y, h_T, c_T`` forward;
    ``dx, dh0, dc0`` and one per parameter backward."""
    if direction == "forward":
        return FORWARD_QUANTITIES
    if direction != "backward":
        raise ValueError(f"direction: expected 'forward' or 'backward', got {direction!r}")
    return tuple("d" + k for k in gradient_keys(variant))


class ContractError(Exception):
    """An object does not meet the contract; ``problems`` lists each thing to fix."""

    def __init__(self, problems: list[str], *, subject: str = "implementation"):
        self.problems = list(problems)
        self.subject = subject
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{subject} does not meet the lstm-harness contract:\n{lines}")


@runtime_checkable
class LSTMImplementation(Protocol):
    """What an implementation provides. ``backward``, ``name``, ``dtypes``, ``ln_eps`` and ``limits`` (a
    :class:`harness.Limits`) are optional.

    ``forward(x, h0, c0, params) -> (y, h_T, c_T, cache)``
    ``backward(dy, dh_T, dc_T, cache) -> {"x": dx, "h0": dh0, "c0": dc0, <param>: d<param>, ...}``
    """

    variant: str

    def forward(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, params: Mapping[str, np.ndarray]) -> Any:
        ...


@dataclass(frozen=True)
class ImplementationInfo:
    """What :func:`validate` read off an implementation object."""

    name: str
    variant: str
    dtypes: tuple[str, ...]
    has_backward: bool
    ln_eps: float
    #: What the implementation declared it cannot do (its ``limits`` attribute; nothing by default).
    limits: Limits = field(default_factory=Limits)
    #: Whether it declares its dtypes (a ``dtypes`` attribute, or an adapter given ``dtypes=``); when it does
    #: not, :func:`harness.certify` checks which dtypes it computes in as written.
    dtypes_declared: bool = True


def _accepts_positional(fn: Any, n: int) -> str | None:
    """None if ``fn`` can be called with ``n`` positional arguments, else why not."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins and C extensions: nothing to check, trust the call
    try:
        sig.bind(*range(n))
    except TypeError as exc:
        return f"takes {sig} ({exc})"
    return None


def validate(obj: Any, *, variant: str | None = None) -> ImplementationInfo:
    """Check a loaded object against the contract; raise :class:`ContractError` listing every problem.

    ``variant`` overrides the object's declared variant (the ``--variant`` option).
    """
    problems: list[str] = []
    name = getattr(obj, "name", None) or type(obj).__name__
    if not isinstance(name, str):
        problems.append(f"name: expected a str, got {type(name).__name__}")
        name = type(obj).__name__

    declared = variant if variant is not None else getattr(obj, "variant", None)
    if declared is None:
        problems.append(f"variant: missing; expected an attribute variant, one of {sorted(VARIANTS)}")
    elif declared not in VARIANTS:
        problems.append(f"variant: expected one of {sorted(VARIANTS)}, got {declared!r}")

    forward = getattr(obj, "forward", None)
    if forward is None:
        problems.append("forward: missing; expected a method forward(x, h0, c0, params)")
    elif not callable(forward):
        problems.append(f"forward: expected a callable, got {type(forward).__name__}")
    else:
        why = _accepts_positional(forward, 4)
        if why:
            problems.append(f"forward: expected forward(x, h0, c0, params), but it {why}")

    backward = getattr(obj, "backward", None)
    if backward is not None:
        if not callable(backward):
            problems.append(f"backward: expected a callable or no attribute, got {type(backward).__name__}")
        else:
            why = _accepts_positional(backward, 4)
            if why:
                problems.append(f"backward: expected backward(dy, dh_T, dc_T, cache), but it {why}")

    dtypes = getattr(obj, "dtypes", DEFAULT_DTYPES)
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    try:
        dtypes = tuple(np.dtype(d).name for d in dtypes)
    except TypeError as exc:
        problems.append(f"dtypes: expected a sequence of dtype names such as ('float64', 'float32'), {exc}")
        dtypes = ()
    bad = [d for d in dtypes if d not in DEFAULT_DTYPES]
    if bad:
        problems.append(f"dtypes: expected a subset of {DEFAULT_DTYPES}, got {bad}")
    if not dtypes and not bad:
        problems.append("dtypes: expected at least one of ('float64', 'float32'), got an empty sequence")

    ln_eps = getattr(obj, "ln_eps", DEFAULT_LN_EPS)
    if not isinstance(ln_eps, (int, float)) or not ln_eps > 0:
        problems.append(f"ln_eps: expected a positive float, got {ln_eps!r}")
        ln_eps = DEFAULT_LN_EPS

    limits = getattr(obj, "limits", None)
    if limits is None:
        limits = Limits()
    elif not isinstance(limits, Limits):
        problems.append(f"limits: expected a harness.Limits (what the implementation cannot do) or no attribute, "
                        f"got {type(limits).__name__}")
        limits = Limits()

    if problems:
        raise ContractError(problems, subject=f"implementation {name!r}")
    return ImplementationInfo(
        name=name,
        variant=declared,  # type: ignore[arg-type]
        dtypes=dtypes,
        has_backward=backward is not None,
        ln_eps=float(ln_eps),
        limits=limits,
        dtypes_declared=bool(getattr(obj, "dtypes_declared", hasattr(obj, "dtypes"))),
    )


def check_inputs(
    variant: str, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, params: Mapping[str, np.ndarray]
) -> tuple[int, int, int, int]:
    """Validate forward inputs for ``variant``; return (T, B, D, H).

    Raises ``ValueError`` naming the argument, the expected shape and the received one, so that the
    built-in implementations (and any user who calls this) fail with a message that says what to fix.
    """
    spec = _variant(variant)
    for arg, value in (("x", x), ("h0", h0), ("c0", c0)):
        if not hasattr(value, "shape"):
            raise ValueError(f"{arg}: expected an array, got {type(value).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x: expected shape (T, B, D), got {tuple(x.shape)} ({x.ndim} dimensions)")
    T, B, D = x.shape
    if h0.ndim != 2:
        raise ValueError(f"h0: expected shape (B, H) = ({B}, H), got {tuple(h0.shape)}")
    H = h0.shape[1]
    if min(T, B, D, H) < 1:
        raise ValueError(f"x, h0: expected T, B, D, H >= 1, got T={T}, B={B}, D={D}, H={H}")
    expected = {"h0": (B, H), "c0": (B, H)}
    for arg, value in (("h0", h0), ("c0", c0)):
        if tuple(value.shape) != expected[arg]:
            raise ValueError(f"{arg}: expected shape {expected[arg]} (B, H), got {tuple(value.shape)}")
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a dict of arrays {spec.param_names}, got {type(params).__name__}")
    missing = [n for n in spec.param_names if n not in params]
    extra = [n for n in params if n not in spec.param_names]
    if missing or extra:
        raise ValueError(
            f"params: expected keys {spec.param_names} for variant {variant!r}; "
            f"missing {missing}, unexpected {extra}"
        )
    for p in spec.params:
        want = p.concrete_shape(T=T, B=B, D=D, H=H)
        got = tuple(np.shape(params[p.name]))
        if got != want:
            raise ValueError(f"params[{p.name!r}]: expected shape {want} {p.shape}, got {got}")
    return T, B, D, H


def to_numpy(value: Any) -> np.ndarray:
    """Convert an implementation's output to NumPy: ndarray, CuPy (``.get()``), DLPack or ``__array__``."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "get") and hasattr(value, "__cuda_array_interface__"):
        return np.asarray(value.get())
    if hasattr(value, "__dlpack__") and not hasattr(value, "__array__"):
        return np.from_dlpack(value)
    if hasattr(value, "__array__") or isinstance(value, (list, tuple, float, int, np.generic)):
        return np.asarray(value)
    if hasattr(value, "__dlpack__"):
        return np.from_dlpack(value)
    raise TypeError(
        f"expected a NumPy array or something convertible to one (__array__, __dlpack__, .get()), "
        f"got {type(value).__module__}.{type(value).__name__}"
    )


def check_dtype(impl: Any, x: Any) -> np.dtype:
    """The compute dtype is the dtype of ``x``; it must be one ``impl.dtypes`` declares. Returns it.

    Raises ``ValueError`` naming ``x``, the dtypes accepted and the one received.
    """
    dtype = np.dtype(x.dtype)
    if dtype.name not in impl.dtypes:
        raise ValueError(f"x: expected dtype {' or '.join(impl.dtypes)}, got {dtype.name}")
    return dtype


def check_upstream(dy: Any, dh_T: Any, dc_T: Any, *, T: int, B: int, H: int) -> None:
    """Validate backward's upstream gradients against the forward's shapes: dy (T, B, H), dh_T and dc_T (B, H).

    Raises ``ValueError`` naming the argument, the expected shape and the received one.
    """
    for arg, value, want in (("dy", dy, (T, B, H)), ("dh_T", dh_T, (B, H)), ("dc_T", dc_T, (B, H))):
        got = tuple(np.shape(value))
        if got != want:
            raise ValueError(f"{arg}: expected shape {want} (the shape of the forward's output), got {got}")
