"""Whether the CuPy implementations can run here, and why not (asked once per process, never raising)."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

__all__ = ["unavailable_reason", "require_cupy"]


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


def require_cupy() -> Any:
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"the CuPy LSTM cannot run here: {why}")
    import cupy

    return cupy

