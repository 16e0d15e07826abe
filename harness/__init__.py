"""lstm-harness: does an LSTM's forward pass and BPTT compute exactly the standard LSTM?

Public API (internal modules may change):
"""

from harness.cases import Case, CaseSpec, build_case, case_specs, cases, load_case
from harness.compare import TOLERANCES, Record, Tolerance, compare_arrays, render_message
from harness.contract import (
    GATES,
    VARIANTS,
    ContractError,
    ImplementationInfo,
    LSTMImplementation,
    check_inputs,
    validate,
)
from harness.runner import RunSettings, check_case, run_checks

__version__ = "0.1.0"  # before the imports below: reports.json reads it

from harness.adapt import adapt  # noqa: E402
from harness.api import CertifyResult, certify, replay  # noqa: E402
from harness.command_protocol import command  # noqa: E402

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
    "RunSettings",
    "check_case",
    "run_checks",
    "certify",
    "replay",
    "CertifyResult",
    "adapt",
    "command",
]
