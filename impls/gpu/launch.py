"""Launching the kernels: one at a time through CuPy (or the emulation for NumPy arrays), and whole
time loops from a plan of device pointers with cuBLAS called on pointers."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from impls.gpu.availability import require_cupy
from impls.gpu.emulator import check_buffer, emulate
from impls.gpu.language import CTYPES, Kernel, block_size, cuda_source

__all__ = ["run_kernel", "launcher_for", "step_args"]


def _launch(kernel: Kernel, arrays: Mapping[str, Any], *, t: int, B: int, H: int,
            scalars: Mapping[str, float]) -> None:
    dtype = np.dtype(arrays[kernel.array_names[0]].dtype)
    fn = _function(kernel, dtype)
    args = [arrays[name] for name in kernel.array_names]
    args += [np.int64(t), np.int64(B), np.int64(H)]
    args += [dtype.type(scalars[s]) for s in kernel.scalars]
    fn((B,), (block_size(H),), tuple(args))


_modules: dict[str, Any] = {}
_functions: dict[tuple[str, str], Any] = {}


def _function(kernel: Kernel, dtype: np.dtype) -> Any:
    """The compiled kernel for ``dtype`` (a RawModule per kernel, compiled at first use and cached)."""
    key = (kernel.name, dtype.name)
    fn = _functions.get(key)
    if fn is None:
        if dtype.name not in CTYPES:
            raise ValueError(f"{kernel.name}: expected dtype float32 or float64, got {dtype.name}")
        module = _modules.get(kernel.name)
        if module is None:
            cupy = require_cupy()
            module = cupy.RawModule(code=cuda_source((kernel,)), name_expressions=kernel.name_expressions())
            _modules[kernel.name] = module
        fn = module.get_function(f"{kernel.name}<{CTYPES[dtype.name]}>")
        _functions[key] = fn
    return fn


def run_kernel(kernel: Kernel, arrays: Mapping[str, Any], *, t: int, B: int, H: int,
               scalars: Mapping[str, float] | None = None) -> None:
    """Launch ``kernel`` on CuPy arrays, or emulate it when the arrays are NumPy's."""
    if isinstance(arrays[kernel.array_names[0]], np.ndarray):
        emulate(kernel, arrays, t=t, B=B, H=H, scalars=scalars)
    else:
        _launch(kernel, arrays, t=t, B=B, H=H, scalars=scalars or {})


# --- Whole time loops on the GPU -----------------------------------------------------------------
#
# Per step the GPU work is small (at T=100, B=64, H=512 a step's GEMM and kernel take about 10 us
# and 3 us on an H100), so Python's share decides the speed: slicing five views, building the
# argument dict and converting the scalars cost more than the launches. The GPU loops therefore
# compute every step's arguments before the loop, as raw device pointers, and call cuBLAS on
# pointers directly; each step is then one GEMM call and one kernel call.


class _CupyLauncher:
    """Device pointers, the compiled kernels and cuBLAS on pointers, for the GPU time loops.

    Tests stand in for it (``launcher_for``) with one that resolves pointers to NumPy buffers.
    """

    #: Values of the cuBLAS C enums used here (cublasOperation_t, cublasPointerMode_t, cublasMath_t).
    OP_N = 0
    POINTER_MODE_HOST = 0
    DEFAULT_MATH = 0  # no TF32: a float32 GEMM is an IEEE float32 GEMM

    def __init__(self) -> None:
        self.cupy = require_cupy()
        from cupy_backends.cuda.libs import cublas

        self.cublas = cublas

    def pointer(self, a: Any) -> int:
        return int(a.data.ptr)

    def function(self, kernel: Kernel, dtype: np.dtype) -> Any:
        return _function(kernel, np.dtype(dtype))

    def gemm(self, dtype: np.dtype, *, M: int, N: int, K: int) -> Any:
        """g(a, b, c) computes C (M, N) = A (M, K) @ B (K, N), C-contiguous operands given by pointer.

        cuBLAS is column-major, and a row-major (M, N) matrix is the column-major (N, M) one, so the
        call computes C^T = B^T A^T: m=N, n=M, with B first.
        """
        dtype = np.dtype(dtype)
        routine = {"float32": self.cublas.sgemm, "float64": self.cublas.dgemm}[dtype.name]
        handle = self.cupy.cuda.device.get_cublas_handle()
        one, zero = np.ones(1, dtype), np.zeros(1, dtype)  # host scalars (pointer mode host)
        alpha, beta, op = one.ctypes.data, zero.ctypes.data, self.OP_N

        def g(a: int, b: int, c: int, _keep: Any = (one, zero)) -> None:
            routine(handle, op, op, N, M, K, alpha, b, N, a, K, beta, c, N)

        return g

    @contextmanager
    def session(self) -> Iterator[None]:
        """Host pointer mode and no TF32 on CuPy's cuBLAS handle for the loop; restored after."""
        cublas, handle = self.cublas, self.cupy.cuda.device.get_cublas_handle()
        pointer_mode, math_mode = cublas.getPointerMode(handle), cublas.getMathMode(handle)
        cublas.setPointerMode(handle, self.POINTER_MODE_HOST)
        cublas.setMathMode(handle, self.DEFAULT_MATH)
        try:
            yield
        finally:
            cublas.setPointerMode(handle, pointer_mode)
            cublas.setMathMode(handle, math_mode)


@functools.cache
def _cupy_launcher() -> _CupyLauncher:
    return _CupyLauncher()


def launcher_for(a: Any) -> Any:
    """The launcher for arrays like ``a``: None for NumPy arrays (the loops then emulate step by step)."""
    return None if isinstance(a, np.ndarray) else _cupy_launcher()


def step_args(launcher: Any, kernel: Kernel, arrays_at: Any, *, T: int, B: int, H: int, dtype: np.dtype,
               scalars: Mapping[str, float]) -> list[tuple[Any, ...]]:
    """The kernel's arguments for each step t < T, in the order of its C signature.

    ``arrays_at(t)`` gives the kernel's arrays at step t. Each is either one buffer at every step
    or a view whose start moves by a fixed stride with t (gates[t], c[t + 1], ...), so its pointer
    at step t is p(0) + t * (p(1) - p(0)); step T - 1 is checked against its own views.
    """
    dtype = np.dtype(dtype)
    first = arrays_at(0)
    for name in kernel.array_names:
        if name not in first:
            raise ValueError(f"{kernel.name}: missing array {name!r}; expected {kernel.array_names}")
        check_buffer(kernel.name, name, first[name], dtype)
    p0 = [launcher.pointer(first[n]) for n in kernel.array_names]
    p1 = [launcher.pointer(arrays_at(1)[n]) for n in kernel.array_names] if T > 1 else p0
    strides = [b - a for a, b in zip(p0, p1)]
    if T > 2:
        last = [launcher.pointer(arrays_at(T - 1)[n]) for n in kernel.array_names]
        if last != [a + (T - 1) * d for a, d in zip(p0, strides)]:
            raise ValueError(f"{kernel.name}: the per-step arrays do not advance by a fixed stride")
    tail = (np.int64(B), np.int64(H), *(dtype.type(scalars[s]) for s in kernel.scalars))
    return [(*(a + t * d for a, d in zip(p0, strides)), np.int64(t), *tail) for t in range(T)]


# --- The kernels ----------------------------------------------------------------------------------
#
