"""The LayerNorm LSTM, with the semantics of TensorFlow 1's ``LayerNormBasicLSTMCell``.

Parameters: ``W`` (4H, D), ``R`` (4H, H), no bias; ``gamma`` and ``beta`` (5, H), rows in the order
i, f, g, o, c. Each gate's pre-activation is layer-normalized on its own (over its H units, biased
variance, eps inside the square root), and so is the new cell state, which is what is carried
forward:

    a_t = W x_t + R h_{t-1}                            split into a_i, a_f, a_g, a_o
    LN_k(v) = (v - mean(v)) / sqrt(var(v) + eps) * gamma[k] + beta[k]
    i = sigmoid(LN_i(a_i))   f = sigmoid(LN_f(a_f))   g = tanh(LN_g(a_g))   o = sigmoid(LN_o(a_o))
    c_t = LN_c(f * c_{t-1} + i * g)
    h_t = o * tanh(c_t)

Backward through LN, with n = (v - mean) * r the normalized row and r = 1 / sqrt(var + eps):

    dgamma = sum dz * n      dbeta = sum dz      dn = dz * gamma
    dv = r * (dn - mean(dn) - n * mean(dn * n))          (means over the H units of the row)

TF1's ``forget_bias`` is the same as adding it to ``beta[f]``. ``ln_eps`` is a class attribute
(1e-5, TensorFlow's default); oracles read the declared value.

This module holds the whole variant: the layer norm itself (:func:`layer_norm`,
:func:`layer_norm_backward`, written with array methods only, so they run on any array namespace),
the readable loop version (one small function for the sigmoid gates, one for the cell candidate)
and the pointwise step of the stacked version (:class:`LayerNormCell`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from harness.contract import DEFAULT_LN_EPS, GATES, LN_ROWS
from harness.structure import FEATURES
from impls.loop import LoopLSTM, StepCache, preactivation_backward, sigmoid, split_gates
from impls.stacked import (
    Cell,
    StackedCache,
    StackedLSTM,
    activate_halved_,
    gate_views,
    sigmoid_halves,
    tanh_slope,
    times_sigmoid_slope_,
)

__all__ = [
    "LoopLayerNormLSTM",
    "StackedLayerNormLSTM",
    "LayerNormCell",
    "LNGateWeights",
    "LNStepCache",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_backward_",
    "cell_forward",
    "cell_backward",
]

#: Internal row order of gamma and beta in the stacked version: gates i, f, o, g, then the cell.
_INTERNAL_ROWS = tuple(LN_ROWS.index(k) for k in ("i", "f", "o", "g", "c"))


def layer_norm(v, gamma, beta, eps: float):
    """Normalize over the last axis: v (..., H), gamma and beta broadcastable to it.

    Returns (LN(v), n, r): n = (v - mean) * r the normalized rows, r = 1 / sqrt(var + eps) (..., 1).
    """
    centered = v - v.mean(axis=-1, keepdims=True)
    var = (centered * centered).mean(axis=-1, keepdims=True)  # biased: divide by H
    r = 1.0 / (var + eps) ** 0.5
    n = centered * r
    return n * gamma + beta, n, r


def layer_norm_backward(dz, n, r, gamma):
    """Back through z = n * gamma + beta, n = (v - mean) * r: returns dv (..., H).

    (dgamma = sum dz * n and dbeta = sum dz are reduced by the caller, over whatever it batches.)
    """
    dn = dz * gamma
    return r * (dn - dn.mean(axis=-1, keepdims=True) - n * (dn * n).mean(axis=-1, keepdims=True))


def _row_mean(v, *, out):
    """v.mean(axis=-1, keepdims=True) into out (..., 1): NumPy's mean is this sum then this division,
    so the result has the same bits, without allocating."""
    v.sum(axis=-1, keepdims=True, out=out)
    out /= v.shape[-1]
    return out


def layer_norm_backward_(xp, dz, n, r, gamma, *, out, tmp, means):
    """:func:`layer_norm_backward` into ``out`` (same shape as dz), with ``tmp`` (same shape) and
    ``means`` (2, ..., 1) as scratch.

    The same operations in the same order, so the same bits, without the temporaries.
    """
    xp.multiply(dz, gamma, out=out)  # dn
    mean_dn = _row_mean(out, out=means[0])
    mean_dn_n = _row_mean(xp.multiply(out, n, out=tmp), out=means[1])
    xp.multiply(n, mean_dn_n, out=tmp)
    out -= mean_dn
    out -= tmp
    xp.multiply(r, out, out=out)
    return out


# --- The readable loop version -------------------------------------------------------------------


@dataclass
class LNGateWeights:
    """One gate's input weights (H, D), recurrent weights (H, H), gain (H,) and shift (H,)."""

    W: np.ndarray
    R: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray


@dataclass
class LNWeights:
    gates: dict[str, LNGateWeights]
    gamma_c: np.ndarray  # (H,)
    beta_c: np.ndarray  # (H,)
    eps: float


@dataclass
class LNStats:
    """What a layer norm keeps for its backward: the normalized row n and 1 / sqrt(var + eps)."""

    n: np.ndarray  # (B, H)
    r: np.ndarray  # (B, 1)


def normalized_preactivation(x_t, h_prev, w: LNGateWeights, eps: float):
    # LN_k(W_k x_t + R_k h_{t-1}): (B, D) @ (D, H) + (B, H) @ (H, H) -> (B, H), no bias
    z, n, r = layer_norm(x_t @ w.W.T + h_prev @ w.R.T, w.gamma, w.beta, eps)
    return z, LNStats(n, r)


def sigmoid_gate(x_t, h_prev, w: LNGateWeights, eps):
    # The input, forget and output gates: sigmoid(LN_k(W_k x_t + R_k h_{t-1}))          (B, H)
    z, stats = normalized_preactivation(x_t, h_prev, w, eps)
    return sigmoid(z), stats


def cell_candidate(x_t, h_prev, w: LNGateWeights, eps):
    # g = tanh(LN_g(W_g x_t + R_g h_{t-1}))                                              (B, H)
    z, stats = normalized_preactivation(x_t, h_prev, w, eps)
    return np.tanh(z), stats


def cell_state(f, c_prev, i, g, weights: LNWeights):
    # c_t = LN_c(f * c_{t-1} + i * g)                                 (B, H)
    c, n, r = layer_norm(f * c_prev + i * g, weights.gamma_c, weights.beta_c, weights.eps)
    return c, LNStats(n, r)


@dataclass
class LNStepCache(StepCache):
    """The vanilla step's cache plus the LayerNorm statistics of each row."""

    stats: dict[str, LNStats] = field(default_factory=dict)  # per LN row i, f, g, o, c


def cell_forward(x_t, h_prev, c_prev, weights: LNWeights, *, coupled=False):
    """One timestep: (B, D), (B, H), (B, H) -> h_t (B, H), c_t (B, H), cache."""
    w, eps = weights.gates, weights.eps
    i, st_i = sigmoid_gate(x_t, h_prev, w["i"], eps)  # input gate
    if coupled:  # CIFG: f = 1 - i; the forget gate's row of W, R, gamma, beta is unused
        f, st_f = 1.0 - i, None
    else:
        f, st_f = sigmoid_gate(x_t, h_prev, w["f"], eps)  # forget gate
    g, st_g = cell_candidate(x_t, h_prev, w["g"], eps)
    o, st_o = sigmoid_gate(x_t, h_prev, w["o"], eps)  # output gate
    c, st_c = cell_state(f, c_prev, i, g, weights)
    tanh_c = np.tanh(c)
    h = o * tanh_c
    stats = {"i": st_i, "f": st_f, "g": st_g, "o": st_o, "c": st_c}
    return h, c, LNStepCache(x_t, h_prev, c_prev, i, f, g, o, tanh_c, stats=stats)


def cell_backward(dh, dc, cache: LNStepCache, weights: LNWeights, *, coupled=False):
    """Back through one timestep.

    dh: dL/dh_t (B, H), everything that reaches h_t (from y_t and from step t+1).
    dc: dL/dc_t (B, H) arriving from step t+1 (or dc_T); c_t is the normalized cell.
    Returns dx_t (B, D), dh_prev (B, H), dc_prev (B, H) and this step's parameter gradients.
    """
    s, w = cache, weights.gates
    # h_t = o * tanh(c_t): c_t is reached directly and through h_t.
    dz = {"o": dh * s.tanh_c * s.o * (1.0 - s.o)}  # gradients of the normalized pre-activations
    dz_c = dc + dh * s.o * (1.0 - s.tanh_c**2)
    # c_t = LN_c(s_t), s_t = f * c_{t-1} + i * g
    ds = layer_norm_backward(dz_c, s.stats["c"].n, s.stats["c"].r, weights.gamma_c)
    di, df = ds * s.g, ds * s.c_prev
    if coupled:
        di, df = di - df, np.zeros_like(df)  # f = 1 - i: what reaches f reaches i, negated
    dz["i"] = di * s.i * (1.0 - s.i)
    dz["f"] = df * s.f * (1.0 - s.f)
    dz["g"] = ds * s.i * (1.0 - s.g**2)
    dc_prev = ds * s.f
    # Back through each gate's layer norm to its pre-activation a_k = W_k x_t + R_k h_{t-1}.
    da = {k: _ln_backward_or_zero(dz[k], s.stats[k], w[k].gamma) for k in GATES}
    dx_t, dh_prev, grads = preactivation_backward(da, s.x_t, s.h_prev, w)
    dz["c"] = dz_c
    grads["gamma"] = np.stack([_times_n(dz[k], s.stats[k]).sum(axis=0) for k in LN_ROWS])  # (5, H)
    grads["beta"] = np.stack([dz[k].sum(axis=0) for k in LN_ROWS])  # (5, H)
    return dx_t, dh_prev, dc_prev, grads


def _ln_backward_or_zero(dz, stats: LNStats | None, gamma):
    # A row that was not normalized (CIFG's forget gate) has dz = 0 and no gradient to pass.
    return np.zeros_like(dz) if stats is None else layer_norm_backward(dz, stats.n, stats.r, gamma)


def _times_n(dz, stats: LNStats | None):
    return np.zeros_like(dz) if stats is None else dz * stats.n


class LoopLayerNormLSTM(LoopLSTM):
    """The LayerNorm LSTM, a timestep and a gate at a time, with BPTT written out by hand."""

    name = "loop-layernorm"
    structures = FEATURES  # its cells compute every option
    variant = "layernorm"
    ln_eps = DEFAULT_LN_EPS

    def prepare(self, params: Mapping[str, np.ndarray]) -> LNWeights:
        W, R = split_gates(params["W"]), split_gates(params["R"])
        gamma = dict(zip(LN_ROWS, params["gamma"]))
        beta = dict(zip(LN_ROWS, params["beta"]))
        gates = {k: LNGateWeights(W[k], R[k], gamma[k], beta[k]) for k in GATES}
        return LNWeights(gates, gamma["c"], beta["c"], float(self.ln_eps))

    def cell_forward(self, x_t, h_prev, c_prev, weights):
        return cell_forward(x_t, h_prev, c_prev, weights, coupled=self.coupled_input_forget)

    def cell_backward(self, dh, dc, cache, weights):
        return cell_backward(dh, dc, cache, weights, coupled=self.coupled_input_forget)


# --- The stacked version's pointwise step --------------------------------------------------------


class LayerNormCell(Cell):
    """The LayerNorm gate math of one step on the stacked buffers (internal order i, f, o, g).

    The four gate rows of a step are normalized together as a (B, 4, H) view; gamma and beta are
    kept as (5, H) in the internal row order i, f, o, g, c.
    """

    has_bias = False
    param_names = ("gamma", "beta")

    def prepare(self, xp, params, dtype, *, ln_eps):
        rows = list(_INTERNAL_ROWS)
        gamma = xp.asarray(params["gamma"], dtype=dtype)[rows]  # (5, H)
        beta = xp.asarray(params["beta"], dtype=dtype)[rows]
        H = gamma.shape[1]
        half, shift = sigmoid_halves(xp, H, dtype)
        halves = half.reshape(4, H)
        return {
            "gamma": gamma,
            "beta": beta,
            # The forward's gains and shifts of the four gates, with i, f, o halved for the sigmoids
            # (:func:`impls.stacked.activate_halved_`); the backward uses gamma as it is.
            "gamma_fwd": gamma[:4] * halves,
            "beta_fwd": beta[:4] * halves,
            "half": half,
            "shift": shift,
            "eps": float(ln_eps),
        }

    def forward_buffers(self, xp, T, B, H, dtype):
        return {
            "n": xp.empty((T, B, 4 * H), dtype),  # normalized gate pre-activations
            "r": xp.empty((T, B, 4, 1), dtype),  # 1 / sqrt(var + eps) per gate row
            "n_c": xp.empty((T, B, H), dtype),  # normalized f * c_{t-1} + i * g
            "r_c": xp.empty((T, B, 1), dtype),
            "tanh_c": xp.empty((T, B, H), dtype),
            "tmp": xp.empty((B, H), dtype),
        }

    @staticmethod
    def _normalize_(xp, v, n_out, r_out, eps) -> None:
        """n_out = (v - mean) * r, r_out = r = 1 / sqrt(var + eps), over the last axis of v (..., H).

        v is scratch (it is left centred); r_out (..., 1) serves as scratch for the mean first.
        """
        v -= _row_mean(v, out=r_out)
        xp.multiply(v, v, out=n_out)  # n_out as scratch for the squares
        var = _row_mean(n_out, out=r_out)
        var += eps
        xp.sqrt(var, out=var)
        xp.divide(1.0, var, out=r_out)
        xp.multiply(v, r_out, out=n_out)

    def forward_step(self, xp, t, a, c_prev, c, h, S, P) -> None:
        B, H = c.shape
        gamma, beta = P["gamma"], P["beta"]
        a3 = a.reshape(B, 4, H)  # a is a contiguous (B, 4H) row block: a view
        n3 = S["n"][t].reshape(B, 4, H)
        self._normalize_(xp, a3, n3, S["r"][t], P["eps"])
        xp.multiply(n3, P["gamma_fwd"], out=a3)  # LN_k(a_k) for k = i, f, o, g; i, f, o halved
        a3 += P["beta_fwd"]
        activate_halved_(xp, a, P["half"], P["shift"])  # i, f, o = sigmoid, g = tanh
        i, f, o, g = gate_views(a, H)
        self.couple_(xp, i, f)
        xp.multiply(f, c_prev, out=c)  # s_t = f * c_{t-1} + i * g
        xp.multiply(i, g, out=S["tmp"])
        c += S["tmp"]
        self._normalize_(xp, c, S["n_c"][t], S["r_c"][t], P["eps"])
        xp.multiply(S["n_c"][t], gamma[4], out=c)  # c_t = LN_c(s_t)
        c += beta[4]
        xp.tanh(c, out=S["tanh_c"][t])
        xp.multiply(o, S["tanh_c"][t], out=h)  # h_t = o * tanh(c_t)

    def backward_buffers(self, xp, T, B, H, dtype):
        return {
            "dz": xp.empty((T, B, 4 * H), dtype),  # gradients of the normalized gate pre-activations
            "dz_c": xp.empty((T, B, H), dtype),  # gradients of c_t = LN_c(s_t)
            "tmp": xp.empty((B, H), dtype),
            "tmp4": xp.empty((B, 4 * H), dtype),
            "tmp_means": xp.empty((2, B, 4, 1), dtype),  # the two row means of each layer norm's backward
            "tmp_means_c": xp.empty((2, B, 1), dtype),
        }

    def backward_step(self, xp, t, dh, dc, da, a, c_prev, c, S, G, P) -> None:
        B, H = c.shape
        gamma = P["gamma"]
        i, f, o, g = gate_views(a, H)
        dz = G["dz"][t]
        dz_i, dz_f, dz_o, dz_g = gate_views(dz, H)
        tmp, tanh_c = G["tmp"], S["tanh_c"][t]
        # dz_o = dh * tanh(c_t) * o * (1 - o)
        times_sigmoid_slope_(xp, xp.multiply(dh, tanh_c, out=dz_o), o, tmp)
        # dz_c = dc + dh * o * (1 - tanh_c^2): c_t is reached directly and through h_t.
        tanh_slope(xp, tanh_c, out=tmp)
        tmp *= o
        tmp *= dh
        dz_c = G["dz_c"][t]
        xp.add(dc, tmp, out=dz_c)
        # ds = LN_c backward; dc (now free) holds it.
        layer_norm_backward_(xp, dz_c, S["n_c"][t], S["r_c"][t], gamma[4], out=dc, tmp=tmp, means=G["tmp_means_c"])
        ds = dc
        # dz_i = ds * g * i (1 - i);  dz_f = ds * c_{t-1} * f (1 - f): the slopes of the contiguous
        # (B, 2H) block i, f at once;  dz_g = ds * i * (1 - g^2)
        xp.multiply(ds, g, out=dz_i)
        xp.multiply(ds, c_prev, out=dz_f)
        self.couple_backward_(dz_i, dz_f)
        times_sigmoid_slope_(xp, dz[:, : 2 * H], a[:, : 2 * H], G["tmp4"][:, : 2 * H])
        tanh_slope(xp, g, out=tmp)
        tmp *= i
        xp.multiply(ds, tmp, out=dz_g)
        ds *= f  # dc_{t-1}
        # Back through the four gate layer norms at once, (B, 4, H).
        layer_norm_backward_(xp, dz.reshape(B, 4, H), S["n"][t].reshape(B, 4, H), S["r"][t], gamma[:4],
                             out=da.reshape(B, 4, H), tmp=G["tmp4"].reshape(B, 4, H), means=G["tmp_means"])

    def param_grads(self, xp, cache: StackedCache, da, G):
        T, B, H = cache.c.shape[0] - 1, cache.c.shape[1], cache.c.shape[2]
        S = cache.saved
        dz, dz_c = G["dz"].reshape(T * B, 4 * H), G["dz_c"].reshape(T * B, H)
        dbeta = xp.concatenate([dz.sum(axis=0), dz_c.sum(axis=0)]).reshape(5, H)
        # dz and dz_c are not needed any more: their products with n and n_c in place (no large temporaries).
        dz *= S["n"].reshape(T * B, 4 * H)
        dz_c *= S["n_c"].reshape(T * B, H)
        dgamma = xp.concatenate([dz.sum(axis=0), dz_c.sum(axis=0)]).reshape(5, H)
        back = [_INTERNAL_ROWS.index(k) for k in range(5)]  # internal rows -> canonical i, f, g, o, c
        return {"gamma": dgamma[back], "beta": dbeta[back]}


class StackedLayerNormLSTM(StackedLSTM):
    """The LayerNorm LSTM with stacked-gate GEMMs; same results as ``loop-layernorm``, much faster."""

    name = "stacked-layernorm"
    structures = FEATURES  # its cells compute every option
    variant = "layernorm"
    ln_eps = DEFAULT_LN_EPS
    cell = LayerNormCell()
