"""galpipe.progress: tqdm on a terminal, timed log lines (count, rate, ETA) everywhere else.

Driven by a fake clock: no test sleeps.  The heartbeat thread (a line while no unit
finishes) is checked by waiting on an event, not on time.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Callable

import pytest

from galpipe.progress import Progress, format_duration, format_rate, progress, track

LINE = re.compile(r"^(?P<what>.+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>[\d.]+)%\), (?P<rate>[\d.]+) "
                  r"(?P<unit>\w+)/s, ETA (?P<eta>\d\d+:\d\d)$")


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The progress lines logged so far."""
    caplog.set_level(logging.INFO, logger="galpipe.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "galpipe.progress"]


def _log_mode(total: int | None, clock: FakeClock, **kw) -> Progress:
    return progress(total, "sdss frames", "galaxy", stream=io.StringIO(), clock=clock, heartbeat=False, **kw)


def test_log_lines_at_the_interval_with_rate_and_eta(lines: Callable[[], list[str]]) -> None:
    clock = FakeClock()
    with _log_mode(100, clock) as bar:
        assert bar.mode == "log"
        for _ in range(4):  # 4 galaxies in 8 s: below the 10 s interval, nothing yet
            clock.advance(2.0)
            bar.update()
        assert lines() == []
        clock.advance(2.0)
        bar.update()  # t = 10 s, 5 done: 0.5 galaxy/s, 95 left -> 190 s
        assert lines() == ["sdss frames: 5/100 (5.0%), 0.50 galaxy/s, ETA 03:10"]
        clock.advance(9.9)
        bar.update(15)  # 9.9 s after the last line: none
        assert len(lines()) == 1
        clock.advance(0.1)
        bar.update(0)  # 20 s, 20 done: 1.0/s, 80 left
        assert lines()[-1] == "sdss frames: 20/100 (20.0%), 1.0 galaxy/s, ETA 01:20"
        clock.advance(60.0)
        bar.update(80)
    assert lines()[-1] == "sdss frames: 100/100 (100.0%), 1.2 galaxy/s, done in 01:20"
    assert len(lines()) == 4
    for line in lines()[:-1]:
        m = LINE.match(line)
        assert m, line
        assert float(m["pct"]) == pytest.approx(100 * int(m["done"]) / int(m["total"]), abs=0.05)


def test_the_interval_is_configurable_and_a_silent_stretch_still_logs(lines: Callable[[], list[str]]) -> None:
    clock = FakeClock()
    bar = _log_mode(10, clock, interval_s=1.0)
    clock.advance(0.5)
    bar.tick()
    assert lines() == []
    clock.advance(0.5)
    bar.tick()  # what the heartbeat does while no unit finishes
    assert lines() == ["sdss frames: 0/10 (0.0%), 0.00 galaxy/s, ETA --:--"]
    clock.advance(3.0)
    bar.update(2)  # 2 in 4 s -> 0.5/s, 8 left -> 16 s
    assert lines()[-1] == "sdss frames: 2/10 (20.0%), 0.50 galaxy/s, ETA 00:16"
    bar.close()  # closed (not by an exception) before the total: the end line says so
    assert lines()[-1] == "sdss frames: 2/10 (20.0%), 0.50 galaxy/s, stopped after 00:04"
    bar.close()  # idempotent
    bar.update()  # after close: ignored
    assert len(lines()) == 3


def test_unknown_total_and_long_etas() -> None:
    clock = FakeClock()
    bar = _log_mode(None, clock)
    clock.advance(4.0)
    bar.update(10)
    assert bar.line() == "sdss frames: 10, 2.5 galaxy/s, ETA --:--"
    assert bar.line(final=True) == "sdss frames: 10, 2.5 galaxy/s, done in 00:04"
    assert format_duration(75 * 60 + 3) == "75:03" and format_duration(float("inf")) == "--:--"
    assert format_duration(59.6) == "01:00"
    assert [format_rate(r) for r in (0.421, 4.84, 312.4, float("nan"))] == ["0.42", "4.8", "312", "?"]
    with pytest.raises(ValueError, match="interval_s"):
        _log_mode(3, clock, interval_s=0)
    with pytest.raises(ValueError, match="total"):
        _log_mode(-1, clock)


def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(lines: Callable[[], list[str]]) -> None:
    term = Terminal()
    with progress(3, "skyserver jpeg", "galaxy", stream=term) as bar:
        assert bar.mode == "tqdm"
        bar.update(3)
        assert bar._bar.n == 3  # tqdm redraws at its own pace
    assert "skyserver jpeg:" in term.getvalue() and "/3 [" in term.getvalue()
    assert lines() == []


def test_an_exception_ends_without_an_end_line(lines: Callable[[], list[str]]) -> None:
    clock = FakeClock()
    with pytest.raises(KeyError), _log_mode(4, clock) as bar:
        bar.update()
        raise KeyError("boom")
    assert lines() == [] and bar._closed


def test_disabled_does_nothing(lines: Callable[[], list[str]]) -> None:
    term = Terminal()
    with progress(3, "x", stream=term, enabled=False) as bar:
        bar.update(3)
        bar.tick()
        assert bar.mode == "off"
    assert term.getvalue() == "" and lines() == []


def test_track_counts_each_item_and_logs_the_end(lines: Callable[[], list[str]]) -> None:
    clock = FakeClock()
    seen = []
    for item in track(["a", "b", "c"], "images", "image", stream=io.StringIO(), clock=clock, heartbeat=False):
        clock.advance(1.0)
        seen.append(item)
    assert seen == ["a", "b", "c"]
    assert lines() == ["images: 3/3 (100.0%), 1.0 image/s, done in 00:03"]
    gen = track(iter(range(5)), "stream", stream=io.StringIO(), clock=clock, heartbeat=False)  # no len()
    assert next(gen) == 0
    gen.close()  # the loop was left early (a break, or an exception that says what happened): no end line
    assert len(lines()) == 1


def test_heartbeat_logs_while_nothing_finishes() -> None:
    """The daemon thread writes a line although update() is never called (a slow download)."""
    got = threading.Event()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "0/5" in record.getMessage() and "ETA" in record.getMessage():
                got.set()

    logger = logging.getLogger("galpipe.test_progress_heartbeat")
    logger.setLevel(logging.INFO)
    handler = Catch()
    logger.addHandler(handler)
    ticks = iter(range(0, 10**6, 50))  # every clock reading is 50 s later
    try:
        bar = progress(5, "frames", stream=io.StringIO(), clock=lambda: float(next(ticks)), logger=logger,
                       interval_s=0.01)
        assert got.wait(timeout=10), "no heartbeat line"
        bar.close()
        assert not bar._thread.is_alive()
    finally:
        logger.removeHandler(handler)
