"""The one place that lists the built-in implementations and oracles.

Entries are ``module:attribute`` strings, imported only when asked for, so that listing what exists
never imports a framework. Third-party implementations register under the entry-point group
``lstm_harness.implementations``; the built-ins are registered there too (``pyproject.toml``), and
this table is the fallback when the package is used from a source checkout without being installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["BUILTIN_IMPLEMENTATIONS", "ORACLES", "ImplementationEntry", "implementations", "load_object",
           "oracles", "oracle_by_name"]

BUILTIN_IMPLEMENTATIONS: dict[str, str] = {
    "loop": "impls.loop:LoopLSTM",
    "stacked": "impls.stacked:StackedLSTM",
    "loop-peephole": "impls.peephole:LoopPeepholeLSTM",
    "stacked-peephole": "impls.peephole:StackedPeepholeLSTM",
    "loop-layernorm": "impls.layernorm:LoopLayerNormLSTM",
    "stacked-layernorm": "impls.layernorm:StackedLayerNormLSTM",
    # The GPU versions: listed everywhere, unavailable (with the reason) without CuPy and a CUDA GPU.
    "cupy": "impls.gpu:CupyLSTM",
    "cupy-peephole": "impls.gpu:CupyPeepholeLSTM",
    "cupy-layernorm": "impls.gpu:CupyLayerNormLSTM",
}

#: Oracles in the order reports list them. Each module imports its framework lazily.
ORACLES: tuple[str, ...] = (
    "oracles.finite_diff:FiniteDifferenceOracle",
    "oracles.torch_oracle:TorchLSTMOracle",
    "oracles.torch_oracle:TorchCompositeOracle",
    "oracles.torch_cuda_oracle:TorchCudaLSTMOracle",
    "oracles.tf_oracle:KerasLSTMOracle",
    "oracles.tf_oracle:BlockLSTMV2Oracle",
    "oracles.tf_oracle:TFCompositeOracle",
    "oracles.onnx_oracle:OnnxRuntimeOracle",
    "oracles.onnx_oracle:OnnxReferenceOracle",
    "oracles.jax_oracle:JaxCompositeOracle",
)


def load_object(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ImplementationEntry:
    name: str
    target: str
    #: None when the implementation can run here, else why not (e.g. no GPU).
    unavailable: str | None = None

    def create(self) -> Any:
        obj = load_object(self.target)
        return obj() if isinstance(obj, type) else obj


def implementations() -> list[ImplementationEntry]:
    """Built-in implementations, each with its availability."""
    out = []
    for name, target in BUILTIN_IMPLEMENTATIONS.items():
        module, _, attr = target.partition(":")
        why = None
        check = getattr(importlib.import_module(module), "unavailable_reason", None)
        if callable(check):
            why = check()
        out.append(ImplementationEntry(name, target, why))
    return out


def oracles() -> list[Any]:
    """One instance of every oracle, available or not (``availability()`` tells)."""
    return [load_object(path)() for path in ORACLES]


def oracle_by_name(name: str) -> Any:
    for oracle in oracles():
        if oracle.name == name:
            return oracle
    known = ", ".join(o.name for o in oracles())
    raise ValueError(f"oracle: expected one of {known}, got {name!r}")
