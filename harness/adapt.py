"""Adapters: certify an LSTM written in another convention, as it is.

:func:`adapt` wraps an implementation (an object, a pair of functions, or a PyTorch ``nn.Module``)
written in its own convention into one that speaks the harness's contract. Every conversion comes
from :mod:`harness.layouts`; what this module adds is the wiring: parameters in, outputs and
gradients back.

The conventions an adapter knows (all combinable):

=====================  =============================================================================
``gate_order``         order of the four gate blocks in every stacked weight, e.g. ``"ifog"``
                       (the course exercise), ``"icfo"`` (TF1), ``"iofc"`` (ONNX); ``c``/``j`` = ``g``
``transposed``         weights stored as (D, 4H) and (H, 4H) and used as ``x @ Wx + h @ Wh``
``bias``               ``"single"`` b (4H,); ``"separate"`` b_ih and b_hh (added, as PyTorch does; given
                       uneven shares of b, and each gradient must be db); ``"folded"`` one matrix
                       over [1, x, h] (``transposed``: (1+D+H, 4H))
``forget_bias``        a constant the implementation adds to the forget gate (TF1's ``forget_bias``);
                       for the LayerNorm variant it is added after normalization, i.e. to beta[f]
``layout``             the axes of its sequences (x, y, dy, dx), any arrangement of ``"TBD"``: ``"TBD"``
                       time-major (the contract's), ``"BTD"`` batch-major, ``"DBT"`` feature-first
                       (deeplearning.ai: x (D, B, T), y (H, B, T)); when D comes before B its states
                       (h0, c0, h_T, c_T and their gradients) are (H, B) too
``batch_major``        the same as ``layout="BTD"``: x (B, T, D) and y (B, T, H)
``initial_cell=False`` no c0 argument: the cell starts at zero. Checked with c0 = 0; dc0 not compared
``initial_hidden=False`` no h0 argument: the hidden state starts at zero. Checked with h0 = 0; dh0 not
                       compared. Both together: ``forward(x, params)``
``final_cell=False``   the forward does not return c_T: c_T not compared, checked with dc_T = 0
``per_gate``           one matrix and one bias per gate instead of stacked blocks, keyed ``W_i``,
                       ``W_f``, ``W_g``, ``W_o``, (``R_i``, ...,) ``b_i``, ...: ``"separate"`` W_<gate>
                       (H, D) on x and R_<gate> (H, H) on h (TMVA); ``"hx"`` one W_<gate> (H, H+D) on
                       [h; x] (deeplearning.ai's Wf, Wi, Wc, Wo); ``"xh"`` on [x; h]. With
                       ``transposed`` each matrix is transposed. Biases are (H,)
``column_bias``        biases kept as columns, (4H, 1) or per gate (H, 1) (course code that broadcasts
                       ``W @ x + b`` over (H, B)); their gradients may come back as columns too
``names``              the implementation's own parameter names, e.g. ``{"W": "Wx", "R": "Wh"}``
``state_order``        for a layered implementation (num_layers > 1 or bidirectional): the order of
                       its states' (num_layers * dirs) axis, ``"layer-major"`` (the contract's
                       ``layer * dirs + direction``, PyTorch's) or ``"direction-major"`` (``direction *
                       num_layers + layer``, all forward layers first), for h0, c0 in and h_T, c_T, dh0,
                       dc0 back
``y_directions``       for a bidirectional implementation: ``"reverse-first"`` when its y holds the reverse
                       direction's features first (and each later layer reads its input so, its W's
                       columns swapped accordingly); ``"forward-first"`` is the contract's
=====================  =============================================================================

A whole PyTorch layer: ``torch.nn.LSTM`` (bias=True), or any ``nn.Module`` with its parameter names
(``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}``, with
``_reverse`` for the reverse direction) and attributes (``num_layers``, ``bidirectional``, ``proj_size``,
``batch_first``, ``hidden_size``), called as ``module(x, (h0, c0)) -> (y, (h_n, c_n))``, is adapted as it
is: ``adapt(module)`` declares the structure its attributes give (checked against its parameters), hands
it the case's parameters under nn.LSTM's names (:func:`harness.layouts.to_torch`; the two biases get
uneven shares of b, so that one left out is caught), sets its ``input_size`` and ``hidden_size`` to the
case's for the call, and takes the backward from autograd; its states always have the (num_layers *
dirs) axis, even for one layer. ``lengths="packed"`` declares ``accepts_lengths`` and gives it x as
``pack_padded_sequence(x, lengths, enforce_sorted=False)``, y unpacked to all T steps. An object that
declares a layered structure (or a projection) itself gets the contract's prefixed parameters as they
are: of the conventions, only ``layout`` ("TBD" or "BTD"), ``state_order`` and ``y_directions`` apply to it.

Functions instead of an object: ``forward_fn(x, h0, c0, *params)`` (``h0`` left out when
``initial_hidden=False``, ``c0`` when ``initial_cell=False``; the parameters positionally in the order
W, R, b (or W, R, b_ih, b_hh; or the folded matrix; then p_i, p_f, p_o or gamma, beta)) returning
``(y, h_T, c_T, cache)``, ``(y, h_T, c_T)`` (no backward) or ``(y, cache)`` (``final_cell=False``;
h_T is read off y); and ``backward_fn(dy, dh_T, dc_T, cache)`` returning a dict of gradients by name (``"x"``/``"dx"``,
``"h0"``, ...) or a tuple (dx, [dh0,] [dc0,] *dparams) in the same order. ``backward_takes`` names the
upstream gradients it accepts: a course-style ``backward(dh, cache)`` is ``("dy", "cache")`` — dh_T
is then added into the last step of dy (exact: h_T is y[T-1]) and dc_T is held at zero.

A function written in a framework and no backward of its own: ``forward_fn=..., autograd="torch"``
(``"jax"``, ``"tf"``): the function takes the same arguments as above, as the framework's tensors, and
returns ``(y, h_T, c_T)``, ``(y, (h_T, c_T))``, ``(y, h_T)`` or ``y``; the backward is the framework's
(``torch.autograd.grad``, through a ``torch.autograd.Function``'s own backward when it is one;
``jax.vjp``, with ``jax_enable_x64`` switched on for float64; ``tf.GradientTape``). An input the
framework reaches no gradient for is reported as not computed.

One timestep instead of a sequence: ``step_forward(x_t, prev_h, prev_c, *params)`` returning
``(next_h, next_c, cache)`` and ``step_backward(dnext_h, dnext_c, cache)`` returning ``(dx_t, dprev_h,
dprev_c, *dparams)`` (the course exercise's ``lstm_step_forward``/``lstm_step_backward``), or
``adapt(cell, step=True)`` for an object whose ``forward(x_t, prev_h, prev_c, params)`` and
``backward(dnext_h, dnext_c, cache)`` (or ``step_forward``/``step_backward``) are one step; its
backward may return ``(dx_t, dprev_h, dprev_c, {name: dparam})`` or one dict (``"dxt"``,
``"da_prev"``, ``"dc_prev"``, ``"dWf"``, ... as deeplearning.ai's ``lstm_cell_backward``). The adapter
runs the time loop and the backward through time itself (dy[t] added to dh at each step, dh and dc
carried back, parameter gradients summed over time), so a cell is certified before any loop of its
own is written. Every other keyword applies to it as to a sequence: x_t is one timestep of x in
``layout`` ((B, D), or (D, B) for "DBT", with states (H, B)), parameters in the cell's convention.

Quantities an adapter cannot produce are declared in its ``limits`` (a :class:`harness.Limits`) and
reported by :func:`harness.certify` as not compared, with the reason, never compared against a placeholder.

An adapter hides no contract violation of what it wraps. The implementation receives converted
copies; if it modifies one in place, the change is converted back and written into the adapter's
own input array, so the harness reports "modified its input arrays in place" under the canonical
name, as it would without the adapter. Gradients beyond the ones its convention has are passed on
under their own names, so that the harness reports them as unexpected keys.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from harness import layouts
from harness.contract import (
    DEFAULT_DTYPES,
    DEFAULT_LN_EPS,
    VARIANTS,
    ContractError,
    declared_structure,
    is_torch_module,
    param_shapes,
    to_numpy,
)
from harness.limits import Limits
from harness.structure import Structure, parse_prefix

__all__ = ["adapt", "adapt_keywords", "is_torch_layer", "Convention", "Adapted"]

_BIASES = ("single", "separate", "folded")
_UPSTREAM = ("dy", "dh_T", "dc_T", "cache")


@dataclass(frozen=True)
class Convention:
    """How an implementation stores its parameters and sequences (see the module docstring)."""

    gate_order: str = "ifgo"
    transposed: bool = False
    bias: str = "single"
    forget_bias: float = 0.0
    batch_major: bool = False
    initial_cell: bool = True
    final_cell: bool = True
    per_gate: str | None = None
    initial_hidden: bool = True
    layout: str = "TBD"
    column_bias: bool = False
    state_order: str = "layer-major"
    y_directions: str = "forward-first"

    def __post_init__(self) -> None:
        for flag in ("transposed", "batch_major", "initial_cell", "final_cell", "initial_hidden", "column_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}: expected True or False, got {getattr(self, flag)!r}")
        layout = layouts.normalize_layout(self.layout, argument="layout")
        if self.batch_major:  # batch_major=True is layout="BTD", the older spelling of it
            if layout not in (layouts.CANONICAL_LAYOUT, "BTD"):
                raise ValueError(f"batch_major: True is layout='BTD', so it cannot go with layout={layout!r}; "
                                 f"drop batch_major")
            layout = "BTD"
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "batch_major", layout == "BTD")
        object.__setattr__(self, "gate_order", layouts.normalize_order(self.gate_order, argument="gate_order"))
        if self.bias not in _BIASES:
            raise ValueError(f"bias: expected one of {_BIASES}, got {self.bias!r}")
        if self.per_gate is not None:
            if self.per_gate not in layouts.PER_GATE_FORMS:
                raise ValueError(f"per_gate: expected None or one of {layouts.PER_GATE_FORMS}, got {self.per_gate!r}")
            if self.gate_order != layouts.CANONICAL_ORDER:
                raise ValueError("per_gate: each gate's weights are named (W_i, W_f, W_g, W_o), so there is no "
                                 f"gate order to give; drop gate_order={self.gate_order!r} and map the names "
                                 "with names=...")
            if self.bias != "single":
                raise ValueError(f"per_gate: has one bias per gate; bias={self.bias!r} does not apply")
        if self.column_bias and self.bias == "folded" and self.per_gate is None:
            raise ValueError("column_bias: a bias folded into the weight matrix is no vector; drop column_bias=True")
        if isinstance(self.forget_bias, bool) or not isinstance(self.forget_bias, (int, float)) \
                or not np.isfinite(self.forget_bias):
            raise ValueError(f"forget_bias: expected a finite float, got {self.forget_bias!r}")
        if self.state_order not in layouts.STATE_ORDERS:
            raise ValueError(f"state_order: expected one of {layouts.STATE_ORDERS} (the order of a layered state's "
                             f"(num_layers * dirs) axis), got {self.state_order!r}")
        if self.y_directions not in layouts.Y_DIRECTIONS:
            raise ValueError(f"y_directions: expected one of {layouts.Y_DIRECTIONS} (which direction's features "
                             f"come first in a bidirectional y), got {self.y_directions!r}")

    @property
    def is_standard(self) -> bool:
        return self == Convention()

    def describe(self) -> str:
        """In words, what differs from the standard convention ("" when nothing does)."""
        parts = []
        if self.gate_order != "ifgo":
            parts.append("its gate blocks are read as " + ", ".join(self.gate_order))
        if self.transposed:
            shapes = "(D, 4H) and (H, 4H), or per gate (D, H) and (H, H)" if self.per_gate is None \
                else "(D, H) and (H, H) per gate"
            parts.append(f"its weights are transposed (used as x @ W: {shapes})")
        if self.bias == "separate":
            parts.append("it has separate input and hidden biases")
        if self.bias == "folded":
            parts.append("its bias is folded into one weight matrix over [1, x, h]")
        if self.per_gate is not None:
            parts.append({"separate": "it keeps an input and a state matrix and a bias per gate",
                          "hx": "it keeps one matrix per gate over [h; x] and a bias per gate",
                          "xh": "it keeps one matrix per gate over [x; h] and a bias per gate"}[self.per_gate])
        if self.column_bias:
            parts.append("its biases are columns ((n, 1) instead of (n,))")
        if self.forget_bias:
            parts.append(f"it adds a forget bias of {self.forget_bias:+g} itself")
        if self.batch_major:
            parts.append("its sequences are batch-major ((B, T, D) in, (B, T, H) out)")
        elif self.layout != layouts.CANONICAL_LAYOUT:
            x, y = (", ".join(self.layout.replace("D", f)) for f in "DH")
            states = "; its states are (H, B)" if self.states_transposed else ""
            parts.append(f"its sequences are laid out as ({x}) in, ({y}) out{states}")
        if not self.initial_hidden:
            parts.append("it has no initial hidden state (h0 = 0)")
        if not self.initial_cell:
            parts.append("it has no initial cell state (c0 = 0)")
        if not self.final_cell:
            parts.append("it does not return the final cell state")
        if self.state_order != "layer-major":
            parts.append("its states' (num_layers * dirs) axis is direction-major (direction * num_layers + layer)")
        if self.y_directions != "forward-first":
            parts.append("its y holds the reverse direction's features first (and so does each next layer's input)")
        return "; ".join(parts)

    def keywords(self) -> dict[str, Any]:
        """The :func:`adapt` keywords that select this convention (only those that differ)."""
        default = asdict(Convention())
        out = {k: v for k, v in asdict(self).items() if v != default[k]}
        if self.batch_major:
            del out["layout"]  # batch_major=True says it
        return out

    @property
    def states_transposed(self) -> bool:
        """Whether its states are (H, B): the features come before the batch in its layout."""
        return self.layout.index("D") < self.layout.index("B")

    # -- sequences and states: the contract's (T, B, D) and (B, H) -> this convention's, and back

    def seq_to(self, a: np.ndarray, name: str = "x") -> np.ndarray:
        return a if self.layout == layouts.CANONICAL_LAYOUT else layouts.sequence_to(a, self.layout, name=name)

    def seq_from(self, a: Any, name: str = "y") -> np.ndarray:
        if self.layout == layouts.CANONICAL_LAYOUT:
            return np.array(to_numpy(a), copy=True)
        return layouts.sequence_from(to_numpy(a), self.layout, name=name)

    def state_to(self, a: np.ndarray, name: str = "h0") -> np.ndarray:
        return layouts.state_to(a, self.layout, name=name) if self.states_transposed else a

    def state_from(self, a: Any, name: str = "h_T") -> Any:
        return layouts.state_from(to_numpy(a), self.layout, name=name) if self.states_transposed else a

    def initial_states(self, h0: Any, c0: Any) -> list[Any]:
        """Of the initial states (h0, c0), the ones the implementation takes, in its argument order."""
        return ([h0] if self.initial_hidden else []) + ([c0] if self.initial_cell else [])

    # -- parameters

    def param_keys(self, variant: str) -> tuple[str, ...]:
        """The implementation's parameters in this convention, by their default names, in order."""
        if self.per_gate is not None:
            mats = layouts.per_gate_keys(self.per_gate, bias=variant != "layernorm")
            extra = {"layernorm": ("gamma", "beta"), "peephole": ("p_i", "p_f", "p_o")}.get(variant, ())
            return mats + extra
        if variant == "layernorm":
            return ("W", "R", "gamma", "beta")
        base = {"single": ("W", "R", "b"), "separate": ("W", "R", "b_ih", "b_hh"), "folded": ("W",)}[self.bias]
        return base + (("p_i", "p_f", "p_o") if variant == "peephole" else ())

    def _stack(self, a: np.ndarray) -> np.ndarray:
        """Canonical (4H, ...) -> this convention's gate order (and transposition for matrices)."""
        out = layouts.permute_gates(a, layouts.CANONICAL_ORDER, self.gate_order)
        return np.ascontiguousarray(out.T) if self.transposed and out.ndim == 2 else out

    def _unstack(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if self.transposed and a.ndim == 2:
            a = a.T
        return layouts.permute_gates(a, self.gate_order, layouts.CANONICAL_ORDER)

    def params_to(self, params: Mapping[str, np.ndarray], variant: str) -> dict[str, np.ndarray]:
        """Canonical parameters -> this convention's, by default names (biases as columns with
        ``column_bias``)."""
        out = self._params_to(params, variant)
        if self.column_bias:
            for key in out:
                if _is_bias(key):
                    out[key] = np.ascontiguousarray(out[key].reshape(-1, 1))
        return out

    def _columns_flat(self, arrays: Mapping[str, Any]) -> Mapping[str, Any]:
        """With ``column_bias``: the (n, 1) biases (and their gradients) as the (n,) vectors the layouts take."""
        if not self.column_bias:
            return arrays
        out = dict(arrays)
        for key, value in arrays.items():
            a = to_numpy(value)
            if _is_bias(key) and a.ndim == 2 and a.shape[1] == 1:
                out[key] = a[:, 0]
        return out

    def _params_to(self, params: Mapping[str, np.ndarray], variant: str) -> dict[str, np.ndarray]:
        """Canonical parameters -> this convention's, by default names.

        Separate biases get uneven shares of b (b_hh = b / 4, b_ih = b - b_hh): with b_hh = 0 an
        implementation that forgets b_hh would compute the right values.
        """
        if variant == "layernorm":
            if self.bias != "single":
                raise ValueError(f"bias: the layernorm variant has no bias, so bias={self.bias!r} does not apply")
            # The implementation adds forget_bias after normalizing, i.e. to beta[f]: take it off first.
            canon = layouts.fold_forget_bias_layernorm(params, -self.forget_bias) if self.forget_bias else params
            if self.per_gate is not None:
                return layouts.to_per_gate(canon, form=self.per_gate, transposed=self.transposed)
            out = {"W": self._stack(canon["W"]), "R": self._stack(canon["R"])}
            for key in ("gamma", "beta"):
                out[key] = layouts.permute_layernorm_rows(canon[key], layouts.CANONICAL_ORDER, self.gate_order)
            return out
        canon = layouts.fold_forget_bias(params, -self.forget_bias) if self.forget_bias else params
        if self.per_gate is not None:
            return layouts.to_per_gate(canon, form=self.per_gate, transposed=self.transposed)
        if self.bias == "folded":
            out = {"W": layouts.to_bias_folded(canon, transposed=self.transposed, order=self.gate_order)}
        else:
            out = {"W": self._stack(canon["W"]), "R": self._stack(canon["R"])}
            b = self._stack(canon["b"])  # (4H,)
            if self.bias == "single":
                out["b"] = b
            else:
                out["b_hh"] = b * b.dtype.type(HIDDEN_BIAS_SHARE)
                out["b_ih"] = b - out["b_hh"]
        for key in ("p_i", "p_f", "p_o"):
            if key in params:
                out[key] = np.array(params[key], copy=True)
        return out

    def params_from(self, mine: Mapping[str, np.ndarray], variant: str, D: int, H: int) -> dict[str, np.ndarray]:
        """This convention's parameters (default names) -> canonical ones: the inverse of :meth:`params_to`."""
        mine = self._columns_flat(mine)
        out = self._from(mine, variant, D, H, b=lambda: mine["b_ih"] + mine["b_hh"])
        if not self.forget_bias:
            return out
        if variant == "layernorm":
            return layouts.fold_forget_bias_layernorm(out, self.forget_bias)
        return layouts.fold_forget_bias(out, self.forget_bias)

    def grads_from(self, grads: Mapping[str, np.ndarray], variant: str, D: int, H: int) -> dict[str, np.ndarray]:
        """The implementation's parameter gradients (default names) -> canonical ones.

        Gradients convert like the parameters, but for two things: a constant forget bias has no
        gradient, and with separate biases (b = b_ih + b_hh) each of d b_ih and d b_hh is the whole
        of db. d b_ih is compared with db; d b_hh must agree with it, which is checked here with the
        harness's gradient tolerance, since the comparison has one db to compare.
        """
        grads = self._columns_flat(grads)

        def split_bias() -> np.ndarray:
            d_ih, d_hh = np.asarray(grads["b_ih"]), np.asarray(grads["b_hh"])
            if d_ih.shape != d_hh.shape:
                raise ValueError(f"backward: expected gradients of b_ih and b_hh of the same shape, got "
                                 f"{d_ih.shape} and {d_hh.shape}")
            _check_bias_gradients(self._unstack(d_ih), self._unstack(d_hh), variant, H)
            return d_ih

        return self._from(grads, variant, D, H, b=split_bias)

    def _from(self, mine: Mapping[str, np.ndarray], variant: str, D: int, H: int,
              b: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
        """Parameter-shaped arrays in this convention -> canonical, with ``b()`` the stacked bias when
        the biases are separate."""
        out: dict[str, np.ndarray] = {}
        if self.per_gate is not None:
            return layouts.from_per_gate({k: mine[k] for k in self.param_keys(variant)}, D, form=self.per_gate,
                                         transposed=self.transposed)
        if variant == "layernorm":
            out["W"], out["R"] = self._unstack(mine["W"]), self._unstack(mine["R"])
            for key in ("gamma", "beta"):
                out[key] = layouts.permute_layernorm_rows(mine[key], self.gate_order, layouts.CANONICAL_ORDER)
            return out
        if self.bias == "folded":
            out.update(layouts.from_bias_folded(mine["W"], D, H, transposed=self.transposed, order=self.gate_order))
        else:
            out["W"], out["R"] = self._unstack(mine["W"]), self._unstack(mine["R"])
            out["b"] = self._unstack(mine["b"] if self.bias == "single" else b())
        for key in ("p_i", "p_f", "p_o"):
            if key in mine:
                out[key] = np.array(mine[key], copy=True)
        return out

    def canonical_names(self, name: str, variant: str) -> tuple[str, ...]:
        """The canonical arrays one of this convention's arrays (by default name) is made from."""
        if self.per_gate is not None and name[:2] in ("W_", "R_", "b_"):
            return ("W", "R") if name[0] == "W" and self.per_gate != "separate" else (name[0],)
        if name in ("b_ih", "b_hh"):
            return ("b",)
        if name == "W" and self.bias == "folded" and variant != "layernorm":
            return ("W", "R", "b")
        return (name,)


def _is_bias(key: str) -> bool:
    """Whether a parameter (by its default name) is a bias vector: b, b_ih, b_hh or a gate's b_<gate>."""
    return key in ("b", "b_ih", "b_hh") or (key.startswith("b_") and key[2:] in layouts.CANONICAL_ORDER)


#: The share of b given to b_hh when an implementation has separate biases (see Convention.params_to).
HIDDEN_BIAS_SHARE = 0.25


def _check_bias_gradients(d_ih: np.ndarray, d_hh: np.ndarray, variant: str, H: int,
                          names: tuple[str, str] = ("b_ih", "b_hh")) -> None:
    """d b_ih and d b_hh (canonical gate order) must both be dL/db, since b = b_ih + b_hh; raise,
    saying where they differ, when they do beyond the harness's gradient tolerance."""
    from harness.compare import TOLERANCES, compare_arrays
    from harness.contract import quantity_specs
    from harness.records import format_coords

    dtype = d_ih.dtype.name if d_ih.dtype.name in TOLERANCES else "float32"
    rec = compare_arrays(d_hh, d_ih, spec=quantity_specs(variant)["db"], H=H, tol=TOLERANCES[dtype]["gradients"],
                         tolerance_dtype=dtype, base=dict(implementation="", oracle=names[0], variant=variant,
                                                          dtype=dtype, direction="backward", quantity="db"))
    if rec.status == "pass":
        return
    worst = rec.worst or {}
    raise ValueError(
        f"backward: the gradients of {names[0]} and {names[1]} differ: {rec.mismatched} of {rec.total} elements "
        f"beyond the {dtype} gradient tolerance, worst at {format_coords(worst.get('coords', {}))} ({names[0]} "
        f"{worst.get('expected'):.6g}, {names[1]} {worst.get('actual'):.6g}). The two biases are added, so the "
        f"gradient of each must be dL/db")


class Adapted:
    """An implementation in another convention, presented through the harness's contract.

    Made by :func:`adapt`; ``backward`` exists only when the wrapped implementation has one.
    """

    def __init__(self, *, convention: Convention, variant: str, name: str, dtypes: tuple[str, ...],
                 ln_eps: float, names: dict[str, str], forward: Callable[..., Any] | _TimeLoop,
                 backward: Callable[..., Any] | None, params_as: str, upstream: tuple[str, ...],
                 torch_module: Any = None, call: Callable[..., Any] | None = None, dtypes_declared: bool = True,
                 engine: _Engine | None = None, structure: Structure | None = None, torch_layer: bool = False):
        self.convention = convention
        self.variant = variant
        self.name = name
        self.dtypes = dtypes
        #: False when neither adapt() nor what it wraps declared dtypes: certify checks the ones it computes in.
        self.dtypes_declared = dtypes_declared
        self.ln_eps = ln_eps
        self._names = names
        self._forward = forward
        self._backward = backward
        self._params_as = params_as
        self._upstream = upstream
        self._module = torch_module
        self._call = call
        self._engine = engine
        #: The layer structure of what it wraps (declared as attributes, so that the harness gives it cases of it).
        self._structure = structure or Structure()
        #: A PyTorch-style layer module (nn.LSTM's parameter names, called with packed sequences for lengths).
        self._torch_layer = torch_layer
        #: Whether its parameters are whole-layer ones (prefixed, or with a projection), passed on by name as
        #: they are (or by nn.LSTM's names), instead of converted cell by the convention.
        self._layered = torch_layer or self._structure.layered or self._structure.proj_size > 0
        if not self._structure.is_default:
            s = self._structure
            self.num_layers, self.bidirectional, self.proj_size = s.num_layers, s.bidirectional, s.proj_size
            self.coupled_input_forget, self.cell_clip, self.accepts_lengths = (s.coupled_input_forget, s.cell_clip,
                                                                               s.lengths)
        #: What :func:`adapt` wrapped and the keywords it was given beyond their defaults (None when it was
        #: given functions, or another adapter): how a replay command loads the same adapter again.
        self.wrapped: Any = None
        self.given: dict[str, Any] | None = None
        self.given_others: tuple[str, ...] = ()
        if backward is not None or torch_module is not None or engine is not None:
            self.backward = self._run_backward
        zero, unchecked = [], {}
        if not convention.initial_hidden:
            zero.append("h0")
            unchecked["dh0"] = "the implementation has no initial hidden state (adapted with initial_hidden=False)"
        if not convention.initial_cell:
            zero.append("c0")
            unchecked["dc0"] = "the implementation has no initial cell state (adapted with initial_cell=False)"
        if not convention.final_cell:
            unchecked["c_T"] = "the implementation does not return the final cell state (final_cell=False)"
        if not convention.final_cell or "dc_T" not in upstream:
            zero.append("dc_T")
        self.limits = Limits(zero=tuple(zero), unchecked=unchecked)

    def __repr__(self) -> str:
        extra = self.convention.describe() or "standard convention"
        if self._params_as == "step":
            extra = f"{_TimeLoop.NOTE}; {extra}"
        if not self._structure.is_default:
            extra = f"{self._structure.describe()}; {extra}"
        return f"<adapted {self.name}: {extra}>"

    # -- what differs for a whole layer: its states' order and its parameters' names

    def _state_to(self, a: np.ndarray, name: str = "h0") -> np.ndarray:
        """A state (or its gradient) in the contract's shape -> the implementation's."""
        s = self._structure
        if s.layered:
            if self.convention.state_order == "layer-major":
                return a
            return layouts.state_order_to(a, s.num_layers, s.dirs, self.convention.state_order, name=name)
        if self._torch_layer:
            return np.asarray(a)[None]  # nn.LSTM's states always have the (num_layers * dirs) axis
        return self.convention.state_to(a, name)

    def _state_from(self, a: Any, name: str = "h_T") -> Any:
        """A state (or its gradient) in the implementation's shape -> the contract's (inverse of :meth:`_state_to`)."""
        s = self._structure
        if s.layered:
            if self.convention.state_order == "layer-major":
                return a
            return layouts.state_order_from(to_numpy(a), s.num_layers, s.dirs, self.convention.state_order, name=name)
        if self._torch_layer:
            a = to_numpy(a)
            return a[0] if a.ndim == 3 and a.shape[0] == 1 else a
        return self.convention.state_from(a, name)

    def _directions(self, a: Any, name: str = "y") -> Any:
        """y (or dy) between the contract's [forward | reverse] features and the implementation's order (the
        swap is its own inverse)."""
        if self.convention.y_directions == "forward-first":
            return a
        return layouts.swap_directions(to_numpy(a), name=name)

    def _swap_inputs(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """With y reverse-first, a later layer reads its input's features reverse-first too: the columns of
        its W (and of W's gradient) swapped; the same both ways."""
        if self.convention.y_directions == "forward-first":
            return dict(params)
        out = dict(params)
        for key, value in params.items():
            layer, _, bare = parse_prefix(key)
            if layer and bare == "W":
                out[key] = layouts.swap_directions(to_numpy(value), axis=1, name=key)
        return out

    def _param_keys(self) -> tuple[str, ...]:
        """The implementation's parameters, by the keys its arrays are handed over with, in order."""
        if not self._layered:
            return self.convention.param_keys(self.variant)
        if self._torch_layer:
            return tuple(layouts.torch_names(self._structure))
        return tuple(param_shapes(self.variant, self._structure, D=1, H=1))

    def _params_to(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The contract's parameters -> the implementation's. nn.LSTM's two biases get uneven shares of b,
        as separate biases do in :meth:`Convention.params_to`."""
        if not self._layered:
            return self.convention.params_to(params, self.variant)
        params = self._swap_inputs(params)
        if not self._torch_layer:
            return params
        out = layouts.to_torch(params, self._structure)  # bias_ih = b, bias_hh = 0
        for name in [k for k in out if k.startswith("bias_ih")]:
            hidden = "bias_hh" + name[len("bias_ih"):]
            out[hidden] = out[name] * out[name].dtype.type(HIDDEN_BIAS_SHARE)
            out[name] = out[name] - out[hidden]
        return out

    def _params_from(self, mine: Mapping[str, np.ndarray], D: int, H: int) -> dict[str, np.ndarray]:
        """The implementation's parameters -> the contract's: the inverse of :meth:`_params_to`."""
        if not self._layered:
            conv = self.convention
            return conv.params_from({k: mine[k] for k in conv.param_keys(self.variant)}, self.variant, D, H)
        if not self._torch_layer:
            return self._swap_inputs(mine)
        return self._swap_inputs(layouts.from_torch(mine, self._structure))

    def _grads_from(self, grads: Mapping[str, np.ndarray], D: int, H: int) -> dict[str, np.ndarray]:
        """The implementation's parameter gradients -> the contract's. Of nn.LSTM's two biases each has the
        gradient dL/db: bias_ih's is used and bias_hh's must agree with it (see :meth:`Convention.grads_from`)."""
        if not self._layered:
            return self.convention.grads_from(grads, self.variant, D, H)
        if not self._torch_layer:
            return self._swap_inputs(grads)
        for name in [k for k in grads if k.startswith("bias_ih")]:
            hidden = "bias_hh" + name[len("bias_ih"):]
            _check_bias_gradients(np.asarray(grads[name]), np.asarray(grads[hidden]), self.variant, H,
                                  names=(name, hidden))
        return self._swap_inputs(layouts.from_torch({k: v for k, v in grads.items() if not k.startswith("bias_hh")},
                                                    self._structure))

    def _canonical_of(self, key: str) -> tuple[str, ...]:
        """The contract's arrays one of the implementation's arrays is made from."""
        if not self._layered:
            return self.convention.canonical_names(key, self.variant)
        if self._torch_layer:
            return (layouts.torch_names(self._structure)[key],)
        return (key,)

    # -- forward

    def forward(self, x, h0, c0, params, lengths=None):
        conv = self.convention
        T, B, D = x.shape
        H = c0.shape[-1]
        mine = self._params_to(params)
        xs, h0s, c0s = conv.seq_to(x), self._state_to(h0, "h0"), self._state_to(c0, "c0")
        # Lengths go on as they are (a (B,) vector in any layout); a PyTorch-style layer module gets them packed.
        more = {} if lengths is None else {"lengths": lengths}
        if self._module is not None:
            y, h_T, c_T, cache, handed = self._torch_forward((x, h0, c0), (xs, h0s, c0s), mine, params, lengths)
        elif self._engine is not None:
            y, h_T, c_T, cache, handed = self._engine_forward((x, h0, c0), (xs, h0s, c0s), mine, params)
        else:
            # Converted copies (the parameters, x and the states in another layout) are watched; what is
            # passed as it is, the caller (harness.subject.execute) watches itself.
            watched: dict[str, Any] = {k: v for k, v in mine.items() if v is not params.get(k)}
            back: dict[str, tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]] = {}
            for key, given, handed_over, convert in (("x", x, xs, conv.seq_from), ("h0", h0, h0s, self._state_from),
                                                     ("c0", c0, c0s, self._state_from)):
                if handed_over is not given:
                    watched[key], back[key] = handed_over, (given, convert)
            handed = _Handed(self, watched, back, params, D, H)
            args: list[Any] = [xs] + conv.initial_states(h0s, c0s)
            try:
                if self._params_as == "step":
                    out = self._forward.forward(self, xs, h0s, c0s, mine)
                elif self._params_as == "dict":
                    out = self._forward(*args, {self._names[k]: v for k, v in mine.items()}, **more)
                else:
                    out = self._forward(*args, *[mine[k] for k in conv.param_keys(self.variant)], **more)
            except KeyError as exc:
                self._note_names(exc, mine)
                raise
            y, h_T, c_T, cache = self._split_forward(out)
        handed.sync("forward")
        try:
            y = self._directions(conv.seq_from(y, "y"))
        except ValueError as exc:  # y not a sequence in the implementation's layout: its forward's fault
            raise ContractError([str(exc)], subject=f"adapted {self.name}") from None
        if self._structure.layered and (h_T is None or c_T is None):
            raise ContractError(["forward: returned no final states (h_T, c_T); a layered implementation returns "
                                 "both, each with its (num_layers * dirs) axis"], subject=f"adapted {self.name}")
        h_T = None if h_T is None else self._state_from(h_T, "h_T")
        c_T = None if c_T is None else self._state_from(c_T, "c_T")
        h_from_y = h_T is None
        if h_from_y:
            h_T = y[-1]  # (B, H): the last step of y is the final hidden state
        if c_T is None:
            if conv.final_cell:
                raise ContractError(["forward: returned no final cell state c_T; adapt it with final_cell=False "
                                     "(c_T is then not compared), or return c_T"], subject=f"adapted {self.name}")
            c_T = np.zeros((B, H), dtype=y.dtype)  # a placeholder: reported as not compared
        return y, h_T, c_T, _Cache(cache, (T, B, D), H, h_from_y, handed)

    def _note_names(self, exc: KeyError, mine: Mapping[str, Any]) -> None:
        """A KeyError for a name the implementation was not given, in a parameters dict passed by name:
        say which names it was given, and how to map one of them (the likeliest cause of such a KeyError)."""
        key = exc.args[0] if len(exc.args) == 1 else None
        given = {self._names[k]: k for k in mine}
        if self._params_as not in ("dict", "step") or not isinstance(key, str) or not key.isidentifier() \
                or key in given or not hasattr(exc, "add_note"):
            return  # (a key that is no identifier, "no bias", is not a parameter's name)
        unmapped = [k for name, k in given.items() if name == k]  # under the contract's own name: not mapped
        example = f"{(unmapped or list(given.values()))[0]}={key}"
        exc.add_note(f"{key!r} is not among the parameters it was given ({', '.join(given)}); if it names one of "
                     f"them, map it with names= (on the command line --names), e.g. {example}")

    def _split_forward(self, out: Any) -> tuple[Any, Any, Any, Any]:
        if not isinstance(out, (tuple, list)):
            raise TypeError(f"forward: expected a tuple (y, h_T, c_T, cache), (y, h_T, c_T) or (y, cache), got "
                            f"{type(out).__name__}")
        if len(out) == 4:
            return out[0], out[1], out[2], out[3]
        if len(out) == 3:
            return out[0], out[1], out[2], None
        if len(out) == 2:
            if self.convention.final_cell:
                raise TypeError("forward: returned 2 items (y, cache) with no final cell state; adapt it with "
                                "final_cell=False, or return (y, h_T, c_T, cache)")
            return out[0], None, None, out[1]
        raise TypeError(f"forward: expected 4, 3 or 2 items, got {len(out)}")

    # -- backward

    def _run_backward(self, dy, dh_T, dc_T, cache):
        if not isinstance(cache, _Cache):
            raise TypeError(f"cache: expected what this adapter's forward returned, got {type(cache).__name__}")
        conv = self.convention
        T, B, D = cache.x_shape
        H = cache.H
        # h_T is y[T-1]: when the implementation does not take dh_T, or autograd has no h_T of the
        # module's to send it to, its upstream gradient joins dy's last step (exact).
        autodiff = self._module is not None or self._engine is not None
        fold = "dh_T" not in self._upstream or (autodiff and cache.h_from_y)
        dys = dy
        if fold:
            dys = dy.copy()
            dys[-1] += dh_T
        dys = conv.seq_to(self._directions(dys, "dy"), "dy")
        dh_Ts, dc_Ts = self._state_to(dh_T, "dh_T"), self._state_to(dc_T, "dc_T")
        not_computed: set[str] = set()
        if self._module is not None:
            raw, not_computed = self._torch_backward(cache.inner, dys, None if cache.h_from_y else dh_Ts, dc_Ts)
        elif self._engine is not None:
            raw, not_computed = self._engine_backward(cache.inner, dys, None if cache.h_from_y else dh_Ts, dc_Ts)
        else:
            # Converted copies are watched: changes to them are the caller's arrays', converted back.
            back: dict[str, tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]] = {}
            if dys is not dy:
                back["dy"] = (dy, lambda v: _undo_dy(self._directions(conv.seq_from(v, "dy"), "dy"),
                                                     dh_T if fold else None))
            if dh_Ts is not dh_T:
                back["dh_T"], back["dc_T"] = (dh_T, self._state_from), (dc_T, self._state_from)
            upstream = _Handed(self, {k: {"dy": dys, "dh_T": dh_Ts, "dc_T": dc_Ts}[k] for k in back}, back)
            given = {"dy": dys, "dh_T": dh_Ts, "dc_T": dc_Ts, "cache": cache.inner}
            if self._params_as == "step":
                raw = self._forward.backward(self, dys, dh_Ts, dc_Ts, cache.inner)
            else:
                try:
                    raw = self._backward(*[given[k] for k in self._upstream])
                except Exception as exc:
                    if cache.inner is not None:
                        raise
                    # A forward of (y, h_T, c_T) says it has no backward; one that has keeps its cache on itself.
                    # When that backward fails, the likelier fault is the cache its forward did not return.
                    raise ContractError([f"given cache=None (its forward returned no cache: (y, h_T, c_T)), it raised "
                                         f"{type(exc).__name__}: {exc}; return (y, h_T, c_T, cache) from the forward"],
                                        subject=f"adapted {self.name}") from exc
            upstream.sync("backward")
        cache.handed.sync("backward")  # what forward was given may have been kept in the cache
        grads, extra = self._gradients_by_key(raw)
        out: dict[str, Any] = {}
        out["x"] = conv.seq_from(grads.pop("x"), "dx")
        # An initial state the implementation does not take has a placeholder gradient: reported as not compared.
        out["h0"] = to_numpy(self._state_from(grads.pop("h0"), "dh0")) if conv.initial_hidden \
            else np.zeros((B, H), dtype=out["x"].dtype)
        out["c0"] = to_numpy(self._state_from(grads.pop("c0"), "dc0")) if conv.initial_cell \
            else np.zeros_like(out["h0"])
        params = {k: to_numpy(v) for k, v in grads.items()}
        out.update(self._grads_from(params, D, H))
        if not_computed:
            # Reported as not computed, never compared as zeros: a canonical gradient is not computed when
            # any of the implementation's gradients it is converted from was not.
            if self._layered:
                touched = {c for k in not_computed if k in params for c in self._canonical_of(k)}
            else:
                mask = {k: np.full_like(v, 1.0 if k in not_computed else 0.0) for k, v in params.items()}
                touched = {k for k, v in conv.grads_from(mask, self.variant, D, H).items() if np.any(v != 0)}
            for key in touched | (not_computed & {"x", "h0", "c0"}):
                out[key] = None
        # Gradients the contract does not expect are passed on under their own names, so that the
        # harness reports them ("unexpected [...]") instead of this adapter dropping them.
        for name, value in extra.items():
            out[name if name not in out else f"{name} (extra)"] = value
        return out

    def _gradients_by_key(self, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The implementation's gradients by the default keys (x, h0, c0, W, R, b, ...), and the ones
        it returned beyond those, by the names it gave them."""
        keys: list[str] = ["x", *self.convention.initial_states("h0", "c0"), *self._param_keys()]
        if isinstance(raw, Mapping):
            by_name = {v: k for k, v in self._names.items()}
            out: dict[str, Any] = {}
            extra: dict[str, Any] = {}
            for name, value in raw.items():
                key = by_name.get(name, name)
                if key not in keys and isinstance(name, str) and name.startswith("d") and name[1:] in keys:
                    key = name[1:]
                if key not in keys and isinstance(name, str) and name.startswith("d") and name[1:] in by_name:
                    key = by_name[name[1:]]
                if key in keys:
                    out[key] = value
                else:
                    extra[str(name)] = value
            missing = [k for k in keys if k not in out]
            if missing:
                wanted = [self._names.get(k, k) for k in keys]
                raise KeyError(f"backward: expected gradients named {wanted}, missing "
                               f"{[self._names.get(k, k) for k in missing]}; got {list(raw)}")
            return out, extra
        if isinstance(raw, (tuple, list)):
            if len(raw) != len(keys):
                raise ValueError(f"backward: expected {len(keys)} gradients in the order "
                                 f"{[self._names.get(k, k) for k in keys]}, got {len(raw)}")
            return dict(zip(keys, raw)), {}
        raise TypeError(f"backward: expected a dict or tuple of gradients, got {type(raw).__name__}")

    # -- PyTorch modules: forward by functional_call, backward by autograd

    def _torch_forward(self, given, converted, mine, params, lengths=None):
        import torch

        conv = self.convention
        tensors = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in zip(("x", "h0", "c0"), converted)}
        weights = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in mine.items()}
        x, h, c = tensors["x"], tensors["h0"], tensors["c0"]
        # Every tensor is a copy: changes to any of them are the caller's arrays', converted back.
        x_given, h0, c0 = given
        back = {"x": (x_given, conv.seq_from), "h0": (h0, lambda v: np.array(self._state_from(v, "h0"), copy=True)),
                "c0": (c0, lambda v: np.array(self._state_from(v, "c0"), copy=True))}
        handed = _Handed(self, {**tensors, **weights}, back, params, x_given.shape[2], c0.shape[-1])
        named = {self._names[k]: v for k, v in weights.items()}
        with _swapped_parameters(self._module, named), torch.enable_grad():
            if self._torch_layer:
                result = self._call_layer_module(x, h, c, x_given.shape, lengths)
            elif self._call is not None:
                result = self._call(self._module, x, *conv.initial_states(h, c))
            elif conv.initial_hidden and conv.initial_cell:
                result = self._module(x, (h, c))
            else:
                result = self._module(x, *conv.initial_states(h, c))
        y, h_T, c_T = _torch_outputs(result)
        cache = (tensors, weights, (y, h_T, c_T))
        as_np = []
        for t in (y, h_T, c_T):
            a = t.detach().cpu().numpy() if t is not None else None
            if a is not None and t is not y and a.ndim == 3 and a.shape[0] == 1:
                a = a[0]  # nn.LSTM's (num_layers * directions, B, H) with one layer
            as_np.append(a)
        return as_np[0], as_np[1], as_np[2], cache, handed

    def _call_layer_module(self, x: Any, h: Any, c: Any, shape: tuple[int, int, int], lengths: Any) -> Any:
        """``module(x, (h0, c0))`` for a PyTorch-style layer module, its sizes set to the case's (nn.LSTM
        checks its inputs against them); with lengths, x packed (``enforce_sorted=False``) and y unpacked
        to all T steps, zeros past each row's length."""
        import torch

        T, _, D = shape
        sizes = {"input_size": D, "hidden_size": c.shape[-1]}
        with _swapped_attributes(self._module, sizes):
            if lengths is None:
                return self._module(x, (h, c))
            rnn = torch.nn.utils.rnn
            batch_first = self.convention.layout == "BTD"
            packed = rnn.pack_padded_sequence(x, torch.as_tensor(np.asarray(lengths), dtype=torch.int64),
                                              batch_first=batch_first, enforce_sorted=False)
            out, state = self._module(packed, (h, c))
            y, _ = rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=T)
            return y, state

    def _torch_backward(self, cache, dys, dh_T, dc_T):
        import torch

        tensors, params, outs = cache
        pairs = []
        for out, grad in zip(outs, (dys, dh_T, dc_T)):
            if out is None or grad is None or not out.requires_grad:
                continue
            g = torch.tensor(np.asarray(grad), dtype=out.dtype)
            pairs.append((out, g.reshape(out.shape)))
        keys = ["x"] + self.convention.initial_states("h0", "c0")
        leaves = [tensors[k] for k in keys]
        keys += list(params)
        leaves += [params[k] for k in params]
        grads = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)
        out = {}
        none = set()
        for key, leaf, g in zip(keys, leaves, grads):
            if g is None:  # autograd reached no such leaf: the module does not compute this gradient
                none.add(key)
                g = torch.zeros_like(leaf)
            out[key] = g.detach().cpu().numpy()
        return out, none


    # -- a function written in a framework: forward in it, backward by its gradients

    def _engine_forward(self, given, converted, mine, params):
        assert self._engine is not None
        conv = self.convention
        keys = ["x", *conv.initial_states("h0", "c0"), *conv.param_keys(self.variant)]
        arrays = {"x": converted[0], "h0": converted[1], "c0": converted[2], **mine}
        inputs, (outs, state) = self._engine.forward(self._forward, [np.asarray(arrays[k]) for k in keys])
        # What the function was handed is watched (a framework array can be changed in place too).
        x_given, h0, c0 = given
        back = {"x": (x_given, conv.seq_from), "h0": (h0, lambda v: np.array(self._state_from(v, "h0"), copy=True)),
                "c0": (c0, lambda v: np.array(self._state_from(v, "c0"), copy=True))}
        watched = dict(zip(keys, inputs))
        handed = _Handed(self, watched, {k: v for k, v in back.items() if k in watched}, params,
                         x_given.shape[2], h0.shape[1])
        y, h_T, c_T = outs
        blanks = [np.zeros_like(arrays[k]) for k in keys]  # stand-ins for gradients the framework does not reach
        return y, h_T, c_T, (keys, state, blanks), handed

    def _engine_backward(self, cache, dys, dh_T, dc_T):
        assert self._engine is not None
        keys, state, blanks = cache
        grads = self._engine.backward(state, [dys, dh_T, dc_T])
        out, none = {}, set()
        for key, g, blank in zip(keys, grads, blanks):
            if g is None:  # the framework reached no such input: the function does not compute this gradient
                none.add(key)
            out[key] = blank if g is None else g
        return out, none


AUTOGRAD_FRAMEWORKS = ("torch", "jax", "tf")


def _outputs(result: Any, is_array: Callable[[Any], bool]) -> tuple[Any, Any, Any]:
    """(y, h_T, c_T) from what a function or module returned: (y, (h_T, c_T)), (y, h_T, c_T), (y, h_T) or y."""
    if is_array(result):
        return result, None, None
    if isinstance(result, (tuple, list)):
        if len(result) == 2 and isinstance(result[1], (tuple, list)) and len(result[1]) == 2:
            return result[0], result[1][0], result[1][1]
        if len(result) == 3:
            return result[0], result[1], result[2]
        if len(result) == 2:
            return result[0], result[1], None
    raise TypeError(f"forward returned {type(result).__name__}: expected y, (y, (h_T, c_T)) or (y, h_T, c_T)")


class _Engine:
    """One framework's way to run a function and take the gradients of its outputs (vector-Jacobian
    products): ``forward(fn, arrays)`` -> (the inputs as the framework holds them, ((y, h_T, c_T) as
    NumPy arrays, state)); ``backward(state, [dy, dh_T, dc_T])`` -> one gradient per input (None where
    the framework reached none). An upstream gradient of None, or for an output it did not return, is left out."""

    def forward(self, fn: Callable[..., Any], arrays: list[np.ndarray]) -> tuple[list[Any], tuple[Any, Any]]:
        raise NotImplementedError

    def backward(self, state: Any, upstream: list[Any]) -> list[np.ndarray | None]:
        raise NotImplementedError


class _TorchEngine(_Engine):
    """PyTorch: the inputs as leaf tensors, the backward by ``torch.autograd.grad`` (a function built on a
    ``torch.autograd.Function`` uses that Function's own backward)."""

    def forward(self, fn, arrays):
        import torch

        leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
        with torch.enable_grad():
            outs = _outputs(fn(*leaves), lambda r: isinstance(r, torch.Tensor))
        return leaves, ([None if o is None else o.detach().cpu().numpy() for o in outs], (leaves, outs))

    def backward(self, state, upstream):
        import torch

        leaves, outs = state
        pairs = [(o, torch.tensor(np.asarray(g), dtype=o.dtype).reshape(o.shape)) for o, g in zip(outs, upstream)
                 if o is not None and g is not None and o.requires_grad]
        grads = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)
        return [None if g is None else g.detach().cpu().numpy() for g in grads]


class _JaxEngine(_Engine):
    """JAX: the forward under ``jax.vjp``, the backward its vector-Jacobian product. float64 needs
    ``jax_enable_x64``: it is switched on when a float64 case comes (a process-wide JAX setting; the
    harness's JAX oracle does the same), since without it JAX would compute float64 inputs in float32."""

    def forward(self, fn, arrays):
        import jax
        import jax.numpy as jnp

        if any(a.dtype == np.float64 for a in arrays) and not jax.config.read("jax_enable_x64"):
            jax.config.update("jax_enable_x64", True)
        inputs = [jnp.asarray(a) for a in arrays]

        def outputs(*args: Any) -> tuple[Any, Any, Any]:
            return _outputs(fn(*args), lambda r: hasattr(r, "shape") and hasattr(r, "dtype"))

        outs, vjp = jax.vjp(outputs, *inputs)
        return inputs, ([None if o is None else np.asarray(o) for o in outs], (outs, vjp))

    def backward(self, state, upstream):
        import jax.numpy as jnp

        outs, vjp = state
        cotangents = tuple(None if o is None else jnp.zeros_like(o) if g is None
                           else jnp.asarray(np.asarray(g), dtype=o.dtype).reshape(o.shape)
                           for o, g in zip(outs, upstream))
        return [np.asarray(g) for g in vjp(cotangents)]


class _TensorFlowEngine(_Engine):
    """TensorFlow: the forward recorded on a ``tf.GradientTape`` watching every input, the backward
    ``tape.gradient`` with the upstream gradients as ``output_gradients``."""

    def forward(self, fn, arrays):
        import tensorflow as tf

        inputs = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            for t in inputs:
                tape.watch(t)
            outs = _outputs(fn(*inputs), tf.is_tensor)
        return inputs, ([None if o is None else np.asarray(o) for o in outs], (tape, inputs, outs))

    def backward(self, state, upstream):
        import tensorflow as tf

        tape, inputs, outs = state
        pairs = [(o, tf.reshape(tf.constant(np.asarray(g), dtype=o.dtype), o.shape)) for o, g in zip(outs, upstream)
                 if o is not None and g is not None]
        grads = tape.gradient([p[0] for p in pairs], inputs, output_gradients=[p[1] for p in pairs],
                              unconnected_gradients=tf.UnconnectedGradients.NONE)
        return [None if g is None else np.asarray(tf.convert_to_tensor(g)) for g in grads]


_ENGINES: dict[str, type[_Engine]] = {"torch": _TorchEngine, "jax": _JaxEngine, "tf": _TensorFlowEngine}


@dataclass
class _Cache:
    """What an adapter's forward hands to its backward (the contract's opaque cache)."""

    inner: Any  # the implementation's own cache, or the autograd graph
    x_shape: tuple[int, int, int]  # (T, B, D)
    H: int
    h_from_y: bool  # the implementation returned no h_T: it was read off y's last step
    handed: _Handed  # what forward gave the implementation, still watched in backward


def _undo_dy(out: np.ndarray, folded_dh_T: np.ndarray | None) -> np.ndarray:
    """The caller's dy from the (possibly changed) one the implementation was given, back in (T, B, H)."""
    if folded_dh_T is not None:
        out[-1] -= folded_dh_T
    return out


def _numpy_view(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: its current values, without a copy on the CPU
        return value.detach().cpu().numpy()
    return np.asarray(value)


class _Handed:
    """The converted copies an adapter handed its implementation, watched for changes in place.

    The contract forbids an implementation to modify its inputs, and :func:`harness.subject.execute`
    finds out by comparing the arrays it passed with copies; but an adapted implementation receives
    converted copies, so execute would never see a change. Chosen remedy: a change is converted
    back and written into the caller's array, so that execute reports the contract violation under
    the canonical name ("x (forward)", "W (backward)") exactly as for an implementation in the
    standard convention. A change that converts back to no visible difference (e.g. +d on b_ih and
    -d on b_hh) is raised as an error instead, naming the implementation's arrays.
    """

    def __init__(self, adapted: Adapted, watched: dict[str, Any],
                 back: dict[str, tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]],
                 params: Mapping[str, np.ndarray] | None = None, D: int = 0, H: int = 0):
        self.adapted = adapted
        self.watched = watched  # name -> array (or tensor) handed over; param names are the default ones
        self.back = back  # name -> (the caller's array, implementation's form -> the caller's)
        self.params = params  # the caller's canonical params (for watched names not in ``back``)
        self.D, self.H = D, H
        self.pristine = {k: np.array(_numpy_view(v), copy=True) for k, v in watched.items()}

    def sync(self, call: str) -> None:
        now = {k: _numpy_view(v) for k, v in self.watched.items()}
        changed = [k for k in now if not np.array_equal(now[k], self.pristine[k], equal_nan=True)]
        if not changed:
            return
        written: set[str] = set()
        for k in changed:
            if k in self.back:
                target, convert = self.back[k]
                restored = convert(now[k])
                if not np.array_equal(restored, target, equal_nan=True):
                    target[...] = restored
                written.add(k)  # these conversions are one to one: the caller's array shows the change
        in_params = [k for k in changed if k not in self.back]
        if in_params and self.params is not None:
            adapted = self.adapted
            canon = adapted._params_from({k: now[k] for k in adapted._param_keys()}, self.D, self.H)
            touched = {c for k in in_params for c in adapted._canonical_of(k)}
            differ = {c for c in touched if not np.array_equal(canon[c], self.params[c], equal_nan=True)}
            for c in differ:
                self.params[c][...] = canon[c]
            written.update(k for k in in_params if differ & set(adapted._canonical_of(k)))
        for k in changed:
            self.pristine[k] = np.array(now[k], copy=True)  # each change is passed on once
        hidden = [k for k in changed if k not in written]
        if hidden:
            names = ", ".join(self.adapted._names.get(k, k) for k in hidden)
            raise ContractError([f"{call} modified its input arrays in place: {names} (in its own convention)"],
                                subject=f"adapted {self.adapted.name}")


_STEP_GRADIENT_ALIASES = {"x": ("dx", "dxt", "dx_t", "x"), "h": ("dprev_h", "dh_prev", "da_prev", "dh"),
                          "c": ("dprev_c", "dc_prev", "dc")}


class _TimeLoop:
    """A one-timestep cell run over the sequence by the adapter: the forward loop and the backward
    through time (BPTT), in the cell's own convention and layout.

    The cell's ``forward(x_t, prev_h, prev_c, params)`` returns ``(next_h, next_c, cache)``; its
    ``backward(dnext_h, dnext_c, cache)`` returns ``(dx_t, dprev_h, dprev_c, *dparams)``, ``(dx_t,
    dprev_h, dprev_c, {name: dparam})`` or one dict (dx_t under ``"dx"``/``"dxt"``, dprev_h under
    ``"dprev_h"``/``"da_prev"``, dprev_c under ``"dprev_c"``/``"dc_prev"``). The loop hands the cell
    each timestep of x as the layout has it (x[:, :, t] for "DBT"), carries dh and dc back, adds
    dy[t] to dh at every step and sums the parameter gradients over time. Everything around it
    (conversions, watching copies, limits) is the sequence adapter's, unchanged.
    """

    NOTE = "a one-timestep cell: the adapter calls it once per timestep and runs the backward through time"

    def __init__(self, step_forward: Callable[..., Any], step_backward: Callable[..., Any] | None,
                 params_as: str):
        self.step_forward = step_forward
        self.step_backward = step_backward
        self.params_as = params_as  # "args" (functions) or "dict" (a cell object's methods)

    def _call(self, adapted: Adapted, what: str, t: int, T: int, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            add_note = getattr(exc, "add_note", None)  # Python 3.11+; the message is then shown with the error
            if add_note is not None:
                add_note(f"in {what} at timestep t={t} of T={T} ({self.NOTE})")
            raise

    def _fail(self, adapted: Adapted, message: str) -> ContractError:
        return ContractError([f"{message} ({self.NOTE})"], subject=f"adapted {adapted.name}")

    def forward(self, adapted: Adapted, x: np.ndarray, h0: np.ndarray, c0: np.ndarray,
                mine: Mapping[str, np.ndarray]) -> tuple[Any, Any, Any, Any]:
        conv = adapted.convention
        axis = conv.layout.index("T")
        steps = np.moveaxis(x, axis, 0)  # views: a change the cell makes to x_t is a change to x
        T = steps.shape[0]
        keys = conv.param_keys(adapted.variant)
        params: list[Any] = [mine[k] for k in keys] if self.params_as == "args" \
            else [{adapted._names[k]: mine[k] for k in keys}]
        h, c, hs, caches = h0, c0, [], []
        for t in range(T):
            out = self._call(adapted, "step_forward", t, T, self.step_forward, steps[t], h, c, *params)
            if not isinstance(out, (tuple, list)) or len(out) != 3:
                got = f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
                raise self._fail(adapted, f"step_forward at t={t}: expected (next_h, next_c, cache), got {got}")
            h, c, cache = out
            for name, value in (("next_h", h), ("next_c", c)):
                if to_numpy(value).shape != h0.shape:
                    raise self._fail(adapted, f"step_forward at t={t}: returned {name} of shape "
                                              f"{to_numpy(value).shape}, expected {h0.shape} (the shape of prev_h)")
            hs.append(to_numpy(h))
            caches.append(cache)
        return np.stack(hs, axis=axis), to_numpy(h), to_numpy(c), caches

    def backward(self, adapted: Adapted, dy: np.ndarray, dh_T: np.ndarray, dc_T: np.ndarray,
                 caches: list[Any]) -> dict[str, Any]:
        assert self.step_backward is not None  # the adapter has a backward only when the cell does
        conv = adapted.convention
        axis = conv.layout.index("T")
        dys = np.moveaxis(dy, axis, 0)
        T = len(caches)
        keys = conv.param_keys(adapted.variant)
        dh, dc = dh_T, dc_T
        dxs: list[np.ndarray] = [np.empty(0)] * T
        sums: dict[str, Any] = {}
        for t in reversed(range(T)):
            out = self._call(adapted, "step_backward", t, T, self.step_backward, dh + dys[t], dc, caches[t])
            dx, dh, dc, grads = self._split(adapted, out, keys, t)
            for value, name in ((dx, "dx"), (dh, "dprev_h"), (dc, "dprev_c")):
                if value is None:
                    raise self._fail(adapted, f"step_backward at t={t}: returned no {name}")
            dxs[t] = to_numpy(dx)
            dh, dc = to_numpy(dh), to_numpy(dc)
            for name, g in grads.items():  # dL/dW = sum over t of the step's dW
                sums[name] = to_numpy(g) if name not in sums else sums[name] + to_numpy(g)
        states = dict(zip(conv.initial_states("h0", "c0"), conv.initial_states(dh, dc)))
        return {"x": np.stack(dxs, axis=axis), **states, **sums}

    def _split(self, adapted: Adapted, out: Any, keys: tuple[str, ...], t: int) -> tuple[Any, Any, Any, dict]:
        """(dx_t, dprev_h, dprev_c, parameter gradients by the cell's own names) from what its backward returned."""
        names = [adapted._names[k] for k in keys]
        if isinstance(out, Mapping):
            rest = dict(out)
            found = []
            for aliases in _STEP_GRADIENT_ALIASES.values():
                hit = next((a for a in aliases if a in rest), None)
                found.append(rest.pop(hit) if hit is not None else None)
            grads = {}
            for name, value in rest.items():  # "dWx" is the gradient of Wx, as "dx" is that of x
                own = name[1:] if isinstance(name, str) and name not in names and name[1:] in names else name
                grads[own] = value
            return found[0], found[1], found[2], grads
        if isinstance(out, (tuple, list)):
            if len(out) == 4 and isinstance(out[3], Mapping):
                return out[0], out[1], out[2], {(k[1:] if k not in names and k[1:] in names else k): v
                                                for k, v in out[3].items()}
            if len(out) == 3 + len(keys):
                return out[0], out[1], out[2], dict(zip(names, out[3:]))
        got = f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
        raise self._fail(adapted, f"step_backward at t={t}: expected (dx, dprev_h, dprev_c, "
                                  f"{', '.join('d' + n for n in names)}) or (dx, dprev_h, dprev_c, dict), got {got}")


def _torch_outputs(result: Any) -> tuple[Any, Any, Any]:
    """(y, h_T, c_T) from what a module returned: (y, (h, c)), (y, h, c) or y."""
    import torch

    try:
        return _outputs(result, lambda r: isinstance(r, torch.Tensor))
    except TypeError:
        raise TypeError(f"the module returned {type(result).__name__}: expected y, (y, (h_T, c_T)) or (y, h_T, c_T); "
                        f"pass call=... to adapt() to say how to call it") from None


class _swapped_parameters:
    """Within the block, the module's parameters named (dotted) in ``named`` are the given tensors.

    A parameter is taken out of its module's ``_parameters`` and a plain tensor put in the instance
    dict, where attribute lookup finds it first; everything is put back on exit, even after an error.
    """

    def __init__(self, module: Any, named: dict[str, Any]):
        self.module = module
        self.named = named
        self.saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> None:
        known = dict(self.module.named_parameters())
        for dotted, tensor in self.named.items():
            if dotted not in known:
                self.__exit__()
                raise ValueError(f"names: the module has no parameter {dotted!r}; its parameters are "
                                 f"{sorted(known)}")
            owner = self.module
            *path, leaf = dotted.split(".")
            for part in path:
                owner = getattr(owner, part)
            self.saved.append((owner, leaf, owner._parameters.pop(leaf)))
            owner.__dict__[leaf] = tensor

    def __exit__(self, *exc: Any) -> None:
        while self.saved:
            owner, leaf, old = self.saved.pop()
            owner.__dict__.pop(leaf, None)
            owner._parameters[leaf] = old


class _swapped_attributes:
    """Within the block, the module's attributes among ``values`` that it has are the given values."""

    def __init__(self, module: Any, values: dict[str, Any]):
        self.module = module
        self.saved = {k: getattr(module, k) for k in values if hasattr(module, k)}
        self.values = {k: v for k, v in values.items() if k in self.saved}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            setattr(self.module, k, v)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            setattr(self.module, k, v)


def is_torch_layer(obj: Any) -> bool:
    """Whether ``obj`` is a PyTorch-style layer module: an ``nn.Module`` with nn.LSTM's ``weight_ih_l0``."""
    return is_torch_module(obj) and any(name == "weight_ih_l0" for name, _ in obj.named_parameters())


def _torch_layer_structure(module: Any, lengths: str | None) -> Structure:
    """The structure a PyTorch-style layer module computes, read off its attributes as nn.LSTM has them
    (num_layers, bidirectional, proj_size, hidden_size; coupled_input_forget and cell_clip if it has
    them), checked against its parameters: a ValueError names the attribute that disagrees."""
    what = type(module).__name__
    if getattr(module, "bias", True) is False:
        raise ValueError(f"impl: {what} has no biases (bias=False), while the contract's LSTM has b; certify one "
                         f"made with bias=True")
    declared: dict[str, Any] = {a: getattr(module, a, d) for a, d in (
        ("num_layers", 1), ("bidirectional", False), ("proj_size", 0), ("coupled_input_forget", False),
        ("cell_clip", None))}
    structure = Structure(**declared, lengths=lengths == "packed")
    bad = structure.problems("vanilla")
    if bad:
        raise ValueError(f"impl: {what}'s attributes: " + "; ".join(bad))
    have = {name: tuple(p.shape) for name, p in module.named_parameters()}
    expected = layouts.torch_names(structure)
    missing, extra = [k for k in expected if k not in have], sorted(set(have) - set(expected))
    said = f"num_layers={structure.num_layers}, bidirectional={structure.bidirectional}, " \
           f"proj_size={structure.proj_size}"
    if missing or extra:
        raise ValueError(f"impl: {what}'s attributes ({said}) disagree with its parameters: "
                         + "; ".join(([f"missing {missing}"] if missing else [])
                                     + ([f"not accounted for {extra}"] if extra else [])))
    H = getattr(module, "hidden_size", None)
    rows = have["weight_ih_l0"][0]
    if H is not None and rows != 4 * H:
        raise ValueError(f"hidden_size: {what} says hidden_size={H}, but weight_ih_l0 has {rows} rows, not 4 * {H}")
    H = rows // 4
    for name, canonical in expected.items():
        bare = canonical.rsplit(".", 1)[-1]
        want = {"R": (4 * H, structure.h_out(H)), "proj": (structure.proj_size, H), "b": (4 * H,)}.get(bare)
        if want is not None and have[name] != want:
            raise ValueError(f"impl: {what}'s attributes ({said}, hidden_size={H}) call for {name} of shape {want}, "
                             f"got {have[name]}")
    return structure


def _remembers_what_it_adapted(adapt_fn: Callable[..., Adapted]) -> Callable[..., Adapted]:
    """Keep on the adapter what it wraps (``wrapped``) and the keywords given that differ from their
    defaults, so that a replay command can name the object and the options that adapt it the same way
    (``TARGET --gate-order ifco``) when a TARGET loads the object.

    ``given`` holds those with plain values (text, numbers, flags, and ``names`` as a dict of text), as
    copies: an adapter is pickled to worker processes, and a value of the caller's (a generator, a
    mapping proxy) must not stop it. ``given_others`` names the rest (functions, ``call=``, sequences).
    """
    defaults = {name: p.default for name, p in inspect.signature(adapt_fn).parameters.items()}

    def differs(name: str, value: Any) -> bool:
        if isinstance(defaults[name], tuple) and isinstance(value, list):
            value = tuple(value)  # backward_takes=[...] as the default says it
        try:
            return not bool(value == defaults[name])
        except Exception:  # noqa: BLE001 - a value whose == is not a bool (an array) is a given value
            return True

    @functools.wraps(adapt_fn)
    def adapt(impl: Any = None, **keywords: Any) -> Adapted:
        adapted = adapt_fn(impl, **keywords)
        if impl is not None and not isinstance(impl, Adapted):
            plain: dict[str, Any] = {}
            others: list[str] = []
            for key, value in keywords.items():
                if not differs(key, value):
                    continue
                if isinstance(value, (str, bool, int, float)):
                    plain[key] = value
                elif key == "names" and isinstance(value, Mapping):
                    if value:  # an empty mapping renames nothing
                        plain[key] = {str(k): str(v) for k, v in value.items()}
                else:
                    others.append(key)
            adapted.wrapped, adapted.given, adapted.given_others = impl, plain, tuple(others)
        return adapted

    return adapt


@_remembers_what_it_adapted
def adapt(
    impl: Any = None,
    *,
    forward_fn: Callable[..., Any] | None = None,
    backward_fn: Callable[..., Any] | None = None,
    step_forward: Callable[..., Any] | None = None,
    step_backward: Callable[..., Any] | None = None,
    step: bool = False,
    variant: str | None = None,
    name: str | None = None,
    dtypes: Sequence[str] | None = None,
    ln_eps: float | None = None,
    gate_order: str = "ifgo",
    transposed: bool = False,
    bias: str = "single",
    forget_bias: float = 0.0,
    batch_major: bool = False,
    layout: str = "TBD",
    initial_cell: bool = True,
    final_cell: bool = True,
    initial_hidden: bool = True,
    per_gate: str | None = None,
    column_bias: bool = False,
    names: Mapping[str, str] | None = None,
    backward_takes: Sequence[str] = _UPSTREAM,
    call: Callable[..., Any] | None = None,
    autograd: str | None = None,
    state_order: str = "layer-major",
    y_directions: str = "forward-first",
    lengths: str | None = None,
) -> Adapted:
    """Wrap an implementation written in another convention so that it can be certified as it is.

    ``impl`` is an object with ``forward(x, h0, c0, params)`` and optionally
    ``backward(dy, dh_T, dc_T, cache)`` in its own convention (params and gradients keyed by its
    own names), or a PyTorch ``nn.Module`` (called as ``module(x, (h0, c0))``, or by ``call(module,
    x, h0, c0)``; parameters substituted by name; backward by autograd). Give ``forward_fn`` (and
    ``backward_fn``) instead of ``impl`` for plain functions. For a cell that computes one timestep,
    give ``step_forward`` (and ``step_backward``), or ``impl`` with ``step=True``: the adapter runs the
    time loop and the backward through time. See the module docstring for the conventions.
    ``variant``, ``name``, ``dtypes`` and ``ln_eps`` default to what ``impl`` declares.

    A whole PyTorch layer (``torch.nn.LSTM``, or a module with its parameter names, given without
    ``names`` or ``call``) is adapted by nn.LSTM's names and attributes, its structure declared;
    ``lengths="packed"`` gives it packed sequences. An object that declares a layered structure keeps
    its structure through the adapter; ``state_order`` and ``y_directions`` say how its states and
    its bidirectional y are ordered (see the module docstring).

    ``impl`` may itself be an adapter: what it wraps is then read in the given gate order,
    transposition, forget bias and sequence layout instead of the adapter's, keeping the adapter's
    names, bias form, cell states and backward (which :func:`harness.diagnose` relies on).
    """
    given = [k for k, v in (("impl", impl), ("forward_fn", forward_fn), ("step_forward", step_forward))
             if v is not None]
    if len(given) != 1:
        raise ValueError("adapt: expected either impl (an object or nn.Module), forward_fn or step_forward, got "
                         + (" and ".join(given) if given else "none of them"))
    if backward_fn is not None and forward_fn is None:
        raise ValueError("backward_fn: goes with forward_fn; an object's own backward is used, and a cell's "
                         "step_backward goes with step_forward")
    if step_backward is not None and step_forward is None:
        raise ValueError("step_backward: goes with step_forward; a cell object's own backward is used")
    if not isinstance(step, bool):
        raise ValueError(f"step: expected True or False, got {step!r}")
    if step and impl is None:
        raise ValueError("step: True says that impl is a one-timestep cell object; for functions pass "
                         "step_forward= and step_backward= instead")
    if step or step_forward is not None:
        if tuple(backward_takes) != _UPSTREAM or call is not None:
            raise ValueError(f"{'call' if call is not None else 'backward_takes'}: does not apply to a one-timestep "
                             f"cell, whose backward takes (dnext_h, dnext_c, cache) and whose loop the adapter runs")
        if isinstance(impl, Adapted) or is_torch_module(impl):
            raise ValueError("step: expected a cell object with forward(x_t, prev_h, prev_c, params) and "
                             "backward(dnext_h, dnext_c, cache) methods (or step_forward/step_backward ones)")
    if autograd is not None:
        if autograd not in AUTOGRAD_FRAMEWORKS:
            raise ValueError(f"autograd: expected one of {AUTOGRAD_FRAMEWORKS} (the framework whose gradients are the "
                             f"backward), got {autograd!r}")
        if forward_fn is None or backward_fn is not None:
            raise ValueError("autograd: goes with forward_fn (a function written in that framework) and no "
                             "backward_fn; a PyTorch nn.Module is passed as impl and uses autograd already")
        if tuple(backward_takes) != _UPSTREAM:
            raise ValueError("backward_takes: does not apply with autograd=, whose backward is the framework's")
    if lengths is not None and (lengths != "packed" or impl is None or not is_torch_layer(impl)
                                or names is not None or call is not None):
        raise ValueError(f"lengths: expected None, or 'packed' for a PyTorch-style layer module (nn.LSTM's parameter "
                         f"names, no names= or call=), which is then given packed sequences; got {lengths!r} for "
                         f"{type(impl if impl is not None else forward_fn or step_forward).__name__}. An object that "
                         f"takes lengths itself declares accepts_lengths = True")
    if isinstance(impl, Adapted):
        return _readapted(impl, variant=variant, name=name, dtypes=dtypes, ln_eps=ln_eps, gate_order=gate_order,
                          transposed=transposed, forget_bias=forget_bias, batch_major=batch_major, layout=layout,
                          state_order=state_order, y_directions=y_directions,
                          interface={"bias": (bias, "single"), "initial_hidden": (initial_hidden, True),
                                     "initial_cell": (initial_cell, True), "per_gate": (per_gate, None),
                                     "column_bias": (column_bias, False),
                                     "final_cell": (final_cell, True), "names": (names, None),
                                     "backward_takes": (tuple(backward_takes), _UPSTREAM), "call": (call, None)})
    source = impl if impl is not None else forward_fn if forward_fn is not None else step_forward
    variant = variant if variant is not None else getattr(impl, "variant", "vanilla")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    torch_layer = impl is not None and names is None and call is None and is_torch_layer(impl)
    structure = Structure()
    if torch_layer:
        if variant != "vanilla":
            raise ValueError(f"variant: a PyTorch-style layer module computes the vanilla cell (nn.LSTM's parameters), "
                             f"got {variant!r}")
        structure = _torch_layer_structure(impl, lengths)
        module_layout = "BTD" if getattr(impl, "batch_first", False) else "TBD"
        given_layout = "BTD" if batch_major else layouts.normalize_layout(layout)
        if given_layout not in (layouts.CANONICAL_LAYOUT, module_layout):
            as_given = "batch_major: True is 'BTD'" if batch_major else f"layout: got {given_layout!r}"
            raise ValueError(f"{as_given}, but the module says batch_first={module_layout == 'BTD'}, so its sequences "
                             f"are {module_layout}; leave the layout out (the module's attribute says it)")
        layout, batch_major = module_layout, False
    elif impl is not None and not step:
        structure = declared_structure(impl, variant=variant)
    layered = torch_layer or structure.layered or structure.proj_size > 0
    if state_order != "layer-major" and not structure.layered:
        Convention(state_order=state_order)  # an unknown order is named as such first
        raise ValueError(f"state_order: applies to a layered implementation (num_layers > 1 or bidirectional), whose "
                         f"states have a (num_layers * dirs) axis to order; {type(source).__name__} declares "
                         f"{structure.describe() or 'one layer and one direction'}, so its states are (B, H) and "
                         f"have no such axis")
    if y_directions != "forward-first" and not structure.bidirectional:
        Convention(y_directions=y_directions)
        raise ValueError(f"y_directions: applies to a bidirectional implementation, whose y holds two directions' "
                         f"features; {type(source).__name__} declares {structure.describe() or 'one direction'}")
    if layered:
        # A whole layer's parameters are passed on by name (the contract's, or nn.LSTM's): a convention of the
        # cell's parameters would have to be applied cell by cell, which an adapter does not do.
        cell_keywords = {"gate_order": (gate_order, "ifgo"), "transposed": (transposed, False),
                         "bias": (bias, "single"), "forget_bias": (forget_bias, 0.0), "per_gate": (per_gate, None),
                         "column_bias": (column_bias, False), "initial_hidden": (initial_hidden, True),
                         "initial_cell": (initial_cell, True), "final_cell": (final_cell, True),
                         "backward_takes": (tuple(backward_takes), _UPSTREAM)}
        if not torch_layer:
            cell_keywords["names"] = (names, None)
        bad = [k for k, (value, default) in cell_keywords.items() if value != default]
        if bad:
            raise ValueError(f"{bad[0]}: not supported for a whole layer ({structure.describe()}); its parameters are "
                             f"passed on by name as they are ({'nn.LSTM' if torch_layer else 'the contract'}'s "
                             f"prefixed names), with only the layout of its sequences (layout, batch_major), the "
                             f"order of its states (state_order) and of y's directions (y_directions) to give")
        if layouts.normalize_layout(layout) not in (layouts.CANONICAL_LAYOUT, "BTD"):
            raise ValueError(f"layout: a whole layer's states keep their (num_layers * dirs, B, H) shape, so its "
                             f"sequences may be 'TBD' or 'BTD'; got {layout!r}")
    convention = Convention(gate_order=gate_order, transposed=transposed, bias=bias, forget_bias=forget_bias,
                            batch_major=batch_major, initial_cell=initial_cell, final_cell=final_cell,
                            per_gate=per_gate, initial_hidden=initial_hidden, layout=layout,
                            column_bias=column_bias, state_order=state_order, y_directions=y_directions)
    if variant == "layernorm" and bias != "single":
        raise ValueError(f"bias: the layernorm variant has no bias, so bias={bias!r} does not apply")
    upstream = tuple(backward_takes)
    bad = [u for u in upstream if u not in _UPSTREAM]
    if bad or "dy" not in upstream or "cache" not in upstream:
        raise ValueError(f"backward_takes: expected names from {_UPSTREAM} including 'dy' and 'cache', "
                         f"got {upstream!r}")
    keys = convention.param_keys(variant)
    names_map = {k: k for k in keys}
    if layered:
        keys = tuple(layouts.torch_names(structure)) if torch_layer else tuple(param_shapes(variant, structure, D=1,
                                                                                             H=1))
        names_map = {k: k for k in keys}
    if names:
        if not isinstance(names, Mapping):
            raise ValueError(f"names: expected a dict from {list(keys)} to the implementation's names, "
                             f"got {type(names).__name__}")
        unknown = [k for k in names if k not in keys]
        if unknown:
            raise ValueError(f"names: expected keys among {list(keys)} (the parameters of the {variant} "
                             f"variant with bias={bias!r}), got {unknown}")
        names_map.update({k: str(v) for k, v in names.items()})
    declared_name = name or getattr(impl, "name", None) or getattr(source, "__name__", None) \
        or type(source).__name__
    declared_dtypes = tuple(dtypes) if dtypes is not None else tuple(getattr(impl, "dtypes", DEFAULT_DTYPES))
    dtypes_declared = dtypes is not None or (impl is not None and hasattr(impl, "dtypes"))
    eps = ln_eps if ln_eps is not None else getattr(impl, "ln_eps", DEFAULT_LN_EPS)
    common: dict[str, Any] = dict(convention=convention, variant=variant, name=str(declared_name),
                                  dtypes=declared_dtypes, dtypes_declared=dtypes_declared,
                                  ln_eps=eps, names=names_map, upstream=upstream, structure=structure)
    if impl is not None and is_torch_module(impl):
        return Adapted(**common, forward=impl, backward=None, params_as="dict", torch_module=impl, call=call,
                       torch_layer=torch_layer)
    if call is not None:
        raise ValueError("call: only for a PyTorch nn.Module")
    if step or step_forward is not None:
        return _step_adapter(impl, step_forward, step_backward, common, len(keys),
                             [names_map[k] for k in keys])
    if impl is not None:
        fwd = getattr(impl, "forward", None)
        if not callable(fwd):
            raise ValueError(f"impl: expected an object with a forward method (or an nn.Module), got "
                             f"{type(impl).__name__} without one")
        bwd = getattr(impl, "backward", None)
        return Adapted(**common, forward=fwd, backward=bwd if callable(bwd) else None, params_as="dict")
    if not callable(forward_fn):
        raise ValueError(f"forward_fn: expected a function, got {type(forward_fn).__name__}")
    if backward_fn is not None and not callable(backward_fn):
        raise ValueError(f"backward_fn: expected a function or None, got {type(backward_fn).__name__}")
    _check_arity(forward_fn, 1 + len(convention.initial_states("h0", "c0")) + len(keys), "forward_fn",
                 ", ".join(["x", *convention.initial_states("h0", "c0"), *(names_map[k] for k in keys)]))
    if backward_fn is not None:
        _check_arity(backward_fn, len(upstream), "backward_fn", ", ".join(upstream))
    if autograd is not None:
        return Adapted(**common, forward=forward_fn, backward=None, params_as="args", engine=_ENGINES[autograd]())
    return Adapted(**common, forward=forward_fn, backward=backward_fn, params_as="args")


def adapt_keywords(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """``keywords`` of :func:`adapt` that describe a convention (the fields of :class:`Convention`, ``names``,
    ``step`` and ``lengths``), checked before anything is adapted: a ``ValueError`` names the first bad one."""
    own = {f.name for f in fields(Convention)}
    allowed = sorted(own | {"names", "step", "lengths"})
    out = dict(keywords)
    unknown = [k for k in out if k not in allowed]
    if unknown:
        raise ValueError(f"{unknown[0]}: not a convention keyword; expected among {allowed}")
    Convention(**{k: v for k, v in out.items() if k in own})
    if not isinstance(out.get("step", False), bool):
        raise ValueError(f"step: expected True or False, got {out['step']!r}")
    if out.get("lengths") not in (None, "packed"):
        raise ValueError(f"lengths: expected None or 'packed' (a PyTorch-style layer module given packed sequences), "
                         f"got {out['lengths']!r}")
    names = out.get("names")
    if names is not None and not (isinstance(names, Mapping) and all(isinstance(v, str) for v in names.values())):
        raise ValueError(f"names: expected a dict from the harness's names to the implementation's, got {names!r}")
    return out


def _step_adapter(cell: Any, step_forward: Callable[..., Any] | None, step_backward: Callable[..., Any] | None,
                  common: dict[str, Any], n_params: int, param_names: list[str]) -> Adapted:
    """An adapter around a one-timestep cell (an object's methods, or two functions) and the time loop."""
    params_as = "args"
    if cell is not None:
        params_as = "dict"
        step_forward = getattr(cell, "step_forward", None) or getattr(cell, "forward", None)
        step_backward = getattr(cell, "step_backward", None) or getattr(cell, "backward", None)
        if not callable(step_forward):
            raise ValueError(f"impl: with step=True, expected a cell object with a forward(x_t, prev_h, prev_c, "
                             f"params) (or step_forward) method, got {type(cell).__name__} without one")
        step_backward = step_backward if callable(step_backward) else None
    else:
        if not callable(step_forward):
            raise ValueError(f"step_forward: expected a function, got {type(step_forward).__name__}")
        if step_backward is not None and not callable(step_backward):
            raise ValueError(f"step_backward: expected a function or None, got {type(step_backward).__name__}")
        _check_arity(step_forward, 3 + n_params, "step_forward", ", ".join(["x_t", "prev_h", "prev_c",
                                                                              *param_names]))
    if step_backward is not None:
        _check_arity(step_backward, 3, "step_backward", "dnext_h, dnext_c, cache")
    loop = _TimeLoop(step_forward, step_backward, params_as)
    return Adapted(**common, forward=loop, backward=step_backward, params_as="step")


def _readapted(adapter: Adapted, *, variant: str | None, name: str | None, dtypes: Sequence[str] | None,
               ln_eps: float | None, gate_order: str, transposed: bool, forget_bias: float, batch_major: bool,
               layout: str, state_order: str, y_directions: str,
               interface: dict[str, tuple[Any, Any]]) -> Adapted:
    """What ``adapter`` wraps, adapted afresh: read in the given convention instead of the adapter's own.

    Wrapping an adapter in another (the canonical layout it speaks, taken for another) cannot express
    what a search for a convention asks, e.g. whether the functions behind a ``transposed=True``
    adapter are in fact not transposed; so the adapter's gate order, transposition, forget bias and
    sequence layout are replaced, and its interface (parameter names, bias form, cell states, the
    upstream gradients its backward takes, ``call``) is kept, and with it its limits.
    """
    old = adapter.convention
    # Its own values may be given again (the call diagnose prints spells out the whole convention); a per-gate
    # matrix over [h; x] may be read over [x; h] instead, since the two have the same parameters.
    own = {"bias": old.bias, "initial_hidden": old.initial_hidden, "initial_cell": old.initial_cell,
           "per_gate": old.per_gate, "column_bias": old.column_bias, "final_cell": old.final_cell,
           "names": None, "backward_takes": adapter._upstream, "call": adapter._call}
    concatenated = ("hx", "xh")
    per_gate = interface["per_gate"][0]
    swap = old.per_gate in concatenated and per_gate in concatenated
    # Its bias form may be read as another (separate or folded) when it has one bias: its names are kept.
    bias = interface["bias"][0]
    rebias = old.bias == "single" and bias != "single"
    allowed = {"per_gate": swap, "bias": rebias}
    given = [k for k, (value, default) in interface.items()
             if value != default and value != own[k] and not allowed.get(k, False)]
    if given:
        raise ValueError(f"{given[0]}: an adapter passed to adapt() keeps its own {', '.join(interface)}; only its "
                         f"convention (gate_order, transposed, forget_bias, batch_major or layout; per_gate 'hx' "
                         f"or 'xh' for one that has either; bias for one with a single bias) and variant, name, "
                         f"dtypes and ln_eps can be given again")
    convention = Convention(gate_order=gate_order, transposed=transposed, bias=bias if rebias else old.bias,
                            forget_bias=forget_bias, batch_major=batch_major, initial_cell=old.initial_cell,
                            final_cell=old.final_cell, initial_hidden=old.initial_hidden, layout=layout,
                            per_gate=per_gate if swap else old.per_gate, column_bias=old.column_bias,
                            state_order=state_order, y_directions=y_directions)
    structure = adapter._structure
    if convention.y_directions != "forward-first" and not structure.bidirectional:
        raise ValueError(f"y_directions: applies to a bidirectional implementation; {adapter.name} has one direction")
    if convention.state_order != "layer-major" and not structure.layered:
        raise ValueError(f"state_order: applies to a layered implementation (num_layers > 1 or bidirectional); "
                         f"{adapter.name} has one layer and one direction, so its states have no such axis")
    changed = [k for k, value, default in (("gate_order", convention.gate_order, "ifgo"),
                                           ("transposed", convention.transposed, False),
                                           ("forget_bias", convention.forget_bias, 0.0),
                                           ("bias", convention.bias, old.bias)) if value != default]
    if adapter._layered and changed:
        raise ValueError(f"{changed[0]}: a whole layer's parameters ({structure.describe()}) are passed on by name as "
                         f"they are; of its convention only layout, state_order and y_directions can be given "
                         f"again")
    variant = variant if variant is not None else adapter.variant
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    if variant == "layernorm" and old.bias != "single":
        raise ValueError(f"bias: the layernorm variant has no bias, so the adapter's bias={old.bias!r} does not "
                         f"apply")
    keys = adapter._param_keys() if adapter._layered else convention.param_keys(variant)
    names = {k: adapter._names.get(k, k) for k in keys}
    return Adapted(convention=convention, variant=variant, name=name or adapter.name,
                   dtypes=tuple(dtypes) if dtypes is not None else adapter.dtypes,
                   dtypes_declared=dtypes is not None or adapter.dtypes_declared,
                   ln_eps=ln_eps if ln_eps is not None else adapter.ln_eps, names=names, forward=adapter._forward,
                   backward=adapter._backward, params_as=adapter._params_as, upstream=adapter._upstream,
                   torch_module=adapter._module, call=adapter._call, engine=adapter._engine, structure=structure,
                   torch_layer=adapter._torch_layer)


def _check_arity(fn: Callable[..., Any], n: int, what: str, expected: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*range(n))
    except TypeError:
        raise ValueError(f"{what}: expected a function taking ({expected}), got one taking {sig}") from None
