"""The workspace of the stacked NumPy versions: a buffer is handed out again only once nothing else holds it."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

from harness.cases import CaseSpec, build_case
from harness.structure import Structure
from impls.layernorm import StackedLayerNormLSTM
from impls.peephole import StackedPeepholeLSTM
from impls.stacked import StackedLSTM
from impls.workspace import POOLED_NUMPY, Pooled, Workspace
from tests.structured import structured_case

MiB = 1 << 20
BIG = (MiB // 8,)  # one MiB of float64


def test_an_array_in_use_is_never_handed_out_again():
    ws = Workspace(min_bytes=MiB)
    a = ws.empty(BIG, np.float64)
    b = ws.empty(BIG, np.float64)
    assert a.base is not b.base
    memory = weakref.ref(a.base)
    del a
    c = ws.empty(BIG, np.float64)
    assert c.base is memory()  # the freed one, not a third
    assert ws.kept_bytes == 2 * MiB


def test_a_view_keeps_its_memory_in_use():
    ws = Workspace(min_bytes=MiB)
    a = ws.empty(BIG, np.float64)
    view = a[1:]
    del a
    b = ws.empty(BIG, np.float64)
    assert b.base is not view.base
    b[...] = 1.0
    view[...] = 2.0
    assert np.all(b == 1.0)


def test_what_a_caller_does_to_its_array_stays_with_it():
    ws = Workspace(min_bytes=MiB)
    a = ws.empty(BIG, np.float64)
    a.shape = (2, -1)
    a.flags.writeable = False
    memory = weakref.ref(a.base)
    del a
    b = ws.empty(BIG, np.float64)
    assert b.base is memory()  # the same memory, as a fresh array
    assert b.shape == BIG and b.flags.writeable
    b[...] = 1.0


def test_shape_and_dtype_are_respected_and_small_arrays_are_not_kept():
    ws = Workspace(min_bytes=MiB)
    half = ws.empty(BIG, np.float32)
    assert half.dtype == np.float32 and half.shape == BIG and ws.kept_bytes == 0  # half a MiB: not kept
    assert ws.empty((2, MiB // 16), "float64").shape == (2, MiB // 16)
    assert ws.kept_bytes == MiB
    assert ws.empty(MiB // 8, np.float64).shape == BIG  # another shape: another array
    assert ws.kept_bytes == 2 * MiB
    assert ws.empty((10, 10), np.float64).shape == (10, 10) and ws.kept_bytes == 2 * MiB


def test_free_arrays_beyond_the_limit_go_least_recently_used_first():
    ws = Workspace(min_bytes=MiB, limit_bytes=3 * MiB + 64)
    shapes = [(MiB // 8 + k,) for k in range(4)]  # four keys, 1 MiB + 8k bytes each: three fit, four do not
    memory = {shape: weakref.ref(ws.empty(shape, np.float64).base) for shape in shapes[:2]}  # free at once
    held = ws.empty(shapes[2], np.float64)
    assert all(ref() is not None for ref in memory.values())  # within the limit: all kept
    newest = ws.empty(shapes[3], np.float64)  # over it: the least recently used free array goes
    assert memory[shapes[0]]() is None
    assert memory[shapes[1]]() is not None
    assert ws.empty(shapes[1], np.float64).base is memory[shapes[1]]()
    assert ws.kept_bytes <= 3 * MiB + 64
    assert held.base is not newest.base


def test_the_limit_holds_once_arrays_in_use_are_freed_and_larger_arrays_are_not_kept():
    ws = Workspace(min_bytes=MiB, limit_bytes=3 * MiB)
    held = [ws.empty(BIG, np.float64) for _ in range(6)]
    for k, a in enumerate(held):
        a[...] = k
    assert ws.kept_bytes == 6 * MiB  # over the limit, but nothing was free to drop
    assert [float(a[0]) for a in held] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    del held, a  # (the loop variable held the last one)
    ws.empty(BIG, np.float64)  # a request it can serve from what it has: the free ones beyond the limit go
    assert ws.kept_bytes <= 3 * MiB
    huge = ws.empty((4 * MiB // 8,), np.float64)
    assert huge.base is None and ws.kept_bytes <= 3 * MiB


def test_threads_never_share_an_array():
    ws = Workspace(min_bytes=MiB)
    clashes = []

    def work(k: int) -> None:
        for _ in range(200):
            a = ws.empty(BIG, np.float64)
            a[...] = k
            if not np.all(a == k):
                clashes.append(k)
            del a

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clashes
    assert ws.kept_bytes <= 4 * MiB


def test_the_namespace_is_numpy_with_pooled_empty_and_concatenate():
    xp = Pooled(Workspace(min_bytes=MiB))
    assert xp.tanh is np.tanh and xp.matmul is np.matmul
    parts = [np.arange(MiB // 16, dtype=np.float64), np.ones(MiB // 16)]
    joined = xp.concatenate(parts)
    np.testing.assert_array_equal(joined, np.concatenate(parts))
    assert xp.workspace.kept_bytes == MiB
    np.testing.assert_array_equal(xp.concatenate([np.eye(2), np.zeros((1, 2))], axis=0), np.eye(3, 2))


class PoisonedWorkspace(Workspace):
    """Every array (however small) from the pool, filled with NaN as it is handed out: a buffer read before
    it is written, or reused while still needed, poisons the results instead of passing by chance."""

    def __init__(self):
        super().__init__(min_bytes=0)

    def empty(self, shape, dtype=float):
        array = super().empty(shape, dtype)
        array[...] = np.nan
        return array


STACKED = {"vanilla": StackedLSTM, "peephole": StackedPeepholeLSTM, "layernorm": StackedLayerNormLSTM}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", sorted(STACKED))
@pytest.mark.parametrize("structure", [Structure(), Structure(num_layers=2, bidirectional=True, lengths=True),
                                       Structure(proj_size=2, coupled_input_forget=True, cell_clip=0.7)],
                         ids=["default", "layers-bidirectional-lengths", "proj-cifg-clip"])
def test_stacked_from_its_workspace_equals_plain_numpy_whatever_the_order_of_calls(variant, structure, dtype):
    """Two forwards before either backward (the second reuses nothing the first's cache holds), then
    the backwards in reverse order: every output equals the same calls over plain NumPy, bit for bit."""
    if structure.problems(variant):
        pytest.skip(f"{variant} with {structure.describe()} is not defined")
    first, second = (structured_case(structure, variant=variant, dtype=dtype, T=6, B=3, D=4, H=5, seed=seed)
                     for seed in (1, 2))
    pooled, plain = STACKED[variant]().with_structure(structure), STACKED[variant]().with_structure(structure)
    pooled.xp = Pooled(PoisonedWorkspace())
    plain.xp = np

    def run(impl):
        def forward(case):
            kw = {"lengths": case.lengths} if structure.lengths else {}
            return impl.forward(case.x, case.h0, case.c0, case.params, **kw)

        out1, out2 = forward(first), forward(second)
        g2 = impl.backward(second.dy, second.dh_T, second.dc_T, out2[3])
        g1 = impl.backward(first.dy, first.dh_T, first.dc_T, out1[3])
        return [np.array(a) for a in (*out1[:3], *out2[:3])], g1, g2

    got, want = run(pooled), run(plain)
    for a, b in zip(got[0], want[0]):
        np.testing.assert_array_equal(a, b)
    for g, w in zip(got[1:], want[1:]):
        assert set(g) == set(w)
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    assert pooled.xp.workspace.kept_bytes > 0


def test_an_output_the_caller_keeps_is_not_overwritten_by_the_next_call():
    spec = dict(variant="vanilla", dtype="float64", T=40, B=16, D=32, H=64)
    a, b = build_case(CaseSpec(**spec, seed=3)), build_case(CaseSpec(**spec, seed=4))
    impl = StackedLSTM()
    impl.xp = Pooled(Workspace(min_bytes=1 << 14))
    y, *_ = impl.forward(a.x, a.h0, a.c0, a.params)
    kept = y.copy()
    for _ in range(3):
        impl.forward(b.x, b.h0, b.c0, b.params)
    np.testing.assert_array_equal(y, kept)


def test_the_stacked_versions_use_the_process_workspace_and_repeated_calls_do_not_grow_it():
    case = build_case(CaseSpec(variant="vanilla", dtype="float64", T=64, B=32, D=64, H=128, seed=0))
    impl = StackedLSTM()
    assert impl.xp is POOLED_NUMPY

    def call() -> None:
        *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        impl.backward(case.dy, case.dh_T, case.dc_T, cache)

    call()
    after_one = POOLED_NUMPY.workspace.kept_bytes
    assert after_one > 0  # the (T, B, 4H) gate buffer alone is 8 MiB
    for _ in range(3):
        call()
    assert POOLED_NUMPY.workspace.kept_bytes == after_one
