"""The kernel language: statement tables that read the same in C and in Python, and the CUDA C++
generated from them (one template per kernel, instantiated for float and double)."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Kernel", "Phase", "Row", "Load", "Let", "Store", "Sum", "CTYPES", "MAX_THREADS", "INDEX_NAMES",
           "FUNCTIONS", "Expr", "cuda_source", "block_size"]

#: C++ element type of each dtype the kernels are instantiated for.
CTYPES: dict[str, str] = {"float32": "float", "float64": "double"}
#: Threads per block at most; a block handles one batch row and its threads stride over H.
MAX_THREADS = 256
#: Index names every kernel has: step t, batch row b, unit j, and the sizes B and H.
INDEX_NAMES = ("t", "b", "j", "B", "H")


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



@dataclass(frozen=True)
class Expr:
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
        assert isinstance(node.value, int)  # _parse admits non-negative integer constants only
        return str(node.value) if integer else f"T({node.value})"
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        return f"lstm_{node.func.id}({_c_of(node.args[0], integer=integer)})"
    raise AssertionError(f"unchecked node {type(node).__name__}")  # _parse admits nothing else


def _parse(text: str, *, integer: bool, where: str) -> Expr:
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
    return Expr(text, frozenset(names), _c_of(tree.body, integer=integer), compile(tree, f"<{where}>", "eval"))


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

    def expr(text: str, scope: set[str], at: str) -> Expr:
        e = _parse(text, integer=False, where=at)
        tree = ast.parse(text, mode="eval").body
        binops = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp)]
        for node, parts in [(tree, [tree]), *((n, [n.left, n.right]) for n in binops)]:
            if all(_integer_only(p) for p in parts):
                raise ValueError(f"{at}: {ast.unparse(node)!r} in {text!r} is integer arithmetic of t, B, H: C "
                                 f"would compute it in integers, NumPy in floats; combine them with a value")
        unknown = e.names - scope - row_scope
        if unknown:
            raise ValueError(f"{at}: {sorted(unknown)} used before being defined in {text!r}")
        return e

    def index(text: str, in_row: bool, at: str) -> Expr:
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
// Generated by impls/gpu/language.py from the tables in impls/gpu/kernels.py; do not edit.
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


