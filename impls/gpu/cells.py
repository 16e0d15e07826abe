"""The fused cells: each step of a variant as one GEMM and one kernel, and the GPU implementations."""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.contract import DEFAULT_LN_EPS
from impls.gpu import launch, transfer
from impls.gpu.emulator import check_buffer
from impls.gpu.kernels import KERNELS
from impls.gpu.language import Kernel, block_size
from impls.gpu.memory import device_namespace
from impls.layernorm import LayerNormCell
from impls.peephole import PeepholeCell
from impls.stacked import Cell, StackedLSTM, VanillaCell

__all__ = ["CupyLSTM", "CupyPeepholeLSTM", "CupyLayerNormLSTM", "FusedVanillaCell", "FusedPeepholeCell",
           "FusedLayerNormCell"]


# --- Cells: one GEMM and one kernel per step ----------------------------------------------------


def _copy(xp, a):
    """``a`` as a new C-contiguous array from ``xp.empty``: on the GPU, from the device workspace, so
    that a repeated call gets the same buffer (the pointer loops' graphs depend on it)."""
    out = xp.empty(a.shape, a.dtype)
    out[...] = a
    return out


class _Fused(Cell):
    """Mixin over a NumPy cell: ``step`` and ``step_backward`` become one GEMM and one fused kernel.

    It comes first in a fused cell's bases (``FusedVanillaCell(_Fused, VanillaCell)``), so its
    ``super()`` calls reach the NumPy cell's methods.

    Buffers, parameters and the reductions after the loop are the NumPy cell's (they run on any
    namespace). ``forward_step`` and ``backward_step`` are the kernels alone (with nothing to add),
    so that a fused cell can stand wherever a cell can, and be compared with the NumPy one.
    """

    forward_kernel: Kernel
    backward_kernel: Kernel

    def kernel_scalars(self, P) -> dict[str, float]:
        return {}

    def forward_arrays(self, t, a, rec, c_prev, c, h, S, P) -> dict[str, Any]:
        return {"a": a, "rec": rec, "c_prev": c_prev, "c": c, "h": h, "tanh_c": S["tanh_c"]}

    def backward_arrays(self, t, dy_t, dh, dc, da, a, c_prev, S, G, P) -> dict[str, Any]:
        return {"dy": dy_t, "dh": dh, "dc": dc, "da": da, "a": a, "c_prev": c_prev, "tanh_c": S["tanh_c"]}

    def input_scale(self, P):
        return None  # the kernels take the pre-activations as they are

    def transposed(self, xp, a, scale=None):
        out = _copy(xp, a.T)  # one copy kernel on the GPU
        if scale is not None:  # never for these cells (their input_scale is None)
            out *= scale
        return out

    def forward_loop(self, xp, gates, rec, h, RT, c, S, P) -> None:
        launcher = launch.launcher_for(gates)
        if launcher is None:  # NumPy: step by step, each kernel emulated
            return super().forward_loop(xp, gates, rec, h, RT, c, S, P)
        T, B, H = h.shape[0] - 1, h.shape[1], h.shape[2]
        dtype = np.dtype(gates.dtype)
        for name, a in (("h", h), ("RT", RT), ("rec", rec)):
            check_buffer("forward GEMM", name, a, dtype)
        steps = launch.step_args(launcher, self.forward_kernel,
                                 lambda t: self.forward_arrays(t, gates[t], rec, c[t], c[t + 1], h[t + 1], S, P),
                                 T=T, B=B, H=H, dtype=dtype, scalars=self.kernel_scalars(P))
        kernel = launcher.function(self.forward_kernel, dtype)
        gemm = launcher.gemm(dtype, M=B, N=4 * H, K=H)  # rec = h_{t-1} @ R^T: (B, H) @ (H, 4H)
        h_ptr, h_step = launcher.pointer(h), B * H * dtype.itemsize
        RT_ptr, rec_ptr = launcher.pointer(RT), launcher.pointer(rec)
        grid, block = (B,), (block_size(H),)

        def loop() -> None:
            for t in range(T):
                gemm(h_ptr + t * h_step, RT_ptr, rec_ptr)
                kernel(grid, block, steps[t])

        launcher.run((self.forward_kernel.name, dtype.name, grid, block, steps, h_ptr, RT_ptr, rec_ptr), loop)

    def backward_loop(self, xp, dy, dh, dc, da, gates, c, R, S, G, P) -> None:
        launcher = launch.launcher_for(gates)
        if launcher is None:
            return super().backward_loop(xp, dy, dh, dc, da, gates, c, R, S, G, P)
        T, B, H = gates.shape[0], gates.shape[1], dh.shape[1]
        dtype = np.dtype(gates.dtype)
        for name, a in (("da", da), ("R", R), ("dh", dh)):
            check_buffer("backward GEMM", name, a, dtype)
        steps = launch.step_args(launcher, self.backward_kernel,
                                 lambda t: self.backward_arrays(t, dy[t], dh, dc, da[t], gates[t], c[t], S, G, P),
                                 T=T, B=B, H=H, dtype=dtype, scalars=self.kernel_scalars(P))
        kernel = launcher.function(self.backward_kernel, dtype)
        gemm = launcher.gemm(dtype, M=B, N=H, K=4 * H)  # dh = da_t @ R: (B, 4H) @ (4H, H)
        da_ptr, da_step = launcher.pointer(da), B * 4 * H * dtype.itemsize
        R_ptr, dh_ptr = launcher.pointer(R), launcher.pointer(dh)
        grid, block = (B,), (block_size(H),)

        def loop() -> None:
            for t in reversed(range(T)):
                kernel(grid, block, steps[t])
                gemm(da_ptr + t * da_step, R_ptr, dh_ptr)

        launcher.run((self.backward_kernel.name, dtype.name, grid, block, steps, da_ptr, R_ptr, dh_ptr), loop)

    def step(self, xp, t, a, rec, h_prev, RT, c_prev, c, h, S, P) -> None:
        xp.matmul(h_prev, RT, out=rec)  # (B, H) @ (H, 4H); the kernel adds it to a
        B, H = c.shape
        launch.run_kernel(self.forward_kernel, self.forward_arrays(t, a, rec, c_prev, c, h, S, P), t=t, B=B, H=H,
                   scalars=self.kernel_scalars(P))

    def step_backward(self, xp, t, dy_t, dh, dc, da, a, c_prev, c, R, S, G, P) -> None:
        B, H = c.shape
        launch.run_kernel(self.backward_kernel, self.backward_arrays(t, dy_t, dh, dc, da, a, c_prev, S, G, P), t=t, B=B,
                   H=H, scalars=self.kernel_scalars(P))
        xp.matmul(da, R, out=dh)  # (B, 4H) @ (4H, H) -> dL/dh_{t-1}

    def forward_step(self, xp, t, a, c_prev, c, h, S, P) -> None:
        B, H = c.shape
        arrays = self.forward_arrays(t, a, xp.zeros_like(a), c_prev, c, h, S, P)
        launch.run_kernel(self.forward_kernel, arrays, t=t, B=B, H=H, scalars=self.kernel_scalars(P))

    def backward_step(self, xp, t, dh, dc, da, a, c_prev, c, S, G, P) -> None:
        B, H = c.shape
        arrays = self.backward_arrays(t, xp.zeros_like(dh), dh, dc, da, a, c_prev, S, G, P)
        launch.run_kernel(self.backward_kernel, arrays, t=t, B=B, H=H, scalars=self.kernel_scalars(P))


class FusedVanillaCell(_Fused, VanillaCell):
    forward_kernel, backward_kernel = KERNELS["vanilla"]


class FusedPeepholeCell(_Fused, PeepholeCell):
    forward_kernel, backward_kernel = KERNELS["peephole"]

    def prepare(self, xp, params, dtype, *, ln_eps):
        # The kernels index p_i, p_f, p_o as flat (H,) buffers.
        return {k: xp.ascontiguousarray(v) for k, v in super().prepare(xp, params, dtype, ln_eps=ln_eps).items()}

    def forward_arrays(self, t, a, rec, c_prev, c, h, S, P):
        return {**super().forward_arrays(t, a, rec, c_prev, c, h, S, P), **P}

    def backward_arrays(self, t, dy_t, dh, dc, da, a, c_prev, S, G, P):
        return {**super().backward_arrays(t, dy_t, dh, dc, da, a, c_prev, S, G, P), **P}


class FusedLayerNormCell(_Fused, LayerNormCell):
    forward_kernel, backward_kernel = KERNELS["layernorm"]

    def prepare(self, xp, params, dtype, *, ln_eps):
        P = super().prepare(xp, params, dtype, ln_eps=ln_eps)
        return {**P, "gamma": _copy(xp, P["gamma"]), "beta": _copy(xp, P["beta"])}

    def kernel_scalars(self, P):
        return {"eps": P["eps"]}

    def forward_arrays(self, t, a, rec, c_prev, c, h, S, P):
        return {**super().forward_arrays(t, a, rec, c_prev, c, h, S, P), "gamma": P["gamma"], "beta": P["beta"],
                "n": S["n"], "r": S["r"], "n_c": S["n_c"], "r_c": S["r_c"]}

    def backward_arrays(self, t, dy_t, dh, dc, da, a, c_prev, S, G, P):
        return {**super().backward_arrays(t, dy_t, dh, dc, da, a, c_prev, S, G, P), "n": S["n"], "r": S["r"],
                "n_c": S["n_c"], "r_c": S["r_c"], "gamma": P["gamma"], "dz": G["dz"], "dz_c": G["dz_c"]}


# --- The implementations ---------------------------------------------------------------------------


class CupyLSTM(StackedLSTM):
    """Vanilla LSTM on the GPU with CuPy: stacked GEMMs and one fused gate kernel per step.

    Stacked layers, both directions, variable lengths and projections: the layer loops of
    :class:`impls.layer.LayeredLSTM` around the fused cell (a projection is one more GEMM a step, as in
    ``stacked``). Not CIFG or cell clipping: they would change the fused kernels' gate math, so they
    are refused with that reason and the harness draws no case with them.
    Inputs are NumPy (or CuPy) arrays; outputs and gradients stay CuPy arrays (the harness converts
    them). ``xp`` is CuPy with its arrays from the device workspace (``impls/gpu/memory.py``), imported
    at first use; set ``impl.xp = numpy`` to run the very same code with every kernel emulated by
    NumPy (what CI does, having no GPU).
    """

    name = "cupy"
    variant = "vanilla"
    dtypes = ("float64", "float32")
    cell: Cell = FusedVanillaCell()
    structures = ("layers", "bidirectional", "lengths", "proj")
    structures_note = "the fused CUDA kernels compute the cell without CIFG or cell clipping"
    _xp: Any = None

    @property
    def xp(self) -> Any:
        if self._xp is None:
            self._xp = device_namespace()
        return self._xp

    @xp.setter
    def xp(self, value: Any) -> None:
        self._xp = value

    def on_device(self, arrays, dtype=None):
        """All of a call's NumPy inputs to the device at once, through pinned memory (``transfer.py``);
        emulated (``xp`` NumPy), the arrays as they come."""
        if getattr(self.xp, "__name__", None) != "cupy":
            return super().on_device(arrays, dtype)
        return transfer.uploader().upload(arrays, dtype)

    def sequence_backward(self, dy, dh_T, dc_T, cache):
        xp = self.xp
        # The backward kernel indexes dy[t] as a flat (B, H) block: make dy C-contiguous up front (one
        # direction's dy is a column slice of the layer's).
        dy = xp.ascontiguousarray(xp.asarray(dy, dtype=cache.x.dtype))
        return super().sequence_backward(dy, dh_T, dc_T, cache)


class CupyPeepholeLSTM(CupyLSTM):
    """The peephole LSTM on the GPU; same algorithm as ``stacked-peephole``, one fused kernel a step."""

    name = "cupy-peephole"
    variant = "peephole"
    cell = FusedPeepholeCell()


class CupyLayerNormLSTM(CupyLSTM):
    """The LayerNorm LSTM on the GPU; the statistics are block reductions inside the fused kernels."""

    name = "cupy-layernorm"
    variant = "layernorm"
    ln_eps = DEFAULT_LN_EPS
    cell = FusedLayerNormCell()
