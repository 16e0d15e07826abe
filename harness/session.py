"""Opening a certification: the implementation, its oracles and the units of work, all decided
before any check runs, so that every bad argument shows at once (exit code 2) and not after minutes.

A certification is a set of *units*: one per implementation and dtype; when run in parallel, one
per implementation, dtype and oracle family; when cut into shards or pytest items, one per
implementation, dtype and oracle. :func:`prepare` turns arguments into a :class:`Job` per
implementation; :func:`plan_units` cuts the jobs into units and says whether they can run in
parallel child processes.
"""

from __future__ import annotations

import os
import pickle
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.cases import PROFILES
from harness.contract import (
    DEFAULT_DTYPES,
    FORWARD_QUANTITIES,
    VARIANTS,
    ContractError,
    ImplementationInfo,
    is_dtype,
    validate,
)
from harness.records import printable
from harness.runner import RunSettings
from harness.subject import ExitCalled, InProcessSubject, exits_raise

__all__ = ["InvalidArgument", "Job", "Unit", "Plan", "open_subject", "guess_target", "select_oracles",
           "check_settings", "check_limits", "prepare", "plan_units", "oracle_family", "replay_target",
           "oracle_portable", "portable_form", "oracle_payload", "oracle_settings", "oracle_from_payload",
           "select_units", "parse_shard", "adapted_arguments"]


class InvalidArgument(ValueError):
    """A bad argument to :func:`harness.certify`, :func:`harness.replay` or :func:`harness.diagnose`
    (found before any check runs); the command line turns it into exit code 2. Any other error comes
    from the run itself."""


def open_subject(impl: Any, *, variant: str | None = None, isolate: bool = False,
                 timeout: float | None = None, memory_limit: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A Subject for ``impl`` (an object or a TARGET string) and a description of what was loaded.

    Raises :class:`harness.plugins.LoadError` or :class:`harness.contract.ContractError` when the
    target cannot be used; ``ValueError`` for bad arguments.
    """
    from harness.plugins import AdaptedTarget, LoadError, load_implementation, parse_target

    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)} or None, got {variant!r}")
    if isolate:  # the timeout is checked by IsolatedSubject
        from harness.isolation import IsolatedSubject, WorkerLoadError

        guessed = impl if isinstance(impl, str) else guess_target(impl)
        source = portable_form(impl, guessed) or impl  # an object the worker cannot unpickle goes by its target
        try:
            subject = IsolatedSubject(source, variant=variant, timeout=timeout, memory_limit=memory_limit)
        except WorkerLoadError as exc:
            if exc.kind == "contract":
                raise ContractError(exc.problems, subject=exc.subject) from None
            raise LoadError(str(exc)) from None
        described = {"target": guessed, "loaded": subject.target, "isolated": True}
        return subject, described
    if timeout is not None:
        raise ValueError("timeout: a per-call timeout needs the implementation in a worker process; "
                         "pass isolate=True as well (or no timeout)")
    if memory_limit is not None:
        raise ValueError("memory_limit: a memory cap needs the implementation in a worker process; "
                         "pass isolate=True as well (or no memory_limit)")
    if isinstance(impl, str):
        with exits_raise():  # os._exit at import ends nothing: it is a failure to load
            try:
                obj, info, target = load_implementation(impl, variant=variant)
            except ExitCalled as exc:
                raise LoadError(f"loading {impl!r} called os._exit({exc.code!r}), which would have ended the "
                                f"whole run") from None
        described = {"target": impl, "loaded": target.to_dict(), "isolated": False}
    elif isinstance(impl, AdaptedTarget):  # a TARGET read in a convention (the command line's options)
        with exits_raise():
            try:
                obj = impl.load()
            except ExitCalled as exc:
                raise LoadError(f"loading {impl.target!r} called os._exit({exc.code!r}), which would have ended "
                                f"the whole run") from None
        info = validate(obj, variant=variant)
        described = {"target": None, "loaded": parse_target(impl.target).to_dict(), "isolated": False}
    else:
        obj, info = impl, validate(impl, variant=variant)
        described = {"target": guess_target(impl), "loaded": None, "isolated": False}
    return InProcessSubject(obj, info), described


def guess_target(obj: Any) -> str | None:
    """A TARGET string that loads the same implementation again, if there is one: a module-level name
    bound to the object, else its class when that takes no arguments and the object has no state of
    its own (so that a fresh instance is the same implementation)."""
    import inspect

    cls = obj if inspect.isclass(obj) else type(obj)
    module = sys.modules.get(getattr(cls, "__module__", "") or "")
    if module is None or module.__name__ == "__main__":
        return None
    if module.__name__.startswith("_lstm_harness_target_") and getattr(module, "__file__", None):
        prefix = module.__file__
    else:
        prefix = module.__name__
    for name, value in vars(module).items():
        if value is obj and not name.startswith("_"):
            return f"{prefix}:{name}"
    if getattr(module, cls.__qualname__, None) is cls and (obj is cls or not getattr(obj, "__dict__", None)):
        try:
            needs = [p for p in inspect.signature(cls).parameters.values()
                     if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        except (TypeError, ValueError):
            needs = []
        if not needs:
            return f"{prefix}:{cls.__qualname__}"
    return None


def select_oracles(oracles: Sequence[Any] | None, variant: str) -> list[Any]:
    """Oracle objects from names or objects; default: every installed oracle covering ``variant``
    (:meth:`oracles.base.Oracle.installed`: found, not imported)."""
    from harness import registry

    if oracles is None:
        return [o for o in registry.oracles() if variant in o.variants and o.installed().available]
    if isinstance(oracles, str):
        oracles = [oracles]
    known = {o.name: o for o in registry.oracles()}
    out = []
    for item in oracles:
        if isinstance(item, str):
            if item not in known:
                raise ValueError(f"oracles: expected names from {', '.join(known)} (or oracle objects), "
                                 f"got {item!r}")
            out.append(known[item])
        elif hasattr(item, "reference") and hasattr(item, "unsupported_reason"):
            out.append(item)
        else:
            raise ValueError(f"oracles: expected oracle names or objects, got {type(item).__name__}")
    names = [str(getattr(o, "name", "")) for o in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # records, findings and parallel units tell oracles apart by name
        raise ValueError(f"oracles: expected each oracle once (they are told apart by name), got "
                         f"{', '.join(repr(n) for n in twice)} more than once")
    return out


@dataclass
class Job:
    """One implementation to certify, with everything decided before any check runs."""

    subject: Any
    described: dict[str, Any]
    info: ImplementationInfo
    dtypes: list[str]
    oracles: list[Any]
    settings: RunSettings
    opening: dict[str, Any]  # open_subject's arguments, for a parallel child: impl (TARGET or object), variant, ...
    parallel: bool  # whether the implementation can be sent to another process
    notes: list[str] = field(default_factory=list)  # what was decided that the report should say
    closed: bool = False

    def close(self) -> None:
        close = getattr(self.subject, "close", None)
        if close:
            close()
        self.closed = True

    def reopen(self) -> None:
        """Open the implementation again after :meth:`close`: a parallel run closes it here while its
        children check (they open their own), and the convention search after it needs it back (with a
        closed worker it could not run)."""
        if self.closed:
            self.subject, _ = open_subject(**self.opening)
            self.closed = False


def prepare(impl: Any, *, variant: str | None, dtypes: Sequence[str] | None, oracles: Sequence[Any] | None,
            max_examples: int | None, profile: str, seed: int | None, timeout: float | None, isolate: bool,
            report_dir: Any, memory_limit: int | None) -> Job:
    """Open ``impl`` and decide everything about its certification; ``ValueError`` for bad arguments."""
    if dtypes is not None:
        dtypes = [dtypes] if isinstance(dtypes, str) else list(dtypes)
        bad = [d for d in dtypes if d not in DEFAULT_DTYPES]
        if bad or not dtypes:
            raise ValueError(f"dtypes: expected a non-empty subset of {DEFAULT_DTYPES}, got {dtypes!r}")
    subject, described = open_subject(impl, variant=variant, isolate=isolate, timeout=timeout,
                                      memory_limit=memory_limit)
    try:
        info = subject.info
        chosen = [d for d in info.dtypes if dtypes is None or d in dtypes]
        if dtypes is not None and not chosen:
            raise ValueError(f"dtypes: {info.name} declares {', '.join(info.dtypes)}; none of {dtypes} is "
                             f"among them")
        notes: list[str] = []
        if not info.dtypes_declared:
            works, notes = dtypes_as_written(subject, info.dtypes, requested=dtypes)
            if dtypes is None:  # asked for by name, a dtype is checked all the same; the notes say what to expect
                chosen = works
        selected = select_oracles(oracles, info.variant)
    except Exception:
        close = getattr(subject, "close", None)
        if close:
            close()
        raise
    target = described["target"]
    # Every failure gets a saved case and a replay command: beside the report, or in a fresh
    # temporary directory (made only when a case is saved; CertifyResult.notes says where).
    case_dir = (Path(report_dir) / "cases" if report_dir is not None
                else Path(tempfile.gettempdir()) / f"lstm-harness-cases-{os.getpid()}-{time.time_ns():x}")
    settings = RunSettings(profile=profile, max_examples=max_examples, seed=seed, case_dir=case_dir,
                           replay_target=replay_target(target, variant, isolate, timeout,
                                                       arguments=getattr(impl, "replay_arguments", None)
                                                       or adapted_arguments(impl)))
    portable = portable_form(impl, target)
    opening = {"impl": portable, "variant": variant, "isolate": isolate, "timeout": timeout,
               "memory_limit": memory_limit}
    return Job(subject, described, info, chosen, selected, settings, opening, portable is not None, notes)


def dtypes_as_written(subject: Any, dtypes: Sequence[str], *,
                      requested: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Of ``dtypes``, the ones an implementation that does not declare its dtypes computes in, and notes.

    Code that allocates with ``np.zeros(shape)`` computes in float64 whatever it is given, and a module
    with float32 buffers refuses float64 or answers in float32. One small forward case per dtype says
    which dtypes it computes in as written; the others are left out, each with a note that says what
    it returned and how to declare or fix it, instead of a contract failure in every case. The dtypes
    the caller asked for by name (``requested``) are all kept, with a note for each that will fail.
    Nothing is left out when no dtype works: the checks then report what goes wrong.
    """
    from harness.cases import CaseSpec, build_case

    failing: dict[str, str] = {}
    for dtype in dtypes:
        case = build_case(CaseSpec(variant=subject.info.variant, dtype=dtype, T=2, B=2, D=3, H=4, seed=0,
                                   ln_eps=subject.info.ln_eps))
        execution = subject.execute(case, backward=False)
        if execution.forward is not None:
            wrong = [f"{q} in {np.asarray(a).dtype}" for q, a in zip(FORWARD_QUANTITIES, execution.forward)
                     if not is_dtype(np.asarray(a).dtype, dtype)]
            if wrong:
                failing[dtype] = f"given {dtype} inputs it returns {', '.join(wrong)}"
        elif execution.forward_error or execution.forward_contract:
            reason = (execution.forward_error or execution.forward_contract or "").strip().splitlines()[0]
            failing[dtype] = f"given {dtype} inputs it fails ({reason})"
    works = [d for d in dtypes if d not in failing]
    if not failing or not works:
        return list(dtypes), []
    name = subject.info.name
    notes = []
    for dtype, why in failing.items():
        if requested is not None and dtype not in requested:
            continue
        fix = (f"to certify {dtype} too, make it compute in the dtype of its inputs (allocate with x.dtype, e.g. "
               f"np.zeros(shape, dtype=x.dtype); a module's buffers in the dtype of x); to say it computes in "
               f"{' and '.join(works)} only, declare dtypes = {tuple(works)!r} (an attribute, or dtypes= to "
               f"harness.adapt)")
        if requested is not None:
            notes.append(f"dtypes: {name} does not declare its dtypes and {why}; {dtype} was asked for and is "
                         f"checked, and will fail. {fix[0].upper()}{fix[1:]}")
        else:
            notes.append(f"dtypes: {name} does not declare its dtypes and {why}: it is certified in "
                         f"{' and '.join(works)} only, as written. {fix[0].upper()}{fix[1:]}")
    return (list(dtypes) if requested is not None else works), notes


#: The most cases per check accepted: at a few milliseconds a case, hours for one check. More is a typo.
MAX_EXAMPLES = 1_000_000


def check_settings(profile: str, max_examples: Any, seed: Any, jobs: Any) -> None:
    """``ValueError`` naming the first of these arguments that is bad."""
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {sorted(PROFILES)}, got {profile!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or not 1 <= max_examples <= MAX_EXAMPLES):
        raise ValueError(f"max_examples: expected a positive int of at most {MAX_EXAMPLES:,} or None, got "
                         f"{max_examples!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: expected an int or None, got {seed!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")


#: The longest per-call timeout accepted: a week. Anything longer is a typo, or infinity.
MAX_TIMEOUT = 7 * 24 * 3600.0


def check_limits(timeout: Any, memory_limit: Any) -> None:
    """``ValueError`` naming ``timeout`` (finite seconds, at most a week) or ``memory_limit`` (bytes)."""
    import math

    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout: expected seconds per call, a finite number above 0 and at most "
                             f"{MAX_TIMEOUT:g} (a week), got {timeout!r}")
    if memory_limit is not None:
        if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0:
            raise ValueError(f"memory_limit: expected a positive number of bytes (an int), got {memory_limit!r}")


def adapted_arguments(impl: Any) -> str | None:
    """For ``harness.adapt(obj, gate_order="ifco", ...)``: obj's TARGET and the options that adapt it the same
    way (``pkg.mod:MyLSTM --gate-order ifco``), so that the replay command needs nothing saved. When no TARGET
    loads obj, :data:`~harness.cases.NO_TARGET` stands for it, with the options.

    None when a keyword given changes the numbers and has no command-line option for a Python TARGET
    (functions, ``call=``, ``final_cell=False``, ``ln_eps``, a ``variant`` other than obj's own, which
    ``--variant`` only declares): the adapter itself must then be saved in a module. ``name`` changes
    nothing a replay computes, so it is left out.
    """
    from harness.cases import NO_TARGET
    from harness.command_protocol import TARGET_OPTIONS, convention_arguments

    wrapped, given = getattr(impl, "wrapped", None), getattr(impl, "given", None)
    if wrapped is None or not isinstance(given, dict) or getattr(impl, "given_others", None):
        return None
    given = {k: v for k, v in given.items() if k != "name"}
    if given.get("variant", getattr(wrapped, "variant", "vanilla")) != getattr(wrapped, "variant", "vanilla"):
        return None
    given.pop("variant", None)
    if not set(given) <= set(TARGET_OPTIONS):
        return None
    target = guess_target(wrapped)
    return " ".join([shlex.quote(target) if target else NO_TARGET, *convention_arguments(given)])


def replay_target(target: str | None, variant: str | None, isolate: bool, timeout: float | None,
                  arguments: str | None = None) -> str | None:
    """The shell-ready TARGET and options a replay command needs to load the implementation as it was: the
    TARGET, or the ``arguments`` an object loaded some other way declares (``--command 'CMD' ...``, see
    harness.command_protocol), then the options."""
    if target:
        text = shlex.quote(target)
    elif isinstance(arguments, str) and arguments:
        text = arguments
    else:
        return None
    if variant:
        text += f" --variant {variant}"
    if not isolate:
        text += " --in-process"
    elif timeout is not None:
        text += f" --timeout {timeout:g}"
    return text


@dataclass(frozen=True)
class Unit:
    """One unit of work: the job (by index), one dtype and the oracles it checks against."""

    job: int
    dtype: str
    oracles: tuple[Any, ...]
    label: str  # what the progress display calls it
    apart: bool = False  # it holds only some of its job's oracles: its search draws cases of its own

    @property
    def name(self) -> str:
        """The unit's stable name within its certification, the same in every process and on every host:
        ``float64-vs-torch`` (or ``float64-vs-torch+tensorflow`` for a unit that checks several oracles at
        once). Shards, pytest items and reports name units by it."""
        return self.dtype + ("-vs-" + "+".join(o.name for o in self.oracles) if self.oracles else "")


@dataclass
class Plan:
    units: list[Unit]
    parallel: bool  # whether the units go to parallel child processes
    notes: dict[int, list[str]] = field(default_factory=dict)  # job index -> why it could not run in parallel


def oracle_family(oracle: Any) -> str:
    """The family an oracle belongs to: the module it is defined in (a module holds one framework's
    oracles, which share its import and its compiled or traced functions)."""
    return type(oracle).__module__


def _by_family(oracles: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The oracles grouped by family, in the order each family first appears."""
    groups: dict[str, list[Any]] = {}
    for oracle in oracles:
        groups.setdefault(oracle_family(oracle), []).append(oracle)
    return [tuple(group) for group in groups.values()]


def plan_units(jobs_list: Sequence[Job], jobs: int, *, split: bool = False) -> Plan:
    """Cut the jobs into units: one per dtype here; in parallel, one per dtype and oracle family; with
    ``split``, one per dtype and oracle (the units a certification is chosen by: shards, pytest items).

    A parallel unit holds a whole family because a child's cost is mostly importing a framework and
    compiling its functions, once per process: per oracle, each unit also repeated the search and the
    implementation's calls (TensorFlow's three oracles, three times), and `-n 2` took longer than `-n 1`.

    Parallel child processes need every implementation and oracle in a form another process can
    load; when one is not, everything runs here, and the plan's notes say why.
    """
    portable_oracles = all(oracle_portable(o) for j in jobs_list for o in j.oracles)
    parallel = jobs > 1 and all(j.parallel for j in jobs_list) and portable_oracles
    named = len(jobs_list) > 1
    plan = Plan(units=[], parallel=parallel)
    for index, job in enumerate(jobs_list):
        if job.notes:
            plan.notes.setdefault(index, []).extend(job.notes)
        split_job = (parallel or split) and len(job.oracles) > 1
        groups: list[tuple[Any, ...]]
        if split:
            groups = [(o,) for o in job.oracles] or [()]
        elif split_job:
            groups = _by_family(job.oracles)
        else:
            groups = [tuple(job.oracles)]
        for dtype in job.dtypes:
            for group in groups:
                label = ((f"{job.info.name} " if named else "") + dtype
                         + (f" vs {', '.join(o.name for o in group)}" if split_job else ""))
                plan.units.append(Unit(index, dtype, group, printable(label),  # a name is the user's text
                                       apart=len(group) < len(job.oracles)))
        if jobs > 1 and not parallel:
            notes = plan.notes.setdefault(index, [])
            if not job.parallel:
                notes.append("jobs: the implementation object cannot be sent to other processes (pass a TARGET "
                             "string instead); everything was checked in this process")
            stuck = [o.name for o in job.oracles if not oracle_portable(o)]
            if stuck:
                notes.append(f"jobs: the oracle {', '.join(stuck)} cannot be sent to other processes (define its "
                             f"class in an importable module, not in __main__); everything was checked in this "
                             f"process")
    plan.parallel = parallel and len(plan.units) > 1
    return plan


# --------------------------------------------------------------------------------------------------
# What may be sent to a parallel child process


def oracle_settings(oracle: Any) -> dict[str, Any]:
    """An oracle's configuration: its public instance attributes, which its constructor sets. A private one
    (leading underscore) is a cache of built layers or traced functions, or a probe's result, and stays
    with the process that made it."""
    return {key: value for key, value in vars(oracle).items() if not key.startswith("_")}


def oracle_payload(oracle: Any) -> Any:
    """A registry oracle travels by name with its settings (the child makes its own and gives it the same
    settings: ``JaxCompositeOracle(bucketed=False)`` is not the registry's default); any other one pickled."""
    from harness import registry

    for known in registry.oracles():
        if known.name == oracle.name and type(known) is type(oracle):
            return ("name", (oracle.name, oracle_settings(oracle)))
    return ("pickled", pickle.dumps(oracle))


def oracle_portable(oracle: Any) -> bool:
    """Whether a parallel child process can make the same oracle: a registry one by its name when its
    settings can be sent, any other one only when it pickles by reference to an importable module (not
    ``__main__``)."""
    try:
        kind, value = oracle_payload(oracle)
    except Exception:
        return False
    if kind == "name":
        return _picklable(value)
    return portable_form(oracle, None) is not None


def oracle_from_payload(payload: Any) -> Any:
    kind, value = payload
    if kind == "name":
        from harness.registry import oracle_by_name

        name, settings = value
        oracle = oracle_by_name(name)
        for key, setting in settings.items():
            setattr(oracle, key, setting)
        return oracle
    return pickle.loads(value)


def portable_form(impl: Any, target: str | None) -> Any:
    """What a parallel child process can load: the TARGET string, else the object itself when it pickles
    by reference to an importable module (so it keeps its state), else the guessed target, else None."""
    if isinstance(impl, str):
        return impl
    module = getattr(type(impl), "__module__", "") or ""
    importable = module != "__main__" and not module.startswith("_lstm_harness_target_")
    if importable and _picklable(impl):
        return impl
    return target


def _picklable(obj: Any) -> bool:
    if isinstance(obj, str):
        return True
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Choosing units: by name (a pytest item), or a deterministic slice (a shard of a CI matrix)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as (K, N) with 1 <= K <= N; ``ValueError`` naming what was expected otherwise."""
    k, sep, n = str(text).partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index = count = 0
    if not sep or count < 1 or not 1 <= index <= count:
        raise ValueError(f"shard: expected K/N with whole numbers 1 <= K <= N (the K-th of N slices), got {text!r}")
    return index, count


def select_units(units: Sequence[Unit], *, names: Sequence[str] | None = None,
                 shard: tuple[int, int] | None = None) -> list[Unit]:
    """The units named by ``names`` (``ValueError`` for a name the plan lacks), then the ``shard``
    (K, N): every N-th unit of the plan starting at the K-th, round-robin over the plan's order, which
    depends only on the implementation's dtypes and the chosen oracles, so every host slices alike."""
    chosen = list(units)
    if names is not None:
        known = {u.name: u for u in chosen}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"units: expected names from {', '.join(known) or '(none)'}, got {', '.join(unknown)}")
        wanted = set(names)
        chosen = [u for u in chosen if u.name in wanted]
    if shard is not None:
        index, count = shard
        if isinstance(index, bool) or not isinstance(index, int) or not isinstance(count, int) \
                or not 1 <= index <= count:
            raise ValueError(f"shard: expected (K, N) with 1 <= K <= N, got {shard!r}")
        chosen = chosen[index - 1::count]
    return chosen
