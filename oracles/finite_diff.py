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
Twice that total is the value's error bound, and the comparison adds it to the tolerance. Where no step
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from harness.cases import Case
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

    def reference(self, case: Case) -> Reference:
        c = case.astype("float64")
        y, h_T, c_T = self._forward(c, c.x, c.h0, c.c0, c.params)
        arrays = c.arrays()
        n = sum(a.size for a in arrays.values())
        ref = Reference(compute_dtype="float64", outputs={"y": y, "h_T": h_T, "c_T": c_T})
        if n <= self.full_limit:
            ref.gradients, ref.gradient_error = self._full_gradient(c, arrays)
            ref.notes = f"whole gradient by central differences along all {n} coordinates"
        else:
            ref.projections = self._projections(c, arrays)
            ref.notes = f"{self.directions} random directions per input ({n} coordinates in all)"
        return ref

    def _forward(self, case: Case, x: np.ndarray, h0: np.ndarray, c0: np.ndarray,
                 params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.forward(case.variant, x, h0, c0, params, ln_eps=case.ln_eps)

    def _objective(self, case: Case, moves: Moves) -> tuple[np.ndarray, np.ndarray]:
        """L and sum |terms of L| at every point of ``moves``, each (n,), evaluated in chunks."""
        values = np.empty(len(moves))
        magnitudes = np.empty(len(moves))
        # ``chunk`` counts batch rows: a coordinate move of x, h0 or c0 is one row, any other move B.
        own_row = moves.key in _ROW_KEYS and moves.index is not None and self.forward is lstm_forward
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
        if not self.batched:
            L, M = np.empty(E), np.empty(E)
            for e in range(E):
                a = {**base, moves.key: perturbed[e]}
                y, h_T, c_T = (np.asarray(o, np.float64) for o in
                               self._forward(case, a["x"], a["h0"], a["c0"], {k: a[k] for k in case.params})[:3])
                L[e], M[e] = objective(y, h_T, c_T, case.dy, case.dh_T, case.dc_T)
            return L, M
        if moves.key in _ROW_KEYS and self.forward is lstm_forward:
            return self._evaluate_rows(case, moves, perturbed)
        # Only the moved input carries the evaluation axis; the others are shared by broadcasting.
        a = {**base, moves.key: perturbed}
        y, h_T, c_T = self._forward(case, a["x"], a["h0"], a["c0"], {k: a[k] for k in case.params})
        L, M = objective(y, h_T, c_T, case.dy, case.dh_T, case.dc_T)
        return np.broadcast_to(L, (E,)), np.broadcast_to(M, (E,))

    def _evaluate_rows(self, case: Case, moves: Moves, perturbed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Moves of x, h0 or c0 as the batch rows of one forward, with the weights shared.

        Every evaluation becomes B' rows of one batch of E * B' rows, so that each time step is one
        matrix product for all of them. Batch rows never meet in the LSTM equations (LayerNorm
        normalizes over the H units of a row), so a coordinate move, which changes one row b, is
        evaluated on that row alone (B' = 1): the terms of L from the other rows are the same at
        both points of a central difference and cancel in it exactly, so leaving them out changes
        the quotient by rounding only, and the rounding term, from sum |terms| of that row's L,
        shrinks with it. A random direction moves every row (B' = B).
        """
        E, T, B, D, H = len(moves), case.T, case.B, case.D, case.H
        if moves.index is not None:
            axis = 1 if moves.key == "x" else 0  # the batch axis of x (T, B, D); of h0, c0 (B, H)
            rows = np.unravel_index(moves.index, case.arrays()[moves.key].shape)[axis][:, None]  # (E, 1)
        else:
            rows = np.broadcast_to(np.arange(B), (E, B))  # (E, B)
        Bp = rows.shape[1]
        e = np.arange(E)[:, None]  # (E, 1)
        x = perturbed[e, :, rows] if moves.key == "x" else case.x[:, rows].transpose(1, 2, 0, 3)  # (E, B', T, D)
        h0 = perturbed[e, rows] if moves.key == "h0" else case.h0[rows]  # (E, B', H)
        c0 = perturbed[e, rows] if moves.key == "c0" else case.c0[rows]  # (E, B', H)
        x = x.transpose(2, 0, 1, 3).reshape(T, E * Bp, D)  # (T, E * B', D)
        y, h_T, c_T = self._forward(case, x, h0.reshape(E * Bp, H), c0.reshape(E * Bp, H), case.params)
        y = y.reshape(T, E, Bp, H).transpose(1, 0, 2, 3)  # (E, T, B', H)
        dy = case.dy[:, rows].transpose(1, 0, 2, 3)  # (E, T, B', H)
        return objective(y, h_T.reshape(E, Bp, H), c_T.reshape(E, Bp, H), dy, case.dh_T[rows], case.dc_T[rows])

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
            rounding = 2 * EPS64 * M[:, None] * 4 * (case.T + 1) / steps[:, 1:]  # 1.5 eps_L / s_{k+1}, margin
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
        best = np.argmin(total, axis=1)
        rows = np.arange(n)
        # The neighbour disagreement is itself an estimate; a factor of 2 covers its own error
        # (measured: one near-constant LayerNorm case came to 1.002 times the unfactored bound).
        return R[rows, best], 2.0 * total[rows, best]

    def _full_gradient(self, case: Case, arrays: dict[str, np.ndarray]
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        grads, errors = {}, {}
        for key, a in arrays.items():
            # The step is scaled by max(1, |p_j|) but the difference quotient divides it back out,
            # so value and bound are already per unit of p_j.
            step = STEP * np.maximum(1.0, np.abs(a.ravel()))  # (a.size,)
            value, bound = self._differences(case, Moves(key, step, index=np.arange(a.size)))
            grads[key], errors[key] = value.reshape(a.shape), bound.reshape(a.shape)
        return grads, errors

    def _projections(self, case: Case, arrays: dict[str, np.ndarray]) -> dict[str, Projection]:
        rng = np.random.default_rng(self.seed)
        out = {}
        for key, a in arrays.items():
            scale = max(1.0, float(np.sqrt(np.mean(a**2))))
            v = rng.standard_normal((self.directions,) + a.shape)  # (K, *shape)
            value, bound = self._differences(case, Moves(key, np.full(self.directions, STEP * scale), directions=v))
            out[key] = Projection(v, value, bound)
        return out
