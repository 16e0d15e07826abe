"""ONNX oracles: one ``LSTM`` node built with ``onnx.helper``, run two independent ways. Forward only.

* ``onnxruntime``: ONNX Runtime's CPU kernel. Its LSTM accepts float only ("LSTM operator does not
  support double yet", checked on 1.31), so float32 cases run in float32 and float64 cases skip.
* ``onnx-reference``: ``onnx.reference.ReferenceEvaluator``, the NumPy reference implementation of
  the ONNX operator specification, in float64.

Both cover vanilla and peephole (ONNX's ``P`` input, ordered i, o, f; the output gate sees the new
cell state, the input and forget gates the previous one, as the contract says). Weights are
converted by :func:`harness.layouts.to_onnx` (gate order i, o, f, c; ``B`` = [Wb, Rb]). Neither
gives gradients: ONNX Runtime's standard package has no training gradients, and the reference
evaluator is forward only.

Cached: one model (and one ORT session or evaluator) per (variant, dtype, D, H), since ``hidden_size``
is an attribute of the node; T and B are symbolic dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case
from oracles.base import Availability, Oracle, Reference, module_available

__all__ = ["OnnxRuntimeOracle", "OnnxReferenceOracle", "lstm_model", "OPSET"]

#: The ONNX opset the model declares (LSTM's current definition dates from opset 14).
OPSET = 14
#: Oldest IR version that opset needs, so that older runtimes load the model too.
IR_VERSION = 8

FORWARD_ONLY = "forward only: ONNX Runtime's standard package has no training gradients"


def lstm_model(D: int, H: int, dtype: str, *, peephole: bool) -> Any:
    """A one-node ONNX model: ``LSTM(X, W, R, B, "", initial_h, initial_c[, P]) -> Y, Y_h, Y_c``.

    X (T, B, D) time-major; Y (T, 1, B, H); Y_h, Y_c (1, B, H). Every weight is a graph input, so
    one model serves every case of its (D, H, dtype, peephole).
    """
    import onnx
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[dtype]
    info = helper.make_tensor_value_info
    inputs = [
        info("X", elem, ["T", "B", D]),
        info("W", elem, [1, 4 * H, D]),
        info("R", elem, [1, 4 * H, H]),
        info("B", elem, [1, 8 * H]),
        info("initial_h", elem, [1, "B", H]),
        info("initial_c", elem, [1, "B", H]),
    ]
    names = ["X", "W", "R", "B", "", "initial_h", "initial_c"]  # "" = no sequence_lens
    if peephole:
        inputs.append(info("P", elem, [1, 3 * H]))
        names.append("P")
    outputs = [info("Y", elem, ["T", 1, "B", H]), info("Y_h", elem, [1, "B", H]),
               info("Y_c", elem, [1, "B", H])]
    node = helper.make_node("LSTM", names, ["Y", "Y_h", "Y_c"], hidden_size=H, direction="forward")
    graph = helper.make_graph([node], "lstm_harness_lstm", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lstm-harness")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _feeds(case: Case, dtype: str) -> dict[str, np.ndarray]:
    d = layouts.to_onnx(case.params, peepholes=case.variant == "peephole")
    feeds = {"X": case.x, "W": d["W"], "R": d["R"], "B": d["B"],
             "initial_h": case.h0[None], "initial_c": case.c0[None]}  # (1, B, H)
    if "P" in d:
        feeds["P"] = d["P"]
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in feeds.items()}


class _OnnxBase(Oracle):
    variants = ("vanilla", "peephole")
    gives_gradients = False

    def __init__(self) -> None:
        self._runners: dict[tuple[str, str, int, int], Any] = {}

    def _make_runner(self, model: Any) -> Any:
        raise NotImplementedError

    def reference(self, case: Case) -> Reference:
        why = self.unsupported_reason(case.variant, case.dtype)
        if why:
            raise ValueError(f"case: {why}")
        dtype = self.compute_dtype_for(case.dtype)
        assert dtype is not None
        c = case.astype(dtype)
        key = (c.variant, dtype, c.D, c.H)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._make_runner(lstm_model(c.D, c.H, dtype, peephole=c.variant == "peephole"))
            self._runners[key] = runner
        # onnx.reference computes the sigmoid as 1 / (1 + exp(-x)), which overflows (correctly, to 0) where
        # pre-activations are far into saturation: the cases that reach that range warn, nothing more.
        with np.errstate(over="ignore"):
            Y, Y_h, Y_c = runner.run(None, _feeds(c, dtype))  # (T, 1, B, H), (1, B, H), (1, B, H)
        return Reference(
            compute_dtype=dtype,
            outputs={"y": np.asarray(Y)[:, 0], "h_T": np.asarray(Y_h)[0], "c_T": np.asarray(Y_c)[0]},
            notes=f"{self.name} in {dtype}",
        )


class OnnxRuntimeOracle(_OnnxBase):
    """ONNX ``LSTM`` run by ONNX Runtime's CPU execution provider, float32, forward only."""

    name = "onnxruntime"
    description = "one-node ONNX LSTM run by ONNX Runtime (CPU), float32"
    compute_dtypes = ("float32",)
    limitation = FORWARD_ONLY

    def _probe(self) -> Availability:
        return module_available("onnx", "onnxruntime")

    def _make_runner(self, model: Any) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class OnnxReferenceOracle(_OnnxBase):
    """The same model run by ``onnx.reference.ReferenceEvaluator`` (NumPy), float64, forward only."""

    name = "onnx-reference"
    description = "one-node ONNX LSTM run by onnx.reference.ReferenceEvaluator, float64"
    compute_dtypes = ("float64",)
    limitation = "forward only: onnx.reference evaluates the operator specification, without gradients"

    def _probe(self) -> Availability:
        avail = module_available("onnx")
        if avail.available:
            try:
                import onnx.reference  # noqa: F401  (added in onnx 1.13)
            except ImportError as exc:
                return Availability(False, f"onnx {avail.versions.get('onnx')} has no onnx.reference: {exc}")
        return avail

    def _make_runner(self, model: Any) -> Any:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model)
