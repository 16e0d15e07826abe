"""Comparison: two arrays in, one structured :class:`Record` out.

Every number a report shows comes from a :class:`~harness.records.Record`: the terminal summary,
``report.json`` and the HTML are all rendered from its fields, never from text. ``Record``,
``STATUSES`` and ``render_message`` live in :mod:`harness.records` and are re-exported here, where
the public API has always offered them.

Closeness, elementwise, as in ``assert_close`` but with the absolute tolerance scaled:

    |actual - expected| <= atol * scale + rtol * |expected| + extra

``scale`` is max(1, max |expected|) over the quantity. Gradient elements are sums over T*B terms;
the rounding error of a small element is set by the magnitude of the terms, which the largest
element of the same quantity measures, so an unscaled atol would flag correct float32 sums of
large gradients. ``extra`` is an elementwise error bound an oracle may add for its own inexactness
(the finite-difference oracle's truncation and rounding model); it is zero for framework oracles.

NaN or Inf in ``actual`` where ``expected`` is finite is always a mismatch, located like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.contract import GATES, LN_ROWS, ArraySpec
from harness.records import STATUSES, Record, format_coords, render_message
from harness.structure import DIRECTION_NAMES, parse_prefix

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "tolerance",
    "effective_dtype",
    "Record",
    "STATUSES",
    "allowed_error",
    "atol_scale",
    "compare_arrays",
    "compare_projections",
    "decode_index",
    "first_bad_by_direction",
    "format_coords",
    "error_map",
    "render_message",
]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    reason: str

    def scaled(self, factor: float, why: str) -> Tolerance:
        """rtol and atol times ``factor`` (when above 1), with the reason appended."""
        if not factor > 1.0:
            return self
        return Tolerance(self.rtol * factor, self.atol * factor, f"{self.reason}; times {factor:.3g}: {why}")

# One table per dtype, values (forward outputs) and gradients separately. rtol and atol go together.
# Starting points are torch.testing's _DTYPE_PRECISIONS (float64: 1e-7/1e-7, float32: 1.3e-6/1e-5)
# and jax's default tolerances (float32 gradients 1e-2 in check_grads). Ours differ because the
# harness removes every source of difference but arithmetic: the oracle works in float64 on the
# exact values the implementation received.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float64": {
        "values": Tolerance(
            rtol=1e-9,
            atol=1e-9,
            reason="unit roundoff 1.1e-16, a few operations per gate, amplified through T recurrent "
            "steps; measured worst 4.3e-15 on 2000 generated cases (ratio 4e-6), so 1e-9 leaves "
            "room for long sequences and still catches any algebraic error, which shows at 1e-4 "
            "or above",
        ),
        "gradients": Tolerance(
            rtol=1e-8,
            atol=1e-8,
            reason="BPTT runs the recurrence a second time and sums T*B terms per weight (atol "
            "is scaled by the largest element); one order looser than values. Against finite "
            "differences the oracle's own error bound is added; measured worst ratio 0.03",
        ),
    },
    "float32": {
        "values": Tolerance(
            rtol=5e-5,
            atol=5e-5,
            reason="unit roundoff 6e-8; torch allows 1.3e-6/1e-5 for a single operation, and a T-step "
            "recurrence through large or saturating weights amplifies rounding: against the "
            "implementations' own float64 results, worst 6.5e-6 over 6000 large/saturating cases "
            "(p99.9 2.6e-6), so a margin of about 8",
        ),
        "gradients": Tolerance(
            rtol=1e-3,
            atol=1e-3,
            reason="float32 BPTT through saturating gates (pre-activations near 25, weights near "
            "17) loses about three digits: worst 1.7e-4 relative seen (p99.9 2.2e-5 over 6000 "
            "large/saturating cases), so a margin of about 6. JAX's check_grads allows 1e-2 in "
            "float32; planted bugs err by 1e-2 and more",
        ),
    },
}

_PRECISION_ORDER = ("float32", "float64")

#: The tolerance factor's name (Record.tolerance_factors) when the oracle computes in float32 like the case.
FLOAT32_ORACLE = "an oracle that computes in float32 too"


def effective_dtype(*dtypes: str) -> str:
    """The lowest precision among the implementation's dtype and the oracle's compute dtype."""
    return min(dtypes, key=_PRECISION_ORDER.index)


def tolerance(dtype: str, kind: str) -> Tolerance:
    """The table entry for ``dtype`` and ``kind`` ("values" or "gradients")."""
    try:
        table = TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(TOLERANCES)}, got {dtype!r}") from None
    try:
        return table[kind]
    except KeyError:
        raise ValueError(f"kind: expected 'values' or 'gradients', got {kind!r}") from None


def _name_coords(name: str, dirs: int) -> dict[str, Any]:
    """Layer and direction of a prefixed (gradient) name: ``dl1.reverse.W`` is layer=1, direction=reverse;
    the direction only when the structure has two."""
    layer, direction, _bare = parse_prefix(name)
    if layer is None and name.startswith("d"):
        layer, direction, _bare = parse_prefix(name[1:])
    if layer is None:
        return {}
    return {"layer": layer, **({"direction": DIRECTION_NAMES[direction or 0]} if dirs == 2 else {})}


def decode_index(index: tuple[int, ...], spec: ArraySpec, H: int, *,
                 shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Name the coordinates of one element: ``gate_unit`` row 9 with H=4 is gate=g, unit=1. In a layered
    structure the layer and direction come first: from a prefixed name, from the states' ``layer_dir``
    axis (index layer * dirs + direction) or from y's ``dir_unit`` axis (the forward direction's
    features first; ``shape`` gives its width, else 2H)."""
    lead = _name_coords(spec.name, spec.dirs)
    coords: dict[str, Any] = {}
    for k, (axis, i) in enumerate(zip(spec.axes, index)):
        i = int(i)
        if axis == "gate_unit":
            coords["gate"] = GATES[i // H]
            coords["unit"] = i % H
        elif axis == "ln_row":
            coords["row"] = LN_ROWS[i]
        elif axis == "layer_dir":
            lead["layer"] = i // spec.dirs
            if spec.dirs == 2:
                lead["direction"] = DIRECTION_NAMES[i % 2]
        elif axis == "dir_unit":
            width = shape[k] // spec.dirs if shape is not None else H
            lead["direction"] = DIRECTION_NAMES[i // width]
            coords["unit"] = i % width
        else:
            coords[axis] = i
    return {**lead, **coords}


def first_bad_by_direction(mismatch: np.ndarray, spec: ArraySpec,
                           lengths: np.ndarray | None = None) -> dict[str, dict[str, int]] | None:
    """Where each direction of a bidirectional structure first departs, in its own reading order.

    For y (a ``dir_unit`` axis) each direction's half of the features is read the way that direction
    computes it: the forward one from t=0 up, the reverse one from each row's last valid step down. For
    a quantity with a time axis but no direction axis (dx) the two directions' contributions are summed,
    so the whole array is read as each direction's *gradient* flows: the forward direction's from the last
    valid step down, the reverse direction's from t=0 up. Per direction: ``t`` (the timestep), ``step``
    (how many steps that direction had taken before it; negative: a padded step beyond a row's length,
    which the reverse reading meets before its start). None when it does not apply or nothing departs.
    """
    if spec.dirs != 2 or "t" not in spec.axes or "batch" not in spec.axes or not mismatch.any():
        return None
    t_axis, b_axis = spec.axes.index("t"), spec.axes.index("batch")
    T, B = mismatch.shape[t_axis], mismatch.shape[b_axis]
    m = np.moveaxis(mismatch, (t_axis, b_axis), (0, 1))  # (T, B, ...)
    lens = np.full(B, T, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
    t = np.arange(T)[:, None]
    upward = np.broadcast_to(t, (T, B))  # steps taken reading t = 0, 1, ...
    downward = lens[None, :] - 1 - t  # steps taken reading from the row's last valid step down
    if "dir_unit" in spec.axes:
        halves = np.split(m, 2, axis=-1)
        readings = {"forward": (halves[0], upward), "reverse": (halves[1], downward)}
    else:
        readings = {"forward": (m, downward), "reverse": (m, upward)}
    out: dict[str, dict[str, int]] = {}
    for name, (bad, steps) in readings.items():
        where = bad.reshape(T, B, -1).any(axis=-1)  # (T, B)
        if not where.any():
            continue
        candidates = np.where(where, steps, np.iinfo(np.int64).max)
        flat = int(np.argmin(candidates))
        out[name] = {"t": flat // B, "step": int(candidates.flat[flat])}
    return out or None


_MAP_SIDE = 48


def _pool(a: np.ndarray) -> np.ndarray:
    """Max-pool a 2-D map down to at most _MAP_SIDE x _MAP_SIDE cells."""
    for axis in (0, 1):
        n = a.shape[axis]
        if n > _MAP_SIDE:
            k = math.ceil(n / _MAP_SIDE)
            pad = (-n) % k
            widths = [(0, 0), (0, 0)]
            widths[axis] = (0, pad)
            a = np.pad(a, widths, constant_values=0.0)
            shape = list(a.shape)
            shape[axis : axis + 1] = [shape[axis] // k, k]
            a = a.reshape(shape).max(axis=axis + 1)
    return a


def _panel(title: str, rows: str, cols: str, values: np.ndarray) -> dict[str, Any]:
    v = _pool(np.atleast_2d(values))
    return {
        "title": title,
        "rows": rows,
        "cols": cols,
        "shape": list(values.shape) if values.ndim == 2 else [1, int(values.size)],
        "values": [[float(f"{x:.3g}") for x in row] for row in np.minimum(v, 1e9)],
    }


def error_map(ratio: np.ndarray, spec: ArraySpec, H: int) -> dict[str, Any]:
    """Panels of |error| / allowed laid out the way a person reads an LSTM.

    Quantities with a time axis become one time x unit (or time x input) panel, maximum over the
    batch; stacked (4H, ...) parameter gradients become one panel per gate; the rest one panel.
    """
    axes = spec.axes
    panels: list[dict[str, Any]] = []
    if axes[0] == "t":
        m = ratio.max(axis=tuple(range(1, ratio.ndim - 1))) if ratio.ndim > 2 else ratio
        panels.append(_panel("all", "t", axes[-1], m))
    elif axes[0] == "gate_unit":
        per_gate = ratio.reshape((4, H) + ratio.shape[1:])
        for k, gate in enumerate(GATES):
            block = per_gate[k]
            if block.ndim == 1:
                panels.append(_panel(f"gate {gate}", "", "unit", block[None, :]))
            else:
                panels.append(_panel(f"gate {gate}", "unit", axes[1], block.reshape(H, -1)))
    elif len(axes) == 1:
        panels.append(_panel("all", "", axes[0], ratio[None, :]))
    else:
        panels.append(_panel("all", axes[0], axes[1], ratio.reshape(ratio.shape[0], -1)))
    return {"quantity": spec.name, "panels": panels}


def atol_scale(expected: np.ndarray) -> float:
    """max(1, max |expected| over the finite elements): what atol is multiplied by (see the module docstring)."""
    e = np.asarray(expected, dtype=np.float64)
    return float(max(1.0, np.max(np.abs(e[np.isfinite(e)]), initial=0.0)))


def allowed_error(expected: np.ndarray, tol: Tolerance, scale: float | None = None) -> np.ndarray:
    """atol * scale + rtol * |expected|, elementwise: the allowed |actual - expected| before an oracle's own
    error bound; ``scale`` is :func:`atol_scale` of ``expected`` unless given."""
    e = np.asarray(expected, dtype=np.float64)
    return tol.atol * (atol_scale(e) if scale is None else scale) + tol.rtol * np.abs(e)


def compare_arrays(
    actual: np.ndarray,
    expected: np.ndarray,
    *,
    spec: ArraySpec,
    H: int,
    tol: Tolerance,
    tolerance_dtype: str,
    extra: np.ndarray | float = 0.0,
    base: dict[str, Any],
    lengths: np.ndarray | None = None,
) -> Record:
    """Compare elementwise; ``base`` holds the Record's identifying fields (implementation, ...).
    ``lengths`` (B,): the case's valid lengths, where each direction's first bad step is counted from.

    ``actual`` and ``expected`` must already have the same shape (shape errors are contract
    violations, reported by the runner before any comparison).
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"actual: expected shape {e.shape}, got {a.shape}")
    finite_e = np.isfinite(e)
    scale = atol_scale(e)
    allowed = allowed_error(e, tol, scale) + np.asarray(extra, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - e)
        same_nonfinite = ~finite_e & ((a == e) | (np.isnan(a) & np.isnan(e)))
        bad_nonfinite = finite_e & ~np.isfinite(a)
        diff_for_ratio = np.where(same_nonfinite, 0.0, diff)
        ratio = np.where(bad_nonfinite | (~finite_e & ~same_nonfinite), np.inf, diff_for_ratio / allowed)
        rel = np.where(finite_e & (e != 0), diff / np.abs(np.where(e == 0, 1.0, e)), np.where(diff > 0, np.inf, 0.0))
    mismatch = ratio > 1.0
    n_bad = int(mismatch.sum())
    worst_flat = int(np.argmax(ratio)) if ratio.size else 0
    worst_idx = np.unravel_index(worst_flat, ratio.shape) if ratio.size else ()
    finite_diff = diff[finite_e & np.isfinite(a)]
    rec = Record(
        **base,
        status="fail" if n_bad else "pass",
        method="elementwise",
        max_abs_error=float(finite_diff.max()) if finite_diff.size else 0.0,
        max_rel_error=float(np.max(rel[finite_e & np.isfinite(a)], initial=0.0)),
        ratio=float(ratio.max()) if ratio.size else 0.0,
        mismatched=n_bad,
        total=int(ratio.size),
        nonfinite=int(bad_nonfinite.sum()),
        worst={
            "index": [int(i) for i in worst_idx],
            "coords": decode_index(tuple(int(i) for i in worst_idx), spec, H, shape=a.shape),
            "actual": float(a[worst_idx]) if ratio.size else None,
            "expected": float(e[worst_idx]) if ratio.size else None,
            "abs_error": float(diff[worst_idx]) if ratio.size else None,
            "allowed": float(allowed[worst_idx]) if ratio.size else None,
        },
        rtol=tol.rtol,
        atol=tol.atol,
        atol_scale=scale,
        tolerance_dtype=tolerance_dtype,
    )
    if "t" in spec.axes and n_bad:
        t_axis = spec.axes.index("t")
        bad_t = np.nonzero(mismatch.any(axis=tuple(i for i in range(mismatch.ndim) if i != t_axis)))[0]
        rec.first_bad_t, rec.last_bad_t = int(bad_t[0]), int(bad_t[-1])
        rec.first_bad_by_direction = first_bad_by_direction(mismatch, spec, lengths)
    if n_bad:
        rec.error_map = error_map(np.where(np.isfinite(ratio), ratio, 1e9), spec, H)
    return rec


def compare_projections(
    actual: np.ndarray,
    expected: np.ndarray,
    error_bound: np.ndarray,
    *,
    tol: Tolerance,
    tolerance_dtype: str,
    scale: float,
    base: dict[str, Any],
) -> Record:
    """Compare directional derivatives <grad, v_k> (one per random direction k).

    ``error_bound`` is the finite-difference oracle's own error model for each projection;
    ``scale`` is the magnitude of the projected gradient terms (sum |grad_j v_kj|), which plays
    the part of the elementwise comparison's atol scale.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    allowed = tol.atol * max(1.0, scale) + tol.rtol * np.abs(e) + error_bound
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - e)
        ratio = np.where(np.isfinite(a), diff / allowed, np.inf)
    mismatch = ratio > 1.0
    k = int(np.argmax(ratio))
    rec = Record(
        **base,
        status="fail" if mismatch.any() else "pass",
        method="projection",
        max_abs_error=float(np.max(diff[np.isfinite(diff)], initial=0.0)),
        max_rel_error=float(np.max(diff[np.isfinite(diff)] / np.maximum(np.abs(e[np.isfinite(diff)]), 1e-300),
                                   initial=0.0)),
        ratio=float(ratio.max()),
        mismatched=int(mismatch.sum()),
        total=int(a.size),
        nonfinite=int((~np.isfinite(a)).sum()),
        worst={
            "index": [k],
            "coords": {"random_direction": k},  # not a layer direction (forward, reverse): the k-th probe
            "actual": float(a[k]),
            "expected": float(e[k]),
            "abs_error": float(diff[k]),
            "allowed": float(allowed[k]),
        },
        rtol=tol.rtol,
        atol=tol.atol,
        atol_scale=max(1.0, scale),
        tolerance_dtype=tolerance_dtype,
    )
    return rec
