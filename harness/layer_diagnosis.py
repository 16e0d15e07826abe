"""What a bidirectional implementation, or one that takes lengths, gets wrong about its directions, its
states' order and where its final states are taken.

The whole-layer contract (:mod:`harness.structure`) fixes four things a layer written by hand easily
gets wrong without any cell equation being wrong: which half of y belongs to which direction, which
index of the states' leading axis belongs to which cell (``layer * dirs + direction``), which state
of the reverse direction is its final one (the one after t = 0, its last step), and, with lengths,
that a row's state is held past its last valid step (its final state is the one after t = lengths[b]-1
going forward; the reverse direction starts there). :func:`recognise`
compares the outputs an implementation already gave, on the diagnosis's trial cases as declared, with
the standard layer's outputs re-arranged, and says which re-arrangement they are.

The standard layer is computed (the LSTM equations in float64, :mod:`oracles.equations`) in a few
*readings* of the inputs, each one way an implementation can read them wrongly, simplest first: as
they are; with the parameters of the two directions swapped (``l{k}.`` used for the reverse direction,
``l{k}.reverse.`` for the forward one); with the states' direction index swapped on reading h0 and
c0; with h0 and c0 read in direction-major order (index ``direction * num_layers + layer``, with more
than one layer); with every layer after the first reading the previous layer's y reverse features
first. In each reading every output block (y; h_T and c_T of each cell) is matched against its own
re-arrangements, the block as it is first: y with its two halves swapped; a state at the other
direction's index; a state at its direction-major index; a reverse cell's state after its *first*
step (at t = T-1, or t = lengths[b]-1 with lengths), the wrong end; with lengths, a cell's final state
with the padded steps run too (every row through all T steps, each layer reading the masked y of the
one below), as a layer that zeroes y past lengths[b] but lets the state run on gives it. The first reading under which
every block of both cases matches some re-arrangement is the explanation; when none does, what the
plain reading already explains is reported as a partial one.

These are comparisons of outputs only: nothing is run again. A match needs every element within ten
times the value tolerance (a wrong re-arrangement misses by the size of the values themselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness import layouts
from harness.cases import Case
from harness.compare import tolerance
from harness.conditioning import condition_number
from harness.structure import DIRECTION_NAMES, Structure

__all__ = ["LayerFact", "LayerFinding", "recognise", "READINGS"]

#: Ways of reading the inputs wrongly; a reading of the search is a combination of them.
READINGS: tuple[str, ...] = ("params", "states", "direction-major", "concat")


#: How far beyond the value tolerance a re-arranged block may be and still count as that block.
SLACK = 10.0

_STATE_WORDS = {"h_T": "hidden state", "c_T": "cell state"}


def _first_step(structure: Structure) -> str:
    """Where the reverse direction of a row starts."""
    return "t = lengths[b]-1" if structure.lengths else "t = T-1"


def _cell_name(quantity: str, k: int, d: int, structure: Structure) -> str:
    """``h_T[layer 0, reverse] (index 1)``: a cell's block of a state, as the contract indexes it."""
    if not structure.layered:
        return quantity
    return f"{quantity}[layer {k}, {DIRECTION_NAMES[d]}] (index {structure.dirs * k + d})"


@dataclass(frozen=True)
class LayerFact:
    """One thing the outputs show: a wrong ``reading`` of the inputs (``quantity`` None), or a
    ``quantity`` whose ``cells`` ((layer, direction) positions as the contract indexes them; none for
    y) hold the re-arrangement ``kind`` ("swapped", "direction-major", "first-step" or "padded") of the
    standard layer's values."""

    kind: str
    quantity: str | None = None
    cells: tuple[tuple[int, int], ...] = ()

    def text(self, structure: Structure) -> str:
        L = structure.num_layers
        if self.quantity is None:
            return {
                "params": "it runs each layer's forward direction with the reverse direction's parameters "
                          "(l{k}.reverse.*) and its reverse direction with the forward one's (l{k}.*)",
                "states": "it reads h0 and c0 with the two directions' entries swapped (layer k's forward "
                          "direction from index 2k+1, its reverse direction from 2k)",
                "direction-major": f"it reads h0 and c0 in direction-major order: layer k, direction d from index "
                                   f"d * {L} + k instead of k * 2 + d",
                "concat": "each layer after the first reads the previous layer's y with the reverse direction's "
                          "features first",
            }[self.kind]
        if self.quantity == "y":
            return ("y has the reverse direction's features first: its first half equals the reverse direction's "
                    "output and its second half the forward direction's")
        q, what = self.quantity, _STATE_WORDS[self.quantity]
        parts = []
        for k, d in self.cells:
            at = _cell_name(q, k, d, structure)
            if self.kind == "padded":
                who = f"the {DIRECTION_NAMES[d]} direction's" if structure.bidirectional else "the"
                how = ("with every row run on through the padded steps to t = T-1, not held after t = lengths[b]-1"
                       if d == 0 else
                       "with every row started at t = T-1, over the padded steps, not at t = lengths[b]-1")
                parts.append(f"{at} equals {who} final {what} {how}")
            elif self.kind == "swapped":
                parts.append(f"{at} equals the {DIRECTION_NAMES[1 - d]} direction's final {what}")
            elif self.kind == "direction-major":
                j = 2 * k + d
                parts.append(f"{at} equals the final {what} of layer {j % L}, {DIRECTION_NAMES[j // L]} "
                             f"(direction-major index {j})")
            else:
                parts.append(f"{at} equals the reverse direction's {what} after {_first_step(structure)} (its first "
                             f"step), not after t = 0")
        return "; ".join(parts)

    def short(self, structure: Structure) -> str:
        if self.quantity is None:
            return {"params": "the two directions' parameters swapped",
                    "states": "h0 and c0 read with the directions swapped",
                    "direction-major": "h0 and c0 read in direction-major order",
                    "concat": "layers after the first read y reverse features first"}[self.kind]
        if self.quantity == "y":
            return "y's two directions swapped"
        return {"swapped": f"{self.quantity}'s two directions swapped",
                "direction-major": f"{self.quantity} in direction-major order",
                "first-step": f"{self.quantity} of the reverse direction taken after {_first_step(structure)} "
                              f"(its first step), not after t = 0",
                "padded": f"{self.quantity} taken with the padded steps run (the state not held past "
                          f"lengths[b])"}[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "quantity": self.quantity,
                "cells": [{"layer": k, "direction": DIRECTION_NAMES[d]} for k, d in self.cells]}


@dataclass
class LayerFinding:
    """What :func:`recognise` found: the ``facts`` (wrong readings first, then the outputs in the
    contract's order), and whether they explain every forward output of both trial cases."""

    structure: Structure
    facts: list[LayerFact] = field(default_factory=list)
    complete: bool = True
    #: The forward quantities compared (those the implementation declares it cannot produce left out).
    checked: tuple[str, ...] = ("y", "h_T", "c_T")

    @property
    def fix_keywords(self) -> dict[str, str]:
        """The keywords of :func:`harness.adapt` that certify it as it is, when the facts are the orders they
        declare and nothing else: ``state_order="direction-major"`` (h0 and c0 read, and h_T and c_T written,
        in direction-major order) and ``y_directions="reverse-first"`` (y, and each later layer's input, with
        the reverse direction's features first); {} when the facts are anything else."""
        if not self.complete:
            return {}
        keywords, rest = {}, list(self.facts)
        if LayerFact("direction-major") in rest:
            moving = 2 * self.structure.num_layers - 2  # every index but the first and the last moves
            written = {f.quantity: len(f.cells) for f in rest if f.kind == "direction-major" and f.quantity}
            if any(written.get(q) != moving for q in ("h_T", "c_T") if q in self.checked):
                return {}
            keywords["state_order"] = "direction-major"
            rest = [f for f in rest if f.kind != "direction-major"]
        # With more than one layer, y's order is also the order in which each later layer reads its input.
        reversed_y = [LayerFact("swapped", "y")] + ([LayerFact("concat")] if self.structure.num_layers > 1 else [])
        if "y" in self.checked and all(f in rest for f in reversed_y):
            keywords["y_directions"] = "reverse-first"
            rest = [f for f in rest if f not in reversed_y]
        return {} if rest else keywords

    @property
    def fix(self) -> str:
        """The adapter call of :attr:`fix_keywords` (``harness.adapt(impl, state_order='direction-major')``), or
        "" when there is none."""
        keywords = self.fix_keywords
        if not keywords:
            return ""
        return f"harness.adapt(impl, {', '.join(f'{k}={v!r}' for k, v in keywords.items())})"

    @property
    def options(self) -> str:
        """The command-line options of :attr:`fix_keywords` (``--state-order direction-major``), or ""."""
        return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.fix_keywords.items())

    def headline(self) -> str:
        return "; ".join(dict.fromkeys(f.short(self.structure) for f in self.facts))

    def lines(self) -> list[str]:
        if self.complete:
            head = ("Its layer structure explains it: its forward outputs are the standard layer's, with these "
                    "differences:")
        else:
            head = "Part of it is explained by its layer structure (the rest departs otherwise):"
        out = [head] + [f"  - {f.text(self.structure)}" for f in self.facts]
        if self.fix:
            out.append(f"Certify it as it is with {self.fix}, or on the command line with the options "
                       f"{self.options}.")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"complete": self.complete, "headline": self.headline(), "fix": self.fix, "options": self.options,
                "facts": [f.to_dict() | {"text": f.text(self.structure)} for f in self.facts]}


# --------------------------------------------------------------------------------------------------
# The standard layer in one reading


@dataclass
class _Outputs:
    y: np.ndarray  # (T, B, dirs H_out)
    h_T: np.ndarray  # (L dirs, B, H_out), a leading axis of 1 added where the structure has none
    c_T: np.ndarray  # (L dirs, B, H)
    first_h: np.ndarray | None  # (L, B, H_out): each reverse cell's state after its first step (bidirectional)
    first_c: np.ndarray | None  # (L, B, H)
    padded_h: np.ndarray | None  # (L dirs, B, H_out): each cell's final state with the padded steps run (lengths)
    padded_c: np.ndarray | None  # (L dirs, B, H)


def _readings(s: Structure) -> list[tuple[str, ...]]:
    if not s.bidirectional:  # every wrong reading is about the two directions
        return [()]
    states: list[tuple[str, ...]] = [(), ("states",)] + ([("direction-major",)] if s.num_layers > 1 else [])
    concat: list[tuple[str, ...]] = [(), ("concat",)] if s.num_layers > 1 else [()]
    combos = [p + st + c for p in ((), ("params",)) for st in states for c in concat]
    return sorted(combos, key=lambda r: (len(r), [READINGS.index(w) for w in r]))  # the simplest first


def _read(case: Case, reading: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """h0, c0 and the parameters (float64) as an implementation reading them ``reading`` sees them."""
    s = case.structure
    L = s.num_layers
    params = {k: np.asarray(v, np.float64) for k, v in case.params.items()}
    h0, c0 = np.asarray(case.h0, np.float64), np.asarray(case.c0, np.float64)
    if "params" in reading:
        swapped = {}
        for name, value in params.items():
            layer, rest = name.split(".", 1)
            other = rest[len("reverse."):] if rest.startswith("reverse.") else "reverse." + rest
            swapped[f"{layer}.{other}"] = value
        params = swapped
    if "concat" in reading:
        for name in list(params):
            if not name.startswith("l0.") and name.rsplit(".", 1)[-1] == "W":
                params[name] = layouts.swap_directions(params[name], axis=1, name=name)
    if "states" in reading:
        order = [2 * k + 1 - d for k in range(L) for d in (0, 1)]
        h0, c0 = h0[order], c0[order]
    if "direction-major" in reading:
        h0 = layouts.state_order_from(h0, L, 2, "direction-major", name="h0")
        c0 = layouts.state_order_from(c0, L, 2, "direction-major", name="c0")
    return h0, c0, params


def _lifted(states: np.ndarray, s: Structure) -> np.ndarray:
    """States with the (L * dirs) leading axis, which a structure of one layer and direction has not."""
    return np.asarray(states) if s.layered else np.asarray(states)[None]


def _standard(case: Case, reading: tuple[str, ...]) -> _Outputs:
    from oracles.equations import lstm_forward

    s = case.structure
    h0, c0, params = _read(case, reading)
    x = np.asarray(case.x, np.float64)
    y, h_T, c_T = lstm_forward(case.variant, x, h0, c0, params, ln_eps=case.ln_eps, structure=s, lengths=case.lengths)
    h0, c0 = _lifted(h0, s), _lifted(c0, s)  # (L dirs, B, .)
    cell = s.replace(num_layers=1, bidirectional=False, lengths=False)
    last = (np.full(case.B, case.T) if case.lengths is None else np.asarray(case.lengths)) - 1  # (B,)
    first_h, first_c, padded_h, padded_c = [], [], [], []
    for k in range(s.num_layers):
        if k == 0:
            inp = x
        else:  # layer k reads the y of the layers below it
            below = s.replace(num_layers=k)
            if below.layered:
                kept = {n: v for n, v in params.items() if int(n.split(".", 1)[0][1:]) < k}
                hb, cb = h0[: s.dirs * k], c0[: s.dirs * k]
            else:  # one layer, one direction: names and states without the layer's prefix and axis
                kept, hb, cb = layouts.cell_params(params, s, 0, 0), h0[0], c0[0]
            inp, _, _ = lstm_forward(case.variant, x, hb, cb, kept, ln_eps=case.ln_eps, structure=below,
                                     lengths=case.lengths)
        for d in range(s.dirs):
            own = layouts.cell_params(params, s, k, d)
            j = s.dirs * k + d
            if d == 1:  # the reverse cell's state after its first step
                step = inp[last, np.arange(case.B)][None]  # (1, B, D_k): where the reverse direction starts
                _, h1, c1 = lstm_forward(case.variant, step, h0[j], c0[j], own, ln_eps=case.ln_eps, structure=cell)
                first_h.append(h1)
                first_c.append(c1)
            if s.lengths:  # the cell's final state with every row run through all T steps
                seq = inp if d == 0 else inp[::-1]
                _, hp, cp = lstm_forward(case.variant, seq, h0[j], c0[j], own, ln_eps=case.ln_eps, structure=cell)
                padded_h.append(hp)
                padded_c.append(cp)
    return _Outputs(y, _lifted(h_T, s), _lifted(c_T, s),
                    np.stack(first_h) if first_h else None, np.stack(first_c) if first_c else None,
                    np.stack(padded_h) if padded_h else None, np.stack(padded_c) if padded_c else None)


# --------------------------------------------------------------------------------------------------
# Matching blocks


def _arrangements(quantity: str, j: int, s: Structure, out: _Outputs) -> list[tuple[str, np.ndarray]]:
    """Block ``j`` of ``quantity`` (index j of the states' axis; 0 for y) re-arranged every way tried,
    as it is first."""
    if quantity == "y":
        return [("as-is", out.y)] + ([("swapped", layouts.swap_directions(out.y))] if s.bidirectional else [])
    h = quantity == "h_T"
    states, first, padded = (out.h_T, out.first_h, out.padded_h) if h else (out.c_T, out.first_c, out.padded_c)
    L = s.num_layers
    k, d = divmod(j, s.dirs)
    found = [("as-is", states[j])]
    if s.bidirectional:
        found.append(("swapped", states[2 * k + 1 - d]))
        if L > 1:
            found.append(("direction-major", states[layouts.state_order_index(L, 2, "direction-major")[j]]))
        if d == 1 and first is not None:
            found.append(("first-step", first[k]))
    if padded is not None:
        found.append(("padded", padded[j]))
    return found


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> bool:
    if np.shape(actual) != np.shape(expected):
        return False
    a = np.asarray(actual, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(a - expected) <= SLACK * (atol * scale + rtol * np.abs(expected))))


def _blocks(s: Structure, checked: Sequence[str]) -> list[tuple[str, int]]:
    out = [("y", 0)] if "y" in checked else []
    for q in ("h_T", "c_T"):
        if q in checked:
            out += [(q, j) for j in range(s.dirs * s.num_layers)]
    return out


def _match(cases: Sequence[Case], outputs: Sequence[tuple[np.ndarray, ...]], standard: Sequence[_Outputs],
           blocks: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str | None]:
    """Per block, the first arrangement that every case's output matches (None: none does)."""
    found: dict[tuple[str, int], str | None] = {}
    tols = []
    for case in cases:
        tol = tolerance(case.dtype, "values")
        kappa = condition_number(case)
        tols.append((tol.rtol * kappa, tol.atol * kappa))
    for q, j in blocks:
        index = ("y", "h_T", "c_T").index(q)
        kinds: list[str] | None = None
        for case, actual, ref, (rtol, atol) in zip(cases, outputs, standard, tols, strict=True):
            a = actual[index] if q == "y" else _lifted(actual[index], case.structure)[j]
            here = [kind for kind, e in _arrangements(q, j, case.structure, ref) if _close(a, e, rtol, atol)]
            kinds = here if kinds is None else [k for k in kinds if k in here]
        found[(q, j)] = kinds[0] if kinds else None
    return found


def _facts(s: Structure, reading: tuple[str, ...], matched: dict[tuple[str, int], str | None]) -> list[LayerFact]:
    facts = [LayerFact(r) for r in READINGS if r in reading]
    for q in ("y", "h_T", "c_T"):
        for kind in ("swapped", "direction-major", "first-step", "padded"):
            cells = tuple(divmod(j, s.dirs) for (qq, j), k in matched.items() if qq == q and k == kind)
            if cells:
                facts.append(LayerFact(kind, q, () if q == "y" else cells))
    return facts


def recognise(cases: Sequence[Case], outputs: Sequence[tuple[np.ndarray, ...]], *,
              unchecked: Sequence[str] = ()) -> LayerFinding | None:
    """What the forward ``outputs`` (y, h_T, c_T of each case, as the implementation gave them) show
    about a bidirectional layer or one with lengths (see the module docstring); None when the structure
    has neither, when the outputs do not have the contract's shapes, or when nothing is recognised.
    ``cases`` are as the implementation received them (its declared limits applied); ``unchecked``:
    forward quantities it cannot produce, left out."""
    if not cases or len(cases) != len(outputs):
        return None
    s = cases[0].structure
    if not (s.bidirectional or s.lengths):
        return None
    for case, out in zip(cases, outputs, strict=True):
        states = s.state_shapes(B=case.B, H=case.H)
        want = (s.output_shape(T=case.T, B=case.B, H=case.H), states["h0"], states["c0"])
        if len(out) != 3 or any(np.shape(a) != w for a, w in zip(out, want)):
            return None
    checked = tuple(q for q in ("y", "h_T", "c_T") if q not in unchecked)
    blocks = _blocks(s, checked)
    plain: dict[tuple[str, int], str | None] | None = None
    for reading in _readings(s):
        standard = [_standard(c, reading) for c in cases]
        matched = _match(cases, outputs, standard, blocks)
        if all(k is not None for k in matched.values()):
            facts = _facts(s, reading, matched)
            return LayerFinding(s, facts, complete=True, checked=checked) if facts else None
        if not reading:
            plain = matched
    facts = _facts(s, (), plain or {})
    return LayerFinding(s, facts, complete=False, checked=checked) if facts else None
