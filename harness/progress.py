"""The progress display of a certification, on stderr, so that a long run does not look hung."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]


class _Unit:
    """One running unit: the cases it has checked so far and when it began."""

    def __init__(self, started: float):
        self.cases = 0
        self.started = started


class Progress:
    """A progress display on stderr, so that a long run does not look hung.

    On a terminal one status line is rewritten in place: every running unit, what it is doing
    ("starting" until its first case, then its case count) and its own seconds. A background
    thread redraws it every ``tick`` seconds, so that the clock moves while the frameworks load and
    nothing else happens; the line is cut to the terminal's width (never wrapped, which would leave
    stale lines behind).

    Elsewhere (CI logs) plain lines: one per finished unit, with the unit's own time beside its own
    case count, and a heartbeat, after ``heartbeat`` seconds without a line, that says what is
    running and for how long.

    ``stream``, ``clock`` and ``width`` are for tests: a stream with ``isatty``, a function giving
    seconds, a fixed terminal width.
    """

    def __init__(self, label: str, *, stream: Any = None, enabled: bool = True, heartbeat: float = 30.0,
                 tick: float = 0.5, clock: Callable[[], float] = time.monotonic, width: int | None = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.heartbeat = heartbeat
        self.tick_seconds = tick
        self.clock = clock
        self.width = width
        self.start_time = clock()
        self.running: dict[str, _Unit] = {}
        self._last_draw = float("-inf")
        self._last_line = self.start_time  # when the last line of a non-terminal log was written
        self._status_shown = False  # a status line is on the terminal (to be cleared before a line)
        self._lock = threading.RLock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # ----------------------------------------------------------------------------------------------
    # What the orchestration calls

    def begin(self, unit: str) -> None:
        with self._lock:
            self.running[unit] = _Unit(self.clock())
            self._draw(force=True)
            self._start_ticker()

    def update(self, unit: str, cases: int) -> None:
        with self._lock:
            state = self.running.setdefault(unit, _Unit(self.clock()))
            state.cases = cases
            self._draw()

    def end(self, unit: str, cases: int, outcome: str) -> None:
        with self._lock:
            state = self.running.pop(unit, None)
            seconds = self.clock() - state.started if state is not None else 0.0
            if cases > 0 and outcome != "skipped":
                line = f"  {self.label} {unit}: {cases} cases in {seconds:.1f}s, {outcome}"
            else:  # nothing was checked (skipped, an error before the first case, or not a search at all)
                line = f"  {self.label} {unit}: {outcome} ({seconds:.1f}s)"
            self._line(line)
            self._draw(force=True)

    def close(self) -> None:
        """Stop the background redraws and take the status line off the terminal."""
        self._stop.set()
        ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join()
        with self._lock:
            self._ticker = None
            self._clear_status()
        self._stop.clear()  # a later begin() (the convention search after the units) may draw again

    def tick(self) -> None:
        """Redraw the clock (what the background thread does every ``tick`` seconds)."""
        with self._lock:
            self._draw(force=True)

    # ----------------------------------------------------------------------------------------------
    # Drawing

    def _status(self, now: float) -> str:
        parts = []
        for unit, state in self.running.items():
            doing = f"{state.cases} cases" if state.cases else "starting"
            parts.append(f"{unit} {doing} {now - state.started:.0f}s")
        return ", ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or not self.running:
            return
        now = self.clock()
        if self.tty:
            if force or now - self._last_draw >= 0.2:
                self._last_draw = now
                text = self._fit(f"  {self.label} ({now - self.start_time:.0f}s): {self._status(now)}")
                self._write(f"\r\033[K{text}")
                self._status_shown = True
        elif now - self._last_line >= self.heartbeat:
            self._line(f"  {self.label}: still running after {now - self.start_time:.0f}s: {self._status(now)}")

    def _line(self, text: str) -> None:
        """One finished line: over the status line on a terminal, appended elsewhere."""
        if not self.enabled:
            return
        self._clear_status()
        self._write(text + "\n")
        self._last_line = self.clock()

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write("\r\033[K")
            self._status_shown = False

    def _fit(self, text: str) -> str:
        """``text`` cut to one line of the terminal, the cut marked with an ellipsis. The last column
        stays empty: a character there makes some terminals wrap."""
        room = max(self._columns() - 1, 4)
        if len(text) <= room:
            return text
        ellipsis = "…" if self._can_encode("…") else "..."
        return text[: room - len(ellipsis)] + ellipsis

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return shutil.get_terminal_size().columns

    def _can_encode(self, text: str) -> bool:
        try:
            text.encode(getattr(self.stream, "encoding", None) or "ascii")
        except (UnicodeEncodeError, LookupError):
            return False
        return True

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    # ----------------------------------------------------------------------------------------------
    # The background redraw

    def _start_ticker(self) -> None:
        if not self.enabled or self._ticker is not None or self.tick_seconds <= 0:
            return
        self._ticker = threading.Thread(target=self._run_ticker, name="lstm-harness-progress", daemon=True)
        self._ticker.start()

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            with self._lock:
                if not self.running:  # nothing to show: stop; the next begin() starts another
                    self._ticker = None
                    return
                self._draw(force=self.tty)
