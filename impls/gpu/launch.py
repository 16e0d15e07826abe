"""Launching the kernels: one at a time through CuPy (or the emulation for NumPy arrays), and whole
time loops from a plan of device pointers with cuBLAS called on pointers, replayed as CUDA graphs
when a loop comes again with the same arguments."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from impls.gpu.availability import require_cupy
from impls.gpu.emulator import check_buffer, emulate
from impls.gpu.language import CTYPES, Kernel, block_size, cuda_source

__all__ = ["run_kernel", "launcher_for", "step_args", "Steps", "GraphCache"]


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
# and 3 us on an H100), so the host's share decides the speed: slicing five views, building the
# argument dict and converting the scalars cost more than the launches. The GPU loops therefore
# compute every step's arguments before the loop, as raw device pointers, and call cuBLAS on
# pointers directly; each step is then one GEMM call and one kernel call.
#
# Even so, two launches from Python a step take longer than the GPU needs for them, so the GPU
# waits on the host. A loop met a second time with the very same arguments (the same shapes, the
# same buffers: what a training loop or a benchmark does) is therefore captured as a CUDA graph and
# replayed from then on: one launch for the whole loop, and no gaps between its kernels. The graph
# launches exactly the kernels and GEMMs with exactly the arguments that launching them one by one
# would, so a replay computes what a direct run computes; a loop whose capture fails runs directly.


#: Values of the cuBLAS C enums used here (cublasOperation_t, cublasPointerMode_t, cublasMath_t).
_OP_N = 0
_POINTER_MODE_HOST = 0
_DEFAULT_MATH = 0  # no TF32: a float32 GEMM is an IEEE float32 GEMM
#: The workspace given to cuBLAS, as its documentation asks for work captured in graphs (32 MiB is
#: what it recommends for Hopper; smaller GPUs need less).
_CUBLAS_WORKSPACE_BYTES = 32 << 20


def _loaded_library(prefix: str) -> str | None:
    """The path of a shared library this process has loaded whose file name starts with ``prefix``."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(prefix):
                    return parts[5].strip()
    except OSError:
        return None
    return None


@functools.cache
def _cublas_library() -> ctypes.CDLL:
    """cuBLAS through ctypes: the first ``libcublas.so*`` this process has loaded (CuPy loads one
    before), else the one of CuPy's CUDA major version by name.

    Why not CuPy's own wrapper: it sets the handle's stream before every call and refuses a stream
    that is capturing a graph, so no GEMM called through it can be part of a CUDA graph. The
    launcher makes its own handle from this library, and streams and device pointers are the CUDA
    driver's, the same for any copy of cuBLAS in the process.
    """
    cupy = require_cupy()
    cupy.cuda.device.get_cublas_handle()  # makes sure CuPy has loaded cuBLAS
    path = _loaded_library("libcublas.so")
    if path is None:
        path = f"libcublas.so.{cupy.cuda.runtime.runtimeGetVersion() // 1000}"
    lib = ctypes.CDLL(path)
    vp, i = ctypes.c_void_p, ctypes.c_int
    signatures = {
        "cublasCreate_v2": [ctypes.POINTER(vp)],
        "cublasDestroy_v2": [vp],
        "cublasSetStream_v2": [vp, vp],
        "cublasSetWorkspace_v2": [vp, vp, ctypes.c_size_t],
        "cublasSetPointerMode_v2": [vp, i],
        "cublasSetMathMode": [vp, i],
        "cublasSgemm_v2": [vp, i, i, i, i, i, vp, vp, i, vp, i, vp, vp, i],
        "cublasDgemm_v2": [vp, i, i, i, i, i, vp, vp, i, vp, i, vp, vp, i],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def _cublas_check(name: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {name} failed with status {status}")


class GraphCache:
    """When a time loop runs step by step, is captured as a CUDA graph, or replays one: the launcher's
    policy, apart from CUDA (the methods :meth:`direct`, :meth:`capture` and :meth:`replay` do the
    work), so that tests run this very code with stand-ins for them.

    A loop runs step by step the first time its key comes; the second time it is captured and the
    graph launched; from then on the graph is replayed. A capture that fails is remembered, and that
    loop runs step by step from then on. ``graphs = False`` runs every loop step by step.
    """

    #: Graphs kept (the least recently replayed goes first), and keys remembered as seen or refused.
    GRAPHS, SEEN = 16, 256

    def __init__(self) -> None:
        #: Whether loops met twice are captured and replayed as graphs; when False every loop runs step
        #: by step, those already captured too (``LSTM_HARNESS_CUDA_GRAPHS=0`` sets it False).
        self.graphs = os.environ.get("LSTM_HARNESS_CUDA_GRAPHS", "1") != "0"
        self._graphs: OrderedDict[Any, Any] = OrderedDict()
        self._seen: OrderedDict[Any, None] = OrderedDict()
        self.refused: OrderedDict[Any, str] = OrderedDict()  # loops whose capture failed -> why
        self.counts = {"launched": 0, "captured": 0, "replayed": 0}

    def run(self, key: Any, loop: Callable[[], None]) -> None:
        """Run ``loop`` (a time loop's launches); from the second time the same ``key`` comes, as a
        graph. ``key`` must hold everything the launches depend on: kernels, shapes, pointers, scalars."""
        graph = self._graphs.get(key) if self.graphs else None
        if graph is None and self.graphs and key in self._seen and key not in self.refused:
            try:
                graph = self.capture(loop)
            except Exception as exc:  # a driver or library that cannot capture this: run directly
                _remember(self.refused, key, f"{type(exc).__name__}: {exc}", self.SEEN)
            else:
                _remember(self._graphs, key, graph, self.GRAPHS)
                self.counts["captured"] += 1
        if graph is not None:
            self._graphs.move_to_end(key)
            self.replay(graph)
            self.counts["replayed"] += 1
            return
        _remember(self._seen, key, None, self.SEEN)
        self.direct(loop)
        self.counts["launched"] += 1

    def direct(self, loop: Callable[[], None]) -> None:
        """Run the loop's launches one by one."""
        raise NotImplementedError

    def capture(self, loop: Callable[[], None]) -> Any:
        """The loop as a graph, ready to launch (nothing runs yet); raises if it cannot be captured."""
        raise NotImplementedError

    def replay(self, graph: Any) -> None:
        """Launch a graph :meth:`capture` made."""
        raise NotImplementedError


def _remember(table: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


class _CupyLauncher(GraphCache):
    """Device pointers, the compiled kernels, cuBLAS on pointers and the graphs of the GPU time loops.

    One per thread and device (:func:`launcher_for`): its cuBLAS handle, workspaces and graphs are
    its own. Tests stand in for it with one that resolves pointers to NumPy buffers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cupy = require_cupy()
        self.lib = _cublas_library()
        handle = ctypes.c_void_p()
        _cublas_check("cublasCreate", self.lib.cublasCreate_v2(ctypes.byref(handle)))
        self.handle = handle.value
        # Given back when the launcher goes (with its thread), not at exit, when CUDA may be gone.
        weakref.finalize(self, self.lib.cublasDestroy_v2, self.handle).atexit = False
        _cublas_check("cublasSetPointerMode", self.lib.cublasSetPointerMode_v2(self.handle, _POINTER_MODE_HOST))
        _cublas_check("cublasSetMathMode", self.lib.cublasSetMathMode(self.handle, _DEFAULT_MATH))
        self._workspaces: dict[int, Any] = {}  # stream -> cuBLAS's workspace for work on it
        self._stream: tuple[int, int] | None = None  # the handle's stream, and whose workspace it has
        self.capture_stream = self.cupy.cuda.Stream(non_blocking=True)

    def pointer(self, a: Any) -> int:
        return int(a.data.ptr)

    def function(self, kernel: Kernel, dtype: np.dtype) -> Any:
        return _function(kernel, np.dtype(dtype))

    def _bind(self, stream: int, runs_on: int) -> None:
        """Point the handle at ``stream``, with the workspace of the stream the work ``runs_on`` (the
        same, but for a capture): setting a stream resets cuBLAS's workspace, and work on two streams
        must not share one, as it could run at the same time."""
        if (stream, runs_on) != self._stream:
            workspace = self._workspaces.get(runs_on)
            if workspace is None:
                workspace = self._workspaces[runs_on] = self.cupy.empty(_CUBLAS_WORKSPACE_BYTES, dtype=np.uint8)
            _cublas_check("cublasSetStream", self.lib.cublasSetStream_v2(self.handle, stream))
            _cublas_check("cublasSetWorkspace", self.lib.cublasSetWorkspace_v2(
                self.handle, workspace.data.ptr, workspace.nbytes))
            self._stream = (stream, runs_on)

    def gemm(self, dtype: np.dtype, *, M: int, N: int, K: int) -> Any:
        """g(a, b, c) computes C (M, N) = A (M, K) @ B (K, N), C-contiguous operands given by pointer.

        cuBLAS is column-major, and a row-major (M, N) matrix is the column-major (N, M) one, so the
        call computes C^T = B^T A^T: m=N, n=M, with B first.
        """
        dtype = np.dtype(dtype)
        name = {"float32": "cublasSgemm_v2", "float64": "cublasDgemm_v2"}[dtype.name]
        routine, handle = getattr(self.lib, name), self.handle
        one, zero = np.ones(1, dtype), np.zeros(1, dtype)  # host scalars (pointer mode host)
        alpha, beta, op = one.ctypes.data, zero.ctypes.data, _OP_N

        def g(a: int, b: int, c: int, _keep: Any = (one, zero)) -> None:
            status = routine(handle, op, op, N, M, K, alpha, b, N, a, K, beta, c, N)
            if status:
                _cublas_check(name, status)

        return g

    def direct(self, loop: Callable[[], None]) -> None:
        current = self.cupy.cuda.get_current_stream().ptr
        self._bind(current, current)
        loop()

    def capture(self, loop: Callable[[], None]) -> Any:
        # On a stream of the launcher's own (the current one may be the legacy stream, which cannot
        # capture); the graph is then launched on the current stream, in its order, and its GEMMs use
        # the current stream's workspace.
        stream = self.capture_stream
        self._bind(stream.ptr, self.cupy.cuda.get_current_stream().ptr)
        with stream:
            stream.begin_capture()
            try:
                loop()
            finally:
                graph = stream.end_capture()
        return graph

    def replay(self, graph: Any) -> None:
        graph.launch(self.cupy.cuda.get_current_stream())


_thread = threading.local()  # .launchers: device -> this thread's launcher (they go with the thread)


def launcher_for(a: Any) -> Any:
    """The launcher for arrays like ``a``: None for NumPy arrays (the loops then emulate step by step),
    else the one of this thread and the current device."""
    if isinstance(a, np.ndarray):
        return None
    launchers = getattr(_thread, "launchers", None)
    if launchers is None:
        launchers = _thread.launchers = {}
    device = int(require_cupy().cuda.Device().id)
    launcher = launchers.get(device)
    if launcher is None:
        launcher = launchers[device] = _CupyLauncher()
    return launcher


@dataclass(frozen=True)
class Steps:
    """A kernel's arguments at each step t < ``count`` of a time loop, in the order of its C signature:
    the pointers start at ``first`` and advance by ``strides`` a step, then t and ``tail`` (B, H and
    the kernel's scalars). Hashable: it is part of the key a loop's graph is kept under."""

    first: tuple[int, ...]
    strides: tuple[int, ...]
    tail: tuple[Any, ...]
    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, t: int) -> tuple[Any, ...]:
        if not 0 <= t < self.count:
            raise IndexError(f"step {t} of {self.count}")
        return (*(p + t * d for p, d in zip(self.first, self.strides)), np.int64(t), *self.tail)


def step_args(launcher: Any, kernel: Kernel, arrays_at: Any, *, T: int, B: int, H: int, dtype: np.dtype,
              scalars: Mapping[str, float]) -> Steps:
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
    return Steps(tuple(p0), tuple(strides), tail, T)


# --- The kernels ----------------------------------------------------------------------------------
#
