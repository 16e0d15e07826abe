"""Every weight layout and gate order people store an LSTM in, converted to and from the canonical one.

Canonical parameters (:mod:`harness.contract`): ``W`` (4H, D), ``R`` (4H, H), ``b`` (4H,), gate blocks
stacked in the order i, f, g, o; the peephole variant adds ``p_i``, ``p_f``, ``p_o`` (H,) and the
LayerNorm variant has ``gamma``, ``beta`` (5, H) instead of ``b``.

The same LSTM elsewhere (every gate order below was checked numerically against the framework, see
``tests/test_layouts.py``, not taken from documentation alone):

================  =====================================================  ==========  ============
layout            arrays                                                 gate order  bias
================  =====================================================  ==========  ============
PyTorch nn.LSTM   weight_ih_l0 (4H, D), weight_hh_l0 (4H, H)             i f g o     ih + hh
Keras 3 LSTM      kernel (D, 4H), recurrent_kernel (H, 4H), bias (4H,)   i f c o     one
TF BlockLSTMV2    w (D+H, 4H) over [x, h], b (4H,), wci/wcf/wco (H,)     i f c o     one
TF BlockLSTM/TF1  w (D+H, 4H), b (4H,); runtime forget_bias added to f   i c f o     b + fb on f
ONNX LSTM         W (1, 4H, D), R (1, 4H, H), B (1, 8H) = [Wb, Rb],      i o f c     Wb + Rb
                  P (1, 3H) peepholes ordered i, o, f
bias folded       (4H, 1+D+H) over [1, x, h], or its transpose           any         column 0
course exercise   Wx (D, 4H), Wh (H, 4H), b (4H,), batch-major x         i f o g     one
per gate (TMVA)   W_i (H, D), R_i (H, H), b_i (H,), ... for each gate    by name     one per gate
per gate, concat  W_i (H, H+D) over [h; x] (or [x; h]), b_i (H,), ...    by name     one per gate
================  =====================================================  ==========  ============

Per-gate layouts keep one matrix (and one bias) for each gate instead of stacking them: ROOT's TMVA
has an input-weight and a state-weight matrix per gate; deeplearning.ai's course has ``Wf`` (H, H+D)
acting on ``concat(a_prev, x_t)`` with ``bf``, and likewise for i, c, o. Their keys are ``W_<gate>``,
``R_<gate>`` and ``b_<gate>`` by the canonical gate letters i, f, g, o.

Gate letters: ``c`` (Keras, cuDNN, ONNX) and ``j`` (TF1) name the same block as ``g``, the cell
candidate. Frameworks that split the bias in two (PyTorch, ONNX) only ever use the sum; converting
to them puts the whole bias in the first half and zeros in the second, and converting back sums.

Gradients convert exactly like the arrays they are gradients of, since every conversion only moves
and transposes blocks; the one exception is a split bias, whose two halves each have the gradient
dL/db (use one half, not their sum). ``from_keras(dkernel, drecurrent_kernel, dbias)`` turns Keras
gradients into canonical ones, and so on.

Whole layers (:mod:`harness.structure`: stacked layers, both directions, a projection) are stored by
each framework cell by cell, in its own naming; the canonical names are ``l{k}.W``, ``l{k}.reverse.W``,
... (unprefixed for one layer, one direction), and :func:`cell_params` / :func:`join_cells` split and
join them:

================  ==========================================================================
PyTorch nn.LSTM   ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, and
                  ``weight_hr_l{k}`` (= proj) with ``proj_size``; the reverse direction's names end
                  in ``_reverse``. ``to_torch(params, structure)`` / ``from_torch(sd, structure)``.
ONNX LSTM         one node per layer: W (dirs, 4H, D_in), R (dirs, 4H, H), B (dirs, 8H), P (dirs,
                  3H), forward direction first; a layer's Y (T, dirs, B, H) is the next layer's X
                  as (T, B, dirs*H) (:func:`onnx_layer_output`). ``to_onnx_layer`` / ``from_onnx_layer``.
Keras 3           one ``LSTM`` (or ``Bidirectional(LSTM)``) per layer; a Bidirectional layer's
                  weights are the forward layer's [kernel, recurrent_kernel, bias], then the backward
                  layer's. ``to_keras_layers`` / ``from_keras_layers``.
================  ==========================================================================

Every function returns new NumPy arrays (never views of its input) in the input's dtype, and accepts
NumPy arrays or anything ``np.asarray`` takes, including CPU PyTorch tensors and TensorFlow tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from harness.structure import Structure

__all__ = [
    "select_cell",
    "cell_params",
    "join_cells",
    "to_onnx_layer",
    "from_onnx_layer",
    "onnx_layer_output",
    "to_keras_layers",
    "from_keras_layers",
    "GATE_ORDERS",
    "CANONICAL_ORDER",
    "normalize_order",
    "permute_gates",
    "to_torch",
    "torch_names",
    "from_torch",
    "to_keras",
    "from_keras",
    "to_block_lstm_v2",
    "from_block_lstm_v2",
    "to_block_lstm",
    "from_block_lstm",
    "to_onnx",
    "from_onnx",
    "to_bias_folded",
    "from_bias_folded",
    "to_course",
    "from_course",
    "PER_GATE_FORMS",
    "per_gate_keys",
    "to_per_gate",
    "from_per_gate",
    "batch_major",
    "time_major",
    "SEQUENCE_LAYOUTS",
    "normalize_layout",
    "sequence_to",
    "sequence_from",
    "state_to",
    "state_from",
    "STATE_ORDERS",
    "state_order_index",
    "state_order_to",
    "state_order_from",
    "Y_DIRECTIONS",
    "swap_directions",
    "fold_forget_bias",
    "fold_forget_bias_layernorm",
    "permute_layernorm_rows",
]

CANONICAL_ORDER = "ifgo"

#: Gate orders by convention name; 'c' and 'j' are the cell candidate, 'g' in the canonical order.
GATE_ORDERS: dict[str, str] = {
    "canonical": "ifgo",
    "pytorch": "ifgo",
    "keras": "ifco",
    "cudnn": "ifco",
    "block_lstm_v2": "ifco",
    "block_lstm": "icfo",
    "tf1": "ijfo",
    "onnx": "iofc",
    "course": "ifog",
}

_ALIASES = {"c": "g", "j": "g"}
_PEEPHOLES = ("p_i", "p_f", "p_o")


# --------------------------------------------------------------------------------------------------
# helpers


def _array(value: Any, name: str) -> np.ndarray:
    """Any array-like as a NumPy array: NumPy, PyTorch (detached, on CPU), TensorFlow, lists."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, even one that requires grad
        value = value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # tf.Tensor / tf.Variable
        value = value.numpy()
    try:
        out = np.asarray(value)
    except Exception as exc:
        raise ValueError(f"{name}: expected an array, got {type(value).__name__} ({exc})") from None
    if out.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {out.dtype}")
    return out


def _check_shape(a: np.ndarray, name: str, shape: tuple[int | None, ...], text: str) -> None:
    ok = a.ndim == len(shape) and all(
        want is None or got == want for got, want in zip(a.shape, shape, strict=True)
    )
    if not ok:
        raise ValueError(f"{name}: expected shape {text}, got {tuple(a.shape)}")


def _four_h(n: int, name: str, axis_text: str) -> int:
    if n % 4 or n == 0:
        raise ValueError(f"{name}: expected {axis_text} to be 4H (a positive multiple of 4), got {n}")
    return n // 4


def _stacked_weights(W: Any, R: Any, w_name: str, r_name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Input weights W (4H, D) and recurrent weights R (4H, H), gate blocks stacked along rows, checked:
    -> W, R, H."""
    W = _array(W, w_name)
    if W.ndim != 2:
        raise ValueError(f"{w_name}: expected shape (4H, D), got {tuple(W.shape)}")
    H = _four_h(W.shape[0], w_name, "the number of rows")
    R = _array(R, r_name)
    _check_shape(R, r_name, (4 * H, H), f"(4H, H) = ({4 * H}, {H})")
    return W, R, H


def normalize_order(order: str, *, argument: str = "order") -> str:
    """A 4-letter gate order over i, f, g, o ('c' and 'j' read as 'g'), or a name in GATE_ORDERS."""
    if not isinstance(order, str):
        raise ValueError(
            f"{argument}: expected a gate order string such as 'ifgo', got {type(order).__name__}"
        )
    text = GATE_ORDERS.get(order, order).lower()
    norm = "".join(_ALIASES.get(ch, ch) for ch in text)
    if len(norm) != 4 or sorted(norm) != sorted(CANONICAL_ORDER):
        raise ValueError(
            f"{argument}: expected a permutation of the gates i, f, g, o (c or j may stand for g), "
            f"or one of {sorted(GATE_ORDERS)}; got {order!r}"
        )
    return norm


def permute_gates(stacked: Any, src: str, dst: str, axis: int = 0, *, xp: Any = None) -> Any:
    """Reorder the four gate blocks of ``stacked`` along ``axis`` from order ``src`` to order ``dst``.

    ``src`` and ``dst`` are 4-letter strings over i, f, g, o (``c`` and ``j`` are accepted for ``g``)
    or names from :data:`GATE_ORDERS`. ``permute_gates(W, "ifgo", "iofc")`` gives ONNX's row order.

    By default ``stacked`` is anything NumPy can read and the result a NumPy array. With ``xp`` (an
    array namespace such as ``numpy`` or ``cupy``, whose ``split`` and ``concatenate`` are used),
    ``stacked`` is an array of that namespace and is reordered there, on its device, without
    conversion.
    """
    a = _array(stacked, "stacked") if xp is None else stacked
    s = normalize_order(src, argument="src")
    d = normalize_order(dst, argument="dst")
    if a.ndim == 0:
        raise ValueError("stacked: expected an array with a 4H axis, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -a.ndim <= axis < a.ndim:
        raise ValueError(f"axis: expected an axis of a {a.ndim}-dimensional array, got {axis!r}")
    _four_h(a.shape[axis], "stacked", f"the length of axis {axis}")
    xp = np if xp is None else xp
    blocks = xp.split(a, 4, axis=axis)  # four (..., H, ...) blocks
    return xp.concatenate([blocks[s.index(g)] for g in d], axis=axis)


def _canonical(
    params: Mapping[str, Any], *, need_bias: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (4H, D), R (4H, H), b (4H,) from a canonical params dict, validated."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a dict with keys 'W', 'R', 'b', got {type(params).__name__}")
    keys = ("W", "R", "b") if need_bias else ("W", "R")
    missing = [k for k in keys if k not in params]
    if missing:
        hint = ""
        if missing == ["b"]:
            hint = " (the layernorm variant has no bias, so it has no layout in this convention)"
        raise ValueError(f"params: expected keys {list(keys)}, missing {missing}{hint}")
    W, R, H = _stacked_weights(params["W"], params["R"], "params['W']", "params['R']")
    b = _array(params["b"], "params['b']") if need_bias else np.zeros(4 * H, W.dtype)
    _check_shape(b, "params['b']", (4 * H,), f"(4H,) = ({4 * H},)")
    return W, R, b


def _peepholes(params: Mapping[str, Any], H: int) -> dict[str, np.ndarray] | None:
    """p_i, p_f, p_o (H,) if params has all three, None if none; an error if only some."""
    present = [k for k in _PEEPHOLES if k in params]
    if not present:
        return None
    if len(present) != 3:
        missing = [k for k in _PEEPHOLES if k not in params]
        raise ValueError(f"params: expected all of {list(_PEEPHOLES)} or none, missing {missing}")
    out = {}
    for k in _PEEPHOLES:
        out[k] = _array(params[k], f"params[{k!r}]").copy()
        _check_shape(out[k], f"params[{k!r}]", (H,), f"(H,) = ({H},)")
    return out


def _result(W: np.ndarray, R: np.ndarray, b: np.ndarray, peep: dict[str, np.ndarray] | None = None):
    out = {"W": np.ascontiguousarray(W).copy(), "R": np.ascontiguousarray(R).copy(),
           "b": np.ascontiguousarray(b).copy()}
    if peep is not None:
        out.update({k: np.ascontiguousarray(v).copy() for k, v in peep.items()})
    return out


def _optional_peepholes(names: tuple[str, str, str], values: tuple[Any, Any, Any], H: int):
    given = [v is not None for v in values]
    if not any(given):
        return None
    if not all(given):
        raise ValueError(f"{', '.join(names)}: expected all three peephole vectors or none")
    out = {}
    for canon, name, v in zip(_PEEPHOLES, names, values, strict=True):
        a = _array(v, name).reshape(-1) if np.ndim(v) == 1 else _array(v, name)
        _check_shape(a, name, (H,), f"(H,) = ({H},)")
        out[canon] = a
    return out


# --------------------------------------------------------------------------------------------------
# Whole layers: cells by layer and direction


def _structure(structure: Any) -> Structure:
    if structure is None:
        return Structure()
    if not isinstance(structure, Structure):
        raise ValueError(f"structure: expected a harness.structure.Structure, got {type(structure).__name__}")
    return structure


def select_cell(params: Mapping[str, Any], structure: Structure | None, layer: int, direction: int
                ) -> dict[str, Any]:
    """The entries of one cell (``layer``, ``direction``) of ``structure`` with their prefix removed,
    values as they are (NumPy arrays, framework tensors): ``select_cell(p, s, 1, 1)`` is
    ``{"W": p["l1.reverse.W"], ...}``. Oracles use it on tensors; :func:`cell_params` copies to NumPy."""
    structure = _structure(structure)
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a dict of named arrays, got {type(params).__name__}")
    cells = {(k, d): prefix for k, d, prefix in structure.cells()}
    if (layer, direction) not in cells:
        raise ValueError(f"layer, direction: expected a cell of a structure with {structure.num_layers} layer(s) "
                         f"and {structure.dirs} direction(s), got ({layer!r}, {direction!r})")
    prefix = cells[(layer, direction)]
    out = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
    if "W" not in out:
        raise ValueError(f"params: expected {prefix}W and the other parameters of cell {prefix or '(unprefixed)'}, "
                         f"got keys {sorted(params)}")
    return out


def cell_params(params: Mapping[str, Any], structure: Structure | None, layer: int, direction: int
                ) -> dict[str, np.ndarray]:
    """The parameters of one cell (``layer``, ``direction``) of ``structure``, without their prefix, as
    new NumPy arrays: ``cell_params(p, s, 1, 1)`` is ``{"W": p["l1.reverse.W"], ...}``."""
    return {k: _array(v, f"params[{k!r}]").copy() for k, v in select_cell(params, structure, layer, direction).items()}


def join_cells(cells: Mapping[tuple[int, int], Mapping[str, Any]], structure: Structure | None
               ) -> dict[str, np.ndarray]:
    """The inverse of :func:`cell_params`: {(layer, direction): bare params} -> prefixed params, cell
    by cell in the structure's order."""
    structure = _structure(structure)
    out: dict[str, np.ndarray] = {}
    for layer, direction, prefix in structure.cells():
        if (layer, direction) not in cells:
            raise ValueError(f"cells: expected a cell (layer={layer}, direction={direction}), got {sorted(cells)}")
        for k, v in cells[(layer, direction)].items():
            out[prefix + k] = _array(v, f"cells[{(layer, direction)}][{k!r}]").copy()
    return out


def _cell_weights(p: Mapping[str, Any], prefix: str, P: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """W (4H, D_in), R (4H, H_out), b (4H,) of one cell, checked; -> W, R, b, H."""
    W = _array(p["W"], f"params[{prefix + 'W'!r}]")
    if W.ndim != 2:
        raise ValueError(f"params[{prefix + 'W'!r}]: expected shape (4H, D), got {tuple(W.shape)}")
    H = _four_h(W.shape[0], f"params[{prefix + 'W'!r}]", "the number of rows")
    H_out = P or H
    R = _array(p["R"], f"params[{prefix + 'R'!r}]")
    _check_shape(R, f"params[{prefix + 'R'!r}]", (4 * H, H_out), f"(4H, H_out) = ({4 * H}, {H_out})")
    if "b" not in p:
        raise ValueError(f"params: expected {prefix}b (the layernorm variant has no bias, so no layout here)")
    b = _array(p["b"], f"params[{prefix + 'b'!r}]")
    _check_shape(b, f"params[{prefix + 'b'!r}]", (4 * H,), f"(4H,) = ({4 * H},)")
    return W, R, b, H


# --------------------------------------------------------------------------------------------------
# PyTorch nn.LSTM


def _torch_suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def torch_names(structure: Structure | None = None) -> dict[str, str]:
    """``nn.LSTM``'s parameter names for ``structure`` -> the canonical name each holds (both bias halves
    hold ``b``): ``{"weight_ih_l0": "l0.W", ..., "bias_hh_l1_reverse": "l1.reverse.b"}``, and
    ``weight_hr_l{k}`` -> ``proj`` with a projection; unprefixed for one layer and one direction."""
    structure = _structure(structure)
    out = {}
    for layer, direction, prefix in structure.cells():
        sfx = _torch_suffix(layer, direction)
        out.update({f"weight_ih{sfx}": prefix + "W", f"weight_hh{sfx}": prefix + "R", f"bias_ih{sfx}": prefix + "b",
                    f"bias_hh{sfx}": prefix + "b"})
        if structure.proj_size:
            out[f"weight_hr{sfx}"] = prefix + "proj"
    return out


def to_torch(params: Mapping[str, Any], structure: Structure | None = None) -> dict[str, np.ndarray]:
    """-> ``weight_ih_l0`` (4H, D), ``weight_hh_l0`` (4H, H), ``bias_ih_l0`` = b, ``bias_hh_l0`` = 0.

    PyTorch's gate order is the canonical i, f, g, o; load with
    ``lstm.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch(params).items()})``.
    With a ``structure``, every cell: ``..._l{k}`` and ``..._l{k}_reverse``, and ``weight_hr_l{k}``
    (= ``proj``) with a projection, as ``nn.LSTM(num_layers=, bidirectional=, proj_size=)`` names them.
    """
    structure = _structure(structure)
    if not structure.layered and not structure.proj_size:
        W, R, b = _canonical(params)
        return {"weight_ih_l0": W.copy(), "weight_hh_l0": R.copy(), "bias_ih_l0": b.copy(),
                "bias_hh_l0": np.zeros_like(b)}
    out: dict[str, np.ndarray] = {}
    for layer, direction, prefix in structure.cells():
        p = cell_params(params, structure, layer, direction)
        W, R, b, H = _cell_weights(p, prefix, structure.proj_size)
        sfx = _torch_suffix(layer, direction)
        out.update({f"weight_ih{sfx}": W.copy(), f"weight_hh{sfx}": R.copy(), f"bias_ih{sfx}": b.copy(),
                    f"bias_hh{sfx}": np.zeros_like(b)})
        if structure.proj_size:
            proj = _array(p["proj"], f"params[{prefix + 'proj'!r}]") if "proj" in p else None
            if proj is None:
                raise ValueError(f"params: expected {prefix}proj for proj_size={structure.proj_size}")
            _check_shape(proj, f"params[{prefix + 'proj'!r}]", (structure.proj_size, H),
                         f"(P, H) = ({structure.proj_size}, {H})")
            out[f"weight_hr{sfx}"] = proj.copy()
    return out


def from_torch(state_dict: Mapping[str, Any], structure: Structure | None = None) -> dict[str, np.ndarray]:
    """From an ``nn.LSTM`` state dict (or its layer-0 arrays): b = bias_ih_l0 + bias_hh_l0.

    With a ``structure``, every cell's arrays (see :func:`to_torch`) -> prefixed canonical params. A
    missing bias half counts as zero, so that autograd gradients convert too: pass ``bias_ih``'s
    gradient alone (dL/db is the gradient of either half)."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
    structure = _structure(structure)
    cells = {}
    for layer, direction, _prefix in structure.cells():
        sfx = _torch_suffix(layer, direction)
        need = [f"weight_ih{sfx}", f"weight_hh{sfx}"] + ([f"weight_hr{sfx}"] if structure.proj_size else [])
        missing = [k for k in need if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict: expected keys {need} (and bias_ih{sfx}, bias_hh{sfx}), "
                             f"missing {missing}")
        W = _array(state_dict[f"weight_ih{sfx}"], f"state_dict['weight_ih{sfx}']")
        if W.ndim != 2:
            raise ValueError(f"state_dict['weight_ih{sfx}']: expected shape (4H, D), got {tuple(W.shape)}")
        H = _four_h(W.shape[0], f"state_dict['weight_ih{sfx}']", "the number of rows")
        H_out = structure.proj_size or H
        R = _array(state_dict[f"weight_hh{sfx}"], f"state_dict['weight_hh{sfx}']")
        _check_shape(R, f"state_dict['weight_hh{sfx}']", (4 * H, H_out), f"(4H, H_out) = ({4 * H}, {H_out})")
        b = np.zeros(4 * H, W.dtype)
        for key in (f"bias_ih{sfx}", f"bias_hh{sfx}"):
            if key in state_dict and state_dict[key] is not None:
                part = _array(state_dict[key], f"state_dict[{key!r}]")
                _check_shape(part, f"state_dict[{key!r}]", (4 * H,), f"(4H,) = ({4 * H},)")
                b = b + part
        cell = _result(W, R, b.astype(W.dtype, copy=False))
        if structure.proj_size:
            proj = _array(state_dict[f"weight_hr{sfx}"], f"state_dict['weight_hr{sfx}']")
            _check_shape(proj, f"state_dict['weight_hr{sfx}']", (structure.proj_size, H),
                         f"(P, H) = ({structure.proj_size}, {H})")
            cell["proj"] = proj.copy()
        cells[(layer, direction)] = cell
    return join_cells(cells, structure)


# --------------------------------------------------------------------------------------------------
# Keras 3 LSTM


def to_keras(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """-> ``kernel`` (D, 4H), ``recurrent_kernel`` (H, 4H), ``bias`` (4H,), gate order i, f, c, o.

    Load with ``layer.set_weights([kernel, recurrent_kernel, bias])`` (the layer's weight order).
    """
    W, R, b = _canonical(params)
    return {
        "kernel": np.ascontiguousarray(permute_gates(W, CANONICAL_ORDER, "keras").T),
        "recurrent_kernel": np.ascontiguousarray(permute_gates(R, CANONICAL_ORDER, "keras").T),
        "bias": permute_gates(b, CANONICAL_ORDER, "keras"),
    }


def from_keras(kernel: Any, recurrent_kernel: Any, bias: Any = None) -> dict[str, np.ndarray]:
    """From Keras LSTM weights (``bias`` None for ``use_bias=False``)."""
    k = _array(kernel, "kernel")
    if k.ndim != 2:
        raise ValueError(f"kernel: expected shape (D, 4H), got {tuple(k.shape)}")
    H = _four_h(k.shape[1], "kernel", "the number of columns")
    rk = _array(recurrent_kernel, "recurrent_kernel")
    _check_shape(rk, "recurrent_kernel", (H, 4 * H), f"(H, 4H) = ({H}, {4 * H})")
    if bias is None:
        b = np.zeros(4 * H, k.dtype)
    else:
        b = _array(bias, "bias")
        _check_shape(b, "bias", (4 * H,), f"(4H,) = ({4 * H},)")
    return _result(
        permute_gates(k.T, "keras", CANONICAL_ORDER),
        permute_gates(rk.T, "keras", CANONICAL_ORDER),
        permute_gates(b, "keras", CANONICAL_ORDER),
    )


# --------------------------------------------------------------------------------------------------
# TensorFlow fused kernels


def _fused(params: Mapping[str, Any], order: str) -> tuple[np.ndarray, np.ndarray, dict | None, int]:
    W, R, b = _canonical(params)
    H = R.shape[1]
    w = np.concatenate([permute_gates(W, CANONICAL_ORDER, order).T,
                        permute_gates(R, CANONICAL_ORDER, order).T], axis=0)  # (D+H, 4H)
    return np.ascontiguousarray(w), permute_gates(b, CANONICAL_ORDER, order), _peepholes(params, H), H


def _unfuse(w: Any, b: Any, D: Any, order: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    wa = _array(w, "w")
    if wa.ndim != 2:
        raise ValueError(f"w: expected shape (D+H, 4H), got {tuple(wa.shape)}")
    H = _four_h(wa.shape[1], "w", "the number of columns")
    if not isinstance(D, (int, np.integer)) or isinstance(D, bool) or not 1 <= D:
        raise ValueError(f"D: expected the input size, a positive int, got {D!r}")
    if wa.shape[0] != D + H:
        raise ValueError(f"w: expected shape (D+H, 4H) = ({D + H}, {4 * H}) for D={D}, got {tuple(wa.shape)}")
    ba = _array(b, "b")
    _check_shape(ba, "b", (4 * H,), f"(4H,) = ({4 * H},)")
    W = permute_gates(wa[:D].T, order, CANONICAL_ORDER)
    R = permute_gates(wa[D:].T, order, CANONICAL_ORDER)
    return W, R, permute_gates(ba, order, CANONICAL_ORDER), H


def to_block_lstm_v2(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """-> ``w`` (D+H, 4H) over [x, h] and ``b`` (4H,), gate order i, f, c, o, for ``tf.raw_ops.BlockLSTMV2``.

    With peephole params, also ``wci`` = p_i, ``wcf`` = p_f, ``wco`` = p_o (H,) (``use_peephole=True``).
    """
    w, b, peep, _ = _fused(params, "block_lstm_v2")
    out = {"w": w, "b": b}
    if peep is not None:
        out.update(wci=peep["p_i"], wcf=peep["p_f"], wco=peep["p_o"])
    return out


def from_block_lstm_v2(w: Any, b: Any, D: int, *, wci: Any = None, wcf: Any = None,
                       wco: Any = None) -> dict[str, np.ndarray]:
    """From BlockLSTMV2's ``w`` (D+H, 4H), ``b`` (4H,) and optionally its peephole vectors."""
    W, R, bb, H = _unfuse(w, b, D, "block_lstm_v2")
    return _result(W, R, bb, _optional_peepholes(("wci", "wcf", "wco"), (wci, wcf, wco), H))


def _forget_bias(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"forget_bias: expected a float, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"forget_bias: expected a finite float, got {value!r}")
    return float(value)


def to_block_lstm(params: Mapping[str, Any], forget_bias: float = 0.0) -> dict[str, np.ndarray]:
    """-> ``w`` (D+H, 4H), ``b`` (4H,), gate order i, c, f, o, for ``tf.raw_ops.BlockLSTM`` and TF1 cells.

    These kernels add a runtime ``forget_bias`` to the f pre-activation; pass the value the kernel
    will be called with and it is subtracted from b's f block, so b_f + forget_bias is our b_f.
    """
    fb = _forget_bias(forget_bias)
    w, b, peep, H = _fused(params, "block_lstm")
    f = GATE_ORDERS["block_lstm"].index("f")
    b[f * H : (f + 1) * H] -= fb
    out = {"w": w, "b": b}
    if peep is not None:
        out.update(wci=peep["p_i"], wcf=peep["p_f"], wco=peep["p_o"])
    return out


def from_block_lstm(w: Any, b: Any, D: int, forget_bias: float = 0.0, *, wci: Any = None, wcf: Any = None,
                    wco: Any = None) -> dict[str, np.ndarray]:
    """From BlockLSTM weights run with ``forget_bias``: the canonical b_f is b's f block + forget_bias."""
    fb = _forget_bias(forget_bias)
    W, R, bb, H = _unfuse(w, b, D, "block_lstm")
    bb = bb.copy()
    bb[H : 2 * H] += fb  # canonical order: f is the second block
    return _result(W, R, bb, _optional_peepholes(("wci", "wcf", "wco"), (wci, wcf, wco), H))


def fold_forget_bias(params: Mapping[str, Any], forget_bias: float) -> dict[str, np.ndarray]:
    """Canonical params (vanilla or peephole) of a cell that adds ``forget_bias`` to the f
    pre-activation itself (TF1's ``forget_bias``), as params of one that does not: ``forget_bias``
    is added to b's f block. Returns new params; fold ``-forget_bias`` to undo.
    """
    fb = _forget_bias(forget_bias)
    W, R, b = _canonical(params)
    H = R.shape[1]
    b = b.copy()
    b[H : 2 * H] += fb  # canonical order: f is the second block
    return _result(W, R, b, _peepholes(params, H))


# --------------------------------------------------------------------------------------------------
# ONNX LSTM (one direction)

#: ONNX's peephole vector P is [P_i, P_o, P_f].
ONNX_PEEPHOLE_ORDER = ("p_i", "p_o", "p_f")


def to_onnx(params: Mapping[str, Any], peepholes: Any = None) -> dict[str, np.ndarray]:
    """-> ``W`` (1, 4H, D), ``R`` (1, 4H, H), ``B`` (1, 8H) = [Wb, Rb] with Rb = 0, and ``P`` (1, 3H).

    Gate order i, o, f, c. ``peepholes``: None includes ``P`` exactly when ``params`` has p_i, p_f,
    p_o; True requires them; False leaves ``P`` out; a mapping with p_i, p_f, p_o supplies them.
    ``P`` is ordered i, o, f.
    """
    W, R, b = _canonical(params)
    H = R.shape[1]
    if peepholes is None:
        peep = _peepholes(params, H)
    elif peepholes is True:
        peep = _peepholes(params, H)
        if peep is None:
            raise ValueError("peepholes: True asks for P, but params has no p_i, p_f, p_o")
    elif peepholes is False:
        peep = None
    elif isinstance(peepholes, Mapping):
        peep = _peepholes(peepholes, H)
        if peep is None:
            raise ValueError("peepholes: expected a mapping with p_i, p_f, p_o, got none of them")
    else:
        raise ValueError(f"peepholes: expected None, True, False or a mapping with p_i, p_f, p_o, "
                         f"got {type(peepholes).__name__}")
    out = {
        "W": permute_gates(W, CANONICAL_ORDER, "onnx")[None],
        "R": permute_gates(R, CANONICAL_ORDER, "onnx")[None],
        "B": np.concatenate([permute_gates(b, CANONICAL_ORDER, "onnx"), np.zeros_like(b)])[None],
    }
    if peep is not None:
        out["P"] = np.concatenate([peep[k] for k in ONNX_PEEPHOLE_ORDER])[None]
    return out


def from_onnx(W: Any, R: Any, B: Any = None, P: Any = None) -> dict[str, np.ndarray]:
    """From ONNX LSTM inputs (one direction): b = Wb + Rb; P (1, 3H) ordered i, o, f if given."""
    Wa = _array(W, "W")
    if Wa.ndim != 3 or Wa.shape[0] != 1:
        raise ValueError(f"W: expected shape (1, 4H, D) (one direction), got {tuple(Wa.shape)}")
    H = _four_h(Wa.shape[1], "W", "axis 1")
    Ra = _array(R, "R")
    _check_shape(Ra, "R", (1, 4 * H, H), f"(1, 4H, H) = (1, {4 * H}, {H})")
    if B is None:
        b = np.zeros(4 * H, Wa.dtype)
    else:
        Ba = _array(B, "B")
        _check_shape(Ba, "B", (1, 8 * H), f"(1, 8H) = (1, {8 * H})")
        b = permute_gates(Ba[0, : 4 * H] + Ba[0, 4 * H :], "onnx", CANONICAL_ORDER)
    peep = None
    if P is not None:
        Pa = _array(P, "P")
        _check_shape(Pa, "P", (1, 3 * H), f"(1, 3H) = (1, {3 * H})")
        peep = {k: Pa[0, n * H : (n + 1) * H] for n, k in enumerate(ONNX_PEEPHOLE_ORDER)}
        peep = {k: peep[k] for k in _PEEPHOLES}
    return _result(permute_gates(Wa[0], "onnx", CANONICAL_ORDER),
                   permute_gates(Ra[0], "onnx", CANONICAL_ORDER), b, peep)


def _onnx_layer_cells(structure: Structure, layer: Any) -> list[tuple[int, int, str]]:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < structure.num_layers:
        raise ValueError(f"layer: expected a layer index in 0..{structure.num_layers - 1}, got {layer!r}")
    if structure.proj_size:
        raise ValueError(f"structure: ONNX's LSTM has no projection, got proj_size={structure.proj_size}")
    return [cell for cell in structure.cells() if cell[0] == layer]


def to_onnx_layer(params: Mapping[str, Any], structure: Structure | None, layer: int, peepholes: Any = None
                  ) -> dict[str, np.ndarray]:
    """Layer ``layer`` of a whole LSTM as the inputs of one ONNX ``LSTM`` node with
    ``direction="bidirectional"`` (two directions) or ``"forward"``: ``W`` (dirs, 4H, D_in), ``R``
    (dirs, 4H, H), ``B`` (dirs, 8H), and ``P`` (dirs, 3H) as :func:`to_onnx` decides per cell; the
    forward direction is index 0. ONNX has no projection (a ValueError says so)."""
    structure = _structure(structure)
    parts = [to_onnx(cell_params(params, structure, k, d), peepholes)
             for k, d, _ in _onnx_layer_cells(structure, layer)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def from_onnx_layer(W: Any, R: Any, B: Any = None, P: Any = None, *, structure: Structure | None, layer: int
                    ) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_onnx_layer`: one node's W (dirs, 4H, D_in), R, B, P -> the layer's
    prefixed canonical params (``l{k}.W``, ``l{k}.reverse.W``, ...; unprefixed when not layered)."""
    structure = _structure(structure)
    cells = _onnx_layer_cells(structure, layer)
    arrays = {"W": W, "R": R, "B": B, "P": P}
    for name in ("W", "R"):
        a = _array(arrays[name], name)
        if a.ndim != 3 or a.shape[0] != structure.dirs:
            raise ValueError(f"{name}: expected shape ({structure.dirs}, 4H, ...) (num_directions first), "
                             f"got {tuple(a.shape)}")
    out: dict[str, np.ndarray] = {}
    for _layer, d, prefix in cells:
        one = {name: None if a is None else _array(a, name)[d : d + 1] for name, a in arrays.items()}
        out.update({prefix + key: v for key, v in from_onnx(one["W"], one["R"], one["B"], one["P"]).items()})
    return out


def onnx_layer_output(Y: Any) -> np.ndarray:
    """An ONNX LSTM node's ``Y`` (T, num_directions, B, H) -> (T, B, num_directions * H), the forward
    direction's features first: the contract's y, and the next layer's input."""
    a = _array(Y, "Y")
    if a.ndim != 4:
        raise ValueError(f"Y: expected shape (T, num_directions, B, H), got {tuple(a.shape)}")
    T, dirs, B, H = a.shape
    return np.ascontiguousarray(np.transpose(a, (0, 2, 1, 3)).reshape(T, B, dirs * H))


# --------------------------------------------------------------------------------------------------
# Keras 3, a whole layer: one LSTM or Bidirectional(LSTM) per layer


def to_keras_layers(params: Mapping[str, Any], structure: Structure | None) -> list[list[np.ndarray]]:
    """Per layer, the list ``layer.set_weights`` takes: ``[kernel, recurrent_kernel, bias]`` of the
    forward LSTM, followed for a ``Bidirectional`` layer by the backward LSTM's three (Keras's own
    weight order of ``Bidirectional``). Keras's LSTM has no projection (a ValueError says so)."""
    structure = _structure(structure)
    if structure.proj_size:
        raise ValueError(f"structure: Keras's LSTM has no projection, got proj_size={structure.proj_size}")
    out: list[list[np.ndarray]] = [[] for _ in range(structure.num_layers)]
    for layer, direction, _ in structure.cells():
        k = to_keras(cell_params(params, structure, layer, direction))
        out[layer] += [k["kernel"], k["recurrent_kernel"], k["bias"]]
    return out


def from_keras_layers(weights: Any, structure: Structure | None) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_keras_layers`: per layer, 3 (or 6 for Bidirectional) Keras arrays ->
    prefixed canonical params. Gradients convert the same way."""
    structure = _structure(structure)
    if not isinstance(weights, (list, tuple)) or len(weights) != structure.num_layers:
        size = len(weights) if hasattr(weights, "__len__") else "?"
        raise ValueError(f"weights: expected a list of {structure.num_layers} per-layer weight lists, "
                         f"got {type(weights).__name__} of length {size}")
    cells = {}
    for layer, per_layer in enumerate(weights):
        if len(per_layer) != 3 * structure.dirs:
            raise ValueError(f"weights[{layer}]: expected {3 * structure.dirs} arrays (kernel, recurrent_kernel, "
                             f"bias per direction), got {len(per_layer)}")
        for d in range(structure.dirs):
            cells[(layer, d)] = from_keras(*per_layer[3 * d : 3 * d + 3])
    return join_cells(cells, structure)


# --------------------------------------------------------------------------------------------------
# One matrix with the bias folded in, over [1, x, h]


def to_bias_folded(params: Mapping[str, Any], transposed: bool = False, *, order: str = CANONICAL_ORDER
                   ) -> np.ndarray:
    """-> M (4H, 1+D+H) with a_t = M @ [1, x_t, h_{t-1}], or (1+D+H, 4H) when ``transposed``.

    The well-known NumPy tutorials use the transposed form (``[1, x, h] @ M``); ``order`` picks the
    gate order of M's 4H axis (e.g. ``"ifog"`` for the tutorials that put the tanh block last).
    """
    W, R, b = _canonical(params)
    M = np.concatenate([b[:, None], W, R], axis=1)  # (4H, 1+D+H)
    M = permute_gates(M, CANONICAL_ORDER, normalize_order(order))
    return np.ascontiguousarray(M.T) if transposed else M


def from_bias_folded(M: Any, D: int, H: int, transposed: bool = False, *, order: str = CANONICAL_ORDER
                     ) -> dict[str, np.ndarray]:
    """From a bias-folded matrix over [1, x, h] (see :func:`to_bias_folded`)."""
    Ma = _array(M, "M")
    for name, v in (("D", D), ("H", H)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    want = (1 + D + H, 4 * H) if transposed else (4 * H, 1 + D + H)
    text = f"(1+D+H, 4H) = {want}" if transposed else f"(4H, 1+D+H) = {want}"
    _check_shape(Ma, "M", want, f"{text} for D={D}, H={H}, transposed={transposed}")
    if transposed:
        Ma = Ma.T
    Ma = permute_gates(Ma, normalize_order(order), CANONICAL_ORDER)
    return _result(Ma[:, 1 : 1 + D], Ma[:, 1 + D :], Ma[:, 0])


# --------------------------------------------------------------------------------------------------
# The classic course exercise: Wx (D, 4H), Wh (H, 4H), b, gates i, f, o, g, batch-major


def to_course(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """-> ``Wx`` (D, 4H), ``Wh`` (H, 4H), ``b`` (4H,), gate order i, f, o, g (a = x @ Wx + h @ Wh + b).

    Its inputs are batch-major: pass ``batch_major(x)``.
    """
    W, R, b = _canonical(params)
    return {
        "Wx": np.ascontiguousarray(permute_gates(W, CANONICAL_ORDER, "course").T),
        "Wh": np.ascontiguousarray(permute_gates(R, CANONICAL_ORDER, "course").T),
        "b": permute_gates(b, CANONICAL_ORDER, "course"),
    }


def from_course(Wx: Any, Wh: Any, b: Any) -> dict[str, np.ndarray]:
    wx = _array(Wx, "Wx")
    if wx.ndim != 2:
        raise ValueError(f"Wx: expected shape (D, 4H), got {tuple(wx.shape)}")
    H = _four_h(wx.shape[1], "Wx", "the number of columns")
    wh = _array(Wh, "Wh")
    _check_shape(wh, "Wh", (H, 4 * H), f"(H, 4H) = ({H}, {4 * H})")
    ba = _array(b, "b")
    _check_shape(ba, "b", (4 * H,), f"(4H,) = ({4 * H},)")
    return _result(permute_gates(wx.T, "course", CANONICAL_ORDER),
                   permute_gates(wh.T, "course", CANONICAL_ORDER),
                   permute_gates(ba, "course", CANONICAL_ORDER))


# --------------------------------------------------------------------------------------------------
# One matrix (and bias) per gate: TMVA, deeplearning.ai

#: How a per-gate layout feeds x and h to each gate's weights: ``separate`` matrices W_<gate> (H, D)
#: and R_<gate> (H, H); one matrix W_<gate> over the concatenation ``hx`` = [h; x] or ``xh`` = [x; h].
PER_GATE_FORMS = ("separate", "hx", "xh")


def _per_gate_form(form: Any) -> str:
    if form not in PER_GATE_FORMS:
        raise ValueError(f"form: expected one of {PER_GATE_FORMS}, got {form!r}")
    return str(form)


def per_gate_keys(form: str = "separate", *, bias: bool = True) -> tuple[str, ...]:
    """The keys of a per-gate layout, in order: W_i, W_f, W_g, W_o, then R_* (form ``separate``), then b_*."""
    groups: tuple[str, ...] = ("W", "R") if _per_gate_form(form) == "separate" else ("W",)
    if bias:
        groups += ("b",)
    return tuple(f"{g}_{gate}" for g in groups for gate in CANONICAL_ORDER)


def to_per_gate(params: Mapping[str, Any], *, form: str = "separate", transposed: bool = False
                ) -> dict[str, np.ndarray]:
    """-> one matrix per gate and one bias per gate, keyed ``W_i``, ..., ``R_i``, ..., ``b_i``, ...

    ``form="separate"``: ``W_<gate>`` (H, D) and ``R_<gate>`` (H, H), a = W_g x + R_g h + b_g (TMVA).
    ``form="hx"``: ``W_<gate>`` (H, H+D) over [h; x] (deeplearning.ai's ``Wf @ concat(a_prev, x_t)``);
    ``form="xh"``: over [x; h]. ``transposed``: every matrix transposed ((D, H), (H, H), (H+D, H)),
    used as ``x @ W_<gate>``. Biases are (H,). Other arrays (peepholes; the LayerNorm gains and
    shifts) are passed on as they are; LayerNorm params have no bias, so there is no ``b_<gate>``.
    """
    form = _per_gate_form(form)
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a dict with keys 'W', 'R', 'b', got {type(params).__name__}")
    has_bias = "b" in params
    W, R, b = _canonical(params, need_bias=has_bias)
    H = R.shape[1]
    out: dict[str, np.ndarray] = {}
    for n, gate in enumerate(CANONICAL_ORDER):
        rows = slice(n * H, (n + 1) * H)
        if form == "separate":
            mats = {f"W_{gate}": W[rows], f"R_{gate}": R[rows]}
        else:
            parts = (R[rows], W[rows]) if form == "hx" else (W[rows], R[rows])
            mats = {f"W_{gate}": np.concatenate(parts, axis=1)}  # (H, H+D) or (H, D+H)
        for key, m in mats.items():
            out[key] = np.ascontiguousarray(m.T if transposed else m).copy()
    if has_bias:
        for n, gate in enumerate(CANONICAL_ORDER):
            out[f"b_{gate}"] = b[n * H : (n + 1) * H].copy()
    for key, value in params.items():
        if key not in ("W", "R", "b"):
            out[key] = _array(value, f"params[{key!r}]").copy()
    return out


def from_per_gate(arrays: Mapping[str, Any], D: int, *, form: str = "separate", transposed: bool = False
                  ) -> dict[str, np.ndarray]:
    """From a per-gate layout (see :func:`to_per_gate`) to canonical params; ``D`` is the input size.

    Without ``b_<gate>`` keys (the LayerNorm variant) the result has no ``b``; other keys are passed on.
    """
    form = _per_gate_form(form)
    if not isinstance(arrays, Mapping):
        raise ValueError(f"arrays: expected a dict with keys {list(per_gate_keys(form))}, "
                         f"got {type(arrays).__name__}")
    if not isinstance(D, (int, np.integer)) or isinstance(D, bool) or D < 1:
        raise ValueError(f"D: expected the input size, a positive int, got {D!r}")
    has_bias = any(f"b_{g}" in arrays for g in CANONICAL_ORDER)
    keys = per_gate_keys(form, bias=has_bias)
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"arrays: expected keys {list(keys)}, missing {missing}")
    first = _array(arrays["W_i"], "W_i")
    if first.ndim != 2:
        raise ValueError(f"W_i: expected a matrix, got shape {tuple(first.shape)}")
    H = first.shape[1] if transposed else first.shape[0]
    Ws, Rs, bs = [], [], []
    for gate in CANONICAL_ORDER:
        pairs: tuple[tuple[str, tuple[int, int]], ...]
        if form == "separate":
            pairs = ((f"W_{gate}", (H, D)), (f"R_{gate}", (H, H)))
        else:
            pairs = ((f"W_{gate}", (H, H + D)),)
        mats = []
        for key, shape in pairs:
            m = _array(arrays[key], key)
            want = shape[::-1] if transposed else shape
            _check_shape(m, key, want, f"{want} for D={D}, H={H}" + (", transposed" if transposed else ""))
            mats.append(m.T if transposed else m)
        if form == "separate":
            Ws.append(mats[0])
            Rs.append(mats[1])
        else:
            x_cols = slice(H, H + D) if form == "hx" else slice(0, D)
            h_cols = slice(0, H) if form == "hx" else slice(D, D + H)
            Ws.append(mats[0][:, x_cols])
            Rs.append(mats[0][:, h_cols])
        if has_bias:
            bg = _array(arrays[f"b_{gate}"], f"b_{gate}")
            _check_shape(bg, f"b_{gate}", (H,), f"(H,) = ({H},)")
            bs.append(bg)
    out = {"W": np.ascontiguousarray(np.concatenate(Ws, axis=0)),
           "R": np.ascontiguousarray(np.concatenate(Rs, axis=0))}
    if has_bias:
        out["b"] = np.concatenate(bs)
    for key, value in arrays.items():
        if key not in keys:
            out[key] = _array(value, key).copy()
    return out


# --------------------------------------------------------------------------------------------------
# Sequence layout


def batch_major(x: Any) -> np.ndarray:
    """(T, B, ...) -> (B, T, ...): time-major sequences (the contract's) to batch-major ones."""
    a = _array(x, "x")
    if a.ndim < 2:
        raise ValueError(f"x: expected a sequence of shape (T, B, ...), got shape {tuple(a.shape)}")
    return np.swapaxes(a, 0, 1).copy(order="C")  # a copy even where the swap is already contiguous


def time_major(x: Any) -> np.ndarray:
    """(B, T, ...) -> (T, B, ...): the inverse of :func:`batch_major`."""
    a = _array(x, "x")
    if a.ndim < 2:
        raise ValueError(f"x: expected a sequence of shape (B, T, ...), got shape {tuple(a.shape)}")
    return np.swapaxes(a, 0, 1).copy(order="C")  # a copy even where the swap is already contiguous


#: The canonical sequence layout: T (time), B (batch), D (features: D for x, H for y and dy).
CANONICAL_LAYOUT = "TBD"
#: The layouts with a name: time-major (the contract's), batch-major (Keras, batch_first=True, the
#: course exercise) and feature-first (deeplearning.ai: x (n_x, m, T_x), a (n_a, m, T_x), a0 (n_a, m)).
SEQUENCE_LAYOUTS = ("TBD", "BTD", "DBT")


def normalize_layout(layout: Any, *, argument: str = "layout") -> str:
    """A sequence layout as three letters, the axes in order: any arrangement of T, B and D ("BTD"
    is batch-major, "DBT" feature-first). Raise a ValueError that says what to pass otherwise."""
    if not isinstance(layout, str) or sorted(layout.upper()) != sorted(CANONICAL_LAYOUT):
        raise ValueError(f"{argument}: expected the axes of a sequence in order, an arrangement of T (time), "
                         f"B (batch) and D (features) such as {' or '.join(map(repr, SEQUENCE_LAYOUTS))}, "
                         f"got {layout!r}")
    return layout.upper()


def _sequence(x: Any, name: str, layout: str) -> np.ndarray:
    a = _array(x, name)
    if a.ndim != 3:
        axes = layout.replace("D", "H") if name in ("y", "dy") else layout  # y's features are the H units
        raise ValueError(f"{name}: expected a sequence of shape ({', '.join(axes)}), got shape {tuple(a.shape)}")
    return a


def sequence_to(x: Any, layout: str, *, name: str = "x") -> np.ndarray:
    """A time-major sequence (T, B, D) -> the same sequence with its axes in ``layout``'s order."""
    layout = normalize_layout(layout)
    a = _sequence(x, name, CANONICAL_LAYOUT)
    return np.transpose(a, [CANONICAL_LAYOUT.index(axis) for axis in layout]).copy(order="C")


def sequence_from(x: Any, layout: str, *, name: str = "x") -> np.ndarray:
    """A sequence with its axes in ``layout``'s order -> time-major (T, B, D): the inverse of :func:`sequence_to`."""
    layout = normalize_layout(layout)
    a = _sequence(x, name, layout)
    return np.transpose(a, [layout.index(axis) for axis in CANONICAL_LAYOUT]).copy(order="C")


def _state(h: Any, name: str, text: str) -> np.ndarray:
    a = _array(h, name)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a state of shape {text}, got shape {tuple(a.shape)}")
    return a


def state_to(h: Any, layout: str, *, name: str = "h0") -> np.ndarray:
    """A state (B, H) (h0, c0, h_T, their gradients) -> the orientation its sequences have in ``layout``:
    (H, B) when the features come before the batch ("DBT"), else (B, H). Always a copy."""
    layout = normalize_layout(layout)
    a = _state(h, name, "(B, H)")
    return a.T.copy(order="C") if layout.index("D") < layout.index("B") else a.copy()


def state_from(h: Any, layout: str, *, name: str = "h0") -> np.ndarray:
    """A state in ``layout``'s orientation -> (B, H): the inverse of :func:`state_to`."""
    layout = normalize_layout(layout)
    feature_first = layout.index("D") < layout.index("B")
    a = _state(h, name, "(H, B)" if feature_first else "(B, H)")
    return a.T.copy(order="C") if feature_first else a.copy()


#: The orders of a layered state's leading (num_layers * dirs) axis: the contract's ``layer * dirs +
#: direction`` (PyTorch's), and ``direction * num_layers + layer`` (all of the forward direction's
#: layers first), which hand-written stacks often use.
STATE_ORDERS = ("layer-major", "direction-major")


def state_order_index(num_layers: int, dirs: int, order: str) -> np.ndarray:
    """For each position of the leading axis in ``order``, the contract's (layer-major) index it holds:
    ``state_order_index(2, 2, "direction-major")`` is [0, 2, 1, 3] (l0 forward, l1 forward, l0 reverse,
    l1 reverse)."""
    if order not in STATE_ORDERS:
        raise ValueError(f"state_order: expected one of {STATE_ORDERS}, got {order!r}")
    if order == "layer-major":
        return np.arange(num_layers * dirs)
    return np.array([layer * dirs + direction for direction in range(dirs) for layer in range(num_layers)])


def _layered_state(h: Any, name: str, n: int) -> np.ndarray:
    a = _array(h, name)
    if a.ndim != 3 or a.shape[0] != n:
        raise ValueError(f"{name}: expected a state of shape (num_layers * dirs, B, H) = ({n}, B, H), "
                         f"got shape {tuple(a.shape)}")
    return a


def state_order_to(h: Any, num_layers: int, dirs: int, order: str, *, name: str = "h0") -> np.ndarray:
    """A layered state (L * dirs, B, H) in the contract's order -> the same state in ``order``. Always a copy."""
    index = state_order_index(num_layers, dirs, order)
    return _layered_state(h, name, len(index))[index].copy()


#: The orders of a bidirectional layer's features in y (and in the next layer's input): the contract's
#: forward direction first, or the reverse direction first.
Y_DIRECTIONS = ("forward-first", "reverse-first")


def swap_directions(a: Any, *, axis: int = -1, name: str = "y") -> np.ndarray:
    """The two halves of ``axis`` swapped: a bidirectional y (T, B, 2 * H) [forward | reverse] -> [reverse |
    forward], or a next layer's W (4H, 2 * H) by its columns. Its own inverse; always a copy."""
    arr = _array(a, name)
    n = arr.shape[axis]
    if n % 2:
        raise ValueError(f"{name}: expected an even size (two directions' features) along axis {axis}, got shape "
                         f"{tuple(arr.shape)}")
    return np.concatenate(np.split(arr, 2, axis=axis)[::-1], axis=axis)


def state_order_from(h: Any, num_layers: int, dirs: int, order: str, *, name: str = "h_T") -> np.ndarray:
    """A layered state in ``order`` -> the contract's order: the inverse of :func:`state_order_to`."""
    index = state_order_index(num_layers, dirs, order)
    a = _layered_state(h, name, len(index))
    out = np.empty_like(a)
    out[index] = a
    return out


# --------------------------------------------------------------------------------------------------
# LayerNorm variant


def fold_forget_bias_layernorm(params: Mapping[str, Any], forget_bias: float) -> dict[str, np.ndarray]:
    """TF1 ``LayerNormBasicLSTMCell(forget_bias=...)`` as canonical layernorm params.

    The cell adds ``forget_bias`` to the *normalized* f pre-activation, which is the same as adding
    it to ``beta[f]`` (row 1 of rows i, f, g, o, c). Returns new params; fold ``-forget_bias`` to undo.
    """
    fb = _forget_bias(forget_bias)
    if not isinstance(params, Mapping) or "beta" not in params:
        raise ValueError("params: expected layernorm params with keys 'W', 'R', 'gamma', 'beta'")
    out = {k: _array(v, f"params[{k!r}]").copy() for k, v in params.items()}
    beta = out["beta"]
    if beta.ndim != 2 or beta.shape[0] != 5:
        raise ValueError(
            f"params['beta']: expected shape (5, H) (rows i, f, g, o, c), got {tuple(beta.shape)}"
        )
    beta[1] += fb
    return out


def permute_layernorm_rows(rows: Any, src: str, dst: str) -> np.ndarray:
    """Reorder the gate rows of LayerNorm gains or shifts (5, H) from gate order ``src`` to ``dst``.

    Rows 0-3 are one per gate, in the gate order; row 4 is the cell state's and stays last in every
    convention. ``src``/``dst`` as in :func:`permute_gates`.
    """
    a = _array(rows, "rows")
    if a.ndim != 2 or a.shape[0] != 5:
        raise ValueError(f"rows: expected shape (5, H) (four gate rows, then the cell row), got {tuple(a.shape)}")
    gates = permute_gates(a[:4], src, dst, axis=0)  # (4, H): one block per gate row
    return np.concatenate([gates, a[4:]], axis=0)
