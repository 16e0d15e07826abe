"""A layer structure computed one cell at a time: the chaining that oracles of compiled or traced
frameworks share.

Compiling or tracing a whole structure (every layer and direction in one program) costs a framework
seconds for each new structure, and a certification draws a new one in most structured cases. One
direction of one layer is the same program in every structure, so an oracle compiles that (once per
kind of cell and shape) and :func:`run_by_cells` puts the structure together in NumPy:

* forward, layer by layer, for the input of every layer above the first (a layer's input is the
  layer below's y, its directions' features side by side);
* backward from the top: each direction's share of y's upstream gradient, that cell's outputs and
  vector-Jacobian product, and the gradients of its input summed over the directions, which are the
  upstream gradient of the layer below's y. Each cell's final states' upstream gradients are the
  case's (dh_T, dc_T), which hold every cell's.

The reverse direction reads each row's valid steps backwards, ``order[s, b] = lengths[b] - 1 - s``
for s < lengths[b] (else s): a per-row permutation of the steps that is its own inverse, so the same
gather takes the reverse cell's input to it, its outputs back, and their gradients either way. A
cell's own steps t >= lengths[b] keep the state and give y = 0 (each cell is given the lengths).
The arithmetic is the structure's; only the order in which a framework sums may differ from a
whole-structure program's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case

__all__ = ["Cell", "run_by_cells"]

#: One direction of one layer: (params, x, h0, c0, upstream) -> ((y, h_T, c_T), gradients). ``params``
#: are the cell's parameters by bare name (``W``, ``R``, ...), x (T, B, D) already in the direction's
#: order, h0 (B, H_out), c0 (B, H), lengths (B,) are bound by the caller. ``upstream`` is (dy, dh_T, dc_T),
#: or None for the outputs alone (the gradients are then not needed: return an empty dict). The
#: gradients are keyed ``x``, ``h0``, ``c0`` and the bare parameter names.
Cell = Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, Any],
                tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]]


def reverse_order(lengths: np.ndarray, T: int) -> np.ndarray:
    """(T, B, 1) the index that reverses each row's first lengths[b] steps and keeps the rest."""
    steps = np.arange(T)[:, None]
    return np.where(steps < lengths[None, :], lengths[None, :] - 1 - steps, steps)[:, :, None]


def run_by_cells(case: Case, cell: Cell) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """``case``'s outputs (y, h_T, c_T) and gradients of every input and parameter, by name, computed by
    ``cell`` one direction of one layer at a time (see the module)."""
    s, T, B = case.structure, case.T, case.B
    O = s.h_out(case.H)
    lengths = np.full(B, T, dtype=np.int64) if case.lengths is None else np.asarray(case.lengths, np.int64)
    order = reverse_order(lengths, T)

    def flip(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order, axis=0)

    lift = (lambda a: a) if s.layered else (lambda a: a[None])  # states -> (L * dirs, B, .)
    h0, c0, dh_T, dc_T = (lift(a) for a in (case.h0, case.c0, case.dh_T, case.dc_T))
    cells = s.cells()

    def run(n: int, seq: np.ndarray, upstream: Any) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
        layer, direction, _ = cells[n]
        params = layouts.cell_params(case.params, s, layer, direction)
        if direction:
            seq = flip(seq)
            if upstream is not None:
                upstream = (flip(upstream[0]), *upstream[1:])
        (y, h, c), grads = cell(params, seq, h0[n], c0[n], upstream)
        if direction:
            y = flip(y)
            if "x" in grads:
                grads = {**grads, "x": flip(grads["x"])}
        return (y, h, c), grads

    inputs = [case.x]
    for layer in range(s.num_layers - 1):
        ys = [run(n, inputs[-1], None)[0][0] for n in range(layer * s.dirs, (layer + 1) * s.dirs)]
        inputs.append(np.concatenate(ys, axis=-1))
    outputs: dict[int, tuple[np.ndarray, ...]] = {}
    grads: dict[str, np.ndarray] = {}
    dh0: dict[int, np.ndarray] = {}
    dc0: dict[int, np.ndarray] = {}
    ct = case.dy
    for layer in reversed(range(s.num_layers)):
        d_in = np.zeros_like(inputs[layer])
        for n in range(layer * s.dirs, (layer + 1) * s.dirs):
            _, direction, prefix = cells[n]
            outputs[n], g = run(n, inputs[layer], (ct[..., direction * O : (direction + 1) * O], dh_T[n], dc_T[n]))
            d_in += g.pop("x")
            dh0[n], dc0[n] = g.pop("h0"), g.pop("c0")
            grads.update({prefix + k: v for k, v in g.items()})
        ct = d_in
    top = range((s.num_layers - 1) * s.dirs, s.num_layers * s.dirs)
    unlift = (lambda a: a) if s.layered else (lambda a: a[0])
    every = range(len(cells))
    y = np.concatenate([outputs[n][0] for n in top], axis=-1)
    h_T, c_T = (unlift(np.stack([outputs[n][i] for n in every])) for i in (1, 2))
    grads.update(x=ct, h0=unlift(np.stack([dh0[n] for n in every])), c0=unlift(np.stack([dc0[n] for n in every])))
    return (y, h_T, c_T), grads
