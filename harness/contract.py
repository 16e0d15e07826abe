"""The contract every LSTM implementation and oracle speaks.

Shapes are time-major: ``x`` (T, B, D); ``h0``, ``c0`` (B, H); outputs ``y`` (T, B, H), ``h_T`` and
``c_T`` (B, H). Gate blocks of every (4H, ...) parameter are stacked in the order i, f, g, o.

A *variant* is a name plus its parameter set (:data:`VARIANTS`). Each parameter carries, beside its
shape, the names of its axes, so that a discrepancy anywhere can be decoded into named coordinates
(``gate=f, unit=2, input=0``) by :mod:`harness.compare` without special cases.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from harness.limits import Limits
from harness.structure import FEATURES, Structure

__all__ = [
    "declared_structure",
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
    "is_dtype",
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

    Shape symbols are ``T``, ``B``, ``D``, ``H``, ``4H``, ``2H`` or a literal integer string such as
    ``"5"``. Axis names are the coordinates a discrepancy is reported in: ``t``, ``batch``, ``unit``,
    ``input`` (an element of x_t), ``unit_in`` (an element of h_{t-1}), ``gate_unit`` (a row of a
    stacked (4H, ...) block, decoded to gate and unit), ``ln_row`` (a LayerNorm row i, f, g, o, c),
    and in a layered structure (:mod:`harness.structure`) ``layer_dir`` (the states' leading axis,
    decoded to layer and direction), ``dir_unit`` (y's features, decoded to direction and unit) and
    ``h_unit`` (a projection's row: an element of the projected h). ``dirs`` is the structure's number
    of directions, which those two decodings need; a prefixed name (``dl1.reverse.W``) adds its own
    layer and direction (:func:`harness.structure.parse_prefix`).
    """

    name: str
    shape: tuple[str, ...]
    axes: tuple[str, ...]
    dirs: int = 1

    def concrete_shape(self, *, T: int, B: int, D: int, H: int) -> tuple[int, ...]:
        sizes = {"T": T, "B": B, "D": D, "H": H, "4H": 4 * H, "2H": 2 * H}
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


def gradient_keys(variant: str, structure: Structure | None = None) -> tuple[str, ...]:
    """Keys of the dict ``backward`` returns: the inputs, then every parameter of ``variant`` in
    ``structure`` (default: one layer, one direction), prefixed when the structure is layered."""
    return tuple(s.name for s in _INPUTS) + tuple(param_shapes(variant, structure, D=1, H=1))


_Specs = tuple[tuple[ArraySpec, ...], tuple[ArraySpec, ...], tuple[ArraySpec, ...]]


def _structured_specs(variant: str, structure: Structure) -> _Specs:
    """Inputs, outputs and parameters of ``variant`` in a structure other than the default: shapes in
    symbols (literal numbers where the structure fixes them), axes that decode to layer and direction."""
    dirs = structure.dirs
    H_out = str(structure.proj_size) if structure.proj_size else "H"
    y_width = H_out if dirs == 1 else (str(2 * structure.proj_size) if structure.proj_size else "2H")
    if structure.layered:
        n = str(structure.num_layers * dirs)
        states = (ArraySpec("h0", (n, "B", H_out), ("layer_dir", "batch", "unit"), dirs),
                  ArraySpec("c0", (n, "B", "H"), ("layer_dir", "batch", "unit"), dirs))
        finals = (ArraySpec("h_T", (n, "B", H_out), ("layer_dir", "batch", "unit"), dirs),
                  ArraySpec("c_T", (n, "B", "H"), ("layer_dir", "batch", "unit"), dirs))
    else:
        states = (ArraySpec("h0", ("B", H_out), ("batch", "unit")), _INPUTS[2])
        finals = (ArraySpec("h_T", ("B", H_out), ("batch", "unit")), _OUTPUTS[2])
    y_axes = ("t", "batch", "dir_unit") if dirs == 2 else ("t", "batch", "unit")
    own = {p.name: p for p in _variant(variant).params}
    params = []
    shape: tuple[str, ...]
    for layer, _direction, prefix in structure.cells():
        inputs = "D" if layer == 0 else y_width
        for name in (*own, *(("proj",) if structure.proj_size else ())):
            if name == "W":
                shape, axes = ("4H", inputs), own["W"].axes
            elif name == "R":
                shape, axes = ("4H", H_out), own["R"].axes
            elif name == "proj":
                shape, axes = (str(structure.proj_size), "H"), ("h_unit", "unit")
            else:
                shape, axes = own[name].shape, own[name].axes
            params.append(ArraySpec(prefix + name, shape, axes, dirs))
    x = ArraySpec("x", _INPUTS[0].shape, _INPUTS[0].axes, dirs)
    return (x, *states), (ArraySpec("y", ("T", "B", y_width), y_axes, dirs), *finals), tuple(params)


def quantity_specs(variant: str, structure: Structure | None = None) -> dict[str, ArraySpec]:
    """Every compared quantity by its report name: ``y``, ``h_T``, ``c_T``, ``dx``, ``dW``, ...; in a
    layered structure the parameters' gradients are named after their prefixed keys (``dl1.reverse.W``)."""
    inputs: tuple[ArraySpec, ...]
    outputs: tuple[ArraySpec, ...]
    params: tuple[ArraySpec, ...]
    if structure is None or structure.replace(lengths=False).is_default:
        inputs, outputs, params = _INPUTS, _OUTPUTS, _variant(variant).params
    else:
        inputs, outputs, params = _structured_specs(variant, structure)
    specs = {s.name: s for s in outputs}
    for s in (*inputs, *params):
        specs["d" + s.name] = ArraySpec("d" + s.name, s.shape, s.axes, s.dirs)
    return specs


#: The two directions of a check, in report order.
DIRECTIONS: tuple[str, ...] = ("forward", "backward")
#: What a forward pass returns, in order: the quantities of the forward direction.
FORWARD_QUANTITIES: tuple[str, ...] = tuple(s.name for s in _OUTPUTS)


def quantities(variant: str, direction: str, structure: Structure | None = None) -> tuple[str, ...]:
    """The quantities one direction of a check compares, in report order: ``y, h_T, c_T`` forward;
    ``dx, dh0, dc0`` and one per parameter (of ``structure``, prefixed when it is layered) backward."""
    if direction == "forward":
        return FORWARD_QUANTITIES
    if direction != "backward":
        raise ValueError(f"direction: expected 'forward' or 'backward', got {direction!r}")
    return tuple("d" + k for k in gradient_keys(variant, structure))


def is_torch_module(obj: Any) -> bool:
    """Whether ``obj`` is a PyTorch ``nn.Module``, without importing torch (a module that is one has it loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _module_hint(obj: Any) -> str:
    """For a PyTorch ``nn.Module`` that is not written to the contract: how it is certified as it is, with
    its parameters' names to map."""
    if not is_torch_module(obj):
        return ""
    try:
        named = [f"{n} {tuple(p.shape)}" for n, p in obj.named_parameters()]
    except Exception:  # noqa: BLE001 - only the hint's list is lost
        named = []
    listed = ", ".join(named[:8]) + (", ..." if len(named) > 8 else "")
    which = f"{type(obj).__name__} is a PyTorch nn.Module" + (f" (parameters {listed})" if listed else "")
    return (f"hint: {which}: certify it as it is through harness.adapt(module, names={{'W': ..., 'R': ..., "
            f"'b': ...}}, ...), called as module(x, (h0, c0)) with its gradients from autograd; on the command line "
            f"the same as options, e.g. "
            f"--names W=<its input weights>,R=<its recurrent weights>,b=<its bias>, and --layout BTD if it is "
            f"batch-first (README, 'A PyTorch nn.Module')")


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
    #: The layer structure it declared (num_layers, bidirectional, accepts_lengths, proj_size,
    #: coupled_input_forget, cell_clip): the structure of every case it gets, unless it is configurable.
    structure: Structure = field(default_factory=Structure)
    #: It has ``with_structure(structure)`` (and no ``configurable = False``): the harness draws structures
    #: for it and configures it per case.
    configurable: bool = False
    #: The structure features (:data:`harness.structure.FEATURES`) a configurable implementation computes
    #: (its ``structures`` attribute; all of them by default): drawn structures use no other.
    structures: frozenset[str] = frozenset(FEATURES)
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

    structure = _declared_structure(obj, declared if declared in VARIANTS else None, problems)
    configure = getattr(obj, "with_structure", None)
    if configure is not None and not callable(configure):
        problems.append(f"with_structure: expected a method with_structure(structure) returning a configured "
                        f"implementation, or no attribute, got {type(configure).__name__}")

    computes = getattr(obj, "structures", FEATURES)
    if isinstance(computes, str) or not isinstance(computes, (tuple, list, set, frozenset)) \
            or set(computes) - set(FEATURES):
        problems.append(f"structures: expected the structure features it computes, a subset of {FEATURES}, "
                        f"got {computes!r}")
        computes = FEATURES

    if problems:
        hint = _module_hint(obj)
        raise ContractError(problems + ([hint] if hint else []), subject=f"implementation {name!r}")
    return ImplementationInfo(
        name=name,
        variant=declared,  # type: ignore[arg-type]
        dtypes=dtypes,
        has_backward=backward is not None,
        ln_eps=float(ln_eps),
        limits=limits,
        structure=structure,
        configurable=configure is not None and getattr(obj, "configurable", True) is not False,
        structures=frozenset(computes),
        dtypes_declared=bool(getattr(obj, "dtypes_declared", hasattr(obj, "dtypes"))),
    )


#: Declared attribute -> Structure field, for the attributes whose names differ.
_STRUCTURE_ATTRIBUTES = {"accepts_lengths": "lengths"}


def _declared_structure(obj: Any, variant: str | None, problems: list[str]) -> Structure:
    """The structure ``obj`` declares by its attributes (the defaults where it declares none); what is
    wrong with it goes into ``problems``, named by the attribute."""
    fields = ("num_layers", "bidirectional", "accepts_lengths", "proj_size", "coupled_input_forget", "cell_clip")
    declared = {_STRUCTURE_ATTRIBUTES.get(a, a): getattr(obj, a) for a in fields if hasattr(obj, a)}
    if isinstance(declared.get("num_layers"), np.integer):
        declared["num_layers"] = int(declared["num_layers"])
    if isinstance(declared.get("proj_size"), np.integer):
        declared["proj_size"] = int(declared["proj_size"])
    if isinstance(declared.get("cell_clip"), (int, np.floating)) and not isinstance(declared["cell_clip"], bool):
        declared["cell_clip"] = float(declared["cell_clip"])
    structure = Structure(**declared)
    bad = structure.problems(variant)
    renamed = {field_name: attr for attr, field_name in _STRUCTURE_ATTRIBUTES.items()}
    for problem in bad:
        head, _, rest = problem.partition(":")
        problems.append(f"{renamed.get(head, head)}:{rest}")
    return Structure() if bad else structure


def declared_structure(obj: Any, *, variant: str | None = None) -> Structure:
    """The layer structure ``obj`` declares by its attributes (num_layers, bidirectional, accepts_lengths,
    proj_size, coupled_input_forget, cell_clip), as :func:`validate` reads it; a ValueError names each bad
    attribute."""
    problems: list[str] = []
    structure = _declared_structure(obj, variant, problems)
    if problems:
        raise ValueError("; ".join(problems))
    return structure


def check_inputs(
    variant: str, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, params: Mapping[str, np.ndarray], *,
    structure: Structure | None = None, lengths: Any = None,
) -> tuple[int, int, int, int]:
    """Validate forward inputs for ``variant`` in ``structure`` (default: one layer, one direction, no
    lengths); return (T, B, D, H), H the cell's hidden size (c0's last axis).

    Raises ``ValueError`` naming the argument, the expected shape and the received one, so that the
    built-in implementations (and any user who calls this) fail with a message that says what to fix.
    """
    if (structure is not None and not structure.is_default) or lengths is not None:
        return _check_structured_inputs(variant, x, h0, c0, params, structure or Structure(), lengths)
    spec = _variant(variant)
    T, B, D = _sequence_shape(x, h0, c0)
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


def _sequence_shape(x: Any, h0: Any, c0: Any) -> tuple[int, int, int]:
    """(T, B, D) of x, once x, h0 and c0 are arrays and x is (T, B, D); else a ValueError naming which."""
    for arg, value in (("x", x), ("h0", h0), ("c0", c0)):
        if not hasattr(value, "shape"):
            raise ValueError(f"{arg}: expected an array, got {type(value).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x: expected shape (T, B, D), got {tuple(x.shape)} ({x.ndim} dimensions)")
    T, B, D = x.shape
    return T, B, D


def _check_structured_inputs(variant: str, x: Any, h0: Any, c0: Any, params: Any, structure: Structure,
                             lengths: Any) -> tuple[int, int, int, int]:
    """:func:`check_inputs` for a structure other than the default (or with lengths)."""
    problems = structure.problems(variant)
    if problems:
        raise ValueError("structure: " + "; ".join(problems))
    T, B, D = _sequence_shape(x, h0, c0)
    n_state = 3 if structure.layered else 2
    if c0.ndim != n_state:
        layout = "(L * dirs, B, H)" if structure.layered else "(B, H)"
        raise ValueError(f"c0: expected shape {layout} for structure {structure.describe()!r}, got {tuple(c0.shape)}")
    H = c0.shape[-1]
    if min(T, B, D, H) < 1:
        raise ValueError(f"x, c0: expected T, B, D, H >= 1, got T={T}, B={B}, D={D}, H={H}")
    states = structure.state_shapes(B=B, H=H)
    for arg, value in (("h0", h0), ("c0", c0)):
        if tuple(value.shape) != states[arg]:
            raise ValueError(f"{arg}: expected shape {states[arg]} for structure {structure.describe()!r} "
                             f"(B={B}, H={H}), got {tuple(value.shape)}")
    shapes = param_shapes(variant, structure, D=D, H=H)
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a dict of arrays {tuple(shapes)}, got {type(params).__name__}")
    missing = [n for n in shapes if n not in params]
    extra = [n for n in params if n not in shapes]
    if missing or extra:
        raise ValueError(f"params: expected keys {tuple(shapes)} for variant {variant!r} in structure "
                         f"{structure.describe()!r}; missing {missing}, unexpected {extra}")
    for name, want in shapes.items():
        got = tuple(np.shape(params[name]))
        if got != want:
            raise ValueError(f"params[{name!r}]: expected shape {want}, got {got}")
    _check_lengths(lengths, structure, T=T, B=B)
    return T, B, D, H


def _check_lengths(lengths: Any, structure: Structure, *, T: int, B: int) -> None:
    """lengths: None, or (B,) integers in 1..T when the structure has lengths."""
    if lengths is None:
        return
    if not structure.lengths:
        raise ValueError("lengths: expected None (this structure does not take lengths: accepts_lengths is "
                         f"False), got {type(lengths).__name__}")
    arr = np.asarray(lengths)
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},) (B,), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths: expected integers (int64), got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 1) | (arr > T))
    if bad.size:
        raise ValueError(f"lengths: expected every value in 1..T = 1..{T}, got lengths[{bad[0]}] = {arr[bad[0]]}")


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


def is_dtype(actual: Any, dtype: Any) -> bool:
    """Whether an array's dtype ``actual`` is the contract's ``dtype``: the byte order is not part of it
    (a big-endian float64 array holds float64 values, and a program's .npy files are read in either order)."""
    return np.dtype(actual).newbyteorder("=") == np.dtype(dtype)


def check_dtype(impl: Any, x: Any) -> np.dtype:
    """The compute dtype is the dtype of ``x``; it must be one ``impl.dtypes`` declares. Returns it.

    Raises ``ValueError`` naming ``x``, the dtypes accepted and the one received.
    """
    dtype = np.dtype(x.dtype)
    if dtype.name not in impl.dtypes:
        raise ValueError(f"x: expected dtype {' or '.join(impl.dtypes)}, got {dtype.name}")
    return dtype


def check_upstream(
    dy: Any, dh_T: Any, dc_T: Any, *, T: int, B: int, H: int, structure: Structure | None = None
) -> None:
    """Validate backward's upstream gradients against the forward's shapes: dy (T, B, H), dh_T and dc_T (B, H)
    in the default structure; in ``structure``, dy as its :meth:`~Structure.output_shape` and dh_T, dc_T as its
    :meth:`~Structure.state_shapes` (H is the cell's hidden size).

    Raises ``ValueError`` naming the argument, the expected shape and the received one.
    """
    if structure is None:
        expected: tuple[tuple[str, Any, tuple[int, ...]], ...] = (
            ("dy", dy, (T, B, H)), ("dh_T", dh_T, (B, H)), ("dc_T", dc_T, (B, H)))
    else:
        states = structure.state_shapes(B=B, H=H)
        expected = (("dy", dy, structure.output_shape(T=T, B=B, H=H)), ("dh_T", dh_T, states["h0"]),
                    ("dc_T", dc_T, states["c0"]))
    for arg, value, want in expected:
        got = tuple(np.shape(value))
        if got != want:
            raise ValueError(f"{arg}: expected shape {want} (the shape of the forward's output), got {got}")
