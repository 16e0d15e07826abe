"""Parallel units (harness.pool): the same records as one process, child processes that cannot load the
target or keep dying, oracles that cannot travel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    """A child takes next a unit of a family (the module its oracles come from) it has loaded, else the
    costliest to set up of the families no other child has, else one of another child's family while two or
    more of its units are left, else nothing (it stops); which child runs a unit changes no record."""
    from harness.pool import _families, _next_unit
    from harness.session import Unit
    from oracles.finite_diff import FiniteDifferenceOracle
    from oracles.jax_oracle import JaxCompositeOracle
    from oracles.torch_oracle import TorchCompositeOracle

    fd, torch, jax = FiniteDifferenceOracle(), TorchCompositeOracle(), JaxCompositeOracle()
    assert jax.setup_cost > torch.setup_cost > fd.setup_cost  # what the order below follows from
    units = [Unit(0, dtype, (o,), f"{dtype} vs {o.name}") for dtype in ("float64", "float32") for o in (fd, torch, jax)]
    pending = list(range(len(units)))
    assert _next_unit(pending, units, set(), []) == 2  # nothing loaded anywhere: the costliest, jax
    assert _next_unit(pending, units, set(), [_families(units[2])]) == 1  # another child has jax: torch
    assert _next_unit([0, 3, 4], units, _families(units[0]), [_families(units[1])]) == 0  # its own fd first
    assert _next_unit([2, 5], units, _families(units[0]), [_families(units[2])]) == 2  # two jax units left
    assert _next_unit([5], units, _families(units[0]), [_families(units[2])]) is None  # the last: jax's child
    assert _next_unit([5], units, _families(units[0]), []) == 5  # nobody else has jax: take it

_PARENT_IMPORTS = """
import json, sys
from harness import certify
result = certify("impls.stacked:StackedLSTM", oracles=None, jobs=2, max_examples=3, dtypes=["float64"])
described = {o["name"]: o for o in result.report["oracles"]}
print(json.dumps({"verdict": result.verdict, "torch imported": "torch" in sys.modules,
                  "versions": described["torch-composite"]["versions"]}))
"""


def test_the_parent_of_parallel_children_imports_no_framework_and_still_reports_their_versions():
    """Choosing the default oracles finds the frameworks without importing them; only the children that run an
    oracle import its framework, and the report's versions come from them."""
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-c", _PARENT_IMPORTS], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["verdict"] == "certified" and out["torch imported"] is False
    assert set(out["versions"]) == {"torch"}
