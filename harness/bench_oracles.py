"""How many cases per second each oracle answers, on the small cases a certification run draws.

Cases are drawn like Hypothesis draws them for ``lstm-harness run`` (T <= 10, B <= 4, D <= 16,
H <= 16, every weight scale), vanilla in the first dtype each oracle computes in, from a fixed
seed so that every oracle sees the same shapes. Only ``oracle.reference(case)`` is timed. A
warm-up pass over ``warmup`` cases first pays for imports, layer builds and graph tracing; the
measured cases are then further cases from the same distribution, so a cache keyed too finely
(by every shape) still shows in the rate. Targets from the framework-oracle issue: at least 100
cases/s for the PyTorch oracles and 30 for the TensorFlow ones.

    python -m harness.bench_oracles [--oracle NAME ...] [--cases N] [--warmup N] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from harness import registry
from harness.cases import WEIGHT_SCALES, CaseSpec, build_case

__all__ = ["oracle_rates", "bench_cases", "TARGETS", "main"]

#: Minimum cases per second, by oracle name prefix (the issue's targets).
TARGETS: dict[str, float] = {"torch-": 100.0, "tf-": 30.0, "jax-": 100.0}

MAX_T, MAX_B, MAX_D, MAX_H = 10, 4, 16, 16


def _target(name: str) -> float | None:
    for prefix, rate in TARGETS.items():
        if name.startswith(prefix):
            return rate
    return None


def bench_cases(n: int, *, dtype: str, variant: str = "vanilla", seed: int = 0) -> list[Any]:
    """``n`` small cases, the same for every oracle given the same seed."""
    rng = np.random.default_rng(seed)
    scales = sorted(WEIGHT_SCALES)
    min_H = 2 if variant == "layernorm" else 1
    out = []
    for k in range(n):
        spec = CaseSpec(
            variant=variant, dtype=dtype,
            T=int(rng.integers(1, MAX_T + 1)), B=int(rng.integers(1, MAX_B + 1)),
            D=int(rng.integers(1, MAX_D + 1)), H=int(rng.integers(min_H, MAX_H + 1)),
            seed=int(rng.integers(0, 2**32)) + k, weight_scale=scales[int(rng.integers(len(scales)))],
        )
        out.append(build_case(spec))
    return out


def oracle_rates(oracle_names: Sequence[str] | None = None, *, n_cases: int = 200,
                 warmup: int = 20) -> list[dict[str, Any]]:
    """One row per oracle: cases per second of ``reference()`` after warm-up, or why it was skipped."""
    if n_cases < 1:
        raise ValueError(f"n_cases: expected an int >= 1, got {n_cases!r}")
    if warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    oracles = registry.oracles()
    if oracle_names:
        known = {o.name: o for o in oracles}
        unknown = [n for n in oracle_names if n not in known]
        if unknown:
            raise ValueError(f"oracle_names: expected names from {sorted(known)}, got {unknown}")
        oracles = [known[n] for n in oracle_names]
    rows = []
    for oracle in oracles:
        row: dict[str, Any] = {"oracle": oracle.name, "target": _target(oracle.name)}
        variant = "vanilla" if "vanilla" in oracle.variants else oracle.variants[0]
        dtype = next((d for d in ("float64", "float32") if oracle.supports(variant, d) is None), None)
        if dtype is None:
            row.update(available=False, reason=oracle.supports(variant, "float64") or "no dtype")
            rows.append(row)
            continue
        compute = oracle.compute_dtype_for(dtype)
        cases = bench_cases(warmup + n_cases, dtype=dtype, variant=variant)
        start = time.perf_counter()
        for case in cases[:warmup]:
            oracle.reference(case)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for case in cases[warmup:]:
            oracle.reference(case)
        seconds = time.perf_counter() - start
        rate = n_cases / seconds
        row.update(available=True, variant=variant, dtype=dtype, compute_dtype=compute, cases=n_cases,
                   seconds=seconds, cases_per_s=rate, warmup_cases=warmup, warmup_seconds=warm,
                   gradients=oracle.gives_gradients,
                   meets_target=None if row["target"] is None else rate >= row["target"])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["oracle", "dtype", "what", "cases/s", "target", "ok", "warm-up"]
    body = []
    for r in rows:
        if not r.get("available"):
            body.append([r["oracle"], "-", "-", "-", "-", "-", f"skipped: {r.get('reason', '')}"])
            continue
        target = "-" if r["target"] is None else f">= {r['target']:.0f}"
        ok = "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")
        what = "fwd+grad" if r["gradients"] else "forward"
        warm = f"{r['warmup_cases']} cases in {r['warmup_seconds']:.2f}s"
        body.append([r["oracle"], r["compute_dtype"], what, f"{r['cases_per_s']:.0f}", target, ok, warm])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench_oracles",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--oracle", action="append", metavar="NAME", help="oracle to time (repeatable)")
    parser.add_argument("--cases", type=int, default=200, help="measured cases per oracle (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up cases per oracle (default 20)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows = oracle_rates(args.oracle, n_cases=args.cases, warmup=args.warmup)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"Oracle throughput: vanilla cases, T <= {MAX_T}, B <= {MAX_B}, D <= {MAX_D}, H <= {MAX_H}, "
              f"{args.cases} measured after {args.warmup} warm-up cases")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
