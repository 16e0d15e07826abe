"""Planted bugs as plugins: six in the vanilla LSTM and five in the peephole and LayerNorm variants.

One hand-written LSTM for all three variants (forward and BPTT, written from the equations, not
shared with ``impls/``), with one realistic bug switched on at a time. Each attribute below is a
zero-argument factory, loaded as ``tests/plugins/planted.py:gates_swapped`` and so on.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _ln(v, gamma, beta, eps, unbiased=False, eps_outside=False):
    """LayerNorm over the last axis; returns the output and what backward needs."""
    H = v.shape[-1]
    mu = v.mean(axis=-1, keepdims=True)
    var = ((v - mu) ** 2).sum(axis=-1, keepdims=True) / (H - 1 if unbiased else H)
    s = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    xhat = (v - mu) / s
    return xhat * gamma + beta, (xhat, s)


def _ln_backward(dout, gamma, stats):
    xhat, s = stats
    dxhat = dout * gamma
    dv = (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) / s
    return dv, (dout * xhat).sum(axis=0), dout.sum(axis=0)


class PlantedLSTM:
    def __init__(self, variant="vanilla", bug=None):
        self.variant = variant
        self.bug = bug
        self.name = f"planted-{variant}-{bug or 'correct'}"

    def forward(self, x, h0, c0, p):
        W, R = p["W"], p["R"]
        H = h0.shape[1]
        eps = getattr(self, "ln_eps", 1e-5)
        h, c = h0, c0
        ys, steps = [], []
        for t in range(x.shape[0]):
            a = x[t] @ W.T + h @ R.T  # (B, 4H)
            if self.variant != "layernorm":
                a = a + p["b"]
            ai, af, ag, ao = (a[:, k * H : (k + 1) * H] for k in range(4))
            if self.bug == "gates_swapped":
                ai, af = af, ai
            st = {"x": x[t], "h_prev": h, "c_prev": c}
            if self.variant == "layernorm":
                opts = {"unbiased": self.bug == "ln_unbiased", "eps_outside": self.bug == "ln_eps_outside"}
                g_, b_ = p["gamma"], p["beta"]
                n = {}
                for k, (name, v) in enumerate((("i", ai), ("f", af), ("g", ag), ("o", ao))):
                    n[name], st["ln_" + name] = _ln(v, g_[k], b_[k], eps, **opts)
                i, f, g, o = _sigmoid(n["i"]), _sigmoid(n["f"]), np.tanh(n["g"]), _sigmoid(n["o"])
                v = f * c + i * g
                c_new, st["ln_c"] = _ln(v, g_[4], b_[4], eps, **opts)
            elif self.variant == "peephole":
                i = _sigmoid(ai + p["p_i"] * c)
                f = _sigmoid(af + p["p_f"] * c)
                g = np.tanh(ag)
                c_new = f * c + i * g
                seen = c if self.bug == "peephole_o_sees_prev" else c_new
                o = _sigmoid(ao + p["p_o"] * seen)
                st["o_sees"] = seen
            else:
                i, f, g, o = _sigmoid(ai), _sigmoid(af), np.tanh(ag), _sigmoid(ao)
                c_new = f * c + i * g
            tc = np.tanh(c_new)
            h = o * tc
            st.update(i=i, f=f, g=g, o=o, c=c_new, tc=tc, h=h)
            steps.append(st)
            c = c_new
            ys.append(h)
        return np.stack(ys), h, c, (p, steps)

    def backward(self, dy, dh_T, dc_T, cache):
        p, steps = cache
        W, R = p["W"], p["R"]
        T = len(steps)
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        dx = np.zeros((T,) + steps[0]["x"].shape, dy.dtype)
        dh, dc = dh_T, dc_T
        for t in reversed(range(T)):
            s = steps[t]
            dh = dh + dy[t]
            do = dh * s["tc"]
            if self.bug == "tanh_derivative":
                dtanh = (1.0 - s["tc"]) ** 2
            else:
                dtanh = 1.0 - s["tc"] ** 2
            dc_total = dc if self.bug == "no_h_to_c" else dc + dh * s["o"] * dtanh
            dao = do * s["o"] * (1 - s["o"])
            if self.variant == "peephole":
                grads["p_o"] += (dao * s["o_sees"]).sum(axis=0)
                if self.bug != "peephole_o_sees_prev":
                    dc_total = dc_total + dao * p["p_o"]
            if self.variant == "layernorm":
                if self.bug == "ln_skip_c_backward":
                    dv = dc_total
                else:
                    dv, dgc, dbc = _ln_backward(dc_total, p["gamma"][4], s["ln_c"])
                    grads["gamma"][4] += dgc
                    grads["beta"][4] += dbc
            else:
                dv = dc_total
            di, dg, df = dv * s["g"], dv * s["i"], dv * s["c_prev"]
            dc_prev = dv * s["f"]
            if self.bug == "dc0_without_f" and t == 0:
                dc_prev = dv
            dai = di * s["i"] * (1 - s["i"])
            daf = df * s["f"] * (1 - s["f"])
            dag = dg * (1 - s["g"] ** 2)
            if self.variant == "peephole":
                if self.bug == "peephole_o_sees_prev":
                    dc_prev = dc_prev + dao * p["p_o"]
                grads["p_i"] += (dai * s["c_prev"]).sum(axis=0)
                grads["p_f"] += (daf * s["c_prev"]).sum(axis=0)
                if self.bug != "peephole_no_gate_path":
                    dc_prev = dc_prev + dai * p["p_i"] + daf * p["p_f"]
            if self.variant == "layernorm":
                das = []
                for k, (name, dn) in enumerate((("i", dai), ("f", daf), ("g", dag), ("o", dao))):
                    dk, dgk, dbk = _ln_backward(dn, p["gamma"][k], s["ln_" + name])
                    grads["gamma"][k] += dgk
                    grads["beta"][k] += dbk
                    das.append(dk)
                dai, daf, dag, dao = das
            if self.bug == "gates_swapped":
                dai, daf = daf, dai
            da = np.concatenate([dai, daf, dag, dao], axis=1)  # (B, 4H)
            dx[t] = da @ W
            grads["W"] += da.T @ s["x"]
            h_used = s["h"] if self.bug == "dR_uses_h_t" else s["h_prev"]
            grads["R"] += da.T @ h_used
            if "b" in grads:
                grads["b"] += da[0] if self.bug == "db_one_batch_row" else da.sum(axis=0)
            dh = da @ R
            dc = dc_prev
        return {"x": dx, "h0": dh, "c0": dc, **grads}


def _factory(variant, bug):
    def make():
        return PlantedLSTM(variant, bug)

    make.__name__ = bug or f"correct_{variant}"
    return make


correct_vanilla = _factory("vanilla", None)
correct_peephole = _factory("peephole", None)
correct_layernorm = _factory("layernorm", None)

# vanilla: forward and BPTT
gates_swapped = _factory("vanilla", "gates_swapped")
no_h_to_c = _factory("vanilla", "no_h_to_c")
tanh_derivative = _factory("vanilla", "tanh_derivative")
dR_uses_h_t = _factory("vanilla", "dR_uses_h_t")
db_one_batch_row = _factory("vanilla", "db_one_batch_row")
dc0_without_f = _factory("vanilla", "dc0_without_f")

# peephole and LayerNorm
peephole_o_sees_prev = _factory("peephole", "peephole_o_sees_prev")
peephole_no_gate_path = _factory("peephole", "peephole_no_gate_path")
ln_unbiased = _factory("layernorm", "ln_unbiased")
ln_eps_outside = _factory("layernorm", "ln_eps_outside")
ln_skip_c_backward = _factory("layernorm", "ln_skip_c_backward")
