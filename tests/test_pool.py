"""Parallel units (harness.pool): the same records as one process, child processes that cannot load the
target or keep dying, oracles that cannot travel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness.cli import main

MISBEHAVING = Path(__file__).parent / "plugins" / "misbehaving.py"
FD = ["--oracle", "finite-differences"]


def test_parallel_jobs_give_the_same_records(tmp_path, capsys):
    args = ["certify", f"{MISBEHAVING}:RaisesInBackward", "--in-process", "--max-examples", "4", *FD]
    assert main([*args, "--report-dir", str(tmp_path / "one")]) == 1
    assert main([*args, "-n", "2", "--report-dir", str(tmp_path / "two")]) == 1
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))

    def key(report):
        return sorted((r["dtype"], r["oracle"], r["quantity"], r["status"], r["reason"]) for r in report["records"])

    assert key(one) == key(two)
    assert two["settings"]["jobs"] == 2


def test_a_parallel_worker_that_cannot_load_the_target_exits_2(tmp_path, capsys):
    plugin = tmp_path / "only_here.py"
    plugin.write_text(  # loads in this (test) process only, so every worker process fails to load it
        "import os\n"
        "from impls.loop import LoopLSTM\n"
        f"if os.getpid() != {os.getpid()}:\n"
        "    raise RuntimeError('this module refuses to load in a worker process')\n"
        "class OnlyHere(LoopLSTM):\n"
        "    name = 'only-here'\n")
    code = main(["certify", f"{plugin}:OnlyHere", "--in-process", "-n", "2", "--max-examples", "2", *FD,
                 "--report-dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "a parallel worker process could not load the implementation" in err
    assert "refuses to load in a worker process" in err and "-n 1" in err


_MAIN_ORACLE = """
import harness
from oracles.finite_diff import FiniteDifferenceOracle

class MyOracle(FiniteDifferenceOracle):
    name = "my-fd"

r = harness.certify("impls.loop:LoopLSTM", oracles=[MyOracle(), "finite-differences"], dtypes=["float64"],
                    max_examples=2, jobs=2)
print("VERDICT", r.verdict)
print("NOTES", r.notes)
"""


def test_an_oracle_defined_in_main_is_checked_in_process_with_jobs():
    proc = subprocess.run([sys.executable, "-c", _MAIN_ORACLE], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert "VERDICT certified" in proc.stdout, proc.stderr[-3000:]
    assert "the oracle my-fd cannot be sent to other processes" in proc.stdout


_DYING_CHILDREN = """
import harness
from tests.plugins.misbehaving import DiesInChildOracle

r = harness.certify("impls.loop:LoopLSTM", oracles=[DiesInChildOracle(), "finite-differences"],
                    max_examples=2, jobs=2)
print("VERDICT", r.verdict)
print("REASONS", sorted({rec.reason.split(';')[-1].strip() for rec in r.records}))
"""


def test_parallel_workers_that_keep_dying_are_given_up_with_a_clear_error():
    proc = subprocess.run([sys.executable, "-c", _DYING_CHILDREN], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert "VERDICT error" in proc.stdout, proc.stderr[-3000:]
    assert "died 3 times in a row without finishing a unit" in proc.stdout
    assert "run with one job" in proc.stdout


def test_a_child_keeps_to_the_oracle_families_it_has_loaded():
    """A child takes next a unit of a family (the module its oracles come from) it has loaded, else one of a
    family no other child has, else the first; which child runs a unit changes no record."""
    from harness.pool import _families, _next_unit
    from harness.session import Unit
    from oracles.finite_diff import FiniteDifferenceOracle
    from oracles.jax_oracle import JaxCompositeOracle
    from oracles.torch_oracle import TorchCompositeOracle

    fd, torch, jax = FiniteDifferenceOracle(), TorchCompositeOracle(), JaxCompositeOracle()
    units = [Unit(0, dtype, (o,), f"{dtype} vs {o.name}") for dtype in ("float64", "float32") for o in (fd, torch, jax)]
    pending = list(range(len(units)))
    assert _next_unit(pending, units, set(), []) == 0  # nothing loaded anywhere: the first
    assert _next_unit(pending, units, set(), [_families(units[0])]) == 1  # another child has fd: torch
    assert _next_unit(pending[1:], units, _families(units[0]), [_families(units[1])]) == 3  # fd again, float32
    assert _next_unit([2, 5], units, _families(units[0]), [_families(units[2])]) == 2  # all taken: the first
