"""Three planted bugs whose answers the harness must get right: one finding each, its true size, where it
is, and a replay that reproduces every number. Loaded as TARGETs by tests/meta/test_the_answer.py."""

from __future__ import annotations

import numpy as np

from impls.loop import LoopLSTM


def _sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))


class CandidateScaled(LoopLSTM):
    """A 10% forward bug: the cell candidate tanh(a_g) scaled by 0.9. The backward is the standard one."""

    name = "candidate-times-0.9"

    def forward(self, x, h0, c0, params):
        W, R, b = params["W"], params["R"], params["b"]
        H = h0.shape[1]
        h, c, ys = h0, c0, []
        for x_t in x:
            a = x_t @ W.T + h @ R.T + b
            i, f, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H]), _sigmoid(a[:, 3 * H:])
            g = 0.9 * np.tanh(a[:, 2 * H:3 * H])
            c = f * c + i * g
            h = o * np.tanh(c)
            ys.append(h)
        _, _, _, cache = super().forward(x, h0, c0, params)
        return np.stack(ys), h, c, cache


class WrongForgetDerivative(LoopLSTM):
    """The backward scales the forget gate's pre-activation gradient by 1.5 (a wrong derivative): dW, dR
    and db depart in their forget-gate blocks; the forward is right."""

    name = "wrong-forget-derivative"

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        H = grads["R"].shape[1]
        for key in ("W", "R", "b"):
            grads[key] = grads[key].copy()
            grads[key][H:2 * H] *= 1.5
        return grads


class BackwardRaises(LoopLSTM):
    name = "backward-raises"

    def backward(self, dy, dh_T, dc_T, cache):
        raise ValueError("operands could not be broadcast together in my backward")


def _swap_i_f(a):
    """Gate blocks i, f, g, o read as f, i, g, o: the first two (H, ...) blocks exchanged."""
    H = a.shape[0] // 4
    return np.concatenate([a[H:2 * H], a[:H], a[2 * H:]])


class GatesReadFIGO(LoopLSTM):
    """A correct LSTM in another convention: its gate blocks are stacked f, i, g, o."""

    name = "gates-f-i-g-o"

    def forward(self, x, h0, c0, params):
        return super().forward(x, h0, c0, {k: _swap_i_f(v) for k, v in params.items()})

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        return {k: (_swap_i_f(v) if k in ("W", "R", "b") else v) for k, v in grads.items()}
