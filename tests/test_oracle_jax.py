"""The JAX oracle's shape buckets: exact, agreeing with finite differences, and compiled a bounded number of times.

The bucketed path zero-pads each case up to a shape bucket and runs one compiled function per
(variant, bucket) (see :mod:`oracles.jax_oracle`). Padding must change nothing but the order of
floating-point summation, so the bucketed results are compared with the eager path on the exact
shapes (``bucketed=False``) at 1e-12 of the largest element: the worst measured difference was
5e-15 over 60 Hypothesis cases of every variant (T <= 10, B <= 4, D, H <= 16) and 3e-14 on a
peephole case with large weights and peepholes at T=16, while a padded unit leaking into a real one,
a misaligned gate block or a wrong LayerNorm count moves results by 1e-3 or more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from harness.cases import CaseSpec, build_case, cases
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
    for part in ("outputs", "gradients"):
        a, b = getattr(fast, part), getattr(eager, part)
        assert set(a) == set(b), part
        for k in b:
            assert a[k].shape == b[k].shape, (part, k)
            scale = max(1.0, float(np.abs(b[k]).max()))
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
    for key in drawn:
        assert traces.get(key) == 1, (key, traces)  # compiled once, never retraced
    assert compilations() == sum(traces.values())
    cache_size = getattr(jax_oracle._jitted(), "_cache_size", None)
    if cache_size is not None:  # a private JAX API: cross-check when present
        assert cache_size() == len(traces)


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
    real = jax_oracle._bucketed

    def spy(case):
        seen.append(jax.numpy.zeros(1).devices())
        return real(case)

    monkeypatch.setattr(jax_oracle, "_bucketed", spy)
    JaxCompositeOracle().reference(build_case(CaseSpec(T=2, B=1, D=2, H=3, seed=0)))
    assert seen and all(d.platform == "cpu" for d in seen[0])
