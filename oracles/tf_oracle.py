"""TensorFlow oracles: Keras 3's LSTM layer, the fused BlockLSTMV2 kernel, and a composite.

All three compute the outputs and, inside the same ``tf.function``, the vector-Jacobian product of
the case's upstream gradients (by ``tf.GradientTape``, or for BlockLSTMV2 by its fused backward
kernel, see below), so one case is one graph call.

* ``tf-keras``: ``keras.layers.LSTM(return_sequences=True, return_state=True)`` called with the
  case's initial state, weights from :func:`harness.layouts.to_keras_layers`; vanilla, float64
  (Keras 3 runs a float64 layer when built with ``dtype="float64"``); stacked layers,
  ``Bidirectional`` and lengths as a mask (see :class:`KerasLSTMOracle` for why its masked
  semantics are the contract's).
* ``tf-block-lstm-v2``: ``tf.raw_ops.BlockLSTMV2``, TensorFlow's fused LSTM kernel, and its fused
  backward kernel ``tf.raw_ops.BlockLSTMGradV2``; vanilla and peephole (``use_peephole=True``),
  float32 only (the op accepts half and float), ``cell_clip=0`` which disables clipping in V2. Its
  peephole semantics were checked numerically against the contract's (tests/test_oracles.py):
  the input and forget peepholes see c_{t-1} and the output peephole the new c_t, as specified.

  Why not GradientTape here: TensorFlow (checked on 2.21) registers BlockLSTMV2's gradient with
  the *V1* backward op ``BlockLSTMGrad`` (``tensorflow/python/ops/rnn_grad.py``:
  ``ops.RegisterGradient("BlockLSTMV2")(_block_lstm_grad)``), which reads the gate blocks in
  BlockLSTM's i, c, f, o order while BlockLSTMV2's forward uses i, f, c, o: the f and c blocks of
  dw and db come back swapped and every other gradient is wrong with them. The oracle therefore
  calls the matching V2 backward kernel itself with the upstream gradients, which agrees with
  finite differences; tests/test_oracle_tf.py pins the bug down while it lasts.

  Its ``cell_clip`` is not declared as the contract's cell clipping: the forward kernel does clip
  c_t after the update and carries the clipped value (as the contract says), but its backward
  kernel ``BlockLSTMGradV2`` passes the gradient through the clipped elements unchanged (a
  straight-through gradient), where the contract's gradient there is zero; both facts are pinned
  in tests/test_oracle_tf.py. Nor does it take lengths (``seq_len_max`` is one length for every
  row), a projection, CIFG, or more than one layer and direction.
* ``tf-composite``: the equations of every variant and every layer structure from TF primitives
  (LayerNorm with ``tf.nn.moments``, biased variance), the recurrence a ``tf.scan`` per layer and
  direction, lengths a mask, the reverse direction each row's valid steps read backwards (a
  gather, :mod:`oracles.cells`), CIFG, ``tf.clip_by_value`` for the cell clip (no gradient where
  it clips), the projection; float64.

Caching: every ``tf.function`` has an ``input_signature`` with unknown T, B, D, H, so it is traced
once and never again for new sizes; the composite's is one direction of one layer (lengths, CIFG,
the clip and the projection's size are inputs), traced once per (variant, dtype, projected), and a
layer structure is put together from it cell by cell. Keras layers are built
(and their calls traced) once per size bucket, dtype and number of directions, a stack of layers
run one layer at a time (see :class:`KerasLSTMOracle`), their variables overwritten by each call.
AutoGraph is off (``autograph=False``): the functions branch in Python on Python values only and
loop with ``tf.scan`` or Keras's own loop, so converting their source would change nothing, and
AutoGraph's first conversion cost about half a second of a certification (measured on TF 2.21).
Threads are pinned small (:data:`TF_THREADS`) and TensorFlow's C++ logging is silenced through
``TF_CPP_MIN_LOG_LEVEL`` before the first import (a value the user set is kept).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case
from harness.structure import FEATURES, Structure
from oracles.base import Availability, Oracle, Reference, module_available
from oracles.cells import run_by_cells

__all__ = ["KerasLSTMOracle", "BlockLSTMV2Oracle", "TFCompositeOracle", "TF_THREADS"]

#: Intra- and inter-op threads TensorFlow is pinned to, if it is not running yet when first used.
TF_THREADS = 1

_configured = False


def _quiet_import(name: str) -> Any:
    """Import ``name`` with TensorFlow's start-up chatter kept off the terminal.

    ``TF_CPP_MIN_LOG_LEVEL=3`` hides the C++ log lines, ERROR included: an op that fails raises a Python
    exception, which the oracle reports, so those lines only ever told a user of the harness about
    TensorFlow's own choices ("E0000 ... oneDNN supports DT_BOOL only on platforms with AVX-512", printed
    at the first masked Keras layer by TensorFlow 2.21 on an AVX-512 machine). It does not hide the lines
    absl writes before its logging is initialized (the "oneDNN custom operations are on" notice), so the
    first import also runs with file descriptor 2 pointed at a temporary file; if the import fails, what
    it wrote is passed on to stderr with the exception.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if sys.modules.get(name) is not None:
        return sys.modules[name]
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr descriptor: import as is
        return importlib.import_module(name)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            return importlib.import_module(name)
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tf() -> Any:
    """Import TensorFlow quietly and pin its threads, once."""
    global _configured
    tf = _quiet_import("tensorflow")

    if not _configured:
        tf.get_logger().setLevel("ERROR")
        try:
            tf.config.threading.set_intra_op_parallelism_threads(TF_THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(TF_THREADS)
        except RuntimeError:  # TensorFlow already ran something: its thread pools are fixed
            pass
        _configured = True
    return tf


def _numpy(t: Any) -> np.ndarray:
    return t.numpy()


def _objective(tf: Any, y, h_T, c_T, dy, dh_T, dc_T):
    return tf.reduce_sum(y * dy) + tf.reduce_sum(h_T * dh_T) + tf.reduce_sum(c_T * dc_T)


class _TFBase(Oracle):
    requires: tuple[str, ...] = ("tensorflow",)
    setup_cost = 8.0  # importing TensorFlow (4-5 s) and its first traces and Keras builds

    def _probe(self) -> Availability:
        try:
            _quiet_import("tensorflow")
        except Exception:  # module_available below says why
            pass
        return module_available("tensorflow")

    def _check(self, case: Case) -> str:
        why = self.unsupported_reason(case.variant, case.dtype, case.structure)
        if why:
            raise ValueError(f"case: {why}")
        dtype = self.compute_dtype_for(case.dtype)
        assert dtype is not None
        return dtype


# --------------------------------------------------------------------------------------------------
# Keras


def _bucket(n: int, smallest: int) -> int:
    """The padded size for ``n``: ``smallest``, or the next power of two above it."""
    return max(smallest, 1 << (n - 1).bit_length())


def _pad_last(a: np.ndarray, n: int) -> np.ndarray:
    """Zero-pad the last axis of ``a`` to length ``n``."""
    return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])])


def _pad_blocks(a: np.ndarray, axis: int, blocks: int, n: int) -> np.ndarray:
    """Split ``axis`` of ``a`` into ``blocks`` equal parts and zero-pad each to length ``n``."""
    parts = np.split(a, blocks, axis=axis)
    pad = lambda p: np.pad(p, [(0, n - p.shape[axis]) if ax == axis else (0, 0) for ax in range(a.ndim)])  # noqa: E731
    return np.concatenate([pad(p) for p in parts], axis=axis)


def _unpad_blocks(a: np.ndarray, axis: int, blocks: int, n: int) -> np.ndarray:
    """The inverse of :func:`_pad_blocks`: keep the first ``n`` of each of the ``blocks`` parts."""
    parts = np.split(a, blocks, axis=axis)
    return np.concatenate([np.take(p, range(n), axis=axis) for p in parts], axis=axis)


def _pad_cell(p: dict[str, np.ndarray], in_blocks: int, Dp: int, Hp: int) -> dict[str, np.ndarray]:
    """Canonical W, R, b of a cell embedded in a larger one, every new weight zero: each gate's rows
    padded to Hp, W's input columns (``in_blocks`` equal parts: 1, or one per direction of the layer
    below) each padded to Dp, R's columns to Hp."""
    return {"W": _pad_blocks(_pad_blocks(p["W"], 0, 4, Hp), 1, in_blocks, Dp),
            "R": _pad_blocks(_pad_blocks(p["R"], 0, 4, Hp), 1, 1, Hp),
            "b": _pad_blocks(p["b"], 0, 4, Hp)}


def _unpad_cell(g: dict[str, np.ndarray], in_blocks: int, D: int, H: int) -> dict[str, np.ndarray]:
    return {"W": _unpad_blocks(_unpad_blocks(g["W"], 0, 4, H), 1, in_blocks, D),
            "R": _unpad_blocks(_unpad_blocks(g["R"], 0, 4, H), 1, 1, H),
            "b": _unpad_blocks(g["b"], 0, 4, H)}


class KerasLSTMOracle(_TFBase):
    """``keras.layers.LSTM`` in float64 on the TensorFlow backend, gradients by GradientTape.

    Whole layers: one ``LSTM`` per layer, wrapped in ``Bidirectional`` for both directions (its
    backward layer is the same LSTM with ``go_backwards=True``), each layer fed the one below's
    sequence output; lengths as Keras's ``mask`` (True where t < lengths[b]). Keras's masked
    semantics were checked against the contract (tests/test_oracle_tf.py): at a masked step the
    state is carried unchanged; the backward layer reverses the whole padded sequence, so it passes
    the padded steps first with its state unchanged and starts, in effect, at lengths[b] - 1;
    ``Bidirectional`` reverses its output back. At a masked step a plain LSTM outputs its previous
    output unless ``zero_output_for_mask=True`` (which ``Bidirectional`` sets for its layers), so
    every layer here is built with ``zero_output_for_mask=True``: y is 0 there, as the contract says.

    A Keras layer has fixed sizes and tracing its call takes about half a second, which would
    dominate a run whose cases draw many different (D, H). With ``bucket=True`` (the default) a case
    runs in a layer of the next bucket size (D and H rounded up to 8, 16, 32, ...), its extra inputs,
    state units, weights and upstream gradients all zero. That embedding is exact: a padded unit
    has pre-activation 0, so its c stays 0 and its h = sigmoid(0) * tanh(0) = 0, it feeds nothing
    into the real units (its recurrent weights are zero, as are the next layer's weights from it)
    and receives no upstream gradient; only the floating-point summation order of the matrix
    products can differ. ``bucket=False`` builds layers of exactly the case's sizes.

    Stacked layers run one layer at a time, each call giving its outputs and the gradients of its
    input, states and weights for the upstream gradients it is given (the layer above's input
    gradient is the upstream gradient of this layer's y), so that one build per bucket and kind of
    layer (one direction or two) serves every number of layers: a stack built and traced whole took
    one to three seconds per number of layers, most of a certification's time in this oracle. With
    buckets a layer takes at least as many features as a layer above a ``Bidirectional`` one, so the
    first layer and the layers above it share the build too.
    """

    name = "tf-keras"
    description = "keras.layers.LSTM (TensorFlow backend) with converted weights, GradientTape gradients"
    variants = ("vanilla",)
    compute_dtypes = ("float64",)
    structures = frozenset({"layers", "bidirectional", "lengths"})
    structures_note = "Keras's LSTM has no projection, coupled input and forget gates or cell clipping"

    def __init__(self, *, bucket: bool = True, smallest_bucket: int = 8) -> None:
        self.bucket = bucket
        self.smallest_bucket = smallest_bucket
        self._built: dict[tuple[int, int, str, bool], tuple[Any, Any]] = {}

    requires = ("tensorflow", "keras")

    def installed(self) -> Availability:
        avail = super().installed()
        backend = os.environ.get("KERAS_BACKEND") or "tensorflow"  # keras ignores an empty value too
        if avail.available and self._availability is None and backend != "tensorflow":
            return Availability(False, f"KERAS_BACKEND={backend}: keras runs on the {backend} backend here, not "
                                       f"tensorflow")
        return avail

    def _probe(self) -> Availability:
        avail = super()._probe()
        if not avail.available:
            return avail
        try:
            _quiet_import("keras")
        except Exception:
            pass
        keras_avail = module_available("keras")
        if not keras_avail.available:
            return keras_avail
        import keras

        backend = keras.backend.backend()
        if backend != "tensorflow":
            return Availability(False, f"keras runs on the {backend} backend here, not tensorflow "
                                       "(set KERAS_BACKEND=tensorflow before importing keras)")
        return Availability(True, "", {**avail.versions, **keras_avail.versions})

    def _layer(self, D: int, H: int, dtype: str, bidirectional: bool) -> tuple[Any, Any]:
        """One layer (an LSTM, or a Bidirectional pair) taking D features, and its traced call: outputs and
        the gradients of x, the states and the layer's weights, for given upstream gradients."""
        key = (D, H, dtype, bidirectional)
        if key not in self._built:
            tf = _tf()
            import keras

            lstm = keras.layers.LSTM(H, return_sequences=True, return_state=True, zero_output_for_mask=True,
                                     dtype=dtype)
            layer = keras.layers.Bidirectional(lstm, dtype=dtype) if bidirectional else lstm
            layer.build((None, None, D))
            weights = []
            for one in [layer.forward_layer, layer.backward_layer] if bidirectional else [layer]:
                weights += [one.cell.kernel, one.cell.recurrent_kernel, one.cell.bias]  # to_keras_layers's order
            seq = tf.TensorSpec([None, None, None], dtype)  # (B, T, ...) batch-major
            state = tf.TensorSpec([None, None, None], dtype)  # (dirs, B, H)
            mask_spec = tf.TensorSpec([None, None], tf.bool)  # (B, T)

            @tf.function(input_signature=[seq, state, state, mask_spec, seq, state, state], autograph=False)
            def run(x, h0, c0, mask, dy, dh_T, dc_T):
                with tf.GradientTape() as tape:
                    tape.watch([x, h0, c0])
                    init = []
                    for d in range(2 if bidirectional else 1):
                        init += [h0[d], c0[d]]
                    out = layer(x, mask=mask, initial_state=init)  # y, then h, c per direction
                    y, h_T, c_T = out[0], tf.stack(out[1::2]), tf.stack(out[2::2])
                    loss = _objective(tf, y, h_T, c_T, dy, dh_T, dc_T)
                grads = tape.gradient(loss, [x, h0, c0, *weights],
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
                return y, h_T, c_T, grads

            self._built[key] = (weights, run)
        return self._built[key]

    def reference(self, case: Case) -> Reference:
        dtype = self._check(case)
        c = case.astype(dtype)
        s = c.structure
        D, H, dirs = c.D, c.H, s.dirs
        Hp = _bucket(H, self.smallest_bucket) if self.bucket else H
        one = Structure(bidirectional=s.bidirectional)  # the structure of one layer
        lift = (lambda a: a) if s.layered else (lambda a: a[None])  # states -> (L * dirs, B, H)
        h0, c0, dh_T, dc_T = (_pad_last(lift(a), Hp) for a in (c.h0, c.c0, c.dh_T, c.dc_T))  # (L * dirs, B, Hp)
        lengths = np.full(c.B, c.T) if c.lengths is None else np.asarray(c.lengths)
        mask = np.arange(c.T)[None, :] < lengths[:, None]  # (B, T)

        def blocks(k: int) -> tuple[int, int, int]:
            """Layer k's input: (parts, each part's real size, padded size): x, or the layer below's directions."""
            if k == 0:
                return 1, D, _bucket(D, self.smallest_bucket) if self.bucket else D
            return dirs, H, Hp

        def call(k: int, inp: np.ndarray, dy: np.ndarray) -> tuple[Any, ...]:
            """Layer k on its input in the padded layout (B, T, parts * padded), with its weights assigned."""
            parts, _, size = blocks(k)
            # With buckets every layer of a kind (one or two directions) takes as many features as a layer
            # above a Bidirectional one: a single build serves the first layer and the layers above it.
            Dp = max(parts * size, dirs * Hp) if self.bucket else parts * size
            weights, run = self._layer(Dp, Hp, dtype, s.bidirectional)
            cells = {(0, d): _pad_cell(layouts.cell_params(c.params, s, k, d), parts, size, Hp) for d in range(dirs)}
            for cell in cells.values():
                cell["W"] = _pad_last(cell["W"], Dp)
            values = layouts.to_keras_layers(layouts.join_cells(cells, one), one)[0]
            for var, value in zip(weights, values, strict=True):
                var.assign(value)
            n = slice(k * dirs, (k + 1) * dirs)
            return run(_pad_last(inp, Dp), h0[n], c0[n], mask, dy, dh_T[n], dc_T[n])

        # Keras layers one at a time, chained here: forward to get every layer's input, then backward from
        # the top, each layer's input gradient the upstream gradient of the layer below's y. One build per
        # kind of layer serves every number of layers, where a stack of L layers was a build and a trace of its own.
        inputs = [layouts.batch_major(_pad_last(c.x, blocks(0)[2]))]  # (B, T, Dp)
        for k in range(s.num_layers - 1):
            zeros = np.zeros(inputs[-1].shape[:2] + (dirs * Hp,), dtype)
            inputs.append(_numpy(call(k, inputs[-1], zeros)[0]))  # (B, T, dirs * Hp)
        ct = layouts.batch_major(_pad_blocks(c.dy, 2, dirs, Hp))  # (B, T, dirs * Hp)
        finals: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        dstates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        dcells: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        y = None
        for k in reversed(range(s.num_layers)):
            out, h_k, c_k, g = call(k, inputs[k], ct)
            y = out if y is None else y
            finals[k], dstates[k] = (_numpy(h_k), _numpy(c_k)), (_numpy(g[1]), _numpy(g[2]))
            parts, real, size = blocks(k)
            ct = _numpy(g[0])[..., : parts * size]
            dlayer = layouts.from_keras_layers([[_numpy(t) for t in g[3:]]], one)
            for d in range(dirs):
                dcell = layouts.cell_params(dlayer, one, 0, d)
                dcell["W"] = dcell["W"][:, : parts * size]
                dcells[(k, d)] = _unpad_cell(dcell, parts, real, H)
        unlift = (lambda a: a) if s.layered else (lambda a: a[0])

        def stacked(pairs: dict[int, tuple[np.ndarray, np.ndarray]], i: int) -> np.ndarray:
            return unlift(np.concatenate([pairs[k][i] for k in range(s.num_layers)])[..., :H])

        return Reference(
            compute_dtype=dtype,
            outputs={"y": _unpad_blocks(layouts.time_major(_numpy(y)), 2, dirs, H),
                     "h_T": stacked(finals, 0), "c_T": stacked(finals, 1)},
            gradients={"x": layouts.time_major(ct)[..., :D], "h0": stacked(dstates, 0), "c0": stacked(dstates, 1),
                       **layouts.join_cells(dcells, s)},
            notes=f"keras.layers.LSTM in {dtype}" + (f" ({s.describe()}, layer by layer)" if not s.is_default else "")
                  + (f", run in zero-padded layers (H={Hp})" if self.bucket else ""),
        )


# --------------------------------------------------------------------------------------------------
# BlockLSTMV2


class BlockLSTMV2Oracle(_TFBase):
    """``tf.raw_ops.BlockLSTMV2`` (float32), vanilla and peephole, backward by ``BlockLSTMGradV2``."""

    name = "tf-block-lstm-v2"
    description = "tf.raw_ops.BlockLSTMV2 and BlockLSTMGradV2, TensorFlow's fused LSTM kernels, float32"
    variants = ("vanilla", "peephole")
    compute_dtypes = ("float32",)
    limitation = ("float32 only: the BlockLSTMV2 kernel accepts half and float, so float64 cases skip it; one layer, "
                  "one direction, full length: its cell_clip gradient passes through clipped cells, not the "
                  "contract's clip")
    structures_note = ("BlockLSTMV2 is one layer and direction with one length for the batch, and its cell_clip "
                       "gradient passes through clipped cells (the contract's is zero there)")

    def __init__(self) -> None:
        self._functions: dict[bool, Any] = {}

    def _function(self, peephole: bool) -> Any:
        if peephole not in self._functions:
            tf = _tf()
            f32 = "float32"
            seq = tf.TensorSpec([None, None, None], f32)
            mat = tf.TensorSpec([None, None], f32)
            vec = tf.TensorSpec([None], f32)

            @tf.function(input_signature=[seq, mat, mat, mat, vec, vec, vec, vec, seq, mat, mat], autograph=False)
            def run(x, h0, c0, w, b, wci, wcf, wco, dy, dh_T, dc_T):
                args = dict(seq_len_max=tf.cast(tf.shape(x)[0], tf.int64), x=x, cs_prev=c0, h_prev=h0, w=w,
                            wci=wci, wcf=wcf, wco=wco, b=b, use_peephole=peephole)
                i, cs, f, o, ci, co, h = tf.raw_ops.BlockLSTMV2(cell_clip=0.0, **args)  # each (T, B, H)
                # The kernel's outputs are every h_t and c_t, so the upstream gradient of h_T and c_T
                # lands on their last step.
                T = tf.shape(x)[0]
                last = tf.one_hot(T - 1, T, dtype=x.dtype)[:, None, None]  # (T, 1, 1): 1 at the last step
                grads = tf.raw_ops.BlockLSTMGradV2(
                    i=i, cs=cs, f=f, o=o, ci=ci, co=co, h=h,
                    cs_grad=last * dc_T, h_grad=dy + last * dh_T, **args,
                )  # x, cs_prev, h_prev, w, wci, wcf, wco, b
                return h, h[-1], cs[-1], grads

            self._functions[peephole] = run
        return self._functions[peephole]

    def reference(self, case: Case) -> Reference:
        dtype = self._check(case)
        c = case.astype(dtype)
        peephole = c.variant == "peephole"
        d = layouts.to_block_lstm_v2(c.params)
        zeros = np.zeros(c.H, dtype)
        wci, wcf, wco = (d.get(k, zeros) for k in ("wci", "wcf", "wco"))
        y, h_T, c_T, g = self._function(peephole)(c.x, c.h0, c.c0, d["w"], d["b"], wci, wcf, wco,
                                                  c.dy, c.dh_T, c.dc_T)
        dx, dc0, dh0, dw, dwci, dwcf, dwco, db = (_numpy(t) for t in g)
        peeps = dict(wci=dwci, wcf=dwcf, wco=dwco) if peephole else {}
        dparams = layouts.from_block_lstm_v2(dw, db, c.D, **peeps)  # gradients convert like the weights
        return Reference(
            compute_dtype=dtype,
            outputs={"y": _numpy(y), "h_T": _numpy(h_T), "c_T": _numpy(c_T)},
            gradients={"x": dx, "h0": dh0, "c0": dc0, **dparams},
            notes="tf.raw_ops.BlockLSTMV2 (float32, cell_clip disabled)",
        )


# --------------------------------------------------------------------------------------------------
# Composite


def _composite_step(tf: Any, variant: str, p: dict[str, Any], eps: Any, cifg: Any, clip: Any):
    """One time step of the contract's equations as a ``tf.scan`` body:
    ((h, c, y), (x_t, m_t)) -> (h, c, y), where ``m_t`` (B, 1) is 1 where the step exists and 0 where
    it does not (the state is kept and y is 0 there). ``cifg`` (a bool tensor) and ``clip`` (infinite:
    none) are inputs, so that one trace serves cells with and without them: ``tf.where`` gives the
    unselected forget gate a zero gradient, and ``clip_by_value`` passes no gradient where it clips and
    all of it where it does not (every element, for an infinite clip)."""

    def ln(v, k):  # LayerNorm row k: biased variance over the H units, eps inside the square root
        mean, var = tf.nn.moments(v, axes=[-1], keepdims=True)
        return (v - mean) * tf.math.rsqrt(var + eps) * p["gamma"][k] + p["beta"][k]

    def step(state, inputs):
        h, c, _ = state  # (B, H_out), (B, H)
        x_t, m_t = inputs  # (B, D_in), (B, 1)
        a = tf.matmul(x_t, p["W"], transpose_b=True) + tf.matmul(h, p["R"], transpose_b=True)  # (B, 4H)
        if variant != "layernorm":
            a = a + p["b"]
        a_i, a_f, a_g, a_o = tf.split(a, 4, axis=1)
        if variant == "vanilla":
            i = tf.sigmoid(a_i)
            f = tf.where(cifg, 1 - i, tf.sigmoid(a_f))
            c_new = f * c + i * tf.tanh(a_g)
        elif variant == "peephole":
            i = tf.sigmoid(a_i + p["p_i"] * c)
            f = tf.where(cifg, 1 - i, tf.sigmoid(a_f + p["p_f"] * c))
            c_new = f * c + i * tf.tanh(a_g)
        else:
            i = tf.sigmoid(ln(a_i, 0))
            f = tf.where(cifg, 1 - i, tf.sigmoid(ln(a_f, 1)))
            c_new = ln(f * c + i * tf.tanh(ln(a_g, 2)), 4)  # the normalized cell is carried forward
        c_new = tf.clip_by_value(c_new, -clip, clip)
        if variant == "peephole":
            o = tf.sigmoid(a_o + p["p_o"] * c_new)  # the output gate sees the new cell state
        elif variant == "vanilla":
            o = tf.sigmoid(a_o)
        else:
            o = tf.sigmoid(ln(a_o, 3))
        h_new = o * tf.tanh(c_new)
        if "proj" in p:
            h_new = tf.matmul(h_new, p["proj"], transpose_b=True)  # (B, P)
        keep = m_t > 0
        return tf.where(keep, h_new, h), tf.where(keep, c_new, c), tf.where(keep, h_new, tf.zeros_like(h_new))

    return step


class TFCompositeOracle(_TFBase):
    """The LSTM of every variant and structure from TF primitives in a cached ``tf.function``, float64.

    One direction of one layer is one ``tf.function`` (a ``tf.scan`` over the steps, lengths a mask,
    and the vector-Jacobian product by GradientTape), traced once per variant, dtype and whether it
    projects; a layer structure is put together from it cell by cell (:func:`oracles.cells.run_by_cells`:
    the reverse direction reads each row's valid steps backwards, layers chain in NumPy). Tracing a
    whole structure took one to three seconds for each new one, and drawn structures rarely repeat.
    """

    name = "tf-composite"
    description = "LSTM equations in TensorFlow primitives (tf.scan, tf.nn.moments), float64 GradientTape"
    variants = ("vanilla", "peephole", "layernorm")
    compute_dtypes = ("float64",)
    structures = frozenset(FEATURES)

    def __init__(self) -> None:
        self._functions: dict[tuple[str, str, bool], Any] = {}

    def _function(self, variant: str, dtype: str, param_ndims: dict[str, int]) -> Any:
        # Sizes, lengths, CIFG and the clip are inputs: one trace per (variant, dtype, projected).
        key = (variant, dtype, "proj" in param_ndims)
        if key in self._functions:
            return self._functions[key]
        tf = _tf()

        def run(x, h0, c0, params, dy, dh_T, dc_T, lengths, eps, cifg, clip):
            names = ["x", "h0", "c0", *params]
            inputs = [x, h0, c0] + [params[k] for k in names[3:]]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                mask = tf.cast(tf.range(tf.shape(x)[0])[:, None] < tf.cast(lengths, tf.int32)[None, :],
                               x.dtype)[..., None]  # (T, B, 1)
                step = _composite_step(tf, variant, params, eps, cifg, clip)
                hs, cs, y = tf.scan(step, (x, mask), initializer=(h0, c0, tf.zeros_like(h0)))
                h_T, c_T = hs[-1], cs[-1]  # a row's state is kept after its last valid step
                loss = _objective(tf, y, h_T, c_T, dy, dh_T, dc_T)
            grads = tape.gradient(loss, inputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return y, h_T, c_T, dict(zip(names, grads, strict=True))

        seq = tf.TensorSpec([None, None, None], dtype)  # (T, B, features)
        state = tf.TensorSpec([None, None], dtype)  # (B, features)
        pspec = {k: tf.TensorSpec([None] * n, dtype) for k, n in param_ndims.items()}
        scalar = tf.TensorSpec([], dtype)
        self._functions[key] = tf.function(run, input_signature=[
            seq, state, state, pspec, seq, state, state, tf.TensorSpec([None], tf.int64), scalar,
            tf.TensorSpec([], tf.bool), scalar], autograph=False)
        return self._functions[key]

    def reference(self, case: Case) -> Reference:
        dtype = self._check(case)
        c = case.astype(dtype)
        s = c.structure
        lengths = np.full(c.B, c.T, np.int64) if c.lengths is None else np.asarray(c.lengths, np.int64)
        clip = np.inf if s.cell_clip is None else s.cell_clip
        inputs = (lengths, np.asarray(c.ln_eps, dtype), np.asarray(s.coupled_input_forget), np.asarray(clip, dtype))

        def cell(params: dict[str, np.ndarray], x: np.ndarray, h0: np.ndarray, c0: np.ndarray, upstream: Any
                 ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]:
            fn = self._function(c.variant, dtype, {k: v.ndim for k, v in params.items()})
            # The outputs alone come from the same function with zero upstream gradients (one trace).
            up = upstream or (np.zeros(x.shape[:2] + h0.shape[-1:], dtype), np.zeros_like(h0), np.zeros_like(c0))
            y, h_T, c_T, g = fn(x, h0, c0, params, *up, *inputs)
            grads = {} if upstream is None else {k: _numpy(v) for k, v in g.items()}
            return (_numpy(y), _numpy(h_T), _numpy(c_T)), grads

        (y, h_T, c_T), grads = run_by_cells(c, cell)
        return Reference(
            compute_dtype=dtype,
            outputs={"y": y, "h_T": h_T, "c_T": c_T},
            gradients=grads,
            notes=f"TensorFlow primitives in {dtype}" + (", cell by cell" if not s.is_default else ""),
        )
