"""A test-only LSTM layer of every structure (stacks, directions, lengths, projection, CIFG, clip), written
with torch autograd, as an implementation (configurable, or of one fixed structure, with planted bugs on
request) and as an oracle; tests/test_structure.py checks it against torch.nn.LSTM where that computes
the same thing. Only the vanilla variant: the harness's plumbing, not the variants, is under test here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.cases import Case
from harness.contract import gradient_keys
from harness.structure import FEATURES, Structure
from oracles.base import Oracle, Reference

#: The planted bugs :func:`layer_forward` can carry.
BUGS = ("reverse_ignores_lengths", "padded_steps_update", "gradient_through_clip", "separate_forget_gate",
        "layer_fed_h_T", "projection_gradient_scaled")


def _cell(x_t, h, c, p, structure: Structure, bugs: frozenset[str]):
    H = c.shape[-1]
    a = x_t @ p["W"].T + h @ p["R"].T + p["b"]  # (B, 4H)
    a_i, a_f, a_g, a_o = (a[:, k * H:(k + 1) * H] for k in range(4))
    i = torch.sigmoid(a_i)
    f = 1 - i if structure.coupled_input_forget and "separate_forget_gate" not in bugs else torch.sigmoid(a_f)
    c_new = f * c + i * torch.tanh(a_g)
    if structure.cell_clip is not None:
        clip = structure.cell_clip
        if "gradient_through_clip" in bugs:  # the clipped value, but the gradient of the unclipped one
            c_new = c_new + (c_new.clamp(-clip, clip) - c_new).detach()
        else:
            c_new = c_new.clamp(-clip, clip)
    h_new = torch.sigmoid(a_o) * torch.tanh(c_new)
    if structure.proj_size:
        proj = p["proj"]
        if "projection_gradient_scaled" in bugs:  # the right value, and 1.01 times the projection's gradient
            proj = proj + 0.01 * (proj - proj.detach())
        h_new = h_new @ proj.T
    return h_new, c_new


def layer_forward(structure: Structure, x, h0, c0, params: dict[str, Any], lengths, bugs: frozenset[str] = frozenset()):
    """y, h_T, c_T of the layer (torch tensors in, torch tensors out)."""
    T, B, _ = x.shape
    lens = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
    hs = h0.reshape(-1, B, h0.shape[-1])
    cs = c0.reshape(-1, B, c0.shape[-1])
    inputs = x
    h_T, c_T = [], []
    for layer in range(structure.num_layers):
        outs = []
        for direction in range(structure.dirs):
            k = layer * structure.dirs + direction
            prefix = "" if not structure.layered else f"l{layer}." + ("reverse." if direction else "")
            p = {name[len(prefix):]: v for name, v in params.items() if name.startswith(prefix)
                 and "." not in name[len(prefix):]}
            h, c = hs[k], cs[k]
            ys = [None] * T
            order = range(T - 1, -1, -1) if direction else range(T)
            for t in order:
                valid = (t < lens)[:, None]
                if direction and "reverse_ignores_lengths" in bugs:
                    valid = torch.ones_like(valid)
                h_new, c_new = _cell(inputs[t], h, c, p, structure, bugs)
                if "padded_steps_update" in bugs:
                    h, c = h_new, c_new
                else:
                    h, c = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
                ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
            outs.append(torch.stack(ys))
            h_T.append(h)
            c_T.append(c)
        y = torch.cat(outs, dim=-1)
        if "layer_fed_h_T" in bugs and layer + 1 < structure.num_layers:
            inputs = torch.cat(h_T[-structure.dirs:], dim=-1).expand(T, *h_T[-1].shape[:-1], -1)
        else:
            inputs = y
    if not structure.layered:
        return y, h_T[0], c_T[0]
    return y, torch.stack(h_T), torch.stack(c_T)


def _run(structure: Structure, case_arrays: dict[str, np.ndarray], lengths, upstream, dtype, bugs):
    leaves = {k: torch.tensor(np.asarray(v, dtype=dtype), requires_grad=True) for k, v in case_arrays.items()}
    params = {k: v for k, v in leaves.items() if k not in ("x", "h0", "c0")}
    y, h_T, c_T = layer_forward(structure, leaves["x"], leaves["h0"], leaves["c0"], params, lengths, bugs)
    if upstream is None:
        return (y, h_T, c_T), leaves
    dy, dh, dc = (torch.tensor(np.asarray(u, dtype=dtype)) for u in upstream)
    loss = (y * dy).sum() + (h_T * dh).sum() + (c_T * dc).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return (y, h_T, c_T), {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), grads)}


class TorchLayer:
    """The implementation, of the one structure its attributes declare; ``bugs`` plants the named bugs."""

    variant = "vanilla"

    def __init__(self, *, num_layers: int = 1, bidirectional: bool = False, proj_size: int = 0,
                 coupled_input_forget: bool = False, cell_clip: float | None = None, accepts_lengths: bool = False,
                 bugs: tuple[str, ...] = (), name: str = "torch-layer"):
        self.num_layers, self.bidirectional, self.proj_size = num_layers, bidirectional, proj_size
        self.coupled_input_forget, self.cell_clip = coupled_input_forget, cell_clip
        self.accepts_lengths = accepts_lengths
        self.bugs = tuple(bugs)
        self.name = name

    @property
    def structure(self) -> Structure:
        return Structure(self.num_layers, self.bidirectional, self.proj_size, self.coupled_input_forget,
                         self.cell_clip, self.accepts_lengths)

    def forward(self, x, h0, c0, params, lengths=None):
        assert (lengths is not None) == self.accepts_lengths, "lengths passed iff the structure has them"
        arrays = {"x": x, "h0": h0, "c0": c0, **params}
        (y, h_T, c_T), _ = _run(self.structure, arrays, lengths, None, x.dtype, frozenset(self.bugs))
        cache = (arrays, lengths, x.dtype)
        return y.detach().numpy(), h_T.detach().numpy(), c_T.detach().numpy(), cache

    def backward(self, dy, dh_T, dc_T, cache):
        arrays, lengths, dtype = cache
        _, grads = _run(self.structure, arrays, lengths, (dy, dh_T, dc_T), dtype, frozenset(self.bugs))
        return {k: g.numpy() for k, g in grads.items()}


class ConfigurableTorchLayer(TorchLayer):
    """The implementation as the built-ins are: configured per case by ``with_structure``."""

    def with_structure(self, structure: Structure) -> ConfigurableTorchLayer:
        return ConfigurableTorchLayer(num_layers=structure.num_layers, bidirectional=structure.bidirectional,
                                      proj_size=structure.proj_size,
                                      coupled_input_forget=structure.coupled_input_forget,
                                      cell_clip=structure.cell_clip, accepts_lengths=structure.lengths,
                                      bugs=self.bugs, name=self.name)


class TorchLayerOracle(Oracle):
    """The same layer, bug-free, in float64: an oracle of every structure feature."""

    name = "torch-layer-oracle"
    structures = frozenset(FEATURES)

    def __init__(self, name: str = "torch-layer-oracle", structures: frozenset[str] = frozenset(FEATURES)):
        self.name = name
        self.structures = structures

    def reference(self, case: Case) -> Reference:
        arrays = {"x": case.x, "h0": case.h0, "c0": case.c0, **case.params}
        (y, h_T, c_T), grads = _run(case.structure, arrays, case.lengths, case.upstream, np.float64, frozenset())
        keys = gradient_keys(case.variant, case.structure)
        return Reference(compute_dtype="float64",
                         outputs={"y": y.detach().numpy(), "h_T": h_T.detach().numpy(), "c_T": c_T.detach().numpy()},
                         gradients={k: grads[k].numpy() for k in keys})
