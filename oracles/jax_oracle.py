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
two, at least :data:`FLOORS`), and one function per (variant, bucket) computes the outputs and the
vector-Jacobian product together; the results are sliced back to the real shapes. Every case with
T, D, H <= 16 and B <= 8 (the harness's default draws are smaller) falls in one bucket per variant, so
a whole Hypothesis run compiles once per variant; larger cases add one bucket per doubling.

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
* ``lax.scan`` runs over the bucketed T and keeps the carry (h, c) unchanged at steps t >= T (a
  ``where`` on the traced true T), so h_T and c_T are the states at the real T; the discarded
  branch gets a zero cotangent and every quantity in it is finite (x = 0 there, eps > 0 in the
  root), so it contributes exact zeros to the gradients.

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
from harness.contract import VARIANTS, ArraySpec, gradient_keys, input_specs, output_specs
from harness.structure import FEATURES, Structure
from oracles.base import Availability, Oracle, Reference, module_available

__all__ = ["JaxCompositeOracle", "FLOORS", "bucket", "bucket_sizes", "compilations"]

#: Smallest bucket per dimension. Above it a dimension is rounded up to the next power of two.
#: At these sizes a padded step costs microseconds, far less than a compilation (~0.5 s), so one
#: bucket that holds every default Hypothesis case is worth the wasted arithmetic.
FLOORS: dict[str, int] = {"T": 16, "B": 8, "D": 16, "H": 16}

#: How many times each (variant, T, B, D, H) bucket was traced, i.e. compiled. Tests read it.
_TRACES: Counter[tuple[str, int, int, int, int]] = Counter()

#: The same for structured cases: (variant, structure described, T, B, D, H) as compiled.
_STRUCTURED_TRACES: Counter[tuple[str, str, int, int, int, int]] = Counter()

_JITTED: Any = None  # the jitted bucketed function, built on first use (JAX is imported lazily)
_LAYERED_JIT: list[Any] = [None]  # the jitted function of structured cases, likewise


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
    return (sum(n for key, n in _TRACES.items() if variant is None or key[0] == variant)
            + sum(n for skey, n in _STRUCTURED_TRACES.items() if variant is None or skey[0] == variant))


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
          norm: Callable[[Any, int], Any], *, cifg: bool = False, clip: float | None = None) -> tuple[Any, Any]:
    """One step of the contract's equations: x_t (B, D), h (B, H_out), c (B, H) -> h_t, c_t.

    ``norm(v, k)`` is LayerNorm with row k of gamma and beta (rows i, f, g, o, c). ``p`` may hold
    ``proj`` (P, H): h_t = proj @ (o * tanh(c_t)). ``cifg``: f = 1 - i (the forget block is never
    read, so its gradient is exactly 0). ``clip``: c_t = clip(c_t, -clip, clip) by ``jnp.clip``, whose
    gradient is 0 where the value is cut (at exactly the boundary JAX splits it; the cases keep cells
    away from the boundary by a margin, so no cell sits there).
    """
    H = c.shape[-1]

    def sigmoid(v):
        return 0.5 * (1.0 + jnp.tanh(0.5 * v))

    def clipped(v):
        return v if clip is None else jnp.clip(v, -clip, clip)

    z = x_t @ p["W"].T + h @ p["R"].T  # (B, 4H)
    if variant != "layernorm":
        z = z + p["b"]
    z_i, z_f, z_g, z_o = (z[:, k * H : (k + 1) * H] for k in range(4))  # (B, H) each
    if variant == "vanilla":
        i, g = sigmoid(z_i), jnp.tanh(z_g)
        f = 1.0 - i if cifg else sigmoid(z_f)
        c = clipped(f * c + i * g)
        o = sigmoid(z_o)
    elif variant == "peephole":
        i = sigmoid(z_i + p["p_i"] * c)
        f = 1.0 - i if cifg else sigmoid(z_f + p["p_f"] * c)
        c = clipped(f * c + i * jnp.tanh(z_g))
        o = sigmoid(z_o + p["p_o"] * c)  # the output gate sees the new cell state
    else:
        i = sigmoid(norm(z_i, 0))
        f = 1.0 - i if cifg else sigmoid(norm(z_f, 1))
        g, o = jnp.tanh(norm(z_g, 2)), sigmoid(norm(z_o, 3))
        c = norm(f * c + i * g, 4)  # the normalized cell is carried forward
    h = o * jnp.tanh(c)
    if "proj" in p:
        h = h @ p["proj"].T
    return h, c


# ----------------------------------------------------------------------------------------------
# Eager, exact shapes: the baseline the bucketed path is tested against.


def _eager_forward(jnp: Any, variant: str, a: dict[str, Any], ln_eps: float):
    """-> y (T, B, H), h_T (B, H), c_T (B, H), a Python loop over t."""

    def norm(v, k):  # biased variance over the H units, eps inside the root
        mean = v.mean(axis=-1, keepdims=True)
        var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
        return (v - mean) / jnp.sqrt(var + ln_eps) * a["gamma"][k] + a["beta"][k]

    h, c = a["h0"], a["c0"]
    ys = []
    for t in range(a["x"].shape[0]):
        h, c = _cell(jnp, variant, a, a["x"][t], h, c, norm)
        ys.append(h)
    return jnp.stack(ys), h, c


def _eager(case: Case) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    jax, jnp = _jax()
    arrays = {k: jnp.asarray(v) for k, v in case.arrays().items()}
    outputs, vjp = jax.vjp(lambda a: _eager_forward(jnp, case.variant, a, case.ln_eps), arrays)
    (grads,) = vjp(tuple(jnp.asarray(u) for u in case.upstream))
    return tuple(np.asarray(o) for o in outputs), {k: np.asarray(g) for k, g in grads.items()}


# ----------------------------------------------------------------------------------------------
# Bucketed: zero-padded to a bucket, one compiled function per (variant, bucket).


def _padded_forward(jax: Any, jnp: Any, variant: str, a: dict[str, Any], T: Any, H: Any, ln_eps: Any):
    """The equations on padded arrays; ``T`` and ``H`` are the true sizes, traced scalars."""
    Hb = a["h0"].shape[1]
    unit = jnp.arange(Hb) < H  # (Hb,) the real units
    n_units = H.astype(a["h0"].dtype)

    def norm(v, k):  # statistics over the real units only; padded units have gamma = beta = 0
        mean = jnp.where(unit, v, 0.0).sum(axis=-1, keepdims=True) / n_units
        dev = jnp.where(unit, v - mean, 0.0)
        var = (dev * dev).sum(axis=-1, keepdims=True) / n_units
        return dev / jnp.sqrt(var + ln_eps) * a["gamma"][k] + a["beta"][k]

    def step(carry, inputs):
        h, c = carry
        x_t, t = inputs
        h_new, c_new = _cell(jnp, variant, a, x_t, h, c, norm)
        live = t < T  # steps past the true T leave the state as it was
        h, c = jnp.where(live, h_new, h), jnp.where(live, c_new, c)
        return (h, c), h

    Tb = a["x"].shape[0]
    (h, c), y = jax.lax.scan(step, (a["h0"], a["c0"]), (a["x"], jnp.arange(Tb)))
    return y, h, c


def _bucketed_vjp(variant: str, arrays: dict[str, Any], upstream: tuple[Any, Any, Any], T: Any, H: Any,
                  ln_eps: Any):
    """Outputs and input/parameter gradients, in one compiled call."""
    jax, jnp = _jax()
    Tb, Bb, Db = arrays["x"].shape
    _TRACES[(variant, Tb, Bb, Db, arrays["h0"].shape[1])] += 1  # runs once per trace, i.e. per compile
    outputs, vjp = jax.vjp(lambda a: _padded_forward(jax, jnp, variant, a, T, H, ln_eps), arrays)
    (grads,) = vjp(upstream)
    return outputs, grads


def _jitted() -> Any:
    global _JITTED
    if _JITTED is None:
        jax, _ = _jax()
        _JITTED = jax.jit(_bucketed_vjp, static_argnames=("variant",))
    return _JITTED


def _blocked(spec: ArraySpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape of ``spec`` with every (4H) axis split into its gate blocks (4, H)."""
    out: list[int] = []
    for s in spec.shape:
        if s == "4H":
            out += [4, sizes["H"]]
        else:
            out.append(sizes[s] if s in sizes else int(s))
    return tuple(out)


def _pad(a: np.ndarray, spec: ArraySpec, real: dict[str, int], padded: dict[str, int]) -> np.ndarray:
    out = np.zeros(_blocked(spec, padded), dtype=np.float64)
    shape = _blocked(spec, real)
    out[tuple(slice(0, size) for size in shape)] = a.reshape(shape)
    return out.reshape(spec.concrete_shape(**padded))


def _unpad(a: Any, spec: ArraySpec, real: dict[str, int], padded: dict[str, int]) -> np.ndarray:
    block = np.asarray(a).reshape(_blocked(spec, padded))
    return np.ascontiguousarray(block[tuple(slice(0, n) for n in _blocked(spec, real))]).reshape(
        spec.concrete_shape(**real))


def _bucketed(case: Case) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    _jax()
    real = {"T": case.T, "B": case.B, "D": case.D, "H": case.H}
    padded = bucket_sizes(**real)
    specs = {s.name: s for s in input_specs() + VARIANTS[case.variant].params}
    arrays = {k: _pad(v, specs[k], real, padded) for k, v in case.arrays().items()}
    outs = output_specs()
    upstream = tuple(_pad(u, s, real, padded) for u, s in zip(case.upstream, outs, strict=True))
    outputs, grads = _jitted()(case.variant, arrays, upstream, np.int64(case.T), np.int64(case.H),
                               np.float64(case.ln_eps))
    return (tuple(_unpad(o, s, real, padded) for o, s in zip(outputs, outs, strict=True)),
            {k: _unpad(g, specs[k], real, padded) for k, g in grads.items()})


# ----------------------------------------------------------------------------------------------
# A layer structure (layers, directions, lengths, projection, CIFG, clip): the cells of
# Structure.cells() around the same step, scanned over time; bucketed in T and B only.


def _layered_forward(jax: Any, jnp: Any, variant: str, structure: Structure, a: dict[str, Any], lengths: Any,
                     ln_eps: Any, clip: Any = None, *, scan: bool = True):
    """-> y (T, B, dirs * H_out), h_T, c_T ((L * dirs, B, .) when layered, else (B, .)).

    ``lengths`` (B,): steps t >= lengths[b] do not exist for row b; there the state is kept (a ``where``)
    and y is 0. The reverse direction reads each row's valid steps backwards through a per-row index
    gather, idx[s, b] = lengths[b] - 1 - s for s < lengths[b] (else s: a permutation of each row's
    steps), scans them like the forward direction, and gathers its outputs back with the same index.
    ``scan=False`` loops over the steps in Python (the eager baseline: op by op, nothing compiled).
    ``clip``: the cell clip (a traced scalar, so that every clip value shares one compilation), or None;
    ``structure.cell_clip`` is not read.
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
            h0, c0 = (a["h0"][k], a["c0"][k]) if structure.layered else (a["h0"], a["c0"])

            def norm(v, row, p=p):  # biased variance over the H units, eps inside the root
                mean = v.mean(axis=-1, keepdims=True)
                var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
                return (v - mean) / jnp.sqrt(var + ln_eps) * p["gamma"][row] + p["beta"][row]

            def step(carry, inputs, p=p, norm=norm):
                h, c = carry
                x_t, ok = inputs
                h_new, c_new = _cell(jnp, variant, p, x_t, h, c, norm, cifg=structure.coupled_input_forget,
                                     clip=clip)
                ok = ok[:, None]
                return (jnp.where(ok, h_new, h), jnp.where(ok, c_new, c)), jnp.where(ok, h_new, 0.0)

            seq = jnp.take_along_axis(inp, idx, axis=0) if direction else inp
            if scan:
                (h, c), y = jax.lax.scan(step, (h0, c0), (seq, valid))
            else:
                carry, outs = (h0, c0), []
                for t in range(T):
                    carry, out = step(carry, (seq[t], valid[t]))
                    outs.append(out)
                (h, c), y = carry, jnp.stack(outs)
            ys.append(jnp.take_along_axis(y, idx, axis=0) if direction else y)
            h_T.append(h)
            c_T.append(c)
        inp = jnp.concatenate(ys, axis=-1) if len(ys) > 1 else ys[0]
    if not structure.layered:
        return inp, h_T[0], c_T[0]
    return inp, jnp.stack(h_T), jnp.stack(c_T)


def _layered_vjp(variant: str, structure: Structure, arrays: dict[str, Any], upstream: tuple[Any, Any, Any],
                 lengths: Any, ln_eps: Any, clip: Any):
    jax, jnp = _jax()
    T, B, D = arrays["x"].shape
    shown = structure.describe() + (" clip" if clip is not None else "")
    _STRUCTURED_TRACES[(variant, shown, T, B, D, arrays["c0"].shape[-1])] += 1
    outputs, vjp = jax.vjp(lambda a: _layered_forward(jax, jnp, variant, structure, a, lengths, ln_eps, clip),
                           arrays)
    (grads,) = vjp(upstream)
    return outputs, grads


def _layered(case: Case, *, bucketed: bool) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    """A structured case, eager on its exact shapes, or compiled per (variant, structure, bucket of T
    and B, D, H): padded steps are steps past every row's length; padded rows (length 1, zero inputs,
    states and cotangents) are independent of the real ones and add exact zeros to the gradients."""
    jax, jnp = _jax()
    T, B = case.T, case.B
    lengths = np.full(B, T, dtype=np.int64) if case.lengths is None else np.asarray(case.lengths, np.int64)
    arrays, upstream = case.arrays(), case.upstream
    if not bucketed:
        fn = lambda a: _layered_forward(jax, jnp, case.variant, case.structure, a, jnp.asarray(lengths),  # noqa: E731
                                        case.ln_eps, case.structure.cell_clip, scan=False)
        outputs, vjp = jax.vjp(fn, {k: jnp.asarray(v) for k, v in arrays.items()})
        (grads,) = vjp(tuple(jnp.asarray(u) for u in upstream))
        return tuple(np.asarray(o) for o in outputs), {k: np.asarray(g) for k, g in grads.items()}
    Tb, Bb = bucket(T, FLOORS["T"]), bucket(B, FLOORS["B"])

    def pad(a: np.ndarray, t_axis: int | None) -> np.ndarray:  # zeros after the real steps and rows
        widths = [(0, 0)] * a.ndim
        if t_axis is not None:
            widths[t_axis] = (0, Tb - T)
        widths[-2] = (0, Bb - B)  # every batched array has its rows second last
        return np.pad(a, widths)

    padded = {k: (pad(v, 0) if k == "x" else pad(v, None) if k in ("h0", "c0") else v) for k, v in arrays.items()}
    up = (pad(upstream[0], 0), pad(upstream[1], None), pad(upstream[2], None))
    lens = np.concatenate([lengths, np.ones(Bb - B, dtype=np.int64)])
    if _LAYERED_JIT[0] is None:
        _LAYERED_JIT[0] = jax.jit(_layered_vjp, static_argnames=("variant", "structure"))
    clip = case.structure.cell_clip
    static = case.structure.replace(cell_clip=None)  # the clip's value is traced: one compilation for all
    outputs, grads = _LAYERED_JIT[0](case.variant, static, padded, up, lens, np.float64(case.ln_eps),
                                     None if clip is None else np.float64(clip))

    def cut(a: Any, t_axis: int | None) -> np.ndarray:
        a = np.asarray(a)
        index: list[slice] = [slice(None)] * a.ndim
        if t_axis is not None:
            index[t_axis] = slice(0, T)
        index[-2] = slice(0, B)
        return np.ascontiguousarray(a[tuple(index)])

    y, h_T, c_T = outputs
    out = (cut(y, 0), cut(h_T, None), cut(c_T, None))
    return out, {k: (cut(g, 0) if k == "x" else cut(g, None) if k in ("h0", "c0") else np.asarray(g))
                 for k, g in grads.items()}


class JaxCompositeOracle(Oracle):
    """Every variant in jax.numpy, float64, vector-Jacobian products by ``jax.vjp``.

    ``bucketed=False`` runs the same equations eagerly on the exact shapes (slow; the baseline).
    """

    name = "jax-composite"
    description = "LSTM equations in jax.numpy, float64 (jax_enable_x64), gradients by jax.vjp"
    variants = ("vanilla", "peephole", "layernorm")
    compute_dtypes = ("float64",)
    structures = frozenset(FEATURES)

    def __init__(self, *, bucketed: bool = True):
        if not isinstance(bucketed, bool):
            raise TypeError(f"bucketed: expected a bool, got {type(bucketed).__name__}")
        self.bucketed = bucketed

    def _probe(self) -> Availability:
        return module_available("jax", "jaxlib")

    def reference(self, case: Case) -> Reference:
        why = self.unsupported_reason(case.variant, case.dtype, case.structure)
        if why:
            raise ValueError(f"case: {why}")
        c = case.astype("float64")
        jax, _ = _jax()
        structured = not c.structure.is_default or c.lengths is not None
        with jax.default_device(jax.devices("cpu")[0]):
            if structured:
                (y, h_T, c_T), grads = _layered(c, bucketed=self.bucketed)
            else:
                (y, h_T, c_T), grads = (_bucketed if self.bucketed else _eager)(c)
        if not self.bucketed:
            how = "eager on the exact shapes"
        elif structured:
            how = (f"{c.structure.describe() or 'lengths'}, jit-compiled per structure and bucket of T and B "
                   f"(exact: padded steps and rows add only zeros)")
        else:
            how = "jit-compiled per zero-padded shape bucket (exact: padding adds only zeros)"
        keys = list(c.arrays()) if structured else gradient_keys(c.variant)
        return Reference(
            compute_dtype="float64",
            outputs={"y": y, "h_T": h_T, "c_T": c_T},
            gradients={k: grads[k] for k in keys},
            notes=f"jax.numpy in float64, {how}, jax.vjp",
        )
