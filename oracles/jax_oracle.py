"""JAX oracle: the LSTM equations in ``jax.numpy``, gradients by ``jax.vjp``, compiled once per shape bucket.

A third automatic-differentiation system beside PyTorch's and TensorFlow's, for every variant, in
float64 (``jax_enable_x64``, set when the oracle is first used; a process-wide JAX setting, harmless
to the harness and to worker processes). It computes on the CPU also where JAX has a GPU (a
``default_device`` block around each reference, nothing process-wide): the same arithmetic on
every machine, and no share of the GPU that the implementation under test runs on.

Why buckets. Run eagerly, op by op, the equations cost hundreds of milliseconds a case in dispatch
alone; compiled with ``jax.jit`` they cost microseconds, but ``jit`` compiles once per distinct
(T, B, D, H), a few hundred milliseconds each, and a Hypothesis run draws a new shape almost every
case. So every case is zero-padded up to a *bucket* (each of T, B, D, H rounded up to a power of
two, at least :data:`FLOORS`), and one function per (variant, kind of cell, bucket) computes the
outputs and the vector-Jacobian product of one direction of one layer together; the results are
sliced back to the real shapes. A case runs as its cells (a layer structure below; the default
structure is a single cell of the same function). Every case with T, D, H <= 16 and B <= 8 (the
harness's default draws are smaller) falls in one bucket per variant, so a whole Hypothesis run
compiles once per variant and kind of cell (projected or not); larger cases add one bucket per
doubling.

Why padding changes nothing but rounding. Padded entries of x, W, R, b, the peepholes, gamma,
beta, h0, c0, dy, dh_T and dc_T are zero (W, R, b, gamma, beta padded block by block, so the
gate blocks i, f, g, o stay aligned), and

* a padded hidden unit has pre-activation 0, so i = f = o = 1/2 and g = 0; from c0 = 0 its cell
  stays c = 0 and h = tanh(0) / 2 = 0, and since its columns of R are zero it feeds nothing into
  a real unit; for LayerNorm its gain and shift are zero, so its normalized value is 0 as well;
* LayerNorm takes the mean and the (biased) variance over the real H units only: a unit mask and
  the true H are traced inputs, not shapes, so a padded unit never enters a statistic;
* a padded input column of x meets zero columns of W; a padded batch row is all zero, is
  independent of the real rows in the forward pass, and receives zero cotangents (its dy, dh_T,
  dc_T are zero), so it adds exact zeros to the parameter gradients;
* ``lax.scan`` runs over the bucketed T and keeps the carry (h, c) unchanged at steps t >= lengths[b]
  (a ``where`` on the traced lengths; without lengths every row has the real T), so h_T and c_T are
  the states at each row's last real step; the discarded branch gets a zero cotangent and every
  quantity in it is finite (x = 0 there, eps > 0 in the root), so it contributes exact zeros to the
  gradients.

So every real quantity is the unpadded value plus exact zeros; only the order of floating-point
summation inside matmuls and reductions may differ, which moves results by a few units in the last
place (``tests/test_oracle_jax.py`` checks 1e-13 against the eager, unpadded path at bucket
boundaries, and agreement with finite differences). ``JaxCompositeOracle(bucketed=False)`` is that
eager path: the same equations on the exact shapes, op by op, slow, kept as the baseline.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from harness.cases import Case
from harness.contract import gradient_keys
from harness.structure import FEATURES, Structure
from oracles.base import Availability, Oracle, Reference, module_available
from oracles.cells import run_by_cells

__all__ = ["JaxCompositeOracle", "FLOORS", "bucket", "bucket_sizes", "compilations"]

#: Smallest bucket per dimension. Above it a dimension is rounded up to the next power of two.
#: At these sizes a padded step costs microseconds, far less than a compilation (~0.5 s), so one
#: bucket that holds every default Hypothesis case is worth the wasted arithmetic.
FLOORS: dict[str, int] = {"T": 16, "B": 8, "D": 16, "H": 16}

#: How many times each (variant, kind of cell, T, B, D, H buckets) was traced, i.e. compiled. Tests read it.
_TRACES: Counter[tuple[str, str, int, int, int, int]] = Counter()


def bucket(n: int, floor: int) -> int:
    """``n`` rounded up to a power of two, at least ``floor``."""
    if n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    return max(floor, 1 << (n - 1).bit_length())


def bucket_sizes(T: int, B: int, D: int, H: int) -> dict[str, int]:
    """The padded sizes a case of shape (T, B, D, H) is computed at."""
    return {k: bucket(n, FLOORS[k]) for k, n in (("T", T), ("B", B), ("D", D), ("H", H))}


def compilations(variant: str | None = None) -> int:
    """How many buckets have been compiled in this process (for ``variant``, or all)."""
    return sum(n for key, n in _TRACES.items() if variant is None or key[0] == variant)


def _jax() -> tuple[Any, Any]:
    # JAX on a GPU reserves 75% of its memory at first use; the implementation under test (a CuPy
    # one, or a user's CUDA kernel in a worker process) shares that GPU. A user's own setting wins.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp

    if not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)
    return jax, jnp


def _cell(jnp: Any, variant: str, p: dict[str, Any], x_t: Any, h: Any, c: Any,
          norm: Callable[[Any, int], Any], *, cifg: Any = False, clip: Any = None) -> tuple[Any, Any]:
    """One step of the contract's equations: x_t (B, D), h (B, H_out), c (B, H) -> h_t, c_t.

    ``norm(v, k)`` is LayerNorm with row k of gamma and beta (rows i, f, g, o, c). ``p`` may hold
    ``proj`` (P, H): h_t = proj @ (o * tanh(c_t)). ``cifg``: f = 1 - i (a bool: the forget block is
    never read; a traced flag: ``jnp.where`` gives the unselected forget block a zero cotangent; either
    way its gradient is exactly 0). ``clip``: c_t = clip(c_t, -clip, clip) by ``jnp.clip``, whose
    gradient is 0 where the value is cut (at exactly the boundary JAX splits it; the cases keep cells
    away from the boundary by a margin, so no cell sits there); an infinite clip cuts nothing and
    passes the gradient unchanged, as no clip does.
    """
    H = c.shape[-1]

    def sigmoid(v):
        return 0.5 * (1.0 + jnp.tanh(0.5 * v))

    def clipped(v):
        return v if clip is None else jnp.clip(v, -clip, clip)

    def forget(i, computed):
        if isinstance(cifg, bool):
            return 1.0 - i if cifg else computed()
        return jnp.where(cifg, 1.0 - i, computed())

    z = x_t @ p["W"].T + h @ p["R"].T  # (B, 4H)
    if variant != "layernorm":
        z = z + p["b"]
    z_i, z_f, z_g, z_o = (z[:, k * H : (k + 1) * H] for k in range(4))  # (B, H) each
    if variant == "vanilla":
        i, g = sigmoid(z_i), jnp.tanh(z_g)
        f = forget(i, lambda: sigmoid(z_f))
        c = clipped(f * c + i * g)
        o = sigmoid(z_o)
    elif variant == "peephole":
        i = sigmoid(z_i + p["p_i"] * c)
        f = forget(i, lambda: sigmoid(z_f + p["p_f"] * c))
        c = clipped(f * c + i * jnp.tanh(z_g))
        o = sigmoid(z_o + p["p_o"] * c)  # the output gate sees the new cell state
    else:
        i = sigmoid(norm(z_i, 0))
        f = forget(i, lambda: sigmoid(norm(z_f, 1)))
        g, o = jnp.tanh(norm(z_g, 2)), sigmoid(norm(z_o, 3))
        c = norm(f * c + i * g, 4)  # the normalized cell is carried forward
    h = o * jnp.tanh(c)
    if "proj" in p:
        h = h @ p["proj"].T
    return h, c


# ----------------------------------------------------------------------------------------------
# Zero-padded to buckets: the pieces every compiled cell shares.


def _masked_norm(jnp: Any, a: dict[str, Any], H: Any, ln_eps: Any) -> Callable[[Any, int], Any]:
    """LayerNorm of padded rows with row k of ``a``'s gamma and beta: the statistics over the real ``H``
    units only (a traced scalar); padded units have gamma = beta = 0, so their normalized value is 0."""
    unit = jnp.arange(a["c0"].shape[-1]) < H  # (Hb,) the real units
    n_units = H.astype(a["c0"].dtype)

    def norm(v, k):
        mean = jnp.where(unit, v, 0.0).sum(axis=-1, keepdims=True) / n_units
        dev = jnp.where(unit, v - mean, 0.0)
        var = (dev * dev).sum(axis=-1, keepdims=True) / n_units
        return dev / jnp.sqrt(var + ln_eps) * a["gamma"][k] + a["beta"][k]

    return norm


def _blocked(shape: tuple[str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """``shape`` (symbols as in :class:`harness.contract.ArraySpec`, or a key of ``sizes``) with every
    (4H) axis split into its gate blocks (4, H)."""
    out: list[int] = []
    for s in shape:
        if s == "4H":
            out += [4, sizes["H"]]
        else:
            out.append(sizes[s] if s in sizes else int(s))
    return tuple(out)


def _concrete(shape: tuple[str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(4 * sizes["H"] if s == "4H" else sizes[s] if s in sizes else int(s) for s in shape)


def _pad(a: np.ndarray, shape: tuple[str, ...], real: dict[str, int], padded: dict[str, int]) -> np.ndarray:
    """``a`` zero-padded from the ``real`` sizes to the ``padded`` ones, a (4H) axis block by block."""
    out = np.zeros(_blocked(shape, padded), dtype=np.float64)
    blocks = _blocked(shape, real)
    out[tuple(slice(0, size) for size in blocks)] = a.reshape(blocks)
    return out.reshape(_concrete(shape, padded))


def _unpad(a: Any, shape: tuple[str, ...], real: dict[str, int], padded: dict[str, int]) -> np.ndarray:
    block = np.asarray(a).reshape(_blocked(shape, padded))
    return np.ascontiguousarray(block[tuple(slice(0, n) for n in _blocked(shape, real))]).reshape(
        _concrete(shape, real))


# ----------------------------------------------------------------------------------------------
# Every case as the cells of its Structure.cells() (layers, directions, lengths, projection, CIFG,
# clip), each one direction of one layer scanned over time; the default structure is one cell.
#
# One compiled function per kind of cell, not per structure (why: oracles/cells.py, which chains
# the cells): one direction of one layer, outputs and vector-Jacobian product, is compiled once per
# variant, projected or not, and bucket of T, B, D, H and P; lengths, CIFG and the clip are traced,
# so the default structure shares the compilation of every unprojected cell. Padding is exact for the
# reasons the module docstring gives; in addition a padded projection row is zero, so a padded feature
# of h is 0, and its columns of R and of the next layer's W are zero.

#: The shape symbols of a cell's parameters: "4H" the gate blocks, "O" the features of h (P or H),
#: "D" the cell's input features (D, or dirs * O above the first layer).
_CELL_SHAPES: dict[str, tuple[str, ...]] = {
    "W": ("4H", "D"), "R": ("4H", "O"), "b": ("4H",), "p_i": ("H",), "p_f": ("H",), "p_o": ("H",),
    "gamma": ("5", "H"), "beta": ("5", "H"), "proj": ("O", "H")}
_SEQ, _H_STATE, _C_STATE = ("T", "B", "D"), ("B", "O"), ("B", "H")
_Y = ("T", "B", "O")

_CELL_JIT: list[Any] = [None]  # the jitted _direction_vjp, built on first use


def _direction(jax: Any, jnp: Any, variant: str, a: dict[str, Any], lengths: Any, H: Any, ln_eps: Any,
               cifg: Any, clip: Any):
    """One direction of one layer on padded arrays, forward in time: ``a`` holds the cell's parameters
    and ``x`` (T, B, D), ``h0``, ``c0``; -> y (T, B, O), h_T, c_T. Steps t >= lengths[b] keep the state
    and give y = 0. ``H`` (the real units, for LayerNorm), ``cifg`` (a bool) and ``clip`` (infinite:
    none) are traced, so that cells with and without them share a compilation."""
    norm = _masked_norm(jnp, a, H, ln_eps)
    valid = jnp.arange(a["x"].shape[0])[:, None] < lengths[None, :]  # (T, B)

    def step(carry, inputs):
        h, c = carry
        x_t, ok = inputs
        h_new, c_new = _cell(jnp, variant, a, x_t, h, c, norm, cifg=cifg, clip=clip)
        ok = ok[:, None]
        return (jnp.where(ok, h_new, h), jnp.where(ok, c_new, c)), jnp.where(ok, h_new, 0.0)

    (h, c), y = jax.lax.scan(step, (a["h0"], a["c0"]), (a["x"], valid))
    return y, h, c


def _direction_vjp(variant: str, a: dict[str, Any], scalars: tuple[Any, ...], upstream: tuple[Any, Any, Any]):
    """Outputs and the gradients of everything in ``a``, in one compiled call. Also the outputs alone
    (with zero upstream gradients): a second, forward-only function would be a second compilation per
    kind of cell, which costs more than the gradients of a few cells below the top layer."""
    jax, jnp = _jax()
    T, B, D = a["x"].shape
    _TRACES[(variant, "cell" + (" proj" if "proj" in a else ""), T, B, D, a["c0"].shape[-1])] += 1
    outputs, vjp = jax.vjp(lambda a: _direction(jax, jnp, variant, a, *scalars), a)
    (grads,) = vjp(upstream)
    return outputs, grads


def _cell_jit() -> Any:
    if _CELL_JIT[0] is None:
        jax, _ = _jax()
        _CELL_JIT[0] = jax.jit(_direction_vjp, static_argnames=("variant",))
    return _CELL_JIT[0]


def _layered_forward(jnp: Any, variant: str, structure: Structure, a: dict[str, Any], lengths: Any,
                     ln_eps: Any, clip: Any = None):
    """The eager baseline, op by op on the exact shapes (nothing compiled, slow):
    -> y (T, B, dirs * H_out), h_T, c_T ((L * dirs, B, .) when layered, else (B, .)).

    ``lengths`` (B,): steps t >= lengths[b] do not exist for row b; there the state is kept (a ``where``)
    and y is 0. The reverse direction reads each row's valid steps backwards through a per-row index
    gather, idx[s, b] = lengths[b] - 1 - s for s < lengths[b] (else s: a permutation of each row's
    steps), runs them like the forward direction, and gathers its outputs back with the same index.
    """
    T = a["x"].shape[0]
    s = jnp.arange(T)[:, None]  # (T, 1)
    valid = s < lengths[None, :]  # (T, B)
    idx = jnp.where(valid, lengths[None, :] - 1 - s, s)[:, :, None]  # (T, B, 1)
    inp = a["x"]
    h_T: list[Any] = []
    c_T: list[Any] = []
    for layer in range(structure.num_layers):
        ys = []
        for _layer, direction, prefix in structure.cells()[layer * structure.dirs : (layer + 1) * structure.dirs]:
            p = {k[len(prefix):]: v for k, v in a.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
            k = len(h_T)
            h, c = (a["h0"][k], a["c0"][k]) if structure.layered else (a["h0"], a["c0"])

            def norm(v, row, p=p):  # biased variance over the H units, eps inside the root
                mean = v.mean(axis=-1, keepdims=True)
                var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
                return (v - mean) / jnp.sqrt(var + ln_eps) * p["gamma"][row] + p["beta"][row]

            seq = jnp.take_along_axis(inp, idx, axis=0) if direction else inp
            outs = []
            for t in range(T):
                h_new, c_new = _cell(jnp, variant, p, seq[t], h, c, norm, cifg=structure.coupled_input_forget,
                                     clip=clip)
                ok = valid[t][:, None]
                h, c = jnp.where(ok, h_new, h), jnp.where(ok, c_new, c)
                outs.append(jnp.where(ok, h_new, 0.0))
            y = jnp.stack(outs)
            ys.append(jnp.take_along_axis(y, idx, axis=0) if direction else y)
            h_T.append(h)
            c_T.append(c)
        inp = jnp.concatenate(ys, axis=-1) if len(ys) > 1 else ys[0]
    if not structure.layered:
        return inp, h_T[0], c_T[0]
    return inp, jnp.stack(h_T), jnp.stack(c_T)


def _layered_eager(case: Case) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    jax, jnp = _jax()
    lengths = np.full(case.B, case.T, dtype=np.int64) if case.lengths is None else np.asarray(case.lengths, np.int64)
    fn = lambda a: _layered_forward(jnp, case.variant, case.structure, a, jnp.asarray(lengths),  # noqa: E731
                                    case.ln_eps, case.structure.cell_clip)
    outputs, vjp = jax.vjp(fn, {k: jnp.asarray(v) for k, v in case.arrays().items()})
    (grads,) = vjp(tuple(jnp.asarray(u) for u in case.upstream))
    return tuple(np.asarray(o) for o in outputs), {k: np.asarray(g) for k, g in grads.items()}


def _layered(case: Case) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    """A structured case, cell by cell (:func:`oracles.cells.run_by_cells`) through the compiled direction
    functions, each cell zero-padded to its buckets."""
    T, B, H = case.T, case.B, case.H
    lengths = np.full(B, T, dtype=np.int64) if case.lengths is None else np.asarray(case.lengths, np.int64)
    lens = np.concatenate([lengths, np.ones(bucket(B, FLOORS["B"]) - B, dtype=np.int64)])  # padded rows: 1 step
    clip = np.inf if case.structure.cell_clip is None else case.structure.cell_clip
    scalars = (lens, np.int64(H), np.float64(case.ln_eps), np.bool_(case.structure.coupled_input_forget),
               np.float64(clip))
    shapes = {"x": _SEQ, "h0": _H_STATE, "c0": _C_STATE, **_CELL_SHAPES}
    floors = {**FLOORS, "O": FLOORS["H"]}

    def cell(params: dict[str, np.ndarray], x: np.ndarray, h0: np.ndarray, c0: np.ndarray, upstream: Any
             ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]:
        real = {"T": T, "B": B, "D": x.shape[-1], "H": H, "O": h0.shape[-1]}
        padded = {k: bucket(n, floors[k]) for k, n in real.items()}
        a = {k: _pad(v, shapes[k], real, padded) for k, v in {**params, "x": x, "h0": h0, "c0": c0}.items()}
        # The outputs alone (upstream None): the same function with zero upstream gradients.
        zeros = (np.zeros(_concrete(_Y, padded)), np.zeros_like(a["h0"]), np.zeros_like(a["c0"]))
        up = zeros if upstream is None else tuple(
            _pad(u, shape, real, padded) for u, shape in zip(upstream, (_Y, _H_STATE, _C_STATE), strict=True))
        (y, h, c), g = _cell_jit()(case.variant, a, scalars, up)
        grads = {} if upstream is None else {k: _unpad(v, shapes[k], real, padded) for k, v in g.items()}
        outputs = (_unpad(y, _Y, real, padded), _unpad(h, _H_STATE, real, padded), _unpad(c, _C_STATE, real, padded))
        return outputs, grads

    return run_by_cells(case, cell)


class JaxCompositeOracle(Oracle):
    """Every variant in jax.numpy, float64, vector-Jacobian products by ``jax.vjp``.

    ``bucketed=False`` runs the same equations eagerly on the exact shapes (slow; the baseline).
    """

    name = "jax-composite"
    description = "LSTM equations in jax.numpy, float64 (jax_enable_x64), gradients by jax.vjp"
    variants = ("vanilla", "peephole", "layernorm")
    compute_dtypes = ("float64",)
    structures = frozenset(FEATURES)
    requires = ("jax", "jaxlib")
    setup_cost = 3.0  # importing JAX and compiling one function per kind of cell

    def __init__(self, *, bucketed: bool = True):
        if not isinstance(bucketed, bool):
            raise TypeError(f"bucketed: expected a bool, got {type(bucketed).__name__}")
        self.bucketed = bucketed

    def _probe(self) -> Availability:
        return module_available(*self.requires)

    def reference(self, case: Case) -> Reference:
        why = self.unsupported_reason(case.variant, case.dtype, case.structure)
        if why:
            raise ValueError(f"case: {why}")
        c = case.astype("float64")
        jax, _ = _jax()
        structured = not c.structure.is_default or c.lengths is not None
        with jax.default_device(jax.devices("cpu")[0]):
            (y, h_T, c_T), grads = (_layered if self.bucketed else _layered_eager)(c)
        if not self.bucketed:
            how = "eager on the exact shapes"
        elif structured:
            how = (f"{c.structure.describe() or 'lengths'}, cell by cell, each jit-compiled per kind of cell and "
                   f"zero-padded shape bucket (exact: padding adds only zeros)")
        else:
            how = "jit-compiled per zero-padded shape bucket (exact: padding adds only zeros)"
        keys = list(c.arrays()) if structured else gradient_keys(c.variant)
        return Reference(
            compute_dtype="float64",
            outputs={"y": y, "h_T": h_T, "c_T": c_T},
            gradients={k: grads[k] for k in keys},
            notes=f"jax.numpy in float64, {how}, jax.vjp",
        )
