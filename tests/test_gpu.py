"""The CuPy implementations (impls/gpu/): what can be checked anywhere, and what needs a GPU.

Everywhere (no GPU, no CuPy needed):
* the three are registered and, without CuPy and a GPU, listed unavailable with the reason;
  importing impls.gpu imports no CuPy; every reason ``unavailable_reason`` can give;
* the fused kernels, emulated by NumPy from the same statement tables the CUDA source is generated
  from, agree bit for bit with the NumPy cells (the GPU math is the NumPy math), and the whole GPU
  implementation run over NumPy (``impl.xp = numpy``: GEMM wiring, buffers, indices, every
  expression) certifies against the finite-difference oracle and equals the NumPy stacked version;
* the kernel language refuses what would be wrong or racy on a GPU, and the emulation detects races
  and out-of-bounds indices; planted bugs in the kernel tables are caught;
* the launcher passes each kernel exactly what its generated C signature declares (a stand-in for
  the compiled kernel checks every argument's type and the launch shape, then emulates);
* where CuPy and libnvrtc are installed (no GPU needed): the generated CUDA source compiles for
  float and double, the float kernels contain no double arithmetic, and CuPy accepts the module.

On a GPU (marked ``gpu``, skipped with the reason elsewhere; ``tox -e gpu``): every kernel against
the NumPy cell, every implementation against the finite-difference oracle, its NumPy counterpart,
every available oracle (cuDNN included) in both dtypes. The benchmark's tests are in test_bench.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.test_impls as test_impls
from harness import registry
from harness.cases import CaseSpec, build_case, case_specs
from harness.check import check_case
from harness.contract import DEFAULT_DTYPES, quantities, validate
from harness.structure import FEATURES, Structure
from harness.subject import InProcessSubject
from impls import gpu
from impls.gpu import Kernel, Let, Load, Phase, Row, Store, Sum, launch
from impls.layernorm import LayerNormCell, StackedLayerNormLSTM
from impls.peephole import PeepholeCell, StackedPeepholeLSTM
from impls.stacked import StackedLSTM, VanillaCell
from impls.workspace import Pooled, Workspace
from oracles.base import Oracle, Reference
from oracles.finite_diff import FiniteDifferenceOracle

ROOT = Path(__file__).resolve().parent.parent
ORACLE = FiniteDifferenceOracle()
GPU_NAMES = ("cupy", "cupy-peephole", "cupy-layernorm")
CLASSES = {"cupy": gpu.CupyLSTM, "cupy-peephole": gpu.CupyPeepholeLSTM, "cupy-layernorm": gpu.CupyLayerNormLSTM}
NUMPY_TWIN = {"cupy": StackedLSTM, "cupy-peephole": StackedPeepholeLSTM, "cupy-layernorm": StackedLayerNormLSTM}
CELLS = {
    "vanilla": (VanillaCell(), gpu.FusedVanillaCell()),
    "peephole": (PeepholeCell(), gpu.FusedPeepholeCell()),
    "layernorm": (LayerNormCell(), gpu.FusedLayerNormCell()),
}
SIZES = test_impls.SIZES
REASON = gpu.unavailable_reason()
KNOWN_REASONS = (r"cupy is not installed", r"cupy failed to import: .+",
                 r"no CUDA GPU is visible \(cupy\.cuda\.runtime\.getDeviceCount\(\) (== 0|raised .+)\)")


def emulated(name: str):
    """The GPU implementation ``name`` with NumPy as its namespace: every kernel emulated."""
    impl = CLASSES[name]()
    impl.xp = np
    return impl, validate(impl)


def forward_backward(impl, case):
    """-> (y, h_T, c_T), gradients: one forward and the backward on its cache."""
    y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
    return (y, h_T, c_T), impl.backward(case.dy, case.dh_T, case.dc_T, cache)


def assert_equals_numpy_twin_bit_for_bit(name, case, outputs, grads):
    twin = NUMPY_TWIN[name]()
    if hasattr(twin, "ln_eps"):
        twin.ln_eps = case.ln_eps
    ref, want = forward_backward(twin, case)
    for key, a, b in zip(("y", "h_T", "c_T"), outputs, ref):
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert set(grads) == set(want)
    for key in want:
        np.testing.assert_array_equal(grads[key], want[key], err_msg=f"d{key}")


def assert_matches_finite_differences(impl, info, dtype, data):
    """A drawn case of the dtype passes the finite-difference oracle, every quantity compared."""
    spec = data.draw(case_specs(variants=(info.variant,), dtypes=(dtype,), ln_eps=info.ln_eps, **SIZES), label="spec")
    records = check(impl, info, spec)
    compared = {(r.direction, r.quantity) for r in records if r.status == "pass"}
    assert compared == {(d, q) for d in ("forward", "backward") for q in quantities(info.variant, d)}


def check(impl, info, spec: CaseSpec, oracles=(ORACLE,)):
    records = check_case(InProcessSubject(impl, info), list(oracles), build_case(spec))
    bad = [r for r in records if not r.ok]
    assert not bad, "\n\n".join(r.message for r in bad)
    return records


# --- Registration and availability ----------------------------------------------------------------


def test_the_three_are_registered_with_their_variants():
    entries = {e.name: e for e in registry.implementations()}
    for name in GPU_NAMES:
        assert entries[name].target == registry.BUILTIN_IMPLEMENTATIONS[name]
        info = validate(entries[name].create())  # creating one imports no CuPy and needs no GPU
        assert info.name == name and info.dtypes == DEFAULT_DTYPES and info.has_backward
        assert entries[name].unavailable == REASON
    assert {n: validate(entries[n].create()).variant for n in GPU_NAMES} == {
        "cupy": "vanilla", "cupy-peephole": "peephole", "cupy-layernorm": "layernorm"}


def test_pyproject_registers_the_same_entry_points():
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    points = table["lstm_harness.implementations"]
    assert {n: points[n] for n in GPU_NAMES} == {n: registry.BUILTIN_IMPLEMENTATIONS[n] for n in GPU_NAMES}


@pytest.mark.skipif(REASON is None, reason="a CUDA GPU is visible here: the implementations are available")
def test_listed_unavailable_with_the_reason(capsys):
    from harness.cli import main

    assert any(re.fullmatch(p, REASON) for p in KNOWN_REASONS), REASON
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in GPU_NAMES:
        assert re.search(rf"^  {re.escape(name)} +unavailable  {re.escape(REASON)}$", out, re.M), out
    for name in ("loop", "stacked", "stacked-layernorm"):
        assert re.search(rf"^  {re.escape(name)} +available ", out, re.M)


@pytest.mark.skipif(REASON is None, reason="a CUDA GPU is visible here")
def test_running_without_a_gpu_raises_a_clear_error():
    impl = gpu.CupyLSTM()
    case = build_case(CaseSpec(T=2, B=2, D=3, H=4))
    with pytest.raises(RuntimeError, match=re.escape(f"the CuPy LSTM cannot run here: {REASON}")):
        impl.forward(case.x, case.h0, case.c0, case.params)


def _python(code: str, *, path: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter (``path`` first on its import path); its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(([str(path)] if path else []) + [str(ROOT)])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_impls_gpu_imports_no_cupy():
    out = _python("""
        import sys
        import impls.gpu
        from harness import registry
        registry.load_object(registry.BUILTIN_IMPLEMENTATIONS["cupy-layernorm"])()
        print("cupy" in sys.modules)
    """)
    assert out == "False"


def test_without_cupy_the_reason_is_that_it_is_not_installed():
    out = _python("""
        import sys
        sys.modules["cupy"] = None  # an import of cupy now fails as if it were not installed
        from harness import registry
        print({e.name: e.unavailable for e in registry.implementations()}["cupy"])
    """)
    assert out == "cupy is not installed"


FAKE_CUPY = {
    "no_gpu": "class cuda:\n    class runtime:\n        getDeviceCount = staticmethod(lambda: 0)\n",
    "no_driver": ("class cuda:\n    class runtime:\n        @staticmethod\n        def getDeviceCount():\n"
                  "            raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device is detected')\n"),
    "broken": "raise ImportError('libcudart.so.12: cannot open shared object file')\n",
}


@pytest.mark.parametrize("kind", sorted(FAKE_CUPY))
def test_each_reason_a_fake_cupy_gives(kind, tmp_path):
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(FAKE_CUPY[kind])
    out = _python("""
        import impls.gpu
        print(impls.gpu.unavailable_reason())
    """, path=tmp_path)
    assert out == {
        "no_gpu": "no CUDA GPU is visible (cupy.cuda.runtime.getDeviceCount() == 0)",
        "no_driver": "no CUDA GPU is visible (cupy.cuda.runtime.getDeviceCount() raised RuntimeError: "
                     "cudaErrorNoDevice: no CUDA-capable device is detected)",
        "broken": "cupy failed to import: libcudart.so.12: cannot open shared object file",
    }[kind]
    assert any(re.fullmatch(p, out) for p in KNOWN_REASONS)


# --- The GPU math, emulated: the same statements as the CUDA source --------------------------------


def _step_data(variant: str, dtype: str, B: int, H: int, seed: int):
    """Random buffers for one forward and one backward step at t = 1 of T = 3, as the stacked loop has them."""
    rng = np.random.default_rng(seed)
    T, t = 3, 1
    np_cell, _ = CELLS[variant]
    params = build_case(CaseSpec(variant=variant, dtype=dtype, T=1, B=1, D=1, H=H, seed=seed)).params
    P = np_cell.prepare(np, params, np.dtype(dtype), ln_eps=1e-5)

    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    return dict(T=T, t=t, P=P, params=params, a=r(B, 4 * H, scale=2.0), rec=r(B, 4 * H), c_prev=r(B, H),
                dh=r(B, H), dc=r(B, H), dy=r(B, H), R=r(4 * H, H, scale=0.3), h_prev=r(B, H))


def _run_steps(cell, variant, dtype, B, H, seed, *, fused_step: bool, xp=np):
    """Forward step then backward step of ``cell`` on fresh copies of the same data -> every buffer written.

    ``xp`` is the array namespace the step runs over: NumPy for the cells, CuPy for the fused kernels.
    """
    d = _step_data(variant, dtype, B, H, seed)
    T, t = d["T"], d["t"]
    dev = {k: xp.asarray(v) for k, v in d.items() if isinstance(v, np.ndarray)}
    P = cell.prepare(xp, d["params"], np.dtype(dtype), ln_eps=1e-5)
    S = cell.forward_buffers(xp, T, B, H, np.dtype(dtype))
    G = cell.backward_buffers(xp, T, B, H, np.dtype(dtype))
    a, c, h = dev["a"].copy(), xp.empty((B, H), dtype), xp.empty((B, H), dtype)
    dh, dc, da = dev["dh"].copy(), dev["dc"].copy(), xp.empty((B, 4 * H), dtype)
    scale = cell.input_scale(P)  # what the stacked algorithm folds into the forward's W, R and b
    if fused_step:
        RT = dev["R"].T.copy()  # a copy: (4, 1).T is already contiguous, and RT is scaled in place
        if scale is not None:
            a *= scale
            RT *= scale
        cell.step(xp, t, a, xp.empty_like(a), dev["h_prev"], RT, dev["c_prev"], c, h, S, P)
        cell.step_backward(xp, t, dev["dy"], dh, dc, da, a, dev["c_prev"], c, dev["R"], S, G, P)
    else:
        a += dev["rec"]
        if scale is not None:
            a *= scale
        cell.forward_step(xp, t, a, dev["c_prev"], c, h, S, P)
        cell.backward_step(xp, t, dh, dc, da, a, dev["c_prev"], c, S, G, P)
    return _written(t, a, c, h, dh if fused_step else None, dc, da, S, G)


def _written(t, a, c, h, dh, dc, da, S, G) -> dict:
    """Every buffer a forward and a backward step write (step t of the per-step buffers; not scratch,
    whose names start with "tmp")."""
    out = {"a": a, "c": c, "h": h, "dc": dc, "da": da}
    out.update({f"S.{k}": v[t] for k, v in S.items() if not k.startswith("tmp")})
    out.update({f"G.{k}": v[t] for k, v in G.items() if not k.startswith("tmp")})
    if dh is not None:
        out["dh"] = dh
    return out


@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("variant", sorted(CELLS))
@pytest.mark.parametrize("fused_step", [False, True], ids=["kernel", "gemm+kernel"])
def test_emulated_kernels_equal_the_numpy_cells_bit_for_bit(variant, dtype, fused_step):
    """The kernel expressions follow the NumPy cells' association order, so the results are identical."""
    np_cell, fused = CELLS[variant]
    for B, H, seed in ((1, 1, 0), (3, 7, 1), (2, 40, 2)):
        if variant == "layernorm" and H < 2:
            continue
        want = _run_steps(np_cell, variant, dtype, B, H, seed, fused_step=fused_step)
        got = _run_steps(fused, variant, dtype, B, H, seed, fused_step=fused_step)
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == np.dtype(dtype), key
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{variant} {key} B={B} H={H}")


@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", GPU_NAMES)
@given(data=st.data())
def test_emulated_implementation_matches_finite_differences(name, dtype, data):
    assert_matches_finite_differences(*emulated(name), dtype, data)


@pytest.mark.parametrize("name", GPU_NAMES)
@given(data=st.data())
def test_emulated_implementation_equals_its_numpy_twin_bit_for_bit(name, data):
    impl, info = emulated(name)
    spec = data.draw(case_specs(variants=(info.variant,), max_T=6, max_B=4, max_D=6, max_H=40), label="spec")
    case = build_case(spec)
    assert_equals_numpy_twin_bit_for_bit(name, case, *forward_backward(impl, case))


@pytest.mark.parametrize("name", GPU_NAMES)
def test_emulated_implementation_uses_only_what_cupy_provides(name):
    impl, info = emulated(name)
    impl.xp = test_impls.RestrictedNamespace()
    check(impl, info, CaseSpec(variant=info.variant, dtype="float32", T=3, B=2, D=3, H=4, seed=4))
    # The layer loops too: two layers, both directions, lengths (and a projection where it is defined).
    check(impl, info, CaseSpec(variant=info.variant, dtype="float32", T=4, B=3, D=3, H=4, seed=4, num_layers=2,
                               bidirectional=True, proj_size=0 if info.variant == "layernorm" else 2,
                               lengths="random"))


def test_emulated_layernorm_uses_its_declared_eps():
    impl, _ = emulated("cupy-layernorm")
    impl.ln_eps = 0.5
    info = validate(impl)
    spec = CaseSpec(variant="layernorm", dtype="float64", T=3, B=2, D=3, H=4, seed=1, weight_scale="unit", ln_eps=0.5)
    check(impl, info, spec)
    records = check_case(InProcessSubject(impl, info), [ORACLE], build_case(spec.replace(ln_eps=1e-5)))
    assert {r.quantity for r in records if r.status == "fail"} >= {"y", "h_T", "c_T"}


def test_upstream_gradients_that_are_not_contiguous_are_accepted():
    """dy is indexed as flat (B, H) blocks by the kernels: backward makes it contiguous first."""
    impl, _ = emulated("cupy")
    case = build_case(CaseSpec(T=3, B=2, D=3, H=4, seed=6))
    *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
    dy_f = np.asfortranarray(case.dy)
    assert not dy_f.flags.c_contiguous
    got = impl.backward(dy_f, case.dh_T, case.dc_T, cache)
    *_, cache2 = impl.forward(case.x, case.h0, case.c0, case.params)
    want = impl.backward(case.dy, case.dh_T, case.dc_T, cache2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- The whole layer: layers, directions, lengths and projections around the fused cell -------------

#: What the GPU versions compute beyond one cell (not CIFG or clipping: they would change the kernels).
GPU_FEATURES = ("layers", "bidirectional", "lengths", "proj")


def structured_specs(info, dtype: str, **sizes):
    """Case specs in drawn structures of the features the GPU versions compute, every one structured."""
    features = frozenset(GPU_FEATURES)
    return case_specs(variants=(info.variant,), dtypes=(dtype,), ln_eps=info.ln_eps, structure=None,
                      features=features, **sizes).filter(lambda s: not s.structure.is_default)


@pytest.mark.parametrize("name", GPU_NAMES)
def test_the_gpu_versions_declare_the_features_their_kernels_compute(name):
    impl, info = emulated(name)
    assert info.configurable and info.structures == frozenset(GPU_FEATURES)
    for option in (dict(coupled_input_forget=True), dict(cell_clip=1.0)):
        with pytest.raises(ValueError, match="without CIFG or cell clipping"):
            impl.with_structure(Structure(**option))
    if info.variant != "layernorm":
        layered = Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True)
        assert impl.with_structure(layered).structure == layered


@pytest.mark.parametrize("name", GPU_NAMES)
@settings(max_examples=15)
@given(data=st.data())
def test_emulated_layer_equals_its_numpy_twin_bit_for_bit(name, data):
    """Layers, directions, lengths and projections: the layer loops over the emulated fused cell give the
    NumPy stacked version's bits, in every drawn structure."""
    impl, info = emulated(name)
    spec = data.draw(structured_specs(info, "float64", max_T=5, max_B=4, max_D=5, max_H=6), label="spec")
    case = build_case(spec)
    outputs, grads = forward_backward(impl.with_structure(case.structure), case)
    ref, want = forward_backward(NUMPY_TWIN[name]().with_structure(case.structure), case)
    for key, a, b in zip(("y", "h_T", "c_T"), outputs, ref):
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert list(grads) == list(want)
    for key in want:
        np.testing.assert_array_equal(grads[key], want[key], err_msg=f"d{key}")


@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", GPU_NAMES)
@settings(max_examples=8)
@given(data=st.data())
def test_emulated_layer_matches_finite_differences(name, dtype, data):
    impl, info = emulated(name)
    spec = data.draw(structured_specs(info, dtype, **SIZES), label="spec")
    records = check(impl, info, spec)
    assert {r.status for r in records} == {"pass"}


# --- Planted bugs in the kernel tables are caught ----------------------------------------------------


def _replace_expr(kernel: Kernel, old: str, new: str) -> Kernel:
    """``kernel`` with the one statement whose expression is ``old`` changed to ``new``."""
    hits = 0
    steps = []
    for step in kernel.steps:
        body = []
        for s in step.body:
            if getattr(s, "expr", None) == old:
                s = dataclasses.replace(s, expr=new)
                hits += 1
            body.append(s)
        steps.append(dataclasses.replace(step, body=tuple(body)))
    assert hits == 1, f"{old!r} occurs {hits} times in {kernel.name}"
    return dataclasses.replace(kernel, steps=tuple(steps))


PLANTED = {
    "vanilla: dL/dc_{t-1} through the input gate": ("cupy", 1, "dc_t * f", "dc_t * i"),
    "vanilla: tanh' written as 1 - tanh": ("cupy", 1, "dc + (1 - tc * tc) * o * dh_all", "dc + (1 - tc) * o * dh_all"),
    "peephole: o sees c_{t-1}": ("cupy-peephole", 0, "sigmoid(a_o + r_o + c_t * p_o)",
                                 "sigmoid(a_o + r_o + c_prev * p_o)"),
    "peephole: the p_f path of dc_{t-1} left out": ("cupy-peephole", 1, "dc_t * f + da_i * p_i + da_f * p_f",
                                                    "dc_t * f + da_i * p_i"),
    "layernorm: unbiased variance": ("cupy-layernorm", 0, "1 / sqrt(sq_c / H + eps)", "1 / sqrt(sq_c / (H - 1) + eps)"),
    "layernorm: LN backward without the mean(dn * n) term": (
        "cupy-layernorm", 1, "r_cell * (dn - m1_c - n_cell * m2_c)", "r_cell * (dn - m1_c)"),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_a_planted_bug_in_a_kernel_table_is_caught(bug):
    name, which, old, new = PLANTED[bug]
    impl, info = emulated(name)
    cell = type(impl.cell)()
    kernels = [cell.forward_kernel, cell.backward_kernel]
    kernels[which] = _replace_expr(kernels[which], old, new)
    cell.forward_kernel, cell.backward_kernel = kernels
    impl.cell = cell
    spec = CaseSpec(variant=info.variant, dtype="float64", T=4, B=2, D=3, H=5, seed=7, weight_scale="unit")
    records = check_case(InProcessSubject(impl, info), [ORACLE], build_case(spec))
    assert any(r.status == "fail" for r in records), [(r.quantity, r.status) for r in records]
    # and the table as written passes the same case
    check(*emulated(name), spec)


# --- The kernel language refuses what would be wrong on a GPU ----------------------------------------


def _kernel(*steps, arrays=(("x", "in"), ("y", "out")), scalars=()):
    return Kernel("k", arrays=arrays, steps=tuple(steps), scalars=scalars)


@pytest.mark.parametrize(("steps", "message"), [
    ((Phase((Load("v", "x", "b * H + j"), Store("y", "b * H + j", "v * 0.5"))),), "non-negative integer constants"),
    ((Phase((Store("y", "b * H + j", "w"),)),), r"\['w'\] used before being defined"),
    ((Phase((Load("v", "x", "b * H + j"), Store("x", "b * H + j", "v"))),), "'x' is an 'in' array"),
    ((Phase((Load("v", "z", "j"),)),), "unknown array 'z'"),
    ((Phase((Load("v", "x", "b * H - j"),)),), r"only the operators \+ \*"),
    ((Phase((Load("v", "x", "b * H + k"),)),), "an index may use only"),
    ((Phase((Load("v", "x", "j"), Store("y", "j", "v ** 2"))),), r"only the operators \+ - \* /"),
    ((Phase((Load("v", "x", "j"), Store("y", "j", "exp(v)"))),), "calls of one argument to"),
    ((Phase((Load("v", "x", "j"), Let("v", "v + v"))),), "'v' is already defined"),
    ((Phase((Load("b", "x", "j"),)),), "'b' cannot be a variable name"),
    ((Phase((Load("buf_x", "x", "j"),)),), "'buf_x' cannot be a variable name"),
    ((Row((Load("v", "x", "b * H + j"),)),), "a Row index cannot use the unit j"),
    ((Phase((Load("v", "x", "j"), Sum("s", "v"))), Row((Sum("s2", "s"),))), "a Sum belongs in a Phase"),
    ((Phase((Load("v", "x", "j"), Sum("s", "v"))), Phase((Load("s", "x", "j"),))), "'s' is already defined"),
    ((Phase((Load("v", "x", "j"), Store("y", "b * H + j", "v"), Load("w", "y", "b * H"))),),
     "after this phase stored it"),
    ((Row((Load("v", "x", "b"), Store("y", "b", "v"))), Phase((Load("w", "y", "b * H + j"),))),
     "stored from a Row"),
    ((Row((Let("m", "H / B"),)),), "integer arithmetic of t, B, H"),
    ((Row((Let("m", "H"),)),), "integer arithmetic of t, B, H"),
])
def test_the_kernel_language_refuses(steps, message):
    with pytest.raises(ValueError, match=message):
        _kernel(*steps)


def test_emulation_detects_races_and_out_of_bounds_indices():
    x, y = np.arange(6.0).reshape(2, 3), np.zeros((2, 3))
    # every block stores y[j]: blocks never synchronize, so the result depends on their order
    k = _kernel(Phase((Load("v", "x", "b * H + j"), Store("y", "j", "v"))))
    with pytest.raises(AssertionError, match="two blocks store"):
        gpu.emulate(k, {"x": x, "y": y}, t=0, B=2, H=3)
    # a thread reads an element another thread of the same phase stores
    k = _kernel(Phase((Load("v", "y", "b * H"), Store("y", "b * H + j", "v + v"))), arrays=(("y", "out"),))
    with pytest.raises(AssertionError, match="one thread loads what another stores"):
        gpu.emulate(k, {"y": y}, t=0, B=2, H=3)
    # an index past the end
    k = _kernel(Phase((Load("v", "x", "b * H + j + 1"), Store("y", "b * H + j", "v"))))
    with pytest.raises(IndexError, match=r"reaches \[1, 6\], outside its 6 elements"):
        gpu.emulate(k, {"x": x, "y": y}, t=0, B=2, H=3)
    # a non-contiguous buffer
    k = _kernel(Phase((Load("v", "x", "b * H + j"), Store("y", "b * H + j", "v"))))
    with pytest.raises(ValueError, match="must be C-contiguous"):
        gpu.emulate(k, {"x": np.asfortranarray(x), "y": y}, t=0, B=2, H=3)
    # and the same kernel, correct, runs: y = x
    gpu.emulate(k, {"x": x, "y": y}, t=0, B=2, H=3)
    np.testing.assert_array_equal(y, x)


def test_emulated_sum_is_a_row_reduction_visible_to_later_phases():
    x = np.arange(8.0).reshape(2, 4)
    y = np.zeros_like(x)
    k = _kernel(Phase((Load("v", "x", "b * H + j"), Sum("s", "v"))), Row((Let("m", "s / H"),)),
                Phase((Load("v", "x", "b * H + j"), Store("y", "b * H + j", "v - m"))))
    gpu.emulate(k, {"x": x, "y": y}, t=0, B=2, H=4)
    np.testing.assert_array_equal(y, x - x.mean(axis=1, keepdims=True))


# --- The generated CUDA source ------------------------------------------------------------------------

ALL_KERNELS = [k for pair in gpu.KERNELS.values() for k in pair]


def test_block_size_is_whole_warps_and_covers_small_rows():
    for H in (1, 5, 31, 32, 33, 100, 256, 257, 600, 4096):
        n = gpu.block_size(H)
        assert n % 32 == 0 and 32 <= n <= gpu.MAX_THREADS
        assert n >= min(H, gpu.MAX_THREADS)
    assert gpu.MAX_THREADS // 32 <= 32  # lstm_block_sum keeps one partial per warp in 32 slots


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=lambda k: k.name)
def test_source_parameters_are_in_the_order_the_launcher_passes(kernel):
    src = gpu.cuda_source([kernel])
    head = re.search(rf"__global__ void {kernel.name}\((.*?)\) {{", src).group(1)
    params = head.split(", ")
    assert [p.split()[-1] for p in params] == [f"buf_{n}" for n in kernel.array_names] + ["t", "B", "H",
                                                                                         *kernel.scalars]
    assert params[:len(kernel.arrays)] == [f"{'const ' if kind == 'in' else ''}T* buf_{n}" for n, kind in kernel.arrays]
    assert params[len(kernel.arrays):] == ["const long long t", "const long long B", "const long long H",
                                           *(f"const T {s}" for s in kernel.scalars)]
    body = src[src.index(f"// {kernel.name}:"):]
    assert re.search(r"\d\.\d|\d[eE]-?\d|\d[fF]\b", body) is None, "a float literal: double arithmetic in float kernels"
    phases = [s for s in kernel.steps if isinstance(s, Phase)]
    reductions = sum(any(isinstance(x, Sum) for x in p.body) for p in phases)
    assert body.count("lstm_block_sum<T,") == reductions
    # a barrier after every phase that another follows: in the reduction, or on its own
    plain = sum(not any(isinstance(x, Sum) for x in p.body) for p in phases[:-1])
    assert body.count("__syncthreads();") == plain
    assert body.count("for (long long j = threadIdx.x; j < H; j += blockDim.x)") == len(phases)


class FakeCompiledKernel:
    """Stands for the compiled kernel: checks each positional argument against the C signature in the
    generated source (pointer -> an array of the dtype, long long -> numpy.int64, T -> the dtype's
    scalar) and the launch shape, then runs the emulation with the arguments bound by those names."""

    calls = 0

    def __init__(self, kernel: Kernel, dtype: np.dtype):
        self.kernel, self.dtype = kernel, np.dtype(dtype)
        head = re.search(rf"__global__ void {kernel.name}\((.*?)\) {{", gpu.cuda_source([kernel])).group(1)
        self.params = [(p.rsplit(" ", 1)[0], p.rsplit(" ", 1)[1]) for p in head.split(", ")]

    def __call__(self, grid, block, args):
        type(self).calls += 1
        assert len(args) == len(self.params)
        arrays, ints, scalars = {}, {}, {}
        for (ctype, name), arg in zip(self.params, args):
            if ctype.endswith("T*"):
                assert isinstance(arg, np.ndarray) and arg.dtype == self.dtype, (name, type(arg))
                arrays[name.removeprefix("buf_")] = arg
            elif ctype == "const long long":
                assert type(arg) is np.int64, (name, type(arg))
                ints[name] = int(arg)
            else:
                assert ctype == "const T" and type(arg) is self.dtype.type, (name, ctype, type(arg))
                scalars[name] = arg
        assert grid == (ints["B"],)
        assert len(block) == 1 and block[0] % 32 == 0 and 32 <= block[0] <= 1024
        gpu.emulate(self.kernel, arrays, t=ints["t"], B=ints["B"], H=ints["H"], scalars=scalars)


@pytest.mark.parametrize("name", GPU_NAMES)
def test_the_launch_path_passes_what_the_cuda_signature_expects(name, monkeypatch):
    """Every kernel call goes through the launcher (_launch) to a stand-in for the compiled kernel."""
    monkeypatch.setattr(launch, "_function", FakeCompiledKernel)
    monkeypatch.setattr(launch, "run_kernel", launch._launch)
    FakeCompiledKernel.calls = 0
    impl, info = emulated(name)
    for dtype in DEFAULT_DTYPES:
        spec = CaseSpec(variant=info.variant, dtype=dtype, T=3, B=2, D=3, H=5, seed=8)
        check(impl, info, spec)
    assert FakeCompiledKernel.calls == 2 * 2 * 3  # dtypes x directions x steps


class PointerLauncher:
    """Stands in for the GPU launcher (``impls.gpu.launch._CupyLauncher``) over NumPy arrays.

    A pointer is an array's address. A kernel call resolves each pointer argument to the buffer it
    points into and hands the call to FakeCompiledKernel (which checks the C signature and
    emulates); a GEMM resolves its three pointers and multiplies with NumPy, as the step-by-step
    path does, so the pointer loops must equal the NumPy twin bit for bit.
    """

    def __init__(self):
        # start address -> the buffer a pointer was taken into; weak, as a device pointer does not
        # keep memory in use (a workspace must be able to see the buffer free again)
        self.bases: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self.kernel_calls = self.gemm_calls = 0

    def pointer(self, a):
        base = a
        while isinstance(base.base, np.ndarray):
            base = base.base
        assert base.flags.c_contiguous
        self.bases[base.ctypes.data] = base
        return a.ctypes.data

    def resolve(self, ptr, dtype):
        dtype = np.dtype(dtype)
        for start, base in list(self.bases.items()):
            if start <= ptr < start + base.nbytes:
                if base.dtype == np.uint8:  # an arena (ArenaNumPy): its arrays are typed views of bytes
                    assert (ptr - start) % dtype.itemsize == 0
                    rest = base.reshape(-1)[ptr - start:]
                    return rest[:rest.size // dtype.itemsize * dtype.itemsize].view(dtype)
                assert base.dtype == dtype and (ptr - start) % base.itemsize == 0
                return base.reshape(-1)[(ptr - start) // base.itemsize:]
        raise AssertionError(f"pointer {ptr:#x} points into no buffer the loop took a pointer of")

    def function(self, kernel, dtype):
        compiled = FakeCompiledKernel(kernel, dtype)
        n = len(kernel.arrays)

        def fn(grid, block, args):
            self.kernel_calls += 1
            assert all(type(p) is int for p in args[:n]), [type(p) for p in args[:n]]
            compiled(grid, block, (*(self.resolve(p, np.dtype(dtype)) for p in args[:n]), *args[n:]))

        return fn

    def gemm(self, dtype, *, M, N, K):
        def g(a, b, c):
            self.gemm_calls += 1
            A, Bm, C = (self.resolve(p, np.dtype(dtype))[: r * k].reshape(r, k)
                        for p, r, k in ((a, M, K), (b, K, N), (c, M, N)))
            np.matmul(A, Bm, out=C)

        return g

    def run(self, key, loop):
        hash(key)  # the key a graph would be kept under
        loop()


class GraphPointerLauncher(PointerLauncher, launch.GraphCache):
    """A PointerLauncher that replays loops by the GPU launcher's own policy (``launch.GraphCache``),
    with a stand-in for CUDA graphs: a capture records the loop's calls (nothing runs, as in a CUDA
    capture), and a replay runs the record: the same calls with the same pointers, reading what the
    buffers hold at the time."""

    def __init__(self):
        PointerLauncher.__init__(self)
        launch.GraphCache.__init__(self)
        self.recording: list | None = None

    def _recorded(self, call):
        def fn(*args):
            if self.recording is not None:
                self.recording.append((call, args))
            else:
                call(*args)

        return fn

    def function(self, kernel, dtype):
        return self._recorded(super().function(kernel, dtype))

    def gemm(self, dtype, *, M, N, K):
        return self._recorded(super().gemm(dtype, M=M, N=N, K=K))

    run = launch.GraphCache.run

    def direct(self, loop):
        loop()

    def capture(self, loop):
        self.recording = []
        try:
            loop()
            return self.recording
        finally:
            self.recording = None

    def replay(self, graph):
        for call, args in graph:
            call(*args)


class RefusingLauncher(GraphPointerLauncher):
    """Its captures fail, as on a driver that cannot capture."""

    def capture(self, loop):
        raise RuntimeError("capture refused")


def _loop_calls(launcher, key, log, tag):
    launcher.run(key, lambda: log.append(tag))


def test_graph_policy_direct_then_captured_then_replayed_and_a_refused_capture_runs_directly():
    """The launcher's policy itself (launch.GraphCache), with stand-ins for CUDA."""
    launcher, log = GraphPointerLauncher(), []
    for _ in range(3):
        _loop_calls(launcher, "a", log, "a")
    assert log == ["a", "a"]  # direct, then captured (the recording ran nothing), replayed, replayed
    assert launcher.counts == {"launched": 1, "captured": 1, "replayed": 2}
    launcher.graphs = False
    _loop_calls(launcher, "a", log, "a")  # turned off: step by step, the graph kept aside
    assert log == ["a", "a", "a"] and launcher.counts["replayed"] == 2
    refusing, log = RefusingLauncher(), []
    for _ in range(4):
        _loop_calls(refusing, "b", log, "b")
    assert log == ["b"] * 4 and refusing.counts == {"launched": 4, "captured": 0, "replayed": 0}
    assert refusing.refused == {"b": "RuntimeError: capture refused"}  # tried once, not again


def test_graph_policy_keeps_the_most_recently_replayed_graphs():
    launcher, log = GraphPointerLauncher(), []
    launcher.GRAPHS = 2
    for key in ("a", "b", "c"):
        for _ in range(2):
            _loop_calls(launcher, key, log, key)
    assert list(launcher._graphs) == ["b", "c"]
    _loop_calls(launcher, "a", log, "a")  # its graph was dropped, but it is still known as seen: captured again
    assert launcher.counts["captured"] == 4 and list(launcher._graphs) == ["c", "a"]


class ArenaNumPy:
    """NumPy as an array namespace whose new arrays all come from one arena, in the order they are
    made: after :meth:`reset`, a call that makes the same arrays gets the same addresses again, as
    CuPy's memory pool gives a repeated call the same buffers (what lets a graph be replayed)."""

    def __init__(self, nbytes: int = 16 << 20):
        self.arena = np.zeros(nbytes, np.uint8)
        self.offset = 0

    def reset(self):
        self.offset = 0

    def _placed(self, a):
        if not isinstance(a, np.ndarray) or a.base is not None or a.dtype.hasobject:
            return a  # a view (of the arena, or of the caller's data), or no array at all
        start = -(-self.offset // 64) * 64
        assert start + a.nbytes <= self.arena.size, "arena too small for this test"
        out = self.arena[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        self.offset = start + a.nbytes
        return out

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value
        return lambda *args, **kwargs: self._placed(value(*args, **kwargs))


@pytest.mark.parametrize("name", GPU_NAMES)
@settings(max_examples=10)
@given(data=st.data())
def test_pointer_loops_equal_the_numpy_twin_bit_for_bit(name, data):
    """The GPU time loops (every step's arguments as pointers, computed before the loop; cuBLAS on
    pointers) run over NumPy through a stand-in launcher: same results as the NumPy twin, bit for bit."""
    impl, info = emulated(name)
    spec = data.draw(case_specs(variants=(info.variant,), max_T=5, max_B=3, max_D=5, max_H=36), label="spec")
    case = build_case(spec)
    launcher = PointerLauncher()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "launcher_for", lambda a: launcher)
        outputs, grads = forward_backward(impl, case)
    assert_equals_numpy_twin_bit_for_bit(name, case, outputs, grads)
    assert launcher.kernel_calls == launcher.gemm_calls == 2 * spec.T


@pytest.mark.parametrize("name", GPU_NAMES)
def test_loops_met_again_are_replayed_and_compute_what_a_direct_run_does(name):
    """The GPU loops run through a stand-in that replays a loop as a CUDA graph once its key comes a
    second time. Calls that meet the very same buffers replay (reading the new data there) and equal
    the NumPy twin bit for bit; calls in the same buffers that differ in anything a launch depends
    on (fewer steps, another batch size, another LayerNorm eps) must not replay an old graph, and
    equal the twin too."""
    impl, info = emulated(name)
    impl.xp = arena = ArenaNumPy()
    launcher = GraphPointerLauncher()
    base = CaseSpec(variant=info.variant, dtype="float32", T=4, B=3, D=5, H=6, seed=0)
    calls = [base.replace(seed=s) for s in (1, 2, 3)]  # the second is captured, the third replayed
    calls += [base.replace(T=3, seed=4), base.replace(B=2, seed=5), base.replace(seed=6)]
    if info.variant == "layernorm":
        calls += [base.replace(seed=7, ln_eps=1e-2), base.replace(seed=8, ln_eps=1e-2)]
    replayed = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "launcher_for", lambda a: launcher)
        for spec in calls:
            if hasattr(impl, "ln_eps"):
                impl.ln_eps = spec.ln_eps
            case = build_case(spec)
            arena.reset()
            before = launcher.counts["replayed"]
            outputs, grads = forward_backward(impl, case)
            replayed.append(launcher.counts["replayed"] - before)
            assert_equals_numpy_twin_bit_for_bit(name, case, [np.array(a) for a in outputs],
                                                 {k: np.array(v) for k, v in grads.items()})
    # Forward and backward of each call: direct, then captured and replayed, then replayed; new steps,
    # a new batch size: direct; the first shape again: replayed. A new eps changes the forward kernel's
    # arguments (direct, then captured), not the backward's, which reads the saved statistics.
    want = [0, 2, 2, 0, 0, 2] + ([1, 2] if info.variant == "layernorm" else [])
    assert replayed == want
    assert launcher.counts["captured"] == (3 if info.variant == "layernorm" else 2)


@pytest.mark.parametrize("name", GPU_NAMES)
def test_a_training_loop_over_the_workspace_replays_its_loops(name):
    """On the GPU every array comes from a workspace that hands out the first free buffer of a shape.
    In a training loop the last call's results (cache included) are still held while the next call
    runs, so calls take turns with two sets of buffers, and after a few calls every loop replays.
    Emulated here with the same workspace over NumPy and the replaying stand-in launcher; each call
    equals the NumPy twin bit for bit."""
    impl, info = emulated(name)
    impl.xp = Pooled(Workspace(min_bytes=0))
    launcher = GraphPointerLauncher()
    case = build_case(CaseSpec(variant=info.variant, dtype="float64", T=5, B=3, D=4, H=6, seed=0))
    replayed = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "launcher_for", lambda a: launcher)
        for _ in range(16):
            before = launcher.counts["replayed"]
            y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
            grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
            replayed.append(launcher.counts["replayed"] - before)
            assert_equals_numpy_twin_bit_for_bit(name, case, (y, h_T, c_T), grads)
    assert replayed[:2] == [0, 0] and replayed[-4:] == [2, 2, 2, 2], replayed


class OnDevice(np.ndarray):
    """A NumPy array that stands for one on the device (QueuedDevice's)."""


class QueuedDevice:
    """Stands in for ``transfer.CupyDevice`` over NumPy. Copies to the device are queued, as on a
    stream, and run only when an event after them is waited for (or at :meth:`synchronize`): an
    uploader that wrote over its staging buffer while copies out of it were pending would deliver
    the wrong bytes."""

    def __init__(self):
        self.queue: list = []
        self.done = 0
        self.copies = 0

    def is_host(self, a):
        return not isinstance(a, OnDevice)

    def asarray(self, a, dtype):
        return np.array(a, dtype=dtype).view(OnDevice)

    def empty(self, shape, dtype):
        return np.full(shape, np.nan, dtype).view(OnDevice)  # poisoned: every byte must be copied

    def pointer(self, a):
        return a.ctypes.data

    def pinned(self, nbytes):
        return np.zeros(nbytes, np.uint8)

    def copy_async(self, dst, src, nbytes):
        self.queue.append((dst, src, nbytes))
        self.copies += 1

    def record(self):
        self.queue.append(None)
        return len(self.queue)

    def wait(self, event):
        import ctypes

        for dst, src, nbytes in filter(None, self.queue[self.done:event]):
            ctypes.memmove(dst, src, nbytes)
        self.done = max(self.done, event)

    def synchronize(self):
        self.wait(len(self.queue))


def test_uploads_deliver_every_array_in_the_dtype_asked_for():
    """Arrays of every kind (a cast from float64, a transposed view, 0-d, empty, many pieces, already
    on the device) arrive equal, C-contiguous, in the dtype; a second upload waits for the copies
    of the first before it reuses the buffer; the caller may change its arrays once upload returns."""
    from impls.gpu.transfer import Uploader

    rng = np.random.default_rng(0)
    device = QueuedDevice()
    uploader = Uploader(device, threads=3, piece_bytes=1000)
    first = [rng.standard_normal((50, 7, 3)), rng.standard_normal((9, 40)).T, np.array(2.5), np.zeros((0, 4)),
             rng.standard_normal(1).view(OnDevice)]
    want_first = [np.array(a, dtype=np.float32) for a in first]
    got_first = uploader.upload(first, np.float32)
    for a in first[:2]:
        a[...] = 7.0  # the caller's arrays change before the device has copied anything
    second = [rng.standard_normal((30, 11)).astype(np.float32), rng.standard_normal(5).astype(np.float64)]
    got_second = uploader.upload(second)  # each in its own dtype
    device.synchronize()
    # Pieces of whole rows, at most 1000 bytes: 4200 bytes in rows of 84 -> 5; 1440 in rows of 36 -> 2;
    # the 0-d array 1, the empty one none; 1320 in rows of 44 -> 2; 40 bytes -> 1.
    assert device.copies == 5 + 2 + 1 + 0 + 2 + 1
    for got, want in zip(got_first + got_second, want_first + [a.copy() for a in second]):
        assert isinstance(got, OnDevice) and got.flags.c_contiguous
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_an_upload_that_fails_leaves_the_next_one_whole():
    """A piece that cannot be staged (an object array) fails the upload; no thread may still be writing
    into the buffer, and the copies already issued must be done, when the next upload reuses it."""
    import time

    from impls.gpu.transfer import Uploader

    class SlowFloat:
        def __float__(self):
            time.sleep(0.001)
            return 7.0

    rng = np.random.default_rng(2)
    device = QueuedDevice()
    uploader = Uploader(device, threads=2, piece_bytes=256)
    bad = np.array([object()] * 40, dtype=object)  # one piece, fails at once
    slow = np.array([[SlowFloat() for _ in range(300)]], dtype=object)  # one piece (one row), staged for 0.3 s
    with pytest.raises(TypeError):
        uploader.upload([bad, slow], np.float32)
    good = [rng.standard_normal((30, 9)), np.zeros((5, 0))]  # staged in the same buffer, where `slow` was
    got = uploader.upload(good, np.float32)
    time.sleep(0.5)  # the device copies later, as a busy GPU does
    device.synchronize()
    np.testing.assert_array_equal(got[0], good[0].astype(np.float32))
    assert got[1].shape == (5, 0)


def test_uploads_too_large_to_stage_go_through_the_plain_copy():
    from impls.gpu.transfer import Uploader

    device = QueuedDevice()
    a = np.arange(200.0)  # 800 bytes as float32
    (got,) = Uploader(device, limit_bytes=512).upload([a], np.float32)
    assert device.copies == 0
    np.testing.assert_array_equal(got, a.astype(np.float32))


def test_step_arguments_refuse_views_that_do_not_advance_by_a_fixed_stride():
    kernel = gpu.KERNELS["vanilla"][0]
    buf = np.zeros((4, 2, 16), np.float32)
    fixed = {n: np.zeros((2, 16), np.float32) for n in kernel.array_names}
    bad = lambda t: {**fixed, "a": buf[t * t]}  # noqa: E731 - starts at rows 0, 1, 4: not a fixed stride
    with pytest.raises(ValueError, match="do not advance by a fixed stride"):
        launch.step_args(PointerLauncher(), kernel, lambda t: bad(t) if t < 2 else {**fixed, "a": buf[3]},
                       T=3, B=2, H=4, dtype=np.float32, scalars={})
    strided = {**fixed, "c": np.zeros((2, 32), np.float32)[:, ::2]}
    with pytest.raises(ValueError, match="'c' must be C-contiguous"):
        launch.step_args(PointerLauncher(), kernel, lambda t: strided, T=1, B=2, H=4, dtype=np.float32, scalars={})
    with pytest.raises(TypeError, match="'h': expected dtype float32, got float64"):
        launch.step_args(PointerLauncher(), kernel, lambda t: {**fixed, "h": np.zeros((2, 4))}, T=1, B=2, H=4,
                       dtype=np.float32, scalars={})


def _nvrtc():
    pytest.importorskip("cupy", reason="cupy is not installed: the CUDA source is not compiled here")
    from cupy.cuda import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC is not available ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                    f"pip install nvidia-cuda-nvrtc-cu12 to compile the kernels without a GPU")
    return nvrtc


@pytest.mark.parametrize("arch", ["compute_75", "compute_90"])
@pytest.mark.parametrize("ctype", ["float", "double"])
def test_generated_source_compiles_with_nvrtc_without_a_gpu(ctype, arch):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(gpu.cuda_source(ALL_KERNELS), "lstm_kernels.cu", (), ())
    try:
        for k in ALL_KERNELS:
            nvrtc.addNameExpression(prog, f"{k.name}<{ctype}>")
        try:
            nvrtc.compileProgram(prog, (f"--gpu-architecture={arch}", "--device-as-default-execution-space"))
        except nvrtc.NVRTCError:
            pytest.fail("the generated CUDA source does not compile:\n" + nvrtc.getProgramLog(prog))
        log = nvrtc.getProgramLog(prog).strip()
        assert not log, f"NVRTC warnings:\n{log}"
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        for k in ALL_KERNELS:
            assert nvrtc.getLoweredName(prog, f"{k.name}<{ctype}>") in ptx
    finally:
        nvrtc.destroyProgram(prog)
    f64 = re.findall(r"^\s*\S+\.f64\b.*$", ptx, re.M)
    if ctype == "float":
        assert not f64, "double arithmetic in the float kernels:\n" + "\n".join(f64[:10])
    else:
        assert f64


def test_cupy_accepts_the_module_without_compiling_it():
    """Constructing the RawModule the launcher builds needs no GPU (compilation waits for first use)."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed")
    for k in ALL_KERNELS:
        module = cupy.RawModule(code=gpu.cuda_source([k]), name_expressions=k.name_expressions())
        assert module.code == gpu.cuda_source([k])
        assert tuple(module.name_expressions) == (f"{k.name}<float>", f"{k.name}<double>")


# --- The CUDA PyTorch oracle, without a GPU --------------------------------------------------------


def test_torch_cuda_oracle_reports_its_availability():
    from oracles.torch_cuda_oracle import TorchCudaLSTMOracle

    avail = TorchCudaLSTMOracle().availability()
    if importlib.util.find_spec("torch") is None:
        assert avail.reason == "torch is not installed"
        return
    import torch

    if torch.cuda.is_available():
        assert avail.available and "cudnn" in avail.versions
    else:
        assert not avail.available
        assert avail.reason == "torch CUDA is not available (torch.cuda.is_available() is False)"
        why = TorchCudaLSTMOracle().unsupported_reason("vanilla", "float32")
        assert why == f"torch-cuda-lstm unavailable: {avail.reason}"


def test_strict_fp32_turns_tf32_off_and_restores_the_setting():
    torch = pytest.importorskip("torch")
    from oracles.torch_cuda_oracle import strict_fp32

    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        before = rnn.fp32_precision
        with strict_fp32(torch):
            assert rnn.fp32_precision == "ieee"
        assert rnn.fp32_precision == before
    else:
        before = torch.backends.cudnn.allow_tf32
        with strict_fp32(torch):
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 == before


# --- On a GPU -----------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"needs CuPy and a CUDA GPU: {REASON}")


def _cupy():
    import cupy

    return cupy


class NumpyTwinOracle(Oracle):
    """The NumPy stacked implementation of a variant as an oracle, computing in the case's own dtype."""

    compute_dtypes = ("float64", "float32")
    structures = frozenset(FEATURES)

    def __init__(self, name: str):
        self.twin = NUMPY_TWIN[name]()
        self.name = f"numpy-{self.twin.name}"
        self.variants = (self.twin.variant,)

    def compute_dtype_for(self, dtype):
        return dtype

    def reference(self, case) -> Reference:
        if hasattr(self.twin, "ln_eps"):
            self.twin.ln_eps = case.ln_eps
        twin = self.twin.with_structure(case.structure)
        extra = {"lengths": case.lengths} if case.lengths is not None else {}
        y, h_T, c_T, cache = twin.forward(case.x, case.h0, case.c0, case.params, **extra)
        grads = twin.backward(case.dy, case.dh_T, case.dc_T, cache)
        return Reference(compute_dtype=case.dtype, outputs={"y": y, "h_T": h_T, "c_T": c_T}, gradients=grads)


def _on_device(name: str):
    impl = CLASSES[name]()
    return impl, validate(impl)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("variant", sorted(CELLS))
@pytest.mark.parametrize("fused_step", [False, True], ids=["kernel", "gemm+kernel"])
@pytest.mark.parametrize(("B", "H"), [(1, 2), (3, 7), (2, 33), (4, 257), (2, 600), (64, 512)])
def test_gpu_kernel_against_the_numpy_cell(variant, dtype, fused_step, B, H):
    """Each fused kernel (and each step: GEMM + kernel) on the GPU against the NumPy cell, every buffer
    it writes, with the harness's tolerance for the dtype (values forward, gradients backward). H from
    2 to 600: one partial warp, several warps, and threads that take several units."""
    from harness.compare import tolerance

    cupy = _cupy()
    np_cell, fused = CELLS[variant]
    seed = B * 1000 + H
    want = _run_steps(np_cell, variant, dtype, B, H, seed, fused_step=fused_step)
    got = _run_steps(fused, variant, dtype, B, H, seed, fused_step=fused_step, xp=cupy)
    cupy.cuda.Device().synchronize()
    assert set(got) == set(want)
    for key in want:
        kind = "gradients" if key in ("dh", "dc", "da") or key.startswith("G.") else "values"
        tol = tolerance(dtype, kind)
        scale = max(1.0, float(np.abs(want[key]).max(initial=0.0)))
        np.testing.assert_allclose(cupy.asnumpy(got[key]), want[key], rtol=tol.rtol, atol=tol.atol * scale,
                                   err_msg=f"{variant} {dtype} {key} B={B} H={H}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", GPU_NAMES)
@given(data=st.data())
def test_gpu_matches_finite_differences(name, dtype, data):
    assert_matches_finite_differences(*_on_device(name), dtype, data)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", GPU_NAMES)
@settings(max_examples=25)
@given(data=st.data())
def test_gpu_matches_its_numpy_twin(name, dtype, data):
    """Against the NumPy stacked version in the same dtype, with the harness's tolerance for the dtype;
    H up to 300 so that rows span several warps and threads take several units."""
    impl, info = _on_device(name)
    spec = data.draw(case_specs(variants=(info.variant,), dtypes=(dtype,), max_T=6, max_B=5, max_D=40, max_H=300,
                                ln_eps=info.ln_eps), label="spec")
    check(impl, info, spec, oracles=(NumpyTwinOracle(name),))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", GPU_NAMES)
@settings(max_examples=15)
@given(data=st.data())
def test_gpu_agrees_with_every_available_oracle(name, dtype, data):
    """Every CPU oracle that is installed, and cuDNN (torch-cuda-lstm) where a CUDA PyTorch is."""
    impl, info = _on_device(name)
    oracles = [o for o in registry.oracles() if o.availability().available]
    spec = data.draw(case_specs(variants=(info.variant,), dtypes=(dtype,), ln_eps=info.ln_eps, **SIZES), label="spec")
    records = check(impl, info, spec, oracles=oracles)
    compared = {r.oracle for r in records if r.status == "pass"}
    assert compared == {o.name for o in oracles if o.unsupported_reason(info.variant, dtype) is None}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_contract_details(name):
    """Outputs are CuPy arrays of the input dtype, inputs are not modified, a second backward on the
    same forward is bit for bit the first, and a large case agrees with the NumPy twin."""
    cupy = _cupy()
    impl, info = _on_device(name)
    for dtype in DEFAULT_DTYPES:
        case = build_case(CaseSpec(variant=info.variant, dtype=dtype, T=3, B=2, D=3, H=4, seed=5))
        before = case.copy()
        y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        first = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
        second = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
        assert all(isinstance(a, cupy.ndarray) and a.dtype == np.dtype(dtype) for a in (y, h_T, c_T, *first.values()))
        for k in first:
            np.testing.assert_array_equal(cupy.asnumpy(first[k]), cupy.asnumpy(second[k]), err_msg=k)
        for key, value in before.arrays().items():
            np.testing.assert_array_equal(case.arrays()[key], value, err_msg=key)
    spec = CaseSpec(variant=info.variant, dtype="float64", T=5, B=64, D=96, H=512, seed=9)
    check(impl, info, spec, oracles=(NumpyTwinOracle(name),))


@pytest.mark.gpu
@needs_gpu
def test_gpu_layernorm_uses_its_declared_eps():
    impl, _ = _on_device("cupy-layernorm")
    impl.ln_eps = 0.5
    info = validate(impl)
    spec = CaseSpec(variant="layernorm", dtype="float64", T=3, B=2, D=3, H=4, seed=1, weight_scale="unit", ln_eps=0.5)
    check(impl, info, spec)
    records = check_case(InProcessSubject(impl, info), [ORACLE], build_case(spec.replace(ln_eps=1e-5)))
    assert {r.quantity for r in records if r.status == "fail"} >= {"y", "h_T", "c_T"}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", GPU_NAMES)
@settings(max_examples=10)
@given(data=st.data())
def test_gpu_layer_matches_finite_differences_and_its_numpy_twin(name, dtype, data):
    """Stacked layers, both directions, lengths and projections on the device, against finite
    differences and the NumPy stacked version in the same structure, every quantity compared."""
    impl, info = _on_device(name)
    spec = data.draw(structured_specs(info, dtype, **SIZES), label="spec")
    records = check(impl, info, spec, oracles=(ORACLE, NumpyTwinOracle(name)))
    assert {r.status for r in records} == {"pass"}
    assert {r.oracle for r in records} == {ORACLE.name, NumpyTwinOracle(name).name}


def _on_host(outputs, grads):
    cupy = _cupy()
    return [cupy.asnumpy(a) for a in outputs], {k: cupy.asnumpy(v) for k, v in grads.items()}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_replayed_graphs_compute_what_direct_launches_do(name, dtype):
    """Calls of one shape, one after another: a loop that meets buffers it met before (CuPy's memory
    pool hands a repeated call buffers of an earlier one, though not always in the same order) is
    captured as a CUDA graph and then replayed. Each call, on new data, equals the same call launched
    step by step, bit for bit."""
    impl, info = _on_device(name)
    launcher = launch.launcher_for(_cupy().empty(1))
    specs = [CaseSpec(variant=info.variant, dtype=dtype, T=7, B=5, D=9, H=70, seed=s) for s in range(12)]
    before = dict(launcher.counts)
    replayed = [_on_host(*forward_backward(impl, build_case(spec))) for spec in specs]
    counts = {k: launcher.counts[k] - before[k] for k in before}
    assert not launcher.refused, launcher.refused
    assert counts["captured"] >= 2 and counts["replayed"] >= 4, counts  # forward and backward, met again
    launcher.graphs = False
    try:
        replays = launcher.counts["replayed"]
        direct = [_on_host(*forward_backward(impl, build_case(spec))) for spec in specs]
        assert launcher.counts["replayed"] == replays  # launched step by step, every one
    finally:
        launcher.graphs = True
    for spec, (outputs, grads), (want_outputs, want_grads) in zip(specs, replayed, direct):
        for key, a, b in zip(("y", "h_T", "c_T"), outputs, want_outputs):
            np.testing.assert_array_equal(a, b, err_msg=f"{key} seed={spec.seed}")
        for key in want_grads:
            np.testing.assert_array_equal(grads[key], want_grads[key], err_msg=f"d{key} seed={spec.seed}")


@pytest.mark.gpu
@needs_gpu
def test_gpu_uploads_equal_cupy_copies():
    """Through pinned memory in pieces: equal to CuPy's own copies, in the dtype asked for, and the
    caller's arrays may change as soon as upload returns."""
    from impls.gpu.transfer import CupyDevice, Uploader

    cupy = _cupy()
    rng = np.random.default_rng(1)
    uploader = Uploader(CupyDevice(), piece_bytes=4096)
    arrays = [rng.standard_normal((64, 33, 5)), rng.standard_normal((70, 20)).T, np.array(1.5), np.zeros((0, 3))]
    want = [cupy.asarray(a, dtype=np.float32) for a in arrays]
    got = uploader.upload(arrays, np.float32)
    for a in arrays[:2]:
        a[...] = -1.0
    cupy.cuda.Device().synchronize()
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.flags.c_contiguous and g.shape == w.shape
        np.testing.assert_array_equal(cupy.asnumpy(g), cupy.asnumpy(w))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_a_training_loop_replays_its_loops(name):
    """The last call's results (its cache too) held while the next call runs, as in a training loop:
    after a few calls every loop replays (the device workspace gives the calls two sets of buffers to
    take turns with), and the last call equals a direct run bit for bit."""
    impl, info = _on_device(name)
    launcher = launch.launcher_for(_cupy().empty(1))
    case = build_case(CaseSpec(variant=info.variant, dtype="float32", T=6, B=4, D=8, H=40, seed=3))
    replayed = []
    for _ in range(16):
        before = launcher.counts["replayed"]
        y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        grads = impl.backward(case.dy, case.dh_T, case.dc_T, cache)
        replayed.append(launcher.counts["replayed"] - before)
    assert replayed[-4:] == [2, 2, 2, 2], replayed
    got = _on_host((y, h_T, c_T), grads)
    launcher.graphs = False
    try:
        replays = launcher.counts["replayed"]
        want = _on_host(*forward_backward(impl, case))
        assert launcher.counts["replayed"] == replays  # launched step by step
    finally:
        launcher.graphs = True
    for a, b in zip(got[0], want[0]):
        np.testing.assert_array_equal(a, b)
    for key in want[1]:
        np.testing.assert_array_equal(got[1][key], want[1][key], err_msg=key)


def _y_pointer_after_dropping(impl, case, keep=None):
    """The address of y of a forward of ``case``; every result dropped but what ``keep(y)`` returns."""
    y, h_T, c_T, cache = impl.forward(case.x, case.h0, case.c0, case.params)
    kept = keep(y) if keep else None
    return int(y.data.ptr), kept


@pytest.mark.gpu
@needs_gpu
def test_gpu_the_workspace_reuses_buffers_on_one_stream_only():
    """A dropped result's buffer goes to the next call on the same stream, never to a call on another
    stream (work queued on the first may still use it)."""
    cupy = _cupy()
    impl, info = _on_device("cupy")
    case = build_case(CaseSpec(variant="vanilla", dtype="float32", T=5, B=3, D=4, H=16, seed=4))
    s1, s2 = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    with s1:
        first, _ = _y_pointer_after_dropping(impl, case)
        again, _ = _y_pointer_after_dropping(impl, case)
    with s2:
        other, _ = _y_pointer_after_dropping(impl, case)
        y2, *_ = impl.forward(case.x, case.h0, case.c0, case.params)
        got = cupy.asnumpy(y2)
    assert first == again and other != first
    want = cupy.asnumpy(impl.forward(case.x, case.h0, case.c0, case.params)[0])
    np.testing.assert_array_equal(got, want)
