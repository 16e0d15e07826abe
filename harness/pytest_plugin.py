"""The lstm-harness pytest plugin (entry point ``pytest11``: loaded by pytest whenever lstm-harness is
installed). It puts certification into a project's own test suite, two ways:

* name the implementation on the command line or in the ini file, and the session gains one test,
  ``lstm-certify[TARGET]``, that passes when TARGET is certified and otherwise fails with the summary
  table and every discrepancy::

      pytest --lstm-certify mypkg.lstm:MyLSTM
      # or in pytest.ini / pyproject.toml [tool.pytest.ini_options]:
      lstm_certify = mypkg.lstm:MyLSTM

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

Every pytest session in an environment with lstm-harness installed loads this module, so it does no
work until a session asks for a certification.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.isolation import DEFAULT_TIMEOUT

__all__ = ["CertifyItem", "certify_settings", "DEFAULT_TIMEOUT"]


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
                    help="oracle to certify against (repeatable; default: every available one)")
    group.addoption("--lstm-isolate", action="store_true", default=None,
                    help="run the implementation in a worker process (survives crashes and hangs)")
    group.addoption("--lstm-timeout", type=float, default=None, metavar="SECONDS",
                    help=f"per-call timeout; implies --lstm-isolate (default for TARGET strings: "
                         f"{DEFAULT_TIMEOUT:g})")
    group.addoption("--lstm-in-process", action="store_true", default=None,
                    help="run TARGET strings in this process (no timeout, no protection against crashes) "
                         "instead of a worker process")
    group.addoption("--lstm-report-dir", default=None, metavar="DIR",
                    help="write report.json, index.html and the failing cases here")
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


class CertifyItem(pytest.Item):
    """One certification: passes when the target is certified."""

    def __init__(self, *, target: str, command: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.target = target
        self.command = command  # a command line (the command protocol) instead of a TARGET

    def runtest(self) -> None:
        from harness.api import certify
        from harness.command_protocol import command

        settings = certify_settings(self.config)
        if "report_dir" in settings and len(_targets(self.config)) + len(_commands(self.config)) > 1:
            from harness.cases import slug

            settings["report_dir"] = f"{settings['report_dir']}/{slug(self.target)}"
        impl = command(self.command) if self.command is not None else self.target
        result = certify(impl, **{**_worker_defaults(impl, settings), **settings})
        self.user_properties.append(("verdict", result.verdict))
        if not result.ok:
            raise CertifyFailed(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from harness.contract import ContractError
        from harness.plugins import LoadError

        exc = excinfo.value
        if isinstance(exc, CertifyFailed):
            r = exc.result
            return (f"{self.target} is not certified (verdict: {r.verdict})\n\n{r.summary(verbose=False)}"
                    + (f"\n\nReport: {r.report_path}" if r.report_path else ""))
        if isinstance(exc, (LoadError, ContractError, ValueError)):
            return f"{self.target} could not be certified: {exc}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"lstm-certify[{self.target}]"


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect, so that they apply to these items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for target in _targets(config):
        items.append(CertifyItem.from_parent(session, name=f"lstm-certify[{target}]", target=target))
    for line in _commands(config):
        items.append(CertifyItem.from_parent(session, name=f"lstm-certify[command {line}]",
                                             target=f"command {line}", command=line))


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
        return certify(impl, **{**_worker_defaults(impl, given), **given})

    return run
