"""Framework autograd as the backward: a function written in PyTorch (including one built on a
torch.autograd.Function with its own backward), JAX (jax.vjp) or TensorFlow (tf.GradientTape) is
certified with its framework's gradients; a module with float32 buffers is certified in float32 only,
and says so. Each correct form certifies and a planted bug in it is caught."""

from __future__ import annotations

import pytest

from harness.adapt import adapt
from harness.api import certify


def _certify(impl, **kwargs):
    return certify(impl, oracles=["finite-differences"], max_examples=kwargs.pop("max_examples", 4), **kwargs)


def _failing(result):
    return {r.quantity for r in result.records if r.status == "fail"}


# --------------------------------------------------------------------------------------------------
# JAX: a cell function applied over the steps; backward by jax.vjp. (A jax.lax.scan works the same,
# but is traced and compiled again for every case shape, which makes a test slow.)


def jax_lstm(x, h, c, W, R, b, bug=None):
    import jax
    import jax.numpy as jnp

    H = h.shape[1]
    ys = []
    for x_t in x:
        if bug == "stop_gradient":  # truncated BPTT by mistake: no gradient through the recurrence
            h = jax.lax.stop_gradient(h)
        a = x_t @ W.T + h @ R.T + b  # (B, 4H)
        i, f = jax.nn.sigmoid(a[:, :H]), jax.nn.sigmoid(a[:, H:2 * H])
        g, o = jnp.tanh(a[:, 2 * H:3 * H]), jax.nn.sigmoid(a[:, 3 * H:])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        ys.append(h)
    return jnp.stack(ys), h, c


def test_a_jax_function_certifies_in_both_dtypes_and_a_stopped_gradient_is_caught():
    pytest.importorskip("jax", reason="JAX is not installed")
    result = _certify(adapt(forward_fn=jax_lstm, autograd="jax", name="jax-scan"))
    assert result.verdict == "certified", result.details()
    assert result.settings["dtypes"] == ["float64", "float32"]  # float64 through jax_enable_x64
    bad = _certify(adapt(forward_fn=lambda *a: jax_lstm(*a, bug="stop_gradient"), autograd="jax"),
                   dtypes=["float64"], max_examples=3)
    assert bad.verdict == "discrepancies"
    assert {"dR", "dh0"} <= _failing(bad) and "y" not in _failing(bad)


# --------------------------------------------------------------------------------------------------
# TensorFlow: Keras-style kernels (D, 4H) used as x @ kernel, gates i, f, c, o; backward by GradientTape


def tf_lstm(x, h, c, kernel, recurrent_kernel, bias, bug=None):
    import tensorflow as tf

    ys = []
    for t in range(x.shape[0]):
        z = tf.matmul(x[t], kernel) + tf.matmul(h, recurrent_kernel) + bias  # (B, 4H)
        i, f, cc, o = tf.split(z, 4, axis=1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(cc)
        h = tf.sigmoid(o) * tf.tanh(c)
        if bug == "stop_gradient":
            h = tf.stop_gradient(h)
        ys.append(h)
    return tf.stack(ys), h, c


_KERAS = dict(transposed=True, gate_order="ifco", names={"W": "kernel", "R": "recurrent_kernel", "b": "bias"})


def test_a_tensorflow_function_certifies_and_a_stopped_gradient_is_caught():
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
    result = _certify(adapt(forward_fn=tf_lstm, autograd="tf", **_KERAS))
    assert result.verdict == "certified", result.details()
    bad = _certify(adapt(forward_fn=lambda *a: tf_lstm(*a, bug="stop_gradient"), autograd="tf", **_KERAS),
                   dtypes=["float64"], max_examples=3)
    assert bad.verdict == "discrepancies"
    assert "dR" in _failing(bad) and "y" not in _failing(bad)


# --------------------------------------------------------------------------------------------------
# PyTorch: a torch.autograd.Function with a hand-written backward


def _torch_function(bug=None):
    import torch

    class LSTMFunction(torch.autograd.Function):
        """The whole sequence as one Function: forward saves the gates, backward is written by hand."""

        @staticmethod
        def forward(ctx, x, h0, c0, W, R, b):
            H = h0.shape[1]
            h, c, ys, saved = h0, c0, [], []
            for t in range(x.shape[0]):
                a = x[t] @ W.T + h @ R.T + b  # (B, 4H)
                i, f, g, o = a[:, :H].sigmoid(), a[:, H:2 * H].sigmoid(), a[:, 2 * H:3 * H].tanh(), \
                    a[:, 3 * H:].sigmoid()
                saved.append((h, c, i, f, g, o))
                c = f * c + i * g
                h = o * c.tanh()
                saved[-1] += (c,)
                ys.append(h)
            ctx.steps, ctx.x, ctx.W, ctx.R = saved, x, W, R
            return torch.stack(ys), h, c

        @staticmethod
        def backward(ctx, dy, dh, dc):
            x, W, R = ctx.x, ctx.W, ctx.R
            dx, dW, dR = torch.zeros_like(x), torch.zeros_like(W), torch.zeros_like(R)
            db = torch.zeros(W.shape[0], dtype=W.dtype)
            for t in reversed(range(x.shape[0])):
                h_prev, c_prev, i, f, g, o, c = ctx.steps[t]
                dh = dh + dy[t]
                tc = c.tanh()
                dc = dc + dh * o * (1 - tc ** 2)
                df = dc * c_prev * f * (1 if bug == "forget_derivative" else 1 - f)
                da = torch.cat([dc * g * i * (1 - i), df, dc * i * (1 - g ** 2), dh * tc * o * (1 - o)], dim=1)
                dW += da.T @ x[t]
                dR += da.T @ h_prev
                db += da.sum(0)
                dx[t] = da @ W
                dh, dc = da @ R, dc * f
            return dx, dh, dc, dW, dR, db

    return LSTMFunction


def test_a_torch_autograd_function_certifies_and_a_wrong_derivative_in_its_backward_is_caught():
    pytest.importorskip("torch", reason="PyTorch is not installed")
    result = _certify(adapt(forward_fn=_torch_function().apply, autograd="torch", name="lstm-function"))
    assert result.verdict == "certified", result.details()
    bad = _certify(adapt(forward_fn=_torch_function("forget_derivative").apply, autograd="torch"),
                   dtypes=["float64"], max_examples=3)
    assert bad.verdict == "discrepancies"
    assert {"dW", "dx"} <= _failing(bad) and all(r.direction == "backward" for r in bad.records
                                                 if r.status == "fail")


def _buffered_module(bug=None):
    import torch

    class Buffered(torch.nn.Module):
        """An nn.Module that keeps a float32 buffer (a fixed input scaling, not a parameter): it computes
        in float32 only."""

        def __init__(self, D=8, H=4):
            super().__init__()
            self.weight_ih = torch.nn.Parameter(torch.zeros(4 * H, D))
            self.weight_hh = torch.nn.Parameter(torch.zeros(4 * H, H))
            self.bias = torch.nn.Parameter(torch.zeros(4 * H))
            self.register_buffer("scale", torch.ones(1, 1, dtype=torch.float32))

        def forward(self, x, state):
            h, c = state
            H = h.shape[1]
            ys = []
            for t in range(x.shape[0]):
                x_t = (x[t] @ self.scale.expand(x.shape[2], x.shape[2]).diag().diag())  # float32 only
                a = x_t @ self.weight_ih.T + h @ self.weight_hh.T + self.bias
                i, f, g, o = a.split(H, dim=1)
                c = f.sigmoid() * c + i.sigmoid() * (g.sigmoid() if bug == "sigmoid_g" else g.tanh())
                h = o.sigmoid() * c.tanh()
                ys.append(h)
            return torch.stack(ys), (h, c)

    return Buffered()


_BUFFERED = dict(names={"W": "weight_ih", "R": "weight_hh", "b": "bias"})


def test_a_module_with_float32_buffers_is_certified_in_float32_only_and_says_so():
    pytest.importorskip("torch", reason="PyTorch is not installed")
    result = _certify(adapt(_buffered_module(), **_BUFFERED))
    assert result.verdict == "certified", result.details()
    assert result.settings["dtypes"] == ["float32"]
    note = next(n for n in result.notes if n.startswith("dtypes:"))
    assert "given float64 inputs it fails" in note and "certified in float32 only" in note
    bad = _certify(adapt(_buffered_module("sigmoid_g"), **_BUFFERED))
    assert bad.verdict == "discrepancies" and "y" in _failing(bad)
    declared = _certify(adapt(_buffered_module(), dtypes=("float32",), **_BUFFERED))
    assert declared.verdict == "certified" and not any(n.startswith("dtypes:") for n in declared.notes)


@pytest.mark.parametrize("kwargs, message", [
    ({"autograd": "mxnet"}, "autograd: expected one of"),
    ({"autograd": "jax", "backward_fn": lambda *a: None}, "autograd: goes with forward_fn"),
    ({"autograd": "jax", "backward_takes": ("dy", "cache")}, "backward_takes: does not apply with autograd="),
])
def test_autograd_bad_arguments_say_what_to_pass(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapt(forward_fn=jax_lstm, **kwargs)
