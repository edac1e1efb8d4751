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

Both files are written atomically (temporary file + rename).  A model folder is
untrusted input: loading checks every key of ``model.json`` (types, ranges, and a
pipeline model's metadata against the network) and every array of ``weights.npz``
(archive integrity, names, shapes, dtypes, finite values) and raises
:class:`~galpipe.errors.ModelError` naming the file and the key, so saving, loading
and predicting is bit-identical and a crafted folder fails with one clear line.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

import galpipe
from galpipe.errors import ConfigError, DataError, ModelError
from galpipe.io.atomic import atomic_path, atomic_write_text, safe_filename
from galpipe.nn.arrays import assign_arrays, check_arrays, npz_headers, read_npz
from galpipe.nn.model import Sequential, build_model, estimate_model

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
        JSON-serialisable extra information stored under ``"metadata"``.  Metadata with any
        of :data:`PIPELINE_KEYS` is a pipeline model's and must pass
        :func:`check_pipeline_metadata` to load again.

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


#: Bounds on what a saved model may declare: a model folder is untrusted input.
MAX_MODEL_JSON_BYTES = 64 * 2**20
MAX_IMAGE_SIDE = 4096
MAX_CHANNELS = 16
MAX_FEATURES = 100_000
MAX_CLASSES = 10_000
MAX_INPUT_VALUES = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * MAX_CHANNELS
#: Most parameters a loaded network may have (estimated from the architecture before building it).
MAX_PARAMETERS = 2**28
#: What the pipeline metadata's ``inputs`` may say.
INPUTS = ("image", "features")
#: Keys every galpipe pipeline model's metadata has (written by :mod:`galpipe.stages.train`).
PIPELINE_KEYS = ("inputs", "classes", "image_shape", "normalisation", "preprocess")


def _bad(path: Path, key: str, problem: str) -> ModelError:
    if len(problem) > 400:
        problem = problem[:396] + " ..."
    return ModelError(f"model {path}: key {key!r}: {problem}")


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened: a crafted file's values end up in one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _positive_ints(path: Path, key: str, value: Any, max_dims: int = 3) -> list[int]:
    if (not isinstance(value, list) or not 1 <= len(value) <= max_dims
            or not all(_is_int(v) and v >= 1 for v in value)):
        raise _bad(path, key, f"{_show(value)} is not a list of 1 to {max_dims} positive integers")
    return value


def read_model_info(directory: str | os.PathLike[str], *, pipeline: bool | None = None) -> dict[str, Any]:
    """Parse and validate ``model.json`` of a saved model (the whole document).

    A model folder is untrusted input: every key is checked for presence, type and
    range before anything uses it (numbers must be finite; shapes positive and
    bounded by :data:`MAX_IMAGE_SIDE`, :data:`MAX_CHANNELS`, :data:`MAX_INPUT_VALUES`).

    Parameters
    ----------
    directory : path-like
        The model folder.
    pipeline : bool or None
        Check ``metadata`` as a galpipe pipeline model's (:func:`check_pipeline_metadata`):
        always (True: what ``galpipe predict`` and ``evaluate`` need), never (False), or when
        it has any of :data:`PIPELINE_KEYS` (None, the default: a network saved by library
        code with other metadata, or none, loads as it is).

    Raises
    ------
    ModelError
        Missing or malformed file, naming the file and the key at fault, e.g.
        ``"model /x/model.json: key 'preprocess.crop_fraction': -3 is not in (0, 1]"``.
    """
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise ModelError(f"{path}: not found (not a saved galpipe model directory)")
    try:
        if path.stat().st_size > MAX_MODEL_JSON_BYTES:
            raise ModelError(f"model {path}: larger than {MAX_MODEL_JSON_BYTES} bytes")
        doc = json.loads(path.read_text(encoding="utf-8"), parse_float=_finite_float,
                         parse_constant=_no_constant)
    except ModelError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"model {path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(path, "format", f"is not {_show(FORMAT)}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise _bad(path, "format_version",
                   f"{_show(doc.get('format_version'))} is not supported (expected {FORMAT_VERSION})")
    for key, kind in (("architecture", list), ("input_shape", list), ("output_shape", list),
                      ("dtype", str), ("metadata", dict)):
        if key not in doc:
            raise _bad(path, key, "missing")
        if not isinstance(doc[key], kind):
            raise _bad(path, key, f"{_show(doc[key])} is not a {kind.__name__}")
    if not doc["architecture"]:
        raise _bad(path, "architecture", "is empty")
    shape = _positive_ints(path, "input_shape", doc["input_shape"])
    if math.prod(shape) > MAX_INPUT_VALUES:
        raise _bad(path, "input_shape", f"{shape} has more than {MAX_INPUT_VALUES} values")
    _positive_ints(path, "output_shape", doc["output_shape"])
    if doc["dtype"] not in ("float32", "float64"):
        raise _bad(path, "dtype", f"{_show(doc['dtype'])} is not 'float32' or 'float64'")
    if "n_params" in doc and not (_is_int(doc["n_params"]) and doc["n_params"] >= 0):
        raise _bad(path, "n_params", f"{_show(doc['n_params'])} is not a non-negative integer")
    if pipeline or (pipeline is None and any(k in doc["metadata"] for k in PIPELINE_KEYS)):
        check_pipeline_metadata(doc, path)
    return doc


def check_pipeline_metadata(doc: dict[str, Any], path: Path) -> None:
    """Check ``doc["metadata"]`` as what :mod:`galpipe.stages.train` writes, against the network.

    ``classes``: a non-empty list of unique safe names (:func:`galpipe.io.atomic.safe_filename`,
    they become file names), one per output unit; ``inputs``: ``image`` or ``features``;
    ``image_shape``: ``[side, side, channels]`` within bounds, the network's input for an
    image model; ``normalisation``: the ``normalise:`` section, in the schema's ranges;
    ``preprocess``: the source, ``crop_fraction`` in (0, 1] and ``cutout_size``;
    ``features``: names, means and positive standard deviations, one per input of a
    feature model.  Other keys (``experiment``, ``bands``, ...) are checked for type.

    Raises
    ------
    ModelError
        Naming ``path`` and the key, e.g. ``"model /x/model.json: key 'classes': ..."``.
    """
    meta = doc["metadata"]
    for key in PIPELINE_KEYS:
        if key not in meta:
            raise _bad(path, key, "missing (a galpipe model's metadata has " + ", ".join(PIPELINE_KEYS) + ")")
    inputs = meta["inputs"]
    if inputs not in INPUTS:
        raise _bad(path, "inputs", f"{_show(inputs)} is not one of {list(INPUTS)}")
    _check_classes(path, meta["classes"], doc["output_shape"])
    h, w, c = _check_image_shape(path, meta["image_shape"])
    if inputs == "image" and [h, w, c] != doc["input_shape"]:
        raise _bad(path, "image_shape", f"{[h, w, c]} is not the network's input shape {doc['input_shape']}")
    for key in ("experiment", "description", "preset", "galpipe_version"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _bad(path, key, f"{_show(meta[key])} is not a string")
    bands = meta.get("bands", [])
    if not isinstance(bands, list) or not all(isinstance(b, str) and b.isprintable() for b in bands):
        raise _bad(path, "bands", f"{_show(bands)} is not a list of band names")
    if bands and len(bands) != c:
        raise _bad(path, "bands", f"{len(bands)} band(s) {_show(bands)} for {c} image channel(s)")
    if meta.get("training") is not None and not isinstance(meta["training"], dict):
        raise _bad(path, "training", f"{_show(meta['training'])} is not a mapping")
    _check_normalisation(path, meta["normalisation"])
    _check_preprocess(path, meta["preprocess"], inputs)
    if inputs == "features":
        _check_features(path, meta.get("features"), doc["input_shape"])
    elif meta.get("features") is not None:
        raise _bad(path, "features", "set, but 'inputs' is 'image'")


def _check_classes(path: Path, classes: Any, output_shape: list[int]) -> None:
    if not isinstance(classes, list) or not classes:
        raise _bad(path, "classes", f"{_show(classes)} is not a non-empty list of class names")
    if len(classes) > MAX_CLASSES:
        raise _bad(path, "classes", f"{len(classes)} names, more than {MAX_CLASSES}")
    for i, name in enumerate(classes):
        if not isinstance(name, str):
            raise _bad(path, f"classes[{i}]", f"{_show(name)} is not a string")
        try:
            safe_filename(name, what="class name")
        except DataError as exc:
            raise _bad(path, f"classes[{i}]", f"class name {_show(name)} is not usable as a file name (letters, "
                       "digits, '_', '-', '.', no '..', at most 128 characters)") from exc
    dup = sorted({n for n in classes if classes.count(n) > 1})
    if dup:
        raise _bad(path, "classes", f"names {_show(dup)} appear more than once")
    if output_shape != [len(classes)]:
        raise _bad(path, "classes", f"{len(classes)} names, but the network's output shape is {output_shape}")


def _check_image_shape(path: Path, shape: Any) -> tuple[int, int, int]:
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v) and v >= 1 for v in shape):
        raise _bad(path, "image_shape", f"{_show(shape)} is not three positive integers [height, width, channels]")
    h, w, c = shape
    if h > MAX_IMAGE_SIDE or w > MAX_IMAGE_SIDE or c > MAX_CHANNELS:
        raise _bad(path, "image_shape", f"{shape} exceeds {MAX_IMAGE_SIDE} pixels a side or {MAX_CHANNELS} channels")
    return h, w, c


def _check_normalisation(path: Path, norm: Any) -> None:
    import jsonschema

    from galpipe.config import load_schema
    from galpipe.settings import NormaliseConfig

    if not isinstance(norm, dict):
        raise _bad(path, "normalisation", f"{_show(norm)} is not a mapping")
    fields = [f.name for f in dataclasses.fields(NormaliseConfig)]
    missing, unknown = [k for k in fields if k not in norm], sorted(set(norm) - set(fields))
    if missing or unknown:
        raise _bad(path, "normalisation", f"missing key(s) {missing}, unknown key(s) {unknown} (expected {fields})")
    try:
        NormaliseConfig.from_dict(norm, "normalisation")
    except ConfigError as exc:
        raise _bad(path, "normalisation", str(exc)) from exc
    schema = load_schema()["properties"]["normalise"]
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(norm),
                    key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        err = errors[0]
        key = ".".join(["normalisation", *(str(p) for p in err.absolute_path)])
        raise _bad(path, key, err.message)
    lo, hi = norm["clip"]
    if not lo < hi:
        raise _bad(path, "normalisation.clip", f"[{lo}, {hi}] must be increasing")


def _check_preprocess(path: Path, prep: Any, inputs: str) -> None:
    from galpipe.sources import source_names

    if not isinstance(prep, dict):
        raise _bad(path, "preprocess", f"{_show(prep)} is not a mapping")
    required = ("source", "crop_fraction", "cutout_size") if inputs == "image" else ()
    for key in required:
        if key not in prep:
            raise _bad(path, f"preprocess.{key}", "missing")
    if "source" in prep and prep["source"] not in source_names():
        raise _bad(path, "preprocess.source",
                   f"{_show(prep['source'])} is not a known source ({', '.join(source_names())})")
    crop = prep.get("crop_fraction", 1.0)
    if not (_is_number(crop) and 0 < crop <= 1):
        raise _bad(path, "preprocess.crop_fraction", f"{_show(crop)} is not in (0, 1]")
    size = prep.get("cutout_size", 1)
    if not (_is_int(size) and 1 <= size <= MAX_IMAGE_SIDE):
        raise _bad(path, "preprocess.cutout_size", f"{_show(size)} is not an integer in [1, {MAX_IMAGE_SIDE}]")


def _check_features(path: Path, feats: Any, input_shape: list[int]) -> None:
    if not isinstance(feats, dict):
        raise _bad(path, "features", f"{_show(feats)} is not a mapping with names, mean and std")
    names = feats.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _bad(path, "features.names", f"{_show(names)} is not a non-empty list of column names")
    if len(set(names)) != len(names):
        raise _bad(path, "features.names", "names appear more than once")
    if len(names) > MAX_FEATURES or input_shape != [len(names)]:
        raise _bad(path, "features.names", f"{len(names)} names for the network's input shape {input_shape}")
    for key in ("mean", "std"):
        values = feats.get(key)
        if not isinstance(values, list) or len(values) != len(names) or not all(_is_number(v) for v in values):
            raise _bad(path, f"features.{key}", f"is not a list of {len(names)} finite numbers")
    if not all(v > 0 for v in feats["std"]):
        raise _bad(path, "features.std", "has a value <= 0")


def load_model(directory: str | os.PathLike[str], *, pipeline: bool | None = None
               ) -> tuple[Sequential, dict[str, Any]]:
    """Rebuild a saved model and load its weights, checking everything first.

    ``model.json`` is checked by :func:`read_model_info` (``pipeline`` as there);
    the rebuilt network must have the declared input and output shapes and
    parameter count; ``weights.npz`` must be a sound archive holding exactly the
    network's arrays (names, shapes and dtypes, read from the headers before any
    data is loaded), every value finite.

    Returns
    -------
    (Sequential, dict)
        The model and the ``metadata`` dict passed to :func:`save_model`.

    Raises
    ------
    ModelError
        Missing or damaged files, an architecture that does not build, or weights whose
        keys or shapes do not match (the message lists missing and unexpected keys and
        every shape mismatch), or that hold NaN or infinite values (naming the first array).
    """
    directory = Path(directory)
    doc = read_model_info(directory, pipeline=pipeline)
    path = directory / MODEL_JSON
    try:
        n_params = sum(e.n_params for e in estimate_model(doc["architecture"], tuple(doc["input_shape"])))
        if n_params > MAX_PARAMETERS:  # refused before anything is allocated
            raise ModelError(f"{n_params} parameters, more than {MAX_PARAMETERS}")
        model = build_model(doc["architecture"], tuple(doc["input_shape"]), seed=0, dtype=np.dtype(doc["dtype"]))
    except ModelError as exc:
        raise _bad(path, "architecture", f"does not build: {exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
            MemoryError) as exc:
        raise _bad(path, "architecture", f"does not build: {type(exc).__name__}: {exc}") from exc
    if list(model.output_shape or ()) != doc["output_shape"]:
        raise _bad(path, "output_shape",
                   f"{doc['output_shape']} is not the architecture's output shape {list(model.output_shape or ())}")
    if "n_params" in doc and doc["n_params"] != model.n_params():
        raise _bad(path, "n_params", f"{doc['n_params']} is not the architecture's {model.n_params()}")
    wpath = directory / WEIGHTS_NPZ
    if not wpath.is_file():
        raise ModelError(f"model {wpath}: not found")
    where = f"model {wpath}"
    live = _weight_arrays(model)
    check_arrays(npz_headers(wpath, where=where), live, where=where)  # before loading any data
    saved = read_npz(wpath, where=where)
    for name in live:
        if not np.isfinite(saved[name]).all():
            raise ModelError(f"{where}: array {_show(name)} holds NaN or infinite values")
    assign_arrays(live, saved, where=where)
    return model, doc["metadata"]
