"""Named arrays in ``.npz`` files: one reader and one checker for weights, optimizer
state and training checkpoints.

Everything is loaded with ``allow_pickle=False``; mismatches are reported all at
once, naming the file (or other source) and every array at fault.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np
from numpy.lib import format as npy_format

from galpipe.errors import ModelError

#: What reading a damaged or crafted ``.npz`` raises (truncated, bad CRC, unknown compression, ...).
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
               NotImplementedError, MemoryError)


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
    except _UNREADABLE as exc:
        raise ModelError(f"{name}: not a readable .npz of plain arrays ({type(exc).__name__}: {exc})") from exc


def npz_headers(source: str | os.PathLike[str], *, where: str | None = None) -> dict[str, np.ndarray]:
    """The names, shapes and dtypes of the arrays in an ``.npz``, read from the ``.npy`` headers only.

    Nothing is decompressed beyond each header, so a file that declares a huge or
    pickled array costs nothing; check the result with :func:`check_arrays` before
    :func:`read_npz`.  Each value is a zero-strided stand-in (no memory) with the
    declared shape and dtype.

    Raises
    ------
    ModelError
        Not a readable zip archive (truncated, damaged), a member that is not a
        ``.npy`` file, or a duplicate name, naming the file (``where``, default the path).
    """
    name = where if where is not None else str(source)
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise ModelError(f"{name}: member {info.filename!r} is not a .npy array")
                key = info.filename[: -len(".npy")]
                if key in out:
                    raise ModelError(f"{name}: array {key!r} is stored twice")
                with zf.open(info) as fh:
                    version = npy_format.read_magic(fh)
                    read = (npy_format.read_array_header_1_0 if version == (1, 0)
                            else npy_format.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                out[key] = np.broadcast_to(np.zeros((), dtype), shape)
    except ModelError:
        raise
    except _UNREADABLE as exc:
        raise ModelError(f"{name}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    return out


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
