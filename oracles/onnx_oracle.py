"""ONNX oracles: an ``LSTM`` model built with ``onnx.helper``, run two independent ways. Forward only.

* ``onnxruntime``: ONNX Runtime's CPU kernel. Its LSTM accepts float only ("LSTM operator does not
  support double yet", checked on 1.31 and 1.32), so float32 cases run in float32 and float64 cases skip.
* ``onnx-reference``: ``onnx.reference.ReferenceEvaluator``, the NumPy reference implementation of
  the ONNX operator specification, in float64.

Both cover vanilla and peephole (ONNX's ``P`` input, ordered i, o, f; the output gate sees the new
cell state, the input and forget gates the previous one, as the contract says). Weights are
converted by :func:`harness.layouts.to_onnx_layer` (gate order i, o, f, c; ``B`` = [Wb, Rb]; a
``num_directions`` axis first). Neither gives gradients: ONNX Runtime's standard package has no
training gradients, and the reference evaluator is forward only.

Whole layers: one ``LSTM`` node per layer, ``direction="bidirectional"`` for both directions, each
layer's ``Y`` (T, dirs, B, H) transposed and reshaped to (T, B, dirs * H) as the next layer's ``X``.
ONNX Runtime also takes ``sequence_lens`` (lengths) and ``input_forget=1`` (CIFG): both were checked
numerically against the contract (tests/test_oracles_structure.py): Y is 0 at padded steps, Y_h / Y_c
hold the state after each row's last valid step, the reverse direction starts at lengths[b] - 1, and
with ``input_forget`` the forget gate is 1 - i. ``onnx.reference`` (onnx 1.23: its LSTM takes them as
unused arguments) ignores both ``sequence_lens`` and ``input_forget``, so it declares neither. ONNX's
LSTM has no projection; its ``clip`` attribute clips the gates' pre-activations, not the cell state,
so it is not ``cell_clip`` and is never set.

Cached: one model (and one ORT session or evaluator) per (variant, dtype, D, H, structure), since
``hidden_size`` and the node chain are fixed in the graph; T and B are symbolic dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case
from harness.structure import Structure
from oracles.base import Availability, Oracle, Reference, module_available

__all__ = ["OnnxRuntimeOracle", "OnnxReferenceOracle", "lstm_model", "OPSET"]

#: The ONNX opset the model declares (LSTM's current definition dates from opset 14).
OPSET = 14
#: Oldest IR version that opset needs, so that older runtimes load the model too.
IR_VERSION = 8

FORWARD_ONLY = "forward only: ONNX Runtime's standard package has no training gradients"


def lstm_model(D: int, H: int, dtype: str, *, peephole: bool, structure: Structure | None = None) -> Any:
    """An ONNX model of one ``LSTM`` node per layer: layer k is
    ``LSTM(X_k, W_lk, R_lk, B_lk, [sequence_lens], initial_h_lk, initial_c_lk[, P_lk]) -> Y_k, Y_h_lk, Y_c_lk``.

    X (T, B, D) time-major; W_lk (dirs, 4H, D_in), initial_h_lk (dirs, B, H); the model's outputs are
    the last layer's ``Y`` (T, dirs, B, H) and every layer's ``Y_h_lk``, ``Y_c_lk`` (dirs, B, H);
    ``sequence_lens`` (B,) int32 is an input when the structure has lengths. Every weight is a graph
    input, so one model serves every case of its (D, H, dtype, peephole, structure). With the default
    structure the names are those of one node: W, R, B, initial_h, initial_c, P, Y, Y_h, Y_c.
    """
    import onnx
    from onnx import TensorProto, helper

    structure = structure or Structure()
    if structure.proj_size or structure.cell_clip is not None:
        raise ValueError(f"structure: ONNX's LSTM has no projection and no cell clipping, got {structure.describe()}")
    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[dtype]
    info = helper.make_tensor_value_info
    dirs, L = structure.dirs, structure.num_layers
    direction = "bidirectional" if structure.bidirectional else "forward"
    inputs = [info("X", elem, ["T", "B", D])]
    if structure.lengths:
        inputs.append(info("sequence_lens", TensorProto.INT32, ["B"]))
    outputs, nodes = [], []
    x_name = "X"
    for k in range(L):
        sfx = f"_l{k}" if structure.layered else ""
        D_in = D if k == 0 else dirs * H
        inputs += [
            info(f"W{sfx}", elem, [dirs, 4 * H, D_in]),
            info(f"R{sfx}", elem, [dirs, 4 * H, H]),
            info(f"B{sfx}", elem, [dirs, 8 * H]),
            info(f"initial_h{sfx}", elem, [dirs, "B", H]),
            info(f"initial_c{sfx}", elem, [dirs, "B", H]),
        ]
        names = [x_name, f"W{sfx}", f"R{sfx}", f"B{sfx}", "sequence_lens" if structure.lengths else "",
                 f"initial_h{sfx}", f"initial_c{sfx}"]
        if peephole:
            inputs.append(info(f"P{sfx}", elem, [dirs, 3 * H]))
            names.append(f"P{sfx}")
        y_name = "Y" if k == L - 1 else f"Y{sfx}"
        attrs: dict[str, Any] = dict(hidden_size=H, direction=direction)
        if structure.coupled_input_forget:
            attrs["input_forget"] = 1
        nodes.append(helper.make_node("LSTM", names, [y_name, f"Y_h{sfx}", f"Y_c{sfx}"], **attrs))
        outputs += [info(f"Y_h{sfx}", elem, [dirs, "B", H]), info(f"Y_c{sfx}", elem, [dirs, "B", H])]
        if k < L - 1:  # (T, dirs, B, H) -> (T, B, dirs, H) -> (T, B, dirs * H): the next layer's X
            nodes.append(helper.make_node("Transpose", [y_name], [f"{y_name}_t"], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Reshape", [f"{y_name}_t", "layer_input_shape"], [f"X_l{k + 1}"]))
            x_name = f"X_l{k + 1}"
    outputs.insert(0, info("Y", elem, ["T", dirs, "B", H]))
    initializers = []
    if L > 1:  # Reshape's 0 copies the input's dimension: (T, B, -1)
        initializers.append(helper.make_tensor("layer_input_shape", TensorProto.INT64, [3], [0, 0, -1]))
    graph = helper.make_graph(nodes, "lstm_harness_lstm", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lstm-harness")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _feeds(case: Case, dtype: str) -> dict[str, np.ndarray]:
    s = case.structure
    peephole = case.variant == "peephole"
    lift = (lambda a: a) if s.layered else (lambda a: a[None])  # states -> (L * dirs, B, H)
    h0, c0 = lift(case.h0), lift(case.c0)
    feeds = {"X": case.x}
    for k in range(s.num_layers):
        sfx = f"_l{k}" if s.layered else ""
        d = layouts.to_onnx_layer(case.params, s, k, peepholes=peephole)
        rows = slice(k * s.dirs, (k + 1) * s.dirs)
        feeds.update({f"W{sfx}": d["W"], f"R{sfx}": d["R"], f"B{sfx}": d["B"],
                      f"initial_h{sfx}": h0[rows], f"initial_c{sfx}": c0[rows]})  # (dirs, B, H)
        if "P" in d:
            feeds[f"P{sfx}"] = d["P"]
    out = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in feeds.items()}
    if s.lengths:
        lengths = case.lengths if case.lengths is not None else np.full(case.B, case.T)
        out["sequence_lens"] = np.asarray(lengths, dtype=np.int32)
    return out


class _OnnxBase(Oracle):
    variants = ("vanilla", "peephole")
    setup_cost = 0.5
    gives_gradients = False

    def __init__(self) -> None:
        self._runners: dict[tuple[str, str, int, int, Structure], Any] = {}

    def _make_runner(self, model: Any) -> Any:
        raise NotImplementedError

    def reference(self, case: Case) -> Reference:
        s = case.structure
        why = self.unsupported_reason(case.variant, case.dtype, s)
        if why:
            raise ValueError(f"case: {why}")
        dtype = self.compute_dtype_for(case.dtype)
        assert dtype is not None
        c = case.astype(dtype)
        key = (c.variant, dtype, c.D, c.H, s)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._make_runner(lstm_model(c.D, c.H, dtype, peephole=c.variant == "peephole", structure=s))
            self._runners[key] = runner
        # onnx.reference computes the sigmoid as 1 / (1 + exp(-x)), which overflows (correctly, to 0) where
        # pre-activations are far into saturation: the cases that reach that range warn, nothing more.
        with np.errstate(over="ignore"):
            Y, *states = runner.run(None, _feeds(c, dtype))  # (T, dirs, B, H), then (dirs, B, H) per layer
        h_T = np.concatenate([np.asarray(a) for a in states[0::2]])  # (L * dirs, B, H)
        c_T = np.concatenate([np.asarray(a) for a in states[1::2]])
        if not s.layered:
            h_T, c_T = h_T[0], c_T[0]
        return Reference(
            compute_dtype=dtype,
            outputs={"y": layouts.onnx_layer_output(Y), "h_T": h_T, "c_T": c_T},
            notes=f"{self.name} in {dtype}" + (f" ({s.describe()})" if not s.is_default else ""),
        )


class OnnxRuntimeOracle(_OnnxBase):
    """ONNX ``LSTM`` run by ONNX Runtime's CPU execution provider, float32, forward only."""

    name = "onnxruntime"
    description = "one-node ONNX LSTM run by ONNX Runtime (CPU), float32"
    compute_dtypes = ("float32",)
    limitation = FORWARD_ONLY
    structures = frozenset({"layers", "bidirectional", "lengths", "cifg"})
    structures_note = "ONNX's LSTM has no projection, and its clip attribute (on pre-activations) is not cell_clip"

    requires = ("onnx", "onnxruntime")

    def _probe(self) -> Availability:
        return module_available(*self.requires)

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
    limitation = ("forward only: onnx.reference evaluates the operator specification, without gradients; it "
                  "ignores the LSTM's sequence_lens and input_forget, so no lengths or CIFG")
    structures = frozenset({"layers", "bidirectional"})
    structures_note = ("onnx.reference ignores the LSTM's sequence_lens and input_forget; ONNX's LSTM has no "
                       "projection, and its clip attribute is not cell_clip")

    requires = ("onnx",)

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
