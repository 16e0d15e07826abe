"""Parallel units (harness.pool): the same records as one process, child processes that cannot load the
target or keep dying, oracles that cannot travel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
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
    from harness.pool import CHEAP_SETUP_S, _families, _next_unit
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
    assert fd.setup_cost < CHEAP_SETUP_S  # a cheap family's last unit goes to any idle child
    assert _next_unit([3], units, _families(units[2]), [_families(units[0])]) == 3

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


class _FakeChild:
    """A parallel child on a thread: runs what it is sent after ``ready``; the first child dies during a unit
    of the costly family, and a stopped child takes a while to exit (as one closing its subject does)."""

    started: list[_FakeChild] = []

    def __init__(self, *args):
        from multiprocessing import Pipe

        self.conn, other = Pipe()
        self.exitcode = None
        self.ran: list[int] = []
        self.index = len(_FakeChild.started)
        _FakeChild.started.append(self)
        threading.Thread(target=self._run, args=(other,), daemon=True).start()

    def _run(self, conn):
        conn.send(("ready",))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                time.sleep(0.5)
                self.exitcode = 0
                conn.close()
                return
            unit_id, names = message[1], message[4]
            self.ran.append(unit_id)
            if self.index == 0 and names == ["costly"]:
                time.sleep(0.3)
                self.exitcode = -11
                conn.close()
                return
            time.sleep(0.05)
            conn.send(("done", unit_id, [], [], {}))

    def join(self, timeout):
        pass

    def kill(self):
        pass


def test_a_unit_left_for_a_child_that_dies_is_run_by_another_and_none_is_lost(monkeypatch):
    """The second child stops (the last unit of the costly family waits for the first, which has it loaded);
    the first dies: a new child runs that unit, and every unit reaches the report."""
    from harness import pool
    from harness.session import Unit

    class Costly:
        name, setup_cost = "costly", 8.0

    class Cheap:
        name, setup_cost = "cheap", 0.0

    Costly.__module__, Cheap.__module__ = "family_costly", "family_cheap"
    costly, cheap = Costly(), Cheap()
    units = [Unit(0, "float64", (costly,), "float64 vs costly"), Unit(0, "float64", (cheap,), "float64 vs cheap"),
             Unit(0, "float32", (costly,), "float32 vs costly")]

    class Job:
        opening, settings, info, oracles = {}, None, None, [costly, cheap]

    class Display:
        def begin(self, label): pass
        def update(self, label, n): pass
        def end(self, label, n, outcome): pass

    _FakeChild.started = []
    monkeypatch.setattr(pool, "ChildProcess", _FakeChild)
    monkeypatch.setattr(pool.dataclasses, "asdict", lambda settings: {})
    monkeypatch.setattr(pool, "oracle_payload", lambda oracle: None)
    monkeypatch.setattr(pool, "internal_error", lambda *args: ["the error record"])
    finished = {}
    pool.run_parallel([Job()], units, 2, Display(), lambda unit, records, notes: finished.update({unit.label: records}))
    assert finished == {"float64 vs costly": ["the error record"], "float64 vs cheap": [], "float32 vs costly": []}
    first, second, third = _FakeChild.started
    assert first.ran == [0] and second.ran == [1] and third.ran == [2]
