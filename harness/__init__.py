"""lstm-harness: does an LSTM's forward pass and BPTT compute exactly the standard LSTM?

Public API (internal modules may change):
"""

from harness._version import __version__ as __version__
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
