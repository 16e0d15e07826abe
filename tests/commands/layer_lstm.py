"""A whole LSTM layer behind the command protocol, for the tests: it reads the call's structure from
request.json and computes it with the built-in stacked implementation of the request's variant.

    python layer_lstm.py [--reverse-first] [--direction-major] [--ignore-lengths] REQUEST_DIR RESPONSE_DIR

--reverse-first: its y holds the reverse direction's features first (certified with --y-directions
reverse-first). --direction-major: its states' (num_layers * dirs) axis is direction * num_layers + layer
(certified with --state-order direction-major). --ignore-lengths (a planted bug): it never reads
lengths.npy, so every row runs the whole sequence.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's harness and impls

from harness.structure import Structure  # noqa: E402
from impls.layernorm import StackedLayerNormLSTM  # noqa: E402
from impls.peephole import StackedPeepholeLSTM  # noqa: E402
from impls.stacked import StackedLSTM  # noqa: E402

IMPLS = {"vanilla": StackedLSTM, "peephole": StackedPeepholeLSTM, "layernorm": StackedLayerNormLSTM}


def swap_halves(a):
    """y's last axis with its two directions' halves exchanged (its own inverse)."""
    half = a.shape[-1] // 2
    return np.concatenate([a[..., half:], a[..., :half]], axis=-1)


def reorder_states(a, layers, dirs, *, to_own):
    """(layers * dirs, ...) states between layer-major (the contract's) and direction-major (its own)."""
    shape = (layers, dirs) if to_own else (dirs, layers)
    return a.reshape(*shape, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def main(argv):
    flags, (request, response) = set(argv[:-2]), map(Path, argv[-2:])
    spec = json.loads((request / "request.json").read_text())
    structure = Structure.from_dict(spec["structure"])
    arrays = {p.name[:-len(".npy")]: np.load(p) for p in request.glob("*.npy")}
    layers, dirs = structure.num_layers, structure.dirs
    bidirectional = "--reverse-first" in flags and structure.bidirectional
    layered = "--direction-major" in flags and structure.layered
    # With the reverse direction first in y, a later layer's W reads its input that way too.
    later_W = [f"l{k}.{d}W" for k in range(1, layers) for d in ("", "reverse.")] if bidirectional else []
    if bidirectional:
        for key in ("dy", *later_W):
            if key in arrays:
                arrays[key] = swap_halves(arrays[key])
    if layered:
        for key in ("h0", "c0", "dh_T", "dc_T"):
            if key in arrays:
                arrays[key] = reorder_states(arrays[key], layers, dirs, to_own=False)
    lengths = arrays.pop("lengths", None)
    if "--ignore-lengths" in flags and lengths is not None:
        lengths = np.full_like(lengths, arrays["x"].shape[0])
    impl = IMPLS[spec["variant"]]().with_structure(structure)
    impl.ln_eps = spec["ln_eps"]
    params = {k: v for k, v in arrays.items() if k not in ("x", "h0", "c0", "dy", "dh_T", "dc_T")}
    kwargs = {"lengths": lengths} if structure.lengths else {}
    y, h_T, c_T, cache = impl.forward(arrays["x"], arrays["h0"], arrays["c0"], params, **kwargs)
    out = {"y": y, "h_T": h_T, "c_T": c_T}
    if spec["gradients"]:
        grads = impl.backward(arrays["dy"], arrays["dh_T"], arrays["dc_T"], cache)
        out.update({f"grad_{k}": v for k, v in grads.items()})
    if bidirectional:
        for key in ("y", *(f"grad_{w}" for w in later_W)):
            if key in out:
                out[key] = swap_halves(out[key])
    if layered:
        for key in ("h_T", "c_T", "grad_h0", "grad_c0"):
            if key in out:
                out[key] = reorder_states(out[key], layers, dirs, to_own=True)
    for key, value in out.items():
        np.save(response / f"{key}.npy", np.asarray(value).astype(spec["dtype"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
