"""Apply a trained model: classify files, folders or catalogues; score an external labelled set.

``galpipe predict --model DIR INPUT`` where INPUT is a FITS/JPEG/PNG file, a
folder of them, or a catalogue (Parquet/CSV with ``objid``, ``ra``, ``dec``)
whose cutouts are fetched through the configured source.  Images go through
exactly the preprocessing the model was trained with (crop, resize, the
normalisation stored in ``model.json``).

Every input is first checked against the model's **input contract**
(``model.json`` ``input_contract``, written by the train stage; derived from the
older metadata for models without one): the number and names of its channels,
its pixel unit (``nanomaggy`` fluxes or ``DN`` 0-255 colour images) and, for a
FITS cutout that records ``PIXSCALE``, its pixel scale.  A mismatch is refused,
naming the file and what differs; ``force=True`` (``--force``) classifies it
anyway and records the differences as warnings in the output's metadata.

Predictions are written as CSV or Parquet, and also as ECSV and FITS tables
(astropy, with units and the model's provenance) for TOPCAT users.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from astropy.io import fits

from galpipe import __version__
from galpipe.errors import ConfigError, DataError, ModelError
from galpipe.io.parquet import write_arrow, write_table
from galpipe.models import resolve_model
from galpipe.progress import progress as progress_reporter
from galpipe.progress import track
from galpipe.sources.base import ExternalImage
from galpipe.sources.images import IMAGE_SUFFIXES, read_labels
from galpipe.stages import CUTOUT_CACHE_ROOT
from galpipe.stages.normalise import image_column, normalise_array

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]
CATALOGUE_SUFFIXES = {".parquet", ".csv"}
FITS_SUFFIXES = {".fits", ".fit", ".fts"}
#: Relative difference of pixel scales above which an input's framing differs from the model's.
PIXEL_SCALE_TOLERANCE = 0.05
#: Spellings of the flux unit the SDSS calibrated frames use.
_UNIT_ALIASES = {"nanomaggies": "nanomaggy", "nmgy": "nanomaggy", "nanomaggy": "nanomaggy", "dn": "DN", "adu": "DN"}
#: Rows per forward pass of the classifier (and per progress step).
BATCH_SIZE = 256


class InputContractError(DataError):
    """An input image is not what the model was trained on (the message says what differs)."""


# --------------------------------------------------------------------------- the input contract
def _unit_key(unit: Any) -> str:
    text = str(unit).strip()
    return _UNIT_ALIASES.get(text.casefold(), text)


def _legacy_pixel_unit(meta: Mapping[str, Any]) -> str | None:
    """The pixel unit of an older model (no ``input_contract``), from what its metadata says.

    Colour bands ``red, green, blue`` are only ever written for 8-bit images (``DN``), the
    simulated and SDSS-frame sources write fluxes in nanomaggies; otherwise unknown.
    """
    prep = meta.get("preprocess") or {}
    if prep.get("pixel_unit"):
        return str(prep["pixel_unit"])
    if list(meta.get("bands") or []) == ["red", "green", "blue"]:
        return "DN"
    if prep.get("source") in ("simulated", "sdss"):
        return "nanomaggy"
    return None


def model_contract(meta: Mapping[str, Any], model_json: PathLike) -> dict[str, Any]:
    """The model's input contract: ``metadata.input_contract`` checked, or derived for an older model.

    A model folder is untrusted: a stored contract is checked for type and against the
    network's ``image_shape`` before it is used.

    Raises
    ------
    ModelError
        Naming ``model_json`` and the key, e.g. ``key 'input_contract.channels'``.
    """
    from galpipe.stages.train import input_contract

    h, w, c = (int(v) for v in meta["image_shape"])
    if "input_contract" not in meta:
        return input_contract(meta.get("preprocess") or {}, meta.get("bands") or [], (h, w, c),
                              _legacy_pixel_unit(meta),
                              derived_from="derived by predict from an older model's bands and preprocess "
                                           "metadata (the model has no input_contract)")
    con = meta["input_contract"]

    def bad(key: str, problem: str) -> ModelError:
        return ModelError(f"model {model_json}: key 'input_contract{key}': {problem}")

    if not isinstance(con, dict):
        raise bad("", f"{str(con)[:60]!r} is not a mapping")
    chans = con.get("channels")
    if not isinstance(chans, list) or not all(isinstance(b, str) and b.isprintable() and 0 < len(b) <= 64
                                              for b in chans):
        raise bad(".channels", f"{str(chans)[:60]!r} is not a list of channel names")
    if len(chans) != c:
        raise bad(".channels", f"{len(chans)} channel(s) for a network taking {c}")
    unit = con.get("pixel_unit")
    if unit is not None and not (isinstance(unit, str) and unit.isprintable() and 0 < len(unit) <= 40):
        raise bad(".pixel_unit", f"{str(unit)[:60]!r} is not a unit name or null")
    framing = con.get("framing", {})
    if not isinstance(framing, dict) or not isinstance(framing.get("kind", "unknown"), str):
        raise bad(".framing", f"{str(framing)[:60]!r} is not a mapping with a 'kind'")
    if framing.get("kind") == "pixel_scale":
        scale = framing.get("arcsec_per_pixel")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (0 < scale < 3600):
            raise bad(".framing.arcsec_per_pixel", f"{scale!r} is not a pixel scale in (0, 3600) arcsec")
    size = con.get("size")
    if size != [h, w]:
        raise bad(".size", f"{str(size)[:60]!r} is not the network's input size {[h, w]}")
    return dict(con)


def _known_names(names: Sequence[str]) -> bool:
    """Whether channel names say what they are (``band0``, ``band1``: a FITS file that does not)."""
    return bool(names) and not all(re.fullmatch(r"band\d+", n) for n in names)


def _effective_pixel_scale(path: PathLike, size: int, crop_fraction: float) -> tuple[float, str] | None:
    """Arcsec/pixel of a FITS cutout after the crop and resize to ``size``, from its ``PIXSCALE``.

    None when the file records no positive ``PIXSCALE`` (JPEG/PNG, other FITS files,
    folders of images whose scale is unknown).
    """
    p = Path(path)
    if p.suffix.lower() not in FITS_SUFFIXES:
        return None
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, IndexError), fits.open(p) as hdul:
        scale = hdul[0].header.get("PIXSCALE")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < 3600:
            return None
        hdu = next((h for h in hdul if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) >= 2), None)
        if hdu is None:
            return None
        side = min(int(hdu.header["NAXIS1"]), int(hdu.header["NAXIS2"]))
        kept = max(1, round(side * crop_fraction))
        eff = float(scale) * kept / size
        return eff, f"PIXSCALE {float(scale):g} x {kept} px resized to {size}"
    return None


def contract_differences(ext: ExternalImage, contract: Mapping[str, Any], path: PathLike,
                         crop_fraction: float) -> list[str]:
    """What about one loaded input differs from the model's input contract (empty: nothing).

    Parameters
    ----------
    ext : ExternalImage
        The input as cutout pixels, ``data`` of shape ``(n_channels, size, size)``.
    contract : mapping
        :func:`model_contract`.
    path : path-like
        The input file (its FITS header may record a pixel scale).
    crop_fraction : float
        The centre crop applied to it.
    """
    out = []
    want, got = list(contract["channels"]), list(ext.bands) or [f"band{k}" for k in range(ext.data.shape[0])]
    if len(got) != len(want):
        out.append(f"channels: expected {len(want)} ({', '.join(want)}), got {len(got)} ({', '.join(got)})")
    elif _known_names(want) and _known_names(got) and got != want:
        out.append(f"bands: expected [{', '.join(want)}], got [{', '.join(got)}]")
    unit = contract.get("pixel_unit")
    if unit and _unit_key(ext.bunit) != _unit_key(unit):
        what = "8-bit image" if ext.bunit == "DN" else "FITS BUNIT"
        out.append(f"pixel unit: expected {unit!r} ({contract.get('pixel_values', '')}), got {ext.bunit!r} ({what})")
    framing = contract.get("framing") or {}
    if framing.get("kind") == "pixel_scale":
        got_scale = _effective_pixel_scale(path, int(contract["size"][0]), crop_fraction)
        expect = float(framing["arcsec_per_pixel"])
        if got_scale is not None and abs(got_scale[0] - expect) > PIXEL_SCALE_TOLERANCE * expect:
            out.append(f"pixel scale: expected {expect:g} arcsec/pixel ({framing.get('description', '')}), "
                       f"got {got_scale[0]:.4g} arcsec/pixel ({got_scale[1]})")
    return out


# --------------------------------------------------------------------------- preprocessing
def _crop_of(meta: Mapping[str, Any], crop_fraction: float | None) -> float:
    """``crop_fraction`` when given, else the model's ``preprocess.crop_fraction``."""
    if crop_fraction is not None:
        return float(crop_fraction)
    return float((meta.get("preprocess") or {}).get("crop_fraction", 1.0))


def load_input(path: PathLike, meta: Mapping[str, Any], crop_fraction: float | None = None) -> ExternalImage:
    """One image file as cutout pixels, made by the model's source (``preprocess.source``)
    exactly as its cutouts stage makes them (:meth:`galpipe.sources.base.Source.load_external`)."""
    from galpipe.sources import source_class

    h = int(meta["image_shape"][0])
    prep = meta.get("preprocess") or {}
    return source_class(prep.get("source", "images")).load_external(path, size=h,
                                                                   crop_fraction=_crop_of(meta, crop_fraction))


#: ``--reframe`` choices (:func:`galpipe.framing.reframe_fraction`).
REFRAME_MODES = ("auto", "always", "off")
#: Reframing measures the reframed stamp again up to this many times (a galaxy too large for
#: the first view was measured cut off) and stops once it is within :data:`REFRAME_CONVERGED`.
REFRAME_ITERATIONS = 3
REFRAME_CONVERGED = 1.1


def reframe_input(path: PathLike, meta: Mapping[str, Any], crop: float, ext: ExternalImage,
                  mode: str = "auto") -> tuple[ExternalImage, float]:
    """Reframe one image so that its galaxy fills the model's stamps as in training.

    The galaxy's ``r90`` (:func:`galpipe.framing.extent`) is measured on the stamp the model
    would see (``ext``: the usual crop at ``H x H``), as the convention was measured on the
    training stamps; when it differs from the model's measured convention (``model.json``
    ``framing_measured``; for ``auto`` by more than :data:`galpipe.framing.AUTO_TOLERANCE`),
    the crop is widened or narrowed by the ratio, the whole image resampled (tent filter)
    to ``H x H`` and any area beyond the image filled with its border's sky level; the result
    is measured again (:data:`REFRAME_ITERATIONS`).  Models without a measured convention,
    and ``mode="off"``, keep ``ext`` as it is.

    Returns
    -------
    (ExternalImage, float)
        The cutout pixels the model sees and the factor applied to the crop side (1: none).
    """
    from galpipe.framing import CROP_LIMITS, extent, reframe_fraction
    from galpipe.nn.augment import resample
    from galpipe.sources import source_class

    conv = meta.get("framing_measured")
    if mode == "off" or not conv or not conv.get("r90_fraction"):
        return ext, 1.0
    h = int(meta["image_shape"][0])
    view = np.moveaxis(np.asarray(ext.data, np.float32), 0, -1)  # (H, H, C): what the model sees
    factor = reframe_fraction(extent(view), h, conv, mode)
    if factor == 1.0:
        return ext, 1.0
    side = max(h, round(h / crop))  # the whole image, at the model's pixel scale
    src = source_class((meta.get("preprocess") or {}).get("source", "images"))
    full = src.load_external(path, size=side, crop_fraction=1.0)
    pixels = np.moveaxis(np.asarray(full.data, np.float32), 0, -1)  # (side, side, C)
    for _ in range(REFRAME_ITERATIONS):  # a galaxy cut by the first view is measured again, whole
        new_crop = float(np.clip(crop * factor, *CROP_LIMITS))
        zoom = h / (new_crop * side)  # output pixels per input pixel
        out = resample(pixels[None], np.array([zoom]), np.zeros(1), out_size=h)[0]
        again = reframe_fraction(extent(out), h, conv, "always")
        if abs(math.log(again)) < math.log(REFRAME_CONVERGED):
            break
        factor *= again
    data = np.moveaxis(out, -1, 0)
    if ext.bunit == "DN":
        data = np.clip(np.rint(data), 0, 255).astype(np.uint8)
    return ExternalImage(data=data, bunit=ext.bunit, bands=ext.bands), new_crop / crop


def _normalised(ext: ExternalImage, path: PathLike, meta: Mapping[str, Any]) -> np.ndarray:
    from galpipe.settings import NormaliseConfig

    h, w, c = meta["image_shape"]
    img, _ = normalise_array(ext.data, ext.bunit, NormaliseConfig.from_dict(meta["normalisation"], "normalisation"))
    if img.shape != (h, w, c):
        raise DataError(f"image {path}: {img.shape[2]} channel(s), the model expects {c}")
    return img


def preprocess_image(path: PathLike, meta: Mapping[str, Any], crop_fraction: float | None = None) -> np.ndarray:
    """One image file -> the ``(H, W, C)`` float32 array the model sees, made by the stage code.

    The model's source (``model.json`` ``preprocess.source``) turns the file into
    cutout pixels exactly as its cutouts stage does (:func:`load_input`), then the
    normalise stage's :func:`~galpipe.stages.normalise.normalise_array` applies the
    normalisation stored with the model.  (No contract check: see :func:`contract_differences`.)
    """
    return _normalised(load_input(path, meta, crop_fraction), path, meta)


@dataclass
class Prepared:
    """Inputs ready for the network.

    Attributes
    ----------
    x : numpy.ndarray
        ``(N, H, W, C)`` float32.
    kept : list of str
        The ``N`` files, in order.
    failed : list of str
        ``"<file>: <reason>"`` of every file that could not be used.
    warnings : list of str
        ``"<file>: <difference>"`` of every contract difference let through by ``force``.
    reframe : list of float
        Per kept file, the factor :func:`reframe_input` applied to the crop side (1: none).
    """

    x: np.ndarray
    kept: list[str]
    failed: list[str]
    warnings: list[str] = field(default_factory=list)
    reframe: list[float] = field(default_factory=list)


def _preprocess(paths: Iterable[PathLike], meta: Mapping[str, Any], crop_fraction: float | None, *,
                contract: Mapping[str, Any] | None = None, force: bool = False, model: PathLike = "",
                show_progress: bool = False, reframe: str = "off") -> Prepared:
    """Load, check (against ``contract`` when given), reframe (:func:`reframe_input`) and
    normalise every path.

    An unreadable file is skipped and recorded; a file that breaks the contract raises
    :class:`InputContractError`, unless ``force``: then the difference is recorded as a
    warning and the file is used if the network can take it (a wrong channel count cannot).
    """
    h, w, c = meta["image_shape"]
    paths = [str(p) for p in paths]
    crop = _crop_of(meta, crop_fraction)
    imgs, kept, failed, warned, factors = [], [], [], [], []
    for p in track(paths, "predict: reading images", "image", enabled=show_progress):
        try:
            ext = load_input(p, meta, crop)
            if contract is not None:
                diffs = contract_differences(ext, contract, p, crop)
                if diffs and not force:
                    raise InputContractError(
                        f"image {p} does not match the input contract of model {model}: {'; '.join(diffs)}. "
                        "Pass --force to classify it anyway (the differences are then recorded as warnings)")
                for d in diffs:
                    if len(warned) < 5:
                        log.warning("--force: image %s: %s", p, d)
                    warned.append(f"{p}: {d}")
            ext, factor = reframe_input(p, meta, crop, ext, reframe)
            imgs.append(_normalised(ext, p, meta))
            kept.append(p)
            factors.append(factor)
        except InputContractError:
            raise
        except DataError as exc:
            log.warning("skipped: %s", exc)
            failed.append(f"{p}: {exc}")
    if len(warned) > 5:
        log.warning("--force: %d contract difference(s) in all, recorded in the output's metadata", len(warned))
    arr = np.stack(imgs) if imgs else np.zeros((0, h, w, c), np.float32)
    return Prepared(arr, kept, failed, warned, factors)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _catalogue_cutouts(cat_path: Path, config: PathLike | None, workdir: Path,
                       cache_root: PathLike = CUTOUT_CACHE_ROOT, *, show_progress: bool = True) -> list[str]:
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
                          cutout_cache_dir(cfg, root=cache_root), progress=show_progress)
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
                  seed: int = 0, cache_dir: PathLike = CUTOUT_CACHE_ROOT, force: bool = False,
                  show_progress: bool = True, reframe: str = "auto") -> pd.DataFrame:
    """Classify a file, a folder or a catalogue; write the probabilities (see :func:`output_paths`).

    A catalogue's cutouts are fetched through ``config``'s source into
    ``cache_dir`` (relative paths are relative to the current directory; the
    default is the pipeline's own cutout cache when run from the project root).
    Every input is checked against the model's input contract (:func:`model_contract`);
    a mismatch raises :class:`InputContractError` unless ``force``.  ``show_progress``
    reports reading and classifying (:mod:`galpipe.progress`: a bar on a terminal, log
    lines otherwise).  ``reframe`` (auto, always, off) brings each galaxy to the size it had
    in the training stamps (:func:`reframe_input`); the factor applied is the output's
    ``reframe`` column.

    Returns
    -------
    pandas.DataFrame
        One row per image: ``source_path``, ``objid`` (from the FITS header or
        the file name when it is an integer), ``ra``/``dec`` (degrees, from the FITS
        header; only when some input has them), ``p_<class>``, ``pred``,
        ``entropy`` and, with MC dropout, ``std_<class>``.
    """
    from galpipe.nn.persist import MODEL_JSON, load_model

    model_dir = resolve_model(model_dir)  # a folder, or the name of a shipped model (galpipe.models)
    model, meta = load_model(model_dir, pipeline=True)  # a model folder is untrusted: checked in full
    if meta.get("inputs") == "features":
        raise ConfigError(f"model {model_dir} is a catalogue-feature baseline; predict needs an image model")
    contract = model_contract(meta, Path(model_dir) / MODEL_JSON)
    src = Path(input_path)
    if not src.exists():
        raise DataError(f"predict input {src}: not found")
    if reframe not in REFRAME_MODES:
        raise ConfigError(f"predict: reframe must be one of {', '.join(REFRAME_MODES)}, got {reframe!r}")
    opts = {"contract": contract, "force": force, "model": model_dir, "show_progress": show_progress,
            "reframe": reframe}
    run = _RunInfo(model_dir, src, tta, mc_dropout, seed, force, contract, show_progress)
    if src.is_dir():
        files = [str(p) for p in _image_files(src)]
    elif src.suffix.lower() in CATALOGUE_SUFFIXES:
        _check_outputs_are_not_inputs(output, [src])
        with tempfile.TemporaryDirectory() as tmp:
            files = _catalogue_cutouts(src, config, Path(tmp), cache_dir, show_progress=show_progress)
            _check_outputs_are_not_inputs(output, files)
            prep = _preprocess(files, meta, 1.0, **opts)
        return _write_predictions(model, meta, prep, output, run)
    else:
        files = [str(src)]
    if not files:
        raise DataError(f"predict input {src}: no JPEG/PNG/FITS files found")
    _check_outputs_are_not_inputs(output, files)
    prep = _preprocess(files, meta, crop_fraction, **opts)
    return _write_predictions(model, meta, prep, output, run)


@dataclass(frozen=True)
class _RunInfo:
    """How predict was run: recorded in the output tables' metadata."""

    model_dir: PathLike
    input_path: Path
    tta: bool
    mc_dropout: int
    seed: int
    force: bool
    contract: Mapping[str, Any]
    show_progress: bool


def output_paths(output: PathLike) -> dict[str, Path]:
    """Every file predict writes for ``--output``: ``{format: path}``.

    ``.parquet`` -> Parquet; ``.ecsv``/``.fits``/``.fit`` -> that astropy table only;
    anything else -> CSV (as before).  The ECSV and FITS tables are always written too,
    beside it with the same stem (``predictions.csv`` -> ``predictions.ecsv``,
    ``predictions.fits``).
    """
    out = Path(output)
    suffix = out.suffix.lower()
    main = ("parquet" if suffix == ".parquet" else "ecsv" if suffix == ".ecsv"
            else "fits" if suffix in (".fits", ".fit") else "csv")
    paths = {main: out}
    paths.setdefault("ecsv", out.with_suffix(".ecsv"))
    paths.setdefault("fits", out.with_suffix(".fits"))
    return paths


def _check_outputs_are_not_inputs(output: PathLike, inputs: Iterable[PathLike]) -> None:
    """Refuse an ``--output`` whose files would overwrite an input (``galaxy.fits --output galaxy.csv``)."""
    ins = {Path(p).resolve() for p in inputs}
    for path in output_paths(output).values():
        if path.resolve() in ins:
            raise DataError(f"predict --output {output}: would overwrite the input {path} (predict also writes "
                            f"{', '.join(str(p) for p in output_paths(output).values())}); choose another --output")


def _header_info(path: str) -> tuple[int | None, float, float]:
    """``(objid, ra, dec)`` of an input: the FITS header's ``OBJID``, else the file name when it is an
    integer; ``RA``/``DEC`` (degrees) from the FITS header, else NaN."""
    p = Path(path)
    objid: int | None = None
    ra = dec = math.nan
    if p.suffix.lower() in FITS_SUFFIXES:
        with contextlib.suppress(OSError, KeyError, ValueError, TypeError, IndexError):
            hdr = fits.getheader(p, ext=0)
            value = hdr.get("OBJID")
            if isinstance(value, int) and not isinstance(value, bool):
                objid = value
            r, d = hdr.get("RA"), hdr.get("DEC")
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in (r, d)) \
                    and 0 <= r < 360 and -90 <= d <= 90:
                ra, dec = float(r), float(d)
    if objid is None and re.fullmatch(r"-?\d{1,19}", p.stem):
        value = int(p.stem)
        objid = value if -(2**63) <= value < 2**63 else None
    return objid, ra, dec


def _classify(model: Any, x: np.ndarray, run: _RunInfo) -> Any:
    """:func:`~galpipe.nn.inference.predict_proba` of ``x`` ``(N, H, W, C)`` with progress.

    Without MC dropout the result does not depend on the batching, so the images go in
    batches of :data:`BATCH_SIZE` with a progress step each; MC-dropout masks depend on it,
    so those go in one call (the same as :func:`predict_proba` alone).
    """
    from galpipe.nn.inference import PredictResult, predict_proba

    if run.mc_dropout:
        with progress_reporter(len(x), "predict: classifying", "image", enabled=run.show_progress) as bar:
            res = predict_proba(model, x, batch_size=BATCH_SIZE, tta=run.tta, mc_dropout=run.mc_dropout,
                                seed=run.seed)
            bar.update(len(x))
        return res
    parts = []
    with progress_reporter(len(x), "predict: classifying", "image", enabled=run.show_progress) as bar:
        for i in range(0, len(x), BATCH_SIZE):
            parts.append(predict_proba(model, x[i:i + BATCH_SIZE], batch_size=BATCH_SIZE, tta=run.tta, seed=run.seed))
            bar.update(len(parts[-1].proba))
    return PredictResult(proba=np.concatenate([r.proba for r in parts]),
                         std=np.concatenate([r.std for r in parts]),
                         entropy=np.concatenate([r.entropy for r in parts]),
                         mutual_info=np.concatenate([r.mutual_info for r in parts]),
                         objids=None, labels=None)


def _write_predictions(model: Any, meta: Mapping[str, Any], prep: Prepared, output: PathLike,
                       run: _RunInfo) -> pd.DataFrame:
    if len(prep.x) == 0:
        raise DataError("no image could be read: " + ("; ".join(prep.failed[:3]) or "no cutout could be made"))
    classes = list(meta["classes"])
    res = _classify(model, prep.x, run)
    info = [_header_info(p) for p in prep.kept]
    df = pd.DataFrame({"source_path": prep.kept, "objid": pd.array([i[0] for i in info], dtype="Int64")})
    if any(math.isfinite(i[1]) for i in info):
        df["ra"] = np.array([i[1] for i in info], np.float64)
        df["dec"] = np.array([i[2] for i in info], np.float64)
    for k, c in enumerate(classes):
        df[f"p_{c}"] = res.proba[:, k]
    df["pred"] = [classes[i] for i in res.proba.argmax(axis=1)]
    df["entropy"] = res.entropy
    if prep.reframe and len(prep.reframe) == len(df):
        df["reframe"] = np.asarray(prep.reframe, np.float64)
    if run.mc_dropout:
        for k, c in enumerate(classes):
            df[f"std_{c}"] = res.std[:, k]
    write_prediction_tables(df, meta, prep, output, run)
    return df


def write_prediction_tables(df: pd.DataFrame, meta: Mapping[str, Any], prep: Prepared, output: PathLike,
                            run: _RunInfo) -> None:
    """Write ``df`` (one row per input) to every file of :func:`output_paths`, with the run's metadata."""
    table_meta = _table_meta(meta, prep, run)
    for fmt, path in output_paths(output).items():
        if fmt == "parquet":
            write_table(df, path, {"model": meta.get("experiment"), "failed": prep.failed,
                                   "warnings": prep.warnings, "forced": bool(run.force and prep.warnings),
                                   "input_contract": dict(run.contract)})
        elif fmt == "csv":
            from galpipe.io.atomic import atomic_write_text

            text = df.copy()
            for c in ("ra", "dec"):  # positions to 1e-8 deg (%.6g would round them to about 1 arcsec)
                if c in text:
                    text[c] = [f"{v:.8f}" if math.isfinite(v) else "" for v in df[c]]
            atomic_write_text(path, text.to_csv(index=False, float_format="%.6g"))
        else:
            write_astropy_table(df, path, table_meta, fmt)


def _file_hash(path: Path) -> str | None:
    from galpipe.io.atomic import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return None


def _table_meta(meta: Mapping[str, Any], prep: Prepared, run: _RunInfo) -> dict[str, Any]:
    """The metadata of the ECSV/FITS tables: model, its hashes and provenance, classes, run settings."""
    from galpipe.nn.persist import MODEL_JSON

    model_dir = Path(run.model_dir)
    return {
        "model": meta.get("experiment"),
        "model_dir": str(model_dir),
        "model_json_sha256": _file_hash(model_dir / MODEL_JSON),
        "weights_sha256": _file_hash(model_dir / "weights.npz"),
        "model_provenance": meta.get("provenance") or {},
        "model_galpipe_version": meta.get("galpipe_version"),
        "classes": list(meta["classes"]),
        "input_contract": dict(run.contract),
        "input": str(run.input_path),
        "tta": bool(run.tta), "mc_dropout": int(run.mc_dropout), "seed": int(run.seed),
        "galpipe_version": __version__,
        "date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "forced": bool(run.force and prep.warnings),
        "warnings": list(prep.warnings),
        "failed": list(prep.failed),
    }


def _column_units(name: str, classes: Sequence[str]) -> tuple[Any, str]:
    import astropy.units as u

    if name in ("ra", "dec"):
        return u.deg, {"ra": "right ascension (ICRS) of the cutout centre, from the FITS header",
                       "dec": "declination (ICRS) of the cutout centre, from the FITS header"}[name]
    for prefix, what in (("p_", "probability of class"), ("std_", "MC-dropout standard deviation of p_")):
        if name.startswith(prefix) and name[len(prefix):] in classes:
            return u.dimensionless_unscaled, f"{what} {name[len(prefix):]}"
    if name == "entropy":
        return u.dimensionless_unscaled, "entropy of the class probabilities (nats)"
    return None, {"source_path": "the classified file", "objid": "object id (FITS OBJID or the file name)",
                  "pred": "most probable class"}.get(name, "")


def _fits_header_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The table metadata as FITS header cards (8-character keys, scalar values; the rest as COMMENTs)."""
    prov = meta.get("model_provenance") or {}
    cards = {"MODEL": meta.get("model") or "", "MODELDIR": meta["model_dir"],
             "MODELSHA": meta.get("model_json_sha256") or "", "WGTSSHA": meta.get("weights_sha256") or "",
             "CODEDIG": str(prov.get("code_digest", "")), "CONFDIG": str(prov.get("config_digest", "")),
             "DATADIG": str(prov.get("data_digest", "")), "CLASSES": ",".join(meta["classes"]),
             "GALPVER": meta["galpipe_version"], "DATE": meta["date"], "TTA": meta["tta"],
             "MCDROP": meta["mc_dropout"], "SEED": meta["seed"], "FORCED": meta["forced"],
             "NWARN": len(meta["warnings"]), "NFAILED": len(meta["failed"])}
    con = meta["input_contract"]
    comments = [f"input contract: channels {','.join(con['channels'])}; pixel unit {con.get('pixel_unit')}; "
                f"framing {(con.get('framing') or {}).get('description', 'unknown')}; size {con.get('size')}"]
    comments += [f"warning: {w}" for w in meta["warnings"][:50]]
    comments += [f"failed: {f}" for f in meta["failed"][:50]]
    return {**cards, "comments": comments}


def write_astropy_table(df: pd.DataFrame, path: PathLike, meta: Mapping[str, Any], fmt: str) -> Path:
    """Write predictions ``df`` as an astropy table with units and metadata, atomically.

    Parameters
    ----------
    df : pandas.DataFrame
        The predictions (one row per image, as :func:`predict_input` returns).
    path : path-like
        Destination.
    meta : mapping
        :func:`_table_meta`: stored whole (YAML) in ECSV; as header cards in FITS.
    fmt : {"ecsv", "fits"}
        The format.
    """
    from astropy.table import Column, MaskedColumn, Table

    from galpipe.io.atomic import atomic_path

    classes = list(meta["classes"])
    table = Table()
    for name in df.columns:
        unit, description = _column_units(name, classes)
        col = df[name]
        if name == "objid":
            values = col.to_numpy(dtype=np.int64, na_value=0)
            table[name] = MaskedColumn(values, mask=col.isna().to_numpy(), description=description)
        elif not pd.api.types.is_numeric_dtype(col):  # fixed-width text (FITS has no object strings)
            table[name] = Column(np.asarray(col.astype(str).tolist(), dtype=str), description=description)
        else:
            table[name] = Column(col.to_numpy(), unit=unit, description=description)
    table.meta.update(_fits_header_meta(meta) if fmt == "fits" else json.loads(json.dumps(meta, default=str)))
    with atomic_path(path) as tmp:
        table.write(tmp, format="fits" if fmt == "fits" else "ascii.ecsv")
    return Path(path)


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

    model_dir = resolve_model(model_dir)  # a folder, or the name of a shipped model (galpipe.models)
    _, meta = load_model(model_dir, pipeline=True)
    classes = list(meta["classes"])
    labels = read_labels({"directory": str(images_dir), "labels_csv": str(labels_csv), "id_column": id_column,
                          "label_column": label_column, "path_column": path_column, "label_map": label_map or {}})
    unknown = sorted(set(labels["label"]) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} in {labels_csv} are not classes of the model {classes}; "
                        "use --label-map RAW=CLASS (or RAW= to drop)")
    prep = _preprocess(labels["image_path"], meta, crop_fraction)  # no contract: scoring shifted data is allowed
    x, kept, failed = prep.x, prep.kept, prep.failed
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
