"""Where the GPU versions' device arrays come from: one workspace per process, every array kept.

The same calls get the same buffers (the first free one of each shape and dtype), so a call of a
shape the process has met gets device addresses it has met too, and its time loops replay as CUDA
graphs (``impls/gpu/launch.py``) also in a training loop, where the last call's results are still
held while the next call runs: the two calls take turns with two sets of buffers.
"""

from __future__ import annotations

import functools
import threading

from impls.gpu.availability import require_cupy
from impls.workspace import Pooled, Workspace

__all__ = ["device_namespace", "DEVICE_LIMIT_BYTES"]

#: Over this many bytes of device arrays in all, the workspace drops free ones (least recently used
#: first), which go back to CuPy's memory pool.
DEVICE_LIMIT_BYTES = 1 << 30


@functools.cache
def device_namespace() -> Pooled:
    """CuPy as the algorithm's ``xp``, its ``empty`` served from the device workspace.

    Arrays are kept apart by device, stream and thread: CuPy's own pool hands a block only to the
    stream it was freed on, since work queued on another stream may still be using it (and a
    per-thread default stream is a stream of each thread's own). An array is in use while it or a
    view of it lives (see ``impls/workspace.py``); an array made over its memory pointer alone
    (``cupy.ndarray(memptr=a.data)``, ``as_strided``) does not keep it in use.
    """
    cupy = require_cupy()

    def place() -> tuple[int, int, int]:
        return int(cupy.cuda.Device().id), int(cupy.cuda.get_current_stream().ptr), threading.get_ident()

    workspace = Workspace(allocate=cupy.empty, min_bytes=0, limit_bytes=DEVICE_LIMIT_BYTES, place=place)
    return Pooled(workspace, cupy)
