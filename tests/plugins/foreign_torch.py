"""README example 3: a PyTorch nn.Module written by hand, batch-first, its backward from autograd."""

from __future__ import annotations

import torch
from torch import nn

from harness.adapt import adapt


class HandWrittenLSTM(nn.Module):
    """One LSTM layer from torch primitives; gates i, f, g, o; weights (4H, D) and (4H, H); one bias."""

    def __init__(self, input_size: int = 3, hidden_size: int = 4):
        super().__init__()
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.randn(4 * H, input_size) * 0.1)
        self.weight_hh = nn.Parameter(torch.randn(4 * H, H) * 0.1)
        self.bias = nn.Parameter(torch.zeros(4 * H))

    def forward(self, x, state):  # x (B, T, D)
        h, c = state
        outputs = []
        for t in range(x.shape[1]):
            gates = x[:, t] @ self.weight_ih.T + h @ self.weight_hh.T + self.bias
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)


module = adapt(HandWrittenLSTM(), batch_major=True,
               names={"W": "weight_ih", "R": "weight_hh", "b": "bias"})

# The same module with its gates read in the wrong order must not certify.
wrong_order = adapt(HandWrittenLSTM(), batch_major=True, gate_order="ifog",
                    names={"W": "weight_ih", "R": "weight_hh", "b": "bias"})
