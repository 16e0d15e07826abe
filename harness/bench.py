"""Benchmark tables: implementation speed against this machine's matmul rate, measured in one run.

    python -m harness.bench            # full grid, includes T=100, B=32, D=H=256 float32
    python -m harness.bench --quick    # smaller grid, for a smoke run
    python -m harness.bench --oracles  # add oracle throughput (cases/s) on small cases

Times are the best of several repeats after a warm-up (the machines are shared; the minimum is the
least disturbed estimate). FLOP counts for the vanilla LSTM: forward 8*T*B*H*(D+H) (the four gates'
input and recurrent GEMMs), backward twice that (the gradients with respect to the inputs and to
the weights), so forward+backward is 24*T*B*H*(D+H). Gate arithmetic is not counted.

This is the only place performance is judged: no unit test is timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from harness.cases import CaseSpec, build_case
from harness.registry import implementations

__all__ = ["matmul_rate", "time_best", "bench_impl", "main", "SHAPES", "TARGET_SHAPE"]

#: (T, B, D, H, dtype). The first is the shape the issue's target is stated at.
TARGET_SHAPE = (100, 32, 256, 256, "float32")
SHAPES = [TARGET_SHAPE, (100, 32, 256, 256, "float64"), (50, 64, 128, 128, "float32"), (20, 16, 512, 512, "float32")]
QUICK_SHAPES = [(20, 8, 64, 64, "float32"), TARGET_SHAPE]
TARGET_FRACTION = 0.60


def time_best(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, budget: float = 20.0) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs (fewer if ``budget`` seconds run out)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        spent += elapsed
        if spent > budget:
            break
    return best


def matmul_rate(dtype: str = "float32", n: int = 2048) -> float:
    """This machine's NumPy matmul rate in GFLOP/s for square n x n x n products."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    seconds = time_best(lambda: a @ b, repeats=7, warmup=2)
    return 2.0 * n**3 / seconds / 1e9


def target_fraction(rounds: int = 9) -> tuple[float, float, float]:
    """stacked fwd+bwd rate over the matmul rate at the target shape, timed in alternating rounds.

    On a shared machine the load changes from second to second; alternating the two measurements
    and taking the best of each compares them under the same conditions.
    Returns (fraction, matmul GFLOP/s, stacked GFLOP/s).
    """
    from impls.stacked import StackedLSTM

    T, B, D, H, dtype = TARGET_SHAPE
    impl = StackedLSTM()
    case = build_case(CaseSpec(dtype=dtype, T=T, B=B, D=D, H=H, seed=0))
    rng = np.random.default_rng(0)
    n = 2048
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)

    def forward_backward():
        *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        impl.backward(case.dy, case.dh_T, case.dc_T, cache)

    best_mm = best_st = float("inf")
    forward_backward()
    a @ b
    for _ in range(rounds):
        best_mm = min(best_mm, time_best(lambda: a @ b, repeats=1, warmup=0))
        best_st = min(best_st, time_best(forward_backward, repeats=1, warmup=0))
    mm_rate = 2.0 * n**3 / best_mm / 1e9
    st_rate = lstm_flops(T, B, D, H, backward=True) / best_st / 1e9
    return st_rate / mm_rate, mm_rate, st_rate


def lstm_flops(T: int, B: int, D: int, H: int, *, backward: bool) -> float:
    forward = 8.0 * T * B * H * (D + H)
    return forward * 3 if backward else forward


@dataclass
class Row:
    impl: str
    shape: tuple[int, int, int, int, str]
    forward_s: float
    total_s: float

    @property
    def forward_gflops(self) -> float:
        T, B, D, H, _ = self.shape
        return lstm_flops(T, B, D, H, backward=False) / self.forward_s / 1e9

    @property
    def total_gflops(self) -> float:
        T, B, D, H, _ = self.shape
        return lstm_flops(T, B, D, H, backward=True) / self.total_s / 1e9


def bench_impl(impl, shape, *, repeats: int = 5, budget: float = 20.0) -> Row:
    T, B, D, H, dtype = shape
    case = build_case(CaseSpec(variant=impl.variant, dtype=dtype, T=T, B=B, D=D, H=H, seed=0))

    def forward():
        return impl.forward(case.x, case.h0, case.c0, case.params)

    def forward_backward():
        *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        return impl.backward(case.dy, case.dh_T, case.dc_T, cache)

    return Row(
        getattr(impl, "name", type(impl).__name__),
        shape,
        time_best(forward, repeats=repeats, budget=budget),
        time_best(forward_backward, repeats=repeats, budget=budget),
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def run_impl_bench(shapes, names: Sequence[str] | None, repeats: int) -> tuple[str, bool | None]:
    """The implementation table; returns it and whether the target was met (None if not measured)."""
    rates = {dtype: matmul_rate(dtype) for dtype in sorted({s[4] for s in shapes})}
    entries = [e for e in implementations() if e.unavailable is None and (not names or e.name in names)]
    rows, results = [], []
    for shape in shapes:
        for entry in entries:
            impl = entry.create()
            if shape[4] not in getattr(impl, "dtypes", ("float64", "float32")):
                continue
            r = bench_impl(impl, shape, repeats=repeats)
            results.append(r)
            rate = rates[shape[4]]
            T, B, D, H, dtype = shape
            rows.append([
                entry.name, impl.variant, f"T={T} B={B} D={D} H={H}", dtype,
                f"{r.forward_s * 1e3:.1f}", f"{r.forward_gflops:.1f}",
                f"{r.total_s * 1e3:.1f}", f"{r.total_gflops:.1f}", f"{r.total_gflops / rate:.0%}",
            ])
            sys.stdout.flush()
    lines = [
        "NumPy matmul rate (2048^3, best of 7): "
        + ", ".join(f"{d} {v:.1f} GFLOP/s" for d, v in rates.items()),
        "",
        _table(["impl", "variant", "shape", "dtype", "fwd ms", "fwd GFLOP/s", "fwd+bwd ms",
                "fwd+bwd GFLOP/s", "of matmul"], rows),
    ]
    met = None
    if any(r.impl == "stacked" and r.shape == TARGET_SHAPE for r in results):
        frac, mm_rate, st_rate = target_fraction()
        met = frac >= TARGET_FRACTION
        lines.append("")
        lines.append(
            f"Target (interleaved rounds, best of each): stacked fwd+bwd at T=100 B=32 D=H=256 float32 runs at "
            f"{st_rate:.1f} GFLOP/s, {frac:.0%} of the {mm_rate:.1f} GFLOP/s matmul rate "
            f"(target {TARGET_FRACTION:.0%}): {'MET' if met else 'NOT MET'}"
        )
        target = [r for r in results if r.impl == "stacked" and r.shape == TARGET_SHAPE]
        loop = [r for r in results if r.impl == "loop" and r.shape == TARGET_SHAPE]
        if loop:
            lines.append(f"stacked is {loop[0].total_s / target[0].total_s:.1f}x faster than loop there (fwd+bwd).")
    return "\n".join(lines), met


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--impl", action="append", metavar="NAME", help="only these implementations")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--oracles", action="store_true", help="also measure oracle throughput (cases/s)")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    text, _ = run_impl_bench(shapes, args.impl, args.repeats)
    print(text)
    if args.oracles:
        from harness import bench_oracles

        print()
        bench_oracles.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
