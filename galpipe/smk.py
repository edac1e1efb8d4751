"""Glue for the short Snakemake script adapters in ``workflow/scripts/``.

An adapter is three lines: import a stage function and call :func:`run_stage`
with the ``snakemake`` object and the stage's arguments.  This sets up logging
to the rule's log file, limits BLAS threads to the rule's ``threads`` and turns
a :class:`~galpipe.errors.GalpipeError`, or an :class:`OSError` (disk full,
permission denied, read-only file system, a missing folder...), into a one-line
message naming the rule and the file, and exit 1.  Any other exception is a bug
and keeps its traceback.  ``GALPIPE_DEBUG=1`` in the environment re-raises every
error with its traceback (``galpipe --debug`` does the same on the command line).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from galpipe.errors import GalpipeError


def setup_logging(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Log galpipe messages to stderr and, if given, to ``log_file``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def debug_requested() -> bool:
    """Whether ``GALPIPE_DEBUG`` asks for tracebacks instead of one-line errors."""
    return os.environ.get("GALPIPE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def describe_os_error(exc: OSError) -> str:
    """``<cause> (<file>)`` of an OSError, on one line: ``No space left on device (results/x.parquet)``."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    names = [os.fsdecode(f) if isinstance(f, str | bytes | os.PathLike) else str(f)
             for f in (exc.filename, exc.filename2) if f is not None]
    if isinstance(exc, FileExistsError) and len(names) == 1 and os.path.isfile(names[0]):
        cause = "File exists and is not a folder"  # mkdir of an output folder where a file is
    text = f"{cause} ({' -> '.join(names)})" if names else cause
    return " ".join(text.split())


def run_stage(snakemake: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``func(*args, **kwargs)`` inside a Snakemake job."""
    from threadpoolctl import threadpool_limits

    log_file = snakemake.log[0] if len(snakemake.log) else None
    setup_logging(log_file)
    logger = logging.getLogger("galpipe")
    try:
        with threadpool_limits(limits=max(1, int(snakemake.threads))):
            return func(*args, **kwargs)
    except (GalpipeError, OSError) as exc:
        if debug_requested():
            raise
        msg = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        logger.error("%s failed: %s", snakemake.rule, msg)
        print(f"galpipe error in rule {snakemake.rule}: {msg}", file=sys.stderr)
        sys.exit(1)
