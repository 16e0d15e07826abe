"""The progress display: a status line on a terminal that keeps its clock moving and never wraps;
plain lines in a log, each unit's time beside its own case count, and a heartbeat."""

from __future__ import annotations

import io
import re

from harness.progress import Progress


class FakeStream(io.StringIO):
    def __init__(self, tty: bool, encoding: str = "utf-8"):
        super().__init__()
        self._tty = tty
        self._encoding = encoding

    def isatty(self) -> bool:
        return self._tty

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress(tty: bool, *, width: int = 100, encoding: str = "utf-8", heartbeat: float = 30.0,
              label: str = "certify loop") -> tuple[Progress, FakeStream, FakeClock]:
    stream, clock = FakeStream(tty, encoding), FakeClock()
    # tick=0: no background thread, so that the test drives every redraw itself
    return Progress(label, stream=stream, clock=clock, width=width, heartbeat=heartbeat, tick=0), stream, clock


def _screen(text: str) -> list[str]:
    """What a terminal shows: each carriage return with erase-line starts the line over."""
    lines = []
    for raw in text.split("\n"):
        lines.append(raw.split("\r\033[K")[-1])
    return lines


def test_terminal_status_says_starting_before_the_first_case_and_its_clock_moves_without_events():
    progress, stream, clock = _progress(tty=True)
    progress.begin("float64")
    assert _screen(stream.getvalue())[-1] == "  certify loop (0s): float64 starting 0s"
    assert "0 cases" not in stream.getvalue()
    clock.now += 22  # the frameworks load: no case, no event
    progress.tick()
    assert _screen(stream.getvalue())[-1] == "  certify loop (22s): float64 starting 22s"
    progress.update("float64", 5)
    clock.now += 1
    progress.tick()
    assert _screen(stream.getvalue())[-1] == "  certify loop (23s): float64 5 cases 23s"


def test_terminal_status_line_is_cut_to_the_width_never_wrapped():
    progress, stream, clock = _progress(tty=True, width=40)
    for unit in ("float64/torch", "float64/tensorflow", "float32/jax"):
        progress.begin(unit)
        progress.update(unit, 123)
    clock.now += 5
    progress.tick()
    shown = _screen(stream.getvalue())
    assert len(shown) == 1  # no newline: one status line, rewritten
    assert len(shown[0]) == 39 and shown[0].endswith("…")
    assert shown[0].startswith("  certify loop (5s): float64/torch")


def test_cut_uses_three_dots_where_the_stream_cannot_encode_an_ellipsis():
    progress, stream, _ = _progress(tty=True, width=30, encoding="ascii")
    progress.begin("float64/finite-differences")
    shown = _screen(stream.getvalue())[-1]
    assert len(shown) == 29 and shown.endswith("...")


def test_finished_unit_replaces_the_status_line_with_its_own_time_and_count():
    progress, stream, clock = _progress(tty=True)
    progress.begin("float64")
    clock.now += 10
    progress.begin("float32")
    clock.now += 4
    progress.end("float32", 50, "certified")
    shown = _screen(stream.getvalue())
    assert shown[0] == "  certify loop float32: 50 cases in 4.0s, certified"
    assert shown[1] == "  certify loop (14s): float64 starting 14s"
    progress.close()
    assert _screen(stream.getvalue())[-1] == ""  # the status line is taken off


def test_log_lines_give_each_units_own_time_beside_its_count():
    progress, stream, clock = _progress(tty=False)
    progress.begin("float64")
    clock.now += 20
    progress.begin("float32")
    clock.now += 3
    progress.update("float32", 40)
    progress.end("float32", 40, "certified")
    clock.now += 7
    progress.end("float64", 500, "discrepancies")
    progress.close()
    assert stream.getvalue().splitlines() == [
        "  certify loop float32: 40 cases in 3.0s, certified",
        "  certify loop float64: 500 cases in 30.0s, discrepancies",
    ]
    assert "\r" not in stream.getvalue() and "\033" not in stream.getvalue()


def test_log_heartbeat_says_what_runs_and_for_how_long():
    progress, stream, clock = _progress(tty=False, heartbeat=30)
    progress.begin("float64/torch")
    clock.now += 29
    progress.tick()
    assert stream.getvalue() == ""  # no line yet: the heartbeat waits for 30 s of silence
    clock.now += 2
    progress.tick()
    assert stream.getvalue() == "  certify loop: still running after 31s: float64/torch starting 31s\n"
    progress.update("float64/torch", 12)
    clock.now += 10
    progress.tick()  # a heartbeat was written 10 s ago: none yet
    assert stream.getvalue().count("\n") == 1
    clock.now += 25
    progress.tick()
    assert stream.getvalue().splitlines()[-1] == ("  certify loop: still running after 66s: "
                                                  "float64/torch 12 cases 66s")


def test_skipped_unit_says_skipped_and_no_case_count():
    for tty in (False, True):
        progress, stream, clock = _progress(tty=tty)
        progress.begin("float16/torch")
        clock.now += 4
        progress.end("float16/torch", 500, "skipped")
        finished = _screen(stream.getvalue())[0]
        assert finished == "  certify loop float16/torch: skipped (4.0s)"
        assert "cases" not in finished


def test_disabled_progress_writes_nothing():
    stream, clock = FakeStream(True), FakeClock()
    progress = Progress("certify loop", stream=stream, clock=clock, enabled=False, width=80)
    progress.begin("float64")
    progress.update("float64", 3)
    progress.tick()
    progress.end("float64", 3, "certified")
    progress.close()
    assert stream.getvalue() == ""


def test_background_redraw_thread_starts_with_a_unit_and_close_stops_it():
    stream, clock = FakeStream(True), FakeClock()
    progress = Progress("certify loop", stream=stream, clock=clock, width=80, tick=0.01)
    progress.begin("float64")
    ticker = progress._ticker
    assert ticker is not None and ticker.is_alive() and ticker.daemon
    progress.close()
    assert not ticker.is_alive()
    assert re.fullmatch(r"(\r\033\[K  certify loop \(0s\): float64 starting 0s)+\r\033\[K", stream.getvalue())
