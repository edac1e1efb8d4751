"""Apply a trained model: classify files, folders or catalogues; score an external labelled set.

``galpipe predict --model DIR INPUT`` where INPUT is a FITS/JPEG/PNG file, a
folder of them, or a catalogue (Parquet/CSV with ``objid``, ``ra``, ``dec``)
whose cutouts are fetched through the configured source.  Images go through
exactly the preprocessing the model was trained with (crop, resize, the
normalisation stored in ``model.json``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from astropy.io import fits

from galpipe.errors import ConfigError, DataError
from galpipe.io.parquet import write_arrow, write_table
from galpipe.sources.images import IMAGE_SUFFIXES, read_labels
from galpipe.stages import CUTOUT_CACHE_ROOT
from galpipe.stages.normalise import image_column, normalise_array

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]
CATALOGUE_SUFFIXES = {".parquet", ".csv"}
FITS_SUFFIXES = {".fits", ".fit", ".fts"}


def preprocess_image(path: PathLike, meta: Mapping[str, Any], crop_fraction: float | None = None) -> np.ndarray:
    """One image file -> the ``(H, W, C)`` float32 array the model sees, made by the stage code.

    The model's source (``model.json`` ``preprocess.source``) turns the file into
    cutout pixels exactly as its cutouts stage does
    (:meth:`galpipe.sources.base.Source.load_external`), then the normalise
    stage's :func:`~galpipe.stages.normalise.normalise_array` applies the
    normalisation stored with the model.
    """
    from galpipe.settings import NormaliseConfig
    from galpipe.sources import source_class

    h, w, c = meta["image_shape"]
    prep = meta.get("preprocess", {})
    crop = crop_fraction if crop_fraction is not None else float(prep.get("crop_fraction", 1.0))
    ext = source_class(prep.get("source", "images")).load_external(path, size=h, crop_fraction=crop)
    img, _ = normalise_array(ext.data, ext.bunit, NormaliseConfig.from_dict(meta["normalisation"], "normalisation"))
    if img.shape != (h, w, c):
        raise DataError(f"image {path}: {img.shape[2]} channel(s), the model expects {c}")
    return img


def _preprocess(paths: Iterable[PathLike], meta: Mapping[str, Any], crop_fraction: float | None
                ) -> tuple[np.ndarray, list[str], list[str]]:
    """:func:`preprocess_image` of every path -> ``(N, H, W, C)``, kept paths, failures."""
    h, w, c = meta["image_shape"]
    imgs, kept, failed = [], [], []
    for p in paths:
        try:
            imgs.append(preprocess_image(p, meta, crop_fraction))
            kept.append(str(p))
        except DataError as exc:
            log.warning("skipped: %s", exc)
            failed.append(f"{p}: {exc}")
    arr = np.stack(imgs) if imgs else np.zeros((0, h, w, c), np.float32)
    return arr, kept, failed


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _catalogue_cutouts(cat_path: Path, config: PathLike | None, workdir: Path,
                       cache_root: PathLike = CUTOUT_CACHE_ROOT) -> list[str]:
    """Fetch the cutouts of a catalogue through the configured source (the cutouts stage); return their paths.

    Cutouts are cached under ``cache_root/<source>-<settings hash>`` (the pipeline's
    own cache layout, so a catalogue already fetched by the pipeline is not fetched again).
    """
    from galpipe.catalogue import write_catalogue
    from galpipe.config import load_settings
    from galpipe.sources import get_source
    from galpipe.stages import cutout_cache_dir, stage_params
    from galpipe.stages.cutouts import run as cutouts_run

    if config is None:
        raise ConfigError("predicting a catalogue needs --config: its source fetches the cutouts")
    cfg = load_settings(_read_yaml(config))
    df = pd.read_csv(cat_path) if cat_path.suffix.lower() == ".csv" else pd.read_parquet(cat_path)
    needed = get_source(cfg).catalogue_columns
    missing = [c for c in dict.fromkeys(("objid", "ra", "dec", *needed)) if c not in df.columns]
    if missing:
        raise DataError(f"catalogue {cat_path}: missing column(s) {missing}; the {cfg.source} source reads "
                        f"{list(needed)} to make a cutout (rows of the pipeline's catalogue.parquet have them)")
    if "label" not in df.columns:
        df["label"] = "unknown"  # the class is what predict finds out
    shard = workdir / "catalogue.parquet"
    write_catalogue(df, shard, {"source": "predict", "input": str(cat_path)})
    try:
        man = cutouts_run(stage_params(cfg, "cutouts"), shard, workdir / "manifest.parquet",
                          cutout_cache_dir(cfg, root=cache_root))
    except DataError as exc:  # its full manifest sat in predict's temporary folder: name the input instead
        raise DataError(f"catalogue {cat_path}: {str(exc).split('; every galaxy and reason:')[0]}") from exc
    return man.loc[man["status"] == "ok", "path"].tolist()


def _read_yaml(path: PathLike) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc


def predict_input(model_dir: PathLike, input_path: PathLike, output: PathLike, *, tta: bool = False,
                  mc_dropout: int = 0, config: PathLike | None = None, crop_fraction: float | None = None,
                  seed: int = 0, cache_dir: PathLike = CUTOUT_CACHE_ROOT) -> pd.DataFrame:
    """Classify a file, a folder or a catalogue and write probabilities to CSV or Parquet.

    A catalogue's cutouts are fetched through ``config``'s source into
    ``cache_dir`` (relative paths are relative to the current directory; the
    default is the pipeline's own cutout cache when run from the project root).

    Returns
    -------
    pandas.DataFrame
        One row per image: ``source_path``, ``objid`` (from the FITS header or
        the file name when it is an integer), ``p_<class>``, ``pred``,
        ``entropy`` and, with MC dropout, ``std_<class>``.
    """
    from galpipe.nn.inference import predict_proba
    from galpipe.nn.persist import load_model

    model, meta = load_model(model_dir, pipeline=True)  # a model folder is untrusted: checked in full
    if meta.get("inputs") == "features":
        raise ConfigError(f"model {model_dir} is a catalogue-feature baseline; predict needs an image model")
    src = Path(input_path)
    if not src.exists():
        raise DataError(f"predict input {src}: not found")
    if src.is_dir():
        files = [str(p) for p in _image_files(src)]
    elif src.suffix.lower() in CATALOGUE_SUFFIXES:
        with tempfile.TemporaryDirectory() as tmp:
            files = _catalogue_cutouts(src, config, Path(tmp), cache_dir)
            x, kept, failed = _preprocess(files, meta, 1.0)
        return _write_predictions(model, meta, x, kept, failed, output, tta, mc_dropout, seed, predict_proba)
    else:
        files = [str(src)]
    if not files:
        raise DataError(f"predict input {src}: no JPEG/PNG/FITS files found")
    x, kept, failed = _preprocess(files, meta, crop_fraction)
    return _write_predictions(model, meta, x, kept, failed, output, tta, mc_dropout, seed, predict_proba)


def _objid_of(path: str) -> int | None:
    """The object id of an input: the FITS header's ``OBJID``, else the file name when it is an integer."""
    p = Path(path)
    if p.suffix.lower() in FITS_SUFFIXES:
        with contextlib.suppress(OSError, KeyError, ValueError, TypeError):
            value = fits.getval(p, "OBJID", ext=0)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    if re.fullmatch(r"-?\d{1,19}", p.stem):
        value = int(p.stem)
        return value if -(2**63) <= value < 2**63 else None
    return None


def _write_predictions(model: Any, meta: Mapping[str, Any], x: np.ndarray, kept: list[str], failed: list[str],
                       output: PathLike, tta: bool, mc_dropout: int, seed: int, predict_proba: Any) -> pd.DataFrame:
    if len(x) == 0:
        raise DataError("no image could be read: " + ("; ".join(failed[:3]) or "no cutout could be made"))
    classes = list(meta["classes"])
    res = predict_proba(model, x, tta=tta, mc_dropout=mc_dropout, seed=seed)
    df = pd.DataFrame({"source_path": kept, "objid": pd.array([_objid_of(p) for p in kept], dtype="Int64")})
    for k, c in enumerate(classes):
        df[f"p_{c}"] = res.proba[:, k]
    df["pred"] = [classes[i] for i in res.proba.argmax(axis=1)]
    df["entropy"] = res.entropy
    if mc_dropout:
        for k, c in enumerate(classes):
            df[f"std_{c}"] = res.std[:, k]
    out = Path(output)
    if out.suffix.lower() == ".parquet":
        write_table(df, out, {"model": meta.get("experiment"), "failed": failed})
    else:
        from galpipe.io.atomic import atomic_write_text

        atomic_write_text(out, df.to_csv(index=False, float_format="%.6g"))
    return df


def evaluate_external(params: Mapping[str, Any], model_dir: PathLike, images_dir: PathLike, labels_csv: PathLike,
                      out_dir: PathLike, *, id_column: str = "objid", label_column: str = "label",
                      path_column: str = "image", label_map: Mapping[str, str | None] | None = None,
                      crop_fraction: float | None = None) -> dict[str, Any]:
    """Score a trained model on an external labelled image set with the pipeline's metrics and figures.

    The images are preprocessed as in training and written to
    ``out_dir/external.parquet`` in the split format; then
    :func:`galpipe.stages.evaluate.run` runs on it.
    """
    from galpipe.nn.persist import load_model
    from galpipe.stages.evaluate import run as evaluate_experiment

    _, meta = load_model(model_dir, pipeline=True)
    classes = list(meta["classes"])
    labels = read_labels({"directory": str(images_dir), "labels_csv": str(labels_csv), "id_column": id_column,
                          "label_column": label_column, "path_column": path_column, "label_map": label_map or {}})
    unknown = sorted(set(labels["label"]) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} in {labels_csv} are not classes of the model {classes}; "
                        "use --label-map RAW=CLASS (or RAW= to drop)")
    x, kept, failed = _preprocess(labels["image_path"], meta, crop_fraction)
    if not len(x):
        raise DataError("no image could be read: " + "; ".join(failed[:3]))
    rows = labels.set_index("image_path").loc[kept].reset_index()
    table = pa.table({"objid": pa.array(rows["objid"].to_numpy(np.int64)), "label": pa.array(rows["label"].tolist()),
                      "label_index": pa.array([classes.index(c) for c in rows["label"]], pa.int32())})
    table = table.append_column("image", image_column(x))
    out = Path(out_dir)
    ext = out / "external.parquet"
    write_arrow(table, ext, {"image_shape": list(meta["image_shape"]), "bands": meta.get("bands", []),
                             "classes": classes, "normalisation": meta.get("normalisation", {}), "failed": failed})
    return evaluate_experiment(params, Path(model_dir) / "model.json", ext, out / "metrics.json",
                               out / "predictions.parquet", out / "figures")
