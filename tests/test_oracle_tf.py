"""TensorFlow-specific facts the TF oracles rely on, each established numerically."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


# --------------------------------------------------------------------------------------------------
# Whole-layer facts: Keras masking, BlockLSTMV2's cell_clip


def _structured(structure, dtype="float64", **kw):
    from tests.structured import structured_case

    return structured_case(structure, dtype=dtype, T=5, B=3, D=2, H=3, seed=4, **kw)


def test_plain_keras_lstm_repeats_its_output_at_masked_steps_unless_zero_output_for_mask():
    """Why the Keras oracle builds every layer with zero_output_for_mask=True: a plain LSTM carries its
    state through masked steps (as the contract says) but outputs its last output there, not 0."""
    from harness.structure import Structure
    from oracles.tf_oracle import _tf

    require(KerasLSTMOracle())
    tf = _tf()
    import keras

    case = _structured(Structure(lengths=True), lengths=[2, 5, 3])
    mask = np.arange(case.T)[None, :] < case.lengths[:, None]
    k = layouts.to_keras(case.params)
    outs = {}
    for zero in (False, True):
        layer = keras.layers.LSTM(case.H, return_sequences=True, return_state=True, zero_output_for_mask=zero,
                                  dtype="float64")
        layer.build((None, None, case.D))
        layer.set_weights([k["kernel"], k["recurrent_kernel"], k["bias"]])
        y, h_T, _ = layer(layouts.batch_major(case.x), mask=tf.constant(mask), initial_state=[case.h0, case.c0])
        outs[zero] = (layouts.time_major(y.numpy()), h_T.numpy())
    y_plain, h_plain = outs[False]
    y_zero, h_zero = outs[True]
    np.testing.assert_array_equal(h_plain, h_zero)  # the state is the same either way
    assert np.allclose(y_plain[2:, 0], y_plain[1, 0])  # row 0 (length 2) repeats its last output
    assert np.all(y_zero[2:, 0] == 0)


def test_keras_bidirectional_with_a_mask_is_the_contract():
    """Bidirectional's backward layer reverses the whole padded sequence, but the mask keeps its state
    through the padded steps, so it starts at lengths[b] - 1; its output is reversed back and 0 at padded
    steps. Checked against the torch composite, which gathers each row's valid prefix."""
    from harness.structure import Structure
    from oracles.torch_oracle import TorchCompositeOracle
    from tests.oracle_support import structured_mismatches

    oracle = require(KerasLSTMOracle(bucket=False))
    case = _structured(Structure(bidirectional=True, lengths=True), lengths=[2, 5, 1])
    assert not structured_mismatches(case, oracle.reference(case), TorchCompositeOracle().reference(case))


def test_block_lstm_v2_cell_clip_clips_forward_but_passes_the_gradient_through():
    """Forward: BlockLSTMV2's cell_clip is the contract's (clip after the update, clipped value carried).
    Backward: BlockLSTMGradV2 ignores the clip (a straight-through gradient), so the oracle does not
    declare "clip"."""
    pytest.importorskip("torch")
    import torch

    from harness.structure import Structure
    from oracles import torch_oracle
    from oracles.tf_oracle import _tf

    require(BlockLSTMV2Oracle())
    tf = _tf()
    clip = 0.4
    case = _structured(Structure(cell_clip=clip))
    d = layouts.to_block_lstm_v2(case.params)
    f32 = lambda a: tf.constant(np.asarray(a, np.float32))  # noqa: E731
    zeros = np.zeros(case.H)
    args = dict(seq_len_max=tf.constant(case.T, tf.int64), x=f32(case.x), cs_prev=f32(case.c0), h_prev=f32(case.h0),
                w=f32(d["w"]), wci=f32(zeros), wcf=f32(zeros), wco=f32(zeros), b=f32(d["b"]), use_peephole=False)
    i, cs, f, o, ci, co, h = tf.raw_ops.BlockLSTMV2(cell_clip=clip, **args)
    contract = torch_oracle.TorchCompositeOracle().reference(case)
    assert np.any(np.abs(cs.numpy()) >= clip * (1 - 1e-6)), "the case should clip"
    np.testing.assert_allclose(h.numpy(), contract.outputs["y"], atol=1e-6)
    np.testing.assert_allclose(cs.numpy()[-1], contract.outputs["c_T"], atol=1e-6)
    grads = tf.raw_ops.BlockLSTMGradV2(i=i, cs=cs, f=f, o=o, ci=ci, co=co, h=h, cs_grad=tf.zeros_like(cs),
                                       h_grad=f32(case.dy), **args)
    dx = grads[0].numpy()
    # The contract's gradient (zero through clipped cells) with only dy upstream ...
    only_dy = case.copy()
    only_dy.dh_T, only_dy.dc_T = np.zeros_like(case.dh_T), np.zeros_like(case.dc_T)
    right = torch_oracle.TorchCompositeOracle().reference(only_dy).gradients["x"]
    # ... and a straight-through clip's
    saved = torch.clamp
    try:
        torch.clamp = lambda c, lo, hi: c + (saved(c, lo, hi) - c).detach()
        straight = torch_oracle.TorchCompositeOracle().reference(only_dy).gradients["x"]
    finally:
        torch.clamp = saved
    assert np.abs(right - straight).max() > 1e-2
    np.testing.assert_allclose(dx, straight, atol=1e-5)
    assert np.abs(dx - right).max() > 1e-2


def _certify_with_tf_oracles(tmp_path, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # tox sets it; a user does not
    env.update(env_changes)
    return subprocess.run([sys.executable, "-m", "harness", "certify", "stacked", "--oracle", "tf-keras",
                           "--oracle", "tf-composite", "--max-examples", "4", "--report-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=300)


#: A line of TensorFlow's C++ (absl) logging: "E0000 00:00:1796071096.784224  2535 util.cc:131] ...".
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ", re.MULTILINE)


def test_a_certification_with_the_tf_oracles_prints_no_tensorflow_log_lines(tmp_path):
    """What a user sees on the terminal is the harness's: TensorFlow's C++ log lines (on TF 2.21 and an
    AVX-512 machine, an ERROR line about oneDNN and DT_BOOL at the first masked Keras layer) stay off it."""
    require(KerasLSTMOracle())
    proc = _certify_with_tf_oracles(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Verdict: certified" in proc.stdout
    assert not _ABSL_LINE.findall(proc.stdout + proc.stderr), proc.stdout + proc.stderr


def test_a_tensorflow_log_level_the_user_set_is_kept(monkeypatch):
    from oracles.tf_oracle import _quiet_import

    require(KerasLSTMOracle())
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    _quiet_import("tensorflow")
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    _quiet_import("tensorflow")
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
