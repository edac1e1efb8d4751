"""Stage ``train``: one experiment's network trained on the train split, chosen on validation.

An experiment (one entry of ``experiments:`` in the config, resolved by
:func:`galpipe.config.resolve_experiments`) is an architecture — the list of
hidden layers; the output layer, one unit per class, is appended here — plus
training settings and the kind of input: the image pixels or, for the
non-image baseline, catalogue features (:mod:`galpipe.features`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from galpipe import __version__
from galpipe.config import fingerprint
from galpipe.errors import ConfigError
from galpipe.io.atomic import atomic_write_text, safe_filename
from galpipe.io.parquet import read_metadata
from galpipe.nn.training import TrainConfig
from galpipe.provenance import provenance
from galpipe.settings import Config
from galpipe.stages import PATHS, as_config

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]


def preprocess_params(cfg: Config) -> dict[str, Any]:
    """What predict must redo on a new image, stored with the model: source, centre crop, stamp size."""
    from galpipe.sources import get_source

    return {"source": cfg.source, "crop_fraction": get_source(cfg).crop_fraction, "cutout_size": cfg.cutout_size}


def full_architecture(hidden: Sequence[Any], n_classes: int) -> list[Any]:
    """Hidden layers + the output layer (dense, ``n_classes`` units, logits)."""
    return [*hidden, {"type": "dense", "units": int(n_classes), "init": "glorot"}]


def _feature_datasets(train: PathLike, val: PathLike) -> tuple[Any, Any, dict[str, Any]]:
    from galpipe.features import feature_matrix
    from galpipe.nn.data import ArrayDataset, ParquetImageDataset

    xt, names = feature_matrix(train)
    xv, _ = feature_matrix(val)
    mean, std = xt.mean(axis=0), xt.std(axis=0) + 1e-6
    dt, dv = ParquetImageDataset(train), ParquetImageDataset(val)
    tr = ArrayDataset((xt - mean) / std, dt.labels(), classes=dt.classes, objids=dt.objids())
    va = ArrayDataset((xv - mean) / std, dv.labels(), classes=dv.classes, objids=dv.objids())
    return tr, va, {"names": names, "mean": mean.tolist(), "std": std.tolist()}


def load_inputs(model_meta: Mapping[str, Any], path: PathLike) -> Any:
    """The dataset a trained model consumes for split file ``path`` (images or features)."""
    from galpipe.features import feature_matrix
    from galpipe.nn.data import ArrayDataset, ParquetImageDataset

    ds = ParquetImageDataset(path)
    if model_meta.get("inputs") != "features":
        return ds
    x, names = feature_matrix(path)
    f = model_meta["features"]
    if names != f["names"]:
        raise ConfigError(f"{path}: features {names} differ from the model's {f['names']}")
    x = (x - np.asarray(f["mean"], np.float32)) / np.asarray(f["std"], np.float32)
    return ArrayDataset(x.astype(np.float32), ds.labels(), classes=ds.classes, objids=ds.objids())


def run(exp: Mapping[str, Any], train: PathLike, validation: PathLike, model_json: PathLike,
        *, name: str = "experiment", checkpoint_root: PathLike = PATHS["checkpoints"],
                     progress: bool = True) -> dict[str, Any]:
    """Train one experiment and write ``model.json``, ``weights.npz``, ``history.csv``, ``train_info.json``.

    Training checkpoints every epoch under ``checkpoint_root/<name>-<hash>``
    (keyed by everything that determines the result), so a killed job resumes
    where it stopped; the checkpoint is removed once the model is saved.
    """
    from galpipe.nn.data import ParquetImageDataset
    from galpipe.nn.model import build_model
    from galpipe.nn.persist import save_model
    from galpipe.nn.training import fit

    safe_filename(name, what="experiment name")  # part of the checkpoint path
    out_dir = Path(model_json).parent
    meta = read_metadata(train)
    classes = list(meta["classes"])
    tcfg = TrainConfig.from_dict({**exp["training"], "seed": int(exp.get("seed", 0))})
    feature_info = None
    if exp.get("inputs") == "features":
        train_ds, val_ds, feature_info = _feature_datasets(train, validation)
        input_shape: tuple[int, ...] = (len(feature_info["names"]),)
    else:
        train_ds, val_ds = ParquetImageDataset(train), ParquetImageDataset(validation)
        input_shape = tuple(meta["image_shape"])
    arch = full_architecture(exp["architecture"], len(classes))
    model = build_model(arch, input_shape, seed=int(exp.get("seed", 0)))
    data_key = [pq.ParquetFile(train).metadata.num_rows, meta.get("split"), meta.get("normalisation")]
    ckpt = Path(checkpoint_root) / f"{name}-{fingerprint(arch, tcfg.to_dict(), input_shape, data_key)}"
    t0 = time.perf_counter()
    history = fit(model, train_ds, val_ds, tcfg, checkpoint_dir=ckpt, progress=progress, log=log.info)
    seconds = time.perf_counter() - t0
    metadata = {
        "experiment": name, "description": exp.get("description", ""), "preset": exp.get("preset"),
        "inputs": exp.get("inputs", "image"), "classes": classes, "bands": meta.get("bands", []),
        "image_shape": meta["image_shape"], "normalisation": meta.get("normalisation", {}),
        "features": feature_info, "training": tcfg.to_dict(), "galpipe_version": __version__,
        "preprocess": dict(exp.get("preprocess") or {}),
        "provenance": provenance("train", exp, [train, validation]),
    }
    save_model(model, out_dir, metadata=metadata)
    history.to_csv(out_dir / "history.csv")
    hist = history.to_dict()
    val_key = "val_balanced_acc"
    best_epoch = int(np.nanargmax(hist[val_key])) + 1 if hist.get(val_key) else len(hist.get("epoch", []))
    info = {"experiment": name, "train_seconds": round(seconds, 3), "n_params": int(model.n_params()),
            "epochs_run": len(hist.get("epoch", [])), "best_epoch": best_epoch,
            "input_shape": list(input_shape), "description": exp.get("description", ""),
            "inputs": exp.get("inputs", "image")}
    atomic_write_text(out_dir / "train_info.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("trained %s: %s", name, info)
    return info


def check_architectures(cfg: Config | Mapping[str, Any], experiments: Mapping[str, Mapping[str, Any]]) -> None:
    """Check every image experiment's network on the configured input shape, before any job.

    Run by the Snakefile and ``galpipe validate-config``.  First, without allocating
    anything (:func:`galpipe.nn.model.estimate_model`), the ``limits:`` caps: layers after
    ``repeat`` expansion (``max_layers``, counted before expanding), trainable parameters
    (``max_parameters``) and the activation memory of one training batch
    (``max_activation_mb``, float32); then the network is built, so an architecture whose
    shapes do not fit together fails at once, naming the experiment and the layer.

    Raises
    ------
    ConfigError
        A cap exceeded: naming ``experiments.<name>.architecture``, the layer, the estimate
        and the cap.
    ModelError
        Shapes that do not fit, an unknown layer type or argument.
    """
    from galpipe.errors import ModelError
    from galpipe.nn.model import build_model, count_layers, estimate_model
    from galpipe.sources import get_source

    c = as_config(cfg)
    limits = c.limits
    bands = get_source(c).bands
    n_bands = len(bands) if bands is not None else 3  # a folder of images: colour files are the norm
    shape = (c.cutout_size, c.cutout_size, n_bands)
    for name, exp in experiments.items():
        if exp.get("inputs", "image") != "image":
            continue
        where = f"config key 'experiments.{name}.architecture'"
        arch = full_architecture(exp["architecture"], 2)
        n_layers = count_layers(arch)
        if n_layers > int(limits["max_layers"]):
            raise ConfigError(f"{where}: expands to {n_layers:,} layers (repeat entries included, output layer "
                              f"added), over limits.max_layers = {int(limits['max_layers']):,}")
        try:
            sizes = estimate_model(arch, shape, max_layers=int(limits["max_layers"]))
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from exc
        batch_size = int({**c.training, **(exp.get("training") or {})}["batch_size"])
        _check_limits(where, sizes, batch_size, limits)
        try:
            build_model(arch, shape, max_layers=int(limits["max_layers"]))
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from exc


def _check_limits(where: str, sizes: Sequence[Any], batch_size: int, limits: Mapping[str, Any]) -> None:
    """Refuse a network over ``limits.max_parameters`` or ``limits.max_activation_mb``, naming the
    layer at which the running total first passes the cap (``sizes``: :func:`estimate_model`)."""
    cap_p = int(limits["max_parameters"])
    cap_mb = float(limits["max_activation_mb"])
    total_p = 0
    total_mb = 0.0
    for s in sizes:
        total_p += s.n_params
        if total_p > cap_p:
            raise ConfigError(
                f"{where}: layer {s.index} ({s.type_name}) has {s.n_params:,} parameters, bringing the network to at "
                f"least {total_p:,} (estimated without building it), more than limits.max_parameters = {cap_p:,}"
            )
        layer_mb = s.activations * batch_size * 4 / 2**20
        total_mb += layer_mb
        if total_mb > cap_mb:
            raise ConfigError(
                f"{where}: layer {s.index} ({s.type_name}), output {tuple(s.output_shape)}, needs {layer_mb:,.1f} MiB "
                f"of activations for a batch of {batch_size} (training.batch_size), bringing the network to at least "
                f"{total_mb:,.1f} MiB (float32, estimated without building it), more than "
                f"limits.max_activation_mb = {cap_mb:g}"
            )
