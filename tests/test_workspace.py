"""The workspace of the stacked NumPy versions: a buffer is handed out again only once nothing else holds it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from harness.cases import CaseSpec, build_case
from impls.stacked import StackedLSTM
from impls.workspace import POOLED_NUMPY, PooledNumPy, Workspace

MiB = 1 << 20
BIG = (MiB // 8,)  # one MiB of float64


def test_an_array_in_use_is_never_handed_out_again():
    ws = Workspace(min_bytes=MiB)
    a = ws.empty(BIG, np.float64)
    b = ws.empty(BIG, np.float64)
    assert a is not b
    a_id = id(a)
    del a
    c = ws.empty(BIG, np.float64)
    assert id(c) == a_id  # the freed one, not a third
    assert ws.kept_bytes == 2 * MiB


def test_a_view_keeps_its_base_in_use():
    ws = Workspace(min_bytes=MiB)
    a = ws.empty(BIG, np.float64)
    view = a[1:]
    del a
    b = ws.empty(BIG, np.float64)
    assert b is not view.base
    b[...] = 1.0
    view[...] = 2.0
    assert np.all(b == 1.0)


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
    ws = Workspace(min_bytes=MiB, limit_bytes=3 * MiB)
    shapes = [(MiB // 8 + k,) for k in range(4)]  # four different keys, just over 1 MiB each
    for shape in shapes[:2]:
        ws.empty(shape, np.float64)  # dropped at once: free
    held = ws.empty(shapes[2], np.float64)
    ws.empty(shapes[3], np.float64)  # 4 arrays > 3 MiB: the oldest free one goes
    assert ws.kept_bytes <= 3 * MiB + 3 * 8
    again = ws.empty(shapes[1], np.float64)  # still kept (more recent than shapes[0])
    assert ws.kept_bytes <= 3 * MiB + 3 * 8
    assert again is not held


def test_arrays_in_use_count_but_are_never_dropped():
    ws = Workspace(min_bytes=MiB, limit_bytes=MiB)
    held = [ws.empty(BIG, np.float64) for _ in range(3)]
    for k, a in enumerate(held):
        a[...] = k
    assert ws.kept_bytes == 3 * MiB  # over the limit: nothing was free to drop
    assert [float(a[0]) for a in held] == [0.0, 1.0, 2.0]
    del held, a  # (the loop variable held the last one)
    ws.empty((MiB // 8 + 1,), np.float64)  # a new key: the three free ones are dropped
    assert ws.kept_bytes <= MiB + 8


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
    xp = PooledNumPy(Workspace(min_bytes=MiB))
    assert xp.tanh is np.tanh and xp.matmul is np.matmul
    parts = [np.arange(MiB // 16, dtype=np.float64), np.ones(MiB // 16)]
    joined = xp.concatenate(parts)
    np.testing.assert_array_equal(joined, np.concatenate(parts))
    assert xp.workspace.kept_bytes == MiB
    np.testing.assert_array_equal(xp.concatenate([np.eye(2), np.zeros((1, 2))], axis=0), np.eye(3, 2))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stacked_with_its_workspace_equals_plain_numpy_whatever_the_order_of_calls(dtype):
    """Two forwards before either backward (the second reuses nothing the first's cache holds), then
    the backwards in reverse order: every output equals the same calls over plain NumPy, bit for bit."""
    spec = dict(variant="vanilla", dtype=dtype, T=40, B=16, D=32, H=64)  # gate buffers of 160 KiB+
    first, second = build_case(CaseSpec(**spec, seed=1)), build_case(CaseSpec(**spec, seed=2))
    pooled, plain = StackedLSTM(), StackedLSTM()
    pooled.xp = PooledNumPy(Workspace(min_bytes=1 << 14))
    plain.xp = np

    def run(impl):
        out1 = impl.forward(first.x, first.h0, first.c0, first.params)
        out2 = impl.forward(second.x, second.h0, second.c0, second.params)
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
    impl.xp = PooledNumPy(Workspace(min_bytes=1 << 14))
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
