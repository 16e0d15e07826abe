"""LSTMs written the way people write them elsewhere: other gate orders, transposed weights,
batch-major sequences, a built-in forget bias, functions instead of a class, one bias-folded matrix.

Each is written from the equations with its own slicing, independently of ``harness.layouts`` and
``harness.adapt``, so that certifying them through an adapter really tests the adapter. The
adapted objects at the bottom are the README's worked examples.
"""

from __future__ import annotations

import numpy as np

from harness.adapt import adapt


def _sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))


class ForeignLSTM:
    """A vanilla LSTM in a configurable foreign convention, forward and hand-written backward.

    ``order``: the gate of each of the four blocks, e.g. "ifog"; ``transposed``: W (D, 4H) and R (H, 4H)
    used as ``x @ W``; ``batch_major``: x (B, T, D), y (B, T, H); ``forget_bias``: added to the forget
    pre-activation, as TF1 does; ``bug``: "tanh_derivative" plants (1 - tanh(c))**2 in backward;
    "output_tanh" makes the output gate a tanh (matches no convention at all); "ignores_c0" and
    "ignores_h0" start from a zero state whatever is passed.
    """

    variant = "vanilla"

    def __init__(self, order="ifgo", transposed=False, batch_major=False, forget_bias=0.0, bug=None, name=None):
        self.order = order
        self.transposed = transposed
        self.batch_major = batch_major
        self.forget_bias = forget_bias
        self.bug = bug
        self.name = name or f"foreign-{order}{'-T' if transposed else ''}{'-BT' if batch_major else ''}"

    def _block(self, a, gate, H):
        k = self.order.index(gate)
        return a[:, k * H : (k + 1) * H]

    def forward(self, x, h0, c0, params):
        W, R, b = params["W"], params["R"], params["b"]
        xs = np.swapaxes(x, 0, 1) if self.batch_major else x  # (T, B, D) from here on
        H = h0.shape[1]
        h = np.zeros_like(h0) if self.bug == "ignores_h0" else h0
        c = np.zeros_like(c0) if self.bug == "ignores_c0" else c0
        ys, steps = [], []
        for t in range(xs.shape[0]):
            if self.transposed:
                a = xs[t] @ W + h @ R + b  # (B, 4H)
            else:
                a = xs[t] @ W.T + h @ R.T + b
            i = _sigmoid(self._block(a, "i", H))
            f = _sigmoid(self._block(a, "f", H) + self.forget_bias)
            g = np.tanh(self._block(a, "g", H))
            o_pre = self._block(a, "o", H)
            o = np.tanh(o_pre) if self.bug == "output_tanh" else _sigmoid(o_pre)
            c_new = f * c + i * g
            tc = np.tanh(c_new)
            h_new = o * tc
            steps.append((xs[t], h, c, i, f, g, o, tc))
            h, c = h_new, c_new
            ys.append(h)
        y = np.stack(ys)
        if self.batch_major:
            y = np.ascontiguousarray(np.swapaxes(y, 0, 1))
        return y, h, c, (params, steps)

    def backward(self, dy, dh_T, dc_T, cache):
        params, steps = cache
        W, R = params["W"], params["R"]
        dys = np.swapaxes(dy, 0, 1) if self.batch_major else dy
        H = dh_T.shape[1]
        T = len(steps)
        dx = np.zeros((T,) + steps[0][0].shape, dy.dtype)
        dW, dR, db = np.zeros_like(W), np.zeros_like(R), np.zeros_like(params["b"])
        dh, dc = dh_T, dc_T
        for t in reversed(range(T)):
            x_t, h_prev, c_prev, i, f, g, o, tc = steps[t]
            dh = dh + dys[t]
            do = dh * tc
            dtanh = (1.0 - tc) ** 2 if self.bug == "tanh_derivative" else 1.0 - tc**2
            dc = dc + dh * o * dtanh
            da = np.empty((dh.shape[0], 4 * H), dy.dtype)
            pieces = {"i": dc * g * i * (1 - i), "f": dc * c_prev * f * (1 - f), "g": dc * i * (1 - g**2),
                      "o": do * (1 - o**2) if self.bug == "output_tanh" else do * o * (1 - o)}
            for gate, value in pieces.items():
                self._block(da, gate, H)[...] = value
            if self.transposed:
                dx[t] = da @ W.T
                dh = da @ R.T
                dW += x_t.T @ da
                dR += h_prev.T @ da
            else:
                dx[t] = da @ W
                dh = da @ R
                dW += da.T @ x_t
                dR += da.T @ h_prev
            db += da.sum(axis=0)
            dc = dc * f
        if self.batch_major:
            dx = np.ascontiguousarray(np.swapaxes(dx, 0, 1))
        return {"x": dx, "h0": dh, "c0": dc, "W": dW, "R": dR, "b": db}


ifog = ForeignLSTM(order="ifog")
tf1 = ForeignLSTM(order="igfo", forget_bias=1.0, name="tf1-style")  # TF1: i, c (= g), f, o
transposed = ForeignLSTM(transposed=True)
batch_major = ForeignLSTM(batch_major=True)
keras_like = ForeignLSTM(transposed=True, batch_major=True, name="keras-like")  # i, f, c (= g), o
onnx_order_transposed = ForeignLSTM(order="iofg", transposed=True, name="onnx-order-transposed")
tanh_bug = ForeignLSTM(bug="tanh_derivative", name="tanh-bug")
ifog_tanh_bug = ForeignLSTM(order="ifog", bug="tanh_derivative", name="ifog-tanh-bug")  # adapted by a test
nonsense = ForeignLSTM(bug="output_tanh", name="output-tanh")
ignores_c0 = ForeignLSTM(bug="ignores_c0", name="ignores-c0")
ignores_h0_transposed = ForeignLSTM(bug="ignores_h0", transposed=True, name="ignores-h0-transposed")


class PeepholeDeclaredVanilla:
    """Computes the peephole LSTM but declares itself vanilla (forward only)."""

    variant = "vanilla"
    name = "peephole-declared-vanilla"

    def forward(self, x, h0, c0, params):
        W, R, b = params["W"], params["R"], params["b"]
        p_i, p_f, p_o = params["p_i"], params["p_f"], params["p_o"]
        H = h0.shape[1]
        h, c = h0, c0
        ys = []
        for t in range(x.shape[0]):
            a = x[t] @ W.T + h @ R.T + b
            i = _sigmoid(a[:, :H] + p_i * c)
            f = _sigmoid(a[:, H : 2 * H] + p_f * c)
            g = np.tanh(a[:, 2 * H : 3 * H])
            c = f * c + i * g
            o = _sigmoid(a[:, 3 * H :] + p_o * c)
            h = o * np.tanh(c)
            ys.append(h)
        return np.stack(ys), h, c, None


peephole_as_vanilla = PeepholeDeclaredVanilla()


# ---------------------------------------------------------------------------------------------------
# README example 1: the classic course exercise, as functions.
# x (N, T, D) batch-major; Wx (D, 4H), Wh (H, 4H), b (4H,); gates i, f, o, g; the cell starts at zero;
# forward returns (h, cache) with h (N, T, H); backward(dh, cache) -> (dx, dh0, dWx, dWh, db).


def lstm_forward(x, h0, Wx, Wh, b):
    N, T, D = x.shape
    H = h0.shape[1]
    h, c = h0, np.zeros_like(h0)
    hs, cache = np.zeros((N, T, H), x.dtype), []
    for t in range(T):
        a = x[:, t] @ Wx + h @ Wh + b
        i, f, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H : 2 * H]), _sigmoid(a[:, 2 * H : 3 * H])
        g = np.tanh(a[:, 3 * H :])
        c_next = f * c + i * g
        h_next = o * np.tanh(c_next)
        cache.append((x[:, t], h, c, i, f, o, g, c_next))
        h, c = h_next, c_next
        hs[:, t] = h
    return hs, (cache, Wx, Wh)


def lstm_backward(dh, cache):
    steps, Wx, Wh = cache
    N, T, H = dh.shape
    dx = np.zeros((N, T, Wx.shape[0]), dh.dtype)
    dWx, dWh, db = np.zeros_like(Wx), np.zeros_like(Wh), np.zeros(4 * H, dh.dtype)
    dh_next, dc_next = np.zeros((N, H), dh.dtype), np.zeros((N, H), dh.dtype)
    for t in reversed(range(T)):
        x_t, h_prev, c_prev, i, f, o, g, c_t = steps[t]
        dh_t = dh[:, t] + dh_next
        tc = np.tanh(c_t)
        dc = dc_next + dh_t * o * (1 - tc**2)
        da = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dh_t * tc * o * (1 - o),
                             dc * i * (1 - g**2)], axis=1)
        dx[:, t] = da @ Wx.T
        dWx += x_t.T @ da
        dWh += h_prev.T @ da
        db += da.sum(axis=0)
        dh_next = da @ Wh.T
        dc_next = dc * f
    return dx, dh_next, dWx, dWh, db


course = adapt(forward_fn=lstm_forward, backward_fn=lstm_backward, name="course-exercise",
               gate_order="ifog", transposed=True, batch_major=True, initial_cell=False, final_cell=False,
               names={"W": "Wx", "R": "Wh"}, backward_takes=("dy", "cache"))


# ---------------------------------------------------------------------------------------------------
# README example 2: one bias-folded matrix WLSTM (1+D+H, 4H) over [1, x, h], gates i, f, o, g,
# time-major, as in the well-known minimal NumPy LSTM.


class FoldedLSTM:
    variant = "vanilla"
    name = "bias-folded"

    def forward(self, X, h0, c0, params):
        WLSTM = params["WLSTM"]
        T, B, D = X.shape
        H = WLSTM.shape[1] // 4
        Hin = np.zeros((T, B, 1 + D + H), X.dtype)
        IFOGf = np.zeros((T, B, 4 * H), X.dtype)
        C = np.zeros((T, B, H), X.dtype)
        Ct = np.zeros((T, B, H), X.dtype)
        Hout = np.zeros((T, B, H), X.dtype)
        for t in range(T):
            prevh = Hout[t - 1] if t > 0 else h0
            prevc = C[t - 1] if t > 0 else c0
            Hin[t, :, 0] = 1
            Hin[t, :, 1 : 1 + D] = X[t]
            Hin[t, :, 1 + D :] = prevh
            IFOG = Hin[t] @ WLSTM
            IFOGf[t, :, : 3 * H] = _sigmoid(IFOG[:, : 3 * H])
            IFOGf[t, :, 3 * H :] = np.tanh(IFOG[:, 3 * H :])
            C[t] = IFOGf[t, :, :H] * IFOGf[t, :, 3 * H :] + IFOGf[t, :, H : 2 * H] * prevc
            Ct[t] = np.tanh(C[t])
            Hout[t] = IFOGf[t, :, 2 * H : 3 * H] * Ct[t]
        return Hout, Hout[-1].copy(), C[-1].copy(), (WLSTM, Hin, IFOGf, C, Ct, h0, c0)

    def backward(self, dHout, dh_T, dc_T, cache):
        WLSTM, Hin, IFOGf, C, Ct, h0, c0 = cache
        T, B, H = dHout.shape
        D = Hin.shape[2] - 1 - H
        dHout = dHout.copy()
        dHout[-1] += dh_T
        dC = np.zeros_like(C)
        dC[-1] = dc_T
        dIFOG = np.zeros_like(IFOGf)
        dHin = np.zeros_like(Hin)
        dWLSTM = np.zeros_like(WLSTM)
        dh0, dc0 = np.zeros_like(h0), np.zeros_like(c0)
        for t in reversed(range(T)):
            tanhCt = Ct[t]
            dIFOGf_o = tanhCt * dHout[t]
            dC[t] += (1 - tanhCt**2) * (IFOGf[t, :, 2 * H : 3 * H] * dHout[t])
            prevc = C[t - 1] if t > 0 else c0
            dIFOGf_f = prevc * dC[t]
            if t > 0:
                dC[t - 1] += IFOGf[t, :, H : 2 * H] * dC[t]
            else:
                dc0 = IFOGf[t, :, H : 2 * H] * dC[t]
            dIFOGf_i = IFOGf[t, :, 3 * H :] * dC[t]
            dIFOGf_g = IFOGf[t, :, :H] * dC[t]
            i, f, o, g = (IFOGf[t, :, k * H : (k + 1) * H] for k in range(4))
            dIFOG[t] = np.concatenate([dIFOGf_i * i * (1 - i), dIFOGf_f * f * (1 - f),
                                       dIFOGf_o * o * (1 - o), dIFOGf_g * (1 - g**2)], axis=1)
            dWLSTM += Hin[t].T @ dIFOG[t]
            dHin[t] = dIFOG[t] @ WLSTM.T
            if t > 0:
                dHout[t - 1] += dHin[t, :, 1 + D :]
            else:
                dh0 = dHin[t, :, 1 + D :]
        return {"x": dHin[:, :, 1 : 1 + D], "h0": dh0, "c0": dc0, "WLSTM": dWLSTM}


folded = adapt(FoldedLSTM(), bias="folded", transposed=True, gate_order="ifog", names={"W": "WLSTM"})


# ---------------------------------------------------------------------------------------------------
# A one-timestep cell object in the course's shapes (certified on the command line with --step
# --gate-order ifog --transposed --names W=Wx,R=Wh): forward(x_t, prev_h, prev_c, params) ->
# (next_h, next_c, cache); backward(dnext_h, dnext_c, cache) -> (dx, dprev_h, dprev_c, {name: grad}).


class CourseCell:
    variant = "vanilla"

    def __init__(self, bug=None):
        self.bug = bug  # "dprev_c_without_f": the cell gradient passed back without the forget gate
        self.name = f"course-cell{'-' + bug if bug else ''}"

    def forward(self, x, prev_h, prev_c, p):
        H = prev_h.shape[1]
        a = x @ p["Wx"] + prev_h @ p["Wh"] + p["b"]  # (N, 4H), gates i, f, o, g
        i, f, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H : 2 * H]), _sigmoid(a[:, 2 * H : 3 * H])
        g = np.tanh(a[:, 3 * H :])
        next_c = f * prev_c + i * g
        next_h = o * np.tanh(next_c)
        return next_h, next_c, (x, prev_h, prev_c, p["Wx"], p["Wh"], i, f, o, g, next_c)

    def backward(self, dnext_h, dnext_c, cache):
        x, prev_h, prev_c, Wx, Wh, i, f, o, g, next_c = cache
        tc = np.tanh(next_c)
        dc = dnext_c + dnext_h * o * (1 - tc**2)
        da = np.concatenate([dc * g * i * (1 - i), dc * prev_c * f * (1 - f), dnext_h * tc * o * (1 - o),
                             dc * i * (1 - g**2)], axis=1)  # (N, 4H)
        dprev_c = dc if self.bug == "dprev_c_without_f" else dc * f
        return da @ Wx.T, da @ Wh.T, dprev_c, {"Wx": x.T @ da, "Wh": prev_h.T @ da, "b": da.sum(axis=0)}


course_cell = CourseCell()
course_cell_planted = CourseCell("dprev_c_without_f")
