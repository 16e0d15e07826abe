"""How many cases per second each oracle answers, on the cases a default certification draws.

Cases are the ones ``lstm-harness certify`` draws: :func:`harness.cases.case_specs` with the sizes
of :class:`harness.runner.RunSettings` (T, B, D, H up to 8, 4, 8, 8, every weight scale), generated
by Hypothesis under the ``ci`` profile (derandomized, so every run and every oracle sees the same
cases), vanilla in the first dtype each oracle can check. Only ``oracle.reference(case)`` is timed.
A warm-up over the first ``warmup`` cases pays for imports, layer builds and graph tracing; the
measured cases are further cases from the same distribution, so a cache keyed too finely (by every
shape) still shows in the rate. Goals: at least 50 cases/s for finite differences, 100 for the
PyTorch and JAX oracles, 30 for the TensorFlow ones.

    python -m bench.oracles [--oracle NAME ...] [--cases N] [--warmup N] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from hypothesis import given
from hypothesis import seed as hypothesis_seed

from bench.common import Section, render, verdict
from harness import registry
from harness.cases import Case, CaseSpec, build_case, case_specs
from harness.runner import RunSettings

__all__ = ["GOALS", "draw_specs", "bench_cases", "oracle_rates", "oracle_section", "main"]

#: Minimum cases per second, by oracle name prefix.
GOALS: dict[str, float] = {"finite-differences": 50.0, "torch-": 100.0, "tf-": 30.0, "jax-": 100.0}


def _goal(name: str) -> float | None:
    return next((rate for prefix, rate in GOALS.items() if name.startswith(prefix)), None)


def draw_specs(n: int, *, dtype: str, variant: str = "vanilla", seed: int = 0) -> tuple[list[CaseSpec], float]:
    """The first ``n`` specs a default certification draws, and the seconds Hypothesis took to draw them.

    The test body only collects the spec, so the time is Hypothesis's own cost per case.
    """
    run = RunSettings(max_examples=n)
    strategy = case_specs(variants=(variant,), dtypes=(dtype,), max_T=run.max_T, max_B=run.max_B,
                          max_D=run.max_D, max_H=run.max_H)
    specs: list[CaseSpec] = []

    def collect(spec: CaseSpec) -> None:
        specs.append(spec)

    test = hypothesis_seed(seed)(run.hypothesis_settings()(given(strategy)(collect)))
    start = time.perf_counter()
    test()
    return specs[:n], time.perf_counter() - start


def bench_cases(n: int, *, dtype: str, variant: str = "vanilla", seed: int = 0) -> list[Case]:
    """``n`` cases of a default certification, the same for every oracle."""
    specs, _ = draw_specs(n, dtype=dtype, variant=variant, seed=seed)
    return [build_case(spec) for spec in specs]


def _unsupported(oracle: Any, variant: str, dtype: str) -> str | None:
    return oracle.unsupported_reason(variant, dtype)


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
    return [_rate(oracle, n_cases, warmup) for oracle in oracles]


def _rate(oracle: Any, n_cases: int, warmup: int) -> dict[str, Any]:
    row: dict[str, Any] = {"oracle": oracle.name, "goal": _goal(oracle.name)}
    variant = "vanilla" if "vanilla" in oracle.variants else oracle.variants[0]
    dtype = next((d for d in ("float64", "float32") if _unsupported(oracle, variant, d) is None), None)
    if dtype is None:
        row.update(available=False, reason=_unsupported(oracle, variant, "float64") or "no dtype")
        return row
    cases = bench_cases(warmup + n_cases, dtype=dtype, variant=variant)
    start = time.perf_counter()
    for case in cases[:warmup]:
        oracle.reference(case)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for case in cases[warmup:]:
        oracle.reference(case)
    seconds = time.perf_counter() - start
    rate = len(cases[warmup:]) / seconds
    row.update(available=True, variant=variant, dtype=dtype, compute_dtype=oracle.compute_dtype_for(dtype),
               cases=len(cases[warmup:]), seconds=seconds, cases_per_s=rate, warmup_cases=warmup,
               warmup_seconds=warm, gradients=oracle.gives_gradients,
               meets_goal=None if row["goal"] is None else rate >= row["goal"])
    return row


def oracle_section(rows: Sequence[dict[str, Any]], *, title: str = "Oracle throughput") -> Section:
    body, skipped = [], []
    for r in rows:
        if not r.get("available"):
            body.append([r["oracle"], "-", "-", "-", "-", "-", "-", "skipped"])
            skipped.append(f"{r['oracle']} skipped: {r.get('reason', '')}")
            continue
        goal = "-" if r["goal"] is None else f">= {r['goal']:.0f}"
        warm = f"{r['warmup_cases']} in {r['warmup_seconds']:.2f} s"
        body.append([r["oracle"], r["compute_dtype"], "fwd+grad" if r["gradients"] else "forward",
                     f"{r['cases_per_s']:.0f}", f"{1e3 / r['cases_per_s']:.1f}", goal, verdict(r["meets_goal"]),
                     warm])
    measured = next((r for r in rows if r.get("available")), None)
    note = (f"{measured['cases']} cases timed after the warm-up, drawn as a default certify draws them "
            f"(Hypothesis ci profile, T<=8 B<=4 D<=8 H<=8, vanilla)" if measured else "no oracle is available")
    return Section(title, ["oracle", "computes in", "gives", "cases/s", "ms/case", "goal", "goal met", "warm-up"],
                   body, notes=[note], footer=skipped)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oracles", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--oracle", action="append", metavar="NAME", help="oracle to time (repeatable)")
    parser.add_argument("--cases", type=int, default=200, help="measured cases per oracle (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up cases per oracle (default 20)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows = oracle_rates(args.oracle, n_cases=args.cases, warmup=args.warmup)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(rows, indent=2) if args.json else render(oracle_section(rows)), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
