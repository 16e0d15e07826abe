"""The Hypothesis search of one check: many cases, each failure shrunk to a minimal case.

:func:`run_checks` draws cases for one implementation in one dtype, runs each through
:func:`harness.check.check_case` against a group of oracles, shrinks any disagreement to a minimal
case (saved as ``.npz``), and returns for every quantity either the minimal failing case's record or
the worst passing one. After a failure is shrunk the search starts again, blind to what already
fails, so that a second, independent discrepancy gets a minimal case of its own. A quantity that
failed on a case met only while shrinking another failure, and on no case drawn after it, is
reported failing on that case: never as passing.

Shrinking finds the smallest case that fails, which is rarely the one that fails most: a 10% error
in the candidate shrinks to tiny weights where it is barely over tolerance. So the search also keeps,
for every quantity, the largest error it saw on any case (:attr:`Record.worst_seen`, saved as a case
of its own), and steers generation towards larger errors with ``hypothesis.target``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import given, settings, target
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky

from harness.cases import (
    PROFILES,
    UNSORTED_LENGTHS,
    Case,
    CaseSpec,
    build_case,
    case_features,
    case_file_name,
    case_specs,
    derived_seed,
    drawable_features,
    replay_command,
)
from harness.check import check_case
from harness.conditioning import AMPLIFICATION
from harness.contract import DIRECTIONS, quantities
from harness.records import Record, RecordKey, keep_worst, order_records
from harness.structure import FEATURES
from harness.subject import Subject
from oracles.base import Oracle

__all__ = ["run_checks", "RunSettings", "CheckFailed", "MAX_SEARCHES", "MAX_RUNS_PER_SEARCH", "MIN_FEATURE_CASES",
           "feature_floor", "note_skipped", "same_cases_in_every_process"]


@dataclass
class RunSettings:
    profile: str = "ci"
    max_examples: int | None = None
    seed: int | None = None
    max_T: int = 8
    max_B: int = 4
    max_D: int = 8
    max_H: int = 8
    case_dir: Path | None = None  # where minimal failing cases are saved as .npz
    replay_target: str | None = None  # shell-ready TARGET (and options) that `lstm-harness replay` loads

    def hypothesis_settings(self) -> settings:
        kwargs = dict(PROFILES[self.profile])
        if self.max_examples is not None:
            kwargs["max_examples"] = self.max_examples
        kwargs["database"] = None
        kwargs["report_multiple_bugs"] = False
        kwargs["print_blob"] = False
        return settings(**kwargs)


class CheckFailed(Exception):
    """Raised inside the Hypothesis test so that it shrinks; carries the failing records."""

    def __init__(self, records: list[Record], case: Case):
        self.records = records
        self.case = case
        super().__init__("\n\n".join(r.message for r in records if not r.ok))


#: The fewest cases of a configurable implementation's check that have each structure feature the check can
#: draw, at the default budget and above. The search draws each feature in a modest share of its cases
#: (harness.cases.STRUCTURED_ONE_IN), shrinking towards the default structure, so a feature could go
#: unchecked: a projection (which also needs H >= 2) was drawn in none of the 600 cases of a certification,
#: which certified a wrong projection gradient. A feature drawn in fewer cases gets a search of its own with
#: only that feature on. A smaller budget asks for fewer (:func:`feature_floor`), never for none.
MIN_FEATURE_CASES = 5


def feature_floor(max_examples: int) -> int:
    """The fewest cases each drawable structure feature gets in a check of ``max_examples`` cases:
    :data:`MIN_FEATURE_CASES` at the default budget (60) and above, one in twelve of the budget below it,
    and at least one, so that no feature an implementation computes is certified unchecked."""
    return min(MIN_FEATURE_CASES, max(1, -(-max_examples // 12)))


#: Searches per check: after a failure is shrunk, the search starts again blind to the quantities
#: already known to fail, so that a second, independent discrepancy (another gradient, another
#: oracle) gets a minimal case of its own instead of hiding behind the first.
MAX_SEARCHES = 4


@dataclass
class _Search:
    """One Hypothesis search: the worst passing record per key, and the shrunk failure if any."""

    worst: dict[RecordKey, Record] = field(default_factory=dict)
    #: The failing record with the largest error per key, on whatever case (shrinking included), and its case.
    largest: dict[RecordKey, tuple[Record, Case]] = field(default_factory=dict)
    examples: int = 0  # distinct cases checked before the failure; shrinking attempts are not counted
    #: Of those cases, how many used each structure feature (harness.structure.FEATURES).
    features: dict[str, int] = field(default_factory=dict)
    #: The structure features of the first case that failed (counted with the others once the search ends).
    first_failing: frozenset[str] | None = None
    failure: CheckFailed | None = None
    flaky: str = ""
    #: Of the passing cases counted, how many passed with a tolerance widened by the case's measured
    #: amplification of float32 rounding (harness.conditioning), and the largest such factor; and the
    #: same count per (oracle, direction).
    widened: int = 0
    widest: float = 1.0
    widened_by: dict[tuple[str, str], int] = field(default_factory=dict)


#: Hypothesis runs one search may take to check its budget of distinct cases. Some draws of a run are cases
#: checked already (see run_checks), which are neither run again nor counted; a run that ends short of the
#: budget is followed by another, on a fresh stream of draws (:func:`_run_seed`) asked for twice what is
#: missing, its draws past the budget passed over unrun.
MAX_RUNS_PER_SEARCH = 4


def _run_seed(run: RunSettings, attempt: int) -> int | None:
    """The seed of a search's run number ``attempt``: the first is the user's; each later one, and the first
    of a derandomized search without one, derived from it, so that a derandomized or seeded search draws
    the same cases in every process, and a random one stays random.

    A derandomized search is never left to Hypothesis's own seed: Hypothesis derives that one from the
    source text of the test function, here the runner's ``one``, so any edit to the harness's code would
    draw other cases for every certification.
    """
    if attempt == 0 and run.seed is not None:
        return run.seed
    if run.seed is None and not run.hypothesis_settings().derandomize:
        return None
    return derived_seed(f"{run.seed}|run {attempt}", bits=64)


def _search(subject: Subject, oracles: Sequence[Oracle], strategy: Any, run: RunSettings, ignore: set[RecordKey],
            progress: Callable[[int], None] | None, counted: int,
            largest: dict[RecordKey, tuple[Record, Case]], skipped: dict[str, dict[str, int]],
            passed: dict[str, float | None]) -> _Search:
    out = _Search(largest=largest)
    wanted = run.hypothesis_settings().max_examples

    def one(spec: CaseSpec) -> None:
        case = build_case(spec)
        digest = case.digest()
        if digest in passed:  # checked already, and it passed: see run_checks
            score = passed[digest]
            if score is not None:
                target(score, label="worst error / tolerance")
            return
        if out.first_failing is None and out.examples >= wanted:
            return  # a later run's draw past the budget (MAX_RUNS_PER_SEARCH)
        records = check_case(subject, oracles, case, skipped=skipped)
        compared = [r.ratio for r in records if r.status in ("pass", "fail") and r.ratio is not None]
        score = float(min(max(compared), 1e12)) if compared else None
        if score is not None:  # steer generation towards the cases that err most (finite values only)
            target(score, label="worst error / tolerance")
        for r in records:
            if r.status == "fail":
                seen = out.largest.get(r.key)
                if seen is None or (r.ratio or 0.0) > (seen[0].ratio or 0.0):
                    out.largest[r.key] = (r, case)
        failing = [r for r in records if not r.ok and r.key not in ignore]
        if not failing:
            passed[digest] = score
        if out.first_failing is None and not failing:  # a case drawn, not one tried while shrinking
            out.examples += 1
            widened = [r for r in records if AMPLIFICATION in r.tolerance_factors]
            if widened:
                out.widened += 1
                out.widest = max(out.widest, *(r.tolerance_factors[AMPLIFICATION] for r in widened))
                for check in {(r.oracle, r.direction) for r in widened}:
                    out.widened_by[check] = out.widened_by.get(check, 0) + 1
            for feature in case_features(case):
                out.features[feature] = out.features.get(feature, 0) + 1
            if progress:
                progress(counted + out.examples)
        if failing:
            if out.failure is None and out.first_failing is None:
                out.first_failing = case_features(case)
            raise CheckFailed(records, case)
        for r in records:
            keep_worst(out.worst, r)

    for attempt in range(MAX_RUNS_PER_SEARCH):
        test = given(strategy)(one)
        draws = wanted if attempt == 0 else 2 * (wanted - out.examples)
        test = settings(run.hypothesis_settings(), max_examples=draws)(test)
        seed = _run_seed(run, attempt)
        if seed is not None:
            test = hypothesis_seed(seed)(test)
        try:
            test()
        except CheckFailed as exc:
            out.failure = exc
        except Flaky as exc:  # the implementation gave different verdicts for the same case
            out.failure = _find_check_failed(exc)
            out.flaky = ("the failure did not reproduce when the same case ran again: the implementation is "
                         "nondeterministic or keeps state between calls")
            if out.failure is None:
                raise
        if out.failure is not None or out.examples >= wanted:
            break
    if out.failure is not None:
        out.examples += 1  # the case that failed first
        for feature in out.first_failing or ():
            out.features[feature] = out.features.get(feature, 0) + 1
    return out


class _NoConstants:
    """A pool of constants with nothing in it, for every kind of choice."""

    def set_for_type(self, choice_type: Any) -> tuple[()]:
        return ()


@contextmanager
def same_cases_in_every_process() -> Iterator[None]:
    """While the harness searches, Hypothesis draws no constants from this process's own modules.

    Now and then Hypothesis draws a constant it found in the source of the "local" modules the process
    has imported (``hypothesis.internal.conjecture.providers``), so the same search would draw other cases
    in a pytest session that has imported its test modules, or in an xdist worker after the units it ran
    before. Without that pool a unit's cases depend only on its settings (a derandomized profile or a
    seed), in any process, on any host: what lets a certification be split over processes, shards and
    machines and come to the same records. These are Hypothesis's private names; where they are gone,
    nothing is changed.
    """
    try:
        from hypothesis.internal.conjecture import providers

        saved = (providers._get_local_constants, providers.CONSTANTS_CACHE)
    except (ImportError, AttributeError):
        yield
        return
    providers._get_local_constants = _NoConstants  # type: ignore[assignment]
    providers.CONSTANTS_CACHE = {}  # type: ignore[assignment]  # it holds the pool's constants per kind of choice
    try:
        yield
    finally:
        providers._get_local_constants, providers.CONSTANTS_CACHE = saved


def run_checks(
    subject: Subject,
    oracles: Sequence[Oracle],
    *,
    dtype: str,
    run: RunSettings | None = None,
    progress: Callable[[int], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> list[Record]:
    """Cross-check one implementation in one dtype against ``oracles`` on Hypothesis cases.

    Returns one record per (oracle, direction, quantity): for a quantity that failed, the record of
    its minimal failing case (saved as ``.npz`` when ``run.case_dir`` is set), or of the case it failed
    on when that was met only while shrinking another failure; otherwise the worst passing record seen.
    ``examples`` on each record counts the distinct cases checked, not shrinking.

    The cases are in the implementation's declared structure, or, for a configurable one, in drawn
    structures (:func:`harness.cases.case_specs`) of the features it computes (its ``structures``) and
    at least one of ``oracles`` computes (none: the default structure only), each such feature in at least
    :func:`feature_floor` cases (a search of its own with the feature on, where the drawn cases had fewer).
    An oracle that does not compute a case's structure is skipped for that case; its records say on how many cases
    (:func:`note_skipped`). ``stats``, when given, receives ``cases`` (generated), ``features`` (cases per
    structure feature), ``skipped`` (oracle -> reason -> cases) and ``widened`` ({"cases": of those that
    passed, how many passed with the float32 tolerance widened by the case's amplification of rounding,
    "largest factor": the largest such factor}).
    """
    run = run or RunSettings()
    info = subject.info
    # A configurable implementation gets drawn structures, using the features it and some oracle here compute.
    computed = frozenset(f for o in oracles if not o.unsupported_reason(info.variant, dtype)
                         for f in getattr(o, "structures", ()))

    # A fixed projection of P features needs a cell of more than P units: a larger one than max_H where P is large.
    max_H = run.max_H if info.configurable else max(run.max_H, info.structure.proj_size + 1)

    def strategy(require: frozenset[str] = frozenset(), unsorted_lengths: bool = False) -> Any:
        return case_specs(variants=(info.variant,), dtypes=(dtype,), max_T=run.max_T, max_B=run.max_B,
                          max_D=run.max_D, max_H=max_H, ln_eps=info.ln_eps,
                          structure=None if info.configurable else info.structure,
                          features=computed & info.structures, require=require, unsorted_lengths=unsorted_lengths)

    skipped: dict[str, dict[str, int]] = {}
    features: dict[str, int] = {}
    worst: dict[RecordKey, Record] = {}
    failed: dict[RecordKey, Record] = {}
    largest: dict[RecordKey, tuple[Record, Case]] = {}
    # The cases that passed (every quantity not already known to fail), by digest, with their target score,
    # kept across this check's searches. A case drawn again is neither run nor counted: the counts are of
    # distinct cases, and a search runs Hypothesis again until it has checked its budget of them
    # (MAX_RUNS_PER_SEARCH). Hypothesis draws one case more than once: two choices can make the same value
    # (a dimension of 1 is drawn as a special value or as an integer; the choices a case does not use at all
    # are folded into its seed, see harness.cases), and a search after a failure replays the first one's
    # draws. It is passed, not rejected: Hypothesis replays some draws itself, and a draw that passed once and
    # is rejected later is flaky in its eyes. A failing case is always run: shrinking replays it.
    passed: dict[str, float | None] = {}
    examples = 0
    widened = {"cases": 0, "largest factor": 1.0}  # cases that passed with the float32 tolerance widened
    widened_by: dict[tuple[str, str], int] = {}  # the same, per (oracle, direction)

    def searches(cases: Any, budget: RunSettings) -> None:
        """Search until no new failure turns up (at most MAX_SEARCHES times), each search blind to the
        quantities already known to fail."""
        nonlocal examples
        for _ in range(MAX_SEARCHES):
            try:
                with same_cases_in_every_process():
                    search = _search(subject, oracles, cases, budget, set(failed), progress, examples, largest,
                                     skipped, passed)
            except BaseException as exc:
                # Something outside the comparison stopped the search (a crashed or hung worker, an
                # interrupt): what earlier searches found is still true; hand it to the caller.
                _fail_where_seen(failed, largest, run, info.name)
                _attach_largest(failed, largest, run, info.name)
                exc.partial_records = _stamped({**worst, **failed}, examples, oracles)  # type: ignore[attr-defined]
                raise
            examples += search.examples
            widened["cases"] += search.widened
            widened["largest factor"] = max(widened["largest factor"], search.widest)
            for check, n in search.widened_by.items():
                widened_by[check] = widened_by.get(check, 0) + n
            for feature, n in search.features.items():
                features[feature] = features.get(feature, 0) + n
            for r in search.worst.values():
                keep_worst(worst, r)
            if search.failure is None:
                return
            case = search.failure.case
            case_file = ""
            if run.case_dir is not None:
                case_file = str(case.save(run.case_dir / case_file_name(info.name, case)))
            for r in search.failure.records:
                if r.ok or r.key in failed:
                    continue
                r.case_file = case_file
                r.replay = replay_command(case_file, run.replay_target, r.oracle)
                if search.flaky:
                    r.add_note(search.flaky)
                failed[r.key] = r
            if {r.key for r in search.failure.records} <= failed.keys():
                return  # every quantity already fails: nothing left to find

    searches(strategy(), run)
    floor = feature_floor(run.hypothesis_settings().max_examples)
    drawable = (drawable_features(info.variant, computed & info.structures, max_H=run.max_H) if info.configurable
                else frozenset())
    # Lengths in an order other than decreasing (harness.cases.UNSORTED_LENGTHS) come only with "random" lengths
    # over two rows and two steps, a few of the cases with lengths: a search of their own up to the floor,
    # for an implementation that takes lengths whether it is configurable or not.
    takes_lengths = ("lengths" in drawable if info.configurable
                     else info.structure.lengths and "lengths" in computed)
    short = floor - features.get(UNSORTED_LENGTHS, 0)
    if takes_lengths and run.max_B >= 2 and run.max_T >= 2 and short > 0:
        searches(strategy(frozenset({"lengths"}) if info.configurable else frozenset(), unsorted_lengths=True),
                 replace(run, max_examples=short))
    if info.configurable:
        # Each feature the search could draw and drew in fewer cases than its floor gets a search of its own
        # with that feature alone on in every case, up to the floor.
        for feature in (f for f in FEATURES if f in drawable):
            short = floor - features.get(feature, 0)
            if short > 0:
                searches(strategy(frozenset({feature})), replace(run, max_examples=short))
    _fail_where_seen(failed, largest, run, info.name)
    _attach_largest(failed, largest, run, info.name)
    records = _stamped({**worst, **failed}, examples, oracles)
    for r in records:
        r.widened_cases = widened_by.get((r.oracle, r.direction), 0)
    records += note_skipped(records, skipped, info, dtype, examples)
    if stats is not None:
        stats.update(cases=examples, features=features, skipped=skipped, widened=widened)
    return order_records(records, [o.name for o in oracles])


def note_skipped(records: list[Record], skipped: dict[str, dict[str, int]], info: Any, dtype: str,
                 examples: int) -> list[Record]:
    """Say on every record of an oracle on how many cases it was skipped, and why (it does not compute
    their structure); for an oracle skipped on every case, the skip records that say so (returned)."""
    out: list[Record] = []
    for oracle, reasons in skipped.items():
        mine = [r for r in records if r.oracle == oracle]
        if mine:
            for r in mine:
                r.skipped_cases = dict(reasons)
            continue
        # The reason names no count, so that the same skip in both dtypes reads as one (the counts are in
        # skipped_cases and the message's note).
        for direction in DIRECTIONS:
            for q in quantities(info.variant, direction, None if info.configurable else info.structure):
                out.append(Record(implementation=info.name, oracle=oracle, variant=info.variant, dtype=dtype,
                                  direction=direction, quantity=q, status="skip", examples=examples,
                                  reason=f"skipped on every case: {'; '.join(reasons)}", skipped_cases=dict(reasons)))
    return out


def _fail_where_seen(failed: dict[RecordKey, Record], largest: dict[RecordKey, tuple[Record, Case]],
                     run: RunSettings, name: str) -> None:
    """Report as failing every quantity that failed on any case, even on none of the minimal ones.

    Shrinking keeps a case as long as *some* quantity fails on it, so the minimal case of one failure
    may pass a quantity that failed on the cases tried on the way there; the searches after it draw
    cases of their own and may not meet that failure again. Its record is then the largest failure seen
    for it (``largest``), on the case it was seen on (saved as that quantity's worst case), never a
    passing record.
    """
    for key, (r, case) in largest.items():
        if key in failed:
            continue
        r.case_file = str(case.save(run.case_dir / case_file_name(name, case, "worst"))) if run.case_dir else ""
        r.replay = replay_command(r.case_file, run.replay_target, r.oracle)
        structure = case.structure.describe()
        where = f"T={case.T}, B={case.B}, D={case.D}, H={case.H}" + (f", {structure}" if structure else "")
        r.add_note(f"{r.quantity} vs {r.oracle} failed ({r.ratio or 0:.3g}x tolerance) only on a case met while "
                   f"another failure was shrunk ({where}), and on none the searches drew after it: it has no minimal "
                   f"case of its own, and its replay is that case's")
        failed[key] = r


#: The largest error seen must exceed the minimal case's by this factor to be reported beside it.
LARGER = 1.01


def _attach_largest(failed: dict[RecordKey, Record], largest: dict[RecordKey, tuple[Record, Case]],
                    run: RunSettings, name: str) -> None:
    """Give each failure the largest error seen for its quantity, with its case saved beside the minimal one."""
    for key, r in failed.items():
        if key not in largest:
            continue
        big, case = largest[key]
        if (big.ratio or 0.0) <= (r.ratio or 0.0) * LARGER:
            continue
        case_file = str(case.save(run.case_dir / case_file_name(name, case, "worst"))) if run.case_dir else ""
        r.worst_seen = {"ratio": big.ratio, "max_abs_error": big.max_abs_error, "max_rel_error": big.max_rel_error,
                        "worst": big.worst, "first_bad_t": big.first_bad_t,
                        "first_bad_by_direction": big.first_bad_by_direction, "error_map": big.error_map,
                        "case": case.info(),
                        "case_file": case_file, "replay": replay_command(case_file, run.replay_target, r.oracle)}


def _stamped(results: dict[RecordKey, Record], examples: int, oracles: Sequence[Oracle]) -> list[Record]:
    """The records in report order, each stamped with the number of cases the search generated."""
    for r in results.values():
        r.examples = examples
    return order_records(results.values(), [o.name for o in oracles])


def _find_check_failed(exc: BaseException) -> CheckFailed | None:
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, CheckFailed):
            return e
        seen += list(getattr(e, "exceptions", ()))
        if e.__cause__ is not None:
            seen.append(e.__cause__)
        if e.__context__ is not None:
            seen.append(e.__context__)
    return None
