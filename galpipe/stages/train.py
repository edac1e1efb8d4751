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
import re
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
    """What predict must redo on a new image, stored with the model: source, centre crop, stamp size,
    and what the source's cutouts are (pixel unit and framing, :func:`source_contract`)."""
    from galpipe.sources import get_source

    return {"source": cfg.source, "crop_fraction": get_source(cfg).crop_fraction, "cutout_size": cfg.cutout_size,
            **source_contract(cfg)}


#: Native pixel scale of the SDSS imaging camera (arcsec/pixel): frames and simulated stamps.
SDSS_PIXEL_SCALE = 0.396
#: Channel-name sets whose meaning is known, for the contract's ``meaning``.
_KNOWN_CHANNELS = {("red", "green", "blue"): "colour image planes red, green, blue (8-bit display colours)"}
_SDSS_BANDS = ("u", "g", "r", "i", "z")


def fixed_scale_framing(arcsec_per_pixel: float, how: str) -> dict[str, Any]:
    """Framing of stamps cut at a fixed pixel scale, centred on the galaxy."""
    scale = float(arcsec_per_pixel)
    return {"kind": "pixel_scale", "arcsec_per_pixel": scale,
            "description": f"fixed {scale:g} arcsec/pixel, centred on the galaxy ({how})"}


def source_contract(cfg: Config) -> dict[str, Any]:
    """What the configured source's cutouts are: ``pixel_unit`` and ``framing``, from its settings.

    A source class may declare it itself with a property ``input_contract`` returning this
    dict; the built-in sources are described here.  ``pixel_unit`` is None when the files
    decide (the ``images`` source: ``DN`` for JPEG/PNG, the FITS ``BUNIT`` otherwise), and
    :func:`input_contract` then reads it from the training data.

    Returns
    -------
    dict
        ``pixel_unit`` (``"nanomaggy"``, ``"DN"`` or None) and ``framing``: a mapping with
        ``kind`` (``pixel_scale``: ``arcsec_per_pixel``; ``petro``: ``span_r90``, the stamp
        side in units of ``petroR90_r``; ``crop``: ``crop_fraction`` of the shorter image
        side; ``unknown``) and a human ``description``.
    """
    from galpipe.sources import get_source

    declared = getattr(get_source(cfg), "input_contract", None)
    if isinstance(declared, Mapping):
        return {"pixel_unit": declared.get("pixel_unit"), "framing": dict(declared.get("framing") or {})}
    size = int(cfg.cutout_size)
    if cfg.source == "simulated":
        scale = float(cfg.simulated.pixel_scale)
        return {"pixel_unit": "nanomaggy",
                "framing": fixed_scale_framing(scale, f"GalSim renderings, {size} x {size} pixels")}
    if cfg.source == "sdss":
        cut = cfg.sdss.cutouts
        if cut.provider != "skyserver-jpeg":
            return {"pixel_unit": "nanomaggy",
                    "framing": fixed_scale_framing(SDSS_PIXEL_SCALE, f"SDSS calibrated frames, {size} x {size} stamps")}
        if cut.jpeg_scale_mode == "fixed":
            return {"pixel_unit": "DN",
                    "framing": fixed_scale_framing(cut.jpeg_scale, f"SkyServer JPEG cutouts, {size} x {size}")}
        span = float(cut.jpeg_span_r90)
        return {"pixel_unit": "DN",
                "framing": {"kind": "petro", "span_r90": span,
                            "description": f"stamp side = {span:g} x petroR90_r, centred on the galaxy "
                                           f"(SkyServer JPEG cutouts, {size} x {size})"}}
    if cfg.source == "images":
        crop = float(cfg.images.crop_fraction)
        framing: dict[str, Any] = {"kind": "crop", "crop_fraction": crop,
                                   "description": f"centre crop of {crop:g} of the shorter image side, resized to "
                                                  f"{size} x {size} (as the training images were framed)"}
        if cfg.images.span_r90 is not None:  # the images were framed by petroR90_r: the crop's side in those units
            span = float(cfg.images.span_r90) * crop
            framing["span_r90"] = span
            framing["description"] += f"; the crop spans {span:g} x petroR90_r"
        return {"pixel_unit": None, "framing": framing}
    return {"pixel_unit": None, "framing": {"kind": "unknown", "description": f"not declared by source {cfg.source!r}"}}


def channel_meaning(channels: Sequence[str]) -> str:
    """Human meaning of a list of channel names (``"SDSS g, r, i bands"``)."""
    names = tuple(channels)
    if names in _KNOWN_CHANNELS:
        return _KNOWN_CHANNELS[names]
    if names and all(c in _SDSS_BANDS for c in names):
        return f"SDSS {', '.join(names)} bands (calibrated frames or simulated)"
    if names and all(re.fullmatch(r"band\d+", c) for c in names):
        return f"{len(names)} image plane(s) of FITS files, band names unknown"
    return f"bands {', '.join(names)}" if names else "unknown"


def input_contract(preprocess: Mapping[str, Any], bands: Sequence[str], image_shape: Sequence[int],
                   pixel_unit: str | None = None, *, derived_from: str) -> dict[str, Any]:
    """The ``input_contract`` of a model: what every image given to it must be.

    Parameters
    ----------
    preprocess : mapping
        The model's ``preprocess`` (:func:`preprocess_params`): source, crop, size, and the
        source's ``pixel_unit`` and ``framing`` when it recorded them.
    bands : sequence of str
        Channel names of the training cutouts (``n_channels`` of them; empty: unknown).
    image_shape : sequence of int
        ``(H, W, C)`` the network takes.
    pixel_unit : str, optional
        The unit of the training cutouts' pixels when known from the data (FITS ``BUNIT``);
        else the source's, else None (not checked).
    derived_from : str
        Where the facts came from (stored with the contract).

    Returns
    -------
    dict
        ``channels`` (names, length ``C``), ``meaning``, ``pixel_unit`` (``"nanomaggy"``,
        ``"DN"`` (8-bit 0-255) or None), ``pixel_values``, ``framing`` (see
        :func:`source_contract`), ``size`` ``[H, W]`` (every input is resized to it),
        ``derived_from``.
    """
    h, w, c = (int(v) for v in image_shape)
    channels = [str(b) for b in bands] if bands else [f"band{k}" for k in range(c)]
    unit = pixel_unit if pixel_unit is not None else preprocess.get("pixel_unit")
    values = ("8-bit display values 0-255 (JPEG/PNG colour images)" if unit == "DN"
              else f"linear flux in {unit} (FITS)" if unit else "unknown")
    framing = dict(preprocess.get("framing") or {})
    if not framing:
        crop = float(preprocess.get("crop_fraction", 1.0))
        framing = ({"kind": "crop", "crop_fraction": crop, "description": f"centre crop of {crop:g} of the shorter "
                    f"image side, resized to {h} x {w}"} if crop < 1.0 else
                   {"kind": "unknown", "description": "not recorded by this model"})
    return {"channels": channels, "meaning": channel_meaning(channels), "pixel_unit": unit,
            "pixel_values": values, "framing": framing, "size": [h, w], "derived_from": derived_from}


def _training_pixel_unit(preprocess: Mapping[str, Any], train: PathLike) -> tuple[str | None, str]:
    """The pixel unit of the training cutouts and where it came from.

    The split's ``bunit`` metadata when the normalise stage recorded it; else the source's
    (:func:`source_contract`); else (a folder of images: the files decide) the unit of the
    first training image, read by the source's own loader as its cutouts were made.
    """
    meta = read_metadata(train)
    if meta.get("bunit"):
        return str(meta["bunit"]), "the training cutouts' BUNIT"
    if preprocess.get("pixel_unit"):
        return str(preprocess["pixel_unit"]), f"the {preprocess.get('source')} source's settings"
    if "image_path" not in pq.read_schema(train).names:
        return None, "unknown"
    from galpipe.errors import DataError
    from galpipe.sources import source_class

    first = pq.read_table(train, columns=["image_path"]).column(0)
    if not len(first):
        return None, "unknown"
    path = str(first[0])
    try:
        ext = source_class(str(preprocess.get("source", "images"))).load_external(
            path, size=int(preprocess.get("cutout_size", 8)), crop_fraction=float(preprocess.get("crop_fraction", 1.0)))
    except (DataError, OSError) as exc:
        log.warning("train: cannot read %s to record the model's pixel unit (%s); predict will not check it",
                    path, exc)
        return None, "unknown"
    return ext.bunit, f"the training image {Path(path).name}"


def init_files(exp: Mapping[str, Any]) -> list[str]:
    """The files of the model an experiment starts from (``training.init_from``): its
    ``model.json`` and ``weights.npz``, inputs of the train job (empty without init_from)."""
    from galpipe.models import resolve_model

    ref = (exp.get("training") or {}).get("init_from")
    if not ref:
        return []
    folder = resolve_model(ref)
    return [str(folder / "model.json"), str(folder / "weights.npz")]


def init_weights(model: Any, ref: str, classes: Sequence[str]) -> dict[str, Any]:
    """Copy the weights of model ``ref`` (a shipped name or a folder) into ``model`` where they fit.

    Every parameter and buffer whose name (layer index, type, array) and shape match is
    copied; the output layer is copied only when the classes are the same, in the same
    order; everything else keeps its fresh initialisation.

    Returns
    -------
    dict
        What was done, for ``model.json``: ``model`` (the ref), ``weights_sha256``,
        ``classes`` of the source, ``copied`` and ``fresh`` array names.

    Raises
    ------
    ConfigError
        Nothing fits (a different architecture), naming ``training.init_from``.
    """
    import hashlib

    from galpipe.models import resolve_model
    from galpipe.nn.persist import WEIGHTS_NPZ, _weight_arrays, load_model

    folder = resolve_model(ref)
    src, src_meta = load_model(folder, pipeline=True)
    src_classes = list(src_meta.get("classes") or [])
    live, saved = _weight_arrays(model), _weight_arrays(src)
    out_layer = len(model.layers) - 1
    copied, fresh = [], []
    for key, arr in live.items():
        layer = int(key.split(":", 1)[1].split(".", 1)[0])
        other = saved.get(key)
        if (layer == out_layer and src_classes != list(classes)) or other is None or other.shape != arr.shape:
            fresh.append(key)
            continue
        arr[...] = other
        copied.append(key)
    if not copied:
        raise ConfigError(f"training.init_from: model {ref!r} ({folder}) shares no layer with this architecture "
                          f"(its layers: {[c['type'] for c in src_meta.get('architecture', [])] or 'see model.json'})")
    digest = hashlib.sha256((folder / WEIGHTS_NPZ).read_bytes()).hexdigest()
    log.info("init_from %s: copied %d arrays, %d fresh (%s)", ref, len(copied), len(fresh), ", ".join(fresh) or "none")
    return {"model": str(ref), "weights_sha256": digest, "classes": src_classes, "copied": copied, "fresh": fresh}


def _measured_framing(train_ds: Any, n_max: int = 1024) -> dict[str, Any]:
    """:func:`galpipe.framing.convention` of the first ``n_max`` training stamps (file order)."""
    from galpipe.framing import convention

    xb, _ = next(iter(train_ds.iter_batches(min(n_max, len(train_ds)), shuffle=False)))
    return convention(xb)


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
    init = init_weights(model, tcfg.init_from, classes) if tcfg.init_from else None
    data_key = [pq.ParquetFile(train).metadata.num_rows, meta.get("split"), meta.get("normalisation"),
                init and init["weights_sha256"]]
    ckpt = Path(checkpoint_root) / f"{name}-{fingerprint(arch, tcfg.to_dict(), input_shape, data_key)}"
    preprocess = dict(exp.get("preprocess") or {})
    unit, unit_from = (_training_pixel_unit(preprocess, train) if exp.get("inputs", "image") == "image"
                       else (None, "unknown"))
    t0 = time.perf_counter()
    history = fit(model, train_ds, val_ds, tcfg, checkpoint_dir=ckpt, progress=progress, log=log.info,
                  display=unit == "DN")
    seconds = time.perf_counter() - t0
    metadata = {
        "experiment": name, "description": exp.get("description", ""), "preset": exp.get("preset"),
        "inputs": exp.get("inputs", "image"), "classes": classes, "bands": meta.get("bands", []),
        "image_shape": meta["image_shape"], "normalisation": meta.get("normalisation", {}),
        "features": feature_info, "training": tcfg.to_dict(), "galpipe_version": __version__,
        "preprocess": preprocess, "init_from": init,
        "provenance": provenance("train", exp, [train, validation]),
    }
    if metadata["inputs"] == "image":  # how large the galaxies look: predict --reframe restores it
        metadata["framing_measured"] = _measured_framing(train_ds)
    if metadata["inputs"] == "image":  # what predict checks every input against
        metadata["input_contract"] = input_contract(
            metadata["preprocess"], metadata["bands"], input_shape, unit,
            derived_from=f"the train split's bands and shape; pixel unit from {unit_from}; framing from the "
                         f"{metadata['preprocess'].get('source')} source's settings")
    save_model(model, out_dir, metadata=metadata)
    history.to_csv(out_dir / "history.csv")
    hist = history.to_dict()
    # the epoch whose weights were kept: chosen by the early-stopping metric (val_loss by default)
    best_epoch = int(history.best_epoch) or len(hist.get("epoch", []))
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
