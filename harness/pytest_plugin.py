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

Importing this module imports nothing of the harness: every pytest session in an environment with
lstm-harness installed loads it, so it must cost nothing when unused.
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["CertifyItem", "certify_settings"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lstm-harness", "certify LSTM implementations with lstm-harness")
    group.addoption("--lstm-certify", action="append", default=[], metavar="TARGET",
                    help="certify TARGET (package.module:attribute, path/to/file.py:attribute or an entry-point "
                         "name) as one test of this session (repeatable)")
    group.addoption("--lstm-max-examples", type=int, default=None, metavar="N", help="cases per check")
    group.addoption("--lstm-profile", default=None, choices=("dev", "ci", "thorough"),
                    help="Hypothesis settings profile for certification (default: ci)")
    group.addoption("--lstm-oracle", action="append", default=[], metavar="NAME",
                    help="oracle to certify against (repeatable; default: every available one)")
    group.addoption("--lstm-isolate", action="store_true", default=None,
                    help="run the implementation in a worker process (survives crashes and hangs)")
    group.addoption("--lstm-timeout", type=float, default=None, metavar="SECONDS",
                    help="per-call timeout; implies --lstm-isolate")
    group.addoption("--lstm-report-dir", default=None, metavar="DIR",
                    help="write report.json, index.html and the failing cases here")
    parser.addini("lstm_certify", type="linelist", default=[],
                  help="implementations (TARGETs) to certify as tests of every session")
    parser.addini("lstm_max_examples", default="", help="cases per check for lstm-harness certification")
    parser.addini("lstm_profile", default="", help="Hypothesis profile for certification: dev, ci or thorough")
    parser.addini("lstm_oracles", type="linelist", default=[], help="oracles to certify against")
    parser.addini("lstm_timeout", default="", help="per-call timeout in seconds (implies isolation)")


def _targets(config: pytest.Config) -> list[str]:
    targets = list(config.getoption("lstm_certify") or [])
    for line in config.getini("lstm_certify"):
        targets += [t for t in line.split() if t]
    return list(dict.fromkeys(targets))


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
        out["timeout"] = timeout
        out["isolate"] = True
    if config.getoption("lstm_isolate"):
        out["isolate"] = True
    report_dir = config.getoption("lstm_report_dir")
    if report_dir:
        out["report_dir"] = report_dir
    return out


class CertifyFailed(Exception):
    def __init__(self, result: Any):
        super().__init__(result.verdict)
        self.result = result


class CertifyItem(pytest.Item):
    """One certification: passes when the target is certified."""

    def __init__(self, *, target: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.target = target

    def runtest(self) -> None:
        from harness.api import certify

        settings = certify_settings(self.config)
        if "report_dir" in settings and len(_targets(self.config)) > 1:
            from harness.api import _slug

            settings["report_dir"] = f"{settings['report_dir']}/{_slug(self.target)}"
        result = certify(self.target, **settings)
        self.user_properties.append(("verdict", result.verdict))
        if not result.ok:
            raise CertifyFailed(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from harness.contract import ContractError
        from harness.plugins import LoadError

        exc = excinfo.value
        if isinstance(exc, CertifyFailed):
            r = exc.result
            return (f"{self.target} is not certified (verdict: {r.verdict})\n\n{r.summary()}\n\n{r.details()}"
                    + (f"\n\nReport: {r.report_path}" if r.report_path else ""))
        if isinstance(exc, (LoadError, ContractError)):
            return f"{self.target} could not be certified: {exc}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"lstm-certify[{self.target}]"


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect, so that they apply to these items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for target in _targets(config):
        items.append(CertifyItem.from_parent(session, name=f"lstm-certify[{target}]", target=target))


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
        return certify(impl, **{**defaults, **kwargs})

    return run
