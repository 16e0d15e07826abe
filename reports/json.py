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
                      "packages": {"numpy": ..., "tensorflow-cpu": ..., ...},  # installed, real names
                      "provides": {"tensorflow": ["tensorflow-cpu"], ...},    # import name -> those
                      "missing": ["cupy", ...]},                              # no distribution provides
      "target_info": {"name", "variant", "dtypes", "backward", "target", "loaded", "isolated"} or null,
                                                       # certify: what TARGET resolved to; "loaded" is
                                                       # {"text", "kind" (module | file | entry point),
                                                       #  "location", "attribute"} or null (an object)
      "settings": {"profile": ..., "max_examples": ..., "seed": ..., "dtypes": [...],
                   "oracles": [...], "timeout": ..., "jobs": ...,
                   # certify also: "isolate", "memory_limit" (bytes or null), "variant" (override or null)
                   # from harness.cases.PROFILES: "examples_per_search" (max_examples, else the
                   # profile's), "derandomize", "seed_policy" (one sentence)
                  },
      "tolerances": {"float64": {"values": {"rtol", "atol", "reason"}, "gradients": {...}},
                     "float32": {...}},
      "implementations": [{"name", "variant", "dtypes", "backward", "target"}],
      "oracles": [{"name", "available", "reason", "versions", "variants", "dtypes",
                   "forward", "gradients", "limitation"}],
      "counts": {"pass": n, "fail": n, "error": n, "contract": n, "skip": n},
      "notes": ["...", ...],                           # run-wide remarks, e.g. last-bit nondeterminism
      "units": null or {"planned": ["float64-vs-torch", ...],   # a certification cut into one unit per
                        "run": [...], "shard": "K/N" or null,   # dtype and oracle: every unit's name,
                        "parts": [...]},                         # those this report holds, its shard;
                                                       # a merged report: "parts" = [{"file", "shard",
                                                       # "run", "created", "environment"}] (harness.merge)
      "records": [Record.to_dict(), ...]               # see harness.compare.Record
    }

A record's fields: implementation, oracle, variant, dtype, direction, quantity, status, method,
max_abs_error, max_rel_error, ratio, mismatched, total, nonfinite, worst {index, coords, actual,
expected, abs_error, allowed}, first_bad_t, last_bad_t, first_bad_by_direction (in a bidirectional
structure: {forward|reverse: {t, step}}, where each direction first departs in its own reading order),
rtol, atol, atol_scale, tolerance_dtype, tolerance_factors (what rtol and atol above were multiplied by,
by reason), reason, traceback, case {T, B, D, H, dtype, seed, spec, and for a structured case structure
(harness.structure.Structure.to_dict()) and lengths}, error_map {quantity, panels}, examples,
case_file, replay, worst_seen (a failure's largest error seen, with its case), notes, skipped_cases
({reason: cases} the oracle was skipped on, not computing their layer structure; absent in reports written
before it, read as {}), widened_cases (of the examples, the float32 cases that passed this direction only
with the tolerance widened by the case's amplification of rounding; 0 when absent), message. NaN is
written as null and infinity as +-1e300 (strict JSON).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness._version import __version__
from harness.cases import PROFILES
from harness.compare import TOLERANCES
from harness.files import write_atomically
from harness.findings import Finding, findings
from harness.records import STATUSES, Record, json_safe, verdict

__all__ = ["SCHEMA_VERSION", "build_report", "write_report", "read_report", "environment", "settled"]

SCHEMA_VERSION = 1

#: What the environment panel names, by import name: the distributions that provide each are recorded
#: under their real names (tensorflow may come as tensorflow-cpu, cupy as cupy-cuda12x, onnxruntime as
#: onnxruntime-gpu); an import name no installed distribution provides is "missing".
_IMPORTS = ("numpy", "hypothesis", "torch", "tensorflow", "keras", "onnx", "onnxruntime", "jax", "jaxlib",
            "cupy", "matplotlib", "jinja2")


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


def _canonical(name: str) -> str:
    """A distribution's name as the package index spells it (PEP 503): ``tensorflow_cpu`` -> ``tensorflow-cpu``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _providers() -> dict[str, list[str]]:
    """Import name -> the installed distributions that provide it, by their metadata names."""
    try:
        by_module = importlib.metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - a broken distribution must not stop a report
        by_module = {}
    out: dict[str, list[str]] = {}
    for module in _IMPORTS:
        names = []
        for dist in dict.fromkeys(by_module.get(module, [])):
            try:
                names.append(_canonical(importlib.metadata.distribution(dist).metadata["Name"] or dist))
            except importlib.metadata.PackageNotFoundError:
                continue
        out[module] = names
    return out


def environment() -> dict[str, Any]:
    """Python, platform, CPU, GPU, and the installed distributions that matter to a run.

    ``packages`` maps each installed distribution to its version, under its real name (``tensorflow-cpu``
    when that is what provides ``import tensorflow``); ``provides`` maps each import name to the
    distributions that provide it; ``missing`` lists the import names that none provides.
    """
    providers = _providers()
    packages: dict[str, str] = {}
    for names in providers.values():
        for name in names:
            packages[name] = importlib.metadata.version(name)
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu(),
        "gpu": _gpu(),
        "packages": packages,
        "provides": {module: names for module, names in providers.items() if names},
        "missing": [module for module, names in providers.items() if not names],
    }


def _seed_policy(seed: int | None, derandomize: bool) -> str:
    if seed is not None:
        return f"fixed: {seed} (--seed)"
    if derandomize:
        return "derandomized: the same cases on every run (the seed comes from the check itself)"
    return "random: a new seed on every run"


def settled(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with what the run actually used, from :data:`harness.cases.PROFILES`:
    ``examples_per_search`` (``max_examples`` when given, else the profile's), ``derandomize`` and
    ``seed_policy``. Keys already present are kept, so a report read back renders as it was written."""
    out = dict(settings)
    profile = PROFILES.get(str(out.get("profile")))
    if profile is None:
        return out
    given = out.get("max_examples")
    out.setdefault("examples_per_search", given if given is not None else profile.get("max_examples"))
    out.setdefault("derandomize", bool(profile.get("derandomize", False)))
    out.setdefault("seed_policy", _seed_policy(out.get("seed"), bool(out["derandomize"])))
    return out


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
    units: dict[str, Any] | None = None,
    environment_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a dict. ``found``: the findings already computed from ``records`` (computed here if
    not given), so that the terminal, the JSON and the HTML show the same ones. ``units``: which units of
    the certification the report holds (see the schema); ``environment_info``: the environment the records
    came from, when that is not this process's (a merged report keeps its first part's)."""
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
        "environment": environment_info if environment_info is not None else environment(),
        "settings": settled(settings),
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
        "units": json_safe(units),
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
