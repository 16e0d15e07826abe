"""The readable reference: the standard LSTM one timestep and one gate at a time.

This is the implementation to read next to the equations. Every gate has its own weights, sliced once
from the canonical stacked parameters (gate order i, f, g, o), its own line in the forward (the three
sigmoid gates share one small function, the cell candidate has its own), and its own line in the
hand-written backward pass. Nothing is fused, nothing is clever; speed lives in
``impls/stacked.py``.

    a_t = W x_t + R h_{t-1} + b
    i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

Options of the layer structure (:mod:`harness.structure`) that live inside the cell:

    CIFG (coupled_input_forget):   f = 1 - i                 (the forget gate's weights are unused)
    cell_clip:                     c_t = clip(c_t, -cell_clip, cell_clip), carried and used in h_t
    projection (proj_size P):      h_t = proj (o * tanh(c_t))        proj (P, H), h_t (B, P)

The time loop itself (:class:`LoopLSTM`'s ``sequence_forward`` and ``sequence_backward``) is the
same for every variant: the peephole and LayerNorm loops (``impls/peephole.py``,
``impls/layernorm.py``) subclass it and replace only the three variant-specific methods ``prepare``,
``cell_forward`` and ``cell_backward``. The loops over layers, directions and lengths around it are
:class:`impls.layer.LayeredLSTM`'s, shared with the stacked implementations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.contract import GATES
from harness.structure import FEATURES
from impls.layer import LayeredLSTM

__all__ = [
    "LoopLSTM",
    "GateWeights",
    "StepCache",
    "sigmoid",
    "sigmoid_gate",
    "cell_candidate",
    "split_gates",
    "join_gates",
    "gate_weights",
    "preactivation",
    "cell_forward",
    "cell_backward",
    "preactivation_backward",
    "clip_cell",
    "LoopCache",
]


def sigmoid(a: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-a)) overflows exp for a < -88 in float32; this form is exact and never overflows.
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def split_gates(stacked: np.ndarray) -> dict[str, np.ndarray]:
    """(4H, ...) -> {"i": (H, ...), "f": ..., "g": ..., "o": ...}."""
    H = stacked.shape[0] // 4
    return {gate: stacked[k * H : (k + 1) * H] for k, gate in enumerate(GATES)}


def join_gates(per_gate: Mapping[str, np.ndarray]) -> np.ndarray:
    """{"i": (H, ...), ...} -> (4H, ...) in the canonical order i, f, g, o."""
    return np.concatenate([per_gate[gate] for gate in GATES])


@dataclass
class GateWeights:
    """One gate's input weights (H, D), recurrent weights (H, H) and bias (H,)."""

    W: np.ndarray
    R: np.ndarray
    b: np.ndarray


def gate_weights(params: Mapping[str, np.ndarray]) -> dict[str, GateWeights]:
    W, R, b = split_gates(params["W"]), split_gates(params["R"]), split_gates(params["b"])
    return {gate: GateWeights(W[gate], R[gate], b[gate]) for gate in GATES}


def preactivation(x_t: np.ndarray, h_prev: np.ndarray, w: GateWeights) -> np.ndarray:
    # (B, D) @ (D, H) + (B, H) @ (H, H) + (H,) -> (B, H)
    return x_t @ w.W.T + h_prev @ w.R.T + w.b


def sigmoid_gate(x_t: np.ndarray, h_prev: np.ndarray, w: GateWeights) -> np.ndarray:
    # The input, forget and output gates: sigmoid(W_k x_t + R_k h_{t-1} + b_k)        (B, H)
    return sigmoid(preactivation(x_t, h_prev, w))


def cell_candidate(x_t: np.ndarray, h_prev: np.ndarray, w: GateWeights) -> np.ndarray:
    # g = tanh(W_g x_t + R_g h_{t-1} + b_g)                                            (B, H)
    return np.tanh(preactivation(x_t, h_prev, w))


@dataclass
class StepCache:
    """What one step keeps for its backward pass. All (B, H) except x_t (B, D)."""

    x_t: np.ndarray
    h_prev: np.ndarray
    c_prev: np.ndarray
    i: np.ndarray
    f: np.ndarray
    g: np.ndarray
    o: np.ndarray
    tanh_c: np.ndarray
    #: With cell clipping: 1 where c_t was inside [-clip, clip], 0 where it was clipped (B, H).
    inside: np.ndarray | None = None


def clip_cell(c: np.ndarray, clip: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """c_t clipped to [-clip, clip] (unchanged when clip is None), and where it was inside the range:
    the gradient passes only there."""
    if clip is None:
        return c, None
    inside = (np.abs(c) <= clip).astype(c.dtype)  # (B, H)
    return np.clip(c, -clip, clip), inside


def cell_forward(
    x_t: np.ndarray, h_prev: np.ndarray, c_prev: np.ndarray, weights: Mapping[str, GateWeights], *,
    coupled: bool = False, clip: float | None = None,
) -> tuple[np.ndarray, np.ndarray, StepCache]:
    """One timestep: (B, D), (B, H), (B, H) -> o * tanh(c_t) (B, H), c_t (B, H), cache.

    (Without a projection o * tanh(c_t) is h_t; the time loop applies the projection.)
    """
    i = sigmoid_gate(x_t, h_prev, weights["i"])  # input gate
    f = 1.0 - i if coupled else sigmoid_gate(x_t, h_prev, weights["f"])  # forget gate (CIFG: 1 - i)
    g = cell_candidate(x_t, h_prev, weights["g"])
    o = sigmoid_gate(x_t, h_prev, weights["o"])  # output gate
    c, inside = clip_cell(f * c_prev + i * g, clip)
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, StepCache(x_t, h_prev, c_prev, i, f, g, o, tanh_c, inside)


def cell_backward(
    dh: np.ndarray, dc: np.ndarray, cache: StepCache, weights: Mapping[str, GateWeights], *,
    coupled: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Back through one timestep.

    dh: dL/dh_t (B, H), everything that reaches o * tanh(c_t) (from y_t and from step t+1).
    dc: dL/dc_t (B, H) arriving from step t+1 (or dc_T).
    Returns dx_t (B, D), dh_prev (B, H), dc_prev (B, H) and this step's parameter gradients
    {"W": (4H, D), "R": (4H, H), "b": (4H,)}.
    """
    s = cache
    # h_t = o * tanh(c_t): c_t is reached directly and through h_t.
    do = dh * s.tanh_c
    dc = dc + dh * s.o * (1.0 - s.tanh_c**2)
    if s.inside is not None:
        dc = dc * s.inside  # a clipped c_t does not depend on f, c_{t-1}, i, g
    # c_t = f * c_{t-1} + i * g
    di = dc * s.g
    dg = dc * s.i
    df = dc * s.c_prev
    if coupled:
        di, df = di - df, np.zeros_like(df)  # f = 1 - i: what reaches f reaches i, negated
    dc_prev = dc * s.f
    # Through the nonlinearities to the pre-activations, each (B, H).
    da = {
        "i": di * s.i * (1.0 - s.i),
        "f": df * s.f * (1.0 - s.f),
        "g": dg * (1.0 - s.g**2),
        "o": do * s.o * (1.0 - s.o),
    }
    dx_t, dh_prev, grads = preactivation_backward(da, s.x_t, s.h_prev, weights)
    grads["b"] = join_gates({k: da[k].sum(axis=0) for k in GATES})  # (4H,)
    return dx_t, dh_prev, dc_prev, grads


def preactivation_backward(
    da: Mapping[str, np.ndarray], x_t: np.ndarray, h_prev: np.ndarray, weights: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Back through a_k = W_k x_t + R_k h_{t-1} (+ b_k) for every gate k; da[k] is (B, H).

    Shared by every variant: returns dx_t (B, D), dh_prev (B, H) and {"W": (4H, D), "R": (4H, H)}.
    """
    dx_t = sum(da[k] @ weights[k].W for k in GATES)  # (B, H) @ (H, D) -> (B, D)
    dh_prev = sum(da[k] @ weights[k].R for k in GATES)  # (B, H) @ (H, H) -> (B, H)
    grads = {
        "W": join_gates({k: da[k].T @ x_t for k in GATES}),  # (H, B) @ (B, D) -> (4H, D)
        "R": join_gates({k: da[k].T @ h_prev for k in GATES}),  # (H, B) @ (B, H) -> (4H, H)
    }
    return dx_t, dh_prev, grads


@dataclass
class LoopCache:
    """What the forward of one sequence keeps for the backward."""

    weights: Any  # the variant's per-gate weights
    steps: list[Any]  # the step caches, t = 0 .. T-1
    cell_out: list[np.ndarray]  # o * tanh(c_t) of every step (B, H): what the projection saw
    proj: np.ndarray | None  # (P, H), or None
    shapes: dict[str, tuple[int, ...]]
    dtype: np.dtype


class LoopLSTM(LayeredLSTM):
    """The standard LSTM, a timestep and a gate at a time, with BPTT written out by hand.

    Subclasses for other variants replace ``prepare`` (canonical parameters -> per-gate weights),
    ``cell_forward`` and ``cell_backward``; the time loops below are shared, and so are the loops over
    layers, directions and lengths around them (:class:`impls.layer.LayeredLSTM`).
    """

    name = "loop"
    structures = FEATURES  # its cells compute every option
    variant = "vanilla"
    dtypes = ("float64", "float32")

    def prepare(self, params: Mapping[str, np.ndarray]) -> Any:
        return gate_weights(params)

    def cell_forward(self, x_t: np.ndarray, h_prev: np.ndarray, c_prev: np.ndarray, weights: Any) -> tuple[Any, ...]:
        return cell_forward(x_t, h_prev, c_prev, weights, coupled=self.coupled_input_forget, clip=self.cell_clip)

    def cell_backward(self, dh: np.ndarray, dc: np.ndarray, cache: Any, weights: Any) -> tuple[Any, ...]:
        return cell_backward(dh, dc, cache, weights, coupled=self.coupled_input_forget)

    def sequence_forward(
        self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, params: Mapping[str, np.ndarray], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, LoopCache]:
        params = {k: np.asarray(v, dtype) for k, v in params.items()}
        weights = self.prepare(params)
        proj = params.get("proj")  # (P, H) with a projection
        h, c = np.asarray(h0, dtype), np.asarray(c0, dtype)
        ys: list[np.ndarray] = []
        steps: list[Any] = []
        cell_out: list[np.ndarray] = []
        for t in range(x.shape[0]):
            m, c, step = self.cell_forward(x[t], h, c, weights)  # m = o * tanh(c_t)   (B, H)
            h = m if proj is None else m @ proj.T  # h_t = proj (o * tanh(c_t)): (B, H) @ (H, P) -> (B, P)
            ys.append(h)
            steps.append(step)
            cell_out.append(m)
        y = np.stack(ys)  # (T, B, H_out)
        shapes = {k: v.shape for k, v in params.items()}
        return y, h.copy(), c.copy(), LoopCache(weights, steps, cell_out, proj, shapes, dtype)

    def sequence_shape(self, cache: LoopCache) -> tuple[int, int, int]:
        return (len(cache.steps), *cache.steps[0].c_prev.shape)  # every step cache keeps c_prev (B, H)

    def sequence_backward(self, dy: np.ndarray, dh_T: np.ndarray, dc_T: np.ndarray, cache: LoopCache
                          ) -> dict[str, np.ndarray]:
        steps, weights, proj, dtype = cache.steps, cache.weights, cache.proj, cache.dtype
        T = len(steps)
        dy, dh, dc = (np.asarray(a, dtype) for a in (dy, dh_T, dc_T))
        dx = np.empty((T,) + steps[0].x_t.shape, dtype=dtype)  # (T, B, D)
        total = {k: np.zeros(shape, dtype) for k, shape in cache.shapes.items()}
        for t in reversed(range(T)):
            dh = dy[t] + dh  # dL/dh_t: from y_t and from step t+1        (B, H_out)
            if proj is not None:
                total["proj"] += dh.T @ cache.cell_out[t]  # (P, B) @ (B, H) -> (P, H)
                dh = dh @ proj  # dL/d(o * tanh(c_t)): (B, P) @ (P, H) -> (B, H)
            dx[t], dh, dc, grads = self.cell_backward(dh, dc, steps[t], weights)
            for k, g in grads.items():
                total[k] += g
        return {"x": dx, "h0": dh, "c0": dc, **total}
