"""Named arrays in ``.npz`` files: one reader and one checker for weights, optimizer
state and training checkpoints.

Everything is loaded with ``allow_pickle=False``; mismatches are reported all at
once, naming the file (or other source) and every array at fault.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import numpy as np

from galpipe.errors import ModelError


def read_npz(source: str | os.PathLike[str] | bytes, *, where: str | None = None
             ) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (a path, or its bytes), loaded without pickle.

    Parameters
    ----------
    source : path-like or bytes
        The file, or its content.
    where : str, optional
        Name used in error messages (default: the path).

    Raises
    ------
    ModelError
        Unreadable file, or one holding object arrays.
    """
    name = where if where is not None else str(source)
    try:
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        with np.load(data, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{name}: not a readable .npz of plain arrays ({exc})") from exc


def check_arrays(saved: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], *,
                 where: str) -> None:
    """Check that ``saved`` has exactly the names of ``expected``, with the same shapes and
    dtype kinds (a float array for a float array; an integer one for an integer one).

    Raises
    ------
    ModelError
        ``"<where> does not match ...: missing keys [...], unexpected keys [...], shape
        mismatches: <name>: expected (..), got (..); dtype mismatches: ..."``.
    """
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    common = [k for k in expected if k in saved]
    shapes = [f"{k}: expected {np.shape(expected[k])}, got {np.shape(saved[k])}"
              for k in common if np.shape(saved[k]) != np.shape(expected[k])]
    kinds = [f"{k}: expected {np.asarray(expected[k]).dtype}, got {np.asarray(saved[k]).dtype}"
             for k in common if not _same_kind(np.asarray(saved[k]).dtype,
                                               np.asarray(expected[k]).dtype)]
    parts = []
    if missing:
        parts.append(f"missing keys {missing}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected}")
    if shapes:
        parts.append("shape mismatches: " + "; ".join(shapes))
    if kinds:
        parts.append("dtype mismatches: " + "; ".join(kinds))
    if parts:
        raise ModelError(f"{where} does not match the expected arrays: " + ", ".join(parts))


def _same_kind(got: np.dtype, want: np.dtype) -> bool:
    if want.kind == "f":
        return got.kind == "f"
    if want.kind in "iu":
        return got.kind in "iu"
    return got.kind == want.kind


def assign_arrays(live: Mapping[str, np.ndarray], saved: Mapping[str, np.ndarray], *,
                  where: str) -> None:
    """:func:`check_arrays`, then copy every saved array into the live one, in place."""
    check_arrays(saved, live, where=where)
    for k, arr in live.items():
        arr[...] = saved[k]
