"""Certifying implementations: :func:`certify` (public, also what ``lstm-harness certify`` runs),
:func:`certify_many` (``lstm-harness run``) and :func:`replay` (one saved case, exactly as it was
checked).

A certification is a set of *units*, one per dtype (or per dtype and oracle when run in parallel);
:mod:`harness.unit` runs one (probe, Hypothesis, re-runs of the minimal case), here or in the
parallel child processes of :mod:`harness.pool`.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cases import PROFILES, Case, load_case
from harness.compare import Record
from harness.contract import DEFAULT_DTYPES, VARIANTS, ContractError, ImplementationInfo, validate
from harness.pool import oracle_portable, portable_form, run_parallel
from harness.runner import (
    _case_info,
    check_case,
    quantities,
)
from harness.subject import InProcessSubject
from harness.summary import details, summary_table, unit_outcome, verdict
from harness.unit import (
    RestrictedOracle,
    RestrictedSubject,
    StoredSubject,
    UnitSettings,
    disagreement,
    limits_of,
    mark_unchecked,
    run_unit,
)

__all__ = ["certify", "replay", "CertifyResult", "ReplayResult", "InvalidArgument", "open_subject",
           "select_oracles", "write_reports", "Progress"]


class InvalidArgument(ValueError):
    """A bad argument to :func:`certify` or :func:`replay` (found before any check runs); the
    command line turns it into exit code 2. Any other error comes from the run itself."""


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class CertifyResult:
    """What :func:`certify` found: the records (the same the reports are made from) and the verdict."""

    records: list[Record]
    verdict: str  # "certified", "discrepancies" or "error"
    implementation: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None
    report_path: Path | None = None  # report.json, when report_dir was given
    report_files: dict[str, Path] = field(default_factory=dict)  # "json", "html", "junit"
    report_problems: list[str] = field(default_factory=list)  # why a file could not be written

    @property
    def ok(self) -> bool:
        return self.verdict == "certified"

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if not r.ok]

    def summary(self) -> str:
        return summary_table(self.records, per_quantity=True)

    def details(self) -> str:
        return details(self.records)

    def assert_certified(self) -> None:
        """Raise ``AssertionError`` with the summary and every discrepancy unless certified."""
        if not self.ok:
            raise AssertionError(
                f"{self.implementation.get('name')} is not certified (verdict: {self.verdict})\n\n"
                f"{self.summary()}\n\n{self.details()}"
            )

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class ReplayResult:
    records: list[Record]
    case: Case
    verdict: str

    @property
    def ok(self) -> bool:
        """The case passes: something was compared and nothing failed (all skips is not a pass)."""
        return self.verdict == "certified"


# --------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A progress display on stderr, so that a long run does not look hung.

    On a terminal one status line is rewritten (units running, cases each, seconds); elsewhere (CI
    logs) a line per finished unit, and a "still checking" line at most every ``heartbeat`` seconds.
    """

    def __init__(self, label: str, *, stream: Any = None, enabled: bool = True, heartbeat: float = 30.0):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.heartbeat = heartbeat
        self.start_time = time.monotonic()
        self.running: dict[str, tuple[int, float]] = {}
        self._last_draw = 0.0
        self._last_beat = time.monotonic()

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def begin(self, unit: str) -> None:
        self.running[unit] = (0, time.monotonic())
        self._draw(force=True)

    def update(self, unit: str, cases: int) -> None:
        started = self.running.get(unit, (0, time.monotonic()))[1]
        self.running[unit] = (cases, started)
        self._draw()

    def end(self, unit: str, cases: int, outcome: str) -> None:
        started = self.running.pop(unit, (0, time.monotonic()))[1]
        line = f"  {self.label} {unit}: {cases} cases in {time.monotonic() - started:.1f}s, {outcome}"
        self._write(("\r\033[K" if self.tty else "") + line + "\n")
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.running:
            return
        parts = ", ".join(f"{u} {n} cases" for u, (n, _) in self.running.items())
        if self.tty:
            if force or now - self._last_draw > 0.2:
                self._last_draw = now
                self._write(f"\r\033[K  {self.label}: {parts} ({now - self.start_time:.0f}s)")
        elif now - self._last_beat > self.heartbeat:
            self._last_beat = now
            self._write(f"  {self.label}: still checking: {parts} ({now - self.start_time:.0f}s)\n")

    def close(self) -> None:
        if self.tty and self.running:
            self._write("\r\033[K")


# --------------------------------------------------------------------------------------------------
# Opening the implementation


def open_subject(impl: Any, *, variant: str | None = None, isolate: bool = False,
                 timeout: float | None = None, memory_limit: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A Subject for ``impl`` (an object or a TARGET string) and a description of what was loaded.

    Raises :class:`harness.plugins.LoadError` or :class:`harness.contract.ContractError` when the
    target cannot be used; ``ValueError`` for bad arguments.
    """
    from harness.plugins import LoadError, load_implementation

    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)} or None, got {variant!r}")
    if isolate:  # the timeout is checked by IsolatedSubject
        from harness.isolation import IsolatedSubject, WorkerLoadError

        guessed = impl if isinstance(impl, str) else _guess_target(impl)
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
        obj, info, target = load_implementation(impl, variant=variant)
        described = {"target": impl, "loaded": target.to_dict(), "isolated": False}
    else:
        obj, info = impl, validate(impl, variant=variant)
        described = {"target": _guess_target(impl), "loaded": None, "isolated": False}
    return InProcessSubject(obj, info), described


def _guess_target(obj: Any) -> str | None:
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
    """Oracle objects from names or objects; default: every available oracle covering ``variant``."""
    from harness import registry

    if oracles is None:
        return [o for o in registry.oracles() if o.availability().available and variant in o.variants]
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
        elif hasattr(item, "reference") and hasattr(item, "supports"):
            out.append(item)
        else:
            raise ValueError(f"oracles: expected oracle names or objects, got {type(item).__name__}")
    return out


# --------------------------------------------------------------------------------------------------
# Running units, here or in parallel child processes


def _order(records: list[Record], oracles: Sequence[Any], variant: str) -> list[Record]:
    oorder = {o.name: i for i, o in enumerate(oracles)}
    dorder = {d: i for i, d in enumerate(DEFAULT_DTYPES)}
    qorder = {q: i for d in ("forward", "backward") for i, q in enumerate(quantities(variant, d))}
    return sorted(records, key=lambda r: (r.implementation, dorder.get(r.dtype, 9), oorder.get(r.oracle, 99),
                                          r.direction != "forward", qorder.get(r.quantity, 99)))


@dataclass
class _Job:
    """One implementation to certify, with everything decided before any check runs."""

    subject: Any
    described: dict[str, Any]
    info: ImplementationInfo
    dtypes: list[str]
    oracles: list[Any]
    settings: UnitSettings
    opening: dict[str, Any]  # how a parallel child opens it: impl (TARGET or object), variant, isolate, ...
    parallel: bool  # whether the implementation can be sent to another process

    def close(self) -> None:
        close = getattr(self.subject, "close", None)
        if close:
            close()


def _prepare(impl: Any, *, variant: str | None, dtypes: Sequence[str] | None, oracles: Sequence[Any] | None,
             max_examples: int | None, profile: str, seed: int | None, timeout: float | None, isolate: bool,
             report_dir: Any, memory_limit: int | None) -> _Job:
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
    settings = UnitSettings(profile=profile, max_examples=max_examples, seed=seed, case_dir=str(case_dir),
                             replay_target=_replay_target(target, variant, isolate, timeout,
                                                          arguments=getattr(impl, "replay_arguments", None)))
    portable = portable_form(impl, target)
    opening = {"impl": portable, "variant": variant, "isolate": isolate, "timeout": timeout,
               "memory_limit": memory_limit}
    return _Job(subject, described, info, chosen, selected, settings, opening, portable is not None)


def _run_jobs(jobs_list: list[_Job], jobs: int, display: Progress) -> list[tuple[list[Record], list[str]]]:
    """Every unit of every job: here, one after another, or spread over ``jobs`` child processes."""
    portable_oracles = all(oracle_portable(o) for j in jobs_list for o in j.oracles)
    parallel = jobs > 1 and all(j.parallel for j in jobs_list) and portable_oracles
    named = len(jobs_list) > 1
    units: list[tuple[int, str, list[Any], str]] = []  # job index, dtype, oracles, label
    for index, job in enumerate(jobs_list):
        split = parallel and len(job.oracles) > 1
        groups = [[o] for o in job.oracles] if split else [job.oracles]
        for dtype in job.dtypes:
            for group in groups:
                label = (f"{job.info.name} " if named else "") + dtype + (f" vs {group[0].name}" if split else "")
                units.append((index, dtype, group, label))
    results: list[tuple[list[Record], list[str]]] = [([], []) for _ in jobs_list]
    if jobs > 1 and not parallel:
        for job, (_, notes) in zip(jobs_list, results):
            if not job.parallel:
                notes.append("jobs: the implementation object cannot be sent to other processes (pass a TARGET "
                             "string instead); everything was checked in this process")
            stuck = [o.name for o in job.oracles if not oracle_portable(o)]
            if stuck:
                notes.append(f"jobs: the oracle {', '.join(stuck)} cannot be sent to other processes (define its "
                             f"class in an importable module, not in __main__); everything was checked in this "
                             f"process")
    if parallel and len(units) > 1:
        for job in jobs_list:
            job.close()  # the children open their own
        done = run_parallel(jobs_list, units, jobs, display)
        for (index, _, _, _), (records, notes) in zip(units, done):
            results[index][0].extend(records)
            results[index][1].extend(notes)
        return results
    for index, dtype, group, label in units:
        job = jobs_list[index]
        display.begin(label)
        records, notes = run_unit(job.subject, group, dtype, job.settings,
                                  lambda n, label=label: display.update(label, n))
        display.end(label, max((r.examples for r in records), default=0), unit_outcome(records))
        results[index][0].extend(records)
        results[index][1].extend(notes)
    return results


# --------------------------------------------------------------------------------------------------
# certify


def _check_settings(profile: str, max_examples: Any, seed: Any, jobs: Any) -> None:
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {sorted(PROFILES)}, got {profile!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples: expected a positive int or None, got {max_examples!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: expected an int or None, got {seed!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")


def certify(
    impl: Any,
    *,
    variant: str | None = None,
    dtypes: Sequence[str] | None = None,
    oracles: Sequence[Any] | None = None,
    max_examples: int | None = None,
    profile: str = "ci",
    seed: int | None = None,
    timeout: float | None = None,
    isolate: bool = False,
    report_dir: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    memory_limit: int | None = None,
    progress: bool | Progress = False,
    junit_xml: str | os.PathLike[str] | None = None,
    write_report: bool = True,
    command: str = "certify",
) -> CertifyResult:
    """Certify one implementation: every check, every declared dtype, every chosen oracle.

    ``impl`` is an implementation object or a TARGET string (``package.module:attribute``,
    ``path/to/file.py:attribute`` or an entry-point name). ``variant`` overrides the declared one;
    ``dtypes`` defaults to every dtype the implementation declares; ``oracles`` (names or objects)
    to every available oracle that covers the variant. ``isolate=True`` runs the implementation in
    a worker process (needed for ``timeout``, seconds per call, and ``memory_limit``, bytes), which
    survives crashes and hangs. ``jobs`` > 1 checks each (dtype, oracle) pair in up to ``jobs``
    parallel processes. ``report_dir`` receives ``report.json``, ``index.html`` and the failing cases
    (``cases/*.npz``; only the cases with ``write_report=False``); without it the failing cases go
    to a fresh temporary directory that ``notes`` names, so that every failure can be replayed.
    ``junit_xml`` names a JUnit XML file. ``progress=True`` shows progress on stderr.

    Raises :class:`harness.plugins.LoadError` or :class:`harness.contract.ContractError` when the
    implementation cannot be loaded or does not meet the contract, :class:`InvalidArgument` (a
    ``ValueError``) for bad arguments, all before any check runs. Nothing the implementation does
    while it is checked raises: it becomes records.
    """
    return certify_many([impl], variant=variant, dtypes=dtypes, oracles=oracles, max_examples=max_examples,
                        profile=profile, seed=seed, timeout=timeout, isolate=isolate, report_dir=report_dir,
                        jobs=jobs, memory_limit=memory_limit, progress=progress, junit_xml=junit_xml,
                        write_report=write_report, command=command)[0]


def certify_many(impls: Sequence[Any], *, variant: str | None = None, dtypes: Sequence[str] | None = None,
                 oracles: Sequence[Any] | None = None, max_examples: int | None = None, profile: str = "ci",
                 seed: int | None = None, timeout: float | None = None, isolate: bool = False,
                 report_dir: str | os.PathLike[str] | None = None, jobs: int = 1, memory_limit: int | None = None,
                 progress: bool | Progress = False, junit_xml: str | os.PathLike[str] | None = None,
                 write_report: bool = True, command: str = "certify") -> list[CertifyResult]:
    """:func:`certify` for several implementations at once (what ``lstm-harness run`` does): with
    ``jobs`` > 1 every (implementation, dtype, oracle) unit goes to one shared pool of processes.
    Each result has its own report; ``report_dir`` and ``junit_xml`` are for a single implementation."""
    prepared: list[_Job] = []
    try:
        # Everything that can be wrong with the arguments shows here, before any check runs.
        try:
            _check_settings(profile, max_examples, seed, jobs)
            if len(impls) > 1 and write_report and (report_dir is not None or junit_xml is not None):
                raise ValueError("report_dir: one report per directory; with several implementations pass "
                                 "write_report=False and build the combined report from the results")
            for impl in impls:
                prepared.append(_prepare(impl, variant=variant, dtypes=dtypes, oracles=oracles,
                                         max_examples=max_examples, profile=profile, seed=seed, timeout=timeout,
                                         isolate=isolate, report_dir=report_dir, memory_limit=memory_limit))
        except ValueError as exc:  # InvalidArgument included: the same message, one type for the caller
            raise InvalidArgument(str(exc)) from None
        label = f"{command} {prepared[0].info.name}" if len(prepared) == 1 else command
        display = progress if isinstance(progress, Progress) else Progress(label, enabled=bool(progress))
        outcomes = _run_jobs(prepared, jobs, display)
        display.close()
    finally:
        for job in prepared:
            job.close()
    settings_base = {"profile": profile, "max_examples": max_examples, "seed": seed, "timeout": timeout,
                     "isolate": isolate, "jobs": jobs, "memory_limit": memory_limit, "variant": variant}
    return [_finish(job, records, notes, settings_base, command=command, report_dir=report_dir,
                    write_report=write_report, junit_xml=junit_xml)
            for job, (records, notes) in zip(prepared, outcomes)]


def _finish(job: _Job, records: list[Record], notes: list[str], settings_base: dict[str, Any], *, command: str,
            report_dir: Any, write_report: bool, junit_xml: Any) -> CertifyResult:
    info = job.info
    records = _order(records, job.oracles, info.variant)
    impl_dict = {"name": info.name, "variant": info.variant, "dtypes": list(info.dtypes),
                 "backward": info.has_backward, "target": job.described["target"] or info.name,
                 "loaded": job.described.get("loaded"), "isolated": job.described["isolated"]}
    notes = sorted(set(notes))
    if not job.oracles:
        notes.append(f"no available oracle covers the {info.variant} variant: nothing could be compared")
    if report_dir is None and any(r.case_file for r in records):
        notes.append(f"the minimal failing cases were saved in {job.settings.case_dir} (give a report directory "
                     f"to keep them beside the report)")
    settings_dict = {**settings_base, "dtypes": job.dtypes, "oracles": [o.name for o in job.oracles]}
    result = CertifyResult(records=records, verdict=verdict(records), implementation=impl_dict,
                           settings=settings_dict, notes=notes)
    from reports.json import build_report

    result.report = build_report(records, command=command, target=impl_dict["target"], settings=settings_dict,
                                 implementations=[impl_dict], oracles=[o.describe() for o in job.oracles],
                                 target_info=impl_dict, notes=notes)
    if report_dir is not None and write_report:
        result.report_files = write_reports(result.report, report_dir, junit=junit_xml,
                                            note=result.report_problems.append)
        result.report_path = result.report_files["json"]
    elif junit_xml is not None:
        from reports.junit import write_junit

        result.report_files["junit"] = write_junit(result.report, junit_xml)
    return result


def _replay_target(target: str | None, variant: str | None, isolate: bool, timeout: float | None,
                   arguments: str | None = None) -> str | None:
    """What follows ``lstm-harness replay CASE``: the TARGET, or the ``arguments`` an object loaded
    some other way declares (``--command 'CMD' ...``, see harness.command_protocol), with the options."""
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


# --------------------------------------------------------------------------------------------------
# Reports on disk


def write_reports(report: dict[str, Any], report_dir: str | os.PathLike[str], *, html: bool = True,
                  junit: str | os.PathLike[str] | None = None,
                  note: Callable[[str], None] | None = None) -> dict[str, Path]:
    """``report.json`` (always), ``index.html`` (when the ``report`` extra is installed) and JUnit XML.

    ``note`` receives one line for what could not be written and why; the JSON is written first, so
    it is there whatever else fails.
    """
    from reports.json import write_report

    say = note or (lambda text: print(text, file=sys.stderr))
    out = {"json": write_report(report, Path(report_dir) / "report.json")}
    if html:
        path = write_html_report(report, Path(report_dir) / "index.html", note=say)
        if path is not None:
            out["html"] = path
    if junit is not None:
        try:
            from reports.junit import write_junit
        except ImportError as exc:
            say(f"note: the JUnit XML report could not be written: {exc}")
        else:
            out["junit"] = write_junit(report, junit)
    return out


def write_html_report(report: dict[str, Any], path: str | os.PathLike[str],
                      note: Callable[[str], None]) -> Path | None:
    try:
        from reports.html import write_html

        return write_html(report, path)
    except ImportError as exc:
        missing = getattr(exc, "name", "") or ""
        if missing.split(".")[0] in ("jinja2", "matplotlib", "markupsafe"):
            note(f"note: the HTML report needs the report extra (pip install 'lstm-harness[report]'); "
                 f"{missing} is not installed. report.json was written.")
        else:
            note(f"note: the HTML report could not be written: {exc}")
    except Exception as exc:  # a renderer bug must not cost the run its report.json
        note(f"note: the HTML report could not be written: {type(exc).__name__}: {exc}")
    return None


# --------------------------------------------------------------------------------------------------
# replay


def replay(case: str | os.PathLike[str] | Case, impl: Any, *, oracles: Sequence[Any] | None = None,
           variant: str | None = None, isolate: bool = False, timeout: float | None = None,
           memory_limit: int | None = None) -> ReplayResult:
    """Run one saved case through ``impl`` and the oracles exactly as certify did, twice.

    The second run is compared bit for bit with the first, so a record of "gives different results
    for the same input" replays too. ``variant`` defaults to the case's.
    """
    if not isinstance(case, Case):
        path = Path(case)
        if not path.is_file():
            raise InvalidArgument(f"case: expected a .npz case file written by lstm-harness, got {str(case)!r} "
                                  f"(no such file)")
        try:
            case = load_case(path)
        except Exception as exc:
            raise InvalidArgument(f"case: {path} is not a case file written by lstm-harness "
                                  f"({type(exc).__name__}: {exc})") from None
    try:
        subject, _ = open_subject(impl, variant=variant or case.variant, isolate=isolate, timeout=timeout,
                                  memory_limit=memory_limit)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    try:
        info = subject.info
        try:
            selected = select_oracles(oracles, info.variant)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        limits = limits_of(subject)
        inner: Any = RestrictedSubject(subject, limits) if limits else subject
        wrapped = [RestrictedOracle(o, limits) for o in selected] if limits else selected
        first = inner.execute(case, backward=info.has_backward)
        records = check_case(StoredSubject(info, first), wrapped, case)
        from harness.isolation import WorkerFailure

        if not isinstance(first, WorkerFailure):
            second = inner.execute(case, backward=info.has_backward)
            for oracle in selected:
                if oracle.supports(info.variant, case.dtype):
                    continue
                base = dict(implementation=info.name, oracle=oracle.name, variant=info.variant,
                            dtype=case.dtype)
                for rec in disagreement(first, second, case, base):
                    if rec.status == "contract":
                        records.append(rec)
        if limits.get("unchecked"):
            mark_unchecked(records, dict(limits["unchecked"]))
    finally:
        close = getattr(subject, "close", None)
        if close:
            close()
    for r in records:
        r.case = _case_info(case)
    return ReplayResult(records=_order(records, selected, info.variant), case=case, verdict=verdict(records))
