"""A two-layer bidirectional LSTM whose states are ordered direction-major, as hand-written stacks often
keep them: index ``direction * num_layers + layer`` (all forward layers first) instead of the contract's
``layer * dirs + direction``. Otherwise correct (the loop reference does the work), so it certifies only
as ``adapt(impl, state_order="direction-major")`` (``--state-order direction-major``).
"""

from __future__ import annotations

import numpy as np

from harness.structure import Structure
from impls.loop import LoopLSTM

LAYERS, DIRS = 2, 2


def _from_direction_major(a: np.ndarray) -> np.ndarray:
    """Its (L * dirs, B, H) states -> the contract's order, by its own loop over the cells."""
    out = np.empty_like(a)
    for direction in range(DIRS):
        for layer in range(LAYERS):
            out[layer * DIRS + direction] = a[direction * LAYERS + layer]
    return out


def _to_direction_major(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(a)
    for direction in range(DIRS):
        for layer in range(LAYERS):
            out[direction * LAYERS + layer] = a[layer * DIRS + direction]
    return out


class DirectionMajorStack:
    variant = "vanilla"
    name = "direction-major-stack"
    num_layers, bidirectional = LAYERS, True

    def __init__(self) -> None:
        self.inner = LoopLSTM().with_structure(Structure(num_layers=LAYERS, bidirectional=True))

    def forward(self, x, h0, c0, params):
        y, h_T, c_T, cache = self.inner.forward(x, _from_direction_major(h0), _from_direction_major(c0), params)
        return y, _to_direction_major(h_T), _to_direction_major(c_T), cache

    def backward(self, dy, dh_T, dc_T, cache):
        grads = self.inner.backward(dy, _from_direction_major(dh_T), _from_direction_major(dc_T), cache)
        return {**grads, "h0": _to_direction_major(grads["h0"]), "c0": _to_direction_major(grads["c0"])}


stack = DirectionMajorStack()
one_layer = LoopLSTM()  # one layer, one direction: its states have no order to give


def _halves_swapped(a: np.ndarray, axis: int) -> np.ndarray:
    first, second = np.split(a, 2, axis=axis)
    return np.concatenate([second, first], axis=axis)


class ReverseFirstStack:
    """Two bidirectional layers whose y holds the reverse direction's features first, and whose second layer
    reads its input so (the columns of its W follow). Certifies as ``adapt(impl, y_directions="reverse-first")``."""

    variant = "vanilla"
    name = "reverse-first-stack"
    num_layers, bidirectional = LAYERS, True

    def __init__(self) -> None:
        self.inner = LoopLSTM().with_structure(Structure(num_layers=LAYERS, bidirectional=True))

    @staticmethod
    def _inputs_swapped(params):
        return {k: _halves_swapped(v, 1) if k in ("l1.W", "l1.reverse.W") else v for k, v in params.items()}

    def forward(self, x, h0, c0, params):
        y, h_T, c_T, cache = self.inner.forward(x, h0, c0, self._inputs_swapped(params))
        return _halves_swapped(y, 2), h_T, c_T, cache

    def backward(self, dy, dh_T, dc_T, cache):
        return self._inputs_swapped(self.inner.backward(_halves_swapped(dy, 2), dh_T, dc_T, cache))


reverse_first = ReverseFirstStack()
