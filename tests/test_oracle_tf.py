"""TensorFlow-specific facts the TF oracles rely on, each established numerically."""

from __future__ import annotations

import numpy as np
import pytest

from harness import layouts
from harness.cases import CaseSpec, build_case
from oracles.finite_diff import FiniteDifferenceOracle
from oracles.tf_oracle import BlockLSTMV2Oracle, KerasLSTMOracle
from tests.oracle_support import assert_close, assert_references_agree, require

pytestmark = pytest.mark.frameworks


def _registered_and_kernel_gradients(case):
    """BlockLSTMV2's dw, db from GradientTape (its registered gradient) and from BlockLSTMGradV2."""
    from oracles.tf_oracle import _tf

    tf = _tf()
    d = layouts.to_block_lstm_v2(case.params)
    f32 = lambda a: tf.constant(np.asarray(a, np.float32))  # noqa: E731
    zeros = np.zeros(case.H)
    args = dict(seq_len_max=tf.constant(case.T, tf.int64), x=f32(case.x), cs_prev=f32(case.c0),
                h_prev=f32(case.h0), w=f32(d["w"]), wci=f32(zeros), wcf=f32(zeros), wco=f32(zeros),
                b=f32(d["b"]), use_peephole=False)
    with tf.GradientTape() as tape:
        tape.watch([args["w"], args["b"]])
        out = tf.raw_ops.BlockLSTMV2(cell_clip=0.0, **args)
        loss = tf.reduce_sum(out[6] * f32(case.dy))
    dw_tape, db_tape = (t.numpy() for t in tape.gradient(loss, [args["w"], args["b"]]))
    i, cs, f, o, ci, co, h = out
    grads = tf.raw_ops.BlockLSTMGradV2(i=i, cs=cs, f=f, o=o, ci=ci, co=co, h=h, cs_grad=tf.zeros_like(cs),
                                       h_grad=f32(case.dy), **args)
    return (dw_tape, db_tape), (grads[3].numpy(), grads[7].numpy())


def test_block_lstm_v2_oracle_gradients_match_finite_differences():
    oracle = require(BlockLSTMV2Oracle())
    fd = FiniteDifferenceOracle()
    for variant in ("vanilla", "peephole"):
        for seed in range(3):
            case = build_case(CaseSpec(variant=variant, dtype="float32", T=4, B=2, D=3, H=3, seed=seed))
            assert_references_agree(case, oracle.reference(case), oracle.name, fd.reference(case), fd.name)


def test_block_lstm_v2_registered_gradient_swaps_f_and_c():
    """Why the oracle calls BlockLSTMGradV2 itself (see oracles/tf_oracle.py).

    TensorFlow registers BlockLSTMV2's gradient with the V1 backward op, which reads gate blocks in
    BlockLSTM's order i, c, f, o while the V2 forward uses i, f, c, o. Characterized here: the
    registered db is the correct db with its f and c blocks exchanged. Skips once TF fixes it.
    """
    require(BlockLSTMV2Oracle())
    case = build_case(CaseSpec(dtype="float32", T=1, B=2, D=3, H=4, seed=5, upstream="y_only"))
    (dw_tape, db_tape), (dw_kernel, db_kernel) = _registered_and_kernel_gradients(case)
    ref = FiniteDifferenceOracle().reference(case)
    correct_db = layouts.to_block_lstm_v2({**case.params, "b": ref.gradients["b"]})["b"]
    assert_close(db_kernel, correct_db, quantity="db", variant="vanilla", H=case.H, dtype="float32",
                 kind="gradients", actual_name="BlockLSTMGradV2", expected_name="finite differences")
    if np.allclose(db_tape, db_kernel, rtol=1e-5, atol=1e-6):
        pytest.skip("this TensorFlow's registered BlockLSTMV2 gradient is correct (the bug is fixed)")
    swapped_db = layouts.permute_gates(db_kernel, "ifco", "icfo")
    swapped_dw = layouts.permute_gates(dw_kernel, "ifco", "icfo", axis=1)
    np.testing.assert_allclose(db_tape, swapped_db, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw_tape, swapped_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, same_bucket", [((3, 2, 3, 5), (2, 7)), ((1, 1, 1, 1), (8, 8)),
                                                 ((4, 3, 9, 17), (16, 20))])
def test_keras_bucketed_layer_agrees_with_an_exact_size_layer(shape, same_bucket):
    T, B, D, H = shape
    bucketed = require(KerasLSTMOracle())
    exact = KerasLSTMOracle(bucket=False)
    case = build_case(CaseSpec(T=T, B=B, D=D, H=H, seed=3))
    a, b = bucketed.reference(case), exact.reference(case)
    assert "padded" in a.notes and "padded" not in b.notes
    assert_references_agree(case, a, "tf-keras (bucketed)", b, "tf-keras (exact size)")
    # Other sizes in the same bucket share the one built and traced layer.
    D2, H2 = same_bucket
    other = build_case(CaseSpec(T=T + 1, B=B, D=D2, H=H2, seed=4))
    assert_references_agree(other, bucketed.reference(other), "tf-keras (bucketed)", exact.reference(other),
                            "tf-keras (exact size)")
    assert len(bucketed._built) == 1
