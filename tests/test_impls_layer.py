"""The built-in implementations in every layer structure: stacked layers, both directions, lengths,
projection, CIFG and cell clipping.

Expected values come from elsewhere: ``torch.nn.LSTM`` (layers, directions, projection, packed
sequences), a small torch autograd composite written here from the equations (CIFG and clipping), and
central finite differences in float64 (every structure and variant, including the ones torch has no
module for). The loop reference and the stacked version are cross-checked everywhere, and every
planted layer bug (``tests/plugins/planted_layer.py``) is shown to differ from the loop reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from harness.contract import check_inputs, check_upstream, param_shapes
from harness.structure import Structure
from impls.layernorm import LoopLayerNormLSTM, StackedLayerNormLSTM
from impls.loop import LoopLSTM
from impls.peephole import LoopPeepholeLSTM, StackedPeepholeLSTM
from impls.stacked import StackedLSTM
from tests.plugins import planted_layer
from tests.structured import structured_case

PAIRS = {
    "vanilla": (LoopLSTM, StackedLSTM),
    "peephole": (LoopPeepholeLSTM, StackedPeepholeLSTM),
    "layernorm": (LoopLayerNormLSTM, StackedLayerNormLSTM),
}

STRUCTURES = [
    Structure(num_layers=2),
    Structure(num_layers=3),
    Structure(bidirectional=True),
    Structure(lengths=True),
    Structure(proj_size=2),
    Structure(coupled_input_forget=True),
    Structure(cell_clip=0.7),  # 0.7 is not a float32: the stacked mask must use the bound c holds
    Structure(num_layers=2, bidirectional=True, lengths=True),
    Structure(num_layers=2, bidirectional=True, proj_size=3, lengths=True),
    Structure(bidirectional=True, coupled_input_forget=True, cell_clip=0.6, lengths=True),
    Structure(num_layers=2, bidirectional=True, proj_size=2, coupled_input_forget=True, cell_clip=0.6, lengths=True),
]


def defined(variant: str, structure: Structure) -> bool:
    return not structure.problems(variant)


def run(impl, case):
    """-> (y, h_T, c_T), gradients, of ``impl`` configured for the case's structure."""
    impl = impl.with_structure(case.structure)
    kw = {"lengths": case.lengths} if case.structure.lengths else {}
    y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params, **kw)
    grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    return (np.asarray(y), np.asarray(h_T), np.asarray(c_T)), {k: np.asarray(v) for k, v in grads.items()}


def assert_same(got, want, *, rtol, atol):
    (outs_got, grads_got), (outs_want, grads_want) = got, want
    for name, a, b in zip(("y", "h_T", "c_T"), outs_got, outs_want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
    assert list(grads_got) == list(grads_want)
    for k in grads_want:
        np.testing.assert_allclose(grads_got[k], grads_want[k], rtol=rtol, atol=atol, err_msg="d" + k)


def gradient_keys(case):
    D, H = case.x.shape[2], case.c0.shape[-1]
    return ["x", "h0", "c0", *param_shapes(case.variant, case.structure, D=D, H=H)]


# --- loop against stacked -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("variant", list(PAIRS))
def test_loop_and_stacked_agree_in_every_structure(variant, structure, dtype):
    if not defined(variant, structure):
        pytest.skip(f"{variant} with {structure.describe()} is not defined")
    case = structured_case(structure, variant=variant, dtype=dtype, T=5, B=4, D=3, H=4, seed=7)
    loop_cls, stacked_cls = PAIRS[variant]
    got, want = run(stacked_cls(), case), run(loop_cls(), case)
    assert list(want[1]) == gradient_keys(case)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=2e-4, atol=2e-5)
    assert_same(got, want, **tol)
    assert all(a.dtype == np.dtype(dtype) for a in (*got[0], *got[1].values()))


def test_default_structure_keeps_names_shapes_and_the_stacked_cache():
    case = structured_case(Structure(), T=3, B=2)
    for cls in (LoopLSTM, StackedLSTM):
        impl = cls()
        assert impl.structure.is_default
        (y, h_T, c_T), grads = run(impl, case)
        assert y.shape == (3, 2, 4) and h_T.shape == (2, 4) and list(grads) == ["x", "h0", "c0", "W", "R", "b"]
    *_, cache = StackedLSTM().forward(case.x, case.h0, case.c0, case.params)
    assert type(cache).__name__ == "StackedCache"  # the default path is the stacked algorithm itself
    # Every option runs in the stacked algorithm itself, not in a loop behind it.
    s = Structure(bidirectional=True, proj_size=2, coupled_input_forget=True, cell_clip=0.7, lengths=True)
    case = structured_case(s, T=3, B=2)
    *_, cache = StackedLSTM().with_structure(s).forward(case.x, case.h0, case.c0, case.params, lengths=case.lengths)
    assert {type(sub).__name__ for d in cache.cells for _, _, sub in d.groups} == {"StackedCache"}


def test_configuration_is_keywords_attributes_and_with_structure():
    impl = StackedPeepholeLSTM(num_layers=2, bidirectional=True, cell_clip=1.5, accepts_lengths=True)
    assert (impl.num_layers, impl.bidirectional, impl.proj_size, impl.coupled_input_forget, impl.cell_clip,
            impl.accepts_lengths) == (2, True, 0, False, 1.5, True)
    s = Structure(num_layers=3, proj_size=2, coupled_input_forget=True)
    other = impl.with_structure(s)
    assert type(other) is StackedPeepholeLSTM and other.structure == s and impl.num_layers == 2
    assert StackedPeepholeLSTM().with_structure(s).structure == s
    ln = LoopLayerNormLSTM()
    ln.ln_eps = 1e-3
    assert ln.with_structure(Structure(num_layers=2)).ln_eps == 1e-3  # other settings are kept


@pytest.mark.parametrize("cls", [LoopLayerNormLSTM, StackedLayerNormLSTM])
@pytest.mark.parametrize("option", [dict(proj_size=2), dict(cell_clip=1.0)])
def test_layernorm_with_projection_or_clip_is_refused(cls, option):
    with pytest.raises(ValueError, match=next(iter(option))):
        cls(**option)
    with pytest.raises(ValueError, match="not defined for the layernorm variant"):
        cls().with_structure(Structure(**option))


def test_a_gpu_version_in_its_default_structure_refuses_layered_inputs():
    """Configured by with_structure like the others (tests/test_gpu.py runs its layer loops); an instance in
    the default structure takes (B, H) states only. Creating one needs no CuPy."""
    from impls.gpu.cells import CupyLSTM

    case = structured_case(Structure(num_layers=2), T=3, B=2)
    with pytest.raises(ValueError, match=r"h0: expected shape \(B, H\)"):
        CupyLSTM().forward(case.x, case.h0, case.c0, case.params)


# --- against torch.nn.LSTM -------------------------------------------------------------------------


def torch_lstm(case):
    """y, h_T, c_T and the gradients of ``torch.nn.LSTM`` with the case's weights, by autograd."""
    torch = pytest.importorskip("torch", reason="the torch.nn.LSTM check needs PyTorch")
    s = case.structure
    T, B, D = case.x.shape
    H = case.c0.shape[-1]
    lstm = torch.nn.LSTM(D, H, num_layers=s.num_layers, bidirectional=s.bidirectional, proj_size=s.proj_size)
    lstm = lstm.double()
    ours = {}  # torch parameter name -> our name
    for layer, direction, prefix in s.cells():
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        ours.update({f"weight_ih{suffix}": prefix + "W", f"weight_hh{suffix}": prefix + "R",
                     f"bias_ih{suffix}": prefix + "b", f"bias_hh{suffix}": None})
        if s.proj_size:
            ours[f"weight_hr{suffix}"] = prefix + "proj"
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            p.copy_(torch.zeros_like(p) if ours[name] is None else torch.from_numpy(case.params[ours[name]]))
    n = s.num_layers * s.dirs
    x = torch.from_numpy(case.x).requires_grad_()
    h0 = torch.from_numpy(case.h0).reshape(n, B, -1).clone().requires_grad_()
    c0 = torch.from_numpy(case.c0).reshape(n, B, H).clone().requires_grad_()
    if case.lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.from_numpy(case.lengths), enforce_sorted=False)
        out, (h_T, c_T) = lstm(packed, (h0, c0))
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    else:
        y, (h_T, c_T) = lstm(x, (h0, c0))
    h_T, c_T = h_T.reshape(case.h0.shape), c_T.reshape(case.c0.shape)
    loss = ((y * torch.from_numpy(case.dy)).sum() + (h_T * torch.from_numpy(case.dh_T)).sum()
            + (c_T * torch.from_numpy(case.dc_T)).sum())
    loss.backward()
    grads = {"x": x.grad.numpy(), "h0": h0.grad.reshape(case.h0.shape).numpy(),
             "c0": c0.grad.reshape(case.c0.shape).numpy()}
    for name, p in lstm.named_parameters():
        if ours[name] is not None:
            grads[ours[name]] = p.grad.numpy()
    grads = {k: grads[k] for k in gradient_keys(case)}
    return (y.detach().numpy(), h_T.detach().numpy(), c_T.detach().numpy()), grads


TORCH_STRUCTURES = [
    Structure(num_layers=2),
    Structure(num_layers=3),
    Structure(bidirectional=True),
    Structure(proj_size=2),
    Structure(lengths=True),
    Structure(bidirectional=True, lengths=True),
    Structure(num_layers=2, bidirectional=True, proj_size=3),
    Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True),
]


@pytest.mark.parametrize("structure", TORCH_STRUCTURES, ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("cls", [LoopLSTM, StackedLSTM])
def test_matches_torch_nn_lstm(cls, structure):
    lengths = [3, 6, 1, 4, 6] if structure.lengths else None  # unsorted, with T and 1 among them
    case = structured_case(structure, T=6, B=5, D=3, H=4, seed=11, lengths=lengths)
    assert_same(run(cls(), case), torch_lstm(case), rtol=1e-9, atol=1e-11)


# --- CIFG and clipping: a torch composite from the equations, and finite differences ----------------


def torch_composite(case):
    """One layer, one direction, vanilla or peephole, with CIFG and clipping, by torch autograd."""
    torch = pytest.importorskip("torch", reason="the composite check needs PyTorch")
    s = case.structure
    assert not s.layered and not s.proj_size and not s.lengths
    p = {k: torch.from_numpy(v).requires_grad_() for k, v in case.params.items()}
    x = torch.from_numpy(case.x).requires_grad_()
    h0, c0 = (torch.from_numpy(a).requires_grad_() for a in (case.h0, case.c0))
    H = case.c0.shape[-1]
    peep = case.variant == "peephole"
    h, c, ys = h0, c0, []
    for t in range(x.shape[0]):
        a = x[t] @ p["W"].T + h @ p["R"].T + p["b"]
        a_i, a_f, a_g, a_o = (a[:, k * H:(k + 1) * H] for k in range(4))
        i = torch.sigmoid(a_i + (p["p_i"] * c if peep else 0))
        f = 1 - i if s.coupled_input_forget else torch.sigmoid(a_f + (p["p_f"] * c if peep else 0))
        c = f * c + i * torch.tanh(a_g)
        if s.cell_clip is not None:
            c = torch.clamp(c, -s.cell_clip, s.cell_clip)
        o = torch.sigmoid(a_o + (p["p_o"] * c if peep else 0))
        h = o * torch.tanh(c)
        ys.append(h)
    y = torch.stack(ys)
    loss = ((y * torch.from_numpy(case.dy)).sum() + (h * torch.from_numpy(case.dh_T)).sum()
            + (c * torch.from_numpy(case.dc_T)).sum())
    loss.backward()
    grads = {"x": x.grad, "h0": h0.grad, "c0": c0.grad, **{k: v.grad for k, v in p.items()}}
    # A parameter the loss does not reach (CIFG's p_f) has no autograd gradient: it is zero.
    grads = {k: np.zeros(case.params[k].shape) if v is None else v.numpy() for k, v in grads.items()}
    return (y.detach().numpy(), h.detach().numpy(), c.detach().numpy()), {k: grads[k] for k in gradient_keys(case)}


def clipped_fraction(case):
    """The fraction of the case's cell values that the clip bounds (so that a test knows it acts)."""
    impl = PAIRS[case.variant][0]().with_structure(case.structure)
    *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
    steps = cache.cells[0].groups[0][2].steps  # the one direction's one group (no lengths)
    return np.mean([np.mean(s.inside == 0) for s in steps])


@pytest.mark.parametrize("structure", [Structure(coupled_input_forget=True), Structure(cell_clip=0.5),
                                       Structure(coupled_input_forget=True, cell_clip=0.5)],
                         ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("variant", ["vanilla", "peephole"])
def test_cifg_and_clip_match_a_torch_composite(variant, structure):
    case = structured_case(structure, variant=variant, T=6, B=4, D=3, H=5, seed=3, weight_scale=2.0)
    if structure.cell_clip is not None:
        assert clipped_fraction(case) > 0.1  # the clip really acts on this case
    want = torch_composite(case)
    for loop_cls, stacked_cls in [PAIRS[variant]]:
        assert_same(run(loop_cls(), case), want, rtol=1e-9, atol=1e-11)
        assert_same(run(stacked_cls(), case), want, rtol=1e-9, atol=1e-11)
    grads = want[1]
    if structure.coupled_input_forget:
        H = case.c0.shape[-1]
        for k in ("W", "R", "b"):
            assert not grads[k][H:2 * H].any()  # the forget block is unused


def fd_directional(impl, case, *, n_dirs=3, eps=1e-6, seed=0):
    """(analytic, central difference) of d<loss>/d(inputs) along random directions, in float64.

    loss = <y, dy> + <h_T, dh_T> + <c_T, dc_T>; the directions perturb x, h0, c0 and every parameter.
    """
    impl = impl.with_structure(case.structure)
    kw = {"lengths": case.lengths} if case.structure.lengths else {}
    inputs = {"x": case.x, "h0": case.h0, "c0": case.c0, **case.params}

    def loss(values):
        params = {k: values[k] for k in case.params}
        y, h, c, _ = impl.forward(values["x"], values["h0"], values["c0"], params, **kw)
        return float((y * case.dy).sum() + (h * case.dh_T).sum() + (c * case.dc_T).sum())

    *_, cache = impl.forward(case.x, case.h0, case.c0, case.params, **kw)
    grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_dirs):
        d = {k: rng.standard_normal(v.shape) for k, v in inputs.items()}
        plus = loss({k: v + eps * d[k] for k, v in inputs.items()})
        minus = loss({k: v - eps * d[k] for k, v in inputs.items()})
        out.append((sum(float((grads[k] * d[k]).sum()) for k in inputs), (plus - minus) / (2 * eps)))
    return out


FD_STRUCTURES = [
    Structure(num_layers=2, bidirectional=True, lengths=True),
    Structure(bidirectional=True, proj_size=2, coupled_input_forget=True, lengths=True),
    Structure(num_layers=2, coupled_input_forget=True, cell_clip=0.7),
    Structure(num_layers=2, bidirectional=True, proj_size=2, coupled_input_forget=True, cell_clip=0.7, lengths=True),
]


@pytest.mark.parametrize("structure", FD_STRUCTURES, ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("variant", list(PAIRS))
def test_gradients_match_finite_differences(variant, structure):
    if not defined(variant, structure):
        structure = structure.replace(proj_size=0, cell_clip=None)  # what layernorm defines of it
    case = structured_case(structure, variant=variant, T=4, B=3, D=2, H=3, seed=5)
    for cls in PAIRS[variant]:
        for analytic, numeric in fd_directional(cls(), case):
            assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


# --- lengths: padded steps do not exist ---------------------------------------------------------------


@pytest.mark.parametrize("variant", list(PAIRS))
@pytest.mark.parametrize("cls_index", [0, 1], ids=["loop", "stacked"])
def test_padded_steps_have_no_effect(variant, cls_index):
    structure = Structure(num_layers=2, bidirectional=True, lengths=True, coupled_input_forget=True)
    lengths = [2, 5, 1, 3]
    case = structured_case(structure, variant=variant, T=5, B=4, seed=2, lengths=lengths)
    impl = PAIRS[variant][cls_index]()
    (y, h_T, c_T), grads = run(impl, case)
    padded = np.arange(5)[:, None] >= np.asarray(lengths)[None, :]  # (T, B)
    assert not y[padded].any()  # y is 0 at padded steps
    assert not grads["x"][padded].any()  # dx is 0 there
    # Anything at padded steps, in x or dy, changes nothing.
    rng = np.random.default_rng(0)
    noisy = dataclasses.replace(case, x=np.where(padded[:, :, None], rng.standard_normal(case.x.shape), case.x),
                         dy=np.where(padded[:, :, None], rng.standard_normal(case.dy.shape), case.dy))
    (y2, h2, c2), grads2 = run(impl, noisy)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(h2, h_T)
    np.testing.assert_array_equal(c2, c_T)
    for k in grads:
        np.testing.assert_array_equal(grads2[k], grads[k], err_msg=k)
    # A row alone, truncated to its length, gives the same results as in the padded batch.
    b = 0
    alone = structured_case(structure.replace(lengths=False), variant=variant, T=lengths[b], B=1)
    alone = dataclasses.replace(alone, x=case.x[: lengths[b], b:b + 1], h0=case.h0[:, b:b + 1], c0=case.c0[:, b:b + 1],
                          params=case.params, dy=case.dy[: lengths[b], b:b + 1], dh_T=case.dh_T[:, b:b + 1],
                          dc_T=case.dc_T[:, b:b + 1])
    (y1, h1, c1), _ = run(impl, alone)
    np.testing.assert_allclose(y1[:, 0], y[: lengths[b], b], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h1[:, 0], h_T[:, b], rtol=1e-12, atol=1e-14)


def test_reverse_direction_starts_at_the_last_valid_step_and_ends_after_t0():
    structure = Structure(bidirectional=True, lengths=True)
    case = structured_case(structure, T=5, B=2, seed=4, lengths=[3, 5])
    (y, h_T, c_T), _ = run(LoopLSTM(), case)
    H = 4
    # The reverse direction of row 0 is a forward LSTM over x[2], x[1], x[0].
    p = {k.split(".", 2)[-1]: v for k, v in case.params.items() if k.startswith("l0.reverse.")}
    y_r, h_r, c_r, _ = LoopLSTM().forward(case.x[2::-1, :1], case.h0[1, :1], case.c0[1, :1], p)
    np.testing.assert_allclose(y[2::-1, 0, H:], y_r[:, 0], rtol=1e-12)
    np.testing.assert_allclose(h_T[1, 0], h_r[0], rtol=1e-12)  # its state after t = 0
    np.testing.assert_allclose(h_T[1, 0], y[0, 0, H:], rtol=1e-12)


# --- validation ------------------------------------------------------------------------------------------


def test_check_inputs_validates_structured_inputs():
    s = Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)
    case = structured_case(s, T=4, B=3, D=3, H=5)
    args = (case.x, case.h0, case.c0, case.params)
    assert check_inputs("vanilla", *args, structure=s, lengths=case.lengths) == (4, 3, 3, 5)
    bad = [
        ((case.x, case.h0[:2], case.c0, case.params), {}, r"h0: expected shape \(4, 3, 2\)"),
        ((case.x, case.h0, case.c0[..., :4], case.params), {},
         r"params\['l0.W'\]: expected shape \(16, 3\), got \(20, 3\)"),
        ((case.x, case.h0, case.c0[0], case.params), {}, r"c0: expected shape \(L \* dirs, B, H\)"),
        ((case.x, case.h0, case.c0, {k: v for k, v in case.params.items() if k != "l1.reverse.proj"}), {},
         r"missing \['l1.reverse.proj'\]"),
        ((case.x, case.h0, case.c0, {**case.params, "l1.W": np.zeros((20, 3))}), {},
         r"params\['l1.W'\]: expected shape \(20, 4\), got \(20, 3\)"),
        (args, {"lengths": np.array([1, 5, 2])}, r"lengths: expected every value in 1..T = 1..4, got lengths\[1\] = 5"),
        (args, {"lengths": np.array([0, 1, 2])}, r"lengths\[0\] = 0"),
        (args, {"lengths": np.array([1, 2])}, r"lengths: expected shape \(3,\)"),
        (args, {"lengths": np.array([1.0, 2.0, 3.0])}, "lengths: expected integers"),
    ]
    for a, kw, message in bad:
        kw = {"lengths": case.lengths, **kw}
        with pytest.raises(ValueError, match=message):
            check_inputs("vanilla", *a, structure=s, **kw)
    with pytest.raises(ValueError, match="lengths: expected None"):
        check_inputs("vanilla", *args, structure=s.replace(lengths=False), lengths=case.lengths)
    with pytest.raises(ValueError, match="proj_size: a projection is not defined for the layernorm"):
        check_inputs("layernorm", *args, structure=s)


def test_check_upstream_validates_structured_shapes():
    s = Structure(num_layers=2, bidirectional=True, proj_size=2)
    check_upstream(np.zeros((4, 3, 4)), np.zeros((4, 3, 2)), np.zeros((4, 3, 5)), T=4, B=3, H=5, structure=s)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 3, 4\).*got \(4, 3, 5\)"):
        check_upstream(np.zeros((4, 3, 5)), np.zeros((4, 3, 2)), np.zeros((4, 3, 5)), T=4, B=3, H=5, structure=s)
    with pytest.raises(ValueError, match=r"dh_T: expected shape \(4, 3, 2\)"):
        check_upstream(np.zeros((4, 3, 4)), np.zeros((3, 2)), np.zeros((4, 3, 5)), T=4, B=3, H=5, structure=s)


def test_lengths_refused_by_an_implementation_that_does_not_accept_them():
    case = structured_case(Structure(lengths=True), T=3, B=2)
    with pytest.raises(ValueError, match="lengths: expected None"):
        LoopLSTM().forward(case.x, case.h0, case.c0, case.params, lengths=case.lengths)


# --- planted layer bugs ---------------------------------------------------------------------------------

#: The case each planted bug is shown on: its structure, with lengths below T where it has lengths.
PLANTED_LENGTHS = [2, 5, 3, 1]


@pytest.mark.parametrize("planted", planted_layer.PLANTED, ids=lambda c: c.__name__)
def test_each_planted_layer_bug_differs_from_the_loop_reference(planted):
    bug = planted()
    structure = Structure(num_layers=bug.num_layers, bidirectional=bug.bidirectional, proj_size=bug.proj_size,
                          coupled_input_forget=bug.coupled_input_forget, cell_clip=bug.cell_clip,
                          lengths=bug.accepts_lengths)
    assert structure == planted.structure and bug.variant == "vanilla" and not hasattr(bug, "with_structure")
    case = structured_case(structure, T=5, B=4, D=3, H=4, seed=1, weight_scale=2.0,
                           lengths=PLANTED_LENGTHS if structure.lengths else None)
    kw = {"lengths": case.lengths} if structure.lengths else {}
    y, h_T, c_T, cache = bug.forward(case.x, case.h0, case.c0, case.params, **kw)
    grads = bug.backward(case.dy, case.dh_T, case.dc_T, cache)
    (y0, h0, c0), grads0 = run(LoopLSTM(), case)
    assert list(grads) == list(grads0)
    differs = {name for name, a, b in (("y", y, y0), ("h_T", h_T, h0), ("c_T", c_T, c0))
               if not np.allclose(a, b, rtol=1e-6, atol=1e-8)}
    differs |= {"d" + k for k in grads0 if not np.allclose(grads[k], grads0[k], rtol=1e-6, atol=1e-8)}
    expected = {
        "ReverseReadsPadding": {"y", "h_T"},
        "PaddedStepsUpdateState": {"h_T", "c_T"},
        # rows 0 and 2 get lengths 5 and 2 for their 2 and 3: their outputs, final states and gradients move
        "LengthsAssumedSorted": {"y", "h_T", "c_T", "dx", "dW"},
        "ReverseFinalAtWrongEnd": {"h_T"},
        "Layer1FedFinalState": {"y", "h_T"},
        "ProjectionGradientMissing": {"dproj"},
        "GradientThroughClippedCells": {"dW"},
        "CIFGSeparateForgetGate": {"y", "dW"},
        "DirectionParametersSwapped": {"y", "h_T", "c_T", "dl0.W"},
        "ReverseFeaturesFirst": {"y", "h_T", "c_T"},  # layer 1 reads the swapped halves too
        "StatesDirectionMajor": {"y", "h_T", "c_T", "dh0"},
        "FinalStatesDirectionsSwapped": {"h_T", "c_T"},
    }[planted.__name__]
    assert expected <= differs, differs


def test_a_default_builtin_has_no_state_of_its_own_and_subclasses_that_replace_the_contract_are_not_configurable():
    """A default instance is loadable again by its class (parallel units, replay commands); a configured one
    keeps its structure. A subclass that replaces forward or backward is certified in its declared
    structure (its methods may not take lengths); one that changes a cell stays configurable."""
    from harness.contract import validate
    from harness.session import guess_target
    from impls.loop import LoopLSTM

    assert vars(LoopLSTM()) == {} and guess_target(LoopLSTM()) == "impls.loop:LoopLSTM"
    configured = LoopLSTM().with_structure(Structure(num_layers=2))
    assert configured.num_layers == 2 and LoopLSTM.num_layers == 1 and guess_target(configured) is None
    assert vars(configured.with_structure(Structure())) == {}

    class OwnForward(LoopLSTM):
        def forward(self, x, h0, c0, params):
            return super().forward(x, h0, c0, params)

    class OwnCell(LoopLSTM):
        def cell_forward(self, *args):
            return super().cell_forward(*args)

    class SaysSo(OwnForward):
        configurable = True

    assert validate(LoopLSTM()).configurable
    assert not validate(OwnForward()).configurable
    assert validate(OwnCell()).configurable
    assert validate(SaysSo()).configurable


# --- An implementation that computes some of the features -----------------------------------------


class _StacksOnly(StackedLSTM):
    name = "stacks-only"
    structures = ("layers", "bidirectional")
    structures_note = "its kernels have no masking"


def test_an_implementation_declares_the_features_it_computes_and_gets_no_other():
    from harness.contract import ContractError, validate
    from harness.runner import RunSettings, run_checks
    from harness.subject import InProcessSubject
    from oracles.finite_diff import FiniteDifferenceOracle

    impl = _StacksOnly()
    info = validate(impl)
    assert info.configurable and info.structures == frozenset({"layers", "bidirectional"})
    assert validate(StackedLSTM()).structures == frozenset(("layers", "bidirectional", "lengths", "proj", "cifg",
                                                             "clip"))
    with pytest.raises(ValueError, match="does not compute lengths, proj: its kernels have no masking"):
        impl.with_structure(Structure(lengths=True, proj_size=2))
    stats: dict = {}
    records = run_checks(InProcessSubject(impl, info), [FiniteDifferenceOracle()], dtype="float64",
                         run=RunSettings(max_examples=45), stats=stats)
    assert all(r.ok for r in records)
    assert stats["features"] and set(stats["features"]) <= {"layers", "bidirectional"}, stats["features"]

    class Wrong(_StacksOnly):
        structures = ("layers", "wings")

    with pytest.raises(ContractError, match=r"structures: expected the structure features it computes, a subset "
                                            r"of .*got \('layers', 'wings'\)"):
        validate(Wrong())


class _WrongWhenStacked(StackedLSTM):
    name = "wrong-when-stacked"
    structures = ("layers",)

    def sequence_forward(self, x, h0, c0, params, dtype):
        y, h_T, c_T, cache = super().sequence_forward(x, h0, c0, params, dtype)
        return (y * 1.5 if self.num_layers > 1 else y), h_T, c_T, cache


def test_the_case_that_failed_first_is_counted_by_its_structure(monkeypatch):
    """Every stacked case fails, and the search stops at the first failure: the count by feature still
    includes that case, as the count of cases does."""
    from harness import runner
    from harness.contract import validate
    from harness.runner import RunSettings, run_checks
    from harness.subject import InProcessSubject
    from oracles.finite_diff import FiniteDifferenceOracle

    monkeypatch.setattr(runner, "MAX_SEARCHES", 1)
    monkeypatch.setattr(runner, "MIN_FEATURE_CASES", 0)  # the drawn search alone: no search for a short feature
    impl = _WrongWhenStacked()
    stats: dict = {}
    records = run_checks(InProcessSubject(impl, validate(impl)), [FiniteDifferenceOracle()], dtype="float64",
                         run=RunSettings(max_examples=60), stats=stats)
    assert any(r.status == "fail" and r.quantity == "y" for r in records)
    assert stats["features"] == {"layers": 1}, stats


def test_a_subclass_with_its_own_cell_gets_no_cifg_or_clipped_cases_unless_it_says_so():
    """CIFG and clipping are options the built-in cells compute: a user's subclass that replaces the cell
    (``cell_forward``/``cell_backward`` of the loop, ``cell`` of the stacked version) would be told its
    correct cell fails on cases with them. It keeps layers, directions, lengths and projections."""
    from harness.contract import validate
    from impls.stacked import VanillaCell

    class MyLoopCell(LoopLSTM):
        name = "my-loop-cell"

        def cell_forward(self, x_t, h_prev, c_prev, weights):
            return super().cell_forward(x_t, h_prev, c_prev, weights)

    class MyStackedCell(StackedLSTM):
        name = "my-stacked-cell"
        cell = VanillaCell()

    class Declared(MyLoopCell):
        structures = ("layers", "cifg")

    for cls in (MyLoopCell, MyStackedCell):
        info = validate(cls())
        assert info.configurable and info.structures == frozenset({"layers", "bidirectional", "lengths", "proj"})
        with pytest.raises(ValueError, match=f"does not compute cifg: {cls.__name__} has a cell of its own"):
            cls().with_structure(Structure(coupled_input_forget=True))
        assert cls().with_structure(Structure(num_layers=2, lengths=True)).num_layers == 2
    assert validate(Declared()).structures == frozenset({"layers", "cifg"})
    for builtin in (LoopLSTM, StackedLSTM, LoopPeepholeLSTM, StackedPeepholeLSTM, LoopLayerNormLSTM,
                    StackedLayerNormLSTM):
        assert len(validate(builtin()).structures) == 6, builtin
