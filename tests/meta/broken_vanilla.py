"""A hand-written vanilla LSTM of the kind users bring, with one realistic bug switched on at a time.

Each bug is a line a person really writes when porting BPTT by hand; the meta-tests require the
harness to report each one as a discrepancy on the quantity it corrupts, and nothing else.
"""

from __future__ import annotations

import numpy as np

BUGS = {
    "gates_swapped": "the input and forget gate blocks read in the wrong order (forward)",
    "no_h_to_c": "backward forgets that h_t = o * tanh(c_t) also reaches c_t",
    "tanh_derivative": "(1 - tanh(c))**2 in place of 1 - tanh(c)**2",
    "dR_uses_h_t": "recurrent weight gradient built from h_t instead of h_{t-1}",
    "db_batch_row": "bias gradient summed over time but taken from one batch row",
    "dc0_without_f": "the gradient returned for c0 is not multiplied by f",
}


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


class StudentLSTM:
    variant = "vanilla"

    def __init__(self, bug: str | None = None):
        if bug is not None and bug not in BUGS:
            raise ValueError(f"bug: expected one of {sorted(BUGS)} or None, got {bug!r}")
        self.bug = bug
        self.name = f"student[{bug or 'correct'}]"

    def forward(self, x, h0, c0, params):
        W, R, b = params["W"], params["R"], params["b"]
        T, H = x.shape[0], h0.shape[1]
        h, c = h0, c0
        ys, cache = [], []
        with np.errstate(over="ignore"):
            for t in range(T):
                a = x[t] @ W.T + h @ R.T + b
                if self.bug == "gates_swapped":
                    f, i = _sigmoid(a[:, :H]), _sigmoid(a[:, H : 2 * H])
                else:
                    i, f = _sigmoid(a[:, :H]), _sigmoid(a[:, H : 2 * H])
                g, o = np.tanh(a[:, 2 * H : 3 * H]), _sigmoid(a[:, 3 * H :])
                c_new = f * c + i * g
                h_new = o * np.tanh(c_new)
                cache.append((x[t], h, c, i, f, g, o, c_new, h_new))
                h, c = h_new, c_new
                ys.append(h)
        return np.stack(ys), h, c, (params, cache)

    def backward(self, dy, dh_T, dc_T, cache):
        params, steps = cache
        W, R, b = params["W"], params["R"], params["b"]
        dx = np.zeros((len(steps),) + steps[0][0].shape, dy.dtype)
        dW, dR, db = np.zeros_like(W), np.zeros_like(R), np.zeros_like(b)
        dh_next, dc_next = dh_T, dc_T
        for t in reversed(range(len(steps))):
            x_t, h_prev, c_prev, i, f, g, o, c, h = steps[t]
            dh = dy[t] + dh_next
            tc = np.tanh(c)
            dtanh = (1 - tc) ** 2 if self.bug == "tanh_derivative" else 1 - tc**2
            dc = dc_next if self.bug == "no_h_to_c" else dc_next + dh * o * dtanh
            if self.bug == "gates_swapped":
                da = np.concatenate([dc * c_prev * f * (1 - f), dc * g * i * (1 - i),
                                     dc * i * (1 - g**2), dh * tc * o * (1 - o)], axis=1)
            else:
                da = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                                     dc * i * (1 - g**2), dh * tc * o * (1 - o)], axis=1)
            dx[t] = da @ W
            dW += da.T @ x_t
            dR += da.T @ (h if self.bug == "dR_uses_h_t" else h_prev)
            db += da[0] if self.bug == "db_batch_row" else da.sum(axis=0)
            dh_next = da @ R
            dc_next = dc if (self.bug == "dc0_without_f" and t == 0) else dc * f
        return {"x": dx, "h0": dh_next, "c0": dc_next, "W": dW, "R": dR, "b": db}
