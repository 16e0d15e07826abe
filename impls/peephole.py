"""The peephole LSTM: the gates also look at the cell state, through one weight per unit.

Peephole connections come from Gers and Schmidhuber (2000); this is the "vanilla" LSTM of Greff et
al., "LSTM: A Search Space Odyssey", ONNX's ``P`` input and TensorFlow's fused BlockLSTM with
``use_peephole=True``. Parameters: the standard ``W`` (4H, D), ``R`` (4H, H), ``b`` (4H,) plus
``p_i``, ``p_f``, ``p_o``, each (H,).

    a_t = W x_t + R h_{t-1} + b
    i = sigmoid(a_i + p_i * c_{t-1})
    f = sigmoid(a_f + p_f * c_{t-1})
    g = tanh(a_g)
    c_t = f * c_{t-1} + i * g
    o = sigmoid(a_o + p_o * c_t)          # the output gate sees the NEW cell state
    h_t = o * tanh(c_t)

The backward has one path the standard LSTM lacks: c_{t-1} reaches step t's input and forget gates
through the peepholes, so dL/dc_{t-1} = dL/dc_t * f + p_i * da_i + p_f * da_f, and c_t reaches o_t,
so dL/dc_t gains p_o * da_o before it flows anywhere else.

This module holds the whole variant: the readable loop version (one function per gate) and the
pointwise step of the stacked version (:class:`PeepholeCell`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from harness.structure import FEATURES
from impls.loop import (
    GateWeights,
    LoopLSTM,
    cell_candidate,
    clip_cell,
    gate_weights,
    join_gates,
    preactivation,
    preactivation_backward,
    sigmoid,
)
from impls.stacked import Cell, StackedCache, StackedLSTM, gate_views, sigmoid_, tanh_slope, times_sigmoid_slope_

__all__ = [
    "LoopPeepholeLSTM",
    "StackedPeepholeLSTM",
    "PeepholeCell",
    "Peepholes",
    "PeepholeStepCache",
    "cell_forward",
    "cell_backward",
]


# --- The readable loop version -------------------------------------------------------------------


@dataclass
class Peepholes:
    """The three peephole weight vectors, each (H,)."""

    i: np.ndarray
    f: np.ndarray
    o: np.ndarray


@dataclass
class PeepholeWeights:
    gates: dict[str, GateWeights]
    peep: Peepholes


def input_gate(x_t, h_prev, c_prev, w: GateWeights, p_i):
    # i = sigmoid(W_i x_t + R_i h_{t-1} + b_i + p_i * c_{t-1})       (B, H)
    return sigmoid(preactivation(x_t, h_prev, w) + p_i * c_prev)


def forget_gate(x_t, h_prev, c_prev, w: GateWeights, p_f):
    # f = sigmoid(W_f x_t + R_f h_{t-1} + b_f + p_f * c_{t-1})       (B, H)
    return sigmoid(preactivation(x_t, h_prev, w) + p_f * c_prev)


def output_gate(x_t, h_prev, c_t, w: GateWeights, p_o):
    # o = sigmoid(W_o x_t + R_o h_{t-1} + b_o + p_o * c_t)           (B, H), the new cell state
    return sigmoid(preactivation(x_t, h_prev, w) + p_o * c_t)


@dataclass
class PeepholeStepCache:
    """What one step keeps for its backward pass. All (B, H) except x_t (B, D)."""

    x_t: np.ndarray
    h_prev: np.ndarray
    c_prev: np.ndarray
    c: np.ndarray
    i: np.ndarray
    f: np.ndarray
    g: np.ndarray
    o: np.ndarray
    tanh_c: np.ndarray
    inside: np.ndarray | None = None  # with cell clipping: 1 where c_t was not clipped


def cell_forward(x_t, h_prev, c_prev, weights: PeepholeWeights, *, coupled=False, clip=None):
    """One timestep: (B, D), (B, H), (B, H) -> o * tanh(c_t) (B, H), c_t (B, H), cache."""
    w, p = weights.gates, weights.peep
    i = input_gate(x_t, h_prev, c_prev, w["i"], p.i)
    f = 1.0 - i if coupled else forget_gate(x_t, h_prev, c_prev, w["f"], p.f)  # CIFG: f = 1 - i
    g = cell_candidate(x_t, h_prev, w["g"])
    c, inside = clip_cell(f * c_prev + i * g, clip)  # the output gate sees the clipped c_t
    o = output_gate(x_t, h_prev, c, w["o"], p.o)
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, PeepholeStepCache(x_t, h_prev, c_prev, c, i, f, g, o, tanh_c, inside)


def cell_backward(dh, dc, cache: PeepholeStepCache, weights: PeepholeWeights, *, coupled=False):
    """Back through one timestep.

    dh: dL/dh_t (B, H), everything that reaches h_t (from y_t and from step t+1).
    dc: dL/dc_t (B, H) arriving from step t+1 (or dc_T); it already holds step t+1's peephole
        terms p_i * da_i + p_f * da_f.
    Returns dx_t (B, D), dh_prev (B, H), dc_prev (B, H) and this step's parameter gradients.
    """
    s, p = cache, weights.peep
    # h_t = o * tanh(c_t), o = sigmoid(a_o + p_o * c_t): c_t is reached directly, through h_t and
    # through the output gate's peephole.
    da_o = dh * s.tanh_c * s.o * (1.0 - s.o)
    dc = dc + dh * s.o * (1.0 - s.tanh_c**2) + da_o * p.o
    if s.inside is not None:
        dc = dc * s.inside  # a clipped c_t does not depend on f, c_{t-1}, i, g
    # c_t = f * c_{t-1} + i * g
    di, df = dc * s.g, dc * s.c_prev
    if coupled:
        di, df = di - df, np.zeros_like(df)  # f = 1 - i: what reaches f reaches i, negated
    da = {
        "i": di * s.i * (1.0 - s.i),
        "f": df * s.f * (1.0 - s.f),
        "g": dc * s.i * (1.0 - s.g**2),
        "o": da_o,
    }
    # c_{t-1} reaches c_t through f, and the input and forget gates through their peepholes.
    dc_prev = dc * s.f + da["i"] * p.i + da["f"] * p.f
    dx_t, dh_prev, grads = preactivation_backward(da, s.x_t, s.h_prev, weights.gates)
    grads["b"] = join_gates({k: da[k].sum(axis=0) for k in da})  # (4H,)
    grads["p_i"] = (da["i"] * s.c_prev).sum(axis=0)  # (H,)
    grads["p_f"] = (da["f"] * s.c_prev).sum(axis=0)  # (H,)
    grads["p_o"] = (da["o"] * s.c).sum(axis=0)  # (H,)
    return dx_t, dh_prev, dc_prev, grads


class LoopPeepholeLSTM(LoopLSTM):
    """The peephole LSTM, a timestep and a gate at a time, with BPTT written out by hand."""

    name = "loop-peephole"
    structures = FEATURES  # its cells compute every option
    variant = "peephole"

    def prepare(self, params: Mapping[str, np.ndarray]) -> PeepholeWeights:
        return PeepholeWeights(gate_weights(params), Peepholes(params["p_i"], params["p_f"], params["p_o"]))

    def cell_forward(self, x_t, h_prev, c_prev, weights):
        return cell_forward(x_t, h_prev, c_prev, weights, coupled=self.coupled_input_forget, clip=self.cell_clip)

    def cell_backward(self, dh, dc, cache, weights):
        return cell_backward(dh, dc, cache, weights, coupled=self.coupled_input_forget)


# --- The stacked version's pointwise step --------------------------------------------------------


class PeepholeCell(Cell):
    """The peephole gate math of one step, in place on the stacked buffers (internal order i, f, o, g)."""

    has_bias = True
    param_names = ("p_i", "p_f", "p_o")

    def prepare(self, xp, params, dtype, *, ln_eps):
        return {k: xp.asarray(params[k], dtype=dtype) for k in self.param_names}  # each (H,)

    def forward_buffers(self, xp, T, B, H, dtype):
        return {"tanh_c": xp.empty((T, B, H), dtype), "tmp": xp.empty((B, H), dtype)}

    def backward_buffers(self, xp, T, B, H, dtype):
        return {"tmp": xp.empty((B, H), dtype), "tmp2": xp.empty((B, 2 * H), dtype)}

    def forward_step(self, xp, t, a, c_prev, c, h, S, P) -> None:
        H = c.shape[1]
        tmp, tanh_c = S["tmp"], S["tanh_c"][t]
        i, f, o, g = gate_views(a, H)
        xp.multiply(c_prev, P["p_i"], out=tmp)  # i, f see c_{t-1}
        i += tmp
        xp.multiply(c_prev, P["p_f"], out=tmp)
        f += tmp
        sigmoid_(xp, a[:, : 2 * H])  # i, f
        self.couple_(xp, i, f)
        xp.tanh(g, out=g)
        xp.multiply(f, c_prev, out=c)  # c_t = f * c_{t-1} + i * g
        xp.multiply(i, g, out=tmp)
        c += tmp
        self.clip_(xp, c)
        xp.multiply(c, P["p_o"], out=tmp)  # o sees c_t
        o += tmp
        sigmoid_(xp, o)
        xp.tanh(c, out=tanh_c)
        xp.multiply(o, tanh_c, out=h)  # h_t = o * tanh(c_t)

    def backward_step(self, xp, t, dh, dc, da, a, c_prev, c, S, G, P) -> None:
        H = c.shape[1]
        i, f, o, g = gate_views(a, H)
        di, df, do, dg = gate_views(da, H)
        tmp, tanh_c = G["tmp"], S["tanh_c"][t]
        # da_o = dh * tanh(c_t) * o * (1 - o)
        times_sigmoid_slope_(xp, xp.multiply(dh, tanh_c, out=do), o, tmp)
        # dc += dh * o * (1 - tanh_c^2) + da_o * p_o
        tanh_slope(xp, tanh_c, out=tmp)
        tmp *= o
        tmp *= dh
        dc += tmp
        xp.multiply(do, P["p_o"], out=tmp)
        dc += tmp
        self.clip_backward_(xp, dc, c)
        # da_i = dc * g * i * (1 - i);  da_f = dc * c_{t-1} * f * (1 - f): the slopes of the contiguous
        # (B, 2H) block i, f at once;  da_g = dc * i * (1 - g^2)
        xp.multiply(dc, g, out=di)
        xp.multiply(dc, c_prev, out=df)
        self.couple_backward_(di, df)
        times_sigmoid_slope_(xp, da[:, : 2 * H], a[:, : 2 * H], G["tmp2"])
        tanh_slope(xp, g, out=tmp)
        tmp *= i
        xp.multiply(dc, tmp, out=dg)
        # dc_{t-1} = dc * f + p_i * da_i + p_f * da_f
        dc *= f
        xp.multiply(di, P["p_i"], out=tmp)
        dc += tmp
        xp.multiply(df, P["p_f"], out=tmp)
        dc += tmp

    def param_grads(self, xp, cache: StackedCache, da, G):
        H = cache.c.shape[2]
        T = da.shape[0]
        c_prev, c_new = cache.c[:T], cache.c[1:]  # (T, B, H) each
        return {
            "p_i": (da[:, :, :H] * c_prev).sum(axis=(0, 1)),  # (H,)
            "p_f": (da[:, :, H : 2 * H] * c_prev).sum(axis=(0, 1)),
            "p_o": (da[:, :, 2 * H : 3 * H] * c_new).sum(axis=(0, 1)),
        }


class StackedPeepholeLSTM(StackedLSTM):
    """The peephole LSTM with stacked-gate GEMMs; same results as ``loop-peephole``, much faster."""

    name = "stacked-peephole"
    structures = FEATURES  # its cells compute every option
    variant = "peephole"
    cell = PeepholeCell()
