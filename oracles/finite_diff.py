"""The finite-difference oracle: reference gradients from nothing but a forward function.

The gradient ``backward`` must return is the gradient of the scalar

    L(p) = <dy, y(p)> + <dh_T, h_T(p)> + <dc_T, c_T(p)>

with respect to every input and parameter p. This oracle estimates it by central differences of L in
float64, in the manner of ``jax.test_util.check_grads`` and PyTorch's fast gradcheck:

* tiny cases (at most ``full_limit`` scalars in all inputs and parameters): along every coordinate,
  which yields the whole gradient, so a discrepancy is located (t, gate, unit) like any other;
* larger cases: along ``directions`` random directions per input, comparing the projection
  <grad, v> with the difference quotient.

Error model, and the step it implies. For a step h along a direction scaled to the magnitude of
the coordinate (max(1, |p_j|), or the RMS of the input for a random direction),

    D(h) = (L(p + h v) - L(p - h v)) / (2h) = <grad, v> + h^2/6 L'''  +  O(eps * |L| * K / h)

truncation falls with h^2 and rounding grows with 1/h; they balance at h^3 = 3 eps |L| / |L'''|.
With the scaling above |L| / |L'''| is of order one, so h = (3 eps)^(1/3) ~ 8.7e-6 in float64.

That assumption fails where L bends on a scale below h: a LayerNorm row whose variance is comparable
to eps amplifies a perturbation by 1/sqrt(var + eps). So h only starts a ladder of steps
2h, h, h/2, ..., h/16. Adjacent steps give Richardson extrapolations (4 D(s/2) - D(s)) / 3 with
O(s^4) truncation; each is judged by its disagreement with its neighbours on the ladder (measured,
not assumed: for a smooth L about 15 times its own truncation error) plus the rounding term
eps * sum|terms of L| * 4(T + 1) / s, and per coordinate the one with the smallest total is kept.
The two smallest steps are taken only where the first four disagree by more than rounding: elsewhere
they provably could not win (``_differences``), which saves a third of the evaluations.
Twice that total is the value's error bound, and the comparison adds it to the tolerance; or twice
the departure of the finer steps' values from the kept one beyond their rounding, where that is
larger: two large steps can agree with each other on the far side of a bend that only smaller steps
resolve, and the finer steps then show how far off the pair is. Where no step
resolves the bend the bound is wide and honest: that element is left to the framework oracles.

Evaluation. The points of L are evaluated in batches, one input moved per batch: the moved copies
carry a leading evaluation axis and every other input is shared, so each time step is a few batched
array operations (:mod:`oracles.equations`). Moves of x, h0 and c0 become the batch rows of one
forward; a coordinate of one of them moves a single batch row, and since rows never meet in the
LSTM equations only that row is evaluated (``_evaluate_rows``; its rounding term then counts the
terms of that row's L only, which is all the difference carries). Every other point gets the same
floating-point operations on the same numbers as a forward called once per point, so where B > 1 its
value and bound are those of the one-at-a-time evaluation to the last bit. Where B = 1 they agree to
rounding only: NumPy multiplies a single row by a matrix with another BLAS routine, which adds up
in another order than the product of many rows the batch makes of it.

Layer structures. The case's structure and lengths go to the equations, which loop over layers and
directions around the one cell (:mod:`oracles.equations`); parameter names carry their prefixes and
every one is differenced like any other. Rows stay apart through every layer and direction, so the
row evaluation holds, each row with its own length. The rounding term counts L * T + 1 steps.

Coordinates never read. x at steps t >= lengths[b] and, under CIFG, each cell's forget block of W, R
and b, its p_f and its LayerNorm row f never enter the equations (masks discard them, f = 1 - i
replaces them): L's derivative along them is exactly 0, so they are given as 0 with bound 0 rather
than differenced (a quotient there is exactly 0 as well, but its rounding term would let a small
leak pass). With random directions such an input gets one more direction, supported on those
coordinates alone, with derivative 0 and bound 0.

Clip kinks. With a cell clip L is only piecewise smooth: where a cell meets the clip boundary its
derivative jumps, and a central difference across the kink averages two one-sided derivatives,
matching neither, with a ladder that may agree with itself. The step cannot be sized from a margin
alone (how far a cell moves for a step depends on the derivatives), so the oracle checks instead:
the equations report the cells before the clip, and a perturbed point at which another set of cells
is clipped than at the case itself lies across a kink. Its L is left out (NaN), every Richardson
value that uses it is never kept, and a coordinate whose whole ladder crossed gets value 0 with an
infinite bound (nothing to compare; the other oracles still check it). The notes say how far the
case's cells are from the boundary and how many points crossed. The case builder keeps cells a
margin away, so crossings are rare; when they happen the result is a wider bound, never a false
alarm. A user's own forward (``forward=``) does not report its cells: no detection there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.cases import Case
from harness.structure import FEATURES
from oracles.base import Oracle, Projection, Reference
from oracles.equations import lstm_forward, objective

__all__ = ["FiniteDifferenceOracle", "STEP", "LADDER"]

EPS64 = float(np.finfo(np.float64).eps)
#: The step from the error model above: truncation h^2/6 against rounding eps/h.
STEP = (3.0 * EPS64) ** (1.0 / 3.0)
#: Steps tried per coordinate or direction: 2h, h, h/2, ..., h/16 (see ``_differences``).
LADDER = 6
#: Steps tried everywhere; the rest only where the first ones disagree (see ``_differences``;
#: at least 4, which R_1's judgement needs).
FIRST_RUNGS = 4

ForwardFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
#: The equations' ``clipped`` hook: (cell state before the clip, rows that exist or None).
ClipHook = Callable[[np.ndarray, np.ndarray | None], object]
#: The inputs whose batch rows are independent: x (T, B, D), h0 and c0 (B, H).
_ROW_KEYS = ("x", "h0", "c0")


@dataclass(frozen=True)
class Moves:
    """n points of L: the input ``key`` moved by ``step[i]`` along the unit coordinate ``index[i]``
    (flat) or along ``directions[i]``; exactly one of ``index`` and ``directions`` is given."""

    key: str
    step: np.ndarray  # (n,)
    index: np.ndarray | None = None  # (n,) flat coordinates of the input
    directions: np.ndarray | None = None  # (n, *shape of the input)

    def __len__(self) -> int:
        return len(self.step)

    def take(self, rows: np.ndarray | slice, step: np.ndarray | None = None) -> Moves:
        """The moves ``rows``, by ``step`` (n',) instead of their own steps if given."""
        return Moves(
            self.key,
            self.step[rows] if step is None else step,
            None if self.index is None else self.index[rows],
            None if self.directions is None else self.directions[rows],
        )

    def apply(self, a: np.ndarray) -> np.ndarray:
        """(n, *a.shape): copy i of ``a`` moved by move i."""
        n = len(self)
        if self.directions is not None:
            step = self.step.reshape((n,) + (1,) * a.ndim)
            return a[None] + step * self.directions
        assert self.index is not None
        batch = np.repeat(a[None], n, axis=0)
        batch.reshape(n, -1)[np.arange(n), self.index] += self.step
        return batch


def _clipped(c: np.ndarray, valid: np.ndarray | None, clip: float) -> np.ndarray:
    """Which cells of a step the clip cuts (only at steps that exist)."""
    out = np.abs(c) > clip
    return out if valid is None else out & valid


class _Crossings:
    """Collects the clipped cells of an evaluation (the equations' ``clipped`` hook) and tells, per
    evaluation, whether they differ from the case's own: then that point lies across a kink of L.

    ``base``: the case's masks, step by step (None: no clip, nothing to collect). ``rows``: the
    evaluations are batch rows (E * B', H) and ``base`` holds the matching (E, B', H) masks."""

    def __init__(self, base: list[np.ndarray] | None, E: int, clip: float | None, *, rows: bool = False):
        self.base, self.E, self.clip, self.rows = base, E, clip, rows
        self.seen: list[np.ndarray] = []

    @property
    def hook(self) -> ClipHook | None:
        if self.base is None or self.clip is None:
            return None
        clip = self.clip
        return lambda c, valid: self.seen.append(_clipped(c, valid, clip))

    def any(self) -> np.ndarray:
        """(E,) bool: the evaluations where another set of cells was clipped."""
        out = np.zeros(self.E, dtype=bool)
        for mask, own in zip(self.seen, self.base or [], strict=True):
            if self.rows:
                out |= (mask != own.reshape(mask.shape)).reshape(self.E, -1).any(axis=1)
                continue
            diff = mask != own
            if diff.ndim > own.ndim:  # this cell saw the moved input: (E, ..., B, H)
                out |= diff.reshape(self.E, -1).any(axis=1)
            elif diff.any():
                out[:] = True
        return out


def _unread(case: Case) -> dict[str, np.ndarray]:
    """The coordinates the equations never read, by input (bool masks, only inputs that have some):
    x at the steps t >= lengths[b] that do not exist, and under CIFG every cell's forget-gate block of
    W, R and b, its forget peephole p_f, and its LayerNorm row f of gamma and beta. L's derivative
    along each of them is exactly 0 by construction."""
    s, out = case.structure, {}
    if case.lengths is not None:
        padded = np.arange(case.T)[:, None] >= case.lengths[None, :]  # (T, B)
        if padded.any():
            out["x"] = np.broadcast_to(padded[:, :, None], case.x.shape).copy()
    if s.coupled_input_forget:
        H = case.H
        for _layer, _direction, prefix in s.cells():
            for bare in ("W", "R", "b", "p_f", "gamma", "beta"):
                if prefix + bare not in case.params:
                    continue
                m = np.zeros(case.params[prefix + bare].shape, dtype=bool)
                if bare == "p_f":
                    m[:] = True
                elif bare in ("gamma", "beta"):
                    m[1] = True  # rows i, f, g, o, c
                else:
                    m[H : 2 * H] = True  # gate blocks i, f, g, o
                out[prefix + bare] = m
    return out


class FiniteDifferenceOracle(Oracle):
    """Central differences of any forward function, in float64.

    ``forward(variant, x, h0, c0, params, *, ln_eps)`` defaults to the LSTM equations
    (:mod:`oracles.equations`). With ``batched=True`` the forward accepts leading evaluation axes
    on any of its arrays (an array without them is shared by every evaluation, as in broadcasting)
    and every perturbation of a chunk runs in one call; a user's own forward (``batched=False``)
    is called once per perturbation, which checks that implementation's backward against its own
    forward, like ``torch.autograd.gradcheck``. ``chunk`` is the number of batch rows one batched
    call evaluates (a case's B rows per point, or one for a coordinate of x, h0 or c0): about 256
    keeps the arrays of a time step within the processor's caches.
    """

    name = "finite-differences"
    description = "central differences of the LSTM equations in float64 (Richardson-extrapolated)"
    variants = ("vanilla", "peephole", "layernorm")
    compute_dtypes = ("float64",)
    structures = frozenset(FEATURES)

    def __init__(
        self,
        forward: ForwardFn | None = None,
        *,
        batched: bool | None = None,
        directions: int = 3,
        full_limit: int = 4096,
        chunk: int = 256,
        seed: int = 0,
        name: str | None = None,
    ):
        if directions < 1:
            raise ValueError(f"directions: expected an int >= 1, got {directions!r}")
        if full_limit < 0:
            raise ValueError(f"full_limit: expected an int >= 0, got {full_limit!r}")
        self.forward = forward or lstm_forward
        self.batched = (forward is None) if batched is None else batched
        self.directions = directions
        self.full_limit = full_limit
        self.chunk = chunk
        self.seed = seed
        if name:
            self.name = name
        # Per reference, with a cell clip: the case's clipped cells step by step, the perturbed points
        # found across a clip boundary, and the cells' smallest distance from it.
        self._clip_base: list[np.ndarray] | None = None
        self._crossed = 0
        self._margin = np.inf

    def reference(self, case: Case) -> Reference:
        why = self.unsupported_reason(case.variant, case.dtype, case.structure)
        if why:
            raise ValueError(f"case: {why}")
        c = case.astype("float64")
        clip = c.structure.cell_clip
        self._clip_base, self._crossed, self._margin = None, 0, np.inf
        if clip is not None and self._own:
            seen: list[tuple[np.ndarray, np.ndarray | None]] = []
            y, h_T, c_T = self._forward(c, c.x, c.h0, c.c0, c.params, clipped=lambda v, ok: seen.append((v, ok)))
            self._clip_base = [_clipped(v, ok, clip) for v, ok in seen]
            exist = [np.broadcast_to(True if ok is None else ok, v.shape) for v, ok in seen]
            # a step whose every row is past its length has no existing cell: it has no margin to offer
            self._margin = min((float(np.abs(np.abs(v) - clip)[m].min()) for (v, _), m in zip(seen, exist, strict=True)
                                if m.any()), default=np.inf)
        else:
            y, h_T, c_T = self._forward(c, c.x, c.h0, c.c0, c.params)
        arrays = c.arrays()
        n = sum(a.size for a in arrays.values())
        unread = _unread(c)
        ref = Reference(compute_dtype="float64", outputs={"y": y, "h_T": h_T, "c_T": c_T})
        if n <= self.full_limit:
            ref.gradients, ref.gradient_error = self._full_gradient(c, arrays, unread)
            notes = [f"whole gradient by central differences along all {n} coordinates"]
            unresolved = sum(int(np.isinf(e).sum()) for e in ref.gradient_error.values())
        else:
            ref.projections = self._projections(c, arrays, unread)
            notes = [f"{self.directions} random directions per input ({n} coordinates in all)"]
            unresolved = sum(int(np.isinf(p.error_bound).sum()) for p in ref.projections.values())
        if unread:
            notes.append("exactly 0 by construction, not differenced: "
                         + ", ".join(f"{int(m.sum())} of {k}" for k, m in unread.items())
                         + (" (one more direction each, on those coordinates alone)" if ref.projections else ""))
        if clip is not None:
            notes.append(self._clip_note(c, clip, unresolved))
        ref.notes = "; ".join(notes)
        return ref

    @property
    def _own(self) -> bool:
        """Whether the forward is this module's equations (which report the clipped cells)."""
        return self.forward is lstm_forward

    def _clip_note(self, case: Case, clip: float, unresolved: int) -> str:
        """What the clip did to the differences: the margin of the cells from the boundary, the ladder
        points that crossed it (left out) and the values no remaining step resolved (bound infinite)."""
        if self._clip_base is None:
            return "cell_clip: a user's forward does not report clipped cells; differences across the clip " \
                   "boundary are not detected"
        text = f"cell_clip={clip:g}: the cells of existing steps are at least {self._margin:.3g} from the boundary"
        if self._crossed:
            text += (f"; {self._crossed} perturbed points crossed it (their differences are left out; "
                     f"{unresolved} values with no step left are unbounded, left to the other oracles)")
        return text

    def _forward(self, case: Case, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, params: dict[str, np.ndarray],
                 lengths: np.ndarray | None = None, clipped: ClipHook | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The forward on these arrays. The structure and lengths (``lengths`` when given: rows picked
        by the row evaluation) are passed only to a structured case's forward, so that a user's
        forward of the plain LSTM keeps its signature; ``clipped`` only to the equations."""
        extra: dict[str, Any] = {}
        if not case.structure.is_default:
            extra = {"structure": case.structure, "lengths": case.lengths if lengths is None else lengths}
        if clipped is not None:
            extra["clipped"] = clipped
        return self.forward(case.variant, x, h0, c0, params, ln_eps=case.ln_eps, **extra)

    def _objective(self, case: Case, moves: Moves) -> tuple[np.ndarray, np.ndarray]:
        """L and sum |terms of L| at every point of ``moves``, each (n,), evaluated in chunks.

        With a clip, a point where another set of cells is clipped than at the case itself has
        crossed the clip's kink: its L is NaN, which :meth:`_differences` leaves out."""
        values = np.empty(len(moves))
        magnitudes = np.empty(len(moves))
        # ``chunk`` counts batch rows: a coordinate move of x, h0 or c0 is one row, any other move B.
        own_row = moves.key in _ROW_KEYS and moves.index is not None and self._own
        size = max(1, self.chunk // (1 if own_row else case.B)) if self.batched else 1
        for start in range(0, len(moves), size):
            part = slice(start, start + size)
            values[part], magnitudes[part] = self._evaluate(case, moves.take(part))
        return values, magnitudes

    def _evaluate(self, case: Case, moves: Moves) -> tuple[np.ndarray, np.ndarray]:
        """L and sum |terms of L| at the points of one chunk, each (E,)."""
        base = case.arrays()
        E = len(moves)
        perturbed = moves.apply(base[moves.key])  # (E, *shape of the input)
        nd = case.h0.ndim
        if not self.batched:
            L, M = np.empty(E), np.empty(E)
            for e in range(E):
                a = {**base, moves.key: perturbed[e]}
                one = _Crossings(self._clip_base, 1, case.structure.cell_clip)
                y, h_T, c_T = (np.asarray(o, np.float64) for o in self._forward(
                    case, a["x"], a["h0"], a["c0"], {k: a[k] for k in case.params}, clipped=one.hook)[:3])
                L[e], M[e] = objective(y, h_T, c_T, case.dy, case.dh_T, case.dc_T, state_ndim=nd)
                L[e] = np.nan if one.any()[0] else L[e]
            self._crossed += int(np.isnan(L).sum())
            return L, M
        if moves.key in _ROW_KEYS and self._own:
            return self._evaluate_rows(case, moves, perturbed)
        # Only the moved input carries the evaluation axis; the others are shared by broadcasting.
        a = {**base, moves.key: perturbed}
        crossed = None if self._clip_base is None else _Crossings(self._clip_base, E, case.structure.cell_clip)
        y, h_T, c_T = self._forward(case, a["x"], a["h0"], a["c0"], {k: a[k] for k in case.params},
                                    clipped=None if crossed is None else crossed.hook)
        L, M = objective(y, h_T, c_T, case.dy, case.dh_T, case.dc_T, state_ndim=nd)
        L = np.broadcast_to(L, (E,))
        return (L if crossed is None else self._drop_crossed(L, crossed.any())), np.broadcast_to(M, (E,))

    def _drop_crossed(self, L: np.ndarray, crossed: np.ndarray) -> np.ndarray:
        if crossed.any():
            self._crossed += int(crossed.sum())
            return np.where(crossed, np.nan, L)
        return L

    def _evaluate_rows(self, case: Case, moves: Moves, perturbed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Moves of x, h0 or c0 as the batch rows of one forward, with the weights shared.

        Every evaluation becomes B' rows of one batch of E * B' rows, so that each time step is one
        matrix product for all of them. Batch rows never meet in the LSTM equations (LayerNorm
        normalizes over the H units of a row; every layer and direction keeps its rows apart), so a
        coordinate move, which changes one row b, is evaluated on that row alone (B' = 1): the terms
        of L from the other rows are the same at both points of a central difference and cancel in
        it exactly, so leaving them out changes the quotient by rounding only, and the rounding term,
        from sum |terms| of that row's L, shrinks with it. A random direction moves every row (B' = B).
        The states' batch axis is their second last ((B, H) or, layered, (L * dirs, B, H)); a row's
        length goes with it.
        """
        E, T, B, D = len(moves), case.T, case.B, case.D
        if moves.index is not None:
            shape = case.arrays()[moves.key].shape
            axis = 1 if moves.key == "x" else len(shape) - 2  # the batch axis of x (T, B, D); of the states
            rows = np.unravel_index(moves.index, shape)[axis][:, None]  # (E, 1)
        else:
            rows = np.broadcast_to(np.arange(B), (E, B))  # (E, B)
        Bp = rows.shape[1]
        e = np.arange(E)[:, None]  # (E, 1)

        layered = case.h0.ndim == 3  # the states' leading (L * dirs) axis; the plain case keeps its fast path

        def states(key: str) -> np.ndarray:  # (..., E * B', features), this input's rows
            if moves.key != key:
                own = getattr(case, key)[..., rows, :]  # (..., E, B', features)
            elif layered:  # (E, n, B, F) -> (E, B', n, F) -> (n, E, B', F)
                own = np.moveaxis(np.moveaxis(perturbed, -2, 1)[e, rows], (0, 1), (-3, -2))
            else:
                own = perturbed[e, rows]  # (E, B', F)
            return own.reshape(*own.shape[:-3], E * Bp, own.shape[-1])

        x = perturbed[e, :, rows] if moves.key == "x" else case.x[:, rows].transpose(1, 2, 0, 3)  # (E, B', T, D)
        x = x.transpose(2, 0, 1, 3).reshape(T, E * Bp, D)  # (T, E * B', D)
        lengths = None if case.lengths is None else case.lengths[rows].reshape(E * Bp)
        crossed = None if self._clip_base is None else _Crossings(
            [m[..., rows, :] for m in self._clip_base], E, case.structure.cell_clip, rows=True)
        y, h_T, c_T = self._forward(case, x, states("h0"), states("c0"), case.params, lengths=lengths,
                                    clipped=None if crossed is None else crossed.hook)
        y = y.reshape(T, E, Bp, y.shape[-1]).transpose(1, 0, 2, 3)  # (E, T, B', F)
        dy = case.dy[:, rows].transpose(1, 0, 2, 3)  # (E, T, B', F)
        if layered:  # (n, E * B', F) -> (E, n, B', F)
            h_T, c_T = (np.moveaxis(a.reshape(a.shape[0], E, Bp, a.shape[-1]), 1, 0) for a in (h_T, c_T))
            dh_T, dc_T = (np.moveaxis(u[:, rows], 1, 0) for u in (case.dh_T, case.dc_T))
        else:
            h_T, c_T = (a.reshape(E, Bp, a.shape[-1]) for a in (h_T, c_T))
            dh_T, dc_T = case.dh_T[rows], case.dc_T[rows]
        L, M = objective(y, h_T, c_T, dy, dh_T, dc_T, state_ndim=case.h0.ndim)
        return (L if crossed is None else self._drop_crossed(L, crossed.any())), M

    def _differences(self, case: Case, moves: Moves) -> tuple[np.ndarray, np.ndarray]:
        """For each move (step h): the best Richardson value on the step ladder and its error bound.

        Central differences D(s) at the steps s_k = 2h / 2^k, k = 0 .. LADDER-1; Richardson values
        R_k = (4 D(s_{k+1}) - D(s_k)) / 3. Each inner R_k is judged by its disagreement with both
        neighbours (for a smooth L that is about 15 times its own O(s^4) error, so a safe bound)
        plus the rounding term at its smaller step; the R_k with the smallest total is kept.
        Where L bends on a scale below h (LayerNorm rows whose variance is comparable to eps),
        the large steps disagree and the ladder settles on a smaller one instead of reporting a
        quotient across the bend.

        The two smallest steps are evaluated only where they can matter. From the first FIRST_RUNGS
        steps, R_1's total is max(|R_1 - R_0|, |R_2 - R_1|) + r_1, with r_k the rounding term,
        which doubles with each halving. Where the disagreement is at most r_1, R_1's total is at
        most 2 r_1, while every later R_k's is at least r_k >= 2 r_1: the full ladder would keep R_1
        (the first of equals), so it is kept without evaluating the rest.
        """
        n = len(moves)
        L = np.full((n, LADDER, 2), np.nan)
        M = np.zeros(n)
        steps = moves.step[:, None] * (2.0 / 2.0 ** np.arange(LADDER))  # (n, LADDER)

        def evaluate(rows: np.ndarray, rungs: range) -> None:
            # every row at every rung, at +s and -s: (rows, rungs, 2) flattened in that order
            signed = steps[rows][:, rungs, None] * np.array([1.0, -1.0])  # (rows, rungs, 2)
            values, magnitudes = self._objective(case, moves.take(np.repeat(rows, 2 * len(rungs)), signed.ravel()))
            L[rows[:, None], np.arange(rungs.start, rungs.stop)[None, :]] = values.reshape(len(rows), len(rungs), 2)
            M[rows] = np.maximum(M[rows], magnitudes.reshape(len(rows), -1).max(axis=1))

        def richardson() -> tuple[np.ndarray, np.ndarray]:
            D = (L[..., 0] - L[..., 1]) / (2 * steps)  # (n, LADDER), NaN on rungs not evaluated
            R = (4 * D[:, 1:] - D[:, :-1]) / 3  # (n, LADDER - 1)
            depth = case.structure.num_layers * case.T + 1  # the steps a rounding error passes through
            rounding = 2 * EPS64 * M[:, None] * 4 * depth / steps[:, 1:]  # 1.5 eps_L / s_{k+1}, margin
            return R, rounding

        evaluate(np.arange(n), range(FIRST_RUNGS))
        settled = np.zeros(n, dtype=bool)
        if FIRST_RUNGS < LADDER:
            R, rounding = richardson()
            settled = np.maximum(np.abs(R[:, 1] - R[:, 0]), np.abs(R[:, 2] - R[:, 1])) <= rounding[:, 1]
            rest = np.flatnonzero(~settled)
            if rest.size:
                evaluate(rest, range(FIRST_RUNGS, LADDER))
        R, rounding = richardson()
        jumps = np.abs(np.diff(R, axis=1))  # |R_{k+1} - R_k|, (n, LADDER - 2)
        total = np.full(R.shape, np.inf)
        total[:, 1:-1] = np.maximum(jumps[:, :-1], jumps[:, 1:]) + rounding[:, 1:-1]
        total[settled, 2:] = np.inf  # not evaluated, and provably not better than R_1
        total[np.isnan(total)] = np.inf  # a rung across a clip boundary (its L is NaN) is never kept
        best = np.argmin(total, axis=1)
        rows = np.arange(n)
        # A pair of large steps can agree with each other on the far side of a bend that only smaller
        # steps resolve (a LayerNorm row with spread 1e-5 under a step of 1e-4): then the finer rungs
        # depart from the kept value by more than their rounding, and that departure bounds its error
        # too. (Rungs not evaluated, NaN, are those provably no better: they add nothing.)
        finer = np.arange(R.shape[1])[None, :] > best[:, None]  # (n, LADDER - 1)
        departure = np.where(finer, np.abs(R - R[rows, best][:, None]) - rounding, 0.0)
        departure = np.nanmax(np.maximum(departure, 0.0), axis=1)
        # The neighbour disagreement is itself an estimate; a factor of 2 covers its own error
        # (measured: one near-constant LayerNorm case came to 1.002 times the unfactored bound).
        bound = 2.0 * np.maximum(total[rows, best], departure)
        # No rung left where every point crossed a clip boundary: an unbounded value, never a false alarm.
        return np.where(np.isinf(bound), 0.0, R[rows, best]), bound

    def _full_gradient(self, case: Case, arrays: dict[str, np.ndarray], unread: dict[str, np.ndarray]
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every coordinate's derivative and bound; those never read are exactly 0 (bound 0)."""
        grads, errors = {}, {}
        for key, a in arrays.items():
            index = np.flatnonzero(~unread[key].ravel()) if key in unread else np.arange(a.size)
            grad, error = np.zeros(a.size), np.zeros(a.size)
            if index.size:
                # The step is scaled by max(1, |p_j|) but the difference quotient divides it back out,
                # so value and bound are already per unit of p_j.
                step = STEP * np.maximum(1.0, np.abs(a.ravel()[index]))  # (index.size,)
                grad[index], error[index] = self._differences(case, Moves(key, step, index=index))
            grads[key], errors[key] = grad.reshape(a.shape), error.reshape(a.shape)
        return grads, errors

    def _projections(self, case: Case, arrays: dict[str, np.ndarray], unread: dict[str, np.ndarray]
                     ) -> dict[str, Projection]:
        """``directions`` random directions per input, differenced. An input with coordinates the
        equations never read gets one more direction, on those coordinates alone, whose derivative is
        exactly 0 (bound 0): a backward that leaks anything there (dx at padded steps, a CIFG forget
        block) is compared with 0, not lost among the other coordinates."""
        rng = np.random.default_rng(self.seed)
        out = {}
        for key, a in arrays.items():
            scale = max(1.0, float(np.sqrt(np.mean(a**2))))
            v = rng.standard_normal((self.directions,) + a.shape)  # (K, *shape)
            value, bound = self._differences(case, Moves(key, np.full(self.directions, STEP * scale), directions=v))
            if key in unread:
                zero = np.where(unread[key], rng.standard_normal(a.shape), 0.0)[None]  # (1, *shape)
                v, value, bound = np.concatenate([v, zero]), np.append(value, 0.0), np.append(bound, 0.0)
            out[key] = Projection(v, value, bound)
        return out
