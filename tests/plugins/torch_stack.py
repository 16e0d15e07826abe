"""PyTorch-style layer modules for the adapter's tests: nn.LSTM's parameter names and attributes, called as
``module(x, (h0, c0)) -> (y, (h_n, c_n))``. One written by hand from torch primitives (its states in either
order), and nn.LSTM subclasses with one planted bug each.
"""

from __future__ import annotations

import torch
from torch import nn


class HandStackedLSTM(nn.Module):
    """A stacked, optionally bidirectional LSTM with a projection, from torch primitives, named as nn.LSTM
    names its parameters. ``state_order="direction-major"`` reads and returns its states indexed
    ``direction * num_layers + layer``; ``ignores_bias_hh`` plants a bug: it adds bias_ih only."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
                 proj_size: int = 0, batch_first: bool = False, state_order: str = "layer-major",
                 ignores_bias_hh: bool = False):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bidirectional, self.proj_size, self.batch_first = bidirectional, proj_size, batch_first
        self.state_order, self.ignores_bias_hh = state_order, ignores_bias_hh
        H, H_out, dirs = hidden_size, proj_size or hidden_size, 2 if bidirectional else 1
        for layer in range(num_layers):
            D_in = input_size if layer == 0 else dirs * H_out
            for direction in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                setattr(self, "weight_ih" + sfx, nn.Parameter(torch.randn(4 * H, D_in) * 0.3))
                setattr(self, "weight_hh" + sfx, nn.Parameter(torch.randn(4 * H, H_out) * 0.3))
                setattr(self, "bias_ih" + sfx, nn.Parameter(torch.randn(4 * H) * 0.1))
                setattr(self, "bias_hh" + sfx, nn.Parameter(torch.randn(4 * H) * 0.1))
                if proj_size:
                    setattr(self, "weight_hr" + sfx, nn.Parameter(torch.randn(proj_size, H) * 0.3))

    def _index(self, layer: int, direction: int) -> int:
        dirs = 2 if self.bidirectional else 1
        if self.state_order == "direction-major":
            return direction * self.num_layers + layer
        return layer * dirs + direction

    def forward(self, x, state):
        h0, c0 = state
        if self.batch_first:
            x = x.transpose(0, 1)
        T = x.shape[0]
        dirs = 2 if self.bidirectional else 1
        h_n, c_n = [None] * (self.num_layers * dirs), [None] * (self.num_layers * dirs)
        inputs = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                w, r = getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx)
                b = getattr(self, "bias_ih" + sfx)
                if not self.ignores_bias_hh:
                    b = b + getattr(self, "bias_hh" + sfx)
                k = self._index(layer, direction)
                h, c = h0[k], c0[k]
                ys = [None] * T
                for t in (range(T - 1, -1, -1) if direction else range(T)):
                    i, f, g, o = (inputs[t] @ w.T + h @ r.T + b).chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    if self.proj_size:
                        h = h @ getattr(self, "weight_hr" + sfx).T
                    ys[t] = h
                outs.append(torch.stack(ys))
                h_n[k], c_n[k] = h, c
            inputs = torch.cat(outs, dim=-1)
        y = inputs.transpose(0, 1) if self.batch_first else inputs
        return y, (torch.stack(h_n), torch.stack(c_n))


class FlippedReverseLSTM(nn.LSTM):
    """Planted: returns each layer's forward and reverse final hidden states swapped."""

    def forward(self, x, hx=None):
        y, (h_n, c_n) = super().forward(x, hx)
        L, dirs = self.num_layers, 2
        h_n = h_n.reshape(L, dirs, *h_n.shape[1:]).flip(1).reshape(h_n.shape)
        return y, (h_n, c_n)


class NoisyGradientLSTM(nn.LSTM):
    """Planted: a hook adds a constant to the gradient of layer 1's weight_hh (its forward is right)."""

    def forward(self, x, hx=None):
        w = self.weight_hh_l1
        if w.requires_grad:
            w.register_hook(lambda g: g + 1e-2)
        return super().forward(x, hx)
