"""Every built-in implementation against the finite-difference oracle, forward and backward, both dtypes.

The oracle (``oracles/finite_diff.py`` over ``oracles/equations.py``) shares no code with ``impls/``;
the checks go through the same path as ``lstm-harness run``: :func:`harness.contract.validate`,
:class:`harness.subject.InProcessSubject` and :func:`harness.runner.check_case`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import registry
from harness.cases import CaseSpec, build_case, case_specs
from harness.check import check_case
from harness.contract import DEFAULT_DTYPES, VARIANTS, gradient_keys, quantities, to_numpy, validate
from harness.subject import InProcessSubject
from oracles.finite_diff import FiniteDifferenceOracle

ORACLE = FiniteDifferenceOracle()
#: Every built-in that can run here: the CPU six everywhere, and the CuPy three where a GPU is present.
NAMES = tuple(e.name for e in registry.implementations() if e.unavailable is None)
CPU_SIX = {
    "loop": "vanilla", "stacked": "vanilla",
    "loop-peephole": "peephole", "stacked-peephole": "peephole",
    "loop-layernorm": "layernorm", "stacked-layernorm": "layernorm",
}
#: Small enough that the oracle takes whole gradients (every coordinate), so a discrepancy is located.
SIZES = dict(max_T=5, max_B=3, max_D=5, max_H=5)


def create(name: str):
    entry = {e.name: e for e in registry.implementations()}[name]
    assert entry.unavailable is None, entry.unavailable
    impl = entry.create()
    return impl, validate(impl)


def check(impl, info, spec: CaseSpec):
    """Records of one case; fails the test with every message that is not ok."""
    records = check_case(InProcessSubject(impl, info), [ORACLE], build_case(spec))
    bad = [r for r in records if not r.ok]
    assert not bad, "\n\n".join(r.message for r in bad)
    return records


def test_all_six_builtins_are_registered_with_their_variants():
    variants = {name: create(name)[1].variant for name in NAMES}
    assert {n: v for n, v in variants.items() if n in CPU_SIX} == CPU_SIX
    assert set(variants) - set(CPU_SIX) <= {"cupy", "cupy-peephole", "cupy-layernorm"}
    for name in NAMES:
        impl, info = create(name)
        assert info.name == name
        assert info.dtypes == DEFAULT_DTYPES
        assert info.has_backward
        if info.variant == "layernorm":
            assert impl.ln_eps == 1e-5


@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_matches_finite_differences(name, dtype, data):
    impl, info = create(name)
    spec = data.draw(case_specs(variants=(info.variant,), dtypes=(dtype,), ln_eps=info.ln_eps, **SIZES),
                     label="spec")
    records = check(impl, info, spec)
    # Every quantity of both directions was compared, none skipped.
    compared = {(r.direction, r.quantity) for r in records if r.status == "pass"}
    want = {(d, q) for d in ("forward", "backward") for q in quantities(info.variant, d)}
    assert compared == want


@pytest.mark.parametrize("name", NAMES)
def test_projection_path_on_a_case_too_large_for_whole_gradients(name):
    impl, info = create(name)
    spec = CaseSpec(variant=info.variant, dtype="float32", T=6, B=5, D=24, H=20, seed=3)
    case = build_case(spec)
    assert sum(a.size for a in case.arrays().values()) > ORACLE.full_limit
    records = check(impl, info, spec)
    assert {r.method for r in records if r.direction == "backward"} == {"projection"}


@pytest.mark.parametrize("name", [n for n in NAMES if "layernorm" in n])
def test_layernorm_uses_its_declared_eps(name):
    """With ln_eps = 0.5 the implementation agrees with an oracle told 0.5, and not with one told 1e-5."""
    impl, _ = create(name)
    impl.ln_eps = 0.5
    info = validate(impl)
    assert info.ln_eps == 0.5
    spec = CaseSpec(variant="layernorm", dtype="float64", T=3, B=2, D=3, H=4, seed=1, weight_scale="unit",
                    ln_eps=0.5)
    check(impl, info, spec)
    records = check_case(InProcessSubject(impl, info), [ORACLE], build_case(spec.replace(ln_eps=1e-5)))
    assert {r.quantity for r in records if r.status == "fail"} >= {"y", "h_T", "c_T"}


@pytest.mark.parametrize("name", NAMES)
def test_outputs_keep_the_input_dtype_and_inputs_are_not_modified(name):
    impl, info = create(name)
    for dtype in DEFAULT_DTYPES:
        case = build_case(CaseSpec(variant=info.variant, dtype=dtype, T=2, B=2, D=3, H=4, seed=5))
        before = case.copy()
        y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
        assert {a.dtype for a in (y, h_T, c_T, *grads.values())} == {np.dtype(dtype)}
        assert set(grads) == set(gradient_keys(info.variant))
        for key, value in before.arrays().items():
            np.testing.assert_array_equal(case.arrays()[key], value, err_msg=key)
        np.testing.assert_array_equal(case.dy, before.dy)


@pytest.mark.parametrize("name", NAMES)
def test_backward_can_run_twice_on_one_forward(name):
    """The cache is not consumed: a second backward gives the same gradients (bit for bit)."""
    impl, info = create(name)
    case = build_case(CaseSpec(variant=info.variant, T=3, B=2, D=3, H=4, seed=2))
    *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
    first = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    second = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
    for k in first:  # the GPU implementations return CuPy arrays: compared as the harness sees them
        np.testing.assert_array_equal(to_numpy(first[k]), to_numpy(second[k]), err_msg=k)


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("loop")])
def test_loop_and_stacked_agree_closely(name):
    """The two versions of a variant compute the same sums in different orders: float64 agreement."""
    loop, info = create(name)
    stacked, _ = create(name.replace("loop", "stacked", 1))
    case = build_case(CaseSpec(variant=info.variant, T=6, B=3, D=5, H=7, seed=11, weight_scale="large"))
    out_l = loop.forward(case.x, case.h0, case.c0, case.params)
    out_s = stacked.forward(case.x, case.h0, case.c0, case.params)
    for a, b in zip(out_l[:3], out_s[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    g_l = loop.backward(case.dy, case.dh_T, case.dc_T, out_l[3])
    g_s = stacked.backward(case.dy, case.dh_T, case.dc_T, out_s[3])
    for k in g_l:
        np.testing.assert_allclose(g_l[k], g_s[k], rtol=1e-10, atol=1e-10, err_msg=k)


# --- Bad input gets a clear error naming the argument ---------------------------------------------


def _inputs(variant: str):
    return build_case(CaseSpec(variant=variant, T=2, B=2, D=3, H=4, seed=0))


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_and_keys_raise_value_errors_naming_the_argument(name):
    impl, info = create(name)
    case = _inputs(info.variant)
    with pytest.raises(ValueError, match=r"c0: expected shape \(2, 4\) \(B, H\), got \(2, 3\)"):
        impl.forward(case.x, case.h0, case.c0[:, :3], case.params)
    with pytest.raises(ValueError, match=r"x: expected shape \(T, B, D\)"):
        impl.forward(case.x[0], case.h0, case.c0, case.params)
    first = VARIANTS[info.variant].param_names[0]
    with pytest.raises(ValueError, match=rf"params: expected keys .*missing \['{first}'\]"):
        impl.forward(case.x, case.h0, case.c0, {k: v for k, v in case.params.items() if k != first})
    last = VARIANTS[info.variant].param_names[-1]
    params = dict(case.params, **{last: case.params[last][..., :1]})
    with pytest.raises(ValueError, match=rf"params\['{last}'\]: expected shape"):
        impl.forward(case.x, case.h0, case.c0, params)


@pytest.mark.parametrize("name", NAMES)
def test_integer_inputs_and_bad_upstream_shapes_are_rejected(name):
    impl, info = create(name)
    case = _inputs(info.variant)
    with pytest.raises(ValueError, match=r"x: expected dtype float64 or float32, got int64"):
        impl.forward(case.x.astype(np.int64), case.h0, case.c0, case.params)
    *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 2, 4\)"):
        impl.backward(case.dy[:1], case.dh_T, case.dc_T, cache)
    with pytest.raises(ValueError, match=r"dc_T: expected shape \(2, 4\)"):
        impl.backward(case.dy, case.dh_T, case.dc_T.T, cache)


# --- The stacked algorithm over an array namespace (the same code runs over CuPy) ---------------

#: What the stacked algorithm may call on its namespace: functions CuPy provides with NumPy's
#: semantics (ufuncs with ``out=``, ``matmul`` with ``out=``). Array methods (reshape, mean, sum,
#: copy) are the arrays' own.
CUPY_COMPATIBLE = ("asarray", "array", "empty", "empty_like", "zeros", "zeros_like", "matmul", "tanh", "multiply",
                   "subtract", "add", "divide", "sqrt", "split", "concatenate", "ascontiguousarray")


class RestrictedNamespace:
    """NumPy, but only the functions listed; anything else is an AttributeError naming it."""

    def __getattr__(self, name):
        if name not in CUPY_COMPATIBLE:
            raise AttributeError(f"the stacked algorithm used xp.{name}, which is not in CUPY_COMPATIBLE")
        return getattr(np, name)


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("stacked")])
def test_stacked_runs_over_a_restricted_array_namespace(name):
    impl, info = create(name)
    impl.xp = RestrictedNamespace()
    check(impl, info, CaseSpec(variant=info.variant, dtype="float32", T=3, B=2, D=3, H=4, seed=4))
