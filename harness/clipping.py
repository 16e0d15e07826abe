"""Choosing a case's cell clip: a value that clips some cells and stays clear of every other.

With ``cell_clip`` the cell state is clipped to [-clip, clip]; the gradient through a clipped element is
zero and through any other the ordinary one, so the derivative jumps where |c| crosses the clip. A
finite-difference oracle that steps across that point measures neither side, and an implementation
rounding differently from its oracle could land on the other side of it. So a case keeps every cell
value it computes at least :data:`MARGIN` away from the clip.

How (:func:`choose_clip`): run the case's forward without clipping and collect every cell value |c|
(every layer, direction and valid step); take the widest gaps between neighbouring values in the upper
part of their range (from the 40th percentile up, so that a good share of the cells is clipped) and try
their midpoints, widest first. Clipping changes what follows (a clipped cell feeds the next step and
the next layer), so each candidate is checked on the clipped forward itself: the first whose values
all keep the margin is the clip. When none does (the values are too dense), the case gets a clip above
every value (plus the margin): the case is then clipped nowhere, which is still a correct case, and
the strategy's other draws clip.

The forward here only measures cell values, in float64 on the case's exact numbers, for the variants
clipping is defined for (vanilla and peephole; :meth:`harness.structure.Structure.problems` rules it
out for LayerNorm). It is written from the equations in :mod:`harness.structure`'s docstring.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from harness.structure import Structure

__all__ = ["MARGIN", "cell_values", "choose_clip"]

#: The least distance between any cell value and the clip. Finite differences step by about 1e-5
#: (relative) and float32 rounds cells by about 1e-7: a margin of 2e-3 is far beyond both.
MARGIN = 2e-3

#: How many candidate clips are tried before giving up.
CANDIDATES = 12


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def cell_values(variant: str, structure: Structure, x: np.ndarray, h0: np.ndarray, c0: np.ndarray,
                params: Mapping[str, np.ndarray], lengths: np.ndarray | None, clip: float | None) -> np.ndarray:
    """Every cell value before clipping (flat, float64) of the forward with ``clip`` (None: no clipping),
    over every layer, direction and valid step."""
    if variant not in ("vanilla", "peephole"):
        raise ValueError(f"variant: clipping is defined for vanilla and peephole, got {variant!r}")
    x = np.asarray(x, dtype=np.float64)
    T, B, _ = x.shape
    lens = np.full(B, T) if lengths is None else np.asarray(lengths)
    states_h = np.asarray(h0, dtype=np.float64).reshape(-1, B, h0.shape[-1])
    states_c = np.asarray(c0, dtype=np.float64).reshape(-1, B, c0.shape[-1])
    H = states_c.shape[-1]
    seen = []
    inputs = x
    for layer in range(structure.num_layers):
        outs = []
        for direction in range(structure.dirs):
            k = layer * structure.dirs + direction
            prefix = "" if not structure.layered else f"l{layer}." + ("reverse." if direction else "")
            p = {name: np.asarray(params[prefix + name], dtype=np.float64)
                 for name in ("W", "R", "b", "p_i", "p_f", "p_o", "proj") if prefix + name in params}
            h, c = states_h[k].copy(), states_c[k].copy()
            y = np.zeros((T, B, h.shape[-1]))
            order = range(T - 1, -1, -1) if direction else range(T)
            for t in order:
                valid = (t < lens)[:, None]  # (B, 1): rows for which step t exists
                a = inputs[t] @ p["W"].T + h @ p["R"].T + p["b"]  # (B, 4H)
                a_i, a_f, a_g, a_o = (a[:, j * H:(j + 1) * H] for j in range(4))
                if variant == "peephole":
                    a_i, a_f = a_i + p["p_i"] * c, a_f + p["p_f"] * c
                i = _sigmoid(a_i)
                f = 1.0 - i if structure.coupled_input_forget else _sigmoid(a_f)
                c_new = f * c + i * np.tanh(a_g)
                seen.append(np.abs(c_new[valid[:, 0]]).ravel())
                if clip is not None:
                    c_new = np.clip(c_new, -clip, clip)
                o = _sigmoid(a_o + p["p_o"] * c_new if variant == "peephole" else a_o)
                h_new = o * np.tanh(c_new)
                if "proj" in p:
                    h_new = h_new @ p["proj"].T
                h, c = np.where(valid, h_new, h), np.where(valid, c_new, c)
                y[t] = np.where(valid, h_new, 0.0)
            outs.append(y)
        inputs = np.concatenate(outs, axis=-1)
    return np.concatenate(seen) if seen else np.zeros(0)


def choose_clip(variant: str, structure: Structure, x: np.ndarray, h0: np.ndarray, c0: np.ndarray,
                params: Mapping[str, np.ndarray], lengths: np.ndarray | None) -> float:
    """A clip that clips some of the case's cells and keeps every cell :data:`MARGIN` away (see the module)."""

    def values(clip: float | None) -> np.ndarray:
        return cell_values(variant, structure, x, h0, c0, params, lengths, clip)

    free = np.sort(values(None))
    upper = free[int(0.4 * len(free)):]
    gaps = np.diff(upper)
    for j in np.argsort(gaps)[::-1][:CANDIDATES]:
        if gaps[j] < 2 * MARGIN:
            break
        clip = float(0.5 * (upper[j] + upper[j + 1]))
        if clip > MARGIN and np.min(np.abs(values(clip) - clip)) >= MARGIN:
            return clip
    return float(free[-1] + 1.0) if len(free) else 1.0
