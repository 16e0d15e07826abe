"""Every oracle against every other, against finite differences, and against the built-in implementations.

Each framework oracle is an independent opinion of the same LSTM; these tests are what lets any of
them be trusted: on Hypothesis cases, every pair of oracles that covers a variant and dtype agrees,
forward and backward, within the harness's own tolerance table (at the lower precision of the
two), and the finite-difference oracle is one of the pair partners. An oracle whose framework is
missing is left out of the pairs, and its own tests skip with the reason.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from itertools import combinations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from harness import registry
from harness.cases import CaseSpec, build_case, cases
from harness.check import check_case
from harness.contract import gradient_keys, validate
from harness.subject import InProcessSubject
from oracles.base import Oracle
from oracles.finite_diff import FiniteDifferenceOracle
from oracles.jax_oracle import JaxCompositeOracle
from oracles.onnx_oracle import OnnxReferenceOracle, OnnxRuntimeOracle
from oracles.tf_oracle import BlockLSTMV2Oracle, KerasLSTMOracle, TFCompositeOracle
from oracles.torch_oracle import TorchCompositeOracle, TorchLSTMOracle
from tests.oracle_support import assert_references_agree, require

FRAMEWORK_ORACLES = [
    TorchLSTMOracle,
    TorchCompositeOracle,
    KerasLSTMOracle,
    BlockLSTMV2Oracle,
    TFCompositeOracle,
    OnnxRuntimeOracle,
    OnnxReferenceOracle,
    JaxCompositeOracle,
]
VARIANTS = ("vanilla", "peephole", "layernorm")
DTYPES = ("float64", "float32")

# One instance of each for the whole module: the oracles' caches are part of what is under test
# (a cached layer or traced function must not carry anything from one case to the next).
_INSTANCES: dict[str, Oracle] = {cls.name: cls() for cls in FRAMEWORK_ORACLES}
_FD = FiniteDifferenceOracle()

# Small cases keep the finite-difference oracle on its whole-gradient path (every element located).
SMALL = dict(max_T=4, max_B=3, max_D=4, max_H=4)
# The settings profile (dev, ci, thorough) decides how many examples, capped for these multi-oracle tests.
few = settings(max_examples=min(settings.default.max_examples, 15), deadline=None,
               suppress_health_check=[HealthCheck.too_slow])


def _covering(variant: str, dtype: str) -> list[Oracle]:
    return [o for o in [_FD, *_INSTANCES.values()] if o.unsupported_reason(variant, dtype) is None]


def _why_not(variant: str, dtype: str) -> str:
    return "; ".join(r for o in _INSTANCES.values() if (r := o.unsupported_reason(variant, dtype)))


@pytest.mark.frameworks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pair_of_oracles_agrees(variant, dtype):
    oracles = _covering(variant, dtype)
    if len(oracles) < 2:
        pytest.skip(f"fewer than two oracles cover {variant} {dtype}: {_why_not(variant, dtype)}")

    @few
    @given(cases(variants=(variant,), dtypes=(dtype,), **SMALL))
    def check(case):
        refs = {o.name: o.reference(case) for o in oracles}
        for (a, ra), (b, rb) in combinations(refs.items(), 2):
            assert_references_agree(case, ra, a, rb, b)

    check()


@pytest.mark.frameworks
@pytest.mark.parametrize("name", list(_INSTANCES))
def test_each_oracle_agrees_with_finite_differences(name):
    """The same check, one oracle at a time, so that a failure names the oracle in the test id."""
    oracle = require(_INSTANCES[name])

    @few
    @given(cases(variants=oracle.variants, dtypes=DTYPES, **SMALL))
    def check(case):
        if oracle.unsupported_reason(case.variant, case.dtype):
            return
        assert_references_agree(case, oracle.reference(case), oracle.name, _FD.reference(case), _FD.name)

    check()


def _builtin(name: str):
    entries = {e.name: e for e in registry.implementations()}
    entry = entries[name]
    if entry.unavailable:
        pytest.skip(f"{name} unavailable: {entry.unavailable}")
    impl = entry.create()
    return InProcessSubject(impl, validate(impl))


@pytest.mark.frameworks
@pytest.mark.parametrize("impl", [e.name for e in registry.implementations()])
def test_builtin_implementations_agree_with_every_oracle(impl):
    subject = _builtin(impl)
    info = subject.info
    oracles = [o for o in _INSTANCES.values() if o.availability().available]
    if not oracles:
        pytest.skip("no framework oracle is available: " + _why_not("vanilla", "float64"))

    @few
    @given(cases(variants=(info.variant,), dtypes=info.dtypes, ln_eps=info.ln_eps, **SMALL))
    def check(case):
        records = check_case(subject, oracles, case)
        bad = [r for r in records if not r.ok]  # an oracle crash is an error record, so it is caught here
        assert not bad, "\n\n".join(r.message for r in bad)
        compared = {r.oracle for r in records if r.status == "pass"}
        covering = {o.name for o in oracles if o.unsupported_reason(info.variant, case.dtype) is None}
        assert compared == covering

    check()


@pytest.mark.frameworks
@pytest.mark.parametrize("name", list(_INSTANCES))
def test_reference_shapes_dtypes_and_keys(name):
    oracle = require(_INSTANCES[name])
    for variant in oracle.variants:
        for dtype in DTYPES:
            if oracle.unsupported_reason(variant, dtype):
                continue
            case = build_case(CaseSpec(variant=variant, dtype=dtype, T=3, B=2, D=5, H=4, seed=11))
            ref = oracle.reference(case)
            assert ref.compute_dtype == oracle.compute_dtype_for(dtype)
            assert set(ref.outputs) == {"y", "h_T", "c_T"}
            assert ref.outputs["y"].shape == (3, 2, 4)
            assert ref.outputs["h_T"].shape == ref.outputs["c_T"].shape == (2, 4)
            for v in ref.outputs.values():
                assert v.dtype == np.dtype(ref.compute_dtype) and np.isfinite(v).all()
            if not oracle.gives_gradients:
                assert ref.gradients is None
                continue
            assert set(ref.gradients) == set(gradient_keys(variant))
            for k, g in ref.gradients.items():
                want = case.params[k].shape if k in case.params else getattr(case, k).shape
                assert g.shape == want, k
                assert np.isfinite(g).all(), k


@pytest.mark.frameworks
@pytest.mark.parametrize("name", list(_INSTANCES))
def test_caches_keep_nothing_between_cases(name):
    """A case gives bit-identical results before and after other cases of other shapes ran."""
    oracle = require(_INSTANCES[name])
    variant = oracle.variants[-1]
    dtype = next(d for d in DTYPES if oracle.unsupported_reason(variant, d) is None)
    first = build_case(CaseSpec(variant=variant, dtype=dtype, T=3, B=2, D=3, H=4, seed=1))
    before = oracle.reference(first)
    for seed, (T, B, D, H) in enumerate([(5, 1, 2, 4), (2, 3, 3, 4), (1, 1, 6, 2)]):
        spec = CaseSpec(variant=variant, dtype=dtype, T=T, B=B, D=D, H=H, seed=seed + 50)
        oracle.reference(build_case(spec))
    after = oracle.reference(first)
    for part in ("outputs", "gradients"):
        a, b = getattr(before, part), getattr(after, part)
        if a is None:
            assert b is None
            continue
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {part} {k}")


@pytest.mark.frameworks
@pytest.mark.parametrize("name", list(_INSTANCES))
def test_unsupported_variants_and_dtypes_say_why(name):
    oracle = require(_INSTANCES[name])
    for variant in VARIANTS:
        for dtype in DTYPES:
            why = oracle.unsupported_reason(variant, dtype)
            if variant not in oracle.variants:
                assert why and f"does not support the {variant} variant" in why
            elif oracle.compute_dtype_for(dtype) is None:
                assert why and f"cannot compute a {dtype} case" in why
            else:
                assert why is None
            if why:
                case = build_case(CaseSpec(variant=variant, dtype=dtype, H=3))
                with pytest.raises(ValueError, match="^case: "):
                    oracle.reference(case)


def test_declared_coverage():
    """What the issue asks of each oracle, as declared (and shown by ``lstm-harness list``)."""
    o = _INSTANCES
    assert o["torch-nn-lstm"].variants == ("vanilla",)
    assert set(o["torch-nn-lstm"].compute_dtypes) == {"float64", "float32"}
    assert o["torch-composite"].variants == VARIANTS
    assert o["tf-composite"].variants == VARIANTS
    assert o["jax-composite"].variants == VARIANTS
    assert o["tf-keras"].variants == ("vanilla",)
    assert o["tf-block-lstm-v2"].variants == ("vanilla", "peephole")
    assert o["tf-block-lstm-v2"].compute_dtypes == ("float32",)
    for name in ("onnxruntime", "onnx-reference"):
        assert o[name].variants == ("vanilla", "peephole")
        assert not o[name].gives_gradients
        assert o[name].limitation.startswith("forward only")
    ort_says = "forward only: ONNX Runtime's standard package has no training gradients"
    assert o["onnxruntime"].limitation == ort_says
    registered = [type(x).__name__ for x in registry.oracles()]
    assert registered[0] == "FiniteDifferenceOracle"
    assert set(registered) >= {cls.__name__ for cls in FRAMEWORK_ORACLES}


@pytest.mark.frameworks
def test_torch_nn_lstm_checks_float32_with_the_float32_kernel():
    oracle = require(TorchLSTMOracle())
    case = build_case(CaseSpec(dtype="float32", T=4, B=2, D=3, H=5, seed=2))
    ref = oracle.reference(case)
    assert ref.compute_dtype == "float32"
    assert ref.outputs["y"].dtype == np.float32 and ref.gradients["W"].dtype == np.float32
    upcast = TorchLSTMOracle(native_float32=False)
    assert upcast.compute_dtype_for("float32") == "float64"
    ref64 = upcast.reference(case)
    assert ref64.compute_dtype == "float64"
    assert_references_agree(case, ref, "torch float32 kernel", ref64, "torch float64 kernel")
    # The float32 kernel really is a different computation: it is not bit-identical to float64.
    assert not np.array_equal(ref.outputs["y"].astype(np.float64), ref64.outputs["y"])


def _peephole_old_c_forward(case):
    """The peephole LSTM with the classic mistake: the output gate reads c_{t-1} instead of c_t."""
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    c64 = case.astype("float64")
    p = c64.params
    h, c, ys = c64.h0, c64.c0, []
    for t in range(c64.T):
        a_i, a_f, a_g, a_o = np.split(c64.x[t] @ p["W"].T + h @ p["R"].T + p["b"], 4, axis=1)
        i, f = sig(a_i + p["p_i"] * c), sig(a_f + p["p_f"] * c)
        o = sig(a_o + p["p_o"] * c)  # c is still c_{t-1} here
        c = f * c + i * np.tanh(a_g)
        h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys)


@pytest.mark.frameworks
@pytest.mark.parametrize("name", [n for n, o in _INSTANCES.items() if "peephole" in o.variants])
def test_peephole_oracles_give_the_output_gate_the_new_cell_state(name):
    """Each peephole oracle matches the contract's peephole and is told apart from the c_{t-1} one."""
    oracle = require(_INSTANCES[name])
    dtype = "float64" if oracle.unsupported_reason("peephole", "float64") is None else "float32"
    spec = CaseSpec(variant="peephole", dtype=dtype, T=5, B=2, D=3, H=4, seed=8, extra_scale="large")
    case = build_case(spec)
    ref = oracle.reference(case)
    fd = _FD.reference(case)
    assert_references_agree(case, ref, name, fd, _FD.name)
    wrong = _peephole_old_c_forward(case)
    assert np.abs(wrong - ref.outputs["y"]).max() > 1e-3


@pytest.mark.frameworks
@pytest.mark.parametrize("name", [n for n, o in _INSTANCES.items() if "layernorm" in o.variants])
def test_layernorm_oracles_use_the_case_eps(name):
    """With eps comparable to the variance of the pre-activations, eps visibly matters; the oracle
    must use the case's (the implementation's declared ln_eps), as finite differences do."""
    oracle = require(_INSTANCES[name])
    spec = CaseSpec(variant="layernorm", T=3, B=2, D=3, H=4, seed=4, weight_scale="small", ln_eps=0.01)
    case = build_case(spec)
    ref = oracle.reference(case)
    assert_references_agree(case, ref, name, _FD.reference(case), _FD.name)
    default_eps = oracle.reference(build_case(spec.replace(ln_eps=1e-5)))
    assert np.abs(default_eps.outputs["y"] - ref.outputs["y"]).max() > 1e-3


def test_oracles_import_and_degrade_without_frameworks():
    """With torch, tensorflow, keras, onnx and onnxruntime hidden, importing and listing still works,
    and every framework oracle is unavailable with the missing module named and is skipped by the
    runner with that reason."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("torch", "tensorflow", "keras", "onnx", "onnxruntime", "jax"):
            sys.modules[name] = None  # import of name now raises ModuleNotFoundError
        from harness import registry
        from harness.cases import CaseSpec, build_case
        from harness.contract import validate
        from harness.check import check_case
        from harness.subject import InProcessSubject
        oracles = registry.oracles()
        impl = registry.implementations()[0].create()
        case = build_case(CaseSpec())
        records = check_case(InProcessSubject(impl, validate(impl)), oracles, case)
        for o in oracles:
            d = o.describe()
            if d["name"] == "finite-differences":
                assert d["available"], d
                continue
            assert not d["available"], d
            assert "is not installed" in d["reason"], d
            mine = [r for r in records if r.oracle == d["name"]]
            assert mine and all(r.status == "skip" and "unavailable" in r.reason for r in mine), mine
            print(d["name"], "|", d["reason"])
        assert any(r.status == "pass" for r in records)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in _INSTANCES:
        assert name in out.stdout


def test_importing_oracles_imports_no_framework():
    script = textwrap.dedent(
        """
        import sys
        import harness, harness.layouts, harness.registry
        import oracles.torch_oracle, oracles.tf_oracle, oracles.onnx_oracle
        harness.registry.oracles()
        loaded = [m for m in ("torch", "tensorflow", "keras", "onnx", "onnxruntime") if m in sys.modules]
        assert not loaded, loaded
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_installed_finds_the_framework_without_probing_it():
    """The default choice of oracles asks ``installed()``: modules found, none imported, the probe not run;
    once the probe has run its answer is the one kept."""

    class Needs(FiniteDifferenceOracle):
        probes = 0

        def _probe(self):
            type(self).probes += 1
            return super()._probe()

    present, missing = Needs(), Needs()
    present.requires, missing.requires = ("json",), ("json", "no_such_framework_anywhere")
    assert present.installed().available and Needs.probes == 0
    assert missing.installed().reason == "no_such_framework_anywhere is not installed" and Needs.probes == 0
    assert missing.availability().available and Needs.probes == 1  # the probe decides when it runs
    assert missing.installed().available and Needs.probes == 1  # ... and is kept
    unknown = Needs()  # nothing declared: only the probe can tell
    assert unknown.installed().available and Needs.probes == 2


def test_choosing_the_default_oracles_imports_no_framework():
    code = ("import sys\nfrom harness.session import select_oracles\n"
            "chosen = select_oracles(None, 'vanilla')\n"
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_keras_oracle_is_not_chosen_for_another_backend(monkeypatch):
    keras = KerasLSTMOracle()
    keras.requires = ("json",)  # the modules found; only the backend is in question here
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert keras.installed().reason.startswith("KERAS_BACKEND=jax: keras runs on the jax backend")
    for unset in ("", "tensorflow"):  # keras reads an empty value as unset: TensorFlow
        monkeypatch.setenv("KERAS_BACKEND", unset)
        assert keras.installed().available
