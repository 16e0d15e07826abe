"""Moving a call's NumPy inputs to the GPU at the bus's speed.

CuPy copies a NumPy array to the device from pageable memory: the driver stages it through a small
pinned buffer of its own, one piece after another, and the host waits for the whole copy. For the
inputs of one call (x, the weights, dy: tens of MB at the benchmark's shape) that costs about as
much as the LSTM itself. Here every input of a call is staged into one pinned buffer by several
threads at once (NumPy's copies release the GIL), and each piece's asynchronous copy to the device
is started as soon as that piece is staged, on the current stream, so that the device copies
overlap the staging of the next pieces and the work already queued on the GPU.

The buffer is reused by the next call only once the copies out of it are done (an event), so a
caller may change its NumPy arrays as soon as the call returns: what is copied is the staged copy.

The device side is an object with a handful of methods (:class:`CupyDevice`), so that tests run the
very same staging, piecing and ordering over NumPy with a stand-in.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from impls.gpu.availability import require_cupy
from impls.gpu.memory import device_namespace

__all__ = ["Uploader", "CupyDevice", "uploader", "PIECE_BYTES", "STAGING_LIMIT_BYTES", "THREADS"]

#: Pieces of about this size: small enough that the device copies start early and the threads share
#: the work, large enough that each copy runs at the bus's speed.
PIECE_BYTES = 1 << 20
#: Inputs of a call larger than this in all go through CuPy's own copies (no pinned buffer is kept
#: that large).
STAGING_LIMIT_BYTES = 256 << 20
#: Threads that stage the pieces.
THREADS = 4
#: Each array's place in the buffer starts at a multiple of this (the alignment cudaMalloc gives).
_ALIGN = 256


class CupyDevice:
    """The device side of an :class:`Uploader`: CuPy arrays, pinned memory, copies on the current stream."""

    def __init__(self) -> None:
        self.cupy = require_cupy()

    def is_host(self, a: Any) -> bool:
        """Whether ``a`` is in host memory: not a CuPy array, nor another library's device array."""
        return not isinstance(a, self.cupy.ndarray) and not hasattr(a, "__cuda_array_interface__")

    def asarray(self, a: Any, dtype: Any) -> Any:
        return self.cupy.asarray(a, dtype=dtype)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return device_namespace().empty(shape, dtype)  # the same buffers for the same calls

    def pointer(self, a: Any) -> int:
        return int(a.data.ptr)

    def pinned(self, nbytes: int) -> np.ndarray:
        """A uint8 host array over page-locked memory."""
        memory = self.cupy.cuda.alloc_pinned_memory(nbytes)
        return np.frombuffer(memory, np.uint8, nbytes)  # keeps ``memory`` alive as its base

    def copy_async(self, dst: int, src: int, nbytes: int) -> None:
        runtime = self.cupy.cuda.runtime
        runtime.memcpyAsync(dst, src, nbytes, runtime.memcpyHostToDevice, self.cupy.cuda.get_current_stream().ptr)

    def record(self) -> Any:
        event = self.cupy.cuda.Event(block=False, disable_timing=True)
        event.record()
        return event

    def wait(self, event: Any) -> None:
        event.synchronize()


class Uploader:
    """Copies a call's arrays to the device through one pinned buffer, kept from call to call."""

    def __init__(self, device: Any, *, threads: int = THREADS, piece_bytes: int = PIECE_BYTES,
                 limit_bytes: int = STAGING_LIMIT_BYTES) -> None:
        self.device, self.threads, self.piece_bytes, self.limit_bytes = device, threads, piece_bytes, limit_bytes
        self._staging: np.ndarray | None = None
        self._busy: Any = None  # the event after the last copies out of the buffer
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()

    def upload(self, arrays: Sequence[Any], dtype: Any = None) -> list[Any]:
        """Each array on the device, C-contiguous, in ``dtype`` (None: its own). Arrays already on the
        device are only cast where needed."""
        device = self.device
        out: list[Any] = [None] * len(arrays)
        host: list[tuple[int, np.ndarray, np.dtype]] = []
        for k, a in enumerate(arrays):
            if device.is_host(a):
                src = np.asarray(a)
                dt = np.dtype(dtype) if dtype is not None else src.dtype
                host.append((k, src, dt.newbyteorder("=")))  # the device's byte order, as asarray gives
            else:
                out[k] = device.asarray(a, dtype)
        total = sum(_aligned(src.size * dt.itemsize) for _, src, dt in host)
        if total > self.limit_bytes:
            for k, src, dt in host:
                out[k] = device.asarray(src, dt)
            return out
        with self._lock:
            staging = self._buffer(total)
            pieces = []  # (staged view, source rows, device address, staged address, bytes)
            offset = 0
            for k, src, dt in host:
                out[k] = target = device.empty(src.shape, dt)
                nbytes = src.size * dt.itemsize
                staged = staging[offset:offset + nbytes].view(dt).reshape(src.shape)
                pieces += self._pieces(staged, src, device.pointer(target), staging.ctypes.data + offset)
                offset += _aligned(nbytes)
            try:
                self._stage_and_copy(pieces)
            finally:  # also after an error: the copies issued must be done before the buffer is reused
                self._busy = device.record()
        return out

    def _buffer(self, nbytes: int) -> np.ndarray:
        """The pinned buffer, at least ``nbytes`` long, free of copies still reading it."""
        if self._busy is not None:
            self.device.wait(self._busy)
            self._busy = None
        if self._staging is None or self._staging.nbytes < nbytes:
            self._staging = None  # the old buffer goes back before a larger one is taken
            self._staging = self.device.pinned(max(nbytes, _ALIGN))
        return self._staging

    def _pieces(self, staged: np.ndarray, src: np.ndarray, dst: int, at: int) -> list[tuple[Any, ...]]:
        """Runs of whole rows (leading axis) of about ``piece_bytes``; one piece for a scalar or an empty array."""
        if src.ndim == 0 or src.shape[0] == 0:
            return [(staged, src, dst, at, staged.nbytes)] if staged.nbytes else []
        row = staged.nbytes // src.shape[0]
        if row == 0:  # (n, 0, ...): nothing to copy
            return []
        rows = max(1, self.piece_bytes // row)
        return [(staged[r:r + rows], src[r:r + rows], dst + r * row, at + r * row, min(rows, src.shape[0] - r) * row)
                for r in range(0, src.shape[0], rows)]

    def _stage_and_copy(self, pieces: list[tuple[Any, ...]]) -> None:
        def stage(piece: tuple[Any, ...]) -> None:
            np.copyto(piece[0], piece[1], casting="unsafe")  # what asarray(a, dtype) does

        if len(pieces) <= 1 or self.threads <= 1:
            for piece in pieces:
                stage(piece)
                self.device.copy_async(piece[2], piece[3], piece[4])
            return
        futures = [self._executor().submit(stage, piece) for piece in pieces]
        try:
            for piece, future in zip(pieces, futures):
                future.result()  # in order: a piece's device copy starts once it is staged
                self.device.copy_async(piece[2], piece[3], piece[4])
        finally:  # after an error, no thread may still be writing into the buffer
            for future in futures:
                future.cancel()
            wait(futures)

    def _executor(self) -> ThreadPoolExecutor:
        # A forked child has the pool object but not its threads: it makes its own.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="lstm-harness-upload")
            self._pool_pid = os.getpid()
        return self._pool


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


_uploader: Uploader | None = None


def uploader() -> Uploader:
    """The process's uploader to CuPy (created at first use)."""
    global _uploader
    if _uploader is None:
        _uploader = Uploader(CupyDevice())
    return _uploader
