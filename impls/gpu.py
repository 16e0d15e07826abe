"""The CuPy LSTM: the stacked algorithm on the GPU, with each step's gate math fused into one kernel.

Three implementations, one per variant: ``cupy`` (vanilla), ``cupy-peephole`` and
``cupy-layernorm``. Each is its NumPy stacked counterpart (:mod:`impls.stacked`) with the array
namespace ``xp = cupy`` and a cell whose step is one cuBLAS GEMM plus one CUDA kernel:

    before the loop   gates = x W^T + b          one (T*B, D) x (D, 4H) GEMM        (shared code)
    forward step t    rec = h_{t-1} R^T          one (B, H) x (H, 4H) GEMM
                      <variant>_forward kernel   a + rec, every gate, c_t, h_t: all of it
    backward step t   <variant>_backward kernel  dh + dy_t, every gate derivative, dc_{t-1}
                      dh = da R                  one (B, 4H) x (4H, H) GEMM
    after the loop    dx, dW, dR, db and the variant's own parameter gradients: one GEMM or
                      reduction each over all T*B rows                               (shared code)

On the GPU the time loops run from a plan made before the loop: every step's kernel arguments as
raw device pointers and cuBLAS called on pointers, so that a step costs Python one GEMM call and
one kernel launch (slicing views each step cost more than the GPU work; see ``forward_loop``).

One kernel per step and direction also for LayerNorm: a block per batch row, whose threads stride
over the H units; the row statistics (the four gates' means and variances, then the cell's; in the
backward the two means of each layer norm's backward) are block-wide reductions (warp shuffles,
then one shared-memory pass) between the kernel's phases. Nothing of the gate math runs outside
the kernels.

How the GPU math is tested without a GPU
----------------------------------------
Each kernel is written once, as data: a :class:`Kernel` is a list of statements (``Load``,
``Let``, ``Store``, ``Sum``) whose expressions are a tiny language (``+ - * /``, integer
constants, ``sigmoid``, ``tanh``, ``sqrt``) that reads the same in C and in Python.
:func:`cuda_source` generates the CUDA C++ from it (templated on the element type, instantiated for
``float`` and ``double``); :func:`emulate` evaluates the very same statements with NumPy, indexing
the flat buffers with the same index formulas the CUDA code uses. With ``xp = numpy`` the cells
run the emulation instead of launching, so CI runs the whole GPU implementation (GEMM wiring,
buffer choice, every index, every expression) through NumPy and checks it against the finite-
difference oracle and against the NumPy cells. What only a GPU can check is the compiler and the
hardware: that the generated source compiles (tests also compile it with NVRTC where CuPy and
libnvrtc are installed, which needs no GPU), the block reduction, and the launch itself.

Expressions are written in the same association order as the NumPy cells' in-place code
(``dc + (1 - tanh_c * tanh_c) * o * dh`` is what ``tmp = 1 - tanh_c**2; tmp *= o; tmp *= dh;
dc += tmp`` computes), so the emulation equals the NumPy cells bit for bit (tests assert it); on
the GPU, fused multiply-adds, CUDA's own tanh and the order of the block reductions make results
differ in the last bits.
The sigmoid is 0.5 * (1 + tanh(a / 2)), which never overflows, as in NumPy.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.contract import DEFAULT_LN_EPS
from impls.layernorm import LayerNormCell
from impls.loop import check_upstream
from impls.peephole import PeepholeCell
from impls.stacked import StackedLSTM, VanillaCell, stacked_backward

__all__ = [
    "CupyLSTM",
    "CupyPeepholeLSTM",
    "CupyLayerNormLSTM",
    "FusedVanillaCell",
    "FusedPeepholeCell",
    "FusedLayerNormCell",
    "Kernel",
    "Phase",
    "Row",
    "Load",
    "Let",
    "Store",
    "Sum",
    "KERNELS",
    "CTYPES",
    "unavailable_reason",
    "cuda_source",
    "emulate",
    "run_kernel",
    "block_size",
]

#: C++ element type of each dtype the kernels are instantiated for.
CTYPES: dict[str, str] = {"float32": "float", "float64": "double"}
#: Threads per block at most; a block handles one batch row and its threads stride over H.
MAX_THREADS = 256
#: Index names every kernel has: step t, batch row b, unit j, and the sizes B and H.
INDEX_NAMES = ("t", "b", "j", "B", "H")


# --- Availability --------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _probe() -> str | None:
    """None when CuPy imports and sees a CUDA GPU, else why not. Never raises."""
    try:
        if importlib.util.find_spec("cupy") is None:
            return "cupy is not installed"
    except (ImportError, ValueError):
        return "cupy is not installed"
    try:
        import cupy
    except Exception as exc:  # a broken install, a missing CUDA library, ...
        return f"cupy failed to import: {_first_line(exc)}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, or a driver older than CuPy's CUDA
        return (f"no CUDA GPU is visible (cupy.cuda.runtime.getDeviceCount() raised "
                f"{type(exc).__name__}: {_first_line(exc)})")
    if count == 0:
        return "no CUDA GPU is visible (cupy.cuda.runtime.getDeviceCount() == 0)"
    return None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when the CuPy implementations can run here, else the reason (asked once per process)."""
    try:
        return _probe()
    except Exception as exc:  # pragma: no cover - _probe already catches what it calls
        return f"cupy availability check failed: {_first_line(exc)}"


def _cupy() -> Any:
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"the CuPy LSTM cannot run here: {why}")
    import cupy

    return cupy


# --- The kernel language -------------------------------------------------------------------------
#
# Expressions: + - * / and unary minus, integer constants, names, and calls of FUNCTIONS. Python and
# C parse these with the same precedence and left associativity; the C is generated from the parsed
# tree with every operation parenthesized, so both evaluate the same tree. Integer constants become
# T(k) in C, which keeps float kernels in float (no double promotion); in NumPy an int keeps the
# array's dtype. Index formulas are integer expressions (+ and * only) of the INDEX_NAMES.

FUNCTIONS = ("sigmoid", "tanh", "sqrt")
_BINOPS: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_INDEX_BINOPS: dict[type, str] = {ast.Add: "+", ast.Mult: "*"}
#: Names a statement may not define: the index names, the C element type, C words the generated
#: code uses, and the prefixes of the generated names.
_RESERVED = frozenset(INDEX_NAMES + FUNCTIONS + ("T", "const", "if", "for", "return", "int", "long",
                                                 "float", "double", "auto", "char", "void"))


def _np_sigmoid(a):
    # The order of impls.stacked.sigmoid_: a *= 0.5; tanh; += 1; *= 0.5.
    return (np.tanh(a * 0.5) + 1) * 0.5


_NP_FUNCTIONS = {"sigmoid": _np_sigmoid, "tanh": np.tanh, "sqrt": np.sqrt}


@dataclass(frozen=True)
class _Expr:
    """A parsed expression: its source, the names it reads, its C text and its compiled Python."""

    text: str
    names: frozenset[str]
    c: str
    code: Any

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return eval(self.code, {"__builtins__": {}}, env)  # noqa: S307 - the module's own expressions


def _c_of(node: ast.AST, *, integer: bool) -> str:
    if isinstance(node, ast.BinOp):
        op = (_INDEX_BINOPS if integer else _BINOPS)[type(node.op)]
        return f"({_c_of(node.left, integer=integer)} {op} {_c_of(node.right, integer=integer)})"
    if isinstance(node, ast.UnaryOp):
        return f"(-{_c_of(node.operand, integer=integer)})"
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant):
        return str(node.value) if integer else f"T({node.value})"
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        return f"lstm_{node.func.id}({_c_of(node.args[0], integer=integer)})"
    raise AssertionError(f"unchecked node {type(node).__name__}")  # _parse admits nothing else


def _parse(text: str, *, integer: bool, where: str) -> _Expr:
    """Parse and check an expression (``integer``: an index formula); ValueError says what is wrong."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"{where}: expected an expression, got {text!r} ({exc.msg})") from None
    ops = _INDEX_BINOPS if integer else _BINOPS
    for node in ast.walk(tree.body):
        if isinstance(node, ast.BinOp):
            if type(node.op) not in ops:
                allowed = " ".join(ops.values())
                raise ValueError(f"{where}: expected only the operators {allowed}, got {text!r}")
        elif isinstance(node, ast.UnaryOp):
            if integer or not isinstance(node.op, ast.USub):
                raise ValueError(f"{where}: expected no unary operator but minus in a value, got {text!r}")
        elif isinstance(node, ast.Constant):
            if type(node.value) is not int or node.value < 0:
                raise ValueError(
                    f"{where}: expected non-negative integer constants only (a float literal would be a "
                    f"double in C), got {node.value!r} in {text!r}"
                )
        elif isinstance(node, ast.Call):
            if (integer or not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS
                    or len(node.args) != 1 or node.keywords):
                raise ValueError(f"{where}: expected calls of one argument to {FUNCTIONS} only, got {text!r}")
        elif not isinstance(node, (ast.Name, ast.operator, ast.unaryop, ast.expr_context)):
            raise ValueError(f"{where}: unsupported syntax {type(node).__name__} in {text!r}")
    callees = {id(node.func) for node in ast.walk(tree.body) if isinstance(node, ast.Call)}
    names = {node.id for node in ast.walk(tree.body) if isinstance(node, ast.Name) and id(node) not in callees}
    if integer and not names <= set(INDEX_NAMES):
        raise ValueError(f"{where}: an index may use only {INDEX_NAMES}, got {sorted(names - set(INDEX_NAMES))}")
    return _Expr(text, frozenset(names), _c_of(tree.body, integer=integer), compile(tree, f"<{where}>", "eval"))


@dataclass(frozen=True)
class Load:
    """``var = buf[index]``: in a Phase one element per unit j; in a Row one value per batch row."""

    var: str
    buf: str
    index: str


@dataclass(frozen=True)
class Let:
    """``var = expr``."""

    var: str
    expr: str


@dataclass(frozen=True)
class Store:
    """``buf[index] = expr``. In a Row, thread 0 of the block does the store."""

    buf: str
    index: str
    expr: str


@dataclass(frozen=True)
class Sum:
    """In a Phase only: ``var`` = the sum of ``expr`` over the H units of the row (a block reduction).

    The total is a row value from the end of the phase on.
    """

    var: str
    expr: str


@dataclass(frozen=True)
class Phase:
    """Statements run for every unit j of the row; the element values are gone when it ends."""

    body: tuple[Load | Let | Store | Sum, ...]


@dataclass(frozen=True)
class Row:
    """Statements on row values (sums of earlier phases, per-row loads), between phases."""

    body: tuple[Load | Let | Store, ...]


@dataclass(frozen=True)
class Kernel:
    """One fused kernel: ``arrays`` (name, "in" or "out"; "out" ones may be read too), the element
    type scalars ``scalars`` beyond the always-passed t, B, H, and the ``steps`` in order.

    Checked when built: every name is defined before use, in its scope; stores go to "out" arrays;
    within a phase a buffer is read back only at the index it was stored to (so no thread reads what
    another wrote without a barrier); a buffer stored from a Row is never read.
    """

    name: str
    arrays: tuple[tuple[str, str], ...]
    steps: tuple[Phase | Row, ...]
    scalars: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", _check(self))

    @property
    def array_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.arrays)

    @property
    def max_sums(self) -> int:
        return max((sum(isinstance(s, Sum) for s in step.body) for step in self.steps if isinstance(step, Phase)),
                   default=0)

    def name_expressions(self) -> tuple[str, ...]:
        return tuple(f"{self.name}<{c}>" for c in CTYPES.values())


def _integer_only(node: ast.AST) -> bool:
    """Whether ``node`` is made of the integer sizes t, B, H alone (constants are typed T in values)."""
    if isinstance(node, ast.Name):
        return node.id in ("t", "B", "H")
    if isinstance(node, ast.BinOp):
        return _integer_only(node.left) and _integer_only(node.right)
    if isinstance(node, ast.UnaryOp):
        return _integer_only(node.operand)
    return False


def _check(kernel: Kernel) -> list[tuple[Any, ...]]:
    """Validate ``kernel``; return its steps with every expression parsed (kept on the kernel)."""
    where = f"kernel {kernel.name}"
    if not kernel.name.isidentifier():
        raise ValueError(f"{where}: expected a C identifier as the name")
    kinds = dict(kernel.arrays)
    if len(kinds) != len(kernel.arrays):
        raise ValueError(f"{where}: array names must be unique, got {kernel.array_names}")
    for name, kind in kernel.arrays:
        if not name.isidentifier() or kind not in ("in", "out"):
            raise ValueError(f"{where}: expected arrays as (identifier, 'in' | 'out'), got {(name, kind)!r}")
    scalars = set(kernel.scalars) | {"B", "H", "t"}
    row_scope: set[str] = set(scalars)
    row_stored: set[str] = set()
    parsed: list[tuple[Any, ...]] = []

    def define(var: str, scope: set[str], at: str) -> None:
        if not var.isidentifier() or var in _RESERVED or var.startswith(("lstm_", "buf_")):
            raise ValueError(f"{at}: {var!r} cannot be a variable name (reserved or not an identifier)")
        if var in scope or var in row_scope:
            raise ValueError(f"{at}: {var!r} is already defined")
        scope.add(var)

    def expr(text: str, scope: set[str], at: str) -> _Expr:
        e = _parse(text, integer=False, where=at)
        tree = ast.parse(text, mode="eval").body
        for node in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.BinOp))]:
            parts = [node] if node is tree else [node.left, node.right]
            if all(_integer_only(p) for p in parts):
                raise ValueError(f"{at}: {ast.unparse(node)!r} in {text!r} is integer arithmetic of t, B, H: C "
                                 f"would compute it in integers, NumPy in floats; combine them with a value")
        unknown = e.names - scope - row_scope
        if unknown:
            raise ValueError(f"{at}: {sorted(unknown)} used before being defined in {text!r}")
        return e

    def index(text: str, in_row: bool, at: str) -> _Expr:
        e = _parse(text, integer=True, where=at)
        if in_row and "j" in e.names:
            raise ValueError(f"{at}: a Row index cannot use the unit j, got {text!r}")
        return e

    def array(buf: str, at: str, *, store: bool) -> None:
        if buf not in kinds:
            raise ValueError(f"{at}: unknown array {buf!r}; the kernel has {kernel.array_names}")
        if store and kinds[buf] != "out":
            raise ValueError(f"{at}: {buf!r} is an 'in' array (const in C), it cannot be stored to")
        if not store and buf in row_stored:
            raise ValueError(f"{at}: {buf!r} was stored from a Row (by thread 0 only) and cannot be read")

    for n, step in enumerate(kernel.steps):
        in_row = isinstance(step, Row)
        if not isinstance(step, (Phase, Row)):
            raise ValueError(f"{where}: expected Phase or Row steps, got {type(step).__name__}")
        scope: set[str] = set()
        stored_at: dict[str, set[str]] = {}
        sums: list[str] = []
        out: list[tuple[Any, ...]] = []
        for m, s in enumerate(step.body):
            at = f"{where}, step {n}, statement {m}"
            if isinstance(s, Load):
                array(s.buf, at, store=False)
                ix = index(s.index, in_row, at)
                if s.buf in stored_at and s.index not in stored_at[s.buf]:
                    raise ValueError(f"{at}: {s.buf!r} is read at {s.index!r} after this phase stored it at "
                                     f"{sorted(stored_at[s.buf])}: another thread's element, without a barrier")
                define(s.var, row_scope if in_row else scope, at)
                out.append(("load", s.var, s.buf, ix))
            elif isinstance(s, Let):
                e = expr(s.expr, scope, at)
                define(s.var, row_scope if in_row else scope, at)
                out.append(("let", s.var, e))
            elif isinstance(s, Store):
                array(s.buf, at, store=True)
                ix = index(s.index, in_row, at)
                e = expr(s.expr, scope, at)
                if in_row:
                    row_stored.add(s.buf)
                else:
                    stored_at.setdefault(s.buf, set()).add(s.index)
                out.append(("store", s.buf, ix, e))
            elif isinstance(s, Sum):
                if in_row:
                    raise ValueError(f"{at}: a Sum belongs in a Phase, not a Row")
                e = expr(s.expr, scope, at)
                if s.var in sums:
                    raise ValueError(f"{at}: {s.var!r} is already defined")
                sums.append(s.var)
                out.append(("sum", s.var, e))
            else:
                raise ValueError(f"{at}: expected Load, Let, Store or Sum, got {type(s).__name__}")
        for var in sums:  # the totals become row values once the phase is over
            define(var, row_scope, f"{where}, step {n}")
        parsed.append(("row" if in_row else "phase", out))
    return parsed


# --- CUDA source ----------------------------------------------------------------------------------

_PRELUDE = r"""
// Generated by impls/gpu.py from its kernel tables; do not edit.
__device__ __forceinline__ float lstm_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double lstm_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float lstm_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double lstm_sqrt(double x) { return sqrt(x); }

// sigmoid(x) = 0.5 * (1 + tanh(x / 2)): never overflows.
template <typename T>
__device__ __forceinline__ T lstm_sigmoid(T x) { return T(0.5) * (T(1) + lstm_tanh(T(0.5) * x)); }

// Sums each of v[0..N) over the block and gives every thread the totals. blockDim.x must be a
// multiple of 32 (every lane of every warp takes part in the shuffles) and at most 1024; every
// thread of the block must call it. red is shared memory of at least N x 32.
template <typename T, int N>
__device__ __forceinline__ void lstm_block_sum(T (&v)[N], T (*red)[32]) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
#pragma unroll
    for (int n = 0; n < N; ++n) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v[n] += __shfl_down_sync(0xffffffffu, v[n], off);
    }
    if (lane == 0) {
#pragma unroll
        for (int n = 0; n < N; ++n) red[n][warp] = v[n];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int n = 0; n < N; ++n) {
            T s = lane < nwarps ? red[n][lane] : T(0);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
            if (lane == 0) red[n][0] = s;
        }
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = red[n][0];
    __syncthreads();  // red may be reused by the next reduction
}
"""


def _kernel_source(kernel: Kernel) -> str:
    parsed = kernel._compiled  # type: ignore[attr-defined]
    kinds = dict(kernel.arrays)
    params = [f"{'const ' if kinds[n] == 'in' else ''}T* buf_{n}" for n in kernel.array_names]
    params += ["const long long t", "const long long B", "const long long H"]
    params += [f"const T {s}" for s in kernel.scalars]
    lines = [
        f"// {kernel.name}: one block per batch row b; its threads stride over the units j.",
        "template <typename T>",
        f"__global__ void {kernel.name}({', '.join(params)}) {{",
        "    const long long b = blockIdx.x;",
        "    if (b >= B) return;  // the whole block leaves together",
    ]
    if kernel.max_sums:
        lines.append(f"    __shared__ T lstm_red[{kernel.max_sums}][32];")
    n_phases = sum(kind == "phase" for kind, _ in parsed)
    seen_phases = 0
    for n, (kind, body) in enumerate(parsed):
        if kind == "row":
            lines.append(f"    // step {n}: row values")
            for s in body:
                if s[0] == "load":
                    lines.append(f"    const T {s[1]} = buf_{s[2]}[{s[3].c}];")
                elif s[0] == "let":
                    lines.append(f"    const T {s[1]} = {s[2].c};")
                else:
                    lines.append(f"    if (threadIdx.x == 0) buf_{s[1]}[{s[2].c}] = {s[3].c};")
            continue
        seen_phases += 1
        sums = [s for s in body if s[0] == "sum"]
        acc = f"lstm_acc{n}"
        lines.append(f"    // step {n}: every unit j of the row")
        if sums:
            lines.append(f"    T {acc}[{len(sums)}] = {{{', '.join('T(0)' for _ in sums)}}};")
        lines.append("    for (long long j = threadIdx.x; j < H; j += blockDim.x) {")
        k = 0
        for s in body:
            if s[0] == "load":
                lines.append(f"        const T {s[1]} = buf_{s[2]}[{s[3].c}];")
            elif s[0] == "let":
                lines.append(f"        const T {s[1]} = {s[2].c};")
            elif s[0] == "store":
                lines.append(f"        buf_{s[1]}[{s[2].c}] = {s[3].c};")
            else:
                lines.append(f"        {acc}[{k}] += {s[2].c};")
                k += 1
        lines.append("    }")
        if sums:
            lines.append(f"    lstm_block_sum<T, {len(sums)}>({acc}, lstm_red);")
            lines += [f"    const T {s[1]} = {acc}[{m}];" for m, s in enumerate(sums)]
        elif seen_phases < n_phases:
            lines.append("    __syncthreads();")
    lines.append("}")
    return "\n".join(lines)


def cuda_source(kernels: tuple[Kernel, ...] | list[Kernel]) -> str:
    """The CUDA C++ of ``kernels``: one template each, to instantiate as ``name<float>`` and ``name<double>``."""
    return _PRELUDE + "\n" + "\n\n".join(_kernel_source(k) for k in kernels) + "\n"


def block_size(H: int) -> int:
    """Threads per block: H rounded up to whole warps, at most MAX_THREADS (threads then stride)."""
    return min(MAX_THREADS, max(32, -(-H // 32) * 32))


# --- NumPy emulation ------------------------------------------------------------------------------


def _flat(kernel: Kernel, arrays: Mapping[str, Any], dtype: np.dtype) -> dict[str, np.ndarray]:
    flat = {}
    for name in kernel.array_names:
        if name not in arrays:
            raise ValueError(f"{kernel.name}: missing array {name!r}; expected {kernel.array_names}")
        a = arrays[name]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{kernel.name}: array {name!r}: expected a {dtype} NumPy array, got {type(a).__name__}")
        _check_buffer(kernel.name, name, a, dtype)
        flat[name] = a.reshape(-1)  # a view: stores go to the caller's array
    return flat


def _check_buffer(where: str, name: str, a: Any, dtype: np.dtype) -> None:
    """A kernel (or GEMM) operand must have the element type and be C-contiguous: it is indexed flat."""
    if getattr(a, "dtype", None) != dtype:
        raise TypeError(f"{where}: array {name!r}: expected dtype {dtype}, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{where}: array {name!r} must be C-contiguous: it is indexed as a flat buffer")


def _indices(ix: _Expr, env: Mapping[str, Any], shape: tuple[int, int], buf: str, size: int, at: str) -> np.ndarray:
    idx = np.broadcast_to(np.asarray(ix.evaluate(env), dtype=np.int64), shape)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise IndexError(f"{at}: index {ix.text!r} into {buf!r} reaches [{idx.min()}, {idx.max()}], outside "
                         f"its {size} elements")
    return idx


class _Races:
    """Who touches which element, to find what would race on the GPU (the emulation itself cannot).

    Threads are the (b, j) pairs (stricter than CUDA, where one thread takes several j in turn);
    blocks are the rows b. Within a phase, an element one thread stores must not be loaded or
    stored by another; within the kernel, an element one block stores must not be touched by
    another block (blocks never synchronize).
    """

    def __init__(self, kernel: Kernel, flat: Mapping[str, np.ndarray]):
        self.kernel = kernel
        self.sizes = {name: a.size for name, a in flat.items()}
        self.block_writer = {name: np.full(size, -1, np.int64) for name, size in self.sizes.items()}
        self.block_reads: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.new_phase()

    def new_phase(self) -> None:
        self.thread_writer: dict[str, np.ndarray] = {}
        self.thread_reads: list[tuple[str, np.ndarray, np.ndarray]] = []

    def _fail(self, what: str, buf: str, address: int) -> None:
        raise AssertionError(f"{self.kernel.name}: {what} on {buf!r} at element {address}: the GPU result would "
                             f"depend on the order threads run in")

    def access(self, buf: str, idx: np.ndarray, thread: np.ndarray, block: np.ndarray, *, store: bool) -> None:
        idx, thread, block = (np.broadcast_to(a, idx.shape).ravel() for a in (idx, thread, block))
        if not store:
            self.thread_reads.append((buf, idx, thread))
            self.block_reads.append((buf, idx, block))
            return
        order = np.argsort(idx, kind="stable")  # one statement storing one element twice
        si, sb, st = idx[order], block[order], thread[order]
        same = si[1:] == si[:-1]
        for what, who in (("two blocks store", sb), ("two threads store", st)):
            clash = same & (who[1:] != who[:-1])
            if clash.any():
                self._fail(what, buf, int(si[1:][clash][0]))
        for what, writer, who in (("two blocks store", self.block_writer[buf], block),
                                  ("two threads store",
                                   self.thread_writer.setdefault(buf, np.full(self.sizes[buf], -1, np.int64)), thread)):
            clash = (writer[idx] != -1) & (writer[idx] != who)
            if clash.any():
                self._fail(what, buf, int(idx[clash][0]))
            writer[idx] = who

    def end_phase(self) -> None:
        for buf, idx, thread in self.thread_reads:
            writer = self.thread_writer.get(buf)
            if writer is not None:
                clash = (writer[idx] != -1) & (writer[idx] != thread)
                if clash.any():
                    self._fail("one thread loads what another stores in the same phase", buf, int(idx[clash][0]))
        self.new_phase()

    def end_kernel(self) -> None:
        for buf, idx, block in self.block_reads:
            owner = self.block_writer[buf]
            clash = (owner[idx] != -1) & (owner[idx] != block)
            if clash.any():
                self._fail("one block loads what another stores", buf, int(idx[clash][0]))


def emulate(kernel: Kernel, arrays: Mapping[str, np.ndarray], *, t: int, B: int, H: int,
            scalars: Mapping[str, float] | None = None) -> None:
    """Run ``kernel`` with NumPy: the same statements, in the same order, on the same flat indices.

    All (B, H) threads of a phase run one statement at a time. That is the CUDA semantics when no
    element is touched by two threads of a phase with one of them storing, nor by two blocks, which
    is checked on every run (an AssertionError names the element); sums are over the H units of
    each row; every stored value must keep the element dtype (no silent promotion).
    """
    dtype = np.dtype(arrays[kernel.array_names[0]].dtype)
    flat = _flat(kernel, arrays, dtype)
    scalars = dict(scalars or {})
    missing = set(kernel.scalars) - set(scalars)
    if missing:
        raise ValueError(f"{kernel.name}: missing scalars {sorted(missing)}")
    b = np.arange(B, dtype=np.int64).reshape(B, 1)
    j = np.arange(H, dtype=np.int64).reshape(1, H)
    races = _Races(kernel, flat)
    row: dict[str, Any] = {"t": int(t), "B": int(B), "H": int(H), "b": b, **_NP_FUNCTIONS}
    row.update({s: dtype.type(scalars[s]) for s in kernel.scalars})
    for n, (kind, body) in enumerate(kernel._compiled):  # type: ignore[attr-defined]
        at = f"{kernel.name}, step {n}"
        in_phase = kind == "phase"
        env = dict(row, j=j) if in_phase else row
        shape = (B, H) if in_phase else (B, 1)
        thread = b * H + j if in_phase else b * H  # thread 0 of the block does a Row's stores
        totals = {}
        for s in body:
            if s[0] == "load":
                idx = _indices(s[3], env, shape, s[2], flat[s[2]].size, at)
                races.access(s[2], idx, thread, b, store=False)
                env[s[1]] = flat[s[2]][idx]
            elif s[0] == "let":
                env[s[1]] = s[2].evaluate(env)
            elif s[0] == "store":
                value = np.broadcast_to(s[3].evaluate(env), shape)
                if value.dtype != dtype:
                    raise TypeError(f"{at}: {s[3].text!r} is {value.dtype}, not {dtype}: the kernel would convert")
                idx = _indices(s[2], env, shape, s[1], flat[s[1]].size, at)
                races.access(s[1], idx, thread, b, store=True)
                flat[s[1]][idx] = value
            else:
                totals[s[1]] = np.broadcast_to(s[2].evaluate(env), shape).sum(axis=1, keepdims=True)
        row.update(totals)
        if in_phase:
            races.end_phase()
    races.end_kernel()


def _launch(kernel: Kernel, arrays: Mapping[str, Any], *, t: int, B: int, H: int,
            scalars: Mapping[str, float]) -> None:
    dtype = np.dtype(arrays[kernel.array_names[0]].dtype)
    fn = _function(kernel, dtype)
    args = [arrays[name] for name in kernel.array_names]
    args += [np.int64(t), np.int64(B), np.int64(H)]
    args += [dtype.type(scalars[s]) for s in kernel.scalars]
    fn((B,), (block_size(H),), tuple(args))


_modules: dict[str, Any] = {}
_functions: dict[tuple[str, str], Any] = {}


def _function(kernel: Kernel, dtype: np.dtype) -> Any:
    """The compiled kernel for ``dtype`` (a RawModule per kernel, compiled at first use and cached)."""
    key = (kernel.name, dtype.name)
    fn = _functions.get(key)
    if fn is None:
        if dtype.name not in CTYPES:
            raise ValueError(f"{kernel.name}: expected dtype float32 or float64, got {dtype.name}")
        module = _modules.get(kernel.name)
        if module is None:
            cupy = _cupy()
            module = cupy.RawModule(code=cuda_source((kernel,)), name_expressions=kernel.name_expressions())
            _modules[kernel.name] = module
        fn = module.get_function(f"{kernel.name}<{CTYPES[dtype.name]}>")
        _functions[key] = fn
    return fn


def run_kernel(kernel: Kernel, arrays: Mapping[str, Any], *, t: int, B: int, H: int,
               scalars: Mapping[str, float] | None = None) -> None:
    """Launch ``kernel`` on CuPy arrays, or emulate it when the arrays are NumPy's."""
    if isinstance(arrays[kernel.array_names[0]], np.ndarray):
        emulate(kernel, arrays, t=t, B=B, H=H, scalars=scalars)
    else:
        _launch(kernel, arrays, t=t, B=B, H=H, scalars=scalars or {})


# --- Whole time loops on the GPU -----------------------------------------------------------------
#
# Per step the GPU work is small (at T=100, B=64, H=512 a step's GEMM and kernel take about 10 us
# and 3 us on an H100), so Python's share decides the speed: slicing five views, building the
# argument dict and converting the scalars cost more than the launches. The GPU loops therefore
# compute every step's arguments before the loop, as raw device pointers, and call cuBLAS on
# pointers directly; each step is then one GEMM call and one kernel call.


class _CupyLauncher:
    """Device pointers, the compiled kernels and cuBLAS on pointers, for the GPU time loops.

    Tests stand in for it (``_launcher_for``) with one that resolves pointers to NumPy buffers.
    """

    #: Values of the cuBLAS C enums used here (cublasOperation_t, cublasPointerMode_t, cublasMath_t).
    OP_N = 0
    POINTER_MODE_HOST = 0
    DEFAULT_MATH = 0  # no TF32: a float32 GEMM is an IEEE float32 GEMM

    def __init__(self) -> None:
        self.cupy = _cupy()
        from cupy_backends.cuda.libs import cublas

        self.cublas = cublas

    def pointer(self, a: Any) -> int:
        return int(a.data.ptr)

    def function(self, kernel: Kernel, dtype: np.dtype) -> Any:
        return _function(kernel, np.dtype(dtype))

    def gemm(self, dtype: np.dtype, *, M: int, N: int, K: int) -> Any:
        """g(a, b, c) computes C (M, N) = A (M, K) @ B (K, N), C-contiguous operands given by pointer.

        cuBLAS is column-major, and a row-major (M, N) matrix is the column-major (N, M) one, so the
        call computes C^T = B^T A^T: m=N, n=M, with B first.
        """
        dtype = np.dtype(dtype)
        routine = {"float32": self.cublas.sgemm, "float64": self.cublas.dgemm}[dtype.name]
        handle = self.cupy.cuda.device.get_cublas_handle()
        one, zero = np.ones(1, dtype), np.zeros(1, dtype)  # host scalars (pointer mode host)
        alpha, beta, op = one.ctypes.data, zero.ctypes.data, self.OP_N

        def g(a: int, b: int, c: int, _keep: Any = (one, zero)) -> None:
            routine(handle, op, op, N, M, K, alpha, b, N, a, K, beta, c, N)

        return g

    @contextmanager
    def session(self) -> Iterator[None]:
        """Host pointer mode and no TF32 on CuPy's cuBLAS handle for the loop; restored after."""
        cublas, handle = self.cublas, self.cupy.cuda.device.get_cublas_handle()
        pointer_mode, math_mode = cublas.getPointerMode(handle), cublas.getMathMode(handle)
        cublas.setPointerMode(handle, self.POINTER_MODE_HOST)
        cublas.setMathMode(handle, self.DEFAULT_MATH)
        try:
            yield
        finally:
            cublas.setPointerMode(handle, pointer_mode)
            cublas.setMathMode(handle, math_mode)


@functools.cache
def _cupy_launcher() -> _CupyLauncher:
    return _CupyLauncher()


def _launcher_for(a: Any) -> Any:
    """The launcher for arrays like ``a``: None for NumPy arrays (the loops then emulate step by step)."""
    return None if isinstance(a, np.ndarray) else _cupy_launcher()


def _step_args(launcher: Any, kernel: Kernel, arrays_at: Any, *, T: int, B: int, H: int, dtype: np.dtype,
               scalars: Mapping[str, float]) -> list[tuple[Any, ...]]:
    """The kernel's arguments for each step t < T, in the order of its C signature.

    ``arrays_at(t)`` gives the kernel's arrays at step t. Each is either one buffer at every step
    or a view whose start moves by a fixed stride with t (gates[t], c[t + 1], ...), so its pointer
    at step t is p(0) + t * (p(1) - p(0)); step T - 1 is checked against its own views.
    """
    dtype = np.dtype(dtype)
    first = arrays_at(0)
    for name in kernel.array_names:
        if name not in first:
            raise ValueError(f"{kernel.name}: missing array {name!r}; expected {kernel.array_names}")
        _check_buffer(kernel.name, name, first[name], dtype)
    p0 = [launcher.pointer(first[n]) for n in kernel.array_names]
    p1 = [launcher.pointer(arrays_at(1)[n]) for n in kernel.array_names] if T > 1 else p0
    strides = [b - a for a, b in zip(p0, p1)]
    if T > 2:
        last = [launcher.pointer(arrays_at(T - 1)[n]) for n in kernel.array_names]
        if last != [a + (T - 1) * d for a, d in zip(p0, strides)]:
            raise ValueError(f"{kernel.name}: the per-step arrays do not advance by a fixed stride")
    tail = (np.int64(B), np.int64(H), *(dtype.type(scalars[s]) for s in kernel.scalars))
    return [(*(a + t * d for a, d in zip(p0, strides)), np.int64(t), *tail) for t in range(T)]


# --- The kernels ----------------------------------------------------------------------------------
#
# Buffers and their index formulas. Per-step views (a = gates[t], da = da[t], c_prev, c, h, dh, dc,
# dy_t, rec) are indexed from their own start; whole (T, ...) buffers of the cell (tanh_c, the
# LayerNorm statistics, dz) are passed whole with the step t. Gates are in the internal order
# i, f, o, g (impls.stacked), so gate k of a (B, 4H) block is columns k*H .. k*H + H - 1.

IFOG = ("i", "f", "o", "g")
BH = "b * H + j"  # a (B, H) view
STEP_BH = "t * B * H + b * H + j"  # step t of a (T, B, H) buffer
UNIT = "j"  # an (H,) parameter


def _gate(k: int) -> str:  # gate k of a (B, 4H) view
    return f"b * 4 * H + {k} * H + j"


def _step_gate(k: int) -> str:  # gate k at step t of a (T, B, 4H) buffer
    return f"t * B * 4 * H + b * 4 * H + {k} * H + j"


def _ln_row(k: int) -> str:  # row k of a (5, H) gain or shift, internal order i, f, o, g, c
    return f"{k} * H + j"


def _gate_loads(prefix: str, buf: str, fmt=_gate, gates=IFOG) -> tuple[Load, ...]:
    return tuple(Load(f"{prefix}{g}", buf, fmt(IFOG.index(g))) for g in gates)


VANILLA_FORWARD = Kernel(
    "lstm_vanilla_forward",
    arrays=(("a", "out"), ("rec", "in"), ("c_prev", "in"), ("c", "out"), ("h", "out"), ("tanh_c", "out")),
    steps=(Phase((
        *_gate_loads("a_", "a"),
        *_gate_loads("r_", "rec"),
        Load("c_prev", "c_prev", BH),
        Let("i", "sigmoid(a_i + r_i)"),
        Let("f", "sigmoid(a_f + r_f)"),
        Let("o", "sigmoid(a_o + r_o)"),
        Let("g", "tanh(a_g + r_g)"),
        Let("c_t", "f * c_prev + i * g"),
        Let("tanh_c_t", "tanh(c_t)"),
        *(Store("a", _gate(k), g) for k, g in enumerate(IFOG)),  # the activations replace a
        Store("c", BH, "c_t"),
        Store("tanh_c", STEP_BH, "tanh_c_t"),
        Store("h", BH, "o * tanh_c_t"),
    )),),
)

VANILLA_BACKWARD = Kernel(
    "lstm_vanilla_backward",
    arrays=(("dy", "in"), ("dh", "in"), ("dc", "out"), ("da", "out"), ("a", "in"), ("c_prev", "in"),
            ("tanh_c", "in")),
    steps=(Phase((
        Load("dy", "dy", BH),
        Load("dh", "dh", BH),
        Load("dc", "dc", BH),
        Load("c_prev", "c_prev", BH),
        Load("tc", "tanh_c", STEP_BH),
        *_gate_loads("", "a"),
        Let("dh_all", "dh + dy"),
        Let("dc_t", "dc + (1 - tc * tc) * o * dh_all"),  # c_t is reached directly and through h_t
        Store("da", _gate(0), "dc_t * g * i * (1 - i)"),
        Store("da", _gate(1), "dc_t * c_prev * f * (1 - f)"),
        Store("da", _gate(2), "dh_all * tc * o * (1 - o)"),
        Store("da", _gate(3), "dc_t * i * (1 - g * g)"),
        Store("dc", BH, "dc_t * f"),  # dL/dc_{t-1}
    )),),
)

PEEPHOLE_FORWARD = Kernel(
    "lstm_peephole_forward",
    arrays=(("a", "out"), ("rec", "in"), ("c_prev", "in"), ("c", "out"), ("h", "out"), ("tanh_c", "out"),
            ("p_i", "in"), ("p_f", "in"), ("p_o", "in")),
    steps=(Phase((
        *_gate_loads("a_", "a"),
        *_gate_loads("r_", "rec"),
        Load("c_prev", "c_prev", BH),
        Load("p_i", "p_i", UNIT),
        Load("p_f", "p_f", UNIT),
        Load("p_o", "p_o", UNIT),
        Let("i", "sigmoid(a_i + r_i + c_prev * p_i)"),  # i and f see c_{t-1}
        Let("f", "sigmoid(a_f + r_f + c_prev * p_f)"),
        Let("g", "tanh(a_g + r_g)"),
        Let("c_t", "f * c_prev + i * g"),
        Let("o", "sigmoid(a_o + r_o + c_t * p_o)"),  # o sees c_t
        Let("tanh_c_t", "tanh(c_t)"),
        *(Store("a", _gate(k), g) for k, g in enumerate(IFOG)),
        Store("c", BH, "c_t"),
        Store("tanh_c", STEP_BH, "tanh_c_t"),
        Store("h", BH, "o * tanh_c_t"),
    )),),
)

PEEPHOLE_BACKWARD = Kernel(
    "lstm_peephole_backward",
    arrays=(("dy", "in"), ("dh", "in"), ("dc", "out"), ("da", "out"), ("a", "in"), ("c_prev", "in"),
            ("tanh_c", "in"), ("p_i", "in"), ("p_f", "in"), ("p_o", "in")),
    steps=(Phase((
        Load("dy", "dy", BH),
        Load("dh", "dh", BH),
        Load("dc", "dc", BH),
        Load("c_prev", "c_prev", BH),
        Load("tc", "tanh_c", STEP_BH),
        Load("p_i", "p_i", UNIT),
        Load("p_f", "p_f", UNIT),
        Load("p_o", "p_o", UNIT),
        *_gate_loads("", "a"),
        Let("dh_all", "dh + dy"),
        Let("da_o", "dh_all * tc * o * (1 - o)"),
        # c_t is reached directly, through h_t and through the output gate's peephole
        Let("dc_t", "dc + (1 - tc * tc) * o * dh_all + da_o * p_o"),
        Let("da_i", "dc_t * g * i * (1 - i)"),
        Let("da_f", "dc_t * c_prev * f * (1 - f)"),
        Store("da", _gate(0), "da_i"),
        Store("da", _gate(1), "da_f"),
        Store("da", _gate(2), "da_o"),
        Store("da", _gate(3), "dc_t * ((1 - g * g) * i)"),
        Store("dc", BH, "dc_t * f + da_i * p_i + da_f * p_f"),  # dL/dc_{t-1}, peepholes included
    )),),
)

# LayerNorm: the four gate rows of a step are normalized separately, then the new cell state. Two-pass
# statistics as in the NumPy cell (mean first, then the mean of squared deviations), so each phase
# that needs a statistic starts after the reduction that makes it. The normalized rows n, n_c and
# r = 1 / sqrt(var + eps) are kept (T-long buffers) for the backward and the gain/shift gradients.
_LN_FORWARD_ARRAYS = (("a", "out"), ("rec", "in"), ("c_prev", "in"), ("c", "out"), ("h", "out"),
                      ("gamma", "in"), ("beta", "in"), ("n", "out"), ("r", "out"), ("n_c", "out"),
                      ("r_c", "out"), ("tanh_c", "out"))

LAYERNORM_FORWARD = Kernel(
    "lstm_layernorm_forward",
    arrays=_LN_FORWARD_ARRAYS,
    scalars=("eps",),
    steps=(
        Phase((  # v_k = a_k + rec_k, kept in a; the four row sums
            *_gate_loads("a_", "a"),
            *_gate_loads("r_", "rec"),
            *(Let(f"v_{g}", f"a_{g} + r_{g}") for g in IFOG),
            *(Store("a", _gate(k), f"v_{g}") for k, g in enumerate(IFOG)),
            *(Sum(f"sum_{g}", f"v_{g}") for g in IFOG),
        )),
        Row(tuple(Let(f"mean_{g}", f"sum_{g} / H") for g in IFOG)),
        Phase((  # the squared deviations
            *_gate_loads("v_", "a"),
            *(Let(f"d_{g}", f"v_{g} - mean_{g}") for g in IFOG),
            *(Sum(f"sq_{g}", f"d_{g} * d_{g}") for g in IFOG),
        )),
        Row((
            *(Let(f"r_{g}", f"1 / sqrt(sq_{g} / H + eps)") for g in IFOG),  # biased variance, eps inside
            *(Store("r", f"t * B * 4 + b * 4 + {k}", f"r_{g}") for k, g in enumerate(IFOG)),
        )),
        Phase((  # normalize, gain and shift, the gates, s_t = f * c_{t-1} + i * g (kept in c)
            *_gate_loads("v_", "a"),
            *(Let(f"n_{g}", f"(v_{g} - mean_{g}) * r_{g}") for g in IFOG),
            *(Store("n", _step_gate(k), f"n_{g}") for k, g in enumerate(IFOG)),
            *(Load(f"gamma_{g}", "gamma", _ln_row(k)) for k, g in enumerate(IFOG)),
            *(Load(f"beta_{g}", "beta", _ln_row(k)) for k, g in enumerate(IFOG)),
            Let("i", "sigmoid(n_i * gamma_i + beta_i)"),
            Let("f", "sigmoid(n_f * gamma_f + beta_f)"),
            Let("o", "sigmoid(n_o * gamma_o + beta_o)"),
            Let("g", "tanh(n_g * gamma_g + beta_g)"),
            *(Store("a", _gate(k), g) for k, g in enumerate(IFOG)),
            Load("c_prev", "c_prev", BH),
            Let("s", "f * c_prev + i * g"),
            Store("c", BH, "s"),
            Sum("sum_c", "s"),
        )),
        Row((Let("mean_c", "sum_c / H"),)),
        Phase((
            Load("s", "c", BH),
            Let("d", "s - mean_c"),
            Sum("sq_c", "d * d"),
        )),
        Row((
            Let("r_cell", "1 / sqrt(sq_c / H + eps)"),
            Store("r_c", "t * B + b", "r_cell"),
        )),
        Phase((  # c_t = LN_c(s_t), h_t = o * tanh(c_t)
            Load("s", "c", BH),
            Let("n_cell", "(s - mean_c) * r_cell"),
            Store("n_c", STEP_BH, "n_cell"),
            Load("gamma_c", "gamma", _ln_row(4)),
            Load("beta_c", "beta", _ln_row(4)),
            Let("c_t", "n_cell * gamma_c + beta_c"),
            Store("c", BH, "c_t"),
            Let("tanh_c_t", "tanh(c_t)"),
            Store("tanh_c", STEP_BH, "tanh_c_t"),
            Load("o", "a", _gate(2)),
            Store("h", BH, "o * tanh_c_t"),
        )),
    ),
)

# Backward through a layer norm z = n * gamma + beta: dn = dz * gamma,
# dv = r * (dn - mean(dn) - n * mean(dn * n)), the two means per row being the phases' sums.
LAYERNORM_BACKWARD = Kernel(
    "lstm_layernorm_backward",
    arrays=(("dy", "in"), ("dh", "in"), ("dc", "out"), ("da", "out"), ("a", "in"), ("c_prev", "in"),
            ("tanh_c", "in"), ("n", "in"), ("r", "in"), ("n_c", "in"), ("r_c", "in"), ("gamma", "in"),
            ("dz", "out"), ("dz_c", "out")),
    steps=(
        Phase((  # dz_o, dz_c = dL/dc_t, and the sums for LN_c's backward
            Load("dy", "dy", BH),
            Load("dh", "dh", BH),
            Load("dc", "dc", BH),
            Load("tc", "tanh_c", STEP_BH),
            Load("o", "a", _gate(2)),
            Let("dh_all", "dh + dy"),
            Store("dz", _step_gate(2), "dh_all * tc * o * (1 - o)"),
            Let("dz_cell", "dc + (1 - tc * tc) * o * dh_all"),  # c_t is reached directly and through h_t
            Store("dz_c", STEP_BH, "dz_cell"),
            Load("n_cell", "n_c", STEP_BH),
            Load("gamma_c", "gamma", _ln_row(4)),
            Let("dn", "dz_cell * gamma_c"),
            Sum("s1_c", "dn"),
            Sum("s2_c", "dn * n_cell"),
        )),
        Row((
            Let("m1_c", "s1_c / H"),
            Let("m2_c", "s2_c / H"),
            Load("r_cell", "r_c", "t * B + b"),
        )),
        Phase((  # ds = LN_c backward; dz_i, dz_f, dz_g; dc_{t-1}; the sums for the gates' backward
            Load("dz_cell", "dz_c", STEP_BH),
            Load("n_cell", "n_c", STEP_BH),
            Load("gamma_c", "gamma", _ln_row(4)),
            Let("dn", "dz_cell * gamma_c"),
            Let("ds", "r_cell * (dn - m1_c - n_cell * m2_c)"),
            *_gate_loads("", "a", gates=("i", "f", "g")),
            Load("c_prev", "c_prev", BH),
            Let("dz_i", "ds * g * i * (1 - i)"),
            Let("dz_f", "ds * c_prev * f * (1 - f)"),
            Let("dz_g", "ds * ((1 - g * g) * i)"),
            Load("dz_o", "dz", _step_gate(2)),  # this thread stored it in the phase before
            Store("dz", _step_gate(0), "dz_i"),
            Store("dz", _step_gate(1), "dz_f"),
            Store("dz", _step_gate(3), "dz_g"),
            Store("dc", BH, "ds * f"),  # dL/dc_{t-1}
            *(Load(f"n_{g}", "n", _step_gate(k)) for k, g in enumerate(IFOG)),
            *(Load(f"gamma_{g}", "gamma", _ln_row(k)) for k, g in enumerate(IFOG)),
            *(Let(f"dn_{g}", f"dz_{g} * gamma_{g}") for g in IFOG),
            *(Sum(f"s1_{g}", f"dn_{g}") for g in IFOG),
            *(Sum(f"s2_{g}", f"dn_{g} * n_{g}") for g in IFOG),
        )),
        Row((
            *(Let(f"m1_{g}", f"s1_{g} / H") for g in IFOG),
            *(Let(f"m2_{g}", f"s2_{g} / H") for g in IFOG),
            *(Load(f"r_{g}", "r", f"t * B * 4 + b * 4 + {k}") for k, g in enumerate(IFOG)),
        )),
        Phase((  # da_k = LN_k backward of dz_k
            *(Load(f"dz_{g}", "dz", _step_gate(k)) for k, g in enumerate(IFOG)),
            *(Load(f"n_{g}", "n", _step_gate(k)) for k, g in enumerate(IFOG)),
            *(Load(f"gamma_{g}", "gamma", _ln_row(k)) for k, g in enumerate(IFOG)),
            *(Let(f"dn_{g}", f"dz_{g} * gamma_{g}") for g in IFOG),
            *(Store("da", _gate(k), f"r_{g} * (dn_{g} - m1_{g} - n_{g} * m2_{g})") for k, g in enumerate(IFOG)),
        )),
    ),
)

#: Every kernel, by variant: (forward, backward).
KERNELS: dict[str, tuple[Kernel, Kernel]] = {
    "vanilla": (VANILLA_FORWARD, VANILLA_BACKWARD),
    "peephole": (PEEPHOLE_FORWARD, PEEPHOLE_BACKWARD),
    "layernorm": (LAYERNORM_FORWARD, LAYERNORM_BACKWARD),
}


# --- Cells: one GEMM and one kernel per step ----------------------------------------------------


class _Fused:
    """Mixin over a NumPy cell: ``step`` and ``step_backward`` become one GEMM and one fused kernel.

    Buffers, parameters and the reductions after the loop are the NumPy cell's (they run on any
    namespace). ``forward_step`` and ``backward_step`` are the kernels alone (with nothing to add),
    so that a fused cell can stand wherever a cell can, and be compared with the NumPy one.
    """

    forward_kernel: Kernel
    backward_kernel: Kernel

    def kernel_scalars(self, P) -> dict[str, float]:
        return {}

    def forward_arrays(self, t, a, rec, c_prev, c, h, S, P) -> dict[str, Any]:
        return {"a": a, "rec": rec, "c_prev": c_prev, "c": c, "h": h, "tanh_c": S["tanh_c"]}

    def backward_arrays(self, t, dy_t, dh, dc, da, a, c_prev, S, G, P) -> dict[str, Any]:
        return {"dy": dy_t, "dh": dh, "dc": dc, "da": da, "a": a, "c_prev": c_prev, "tanh_c": S["tanh_c"]}

    def forward_loop(self, xp, gates, rec, h, RT, c, S, P) -> None:
        launcher = _launcher_for(gates)
        if launcher is None:  # NumPy: step by step, each kernel emulated
            return super().forward_loop(xp, gates, rec, h, RT, c, S, P)
        T, B, H = h.shape[0] - 1, h.shape[1], h.shape[2]
        dtype = np.dtype(gates.dtype)
        for name, a in (("h", h), ("RT", RT), ("rec", rec)):
            _check_buffer("forward GEMM", name, a, dtype)
        args = _step_args(launcher, self.forward_kernel,
                          lambda t: self.forward_arrays(t, gates[t], rec, c[t], c[t + 1], h[t + 1], S, P),
                          T=T, B=B, H=H, dtype=dtype, scalars=self.kernel_scalars(P))
        kernel = launcher.function(self.forward_kernel, dtype)
        gemm = launcher.gemm(dtype, M=B, N=4 * H, K=H)  # rec = h_{t-1} @ R^T: (B, H) @ (H, 4H)
        h_ptr, h_step = launcher.pointer(h), B * H * dtype.itemsize
        RT_ptr, rec_ptr = launcher.pointer(RT), launcher.pointer(rec)
        grid, block = (B,), (block_size(H),)
        with launcher.session():
            for t in range(T):
                gemm(h_ptr + t * h_step, RT_ptr, rec_ptr)
                kernel(grid, block, args[t])

    def backward_loop(self, xp, dy, dh, dc, da, gates, c, R, S, G, P) -> None:
        launcher = _launcher_for(gates)
        if launcher is None:
            return super().backward_loop(xp, dy, dh, dc, da, gates, c, R, S, G, P)
        T, B, H = gates.shape[0], gates.shape[1], dh.shape[1]
        dtype = np.dtype(gates.dtype)
        for name, a in (("da", da), ("R", R), ("dh", dh)):
            _check_buffer("backward GEMM", name, a, dtype)
        args = _step_args(launcher, self.backward_kernel,
                          lambda t: self.backward_arrays(t, dy[t], dh, dc, da[t], gates[t], c[t], S, G, P),
                          T=T, B=B, H=H, dtype=dtype, scalars=self.kernel_scalars(P))
        kernel = launcher.function(self.backward_kernel, dtype)
        gemm = launcher.gemm(dtype, M=B, N=H, K=4 * H)  # dh = da_t @ R: (B, 4H) @ (4H, H)
        da_ptr, da_step = launcher.pointer(da), B * 4 * H * dtype.itemsize
        R_ptr, dh_ptr = launcher.pointer(R), launcher.pointer(dh)
        grid, block = (B,), (block_size(H),)
        with launcher.session():
            for t in reversed(range(T)):
                kernel(grid, block, args[t])
                gemm(da_ptr + t * da_step, R_ptr, dh_ptr)

    def step(self, xp, t, a, rec, h_prev, RT, c_prev, c, h, S, P) -> None:
        xp.matmul(h_prev, RT, out=rec)  # (B, H) @ (H, 4H); the kernel adds it to a
        B, H = c.shape
        run_kernel(self.forward_kernel, self.forward_arrays(t, a, rec, c_prev, c, h, S, P), t=t, B=B, H=H,
                   scalars=self.kernel_scalars(P))

    def step_backward(self, xp, t, dy_t, dh, dc, da, a, c_prev, c, R, S, G, P) -> None:
        B, H = c.shape
        run_kernel(self.backward_kernel, self.backward_arrays(t, dy_t, dh, dc, da, a, c_prev, S, G, P), t=t, B=B,
                   H=H, scalars=self.kernel_scalars(P))
        xp.matmul(da, R, out=dh)  # (B, 4H) @ (4H, H) -> dL/dh_{t-1}

    def forward_step(self, xp, t, a, c_prev, c, h, S, P) -> None:
        B, H = c.shape
        arrays = self.forward_arrays(t, a, xp.zeros_like(a), c_prev, c, h, S, P)
        run_kernel(self.forward_kernel, arrays, t=t, B=B, H=H, scalars=self.kernel_scalars(P))

    def backward_step(self, xp, t, dh, dc, da, a, c_prev, c, S, G, P) -> None:
        B, H = c.shape
        arrays = self.backward_arrays(t, xp.zeros_like(dh), dh, dc, da, a, c_prev, S, G, P)
        run_kernel(self.backward_kernel, arrays, t=t, B=B, H=H, scalars=self.kernel_scalars(P))


class FusedVanillaCell(_Fused, VanillaCell):
    forward_kernel, backward_kernel = KERNELS["vanilla"]


class FusedPeepholeCell(_Fused, PeepholeCell):
    forward_kernel, backward_kernel = KERNELS["peephole"]

    def prepare(self, xp, params, dtype, *, ln_eps):
        # The kernels index p_i, p_f, p_o as flat (H,) buffers.
        return {k: xp.ascontiguousarray(v) for k, v in super().prepare(xp, params, dtype, ln_eps=ln_eps).items()}

    def forward_arrays(self, t, a, rec, c_prev, c, h, S, P):
        return {**super().forward_arrays(t, a, rec, c_prev, c, h, S, P), **P}

    def backward_arrays(self, t, dy_t, dh, dc, da, a, c_prev, S, G, P):
        return {**super().backward_arrays(t, dy_t, dh, dc, da, a, c_prev, S, G, P), **P}


class FusedLayerNormCell(_Fused, LayerNormCell):
    forward_kernel, backward_kernel = KERNELS["layernorm"]

    def prepare(self, xp, params, dtype, *, ln_eps):
        P = super().prepare(xp, params, dtype, ln_eps=ln_eps)
        return {**P, "gamma": xp.ascontiguousarray(P["gamma"]), "beta": xp.ascontiguousarray(P["beta"])}

    def kernel_scalars(self, P):
        return {"eps": P["eps"]}

    def forward_arrays(self, t, a, rec, c_prev, c, h, S, P):
        return {**super().forward_arrays(t, a, rec, c_prev, c, h, S, P), "gamma": P["gamma"], "beta": P["beta"],
                "n": S["n"], "r": S["r"], "n_c": S["n_c"], "r_c": S["r_c"]}

    def backward_arrays(self, t, dy_t, dh, dc, da, a, c_prev, S, G, P):
        return {**super().backward_arrays(t, dy_t, dh, dc, da, a, c_prev, S, G, P), "n": S["n"], "r": S["r"],
                "n_c": S["n_c"], "r_c": S["r_c"], "gamma": P["gamma"], "dz": G["dz"], "dz_c": G["dz_c"]}


# --- The implementations ---------------------------------------------------------------------------


class CupyLSTM(StackedLSTM):
    """Vanilla LSTM on the GPU with CuPy: stacked GEMMs and one fused gate kernel per step.

    Inputs are NumPy (or CuPy) arrays; outputs and gradients stay CuPy arrays (the harness converts
    them). ``xp`` is CuPy, imported at first use; set ``impl.xp = numpy`` to run the very same code
    with every kernel emulated by NumPy (what CI does, having no GPU).
    """

    name = "cupy"
    variant = "vanilla"
    dtypes = ("float64", "float32")
    cell = FusedVanillaCell()
    _xp: Any = None

    @property  # type: ignore[override]
    def xp(self) -> Any:
        if self._xp is None:
            self._xp = _cupy()
        return self._xp

    @xp.setter
    def xp(self, value: Any) -> None:
        self._xp = value

    def backward(self, dy, dh_T, dc_T, cache):
        T, B, _ = cache.x.shape
        check_upstream(dy, dh_T, dc_T, T=T, B=B, H=cache.h.shape[2])
        xp = self.xp
        # The backward kernel indexes dy[t] as a flat (B, H) block: make dy C-contiguous up front.
        dy = xp.ascontiguousarray(xp.asarray(dy, dtype=cache.x.dtype))
        return stacked_backward(xp, self.cell, dy, dh_T, dc_T, cache)


class CupyPeepholeLSTM(CupyLSTM):
    """The peephole LSTM on the GPU; same algorithm as ``stacked-peephole``, one fused kernel a step."""

    name = "cupy-peephole"
    variant = "peephole"
    cell = FusedPeepholeCell()


class CupyLayerNormLSTM(CupyLSTM):
    """The LayerNorm LSTM on the GPU; the statistics are block reductions inside the fused kernels."""

    name = "cupy-layernorm"
    variant = "layernorm"
    ln_eps = DEFAULT_LN_EPS
    cell = FusedLayerNormCell()
