"""Where the GPU versions' device arrays come from: one workspace per process, every array kept.

The same calls get the same buffers (the first free one of each shape and dtype), so a call of a
shape the process has met gets device addresses it has met too, and its time loops replay as CUDA
graphs (``impls/gpu/launch.py``) also in a training loop, where the last call's results are still
held while the next call runs: the two calls take turns with two sets of buffers.
"""

from __future__ import annotations

import functools

from impls.gpu.availability import require_cupy
from impls.workspace import Pooled, Workspace

__all__ = ["device_namespace", "DEVICE_LIMIT_BYTES"]

#: Over this many bytes of device arrays in all, the workspace drops free ones (least recently used
#: first), which go back to CuPy's memory pool.
DEVICE_LIMIT_BYTES = 1 << 30


@functools.cache
def device_namespace() -> Pooled:
    """CuPy as the algorithm's ``xp``, its ``empty`` served from the device workspace."""
    cupy = require_cupy()
    workspace = Workspace(allocate=cupy.empty, min_bytes=0, limit_bytes=DEVICE_LIMIT_BYTES,
                          place=lambda: cupy.cuda.Device().id)
    return Pooled(workspace, cupy)
