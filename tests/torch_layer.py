"""torch.nn.LSTM as an independent reference for structured vanilla cases, computed directly in tests.

PyTorch computes stacked layers, both directions, projections (``proj_size``: ``weight_hr_l{k}`` is
exactly ``proj``) and variable lengths (packed sequences, ``enforce_sorted=False``) with its own
kernels; these tests use it to check the oracles that compute the same structures from the equations.
Its bias is ``bias_ih + bias_hh``: ``b`` goes into ``bias_ih``, ``bias_hh`` is 0.

CIFG (f = 1 - i) is also in reach: 1 - sigmoid(a) = sigmoid(-a), so a CIFG cell is a vanilla cell whose
forget rows of W, R and b are minus its input rows (:func:`torch_reference` with ``cifg_as_vanilla``);
then the CIFG gradient of an input row is the vanilla one minus that of the forget row, and the
forget rows' gradient is 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.cases import Case
from harness.structure import Structure

#: Structures torch.nn.LSTM computes (CIFG as a vanilla cell whose forget rows are minus its input rows).
TORCH_STRUCTURES = {
    "layers": Structure(num_layers=2),
    "bidirectional": Structure(bidirectional=True),
    "lengths": Structure(lengths=True),
    "proj": Structure(proj_size=2),
    "cifg": Structure(coupled_input_forget=True),
    "all": Structure(num_layers=2, bidirectional=True, proj_size=2, lengths=True, coupled_input_forget=True),
}


def torch_reference(case: Case) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Outputs (y, h_T, c_T) and gradients (by gradient key) of a vanilla case by torch.nn.LSTM in float64,
    for L = <dy, y> + <dh_T, h_T> + <dc_T, c_T>. CIFG is computed as described in the module."""
    torch = pytest.importorskip("torch")
    s = case.structure
    if case.variant != "vanilla" or s.cell_clip is not None:
        raise ValueError(f"case: torch.nn.LSTM computes the vanilla cell without a clip, got {case.variant} "
                         f"{s.describe()}")
    c = case.astype("float64")
    H, cifg = c.H, s.coupled_input_forget
    lstm = torch.nn.LSTM(c.D, H, num_layers=s.num_layers, bidirectional=s.bidirectional,
                         proj_size=s.proj_size).double()
    own: dict[str, tuple[object, str]] = {}  # our name -> (torch parameter, torch name)
    with torch.no_grad():
        for layer, direction, prefix in s.cells():
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            for ours, theirs in (("W", "weight_ih"), ("R", "weight_hh"), ("b", "bias_ih"), ("proj", "weight_hr")):
                if prefix + ours in c.params:
                    value = c.params[prefix + ours].copy()
                    if cifg and ours != "proj":
                        value[H : 2 * H] = -value[:H]  # sigmoid(-a_i) = 1 - sigmoid(a_i)
                    getattr(lstm, theirs + suffix).copy_(torch.from_numpy(value))
                    own[prefix + ours] = (getattr(lstm, theirs + suffix), theirs + suffix)
            getattr(lstm, "bias_hh" + suffix).zero_()
    lead = () if s.layered else (1,)  # torch's states always have the (layers * dirs) axis
    x = torch.tensor(c.x, requires_grad=True)
    h0 = torch.tensor(c.h0.reshape(lead + c.h0.shape), requires_grad=True)
    c0 = torch.tensor(c.c0.reshape(lead + c.c0.shape), requires_grad=True)
    if c.lengths is None:
        y, (h_T, c_T) = lstm(x, (h0, c0))
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.from_numpy(c.lengths), enforce_sorted=False)
        out, (h_T, c_T) = lstm(packed, (h0, c0))
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=c.T)
    dy, dh_T, dc_T = (torch.from_numpy(u.reshape(shape)) for u, shape in
                      zip(c.upstream, (y.shape, h_T.shape, c_T.shape), strict=True))
    loss = (dy * y).sum() + (dh_T * h_T).sum() + (dc_T * c_T).sum()
    loss.backward()
    outputs = {"y": y.detach().numpy(), "h_T": h_T.detach().numpy().reshape(c.h0.shape),
               "c_T": c_T.detach().numpy().reshape(c.c0.shape)}
    grads = {"x": x.grad.numpy(), "h0": h0.grad.numpy().reshape(c.h0.shape), "c0": c0.grad.numpy().reshape(c.c0.shape)}
    for name, (param, _) in own.items():
        g = param.grad.numpy().copy()
        if cifg and not name.endswith("proj"):
            g[:H] -= g[H : 2 * H]  # the forget rows are minus the input rows
            g[H : 2 * H] = 0.0
        grads[name] = g
    return outputs, grads
