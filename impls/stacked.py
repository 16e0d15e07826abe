"""The fast LSTM: stacked GEMMs and in-place gate math on preallocated buffers, over any array namespace.

Forward: the input projection of every timestep is one (T*B, D) x (D, 4H) GEMM; each step adds one
(B, H) x (H, 4H) recurrent GEMM and applies the gate nonlinearities in place.
Backward: the time loop only propagates the pre-activation gradients (one (B, 4H) x (4H, H) GEMM a
step); after the loop, dx is a single large GEMM over all timesteps and dW, dR one per gate block
(written straight into the canonical gate order), and the variants' own parameter gradients are
reductions over all T*B rows at once.

The algorithm (:func:`stacked_forward`, :func:`stacked_backward`) is shared by every variant and is
written against an *array namespace* ``xp``: NumPy here (its large buffers kept from call to call,
``impls/workspace.py``), CuPy for the GPU version. It uses only what
both provide (``matmul`` and ufuncs with ``out=``, ``empty``, ``sum``/``mean`` with ``axis``,
``reshape`` of contiguous buffers). What differs between variants is the pointwise gate math of one
step, which lives in a :class:`Cell`: ``forward_step`` and ``backward_step`` are small functions of
slices of the buffers, so a GPU version replaces each by one fused kernel and keeps everything else.
The vanilla cell is here; the peephole and LayerNorm cells are in ``impls/peephole.py`` and
``impls/layernorm.py``, next to their readable loop versions.

Internally the gate blocks are kept in the order i, f, o, g so that the three sigmoids are one
contiguous (B, 3H) slice; the canonical order i, f, g, o is restored at the boundary.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.contract import DEFAULT_LN_EPS
from harness.layouts import CANONICAL_ORDER, permute_gates
from harness.structure import FEATURES
from impls.layer import LayeredLSTM
from impls.workspace import POOLED_NUMPY

__all__ = [
    "StackedLSTM",
    "Cell",
    "VanillaCell",
    "StackedCache",
    "stacked_forward",
    "stacked_backward",
    "weight_grad",
    "INTERNAL_ORDER",
    "to_internal",
    "to_canonical",
    "sigmoid_",
    "sigmoid_halves",
    "activate_halved_",
    "tanh_slope",
    "times_sigmoid_slope_",
    "gate_views",
]

#: The gate order of the stacked buffers: the three sigmoid gates first, as one contiguous (B, 3H) slice.
INTERNAL_ORDER = "ifog"


def to_internal(xp: Any, stacked: Any) -> Any:
    """Canonical (4H, ...) in i, f, g, o -> the internal order i, f, o, g, on ``xp``'s device."""
    return permute_gates(stacked, CANONICAL_ORDER, INTERNAL_ORDER, xp=xp)


def to_canonical(xp: Any, stacked: Any) -> Any:
    """Internal (4H, ...) in i, f, o, g -> the canonical order i, f, g, o, on ``xp``'s device."""
    return permute_gates(stacked, INTERNAL_ORDER, CANONICAL_ORDER, xp=xp)


def sigmoid_(xp: Any, a: Any) -> Any:
    """In-place sigmoid via 0.5 * (1 + tanh(a / 2)), which never overflows."""
    a *= 0.5
    xp.tanh(a, out=a)
    a += 1.0
    a *= 0.5
    return a


def sigmoid_halves(xp: Any, H: int, dtype: Any) -> tuple[Any, Any]:
    """(half, shift), each (4H,) in the internal order: 0.5 on the sigmoid gates i, f, o, (1, 0) on g.

    The sigmoid is 0.5 * tanh(v / 2) + 0.5. A cell folds ``half`` into what produces its pre-activations
    (the weights and bias, or LayerNorm's gain and shift), so the pre-activations of i, f, o arrive
    already halved; :func:`activate_halved_` then finishes all four gates in three passes over the whole
    contiguous (B, 4H) block. Halving is exact in binary floating point, so the folded products carry
    the same bits as halving afterwards (barring subnormal numbers, and a sum that overflowed only
    unhalved; a g of -0.0 comes out +0.0).
    """
    half, shift = xp.empty(4 * H, dtype), xp.empty(4 * H, dtype)
    half[: 3 * H], half[3 * H :] = 0.5, 1.0
    shift[: 3 * H], shift[3 * H :] = 0.5, 0.0
    return half, shift


def activate_halved_(xp: Any, a: Any, half: Any, shift: Any) -> Any:
    """In place on a (B, 4H) block in the internal order whose i, f, o rows arrive halved
    (:func:`sigmoid_halves`): i, f, o = sigmoid, g = tanh, as tanh(a) * half + shift.

    One tanh and two broadcast passes over the contiguous block; halving and shifting the (B, 3H)
    column slice of i, f, o instead costs three passes over a strided view, each about three times
    slower per element than a contiguous one.
    """
    xp.tanh(a, out=a)
    a *= half
    a += shift
    return a


def times_sigmoid_slope_(xp: Any, out: Any, s: Any, tmp: Any) -> Any:
    """out *= s * (1 - s) in place, for s a sigmoid's output: out *= s, then out *= 1 - s (tmp: scratch)."""
    out *= s
    xp.subtract(1.0, s, out=tmp)
    out *= tmp
    return out


def tanh_slope(xp: Any, v: Any, out: Any) -> Any:
    """out = 1 - v * v: the slope of tanh where it gives v."""
    xp.multiply(v, v, out=out)
    xp.subtract(1.0, out, out=out)
    return out


def gate_views(a: Any, H: int) -> tuple[Any, Any, Any, Any]:
    """(B, 4H) in the internal order -> the four (B, H) views i, f, o, g."""
    return a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]


@dataclass
class StackedCache:
    """What the forward keeps for the backward. ``h`` and ``c`` hold the initial state at index 0.

    ``gates`` (T, B, 4H) holds the gate activations i, f, o, g of every step (the pre-activations
    until the step's gate math overwrote them); ``saved`` the cell's own per-step arrays.
    """

    x: Any  # (T, B, D)
    W: Any  # (4H, D), internal gate order
    R: Any  # (4H, H_out), internal gate order
    P: dict[str, Any]  # the cell's own parameters, internal layout
    h: Any  # (T + 1, B, H_out)
    c: Any  # (T + 1, B, H)
    gates: Any  # (T, B, 4H)
    saved: dict[str, Any] = field(default_factory=dict)
    #: With a projection: proj (P, H) and o * tanh(c_t) of every step (T, B, H), which it projects.
    proj: Any = None
    m: Any = None


class Cell:
    """The pointwise math of one variant, for the stacked algorithm.

    A GPU version overrides ``forward_step`` and ``backward_step`` with one fused kernel each, and
    ``step`` and ``step_backward`` (a step's GEMM plus its gate math) so that the kernel also does
    the step's one remaining addition; the other methods only allocate, reorder and reduce, and work
    over any array namespace.
    """

    #: Whether the variant has a bias ``b`` (added once to the input projection of all steps).
    has_bias = True
    #: Canonical names of the cell's own parameters (beyond W, R and b).
    param_names: tuple[str, ...] = ()
    #: CIFG: f = 1 - i (the forget gate's pre-activation is computed but unused; its gradient is 0).
    coupled: bool = False
    #: Cell clipping: c_t is clipped to [-clip, clip]; no gradient passes a clipped element.
    clip: float | None = None

    def with_options(self, *, coupled: bool, clip: float | None) -> Cell:
        """A copy of this cell computing CIFG and clipping as given (the GPU cells compute neither)."""
        cell = copy.copy(self)
        cell.coupled, cell.clip = coupled, clip
        return cell

    def couple_(self, xp: Any, i: Any, f: Any) -> None:
        """CIFG, in place after the gates' nonlinearities: f = 1 - i."""
        if self.coupled:
            xp.subtract(1.0, i, out=f)

    def clip_(self, xp: Any, c: Any) -> None:
        """Cell clipping, in place on the new cell state c_t."""
        if self.clip is not None:
            xp.clip(c, -self.clip, self.clip, out=c)

    def clip_backward_(self, xp: Any, dc: Any, c: Any) -> None:
        """dL/dc_t *= 1 where c_t is inside (-clip, clip), 0 where it was clipped (it sits on the bound)."""
        if self.clip is not None:
            dc *= xp.abs(c) < c.dtype.type(self.clip)  # the bound as c holds it (in float32, 0.7 is 0.69999999)

    def couple_backward_(self, di: Any, df: Any) -> None:
        """CIFG backwards on the gradients of the gates i and f: what reaches f = 1 - i reaches i, negated."""
        if self.coupled:
            di -= df
            df[...] = 0.0

    def prepare(self, xp: Any, params: Mapping[str, Any], dtype: Any, *, ln_eps: float) -> dict[str, Any]:
        """The cell's own parameters, converted to ``xp`` and the internal layout (and constants)."""
        return {}

    def input_scale(self, P: Mapping[str, Any]) -> Any:
        """A factor per pre-activation row, (4H,) in the internal order, or None for none.

        The stacked algorithm applies it to the forward's copies of W, R^T and b (the backward's
        W and R stay as they are), so the pre-activations ``forward_step`` receives arrive scaled: the
        vanilla cell takes its sigmoid gates halved (:func:`sigmoid_halves`). P is what :meth:`prepare`
        returned.
        """
        return None

    def forward_buffers(self, xp: Any, T: int, B: int, H: int, dtype: Any) -> dict[str, Any]:
        """Arrays the forward writes: per-step ones (leading axis T) the backward reads, and scratch
        (names starting with ``tmp``)."""
        return {}

    def backward_buffers(self, xp: Any, T: int, B: int, H: int, dtype: Any) -> dict[str, Any]:
        """Arrays the backward writes: scratch (names starting with ``tmp``), and per-step ones for the
        reductions after the loop."""
        return {}

    def forward_step(self, xp, t, a, c_prev, c, h, S, P) -> None:
        """Step t. a (B, 4H): pre-activations in (times :meth:`input_scale`), activations i, f, o, g
        out (in place).

        c_prev (B, H) is read; c, h (B, H) are written; S holds the forward buffers, P the cell's
        parameters.
        """
        raise NotImplementedError

    def backward_step(self, xp, t, dh, dc, da, a, c_prev, c, S, G, P) -> None:
        """Step t backwards. dh (B, H): all of dL/dh_t; dc (B, H): dL/dc_t from step t+1.

        Writes da (B, 4H), the gradient of the pre-activations (internal order), and turns dc into
        dL/dc_{t-1} in place. ``a`` holds the step's activations; G the backward buffers.
        """
        raise NotImplementedError

    def param_grads(self, xp, cache: StackedCache, da, G) -> dict[str, Any]:
        """The cell's own parameter gradients (canonical layout), reduced after the time loop."""
        return {}

    def transposed(self, xp: Any, a: Any, scale: Any = None) -> Any:
        """``a.T`` (a 2-D array) as a new C-contiguous array: R^T for the forward's per-step GEMM;
        with ``scale`` (one factor per row of ``a``), ``(a * scale[:, None]).T``.

        NumPy's own copy of a transposed view walks one side with a stride of a whole row, which for
        (4H, H) weights at H = 512 costs as much as several steps' GEMMs; copying bands of 16 rows
        keeps both sides in cache (about 2.5x faster). A GPU cell overrides this with one copy.
        """
        out = xp.empty(a.shape[::-1], a.dtype)
        for k in range(0, a.shape[0], 16):
            out[:, k : k + 16] = a[k : k + 16].T
        if scale is not None:
            out *= scale  # a contiguous pass: faster than scaling each band as it is copied
        return out

    def forward_loop(self, xp, gates, rec, h, RT, c, S, P) -> None:
        """The forward time loop: :meth:`step` for t = 0 .. T-1.

        gates (T, B, 4H) holds the input projections (activations once a step is done); h, c
        (T+1, B, H) hold h0, c0 in row 0 and receive h_t, c_t in row t+1; rec (B, 4H) is scratch.
        A GPU cell overrides this to launch a precomputed plan instead of slicing views each step.
        """
        for t in range(gates.shape[0]):
            self.step(xp, t, gates[t], rec, h[t], RT, c[t], c[t + 1], h[t + 1], S, P)

    def backward_loop(self, xp, dy, dh, dc, da, gates, c, R, S, G, P) -> None:
        """The backward time loop: :meth:`step_backward` for t = T-1 .. 0.

        dh, dc (B, H) enter holding dh_T, dc_T and leave holding dh0, dc0; da (T, B, 4H) receives
        the gradients of the pre-activations.
        """
        for t in reversed(range(gates.shape[0])):
            self.step_backward(xp, t, dy[t], dh, dc, da[t], gates[t], c[t], c[t + 1], R, S, G, P)

    def step(self, xp, t, a, rec, h_prev, RT, c_prev, c, h, S, P) -> None:
        """Forward step t: a += h_{t-1} @ R^T (one GEMM into the scratch rec (B, 4H)), then the gate math.

        a (B, 4H) holds the step's input projection on entry. A GPU cell overrides this to add ``rec``
        inside its fused gate kernel rather than in a pass of its own.
        """
        xp.matmul(h_prev, RT, out=rec)  # (B, H) @ (H, 4H)
        a += rec
        self.forward_step(xp, t, a, c_prev, c, h, S, P)

    def step_backward(self, xp, t, dy_t, dh, dc, da, a, c_prev, c, R, S, G, P) -> None:
        """Backward step t: dh += dy_t, the gate math backwards, then dh = da @ R, which is dL/dh_{t-1}.

        On entry dh (B, H) holds what step t+1 sent back to h_t; dy_t (B, H) is the upstream gradient
        of y_t. A GPU cell overrides this to add dy_t inside its fused kernel.
        """
        dh += dy_t
        self.backward_step(xp, t, dh, dc, da, a, c_prev, c, S, G, P)
        xp.matmul(da, R, out=dh)  # (B, 4H) @ (4H, H) -> (B, H)


class VanillaCell(Cell):
    """a_t = W x_t + R h_{t-1} + b; i, f, o = sigmoid; g = tanh; c_t = f c + i g; h_t = o tanh(c_t).

    Its pre-activations arrive with i, f, o halved (:meth:`input_scale`, :func:`sigmoid_halves`).
    """

    def prepare(self, xp: Any, params: Mapping[str, Any], dtype: Any, *, ln_eps: float) -> dict[str, Any]:
        half, shift = sigmoid_halves(xp, params["W"].shape[0] // 4, dtype)
        return {"half": half, "shift": shift}

    def input_scale(self, P: Mapping[str, Any]) -> Any:
        return P["half"]

    def forward_buffers(self, xp: Any, T: int, B: int, H: int, dtype: Any) -> dict[str, Any]:
        return {"tanh_c": xp.empty((T, B, H), dtype), "tmp": xp.empty((B, H), dtype)}

    def backward_buffers(self, xp: Any, T: int, B: int, H: int, dtype: Any) -> dict[str, Any]:
        return {"tmp": xp.empty((B, H), dtype), "tmp3": xp.empty((B, 3 * H), dtype)}

    def forward_step(self, xp, t, a, c_prev, c, h, S, P) -> None:
        H = c.shape[1]
        activate_halved_(xp, a, P["half"], P["shift"])
        i, f, o, g = gate_views(a, H)
        self.couple_(xp, i, f)
        xp.multiply(f, c_prev, out=c)  # c_t = f * c_{t-1} + i * g
        c += xp.multiply(i, g, out=S["tmp"])
        self.clip_(xp, c)
        xp.tanh(c, out=S["tanh_c"][t])
        xp.multiply(o, S["tanh_c"][t], out=h)  # h_t = o * tanh(c_t)

    def backward_step(self, xp, t, dh, dc, da, a, c_prev, c, S, G, P) -> None:
        H = c.shape[1]
        i, f, o, g = gate_views(a, H)
        di, df, do, dg = gate_views(da, H)
        tanh_c = S["tanh_c"][t]
        tmp = G["tmp"]
        # dc += dh * o * (1 - tanh_c^2): c_t is reached directly and through h_t.
        tanh_slope(xp, tanh_c, out=tmp)
        tmp *= o
        tmp *= dh
        dc += tmp
        self.clip_backward_(xp, dc, c)
        # d(pre-activation) = d(gate) * gate'(.); the sigmoid gates' slopes s * (1 - s) are applied to
        # the contiguous (B, 3H) block i, f, o at once.
        xp.multiply(dc, g, out=di)
        xp.multiply(dc, c_prev, out=df)
        self.couple_backward_(di, df)
        xp.multiply(dh, tanh_c, out=do)
        times_sigmoid_slope_(xp, da[:, : 3 * H], a[:, : 3 * H], G["tmp3"])
        xp.multiply(dc, i, out=dg)
        dg *= tanh_slope(xp, g, out=tmp)
        dc *= f  # dL/dc_{t-1}


def stacked_forward(
    xp: Any, cell: Cell, x, h0, c0, params: Mapping[str, Any], dtype: Any, *, ln_eps: float = DEFAULT_LN_EPS
):
    """-> y (T, B, H_out), h_T (B, H_out), c_T (B, H), cache. Inputs may be NumPy; they are moved to ``xp``.

    H_out is H, or P with a projection ``params["proj"]`` (P, H): h_t = proj (o * tanh(c_t)).
    """
    x = xp.asarray(x, dtype=dtype)
    T, B, D = x.shape
    H, H_out = c0.shape[1], h0.shape[1]
    W = to_internal(xp, xp.asarray(params["W"], dtype=dtype))  # (4H, D)
    R = to_internal(xp, xp.asarray(params["R"], dtype=dtype))  # (4H, H_out)
    P = cell.prepare(xp, params, dtype, ln_eps=ln_eps)
    scale = cell.input_scale(P)  # (4H,) or None; the backward's W and R stay unscaled
    # (H_out, 4H), C-contiguous (the per-step GEMM is faster than with R.T), times the cell's scale
    RT = cell.transposed(xp, R, scale)

    # All input projections at once: (T*B, D) @ (D, 4H) -> (T, B, 4H); becomes the gate buffer.
    W_in = W if scale is None else xp.multiply(W, scale[:, None], out=xp.empty(W.shape, dtype))
    gates = xp.empty((T, B, 4 * H), dtype)
    xp.matmul(x.reshape(T * B, D), W_in.T, out=gates.reshape(T * B, 4 * H))
    if cell.has_bias:
        b = to_internal(xp, xp.asarray(params["b"], dtype=dtype))  # (4H,)
        gates += b if scale is None else b * scale
    h = xp.empty((T + 1, B, H_out), dtype)  # h[0] = h0, h[t+1] = h_t
    c = xp.empty((T + 1, B, H), dtype)
    h[0] = xp.asarray(h0, dtype=dtype)
    c[0] = xp.asarray(c0, dtype=dtype)
    S = cell.forward_buffers(xp, T, B, H, dtype)
    rec = xp.empty((B, 4 * H), dtype)
    cache = StackedCache(x, W, R, P, h, c, gates, S)
    if "proj" not in params:
        cell.forward_loop(xp, gates, rec, h, RT, c, S, P)
    else:
        cache.proj = xp.asarray(params["proj"], dtype=dtype)  # (P, H)
        projT = cell.transposed(xp, cache.proj)  # (H, P)
        cache.m = m = xp.empty((T, B, H), dtype)
        for t in range(T):
            cell.step(xp, t, gates[t], rec, h[t], RT, c[t], c[t + 1], m[t], S, P)  # m_t = o * tanh(c_t)
            xp.matmul(m[t], projT, out=h[t + 1])  # h_t = proj m_t: (B, H) @ (H, P)
    y = xp.empty((T, B, H_out), dtype)
    y[...] = h[1:]
    return y, h[T].copy(), c[T].copy(), cache


def weight_grad(xp: Any, da2: Any, inputs: Any) -> Any:
    """da2^T @ inputs, (4H, T*B) @ (T*B, K) -> (4H, K), with the gate blocks in the canonical order.

    One GEMM per gate, each reading its (T*B, H) column block of da2 in place and writing its rows of
    the canonical result, so that no (4H, K) gradient is copied afterwards only to reorder it.
    """
    H = da2.shape[1] // 4
    out = xp.empty((4 * H, inputs.shape[1]), da2.dtype)
    for k, gate in enumerate(INTERNAL_ORDER):
        row = CANONICAL_ORDER.index(gate) * H
        xp.matmul(da2[:, k * H : (k + 1) * H].T, inputs, out=out[row : row + H])
    return out


def stacked_backward(xp: Any, cell: Cell, dy, dh_T, dc_T, cache: StackedCache):
    """-> {"x": dx, "h0": dh0, "c0": dc0, "W": dW, "R": dR, ...} in the canonical layout."""
    x, R, h, c, gates = cache.x, cache.R, cache.h, cache.c, cache.gates
    T, B, D = x.shape
    H, H_out = c.shape[2], h.shape[2]
    dtype = x.dtype
    dy = xp.asarray(dy, dtype=dtype)
    dh, dc = xp.empty(h.shape[1:], dtype), xp.empty(c.shape[1:], dtype)  # (B, H_out), (B, H): from xp.empty
    dh[...], dc[...] = dh_T, dc_T
    da = xp.empty((T, B, 4 * H), dtype)  # gradients of the pre-activations, internal order
    G = cell.backward_buffers(xp, T, B, H, dtype)
    if cache.proj is None:
        cell.backward_loop(xp, dy, dh, dc, da, gates, c, R, cache.saved, G, cache.P)
    else:
        dh_all = xp.empty((T, B, H_out), dtype)  # dL/dh_t of every step, for dproj
        dm = xp.empty((B, H), dtype)
        for t in reversed(range(T)):
            xp.add(dh, dy[t], out=dh_all[t])  # dL/dh_t: from y_t and from step t+1
            xp.matmul(dh_all[t], cache.proj, out=dm)  # dL/dm_t: (B, P) @ (P, H)
            cell.backward_step(xp, t, dm, dc, da[t], gates[t], c[t], c[t + 1], cache.saved, G, cache.P)
            xp.matmul(da[t], R, out=dh)  # (B, 4H) @ (4H, P) -> dL/dh_{t-1}
    da2 = da.reshape(T * B, 4 * H)
    dx = xp.empty((T, B, D), dtype)
    xp.matmul(da2, cache.W, out=dx.reshape(T * B, D))  # (T*B, 4H) @ (4H, D)
    dW = weight_grad(xp, da2, x.reshape(T * B, D))  # (4H, T*B) @ (T*B, D)
    dR = weight_grad(xp, da2, h[:T].reshape(T * B, H_out))  # (4H, T*B) @ (T*B, H_out)
    grads = {"x": dx, "h0": dh, "c0": dc, "W": dW, "R": dR}
    if cell.has_bias:
        grads["b"] = to_canonical(xp, da2.sum(axis=0))
    grads.update(cell.param_grads(xp, cache, da, G))
    if cache.proj is not None:
        grads["proj"] = dh_all.reshape(T * B, H_out).T @ cache.m.reshape(T * B, H)  # (P, T*B) @ (T*B, H)
    return grads


class StackedLSTM(LayeredLSTM):
    """Vanilla LSTM with stacked-gate GEMMs; same results as ``loop``, much faster, in any structure.

    The loops over layers, directions and lengths are :class:`impls.layer.LayeredLSTM`'s, around the
    stacked algorithm of one sequence. The options that change the cell itself (projection, CIFG, cell
    clipping) are in the stacked algorithm too: CIFG and clipping as options of the stacked cells
    (:meth:`Cell.with_options`), the projection as one more GEMM a step (:func:`stacked_forward`). The
    variants' stacked classes only change ``variant``, ``name`` and ``cell``; the GPU versions also ``xp``.

    ``xp`` is the array namespace the algorithm runs over and ``cell`` the variant's pointwise math.
    """

    name = "stacked"
    structures = FEATURES  # its cells compute every option
    variant = "vanilla"
    dtypes = ("float64", "float32")
    xp: Any = POOLED_NUMPY  # NumPy, its large buffers kept between calls (impls/workspace.py says why)
    cell: Cell = VanillaCell()

    def _cell(self) -> Cell:
        if not self.coupled_input_forget and self.cell_clip is None:
            return self.cell
        return self.cell.with_options(coupled=self.coupled_input_forget, clip=self.cell_clip)

    def sequence_forward(self, x, h0, c0, params, dtype):
        ln_eps = getattr(self, "ln_eps", DEFAULT_LN_EPS)
        return stacked_forward(self.xp, self._cell(), x, h0, c0, params, dtype, ln_eps=ln_eps)

    def sequence_shape(self, cache):
        T, B, _ = cache.x.shape
        return T, B, cache.c.shape[2]

    def sequence_dtype(self, cache):
        return cache.x.dtype

    def sequence_backward(self, dy, dh_T, dc_T, cache):
        return stacked_backward(self.xp, self._cell(), dy, dh_T, dc_T, cache)
