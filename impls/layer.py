"""The LSTM layer around a cell: stacked layers, both directions and variable lengths, once for every
built-in implementation.

An implementation supplies the time loop of one direction over one sequence,
``sequence_forward(x, h0, c0, params, dtype)`` and ``sequence_backward(dy, dh_T, dc_T, cache)``, with
the cell's own (unprefixed) parameter names; :class:`LayeredLSTM` runs it for every layer and direction
of the structure the implementation is configured with (:mod:`harness.structure` holds the rules):

    for layer k = 0 .. L-1:                       input: x (T, B, D) for k = 0, else the previous y
        for direction d in (forward, reverse):
            y_d, h_T[k, d], c_T[k, d] = the cell's time loop over the steps d reads
        y = [y_forward, y_reverse]                (T, B, dirs * H_out), forward features first

Variable lengths need nothing from the time loop: the rows of one length are one shorter sequence.
For every distinct length L the rows of that length run as a batch of their own over the L steps
their direction reads (t = 0 .. L-1, or L-1 .. 0 for the reverse direction); steps t >= L are never
computed, so y and dx are 0 there, dy there is never read and h_T is the state after the row's last
valid step. Without lengths the whole batch is one such group.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.contract import check_dtype, check_inputs, check_upstream, param_shapes
from harness.structure import FEATURES, Structure

__all__ = ["LayeredLSTM", "DirectionCache", "step_order", "CELL_ATTRIBUTES"]

#: What a subclass defines when it brings a cell of its own: the loop's cell methods, the stacked cell object.
CELL_ATTRIBUTES = ("cell_forward", "cell_backward", "cell")


def step_order(L: int, reverse: bool) -> np.ndarray:
    """The timesteps a direction reads, in its order, for a row of length L: 0 .. L-1 forward,
    L-1 .. 0 reverse."""
    return np.arange(L - 1, -1, -1) if reverse else np.arange(L)


@dataclass
class DirectionCache:
    """One direction of one layer: per group of rows (one length), the steps it read and its cache."""

    T: int
    B: int
    D: int
    groups: list[tuple[np.ndarray, np.ndarray, Any]]  # (rows, steps, cache of the time loop)


@dataclass
class LayerCache:
    structure: Structure
    T: int
    B: int
    H: int
    dtype: np.dtype
    cells: list[DirectionCache]  # in the states' axis order, layer * dirs + direction
    names: tuple[str, ...]  # the gradient's parameter names, in report order


class LayeredLSTM:
    """Configuration and the layer loops; subclasses provide ``variant``, ``sequence_forward`` and
    ``sequence_backward``.

    The structure is set by constructor keywords (all optional, the defaults are the single-layer
    LSTM) and read back as attributes; :meth:`with_structure` returns a new instance for another one.
    """

    variant: str
    #: Whether the harness draws structures for this implementation (through :meth:`with_structure`). A
    #: subclass that replaces ``forward`` or ``backward`` is not, unless it says so: its own methods may
    #: not take lengths or layered states, so it is certified in the structure it declares.
    configurable: bool = True
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    coupled_input_forget: bool = False
    cell_clip: float | None = None
    accepts_lengths: bool = False
    #: The structure features (:data:`harness.structure.FEATURES`) this implementation computes; another one
    #: is refused with :attr:`structures_note` as the reason (the harness draws none it does not compute).
    structures: tuple[str, ...] = FEATURES
    structures_note: str = ""

    def __init__(self, *, num_layers: int = 1, bidirectional: bool = False, proj_size: int = 0,
                 coupled_input_forget: bool = False, cell_clip: float | None = None,
                 accepts_lengths: bool = False) -> None:
        self._configure(Structure(num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
                                  coupled_input_forget=coupled_input_forget, cell_clip=cell_clip,
                                  lengths=accepts_lengths))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "configurable" not in own and ("forward" in own or "backward" in own):
            cls.configurable = False
        # CIFG and clipping are options of the built-in cells: a subclass with a cell of its own (most users'
        # experiments) computes them only if it says so, and is not given cases with them otherwise.
        replaced = [name for name in CELL_ATTRIBUTES if name in own]
        if "structures" not in own and replaced and {"cifg", "clip"} & set(cls.structures):
            cls.structures = tuple(f for f in cls.structures if f not in ("cifg", "clip"))
            cls.structures_note = (f"{cls.__name__} has a cell of its own ({', '.join(replaced)}), and CIFG and cell "
                                   f"clipping are options of the built-in cells; declare structures to have them "
                                   f"checked")

    @property
    def structure(self) -> Structure:
        """The structure this instance computes (its ``lengths`` is ``accepts_lengths``)."""
        return Structure(num_layers=self.num_layers, bidirectional=self.bidirectional, proj_size=self.proj_size,
                         coupled_input_forget=self.coupled_input_forget, cell_clip=self.cell_clip,
                         lengths=self.accepts_lengths)

    def with_structure(self, structure: Structure) -> Any:
        """A copy of this instance (its other settings, such as ``ln_eps``, kept) configured for ``structure``."""
        new = copy.copy(self)
        new._configure(structure)
        return new

    def _configure(self, structure: Structure) -> None:
        problems = structure.problems(self.variant)
        missing = [f for f in FEATURES if f in structure.features() and f not in self.structures]
        if missing:
            problems.append(f"does not compute {', '.join(missing)}" + (f": {self.structures_note}"
                                                                        if self.structures_note else ""))
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        settings = {"num_layers": structure.num_layers, "bidirectional": structure.bidirectional,
                    "proj_size": structure.proj_size, "coupled_input_forget": structure.coupled_input_forget,
                    "cell_clip": structure.cell_clip, "accepts_lengths": structure.lengths}
        for name, value in settings.items():
            # A setting equal to the class's default is not kept on the instance: a default instance has no
            # state of its own, so the harness can load it again by its class in another process.
            if value == getattr(type(self), name):
                self.__dict__.pop(name, None)
            else:
                setattr(self, name, value)

    # ----------------------------------------------------------------------------------------------
    # What a subclass provides: one direction's time loop over one sequence.

    def sequence_forward(self, x, h0, c0, params: Mapping[str, Any], dtype: np.dtype) -> tuple[Any, ...]:
        """x (T, B, D_in), h0 (B, H_out), c0 (B, H) -> y (T, B, H_out), h_T, c_T, cache."""
        raise NotImplementedError

    def sequence_backward(self, dy, dh_T, dc_T, cache: Any) -> dict[str, Any]:
        """-> {"x", "h0", "c0", and the cell's parameters without prefix}."""
        raise NotImplementedError

    def sequence_shape(self, cache: Any) -> tuple[int, int, int]:
        """(T, B, H) of a default-structure cache, for checking backward's upstream gradients."""
        raise NotImplementedError

    def sequence_dtype(self, cache: Any) -> np.dtype | None:
        """The dtype of a default-structure cache's forward (None: not known here)."""
        return None

    # ----------------------------------------------------------------------------------------------
    # The contract's forward and backward

    def forward(self, x, h0, c0, params, lengths=None):
        structure = self.structure
        if structure.is_default and lengths is None:
            check_inputs(self.variant, x, h0, c0, params)
            dtype = check_dtype(self, x)
            x, h0, c0, params = self._inputs_on_device(x, h0, c0, params, dtype)
            return self.sequence_forward(x, h0, c0, params, dtype)
        T, B, D, H = check_inputs(self.variant, x, h0, c0, params, structure=structure, lengths=lengths)
        dtype = check_dtype(self, x)
        x, h0, c0, params = self._inputs_on_device(x, h0, c0, params, dtype)
        xp = self.namespace()
        params = {k: xp.asarray(v, dtype) for k, v in params.items()}
        full = np.full(B, T) if lengths is None else np.asarray(lengths)  # on the host: it only plans the groups
        n_cells = structure.num_layers * structure.dirs
        h0s = xp.asarray(h0, dtype).reshape(n_cells, B, -1)  # (L * dirs, B, H_out), also when not layered
        c0s = xp.asarray(c0, dtype).reshape(n_cells, B, H)
        h_T, c_T = xp.empty_like(h0s), xp.empty_like(c0s)
        layer_in = xp.asarray(x, dtype)  # (T, B, D), then (T, B, dirs * H_out)
        caches: list[DirectionCache] = []
        # One cell's parameter names without prefix: the variant's, and proj when there is one.
        cell_names = tuple(param_shapes(self.variant, Structure(proj_size=structure.proj_size), D=D, H=H))
        cells = structure.cells()  # (layer, direction, prefix), index k = layer * dirs + direction
        for layer in range(structure.num_layers):
            outputs = []
            for direction in range(structure.dirs):
                k = layer * structure.dirs + direction
                prefix = cells[k][2]  # "l{layer}." or "l{layer}.reverse." ("" when not layered)
                own = {name: params[prefix + name] for name in cell_names}
                y_d, h_T[k], c_T[k], cache = self._direction_forward(layer_in, h0s[k], c0s[k], own, full,
                                                                     reverse=direction == 1, dtype=dtype)
                outputs.append(y_d)  # (T, B, H_out)
                caches.append(cache)
            layer_in = outputs[0] if len(outputs) == 1 else xp.concatenate(outputs, axis=2)  # (T, B, dirs * H_out)
        names = tuple(param_shapes(self.variant, structure, D=D, H=H))
        cache_all = LayerCache(structure, T, B, H, dtype, caches, names)
        state_shapes = structure.state_shapes(B=B, H=H)
        return layer_in, h_T.reshape(state_shapes["h0"]), c_T.reshape(state_shapes["c0"]), cache_all

    def backward(self, dy, dh_T, dc_T, cache):
        if not isinstance(cache, LayerCache):
            T, B, H = self.sequence_shape(cache)
            check_upstream(dy, dh_T, dc_T, T=T, B=B, H=H)
            dy, dh_T, dc_T = self.on_device([dy, dh_T, dc_T], self.sequence_dtype(cache))
            return self.sequence_backward(dy, dh_T, dc_T, cache)
        structure = cache.structure
        T, B, H = cache.T, cache.B, cache.H
        check_upstream(dy, dh_T, dc_T, T=T, B=B, H=H, structure=structure)
        n_cells = structure.num_layers * structure.dirs
        H_out = structure.h_out(H)
        dtype = cache.dtype
        dy, dh_T, dc_T = self.on_device([dy, dh_T, dc_T], dtype)
        xp = self.namespace()
        dh_T = xp.asarray(dh_T, dtype).reshape(n_cells, B, H_out)
        dc_T = xp.asarray(dc_T, dtype).reshape(n_cells, B, H)
        dh0, dc0 = xp.empty_like(dh_T), xp.empty_like(dc_T)
        grads: dict[str, Any] = {}
        d_out = xp.asarray(dy, dtype)  # dL/dy of the layer being processed, (T, B, dirs * H_out)
        cells = structure.cells()
        for layer in reversed(range(structure.num_layers)):
            d_in = None  # dL/d(layer input), summed over the directions
            for direction in range(structure.dirs):
                k = layer * structure.dirs + direction
                prefix = cells[k][2]
                dy_d = d_out[:, :, direction * H_out:(direction + 1) * H_out]  # (T, B, H_out)
                g = self._direction_backward(dy_d, dh_T[k], dc_T[k], cache.cells[k])
                d_in = g.pop("x") if d_in is None else d_in + g.pop("x")
                dh0[k], dc0[k] = g.pop("h0"), g.pop("c0")
                grads.update({prefix + name: v for name, v in g.items()})
            d_out = d_in
        states = structure.state_shapes(B=B, H=H)
        out = {"x": d_out, "h0": dh0.reshape(states["h0"]), "c0": dc0.reshape(states["c0"])}
        out.update({name: grads[name] for name in cache.names})
        return out

    # ----------------------------------------------------------------------------------------------
    # One direction: the rows of each length as one shorter sequence.

    def on_device(self, arrays: Sequence[Any], dtype: Any = None) -> list[Any]:
        """The arrays where the algorithm runs, in ``dtype`` (None: each its own). Here as they come:
        the algorithm converts each array where it reads it. The GPU versions upload all of a call's
        inputs at once (``impls/gpu/transfer.py``)."""
        return list(arrays)

    def _inputs_on_device(self, x, h0, c0, params: Mapping[str, Any], dtype: np.dtype) -> tuple[Any, ...]:
        x, h0, c0, *values = self.on_device([x, h0, c0, *params.values()], dtype)
        return x, h0, c0, dict(zip(params, values))

    def namespace(self) -> Any:
        """The array namespace the layer loops run over: the implementation's ``xp`` (CuPy for the GPU
        versions), else NumPy. Lengths and the groups of rows stay on the host."""
        return getattr(self, "xp", np)

    def step_order(self, L: int, T: int, reverse: bool) -> np.ndarray:
        """The timesteps (of T) a direction reads for a row of length L, in order (see :func:`step_order`)."""
        return step_order(L, reverse)

    def _direction_forward(self, x, h0, c0, params, lengths, *, reverse: bool, dtype):
        xp = self.namespace()
        T, B, _ = x.shape
        y = None
        h_T, c_T = xp.empty_like(h0), xp.empty_like(c0)
        groups = []
        for L in np.unique(lengths):
            rows = np.flatnonzero(lengths == L)
            steps = self.step_order(int(L), T, reverse)
            if _whole(rows, steps, B, T):
                # The whole batch, every step in time order: the sequence itself, without a gathered copy.
                y, h_T, c_T, cache = self.sequence_forward(x, h0, c0, params, dtype)
                groups.append((rows, steps, cache))
                return xp.asarray(y), xp.asarray(h_T), xp.asarray(c_T), DirectionCache(T, B, x.shape[2], groups)
            t, r = _index(xp, steps, rows)
            x_g = xp.ascontiguousarray(x[t, r])  # (L, rows, D), in the order read
            y_g, h_g, c_g, cache = self.sequence_forward(x_g, h0[r], c0[r], params, dtype)
            if y is None:
                y = xp.zeros((T, B, y_g.shape[2]), dtype)  # steps t >= lengths[b] stay 0
            y[t, r] = xp.asarray(y_g)
            h_T[r], c_T[r] = xp.asarray(h_g), xp.asarray(c_g)
            groups.append((rows, steps, cache))
        return y, h_T, c_T, DirectionCache(T, B, x.shape[2], groups)

    def _direction_backward(self, dy, dh_T, dc_T, cache: DirectionCache) -> dict[str, Any]:
        xp = self.namespace()
        rows, steps, sub = cache.groups[0]
        if _whole(rows, steps, cache.B, cache.T):
            return {k: xp.asarray(v) for k, v in self.sequence_backward(dy, dh_T, dc_T, sub).items()}
        dx = xp.zeros((cache.T, cache.B, cache.D), dy.dtype)  # padded steps have no input gradient
        dh0, dc0 = xp.empty_like(dh_T), xp.empty_like(dc_T)
        total: dict[str, Any] = {}
        for rows, steps, sub in cache.groups:
            t, r = _index(xp, steps, rows)
            dy_g = xp.ascontiguousarray(dy[t, r])  # (L, rows, H_out), dy at padded steps unread
            g = {k: xp.asarray(v) for k, v in self.sequence_backward(dy_g, dh_T[r], dc_T[r], sub).items()}
            dx[t, r] = g.pop("x")
            dh0[r], dc0[r] = g.pop("h0"), g.pop("c0")
            for name, v in g.items():
                total[name] = v if name not in total else total[name] + v
        return {"x": dx, "h0": dh0, "c0": dc0, **total}


def _whole(rows: np.ndarray, steps: np.ndarray, B: int, T: int) -> bool:
    """Whether a group is every row of the batch reading every step in time order."""
    return len(rows) == B and len(steps) == T and bool(steps[0] == 0)


def _index(xp: Any, steps: np.ndarray, rows: np.ndarray) -> tuple[Any, Any]:
    """A group's steps (L, 1) and rows (rows,) as ``xp`` index arrays: ``a[t, r]`` is the group's
    (L, rows, ...) block of a (T, B, ...) array, ``s[r]`` its rows of a (B, ...) state."""
    return xp.asarray(steps)[:, None], xp.asarray(rows)
