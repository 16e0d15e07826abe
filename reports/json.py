"""``report.json``: the versioned, documented record of one run; every other report renders from it.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "tool": {"name": "lstm-harness", "version": "0.1.0"},
      "created": "2026-11-22T10:00:00+00:00",          # UTC, ISO 8601
      "command": "run" | "certify",
      "target": "impls.loop:LoopLSTM, ..." ,           # what was checked
      "verdict": "certified" | "discrepancies" | "error",
      "environment": {"python": ..., "platform": ..., "cpu": ..., "gpu": ... or null,
                      "packages": {"numpy": ..., "hypothesis": ..., "torch": ... or null, ...}},
      "target_info": {"name", "variant", "dtypes", "backward", "target", "loaded", "isolated"} or null,
                                                       # certify: what TARGET resolved to; "loaded" is
                                                       # {"text", "kind" (module | file | entry point),
                                                       #  "location", "attribute"} or null (an object)
      "settings": {"profile": ..., "max_examples": ..., "seed": ..., "dtypes": [...],
                   "oracles": [...], "timeout": ..., "jobs": ...,
                   # certify also: "isolate", "memory_limit" (bytes or null), "variant" (override or null)
                  },
      "tolerances": {"float64": {"values": {"rtol", "atol", "reason"}, "gradients": {...}},
                     "float32": {...}},
      "implementations": [{"name", "variant", "dtypes", "backward", "target"}],
      "oracles": [{"name", "available", "reason", "versions", "variants", "dtypes",
                   "forward", "gradients", "limitation"}],
      "counts": {"pass": n, "fail": n, "error": n, "contract": n, "skip": n},
      "notes": ["...", ...],                           # run-wide remarks, e.g. last-bit nondeterminism
      "records": [Record.to_dict(), ...]               # see harness.compare.Record
    }

A record's fields: implementation, oracle, variant, dtype, direction, quantity, status, method,
max_abs_error, max_rel_error, ratio, mismatched, total, nonfinite, worst {index, coords, actual,
expected, abs_error, allowed}, first_bad_t, last_bad_t, rtol, atol, atol_scale, tolerance_dtype,
tolerance_factors (what rtol and atol above were multiplied by, by reason), reason,
traceback, case {T, B, D, H, dtype, seed, spec}, error_map {quantity, panels}, examples,
case_file, replay, message. NaN is written as null and infinity as +-1e300 (strict JSON).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness._version import __version__
from harness.compare import TOLERANCES
from harness.files import write_atomically
from harness.findings import Finding, findings
from harness.records import STATUSES, Record, json_safe, verdict

__all__ = ["SCHEMA_VERSION", "build_report", "write_report", "read_report", "environment"]

SCHEMA_VERSION = 1

_PACKAGES = ("numpy", "hypothesis", "torch", "tensorflow", "tensorflow-cpu", "keras", "onnx", "onnxruntime",
             "jax", "jaxlib", "matplotlib", "jinja2")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + f" ({os.cpu_count()} logical cores)"


def _gpu() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cupy_distributions() -> dict[str, str | None]:
    """CuPy is one distribution per CUDA (or ROCm) major version: cupy-cuda12x, cupy-cuda13x, ...
    Every one installed, by name, or ``{"cupy": None}`` when there is none."""
    found: dict[str, str | None] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-"):
            found[name] = dist.version
    return dict(sorted(found.items())) or {"cupy": None}


def environment() -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    packages.update(_cupy_distributions())
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu(),
        "gpu": _gpu(),
        "packages": packages,
    }


def build_report(
    records: Sequence[Record],
    *,
    command: str,
    target: str,
    settings: dict[str, Any],
    implementations: Sequence[dict[str, Any]],
    oracles: Sequence[dict[str, Any]],
    target_info: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    found: Sequence[Finding] | None = None,
    diagnosis: dict[str, Any] | None = None,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The report as a dict. ``found``: the findings already computed from ``records`` (computed here if
    not given), so that the terminal, the JSON and the HTML show the same ones."""
    counts = Counter(r.status for r in records)
    if found is None:
        found = findings(records, [o.get("name", "") for o in oracles])
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "lstm-harness", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "target": target,
        "target_info": dict(target_info) if target_info is not None else None,
        "verdict": verdict(records, interrupted=interrupted),
        "interrupted": interrupted,
        "environment": environment(),
        "settings": dict(settings),
        "tolerances": {
            dtype: {kind: {"rtol": t.rtol, "atol": t.atol, "reason": t.reason} for kind, t in table.items()}
            for dtype, table in TOLERANCES.items()
        },
        "implementations": list(implementations),
        "oracles": list(oracles),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "notes": list(notes),
        "findings": [json_safe(f.to_dict()) for f in found],
        "diagnosis": json_safe(diagnosis),
        "records": [r.to_dict() for r in records],
    }


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    return write_atomically(path, json.dumps(report, indent=1, allow_nan=False) + "\n")


#: The largest report.json read back (a report of every built-in against every oracle is a few MB).
MAX_REPORT_BYTES = 256 * 2**20
_RECORD_KEYS = ("implementation", "oracle", "variant", "dtype", "direction", "quantity", "status")


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a report.json and check that this version of the tool can read it: its size, its JSON, its
    schema version, and every record's identifying fields and status. ``ValueError`` says what is wrong."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_REPORT_BYTES:
        raise ValueError(f"{path}: expected a report.json of at most {MAX_REPORT_BYTES // 2**20} MiB, got "
                         f"{size / 2**20:.0f} MiB")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{path}: the JSON is nested too deeply to be a report.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: expected a report.json with schema_version {SCHEMA_VERSION}, got {version!r}")
    records = data.get("records")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records under 'records', got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i}: expected an object, got {type(r).__name__}")
        bad = [k for k in _RECORD_KEYS if not isinstance(r.get(k), str)]
        if bad:
            raise ValueError(f"{path}: record {i}: expected text fields {', '.join(bad)}")
        if r["status"] not in STATUSES:
            raise ValueError(f"{path}: record {i}: expected a status among {', '.join(STATUSES)}, got "
                             f"{r['status']!r}")
    if data.get("verdict") not in ("certified", "discrepancies", "error"):
        raise ValueError(f"{path}: expected a verdict certified, discrepancies or error, got {data.get('verdict')!r}")
    for key in ("findings", "notes", "oracles", "implementations"):
        if key in data and not isinstance(data[key], list):
            raise ValueError(f"{path}: expected a list under {key!r}, got {type(data[key]).__name__}")
    return data


def records_of(report: dict[str, Any]) -> list[Record]:
    return [Record.from_dict(r) for r in report["records"]]
