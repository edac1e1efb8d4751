"""Shared first step of the benchmarks: run without this machine's OpenBLAS overrides.

``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` (set on some machines here, for old
OpenBLAS builds) halve NumPy's matrix-multiply speed.  They must be gone *before*
NumPy is imported, so a benchmark calls :func:`reexec_without_openblas_overrides`
first thing: it re-executes the script without them, once, and
:func:`environment_note` says so in the output.  Tests and CI keep the variables.
"""

from __future__ import annotations

import os
import sys

BAD_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_MARK = "_GALPIPE_BENCH_UNSET_ENV"


def reexec_without_openblas_overrides() -> None:
    """Re-execute this process without :data:`BAD_ENV` when any is set (NumPy not imported yet)."""
    if any(k in os.environ for k in BAD_ENV):
        removed = [f"{k}={os.environ.pop(k)}" for k in BAD_ENV if k in os.environ]
        os.environ[_MARK] = " ".join(removed)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def environment_note() -> str | None:
    """One line saying which variables were removed, or None when none was set."""
    removed = os.environ.get(_MARK)
    return f"environment: unset {removed} before importing numpy (re-executed)" if removed else None
