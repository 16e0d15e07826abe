"""One case (harness.check): a record for every way an implementation can misbehave on it."""

import numpy as np

from harness.cases import CaseSpec, build_case
from harness.check import check_case
from harness.contract import validate
from harness.subject import InProcessSubject
from impls.loop import LoopLSTM
from oracles.base import Oracle, Reference
from oracles.finite_diff import FiniteDifferenceOracle

FD = FiniteDifferenceOracle()
CASE = build_case(CaseSpec(T=3, B=2, D=3, H=4, seed=2))


def _check(impl, oracles=(FD,), case=CASE):
    return check_case(InProcessSubject(impl, validate(impl)), list(oracles), case)


def _by_direction(records):
    out = {}
    for r in records:
        out.setdefault(r.direction, set()).add(r.status)
    return out


def test_a_correct_implementation_gives_one_passing_record_per_quantity():
    records = _check(LoopLSTM())
    assert [r.quantity for r in records] == ["y", "h_T", "c_T", "dx", "dh0", "dc0", "dW", "dR", "db"]
    assert all(r.status == "pass" for r in records)
    assert records[0].case["T"] == 3 and records[0].case["seed"] == 2


class Raises(LoopLSTM):
    name = "raises"

    def backward(self, dy, dh_T, dc_T, cache):
        raise RuntimeError("index out of range in my BPTT")


def test_an_exception_in_backward_is_an_error_with_the_implementation_traceback():
    records = _check(Raises())
    assert _by_direction(records) == {"forward": {"pass"}, "backward": {"error"}}
    err = next(r for r in records if r.status == "error")
    assert err.reason == "backward raised RuntimeError: index out of range in my BPTT"
    assert "test_check.py" in err.traceback and "harness/check.py" not in err.traceback


class WrongDtype(LoopLSTM):
    name = "wrong-dtype"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y.astype(np.float64), h, c, cache


def test_wrong_output_dtype_is_a_contract_violation():
    case = CASE.astype("float32")
    records = _check(WrongDtype(), case=case)
    fwd = [r for r in records if r.direction == "forward"]
    assert {r.status for r in fwd} == {"contract"}
    assert "y: expected dtype float32 (the dtype of the inputs), got float64" in fwd[0].reason


class BigEndian(LoopLSTM):
    """Correct, with every output and gradient in big-endian byte order (what a file read from another
    machine holds): the same float64 values, so it is certified, as a program's .npy files would be."""

    name = "big-endian"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return tuple(a.astype(a.dtype.newbyteorder(">")) for a in (y, h, c)) + (cache,)

    def backward(self, dy, dh_T, dc_T, cache):
        return {k: g.astype(g.dtype.newbyteorder(">")) for k, g in super().backward(dy, dh_T, dc_T, cache).items()}


def test_the_byte_order_is_not_the_dtype():
    for dtype in ("float64", "float32"):
        records = _check(BigEndian(), case=CASE.astype(dtype))
        assert records and {r.status for r in records} == {"pass"}, [r.reason for r in records if r.reason]
    # A big-endian array of the other precision is still the wrong dtype.
    records = _check(BigEndianWrongDtype(), case=CASE.astype("float32"))
    forward = [r for r in records if r.direction == "forward"]
    assert {r.status for r in forward} == {"contract"}
    assert "y: expected dtype float32 (the dtype of the inputs), got >f8" in forward[0].reason


class BigEndianWrongDtype(LoopLSTM):
    name = "big-endian-float64"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y.astype(">f8"), h, c, cache


class WrongShapeAndKeys(LoopLSTM):
    name = "wrong-keys"

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y, h, c[:1], cache

    def backward(self, dy, dh_T, dc_T, cache):
        grads = super().backward(dy, dh_T, dc_T, cache)
        grads["bias"] = grads.pop("b")
        return grads


def test_wrong_shape_and_gradient_keys_say_expected_and_received():
    records = _check(WrongShapeAndKeys())
    fwd = next(r for r in records if r.direction == "forward")
    assert fwd.status == "contract" and "c_T: expected shape (2, 4), got (1, 4)" in fwd.reason
    bwd = next(r for r in records if r.direction == "backward")
    assert bwd.status == "contract"
    assert "missing ['b'], unexpected ['bias']" in bwd.reason


class WrongArity(LoopLSTM):
    def forward(self, x, h0, c0, params):
        return super().forward(x, h0, c0, params)[:3]


def test_wrong_number_of_outputs():
    records = _check(WrongArity())
    assert {r.status for r in records} == {"contract"}
    assert "expected a tuple (y, h_T, c_T, cache) of 4 items, got a tuple of length 3" in records[0].reason


class Mutates(LoopLSTM):
    def forward(self, x, h0, c0, params):
        out = super().forward(x, h0, c0, params)
        x *= 2.0
        return out


def test_in_place_modification_of_inputs_is_detected():
    records = _check(Mutates())
    assert {r.status for r in records} == {"contract"}
    assert "modified its input arrays in place: x (forward)" in records[0].reason


class ForwardOnly:
    name = "forward-only"
    variant = "vanilla"

    def forward(self, x, h0, c0, params):
        return LoopLSTM().forward(x, h0, c0, params)


def test_missing_backward_is_a_skip_that_says_so():
    records = _check(ForwardOnly())
    assert _by_direction(records) == {"forward": {"pass"}, "backward": {"skip"}}
    assert "has no backward: checked forward only" in records[-1].reason


class ForwardOnlyOracle(Oracle):
    name = "forward-only-oracle"
    gives_gradients = False
    limitation = "forward only: this oracle computes no gradients"

    def reference(self, case):
        y, h, c = FD.reference(case).outputs.values()
        return Reference("float64", outputs={"y": y, "h_T": h, "c_T": c})


class BrokenOracle(Oracle):
    name = "broken-oracle"

    def reference(self, case):
        raise RuntimeError("framework crashed")


class PeepholeOnly(Oracle):
    name = "peephole-only"
    variants = ("peephole",)

    def reference(self, case):
        raise AssertionError("never called for vanilla")


def test_oracle_limits_become_skips_and_oracle_crashes_errors():
    records = _check(LoopLSTM(), oracles=(ForwardOnlyOracle(), BrokenOracle(), PeepholeOnly()))
    by = {(r.oracle, r.direction): r for r in records}
    assert by[("forward-only-oracle", "forward")].status == "pass"
    assert by[("forward-only-oracle", "backward")].reason == "forward only: this oracle computes no gradients"
    broken = by[("broken-oracle", "forward")]
    assert broken.status == "error"
    assert "the oracle broken-oracle failed on this case (not the implementation): RuntimeError" in broken.reason
    assert by[("peephole-only", "forward")].reason.startswith("peephole-only does not support the vanilla variant")


class ExitsInBackward(LoopLSTM):
    def backward(self, dy, dh_T, dc_T, cache):
        raise SystemExit(0)


class ObjectOutput(LoopLSTM):
    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        return y.astype(object), h, c, cache


class SharedBuffer(LoopLSTM):
    """Hands out one buffer and overwrites it on the next call."""

    def forward(self, x, h0, c0, params):
        y, h, c, cache = super().forward(x, h0, c0, params)
        if not hasattr(self, "buf") or self.buf.shape != y.shape:
            self.buf = np.empty_like(y)
        self.buf[...] = y
        return self.buf, h, c, cache


def test_sys_exit_in_backward_is_an_error_and_forward_is_still_compared():
    records = _check(ExitsInBackward())
    assert _by_direction(records) == {"forward": {"pass"}, "backward": {"error"}}
    assert next(r for r in records if r.status == "error").reason == "backward called sys.exit(0)"


def test_non_numeric_outputs_are_a_contract_violation():
    records = _check(ObjectOutput())
    assert {r.status for r in records} == {"contract"}
    assert "y: expected a floating-point array, got dtype object" in records[0].reason


def test_outputs_are_copied_so_a_reused_buffer_cannot_alias_earlier_results():
    impl = SharedBuffer()
    subject = InProcessSubject(impl, validate(impl))
    first = subject.execute(CASE, backward=False).forward[0]
    subject.execute(build_case(CaseSpec(T=3, B=2, D=3, H=4, seed=99)), backward=False)
    assert np.array_equal(first, LoopLSTM().forward(CASE.x, CASE.h0, CASE.c0, CASE.params)[0])


class MutatesInForwardOnly(Mutates):
    pass


def test_a_forward_mutation_is_not_blamed_on_backward():
    execution = InProcessSubject(MutatesInForwardOnly(), validate(MutatesInForwardOnly())).execute(CASE, backward=True)
    assert execution.mutated == ["x (forward)"]


class RaisesContractError(LoopLSTM):
    def backward(self, dy, dh_T, dc_T, cache):
        from harness.contract import ContractError

        raise ContractError(["c_T: the wrapped module returned None; adapt it with final_cell=False"])


def test_a_contract_error_raised_by_the_implementation_is_a_contract_record():
    records = _check(RaisesContractError())
    bwd = [r for r in records if r.direction == "backward"]
    assert {r.status for r in bwd} == {"contract"}
    assert bwd[0].reason == "backward: c_T: the wrapped module returned None; adapt it with final_cell=False"


def test_peephole_weight_gradients_get_room_in_proportion_to_the_cell_state():
    """dp_f sums (gate derivative) * c_{t-1}: with cell states in the hundreds its float32 rounding is that
    many times the other gradients'. Only the peephole weights' tolerance widens, by max |c| (c0 or the
    reference's c_T); every other quantity keeps the table's."""
    from harness.cases import CaseSpec, build_case
    from harness.check import PEEPHOLE_CELL, check_case
    from harness.contract import validate
    from harness.subject import InProcessSubject
    from impls.peephole import StackedPeepholeLSTM
    from oracles.finite_diff import FiniteDifferenceOracle

    case = build_case(CaseSpec(variant="peephole", dtype="float32", T=3, B=2, D=3, H=4, seed=5,
                               weight_scale="overflow"))
    impl = StackedPeepholeLSTM()
    records = check_case(InProcessSubject(impl, validate(impl)), [FiniteDifferenceOracle()], case)
    by_quantity = {r.quantity: r for r in records}
    magnitude = max(float(abs(case.c0).max()), 1.0)
    assert magnitude > 50  # the overflow regime's cell states
    for q in ("dp_i", "dp_f", "dp_o"):
        assert by_quantity[q].tolerance_factors[PEEPHOLE_CELL] >= magnitude
    assert all(PEEPHOLE_CELL not in r.tolerance_factors for q, r in by_quantity.items() if not q.startswith("dp_"))


# --------------------------------------------------------------------------------------------------
# References shared while a run lasts


class Counting(Oracle):
    """The finite-difference reference, counting the cases it is asked for."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def reference(self, case):
        self.calls += 1
        return FD.reference(case)


class Unhashable(Counting):
    """An oracle object that cannot be a dictionary key: nothing of it is kept."""

    name = "unhashable"
    __hash__ = None  # type: ignore[assignment]


def _records(impl, oracle, case=CASE):
    return [(r.quantity, r.status, r.ratio) for r in _check(impl, oracles=(oracle,), case=case)]


def test_while_sharing_an_identical_case_is_computed_once_per_oracle_and_the_records_do_not_change():
    from harness.check import sharing_references
    from impls.stacked import StackedLSTM

    alone = Counting()
    expected = [_records(LoopLSTM(), alone), _records(StackedLSTM(), alone)]
    assert alone.calls == 2  # no sharing outside the block
    oracle, other = Counting(), Counting()
    with sharing_references():
        assert [_records(LoopLSTM(), oracle), _records(StackedLSTM(), oracle)] == expected
        assert oracle.calls == 1
        _records(LoopLSTM(), other)  # each oracle object keeps its own
        assert other.calls == 1
        changed = CASE.copy()
        changed.x[0, 0, 0] += 1e-9  # one element: another case
        _records(LoopLSTM(), oracle, changed)
        assert oracle.calls == 2
        with sharing_references():  # an inner block shares the outer one's references
            _records(LoopLSTM(), oracle)
        assert oracle.calls == 2
        unhashable = Unhashable()
        _records(LoopLSTM(), unhashable)
        _records(LoopLSTM(), unhashable)
        assert unhashable.calls == 2
    with sharing_references():  # a new run starts afresh
        _records(LoopLSTM(), oracle)
    assert oracle.calls == 3


def test_sharing_keeps_small_cases_only_and_a_bounded_number(monkeypatch):
    from harness import check

    big = build_case(CaseSpec(T=8, B=4, D=8, H=8, seed=3))
    monkeypatch.setattr(check, "SHARED_CASE_BYTES", sum(a.nbytes for a in (*big.arrays().values(), *big.upstream)) - 1)
    oracle = Counting()
    with check.sharing_references():
        _records(LoopLSTM(), oracle, big)
        _records(LoopLSTM(), oracle, big)
        assert oracle.calls == 2  # too large to keep
        monkeypatch.setattr(check, "SHARED_REFERENCES", 2)
        cases = [build_case(CaseSpec(T=2, B=1, D=2, H=2, seed=s)) for s in range(3)]
        for case in cases:
            _records(LoopLSTM(), oracle, case)
        assert oracle.calls == 5
        _records(LoopLSTM(), oracle, cases[2])  # kept
        _records(LoopLSTM(), oracle, cases[0])  # the least recently used, dropped
        assert oracle.calls == 6


def test_a_run_of_several_implementations_gives_the_records_each_gives_alone(monkeypatch):
    """certify_many checks loop and stacked on the same cases, sharing the references: its records are
    those of two certifications that share nothing with each other."""
    from harness.api import certify, certify_many

    targets = ["impls.loop:LoopLSTM", "impls.stacked:StackedLSTM"]
    kw = dict(oracles=["finite-differences"], dtypes=["float64"], max_examples=6, write_report=False)

    def rows(result):
        return sorted((r.oracle, r.quantity, r.status, r.ratio, r.examples) for r in result.records)

    calls = []
    real = FiniteDifferenceOracle.reference

    def counted(self, case):
        calls.append(case.digest())
        return real(self, case)

    monkeypatch.setattr(FiniteDifferenceOracle, "reference", counted)
    together = certify_many(targets, **kw)
    shared = len(calls)
    calls.clear()
    alone = [certify(t, **kw) for t in targets]
    assert [rows(r) for r in together] == [rows(r) for r in alone]
    assert all(r.verdict == "certified" for r in together)
    # the second implementation's cases were the first's: each computed once in the run of both
    assert shared == len(set(calls)) < len(calls)
