"""The CPU benchmark tables: the ratios the performance goals are judged by, all from one run.

    python -m bench                    # every CPU table (minutes; 20 on a loaded 2-CPU machine)
    python -m bench --quick            # fewer rounds, float32 only
    python -m bench --only speed --only variants
    python -m bench --main-job         # also time the main job (lstm-harness run; long)

Each ratio is measured in interleaved rounds (A, B, A, B, ...; the best of each is kept) against its
anchor, so both sides see the same load on a shared machine. FLOP counts for the vanilla LSTM:
forward 8*T*B*H*(D+H) (the four gates' input and recurrent GEMMs), backward twice that. Forward is
the training forward (it keeps what the backward needs) for every implementation and for PyTorch.
PyTorch runs on the CPU with as many threads as NumPy's BLAS (set OPENBLAS_NUM_THREADS to change both).

This is the only place performance is judged: no unit test is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.common import (
    SETTLE_S,
    Section,
    blas_threads,
    interleaved,
    lstm_flops,
    machine_lines,
    matmul_flops,
    ratio_text,
    render,
    steady_allocator,
    subprocess_seconds,
    verdict,
)
from harness.cases import CaseSpec, build_case

__all__ = ["SHAPES", "SECTIONS", "GOALS", "main"]

#: (T, B, D=H) of the speed tables; the first is the shape the matmul-fraction goal is stated at.
SHAPES: list[tuple[int, int, int]] = [(100, 32, 256), (50, 64, 128), (20, 16, 512)]
DTYPES = ["float32", "float64"]
FRAMEWORKS = ["torch", "tensorflow", "jax", "onnxruntime"]
SECTIONS = ["speed", "loop", "variants", "fd", "certify"]

#: The performance goals, in one place.
GOALS = {
    "torch_ratio": 1.0,       # stacked over torch.nn.LSTM, forward and forward+backward, every shape and dtype
    "matmul_fraction": 0.60,  # stacked fwd+bwd GFLOP/s over the sgemm rate, at SHAPES[0] float32
    "variant_ratio": 1.3,     # stacked-peephole and stacked-layernorm fwd+bwd over stacked's
    "fd_cases_per_s": 50.0,   # finite-differences oracle on a default certification's cases
    "certify_s": 6.0,         # wall time of a default `lstm-harness certify stacked`
    "main_job_s": 40.0,       # wall time of `lstm-harness run`
}


# --- timing one implementation and PyTorch on one case ------------------------------------------


def _case(T: int, B: int, D: int, dtype: str, variant: str = "vanilla") -> Any:
    return build_case(CaseSpec(variant=variant, dtype=dtype, T=T, B=B, D=D, H=D, seed=0))


def impl_calls(impl: Any, case: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, forward+backward) of an implementation on ``case``."""

    def forward() -> Any:
        return impl.forward(case.x, case.h0, case.c0, case.params)

    def forward_backward() -> Any:
        *_, cache = impl.forward(case.x, case.h0, case.c0, case.params)
        return impl.backward(case.dy, case.dh_T, case.dc_T, cache)

    return forward, forward_backward


def _torch() -> Any:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    torch.set_num_threads(blas_threads())
    return torch


def torch_calls(torch: Any, case: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, forward+backward) of ``torch.nn.LSTM`` on the CPU, with the case's weights."""
    from harness import layouts

    module = torch.nn.LSTM(case.D, case.H).to(dtype=getattr(torch, case.dtype))
    with torch.no_grad():
        for name, value in layouts.to_torch(case.params).items():
            getattr(module, name).copy_(torch.from_numpy(value))

    def leaf(a: np.ndarray) -> Any:
        return torch.from_numpy(a).requires_grad_(True)

    x, h0, c0 = leaf(case.x), leaf(case.h0[None]), leaf(case.c0[None])
    upstream = (torch.from_numpy(case.dy), torch.from_numpy(case.dh_T[None]), torch.from_numpy(case.dc_T[None]))

    def forward() -> Any:
        return module(x, (h0, c0))

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        for t in (x, h0, c0):
            t.grad = None
        y, (h_T, c_T) = module(x, (h0, c0))
        torch.autograd.backward((y, h_T, c_T), upstream)

    return forward, forward_backward


def stacked_gemms(case: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, forward+backward) of the GEMMs alone that ``stacked`` makes (the vanilla layer of one
    direction, no projection), through the same BLAS and nothing else: the input projection and the T
    recurrent products; then the T products of the backward loop, dx, and dW and dR over all steps at
    once. tests/test_bench.py checks the shapes and the number of products against ``stacked``'s; the
    operands are laid out as ``stacked`` lays them out (R^T contiguous, W and the gate blocks as
    transposed views).

    Timed beside ``torch.nn.LSTM`` they bound what any gate math could reach: where these alone take
    longer than torch's call, no arithmetic between them, however fast, brings ``stacked`` to torch.
    """
    T, B, D, H = case.T, case.B, case.D, case.H
    dtype = case.x.dtype
    x2 = case.x.reshape(T * B, D)
    W, R = case.params["W"], case.params["R"]  # (4H, D), (4H, H)
    RT = np.ascontiguousarray(R.T)  # (H, 4H): the forward's per-step operand
    gates, rec = np.empty((T * B, 4 * H), dtype), np.empty((B, 4 * H), dtype)
    h = np.empty((T + 1, B, H), dtype)
    h[:] = case.h0
    dh, dx = np.empty((B, H), dtype), np.empty((T * B, D), dtype)
    dW, dR = np.empty((4 * H, D), dtype), np.empty((4 * H, H), dtype)

    def forward() -> None:
        np.matmul(x2, W.T, out=gates)  # (T*B, D) @ (D, 4H)
        for t in range(T):
            np.matmul(h[t], RT, out=rec)  # (B, H) @ (H, 4H)

    def forward_backward() -> None:
        forward()
        da = gates.reshape(T, B, 4 * H)
        for t in reversed(range(T)):
            np.matmul(da[t], R, out=dh)  # (B, 4H) @ (4H, H)
        np.matmul(gates, W, out=dx)  # (T*B, 4H) @ (4H, D)
        for k in range(4):  # one per gate block, as weight_grad does
            rows = slice(k * H, (k + 1) * H)
            np.matmul(gates[:, rows].T, x2, out=dW[rows])  # (H, T*B) @ (T*B, D)
            np.matmul(gates[:, rows].T, h[:T].reshape(T * B, H), out=dR[rows])

    return forward, forward_backward


def _matmul(n: int, dtype: str) -> Callable[[], Any]:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    return lambda: a @ b


def _shape_text(T: int, B: int, D: int) -> str:
    return f"T={T} B={B} D=H={D}"


# --- the sections ------------------------------------------------------------------------------


def speed_section(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[str], *, rounds: int,
                  matmul_n: int) -> Section:
    """stacked / torch.nn.LSTM, forward and forward+backward, and stacked's share of the matmul rate."""
    from impls.stacked import StackedLSTM

    headers = ["shape", "dtype", "stacked/torch fwd", "stacked/torch fwd+bwd", "its GEMMs alone/torch fwd",
               "its GEMMs alone/torch fwd+bwd", "stacked fwd+bwd ms", "torch fwd+bwd ms", "stacked fwd+bwd GFLOP/s",
               "matmul GFLOP/s", "of matmul", "goal", "goal met"]
    # goal: both ratios at most GOALS["torch_ratio"]; at SHAPES[0] float32 also the matmul fraction.
    section = Section("stacked vs torch.nn.LSTM (CPU)", headers, notes=[
        f"ratios are time over time (below 1x: stacked is faster); matmul is "
        f"{matmul_n}^3 in the same rounds; best of {rounds} interleaved rounds, each call after "
        f"{SETTLE_S:g} s idle (the last call's BLAS and OpenMP threads stop spinning)"])
    torch = _torch()
    if torch is None:
        section.footer.append("skipped: torch is not installed")
        return section
    for dtype in dtypes:
        for T, B, D in shapes:
            case = _case(T, B, D, dtype)
            s_fwd, s_all = impl_calls(StackedLSTM(), case)
            t_fwd, t_all = torch_calls(torch, case)
            g_fwd, g_all = stacked_gemms(case)
            best = interleaved({"matmul": _matmul(matmul_n, dtype), "s_fwd": s_fwd, "t_fwd": t_fwd,
                                "s_all": s_all, "t_all": t_all, "g_fwd": g_fwd, "g_all": g_all}, rounds=rounds)
            rate = lstm_flops(T, B, D, D, backward=True) / best["s_all"] / 1e9
            mm_rate = matmul_flops(matmul_n) / best["matmul"] / 1e9
            fraction = rate / mm_rate
            stated = (T, B, D) == SHAPES[0] and dtype == "float32"
            fwd, both = best["s_fwd"] / best["t_fwd"], best["s_all"] / best["t_all"]
            met = fwd <= GOALS["torch_ratio"] and both <= GOALS["torch_ratio"]
            goal = f"<= {GOALS['torch_ratio']:.1f}x both"
            if stated:
                met = met and fraction >= GOALS["matmul_fraction"]
                goal += f", >= {GOALS['matmul_fraction']:.0%}"
            section.rows.append([
                _shape_text(T, B, D), dtype, ratio_text(fwd, GOALS["torch_ratio"]),
                ratio_text(both, GOALS["torch_ratio"]), ratio_text(best["g_fwd"] / best["t_fwd"], GOALS["torch_ratio"]),
                ratio_text(best["g_all"] / best["t_all"], GOALS["torch_ratio"]),
                f"{best['s_all'] * 1e3:.1f}",
                f"{best['t_all'] * 1e3:.1f}", f"{rate:.3g}", f"{mm_rate:.3g}", f"{fraction:.0%}", goal, verdict(met),
            ])
            sys.stdout.flush()
    section.footer.append(f"Goal: stacked at most {GOALS['torch_ratio']:.1f}x torch.nn.LSTM, forward and "
                          f"forward+backward, at every shape in both dtypes; at {_shape_text(*SHAPES[0])} float32 "
                          f"also at least {GOALS['matmul_fraction']:.0%} of the matmul rate.")
    section.footer.append("its GEMMs alone: the matrix products stacked makes (input projection, one per step, and "
                          "the backward's), through NumPy's BLAS, with nothing between them; a ratio above 1x there "
                          "means that no gate math, however fast, brings stacked to torch.nn.LSTM at that shape.")
    return section


def loop_section(shape: tuple[int, int, int], dtypes: Sequence[str], *, rounds: int) -> Section:
    """loop / torch.nn.LSTM at one shape: the loop is the readable reference, slow by design."""
    from impls.loop import LoopLSTM

    section = Section("loop vs torch.nn.LSTM (CPU)", ["shape", "dtype", "loop/torch fwd", "loop/torch fwd+bwd",
                                                        "loop fwd+bwd ms", "torch fwd+bwd ms", "goal", "goal met"],
                      notes=[f"one shape only (the loop is slow by design); best of {rounds} interleaved rounds"])
    torch = _torch()
    if torch is None:
        section.footer.append("skipped: torch is not installed")
        return section
    for dtype in dtypes:
        case = _case(*shape, dtype)
        l_fwd, l_all = impl_calls(LoopLSTM(), case)
        t_fwd, t_all = torch_calls(torch, case)
        best = interleaved({"l_fwd": l_fwd, "t_fwd": t_fwd, "l_all": l_all, "t_all": t_all}, rounds=rounds)
        section.rows.append([_shape_text(*shape), dtype, ratio_text(best["l_fwd"] / best["t_fwd"]),
                             ratio_text(best["l_all"] / best["t_all"]), f"{best['l_all'] * 1e3:.1f}",
                             f"{best['t_all'] * 1e3:.1f}", "-", "-"])
    return section


def variants_section(shape: tuple[int, int, int], dtypes: Sequence[str], *, rounds: int) -> Section:
    """stacked-peephole / stacked and stacked-layernorm / stacked, forward+backward."""
    from impls.layernorm import StackedLayerNormLSTM
    from impls.peephole import StackedPeepholeLSTM
    from impls.stacked import StackedLSTM

    goal = GOALS["variant_ratio"]
    section = Section("variants vs stacked (fwd+bwd)", ["ratio", "shape", "dtype", "value", "variant ms",
                                                        "stacked ms", "goal", "goal met"],
                      notes=[f"best of {rounds} interleaved rounds (stacked, peephole, layernorm)"])
    for dtype in dtypes:
        anchor = impl_calls(StackedLSTM(), _case(*shape, dtype))[1]
        peephole = impl_calls(StackedPeepholeLSTM(), _case(*shape, dtype, "peephole"))[1]
        layernorm = impl_calls(StackedLayerNormLSTM(), _case(*shape, dtype, "layernorm"))[1]
        best = interleaved({"stacked": anchor, "peephole": peephole, "layernorm": layernorm}, rounds=rounds)
        for name in ("peephole", "layernorm"):
            value = best[name] / best["stacked"]
            section.rows.append([f"stacked-{name} / stacked", _shape_text(*shape), dtype,
                                 ratio_text(value, goal),
                                 f"{best[name] * 1e3:.1f}", f"{best['stacked'] * 1e3:.1f}", f"<= {goal:g}x",
                                 verdict(value <= goal)])
    return section


def fd_section(*, cases: int, warmup: int) -> Section:
    """Finite-differences oracle throughput on a default certification's cases."""
    from bench.oracles import oracle_rates

    row = oracle_rates(["finite-differences"], n_cases=cases, warmup=warmup)[0]
    goal = GOALS["fd_cases_per_s"]
    rate = row["cases_per_s"]
    return Section("finite-differences oracle", ["oracle", "dtype", "cases/s", "ms/case", "goal", "goal met"],
                   [["finite-differences", row["dtype"], f"{rate:.0f}", f"{1e3 / rate:.1f}", f">= {goal:g}",
                     verdict(rate >= goal)]],
                   notes=[f"{row['cases']} cases after {row['warmup_cases']} warm-up cases, drawn as a default "
                          f"certify draws them (Hypothesis ci profile, T<=8 B<=4 D<=8 H<=8, fixed seed)"])


def _python(code: str, *, rounds: int) -> float:
    return min(subprocess_seconds([sys.executable, "-c", code]) for _ in range(max(1, rounds)))


def _harness(*args: str) -> list[str]:
    # `python -m harness` is the `lstm-harness` console script, run by this interpreter from this checkout.
    return [sys.executable, "-m", "harness", *args]


def certify_section(*, target: str, extra: Sequence[str], rounds: int, frameworks: Sequence[str],
                    oracle_names: Sequence[str] | None, cases: int, main_job: bool) -> Section:
    """Where the time of a default `lstm-harness certify` goes."""
    section = Section(f"where a default `lstm-harness certify {target}` spends its time",
                      ["what", "time", "goal", "goal met"],
                      notes=[f"subprocesses of {sys.executable} -m harness (the lstm-harness command); "
                             f"best of {rounds} interleaved rounds; extra arguments: {' '.join(extra) or 'none'}",
                             "'in certify -n 1' rows: one more run of the command, timed inside (bench/phases.py); "
                             "'reference per case' rows: each oracle warm, on default-structure cases"])
    section.rows += _command_rows(target, extra, rounds=rounds, main_job=main_job)
    section.rows += _inside_rows(target, extra)
    section.rows += _startup_rows(target, frameworks, rounds=rounds)
    rows, unavailable = _per_case_rows(oracle_names, cases)
    section.rows += rows
    section.footer += unavailable
    if not main_job:
        section.footer.append(f"main job (lstm-harness run, goal <= {GOALS['main_job_s']:g} s): not timed; "
                              f"pass --main-job")
    return section


def _command_rows(target: str, extra: Sequence[str], *, rounds: int, main_job: bool) -> list[list[str]]:
    """certify -n 1 and -n 2 in interleaved rounds, and the main job once."""
    # The goals are about the default commands: with extra arguments they are shown, not judged.
    judged = not extra
    with tempfile.TemporaryDirectory(prefix="lstm-bench-") as tmp:
        def certify(jobs: str) -> Callable[[], float]:
            return lambda: subprocess_seconds(
                _harness("certify", target, "-n", jobs, "--report-dir", f"{tmp}/n{jobs}", *extra))

        walls = interleaved({"1": certify("1"), "2": certify("2")}, rounds=rounds, warmup=0, settle=0.0)
        rows = [[f"certify {target} -n 1 (wall)", f"{walls['1']:.2f} s", f"<= {GOALS['certify_s']:g} s",
                 verdict(walls["1"] <= GOALS["certify_s"] if judged else None)],
                [f"certify {target} -n 2 (wall)", f"{walls['2']:.2f} s", "<= the -n 1 time",
                 verdict(walls["2"] <= walls["1"] if judged else None)]]
        if main_job:
            # as the README's main job (tox -e report) runs it
            wall = subprocess_seconds(_harness("run", "-n", "auto", "--report-dir", f"{tmp}/main", *extra))
            rows.append(["main job: lstm-harness run -n auto (wall, one run)", f"{wall:.1f} s",
                         f"<= {GOALS['main_job_s']:g} s", verdict(wall <= GOALS["main_job_s"] if judged else None)])
    return rows


def _inside_rows(target: str, extra: Sequence[str]) -> list[list[str]]:
    """One `certify TARGET -n 1` timed inside (:mod:`bench.phases`): its phases, and each oracle's time with
    the part spent on the first case of each structure (builds, compilations, traces) apart."""
    with tempfile.TemporaryDirectory(prefix="lstm-bench-") as tmp:
        subprocess_seconds([sys.executable, "-m", "bench.phases", f"{tmp}/phases.json", "certify", target, "-n", "1",
                            "--report-dir", f"{tmp}/report", *extra])
        with open(f"{tmp}/phases.json", encoding="utf-8") as f:
            found = json.load(f)
    sec = found["seconds"]

    def row(what: str, seconds: float) -> list[str]:
        return [f"in certify -n 1: {what}", f"{seconds:.2f} s", "-", "-"]

    rows = [row("the command, once (wall)", sec["command"]),
            row("import harness.cli", sec["import harness.cli"]),
            row("opening the implementation (its worker process)", sec.get("opening the implementation", 0.0)),
            row("the rest of preparing (options, choosing the oracles)",
                sec.get("preparing", 0.0) - sec.get("opening the implementation", 0.0)),
            row("probing the oracles (importing their frameworks, at the first case)",
                sec.get("probing the oracles", 0.0)),
            row("implementation calls", sec.get("implementation calls", 0.0))]
    for name, o in sorted(found["oracles"].items(), key=lambda kv: -(kv[1]["first"] + kv[1]["rest"])):
        rows.append(row(f"oracle {name}, {o['cases']} cases (first case of each of {o['structures']} structures: "
                        f"{o['first']:.2f} s)", o["first"] + o["rest"]))
    rows += [row("comparisons", sec.get("comparisons", 0.0)),
             row("Hypothesis and the search around the cases",
                 sec.get("searches", 0.0) - sec.get("checking cases", 0.0)),
             row("records, findings and reports", sec.get("records, findings and reports", 0.0))]
    return rows


def _startup_rows(target: str, frameworks: Sequence[str], *, rounds: int) -> list[list[str]]:
    """The interpreter, the harness and each framework imported in a fresh process; a worker's start."""
    bare = _python("pass", rounds=rounds + 1)
    rows = [["interpreter start", f"{bare:.2f} s", "-", "-"],
            ["harness import (import harness.cli, beyond the interpreter)",
             f"{_python('import harness.cli', rounds=rounds + 1) - bare:.2f} s", "-", "-"]]
    for name in frameworks:
        if importlib.util.find_spec(name) is None:
            rows.append([f"import {name}", "not installed", "-", "-"])
        else:
            rows.append([f"import {name} (fresh interpreter, beyond its start)",
                         f"{_python(f'import {name}', rounds=rounds) - bare:.2f} s", "-", "-"])
    rows.append(["worker process start (isolated subject opened and closed)",
                 f"{_worker_start(target, rounds=rounds + 1):.2f} s", "-", "-"])
    return rows


def _per_case_rows(oracle_names: Sequence[str] | None, cases: int) -> tuple[list[list[str]], list[str]]:
    """Each oracle's reference, Hypothesis's own draw and building the case: milliseconds per case.

    Returns the rows, and one line per unavailable oracle saying why.
    """
    from bench.oracles import draw_specs, oracle_rates

    rows, unavailable = [], []
    for row in oracle_rates(oracle_names, n_cases=cases, warmup=max(1, cases // 10)):
        if row.get("available"):
            rows.append([f"oracle {row['oracle']}: reference per case ({row['compute_dtype']})",
                         f"{1e3 / row['cases_per_s']:.2f} ms", "-", "-"])
        else:
            rows.append([f"oracle {row['oracle']}", "unavailable", "-", "-"])
            unavailable.append(f"oracle {row['oracle']}: {row.get('reason', 'unavailable')}")
    specs, seconds = draw_specs(cases, dtype="float64")
    start = time.perf_counter()
    for spec in specs:
        build_case(spec)
    built = time.perf_counter() - start
    rows.append(["Hypothesis: drawing one case (trivial test body)", f"{1e3 * seconds / len(specs):.2f} ms", "-", "-"])
    rows.append(["building one case from its spec", f"{1e3 * built / len(specs):.2f} ms", "-", "-"])
    return rows, unavailable


def _worker_start(target: str, *, rounds: int) -> float:
    from harness.isolation import IsolatedSubject

    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        IsolatedSubject(target).close()
        best = min(best, time.perf_counter() - start)
    return best


# --- the command ---------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int, int]:
    try:
        T, B, D = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,B,D (three integers, H=D), got {text!r}") from None
    if min(T, B, D) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return T, B, D


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench", description=doc.splitlines()[0],
                                epilog="\n".join(doc.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and cases, float32 only")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                   help=f"run only this table (repeatable): {', '.join(SECTIONS)}. speed: stacked/torch and the "
                        f"fraction of the matmul rate; loop: loop/torch; variants: peephole and layernorm over "
                        f"stacked; fd: finite-differences cases/s; certify: where certify's time goes")
    p.add_argument("--main-job", action="store_true",
                   help="also time the main job (lstm-harness run) in the certify table; long")
    p.add_argument("--rounds", type=_positive, help="interleaved rounds per ratio (default 5, quick 2)")
    p.add_argument("--shape", type=_shape, action="append", metavar="T,B,D",
                   help="shape of the speed tables, H=D (repeatable; default "
                        f"{' '.join(f'{T},{B},{D}' for T, B, D in SHAPES)}); loop and variants use the first")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="dtype (repeatable; default both, quick float32)")
    p.add_argument("--matmul-n", type=_positive, default=2048, metavar="N",
                   help="size of the square matmul the rate is measured on (default 2048)")
    p.add_argument("--cases", type=_positive, metavar="N",
                   help="cases per oracle in the fd and certify tables (default 200, quick 40)")
    p.add_argument("--target", default="stacked", help="what the certify table certifies (default stacked)")
    p.add_argument("--certify-args", default="", metavar="ARGS",
                   help="extra arguments for the timed certify and run commands, e.g. '--max-examples 5'")
    p.add_argument("--framework", action="append", choices=FRAMEWORKS,
                   help="framework whose import is timed (repeatable; default all)")
    p.add_argument("--oracle", action="append", metavar="NAME",
                   help="oracle timed per case in the certify table (repeatable; default every one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    dtypes = args.dtype or (["float32"] if args.quick else DTYPES)
    shapes = args.shape or SHAPES
    cases = args.cases or (40 if args.quick else 200)
    chosen = args.only or SECTIONS
    allocator = steady_allocator()
    torch = _torch()
    print("\n".join(machine_lines(None if torch is None else torch.get_num_threads(), allocator)) + "\n", flush=True)
    tables: dict[str, Callable[[], Section]] = {
        "speed": lambda: speed_section(shapes, dtypes, rounds=rounds, matmul_n=args.matmul_n),
        "loop": lambda: loop_section(shapes[0], dtypes, rounds=rounds),
        "variants": lambda: variants_section(shapes[0], dtypes, rounds=rounds),
        "fd": lambda: fd_section(cases=cases, warmup=max(1, cases // 10)),
        "certify": lambda: certify_section(target=args.target, extra=shlex.split(args.certify_args),
                                           rounds=1 if args.quick else 2, frameworks=args.framework or FRAMEWORKS,
                                           oracle_names=args.oracle, cases=cases, main_job=args.main_job),
    }
    for name in SECTIONS:
        if name in chosen:
            print(render(tables[name]()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
