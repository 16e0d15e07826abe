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

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from oracles.base import Availability, module_available
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


#: What a Linux machine whose torch may see a GPU has: NVIDIA's driver, WSL2's GPU device, Jetson's
#: (nvgpu), or ROCm's (torch.cuda on AMD GPUs).
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/dxg", "/dev/nvhost-ctrl", "/dev/kfd")


class TorchCudaLSTMOracle(TorchLSTMOracle):
    """``torch.nn.LSTM`` on ``cuda`` (cuDNN), strict float32 or float64, autograd gradients."""

    name = "torch-cuda-lstm"
    description = "torch.nn.LSTM on CUDA (cuDNN) with converted weights, autograd gradients, TF32 off"
    variants = ("vanilla",)
    compute_dtypes = ("float64", "float32")
    device = "cuda"

    def installed(self) -> Availability:
        """torch installed and, on Linux, a GPU driver's device: without one no torch build has a GPU here.
        Elsewhere (and with a driver) the probe decides, and the summary says why when it says no."""
        avail = super().installed()
        if avail.available and self._availability is None and sys.platform.startswith("linux") \
                and not any(os.path.exists(p) for p in _GPU_DRIVER_PATHS):
            return Availability(False, f"no GPU driver is loaded (none of {', '.join(_GPU_DRIVER_PATHS)})")
        return avail

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

    def _precision(self, torch: Any) -> Any:
        return strict_fp32(torch)
