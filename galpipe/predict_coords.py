"""Classify galaxies given by position: ``galpipe predict --model DIR --coords galaxies.csv``.

The CSV has ``ra`` and ``dec`` (degrees, ICRS) and optionally ``petroR90_r`` (arcsec),
``objid`` (an integer id) and ``name`` (any text); column names are matched without
regard to case.  For every row a SkyServer ImgCutout colour JPEG is fetched, framed as
the model's training images were, and classified with the model's own preprocessing.

Framing, from the model's input contract (``input_contract.framing``, written by the
train stage, :func:`galpipe.stages.train.source_contract`):

``pixel_scale``
    Fetched at ``arcsec_per_pixel`` (a model of the ``sdss`` source with
    ``jpeg_scale_mode: fixed``); ``petroR90_r`` is not needed.
``petro``
    The stamp side is ``span_r90 x petroR90_r`` (``jpeg_scale_mode: petro``).
``crop`` with ``span_r90``
    A model of the ``images`` source whose config set ``images.span_r90`` (the full
    image side in units of ``petroR90_r``): the contract records ``span_r90`` =
    ``images.span_r90 x crop_fraction``, the side of the centre crop the network saw.
    The Galaxy Zoo 1 JPEGs were cut at 0.024 x petroR90_r arcsec/pixel on 423 pixels
    (Lintott et al. 2008, MNRAS 389, 1179, section 2, as quoted in the brief of this
    feature; the stored copies of the paper that the search tool reached did not include
    section 2, so the wording was not checked there -- Galaxy Zoo's blog "Preparing the
    pixels", 2011, confirms only that GZ1 asked SkyServer for each image by position and
    size), so ``config/gz1-sdss-jpeg.yaml`` sets ``span_r90: 10.15`` and its models record
    10.15 x 0.5 = 5.075.
``crop`` without ``span_r90``, ``unknown``
    The sky extent of the training images is unknown: refused (no cutout can be framed
    like them).

Each cutout is fetched so that its side spans exactly that field: ``size`` = the
model's input side, ``cutout_scale = span_r90 x petroR90_r / size`` arcsec/pixel
(:func:`galpipe.sources.sdss_cutouts.jpeg_request`: ``max(size, 64)`` pixels are asked
for over the same field and area-averaged to ``size``, :func:`~galpipe.sources.sdss_cutouts.resample_area`).
The cutout therefore *is* the image the network sees -- the training crop
already happened in the framing -- so it goes through predict's preprocessing with
``crop_fraction = 1.0`` (a same-size resize, i.e. unchanged pixels) and the model's
normalisation.  Applying the model's own ``crop_fraction`` again would halve the field a
second time (tested: ``tests/test_predict_coords.py``).  A galaxy whose scale ImgCutout
cannot serve (:data:`~galpipe.sources.sdss_cutouts.JPEG_SCALE_LIMITS`) would be framed
differently, so it is reported, not classified (``--force`` classifies it with a warning).

Without ``petroR90_r`` (column absent or a row's cell empty) the nearest ``PhotoPrimary``
object within :data:`~galpipe.sources.sdss.NEAREST_RADIUS_ARCSEC` is looked up on SkyServer,
one SQL query per page of rows (:func:`galpipe.sources.sdss.query_nearest`).  A row without
a match, or whose fetch fails, stays in the output with ``status = "failed"`` and the
reason; a row with a bad ``ra``/``dec`` refuses the whole file, naming the row.

The SkyServer URL, data release, query and download settings come from ``--config``
(its ``sdss:`` section; without ``--config`` the schema's defaults: the public SkyServer,
DR17).  Cutouts are cached under ``cache_dir/coords-<hash of URL, release, framing, size>/``;
a rerun fetches only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from galpipe.errors import ConfigError, DataError, GalpipeError, ModelError
from galpipe.predict import (
    PIXEL_SCALE_TOLERANCE,
    InputContractError,
    Prepared,
    _check_outputs_are_not_inputs,
    _classify,
    _preprocess,
    _read_yaml,
    _RunInfo,
    model_contract,
    write_prediction_tables,
)
from galpipe.settings import SdssConfig
from galpipe.sources.sdss import FRAME_CACHE_ROOT, NEAREST_RADIUS_ARCSEC, query_nearest, sdss_section
from galpipe.sources.sdss_cutouts import JPEG_BANDS, JPEG_SCALE_LIMITS, fetch_cutouts, jpeg_request
from galpipe.stages import CUTOUT_CACHE_ROOT

PathLike = str | os.PathLike[str]
#: Columns a coordinates CSV may have (matched without regard to case).
COORDS_COLUMNS: tuple[str, ...] = ("ra", "dec", "petroR90_r", "objid", "name")
#: Largest ``span_r90`` a model may record (the schema's ``images.span_r90`` maximum).
MAX_SPAN_R90 = 1000.0


@dataclass(frozen=True)
class CoordsFraming:
    """How ``--coords`` frames a SkyServer cutout for one model.

    Attributes
    ----------
    kind : {"pixel_scale", "petro"}
        A fixed pixel scale, or a side proportional to ``petroR90_r``.
    arcsec_per_pixel : float or None
        ``pixel_scale``: the cutout's scale.
    span_r90 : float or None
        ``petro``: the cutout side in units of ``petroR90_r``.
    size : int
        The cutout side in pixels (the network's input side).
    """

    kind: str
    arcsec_per_pixel: float | None
    span_r90: float | None
    size: int

    def cutouts_section(self) -> dict[str, Any]:
        """The ``sdss.cutouts`` settings that make the sdss source's JPEG provider fetch this framing."""
        if self.kind == "pixel_scale":
            return {"provider": "skyserver-jpeg", "jpeg_scale_mode": "fixed", "jpeg_scale": self.arcsec_per_pixel}
        return {"provider": "skyserver-jpeg", "jpeg_scale_mode": "petro", "jpeg_span_r90": self.span_r90}

    def wanted_scale(self, petro_r90: float) -> float:
        """The cutout arcsec/pixel this framing asks for (before ImgCutout's limits)."""
        if self.kind == "pixel_scale":
            return float(self.arcsec_per_pixel)  # type: ignore[arg-type]
        return float(self.span_r90) * float(petro_r90) / self.size  # type: ignore[arg-type]


def coords_framing(contract: Mapping[str, Any], model_dir: PathLike) -> CoordsFraming:
    """The framing of SkyServer cutouts for a model, from its input contract (:func:`~galpipe.predict.model_contract`).

    Raises
    ------
    ModelError
        The contract's ``span_r90`` is not a number in (0, :data:`MAX_SPAN_R90`].
    InputContractError
        The model's training images have no known sky extent (``crop`` without
        ``span_r90``, ``unknown``): the message says how to record one.
    """
    framing = dict(contract.get("framing") or {})
    kind = str(framing.get("kind", "unknown"))
    size = int(contract["size"][0])
    if kind == "pixel_scale":
        return CoordsFraming("pixel_scale", float(framing["arcsec_per_pixel"]), None, size)
    if kind in ("petro", "crop") and "span_r90" in framing:
        span = framing["span_r90"]
        if isinstance(span, bool) or not isinstance(span, int | float) or not 0 < span <= MAX_SPAN_R90:
            raise ModelError(f"model {model_dir}: key 'input_contract.framing.span_r90': {str(span)[:60]!r} is not "
                             f"a number in (0, {MAX_SPAN_R90:g}] (units of petroR90_r)")
        return CoordsFraming("petro", None, float(span), size)
    how = framing.get("description") or kind
    raise InputContractError(
        f"model {model_dir} was trained on images of unknown sky extent (framing {kind!r}: {how}), so --coords "
        "cannot fetch SkyServer cutouts framed like them. For a model of the images source, set images.span_r90 "
        "(the full image side in units of petroR90_r, e.g. 10.15 for the Galaxy Zoo 1 JPEGs: "
        "config/gz1-sdss-jpeg.yaml) and train it again; or classify cutouts you made yourself (predict INPUT)")


def _jpeg_differences(contract: Mapping[str, Any]) -> list[str]:
    """What about a SkyServer colour JPEG (bands red, green, blue; 8-bit ``DN``) differs from the contract."""
    out = []
    want = list(contract["channels"])
    named = not all(c.startswith("band") and c[4:].isdigit() for c in want)
    if len(want) != len(JPEG_BANDS) or (named and want != list(JPEG_BANDS)):
        out.append(f"channels: the model takes [{', '.join(want)}], SkyServer JPEGs have [{', '.join(JPEG_BANDS)}]")
    unit = contract.get("pixel_unit")
    if unit not in (None, "DN"):
        out.append(f"pixel unit: the model takes {unit!r}, SkyServer JPEGs are 8-bit display values ('DN')")
    return out


# --------------------------------------------------------------------------- the CSV
def _row_label(df: pd.DataFrame, i: int) -> str:
    """``row 3 (line 5)`` [+ ``, name 'NGC 1'``] of CSV data row ``i`` (0-based; line 1 is the header)."""
    text = f"row {i + 1} (line {i + 2})"
    if "name" in df.columns and isinstance(df.at[i, "name"], str) and df.at[i, "name"]:
        text += f", name {df.at[i, 'name'][:40]!r}"
    return text


def read_coords(path: PathLike) -> pd.DataFrame:
    """Read and check a coordinates CSV.

    Returns
    -------
    pandas.DataFrame
        One row per data row, in file order: ``objid`` (Int64, missing when not given),
        ``name`` (str, ``""`` when not given), ``ra``, ``dec`` (float64, degrees) and
        ``petroR90_r`` (float64 arcsec; NaN where it is to be looked up).

    Raises
    ------
    DataError
        Unreadable file, no ``ra``/``dec`` column, no rows, a repeated column, or a row whose
        ``ra`` is not in [0, 360) or ``dec`` not in [-90, 90] (NaN, text, out of range), whose
        ``petroR90_r`` is given but not a positive number, or whose ``objid`` is not an integer
        -- the message names the row(s).
    """
    p = Path(path)
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError as exc:
        raise DataError(f"coords {p}: file not found") from exc
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"coords {p}: not a readable CSV file ({exc})") from exc
    lower: dict[str, str] = {}
    for col in raw.columns:
        key = str(col).strip().lower()
        if key in lower:
            raise DataError(f"coords {p}: columns {lower[key]!r} and {col!r} are the same column (case is ignored)")
        lower[key] = str(col)
    missing = [c for c in ("ra", "dec") if c not in lower]
    if missing:
        raise DataError(f"coords {p}: missing column(s) {missing}; the file needs ra and dec (degrees) and may have "
                        f"{', '.join(COORDS_COLUMNS[2:])} (found {list(raw.columns)[:10]})")
    if raw.empty:
        raise DataError(f"coords {p}: no rows")
    df = pd.DataFrame({"name": raw[lower["name"]].astype(str).str.strip() if "name" in lower else ""},
                      index=raw.index)
    problems: list[str] = []

    def numbers(col: str) -> pd.Series:
        text = raw[lower[col]].astype(str).str.strip() if col in lower else pd.Series("", index=raw.index)
        return pd.to_numeric(text.where(text != "", "nan"), errors="coerce"), text

    ra, ra_text = numbers("ra")
    dec, dec_text = numbers("dec")
    r90, r90_text = numbers("petror90_r")
    for i in range(len(raw)):
        bad = []
        if not (math.isfinite(ra[i]) and 0.0 <= ra[i] < 360.0):
            bad.append(f"ra {ra_text[i][:30]!r} is not a number in [0, 360) degrees")
        if not (math.isfinite(dec[i]) and -90.0 <= dec[i] <= 90.0):
            bad.append(f"dec {dec_text[i][:30]!r} is not a number in [-90, 90] degrees")
        if r90_text[i] != "" and not (math.isfinite(r90[i]) and r90[i] > 0):
            bad.append(f"petroR90_r {r90_text[i][:30]!r} is not a positive number of arcsec "
                       "(leave the cell empty to look it up on SkyServer)")
        if bad:
            problems.append(f"{_row_label(df, i)}: {'; '.join(bad)}")
    objid = pd.array([pd.NA] * len(raw), dtype="Int64")
    if "objid" in lower:
        values = []
        for i, text in enumerate(raw[lower["objid"]].astype(str).str.strip()):
            if text == "":
                values.append(pd.NA)
            elif text.lstrip("-").isdigit() and -(2**63) <= int(text) < 2**63:
                values.append(int(text))
            else:
                values.append(pd.NA)
                problems.append(f"{_row_label(df, i)}: objid {text[:30]!r} is not a 64-bit integer")
        objid = pd.array(values, dtype="Int64")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"coords {p}: {'; '.join(problems[:5])}{more}")
    out = pd.DataFrame({"objid": objid, "name": df["name"], "ra": ra.astype(np.float64),
                        "dec": dec.astype(np.float64), "petroR90_r": r90.astype(np.float64)})
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- cutout keys
def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def cutout_folder(cache_dir: PathLike, sdss: SdssConfig, framing: CoordsFraming) -> Path:
    """``cache_dir/coords-<hash>``: one folder per SkyServer, release, framing and size."""
    key = {"skyserver_url": sdss.skyserver_url.rstrip("/"), "data_release": sdss.data_release,
           "framing": [framing.kind, framing.arcsec_per_pixel, framing.span_r90], "size": framing.size}
    return Path(cache_dir) / f"coords-{_digest(key)[:16]}"


def cutout_key(ra: float, dec: float, petro_r90: float | None) -> int:
    """A non-negative 63-bit integer naming the cutout of one request (position and, if used, size)."""
    text = f"{ra:.8f} {dec:.8f} {'' if petro_r90 is None else repr(float(petro_r90))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


# --------------------------------------------------------------------------- predict
def predict_coords(model_dir: PathLike, coords: PathLike, output: PathLike, *, tta: bool,
                   mc_dropout: int = 0, config: PathLike | None = None, seed: int,
                   cache_dir: PathLike = CUTOUT_CACHE_ROOT, force: bool = False, show_progress: bool = True,
                   frame_cache_dir: PathLike = FRAME_CACHE_ROOT,
                   radius_arcsec: float = NEAREST_RADIUS_ARCSEC) -> pd.DataFrame:
    """Fetch a SkyServer cutout per row of a coordinates CSV, framed for the model, and classify it.

    Parameters
    ----------
    model_dir : path-like
        Model folder, or the name of a shipped model (:func:`galpipe.models.resolve_model`).
    coords : path-like
        The CSV (:func:`read_coords`).
    output : path-like
        As for :func:`galpipe.predict.predict_input` (CSV/Parquet plus ECSV and FITS beside it).
    tta, mc_dropout, seed, force, show_progress
        As for :func:`galpipe.predict.predict_input` (``tta`` and ``seed`` are required here: they are
        predict's options, not the config keys of the same names).
    config : path-like, optional
        A config whose ``sdss:`` section says which SkyServer and data release to use
        (URL, release, query and download settings); None: the schema's defaults.
    cache_dir : path-like
        Root of the cutout cache (:func:`cutout_folder` below it).
    frame_cache_dir : path-like
        Root of the SDSS request budgets (``frame_cache_dir/rate``), shared with the pipeline.
    radius_arcsec : float
        Match radius of the ``petroR90_r`` look-up.

    Returns
    -------
    pandas.DataFrame
        One row per CSV row, in file order: ``row`` (1-based data row), ``objid`` (the CSV's,
        else the matched SDSS object's), ``name``, ``ra``, ``dec``, ``petroR90_r`` (given or
        looked up), ``match_arcsec`` (distance of the looked-up object; NaN when not looked up),
        ``status`` (``ok``/``failed``), ``reason``, ``source_path`` (the cutout), ``p_<class>``,
        ``pred``, ``entropy`` and, with MC dropout, ``std_<class>`` (NaN/empty when failed).

    Raises
    ------
    InputContractError
        The model cannot take SkyServer JPEGs (channels, pixel unit; unless ``force``) or its
        training images' sky extent is unknown.
    DataError
        A bad CSV (:func:`read_coords`), or no row could be classified (with the reasons).
    """
    from galpipe.config import load_settings
    from galpipe.models import resolve_model
    from galpipe.nn.persist import MODEL_JSON, load_model

    model_dir = resolve_model(model_dir)
    model, meta = load_model(model_dir, pipeline=True)  # a model folder is untrusted: checked in full
    if meta.get("inputs") == "features":
        raise ConfigError(f"model {model_dir} is a catalogue-feature baseline; predict needs an image model")
    contract = model_contract(meta, Path(model_dir) / MODEL_JSON)
    framing = coords_framing(contract, model_dir)
    diffs = _jpeg_differences(contract)
    if diffs and not force:
        raise InputContractError(f"model {model_dir} does not take SkyServer colour JPEGs, which --coords fetches: "
                                 f"{'; '.join(diffs)}. Pass --force to classify them anyway")
    _check_outputs_are_not_inputs(output, [coords])
    table = read_coords(coords)
    sdss = load_settings(_read_yaml(config) if config is not None else {}).sdss
    try:
        fetch_sdss = sdss_section({**sdss.to_dict(), "cutouts": {**sdss.cutouts.to_dict(),
                                                                  **framing.cutouts_section()}})
    except ConfigError as exc:
        raise InputContractError(f"model {model_dir}: its framing cannot be fetched from SkyServer ({exc})") from exc
    rows = _plan(table, framing, fetch_sdss, force=force, frame_cache_dir=Path(frame_cache_dir),
                 radius_arcsec=radius_arcsec)
    cache_root = cutout_folder(cache_dir, fetch_sdss, framing)
    todo = rows[rows["status"] == "ok"].drop_duplicates("key")
    if len(todo):
        cat = pd.DataFrame({"objid": todo["key"].astype(np.int64), "ra": todo["ra"], "dec": todo["dec"],
                            "petroR90_r": todo["petroR90_r"].fillna(1.0)})
        manifest = fetch_cutouts(cat, cache_root, sdss=fetch_sdss, bands=JPEG_BANDS, size=framing.size,
                                 frame_cache_dir=frame_cache_dir, progress=show_progress).set_index("objid")
        for i in rows.index[rows["status"] == "ok"]:
            got = manifest.loc[int(rows.at[i, "key"])]
            if got["status"] == "ok":
                rows.at[i, "source_path"] = str(got["path"])
            else:
                rows.loc[i, ["status", "reason"]] = ["failed", f"SkyServer cutout: {got['reason']}"]
    paths = list(dict.fromkeys(rows.loc[rows["status"] == "ok", "source_path"]))
    run = _RunInfo(model_dir, Path(coords), tta, mc_dropout, seed, force, contract, show_progress)
    # the cutout is already the framed image the network sees: no second crop (module docstring)
    prep = _preprocess(paths, meta, 1.0, contract=contract, force=force, model=model_dir,
                       show_progress=show_progress)
    for entry in prep.failed:  # an unreadable cutout: its rows fail with the reason
        path, _, why = entry.partition(": ")
        rows.loc[rows["source_path"] == path, ["status", "reason"]] = ["failed", why]
    failed = [f"{_row_label(rows, int(i))}: {rows.at[i, 'reason']}" for i in rows.index[rows["status"] != "ok"]]
    if not len(prep.x):
        raise DataError(f"coords {coords}: no galaxy could be classified: {'; '.join(failed[:3])}"
                        + (f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""))
    warnings = list(prep.warnings) + [f"{_row_label(rows, int(i))}: {w}"
                                      for i, w in rows["warning"].items() if w]
    df = _result_frame(rows, meta, _classify(model, prep.x, run), prep.kept, mc_dropout=bool(mc_dropout))
    write_prediction_tables(df, meta, Prepared(prep.x, prep.kept, failed, warnings), output, run)
    return df


def _plan(table: pd.DataFrame, framing: CoordsFraming, sdss: SdssConfig, *, force: bool, frame_cache_dir: Path,
          radius_arcsec: float) -> pd.DataFrame:
    """Per CSV row: the ``petroR90_r`` to frame with (given, or looked up), the cutout key, and whether it can be
    fetched (``status``/``reason``; ``warning`` when ``force`` lets a differently framed cutout through)."""
    rows = table.copy()
    rows["match_arcsec"] = np.nan
    rows["status"], rows["reason"], rows["warning"], rows["source_path"] = "ok", "", "", ""
    if framing.kind == "petro":
        need = rows.index[rows["petroR90_r"].isna()]
        if len(need):
            matches, _ = query_nearest(sdss, [(int(i), float(rows.at[i, "ra"]), float(rows.at[i, "dec"]))
                                              for i in need], radius_arcsec=radius_arcsec,
                                       rate_state_dir=frame_cache_dir / "rate")
            found = matches.set_index("row_index")
            for i in need:
                if i not in found.index:
                    rows.loc[i, ["status", "reason"]] = [
                        "failed", f"no petroR90_r given and no SDSS DR{sdss.data_release} PhotoPrimary object within "
                                  f"{radius_arcsec:g} arcsec of ({rows.at[i, 'ra']:.6f}, {rows.at[i, 'dec']:.6f})"]
                    continue
                # column by column: a row of mixed dtypes would be float64, rounding 64-bit objids
                hit = {c: found.at[i, c] for c in found.columns}
                rows.at[i, "match_arcsec"] = float(hit["distance_arcsec"])
                if pd.isna(rows.at[i, "objid"]):
                    rows.at[i, "objid"] = int(hit["objid"])
                if not (math.isfinite(hit["petroR90_r"]) and hit["petroR90_r"] > 0):
                    rows.loc[i, ["status", "reason"]] = [
                        "failed", f"the nearest PhotoPrimary object (objid {int(hit['objid'])}, "
                                  f"{hit['distance_arcsec']:.2f} arcsec away) has no petroR90_r "
                                  f"({hit['petroR90_r']:g})"]
                    continue
                rows.at[i, "petroR90_r"] = float(hit["petroR90_r"])
    keys = []
    for i in rows.index:
        r90 = float(rows.at[i, "petroR90_r"]) if framing.kind == "petro" else None
        keys.append(cutout_key(float(rows.at[i, "ra"]), float(rows.at[i, "dec"]), r90))
        if rows.at[i, "status"] != "ok":
            continue
        try:
            req = jpeg_request(sdss.cutouts, r90, framing.size)
        except GalpipeError as exc:
            rows.loc[i, ["status", "reason"]] = ["failed", str(exc)]
            continue
        wanted = framing.wanted_scale(r90 if r90 is not None else 1.0)
        if abs(req.cutout_scale - wanted) > PIXEL_SCALE_TOLERANCE * wanted:
            why = (f"framing needs {wanted:.4g} arcsec/pixel on {framing.size} pixels (petroR90_r {r90:g} arcsec), "
                   f"ImgCutout serves {JPEG_SCALE_LIMITS[0]:g}..{JPEG_SCALE_LIMITS[1]:g} arcsec/pixel: the cutout "
                   f"would be {req.cutout_scale:.4g} arcsec/pixel, framed unlike the model's training images")
            if force:
                rows.at[i, "warning"] = why
            else:
                rows.loc[i, ["status", "reason"]] = ["failed", why + " (--force classifies it anyway)"]
    rows["key"] = np.array(keys, dtype=np.int64)
    return rows


def _result_frame(rows: pd.DataFrame, meta: Mapping[str, Any], res: Any, kept: list[str], *,
                  mc_dropout: bool) -> pd.DataFrame:
    """The output table: one row per CSV row (``rows`` of :func:`_plan`), classified ones filled from ``res``."""
    classes = list(meta["classes"])
    where = {p: k for k, p in enumerate(kept)}
    ok = (rows["status"] == "ok") & rows["source_path"].isin(where)
    rows.loc[(rows["status"] == "ok") & ~ok, ["status", "reason"]] = ["failed", "the cutout could not be read"]
    idx = np.array([where.get(p, -1) for p in rows["source_path"]])
    out = pd.DataFrame({"row": np.arange(1, len(rows) + 1, dtype=np.int64),
                        "objid": pd.array(rows["objid"], dtype="Int64"), "name": rows["name"].astype(str),
                        "ra": rows["ra"].to_numpy(np.float64), "dec": rows["dec"].to_numpy(np.float64),
                        "petroR90_r": rows["petroR90_r"].to_numpy(np.float64),
                        "match_arcsec": rows["match_arcsec"].to_numpy(np.float64),
                        "status": rows["status"].astype(str), "reason": rows["reason"].astype(str),
                        "source_path": rows["source_path"].where(ok, "").astype(str)})

    def pick(values: np.ndarray) -> np.ndarray:
        return np.where(ok.to_numpy(), values[np.clip(idx, 0, None)], np.nan)

    for k, c in enumerate(classes):
        out[f"p_{c}"] = pick(res.proba[:, k])
    best = res.proba.argmax(axis=1)
    out["pred"] = [classes[best[j]] if good else "" for j, good in zip(np.clip(idx, 0, None), ok, strict=True)]
    out["entropy"] = pick(res.entropy)
    if mc_dropout:
        for k, c in enumerate(classes):
            out[f"std_{c}"] = pick(res.std[:, k])
    return out
