"""GPU benchmark: the CuPy LSTMs against cuDNN's (``torch.nn.LSTM`` on CUDA), measured in one run.

    python -m bench.gpu                     # T=100, B=64, D=H=512, float32 (the issue's shape)
    python -m bench.gpu --repeats 50
    python -m bench.gpu --T 20 --B 8 --D 64 --H 64 --repeats 3   # a smoke run

Each time is one call measured with CUDA events (recorded on the library's own stream, after a
device synchronization, so the time runs from the first launch to the last result, Python overhead
included), the best of ``--repeats`` after ``--warmup`` calls. Both libraries are timed on the same
device in the same process, one after the other.

Rows:
* ``cupy`` with its inputs already on the device: the comparison the target is stated for, since
  cuDNN's inputs are on the device too; ``cupy, NumPy inputs`` adds the host-to-device copies of
  the contract path (inputs arrive as NumPy). Calls of one shape repeat, so from the second call on
  their time loops replay as CUDA graphs, as in a training loop (``impls/gpu/launch.py``); the row
  ``launched step by step`` turns the graphs off, which is what a shape's first call costs.
* cuDNN in IEEE float32 (TF32 off), the same arithmetic as the CuPy GEMMs; and, for information,
  cuDNN with PyTorch's default, which lets cuDNN's RNNs use TF32 (10-bit mantissa inputs).
* ``cupy-peephole`` and ``cupy-layernorm``, which cuDNN has no counterpart for.

Below the table: the copies of one call's inputs to the device, staged through pinned memory against
CuPy's own copies, and how many loops were launched, captured and replayed.

Forward is the training forward (it keeps what the backward needs), forward+backward computes every
gradient (dx, dh0, dc0 and the weights'). Targets: the CuPy forward+backward at most 1.0x cuDNN's
(TF32 off), and with NumPy inputs (the contract path, copies included) at most 1.3x.
Prints one skip line, and exits 0, where there is no GPU (or no CUDA PyTorch for the cuDNN rows).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import lstm_flops, table
from harness.cases import CaseSpec, build_case

__all__ = ["main", "GpuRow", "TARGET_RATIO", "NUMPY_INPUTS_RATIO", "SHAPE"]

#: (T, B, D, H, dtype) of the issue's target.
SHAPE = (100, 64, 512, 512, "float32")
#: CuPy forward+backward time over cuDNN's (TF32 off) must not exceed this, inputs on the device ...
TARGET_RATIO = 1.0
#: ... and this with NumPy inputs (the contract path: the host-to-device copies included).
NUMPY_INPUTS_RATIO = 1.3


@dataclass
class GpuRow:
    name: str
    note: str
    forward_ms: float
    total_ms: float


def _best(measure: Callable[[Callable[[], Any]], float], fn: Callable[[], Any], *, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        measure(fn)
    return min(measure(fn) for _ in range(max(1, repeats)))


def _cupy_timer(cupy: Any) -> Callable[[Callable[[], Any]], float]:
    def measure(fn: Callable[[], Any]) -> float:
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        cupy.cuda.Device().synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(cupy.cuda.get_elapsed_time(start, end))  # ms

    return measure


def _torch_timer(torch: Any) -> Callable[[Callable[[], Any]], float]:
    def measure(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))  # ms

    return measure


def bench_cupy(impl: Any, case: Any, cupy: Any, *, device_inputs: bool, repeats: int, warmup: int,
               graphs: bool = True) -> GpuRow:
    """``graphs=False`` launches every step from Python, as the first call of a shape does."""
    from impls.gpu import launch

    launcher = launch.launcher_for(cupy.empty(1))
    kept, launcher.graphs = launcher.graphs, graphs
    try:
        row = _bench_cupy(impl, case, cupy, device_inputs=device_inputs, repeats=repeats, warmup=warmup)
    finally:
        launcher.graphs = kept
    if not graphs:
        row.note += ", launched step by step (a shape's first call)"
    return row


def _bench_cupy(impl: Any, case: Any, cupy: Any, *, device_inputs: bool, repeats: int, warmup: int) -> GpuRow:
    xp_in = (lambda a: cupy.asarray(a)) if device_inputs else (lambda a: a)
    x, h0, c0 = xp_in(case.x), xp_in(case.h0), xp_in(case.c0)
    params = {k: xp_in(v) for k, v in case.params.items()}
    dy, dh_T, dc_T = xp_in(case.dy), xp_in(case.dh_T), xp_in(case.dc_T)

    def forward():
        return impl.forward(x, h0, c0, params)

    def forward_backward():
        *_, cache = impl.forward(x, h0, c0, params)
        return impl.backward(dy, dh_T, dc_T, cache)

    measure = _cupy_timer(cupy)
    note = "inputs on the device" if device_inputs else "NumPy inputs (the contract path)"
    return GpuRow(impl.name, note, _best(measure, forward, repeats=repeats, warmup=warmup),
                  _best(measure, forward_backward, repeats=repeats, warmup=warmup))


def bench_cudnn(torch: Any, case: Any, *, strict: bool, repeats: int, warmup: int) -> GpuRow:
    from harness import layouts
    from oracles.torch_cuda_oracle import strict_fp32

    dtype = getattr(torch, case.dtype)
    module = torch.nn.LSTM(case.D, case.H).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        for name, value in layouts.to_torch(case.params).items():
            getattr(module, name).copy_(torch.from_numpy(value))

    def dev(a, grad=False):
        return torch.from_numpy(a).to("cuda").requires_grad_(grad)

    x, h0, c0 = dev(case.x, True), dev(case.h0[None], True), dev(case.c0[None], True)
    upstream = (dev(case.dy), dev(case.dh_T[None]), dev(case.dc_T[None]))

    def forward():
        return module(x, (h0, c0))

    def forward_backward():
        module.zero_grad(set_to_none=True)
        for t in (x, h0, c0):
            t.grad = None
        y, (h_T, c_T) = module(x, (h0, c0))
        torch.autograd.backward((y, h_T, c_T), upstream)

    measure = _torch_timer(torch)
    if strict:
        with strict_fp32(torch):
            fwd = _best(measure, forward, repeats=repeats, warmup=warmup)
            total = _best(measure, forward_backward, repeats=repeats, warmup=warmup)
        return GpuRow("cudnn (torch.nn.LSTM)", "float32, TF32 off", fwd, total)
    fwd = _best(measure, forward, repeats=repeats, warmup=warmup)
    total = _best(measure, forward_backward, repeats=repeats, warmup=warmup)
    return GpuRow("cudnn (torch.nn.LSTM)", "PyTorch default (TF32 allowed)", fwd, total)


def _torch_cuda() -> tuple[Any, str | None]:
    from oracles.torch_cuda_oracle import TorchCudaLSTMOracle

    avail = TorchCudaLSTMOracle().availability()
    if not avail.available:
        return None, avail.reason
    import torch

    return torch, None


def run(shape: tuple[int, int, int, int, str], *, repeats: int, warmup: int) -> tuple[str, bool | None]:
    """The table; and whether the target was met (None when cuDNN or CuPy could not be measured)."""
    from impls.gpu import CupyLayerNormLSTM, CupyLSTM, CupyPeepholeLSTM, unavailable_reason

    T, B, D, H, dtype = shape
    why = unavailable_reason()
    if why is not None:
        return f"GPU benchmark skipped: the CuPy LSTM is unavailable here: {why}", None
    import cupy

    torch, torch_why = _torch_cuda()
    rows: list[GpuRow] = []
    cases = {v: build_case(CaseSpec(variant=v, dtype=dtype, T=T, B=B, D=D, H=H, seed=0))
             for v in ("vanilla", "peephole", "layernorm")}
    rows.append(bench_cupy(CupyLSTM(), cases["vanilla"], cupy, device_inputs=True, repeats=repeats, warmup=warmup))
    rows.append(bench_cupy(CupyLSTM(), cases["vanilla"], cupy, device_inputs=False, repeats=repeats,
                           warmup=warmup))
    rows.append(bench_cupy(CupyLSTM(), cases["vanilla"], cupy, device_inputs=True, repeats=repeats, warmup=warmup,
                           graphs=False))
    strict = None
    if torch is not None:
        strict = bench_cudnn(torch, cases["vanilla"], strict=True, repeats=repeats, warmup=warmup)
        rows.append(strict)
        rows.append(bench_cudnn(torch, cases["vanilla"], strict=False, repeats=repeats, warmup=warmup))
    for cls, variant in ((CupyPeepholeLSTM, "peephole"), (CupyLayerNormLSTM, "layernorm")):
        rows.append(bench_cupy(cls(), cases[variant], cupy, device_inputs=True, repeats=repeats, warmup=warmup))

    fwd_flops = lstm_flops(T, B, D, H, backward=False)
    total_flops = lstm_flops(T, B, D, H, backward=True)
    ref = strict
    body = table(
        ["impl", "what", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd / cuDNN"],
        [[r.name, r.note, f"{r.forward_ms:.2f}", f"{fwd_flops / r.forward_ms / 1e9:.2f}", f"{r.total_ms:.2f}",
          f"{total_flops / r.total_ms / 1e9:.2f}", f"{r.total_ms / ref.total_ms:.2f}x" if ref else "-"]
         for r in rows],
    )
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    device = device.decode() if isinstance(device, bytes) else str(device)
    lines = [f"GPU benchmark at T={T} B={B} D={D} H={H} {dtype} on {device}; CUDA-event times, best of "
             f"{repeats} after {warmup} warm-up calls; FLOPs counted as in bench.common", "", body, ""]
    lines += _upload_lines(cupy, cases["vanilla"], repeats=repeats, warmup=warmup)
    met = None
    if ref is None:
        lines.append(f"cuDNN rows skipped: {torch_why}; the target ratio was not measured")
    else:
        ratio = rows[0].total_ms / ref.total_ms
        numpy_ratio = rows[1].total_ms / ref.total_ms
        met = ratio <= TARGET_RATIO and numpy_ratio <= NUMPY_INPUTS_RATIO
        lines.append(
            f"Target: cupy fwd+bwd at most {TARGET_RATIO:g}x cuDNN fwd+bwd ({dtype}, TF32 off): "
            f"{ratio:.2f}x (forward {rows[0].forward_ms / ref.forward_ms:.2f}x): "
            f"{'MET' if ratio <= TARGET_RATIO else 'NOT MET'}")
        lines.append(
            f"Target: with NumPy inputs at most {NUMPY_INPUTS_RATIO:g}x: {numpy_ratio:.2f}x: "
            f"{'MET' if numpy_ratio <= NUMPY_INPUTS_RATIO else 'NOT MET'}")
    return "\n".join(lines), met


def _upload_lines(cupy: Any, case: Any, *, repeats: int, warmup: int) -> list[str]:
    """The host-to-device copies of one call's inputs (forward's and backward's), staged through
    pinned memory against CuPy's own copies; and how the time loops ran during the benchmark."""
    from impls.gpu import launch, transfer

    arrays = [case.x, case.h0, case.c0, *case.params.values(), case.dy, case.dh_T, case.dc_T]
    measure = _cupy_timer(cupy)
    staged = _best(measure, lambda: transfer.uploader().upload(arrays), repeats=repeats, warmup=warmup)
    plain = _best(measure, lambda: [cupy.asarray(a) for a in arrays], repeats=repeats, warmup=warmup)
    mb = sum(a.nbytes for a in arrays) / 1e6
    launcher = launch.launcher_for(cupy.empty(1))
    lines = [f"Copies of a call's inputs to the device ({mb:.1f} MB): staged through pinned memory "
             f"{staged:.2f} ms ({mb / staged:.1f} GB/s), CuPy's own copies {plain:.2f} ms ({mb / plain:.1f} GB/s)",
             f"Time loops in this run: {launcher.counts['launched']} launched step by step, "
             f"{launcher.counts['captured']} captured as CUDA graphs, {launcher.counts['replayed']} graphs replayed"]
    for why in launcher.refused.values():
        lines.append(f"A loop could not be captured ({why}); it ran step by step")
    return lines + [""]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    T, B, D, H, dtype = SHAPE
    for name, default in (("T", T), ("B", B), ("D", D), ("H", H)):
        parser.add_argument(f"--{name}", type=_positive, default=default, help=f"default {default}")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=dtype, help=f"default {dtype}")
    parser.add_argument("--repeats", type=_positive, default=20, help="timed calls, the best is kept (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    args = parser.parse_args(argv)
    text, _ = run((args.T, args.B, args.D, args.H, args.dtype), repeats=args.repeats, warmup=max(0, args.warmup))
    print(text)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
