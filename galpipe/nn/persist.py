"""Saving and loading models: ``model.json`` (architecture) + ``weights.npz`` (arrays).

Layout of a model directory:

* ``model.json``: ``{"format": "galpipe-model", "format_version": 1,
  "galpipe_version": ..., "architecture": [expanded layer specs],
  "input_shape": [...], "output_shape": [...], "dtype": "float32",
  "n_params": ..., "metadata": {...}}`` -- ``metadata`` is whatever the caller
  passes (class names, bands, normalisation, ...), JSON-serialisable.
* ``weights.npz``: one array per parameter (key ``"param:<name>"``) and per buffer
  (``"buffer:<name>"``), names as in :attr:`Sequential.params` / ``state``.  Plain arrays
  only: it loads with ``np.load(..., allow_pickle=False)``.

Both files are written atomically (temporary file + rename).  Loading checks every
key and shape, so saving, loading and predicting is bit-identical.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

import galpipe
from galpipe.errors import ModelError
from galpipe.io.atomic import atomic_path, atomic_write_text
from galpipe.nn.arrays import assign_arrays, read_npz
from galpipe.nn.model import Sequential, build_model

MODEL_JSON = "model.json"
WEIGHTS_NPZ = "weights.npz"
FORMAT = "galpipe-model"
FORMAT_VERSION = 1


def _weight_arrays(model: Sequential) -> dict[str, np.ndarray]:
    arrays = {f"param:{k}": v for k, v in model.params.items()}
    arrays.update({f"buffer:{k}": v for k, v in model.state.items()})
    return arrays


def save_model(
    model: Sequential, directory: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model.json`` and ``weights.npz`` into ``directory`` (created), atomically.

    Parameters
    ----------
    model : Sequential
        A built model.
    directory : path-like
        Destination directory.
    metadata : dict, optional
        JSON-serialisable extra information stored under ``"metadata"``.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    ModelError
        Unbuilt model or metadata that is not JSON-serialisable.
    """
    if not isinstance(model, Sequential) or not model.built:
        raise ModelError("save_model: expected a built Sequential model")
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "galpipe_version": galpipe.__version__,
        "architecture": model.spec,
        "input_shape": list(model.input_shape or ()),
        "output_shape": list(model.output_shape or ()),
        "dtype": np.dtype(model.dtype).name,
        "n_params": model.n_params(),
        "metadata": metadata if metadata is not None else {},
    }
    try:
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ModelError(f"save_model: metadata is not JSON-serialisable: {exc}") from exc
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **_weight_arrays(model))
    with atomic_path(out / WEIGHTS_NPZ) as tmp:
        tmp.write_bytes(buf.getvalue())
    atomic_write_text(out / MODEL_JSON, text)
    return out


def read_model_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate ``model.json`` of a saved model (the whole document).

    Raises
    ------
    ModelError
        Missing or malformed file, naming the file and the key at fault.
    """
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise ModelError(f"{path}: not found (not a saved galpipe model directory)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{path}: 'format' is not {FORMAT!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: format_version {doc.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    for key, kind in (("architecture", list), ("input_shape", list), ("metadata", dict)):
        if not isinstance(doc.get(key), kind):
            raise ModelError(f"{path}: key {key!r} missing or not a {kind.__name__}")
    return doc


def load_model(directory: str | os.PathLike[str]) -> tuple[Sequential, dict[str, Any]]:
    """Rebuild a saved model and load its weights.

    Returns
    -------
    (Sequential, dict)
        The model and the ``metadata`` dict passed to :func:`save_model`.

    Raises
    ------
    ModelError
        Missing files, an architecture that does not build, or weights whose keys
        or shapes do not match (the message lists missing and unexpected keys and
        every shape mismatch).
    """
    directory = Path(directory)
    doc = read_model_info(directory)
    dtype = np.dtype(doc.get("dtype", "float32"))
    if dtype not in (np.float32, np.float64):
        raise ModelError(f"{directory / MODEL_JSON}: unsupported dtype {dtype}")
    try:
        model = build_model(doc["architecture"], tuple(doc["input_shape"]), seed=0, dtype=dtype)
    except ModelError as exc:
        raise ModelError(f"{directory / MODEL_JSON}: architecture does not build: {exc}") from exc
    wpath = directory / WEIGHTS_NPZ
    if not wpath.is_file():
        raise ModelError(f"{wpath}: not found")
    assign_arrays(_weight_arrays(model), read_npz(wpath), where=str(wpath))
    return model, doc["metadata"]
