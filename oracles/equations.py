"""The LSTM equations of every variant, evaluated directly, batched over leading axes.

This is the finite-difference oracle's own forward function. It is written from the equations in
the contract, independently of ``impls/`` (an oracle must not share code with what it checks), and
every array may carry leading "evaluation" axes: ``x`` (..., T, B, D), ``W`` (..., 4H, D), and so
on, so that thousands of perturbed copies of one case run as one batched computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["lstm_forward", "objective"]


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _layer_norm(v: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """v (..., H) normalized over its last axis (biased variance), then gamma * v + beta, with
    gamma and beta broadcast against v. ``einsum`` sums the short last axis several times faster
    than ``mean`` does, and this is most of the finite-difference oracle's work."""
    H = v.shape[-1]
    mean = np.einsum("...h->...", v)[..., None] / H  # (..., 1)
    d = v - mean
    var = np.einsum("...h,...h->...", d, d)[..., None] / H  # (..., 1)
    return d / np.sqrt(var + eps) * gamma + beta


def _matmul(a: np.ndarray, wT: np.ndarray) -> np.ndarray:
    """a (..., B, K) @ wT (..., K, N) -> (..., B, N).

    A weight without evaluation axes is shared by every evaluation: then all rows of all
    evaluations go through one matrix product, not one small product per evaluation.
    """
    if wT.ndim == 2:
        return (a.reshape(-1, a.shape[-1]) @ wT).reshape(*a.shape[:-1], wT.shape[-1])
    return a @ wT


def lstm_forward(
    variant: str,
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    ln_eps: float = 1e-5,
    observe: Callable[[np.ndarray], object] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> y (..., T, B, H), h_T (..., B, H), c_T (..., B, H).

    ``observe``, if given, is called with every LayerNorm input ``v`` (..., B, H) just before it is
    normalized (four gate pre-activations, then the cell state, per timestep): how
    :mod:`harness.conditioning` measures the rounding a case amplifies, on these very equations.
    """
    T, B, D = x.shape[-3:]
    H = h0.shape[-1]
    W, R = params["W"], params["R"]
    WT = np.swapaxes(W, -1, -2)  # (..., D, 4H)
    RT = np.swapaxes(R, -1, -2)  # (..., H, 4H)
    # The input's share of every pre-activation, all timesteps in one product.
    xw = _matmul(x.reshape(*x.shape[:-3], T * B, D), WT)  # (..., T B, 4H)
    xw = xw.reshape(*xw.shape[:-2], T, B, 4 * H)  # (..., T, B, 4H)
    h, c = h0, c0
    ys = []
    for t in range(T):
        a = xw[..., t, :, :] + _matmul(h, RT)  # (..., B, 4H)
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
            gm, bt = params["gamma"][..., None, :, :], params["beta"][..., None, :, :]  # (..., 1, 5, H)
            if observe is not None:
                for v in (a_i, a_f, a_g, a_o):
                    observe(v)
            # the four gates normalized at once, each over its own H units: rows i, f, g, o of gamma, beta
            n = _layer_norm(a.reshape(*a.shape[:-1], 4, H), gm[..., :4, :], bt[..., :4, :], ln_eps)  # (..., B, 4, H)
            i, f = _sigmoid(n[..., 0, :]), _sigmoid(n[..., 1, :])
            g, o = np.tanh(n[..., 2, :]), _sigmoid(n[..., 3, :])
            c = f * c + i * g
            if observe is not None:
                observe(c)
            c = _layer_norm(c, gm[..., 4, :], bt[..., 4, :], ln_eps)  # the normalized cell is the state carried forward
        else:
            raise ValueError(f"variant: expected vanilla, peephole or layernorm, got {variant!r}")
        h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys, axis=-3), h, c


def objective(y: np.ndarray, h_T: np.ndarray, c_T: np.ndarray, dy: np.ndarray, dh_T: np.ndarray,
              dc_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L = <dy, y> + <dh_T, h_T> + <dc_T, c_T>, per leading evaluation index.

    Its gradient is exactly the vector-Jacobian product ``backward`` must return.
    Also returns sum of |terms|, the magnitude that sets L's rounding error.
    """
    terms = [(dy, y, 3), (dh_T, h_T, 2), (dc_T, c_T, 2)]
    value = sum((u * v).sum(axis=tuple(range(-n, 0))) for u, v, n in terms)
    magnitude = sum(np.abs(u * v).sum(axis=tuple(range(-n, 0))) for u, v, n in terms)
    return value, magnitude
