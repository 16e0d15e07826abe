"""lstm-harness: does an LSTM's forward pass and BPTT compute exactly the standard LSTM?

Public API (internal modules may change):
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from harness._version import __version__ as __version__

if TYPE_CHECKING:  # the names below, for type checkers; at run time each is imported on its first use
    from harness.adapt import adapt
    from harness.api import CertifyResult, certify, replay
    from harness.cases import Case, CaseSpec, build_case, case_specs, cases, load_case
    from harness.check import check_case
    from harness.command_protocol import command
    from harness.compare import TOLERANCES, Tolerance, compare_arrays
    from harness.contract import (
        GATES,
        VARIANTS,
        ContractError,
        ImplementationInfo,
        LSTMImplementation,
        check_inputs,
        validate,
    )
    from harness.limits import Limits
    from harness.records import Record, render_message
    from harness.runner import RunSettings, run_checks


__all__ = [
    "Case",
    "CaseSpec",
    "build_case",
    "case_specs",
    "cases",
    "load_case",
    "TOLERANCES",
    "Record",
    "Tolerance",
    "compare_arrays",
    "render_message",
    "GATES",
    "VARIANTS",
    "ContractError",
    "ImplementationInfo",
    "LSTMImplementation",
    "check_inputs",
    "validate",
    "Limits",
    "RunSettings",
    "check_case",
    "run_checks",
    "certify",
    "replay",
    "CertifyResult",
    "adapt",
    "command",
]

#: Where each public name lives. ``import harness.structure`` (which an implementation's module does, and so
#: does every worker process and every call of a program that uses the built-in implementations) does not
#: load the whole harness: the package imports a module when one of its names is first used.
_HOMES = {
    "adapt": "harness.adapt",
    "CertifyResult": "harness.api", "certify": "harness.api", "replay": "harness.api",
    **dict.fromkeys(("Case", "CaseSpec", "build_case", "case_specs", "cases", "load_case"), "harness.cases"),
    "check_case": "harness.check",
    "command": "harness.command_protocol",
    **dict.fromkeys(("TOLERANCES", "Tolerance", "compare_arrays"), "harness.compare"),
    **dict.fromkeys(("GATES", "VARIANTS", "ContractError", "ImplementationInfo", "LSTMImplementation", "check_inputs",
                     "validate"), "harness.contract"),
    "Limits": "harness.limits",
    **dict.fromkeys(("Record", "render_message"), "harness.records"),
    **dict.fromkeys(("RunSettings", "run_checks"), "harness.runner"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """This package, whose public ``adapt`` and ``cases`` are functions named like the modules that hold them.

    The import system sets a package's attribute to each submodule it loads, which would leave ``harness.adapt``
    the module once anything imported ``harness.adapt``; the functions keep their names, as they did when the
    package imported them up front.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
