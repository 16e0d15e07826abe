"""harness.layouts: round trips, validation, and every conversion checked numerically.

Round trips need only NumPy. The numerical tests run the converted weights through the layout's
own evaluator and compare with the contract's equations (oracles/equations.py): a framework for
the framework layouts (skipped with the reason where it is not installed), and for the NumPy
layouts (bias folded, course exercise, TF1 LayerNorm forget_bias) a small evaluator written here in
that layout's own terms. Gate orders are established by these runs, not by documentation, and a
deliberately wrong conversion is shown to fail each one.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import layouts as L
from harness.cases import CaseSpec, build_case
from harness.structure import Structure
from oracles.equations import lstm_forward
from tests.oracle_support import assert_outputs_close, is_close
from tests.structured import structured_case

ORDERS = ["ifgo", "ifco", "icfo", "ijfo", "iofc", "ifog", "gofi", "oigf"]


def _params(D, H, *, peephole=False, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    p = {
        "W": rng.standard_normal((4 * H, D)),
        "R": rng.standard_normal((4 * H, H)),
        "b": rng.standard_normal(4 * H),
    }
    if peephole:
        p.update({k: rng.standard_normal(H) for k in ("p_i", "p_f", "p_o")})
    return {k: v.astype(dtype) for k, v in p.items()}


def _assert_params_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


sizes = st.tuples(st.integers(1, 6), st.integers(1, 6))
dtypes = st.sampled_from(["float64", "float32"])


# --------------------------------------------------------------------------------------------------
# permute_gates


def test_gate_orders_table():
    assert L.GATE_ORDERS["pytorch"] == "ifgo"
    assert L.GATE_ORDERS["keras"] == "ifco"
    assert L.GATE_ORDERS["block_lstm_v2"] == "ifco"
    assert L.GATE_ORDERS["block_lstm"] == "icfo"
    assert L.GATE_ORDERS["onnx"] == "iofc"
    assert L.GATE_ORDERS["course"] == "ifog"
    for name in L.GATE_ORDERS:
        assert sorted(L.normalize_order(name)) == sorted("ifgo")


@pytest.mark.parametrize("dst", ORDERS)
def test_permute_gates_puts_each_block_where_its_letter_is(dst):
    H = 3
    labels = "ifgo"
    stacked = np.repeat(np.arange(4), H)  # block k holds the number k, the position of labels[k]
    out = L.permute_gates(stacked, "ifgo", dst)
    norm = dst.replace("c", "g").replace("j", "g")
    expected = np.repeat([labels.index(g) for g in norm], H)
    np.testing.assert_array_equal(out, expected)


@given(
    src=st.sampled_from(ORDERS),
    dst=st.sampled_from(ORDERS),
    H=st.integers(1, 4),
    cols=st.integers(1, 3),
    axis=st.sampled_from([0, 1, -1]),
)
def test_permute_gates_round_trips_along_any_axis(src, dst, H, cols, axis):
    rng = np.random.default_rng(H * 10 + cols)
    a = rng.standard_normal((4 * H, cols))
    if axis != 0:
        a = a.T  # the 4H axis is now the last one
    b = L.permute_gates(a, src, dst, axis=axis)
    assert b.shape == a.shape
    np.testing.assert_array_equal(L.permute_gates(b, dst, src, axis=axis), a)
    assert not np.shares_memory(a, b)


def test_permute_gates_composes():
    a = np.arange(8.0)
    np.testing.assert_array_equal(
        L.permute_gates(L.permute_gates(a, "ifgo", "iofc"), "iofc", "icfo"),
        L.permute_gates(a, "ifgo", "icfo"),
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(stacked=np.zeros(8), src="ifgx", dst="ifgo"), "src"),
        (dict(stacked=np.zeros(8), src="ifgo", dst="iffo"), "dst"),
        (dict(stacked=np.zeros(8), src="ifgo", dst="ifg"), "dst"),
        (dict(stacked=np.zeros(8), src=3, dst="ifgo"), "src"),
        (dict(stacked=np.zeros(6), src="ifgo", dst="iofc"), "stacked"),
        (dict(stacked=np.zeros((8, 2)), src="ifgo", dst="iofc", axis=2), "axis"),
        (dict(stacked=np.float64(1.0), src="ifgo", dst="iofc"), "stacked"),
    ],
)
def test_permute_gates_rejects_bad_arguments_by_name(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        L.permute_gates(**kwargs)


# --------------------------------------------------------------------------------------------------
# Round trips (NumPy only)


@given(sizes, dtypes, st.booleans())
def test_torch_round_trip(dh, dtype, _):
    D, H = dh
    p = _params(D, H, dtype=dtype)
    sd = L.to_torch(p)
    assert sd["weight_ih_l0"].shape == (4 * H, D) and sd["weight_hh_l0"].shape == (4 * H, H)
    np.testing.assert_array_equal(sd["bias_hh_l0"], 0)
    _assert_params_equal(L.from_torch(sd), p)


def test_from_torch_sums_the_two_biases():
    p = _params(2, 3)
    sd = L.to_torch(p)
    sd["bias_hh_l0"] = np.full(12, 0.5)
    sd["bias_ih_l0"] = sd["bias_ih_l0"] - 0.5
    np.testing.assert_allclose(L.from_torch(sd)["b"], p["b"], rtol=0, atol=1e-15)


@given(sizes, dtypes)
def test_keras_round_trip(dh, dtype):
    D, H = dh
    p = _params(D, H, dtype=dtype)
    k = L.to_keras(p)
    assert k["kernel"].shape == (D, 4 * H) and k["recurrent_kernel"].shape == (H, 4 * H)
    _assert_params_equal(L.from_keras(**k), p)


@given(sizes, dtypes, st.booleans())
def test_block_lstm_v2_round_trip(dh, dtype, peephole):
    D, H = dh
    p = _params(D, H, dtype=dtype, peephole=peephole)
    d = L.to_block_lstm_v2(p)
    assert d["w"].shape == (D + H, 4 * H)
    assert ("wci" in d) == peephole
    _assert_params_equal(L.from_block_lstm_v2(D=D, **d), p)


@given(sizes, dtypes, st.booleans(), st.sampled_from([0.0, 1.0, -0.75, 2.5]))
def test_block_lstm_round_trip(dh, dtype, peephole, forget_bias):
    D, H = dh
    p = _params(D, H, dtype=dtype, peephole=peephole)
    d = L.to_block_lstm(p, forget_bias=forget_bias)
    back = L.from_block_lstm(D=D, forget_bias=forget_bias, **d)
    assert sorted(back) == sorted(p)
    for k in p:
        assert back[k].dtype == p[k].dtype
        eps = np.finfo(dtype).eps
        # b - fb + fb rounds twice; everything else is moved, not computed.
        np.testing.assert_allclose(back[k], p[k], rtol=0, atol=4 * eps * (1 + abs(forget_bias)) * (k == "b"))


def test_block_lstm_moves_forget_bias_into_the_f_block_only():
    p = _params(2, 3)
    with_fb = L.to_block_lstm(p, forget_bias=1.0)["b"]
    without = L.to_block_lstm(p, forget_bias=0.0)["b"]
    H = 3
    f = L.GATE_ORDERS["block_lstm"].index("f")
    np.testing.assert_allclose(
        without - with_fb, np.repeat([1.0 * (k == f) for k in range(4)], H), atol=1e-15
    )


@given(sizes, dtypes, st.booleans())
def test_onnx_round_trip(dh, dtype, peephole):
    D, H = dh
    p = _params(D, H, dtype=dtype, peephole=peephole)
    d = L.to_onnx(p)
    assert d["W"].shape == (1, 4 * H, D) and d["R"].shape == (1, 4 * H, H) and d["B"].shape == (1, 8 * H)
    np.testing.assert_array_equal(d["B"][0, 4 * H :], 0)
    assert ("P" in d) == peephole
    if peephole:
        assert d["P"].shape == (1, 3 * H)
    _assert_params_equal(L.from_onnx(**d), p)


def test_onnx_peepholes_argument():
    p = _params(2, 3, peephole=True)
    assert "P" not in L.to_onnx(p, peepholes=False)
    np.testing.assert_array_equal(L.to_onnx(p, peepholes=True)["P"], L.to_onnx(p)["P"])
    vanilla = {k: p[k] for k in ("W", "R", "b")}
    given_p = L.to_onnx(vanilla, peepholes={k: p[k] for k in ("p_i", "p_f", "p_o")})["P"][0]
    np.testing.assert_array_equal(given_p, np.concatenate([p["p_i"], p["p_o"], p["p_f"]]))
    with pytest.raises(ValueError, match="^peepholes: "):
        L.to_onnx(vanilla, peepholes=True)


@given(sizes, dtypes, st.booleans(), st.sampled_from(["ifgo", "ifog", "iofc"]))
def test_bias_folded_round_trip(dh, dtype, transposed, order):
    D, H = dh
    p = _params(D, H, dtype=dtype)
    M = L.to_bias_folded(p, transposed=transposed, order=order)
    assert M.shape == ((1 + D + H, 4 * H) if transposed else (4 * H, 1 + D + H))
    _assert_params_equal(L.from_bias_folded(M, D, H, transposed=transposed, order=order), p)


@given(sizes, dtypes)
def test_course_round_trip(dh, dtype):
    D, H = dh
    p = _params(D, H, dtype=dtype)
    c = L.to_course(p)
    assert c["Wx"].shape == (D, 4 * H) and c["Wh"].shape == (H, 4 * H)
    _assert_params_equal(L.from_course(**c), p)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
def test_batch_major_and_time_major_are_inverse(T, B, D):
    x = np.arange(T * B * D, dtype=float).reshape(T, B, D)
    xb = L.batch_major(x)
    assert xb.shape == (B, T, D)
    np.testing.assert_array_equal(xb[1 % B, T - 1], x[T - 1, 1 % B])
    np.testing.assert_array_equal(L.time_major(xb), x)


def test_conversions_return_copies():
    p = _params(2, 3, peephole=True)
    before = {k: v.copy() for k, v in p.items()}
    for out in (L.to_torch(p), L.to_keras(p), L.to_block_lstm_v2(p), L.to_onnx(p), L.to_course(p)):
        for v in out.values():
            v[...] = 7.0
    _assert_params_equal(p, before)


def test_fold_forget_bias_layernorm_adds_to_beta_f_only():
    rng = np.random.default_rng(0)
    p = {
        "W": rng.standard_normal((8, 2)),
        "R": rng.standard_normal((8, 2)),
        "gamma": rng.standard_normal((5, 2)),
        "beta": rng.standard_normal((5, 2)),
    }
    q = L.fold_forget_bias_layernorm(p, 1.0)
    np.testing.assert_array_equal(q["beta"][1], p["beta"][1] + 1.0)
    for row in (0, 2, 3, 4):
        np.testing.assert_array_equal(q["beta"][row], p["beta"][row])
    np.testing.assert_array_equal(q["gamma"], p["gamma"])
    assert q["beta"] is not p["beta"]


@pytest.mark.parametrize("peephole", [False, True])
def test_fold_forget_bias_adds_to_b_f_only(peephole):
    p = _params(3, 2, peephole=peephole)
    q = L.fold_forget_bias(p, 1.0)
    np.testing.assert_array_equal(q["b"][2:4], p["b"][2:4] + 1.0)  # f is the second of four blocks of H=2
    np.testing.assert_array_equal(np.delete(q["b"], [2, 3]), np.delete(p["b"], [2, 3]))
    assert set(q) == set(p) and all(q[k] is not p[k] for k in p)
    for k in set(p) - {"b"}:
        np.testing.assert_array_equal(q[k], p[k])
    back = L.fold_forget_bias(q, -1.0)
    np.testing.assert_allclose(back["b"], p["b"], rtol=0, atol=1e-15)


def test_fold_forget_bias_numerically():
    """A cell that adds forget_bias to the f pre-activation itself computes the standard LSTM on the
    folded params."""
    c = _case("vanilla", seed=4)
    fb, H = 0.75, c.H
    h, cs, hs = c.h0, c.c0, []
    for t in range(c.T):
        a = c.x[t] @ c.params["W"].T + h @ c.params["R"].T + c.params["b"]
        i, f, g, o = (a[:, k * H:(k + 1) * H] for k in range(4))
        cs = _sig(f + fb) * cs + _sig(i) * np.tanh(g)
        h = _sig(o) * np.tanh(cs)
        hs.append(h)
    ours = lstm_forward("vanilla", c.x, c.h0, c.c0, L.fold_forget_bias(c.params, fb))
    assert_outputs_close(*ours, (np.stack(hs), h, cs), case=c, dtype="float64", what="folded params",
                         against="a cell with forget_bias")


@pytest.mark.parametrize("dst", ["ifog", "iofc", "ogif", "block_lstm"])
def test_permute_layernorm_rows_moves_gate_rows_and_keeps_the_cell_row(dst):
    rows = np.arange(15.0).reshape(5, 3)
    out = L.permute_layernorm_rows(rows, "ifgo", dst)
    order = L.normalize_order(dst)
    for k, gate in enumerate(order):
        np.testing.assert_array_equal(out[k], rows["ifgo".index(gate)])
    np.testing.assert_array_equal(out[4], rows[4])
    np.testing.assert_array_equal(L.permute_layernorm_rows(out, dst, "ifgo"), rows)
    assert not np.shares_memory(out, rows)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: L.permute_layernorm_rows(np.zeros((4, 2)), "ifgo", "ifog"), "rows"),
        (lambda: L.fold_forget_bias({"W": np.zeros((8, 2)), "R": np.zeros((8, 2))}, 1.0), "params"),
        (lambda: L.fold_forget_bias(_params(2, 2), float("inf")), "forget_bias"),
        (lambda: L.to_torch({"W": np.zeros((8, 2)), "R": np.zeros((8, 2))}), "params"),
        (
            lambda: L.to_torch({"W": np.zeros((6, 2)), "R": np.zeros((6, 2)), "b": np.zeros(6)}),
            r"params\['W'\]",
        ),
        (
            lambda: L.to_keras({"W": np.zeros((8, 2)), "R": np.zeros((8, 3)), "b": np.zeros(8)}),
            r"params\['R'\]",
        ),
        (
            lambda: L.to_onnx({"W": np.zeros((8, 2)), "R": np.zeros((8, 2)), "b": np.zeros(7)}),
            r"params\['b'\]",
        ),
        (
            lambda: L.to_onnx(
                {"W": np.zeros((8, 2)), "R": np.zeros((8, 2)), "b": np.zeros(8), "p_i": np.zeros(2)}
            ),
            "params",
        ),
        (lambda: L.to_block_lstm(_params(2, 2), forget_bias="1"), "forget_bias"),
        (lambda: L.from_block_lstm_v2(np.zeros((5, 8)), np.zeros(8), 2), "w"),
        (lambda: L.from_block_lstm_v2(np.zeros((4, 8)), np.zeros(8), 0), "D"),
        (lambda: L.from_onnx(np.zeros((4, 2)), np.zeros((1, 4, 1))), "W"),
        (lambda: L.from_onnx(np.zeros((1, 8, 3)), np.zeros((1, 8, 2)), np.zeros((1, 8))), "B"),
        (lambda: L.from_onnx(np.zeros((1, 8, 3)), np.zeros((1, 8, 2)), None, np.zeros((1, 4))), "P"),
        (lambda: L.from_bias_folded(np.zeros((8, 6)), 2, 2), "M"),
        (lambda: L.from_course(np.zeros((3, 8)), np.zeros((3, 8)), np.zeros(8)), "Wh"),
        (lambda: L.from_torch({"weight_ih_l0": np.zeros((8, 3))}), "state_dict"),
        (lambda: L.batch_major(np.zeros(3)), "x"),
        (lambda: L.fold_forget_bias_layernorm({"beta": np.zeros((4, 2))}, 1.0), r"params\['beta'\]"),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        call()


def test_accepts_torch_tensors_that_require_grad():
    torch = pytest.importorskip("torch")
    lstm = torch.nn.LSTM(3, 2)
    p = L.from_torch(lstm.state_dict())
    assert p["W"].shape == (8, 3)
    p2 = L.from_torch(dict(lstm.named_parameters()))  # Parameters require grad
    _assert_params_equal(p, p2)


# --------------------------------------------------------------------------------------------------
# Numerical checks: NumPy layouts, with evaluators written in each layout's own terms


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def _course_forward(x_bm, h0, c0, Wx, Wh, b):
    """The course exercise's LSTM: x (N, T, D) batch-major; a = x Wx + h Wh + b split i, f, o, g."""
    N, T, _ = x_bm.shape
    H = h0.shape[1]
    h, c, hs = h0, c0, []
    for t in range(T):
        a = x_bm[:, t] @ Wx + h @ Wh + b  # (N, 4H)
        i, f, o, g = _sig(a[:, :H]), _sig(a[:, H : 2 * H]), _sig(a[:, 2 * H : 3 * H]), np.tanh(a[:, 3 * H :])
        c = f * c + i * g
        h = o * np.tanh(c)
        hs.append(h)
    return np.stack(hs, axis=1), h, c  # (N, T, H)


def _folded_forward(x, h0, c0, M, transposed, order):
    """A tutorial-style LSTM: one matrix over [1, x, h], gates split in ``order``."""
    T, B, _ = x.shape
    h, c, hs = h0, c0, []
    for t in range(T):
        hin = np.concatenate([np.ones((B, 1)), x[t], h], axis=1)  # (B, 1+D+H)
        a = hin @ M if transposed else (M @ hin.T).T  # (B, 4H)
        gates = dict(zip(order, np.split(a, 4, axis=1), strict=True))
        i, f, o, g = _sig(gates["i"]), _sig(gates["f"]), _sig(gates["o"]), np.tanh(gates["g"])
        c = f * c + i * g
        h = o * np.tanh(c)
        hs.append(h)
    return np.stack(hs), h, c


def _case(variant="vanilla", seed=0, T=4, B=3, D=3, H=5, **kw):
    return build_case(CaseSpec(variant=variant, T=T, B=B, D=D, H=H, seed=seed, **kw))


def _reference(c, params=None):
    """The equations in float64 on the case's own numbers (upcasting is exact), with ``params`` if given."""
    c64 = c.astype("float64")
    p = c64.params if params is None else {k: np.asarray(v, np.float64) for k, v in params.items()}
    return lstm_forward(c.variant, c64.x, c64.h0, c64.c0, p)


def _departs(actual, expected, quantity, c, dtype):
    """Whether ``actual`` is not close to ``expected`` by the harness's value tolerance: a wrong layout caught."""
    return not is_close(actual, expected, quantity=quantity, variant=c.variant, H=c.H, dtype=dtype, kind="values")


SHAPES = [dict(T=4, B=3, D=3, H=5), dict(T=1, B=1, D=1, H=1), dict(T=5, B=2, D=6, H=2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_course_layout_numerically(shape):
    c = _case(**shape)
    ref = lstm_forward("vanilla", c.x, c.h0, c.c0, c.params)
    cp = L.to_course(c.params)
    ys, h, cc = _course_forward(L.batch_major(c.x), c.h0, c.c0, cp["Wx"], cp["Wh"], cp["b"])
    assert_outputs_close(
        L.time_major(ys), h, cc, ref, case=c, dtype="float64", what="course", against="equations"
    )
    # The same weights read in the canonical order i, f, g, o instead: caught.
    Wx = L.permute_gates(cp["Wx"], "ifog", "ifgo", axis=1)
    Wh = L.permute_gates(cp["Wh"], "ifog", "ifgo", axis=1)
    bb = L.permute_gates(cp["b"], "ifog", "ifgo")
    wrong = _course_forward(L.batch_major(c.x), c.h0, c.c0, Wx, Wh, bb)
    assert _departs(wrong[2], ref[2], "c_T", c, "float64")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("order", ["ifgo", "ifog"])
def test_bias_folded_layout_numerically(shape, transposed, order):
    c = _case(**shape)
    ref = lstm_forward("vanilla", c.x, c.h0, c.c0, c.params)
    M = L.to_bias_folded(c.params, transposed=transposed, order=order)
    out = _folded_forward(c.x, c.h0, c.c0, M, transposed, L.normalize_order(order))
    assert_outputs_close(*out, ref, case=c, dtype="float64", what="bias-folded", against="equations")
    # Bias put in the last column instead of the first: caught.
    shifted = np.roll(M, -1, axis=0 if transposed else 1)
    wrong = _folded_forward(c.x, c.h0, c.c0, shifted, transposed, L.normalize_order(order))
    assert _departs(wrong[0], ref[0], "y", c, "float64")


def _tf1_layernorm_forward(x, h0, c0, p, forget_bias, eps):
    """TF1 LayerNormBasicLSTMCell: f = sigmoid(LN_f(a_f) + forget_bias); no bias; cell normalized."""

    def ln(v, k):
        mean = v.mean(axis=-1, keepdims=True)
        var = v.var(axis=-1, keepdims=True)
        return (v - mean) / np.sqrt(var + eps) * p["gamma"][k] + p["beta"][k]

    h, c, hs = h0, c0, []
    for t in range(x.shape[0]):
        a = x[t] @ p["W"].T + h @ p["R"].T
        a_i, a_f, a_g, a_o = np.split(a, 4, axis=1)
        c = ln(c * _sig(ln(a_f, 1) + forget_bias) + _sig(ln(a_i, 0)) * np.tanh(ln(a_g, 2)), 4)
        h = np.tanh(c) * _sig(ln(a_o, 3))
        hs.append(h)
    return np.stack(hs), h, c


@pytest.mark.parametrize("forget_bias", [1.0, -0.5])
def test_layernorm_forget_bias_fold_numerically(forget_bias):
    c = _case("layernorm", seed=3)
    tf1 = _tf1_layernorm_forward(c.x, c.h0, c.c0, c.params, forget_bias, c.ln_eps)
    folded = L.fold_forget_bias_layernorm(c.params, forget_bias)
    ours = lstm_forward("layernorm", c.x, c.h0, c.c0, folded, ln_eps=c.ln_eps)
    assert_outputs_close(*ours, tf1, case=c, dtype="float64", what="folded params", against="TF1 cell")
    # Added to gamma's f row instead of beta's: caught.
    wrong = {**c.params, "gamma": c.params["gamma"].copy()}
    wrong["gamma"][1] += forget_bias
    bad = lstm_forward("layernorm", c.x, c.h0, c.c0, wrong, ln_eps=c.ln_eps)
    assert _departs(bad[0], tf1[0], "y", c, "float64")


# --------------------------------------------------------------------------------------------------
# Numerical checks in the frameworks themselves


@pytest.mark.frameworks
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_layout_numerically(shape):
    torch = pytest.importorskip("torch")
    c = _case(**shape)
    ref = lstm_forward("vanilla", c.x, c.h0, c.c0, c.params)
    lstm = torch.nn.LSTM(c.D, c.H).double()

    def run(state):
        lstm.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        with torch.no_grad():
            y, (h, cc) = lstm(
                torch.from_numpy(c.x), (torch.from_numpy(c.h0)[None], torch.from_numpy(c.c0)[None])
            )
        return y.numpy(), h[0].numpy(), cc[0].numpy()

    assert_outputs_close(
        *run(L.to_torch(c.params)), ref, case=c, dtype="float64", what="torch", against="equations"
    )
    # from_torch on a layer with its own random weights and both biases: the equations reproduce it.
    fresh = torch.nn.LSTM(c.D, c.H).double()
    state = {k: v.numpy().copy() for k, v in fresh.state_dict().items()}
    assert np.abs(state["bias_hh_l0"]).max() > 0
    p = L.from_torch(state)
    assert_outputs_close(
        *run(state),
        lstm_forward("vanilla", c.x, c.h0, c.c0, p),
        case=c,
        dtype="float64",
        what="torch",
        against="equations(from_torch)",
    )
    # A swapped gate order (f and g exchanged) is caught.
    wrong = {
        k: (L.permute_gates(v, "ifgo", "igfo") if v.shape[0] == 4 * c.H else v)
        for k, v in L.to_torch(c.params).items()
    }
    assert _departs(run(wrong)[2], ref[2], "c_T", c, "float64")


def _keras():
    pytest.importorskip("tensorflow")
    from oracles.tf_oracle import _quiet_import

    keras = _quiet_import("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"keras runs on the {keras.backend.backend()} backend")
    return keras


@pytest.mark.frameworks
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_keras_layout_numerically(shape):
    keras = _keras()
    c = _case(**shape)
    ref = lstm_forward("vanilla", c.x, c.h0, c.c0, c.params)
    layer = keras.layers.LSTM(c.H, return_sequences=True, return_state=True, dtype="float64")
    layer.build((None, None, c.D))

    def run(k):
        layer.set_weights([k["kernel"], k["recurrent_kernel"], k["bias"]])
        y, h, cc = layer(L.batch_major(c.x), initial_state=[c.h0, c.c0])
        return L.time_major(np.asarray(y)), np.asarray(h), np.asarray(cc)

    assert_outputs_close(
        *run(L.to_keras(c.params)), ref, case=c, dtype="float64", what="keras", against="equations"
    )
    fresh = keras.layers.LSTM(c.H, return_sequences=True, return_state=True, dtype="float64")
    fresh.build((None, None, c.D))
    k = dict(zip(("kernel", "recurrent_kernel", "bias"), fresh.get_weights(), strict=True))
    k["bias"] = np.random.default_rng(1).standard_normal(4 * c.H)  # Keras initializes most of it to 0
    assert_outputs_close(
        *run(k),
        lstm_forward("vanilla", c.x, c.h0, c.c0, L.from_keras(**k)),
        case=c,
        dtype="float64",
        what="keras",
        against="equations(from_keras)",
    )
    wrong = L.to_keras(
        {
            **c.params,
            "W": L.permute_gates(c.params["W"], "ifgo", "igfo"),
            "b": L.permute_gates(c.params["b"], "ifgo", "igfo"),
        }
    )
    assert _departs(run(wrong)[2], ref[2], "c_T", c, "float64")


def _tf():
    pytest.importorskip("tensorflow")
    from oracles.tf_oracle import _tf as load

    return load()


def _block(tf, version, c, d, *, peephole, forget_bias=0.0):
    f32 = lambda a: tf.constant(np.asarray(a, np.float32))  # noqa: E731
    zeros = np.zeros(c.H)
    args = dict(
        seq_len_max=tf.constant(c.T, tf.int64),
        x=f32(c.x),
        cs_prev=f32(c.c0),
        h_prev=f32(c.h0),
        w=f32(d["w"]),
        wci=f32(d.get("wci", zeros)),
        wcf=f32(d.get("wcf", zeros)),
        wco=f32(d.get("wco", zeros)),
        b=f32(d["b"]),
        use_peephole=peephole,
    )
    if version == 2:
        out = tf.raw_ops.BlockLSTMV2(cell_clip=0.0, **args)
    else:
        out = tf.raw_ops.BlockLSTM(forget_bias=forget_bias, cell_clip=-1.0, **args)
    cs, h = out[1].numpy(), out[6].numpy()
    return h, h[-1], cs[-1]


@pytest.mark.frameworks
@pytest.mark.parametrize("variant", ["vanilla", "peephole"])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_lstm_v2_layout_numerically(variant, shape):
    """BlockLSTMV2 agrees with gate order i, f, c, o, and not with BlockLSTM's i, c, f, o."""
    tf = _tf()
    c = _case(variant, dtype="float32", **shape)
    ref = _reference(c)
    peephole = variant == "peephole"
    d = L.to_block_lstm_v2(c.params)
    assert_outputs_close(
        *_block(tf, 2, c, d, peephole=peephole),
        ref,
        case=c,
        dtype="float32",
        what="BlockLSTMV2",
        against="equations",
    )
    back = L.from_block_lstm_v2(D=c.D, **d)
    assert_outputs_close(
        *_block(tf, 2, c, L.to_block_lstm_v2(back), peephole=peephole),
        ref,
        case=c,
        dtype="float32",
        what="BlockLSTMV2(from_block_lstm_v2)",
        against="equations",
    )
    wrong = L.to_block_lstm(c.params)  # V1's gate order fed to V2
    assert _departs(_block(tf, 2, c, wrong, peephole=peephole)[2], ref[2], "c_T", c, "float32")


@pytest.mark.frameworks
@pytest.mark.parametrize("variant", ["vanilla", "peephole"])
@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_lstm_layout_numerically(variant, forget_bias, shape):
    """BlockLSTM (and TF1 cells) agree with gate order i, c, f, o and a runtime forget_bias."""
    tf = _tf()
    c = _case(variant, dtype="float32", **shape)
    ref = _reference(c)
    peephole = variant == "peephole"
    d = L.to_block_lstm(c.params, forget_bias=forget_bias)
    assert_outputs_close(
        *_block(tf, 1, c, d, peephole=peephole, forget_bias=forget_bias),
        ref,
        case=c,
        dtype="float32",
        what="BlockLSTM",
        against="equations",
    )
    wrong = L.to_block_lstm_v2(c.params)  # V2's order fed to V1
    assert _departs(_block(tf, 1, c, wrong, peephole=peephole, forget_bias=forget_bias)[0], ref[0], "y", c,
                    "float32")
    if forget_bias:
        ignored = L.to_block_lstm(c.params)  # forget_bias not subtracted: caught
        assert _departs(_block(tf, 1, c, ignored, peephole=peephole, forget_bias=forget_bias)[0], ref[0], "y", c,
                        "float32")


def _onnx_run(kind, c, d, dtype):
    from oracles.onnx_oracle import lstm_model

    model = lstm_model(c.D, c.H, dtype, peephole="P" in d)
    feeds = {"X": c.x, "initial_h": c.h0[None], "initial_c": c.c0[None], **d}
    feeds = {k: np.asarray(v, dtype) for k, v in feeds.items()}
    if kind == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
        runner = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    else:
        from onnx.reference import ReferenceEvaluator

        runner = ReferenceEvaluator(model)
    Y, Y_h, Y_c = runner.run(None, feeds)
    return Y[:, 0], Y_h[0], Y_c[0]


@pytest.mark.frameworks
@pytest.mark.parametrize("kind, dtype", [("onnxruntime", "float32"), ("onnx-reference", "float64")])
@pytest.mark.parametrize("variant", ["vanilla", "peephole"])
@pytest.mark.parametrize("shape", SHAPES)
def test_onnx_layout_numerically(kind, dtype, variant, shape):
    """ONNX agrees with gate order i, o, f, c and peepholes P = [P_i, P_o, P_f]."""
    pytest.importorskip("onnx")
    c = _case(variant, dtype=dtype, **shape)
    ref = _reference(c)
    d = L.to_onnx(c.params)
    assert_outputs_close(
        *_onnx_run(kind, c, d, dtype), ref, case=c, dtype=dtype, what=kind, against="equations"
    )
    # from_onnx with a nonzero recurrence bias Rb: b = Wb + Rb.
    rng = np.random.default_rng(5)
    d2 = dict(d, B=rng.standard_normal((1, 8 * c.H)))
    p2 = L.from_onnx(**d2)
    ref2 = _reference(c, p2)
    assert_outputs_close(
        *_onnx_run(kind, c, d2, dtype), ref2, case=c, dtype=dtype, what=kind, against="equations(from_onnx)"
    )
    canon = {
        "W": c.params["W"][None],
        "R": c.params["R"][None],  # canonical order fed to ONNX
        "B": np.concatenate([c.params["b"], np.zeros(4 * c.H)])[None],
    }
    if variant == "peephole":
        canon["P"] = d["P"]
    assert _departs(_onnx_run(kind, c, canon, dtype)[2], ref[2], "c_T", c, dtype)
    if variant == "peephole":
        p_ifo = dict(d, P=np.concatenate([c.params["p_i"], c.params["p_f"], c.params["p_o"]])[None])
        assert _departs(_onnx_run(kind, c, p_ifo, dtype)[2], ref[2], "c_T", c, dtype)


@pytest.mark.parametrize("shape", [(1, 3, 2), (3, 1, 2), (1, 1, 1), (4, 3, 2)])
def test_batch_and_time_major_never_return_views(shape):
    from harness.layouts import batch_major, time_major

    x = np.arange(np.prod(shape), dtype=float).reshape(shape)
    for convert in (batch_major, time_major):
        out = convert(x)
        assert not np.shares_memory(out, x)
        np.testing.assert_array_equal(out, np.swapaxes(x, 0, 1))


# --------------------------------------------------------------------------------------------------
# One matrix (and bias) per gate


@given(sizes, dtypes, st.sampled_from(L.PER_GATE_FORMS), st.booleans(), st.booleans())
def test_per_gate_round_trip(dh, dtype, form, transposed, peephole):
    D, H = dh
    p = _params(D, H, dtype=dtype, peephole=peephole)
    g = L.to_per_gate(p, form=form, transposed=transposed)
    assert set(g) == set(L.per_gate_keys(form)) | ({"p_i", "p_f", "p_o"} if peephole else set())
    inputs = D if form == "separate" else D + H
    assert g["W_f"].shape == ((inputs, H) if transposed else (H, inputs))
    assert g["b_o"].shape == (H,)
    _assert_params_equal(L.from_per_gate(g, D, form=form, transposed=transposed), p)


def test_per_gate_without_bias_passes_layernorm_rows_on():
    c = _case("layernorm", D=2, H=3)
    g = L.to_per_gate(c.params, form="hx")
    assert set(g) == {"W_i", "W_f", "W_g", "W_o", "gamma", "beta"}
    _assert_params_equal(L.from_per_gate(g, 2, form="hx"), c.params)


def test_per_gate_blocks_are_the_canonical_rows_of_each_gate():
    p = _params(2, 3)
    g = L.to_per_gate(p, form="xh")
    np.testing.assert_array_equal(g["W_g"], np.concatenate([p["W"][6:9], p["R"][6:9]], axis=1))
    np.testing.assert_array_equal(g["b_f"], p["b"][3:6])
    s = L.to_per_gate(p, form="separate", transposed=True)
    np.testing.assert_array_equal(s["R_o"], p["R"][9:12].T)


def _per_gate_forward(x, h0, c0, g, form):
    """A TMVA-style (``separate``) or deeplearning.ai-style (``hx``: W_f @ concat(a_prev, x_t)) LSTM,
    one gate at a time, each with its own matrix and bias."""
    def pre(gate, xt, h):  # (B, H): the gate's pre-activation from its own matrix and bias
        if form == "separate":
            return xt @ g[f"W_{gate}"].T + h @ g[f"R_{gate}"].T + g[f"b_{gate}"]
        concat = np.concatenate([h, xt] if form == "hx" else [xt, h], axis=1)  # (B, H+D)
        return concat @ g[f"W_{gate}"].T + g[f"b_{gate}"]

    h, c, hs = h0, c0, []
    for t in range(x.shape[0]):
        i, f, o = (_sig(pre(gate, x[t], h)) for gate in "ifo")
        cand = np.tanh(pre("g", x[t], h))
        c = f * c + i * cand
        h = o * np.tanh(c)
        hs.append(h)
    return np.stack(hs), h, c


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", L.PER_GATE_FORMS)
def test_per_gate_layout_numerically(shape, form):
    c = _case(**shape)
    ref = lstm_forward("vanilla", c.x, c.h0, c.c0, c.params)
    g = L.to_per_gate(c.params, form=form)
    out = _per_gate_forward(c.x, c.h0, c.c0, g, form)
    assert_outputs_close(*out, ref, case=c, dtype="float64", what=f"per-gate {form}", against="equations")
    # The concatenation taken in the other order ([x; h] read as [h; x]), or the f and g matrices
    # swapped: caught.
    if form != "separate" and c.D != c.H:
        other = "xh" if form == "hx" else "hx"
        flipped = {k: (np.roll(v, c.D if other == "xh" else c.H, axis=1) if k.startswith("W_") else v)
                   for k, v in g.items()}
        wrong = _per_gate_forward(c.x, c.h0, c.c0, flipped, form)
        assert _departs(wrong[0], ref[0], "y", c, "float64")
    swapped = dict(g, W_f=g["W_g"], W_g=g["W_f"])
    wrong = _per_gate_forward(c.x, c.h0, c.c0, swapped, form)
    assert _departs(wrong[2], ref[2], "c_T", c, "float64")


@pytest.mark.parametrize("call, argument", [
    (lambda: L.to_per_gate(_params(2, 2), form="hxh"), "form"),
    (lambda: L.from_per_gate(L.to_per_gate(_params(2, 2)), 3), "W_i"),
    (lambda: L.from_per_gate({"W_i": np.zeros((2, 2))}, 2), "arrays"),
    (lambda: L.from_per_gate(L.to_per_gate(_params(2, 2), form="hx"), 0, form="hx"), "D"),
    (lambda: L.from_per_gate(dict(L.to_per_gate(_params(2, 2)), b_g=np.zeros(3)), 2), "b_g"),
])
def test_per_gate_bad_input_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        call()


# --------------------------------------------------------------------------------------------------
# Sequence layouts: any arrangement of T, B, D


_ALL_LAYOUTS = ["".join(p) for p in __import__("itertools").permutations("TBD")]


@pytest.mark.parametrize("layout", _ALL_LAYOUTS)
@given(T=st.integers(1, 4), B=st.integers(1, 3), D=st.integers(1, 5))
def test_sequence_and_state_layouts_round_trip(layout, T, B, D):
    x = np.arange(T * B * D, dtype=np.float32).reshape(T, B, D)
    xs = L.sequence_to(x, layout)
    assert xs.shape == tuple({"T": T, "B": B, "D": D}[axis] for axis in layout)
    assert not np.shares_memory(xs, x) and xs.flags["C_CONTIGUOUS"]
    # Element (t, b, d) sits where the layout names its axes.
    t, b, d = T - 1, B - 1, D - 1
    assert xs[tuple({"T": t, "B": b, "D": d}[axis] for axis in layout)] == x[t, b, d]
    back = L.sequence_from(xs, layout)
    np.testing.assert_array_equal(back, x)
    assert back.dtype == x.dtype and not np.shares_memory(back, xs)
    h = x[0]  # (B, D)
    hs = L.state_to(h, layout)
    assert hs.shape == ((D, B) if layout.index("D") < layout.index("B") else (B, D))
    assert not np.shares_memory(hs, h)
    np.testing.assert_array_equal(L.state_from(hs, layout), h)


def test_named_layouts_are_the_known_ones():
    x = np.random.default_rng(0).normal(size=(5, 2, 3))  # (T, B, D)
    np.testing.assert_array_equal(L.sequence_to(x, "BTD"), L.batch_major(x))
    np.testing.assert_array_equal(L.sequence_to(x, "btd"), L.batch_major(x))
    # deeplearning.ai: x (n_x, m, T_x), so x[:, :, t] is one timestep (n_x, m)
    dbt = L.sequence_to(x, "DBT")
    assert dbt.shape == (3, 2, 5)
    for t in range(5):
        np.testing.assert_array_equal(dbt[:, :, t], x[t].T)
    assert L.SEQUENCE_LAYOUTS == ("TBD", "BTD", "DBT")


@pytest.mark.parametrize("call, message", [
    (lambda: L.sequence_to(np.zeros((2, 3, 4)), "TBH"), r"layout: expected the axes of a sequence in order.*'TBH'"),
    (lambda: L.sequence_to(np.zeros((2, 3, 4)), "TB"), r"layout: expected .*'TBD' or 'BTD' or 'DBT'"),
    (lambda: L.sequence_to(np.zeros((2, 3)), "DBT"), r"x: expected a sequence of shape \(T, B, D\), got shape \(2,"),
    (lambda: L.sequence_from(np.zeros(3), "DBT", name="y"), r"y: expected a sequence of shape \(H, B, T\)"),
    (lambda: L.state_from(np.zeros((2, 3, 4)), "DBT"), r"h0: expected a state of shape \(H, B\)"),
    (lambda: L.state_to(np.zeros(3), "BTD", name="c0"), r"c0: expected a state of shape \(B, H\)"),
])
def test_layout_errors_say_what_to_pass(call, message):
    with pytest.raises(ValueError, match=message):
        call()


class _RecordingNamespace:
    """NumPy's split and concatenate, counting the calls: the array stays in the namespace it came in."""

    def __init__(self):
        self.calls: list[str] = []

    def split(self, *args, **kwargs):
        self.calls.append("split")
        return np.split(*args, **kwargs)

    def concatenate(self, *args, **kwargs):
        self.calls.append("concatenate")
        return np.concatenate(*args, **kwargs)


@pytest.mark.parametrize("axis", [0, 1])
def test_permute_gates_over_an_array_namespace_reorders_there_and_equals_numpy(axis):
    a = np.arange(24.0, dtype=np.float32).reshape(8, 3)
    if axis:
        a = np.ascontiguousarray(a.T)
    xp = _RecordingNamespace()
    got = L.permute_gates(a, "ifgo", "ifog", axis=axis, xp=xp)
    assert xp.calls == ["split", "concatenate"]
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, L.permute_gates(a, "ifgo", "ifog", axis=axis))
    with pytest.raises(ValueError, match="^stacked: expected the length of axis"):
        L.permute_gates(a[:6] if axis == 0 else a[:, :6], "ifgo", "ifog", axis=axis, xp=xp)


# --------------------------------------------------------------------------------------------------
# Whole layers: every cell of a structure, in each framework's naming and stacking

_LAYER_STRUCTURES = [
    Structure(),
    Structure(num_layers=2),
    Structure(bidirectional=True),
    Structure(num_layers=3, bidirectional=True),
    Structure(proj_size=2),
    Structure(num_layers=2, bidirectional=True, proj_size=2),
]
_NO_PROJ = [s for s in _LAYER_STRUCTURES if not s.proj_size]


def _layer_params(structure, variant="vanilla", dtype="float64"):
    return structured_case(structure, variant=variant, dtype=dtype, D=3, H=4).params


def _ids(s):
    return s.describe().replace(" ", "-") or "default"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("structure", _LAYER_STRUCTURES, ids=_ids)
def test_torch_layer_round_trip_and_names(structure, dtype):
    params = _layer_params(structure, dtype=dtype)
    sd = L.to_torch(params, structure)
    back = L.from_torch(sd, structure)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k
    torch = pytest.importorskip("torch")
    module = torch.nn.LSTM(3, 4, num_layers=structure.num_layers, bidirectional=structure.bidirectional,
                           proj_size=structure.proj_size)
    assert set(sd) == set(module.state_dict())  # exactly PyTorch's names
    for k, v in module.state_dict().items():
        assert tuple(v.shape) == sd[k].shape, k
    module.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()})


@pytest.mark.parametrize("structure", _LAYER_STRUCTURES, ids=_ids)
def test_torch_layer_names_each_cell(structure):
    params = _layer_params(structure)
    sd = L.to_torch(params, structure)
    for layer, direction, prefix in structure.cells():
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        assert np.array_equal(sd[f"weight_ih{sfx}"], params[prefix + "W"])
        assert np.array_equal(sd[f"weight_hh{sfx}"], params[prefix + "R"])
        assert np.array_equal(sd[f"bias_ih{sfx}"] + sd[f"bias_hh{sfx}"], params[prefix + "b"])
        if structure.proj_size:
            assert np.array_equal(sd[f"weight_hr{sfx}"], params[prefix + "proj"])


def _swapped_directions(params, structure):
    """A wrong conversion: the forward and reverse cells' arrays exchanged."""
    sd = L.to_torch(params, structure)
    return {k: sd[k.replace("_reverse", "") if k.endswith("_reverse") else k + "_reverse"] for k in sd}


def test_a_conversion_with_directions_swapped_fails_the_round_trip():
    structure = Structure(num_layers=2, bidirectional=True)
    params = _layer_params(structure)
    back = L.from_torch(_swapped_directions(params, structure), structure)
    assert not all(np.array_equal(back[k], params[k]) for k in params)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", ["vanilla", "peephole"])
@pytest.mark.parametrize("structure", _NO_PROJ, ids=_ids)
def test_onnx_layer_round_trip(structure, variant, dtype):
    params = _layer_params(structure, variant, dtype)
    got = {}
    for layer in range(structure.num_layers):
        node = L.to_onnx_layer(params, structure, layer)
        dirs, D_in = structure.dirs, 3 if layer == 0 else structure.dirs * 4
        assert node["W"].shape == (dirs, 16, D_in) and node["R"].shape == (dirs, 16, 4)
        assert node["B"].shape == (dirs, 32) and ("P" in node) == (variant == "peephole")
        for d in range(dirs):  # index d of the num_directions axis is the cell of direction d
            one = L.to_onnx(L.cell_params(params, structure, layer, d))
            assert np.array_equal(node["W"][d], one["W"][0])
        got.update(L.from_onnx_layer(**node, structure=structure, layer=layer))
    assert list(got) == list(params)
    for k in params:
        assert got[k].dtype == params[k].dtype and np.array_equal(got[k], params[k]), k


def test_onnx_layer_output_puts_the_forward_features_first():
    T, dirs, B, H = 3, 2, 4, 5
    Y = np.arange(T * dirs * B * H, dtype=float).reshape(T, dirs, B, H)
    y = L.onnx_layer_output(Y)
    assert y.shape == (T, B, dirs * H)
    assert np.array_equal(y[..., :H], Y[:, 0]) and np.array_equal(y[..., H:], Y[:, 1])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("structure", _NO_PROJ, ids=_ids)
def test_keras_layers_round_trip(structure, dtype):
    params = _layer_params(structure, dtype=dtype)
    weights = L.to_keras_layers(params, structure)
    assert len(weights) == structure.num_layers and all(len(w) == 3 * structure.dirs for w in weights)
    assert weights[0][0].shape == (3, 16)  # kernel (D, 4H)
    if structure.bidirectional:  # forward layer's three, then the backward layer's
        assert np.array_equal(weights[0][3], L.to_keras(L.cell_params(params, structure, 0, 1))["kernel"])
    back = L.from_keras_layers(weights, structure)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


def test_cell_params_of_the_forward_direction_leave_the_reverse_out():
    structure = Structure(num_layers=2, bidirectional=True)
    params = _layer_params(structure)
    fwd = L.cell_params(params, structure, 1, 0)
    assert sorted(fwd) == ["R", "W", "b"] and np.array_equal(fwd["W"], params["l1.W"])
    assert np.array_equal(L.cell_params(params, structure, 1, 1)["W"], params["l1.reverse.W"])
    cells = {(k, d): L.cell_params(params, structure, k, d) for k, d, _ in structure.cells()}
    assert list(L.join_cells(cells, structure)) == list(params)


@pytest.mark.parametrize("call, message", [
    (lambda: L.to_onnx_layer(_layer_params(Structure(proj_size=2)), Structure(proj_size=2), 0), "projection"),
    (lambda: L.to_keras_layers(_layer_params(Structure(proj_size=2)), Structure(proj_size=2)), "projection"),
    (lambda: L.to_onnx_layer(_layer_params(Structure(num_layers=2)), Structure(num_layers=2), 2), "layer:"),
    (lambda: L.cell_params(_layer_params(Structure()), Structure(), 0, 1), "layer, direction"),
    (lambda: L.from_torch({"weight_ih_l0": np.zeros((8, 3))}, Structure(bidirectional=True)), "missing"),
    (lambda: L.to_torch(_layer_params(Structure()), "bidirectional"), "structure:"),
    (lambda: L.from_keras_layers([[np.zeros((3, 8))] * 3], Structure(bidirectional=True)), "weights[0]"),
])
def test_layer_layout_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
