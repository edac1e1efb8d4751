"""Progress of long loops: a tqdm bar on a terminal, periodic log lines everywhere else.

tqdm draws a bar that only makes sense on a terminal; under Snakemake, SLURM or
``nohup`` stderr is a log file, and a 10k-galaxy download would stay silent for
half an hour.  :func:`progress` picks the right display once, when the loop
starts:

* stderr is a terminal: a tqdm bar (``leave=False``), as before;
* otherwise: one line through :mod:`logging` (logger ``galpipe.progress``, level
  INFO) at least every ``interval_s`` seconds (10 by default) and one at the end::

      sdss frames: 1200/10000 (12.0%), 4.8 galaxy/s, ETA 30:33
      sdss frames: 10000/10000 (100.0%), 4.9 galaxy/s, done in 34:01

  A background thread wakes every ``interval_s`` so that a line is written even
  while one slow item (a large frame download) holds up every ``update``.

Use it as a context manager around the loop::

    from galpipe.progress import progress

    with progress(len(rows), "skyserver jpeg", "galaxy", enabled=show) as bar:
        for row in rows:
            ...
            bar.update()          # or bar.update(n) for n items at once

or wrap an iterable with :func:`track`.  ``enabled=False`` gives a reporter that
does nothing, so callers keep a single code path.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

#: Seconds between two log lines when stderr is not a terminal.
DEFAULT_INTERVAL_S = 10.0
#: The logger progress lines go to.
LOGGER_NAME = "galpipe.progress"


def format_duration(seconds: float) -> str:
    """``mm:ss`` (minutes unbounded, ``75:03``); ``--:--`` for an unknown or infinite duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    whole = round(seconds)
    return f"{whole // 60:02d}:{whole % 60:02d}"


def format_rate(rate: float) -> str:
    """A rate: 2 decimals below 1, 1 below 100, none above (``0.42``, ``4.8``, ``312``); ``?`` if unknown."""
    if not math.isfinite(rate):
        return "?"
    return f"{rate:.2f}" if rate < 1 else (f"{rate:.1f}" if rate < 100 else f"{rate:.0f}")


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Reports the progress of ``total`` units of work (see the module docstring).

    Parameters
    ----------
    total : int or None
        Units of work expected (None: unknown; no percentage or ETA then).
    what : str
        What is being done, the start of each line (``"sdss frames"``).
    unit : str
        Name of one unit (``"galaxy"``, ``"image"``).
    enabled : bool
        False: report nothing (every method is a no-op).
    interval_s : float
        Seconds between two log lines in log mode.
    stream : text stream, optional
        Decides the mode (a terminal: tqdm) and receives the bar; default ``sys.stderr``.
    clock : callable, optional
        Monotonic seconds (default :func:`time.monotonic`); tests pass a fake clock.
    logger : logging.Logger, optional
        Where log lines go (default: the ``galpipe.progress`` logger).
    heartbeat : bool
        In log mode, a daemon thread checks every ``interval_s`` (real seconds) whether a
        line is due, so one slow unit cannot silence the log.  Tests driven by a fake
        clock turn it off and call :meth:`tick`.
    """

    def __init__(self, total: int | None, what: str, unit: str = "item", *, enabled: bool = True,
                 interval_s: float = DEFAULT_INTERVAL_S, stream: TextIO | None = None,
                 clock: Callable[[], float] | None = None, logger: logging.Logger | None = None,
                 heartbeat: bool = True) -> None:
        if total is not None and (isinstance(total, bool) or int(total) < 0):
            raise ValueError(f"progress total must be a non-negative integer or None, got {total!r}")
        if not interval_s > 0:
            raise ValueError(f"progress interval_s must be > 0, got {interval_s!r}")
        self.total = None if total is None else int(total)
        self.what, self.unit, self.interval_s = what, unit, float(interval_s)
        self.done = 0
        self._clock = clock or time.monotonic
        self._log = logger or logging.getLogger(LOGGER_NAME)
        self._lock = threading.Lock()
        self._closed = False
        self._bar: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        stream = sys.stderr if stream is None else stream
        self.mode = "off" if not enabled else ("tqdm" if _is_terminal(stream) else "log")
        self._start = self._last = self._clock()
        if self.mode == "tqdm":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=what, unit=unit, leave=False, file=stream)
        elif self.mode == "log" and heartbeat:
            self._thread = threading.Thread(target=self._beat, name="galpipe-progress", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ reporting
    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; in log mode, write a line if ``interval_s`` has passed."""
        if self.mode == "off" or self._closed:
            return
        with self._lock:
            self.done += int(n)
        if self._bar is not None:
            self._bar.update(n)
        else:
            self.tick()

    def tick(self) -> None:
        """Write a log line now if the last one is ``interval_s`` old (log mode; the heartbeat calls it)."""
        if self.mode != "log" or self._closed:
            return
        with self._lock:
            now = self._clock()
            if now - self._last < self.interval_s:
                return
            self._last = now
            line = self.line(now)
        self._log.info("%s", line)

    def line(self, now: float | None = None, *, final: bool = False) -> str:
        """The progress line at clock time ``now``: ``<what>: <done>/<total> (<pct>%), <rate> <unit>/s, ETA <mm:ss>``.

        The final line ends with ``done in <mm:ss>`` (or ``stopped after <mm:ss>`` when
        fewer than ``total`` units were done).
        """
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 0.0)
        rate = self.done / elapsed if elapsed > 0 else math.nan
        if self.total is None:
            count = f"{self.done}"
        else:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            count = f"{self.done}/{self.total} ({pct:.1f}%)"
        head = f"{self.what}: {count}, {format_rate(rate)} {self.unit}/s"
        if final:
            finished = self.total is None or self.done >= self.total
            return f"{head}, {'done in' if finished else 'stopped after'} {format_duration(elapsed)}"
        if self.total is None:
            return f"{head}, ETA --:--"
        left = max(self.total - self.done, 0)
        eta = left / rate if rate > 0 else (0.0 if left == 0 else math.inf)
        return f"{head}, ETA {format_duration(eta)}"

    def close(self, *, final_line: bool = True) -> None:
        """Stop the heartbeat and close the bar; in log mode, write the final line (unless ``final_line``
        is False: the loop was left by an exception, whose own message says what happened)."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()
        if self.mode == "log" and final_line:
            with self._lock:
                line = self.line(final=True)
            self._log.info("%s", line)
        self._closed = True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(final_line=exc_type is None)


def progress(total: int | None, what: str, unit: str = "item", *, enabled: bool = True,
             interval_s: float = DEFAULT_INTERVAL_S, **kwargs: Any) -> Progress:
    """A :class:`Progress` reporter (a context manager with ``.update(n)``); see the module docstring."""
    return Progress(total, what, unit, enabled=enabled, interval_s=interval_s, **kwargs)


def track(items: Iterable[T], what: str, unit: str = "item", *, total: int | None = None,
          enabled: bool = True, **kwargs: Any) -> Iterator[T]:
    """Yield ``items``, counting one unit each (``total`` defaults to ``len(items)`` when it has one).

    The end line is written when every item was consumed; a loop left early (``break`` or an
    exception: the generator is closed) ends the reporter silently.
    """
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with progress(total, what, unit, enabled=enabled, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()


__all__ = ["DEFAULT_INTERVAL_S", "Progress", "format_duration", "format_rate", "progress", "track"]
