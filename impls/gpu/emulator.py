"""NumPy emulation of the kernels: the very statements the CUDA source is generated from, evaluated
on the same flat indices, with the races and out-of-bounds accesses a GPU would not report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from impls.gpu.language import Expr, Kernel

__all__ = ["emulate", "check_buffer"]


def _np_sigmoid(a):
    # The order of impls.stacked.sigmoid_: a *= 0.5; tanh; += 1; *= 0.5.
    return (np.tanh(a * 0.5) + 1) * 0.5


_NP_FUNCTIONS = {"sigmoid": _np_sigmoid, "tanh": np.tanh, "sqrt": np.sqrt}


def _flat(kernel: Kernel, arrays: Mapping[str, Any], dtype: np.dtype) -> dict[str, np.ndarray]:
    flat = {}
    for name in kernel.array_names:
        if name not in arrays:
            raise ValueError(f"{kernel.name}: missing array {name!r}; expected {kernel.array_names}")
        a = arrays[name]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{kernel.name}: array {name!r}: expected a {dtype} NumPy array, got {type(a).__name__}")
        check_buffer(kernel.name, name, a, dtype)
        flat[name] = a.reshape(-1)  # a view: stores go to the caller's array
    return flat


def check_buffer(where: str, name: str, a: Any, dtype: np.dtype) -> None:
    """A kernel (or GEMM) operand must have the element type and be C-contiguous: it is indexed flat."""
    if getattr(a, "dtype", None) != dtype:
        raise TypeError(f"{where}: array {name!r}: expected dtype {dtype}, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{where}: array {name!r} must be C-contiguous: it is indexed as a flat buffer")


def _indices(ix: Expr, env: Mapping[str, Any], shape: tuple[int, int], buf: str, size: int, at: str) -> np.ndarray:
    idx = np.broadcast_to(np.asarray(ix.evaluate(env), dtype=np.int64), shape)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise IndexError(f"{at}: index {ix.text!r} into {buf!r} reaches [{idx.min()}, {idx.max()}], outside "
                         f"its {size} elements")
    return idx


class _Races:
    """Who touches which element, to find what would race on the GPU (the emulation itself cannot).

    Threads are the (b, j) pairs (stricter than CUDA, where one thread takes several j in turn);
    blocks are the rows b. Within a phase, an element one thread stores must not be loaded or
    stored by another; within the kernel, an element one block stores must not be touched by
    another block (blocks never synchronize).
    """

    def __init__(self, kernel: Kernel, flat: Mapping[str, np.ndarray]):
        self.kernel = kernel
        self.sizes = {name: a.size for name, a in flat.items()}
        self.block_writer = {name: np.full(size, -1, np.int64) for name, size in self.sizes.items()}
        self.block_reads: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.new_phase()

    def new_phase(self) -> None:
        self.thread_writer: dict[str, np.ndarray] = {}
        self.thread_reads: list[tuple[str, np.ndarray, np.ndarray]] = []

    def _fail(self, what: str, buf: str, address: int) -> None:
        raise AssertionError(f"{self.kernel.name}: {what} on {buf!r} at element {address}: the GPU result would "
                             f"depend on the order threads run in")

    def access(self, buf: str, idx: np.ndarray, thread: np.ndarray, block: np.ndarray, *, store: bool) -> None:
        idx, thread, block = (np.broadcast_to(a, idx.shape).ravel() for a in (idx, thread, block))
        if not store:
            self.thread_reads.append((buf, idx, thread))
            self.block_reads.append((buf, idx, block))
            return
        order = np.argsort(idx, kind="stable")  # one statement storing one element twice
        si, sb, st = idx[order], block[order], thread[order]
        same = si[1:] == si[:-1]
        for what, who in (("two blocks store", sb), ("two threads store", st)):
            clash = same & (who[1:] != who[:-1])
            if clash.any():
                self._fail(what, buf, int(si[1:][clash][0]))
        for what, writer, who in (("two blocks store", self.block_writer[buf], block),
                                  ("two threads store",
                                   self.thread_writer.setdefault(buf, np.full(self.sizes[buf], -1, np.int64)), thread)):
            clash = (writer[idx] != -1) & (writer[idx] != who)
            if clash.any():
                self._fail(what, buf, int(idx[clash][0]))
            writer[idx] = who

    def end_phase(self) -> None:
        for buf, idx, thread in self.thread_reads:
            writer = self.thread_writer.get(buf)
            if writer is not None:
                clash = (writer[idx] != -1) & (writer[idx] != thread)
                if clash.any():
                    self._fail("one thread loads what another stores in the same phase", buf, int(idx[clash][0]))
        self.new_phase()

    def end_kernel(self) -> None:
        for buf, idx, block in self.block_reads:
            owner = self.block_writer[buf]
            clash = (owner[idx] != -1) & (owner[idx] != block)
            if clash.any():
                self._fail("one block loads what another stores", buf, int(idx[clash][0]))


def emulate(kernel: Kernel, arrays: Mapping[str, np.ndarray], *, t: int, B: int, H: int,
            scalars: Mapping[str, float] | None = None) -> None:
    """Run ``kernel`` with NumPy: the same statements, in the same order, on the same flat indices.

    All (B, H) threads of a phase run one statement at a time. That is the CUDA semantics when no
    element is touched by two threads of a phase with one of them storing, nor by two blocks, which
    is checked on every run (an AssertionError names the element); sums are over the H units of
    each row; every stored value must keep the element dtype (no silent promotion).
    """
    dtype = np.dtype(arrays[kernel.array_names[0]].dtype)
    flat = _flat(kernel, arrays, dtype)
    scalars = dict(scalars or {})
    missing = set(kernel.scalars) - set(scalars)
    if missing:
        raise ValueError(f"{kernel.name}: missing scalars {sorted(missing)}")
    b = np.arange(B, dtype=np.int64).reshape(B, 1)
    j = np.arange(H, dtype=np.int64).reshape(1, H)
    races = _Races(kernel, flat)
    row: dict[str, Any] = {"t": int(t), "B": int(B), "H": int(H), "b": b, **_NP_FUNCTIONS}
    row.update({s: dtype.type(scalars[s]) for s in kernel.scalars})
    for n, (kind, body) in enumerate(kernel._compiled):  # type: ignore[attr-defined]
        at = f"{kernel.name}, step {n}"
        in_phase = kind == "phase"
        env = dict(row, j=j) if in_phase else row
        shape = (B, H) if in_phase else (B, 1)
        thread = b * H + j if in_phase else b * H  # thread 0 of the block does a Row's stores
        totals = {}
        for s in body:
            if s[0] == "load":
                idx = _indices(s[3], env, shape, s[2], flat[s[2]].size, at)
                races.access(s[2], idx, thread, b, store=False)
                env[s[1]] = flat[s[2]][idx]
            elif s[0] == "let":
                env[s[1]] = s[2].evaluate(env)
            elif s[0] == "store":
                value = np.broadcast_to(s[3].evaluate(env), shape)
                if value.dtype != dtype:
                    raise TypeError(f"{at}: {s[3].text!r} is {value.dtype}, not {dtype}: the kernel would convert")
                idx = _indices(s[2], env, shape, s[1], flat[s[1]].size, at)
                races.access(s[1], idx, thread, b, store=True)
                flat[s[1]][idx] = value
            else:
                totals[s[1]] = np.broadcast_to(s[2].evaluate(env), shape).sum(axis=1, keepdims=True)
        row.update(totals)
        if in_phase:
            races.end_phase()
    races.end_kernel()


