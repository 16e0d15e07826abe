"""Random cases in any layer structure, for tests of implementations and oracles.

Independent of :func:`harness.cases.build_case` on purpose: tests of the product's own case builder
compare against arrays made here, and tests of implementations and oracles need structured cases
whatever the strategies draw.
"""

from __future__ import annotations

import numpy as np

from harness.cases import Case
from harness.contract import param_shapes
from harness.structure import Structure


def structured_case(structure: Structure, *, variant: str = "vanilla", dtype: str = "float64", T: int = 4,
                    B: int = 3, D: int = 3, H: int = 4, seed: int = 0, lengths: list[int] | None = None,
                    weight_scale: float = 1.0) -> Case:
    """A case of ``structure``: standard-normal inputs and upstream gradients, weights scaled so that
    pre-activations have std about ``weight_scale``, states in a normal range. When the structure has
    lengths and none are given, they are drawn in 1..T, unsorted, with T among them."""
    rng = np.random.default_rng(seed)
    H_out = structure.h_out(H)
    states = structure.state_shapes(B=B, H=H)
    params = {}
    for name, shape in param_shapes(variant, structure, D=D, H=H).items():
        bare = name.rsplit(".", 1)[-1]
        if bare in ("W", "R"):
            params[name] = rng.standard_normal(shape) * weight_scale / np.sqrt(shape[1] + H_out)
        elif bare == "gamma":
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif bare == "proj":
            params[name] = rng.standard_normal(shape) / np.sqrt(H)
        else:
            params[name] = 0.5 * rng.standard_normal(shape)
    y_shape = structure.output_shape(T=T, B=B, H=H)
    if structure.lengths:
        if lengths is None:
            lengths = list(rng.integers(1, T + 1, size=B))
            lengths[int(rng.integers(B))] = T
        lens: np.ndarray | None = np.asarray(lengths, dtype=np.int64)
    else:
        lens = None
    case = Case(
        variant=variant, dtype="float64",
        x=rng.standard_normal((T, B, D)),
        h0=np.tanh(rng.standard_normal(states["h0"])),
        c0=rng.standard_normal(states["c0"]),
        params=params,
        dy=rng.standard_normal(y_shape),
        dh_T=rng.standard_normal(states["h0"]),
        dc_T=rng.standard_normal(states["c0"]),
        structure=structure,
        lengths=lens,
    )
    return case.astype(dtype)
