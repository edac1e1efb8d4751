"""Atomic file writes (temporary file + rename) and safe file names.

Every artifact galpipe writes goes through :func:`atomic_path`: a file in
``results/`` or ``resources/`` is complete or absent, never half-written, and a
killed writer's temporary file is swept by the next writer without touching
the temporary files of writers that still run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from galpipe.errors import DataError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

#: Temporary files of another host (or of an older galpipe) are removed once this old (seconds).
STALE_TEMP_SECONDS = 3600.0

_HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
# ".<final name>.p<pid>h<host tag>.<random>.tmp", as made by atomic_path
_TEMP_NAME = re.compile(r"^\..+\.p(?P<pid>\d{1,10})h(?P<host>[0-9a-f]{8})\.[a-z0-9_]{8}\.tmp$")
# ".<final name>.<random>.tmp": the format before the writer's pid was recorded
_OLD_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_swept: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user) or not a pid we can judge: keep the file
    return True


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that :func:`atomic_path` writers left behind when killed.

    A temporary file is stale when the process that wrote it (its pid is in
    the name) no longer runs on this host, or, for a file written on another
    host or by an older galpipe, when it is older than
    :data:`STALE_TEMP_SECONDS`.  Files of live writers are never touched, so
    this is safe while other jobs write into the same directory.

    Parameters
    ----------
    directory : path-like
        Folder to clean (not recursive).

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        m = _TEMP_NAME.fullmatch(name)
        try:
            if m and m["host"] == _HOST_TAG:
                stale = not _pid_alive(int(m["pid"]))
            elif m or _OLD_TEMP_NAME.fullmatch(name):
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            else:
                stale = False
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # vanished meanwhile or not ours to delete
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory (same filesystem) so the
    final :func:`os.replace` is atomic.  On any exception the temporary file is
    removed and ``path`` is left untouched (either absent or the old version).
    A process killed outright (SIGKILL, power loss) cannot clean up: the first
    atomic write into a directory in each process removes what such writers
    left there (:func:`remove_stale_temps`).

    Parameters
    ----------
    path : path-like
        Final destination.
    durable : bool
        Also ``fsync`` the file before the rename, so it survives a power
        loss, not only a killed process (slow for many small files).

    Yields
    ------
    pathlib.Path
        Temporary path to write to (it does not exist yet).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.abspath(final.parent)
    if key not in _swept:
        remove_stale_temps(final.parent)
        _swept.add(key)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.p{os.getpid()}h{_HOST_TAG}.", suffix=".tmp", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise DataError(f"atomic write of {final}: nothing was written")
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def safe_filename(name: object, *, what: str = "name") -> str:
    """Return ``str(name)`` if it is safe as a single path component.

    Object ids and labels are never used raw in paths: only
    ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (max 128 chars, no ``..``) passes.

    Raises
    ------
    DataError
        If the name contains path separators, NUL, ``..`` or other characters.
    """
    text = str(name)
    if not _SAFE_NAME.fullmatch(text) or ".." in text:  # fullmatch: '$' alone allows a final newline
        raise DataError(
            f"{what} {text!r} is not usable as a file name "
            "(allowed: letters, digits, '_', '-', '.', no '..', at most 128 characters)"
        )
    return text



def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's content, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
