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

Cached between cases: one ``nn.LSTM`` module per (D, H, dtype), whose weights are overwritten by
every case; nothing else survives a call. The thread count is pinned to 1 at first use: the cases
are small and many, where threads only add scheduling noise.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case
from harness.contract import gradient_keys
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
    def _probe(self) -> Availability:
        return module_available("torch")


class TorchLSTMOracle(_TorchBase):
    """``torch.nn.LSTM`` (one layer, one direction, time-major) with autograd gradients."""

    name = "torch-nn-lstm"
    description = "torch.nn.LSTM with converted weights, autograd gradients (float64 and native float32)"
    variants = ("vanilla",)
    compute_dtypes = ("float64", "float32")

    def __init__(self, *, native_float32: bool = True):
        self.native_float32 = native_float32
        self._modules: dict[tuple[int, int, str], Any] = {}

    def compute_dtype_for(self, dtype: str) -> str | None:
        """The case's own dtype (see the module docstring), unless ``native_float32=False``."""
        if not self.native_float32:
            return super().compute_dtype_for(dtype)
        return dtype if dtype in self.compute_dtypes else None

    #: Where the module and the tensors live; the CUDA (cuDNN) oracle overrides it.
    device = "cpu"

    def _module(self, D: int, H: int, dtype: str) -> Any:
        key = (D, H, dtype)
        module = self._modules.get(key)
        if module is None:
            torch = _torch()
            module = torch.nn.LSTM(D, H, num_layers=1, bias=True, batch_first=False, bidirectional=False)
            module = module.to(device=self.device, dtype=getattr(torch, dtype))
            self._modules[key] = module
        return module

    def _precision(self, torch: Any) -> Any:
        """A context the forward and backward run in; the CUDA oracle switches TF32 off there."""
        return contextlib.nullcontext()

    def reference(self, case: Case) -> Reference:
        why = self.unsupported_reason(case.variant, case.dtype)
        if why:
            raise ValueError(f"case: {why}")
        torch = _torch()
        dtype = self.compute_dtype_for(case.dtype)
        assert dtype is not None
        c = case.astype(dtype)
        module = self._module(c.D, c.H, dtype)
        state = layouts.to_torch(c.params)
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        weights = [getattr(module, n) for n in names]

        def tensor(a: np.ndarray, grad: bool = False) -> Any:
            return _tensor(torch, a, dtype).to(self.device).requires_grad_(grad)

        with self._precision(torch):
            with torch.no_grad():
                for w, n in zip(weights, names, strict=True):
                    w.copy_(torch.from_numpy(state[n]))
            module.flatten_parameters()  # cuDNN wants its weights in one block; a no-op on the CPU
            x = tensor(c.x, grad=True)  # (T, B, D)
            h0 = tensor(c.h0[None], grad=True)  # (1, B, H)
            c0 = tensor(c.c0[None], grad=True)
            y, (h_T, c_T) = module(x, (h0, c0))  # (T, B, H), (1, B, H), (1, B, H)
            grads = torch.autograd.grad(
                (y, h_T, c_T),
                (x, h0, c0, *weights),
                grad_outputs=(tensor(c.dy), tensor(c.dh_T[None]), tensor(c.dc_T[None])),
            )
        dx, dh0, dc0, dW, dR, db_ih, _db_hh = (_numpy(g) for g in grads)
        # b = bias_ih + bias_hh, so dL/db is the gradient of either half (they are equal).
        return Reference(
            compute_dtype=dtype,
            outputs={"y": _numpy(y), "h_T": _numpy(h_T)[0], "c_T": _numpy(c_T)[0]},
            gradients={"x": dx, "h0": dh0[0], "c0": dc0[0], "W": dW, "R": dR, "b": db_ih},
            notes=f"torch.nn.LSTM on {self.device} in {dtype}",
        )


def _composite_forward(torch: Any, variant: str, x, h0, c0, p: dict[str, Any], ln_eps: float):
    """The equations of :mod:`harness.contract` in torch ops -> y (T, B, H), h_T, c_T."""
    F = torch.nn.functional
    H = h0.shape[1]
    h, c = h0, c0
    ys = []
    WT, RT = p["W"].T, p["R"].T  # (D, 4H), (H, 4H)

    def ln(v, k):  # LayerNorm row k of gamma/beta, biased variance, eps inside the square root
        return F.layer_norm(v, (H,), weight=p["gamma"][k], bias=p["beta"][k], eps=ln_eps)

    for t in range(x.shape[0]):
        a = x[t] @ WT + h @ RT  # (B, 4H)
        if variant != "layernorm":
            a = a + p["b"]
        a_i, a_f, a_g, a_o = torch.split(a, H, dim=1)  # each (B, H)
        if variant == "vanilla":
            i, f, g = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g)
            c = f * c + i * g
            o = torch.sigmoid(a_o)
        elif variant == "peephole":
            i = torch.sigmoid(a_i + p["p_i"] * c)
            f = torch.sigmoid(a_f + p["p_f"] * c)
            g = torch.tanh(a_g)
            c = f * c + i * g
            o = torch.sigmoid(a_o + p["p_o"] * c)  # the output gate sees the new cell state
        else:
            i, f = torch.sigmoid(ln(a_i, 0)), torch.sigmoid(ln(a_f, 1))
            g, o = torch.tanh(ln(a_g, 2)), torch.sigmoid(ln(a_o, 3))
            c = ln(f * c + i * g, 4)  # the normalized cell is carried forward
        h = o * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys), h, c


class TorchCompositeOracle(_TorchBase):
    """The LSTM of every variant from torch primitives, float64, gradients by autograd."""

    name = "torch-composite"
    description = "LSTM equations in torch primitives (F.layer_norm for LayerNorm), float64 autograd"
    variants = ("vanilla", "peephole", "layernorm")
    compute_dtypes = ("float64",)

    def reference(self, case: Case) -> Reference:
        why = self.unsupported_reason(case.variant, case.dtype)
        if why:
            raise ValueError(f"case: {why}")
        torch = _torch()
        c = case.astype("float64")
        keys = gradient_keys(c.variant)
        leaves = {k: _tensor(torch, v, "float64", grad=True) for k, v in c.arrays().items()}
        params = {k: leaves[k] for k in c.params}
        y, h_T, c_T = _composite_forward(torch, c.variant, leaves["x"], leaves["h0"], leaves["c0"], params,
                                         c.ln_eps)
        grads = torch.autograd.grad(
            (y, h_T, c_T),
            tuple(leaves[k] for k in keys),
            grad_outputs=tuple(_tensor(torch, u, "float64") for u in c.upstream),
        )
        return Reference(
            compute_dtype="float64",
            outputs={"y": _numpy(y), "h_T": _numpy(h_T), "c_T": _numpy(c_T)},
            gradients={k: _numpy(g) for k, g in zip(keys, grads, strict=True)},
            notes="torch primitives in float64",
        )
