"""The progress display of a certification, on stderr, so that a long run does not look hung."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A progress display on stderr, so that a long run does not look hung.

    On a terminal one status line is rewritten (units running, cases each, seconds); elsewhere (CI
    logs) a line per finished unit, and a "still checking" line at most every ``heartbeat`` seconds.
    """

    def __init__(self, label: str, *, stream: Any = None, enabled: bool = True, heartbeat: float = 30.0):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.heartbeat = heartbeat
        self.start_time = time.monotonic()
        self.running: dict[str, tuple[int, float]] = {}
        self._last_draw = 0.0
        self._last_beat = time.monotonic()

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def begin(self, unit: str) -> None:
        self.running[unit] = (0, time.monotonic())
        self._draw(force=True)

    def update(self, unit: str, cases: int) -> None:
        started = self.running.get(unit, (0, time.monotonic()))[1]
        self.running[unit] = (cases, started)
        self._draw()

    def end(self, unit: str, cases: int, outcome: str) -> None:
        started = self.running.pop(unit, (0, time.monotonic()))[1]
        line = f"  {self.label} {unit}: {cases} cases in {time.monotonic() - started:.1f}s, {outcome}"
        self._write(("\r\033[K" if self.tty else "") + line + "\n")
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.running:
            return
        parts = ", ".join(f"{u} {n} cases" for u, (n, _) in self.running.items())
        if self.tty:
            if force or now - self._last_draw > 0.2:
                self._last_draw = now
                self._write(f"\r\033[K  {self.label}: {parts} ({now - self.start_time:.0f}s)")
        elif now - self._last_beat > self.heartbeat:
            self._last_beat = now
            self._write(f"  {self.label}: still checking: {parts} ({now - self.start_time:.0f}s)\n")

    def close(self) -> None:
        if self.tty and self.running:
            self._write("\r\033[K")
