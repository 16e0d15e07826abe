"""What an oracle is: a case in, reference outputs and reference gradients out.

An oracle declares the variants it covers, the dtypes it computes in, and whether it gives
gradients. Its framework is imported lazily: a missing framework makes the oracle *unavailable* with
the reason, it never breaks an import of the harness.

Oracles receive the case in the implementation's dtype and upcast it themselves
(:meth:`Oracle.compute_dtype_for`), so that float32 inputs reach a float64 oracle exactly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.cases import Case
from harness.structure import FEATURES, Structure

__all__ = ["Oracle", "Reference", "Availability", "Projection", "module_available", "modules_installed"]


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class Projection:
    """Directional derivatives of L = <dy, y> + <dh_T, h_T> + <dc_T, c_T> along random directions.

    ``directions`` (K, *shape of the input); ``values`` (K,) the derivative along each;
    ``error_bound`` (K,) the oracle's own error model for each value.
    """

    directions: np.ndarray
    values: np.ndarray
    error_bound: np.ndarray


@dataclass
class Reference:
    """What an oracle computed for one case.

    ``outputs``: y, h_T, c_T (None if the oracle gives no forward values).
    ``gradients``: by gradient key x, h0, c0, W, ... (None if forward only).
    ``gradient_error``: optional elementwise error bounds of the oracle's own, added to tolerance.
    ``projections``: by gradient key, for oracles that only give directional derivatives.
    ``compute_dtype``: the precision the oracle worked in.
    """

    compute_dtype: str
    outputs: dict[str, np.ndarray] | None = None
    gradients: dict[str, np.ndarray] | None = None
    gradient_error: dict[str, np.ndarray] | None = None
    projections: dict[str, Projection] | None = None
    notes: str = ""


def module_available(*modules: str) -> Availability:
    """Availability from importing ``modules``; the reason names the missing one."""
    versions: dict[str, str] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a framework that fails while importing
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, ModuleNotFoundError):
                return Availability(False, f"{name} is not installed")
            return Availability(False, f"{name} failed to import: {first}")
        version = getattr(mod, "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
        versions[name] = str(version)
    return Availability(True, "", versions)


def modules_installed(*modules: str) -> Availability:
    """Whether ``modules`` are installed, found without importing them (importing TensorFlow alone
    takes seconds); the reason names the missing one."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken parent package, or a module with no spec
            found = False
        if not found:
            return Availability(False, f"{name} is not installed")
    return Availability(True)


class Oracle(ABC):
    """Base class of every oracle. Subclasses set the class attributes and implement ``reference``."""

    name: str = ""
    description: str = ""
    variants: tuple[str, ...] = ("vanilla",)
    #: dtypes the oracle can compute in, best first; float64 oracles see float32 cases upcast.
    compute_dtypes: tuple[str, ...] = ("float64",)
    gives_forward: bool = True
    gives_gradients: bool = True
    #: Said in every summary that includes this oracle, e.g. "forward only".
    limitation: str = ""
    #: The layer-structure features (:data:`harness.structure.FEATURES`) this oracle computes; a case
    #: whose structure uses another one is not checked against it. Nothing beyond one cell by default.
    structures: frozenset[str] = frozenset()
    #: Why the framework cannot compute some of :data:`FEATURES`, added to the reason a case needing
    #: one of them gets (e.g. "onnx.reference ignores the LSTM's sequence_lens and input_forget").
    structures_note: str = ""

    #: Rough seconds a process spends before this oracle's first case (importing its framework, first
    #: compilations) on a small machine. Parallel runs start the costliest family first; nothing else
    #: depends on it.
    setup_cost: float = 0.0
    #: The modules the oracle imports, when it needs any: :meth:`installed` looks for them without
    #: importing them. Empty: nothing is known without the probe, so :meth:`installed` runs it.
    requires: tuple[str, ...] = ()

    _availability: Availability | None = None

    def availability(self) -> Availability:
        """Whether the oracle can run here: its frameworks imported and checked (once, then kept)."""
        if self._availability is None:
            self._availability = self._probe()
        return self._availability

    def probed_elsewhere(self, availability: Availability) -> None:
        """Keep the availability another process found for this oracle (a parallel child that ran it),
        so that describing it here imports nothing."""
        if self._availability is None:
            self._availability = availability

    def installed(self) -> Availability:
        """Whether the oracle's frameworks are installed, as far as can be told without importing them.

        The default choice of oracles uses this: importing every framework to choose (TensorFlow and
        torch, 6 s on two cores) took place in the process that only hands units to parallel children,
        which then imported them again. An oracle that is installed but fails its probe
        (:meth:`availability`) later has its checks skipped with the probe's reason, and the summary
        says so.
        """
        if self._availability is not None or not self.requires:
            return self.availability()
        return modules_installed(*self.requires)

    def _probe(self) -> Availability:
        return Availability(True)

    def unsupported_reason(self, variant: str, dtype: str, structure: Structure | None = None) -> str | None:
        """None when this oracle can check ``variant`` at ``dtype`` (in ``structure``, when given), else the
        reason it cannot."""
        avail = self.availability()
        if not avail.available:
            return f"{self.name} unavailable: {avail.reason}"
        if variant not in self.variants:
            return f"{self.name} does not support the {variant} variant (covers {', '.join(self.variants)})"
        if self.compute_dtype_for(dtype) is None:
            return f"{self.name} cannot compute a {dtype} case (computes in {', '.join(self.compute_dtypes)})"
        missing = sorted((structure or Structure()).features() - self.structures, key=FEATURES.index)
        if missing:
            computes = ", ".join(f for f in FEATURES if f in self.structures) or "one layer, one direction, full length"
            note = f"; {self.structures_note}" if self.structures_note else ""
            return f"{self.name} does not compute {', '.join(missing)} (computes {computes}){note}"
        return None

    def case_reason(self, case: Case) -> str | None:
        """None when this oracle computes ``case``'s structure, else why not: :meth:`unsupported_reason`
        for its features; an oracle with limits that depend on the sizes too (torch.nn.LSTM's projection
        must be smaller than H) adds them here."""
        return self.unsupported_reason(case.variant, case.dtype, case.structure)

    def compute_dtype_for(self, dtype: str) -> str | None:
        """float64 whenever offered (exact upcast); otherwise the case's own dtype, if offered."""
        if "float64" in self.compute_dtypes:
            return "float64"
        return dtype if dtype in self.compute_dtypes else None

    @abstractmethod
    def reference(self, case: Case) -> Reference:
        """Reference outputs and gradients (for the case's upstream gradients) of ``case``."""

    def describe(self) -> dict[str, Any]:
        avail = self.availability()
        return {
            "name": self.name,
            "description": self.description,
            "available": avail.available,
            "reason": avail.reason,
            "versions": avail.versions,
            "variants": list(self.variants),
            "dtypes": list(self.compute_dtypes),
            "forward": self.gives_forward,
            "gradients": self.gives_gradients,
            "limitation": self.limitation,
            "structures": [f for f in FEATURES if f in self.structures],
        }
