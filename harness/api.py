"""Certifying implementations: :func:`certify` (public, also what ``lstm-harness certify`` runs),
:func:`certify_many` (``lstm-harness run``) and :func:`replay` (one saved case, exactly as it was
checked).

A certification is a set of *units* (:mod:`harness.session` plans them before any check runs);
:mod:`harness.unit` runs one (probe, Hypothesis, re-runs of the minimal case), here or in the
parallel child processes of :mod:`harness.pool`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cases import Case, digest_in_name, load_case, replay_command
from harness.check import check_case, sharing_references, structure_reason
from harness.diagnose import diagnose_subject
from harness.files import check_apart, check_writable_file, claim_report_dir
from harness.findings import Finding, findings
from harness.isolation import WorkerFailure
from harness.merge import part_note
from harness.pool import run_parallel
from harness.progress import Progress
from harness.records import Record, order_records, printable, unit_outcome, verdict
from harness.session import (
    InvalidArgument,
    Job,
    Plan,
    Unit,
    check_limits,
    check_settings,
    open_subject,
    plan_units,
    prepare,
    select_oracles,
    select_units,
)
from harness.structure import FEATURES, Structure
from harness.summary import details, summary_table, terminal_text
from harness.unit import StoredSubject, disagreement, mark_unchecked, merge_search_notes, restricted, run_unit
from reports.html import write_html
from reports.json import build_report, write_report
from reports.junit import write_junit

__all__ = ["certify", "certify_many", "certification_units", "replay", "CertifyResult", "ReplayResult",
           "InvalidArgument", "Interrupted", "open_subject", "select_oracles", "write_reports", "write_html_report",
           "Progress"]


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
    #: The records grouped by root cause (harness.findings), most important first.
    findings: list[Finding] = field(default_factory=list)
    #: When it failed: the convention search's conclusion (harness.diagnose.Diagnosis.to_dict()).
    diagnosis: dict[str, Any] | None = None
    #: The signal that stopped the run ("SIGINT", "SIGTERM"), or "" when it ran to the end.
    interrupted: str = ""
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

    def summary(self, *, verbose: bool = True) -> str:
        """The table of every quantity checked (``verbose``), or the findings and the compact table."""
        if verbose:
            return summary_table(self.records, per_quantity=True)
        return terminal_text(self.records, self.findings, notes=self.notes,
                             diagnosis=(self.diagnosis or {}).get("headline", ""))

    def details(self) -> str:
        return details(self.records)

    def assert_certified(self) -> None:
        """Raise ``AssertionError`` with the summary and every discrepancy unless certified."""
        if not self.ok:
            raise AssertionError(
                f"{self.implementation.get('name')} is not certified (verdict: {self.verdict})\n\n"
                f"{self.summary(verbose=False)}"
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
# Running units, here or in parallel child processes


def _run_jobs(jobs_list: list[Job], plan: Plan, jobs: int, display: Progress,
              results: list[tuple[list[Record], list[str]]]) -> None:
    """Every unit of the plan: here, one after another, or spread over ``jobs`` child processes. Each
    finished unit's records go into ``results`` (one (records, notes) per job) at once, so that an
    interrupted run keeps what finished."""
    for index, notes in plan.notes.items():
        results[index][1].extend(notes)

    def done(unit: Unit, records: list[Record], notes: list[str]) -> None:
        results[unit.job][0].extend(records)
        results[unit.job][1].extend(notes)

    if plan.parallel:
        for job in jobs_list:
            job.close()  # the children open their own
        run_parallel(jobs_list, plan.units, jobs, display, done)
        return
    # One oracle object per name for the whole run, as a parallel child has: each job made its own from the
    # names it was given, and the references its units share are kept per oracle object.
    same: dict[str, Any] = {}
    for job in jobs_list:
        for oracle in job.oracles:
            same.setdefault(oracle.name, oracle)
    with sharing_references():
        for unit in plan.units:
            job = jobs_list[unit.job]
            display.begin(unit.label)

            def progress(n: int, label: str = unit.label) -> None:
                display.update(label, n)

            records, notes = run_unit(job.subject, [same[o.name] for o in unit.oracles], unit.dtype, job.settings,
                                      progress, apart=unit.apart)
            display.end(unit.label, max((r.examples for r in records), default=0), unit_outcome(records))
            done(unit, records, notes)


def _plan(jobs_list: list[Job], jobs: int, units: Sequence[str] | None,
          shard: tuple[int, int] | None) -> tuple[Plan, dict[str, Any] | None]:
    """The plan of units to run, and what the report says of it: ``None`` for a whole certification
    cut as it always was; else, when ``units`` or ``shard`` choose part of it, one unit per dtype and
    oracle, and ``{"planned": [every unit's name], "run": [the chosen ones], "shard": "K/N" or None}``.
    ``ValueError`` for a name the plan lacks or a bad shard."""
    if units is None and shard is None:
        return plan_units(jobs_list, jobs), None
    if len(jobs_list) != 1:
        raise ValueError("units: choosing units (units=, shard=) applies to one implementation at a time")
    if isinstance(units, str):
        units = [units]
    plan = plan_units(jobs_list, jobs, split=True)
    planned = [u.name for u in plan.units]
    plan.units = select_units(plan.units, names=units, shard=shard)
    plan.parallel = plan.parallel and len(plan.units) > 1
    described = {"planned": planned, "run": [u.name for u in plan.units],
                 "shard": f"{shard[0]}/{shard[1]}" if shard is not None else None}
    return plan, described


# --------------------------------------------------------------------------------------------------
# certify


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
    force: bool = False,
    units: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> CertifyResult:
    """Certify one implementation: every check, every declared dtype, every chosen oracle.

    ``impl`` is an implementation object or a TARGET string (``package.module:attribute``,
    ``path/to/file.py:attribute`` or an entry-point name). ``variant`` overrides the declared one;
    ``dtypes`` defaults to every dtype the implementation declares; ``oracles`` (names or objects)
    to every installed oracle that covers the variant. ``isolate=True`` runs the implementation in
    a worker process (needed for ``timeout``, seconds per call, and ``memory_limit``, bytes), which
    survives crashes and hangs. ``jobs`` > 1 checks each dtype and oracle family (the oracles of one
    framework) in up to ``jobs`` parallel processes. ``report_dir`` receives ``report.json``,
    ``index.html`` and the failing cases (``cases/*.npz``; only the cases with ``write_report=False``);
    without it the failing cases go to a fresh temporary directory that ``notes`` names, so that every
    failure can be replayed.
    ``junit_xml`` names a JUnit XML file. ``progress=True`` shows progress on stderr.

    ``units`` (names such as ``"float64-vs-torch"``) or ``shard`` ((K, N): the K-th of N round-robin
    slices) check only part of the certification, cut into one unit per dtype and oracle; the report
    says which units it holds (``units``), and ``lstm-harness report`` merges the parts into one
    (see :mod:`harness.merge`). The verdict of a part speaks for its units only.

    ``report_dir`` must be new, empty or a previous report (it is marked as one); ``force=True`` writes
    into any other directory. While the run writes it, the directory is locked against other runs.
    Ctrl-C or SIGTERM (raised as :class:`Interrupted`) stops the run; the report of everything that had
    finished is still written, marked interrupted, and :class:`Interrupted` is raised with the results.

    Raises :class:`harness.plugins.LoadError` or :class:`harness.contract.ContractError` when the
    implementation cannot be loaded or does not meet the contract, :class:`InvalidArgument` (a
    ``ValueError``) for bad arguments, all before any check runs. Nothing the implementation does
    while it is checked raises: it becomes records.
    """
    return certify_many([impl], variant=variant, dtypes=dtypes, oracles=oracles, max_examples=max_examples,
                        profile=profile, seed=seed, timeout=timeout, isolate=isolate, report_dir=report_dir,
                        jobs=jobs, memory_limit=memory_limit, progress=progress, junit_xml=junit_xml,
                        write_report=write_report, command=command, force=force, units=units, shard=shard)[0]


def certification_units(impl: Any, *, variant: str | None = None, dtypes: Sequence[str] | None = None,
                        oracles: Sequence[Any] | None = None, isolate: bool = False, timeout: float | None = None,
                        memory_limit: int | None = None) -> list[str]:
    """The names of the units :func:`certify` would cut ``impl``'s certification into to spread it (one per
    dtype and oracle, in the plan's order), for ``certify(impl, units=[name])``. Loads ``impl`` the way
    certify does, and raises what certify raises before any check runs."""
    try:
        check_limits(timeout, memory_limit)
        job = prepare(impl, variant=variant, dtypes=dtypes, oracles=oracles, max_examples=None, profile="ci",
                      seed=None, timeout=timeout, isolate=isolate, report_dir=None, memory_limit=memory_limit)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    try:
        return [u.name for u in plan_units([job], 1, split=True).units]
    finally:
        job.close()


class Interrupted(KeyboardInterrupt):
    """A certification stopped by Ctrl-C or SIGTERM. ``results`` hold what had finished (their reports are
    written, marked interrupted); ``signal`` is the signal's name."""

    def __init__(self, signal: str = "SIGINT", results: Sequence[CertifyResult] = ()):
        super().__init__(signal)
        self.signal = signal
        self.results = list(results)


def certify_many(impls: Sequence[Any], *, variant: str | None = None, dtypes: Sequence[str] | None = None,
                 oracles: Sequence[Any] | None = None, max_examples: int | None = None, profile: str = "ci",
                 seed: int | None = None, timeout: float | None = None, isolate: bool | Sequence[bool] = False,
                 report_dir: str | os.PathLike[str] | None = None, jobs: int = 1, memory_limit: int | None = None,
                 progress: bool | Progress = False, junit_xml: str | os.PathLike[str] | None = None,
                 write_report: bool = True, command: str = "certify", force: bool = False,
                 units: Sequence[str] | None = None, shard: tuple[int, int] | None = None) -> list[CertifyResult]:
    """:func:`certify` for several implementations at once (what ``lstm-harness run`` does): with
    ``jobs`` > 1 every (implementation, dtype, oracle) unit goes to one shared pool of processes.
    Each result has its own report; ``report_dir`` and ``junit_xml`` are for a single implementation.
    ``isolate`` is one flag for all, or one per implementation; given per implementation, ``timeout``
    and ``memory_limit`` apply to the isolated ones."""
    prepared: list[Job] = []
    claim = None
    # Paths are fixed now: an implementation that changes the working directory cannot move the report.
    start = Path.cwd()
    report_dir = Path(report_dir).absolute() if report_dir is not None else None
    junit_xml = Path(junit_xml).absolute() if junit_xml is not None else None
    interrupted = ""
    try:
        # Everything that can be wrong with the arguments shows here, before any check runs.
        try:
            check_settings(profile, max_examples, seed, jobs)
            check_limits(timeout, memory_limit)
            if len(impls) > 1 and write_report and (report_dir is not None or junit_xml is not None):
                raise ValueError("report_dir: one report per directory; with several implementations pass "
                                 "write_report=False and build the combined report from the results")
            if junit_xml is not None:
                if report_dir is not None and write_report:
                    check_apart(junit_xml, report_dir)
                check_writable_file(junit_xml, "junit_xml")
            if report_dir is not None and write_report:
                claim = claim_report_dir(report_dir, force=force)
            flags = [isolate] * len(impls) if isinstance(isolate, bool) else [bool(f) for f in isolate]
            if len(flags) != len(impls):
                raise ValueError(f"isolate: expected a bool, or one per implementation ({len(impls)}), got "
                                 f"{len(flags)}")
            for impl, alone in zip(impls, flags):
                limited = alone or isinstance(isolate, bool)  # per implementation: the limits are the isolated's
                prepared.append(prepare(impl, variant=variant, dtypes=dtypes, oracles=oracles,
                                        max_examples=max_examples, profile=profile, seed=seed,
                                        timeout=timeout if limited else None, isolate=alone, report_dir=report_dir,
                                        memory_limit=memory_limit if limited else None))
            plan, chosen = _plan(prepared, jobs, units, shard)
        except BaseException as exc:
            # Refused before any check ran (a bad argument, an implementation that cannot be loaded or breaks
            # the contract): the report directory is left as it was found.
            if claim is not None:
                claim.abandon()
                claim = None
            if isinstance(exc, ValueError):  # InvalidArgument included: the same message, one type for the caller
                raise InvalidArgument(str(exc)) from None
            raise
        label = printable(f"{command} {prepared[0].info.name}" if len(prepared) == 1 else command)
        display = progress if isinstance(progress, Progress) else Progress(label, enabled=bool(progress))
        outcomes: list[tuple[list[Record], list[str]]] = [([], []) for _ in prepared]
        try:
            _run_jobs(prepared, plan, jobs, display, outcomes)
            diagnoses = [_diagnosis(job, records, display) for job, (records, _) in zip(prepared, outcomes)]
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the command line's handler
            interrupted = exc.signal if isinstance(exc, Interrupted) else "SIGINT"
            diagnoses = [None for _ in prepared]
        finally:
            display.close()
        settings_base = {"profile": profile, "max_examples": max_examples, "seed": seed, "timeout": timeout,
                         "isolate": isolate, "jobs": jobs, "memory_limit": memory_limit, "variant": variant}
        results = [_finish(job, records, notes, settings_base, command=command, report_dir=report_dir,
                           write_report=write_report, junit_xml=junit_xml, diagnosis=diagnosis,
                           interrupted=interrupted, start=start, units=chosen)
                   for job, (records, notes), diagnosis in zip(prepared, outcomes, diagnoses)]
    finally:
        for job in prepared:
            job.close()
        if claim is not None:
            claim.release()
    if interrupted:
        raise Interrupted(interrupted, results)
    return results


def _diagnosis(job: Job, records: Sequence[Record], display: Progress) -> dict[str, Any] | None:
    """When a comparison failed, the convention search's answer (often a correct LSTM in another
    convention, or one that ignores an initial state); None when nothing failed or the search could not run."""
    if not any(r.status == "fail" for r in records):
        return None
    display.begin("diagnosis")
    try:
        job.reopen()
        found = diagnose_subject(job.subject)
    except Exception as exc:  # noqa: BLE001 - the diagnosis is extra; the records stand without it
        return {"headline": "", "text": f"the convention search could not run: {type(exc).__name__}: {exc}"}
    finally:
        display.end("diagnosis", 0, "done")
    out = found.to_dict()
    failing = [r for r in records if r.status == "fail"]
    structures = [Structure.from_dict(r.case["structure"]) for r in failing if r.case.get("structure")]
    if found.status == "standard" and job.info.configurable and len(structures) == len(failing):
        # The search's trial cases are in the default structure, where it matches; saying only that on top
        # of findings that all need some feature (a projection, lengths, ...) read as a contradiction.
        used = [_FEATURE_NOUNS[f] for f in FEATURES if any(f in s.features() for s in structures)]
        where = ", ".join(used)
        out["headline"] = (f"in one layer, one direction and full lengths it matches the standard LSTM as declared, "
                           f"its backward too; every failing case has {where}: the findings say where")
        out["text"] += (f"\nThe trial cases above are one layer in one direction over full lengths. Every case that "
                        f"failed has {where}; the findings give each one's minimal case.")
    return out


#: How a diagnosis names the structure features its trial cases leave out.
_FEATURE_NOUNS = {"layers": "stacked layers", "bidirectional": "two directions", "lengths": "lengths",
                  "proj": "a projection", "cifg": "coupled input and forget gates", "clip": "cell clipping"}


def _finish(job: Job, records: list[Record], notes: list[str], settings_base: dict[str, Any], *, command: str,
            report_dir: Any, write_report: bool, junit_xml: Any, diagnosis: dict[str, Any] | None,
            interrupted: str, start: Path, units: dict[str, Any] | None = None) -> CertifyResult:
    info = job.info
    records = order_records(records, [o.name for o in job.oracles])
    for r in records:  # saved cases as seen from where the run started (the replay commands run there)
        _relative_case_paths(r, start, job)
    impl_dict = {"name": info.name, "variant": info.variant, "dtypes": list(info.dtypes),
                 "backward": info.has_backward, "target": job.described["target"] or info.name,
                 "loaded": job.described.get("loaded"), "isolated": job.described["isolated"]}
    notes = sorted(set(merge_search_notes(notes)))
    if not job.oracles:
        notes.append(f"no available oracle covers the {info.variant} variant: nothing could be compared")
    if report_dir is None and any(r.case_file for r in records):
        notes.append(f"the minimal failing cases were saved in {job.settings.case_dir} (give a report directory "
                     f"to keep them beside the report)")
    if interrupted:
        notes.append(f"interrupted by {interrupted}: the report holds only the units that had finished")
    if part_note(units):
        notes.append(str(part_note(units)))
    settings_dict = {**settings_base, "dtypes": job.dtypes, "oracles": [o.name for o in job.oracles]}
    found = findings(records, [o.name for o in job.oracles])
    result = CertifyResult(records=records, verdict=verdict(records, interrupted=bool(interrupted)),
                           implementation=impl_dict, settings=settings_dict, notes=notes, findings=found,
                           diagnosis=diagnosis, interrupted=interrupted)
    result.report = build_report(records, command=command, target=impl_dict["target"], settings=settings_dict,
                                 implementations=[impl_dict], oracles=[o.describe() for o in job.oracles],
                                 target_info=impl_dict, notes=notes, found=found, diagnosis=diagnosis,
                                 interrupted=bool(interrupted), units=units)
    if report_dir is not None and write_report:
        result.report_files = write_reports(result.report, report_dir, junit=junit_xml,
                                            note=result.report_problems.append)
        result.report_path = result.report_files.get("json")
    elif junit_xml is not None:
        path = _write_junit(result.report, junit_xml, result.report_problems.append)
        if path is not None:
            result.report_files["junit"] = path
    return result


def _relative_case_paths(r: Record, start: Path, job: Job) -> None:
    """Case paths (and the replay commands that name them) relative to ``start`` when they lie below it."""
    def shown(path: str) -> str:
        try:
            return os.path.relpath(path, start) if Path(path).is_relative_to(start) else path
        except ValueError:
            return path

    if r.case_file:
        r.case_file = shown(r.case_file)
        r.replay = replay_command(r.case_file, job.settings.replay_target, r.oracle)
    if r.worst_seen and r.worst_seen.get("case_file"):
        r.worst_seen["case_file"] = shown(r.worst_seen["case_file"])
        r.worst_seen["replay"] = replay_command(r.worst_seen["case_file"], job.settings.replay_target, r.oracle)


# --------------------------------------------------------------------------------------------------
# Reports on disk


def write_reports(report: dict[str, Any], report_dir: str | os.PathLike[str], *, html: bool = True,
                  junit: str | os.PathLike[str] | None = None,
                  note: Callable[[str], None] | None = None) -> dict[str, Path]:
    """``report.json`` (always), ``index.html`` (when the ``report`` extra is installed) and JUnit XML.

    ``note`` receives one line for what could not be written and why, and the other files are still
    written: the paths were checked before the run, but what is there may have changed since (an
    implementation under test can write into the report directory, a disk can fill up), and the run's
    results must not be lost to it. An ``index.html`` that was not written this time is removed, so
    that no page the run did not make (an earlier run's, or one planted) stands beside its report.json.
    """
    say = note or (lambda text: print(text, file=sys.stderr))
    out: dict[str, Path] = {}
    try:
        out["json"] = write_report(report, Path(report_dir) / "report.json")
    except OSError as exc:
        say(f"error: the report could not be written to {Path(report_dir) / 'report.json'}: {type(exc).__name__}: "
            f"{exc}; the results above are the run's")
    if html:
        page = Path(report_dir) / "index.html"
        path = write_html_report(report, page, note=say)
        if path is not None:
            out["html"] = path
        elif page.is_file() or page.is_symlink():
            with contextlib.suppress(OSError):
                page.unlink()
    if junit is not None:
        path = _write_junit(report, junit, say)
        if path is not None:
            out["junit"] = path
    return out


def _write_junit(report: dict[str, Any], path: str | os.PathLike[str], note: Callable[[str], None]) -> Path | None:
    try:
        return write_junit(report, path)
    except OSError as exc:
        note(f"error: the JUnit XML could not be written to {path}: {type(exc).__name__}: {exc}")
        return None


def write_html_report(report: dict[str, Any], path: str | os.PathLike[str],
                      note: Callable[[str], None]) -> Path | None:
    try:
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
        promised = digest_in_name(path)
        if promised is not None and promised != case.digest():
            raise InvalidArgument(f"case: {path} does not hold the case its name says (its name promises digest "
                                  f"{promised}, its content has {case.digest()}): the file was changed or replaced "
                                  f"since the harness saved it")
    try:
        subject, _ = open_subject(impl, variant=variant or case.variant, isolate=isolate, timeout=timeout,
                                  memory_limit=memory_limit)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    try:
        info = subject.info
        if not info.configurable and info.structure != case.structure:
            raise InvalidArgument(f"case: its layer structure ({case.structure.describe() or 'the default'}) is not "
                                  f"the one {info.name} computes ({info.structure.describe() or 'the default'})")
        try:
            selected = select_oracles(oracles, info.variant)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        inner, wrapped = restricted(subject, selected)
        first = inner.execute(case, backward=info.has_backward)
        records = check_case(StoredSubject(info, first), wrapped, case)
        if not isinstance(first, WorkerFailure):
            second = inner.execute(case, backward=info.has_backward)
            for oracle in selected:
                if oracle.unsupported_reason(info.variant, case.dtype) or structure_reason(oracle, info.variant,
                                                                                           case.dtype, case):
                    continue
                base = dict(implementation=info.name, oracle=oracle.name, variant=info.variant,
                            dtype=case.dtype)
                for rec in disagreement(first, second, case, base):
                    if rec.status == "contract":
                        records.append(rec)
        if info.limits.unchecked:
            mark_unchecked(records, info.limits.unchecked)
    finally:
        close = getattr(subject, "close", None)
        if close:
            close()
    for r in records:
        r.case = case.info()
    return ReplayResult(records=order_records(records, [o.name for o in selected]), case=case,
                        verdict=verdict(records))
