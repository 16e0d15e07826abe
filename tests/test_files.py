"""Files the harness writes (harness.files): whole or not at all, never over a user's own files, one run
at a time per report directory."""

import json
import os
import stat

import pytest

from harness.files import (
    LOCK,
    MARKER,
    ReportDirError,
    atomic_path,
    check_writable_file,
    claim_report_dir,
    write_atomically,
)


def test_a_write_that_fails_halfway_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "index.html"
    write_atomically(target, "the previous report")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as fh:
            fh.write("half of the new")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]  # no temporary file left behind


def test_a_users_own_directory_is_refused_unless_forced(tmp_path):
    (tmp_path / "index.html").write_text("my own page")
    with pytest.raises(ReportDirError, match="not empty and holds no previous lstm-harness report .*--force"):
        claim_report_dir(tmp_path)
    with claim_report_dir(tmp_path, force=True):
        assert (tmp_path / MARKER).is_file()
    # Once marked it is a report directory: later runs write there without --force.
    with claim_report_dir(tmp_path):
        pass
    assert (tmp_path / "index.html").read_text() == "my own page"  # claiming writes nothing of the report


def test_a_report_from_before_the_marker_is_recognised(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 1, "tool": {"name": "lstm-harness"}}))
    with claim_report_dir(tmp_path):
        pass


def test_new_and_empty_directories_are_claimed(tmp_path):
    with claim_report_dir(tmp_path / "new" / "report"):
        assert (tmp_path / "new" / "report" / MARKER).is_file()


def test_a_claim_abandoned_before_any_work_leaves_the_directory_as_it_was_found(tmp_path):
    # New: the directories claiming made go again, the first existing parent stays.
    claim_report_dir(tmp_path / "new" / "report").abandon()
    assert list(tmp_path.iterdir()) == []
    # A user's own directory (forced): the file stays, the marker and lock go.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    claim_report_dir(tmp_path / "mine", force=True).abandon()
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    # A previous report's directory keeps its marker (and lock file), and can be claimed again at once.
    with claim_report_dir(tmp_path / "old"):
        pass
    claim_report_dir(tmp_path / "old").abandon()
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == sorted([MARKER, LOCK])
    with claim_report_dir(tmp_path / "old"):
        pass


def test_two_runs_cannot_write_one_directory_at_once(tmp_path):
    with claim_report_dir(tmp_path):
        with pytest.raises(ReportDirError, match=r"is being written by another lstm-harness run \(pid \d+\)"):
            claim_report_dir(tmp_path)
    with claim_report_dir(tmp_path):  # released: free again
        assert (tmp_path / LOCK).exists()


def test_paths_that_cannot_be_written_are_refused_up_front(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ReportDirError, match="expected a directory, got .*which is a file"):
        claim_report_dir(a_file)
    with pytest.raises(ReportDirError, match="junit: expected a path to a file, got .*which is a directory"):
        check_writable_file(tmp_path, "junit")
    with pytest.raises(ReportDirError, match="which is not a regular file"):
        check_writable_file("/dev/null", "junit")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    (json.dumps({"schema_version": 1, "verdict": "certified"}), "expected a list of records"),
    (json.dumps({"schema_version": 1, "verdict": "certified", "records": [{"status": "pass"}]}),
     "record 0: expected text fields implementation"),
    (json.dumps({"schema_version": 1, "verdict": "certified", "records": [
        {"implementation": "i", "oracle": "o", "variant": "vanilla", "dtype": "float64", "direction": "forward",
         "quantity": "y", "status": "great"}]}), "expected a status among"),
    (json.dumps({"schema_version": 1, "verdict": "fine", "records": []}), "expected a verdict"),
])
def test_a_malformed_report_json_is_refused_with_what_is_wrong(content, message, tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "report.json"
    path.write_text(content)
    assert main(["report", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_files_get_the_permissions_open_would_give_them(umask, tmp_path):
    """Not the temporary file's private 0600: a report is read by a CI artifact server or a colleague."""
    old = os.umask(umask)
    try:
        written = write_atomically(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask


def test_a_report_file_that_cannot_be_written_any_more_costs_that_file_only(tmp_path):
    """What lies at a report path may change during the run (an implementation can write into the report
    directory): the run's other files are still written, the failure is said, and no index.html the run
    did not write stays beside them."""
    from harness.api import write_reports

    (tmp_path / "report.json").mkdir()  # made a directory behind the run's back
    (tmp_path / "index.html").write_text("<h1>Verdict: certified</h1>")  # and a page planted
    said: list[str] = []
    files = write_reports({"records": []}, tmp_path, junit=tmp_path / "report.json", note=said.append)
    assert "json" not in files and "junit" not in files
    assert said[0].startswith(f"error: the report could not be written to {tmp_path / 'report.json'}: "
                              "IsADirectoryError")
    assert any(line.startswith("error: the JUnit XML could not be written") for line in said)
    page = tmp_path / "index.html"
    assert not page.exists() or "Verdict: certified</h1>" not in page.read_text()


def test_a_junit_path_is_told_apart_from_the_reports_own_files_however_it_is_spelled(tmp_path):
    from harness.files import check_apart

    report = tmp_path / "r"
    report.mkdir()
    (tmp_path / "link").symlink_to(report)
    for spelled in (report / "x" / ".." / "report.json", tmp_path / "link" / "index.html", tmp_path / "link"):
        with pytest.raises(ReportDirError, match="junit_xml: .* is where the report in"):
            check_apart(spelled, report)
    check_apart(tmp_path / "link" / "junit.xml", report)  # beside them: fine
