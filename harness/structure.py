"""The structure of an LSTM layer beyond one cell: stacked layers, both directions, variable lengths,
projections, coupled input and forget gates, and cell clipping.

A :class:`Structure` says which of these an implementation computes; the default structure is the
single-layer, one-direction, full-length LSTM of :mod:`harness.contract`, and with it every name and
shape stays as it is there. The binding rules:

- ``num_layers`` L and ``bidirectional`` (dirs = 2 when set): layer k > 0 takes the previous layer's
  ``y`` as input. When the structure is *layered* (L > 1 or bidirectional) every parameter name carries
  a prefix, ``l{k}.`` for layer k's forward direction and ``l{k}.reverse.`` for its reverse direction
  (``l0.W``, ``l0.reverse.W``, ``l1.R``, ...), and the states gain a leading axis of size L * dirs
  indexed ``layer * dirs + direction`` (PyTorch's order): ``h0`` (L * dirs, B, H_out), ``c0`` (L * dirs,
  B, H). ``y`` is (T, B, dirs * H_out), the forward direction's features first. The reverse direction
  reads the sequence from its last valid step down to t = 0, and its ``h_T`` is its state after t = 0.
- ``lengths`` (the implementation's ``accepts_lengths``): ``forward(..., lengths=...)`` receives (B,)
  int64 lengths, 1 <= lengths[b] <= T. Steps t >= lengths[b] do not exist for row b: y is 0 there, the
  state is not updated, dy there has no effect and dx there is 0.
- ``proj_size`` P > 0 (LSTMP): a parameter ``proj`` (P, H) per layer and direction, h_t = proj @ (o *
  tanh(c_t)); H_out = P, so ``R`` is (4H, P) and ``h0`` has P features.
- ``coupled_input_forget`` (CIFG): f = 1 - i. The forget gate's rows of W, R and b still exist, are
  unused, and their gradient is zero.
- ``cell_clip`` (a positive float or None): c_t is clipped to [-cell_clip, cell_clip] after
  c_t = f * c_{t-1} + i * g; the clipped value is carried and used in h_t, and the gradient through a
  clipped element is zero.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Structure", "FEATURES", "DIRECTION_NAMES", "parse_prefix", "MAX_NUM_LAYERS", "MAX_PROJ_SIZE"]

#: The names of a structure's features, as oracles declare what they compute (``Oracle.structures``)
#: and as messages name them.
FEATURES: tuple[str, ...] = ("layers", "bidirectional", "lengths", "proj", "cifg", "clip")

#: The largest structure an implementation may declare. A certification runs every case through the
#: whole declared structure and draws cells of more than ``proj_size`` units, so beyond these a single
#: case takes minutes or gigabytes: a number this large is a typo (``layers=20000`` for 2).
MAX_NUM_LAYERS = 64
MAX_PROJ_SIZE = 4096

#: Direction index -> name, in the order of the states' leading axis and of y's features.
DIRECTION_NAMES: tuple[str, ...] = ("forward", "reverse")


@dataclass(frozen=True)
class Structure:
    """Which layer structure an implementation computes, and a case is drawn in (see the module)."""

    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    coupled_input_forget: bool = False
    cell_clip: float | None = None
    lengths: bool = False

    # ----------------------------------------------------------------------------------------------
    # Reading it

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def layered(self) -> bool:
        """Whether parameter names are prefixed and states carry the (L * dirs) axis."""
        return self.num_layers > 1 or self.bidirectional

    @property
    def is_default(self) -> bool:
        return self == Structure()

    def h_out(self, H: int) -> int:
        """Features of h: the projection size when there is one, else H."""
        return self.proj_size or H

    def features(self) -> frozenset[str]:
        """The :data:`FEATURES` this structure uses."""
        used = {
            "layers": self.num_layers > 1,
            "bidirectional": self.bidirectional,
            "lengths": self.lengths,
            "proj": self.proj_size > 0,
            "cifg": self.coupled_input_forget,
            "clip": self.cell_clip is not None,
        }
        return frozenset(name for name, on in used.items() if on)

    def describe(self, *, exact: bool = False) -> str:
        """Short text of what differs from the default: ``layers=2 bidirectional proj=3 cifg clip=2.5
        lengths``; empty for the default structure. ``exact`` writes the clip's value in full (``repr``),
        so that :meth:`parse` gives back this structure (the command line's ``--structure`` takes the text)."""
        parts = []
        if self.num_layers > 1:
            parts.append(f"layers={self.num_layers}")
        if self.bidirectional:
            parts.append("bidirectional")
        if self.proj_size:
            parts.append(f"proj={self.proj_size}")
        if self.coupled_input_forget:
            parts.append("cifg")
        if self.cell_clip is not None:
            parts.append(f"clip={self.cell_clip!r}" if exact else f"clip={self.cell_clip:g}")
        if self.lengths:
            parts.append("lengths")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str, variant: str | None = None) -> Structure:
        """The structure :meth:`describe` writes as ``text``: words separated by spaces or commas, each one of
        ``layers=L``, ``bidirectional``, ``proj=P``, ``cifg``, ``clip=C`` and ``lengths``, in any order (an
        empty text is the default structure), defined for ``variant`` when it is given. A ValueError names
        the word as the text gave it: one that is not among them, a wrong value (``layers=0: ...``), a
        feature the variant does not define (``proj=2: ...``)."""
        fields: dict[str, Any] = {}
        for word in text.replace(",", " ").split():
            key, sep, value = word.partition("=")
            if key in _FLAG_WORDS and not sep:
                field_name, parsed = _FLAG_WORDS[key], True
            elif key in _VALUE_WORDS and sep:
                field_name, kind = _VALUE_WORDS[key]
                try:
                    parsed = kind(value)
                except ValueError:
                    raise ValueError(f"{word!r}: expected {key}=<{kind.__name__}>, got {value!r} after the '='") \
                        from None
            else:
                raise ValueError(f"{word!r}: expected words among layers=L, bidirectional, proj=P, cifg, clip=C, "
                                 f"lengths (e.g. 'layers=2 bidirectional lengths')")
            if field_name in fields:
                raise ValueError(f"{word!r}: {key} is given twice")
            fields[field_name] = parsed
        structure = cls(**fields)
        problems = structure.problems(variant, words=True)
        if problems:
            raise ValueError("; ".join(problems))
        return structure

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Structure:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"structure: unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> Structure:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    # Names and shapes

    def cells(self) -> list[tuple[int, int, str]]:
        """(layer, direction, parameter-name prefix) of every cell, in the states' axis order."""
        out = []
        for layer in range(self.num_layers):
            for direction in range(self.dirs):
                if not self.layered:
                    prefix = ""
                else:
                    prefix = f"l{layer}." + ("reverse." if direction else "")
                out.append((layer, direction, prefix))
        return out

    def cell_param_shapes(self, variant_shapes: dict[str, tuple[int, ...]], *, layer: int, D: int,
                          H: int) -> dict[str, tuple[int, ...]]:
        """One cell's parameters without prefix: the variant's shapes (for input size D and hidden size
        H, as :meth:`harness.contract.VariantSpec.param_shapes` gives them) with W's input size set for
        ``layer``, R's for the projection, and ``proj`` added when there is one."""
        H_out = self.h_out(H)
        D_in = D if layer == 0 else self.dirs * H_out
        shapes = dict(variant_shapes)
        shapes["W"] = (4 * H, D_in)
        shapes["R"] = (4 * H, H_out)
        if self.proj_size:
            shapes["proj"] = (self.proj_size, H)
        return shapes

    def state_shapes(self, *, B: int, H: int) -> dict[str, tuple[int, ...]]:
        """Shapes of h0 and c0 (and of h_T, c_T)."""
        if not self.layered:
            return {"h0": (B, self.h_out(H)), "c0": (B, H)}
        n = self.num_layers * self.dirs
        return {"h0": (n, B, self.h_out(H)), "c0": (n, B, H)}

    def output_shape(self, *, T: int, B: int, H: int) -> tuple[int, int, int]:
        """Shape of y."""
        return (T, B, self.dirs * self.h_out(H))

    # ----------------------------------------------------------------------------------------------
    # Validation

    def problems(self, variant: str | None = None, *, words: bool = False) -> list[str]:
        """What is wrong with this structure (for ``variant``, when given), each naming the field; with
        ``words``, naming it as :meth:`parse` reads it (``layers=0``, ``proj=2``) and saying what to leave out."""

        def name(field_name: str) -> str:
            if not words:
                return field_name
            word = _WORD_OF[field_name]
            return f"{word}={_text_value(getattr(self, field_name))}" if word in _VALUE_WORDS else word

        out = []
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) \
                or not 1 <= self.num_layers <= MAX_NUM_LAYERS:
            out.append(f"{name('num_layers')}: expected an int from 1 to {MAX_NUM_LAYERS}, got {self.num_layers!r}")
        for flag in ("bidirectional", "coupled_input_forget", "lengths"):
            if not isinstance(getattr(self, flag), bool):
                out.append(f"{name(flag)}: expected True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.proj_size, int) or isinstance(self.proj_size, bool) \
                or not 0 <= self.proj_size <= MAX_PROJ_SIZE:
            out.append(f"{name('proj_size')}: expected an int from 0 (no projection) to {MAX_PROJ_SIZE}, got "
                       f"{self.proj_size!r}")
        clip = self.cell_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not math.isfinite(clip) or clip <= 0):
            out.append(f"{name('cell_clip')}: expected a positive finite float or None, got {clip!r}")
        if variant == "layernorm" and self.proj_size:
            out.append(f"{name('proj_size')}: a projection is not defined for the layernorm variant here (its cell "
                       f"state is normalized over H units, and which of h's P or H features LayerNorm would see is "
                       f"not settled by any reference); "
                       + (f"leave out {name('proj_size')}" if words else "use proj_size=0"))
        if variant == "layernorm" and self.cell_clip is not None:
            out.append(f"{name('cell_clip')}: clipping is not defined for the layernorm variant here (its carried "
                       f"cell state is the normalized one); "
                       + (f"leave out {name('cell_clip')}" if words else "use cell_clip=None"))
        return out


#: The words of :meth:`Structure.parse`: a flag -> its field, and a word with a value -> (its field, the value's type).
_FLAG_WORDS = {"bidirectional": "bidirectional", "cifg": "coupled_input_forget", "lengths": "lengths"}
_VALUE_WORDS: dict[str, tuple[str, type]] = {"layers": ("num_layers", int), "proj": ("proj_size", int),
                                             "clip": ("cell_clip", float)}
#: A field -> its word.
_WORD_OF = {**{field_name: word for word, field_name in _FLAG_WORDS.items()},
            **{field_name: word for word, (field_name, _) in _VALUE_WORDS.items()}}


def _text_value(value: Any) -> str:
    """A value as :meth:`Structure.parse` read it from its word (``2``, ``0.5``)."""
    return repr(value) if isinstance(value, float) else str(value)


def parse_prefix(name: str) -> tuple[int | None, int | None, str]:
    """Split a (gradient) parameter name into (layer, direction, bare name):
    ``"l1.reverse.W"`` -> (1, 1, "W"); ``"l0.b"`` -> (0, 0, "b"); ``"W"`` -> (None, None, "W")."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0].startswith("l") and parts[0][1:].isdigit():
        layer = int(parts[0][1:])
        if len(parts) >= 3 and parts[1] == "reverse":
            return layer, 1, ".".join(parts[2:])
        return layer, 0, ".".join(parts[1:])
    return None, None, name
