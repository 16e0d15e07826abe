"""Scaling out: the units of one certification as pytest items that pytest-xdist spreads over workers
(``-n``, ``--tx``), one merged report per session; ``certify --shard K/N`` and ``report A.json B.json -o
DIR``. Every distributed run must come to the same records as a run in one process (harness.merge.content
says what "the same" compares)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import registry
from harness.cli import main
from harness.merge import content

pytest_plugins = ["pytester"]

PLANTED = f"{Path(__file__).parent / 'plugins' / 'planted.py'}:dc0_without_f"


def _cheap_oracles() -> list[str]:
    """finite-differences (NumPy only), and onnx-reference when onnx is installed: two cheap oracles, so
    that loop's certification has four units (float64, float32 x two oracles). Asking for availability
    imports onnx here, once: an in-process pytester run would otherwise import it again after restoring
    sys.modules, which its native extension does not survive."""
    by_name = {o.name: o for o in registry.oracles()}
    return ["finite-differences"] + [n for n in ("onnx-reference",) if by_name[n].availability().available]


ORACLES = _cheap_oracles()
CLI = ["--profile", "ci", "--max-examples", "3", "--in-process", *(a for o in ORACLES for a in ("--oracle", o))]
PLUGIN = ["--lstm-profile", "ci", "--lstm-max-examples", "3", "-p", "no:randomly"]
UNITS = [f"{dtype}-vs-{oracle}" for dtype in ("float64", "float32") for oracle in ORACLES]


def _report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


# --------------------------------------------------------------------------------------------------
# pytest-xdist


def test_xdist_spreads_the_units_of_one_target_and_writes_one_report(pytester):
    """`-n 2`: one item per unit, spread over two workers; one report.json, HTML and JUnit, equal in content
    to the report of the same session in one process. The session in one process runs inside this test
    process, which has imported many modules of its own: a unit's cases must not depend on them. The
    sessions with workers run as programs of their own, as they do for a user."""
    oracles = [a for o in ORACLES for a in ("--lstm-oracle", o)]
    alone = pytester.runpytest("--lstm-certify", "loop", *oracles, *PLUGIN, "-p", "no:xdist", "-p", "no:cacheprovider",
                               "--lstm-report-dir", "alone")
    alone.assert_outcomes(passed=len(UNITS))
    spread = pytester.runpytest_subprocess("--lstm-certify", "loop", *oracles, *PLUGIN, "-n", "2", "-p",
                                           "no:cacheprovider", "--lstm-report-dir", "spread")
    spread.assert_outcomes(passed=len(UNITS))
    n = len(UNITS)
    spread.stdout.fnmatch_lines([f"*2 workers [[]{n} items[]]*", f"*loop: certified ({n} of {n} units); report: *"])
    one, many = _report(pytester.path / "alone"), _report(pytester.path / "spread")
    assert many["verdict"] == "certified" and many["units"]["run"] == many["units"]["planned"] == UNITS
    assert {(r["dtype"], r["oracle"]) for r in many["records"]} == {(d, o) for d in ("float64", "float32")
                                                                    for o in ORACLES}
    assert content(many) == content(one)
    assert {p.name for p in (pytester.path / "spread").iterdir()} >= {"report.json", "junit.xml"}


def test_a_planted_bug_spread_by_tx_and_rerun_by_lf_gives_the_same_report(pytester):
    """`--tx 2*popen` (real xdist gateways) and `--lf`: the failing units are rerun on two workers, and
    the merged report holds the same discrepancy, records and findings as the run in one process."""
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    options = ["--lstm-certify", PLANTED, "--lstm-oracle", "finite-differences", *PLUGIN]
    first = pytester.runpytest(*options, "-p", "no:xdist", "--lstm-report-dir", "first")
    first.assert_outcomes(passed=1, failed=2)  # test_ok, and the bug in both dtypes
    again = pytester.runpytest_subprocess(*options, "--lf", "--tx", "2*popen", "--dist", "load",
                                          "--lstm-report-dir", "again")
    again.assert_outcomes(failed=2)  # only the failures ran again: test_ok is not among them
    again.stdout.fnmatch_lines(["*dc0_without_f: discrepancies (2 of 2 units)*"])
    one, many = _report(pytester.path / "first"), _report(pytester.path / "again")
    assert many["verdict"] == "discrepancies"
    assert [f["title"] for f in many["findings"]] == ["backward: dc0 departs (float64, float32)"]
    assert content(many) == content(one)


def test_a_report_directory_that_is_not_a_report_is_refused_before_any_unit_runs(pytester):
    (pytester.path / "mine").mkdir()
    (pytester.path / "mine" / "thesis.tex").write_text("precious")
    result = pytester.runpytest("--lstm-certify", "loop", *PLUGIN, "-p", "no:cacheprovider", "--lstm-report-dir",
                                "mine")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lstm-report-dir: 'mine' is not empty and holds no previous lstm-harness report*"])
    assert sorted(p.name for p in (pytester.path / "mine").iterdir()) == ["thesis.tex"]


# --------------------------------------------------------------------------------------------------
# Shards and `report`


def test_shards_merge_into_the_report_of_an_unsharded_run(tmp_path, capsys):
    for k in (1, 2):
        assert main(["certify", "loop", *CLI, "--shard", f"{k}/2", "--report-dir", str(tmp_path / f"s{k}")]) == 0
    s1, s2 = _report(tmp_path / "s1"), _report(tmp_path / "s2")
    # Round-robin over the plan's order: every unit in exactly one shard, each shard marked as such.
    assert s1["units"] == {"planned": UNITS, "run": UNITS[0::2], "shard": "1/2"}
    assert s2["units"]["run"] == UNITS[1::2] and s2["units"]["shard"] == "2/2"
    # The unsharded run, its units in two parallel processes: its two oracles are of two families, so that
    # `-n 2`'s units (one per family) are the shards' units (one per oracle).
    assert main(["certify", "loop", *CLI, "-n", "2", "--report-dir", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    code = main(["report", str(tmp_path / "s2" / "report.json"), str(tmp_path / "s1" / "report.json"),
                 "-o", str(tmp_path / "merged")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Merged 2 reports of loop" in out and "Verdict: certified" in out
    merged = _report(tmp_path / "merged")
    assert content(merged) == content(_report(tmp_path / "whole"))
    assert merged["units"]["run"] == UNITS and [p["shard"] for p in merged["units"]["parts"]] == ["1/2", "2/2"]
    assert not [n for n in merged["notes"] if "shard" in n]  # the shards' own "one shard of" notes are gone
    assert (tmp_path / "merged" / "junit.xml").is_file()


def test_a_missing_shard_is_named_and_the_merge_is_not_certified(tmp_path, capsys):
    for k in (1, 3):
        main(["certify", "loop", *CLI, "--shard", f"{k}/3", "--report-dir", str(tmp_path / f"s{k}")])
    capsys.readouterr()
    code = main(["report", str(tmp_path / "s1" / "report.json"), str(tmp_path / "s3" / "report.json"),
                 "-o", str(tmp_path / "merged")])
    assert code == 1
    merged = _report(tmp_path / "merged")
    assert merged["verdict"] == "error"
    (note,) = [n for n in merged["notes"] if n.startswith("incomplete")]
    assert "the shard 2/3 missing" in note and UNITS[1] in note  # shard 2/3 holds the second unit (and the fifth)


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1/0", "2", "a/b"])
def test_a_bad_shard_is_refused(shard, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["certify", "loop", *CLI, "--shard", shard, "--report-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert f"--shard: expected K/N with whole numbers 1 <= K <= N (the K-th of N slices), got {shard!r}" in \
        capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_parts_that_do_not_belong_together_are_refused(tmp_path, capsys):
    main(["certify", "loop", *CLI, "--shard", "1/2", "--report-dir", str(tmp_path / "loop1")])
    main(["certify", "stacked", *CLI, "--shard", "2/2", "--report-dir", str(tmp_path / "stacked2")])
    other = [a if a != "3" else "4" for a in CLI]  # more examples per search
    main(["certify", "loop", *other, "--shard", "2/2", "--report-dir", str(tmp_path / "loop2")])
    main(["certify", "loop", *CLI, "--report-dir", str(tmp_path / "whole")])
    capsys.readouterr()
    loop1, stacked2, loop2, whole = (str(tmp_path / d / "report.json") for d in ("loop1", "stacked2", "loop2", "whole"))

    def refused(*paths: str) -> str:
        assert main(["report", *paths, "-o", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    err = refused(loop1, stacked2)
    assert "they differ in the target" in err and "loop1/report.json: 'loop'" in err
    assert "stacked2/report.json: 'stacked'" in err
    assert "differ in the setting 'max_examples'" in refused(loop1, loop2)
    assert "the unit float64-vs-finite-differences is in both" in refused(loop1, loop1)
    assert "holds no list of units" in refused(loop1, whole)
    bad = tmp_path / "version.json"
    report = _report(tmp_path / "loop2")
    report["tool"]["version"] = "0.0.1"
    report["settings"]["max_examples"] = 3
    bad.write_text(json.dumps(report))
    assert "differ in the harness version" in refused(loop1, str(bad))
    assert "-o: expected the directory" in (main(["report", loop1, loop1]), capsys.readouterr().err)[1]
    assert not (tmp_path / "out").exists()  # nothing was written for a refused merge


def test_the_merged_report_is_not_written_over_a_users_directory(tmp_path, capsys):
    main(["certify", "loop", *CLI, "--shard", "1/1", "--report-dir", str(tmp_path / "s")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["report", str(tmp_path / "s" / "report.json"), "-o", str(tmp_path / "mine")]) == 2
    assert "-o: " in capsys.readouterr().err and not (tmp_path / "mine" / "report.json").exists()


# --------------------------------------------------------------------------------------------------
# Units by name, and the slices


class _Oracle:
    def __init__(self, name: str):
        self.name = name


def test_shards_deal_the_plan_round_robin_and_cover_it_once():
    from harness.session import Unit, select_units

    units = [Unit(0, dtype, (_Oracle(o),), "") for dtype in ("float64", "float32") for o in ("a", "b", "c")]
    names = [u.name for u in units]
    assert names[:3] == ["float64-vs-a", "float64-vs-b", "float64-vs-c"]
    for count in (1, 2, 4, 7):
        slices = [[u.name for u in select_units(units, shard=(k, count))] for k in range(1, count + 1)]
        assert sorted(n for s in slices for n in s) == sorted(names)  # every unit once
        assert slices[0] == names[::count]  # the K-th slice: units K, K+N, K+2N, ... of the plan
    assert [u.name for u in select_units(units, names=["float32-vs-b", "float64-vs-a"])] == ["float64-vs-a",
                                                                                             "float32-vs-b"]
    with pytest.raises(ValueError, match="units: expected names from float64-vs-a, .*got float16-vs-a"):
        select_units(units, names=["float16-vs-a"])


def test_certify_names_its_units_and_refuses_one_it_lacks():
    from harness.api import InvalidArgument, certification_units, certify

    assert certification_units("loop", oracles=ORACLES) == UNITS
    with pytest.raises(InvalidArgument, match="units: expected names from float64-vs-finite-differences"):
        certify("loop", oracles=ORACLES, units=["float64-vs-torch"])
    with pytest.raises(InvalidArgument, match="shard: expected"):
        certify("loop", oracles=ORACLES, shard=(0, 2))
