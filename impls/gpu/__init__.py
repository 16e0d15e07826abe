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

Modules: ``language`` (the kernel language and the CUDA generated from it), ``kernels`` (each
variant's kernels as tables), ``emulator`` (the NumPy emulation), ``launch`` (kernel launches and
the pointer-planned time loops), ``cells`` (the fused cells and the three implementations), and
``availability``.
"""

from __future__ import annotations

from impls.gpu.availability import unavailable_reason
from impls.gpu.cells import (
    CupyLayerNormLSTM,
    CupyLSTM,
    CupyPeepholeLSTM,
    FusedLayerNormCell,
    FusedPeepholeCell,
    FusedVanillaCell,
)
from impls.gpu.emulator import emulate
from impls.gpu.kernels import KERNELS
from impls.gpu.language import CTYPES, MAX_THREADS, Kernel, Let, Load, Phase, Row, Store, Sum, block_size, cuda_source
from impls.gpu.launch import run_kernel

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
    "MAX_THREADS",
    "unavailable_reason",
    "cuda_source",
    "emulate",
    "run_kernel",
    "block_size",
]
