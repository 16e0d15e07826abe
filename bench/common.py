"""What every benchmark table shares: the timing loop, FLOP counts, the machine header and the printer."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Section", "SETTLE_S", "best_of", "interleaved", "lstm_flops", "matmul_flops", "verdict", "ratio_text",
           "machine_lines", "blas_threads", "steady_allocator", "subprocess_seconds", "render", "table"]


@dataclass
class Section:
    """One printed table: a title, the lines above it, the rows, the lines below it."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)


def best_of(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Best wall time of ``fn`` in seconds over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


#: Seconds of idleness before each timed call: the time the thread pools of the last call need to stop
#: spinning. OpenBLAS's threads keep spinning for tens of milliseconds after a GEMM, and torch's OpenMP
#: threads share the same two cores: timed right after a NumPy call, torch.nn.LSTM took twice its time
#: (35 ms instead of 18 at T=50 B=64 D=H=128 float32) and the ratios looked twice better than they are.
SETTLE_S = 0.15


def interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 1,
                settle: float = SETTLE_S) -> dict[str, float]:
    """Best wall time of each function, timed in alternating rounds (A, B, A, B, ...), each timed call
    after ``settle`` idle seconds (:data:`SETTLE_S`).

    On a shared machine the load changes from second to second; alternating the measurements and
    keeping the best of each compares them under the same conditions, which timing A's rounds and
    then B's would not.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def lstm_flops(T: int, B: int, D: int, H: int, *, backward: bool) -> float:
    """The GEMMs of a vanilla LSTM: forward 8*T*B*H*(D+H), backward twice that. Gate math is not counted."""
    forward = 8.0 * T * B * H * (D + H)
    return forward * 3 if backward else forward


def matmul_flops(n: int) -> float:
    return 2.0 * n**3


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "NOT met")


def ratio_text(value: float, goal: float | None = None) -> str:
    """A ratio with two significant digits, trailing zeros kept (1.0x, not 1x).

    Next to a goal, a ratio that would print as the goal itself (1.04 as "1.0x" beside "<= 1.0x") gets up
    to two more digits, so the printed value shows which side of the goal it falls on.
    """
    if value >= 9.95:
        return f"{value:.0f}x"
    text = f"{value:#.2g}"
    if goal is not None and value != goal:
        for digits in (3, 4):
            if float(text) != goal:
                break
            text = f"{value:#.{digits}g}"
    return text + "x"


def blas_threads() -> int:
    """Threads NumPy's BLAS uses: the usual environment variables, else one per CPU (OpenBLAS's default)."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def _blas_summary() -> str:
    try:
        import threadpoolctl
    except ImportError:
        pass
    else:
        pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            return "; ".join(f"{p['internal_api']} {p.get('version', '')} ({p['num_threads']} threads, "
                             f"threadpoolctl)" for p in pools)
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # older NumPy: no dict mode
        return f"unknown (NumPy {np.__version__}); {blas_threads()} threads assumed"
    arch = re.search(r"DYNAMIC_ARCH\s+NO_AFFINITY\s+(\w+)|\b(Haswell|SkylakeX|Zen|Sandybridge)\b",
                     blas.get("openblas configuration", ""))
    core = next((g for g in arch.groups() if g), "") if arch else ""
    return (f"{blas.get('name', '?')} {blas.get('version', '')}{f' ({core})' if core else ''}, "
            f"{blas_threads()} threads (environment, else one per CPU)")


#: glibc's mallopt parameters (malloc.h) and the values the benchmark sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the most glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def steady_allocator() -> str:
    """Fix glibc's malloc thresholds for this process, so that no timed call pays page faults that depend
    on what the calls before it allocated; -> a line for the header saying what was done.

    glibc serves a large allocation from fresh pages and returns them when it is freed, touching them
    again costs a page fault per 4 KiB, and its threshold for doing so moves with what the process has
    freed before. Timed in one process, torch.nn.LSTM and the stacked LSTM each changed the other's
    page faults: a stacked forward at T=50 B=64 D=H=128 float64 took 20 ms after a torch.nn.LSTM call
    and 42 ms in a process of its own (4,300 faults). With the thresholds fixed (mmap only above 32 MiB,
    freed memory kept up to 1 GiB), both sides compute from memory they have touched before, as a
    program calling either in a loop does once warm.
    """
    if platform.libc_ver()[0] != "glibc":
        return f"allocator: {platform.libc_ver()[0] or 'not glibc'}, left as it is"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return "allocator: glibc; mallopt refused the thresholds, left as they were"
    return (f"allocator: glibc malloc with fixed thresholds (mmap above {MMAP_THRESHOLD >> 20} MiB, "
            f"freed memory kept up to {TRIM_THRESHOLD >> 30} GiB): no side pays page faults the other caused")


def machine_lines(torch_threads: int | None, allocator: str | None = None) -> list[str]:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    torch_text = "not installed" if torch_threads is None else f"{torch_threads} threads (set to match BLAS)"
    return [
        f"machine: {os.cpu_count()} CPUs, load average {load} (1, 5, 15 min); Python {sys.version.split()[0]}",
        f"NumPy {np.__version__} BLAS: {_blas_summary()}",
        f"torch (CPU): {torch_text}",
        *([allocator] if allocator else []),
    ]


def subprocess_seconds(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
                       timeout: float = 900.0) -> float:
    """Wall time of one command; raises if it fails (a benchmark of a failing command means nothing)."""
    start = time.perf_counter()
    out = subprocess.run(list(argv), capture_output=True, text=True, env=dict(env) if env else None, cwd=cwd,
                         timeout=timeout)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(argv)} exited with {out.returncode}: " + " / ".join(tail))
    return seconds


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned (names), the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def render(section: Section) -> str:
    parts = [f"== {section.title}", *section.notes, "", table(section.headers, section.rows)]
    if section.footer:
        parts += ["", *section.footer]
    return "\n".join(parts) + "\n"
