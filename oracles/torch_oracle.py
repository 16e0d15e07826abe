"""PyTorch oracles: ``torch.nn.LSTM`` itself, and the LSTM equations written with torch primitives.

Both give every gradient the contract names by autograd, as the vector-Jacobian product of the
case's upstream gradients dy, dh_T, dc_T (``torch.autograd.grad(..., grad_outputs=...)``).

* ``torch-nn-lstm``: PyTorch's own LSTM kernel with the weights converted by
  :func:`harness.layouts.to_torch`; vanilla only. It computes in the *case's own dtype*: a float64
  case runs PyTorch's float64 kernel, and a float32 case runs its float32 CPU kernel (the one
  people actually train with), so that the float32 kernel is an opinion in its own right rather
  than the float64 one fed upcast inputs. Its float32 comparisons therefore use the float32
  tolerance (:func:`harness.compare.effective_dtype`). ``TorchLSTMOracle(native_float32=False)``
  upcasts float32 cases to float64 instead, like every other oracle.
* ``torch-composite``: the equations of every variant (vanilla, peephole, layernorm) from torch
  primitives, always in float64 (float32 cases are upcast exactly), LayerNorm by
  ``torch.nn.functional.layer_norm`` so that the framework's own normalization is what is compared.

Whole layers (:mod:`harness.structure`): ``torch-nn-lstm`` computes stacked layers, both directions,
projections (``nn.LSTM(num_layers=, bidirectional=, proj_size=)``, weights named by
:func:`harness.layouts.to_torch`) and variable lengths (``pack_padded_sequence(enforce_sorted=False)``
and ``pad_packed_sequence``, whose semantics are the contract's: y is 0 at padded steps, each
direction's h_T is its state after the row's last valid step, the reverse direction starts at
lengths[b] - 1); it has no CIFG or cell clipping. ``torch-composite`` computes every structure: the
layers and directions are loops around the cell, lengths a mask (the state is kept and y is 0 where
t >= lengths[b]), the reverse direction reads each row's valid prefix reversed (an index gather).

Cached between cases: one ``nn.LSTM`` module per (D, H, dtype, structure), whose weights are overwritten by
every case; nothing else survives a call. The thread count is pinned to 1 at first use: the cases
are small and many, where threads only add scheduling noise.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case
from harness.structure import FEATURES, Structure
from oracles.base import Availability, Oracle, Reference, module_available

__all__ = ["TorchLSTMOracle", "TorchCompositeOracle", "TORCH_THREADS"]

#: Intra-op threads PyTorch is pinned to when an oracle first uses it.
TORCH_THREADS = 1

_configured = False


def _torch() -> Any:
    """Import torch and pin its thread count once."""
    global _configured
    import torch

    if not _configured:
        torch.set_num_threads(TORCH_THREADS)
        _configured = True
    return torch


def _tensor(torch: Any, a: np.ndarray, dtype: str, grad: bool = False) -> Any:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
    return t.requires_grad_(grad)


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


class _TorchBase(Oracle):
    requires = ("torch",)
    setup_cost = 2.5

    def _probe(self) -> Availability:
        return module_available("torch")


class TorchLSTMOracle(_TorchBase):
    """``torch.nn.LSTM`` (time-major; stacked, bidirectional, projected, packed) with autograd gradients."""

    name = "torch-nn-lstm"
    description = "torch.nn.LSTM with converted weights, autograd gradients (float64 and native float32)"
    variants = ("vanilla",)
    compute_dtypes = ("float64", "float32")
    structures = frozenset({"layers", "bidirectional", "lengths", "proj"})
    structures_note = "nn.LSTM has no coupled input and forget gates or cell clipping"

    def __init__(self, *, native_float32: bool = True):
        self.native_float32 = native_float32
        self._modules: dict[tuple[int, int, str, int, bool, int], Any] = {}

    def case_reason(self, case: Case) -> str | None:
        if case.structure.proj_size >= case.H:
            return (f"{self.name} does not compute a projection of {case.structure.proj_size} features from "
                    f"H={case.H} (nn.LSTM requires proj_size < hidden_size)")
        return super().case_reason(case)

    def compute_dtype_for(self, dtype: str) -> str | None:
        """The case's own dtype (see the module docstring), unless ``native_float32=False``."""
        if not self.native_float32:
            return super().compute_dtype_for(dtype)
        return dtype if dtype in self.compute_dtypes else None

    #: Where the module and the tensors live; the CUDA (cuDNN) oracle overrides it.
    device = "cpu"

    def _module(self, D: int, H: int, dtype: str, structure: Structure) -> Any:
        key = (D, H, dtype, structure.num_layers, structure.bidirectional, structure.proj_size)
        module = self._modules.get(key)
        if module is None:
            torch = _torch()
            module = torch.nn.LSTM(D, H, num_layers=structure.num_layers, bias=True, batch_first=False,
                                   bidirectional=structure.bidirectional, proj_size=structure.proj_size)
            module = module.to(device=self.device, dtype=getattr(torch, dtype))
            self._modules[key] = module
        return module

    def _precision(self, torch: Any) -> Any:
        """A context the forward and backward run in; the CUDA oracle switches TF32 off there."""
        return contextlib.nullcontext()

    def reference(self, case: Case) -> Reference:
        structure = case.structure
        why = self.unsupported_reason(case.variant, case.dtype, structure)
        if why:
            raise ValueError(f"case: {why}")
        torch = _torch()
        dtype = self.compute_dtype_for(case.dtype)
        assert dtype is not None
        c = case.astype(dtype)
        module = self._module(c.D, c.H, dtype, structure)
        state = layouts.to_torch(c.params, structure)
        names = tuple(state)
        weights = [getattr(module, n) for n in names]
        # Unlayered states are (B, H); nn.LSTM's always have the (num_layers * dirs) axis.
        lift = (lambda a: a) if structure.layered else (lambda a: a[None])

        def tensor(a: np.ndarray, grad: bool = False) -> Any:
            return _tensor(torch, a, dtype).to(self.device).requires_grad_(grad)

        with self._precision(torch):
            with torch.no_grad():
                for w, n in zip(weights, names, strict=True):
                    w.copy_(torch.from_numpy(state[n]))
            module.flatten_parameters()  # cuDNN wants its weights in one block; a no-op on the CPU
            x = tensor(c.x, grad=True)  # (T, B, D)
            h0 = tensor(lift(c.h0), grad=True)  # (L * dirs, B, H_out)
            c0 = tensor(lift(c.c0), grad=True)  # (L * dirs, B, H)
            with warnings.catch_warnings():
                # PyTorch's CPU build says once that oneDNN has no projection and it uses its own kernel.
                warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
                if c.lengths is None:
                    y, (h_T, c_T) = module(x, (h0, c0))  # (T, B, dirs * H_out), states as h0, c0
                else:
                    rnn = torch.nn.utils.rnn
                    packed = rnn.pack_padded_sequence(x, torch.from_numpy(np.asarray(c.lengths, np.int64)),
                                                      enforce_sorted=False)
                    out, (h_T, c_T) = module(packed, (h0, c0))
                    y, _ = rnn.pad_packed_sequence(out, total_length=c.T)  # 0 at padded steps
            grads = torch.autograd.grad(
                (y, h_T, c_T),
                (x, h0, c0, *weights),
                grad_outputs=(tensor(c.dy), tensor(lift(c.dh_T)), tensor(lift(c.dc_T))),
            )
        dx, dh0, dc0, *dweights = (_numpy(g) for g in grads)
        unlift = (lambda a: a) if structure.layered else (lambda a: a[0])
        # b = bias_ih + bias_hh, so dL/db is the gradient of either half (they are equal): convert bias_ih's.
        dstate = {n: g for n, g in zip(names, dweights, strict=True) if not n.startswith("bias_hh")}
        return Reference(
            compute_dtype=dtype,
            outputs={"y": _numpy(y), "h_T": unlift(_numpy(h_T)), "c_T": unlift(_numpy(c_T))},
            gradients={"x": dx, "h0": unlift(dh0), "c0": unlift(dc0), **layouts.from_torch(dstate, structure)},
            notes=f"torch.nn.LSTM on {self.device} in {dtype}" + (
                f" ({structure.describe()})" if not structure.is_default else ""),
        )


def _cell_forward(torch: Any, variant: str, x, h0, c0, p: dict[str, Any], ln_eps: float, mask,
                  structure: Structure):
    """One direction of one layer, in time order: the contract's cell equations in torch ops.

    x (T, B, D_in); h0 (B, H_out), c0 (B, H); ``mask`` (T, B, 1) bool, False where a step does not
    exist (the state is kept and y is 0 there), or None. -> y (T, B, H_out), h_T, c_T.
    """
    F = torch.nn.functional
    H = c0.shape[1]
    h, c = h0, c0
    ys = []
    WT, RT = p["W"].T, p["R"].T  # (D_in, 4H), (H_out, 4H)

    def ln(v, k):  # LayerNorm row k of gamma/beta, biased variance, eps inside the square root
        return F.layer_norm(v, (H,), weight=p["gamma"][k], bias=p["beta"][k], eps=ln_eps)

    for t in range(x.shape[0]):
        a = x[t] @ WT + h @ RT  # (B, 4H)
        if variant != "layernorm":
            a = a + p["b"]
        a_i, a_f, a_g, a_o = torch.split(a, H, dim=1)  # each (B, H)
        if variant == "vanilla":
            i, f, g = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g)
            if structure.coupled_input_forget:
                f = 1 - i
            c_new = f * c + i * g
        elif variant == "peephole":
            i = torch.sigmoid(a_i + p["p_i"] * c)
            f = 1 - i if structure.coupled_input_forget else torch.sigmoid(a_f + p["p_f"] * c)
            g = torch.tanh(a_g)
            c_new = f * c + i * g
        else:
            i = torch.sigmoid(ln(a_i, 0))
            f = 1 - i if structure.coupled_input_forget else torch.sigmoid(ln(a_f, 1))
            g = torch.tanh(ln(a_g, 2))
            c_new = ln(f * c + i * g, 4)  # the normalized cell is carried forward
        if structure.cell_clip is not None:  # the gradient through a clipped element is zero
            c_new = torch.clamp(c_new, -structure.cell_clip, structure.cell_clip)
        if variant == "peephole":
            o = torch.sigmoid(a_o + p["p_o"] * c_new)  # the output gate sees the new cell state
        elif variant == "vanilla":
            o = torch.sigmoid(a_o)
        else:
            o = torch.sigmoid(ln(a_o, 3))
        h_new = o * torch.tanh(c_new)  # (B, H)
        if structure.proj_size:
            h_new = h_new @ p["proj"].T  # (B, P)
        if mask is None:
            h, c = h_new, c_new
            ys.append(h_new)
        else:
            h, c = torch.where(mask[t], h_new, h), torch.where(mask[t], c_new, c)
            ys.append(torch.where(mask[t], h_new, torch.zeros_like(h_new)))
    return torch.stack(ys), h, c


def _reverse_valid(torch: Any, seq, lengths):
    """``seq`` (T, B, ...) with each row's valid prefix t < lengths[b] reversed, the padded steps left
    where they are; its own inverse."""
    T, B = seq.shape[:2]
    t = torch.arange(T)[:, None]  # (T, 1)
    idx = torch.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)  # (T, B)
    idx = idx.reshape(T, B, *([1] * (seq.dim() - 2))).expand_as(seq)
    return torch.gather(seq, 0, idx)


def _composite_forward(torch: Any, variant: str, x, h0, c0, params: dict[str, Any], ln_eps: float,
                       structure: Structure, lengths):
    """A whole layer (every layer and direction of ``structure``) -> y (T, B, dirs * H_out), h_T, c_T
    shaped like h0, c0. ``lengths`` (B,) int64 tensor or None."""
    if not structure.layered:
        h0, c0 = h0[None], c0[None]
    T = x.shape[0]
    mask = None if lengths is None else (torch.arange(T)[:, None] < lengths[None, :])[..., None]  # (T, B, 1)
    full = torch.full((x.shape[1],), T, dtype=torch.int64) if lengths is None else lengths
    inp, h_T, c_T = x, [], []
    for layer in range(structure.num_layers):
        outs = []
        for direction in range(structure.dirs):
            n = layer * structure.dirs + direction
            p = layouts.select_cell(params, structure, layer, direction)
            seq = inp if direction == 0 else _reverse_valid(torch, inp, full)
            y, h, c = _cell_forward(torch, variant, seq, h0[n], c0[n], p, ln_eps, mask, structure)
            outs.append(y if direction == 0 else _reverse_valid(torch, y, full))
            h_T.append(h)
            c_T.append(c)
        inp = torch.cat(outs, dim=2)  # (T, B, dirs * H_out): the forward direction's features first
    h_T, c_T = torch.stack(h_T), torch.stack(c_T)
    if not structure.layered:
        h_T, c_T = h_T[0], c_T[0]
    return inp, h_T, c_T


class TorchCompositeOracle(_TorchBase):
    """The LSTM of every variant and structure from torch primitives, float64, gradients by autograd."""

    name = "torch-composite"
    description = "LSTM equations in torch primitives (F.layer_norm for LayerNorm), float64 autograd"
    variants = ("vanilla", "peephole", "layernorm")
    compute_dtypes = ("float64",)
    structures = frozenset(FEATURES)

    def reference(self, case: Case) -> Reference:
        why = self.unsupported_reason(case.variant, case.dtype, case.structure)
        if why:
            raise ValueError(f"case: {why}")
        torch = _torch()
        c = case.astype("float64")
        keys = ("x", "h0", "c0", *c.params)
        leaves = {k: _tensor(torch, v, "float64", grad=True) for k, v in c.arrays().items()}
        params = {k: leaves[k] for k in c.params}
        lengths = None if c.lengths is None else torch.from_numpy(np.asarray(c.lengths, np.int64))
        y, h_T, c_T = _composite_forward(torch, c.variant, leaves["x"], leaves["h0"], leaves["c0"], params,
                                         c.ln_eps, c.structure, lengths)
        grads = torch.autograd.grad(
            (y, h_T, c_T),
            tuple(leaves[k] for k in keys),
            grad_outputs=tuple(_tensor(torch, u, "float64") for u in c.upstream),
            allow_unused=True,  # CIFG leaves the forget gate's rows unused: their gradient is zero
            materialize_grads=True,
        )
        return Reference(
            compute_dtype="float64",
            outputs={"y": _numpy(y), "h_T": _numpy(h_T), "c_T": _numpy(c_T)},
            gradients={k: _numpy(g) for k, g in zip(keys, grads, strict=True)},
            notes="torch primitives in float64",
        )
