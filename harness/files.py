"""The files the harness writes: whole or not at all, and only where it may.

* Every report file (report.json, index.html, JUnit XML, saved cases) is written to a temporary file
  beside its destination and renamed over it: a run killed while writing leaves the previous file
  intact, never a truncated one. It gets the permissions a file ``open`` creates (0666 less the
  umask), not the temporary file's private 0600, so that a report can be served or shared.
* A report directory carries a marker file written by the harness. ``certify`` writes only into a
  directory that is empty, new, or marked (a previous report), unless told ``force``: a user's own
  ``index.html`` or ``report.json`` is never replaced by accident.
* While a run writes a report directory it holds an exclusive lock on it, so that two runs cannot
  interleave their files; the second is refused with a message that says which process holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from harness._version import __version__

__all__ = ["write_atomically", "atomic_path", "MARKER", "LOCK", "ReportDirError", "claim_report_dir",
           "check_writable_file", "check_apart"]

#: The file that says "this directory is an lstm-harness report".
MARKER = ".lstm-harness-report"
#: The lock a run holds on its report directory while it writes there.
LOCK = ".lstm-harness-lock"


class ReportDirError(ValueError):
    """The report directory (or another output path) cannot be used; the message says why and what to do."""


def write_atomically(path: str | os.PathLike[str], data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            Path(tmp).write_text(data, encoding=encoding)
        else:
            Path(tmp).write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[str]:
    """A temporary path beside ``path`` (ending in ``suffix``, for writers that insist on one) that
    replaces ``path`` when the block ends without an exception, and is removed otherwise."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:
        pass  # a file system without modes: the file keeps what it got
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """This process's umask, read without changing it where /proc says it (setting and restoring it would
    change it for a moment for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_apart(junit: str | os.PathLike[str], report_dir: str | os.PathLike[str]) -> None:
    """A JUnit XML path that is none of the report directory's own files and holds no report directory
    below it, however either is spelled; :class:`ReportDirError` naming ``junit_xml`` otherwise."""
    j, d = Path(junit).resolve(), Path(report_dir).resolve()  # through "..", and through links to them
    own = {d, d / "report.json", d / "index.html", d / MARKER, d / LOCK}
    if j in own or d / "cases" in (j, *j.parents):
        raise ReportDirError(f"junit_xml: {str(j)!r} is where the report in {str(d)!r} writes its own files "
                             f"(report.json, index.html, cases/); name another file, e.g. {str(d / 'junit.xml')!r}")
    if j in d.parents:
        raise ReportDirError(f"junit_xml: {str(j)!r} is a directory above the report directory {str(d)!r}; name a "
                             f"file, e.g. {str(d / 'junit.xml')!r}")


def check_writable_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a file the harness can create or replace; :class:`ReportDirError` naming ``what`` otherwise."""
    p = Path(path)
    if p.exists() and not p.is_file():
        kind = "a directory" if p.is_dir() else "not a regular file"
        raise ReportDirError(f"{what}: expected a path to a file, got {str(p)!r}, which is {kind}")
    parent = p.parent if str(p.parent) else Path(".")
    _check_directory(parent, what)
    return p


def _check_directory(d: Path, what: str) -> None:
    if d.exists() and not d.is_dir():
        raise ReportDirError(f"{what}: expected a directory, got {str(d)!r}, which is a file")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lstm-harness-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ReportDirError(f"{what}: cannot write into {str(d)!r} ({exc.strerror or exc}); choose a writable "
                             f"directory") from None


def _is_report(d: Path) -> bool:
    """Marked by the harness, or (written before the marker existed) holding an lstm-harness report.json."""
    if (d / MARKER).exists():
        return True
    try:
        with open(d / "report.json", encoding="utf-8") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return '"name": "lstm-harness"' in head


class _Claim:
    """A claimed report directory: its lock is held until :meth:`release`, or :meth:`abandon`."""

    def __init__(self, directory: Path, handle: IO[str] | None, release: Callable[[], None],
                 created: Sequence[Path] = ()):
        self.directory = directory
        self._handle = handle
        self._release = release
        #: What claiming made that was not there: the directories (deepest first), the marker, the lock.
        self._created = list(created)

    def release(self) -> None:
        self._release()

    def abandon(self) -> None:
        """Release, and take back what claiming made (its marker and lock, and the directories it created
        while they are empty): for a run refused before it wrote anything, which leaves no trace."""
        self._release()
        for path in self._created:
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()  # only when empty
                else:
                    path.unlink()

    def __enter__(self) -> _Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim_report_dir(directory: str | os.PathLike[str], *, force: bool = False) -> _Claim:
    """Check that ``directory`` may receive a report, take its lock and mark it; before any check runs.

    Refused (:class:`ReportDirError`) when it is a file, cannot be written, is not empty and holds no
    marker of a previous report (unless ``force``), or another run holds its lock.
    """
    d = Path(directory)
    made = [p for p in (d, *d.parents) if not p.exists()]  # deepest first: the directories claiming creates
    _check_directory(d, "report directory")
    if not force and not _is_report(d):
        others = sorted(p.name for p in d.iterdir() if p.name != LOCK)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ReportDirError(
                f"report directory: {str(d)!r} is not empty and holds no previous lstm-harness report ({shown}); "
                f"its files would be replaced. Choose another --report-dir, or pass --force to write there anyway")
    made = [p for p in (d / MARKER, d / LOCK) if not p.exists()] + made
    handle = open(d / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the marker still guards a user's files
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ReportDirError(f"report directory: {str(d)!r} is being written by another lstm-harness run "
                                 f"({holder}); wait for it to finish or choose another --report-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    write_atomically(d / MARKER, json.dumps({"tool": "lstm-harness", "version": __version__}) + "\n")

    def release() -> None:
        if not handle.closed:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    return _Claim(d, handle, release, made)
