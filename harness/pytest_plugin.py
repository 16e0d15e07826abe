"""The lstm-harness pytest plugin (entry point ``pytest11``: loaded by pytest whenever lstm-harness is
installed). It puts certification into a project's own test suite, two ways:

* name the implementation on the command line or in the ini file, and the session gains one test per
  unit of its certification (one dtype against one oracle), ``lstm-certify[TARGET]::float64-vs-torch``,
  that passes when every check of the unit agrees and otherwise fails with the unit's findings and
  table::

      pytest --lstm-certify mypkg.lstm:MyLSTM
      # or in pytest.ini / pyproject.toml [tool.pytest.ini_options]:
      lstm_certify = mypkg.lstm:MyLSTM

  ``-k`` selects units by name, ``--lf`` reruns the failed ones, and pytest-xdist (``-n auto``,
  ``--tx``) spreads them over workers and hosts. With ``--lstm-report-dir`` the session writes one
  report of each target (report.json, index.html, junit.xml) however its units were spread: each xdist
  worker hands its units' reports to the controller (``workeroutput``), which merges them
  (:mod:`harness.merge`) at the end of the session.

* call :func:`harness.certify` in a test, or use the ``lstm_certify`` fixture, which is the same
  function with the session's settings (``--lstm-max-examples``, ``--lstm-profile``, ...) as defaults
  and the configured target as the default implementation::

      def test_my_lstm(lstm_certify):
          lstm_certify(MyLSTM()).assert_certified()

A program in any language that speaks the command protocol (see :mod:`harness.command_protocol`) is
named with ``--lstm-command 'CMD ARGS...'`` (ini ``lstm_command``, one per line) and certified the same
way in its standard convention; for another layout pass ``harness.command(CMD, per_gate=...)`` to the
fixture.

A TARGET string (or a command) is certified in a worker process with a per-call timeout (60 s, ``--lstm-timeout``)
and a memory cap, as ``lstm-harness certify`` does, so that an implementation that hangs or crashes
fails its test instead of hanging or ending the session; ``--lstm-in-process`` (ini
``lstm_in_process = true``) runs it in the session's own process instead. Objects passed to the
fixture run in process unless ``--lstm-isolate`` is given (they may not be picklable).

Files: the minimal failing cases (``.npz``, which the failure's replay command names) and the files
Hypothesis keeps while the harness searches (its storage directory, ``.hypothesis/`` in the working
directory by default) go under one directory: ``--lstm-report-dir`` when given, else ``lstm-harness/``
in pytest's cache directory (``.pytest_cache/d/lstm-harness/``, emptied by ``pytest --cache-clear``),
else, with the cache plugin off (``-p no:cacheprovider``), ``.lstm-harness/`` under the rootdir. The
cases of each test have their own sub-directory there. The user's own Hypothesis tests keep their
storage where it was.

Every pytest session in an environment with lstm-harness installed loads this module, so it does no
work until a session asks for a certification.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.isolation import DEFAULT_TIMEOUT

__all__ = ["CertifyItem", "CertifyTarget", "certify_settings", "files_dir", "DEFAULT_TIMEOUT"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lstm-harness", "certify LSTM implementations with lstm-harness")
    group.addoption("--lstm-certify", action="append", default=[], metavar="TARGET",
                    help="certify TARGET (package.module:attribute, path/to/file.py:attribute or an entry-point "
                         "name) as one test of this session (repeatable)")
    group.addoption("--lstm-command", action="append", default=[], metavar="'CMD ARGS...'",
                    help="certify a program in any language that speaks the command protocol, run as "
                         "CMD ARGS... REQUEST_DIR RESPONSE_DIR, as one test of this session (repeatable)")
    group.addoption("--lstm-max-examples", type=int, default=None, metavar="N", help="cases per check")
    group.addoption("--lstm-profile", default=None, choices=("dev", "ci", "thorough"),
                    help="Hypothesis settings profile for certification (default: ci)")
    group.addoption("--lstm-oracle", action="append", default=[], metavar="NAME",
                    help="oracle to certify against (repeatable; default: every installed one)")
    group.addoption("--lstm-isolate", action="store_true", default=None,
                    help="run the implementation in a worker process (survives crashes and hangs)")
    group.addoption("--lstm-timeout", type=float, default=None, metavar="SECONDS",
                    help=f"per-call timeout; implies --lstm-isolate (default for TARGET strings: "
                         f"{DEFAULT_TIMEOUT:g})")
    group.addoption("--lstm-in-process", action="store_true", default=None,
                    help="run TARGET strings in this process (no timeout, no protection against crashes) "
                         "instead of a worker process")
    group.addoption("--lstm-report-dir", default=None, metavar="DIR",
                    help="write report.json, index.html and the failing cases here (default: only the failing "
                         "cases, in .pytest_cache/d/lstm-harness/, or .lstm-harness/ without the cache plugin)")
    parser.addini("lstm_certify", type="linelist", default=[],
                  help="implementations (TARGETs) to certify as tests of every session")
    parser.addini("lstm_command", type="linelist", default=[],
                  help="programs speaking the command protocol to certify, one command line per line")
    parser.addini("lstm_max_examples", default="", help="cases per check for lstm-harness certification")
    parser.addini("lstm_profile", default="", help="Hypothesis profile for certification: dev, ci or thorough")
    parser.addini("lstm_oracles", type="linelist", default=[], help="oracles to certify against")
    parser.addini("lstm_timeout", default="", help="per-call timeout in seconds (implies isolation)")
    parser.addini("lstm_in_process", type="bool", default=False,
                  help="run TARGET strings in the session's own process instead of a worker process")


def _targets(config: pytest.Config) -> list[str]:
    targets = list(config.getoption("lstm_certify") or [])
    for line in config.getini("lstm_certify"):
        targets += [t for t in line.split() if t]
    return list(dict.fromkeys(targets))


def _commands(config: pytest.Config) -> list[str]:
    return list(dict.fromkeys([*(config.getoption("lstm_command") or []), *config.getini("lstm_command")]))


def certify_settings(config: pytest.Config) -> dict[str, Any]:
    """Keyword arguments for :func:`harness.certify` from the command line, then the ini file."""

    def pick(option: str, ini: str, convert: Any) -> Any:
        value = config.getoption(option)
        if value not in (None, [], ""):
            return value
        raw = config.getini(ini)
        if raw in (None, "", []):
            return None
        try:
            return convert(raw)
        except (TypeError, ValueError):
            raise pytest.UsageError(f"{ini}: expected {convert.__name__}, got {raw!r}") from None

    out: dict[str, Any] = {}
    max_examples = pick("lstm_max_examples", "lstm_max_examples", int)
    if max_examples is not None:
        out["max_examples"] = max_examples
    profile = pick("lstm_profile", "lstm_profile", str)
    if profile is not None:
        out["profile"] = profile
    oracles = pick("lstm_oracle", "lstm_oracles", list)
    if oracles:
        out["oracles"] = list(oracles)
    timeout = pick("lstm_timeout", "lstm_timeout", float)
    if timeout is not None:
        if _in_process(config):
            raise pytest.UsageError("--lstm-timeout: a per-call timeout needs a worker process; drop "
                                    "--lstm-in-process (or lstm_in_process)")
        out["timeout"] = timeout
        out["isolate"] = True
    if config.getoption("lstm_isolate"):
        out["isolate"] = True
    elif _in_process(config):
        out["isolate"] = False
    report_dir = config.getoption("lstm_report_dir")
    if report_dir:
        out["report_dir"] = report_dir
    return out


def _in_process(config: pytest.Config) -> bool:
    return bool(config.getoption("lstm_in_process") or config.getini("lstm_in_process"))


def files_dir(config: pytest.Config) -> Path:
    """Where this session's certifications keep their files: the report directory when one is given,
    else pytest's cache directory, else ``.lstm-harness/`` under the rootdir (see the module's doc)."""
    report_dir = config.getoption("lstm_report_dir")
    if report_dir:
        return Path(report_dir)
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("lstm-harness"))
    path = config.rootpath / ".lstm-harness"
    if not path.exists():
        path.mkdir(parents=True)
        (path / ".gitignore").write_text("# Created by the lstm-harness pytest plugin.\n*\n", encoding="utf-8")
    return path


def _file_defaults(config: pytest.Config, given: dict[str, Any], name: str) -> dict[str, Any]:
    """Without a report directory: the failing cases under :func:`files_dir`, in ``name``'s own
    directory, and no report (instead of a fresh temporary directory per certification)."""
    if given.get("report_dir") is not None:
        return {}
    from harness.cases import slug

    return {"report_dir": str(files_dir(config) / slug(name)), "write_report": False}


@contextmanager
def _hypothesis_storage(config: pytest.Config) -> Iterator[None]:
    """While the harness searches, Hypothesis keeps its files (it caches the constants it finds in local
    modules to draw from them) under :func:`files_dir` instead of ``.hypothesis/`` in the working
    directory; the harness's searches use no example database. Restored afterwards, so that the user's
    own Hypothesis tests keep theirs where they were."""
    from hypothesis import configuration

    path = files_dir(config) / "hypothesis"
    previous = vars(configuration).get("__hypothesis_home_directory")
    previous_env = os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
    configuration.set_hypothesis_home_dir(path)
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(path)  # parallel worker processes (jobs > 1) read it
    try:
        yield
    finally:
        configuration.set_hypothesis_home_dir(previous)
        if previous_env is None:
            os.environ.pop("HYPOTHESIS_STORAGE_DIRECTORY", None)
        else:
            os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = previous_env


def _worker_defaults(impl: Any, given: dict[str, Any]) -> dict[str, Any]:
    """For a TARGET string, unless told otherwise: a worker process, a timeout per call and a memory
    cap, so that a hanging or crashing implementation fails its test instead of the session."""
    made_by_command = hasattr(impl, "replay_arguments")  # harness.command(...): a program that may hang too
    if not (isinstance(impl, str) or made_by_command) or given.get("isolate") is False:
        return {}
    from harness.isolation import default_memory_limit

    return {"isolate": True, "timeout": DEFAULT_TIMEOUT, "memory_limit": default_memory_limit()}


class CertifyFailed(Exception):
    def __init__(self, result: Any):
        super().__init__(result.verdict)
        self.result = result


def _several(config: pytest.Config) -> bool:
    return len(_targets(config)) + len(_commands(config)) > 1


def _report_dir(config: pytest.Config, target: str) -> Path | None:
    """Where ``target``'s merged report goes: ``--lstm-report-dir``, with one sub-directory per target when
    the session certifies several; None without the option."""
    given = config.getoption("lstm_report_dir")
    if not given:
        return None
    from harness.cases import slug

    return Path(given) / slug(target) if _several(config) else Path(given)


def _impl(target: str, line: str | None) -> Any:
    from harness.command_protocol import command

    return command(line) if line is not None else target


def _unit_settings(config: pytest.Config, target: str, impl: Any) -> dict[str, Any]:
    """The keyword arguments of ``certify`` for one unit of ``target``: the session's settings, the files
    under :func:`files_dir` (or the report directory), a worker process for a TARGET string, and no
    report of its own: the session merges the units' reports into one (see :func:`pytest_sessionfinish`)."""
    settings = certify_settings(config)
    where = _report_dir(config, target)
    if where is not None:
        settings["report_dir"] = str(where)
    settings = {**_file_defaults(config, settings, target), **settings}
    return {**_worker_defaults(impl, settings), **settings, "write_report": False}


class CertifyItem(pytest.Item):
    """One unit of a certification (one dtype against one oracle, named like ``float64-vs-torch``):
    passes when every check of the unit agrees. ``unit`` None: the target could not be planned, and the
    item fails with the reason."""

    def __init__(self, *, target: str, command: str | None = None, unit: str | None = None,
                 problem: BaseException | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.target = target
        self.command = command  # a command line (the command protocol) instead of a TARGET
        self.unit = unit
        self.problem = problem

    def runtest(self) -> None:
        from harness.api import certify

        if self.problem is not None:
            raise self.problem
        impl = _impl(self.target, self.command)
        with _hypothesis_storage(self.config):
            result = certify(impl, units=[str(self.unit)], **_unit_settings(self.config, self.target, impl))
        if result.report is not None:
            from harness.merge import part_note

            # Being one unit of several is what this item is; the note says so to a report's reader only.
            result.notes = [n for n in result.notes if n != part_note(result.report.get("units"))]
            self.config.stash.setdefault(_PARTS, {}).setdefault(self.target, {})[str(self.unit)] = result.report
        self.user_properties.append(("verdict", result.verdict))
        if not result.ok:
            raise CertifyFailed(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from harness.contract import ContractError
        from harness.plugins import LoadError

        exc = excinfo.value
        what = f"{self.target} ({self.unit})" if self.unit else self.target
        if isinstance(exc, CertifyFailed):
            r = exc.result
            return f"{what} is not certified (verdict: {r.verdict})\n\n{r.summary(verbose=False)}"
        if isinstance(exc, (LoadError, ContractError, ValueError)):
            return f"{self.target} could not be certified: {exc}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.nodeid


class CertifyTarget(pytest.Collector):
    """One configured target, collected the way pytest collects a file's tests: one item per unit of its
    certification, so that ``-k float32``, ``--lf`` and pytest-xdist (``-n``, ``--tx``) select, rerun and
    spread the units of one certification like any tests."""

    def __init__(self, *, target: str, command: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.target = target
        self.command = command

    def collect(self) -> list[pytest.Item]:
        from harness.api import certification_units
        from harness.contract import ContractError
        from harness.plugins import LoadError

        impl = _impl(self.target, self.command)
        settings = _unit_settings(self.config, self.target, impl)
        try:
            names = certification_units(impl, **{k: settings[k] for k in _PLANNING if k in settings})
        except (LoadError, ContractError, ValueError) as exc:  # the item fails with it; the session goes on
            return [CertifyItem.from_parent(self, name="load", nodeid=f"{self.nodeid}::load", target=self.target,
                                            command=self.command, problem=exc)]
        return [CertifyItem.from_parent(self, name=name, nodeid=f"{self.nodeid}::{name}", target=self.target,
                                        command=self.command, unit=name)
                for name in names]


#: The certify arguments that decide a certification's units.
_PLANNING = ("variant", "dtypes", "oracles", "isolate", "timeout", "memory_limit")

#: What the units of this process certified: target -> unit name -> the unit's report (a dict).
_PARTS = pytest.StashKey[dict[str, dict[str, dict[str, Any]]]]()
#: Lines for the terminal summary: where each merged report went.
_WRITTEN = pytest.StashKey[list[str]]()
_WORKER_OUTPUT = "lstm_harness_parts"


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect, so that they apply to these items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    targets = [(t, None) for t in _targets(config)] + [(f"command {line}", line) for line in _commands(config)]
    for target, line in targets:
        # The node id is the target's own name: what the terminal shows where a file name would be
        # ("lstm-certify[TARGET] .F"); under the session it would be empty and show as ".".
        name = f"lstm-certify[{target}]"
        collector = CertifyTarget.from_parent(session, name=name, nodeid=name, target=target, command=line)
        # What pytest does for each collector (collect_one_node, then the report), so that the terminal
        # counts these items as collected: otherwise "collected 3 items / 4 deselected / -1 selected".
        collector.ihook.pytest_collectstart(collector=collector)
        report = collector.ihook.pytest_make_collect_report(collector=collector)
        collector.ihook.pytest_collectreport(report=report)
        items.extend(x for x in report.result if isinstance(x, pytest.Item))


# --------------------------------------------------------------------------------------------------
# One report per session, however the units were spread: each pytest-xdist worker hands the reports of
# its units to the controller (workeroutput), which merges them with harness.merge, as
# `lstm-harness report` merges shards.


#: The command-line option (and ini key) of each certify argument the session's settings give.
_SETTING_OPTIONS = {"profile": "--lstm-profile (ini lstm_profile)",
                    "max_examples": "--lstm-max-examples (ini lstm_max_examples)",
                    "oracles": "--lstm-oracle (ini lstm_oracles)", "timeout": "--lstm-timeout (ini lstm_timeout)"}


def _check_settings(config: pytest.Config) -> None:
    """The session's certify settings, checked as ``lstm-harness certify`` checks its options: a bad one is
    a usage error of the session (naming the option), not a failure of each target's tests."""
    settings = certify_settings(config)
    if not settings:
        return  # nothing asked of the harness: nothing imported
    from harness.session import check_limits, check_settings, select_oracles

    try:
        check_settings(settings.get("profile", "ci"), settings.get("max_examples"), None, 1)
        check_limits(settings.get("timeout"), None)
        if "oracles" in settings:
            select_oracles(settings["oracles"], "vanilla")  # the names only: any variant knows them all
    except ValueError as exc:
        name, _, rest = str(exc).partition(":")
        raise pytest.UsageError(f"{_SETTING_OPTIONS.get(name, name)}:{rest}") from None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Check the settings and the report directories now (and mark them), not after the units ran; the
    controller only."""
    config = session.config
    if hasattr(config, "workerinput"):
        return
    _check_settings(config)
    from harness.files import ReportDirError, claim_report_dir

    for target in [*_targets(config), *(f"command {line}" for line in _commands(config))]:
        where = _report_dir(config, target)
        if where is None:
            continue
        try:
            claim_report_dir(where).release()
        except ReportDirError as exc:
            raise pytest.UsageError(str(exc).replace("report directory:", "--lstm-report-dir:", 1)) from None


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, on the controller: a worker finished; keep the reports of the units it ran."""
    import json

    data = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT)
    if not data:
        return
    parts = node.config.stash.setdefault(_PARTS, {})
    for target, units in json.loads(data).items():
        parts.setdefault(target, {}).update(units)


def pytest_sessionfinish(session: pytest.Session) -> None:
    import json

    config = session.config
    parts = config.stash.get(_PARTS, {})
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: its units go to the controller
        config.workeroutput[_WORKER_OUTPUT] = json.dumps(parts)
        return
    for target, units in parts.items():
        where = _report_dir(config, target)
        if where is not None and units:
            config.stash.setdefault(_WRITTEN, []).append(_write_merged(target, units, where))


def _write_merged(target: str, units: dict[str, dict[str, Any]], where: Path) -> str:
    from harness.api import write_reports
    from harness.files import ReportDirError, claim_report_dir
    from harness.merge import MergeError, merge_reports

    try:
        merged = merge_reports(sorted(units.items()))
        with claim_report_dir(where):
            problems: list[str] = []
            files = write_reports(merged, where, junit=where / "junit.xml", note=problems.append)
    except (MergeError, ReportDirError, OSError) as exc:
        return f"{target}: the report could not be written: {exc}"
    return (f"{target}: {merged['verdict']} ({len(merged['units']['run'])} of {len(merged['units']['planned'])} "
            f"units); report: {files['json']}" + "".join(f"\n  {p}" for p in problems))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = terminalreporter.config.stash.get(_WRITTEN, [])
    if lines:
        terminalreporter.section("lstm-harness")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def lstm_certify(request: pytest.FixtureRequest) -> Any:
    """:func:`harness.certify` with this session's settings as defaults; the implementation defaults to
    the configured target (``--lstm-certify`` / ``lstm_certify``) when there is exactly one."""
    from harness.api import certify

    defaults = certify_settings(request.config)
    targets = _targets(request.config)

    def run(impl: Any = None, **kwargs: Any) -> Any:
        if impl is None:
            if len(targets) != 1:
                pytest.skip("no implementation given: pass one, or configure exactly one with --lstm-certify "
                            "or the lstm_certify ini setting")
            impl = targets[0]
        given = {**defaults, **kwargs}
        given = {**_file_defaults(request.config, given, request.node.nodeid), **given}
        with _hypothesis_storage(request.config):
            return certify(impl, **{**_worker_defaults(impl, given), **given})

    return run
