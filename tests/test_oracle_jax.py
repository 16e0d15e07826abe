"""The JAX oracle's shape buckets: exact, agreeing with finite differences, and compiled a bounded number of times.

The bucketed path zero-pads each case up to a shape bucket and runs one compiled function per
(variant, bucket) (see :mod:`oracles.jax_oracle`). Padding must change nothing but the order of
floating-point summation, so the bucketed results are compared with the eager path on the exact
shapes (``bucketed=False``) at 1e-12 of the largest element, times a LayerNorm case's condition number
(:func:`harness.conditioning.condition_number`, which amplifies any change of rounding, a summation
order's too). The worst measured difference was 5e-15 over 60 Hypothesis cases of every variant
(T <= 10, B <= 4, D, H <= 16) and 3e-14 on a peephole case with large weights and peepholes at T=16,
while a padded unit leaking into a real one, a misaligned gate block or a wrong LayerNorm count moves
results by 1e-3 or more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from harness.cases import CaseSpec, build_case, cases
from harness.conditioning import condition_number
from oracles import jax_oracle
from oracles.finite_diff import FiniteDifferenceOracle
from oracles.jax_oracle import JaxCompositeOracle, bucket, bucket_sizes, compilations
from tests.oracle_support import assert_references_agree, require

pytestmark = pytest.mark.frameworks

VARIANTS = ("vanilla", "peephole", "layernorm")
#: Bucketed vs eager, relative to max(1, max |eager|) of each quantity (see the module docstring).
EXACT = 1e-12

_FAST = JaxCompositeOracle()
_EAGER = JaxCompositeOracle(bucketed=False)
_FD = FiniteDifferenceOracle()

few = settings(max_examples=min(settings.default.max_examples, 8), deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _jax_available():
    require(_FAST)


@pytest.fixture
def small_floors(monkeypatch):
    """Buckets of 4 and 8 (B: 2 and 4), so that small cases cross bucket boundaries and are padded by
    odd amounts, with few enough buckets to keep the compilations cheap."""
    for dim, floor in {"T": 4, "B": 2, "D": 4, "H": 4}.items():
        monkeypatch.setitem(jax_oracle.FLOORS, dim, floor)


def _assert_same(case, fast, eager):
    # A LayerNorm row amplifies a change of summation order by its condition number, as it does any
    # rounding (harness.conditioning); 1 for the other variants and for well-conditioned rows. Capped, so
    # that even a degenerate row leaves a padding leak (1e-3 and more) far outside the bound.
    kappa = min(condition_number(case), 1e6)
    for part in ("outputs", "gradients"):
        a, b = getattr(fast, part), getattr(eager, part)
        assert set(a) == set(b), part
        for k in b:
            assert a[k].shape == b[k].shape, (part, k)
            scale = max(1.0, float(np.abs(b[k]).max())) * kappa
            worst = float(np.abs(a[k] - b[k]).max())
            assert worst <= EXACT * scale, (
                f"{part} {k} of {case.spec.describe()}: bucketed vs eager differ by {worst:.3e} "
                f"(up to {EXACT * scale:.1e} allowed)")


# ----------------------------------------------------------------------------------------------
# Buckets


def test_bucket_is_the_smallest_power_of_two_at_or_above_n_and_the_floor():
    for floor in (1, 2, 16):
        for n in range(1, 80):
            b = bucket(n, floor)
            assert b >= n and b >= floor
            assert b & (b - 1) == 0, b  # a power of two
            assert b == floor or b // 2 < n  # none smaller would do
    sizes = bucket_sizes(T=16, B=8, D=17, H=1)
    assert sizes == {"T": bucket(16, jax_oracle.FLOORS["T"]), "B": bucket(8, jax_oracle.FLOORS["B"]),
                     "D": bucket(17, jax_oracle.FLOORS["D"]), "H": bucket(1, jax_oracle.FLOORS["H"])}
    with pytest.raises(ValueError, match="^n: expected an int >= 1, got 0"):
        bucket(0, 4)


def test_bucketed_must_be_a_bool():
    with pytest.raises(TypeError, match="^bucketed: expected a bool, got str"):
        JaxCompositeOracle(bucketed="yes")


# ----------------------------------------------------------------------------------------------
# Exactness: bucketed == eager on the exact shapes


def _boundary_shapes(variant):
    """(T, B, D, H): the smallest case, each dimension exactly at its default floor, just above it, and mixed."""
    f = jax_oracle.FLOORS
    h_min = 2 if variant == "layernorm" else 1
    return [
        (1, 1, 1, h_min),
        (f["T"], f["B"], f["D"], f["H"]),
        (f["T"] + 1, f["B"] + 1, f["D"] + 1, f["H"] + 1),
        (f["T"] + 1, 1, f["D"], h_min),
        (1, f["B"], 1, f["H"] + 1),
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_bucketed_equals_eager_at_bucket_boundaries(variant):
    for k, (T, B, D, H) in enumerate(_boundary_shapes(variant)):
        spec = CaseSpec(variant=variant, T=T, B=B, D=D, H=H, seed=100 + k, weight_scale="large",
                        extra_scale="large", gain="random")
        case = build_case(spec)
        _assert_same(case, _FAST.reference(case), _EAGER.reference(case))


@pytest.mark.parametrize("variant", VARIANTS)
def test_bucketed_equals_eager_on_hypothesis_cases_with_small_buckets(variant, small_floors):
    assert bucket_sizes(3, 3, 3, 3) == {"T": 4, "B": 4, "D": 4, "H": 4}  # the small floors are in force

    @few
    @given(cases(variants=(variant,), max_T=5, max_B=3, max_D=5, max_H=5))
    def check(case):
        _assert_same(case, _FAST.reference(case), _EAGER.reference(case))

    check()
    # the LayerNorm count matters most at the smallest H, with padding above it
    case = build_case(CaseSpec(variant=variant, T=3, B=3, D=3, H=3, seed=5, gain="random"))
    _assert_same(case, _FAST.reference(case), _EAGER.reference(case))


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_state_is_taken_at_the_real_T_not_the_bucket(variant):
    """h_T is the last real output, bit for bit, and outputs up to t do not see later (padded) steps."""
    spec = CaseSpec(variant=variant, T=5, B=2, D=3, H=4, seed=9)
    long = build_case(spec)
    ref = _FAST.reference(long)
    assert bucket_sizes(5, 2, 3, 4)["T"] > 5
    np.testing.assert_array_equal(ref.outputs["h_T"], ref.outputs["y"][-1])
    short = dataclasses.replace(long, x=long.x[:3].copy(), dy=long.dy[:3].copy())  # same weights, states
    np.testing.assert_array_equal(_FAST.reference(short).outputs["y"], ref.outputs["y"][:3])


# ----------------------------------------------------------------------------------------------
# Against finite differences


@pytest.mark.parametrize("floors", ["default", "small"])
def test_agrees_with_finite_differences(floors, request):
    if floors == "small":
        request.getfixturevalue("small_floors")

    @few
    @given(cases(variants=VARIANTS, dtypes=("float64", "float32"), max_T=4, max_B=3, max_D=4, max_H=4))
    def check(case):
        assert_references_agree(case, _FAST.reference(case), _FAST.name, _FD.reference(case), _FD.name)

    check()


# ----------------------------------------------------------------------------------------------
# Compilations


def test_compilations_are_bounded_by_the_buckets_drawn():
    """50 Hypothesis cases of every variant and dtype, up to T, D, H = 16: one compilation per
    (variant, bucket) drawn, never a second one, and JAX's own cache agrees with the count."""
    drawn: set[tuple[str, int, int, int, int]] = set()

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cases(variants=VARIANTS, dtypes=("float64", "float32"), max_T=16, max_B=4, max_D=16, max_H=16))
    def check(case):
        ref = _FAST.reference(case)
        assert ref.outputs["y"].shape == (case.T, case.B, case.H)
        s = bucket_sizes(case.T, case.B, case.D, case.H)
        drawn.add((case.variant, s["T"], s["B"], s["D"], s["H"]))

    check()
    assert drawn
    assert len(drawn) <= len(VARIANTS)  # at the default floors, one bucket per variant holds them all
    traces = dict(jax_oracle._TRACES)
    for variant, *sizes in drawn:
        assert traces.get((variant, "cell", *sizes)) == 1, (variant, sizes, traces)  # compiled once, never retraced
    cache_size = getattr(jax_oracle._cell_jit(), "_cache_size", None)
    if cache_size is not None:  # a private JAX API: cross-check when present
        assert cache_size() == len(traces) == compilations()


def test_the_default_structure_shares_the_compilation_of_every_unprojected_cell():
    """A case in the default structure is one cell of the function that computes each direction of each
    layer: after it, stacked and bidirectional cases with lengths compile nothing more, and the reverse."""
    spec = CaseSpec(variant="peephole", T=3, B=2, D=3, H=4, seed=1)
    _FAST.reference(build_case(spec))
    before = compilations("peephole")
    _FAST.reference(structured_case(Structure(num_layers=2, bidirectional=True, lengths=True), variant="peephole",
                                    T=4, B=2, D=3, H=4, seed=2))
    _FAST.reference(build_case(spec.replace(seed=3, T=5)))
    assert compilations("peephole") == before
    assert ("peephole", "cell", *bucket_sizes(3, 2, 3, 4).values()) in jax_oracle._TRACES


def test_dtype_eps_and_values_do_not_recompile():
    spec = CaseSpec(variant="layernorm", T=3, B=2, D=3, H=4, seed=1)
    _FAST.reference(build_case(spec))
    before = compilations("layernorm")
    for change in (dict(dtype="float32"), dict(ln_eps=0.01), dict(seed=2, T=7, D=9, H=2), dict(B=1)):
        _FAST.reference(build_case(spec.replace(**change)))
    assert compilations("layernorm") == before


def test_references_are_computed_on_the_cpu_even_where_jax_has_a_gpu(monkeypatch):
    """Same arithmetic on every machine, and none of the GPU the implementation under test uses."""
    import jax

    seen = []
    real = jax_oracle._layered

    def spy(case):
        seen.append(jax.numpy.zeros(1).devices())
        return real(case)

    monkeypatch.setattr(jax_oracle, "_layered", spy)
    JaxCompositeOracle().reference(build_case(CaseSpec(T=2, B=1, D=2, H=3, seed=0)))
    assert seen and all(d.platform == "cpu" for d in seen[0])


# ----------------------------------------------------------------------------------------------
# The whole LSTM layer: stacked layers, both directions, lengths, projection, CIFG, clip

from harness.structure import FEATURES, Structure  # noqa: E402
from tests.structured import structured_case  # noqa: E402
from tests.torch_layer import TORCH_STRUCTURES, torch_reference  # noqa: E402

#: Every feature, by variant (LayerNorm has no projection or clip here).
EVERYTHING = {
    "vanilla": Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True, coupled_input_forget=True,
                         cell_clip=0.9),
    "peephole": Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True, cell_clip=0.9),
    "layernorm": Structure(num_layers=2, bidirectional=True, lengths=True, coupled_input_forget=True),
}
#: JAX against torch or finite differences, relative to max(1, |expected|): rounding only.
AGREE = 1e-11


def _assert_agree(ref, outputs, grads, *, bounds=None, what=""):
    for part, want in (("outputs", outputs), ("gradients", grads)):
        got = getattr(ref, part)
        assert set(got) == set(want), (what, part)
        for k, e in want.items():
            extra = 0.0 if bounds is None or part == "outputs" else bounds[k]
            bad = np.abs(got[k] - e) > AGREE * np.maximum(1.0, np.abs(e)) + extra
            assert not bad.any(), f"{what} {part} {k}: worst {np.abs(got[k] - e).max():.3e}"


def test_the_oracle_computes_every_structure_feature():
    assert _FAST.structures == frozenset(FEATURES)
    assert _FAST.unsupported_reason("peephole", "float32", EVERYTHING["peephole"]) is None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(TORCH_STRUCTURES))
def test_agrees_with_torch_lstm(name, dtype):
    s = TORCH_STRUCTURES[name]
    case = structured_case(s, dtype=dtype, T=5, B=3, D=3, H=3, seed=20, lengths=[2, 5, 1] if s.lengths else None)
    outputs, grads = torch_reference(case)
    for oracle in (_FAST, _EAGER) if name == "all" else (_FAST,):
        _assert_agree(oracle.reference(case), outputs, grads, what=f"{name} bucketed={oracle.bucketed}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_agrees_with_finite_differences_on_every_feature(variant, dtype):
    case = structured_case(EVERYTHING[variant], variant=variant, dtype=dtype, T=4, B=3, D=2, H=3, seed=21,
                           lengths=[4, 1, 3])
    fd = _FD.reference(case)
    if EVERYTHING[variant].cell_clip is not None:
        assert "crossed" not in fd.notes and "cell_clip=0.9" in fd.notes
        # the clip is not idle: some cell of the case is cut
        seen = []
        from oracles.equations import lstm_forward

        lstm_forward(variant, *(a.astype(np.float64) for a in (case.x, case.h0, case.c0)),
                     {k: v.astype(np.float64) for k, v in case.params.items()}, structure=case.structure,
                     lengths=case.lengths, clipped=lambda c, ok: seen.append(np.abs(c) * ok > 0.9))
        assert any(m.any() for m in seen)
    _assert_agree(_FAST.reference(case), fd.outputs, fd.gradients, bounds=fd.gradient_error, what=variant)


def test_bucketed_equals_eager_on_structured_cases_across_buckets(small_floors):
    # T = 5 and B = 5 padded to 8, B = 3 to 4 (each compilation of a stacked bidirectional cell takes seconds)
    for k, (T, B, variant) in enumerate([(5, 3, "peephole"), (3, 5, "layernorm")]):
        case = structured_case(EVERYTHING[variant], variant=variant, T=T, B=B, D=2, H=3, seed=30 + k)
        _assert_same_structured(_FAST.reference(case), _EAGER.reference(case))


def _assert_same_structured(fast, eager):
    for part in ("outputs", "gradients"):
        a, b = getattr(fast, part), getattr(eager, part)
        assert set(a) == set(b)
        for k in b:
            assert a[k].shape == b[k].shape, (part, k)
            assert np.abs(a[k] - b[k]).max() <= EXACT * max(1.0, float(np.abs(b[k]).max())), (part, k)


def test_reverse_direction_of_a_row_is_the_forward_run_of_its_valid_steps_reversed():
    """Hand-derived: the reverse direction of row b reads x[l_b - 1], ..., x[0]; so its outputs are a plain
    one-direction run (the unstructured path, which has no gather) of that row's valid steps in reverse
    order, reversed back, and zeros after l_b; its h_T is that run's last state."""
    s = Structure(bidirectional=True, lengths=True)
    case = structured_case(s, T=5, B=3, D=2, H=3, seed=22, lengths=[3, 5, 1])
    ref = _FAST.reference(case)
    H = case.H
    rev = {k[len("l0.reverse."):]: v for k, v in case.params.items() if k.startswith("l0.reverse.")}
    for b, length in enumerate(case.lengths):
        row = build_case(CaseSpec(T=int(length), B=1, D=2, H=3, seed=0))
        row = dataclasses.replace(row, x=case.x[:length, b : b + 1][::-1].copy(), h0=case.h0[1, b : b + 1],
                                  c0=case.c0[1, b : b + 1], params=rev, dy=np.zeros((length, 1, H)))
        plain = _FAST.reference(row)
        np.testing.assert_allclose(ref.outputs["y"][:length, b, H:], plain.outputs["y"][::-1, 0], atol=1e-14)
        assert np.all(ref.outputs["y"][length:, b] == 0.0)
        np.testing.assert_allclose(ref.outputs["h_T"][1, b], plain.outputs["h_T"][0], atol=1e-14)
        np.testing.assert_allclose(ref.outputs["c_T"][1, b], plain.outputs["c_T"][0], atol=1e-14)
    padded = np.arange(5)[:, None] >= case.lengths[None, :]
    assert np.all(ref.gradients["x"][padded] == 0.0)  # masked steps get exact zeros through the gathers


def test_all_lengths_full_is_the_run_without_lengths_and_all_ones_is_one_step():
    s = Structure(num_layers=2, bidirectional=True)
    full = structured_case(s.replace(lengths=True), T=4, B=3, D=2, H=3, seed=23, lengths=[4, 4, 4])
    without = dataclasses.replace(full, structure=s, lengths=None)
    _assert_same_structured(_FAST.reference(full), _FAST.reference(without))
    ones = dataclasses.replace(full, lengths=np.ones(3, dtype=np.int64))
    one_step = dataclasses.replace(without, x=full.x[:1].copy(), dy=full.dy[:1].copy())
    a, b = _FAST.reference(ones), _FAST.reference(one_step)
    np.testing.assert_allclose(a.outputs["y"][:1], b.outputs["y"], atol=1e-14)
    assert np.all(a.outputs["y"][1:] == 0) and np.all(a.gradients["x"][1:] == 0)
    np.testing.assert_allclose(a.outputs["h_T"], b.outputs["h_T"], atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cifg_forget_block_gradient_is_exactly_zero(variant):
    case = structured_case(Structure(bidirectional=True, coupled_input_forget=True), variant=variant, T=3, B=2,
                           D=2, H=3, seed=24)
    g = _FAST.reference(case).gradients
    H = case.H
    for prefix in ("l0.", "l0.reverse."):
        for bare in ("W", "R", "b"):
            if prefix + bare in g:
                assert np.all(g[prefix + bare][H : 2 * H] == 0.0) and np.abs(g[prefix + bare][:H]).min() > 0
        if variant == "peephole":
            assert np.all(g[prefix + "p_f"] == 0.0)
        if variant == "layernorm":
            assert np.all(g[prefix + "gamma"][1] == 0.0) and np.all(g[prefix + "beta"][1] == 0.0)


class _StraightThroughClip:
    """jax.numpy with a clip whose gradient passes through (the planted bug: 'gradient passed through
    clipped cells'); the forward is the same."""

    def __init__(self, jnp):
        self._jnp = jnp

    def __getattr__(self, name):
        return getattr(self._jnp, name)

    def clip(self, v, lo, hi):
        import jax

        return v + jax.lax.stop_gradient(self._jnp.clip(v, lo, hi) - v)


def test_gradient_through_clipped_cells_is_zero_and_a_straight_through_clip_is_caught(monkeypatch):
    # T = 1 vanilla with about half the cells cut, all far from the boundary: dc0 is exactly 0 where cut.
    base = structured_case(Structure(cell_clip=1e6), T=1, B=3, D=2, H=4, seed=25, weight_scale=3.0)
    seen = []
    from oracles.equations import lstm_forward

    lstm_forward("vanilla", base.x, base.h0, base.c0, base.params, structure=base.structure,
                 clipped=lambda c, ok: seen.append(np.abs(c)))
    cells = seen[0]
    clip = float(np.median(cells))
    assert np.abs(cells - clip).min() > 1e-3
    case = dataclasses.replace(base, structure=Structure(cell_clip=clip))
    ref = _EAGER.reference(case)
    cut = cells > clip
    assert np.all(ref.gradients["c0"][cut] == 0.0) and np.all(ref.gradients["c0"][~cut] != 0.0)
    fd = _FD.reference(case)
    _assert_agree(ref, fd.outputs, fd.gradients, bounds=fd.gradient_error, what="clip")
    # JAX's clip at exactly the boundary: a tie, whose gradient JAX splits; no case puts a cell there (the
    # margin above), so it never enters a reference.
    import jax

    tie = float(jax.grad(lambda v: jax.numpy.clip(v, -1.0, 1.0))(1.0))
    assert 0.0 <= tie <= 1.0
    # The planted bug: the same forward, the gradient passed through the cut cells. Finite differences see it.
    real = jax_oracle._cell
    monkeypatch.setattr(jax_oracle, "_cell", lambda jnp, *a, **k: real(_StraightThroughClip(jnp), *a, **k))
    wrong = _EAGER.reference(case)
    np.testing.assert_array_equal(wrong.outputs["c_T"], ref.outputs["c_T"])
    bad = np.abs(wrong.gradients["c0"] - fd.gradients["c0"]) > fd.gradient_error["c0"] + 1e-9
    assert np.array_equal(bad, cut)


def test_structured_cases_compile_once_per_kind_of_cell_and_bucket():
    """A structure runs cell by cell: shapes within a bucket, dtypes, the clip's value (traced) and the
    number of layers and directions all share the one compilation of a kind of cell (its outputs and
    vjp together); a new kind of cell (here projected) adds one."""
    s = Structure(num_layers=2, bidirectional=True, lengths=True, cell_clip=2.0)
    _FAST.reference(structured_case(s, T=3, B=2, D=2, H=3, seed=1))
    before = compilations()
    for change in (dict(T=5, seed=2), dict(B=1, seed=3), dict(dtype="float32"), dict(D=5, H=7, seed=5)):
        _FAST.reference(structured_case(s, **{"D": 2, "H": 3, "T": 3, "B": 2, **change}))
    for other in (s.replace(cell_clip=0.5), s.replace(num_layers=3), s.replace(bidirectional=False),
                  s.replace(num_layers=1, lengths=False)):
        _FAST.reference(structured_case(other, T=3, B=2, D=2, H=3, seed=4))
    assert compilations() == before
    _FAST.reference(structured_case(s.replace(num_layers=3, proj_size=1), T=3, B=2, D=2, H=3, seed=1))
    # a projected cell, unless an earlier test compiled it; never a kind twice
    assert compilations() <= before + 1
    assert set(jax_oracle._TRACES.values()) == {1}
