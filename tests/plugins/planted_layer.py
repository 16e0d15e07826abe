"""Planted bugs in the layer structure: each a realistic way to get stacked layers, directions, lengths,
the projection, clipping or CIFG wrong, built on the loop reference with one thing broken.

Each class is a fixed-structure implementation (it declares ``num_layers``, ``bidirectional``,
``accepts_lengths``, ``proj_size``, ``coupled_input_forget``, ``cell_clip`` and ``variant``, and has no
``with_structure``), loaded as ``tests/plugins/planted_layer.py:ReverseReadsPadding`` and so on. Where the
bug is in the forward, the backward is the true gradient of the broken forward, so only a comparison of
values catches it; where the bug is in the backward, the forward is right.
"""

from __future__ import annotations

import numpy as np

from harness.structure import FEATURES, Structure
from impls.loop import LoopLSTM, cell_backward, cell_forward


class _Planted:
    """A fixed structure around a configured (broken) loop: ``inner`` does the work."""

    variant = "vanilla"
    structure = Structure()

    def __init_subclass__(cls) -> None:
        # The declared attributes, on the class as on its instances, from the one ``structure``.
        s = cls.structure
        cls.name = "planted-layer-" + cls.__name__
        cls.num_layers = s.num_layers
        cls.bidirectional = s.bidirectional
        cls.accepts_lengths = s.lengths
        cls.proj_size = s.proj_size
        cls.coupled_input_forget = s.coupled_input_forget
        cls.cell_clip = s.cell_clip

    def __init__(self) -> None:
        self.inner = self.make_inner()

    def make_inner(self):
        return LoopLSTM().with_structure(self.structure)

    def forward(self, x, h0, c0, params, lengths=None):
        return self.inner.forward(x, h0, c0, params, **_lengths(lengths))

    def backward(self, dy, dh_T, dc_T, cache):
        return self.inner.backward(dy, dh_T, dc_T, cache)


def _lengths(lengths):
    return {} if lengths is None else {"lengths": lengths}


class _ReadsWholeReverse(LoopLSTM):
    def step_order(self, L, T, reverse):
        # The whole padded sequence flipped, as x[::-1] does, instead of the row's valid steps.
        return np.arange(T - 1, -1, -1) if reverse else np.arange(L)


class ReverseReadsPadding(_Planted):
    """The reverse direction starts at t = T-1 for every row, reading the padding, not at lengths[b]-1."""

    structure = Structure(bidirectional=True, lengths=True)

    def make_inner(self):
        return _ReadsWholeReverse().with_structure(self.structure)


class PaddedStepsUpdateState(_Planted):
    """y is zeroed at padded steps, but the state runs on through them: h_T, c_T are taken at t = T-1."""

    structure = Structure(lengths=True)

    def make_inner(self):
        return LoopLSTM()  # run over all T steps, then masked

    def forward(self, x, h0, c0, params, lengths=None):
        y, h_T, c_T, cache = self.inner.forward(x, h0, c0, params)
        mask = _valid(lengths, x.shape[0], x.shape[1])  # (T, B, 1)
        return y * mask, h_T, c_T, (cache, mask)

    def backward(self, dy, dh_T, dc_T, cache):
        inner, mask = cache
        return self.inner.backward(np.asarray(dy) * mask, dh_T, dc_T, inner)


class LengthsAssumedSorted(_Planted):
    """Reads the lengths as if the batch came sorted longest first, as ``pack_padded_sequence`` with
    ``enforce_sorted=True`` requires: right on a sorted batch, on equal lengths and on one row; wrong on a
    batch in any other order, where each row gets another row's length."""

    structure = Structure(lengths=True)

    def forward(self, x, h0, c0, params, lengths=None):
        if lengths is not None:
            lengths = np.sort(np.asarray(lengths))[::-1].copy()
        return super().forward(x, h0, c0, params, lengths=lengths)


def _valid(lengths, T, B):
    if lengths is None:
        return np.ones((T, B, 1))
    return (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[:, :, None].astype(float)


class ReverseFinalAtWrongEnd(_Planted):
    """The reverse direction's h_T is its output at t = T-1 (its first step), not its state after t = 0."""

    structure = Structure(bidirectional=True)

    def forward(self, x, h0, c0, params, lengths=None):
        y, h_T, c_T, cache = self.inner.forward(x, h0, c0, params)
        H = h_T.shape[2]
        h_T = h_T.copy()
        h_T[1] = y[-1, :, H:]
        return y, h_T, c_T, (cache, H)

    def backward(self, dy, dh_T, dc_T, cache):
        inner, H = cache
        dy, dh_T = np.array(dy, copy=True), np.array(dh_T, copy=True)
        dy[-1, :, H:] += dh_T[1]  # what reached the reported h_T reached y[T-1]'s reverse features
        dh_T[1] = 0.0
        return self.inner.backward(dy, dh_T, dc_T, inner)


class Layer1FedFinalState(_Planted):
    """Layer 1 reads layer 0's final state h_T at every step (broadcast over time) instead of its y."""

    structure = Structure(num_layers=2)

    def make_inner(self):
        return LoopLSTM()

    def forward(self, x, h0, c0, params, lengths=None):
        own = [{k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"l{n}.")} for n in (0, 1)]
        y0, h0_T, c0_T, cache0 = self.inner.forward(x, h0[0], c0[0], own[0])
        fed = np.broadcast_to(h0_T, y0.shape).copy()  # (T, B, H): h_T at every step
        y1, h1_T, c1_T, cache1 = self.inner.forward(fed, h0[1], c0[1], own[1])
        return y1, np.stack([h0_T, h1_T]), np.stack([c0_T, c1_T]), (cache0, cache1, y0.shape)

    def backward(self, dy, dh_T, dc_T, cache):
        cache0, cache1, shape = cache
        g1 = self.inner.backward(dy, dh_T[1], dc_T[1], cache1)
        g0 = self.inner.backward(np.zeros(shape, np.asarray(dy).dtype), dh_T[0] + g1["x"].sum(axis=0), dc_T[0],
                                 cache0)
        out = {"x": g0["x"], "h0": np.stack([g0["h0"], g1["h0"]]), "c0": np.stack([g0["c0"], g1["c0"]])}
        for n, g in ((0, g0), (1, g1)):
            out.update({f"l{n}.{k}": g[k] for k in ("W", "R", "b")})
        return out


class ProjectionGradientMissing(_Planted):
    """The projection is applied in the forward but its gradient is left at zero."""

    structure = Structure(proj_size=2)

    def backward(self, dy, dh_T, dc_T, cache):
        grads = self.inner.backward(dy, dh_T, dc_T, cache)
        grads["proj"] = np.zeros_like(grads["proj"])
        return grads


class _GradientIgnoresClip(LoopLSTM):
    structures = FEATURES  # it claims the clip (and gets its backward wrong)

    def cell_forward(self, x_t, h_prev, c_prev, weights):
        h, c, step = super().cell_forward(x_t, h_prev, c_prev, weights)
        step.inside = None  # the clip's mask forgotten: the backward treats every cell as unclipped
        return h, c, step


class GradientThroughClippedCells(_Planted):
    """The forward clips c_t, but the backward passes the gradient through clipped elements."""

    structure = Structure(cell_clip=0.5)

    def make_inner(self):
        return _GradientIgnoresClip().with_structure(self.structure)


class _SeparateForget(LoopLSTM):
    structures = FEATURES  # it claims CIFG (and computes a separate forget gate)

    def cell_forward(self, x_t, h_prev, c_prev, weights):
        return cell_forward(x_t, h_prev, c_prev, weights)  # the forget gate's own weights: not coupled

    def cell_backward(self, dh, dc, cache, weights):
        return cell_backward(dh, dc, cache, weights)


class CIFGSeparateForgetGate(_Planted):
    """Declares CIFG (f = 1 - i) but computes the forget gate from its own weights."""

    structure = Structure(coupled_input_forget=True)

    def make_inner(self):
        return _SeparateForget().with_structure(self.structure)


def _swap_directions(arrays):
    """``l{k}.X`` <-> ``l{k}.reverse.X`` for every parameter (or gradient) name."""
    out = {}
    for name, value in arrays.items():
        layer, rest = name.split(".", 1)
        out[f"{layer}.{rest[len('reverse.'):]}" if rest.startswith("reverse.") else f"{layer}.reverse.{rest}"] = value
    return out


class DirectionParametersSwapped(_Planted):
    """Each layer's forward direction runs with ``l{k}.reverse.*`` and its reverse direction with ``l{k}.*``."""

    structure = Structure(num_layers=2, bidirectional=True)

    def forward(self, x, h0, c0, params, lengths=None):
        return self.inner.forward(x, h0, c0, _swap_directions(params), **_lengths(lengths))

    def backward(self, dy, dh_T, dc_T, cache):
        grads = self.inner.backward(dy, dh_T, dc_T, cache)
        params = _swap_directions({k: v for k, v in grads.items() if k not in ("x", "h0", "c0")})
        return {k: params.get(k, v) for k, v in grads.items()}


def _halves_swapped(a):
    half = a.shape[-1] // 2
    return np.concatenate([a[..., half:], a[..., :half]], axis=-1)


class ReverseFeaturesFirst(_Planted):
    """Every layer concatenates [y_reverse, y_forward]: y's halves are swapped, and layer 1 reads them so."""

    structure = Structure(num_layers=2, bidirectional=True)

    def forward(self, x, h0, c0, params, lengths=None):
        # Layer 1 reading [reverse; forward] through W is layer 1 reading [forward; reverse] through W with
        # its column halves swapped.
        y, h_T, c_T, cache = self.inner.forward(x, h0, c0, _upper_columns_swapped(params), **_lengths(lengths))
        return _halves_swapped(y), h_T, c_T, cache

    def backward(self, dy, dh_T, dc_T, cache):
        grads = self.inner.backward(_halves_swapped(np.asarray(dy)), dh_T, dc_T, cache)
        return _upper_columns_swapped(grads)


def _upper_columns_swapped(arrays):
    return {k: _halves_swapped(v) if k.endswith(".W") and not k.startswith("l0.") else v for k, v in arrays.items()}


class StatesDirectionMajor(_Planted):
    """h0 and c0 read, h_T and c_T written, at index ``direction * num_layers + layer``."""

    structure = Structure(num_layers=2, bidirectional=True)

    def _orders(self):
        L = self.structure.num_layers
        read = [d * L + k for k in range(L) for d in (0, 1)]  # layer-major cell i reads index read[i]
        return read, list(np.argsort(read))

    def forward(self, x, h0, c0, params, lengths=None):
        read, write = self._orders()
        y, h_T, c_T, cache = self.inner.forward(x, h0[read], c0[read], params, **_lengths(lengths))
        return y, h_T[write], c_T[write], cache

    def backward(self, dy, dh_T, dc_T, cache):
        read, write = self._orders()
        grads = self.inner.backward(dy, np.asarray(dh_T)[read], np.asarray(dc_T)[read], cache)
        return {**grads, "h0": grads["h0"][write], "c0": grads["c0"][write]}


class FinalStatesDirectionsSwapped(_Planted):
    """h_T and c_T stacked [reverse, forward] within each layer (h0 and c0 are read right)."""

    structure = Structure(bidirectional=True, lengths=True)

    def forward(self, x, h0, c0, params, lengths=None):
        y, h_T, c_T, cache = self.inner.forward(x, h0, c0, params, **_lengths(lengths))
        return y, h_T[::-1].copy(), c_T[::-1].copy(), cache

    def backward(self, dy, dh_T, dc_T, cache):
        return self.inner.backward(dy, np.asarray(dh_T)[::-1], np.asarray(dc_T)[::-1], cache)


#: Every planted layer bug, for the meta-tests.
PLANTED = (ReverseReadsPadding, PaddedStepsUpdateState, LengthsAssumedSorted, ReverseFinalAtWrongEnd,
           Layer1FedFinalState, ProjectionGradientMissing, GradientThroughClippedCells, CIFGSeparateForgetGate,
           DirectionParametersSwapped, ReverseFeaturesFirst, StatesDirectionMajor, FinalStatesDirectionsSwapped)
