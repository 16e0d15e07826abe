"""Diagnosis: under which convention does an implementation compute the standard LSTM?

When an implementation fails, it is often a correct LSTM in another convention: gate blocks in
another order, weights transposed, sequences batch-major, a forget bias of +1 added inside (TF1), or
another variant than it declares. :func:`diagnose` runs it as declared, then under every combination
of those (through :func:`harness.adapt.adapt`, the same adapters a user would certify with; an
adapter is re-adapted: what it wraps is read in each convention, its interface kept), on two small
cases with distinct T, B, D, H (so that a transposed axis cannot pass unnoticed), and compares the
forward outputs with the LSTM equations in float64 (the finite-difference oracle's forward). The
first convention under which both cases match, simplest first, is the diagnosis; its backward pass
is then checked under that convention against the finite-difference oracle.

What the implementation declares it cannot do (its :class:`harness.Limits`) is applied to every
trial as :func:`harness.certify` applies it: the inputs it does not take are held at zero on both
sides, and the quantities it cannot produce are not compared.

When nothing matches, the closest convention (the one whose y departs latest, then with the fewest
mismatched elements) is reported with the first quantity where it departs, and every reason trials
could not run is listed with how many trials each. Every convention tried is also compared, from the
outputs it already gave, with the references of the same cases with h0 = 0, with c0 = 0 and with
both: a match there says the implementation ignores that initial state (a common bug, and one no
convention explains). The first such match in the order of the search, h0 before c0 before both, is
the hint.

Where a trial first departs, in time order: forward, the earliest timestep over tolerance, where
h_T and c_T count as the last step (after y[T-1], h_T then c_T); backward, in the order the backward
pass computes (from t = T-1 down to 0): dx at its latest timestep over tolerance, then dh0 and dc0
(t = 0, computed last), then the parameter gradients, which sum over every step, in the contract's
order. The coordinates are those of the largest error (relative to tolerance) at that timestep.

Trials are ordered from the declared convention outwards: the implementation as declared first,
then the declared variant before the others (and last of all, for an implementation with one bias
none of whose trials could even run, the same again with two summed biases b_ih + b_hh, then with the
bias folded into the weight matrix), the per-gate concatenation ([h; x] or [x; h], for an
adapter with ``per_gate="hx"`` or ``"xh"``), the sequence layout (time-major, batch-major,
feature-first), transposition, forget bias, and last the 24 gate orders, identity first (for stacked
gate blocks only: per-gate matrices are named). An adapter keeps its interface in every trial (its
parameter names, bias form, initial and final states, column biases), and the ``adapt(...)`` call a
match prints spells out the whole convention, so that evaluated on the same object it certifies.

An implementation of a layer structure (:mod:`harness.structure`: stacked layers, both directions,
lengths, ...) gets its trial cases in that structure, with lengths of their own per row when it takes
them, and the references are the same equations over the whole layer. When a bidirectional one, or
one with lengths, does not match as declared, its outputs are also compared with the standard layer's
re-arranged (:mod:`harness.layer_diagnosis`): the reverse direction's final state taken after its first
step, the two directions swapped in y, in the states or in the parameters, states in direction-major
order, final states taken with the padded steps run.
When that explains every output no cell convention is tried; when it explains some, the text says
which. Cell conventions are tried only through an adapter that computes the implementation's own
structure; where :func:`harness.adapt.adapt` gives one of another structure the search ends there,
with that reason as its note.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.adapt import Convention
from harness.cases import Case, CaseSpec, build_case, structure_fields
from harness.check import compare_execution
from harness.compare import decode_index, tolerance
from harness.contract import FORWARD_QUANTITIES, VARIANTS, quantities, quantity_specs
from harness.layer_diagnosis import LayerFinding, recognise
from harness.limits import Limits
from harness.records import Record, format_coords
from harness.structure import Structure
from harness.unit import RestrictedOracle, RestrictedSubject, mark_unchecked

__all__ = ["diagnose", "diagnose_subject", "Diagnosis", "Trial", "Departure", "GATE_PERMUTATIONS",
           "IGNORED_STATES"]

#: All 24 orders of the four gate blocks, the canonical one first.
GATE_PERMUTATIONS: tuple[str, ...] = tuple("".join(p) for p in itertools.permutations("ifgo"))

#: Worker failures (crash, hang) after which the search gives up: each costs a restart or a timeout.
MAX_WORKER_FAILURES = 3
#: Initial states an implementation may ignore, simplest first: each is tried under every convention.
IGNORED_STATES: tuple[tuple[str, ...], ...] = (("h0",), ("c0",), ("h0", "c0"))
_STATE_WORDS = {"h0": "initial hidden state h0", "c0": "initial cell state c0"}
#: How far beyond tolerance the quick screen of an ignored state lets outputs be before the real
#: comparison decides: wide, since a case's factors (its LayerNorm conditioning) widen the real
#: tolerance, and an ignored state that is not the explanation misses by orders of magnitude more.
_SCREEN_SLACK = 1e3


@dataclass
class Departure:
    """Where a trial first departs (see the module docstring for the order): the quantity, its
    timestep (None for a parameter gradient), the coordinates of the largest error at that step, and
    the number of steps T of the trial's case (a certification's findings come from other cases)."""

    quantity: str
    t: int | None
    coords: dict[str, Any]
    actual: float | None
    expected: float | None
    mismatched: int
    total: int
    T: int | None = None

    def where(self) -> str:
        """``"y, t=2 of T=3"`` or ``"dW"``: the short form a headline uses."""
        if self.t is None:
            return self.quantity
        return f"{self.quantity}, t={self.t}" + (f" of T={self.T}" if self.T is not None else "")

    def text(self) -> str:
        coords = dict(self.coords)
        final = self.quantity in ("h_T", "c_T") and self.t is not None
        at = format_coords(coords)
        whose = "the reverse direction's" if self.coords.get("direction") == "reverse" else "the"
        head = f"{self.quantity} (after {whose} last step, t={self.t})" if final else self.quantity
        values = (f"actual {self.actual:.6g}, expected {self.expected:.6g}; "
                  if self.actual is not None and self.expected is not None else "")
        return f"{head} at {at} ({values}{self.mismatched} of {self.total} elements over tolerance)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The adapter keywords a convention search replaces (an adapter's interface keeps the others:
#: harness.adapt re-reads an adapter in another convention, see its _readapted).
SEARCHED_KEYWORDS = frozenset({"gate_order", "transposed", "forget_bias", "batch_major", "layout"})


@dataclass
class Trial:
    """One convention tried: its worst forward error relative to tolerance, or the error it raised.

    ``as_declared``: the implementation exactly as given (no adapter around it)."""

    convention: Convention
    variant: str
    as_declared: bool = False
    ratio: float | None = None  # worst forward |error| / allowed over the trial cases; None if it errored
    error: str = ""
    records: list[Record] = field(default_factory=list)  # forward records of the worst case
    departure: Departure | None = None  # where the worst case first departs

    @property
    def matches(self) -> bool:
        return self.ratio is not None and self.ratio <= 1.0

    def describe(self, declared: str) -> str:
        if self.as_declared:
            return "the convention it declares"
        parts = []
        if self.variant != declared:
            parts.append(f"it computes the {self.variant} variant, not {declared}")
        conv = self.convention.describe()
        if conv:
            parts.append(conv)
        return "; ".join(parts) or "the convention it declares"

    def adapt_call(self, declared: str, given: Mapping[str, Any] | None = None) -> str:
        """``harness.adapt(impl, ...)`` that certifies it. ``given``: the adapter keywords the implementation
        was read with (a TARGET's command-line options), whose interface (names, per-gate form, biases,
        states) the search kept: the call then starts from what TARGET names and spells them out too."""
        if self.as_declared and not given:
            return "impl"
        kwargs = self._keywords(given)
        if self.variant != declared:
            kwargs = {"variant": self.variant, **kwargs}
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return f"harness.adapt(impl{', ' + args if args else ''})"

    def options(self, declared: str, given: Mapping[str, Any] | None = None) -> str:
        """The same convention as options of ``lstm-harness certify`` (for a TARGET or a --command), with
        the options it was ``given`` whose interface the search kept (see :meth:`adapt_call`)."""
        from harness.command_protocol import convention_arguments

        variant = ["--variant", self.variant] if self.variant != declared else []
        return " ".join(variant + convention_arguments(self._keywords(given))) or "(none)"

    def _keywords(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        kept = {k: v for k, v in (given or {}).items() if k not in SEARCHED_KEYWORDS}
        return {**kept, **({} if self.as_declared else self.convention.keywords())}

    def first_departure(self) -> str:
        return self.departure.text() if self.departure else ""

    @property
    def worst_quantity(self) -> str:
        bad = [r for r in self.records if r.status == "fail"]
        return max(bad, key=lambda r: r.ratio or 0.0).quantity if bad else ""


@dataclass
class Hint:
    """An initial state the implementation ignores: under ``trial``, its outputs are the standard
    LSTM's with ``states`` held at zero."""

    states: tuple[str, ...]
    trial: Trial

    def _standard(self, declared: str) -> bool:
        return self.trial.as_declared or (self.trial.variant == declared and self.trial.convention.is_standard)

    def text(self, declared: str) -> str:
        under = "as declared" if self._standard(declared) else f"if {self.trial.describe(declared)}"
        zero = " and ".join(f"{s} = 0" for s in self.states)
        words = " and its ".join(_STATE_WORDS[s] for s in self.states)
        return (f"With {zero} it matches the standard LSTM {under}: it ignores its {words}, or takes "
                f"{'it' if len(self.states) == 1 else 'them'} from somewhere else. Certify it to see the failing "
                f"case.")

    def headline(self, declared: str) -> str:
        words = " and its ".join(_STATE_WORDS[s] for s in self.states)
        under = "" if self._standard(declared) else f" (and {self.trial.describe(declared)})"
        return f"it ignores its {words}{under}"


@dataclass
class Diagnosis:
    """What :func:`diagnose` found. ``status``: "standard" (matches as declared, backward too),
    "backward" (forward matches as declared, backward does not), "convention" (matches only under
    another convention or variant), "none" (no convention tried matches: ``layer``, ``ignored`` and
    ``closest`` say what is known); ``note``: why the search ended early, when it did."""

    name: str
    declared_variant: str
    status: str
    match: Trial | None
    closest: Trial | None
    backward: list[Record]
    has_backward: bool
    tried: int
    note: str = ""
    hint: str = ""  # when nothing matches: an input it appears to ignore
    #: Every distinct reason trials could not run, with how many trials each, most frequent first.
    failures: list[tuple[str, int]] = field(default_factory=list)
    #: Trials that ran and did not match.
    mismatched: int = 0
    backward_departure: Departure | None = None
    ignored: Hint | None = None
    #: What its outputs as declared show about a bidirectional layer (directions swapped, states in
    #: direction-major order, the reverse direction's final state taken at the wrong end).
    layer: LayerFinding | None = None
    #: The adapter keywords it was given (a TARGET read with command-line options): the fix printed
    #: starts from what the TARGET names and keeps those of them a search does not replace.
    given: dict[str, Any] = field(default_factory=dict)

    def _backward_text(self) -> str:
        if not self.has_backward:
            return "It has no backward, so only the forward pass was diagnosed."
        bad = [r for r in self.backward if not r.ok]
        if not bad:
            return "Its backward pass matches too, under the same convention."
        broken = [r for r in bad if r.status != "fail"]
        if broken:
            return f"Its backward pass does not run under this convention: {broken[0].reason.splitlines()[0]}"
        names = ", ".join(dict.fromkeys(r.quantity for r in bad))
        worst = max(bad, key=lambda r: r.ratio or 0.0)
        first = f"first at {self.backward_departure.text()}; " if self.backward_departure else ""
        return (f"Its backward pass departs: {names} not close ({first}worst: {worst.quantity}, "
                f"{worst.ratio:.3g} x tolerance). Certify it to get the minimal failing case.")

    def _backward_headline(self) -> str:
        if not self.has_backward:
            return "it has no backward"
        bad = [r for r in self.backward if not r.ok]
        if not bad:
            return "its backward matches too"
        broken = [r for r in bad if r.status != "fail"]
        if broken:
            return "its backward does not run: " + broken[0].reason.splitlines()[0]
        where = self.backward_departure.where() if self.backward_departure else bad[0].quantity
        return f"its backward departs first at {where}"

    def headline(self) -> str:
        """One line a report can put on top."""
        if self.status == "standard":
            return f"{self.name} matches the standard LSTM as declared; {self._backward_headline()}"
        if self.status == "backward":
            return f"forward matches; {self._backward_headline()}"
        if self.status == "convention":
            assert self.match is not None
            line = f"it matches if {self.match.describe(self.declared_variant)}"
            backward = self._backward_headline()
            return line if backward == "its backward matches too" else f"{line}; {backward}"
        if self.layer is not None and self.layer.complete:
            return f"no convention explains it: {self.layer.headline()}"
        if self.ignored is not None:
            return f"no convention explains it: {self.ignored.headline(self.declared_variant)}"
        if self.closest is not None:
            line = f"no convention explains it; closest: {self.closest.describe(self.declared_variant)}"
            if self.closest.departure is not None:
                line += f", first departs at {self.closest.departure.where()}"
            return line
        if self.failures:
            return f"no convention explains it: no trial ran ({self.failures[0][0]})"
        return "no convention explains it"

    def _failure_lines(self) -> list[str]:
        if not self.failures:
            return []
        failed = sum(n for _, n in self.failures)
        lines = [f"{failed} of {self.tried} trials could not run" + (
            f" ({self.mismatched} ran and did not match)" if self.mismatched else "") + ":"]
        lines += [f"  {n} x {reason}" for reason, n in self.failures]
        return lines

    def text(self) -> str:
        tried = f"{self.tried} convention{'s' if self.tried != 1 else ''} tried"
        head = f"Diagnosis of {self.name} (declared variant: {self.declared_variant}; {tried})"
        lines = [head]
        if self.status == "standard":
            lines.append("It matches the standard LSTM as declared: no other convention is needed.")
            lines.append(self._backward_text())
        elif self.status == "backward":
            lines.append("Its forward pass matches the standard LSTM as declared.")
            lines.append(self._backward_text())
        elif self.status == "convention":
            assert self.match is not None
            lines.append(f"It matches the standard LSTM if {self.match.describe(self.declared_variant)}.")
            if self.match.convention.is_standard:
                lines.append(f"Declare variant = {self.match.variant!r} in the implementation, or certify it with "
                             f"--variant {self.match.variant}.")
            else:
                lines.append(f"Certify it as it is with {self.match.adapt_call(self.declared_variant, self.given)}, "
                             f"or on the command line with the options "
                             f"{self.match.options(self.declared_variant, self.given)}.")
            lines.append(self._backward_text())
        else:
            lines.append("No convention tried makes it match the standard LSTM.")
            if self.layer is not None:
                lines += self.layer.lines()
            if self.closest is not None:
                c = self.closest
                worst = f", in {c.worst_quantity}" if c.worst_quantity else ""
                lines.append(f"Closest: {c.describe(self.declared_variant)} (worst forward error {c.ratio:.3g} x "
                             f"tolerance{worst}).")
                departure = c.first_departure()
                if departure:
                    lines.append(f"It first departs at {departure}.")
            if self.hint:
                lines.append(self.hint)
            lines += self._failure_lines()
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def trial(t: Trial | None) -> dict[str, Any] | None:
            if t is None:
                return None
            return {"variant": t.variant, "convention": t.convention.keywords(), "as_declared": t.as_declared,
                    "ratio": t.ratio, "description": t.describe(self.declared_variant),
                    "adapt": t.adapt_call(self.declared_variant, self.given),
                    "options": t.options(self.declared_variant, self.given),
                    "first_departure": t.first_departure(),
                    "departure": t.departure.to_dict() if t.departure else None, "error": t.error}

        return {"name": self.name, "declared_variant": self.declared_variant, "status": self.status,
                "headline": self.headline(), "match": trial(self.match), "closest": trial(self.closest),
                "tried": self.tried, "hint": self.hint,
                "ignored_states": list(self.ignored.states) if self.ignored else [],
                "failures": [{"reason": r, "trials": n} for r, n in self.failures],
                "mismatched": self.mismatched, "backward": [r.to_dict() for r in self.backward],
                "backward_departure": self.backward_departure.to_dict() if self.backward_departure else None,
                "layer": self.layer.to_dict() if self.layer else None, "text": self.text()}


# --------------------------------------------------------------------------------------------------
# Where a comparison first departs


def _locate(rec: Record, actual: np.ndarray | None, expected: np.ndarray | None, t: int,
            case: Case) -> tuple[dict[str, Any], float | None, float | None]:
    """Coordinates, actual and expected of the largest error (relative to the record's tolerance)
    at timestep ``t`` of a quantity with a leading time axis; the record's worst when not computable."""
    worst = rec.worst or {}
    fallback = (dict(worst.get("coords", {})), worst.get("actual"), worst.get("expected"))
    if actual is None or expected is None or rec.rtol is None or rec.atol is None or actual.shape != expected.shape:
        return fallback
    a = np.asarray(actual[t], dtype=np.float64)
    e = np.asarray(expected[t], dtype=np.float64)
    allowed = rec.atol * (rec.atol_scale or 1.0) + rec.rtol * np.abs(e)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.abs(a - e) / allowed
    ratio = np.where(np.isfinite(ratio), ratio, np.inf)
    idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    spec = quantity_specs(rec.variant, case.structure)[rec.quantity]
    coords = decode_index((t, *(int(i) for i in idx)), spec, case.H, shape=actual.shape)
    return coords, float(a[idx]), float(e[idx])


def _first_departure(records: Sequence[Record], actual: Mapping[str, np.ndarray],
                     expected: Mapping[str, np.ndarray], case: Case) -> Departure | None:
    """The first failing record in time order (see the module docstring), located."""
    bad = [r for r in records if r.status == "fail"]
    if not bad:
        return None
    T = case.T
    backward_order = quantities(bad[0].variant, "backward", case.structure)

    def position(r: Record) -> tuple[int, int]:
        if r.quantity == "y":
            return (r.first_bad_t if r.first_bad_t is not None else T - 1, 0)
        if r.quantity in ("h_T", "c_T"):
            return (T - 1, 1 if r.quantity == "h_T" else 2)
        if r.quantity == "dx" and r.last_bad_t is not None:
            return (T - 1 - r.last_bad_t, 0)  # the backward pass reaches t = T-1 first
        if r.quantity in ("dh0", "dc0"):
            return (T - 1, 1 if r.quantity == "dh0" else 2)
        return (T, 3 + (backward_order.index(r.quantity) if r.quantity in backward_order else 0))

    first = min(bad, key=position)
    q = first.quantity
    if q in ("y", "dx") and (first.first_bad_t if q == "y" else first.last_bad_t) is not None:
        t: int | None = first.first_bad_t if q == "y" else first.last_bad_t
        assert t is not None
        coords, a, e = _locate(first, actual.get(q), expected.get(q), t, case)
    else:
        worst = first.worst or {}
        coords, a, e = dict(worst.get("coords", {})), worst.get("actual"), worst.get("expected")
        # the reverse direction's final state is the one after t = 0, its last step
        reverse = coords.get("direction") == "reverse"
        t = (0 if reverse else T - 1) if q in ("h_T", "c_T") else 0 if q in ("dh0", "dc0") else None
    return Departure(quantity=q, t=t, coords=coords, actual=a, expected=e, mismatched=first.mismatched,
                     total=first.total, T=T)


def _forward_arrays(execution: Any, reference: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    actual = dict(zip(FORWARD_QUANTITIES, execution.forward)) if execution.forward is not None else {}
    return actual, dict(reference.outputs or {})


def _backward_arrays(execution: Any, reference: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    actual = {"d" + k: v for k, v in (execution.gradients or {}).items()}
    return actual, {"d" + k: v for k, v in (reference.gradients or {}).items()}


# --------------------------------------------------------------------------------------------------
# Trial cases and their references


def _distance(trial: Trial) -> tuple[float, float]:
    """How far a convention is from matching: the sooner y departs, the farther; then the share of
    mismatched forward elements. Ties go to the simpler convention (``min`` keeps the first)."""
    y = next((r for r in trial.records if r.quantity == "y"), None)
    T = (y.case.get("T") if y is not None and y.case else None) or 0
    good_prefix = T if y is None or y.first_bad_t is None else y.first_bad_t
    total = sum(r.total for r in trial.records) or 1
    share = sum(r.mismatched for r in trial.records) / total
    return (-good_prefix, round(share, 2))


def _trial_cases(variant: str, dtype: str, ln_eps: float, structure: Structure) -> list[Case]:
    # T, B, D, H all distinct, and D != 4H: a misread axis shows as an error or a mismatch. In the
    # implementation's own structure, with lengths of their own per row when it takes them.
    return [build_case(CaseSpec(variant=variant, dtype=dtype, T=3, B=2, D=5, H=4, seed=seed, weight_scale="unit",
                                state="random", ln_eps=ln_eps, **structure_fields(structure)))
            for seed in (11, 12)]


def _zeroed(case: Case, names: Sequence[str]) -> Case:
    return dataclasses.replace(case, **{n: np.zeros_like(getattr(case, n)) for n in names}) if names else case


def _combined(a: Limits, b: Limits) -> Limits:
    if not b:
        return a
    if not a:
        return b
    return Limits(zero=a.zero + b.zero, unchecked={**b.unchecked, **a.unchecked})


class _References:
    """The trial cases of every variant and their references, each computed once: forward values
    alone for the search (the LSTM equations in float64), the finite-difference oracle's whole
    reference only for the backward of the match."""

    def __init__(self, dtype: str, ln_eps: float, structure: Structure):
        from oracles.finite_diff import FiniteDifferenceOracle

        class ForwardValues(FiniteDifferenceOracle):
            def reference(self, case: Case) -> Any:
                from oracles.base import Reference

                c = case.astype("float64")
                y, h_T, c_T = self._forward(c, c.x, c.h0, c.c0, c.params)
                return Reference(compute_dtype="float64", outputs={"y": y, "h_T": h_T, "c_T": c_T})

        self.oracle = FiniteDifferenceOracle()
        self._forward_oracle = ForwardValues()
        self._dtype, self._ln_eps, self._structure = dtype, ln_eps, structure
        self._cases: dict[str, list[Case]] = {}
        self._cache: dict[Any, tuple[list[Case], list[Any]]] = {}

    def cases(self, variant: str, zero: tuple[str, ...] = ()) -> list[Case]:
        if variant not in self._cases:
            self._cases[variant] = _trial_cases(variant, self._dtype, self._ln_eps, self._structure)
        return [_zeroed(c, zero) for c in self._cases[variant]]

    def get(self, variant: str, limits: Limits, zero: tuple[str, ...] = (), *,
            whole: bool = False) -> tuple[list[Case], list[Any]]:
        """The cases of ``variant`` with ``zero`` held at zero, and their references as ``limits``
        restrict them."""
        key = (variant, limits, zero, whole)
        if key not in self._cache:
            cases = self.cases(variant, zero)
            oracle = self.oracle if whole else self._forward_oracle
            restricted = RestrictedOracle(oracle, limits) if limits else oracle
            self._cache[key] = (cases, [restricted.reference(c) for c in cases])
        return self._cache[key]


def _close_enough(execution: Any, reference: Any, dtype: str, unchecked: Mapping[str, str]) -> bool:
    """A quick screen: whether the forward outputs are within a generous multiple of tolerance of the
    reference. False rules a match out; True is then decided by the real comparison."""
    if execution.forward is None or reference.outputs is None:
        return False
    tol = tolerance(dtype, "values")
    for q, a in zip(FORWARD_QUANTITIES, execution.forward):
        if q in unchecked:
            continue
        e = reference.outputs[q]
        if np.shape(a) != np.shape(e):
            return False
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        allowed = _SCREEN_SLACK * (tol.atol * scale + tol.rtol * np.abs(e))
        with np.errstate(invalid="ignore"):
            if not np.all(np.abs(np.asarray(a, dtype=np.float64) - e) <= allowed):
                return False
    return True


# --------------------------------------------------------------------------------------------------
# The search


#: Sequence layouts tried, time-major first: batch-major, then feature-first (course code's (D, B, T)).
SEARCHED_LAYOUTS: tuple[str, ...] = ("TBD", "BTD", "DBT")
_CONCATENATED = ("hx", "xh")
_BIAS_FORMS = ("single", "separate", "folded")


def _candidates(declared: str, own: Convention | None = None, *,
                other_biases: bool = False) -> Iterator[tuple[str, Convention]]:
    """Every convention tried, simplest first. ``own`` is the implementation's own (an adapter's): its
    interface (bias form, cell states, per-gate form, column biases) is kept; a per-gate matrix over
    [h; x] is also read over [x; h]; gate orders are permuted only for stacked gate blocks.

    ``other_biases``: instead, the same with its one bias read as two summed biases (b_ih + b_hh) and
    as a column of a folded matrix (its parameters then change names; the LayerNorm variant has no bias)."""
    own = own or Convention()
    variants = [declared] + [v for v in VARIANTS if v != declared]
    per_gates = [own.per_gate] + [f for f in _CONCATENATED if own.per_gate in _CONCATENATED and f != own.per_gate]
    orders = GATE_PERMUTATIONS if own.per_gate is None else (own.gate_order,)
    biases = [own.bias] if not other_biases else \
        [b for b in _BIAS_FORMS if own.bias == "single" and own.per_gate is None and b != "single"]
    for bias in biases:
        for variant in variants:
            if bias != own.bias and variant == "layernorm":
                continue
            for per_gate in per_gates:
                for layout in SEARCHED_LAYOUTS:
                    for transposed in (False, True):
                        for forget_bias in (0.0, 1.0):
                            for order in orders:
                                yield variant, dataclasses.replace(
                                    own, gate_order=order, transposed=transposed, forget_bias=forget_bias,
                                    layout=layout, batch_major=layout == "BTD", per_gate=per_gate, bias=bias)


class _StructureLost(Exception):
    """No cell convention can be tried on an implementation of a layer structure (its message says why)."""


def _same_convention(a: Convention, b: Convention) -> bool:
    return (a.gate_order, a.transposed, a.forget_bias, a.layout, a.per_gate, a.bias) == \
        (b.gate_order, b.transposed, b.forget_bias, b.layout, b.per_gate, b.bias)


class _Search:
    """Runs trials: each convention's forward on the trial cases, restricted by the declared limits,
    compared with the references; records the first ignored initial state seen on the way."""

    def __init__(self, subject: Any, refs: _References, *, dtype: str):
        self.subject = subject
        self.info = subject.info
        self.refs = refs
        self.dtype = dtype
        self.declared_limits = self.info.limits
        self.failures = 0
        self.hint: Hint | None = None
        self.layer: LayerFinding | None = None

    def run(self, trial: Trial, run: Any) -> None:
        """Fill in ``trial`` from the forward outputs of ``run``. One mismatching case rejects it."""
        from harness.isolation import WorkerFailure

        limits = _combined(self.declared_limits, run.info.limits)
        unchecked = dict(limits.unchecked)
        subject = RestrictedSubject(run, limits) if limits else run
        cases, references = self.refs.get(trial.variant, limits)
        executions: list[Any] = []
        worst = 0.0
        for case, ref in zip(cases, references):
            execution = subject.execute(case, backward=False)
            executions.append(execution)
            if isinstance(execution, WorkerFailure):
                self.failures += 1
            recs = compare_execution(execution, ref, case, implementation=self.info.name, oracle=self.refs.oracle,
                                     directions=("forward",))
            mark_unchecked(recs, unchecked)
            if any(r.status in ("error", "contract") for r in recs):
                trial.error = next(r.reason for r in recs if r.status in ("error", "contract"))
                trial.ratio = None
                trial.records = recs
                return
            ratio = max((r.ratio or 0.0) for r in recs)
            if ratio >= worst:
                worst, trial.records = ratio, recs
                if ratio > 1.0:
                    actual, expected = _forward_arrays(execution, ref)
                    trial.departure = _first_departure(recs, actual, expected, case)
            trial.ratio = worst
            if ratio > 1.0:
                break
        if trial.as_declared and trial.ratio is not None and not trial.matches and self.failures < MAX_WORKER_FAILURES:
            self._layer(trial, subject, limits, executions)
        if not trial.matches and self.hint is None and self.failures < MAX_WORKER_FAILURES:
            self._ignored_states(trial, subject, limits, executions)

    def _layer(self, trial: Trial, subject: Any, limits: Limits, executions: list[Any]) -> None:
        """What the outputs as declared show about a bidirectional layer or one with lengths
        (:mod:`harness.layer_diagnosis`)."""
        if not (self.info.structure.bidirectional or self.info.structure.lengths):
            return
        originals = self.refs.cases(trial.variant)
        for case in originals[len(executions):]:
            executions.append(subject.execute(case, backward=False))
        if any(e.forward is None for e in executions):
            return
        self.layer = recognise([_zeroed(c, limits.zero) for c in originals], [e.forward for e in executions],
                               unchecked=[q for q in FORWARD_QUANTITIES if q in limits.unchecked])

    def _ignored_states(self, trial: Trial, subject: Any, limits: Limits, executions: list[Any]) -> None:
        """Whether ``trial``'s outputs are the standard LSTM's with an initial state held at zero: the
        outputs it gave on the cases as they are, compared with the zeroed cases' references."""
        unchecked = dict(limits.unchecked)
        seen: set[tuple[str, ...]] = set()
        for states in IGNORED_STATES:
            zero = tuple(s for s in states if s not in limits.zero)
            if not zero or zero in seen:
                continue  # already zero by the declared limits, or the same as a simpler one
            seen.add(zero)
            cases, references = self.refs.get(trial.variant, limits, zero)
            originals = self.refs.cases(trial.variant)
            ok = True
            for i, (case, ref) in enumerate(zip(cases, references)):
                if i >= len(executions):
                    executions.append(subject.execute(originals[i], backward=False))
                execution = executions[i]
                if not _close_enough(execution, ref, case.dtype, unchecked):
                    ok = False
                    break
                recs = compare_execution(execution, ref, case, implementation=self.info.name,
                                         oracle=self.refs.oracle, directions=("forward",))
                mark_unchecked(recs, unchecked)
                if not all(r.ok for r in recs):
                    ok = False
                    break
            if ok:
                self.hint = Hint(states, trial)
                return


def diagnose_subject(subject: Any, *, dtype: str | None = None) -> Diagnosis:
    """Find the convention under which an already opened ``subject`` matches the standard LSTM.

    ``subject`` is what :func:`harness.session.open_subject` returns: an
    :class:`~harness.subject.InProcessSubject` (its ``impl`` is adapted in this process) or an
    :class:`~harness.isolation.IsolatedSubject` (adapted in its worker); it is not closed here.
    ``dtype`` of the trial cases defaults to the most precise one it declares. Bad arguments raise
    :class:`harness.session.InvalidArgument` (a ``ValueError``).
    """
    from harness.adapt import Adapted, adapt
    from harness.contract import validate
    from harness.session import InvalidArgument
    from harness.subject import InProcessSubject

    info = subject.info
    declared = info.variant
    if dtype is not None and dtype not in info.dtypes:
        raise InvalidArgument(f"dtype: {info.name} declares {', '.join(info.dtypes)}; got {dtype!r}")
    use_dtype = dtype or ("float64" if "float64" in info.dtypes else info.dtypes[0])
    isolated = callable(getattr(subject, "adapted", None))
    base_obj = getattr(subject, "impl", None)
    if not isolated and base_obj is None:
        raise InvalidArgument(f"subject: expected an opened implementation (an InProcessSubject or an "
                              f"IsolatedSubject, as harness.session.open_subject returns), got "
                              f"{type(subject).__name__}")
    # The convention the implementation itself is in, when it is an adapter seen here: the trial of that
    # convention is the as-declared one (an isolated adapter's is not known here, and is simply tried again).
    own = base_obj.convention if isinstance(base_obj, Adapted) else Convention()
    infos: dict[str, Any] = {}  # variant -> what validate() reads off an adapter (the same for every convention)

    def runner(v: str, conv: Convention) -> Any:
        if not info.structure.is_default:
            # adapt() applies a cell convention to a single-layer implementation only (a whole layer is
            # adapted by its state order, direction order and layout, which the layer readings cover).
            raise _StructureLost(f"The cell conventions (gate order, layout, transposition, biases, variant) were "
                                 f"not searched: adapters apply them to one cell, and {info.name} computes the "
                                 f"layer structure {info.structure.describe()}.")
        kwargs = {"variant": v, **conv.keywords()}
        if isolated:
            run = subject.adapted(**kwargs)
        else:
            adapted = adapt(base_obj, **kwargs)
            if v not in infos:
                infos[v] = validate(adapted)
            run = InProcessSubject(adapted, infos[v])
        return run

    refs = _References(use_dtype, info.ln_eps, info.structure)
    search = _Search(subject, refs, dtype=use_dtype)
    trials: list[Trial] = []
    match: Trial | None = None
    note = ""
    stop = (f"Stopped after {MAX_WORKER_FAILURES} crashes or timeouts of the implementation; the conventions not "
            f"yet tried were not diagnosed.")
    def other_biases() -> Iterator[tuple[str, Convention, bool]]:
        # Only when no trial so far could even run: an implementation that computes something from one
        # bias b is not explained by renaming its parameters, and each trial of a program costs a process.
        if not any(t.ratio is not None for t in trials):
            yield from ((v, c, False) for v, c in _candidates(declared, own, other_biases=True))

    plan: Iterator[tuple[str, Convention, bool]] = itertools.chain(
        [(declared, own, True)],
        ((v, c, False) for v, c in _candidates(declared, own)
         if isolated or v != declared or not _same_convention(c, own)),
        other_biases())
    for v, conv, as_declared in plan:
        trial = Trial(conv if not as_declared else Convention(), v, as_declared=as_declared)
        trials.append(trial)
        try:
            run = subject if as_declared else runner(v, conv)
        except _StructureLost as exc:  # no convention can be tried on it: the search ends here
            trials.pop()
            note = str(exc)
            break
        except Exception as exc:  # adapt() refused this combination, or the worker died adapting it
            trial.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, RuntimeError):
                search.failures += 1
                if search.failures >= MAX_WORKER_FAILURES:
                    note = stop
                    break
            continue
        search.run(trial, run)
        if trial.matches:
            match = trial
            break
        if search.layer is not None and search.layer.complete:
            break  # the layer structure explains every output: no cell convention is needed
        if search.failures >= MAX_WORKER_FAILURES:
            note = stop
            break
    backward: list[Record] = []
    backward_departure: Departure | None = None
    if match is not None and info.has_backward:
        run = subject if match.as_declared else runner(match.variant, match.convention)
        limits = _combined(info.limits, run.info.limits)
        restricted = RestrictedSubject(run, limits) if limits else run
        for case, ref in zip(*refs.get(match.variant, limits, whole=True)):
            execution = restricted.execute(case, backward=True)
            recs = compare_execution(execution, ref, case, implementation=info.name, oracle=refs.oracle,
                                     directions=("backward",))
            mark_unchecked(recs, dict(limits.unchecked))
            backward += recs
            found = _first_departure(recs, *_backward_arrays(execution, ref), case)
            if backward_departure is None:
                backward_departure = found
    if match is None:
        status = "none"
    elif match.as_declared:
        status = "standard" if all(r.ok for r in backward) else "backward"
    else:
        status = "convention"
    ran = [t for t in trials if t.ratio is not None]
    closest = min(ran, key=_distance) if ran and match is None else None
    hint = search.hint if match is None else None
    failures = Counter(t.error.splitlines()[0] for t in trials if t.error) if match is None else Counter()
    return Diagnosis(name=info.name, declared_variant=declared, status=status, match=match, closest=closest,
                     backward=backward, has_backward=info.has_backward, tried=len(trials), note=note,
                     hint=hint.text(declared) if hint else "", failures=failures.most_common(),
                     mismatched=len(ran) if match is None else 0, backward_departure=backward_departure,
                     ignored=hint, layer=search.layer if match is None else None)


def diagnose(impl: Any, *, variant: str | None = None, dtype: str | None = None, isolate: bool = False,
             timeout: float | None = None, memory_limit: int | None = None) -> Diagnosis:
    """Find the convention under which ``impl`` (an object or a TARGET string) matches the standard LSTM.

    ``variant`` is what it is meant to be (default: what it declares). ``dtype`` of the trial cases
    defaults to the most precise one it declares. With ``isolate=True`` it runs in a worker process.
    Bad arguments raise :class:`harness.session.InvalidArgument` (a ``ValueError``). Opens ``impl``
    and calls :func:`diagnose_subject`.
    """
    from harness.plugins import AdaptedTarget
    from harness.session import InvalidArgument, open_subject

    try:
        subject, _ = open_subject(impl, variant=variant, isolate=isolate, timeout=timeout,
                                  memory_limit=memory_limit)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    try:
        found = diagnose_subject(subject, dtype=dtype)
        found.given = dict(getattr(impl, "convention", None) or {}) if isinstance(impl, AdaptedTarget) else {}
        return found
    finally:
        close = getattr(subject, "close", None)
        if close:
            close()

