"""Where one `lstm-harness` command spends its time, measured inside it.

    python -m bench.phases OUT.json certify stacked -n 1 --report-dir DIR

runs the command line (``harness.cli.main``) in this process with timers around its phases and
writes them to OUT.json: preparing (opening the implementation's worker process, choosing the
oracles), probing the oracles (importing their frameworks, at each one's first case), the
implementation's calls, each oracle's references
(the first case of each structure apart: that is where layers are built and functions compiled or
traced), the comparisons, the Hypothesis search around them, and the records and reports. The
timers wrap functions of this process only, so run it in a process of its own (``bench.cpu`` does);
with ``-n`` above 1 the units run in other processes and only preparing and the reports are seen.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["measure", "main"]


def _structure_key(case: Any) -> Any:
    """A case's structure as the oracles' caches see it: the clip's value and the lengths' values aside."""
    s = case.structure
    return s.replace(cell_clip=None if s.cell_clip is None else 1.0)


def measure(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``lstm-harness ARGV`` here with the timers on; the seconds of each phase and per oracle."""
    start = time.perf_counter()
    from harness import api, check, cli, registry, runner, session, unit
    from harness.isolation import IsolatedSubject
    from oracles.base import Oracle

    seconds: dict[str, float] = {"import harness.cli": time.perf_counter() - start}
    oracles: dict[str, dict[str, Any]] = {}

    def timed(owner: Any, name: str, phase: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - began

        setattr(owner, name, wrapper)

    def timed_reference(cls: type) -> None:
        real: Callable[..., Any] = cls.reference  # type: ignore[attr-defined]

        def reference(self: Any, case: Any) -> Any:
            began = time.perf_counter()
            try:
                return real(self, case)
            finally:
                took = time.perf_counter() - began
                row = oracles.setdefault(self.name, {"structures": set(), "first": 0.0, "rest": 0.0, "cases": 0})
                key = (case.dtype, _structure_key(case))
                part = "rest" if key in row["structures"] else "first"
                row["structures"].add(key)
                row[part] += took
                row["cases"] += 1

        cls.reference = reference  # type: ignore[attr-defined]

    for oracle in registry.oracles():
        timed_reference(type(oracle))
    timed(api, "prepare", "preparing")
    timed(Oracle, "availability", "probing the oracles")
    timed(session, "open_subject", "opening the implementation")
    timed(IsolatedSubject, "execute", "implementation calls")
    timed(check, "compare_execution", "comparisons")
    timed(unit, "run_checks", "searches")
    timed(runner, "check_case", "checking cases")  # by the name run_checks calls it
    timed(api, "_finish", "records, findings and reports")
    began = time.perf_counter()
    code = cli.main(list(argv))
    seconds["command"] = time.perf_counter() - began
    seconds["process"] = time.perf_counter() - start
    return {"exit": code, "seconds": seconds,
            "oracles": {name: {"cases": row["cases"], "structures": len(row["structures"]), "first": row["first"],
                               "rest": row["rest"]} for name, row in oracles.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m bench.phases OUT.json COMMAND [ARGS...]", file=sys.stderr)
        return 2
    result = measure(args[1:])
    with open(args[0], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
