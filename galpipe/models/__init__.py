"""Pretrained models shipped with galpipe, found by name: ``galpipe predict --model gz1``.

Each shipped model is a subfolder of this package (package data, so it is in the
wheel) holding what the train stage writes, ``model.json`` and ``weights.npz``,
plus what :mod:`galpipe.modelcard` adds when it packages a run: ``card.json``
(machine-readable), ``MODEL_CARD.md`` (for people) and ``test_split.csv`` (the
test galaxies its figures are measured on).  ``scripts/package_model.py`` writes
such a folder; nothing else does.

Wherever galpipe takes a model folder (``predict``, ``evaluate``, ``summary``) it
passes the reference through :func:`resolve_model`: an existing folder wins, else a
shipped model's name, else an error naming the reference and the shipped names.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

from galpipe.errors import ModelError

__all__ = ["MODEL_FILE", "SHIPPED_FILES", "available_models", "describe_available", "is_model_name", "resolve_model"]

#: The file whose presence makes a subfolder a shipped model.
MODEL_FILE = "model.json"
#: Every file a shipped model folder holds (``scripts/package_model.py`` writes them all).
SHIPPED_FILES = ("model.json", "weights.npz", "card.json", "MODEL_CARD.md", "test_split.csv")
#: A shipped model's name: one plain path component (never ``..``, never a separator).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Folders that importlib.resources had to extract (a zipped install) stay until exit.
_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)
_resolved: dict[str, Path] = {}


def _shipped_root() -> Traversable:
    """The folder of shipped models: this package's own resources (replaced in tests)."""
    return files(__name__)


def is_model_name(text: str) -> bool:
    """Whether ``text`` can name a shipped model (one plain path component, no ``..``)."""
    return bool(_NAME.fullmatch(text)) and ".." not in text


def _entry(name: str) -> Traversable | None:
    """The shipped model folder ``name``, or None when there is none."""
    if not is_model_name(name):
        return None
    entry = _shipped_root() / name
    return entry if entry.is_dir() and (entry / MODEL_FILE).is_file() else None


def available_models() -> list[str]:
    """Names of the models shipped with this install of galpipe, sorted.

    Returns
    -------
    list of str
        Each a subfolder of ``galpipe/models`` that holds a ``model.json``; empty
        when none is shipped.
    """
    root = _shipped_root()
    return sorted(e.name for e in root.iterdir() if _entry(e.name) is not None)


def describe_available() -> str:
    """The shipped names for messages and help texts: ``"gz1"``, or a sentence saying there is none."""
    names = available_models()
    return ", ".join(names) if names else "none is shipped with this install"


def resolve_model(ref: str | os.PathLike[str]) -> Path:
    """The model folder that ``ref`` names: an existing folder, else a shipped model.

    Parameters
    ----------
    ref : str or path-like
        A model folder (``model.json`` + ``weights.npz``), or the name of a shipped
        model (:func:`available_models`, e.g. ``"gz1"``).  An existing folder of that
        name in the current directory wins over the shipped model.

    Returns
    -------
    pathlib.Path
        ``ref`` itself when it is a folder; else the shipped model's folder on disk
        (extracted by :func:`importlib.resources.as_file` when galpipe is installed
        zipped; the extraction lasts until the interpreter exits).

    Raises
    ------
    ModelError
        ``ref`` is neither a folder nor a shipped name; the message names ``ref``
        and lists the shipped names.
    """
    path = Path(ref)
    if path.is_dir():
        return path
    name = os.fspath(ref)
    entry = _entry(name)
    if entry is not None:
        key = str(entry)
        if key not in _resolved:
            _resolved[key] = Path(_EXTRACTED.enter_context(as_file(entry)))
        return _resolved[key]
    what = "is a file, not a model folder" if path.is_file() else \
        f"{path / MODEL_FILE}: not found (not a saved galpipe model directory)"
    raise ModelError(f"model {name!r}: {what}, and {name!r} is not the name of a shipped model "
                     f"(shipped models: {describe_available()}); give a folder holding model.json "
                     "and weights.npz, or a shipped name")
