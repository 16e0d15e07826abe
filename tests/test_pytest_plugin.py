"""The pytest plugin: a TARGET named on the command line or in the ini file becomes a test of the
session; the lstm_certify fixture and harness.certify work inside a user's own tests."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PLUGINS = Path(__file__).parent / "plugins"
FAST = ["--lstm-max-examples", "3", "--lstm-oracle", "finite-differences", "-p", "no:randomly",
        "-p", "no:cacheprovider"]


def test_certify_option_adds_a_passing_test_per_unit(pytester):
    # loop declares float64 and float32; one oracle: one unit, so one test, per dtype.
    result = pytester.runpytest("--lstm-certify", "loop", "-v", *FAST)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*lstm-certify?loop?::float64-vs-finite-differences PASSED*",
                                 "*lstm-certify?loop?::float32-vs-finite-differences PASSED*"])


def test_keyword_selection_applies(pytester):
    pytester.makepyfile(test_other="def test_other():\n    pass\n")
    result = pytester.runpytest("--lstm-certify", "loop", "-k", "test_other", *FAST)
    result.assert_outcomes(passed=1, deselected=2)
    # The units of one certification are selected by their names: dtype, oracle, target.
    result = pytester.runpytest("--lstm-certify", "loop", "-k", "float32 and finite and loop", *FAST)
    result.assert_outcomes(passed=1, deselected=2)


def test_broken_implementation_fails_with_the_summary(pytester):
    result = pytester.runpytest("--lstm-certify", f"{PLUGINS / 'planted.py'}:dc0_without_f", *FAST)
    result.assert_outcomes(failed=2)  # the bug shows in both dtypes
    result.stdout.fnmatch_lines(["*is not certified (verdict: discrepancies)*", "*DISCREPANCY: backward: dc0 departs*",
                                 "*FAIL*"])
    # The failing cases are kept in one documented place (the cache plugin is off: .lstm-harness/),
    # the replay command names one of them, and Hypothesis leaves no .hypothesis/ in the working directory.
    cases = sorted((pytester.path / ".lstm-harness").glob("*/cases/*.npz"))
    assert cases
    replays = [line for line in result.outlines if "Replay: lstm-harness replay" in line]
    # The case path in each replay command is relative to where pytest ran (or absolute), and lies there.
    assert replays and all(".lstm-harness/" in line for line in replays)
    for line in replays:
        path = next(word for word in line.split() if word.endswith(".npz"))
        assert (pytester.path / path).resolve().is_relative_to(pytester.path / ".lstm-harness")
        assert (pytester.path / path).is_file()
    assert not (pytester.path / ".hypothesis").exists()


def test_unloadable_target_fails_with_what_to_fix(pytester):
    result = pytester.runpytest("--lstm-certify", "no_such_module_xyz:LSTM", *FAST)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*could not be certified: cannot import module 'no_such_module_xyz'*"])


def test_ini_setting(pytester):
    pytester.makeini("[pytest]\nlstm_certify = stacked\nlstm_max_examples = 3\nlstm_oracles = finite-differences\n")
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*lstm-certify?stacked?::float64-vs-finite-differences PASSED*"])


def test_fixture_and_public_function_in_a_users_test(pytester):
    pytester.makepyfile(test_mine=f"""
        import pytest
        import harness
        from impls.loop import LoopLSTM

        def test_fixture_with_an_object(lstm_certify):
            result = lstm_certify(LoopLSTM())
            result.assert_certified()
            assert result.settings["max_examples"] == 3

        def test_fixture_defaults_to_the_configured_target(lstm_certify):
            assert lstm_certify().implementation["name"] == "loop"

        def test_public_function_reports_a_broken_one():
            result = harness.certify({str(PLUGINS / 'planted.py')!r} + ":db_one_batch_row", max_examples=10,
                                     oracles=["finite-differences"], dtypes=["float64"])
            assert not result.ok
            assert {{r.quantity for r in result.failures}} == {{"db"}}
            with pytest.raises(AssertionError, match="not certified"):
                result.assert_certified()
    """)
    result = pytester.runpytest("--lstm-certify", "loop", *FAST)
    result.assert_outcomes(passed=5)  # three of the file's, and the configured target's two units


def test_fixture_skips_without_a_target(pytester):
    pytester.makepyfile(test_mine="""
        def test_needs_target(lstm_certify):
            lstm_certify()
    """)
    result = pytester.runpytest(*FAST)
    result.assert_outcomes(skipped=1)


def _record_certify_calls(monkeypatch, storage=None):
    """Replace harness.certify with a fake that passes and records its arguments (and, into ``storage``,
    where Hypothesis would keep its files while it runs)."""
    import harness.api

    calls = []

    def fake(impl, **kwargs):
        calls.append((impl, kwargs))
        if storage is not None:
            from hypothesis.configuration import storage_directory

            found = storage_directory("constants")
            storage.append(Path(getattr(found, "path", found)))
        return harness.api.CertifyResult(records=[], verdict="certified", implementation={"name": str(impl)},
                                         settings={})

    monkeypatch.setattr(harness.api, "certify", fake)
    return calls


def test_target_strings_run_in_a_worker_with_a_timeout_by_default(pytester, monkeypatch):
    """A hanging TARGET must fail its test, not hang the user's session."""
    from harness.pytest_plugin import DEFAULT_TIMEOUT

    calls = _record_certify_calls(monkeypatch)
    pytester.runpytest("--lstm-certify", "loop", *FAST).assert_outcomes(passed=2)
    impl, kwargs = calls[-1]
    assert impl == "loop" and kwargs["isolate"] is True and kwargs["timeout"] == DEFAULT_TIMEOUT
    assert kwargs["memory_limit"] > 0
    pytester.runpytest("--lstm-certify", "loop", "--lstm-timeout", "2", *FAST).assert_outcomes(passed=2)
    assert calls[-1][1]["timeout"] == 2 and calls[-1][1]["isolate"] is True


def test_in_process_option_keeps_target_strings_in_the_session(pytester, monkeypatch):
    calls = _record_certify_calls(monkeypatch)
    pytester.runpytest("--lstm-certify", "loop", "--lstm-in-process", *FAST).assert_outcomes(passed=2)
    assert calls[-1][1]["isolate"] is False and "timeout" not in calls[-1][1]
    pytester.makeini("[pytest]\nlstm_in_process = true\n")
    pytester.runpytest("--lstm-certify", "loop", *FAST).assert_outcomes(passed=2)
    assert calls[-1][1]["isolate"] is False


def test_a_hanging_target_fails_its_test(pytester):
    result = pytester.runpytest("--lstm-certify", f"{PLUGINS / 'misbehaving.py'}:Hangs", "--lstm-timeout", "0.5",
                                *FAST)
    result.assert_outcomes(failed=2)  # each unit
    result.stdout.fnmatch_lines(["*forward did not return within 0.5 s*"])


def test_collected_counts_include_the_certify_tests(pytester, monkeypatch):
    _record_certify_calls(monkeypatch)
    pytester.makepyfile(test_x="def test_a():\n    pass\n\ndef test_b():\n    pass\n\ndef test_c():\n    pass\n")
    result = pytester.runpytest("--lstm-certify", "loop", *FAST)
    result.stdout.fnmatch_lines(["collected 5 items"])  # three tests, and loop's two units
    result.assert_outcomes(passed=5)
    result = pytester.runpytest("--lstm-certify", "loop", "-k", "test_a or lstm", *FAST)
    result.stdout.fnmatch_lines(["collected 5 items / 2 deselected / 3 selected"])
    result.assert_outcomes(passed=3, deselected=2)
    result = pytester.runpytest("--lstm-certify", "loop", "-k", "test_a", *FAST)
    result.stdout.fnmatch_lines(["collected 5 items / 4 deselected / 1 selected"])


def test_a_certify_test_shows_one_result_under_its_own_name(pytester, monkeypatch):
    _record_certify_calls(monkeypatch)
    pytester.makepyfile(test_x="def test_a():\n    pass\n")
    result = pytester.runpytest("--lstm-certify", "loop", *FAST)
    result.stdout.fnmatch_lines(["test_x.py .*", "lstm-certify?loop? .*"])
    assert not [line for line in result.outlines if line.startswith(". ") or line.startswith(".. ")]


def test_cases_and_hypothesis_files_go_to_one_documented_directory(pytester, monkeypatch):
    from hypothesis.configuration import storage_directory

    from harness.cases import slug

    def where() -> Path:
        found = storage_directory("constants")
        return Path(getattr(found, "path", found))

    before = where()
    storage: list[Path] = []
    calls = _record_certify_calls(monkeypatch, storage)
    pytester.makepyfile(test_mine="def test_mine(lstm_certify):\n    lstm_certify('stacked')\n")
    options = ["--lstm-max-examples", "3", "--lstm-oracle", "finite-differences", "-p", "no:randomly"]

    # loop's two units and test_mine; the cache plugin is on.
    pytester.runpytest("--lstm-certify", "loop", *options).assert_outcomes(passed=3)
    cache = pytester.path / ".pytest_cache" / "d" / "lstm-harness"
    by_impl = {impl: kwargs for impl, kwargs in calls}
    assert by_impl["loop"]["report_dir"] == str(cache / "loop") and by_impl["loop"]["write_report"] is False
    assert by_impl["stacked"]["report_dir"] == str(cache / slug("test_mine.py::test_mine"))
    assert storage == [cache / "hypothesis" / "constants"] * 3

    calls.clear()
    storage.clear()
    pytester.runpytest("--lstm-certify", "loop", "-p", "no:cacheprovider", *options).assert_outcomes(passed=3)
    fallback = pytester.path / ".lstm-harness"
    assert dict(calls)["loop"]["report_dir"] == str(fallback / "loop")
    assert storage == [fallback / "hypothesis" / "constants"] * 3
    assert (fallback / ".gitignore").is_file()

    calls.clear()
    storage.clear()
    report_dir = pytester.path / "reports"
    pytester.runpytest("--lstm-certify", "loop", "--lstm-report-dir", str(report_dir), *options)
    # Each unit writes no report of its own: the session merges theirs into one (tests/test_scaleout.py).
    assert dict(calls)["loop"]["report_dir"] == str(report_dir) and dict(calls)["loop"]["write_report"] is False
    assert storage == [report_dir / "hypothesis" / "constants"] * 3

    assert where() == before  # the user's own Hypothesis tests keep their storage


@pytest.mark.parametrize("args, message", [
    (["--lstm-oracle", "torch"], "--lstm-oracle (ini lstm_oracles): expected names from finite-differences"),
    (["--lstm-timeout", "-5"], "--lstm-timeout (ini lstm_timeout): expected seconds per call"),
    (["--lstm-max-examples", "0"], "--lstm-max-examples (ini lstm_max_examples): expected a positive int"),
])
def test_a_bad_setting_is_a_usage_error_of_the_session_not_a_failing_target(pytester, args, message):
    result = pytester.runpytest("--lstm-certify", "loop", *args, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
