"""The LSTM equations of every variant, evaluated directly, batched over leading axes.

This is the finite-difference oracle's own forward function. It is written from the equations in
the contract, independently of ``impls/`` (an oracle must not share code with what it checks), and
every array may carry leading "evaluation" axes: ``x`` (..., T, B, D), ``W`` (..., 4H, D), and so
on, so that thousands of perturbed copies of one case run as one batched computation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lstm_forward", "objective"]


def _sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _layer_norm(v, gamma, beta, eps):
    # v (..., B, H); gamma, beta (..., H) -> normalized over the H units of each row, biased var.
    mean = v.mean(axis=-1, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
    return (v - mean) / np.sqrt(var + eps) * gamma[..., None, :] + beta[..., None, :]


def lstm_forward(variant: str, x, h0, c0, params, *, ln_eps: float = 1e-5, observe=None):
    """-> y (..., T, B, H), h_T (..., B, H), c_T (..., B, H).

    ``observe``, if given, is called with every LayerNorm input ``v`` (..., B, H) just before it is
    normalized (four gate pre-activations, then the cell state, per timestep): how
    :mod:`harness.conditioning` measures the rounding a case amplifies, on these very equations.
    """
    T = x.shape[-3]
    H = h0.shape[-1]
    W, R = params["W"], params["R"]
    WT = np.swapaxes(W, -1, -2)  # (..., D, 4H)
    RT = np.swapaxes(R, -1, -2)  # (..., H, 4H)
    h, c = h0, c0
    ys = []
    for t in range(T):
        a = x[..., t, :, :] @ WT + h @ RT  # (..., B, 4H)
        if variant != "layernorm":
            a = a + params["b"][..., None, :]
        a_i, a_f, a_g, a_o = (a[..., k * H : (k + 1) * H] for k in range(4))
        if variant == "vanilla":
            i, f, g = _sigmoid(a_i), _sigmoid(a_f), np.tanh(a_g)
            c = f * c + i * g
            o = _sigmoid(a_o)
        elif variant == "peephole":
            p_i, p_f, p_o = (params[k][..., None, :] for k in ("p_i", "p_f", "p_o"))
            i = _sigmoid(a_i + p_i * c)
            f = _sigmoid(a_f + p_f * c)
            g = np.tanh(a_g)
            c = f * c + i * g
            o = _sigmoid(a_o + p_o * c)  # the output gate sees the new cell state
        elif variant == "layernorm":
            gm, bt = params["gamma"], params["beta"]  # rows i, f, g, o, c

            def ln(v, k, gm=gm, bt=bt):
                if observe is not None:
                    observe(v)
                return _layer_norm(v, gm[..., k, :], bt[..., k, :], ln_eps)

            i, f = _sigmoid(ln(a_i, 0)), _sigmoid(ln(a_f, 1))
            g, o = np.tanh(ln(a_g, 2)), _sigmoid(ln(a_o, 3))
            c = ln(f * c + i * g, 4)  # the normalized cell is the state carried forward
        else:
            raise ValueError(f"variant: expected vanilla, peephole or layernorm, got {variant!r}")
        h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys, axis=-3), h, c


def objective(y, h_T, c_T, dy, dh_T, dc_T):
    """L = <dy, y> + <dh_T, h_T> + <dc_T, c_T>, per leading evaluation index.

    Its gradient is exactly the vector-Jacobian product ``backward`` must return.
    Also returns sum of |terms|, the magnitude that sets L's rounding error.
    """
    terms = [(dy, y, 3), (dh_T, h_T, 2), (dc_T, c_T, 2)]
    value = sum((u * v).sum(axis=tuple(range(-n, 0))) for u, v, n in terms)
    magnitude = sum(np.abs(u * v).sum(axis=tuple(range(-n, 0))) for u, v, n in terms)
    return value, magnitude
