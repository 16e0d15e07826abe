"""A standard LSTM (vanilla variant) behind the command protocol, in NumPy alone, for the tests.

    python numpy_lstm.py [--feature-first] [--no-h0] REQUEST_DIR RESPONSE_DIR

--feature-first: its sequences are (D, B, T) and (H, B, T) and its states (H, B), as course code lays
them out (certified with --layout DBT). --no-h0: it takes no h0 and starts from zero (certified with
--no-initial-hidden; given an h0 anyway, it ignores it).
"""

import json
import sys
from pathlib import Path

import numpy as np


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def forward(x, h, c, W, R, b):
    H = h.shape[1]
    ys, steps = [], []
    for t in range(x.shape[0]):
        a = x[t] @ W.T + h @ R.T + b  # (B, 4H), gate blocks i, f, g, o
        i, f, g, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), sigmoid(a[:, 3 * H:])
        c_prev, h_prev = c, h
        c = f * c_prev + i * g
        h = o * np.tanh(c)
        steps.append((h_prev, c_prev, i, f, g, o, c))
        ys.append(h)
    return np.stack(ys), h, c, steps


def backward(x, W, R, steps, dy, dh, dc):
    dW, dR, db, dx = np.zeros_like(W), np.zeros_like(R), np.zeros(W.shape[0], W.dtype), np.zeros_like(x)
    for t in reversed(range(x.shape[0])):
        h_prev, c_prev, i, f, g, o, c = steps[t]
        dh = dh + dy[t]
        tc = np.tanh(c)
        dc = dc + dh * o * (1 - tc ** 2)
        da = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g ** 2),
                             dh * tc * o * (1 - o)], axis=1)  # (B, 4H)
        dW += da.T @ x[t]
        dR += da.T @ h_prev
        db += da.sum(axis=0)
        dx[t] = da @ W
        dh, dc = da @ R, dc * f
    return {"x": dx, "h0": dh, "c0": dc, "W": dW, "R": dR, "b": db}


def main(argv):
    flags, (request, response) = set(argv[:-2]), map(Path, argv[-2:])
    spec = json.loads((request / "request.json").read_text())
    arrays = {p.stem: np.load(p) for p in request.glob("*.npy")}
    if "--feature-first" in flags:  # (D, B, T) -> (T, B, D); states (H, B) -> (B, H); and back on the way out
        arrays = {k: v.transpose(2, 1, 0) if k in ("x", "dy") else v.T if k in ("h0", "c0", "dh_T", "dc_T") else v
                  for k, v in arrays.items()}
    if "--no-h0" in flags:
        arrays["h0"] = np.zeros_like(arrays["c0"])
    y, h_T, c_T, steps = forward(arrays["x"], arrays["h0"], arrays["c0"], arrays["W"], arrays["R"], arrays["b"])
    out = {"y": y, "h_T": h_T, "c_T": c_T}
    if spec["gradients"]:
        grads = backward(arrays["x"], arrays["W"], arrays["R"], steps, arrays["dy"], arrays["dh_T"], arrays["dc_T"])
        if "--no-h0" in flags:
            del grads["h0"]
        out.update({f"grad_{k}": v for k, v in grads.items()})
    if "--feature-first" in flags:
        out = {k: v.transpose(2, 1, 0) if v.ndim == 3 else v.T if k in ("h_T", "c_T", "grad_h0", "grad_c0") else v
               for k, v in out.items()}
    for key, value in out.items():
        np.save(response / f"{key}.npy", value.astype(spec["dtype"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
