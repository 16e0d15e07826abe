"""The readable reference: the standard LSTM one timestep and one gate at a time.

This is the implementation to read next to the equations. Every gate has its own weights, sliced once
from the canonical stacked parameters (gate order i, f, g, o), its own small function, and its own
line in the hand-written backward pass. Nothing is fused, nothing is clever; speed lives in
``impls/stacked.py``.

    a_t = W x_t + R h_{t-1} + b
    i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.contract import GATES, check_inputs

__all__ = ["LoopLSTM", "sigmoid", "split_gates", "cell_forward", "cell_backward"]


def sigmoid(a: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-a)) overflows exp for a < -88 in float32; this form is exact and never overflows.
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def split_gates(stacked: np.ndarray) -> dict[str, np.ndarray]:
    """(4H, ...) -> {"i": (H, ...), "f": ..., "g": ..., "o": ...}."""
    H = stacked.shape[0] // 4
    return {gate: stacked[k * H : (k + 1) * H] for k, gate in enumerate(GATES)}


@dataclass
class GateWeights:
    """One gate's input weights (H, D), recurrent weights (H, H) and bias (H,)."""

    W: np.ndarray
    R: np.ndarray
    b: np.ndarray


def gate_weights(params: dict[str, np.ndarray]) -> dict[str, GateWeights]:
    W, R, b = split_gates(params["W"]), split_gates(params["R"]), split_gates(params["b"])
    return {gate: GateWeights(W[gate], R[gate], b[gate]) for gate in GATES}


def preactivation(x_t: np.ndarray, h_prev: np.ndarray, w: GateWeights) -> np.ndarray:
    # (B, D) @ (D, H) + (B, H) @ (H, H) + (H,) -> (B, H)
    return x_t @ w.W.T + h_prev @ w.R.T + w.b


def input_gate(x_t, h_prev, w: GateWeights):
    return sigmoid(preactivation(x_t, h_prev, w))


def forget_gate(x_t, h_prev, w: GateWeights):
    return sigmoid(preactivation(x_t, h_prev, w))


def cell_candidate(x_t, h_prev, w: GateWeights):
    return np.tanh(preactivation(x_t, h_prev, w))


def output_gate(x_t, h_prev, w: GateWeights):
    return sigmoid(preactivation(x_t, h_prev, w))


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


def cell_forward(x_t, h_prev, c_prev, weights: dict[str, GateWeights]):
    """One timestep: (B, D), (B, H), (B, H) -> h_t (B, H), c_t (B, H), cache."""
    i = input_gate(x_t, h_prev, weights["i"])
    f = forget_gate(x_t, h_prev, weights["f"])
    g = cell_candidate(x_t, h_prev, weights["g"])
    o = output_gate(x_t, h_prev, weights["o"])
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, StepCache(x_t, h_prev, c_prev, i, f, g, o, tanh_c)


def cell_backward(dh, dc, cache: StepCache, weights: dict[str, GateWeights]):
    """Back through one timestep.

    dh: dL/dh_t (B, H), everything that reaches h_t (from y_t and from step t+1).
    dc: dL/dc_t (B, H) arriving from step t+1 (or dc_T).
    Returns dx_t (B, D), dh_prev (B, H), dc_prev (B, H) and the per-gate parameter gradients.
    """
    s = cache
    # h_t = o * tanh(c_t): c_t is reached directly and through h_t.
    do = dh * s.tanh_c
    dc = dc + dh * s.o * (1.0 - s.tanh_c**2)
    # c_t = f * c_{t-1} + i * g
    di = dc * s.g
    dg = dc * s.i
    df = dc * s.c_prev
    dc_prev = dc * s.f
    # Through the nonlinearities to the pre-activations, each (B, H).
    da = {
        "i": di * s.i * (1.0 - s.i),
        "f": df * s.f * (1.0 - s.f),
        "g": dg * (1.0 - s.g**2),
        "o": do * s.o * (1.0 - s.o),
    }
    dx_t = sum(da[k] @ weights[k].W for k in GATES)  # (B, H) @ (H, D) -> (B, D)
    dh_prev = sum(da[k] @ weights[k].R for k in GATES)  # (B, H) @ (H, H) -> (B, H)
    grads = {
        k: GateWeights(
            W=da[k].T @ s.x_t,  # (H, B) @ (B, D) -> (H, D)
            R=da[k].T @ s.h_prev,  # (H, B) @ (B, H) -> (H, H)
            b=da[k].sum(axis=0),  # (H,)
        )
        for k in GATES
    }
    return dx_t, dh_prev, dc_prev, grads


class LoopLSTM:
    """The standard LSTM, a timestep and a gate at a time, with BPTT written out by hand."""

    name = "loop"
    variant = "vanilla"
    dtypes = ("float64", "float32")

    def forward(self, x, h0, c0, params):
        T, B, D, H = check_inputs(self.variant, x, h0, c0, params)
        weights = gate_weights(params)
        h, c = h0, c0
        ys, steps = [], []
        for t in range(T):
            h, c, step = cell_forward(x[t], h, c, weights)
            ys.append(h)
            steps.append(step)
        y = np.stack(ys)  # (T, B, H)
        return y, h, c, (weights, steps)

    def backward(self, dy, dh_T, dc_T, cache):
        weights, steps = cache
        T = len(steps)
        dx = np.empty((T,) + steps[0].x_t.shape, dtype=dy.dtype)  # (T, B, D)
        total = {k: GateWeights(np.zeros_like(w.W), np.zeros_like(w.R), np.zeros_like(w.b))
                 for k, w in weights.items()}
        dh, dc = dh_T, dc_T
        for t in reversed(range(T)):
            dx[t], dh, dc, grads = cell_backward(dy[t] + dh, dc, steps[t], weights)
            for k in GATES:
                total[k].W += grads[k].W
                total[k].R += grads[k].R
                total[k].b += grads[k].b
        return {
            "x": dx,
            "h0": dh,
            "c0": dc,
            "W": np.concatenate([total[k].W for k in GATES]),  # (4H, D)
            "R": np.concatenate([total[k].R for k in GATES]),  # (4H, H)
            "b": np.concatenate([total[k].b for k in GATES]),  # (4H,)
        }
