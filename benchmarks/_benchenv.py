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


def cpu_note() -> str:
    """One line naming the CPU (model name, vector extensions, L2 / L3 per instance).

    Ratios against PyTorch move with the CPU: ``bench_nn.py`` measured training on 1 thread
    at 1.07-1.26x in the sessions of 2026-12-02 (CPU not recorded) and 0.95-1.16x on
    2026-12-03 on an AMD EPYC with AVX-512 (OpenBLAS's SkylakeX kernel), with the same code.
    Read every run with this line.
    """
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    ext = [e for e in ("avx2", "fma", "avx512f", "avx512_bf16") if e in flags]
    caches = []
    for level in ("index2", "index3"):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/{level}/size", encoding="utf-8") as fh:
                caches.append(f"L{level[-1]} {fh.read().strip()}")
        except OSError:
            pass
    vector = " ".join(ext) if ext else ("no AVX2" if flags else "flags unknown")
    return f"cpu: {model}; {vector}; {', '.join(caches) or 'caches unknown'}"
