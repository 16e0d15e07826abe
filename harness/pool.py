"""Running units in parallel child processes (``jobs > 1``), and what may be sent to one.

Children are started with :class:`harness.isolation.ChildProcess` (a fresh interpreter, nothing
inherited), each takes the next unit when it is done, and a child that dies costs only the unit it
was running (:data:`MAX_CHILD_DEATHS` deaths in a row give up the rest).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as wait_connections
from typing import Any

from harness.check import sharing_references
from harness.contract import ContractError
from harness.isolation import ChildProcess, describe_exit
from harness.plugins import LoadError
from harness.progress import Progress
from harness.records import Record, unit_outcome
from harness.runner import RunSettings
from harness.session import Job, Unit, open_subject, oracle_family, oracle_from_payload, oracle_payload
from harness.unit import internal_error, run_unit

__all__ = ["run_parallel", "MAX_CHILD_DEATHS"]


def _unit_child(conn: Any, payload: dict[str, Any]) -> None:
    """Entry point of a parallel child: run the units it is sent, one after another, send the records.

    Subjects are opened on first use and kept, so a child that is sent several units of the same
    implementation loads it once.
    """
    oracles = {name: oracle_from_payload(p) for name, p in payload["oracles"].items()}
    subjects: dict[bytes, Any] = {}
    conn.send(("ready",))
    try:
        with sharing_references():  # the units here share the oracles' references of identical cases
            while True:
                message = conn.recv()
                if message[0] == "stop":
                    break
                _, unit_id, opening, dtype, names, settings, apart = message
                key = pickle.dumps(opening)
                if key not in subjects:
                    try:
                        subjects[key], _ = open_subject(**opening)
                    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
                        conn.send(("failed", unit_id, str(exc) if isinstance(exc, (LoadError, ContractError))
                                   else f"{type(exc).__name__}: {exc}"))
                        continue

                def progress(n: int, unit_id: int = unit_id) -> None:
                    conn.send(("progress", unit_id, n))

                records, notes = run_unit(subjects[key], [oracles[n] for n in names], dtype,
                                          RunSettings(**settings), progress, apart=apart)
                probed = {n: oracles[n].availability() for n in names if hasattr(oracles[n], "availability")}
                conn.send(("done", unit_id, records, notes, probed))
    finally:
        for subject in subjects.values():
            close = getattr(subject, "close", None)
            if close:
                close()


#: A family that sets up in less (its oracles' ``setup_cost``, seconds) is loaded by any idle child: its
#: last unit is not left waiting for the child that has it loaded.
CHEAP_SETUP_S = 1.0

#: Parallel child processes that may die one after another, none finishing a unit in between, before
#: the remaining units are given up (reported as errors) instead of starting yet another child.
MAX_CHILD_DEATHS = 3


def _families(unit: Unit) -> set[str]:
    """The oracle families a unit loads (:func:`harness.session.oracle_family`)."""
    return {oracle_family(o) for o in unit.oracles}


def _setup_cost(unit: Unit) -> float:
    """The rough seconds a process spends on the unit's oracles before their first case (the oracles'
    ``setup_cost``; they share their family's import, so the largest one counts)."""
    return max((float(getattr(o, "setup_cost", 0.0)) for o in unit.oracles), default=0.0)


def _next_unit(pending: Sequence[int], units: Sequence[Unit], mine: set[str],
               others: Sequence[set[str]]) -> int | None:
    """The pending unit a child should run next: one of a family it has loaded, else the costliest to set
    up of the families no other child has loaded, else one of a family another child has loaded when it
    sets up cheaply (:data:`CHEAP_SETUP_S`) or at least two of its units are left; else None: the child
    stops, and the last unit of that family waits for the child that has it loaded (loading it again,
    TensorFlow's import and first traces, took longer than the unit itself).

    Importing a framework and compiling its functions cost seconds per process (TensorFlow's import
    alone 3 to 12 s), far more than a unit's cases; handed out in plan order, every child ended up
    importing every framework and compiling the same structures, and `-n 2` took longer than `-n 1`.
    The costliest family starts first so that the cheap ones fill the other children meanwhile (started
    last, TensorFlow's units ran after everything else). Which child runs a unit changes no record (a
    unit's cases follow from its settings alone).
    """
    for i in pending:
        if _families(units[i]) <= mine:
            return i
    taken = set().union(*others) if others else set()
    free = [i for i in pending if not _families(units[i]) & taken]
    if free:
        return max(free, key=lambda i: _setup_cost(units[i]))  # the first of equals: plan order kept
    for i in pending:
        if (_setup_cost(units[i]) < CHEAP_SETUP_S
                or sum(_families(units[j]) == _families(units[i]) for j in pending) >= 2):
            return i
    return None


def run_parallel(jobs_list: Sequence[Job], units: Sequence[Unit], jobs: int, display: Progress,
                 finished: Callable[[Unit, list[Record], list[str]], None]) -> None:
    """Hand the units to up to ``jobs`` child processes, each taking the next one when it is done.

    A child that dies costs the unit it was running (error records that say so) and is replaced;
    after :data:`MAX_CHILD_DEATHS` deaths in a row with no unit finished, the units left are given
    up the same way. Each finished unit goes to ``finished``. Raises :class:`harness.plugins.LoadError`
    when a child cannot load the implementation.
    """
    oracles = {o.name: o for job in jobs_list for o in job.oracles}
    payload = {"oracles": {name: oracle_payload(o) for name, o in oracles.items()}}
    pending = list(range(len(units)))
    done: dict[int, tuple[list[Record], list[str]]] = {}
    counts: dict[int, int] = {}
    busy: dict[Any, int] = {}
    stopped: set[Any] = set()  # children told to stop: their end is not a death
    ran: dict[Any, set[str]] = {}  # per child, the oracle families it has loaded (see _next_unit)
    deaths = 0  # in a row, with no unit finished in between

    def start() -> Any:
        return ChildProcess("harness.pool", "_unit_child", payload)

    def assign(child: Any) -> None:
        if not pending:
            stopped.add(child)
            child.conn.send(("stop",))
            return
        unit_id = _next_unit(pending, units, ran.setdefault(child, set()),
                             [ran[other] for other in alive if other is not child and other in ran
                              and other not in stopped])
        if unit_id is None:
            stopped.add(child)
            child.conn.send(("stop",))
            return
        pending.remove(unit_id)
        ran[child] |= _families(units[unit_id])
        unit = units[unit_id]
        job = jobs_list[unit.job]
        busy[child] = unit_id
        display.begin(unit.label)
        child.conn.send(("run", unit_id, job.opening, unit.dtype, [o.name for o in unit.oracles],
                         dataclasses.asdict(job.settings), unit.apart))

    def lose(unit_id: int, why: str) -> None:
        unit = units[unit_id]
        records = internal_error(jobs_list[unit.job].info, unit.oracles, unit.dtype, RuntimeError(why),
                                 counts.get(unit_id, 0))
        done[unit_id] = (records, [])
        display.end(unit.label, counts.get(unit_id, 0), "error")

    children = [start() for _ in range(min(jobs, len(units)))]
    alive = list(children)
    try:
        while alive:
            by_conn = {c.conn: c for c in alive}
            for ready in wait_connections(list(by_conn), timeout=1.0):
                child = by_conn[ready]
                message: Any
                try:
                    message = child.conn.recv()
                except Exception:  # noqa: BLE001 - the end of the child, or a message that cannot be read
                    message = ("died",)
                kind = message[0]
                if kind == "ready":
                    assign(child)
                elif kind == "progress":
                    counts[message[1]] = message[2]
                    display.update(units[message[1]].label, message[2])
                elif kind == "done":
                    deaths = 0
                    unit_id = busy.pop(child)
                    done[unit_id] = (message[2], message[3])
                    for name, availability in message[4].items():  # the parent describes them unprobed
                        keep = getattr(oracles[name], "probed_elsewhere", None)
                        if keep:
                            keep(availability)
                    display.end(units[unit_id].label, counts.get(unit_id, 0), unit_outcome(message[2]))
                    assign(child)
                elif kind == "failed":
                    raise LoadError(f"a parallel worker process could not load the implementation: {message[2]}\n"
                                    f"It loaded in this process: run with one job (-n 1) to check it here")
                else:
                    alive.remove(child)
                    child.join(1.0)
                    child.kill()
                    live = [c for c in alive if c not in stopped]
                    if child in stopped:
                        # A child stops while another has the family of the units left; should that one
                        # die meanwhile, the units still need a process.
                        if pending and not live:
                            children.append(start())
                            alive.append(children[-1])
                        continue
                    deaths += 1
                    why = (f"the parallel worker process died: {describe_exit(child.exitcode)} (what it printed "
                           f"on standard error says why)")
                    if child in busy:
                        lose(busy.pop(child), why)
                    if deaths >= MAX_CHILD_DEATHS:
                        gave_up = (f"{why}; the parallel worker processes died {deaths} times in a row without "
                                   f"finishing a unit, so this unit was not checked: run with one job (jobs=1, "
                                   f"-n 1) to check it in this process")
                        for unit_id in pending + list(busy.values()):
                            lose(unit_id, gave_up)
                        pending.clear()
                        busy.clear()
                        alive.clear()
                        break
                    if pending and len(live) < min(jobs, len(pending)):
                        children.append(start())
                        alive.append(children[-1])
        for unit_id in list(pending):  # never silently: a unit no process ran is an error that says so
            lose(unit_id, "no parallel worker process was left to run this unit: run with one job (-n 1)")
        pending.clear()
    finally:
        for child in children:
            child.kill()
        # In unit order; when something stopped the run (an interrupt), what had finished is still handed on.
        for i in range(len(units)):
            if i in done:
                finished(units[i], *done[i])
