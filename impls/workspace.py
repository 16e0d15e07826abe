"""Large arrays kept from one call of the stacked NumPy algorithm to the next, handed out again once free.

Why: glibc serves a large allocation from fresh pages (``mmap``) and gives them back to the system
when it is freed, so a call that allocates its buffers anew pays one page fault per 4 KiB it touches.
On the benchmark's 2-CPU virtual machine a stacked forward at T=50 B=64 D=H=128 float64 took 4,300
page faults, 16 ms of kernel time in a 30 ms call. Whether glibc does so depends on what the process
allocated before (its threshold rises after large blocks are freed): the same forward took 20 ms
right after ``torch.nn.LSTM`` had run in the process and 42 ms in a process of its own. Reusing the
buffers makes the stacked versions as fast in any process.

The GPU versions keep their CuPy arrays in a workspace too, every array however small, for another
reason: a buffer handed out the same way each call gives a repeated call the same device addresses,
which is what lets its time loops be replayed as CUDA graphs (``impls/gpu/launch.py``).

An array is free when nothing but the workspace refers to it: a forward's cache, an output the caller
holds, a view of the array (whose ``base`` it is) each keep it taken, so a buffer is never handed out
twice while in use. Only arrays of at least :data:`MIN_BYTES` are kept (smaller ones come from the
heap without faults) and at most :data:`LIMIT_BYTES` each; while the workspace holds more than that in
all, each request drops free arrays, the least recently used first, until it is back under the limit.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

__all__ = ["Workspace", "Pooled", "POOLED_NUMPY", "MIN_BYTES", "LIMIT_BYTES"]

#: Arrays smaller than this are allocated as usual.
MIN_BYTES = 1 << 20
#: Over this many bytes in all (in use or free), the workspace drops free arrays; none larger is kept.
LIMIT_BYTES = 512 << 20


def _references(kept: list[Any], i: int) -> int:
    return sys.getrefcount(kept[i])


#: What :func:`_references` counts for an array only the workspace holds (measured, not assumed:
#: interpreters differ in the references they count for a call's argument).
_ALONE = _references([np.empty(1)], 0)


class Workspace:
    """A pool of arrays by shape and dtype; :meth:`empty` is ``numpy.empty`` served from it.

    ``allocate(shape, dtype)`` makes a new array (``numpy.empty``; ``cupy.empty`` for the GPU), and
    ``place()``, when given, names where arrays live (for the GPU: the device, the stream and the
    thread): arrays are kept apart by it.
    """

    def __init__(self, *, limit_bytes: int = LIMIT_BYTES, min_bytes: int = MIN_BYTES,
                 allocate: Callable[..., Any] = np.empty, place: Callable[[], Hashable] | None = None):
        self.limit_bytes, self.min_bytes = limit_bytes, min_bytes
        self.allocate, self.place = allocate, place
        self._kept: dict[tuple[Any, ...], list[Any]] = {}
        self._last_use: dict[int, int] = {}  # id(array) -> the tick it was last handed out
        self._tick = 0
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        """Bytes of the arrays the workspace holds, in use or free."""
        return self._bytes

    def empty(self, shape: Any, dtype: Any = float) -> Any:
        """An uninitialized array over memory of the workspace's that nothing else refers to, else new.

        It comes back as a view of the array the workspace keeps: what a caller does to the view itself
        (a new shape, a read-only flag) stays with that view and its memory stays in use for as long as
        the view or anything derived from it lives. An array larger than the limit is not kept.
        """
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not self.min_bytes <= nbytes <= self.limit_bytes:
            return self.allocate(shape, dtype)
        key = (shape, dtype) if self.place is None else (shape, dtype, self.place())
        with self._lock:
            self._tick += 1
            kept = self._kept.setdefault(key, [])
            for i in range(len(kept)):  # the first free one: the same calls get the same arrays
                if _references(kept, i) <= _ALONE:
                    break
            else:
                kept.append(self.allocate(shape, dtype))
                self._bytes += nbytes
                i = len(kept) - 1
            view = kept[i].view()
            self._last_use[id(kept[i])] = self._tick
            if self._bytes > self.limit_bytes:
                self._evict()  # on every request while over the limit: arrays freed since can go now
            return view

    def _evict(self) -> None:
        """Drop free arrays, least recently used first, until the workspace is within its limit."""
        free = [(self._last_use[id(kept[i])], key, i) for key, kept in self._kept.items()
                for i in range(len(kept)) if _references(kept, i) <= _ALONE]
        dropped: dict[tuple[Any, ...], set[int]] = {}
        excess = self._bytes - self.limit_bytes
        for _, key, i in sorted(free, key=lambda entry: entry[0]):
            if excess <= 0:
                break
            array = self._kept[key][i]
            dropped.setdefault(key, set()).add(i)
            del self._last_use[id(array)]
            excess -= array.nbytes
            self._bytes -= array.nbytes
        for key, indices in dropped.items():
            remaining = [a for i, a in enumerate(self._kept[key]) if i not in indices]
            if remaining:
                self._kept[key] = remaining
            else:
                del self._kept[key]


class Pooled:
    """An array namespace (NumPy, or CuPy for the GPU) with ``empty`` served from a :class:`Workspace`.

    The ``xp`` of the stacked versions: their algorithm allocates every buffer through ``xp.empty``,
    so this is the one place that decides where the memory comes from.
    """

    def __init__(self, workspace: Workspace, module: Any = np):
        self.workspace, self.module = workspace, module
        self.empty = workspace.empty
        self.__name__ = module.__name__

    def __getattr__(self, name: str) -> Any:
        """The module's ``name``, kept as an attribute: a step of the algorithm makes a dozen ``xp.*``
        calls, and only the first of each name comes here."""
        value = getattr(self.module, name)
        setattr(self, name, value)
        return value

    def concatenate(self, arrays: Any, axis: int = 0) -> Any:
        """``concatenate`` into an array of the workspace (the gate reorderings of W and R)."""
        arrays = [self.module.asarray(a) for a in arrays]
        shape = list(arrays[0].shape)
        shape[axis] = sum(a.shape[axis] for a in arrays)
        out = self.empty(shape, np.result_type(*(a.dtype for a in arrays)))
        return self.module.concatenate(arrays, axis=axis, out=out)

    def __repr__(self) -> str:
        return f"Pooled({self.__name__}, {self.workspace.kept_bytes >> 20} MiB kept)"


#: The namespace of the stacked NumPy versions, over one workspace for the process.
POOLED_NUMPY = Pooled(Workspace())
