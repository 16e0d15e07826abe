"""What an implementation declares it cannot do: :class:`Limits`.

Real LSTMs often leave something out: a course exercise has no initial cell state (it starts from
zero) and does not return the final one; a backward may take only the gradient of the hidden states.
Such an implementation is still checkable on everything else, provided the harness knows: it then
holds the inputs the implementation does not take at zero (on both sides of every comparison) and
reports the quantities it cannot produce as *not compared*, with the reason, instead of comparing
them against a placeholder.

An implementation declares this with an attribute ``limits`` holding a :class:`Limits`;
:func:`harness.adapt` sets it from its keywords (``initial_cell=False``, ``final_cell=False``,
``backward_takes=...``). :func:`harness.validate` reads it into ``ImplementationInfo.limits``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Limits", "ZEROABLE", "UNCHECKABLE"]

#: Case arrays an implementation may go without: initial states it does not take, upstream gradients
#: its backward does not accept. They are held at zero for the implementation and every oracle.
ZEROABLE = ("h0", "c0", "dh_T", "dc_T")
#: Quantities an implementation may declare it cannot produce.
UNCHECKABLE = ("c_T", "h_T", "dh0", "dc0")


@dataclass(frozen=True)
class Limits:
    """``zero``: case arrays held at zero (from :data:`ZEROABLE`); ``unchecked``: quantity -> why it
    is not compared (keys from :data:`UNCHECKABLE`). ``Limits()`` (the default) declares nothing."""

    zero: tuple[str, ...] = ()
    unchecked: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        zero = (self.zero,) if isinstance(self.zero, str) else tuple(self.zero)
        bad = [z for z in zero if z not in ZEROABLE]
        if bad:
            raise ValueError(f"zero: expected names from {ZEROABLE}, got {bad}")
        if not isinstance(self.unchecked, Mapping):
            raise ValueError(f"unchecked: expected a mapping of quantity to reason, got "
                             f"{type(self.unchecked).__name__}")
        bad = [q for q in self.unchecked if q not in UNCHECKABLE]
        if bad:
            raise ValueError(f"unchecked: expected quantities from {UNCHECKABLE}, got {bad}")
        empty = [q for q, why in self.unchecked.items() if not isinstance(why, str) or not why]
        if empty:
            raise ValueError(f"unchecked: every quantity needs the reason it is not compared (a non-empty str); "
                             f"missing for {empty}")
        object.__setattr__(self, "zero", tuple(dict.fromkeys(zero)))
        object.__setattr__(self, "unchecked", MappingProxyType(dict(self.unchecked)))

    def __hash__(self) -> int:
        return hash((self.zero, tuple(sorted(self.unchecked.items()))))

    def __bool__(self) -> bool:
        return bool(self.zero or self.unchecked)

    def __reduce__(self) -> Any:  # MappingProxyType does not pickle; the worker sends Limits back
        return (Limits, (self.zero, dict(self.unchecked)))

    def to_dict(self) -> dict[str, Any]:
        return {"zero": list(self.zero), "unchecked": dict(self.unchecked)}
