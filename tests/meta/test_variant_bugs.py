"""Planted bugs in the peephole and LayerNorm variants must each be caught, on the right quantity.

Every broken implementation below is a subclass of a built-in one with one realistic mistake, the
kind made when deriving these variants' BPTT by hand. Each is checked two ways against the
finite-difference oracle: on fixed cases where the expected set of failing quantities follows from
the equations (so the assertion says *where* the bug shows, not only that something fails), and
through :func:`harness.runner.run_checks`, the path ``lstm-harness run`` takes, where Hypothesis must
find a failing case by itself. The unmodified implementations pass on the same cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.cases import CaseSpec, build_case
from harness.check import check_case
from harness.contract import quantities, validate
from harness.runner import RunSettings, run_checks
from harness.subject import InProcessSubject
from impls import peephole
from impls.layernorm import LayerNormCell, LoopLayerNormLSTM, StackedLayerNormLSTM, layer_norm_backward
from impls.loop import join_gates, preactivation_backward
from impls.peephole import LoopPeepholeLSTM, PeepholeCell, StackedPeepholeLSTM
from impls.stacked import gate_views, sigmoid_
from oracles.finite_diff import FiniteDifferenceOracle

ORACLE = FiniteDifferenceOracle()
FORWARD = set(quantities("peephole", "forward"))


# --- (1) The output gate's peephole reads c_{t-1} instead of c_t ---------------------------------


class LoopOutputPeepholeSeesOldCell(LoopPeepholeLSTM):
    name = "loop-peephole[o sees c_{t-1}]"
    configurable = False  # a cell bug: certified in the default structure

    def cell_forward(self, x_t, h_prev, c_prev, weights):
        w, p = weights.gates, weights.peep
        i = peephole.input_gate(x_t, h_prev, c_prev, w["i"], p.i)
        f = peephole.forget_gate(x_t, h_prev, c_prev, w["f"], p.f)
        g = peephole.cell_candidate(x_t, h_prev, w["g"])
        o = peephole.output_gate(x_t, h_prev, c_prev, w["o"], p.o)  # BUG: c_prev, should be c
        c = f * c_prev + i * g
        tanh_c = np.tanh(c)
        h = o * tanh_c
        return h, c, peephole.PeepholeStepCache(x_t, h_prev, c_prev, c, i, f, g, o, tanh_c)


class OldCellOutputPeepholeCell(PeepholeCell):
    def forward_step(self, xp, t, a, c_prev, c, h, S, P):
        H = c.shape[1]
        tmp, tanh_c = S["tmp"], S["tanh_c"][t]
        i, f, o, g = gate_views(a, H)
        i += c_prev * P["p_i"]
        f += c_prev * P["p_f"]
        o += c_prev * P["p_o"]  # BUG: all three peepholes added up front, from c_{t-1}
        sigmoid_(xp, a[:, : 3 * H])
        xp.tanh(g, out=g)
        xp.multiply(f, c_prev, out=c)
        xp.multiply(i, g, out=tmp)
        c += tmp
        xp.tanh(c, out=tanh_c)
        xp.multiply(o, tanh_c, out=h)


class StackedOutputPeepholeSeesOldCell(StackedPeepholeLSTM):
    name = "stacked-peephole[o sees c_{t-1}]"
    configurable = False  # a cell bug: certified in the default structure
    cell = OldCellOutputPeepholeCell()


# --- (2) dc_{t-1} misses the path through the next step's gates (p_i * da_i + p_f * da_f) --------


class LoopPeepholeMissingGatePath(LoopPeepholeLSTM):
    name = "loop-peephole[dc_prev without peephole terms]"
    configurable = False  # a cell bug: certified in the default structure

    def cell_backward(self, dh, dc, cache, weights):
        s, p = cache, weights.peep
        da_o = dh * s.tanh_c * s.o * (1.0 - s.o)
        dc = dc + dh * s.o * (1.0 - s.tanh_c**2) + da_o * p.o
        da = {
            "i": dc * s.g * s.i * (1.0 - s.i),
            "f": dc * s.c_prev * s.f * (1.0 - s.f),
            "g": dc * s.i * (1.0 - s.g**2),
            "o": da_o,
        }
        dc_prev = dc * s.f  # BUG: the peepholes make c_{t-1} reach i and f too
        dx_t, dh_prev, grads = preactivation_backward(da, s.x_t, s.h_prev, weights.gates)
        grads["b"] = join_gates({k: da[k].sum(axis=0) for k in da})
        grads["p_i"] = (da["i"] * s.c_prev).sum(axis=0)
        grads["p_f"] = (da["f"] * s.c_prev).sum(axis=0)
        grads["p_o"] = (da["o"] * s.c).sum(axis=0)
        return dx_t, dh_prev, dc_prev, grads


class MissingGatePathCell(PeepholeCell):
    def backward_step(self, xp, t, dh, dc, da, a, c_prev, c, S, G, P):
        super().backward_step(xp, t, dh, dc, da, a, c_prev, c, S, G, P)
        H = c.shape[1]
        di, df, _, _ = gate_views(da, H)
        dc -= di * P["p_i"] + df * P["p_f"]  # BUG: what the hand derivation forgot, taken back out


class StackedPeepholeMissingGatePath(StackedPeepholeLSTM):
    name = "stacked-peephole[dc_prev without peephole terms]"
    configurable = False  # a cell bug: certified in the default structure
    cell = MissingGatePathCell()


# --- (3) LayerNorm with the unbiased variance; (4) eps outside the square root -------------------


class UnbiasedVarianceCell(LayerNormCell):
    @staticmethod
    def _normalize_(xp, v, n_out, r_out, eps):
        H = v.shape[-1]
        v -= v.mean(axis=-1, keepdims=True)
        var = (v * v).sum(axis=-1, keepdims=True) / (H - 1)  # BUG: numpy.var(ddof=1), torch.var's default
        r_out[...] = 1.0 / xp.sqrt(var + eps)
        v *= r_out
        n_out[...] = v


class EpsOutsideSqrtCell(LayerNormCell):
    @staticmethod
    def _normalize_(xp, v, n_out, r_out, eps):
        v -= v.mean(axis=-1, keepdims=True)
        var = (v * v).mean(axis=-1, keepdims=True)
        r_out[...] = 1.0 / (xp.sqrt(var) + eps)  # BUG: eps belongs inside the square root
        v *= r_out
        n_out[...] = v


class StackedUnbiasedVariance(StackedLayerNormLSTM):
    name = "stacked-layernorm[unbiased variance]"
    configurable = False  # a cell bug: certified in the default structure
    cell = UnbiasedVarianceCell()


class StackedEpsOutsideSqrt(StackedLayerNormLSTM):
    name = "stacked-layernorm[eps outside sqrt]"
    configurable = False  # a cell bug: certified in the default structure
    cell = EpsOutsideSqrtCell()


# --- (5) The cell state's layer norm skipped in backward -----------------------------------------


class LoopSkipsCellNormInBackward(LoopLayerNormLSTM):
    name = "loop-layernorm[no LN_c in backward]"
    configurable = False  # a cell bug: certified in the default structure

    def cell_backward(self, dh, dc, cache, weights):
        s, w = cache, weights.gates
        dz = {"o": dh * s.tanh_c * s.o * (1.0 - s.o)}
        dz_c = dc + dh * s.o * (1.0 - s.tanh_c**2)
        ds = dz_c  # BUG: treats c_t as f * c_{t-1} + i * g, as if LN_c were not there
        dz["i"] = ds * s.g * s.i * (1.0 - s.i)
        dz["f"] = ds * s.c_prev * s.f * (1.0 - s.f)
        dz["g"] = ds * s.i * (1.0 - s.g**2)
        dc_prev = ds * s.f
        da = {k: layer_norm_backward(dz[k], s.stats[k].n, s.stats[k].r, w[k].gamma) for k in "ifgo"}
        dx_t, dh_prev, grads = preactivation_backward(da, s.x_t, s.h_prev, w)
        dz["c"] = dz_c
        grads["gamma"] = np.stack([(dz[k] * s.stats[k].n).sum(axis=0) for k in "ifgoc"])
        grads["beta"] = np.stack([dz[k].sum(axis=0) for k in "ifgoc"])
        return dx_t, dh_prev, dc_prev, grads


BROKEN = {
    "loop o sees c_{t-1}": LoopOutputPeepholeSeesOldCell,
    "stacked o sees c_{t-1}": StackedOutputPeepholeSeesOldCell,
    "loop dc_prev without peephole terms": LoopPeepholeMissingGatePath,
    "stacked dc_prev without peephole terms": StackedPeepholeMissingGatePath,
    "unbiased variance": StackedUnbiasedVariance,
    "eps outside sqrt": StackedEpsOutsideSqrt,
    "no LN_c in backward": LoopSkipsCellNormInBackward,
}
CORRECT = {
    LoopPeepholeLSTM: "peephole",
    StackedPeepholeLSTM: "peephole",
    LoopLayerNormLSTM: "layernorm",
    StackedLayerNormLSTM: "layernorm",
}


def _records(impl, spec: CaseSpec):
    return check_case(InProcessSubject(impl, validate(impl)), [ORACLE], build_case(spec))


def _failing(records) -> set[str]:
    for r in records:
        assert r.status in ("pass", "fail"), r.message  # never an error or a contract breach
    return {r.quantity for r in records if r.status == "fail"}


def _by_quantity(records):
    return {r.quantity: r for r in records}


DTYPES = ("float64", "float32")


def peephole_spec(dtype: str, T: int, **kw) -> CaseSpec:
    return CaseSpec(variant="peephole", dtype=dtype, T=T, B=2, D=3, H=4, seed=7, **kw)


def layernorm_spec(dtype: str, T: int, **kw) -> CaseSpec:
    return CaseSpec(variant="layernorm", dtype=dtype, T=T, B=2, D=3, H=4, seed=7, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", list(CORRECT), ids=lambda c: c.__name__)
def test_the_correct_variants_pass_the_cases_the_bugs_fail(cls, dtype):
    spec = peephole_spec if CORRECT[cls] == "peephole" else layernorm_spec
    for T in (1, 4):
        for kw in ({}, {"weight_scale": "small"}):
            records = _records(cls(), spec(dtype, T, **kw))
            assert _failing(records) == set(), "\n".join(r.message for r in records if not r.ok)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [LoopOutputPeepholeSeesOldCell, StackedOutputPeepholeSeesOldCell],
                         ids=lambda c: c.__name__)
def test_output_peephole_reading_the_old_cell_corrupts_y_and_h_T_first(cls, dtype):
    # One step: c_T does not depend on o_T, so exactly y and h_T are wrong in the forward.
    forward = {r.quantity: r for r in _records(cls(), peephole_spec(dtype, T=1)) if r.direction == "forward"}
    assert {q for q, r in forward.items() if r.status == "fail"} == {"y", "h_T"}
    # Over several steps the wrong h_t feeds the next cell state, and y is wrong from t = 0.
    records = _by_quantity(_records(cls(), peephole_spec(dtype, T=4)))
    assert {"y", "h_T", "c_T"} <= _failing(records.values())
    assert records["y"].first_bad_t == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [LoopPeepholeMissingGatePath, StackedPeepholeMissingGatePath],
                         ids=lambda c: c.__name__)
def test_missing_peephole_gate_path_is_a_backward_bug_on_dc_and_what_flows_from_it(cls, dtype):
    # One step: the forward and every gradient computed inside the step are right; only the
    # gradient handed back to c0 lacks p_i * da_i + p_f * da_f.
    assert _failing(_records(cls(), peephole_spec(dtype, T=1))) == {"dc0"}
    # Several steps: dc_{t-1} is wrong from the last step on, so everything before it is too;
    # dx at the last step is still right.
    records = _by_quantity(_records(cls(), peephole_spec(dtype, T=4)))
    failing = _failing(records.values())
    assert not failing & FORWARD
    assert {"dc0", "dx", "dh0", "dW", "dp_i", "dp_f", "dp_o"} <= failing
    assert records["dx"].last_bad_t == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbiased_variance_is_a_forward_bug(dtype):
    failing = _failing(_records(StackedUnbiasedVariance(), layernorm_spec(dtype, T=2)))
    assert {"y", "h_T", "c_T"} <= failing


@pytest.mark.parametrize("dtype", DTYPES)
def test_eps_outside_the_square_root_is_a_forward_bug(dtype):
    # With unit-scale pre-activations (var ~ 1) the two differ by ~eps/2 relative, which float64
    # sees; float32 needs rows whose variance is not far above eps, which "small" weights give.
    failing = _failing(_records(StackedEpsOutsideSqrt(), layernorm_spec(dtype, T=2, weight_scale="small")))
    assert {"y", "h_T", "c_T"} <= failing
    if dtype == "float64":
        assert {"y", "h_T", "c_T"} <= _failing(_records(StackedEpsOutsideSqrt(), layernorm_spec(dtype, T=2)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_skipping_the_cell_norm_in_backward_corrupts_the_gates_before_it(dtype):
    records = _by_quantity(_records(LoopSkipsCellNormInBackward(), layernorm_spec(dtype, T=1)))
    failing = _failing(records.values())
    assert not failing & FORWARD
    assert {"dc0", "dx", "dh0", "dW", "dR", "dgamma", "dbeta"} <= failing
    # dL/dc_t itself is right; what is wrong is everything behind LN_c: the gates i, f, g. So
    # LN_c's own gain and shift and the output gate's rows are right.
    for q in ("dgamma", "dbeta"):
        assert records[q].worst["coords"]["row"] in ("i", "f", "g"), records[q].message
    assert records["dW"].worst["coords"]["gate"] in ("i", "f", "g"), records["dW"].message


# --- The same bugs found by Hypothesis on the runner's own path ----------------------------------

EXPECTED = {
    # name -> (variant quantities that must fail, quantities that must pass)
    "loop o sees c_{t-1}": ({"y", "h_T"}, set()),
    "stacked o sees c_{t-1}": ({"y", "h_T"}, set()),
    "loop dc_prev without peephole terms": ({"dc0"}, FORWARD),
    "stacked dc_prev without peephole terms": ({"dc0"}, FORWARD),
    "unbiased variance": ({"y", "h_T", "c_T"}, set()),
    "eps outside sqrt": ({"y"}, set()),
    "no LN_c in backward": ({"dc0"}, FORWARD),
}


def test_every_bug_has_an_expectation():
    assert set(EXPECTED) == set(BROKEN)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_run_checks_finds_each_bug(bug, dtype):
    impl = BROKEN[bug]()
    records = run_checks(InProcessSubject(impl, validate(impl)), [ORACLE], dtype=dtype,
                         run=RunSettings(profile="ci", max_examples=100, max_T=4, max_B=3, max_D=4, max_H=5))
    status = {r.quantity: r.status for r in records}
    must_fail, must_pass = EXPECTED[bug]
    failing = {q for q, s in status.items() if s == "fail"}
    assert must_fail <= failing, f"{bug}: expected {sorted(must_fail)} to fail, got {status}"
    assert not must_pass & failing, f"{bug}: {sorted(must_pass & failing)} should pass, got {status}"
    assert all(s in ("pass", "fail") for s in status.values()), status

