"""Glue for the short Snakemake script adapters in ``workflow/scripts/``.

An adapter is three lines: import a stage function and call :func:`run_stage`
with the ``snakemake`` object and the stage's arguments.  This sets up logging
to the rule's log file, limits BLAS threads to the rule's ``threads`` and turns
a :class:`~galpipe.errors.GalpipeError` into a one-line message and exit 1.
"""

from __future__ import annotations

import logging
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


def run_stage(snakemake: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``func(*args, **kwargs)`` inside a Snakemake job."""
    from threadpoolctl import threadpool_limits

    log_file = snakemake.log[0] if len(snakemake.log) else None
    setup_logging(log_file)
    logger = logging.getLogger("galpipe")
    try:
        with threadpool_limits(limits=max(1, int(snakemake.threads))):
            return func(*args, **kwargs)
    except GalpipeError as exc:
        logger.error("%s failed: %s", snakemake.rule, exc)
        print(f"galpipe error in rule {snakemake.rule}: {exc}", file=sys.stderr)
        sys.exit(1)
