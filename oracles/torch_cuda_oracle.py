"""PyTorch's ``nn.LSTM`` on CUDA, that is cuDNN's LSTM, as an oracle for the GPU implementations.

cuDNN is the kernel most GPU LSTMs are measured against, and an independent GPU opinion: its own
fused kernels, its own accumulation order. Like ``torch-nn-lstm`` it computes in the *case's own
dtype* (cuDNN has float64 and float32 LSTMs), so a float32 comparison uses the float32 tolerance.
TF32 is switched off for its calls (:func:`strict_fp32`): PyTorch lets cuDNN's RNNs use TF32 by
default, which rounds the GEMM inputs to 10 mantissa bits, a different computation from float32.

Available only where PyTorch is installed with CUDA and sees a GPU; elsewhere it is listed as
unavailable with the reason ("torch CUDA is not available").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case
from oracles.base import Availability, Reference, module_available
from oracles.torch_oracle import TorchLSTMOracle

__all__ = ["TorchCudaLSTMOracle", "strict_fp32"]


@contextmanager
def strict_fp32(torch: Any) -> Iterator[None]:
    """cuDNN RNNs in IEEE float32 (no TF32) inside the block; the previous setting is restored after.

    PyTorch >= 2.9 has a per-operation setting (``torch.backends.cudnn.rnn.fp32_precision``) and
    refuses to read the legacy ``allow_tf32`` once the two disagree, so the new one is used where it
    exists and the legacy flag only on older versions.
    """
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        before = rnn.fp32_precision
        rnn.fp32_precision = "ieee"
        try:
            yield
        finally:
            rnn.fp32_precision = before
    else:
        before = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = before


class TorchCudaLSTMOracle(TorchLSTMOracle):
    """``torch.nn.LSTM`` on ``cuda`` (cuDNN), strict float32 or float64, autograd gradients."""

    name = "torch-cuda-lstm"
    description = "torch.nn.LSTM on CUDA (cuDNN) with converted weights, autograd gradients, TF32 off"
    variants = ("vanilla",)
    compute_dtypes = ("float64", "float32")

    def _probe(self) -> Availability:
        avail = module_available("torch")
        if not avail.available:
            return avail
        try:
            import torch

            ok = bool(torch.cuda.is_available())
        except Exception as exc:  # a CUDA build whose driver cannot be loaded
            return Availability(False, f"torch CUDA is not available ({type(exc).__name__}: {exc})")
        if not ok:
            return Availability(False, "torch CUDA is not available (torch.cuda.is_available() is False)")
        versions = dict(avail.versions)
        versions["cuda"] = str(torch.version.cuda)
        versions["cudnn"] = str(torch.backends.cudnn.version())
        versions["device"] = torch.cuda.get_device_name(0)
        return Availability(True, "", versions)

    def _module(self, D: int, H: int, dtype: str) -> Any:
        key = (D, H, dtype)
        module = self._modules.get(key)
        if module is None:
            import torch

            module = torch.nn.LSTM(D, H, num_layers=1, bias=True, batch_first=False, bidirectional=False)
            module = module.to(device="cuda", dtype=getattr(torch, dtype))
            self._modules[key] = module
        return module

    def reference(self, case: Case) -> Reference:
        why = self.supports(case.variant, case.dtype)
        if why:
            raise ValueError(f"case: {why}")
        import torch

        dtype = self.compute_dtype_for(case.dtype)
        assert dtype is not None
        c = case.astype(dtype)
        module = self._module(c.D, c.H, dtype)
        state = layouts.to_torch(c.params)
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        weights = [getattr(module, n) for n in names]

        def tensor(a: np.ndarray, grad: bool = False) -> Any:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to("cuda").requires_grad_(grad)

        def host(t: Any) -> np.ndarray:
            return t.detach().cpu().numpy()

        with strict_fp32(torch):
            with torch.no_grad():
                for w, n in zip(weights, names, strict=True):
                    w.copy_(torch.from_numpy(state[n]))
            module.flatten_parameters()
            x = tensor(c.x, grad=True)  # (T, B, D)
            h0 = tensor(c.h0[None], grad=True)  # (1, B, H)
            c0 = tensor(c.c0[None], grad=True)
            y, (h_T, c_T) = module(x, (h0, c0))
            grads = torch.autograd.grad(
                (y, h_T, c_T), (x, h0, c0, *weights),
                grad_outputs=(tensor(c.dy), tensor(c.dh_T[None]), tensor(c.dc_T[None])),
            )
        dx, dh0, dc0, dW, dR, db_ih, _db_hh = (host(g) for g in grads)
        return Reference(
            compute_dtype=dtype,
            outputs={"y": host(y), "h_T": host(h_T)[0], "c_T": host(c_T)[0]},
            gradients={"x": dx, "h0": dh0[0], "c0": dc0[0], "W": dW, "R": dR, "b": db_ih},
            notes=f"torch.nn.LSTM on CUDA (cuDNN {torch.backends.cudnn.version()}) in {dtype}, TF32 off",
        )
