"""The LSTM equations of every variant, evaluated directly, batched over leading axes.

This is the finite-difference oracle's own forward function. It is written from the equations in
the contract, independently of ``impls/`` (an oracle must not share code with what it checks), and
every array may carry leading "evaluation" axes: ``x`` (..., T, B, D), ``W`` (..., 4H, D), and so
on, so that thousands of perturbed copies of one case run as one batched computation.

The layer structure (:mod:`harness.structure`: layers, directions, lengths, projection, CIFG, clip)
is a loop over layers and directions around the one cell (:func:`_direction`); the default
structure runs the cell alone, as it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from harness.structure import Structure

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


def _direction(
    variant: str,
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    ln_eps: float,
    observe: Callable[[np.ndarray], object] | None,
    reverse: bool = False,
    valid: np.ndarray | None = None,
    cifg: bool = False,
    clip: float | None = None,
    clipped: Callable[[np.ndarray, np.ndarray | None], object] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cell run over the sequence: -> y (..., T, B, H_out), h_T (..., B, H_out), c_T (..., B, H).

    ``reverse`` runs t = T-1 down to 0. ``valid`` (T, B, 1) bool marks the steps that exist: elsewhere
    the state is kept and y is 0, so the reverse direction of a row starts at its last valid step.
    ``params`` may hold ``proj`` (..., P, H): then h_t = proj @ (o * tanh(c_t)). ``cifg``: f = 1 - i.
    ``clip``: c_t clipped to [-clip, clip]; ``clipped``, if given, is called at every step, in the
    order of the steps, with the cell state before the clip (..., B, H) and the step's rows that
    exist (``valid[t]`` (B, 1), or None when all do).
    """
    T, B, D = x.shape[-3:]
    H = c0.shape[-1]
    W, R = params["W"], params["R"]
    WT = np.swapaxes(W, -1, -2)  # (..., D, 4H)
    RT = np.swapaxes(R, -1, -2)  # (..., H_out, 4H)
    projT = np.swapaxes(params["proj"], -1, -2) if "proj" in params else None  # (..., H, P)
    # The input's share of every pre-activation, all timesteps in one product.
    xw = _matmul(x.reshape(*x.shape[:-3], T * B, D), WT)  # (..., T B, 4H)
    xw = xw.reshape(*xw.shape[:-2], T, B, 4 * H)  # (..., T, B, 4H)
    h, c = h0, c0
    ys: list[np.ndarray] = [np.empty(0)] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_prev, c_prev = h, c
        a = xw[..., t, :, :] + _matmul(h, RT)  # (..., B, 4H)
        if variant != "layernorm":
            a = a + params["b"][..., None, :]
        a_i, a_f, a_g, a_o = (a[..., k * H : (k + 1) * H] for k in range(4))
        if variant == "vanilla":
            i, g = _sigmoid(a_i), np.tanh(a_g)
            f = 1.0 - i if cifg else _sigmoid(a_f)
            c = f * c + i * g
        elif variant == "peephole":
            p_i, p_f = params["p_i"][..., None, :], params["p_f"][..., None, :]
            i = _sigmoid(a_i + p_i * c)
            f = 1.0 - i if cifg else _sigmoid(a_f + p_f * c)
            g = np.tanh(a_g)
            c = f * c + i * g
        elif variant == "layernorm":
            gm, bt = params["gamma"][..., None, :, :], params["beta"][..., None, :, :]  # (..., 1, 5, H)
            if observe is not None:
                for v in (a_i, a_f, a_g, a_o):
                    observe(v)
            # the four gates normalized at once, each over its own H units: rows i, f, g, o of gamma, beta
            n = _layer_norm(a.reshape(*a.shape[:-1], 4, H), gm[..., :4, :], bt[..., :4, :], ln_eps)  # (..., B, 4, H)
            i = _sigmoid(n[..., 0, :])
            f = 1.0 - i if cifg else _sigmoid(n[..., 1, :])
            g, o = np.tanh(n[..., 2, :]), _sigmoid(n[..., 3, :])
            c = f * c + i * g
            if observe is not None:
                observe(c)
            c = _layer_norm(c, gm[..., 4, :], bt[..., 4, :], ln_eps)  # the normalized cell is the state carried forward
        else:
            raise ValueError(f"variant: expected vanilla, peephole or layernorm, got {variant!r}")
        if clip is not None:
            if clipped is not None:
                clipped(c, None if valid is None else valid[t])
            c = np.clip(c, -clip, clip)
        if variant == "vanilla":
            o = _sigmoid(a_o)
        elif variant == "peephole":
            o = _sigmoid(a_o + params["p_o"][..., None, :] * c)  # the output gate sees the new (clipped) cell state
        h = o * np.tanh(c)
        if projT is not None:
            h = _matmul(h, projT)
        if valid is not None:  # a step that does not exist keeps the state and outputs 0
            h, c = np.where(valid[t], h, h_prev), np.where(valid[t], c, c_prev)
            ys[t] = np.where(valid[t], h, 0.0)
        else:
            ys[t] = h
    return np.stack(ys, axis=-3), h, c


def lstm_forward(
    variant: str,
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    ln_eps: float = 1e-5,
    observe: Callable[[np.ndarray], object] | None = None,
    structure: Structure | None = None,
    lengths: np.ndarray | None = None,
    clipped: Callable[[np.ndarray, np.ndarray | None], object] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> y (..., T, B, dirs * H_out), h_T (..., [L * dirs,] B, H_out), c_T (..., [L * dirs,] B, H).

    ``structure`` (default: one layer, one direction) gives the layers, directions, projection, CIFG
    and clip (:mod:`harness.structure`); when it is layered, parameter names carry their ``l{k}.`` /
    ``l{k}.reverse.`` prefixes and the states their (L * dirs) axis. ``lengths`` (B,) int, or None
    for full length: steps t >= lengths[b] do not exist for row b (see :func:`_direction`). Each
    layer runs its directions over the previous layer's y; every cell is :func:`_direction`.

    ``observe``, if given, is called with every LayerNorm input ``v`` (..., B, H) just before it is
    normalized (four gate pre-activations, then the cell state, per timestep): how
    :mod:`harness.conditioning` measures the rounding a case amplifies, on these very equations.
    ``clipped``: see :func:`_direction` (called cell by cell, in the order of ``structure.cells()``).
    """
    s = structure or Structure()
    if s.is_default and lengths is None:  # the one-cell LSTM of the contract, exactly as it always ran
        return _direction(variant, x, h0, c0, params, ln_eps=ln_eps, observe=observe)
    bad = s.problems(variant)
    if bad:
        raise ValueError("structure: " + "; ".join(bad))
    T, B = x.shape[-3:-1]
    valid = None if lengths is None else (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[..., None]  # (T, B, 1)
    cells = s.cells()
    h_T: list[np.ndarray] = []
    c_T: list[np.ndarray] = []
    inp = x
    for layer in range(s.num_layers):
        ys = []
        for _layer, direction, prefix in cells[layer * s.dirs : (layer + 1) * s.dirs]:
            own = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
            k = len(h_T)  # the cell's index on the states' axis: layer * dirs + direction
            h0_k, c0_k = (h0[..., k, :, :], c0[..., k, :, :]) if s.layered else (h0, c0)
            y, h, c = _direction(variant, inp, h0_k, c0_k, own, ln_eps=ln_eps, observe=observe,
                                 reverse=direction == 1, valid=valid, cifg=s.coupled_input_forget,
                                 clip=s.cell_clip, clipped=clipped)
            ys.append(y)
            h_T.append(h)
            c_T.append(c)
        inp = np.concatenate(np.broadcast_arrays(*ys), axis=-1) if len(ys) > 1 else ys[0]
    if not s.layered:
        return inp, h_T[0], c_T[0]
    return inp, np.stack(np.broadcast_arrays(*h_T), axis=-3), np.stack(np.broadcast_arrays(*c_T), axis=-3)


def objective(y: np.ndarray, h_T: np.ndarray, c_T: np.ndarray, dy: np.ndarray, dh_T: np.ndarray,
              dc_T: np.ndarray, *, state_ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """L = <dy, y> + <dh_T, h_T> + <dc_T, c_T>, per leading evaluation index.

    Its gradient is exactly the vector-Jacobian product ``backward`` must return.
    Also returns sum of |terms|, the magnitude that sets L's rounding error. ``state_ndim``: the
    axes of one evaluation's h_T, 3 in a layered structure ((L * dirs, B, H_out)), else 2.
    """
    terms = [(dy, y, 3), (dh_T, h_T, state_ndim), (dc_T, c_T, state_ndim)]
    value = sum((u * v).sum(axis=tuple(range(-n, 0))) for u, v, n in terms)
    magnitude = sum(np.abs(u * v).sum(axis=tuple(range(-n, 0))) for u, v, n in terms)
    return value, magnitude
