"""Per-galaxy cutouts from live SDSS: calibrated frames -> stamps, or SkyServer JPEGs.

Two providers (``sdss.cutouts.provider``):

``sdss-frames`` (default)
    For every field (``run, rerun, camcol, field``) holding galaxies that still
    lack a cutout, the calibrated frames ``frame-{band}-{run:06d}-{camcol}-{field:04d}.fits.bz2``
    are fetched once from the SAS (the URL astroquery's ``SDSS.get_images``
    builds from ``conf.sas_baseurl``; here from ``sdss.sas_url``), verified, and
    kept in a size-bounded LRU cache under ``{cache_dir}/frames/dr{DR}/...``.
    Each galaxy's stamp is cut from HDU 0 (nanomaggies) of every band with
    ``Cutout2D(data, SkyCoord(ra, dec), (size, size), wcs=frame_wcs,
    mode='partial', fill_value=nan)``; pixels off the frame are NaN and counted
    in ``NFILLED`` (pixels NaN-filled in at least one band).
``skyserver-jpeg``
    SkyServer ``/dr{DR}/SkyServerWS/ImgCutout/getjpeg`` colour cutouts (what
    Galaxy Zoo volunteers saw), written as ``bunit="DN"`` uint8 with bands
    ``red, green, blue``.  ``jpeg_scale_mode: fixed`` uses ``jpeg_scale``
    arcsec/pixel; ``petro`` uses ``jpeg_span_r90 * petroR90_r / size`` so the
    stamp side spans ``jpeg_span_r90`` Petrosian R90 radii whatever ``size`` is
    (the default 8.48 equals Galaxy Zoo 2's 0.02 x petroR90_r arcsec/pixel on
    424-pixel images); the scale is clipped to [0.05, 30] arcsec/pixel.

Both use one :class:`~galpipe.sources.download.Downloader` (bounded thread
pool, shared token-bucket rate limit, retries with backoff honouring
``Retry-After``, verification of every body).  A rerun skips galaxies whose
cutout file already reads back correctly and frames already in the cache, so
only what is missing is fetched.  Galaxies that still fail are reported in the
manifest with the reason; the call raises :class:`SourceError` only when the
failed fraction exceeds ``sdss.download.max_failure_fraction``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord
from astropy.nddata import Cutout2D
from astropy.nddata.utils import NoOverlapError
from astropy.wcs.utils import proj_plane_pixel_scales

from galpipe.errors import ConfigError, DataError, GalpipeError, SourceError
from galpipe.io import atomic_write_bytes, cutout_filename, read_cutout, write_cutout
from galpipe.sources import sdss as sdss_mod
from galpipe.sources.download import (
    DownloadConfig,
    Downloader,
    Frame,
    parse_frame_bz2,
    parse_jpeg,
    run_tasks,
)

PROVIDERS: tuple[str, ...] = ("sdss-frames", "skyserver-jpeg")
JPEG_BANDS: tuple[str, ...] = ("red", "green", "blue")
JPEG_SCALE_RANGE: tuple[float, float] = (0.05, 30.0)
MANIFEST_COLUMNS: tuple[str, ...] = ("objid", "path", "status", "reason", "n_filled")
#: Temp files of ``galpipe.io.atomic_path`` older than this are removed from the cache.
STALE_TMP_S = 3600.0


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CutoutSettings:
    """Validated ``sdss.cutouts`` settings (see the schema for meanings)."""

    provider: str
    cache_max_bytes: int | None
    frame_shape: tuple[int, int] | None
    jpeg_scale_mode: str
    jpeg_scale: float
    jpeg_span_r90: float


def cutout_settings(params: Mapping[str, Any] | None) -> CutoutSettings:
    """Validate ``sdss.cutouts`` (missing keys take their defaults)."""
    section = sdss_mod._lookup(params, "cutouts")
    if not isinstance(section, Mapping):
        raise ConfigError(f"sdss.cutouts: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - set(sdss_mod.DEFAULTS["cutouts"]))
    if unknown:
        raise ConfigError(
            f"sdss.cutouts: unknown key(s) {unknown}; expected some of {sorted(sdss_mod.DEFAULTS['cutouts'])}"
        )
    provider = sdss_mod._lookup(params, "cutouts.provider")
    if provider not in PROVIDERS:
        raise ConfigError(f"sdss.cutouts.provider: expected one of {PROVIDERS}, got {provider!r}")
    cache_mb = sdss_mod._lookup(params, "cutouts.cache_max_mb")
    cache_bytes = None
    if cache_mb is not None:
        cache_bytes = int(sdss_mod.check_number("sdss.cutouts.cache_max_mb", cache_mb, 0.0, 1e9) * 1024 * 1024)
    shape = sdss_mod._lookup(params, "cutouts.frame_shape")
    frame_shape = None
    if shape is not None:
        if isinstance(shape, str) or not isinstance(shape, Sequence) or len(shape) != 2:
            raise ConfigError(f"sdss.cutouts.frame_shape: expected [rows, columns] or null, got {shape!r}")
        frame_shape = (
            sdss_mod.check_integer("sdss.cutouts.frame_shape[0]", shape[0], 1, 20000),
            sdss_mod.check_integer("sdss.cutouts.frame_shape[1]", shape[1], 1, 20000),
        )
    mode = sdss_mod._lookup(params, "cutouts.jpeg_scale_mode")
    if mode not in ("fixed", "petro"):
        raise ConfigError(f"sdss.cutouts.jpeg_scale_mode: expected 'fixed' or 'petro', got {mode!r}")
    return CutoutSettings(
        provider=str(provider),
        cache_max_bytes=cache_bytes,
        frame_shape=frame_shape,
        jpeg_scale_mode=str(mode),
        jpeg_scale=sdss_mod._number(params, "cutouts.jpeg_scale", 0.01, 60.0),
        jpeg_span_r90=sdss_mod._number(params, "cutouts.jpeg_span_r90", 0.1, 1000.0),
    )


def download_config(params: Mapping[str, Any] | None) -> DownloadConfig:
    """The :class:`DownloadConfig` of ``sdss.download`` over its defaults."""
    section = sdss_mod._lookup(params, "download")
    if not isinstance(section, Mapping):
        raise ConfigError(f"sdss.download: expected a mapping, got {section!r}")
    merged = {**sdss_mod.DEFAULTS["download"], **dict(section)}
    return DownloadConfig.from_params(merged)


# --------------------------------------------------------------------------- URLs
def sas_instrument(dr: int) -> str:
    """The SAS path component astroquery uses for imaging of data release ``dr``."""
    if dr > 17:
        return "prior-surveys/sdss4-dr17-eboss"
    return "eboss" if dr > 12 else "boss"


def frame_url(sas_url: str, dr: int, *, run: int, rerun: int, camcol: int, field: int, band: str) -> str:
    """URL of a calibrated frame, as ``astroquery.sdss.SDSS.get_images`` builds it.

    ``{sas}/dr{dr}/{eboss|boss}/photoObj/frames/{rerun}/{run}/{camcol}/``
    ``frame-{band}-{run:06d}-{camcol}-{field:04d}.fits.bz2``
    """
    return (
        f"{sas_url.rstrip('/')}/dr{dr}/{sas_instrument(dr)}/photoObj/frames/"
        f"{int(rerun)}/{int(run)}/{int(camcol)}/"
        f"frame-{band}-{int(run):06d}-{int(camcol)}-{int(field):04d}.fits.bz2"
    )


def jpeg_url(skyserver_url: str, dr: int) -> str:
    """SkyServer ImgCutout JPEG endpoint (query: ra, dec, scale, width, height)."""
    return f"{skyserver_url.rstrip('/')}/dr{dr}/SkyServerWS/ImgCutout/getjpeg"


def jpeg_scale(settings: CutoutSettings, petro_r90: float | None, size: int) -> float:
    """Arcsec/pixel of a JPEG cutout (fixed, or ``span * petroR90_r / size``, clipped)."""
    if settings.jpeg_scale_mode == "fixed":
        return settings.jpeg_scale
    if petro_r90 is None or not np.isfinite(petro_r90) or petro_r90 <= 0:
        raise DataError(f"petroR90_r {petro_r90!r} is not a positive number (jpeg_scale_mode=petro)")
    scale = settings.jpeg_span_r90 * float(petro_r90) / size
    return float(np.clip(scale, *JPEG_SCALE_RANGE))


# --------------------------------------------------------------------------- frame cache
class FrameCache:
    """Size-bounded LRU cache of downloaded frame files.

    Files live under ``root`` with the SAS layout (``dr{DR}/{rerun}/{run}/{camcol}/``).
    Recency is the file modification time (touched on every use, so it
    survives across runs).  Files in use by a running task are pinned and
    never evicted.

    Parameters
    ----------
    root : path
        Cache directory.
    max_bytes : int or None
        Largest total size; None for no bound.
    """

    def __init__(self, root: Path, max_bytes: int | None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._index: dict[Path, tuple[float, int]] = {}
        self._pins: dict[Path, int] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for p in self.root.rglob("*"):
            if not p.is_file():
                continue
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > STALE_TMP_S:
                        p.unlink()
                continue
            if p.name.endswith(".fits.bz2"):
                st = p.stat()
                self._index[p] = (st.st_mtime, st.st_size)

    def path_for(self, dr: int, run: int, rerun: int, camcol: int, field: int, band: str) -> Path:
        """Cache path of one frame."""
        name = f"frame-{band}-{run:06d}-{camcol}-{field:04d}.fits.bz2"
        return self.root / f"dr{dr}" / str(rerun) / str(run) / str(camcol) / name

    @property
    def total_bytes(self) -> int:
        """Bytes held by the files in the index."""
        with self._lock:
            return sum(size for _, size in self._index.values())

    def pin(self, path: Path) -> None:
        """Protect ``path`` from eviction until :meth:`unpin`."""
        with self._lock:
            self._pins[path] = self._pins.get(path, 0) + 1

    def unpin(self, path: Path) -> None:
        """Release one :meth:`pin`."""
        with self._lock:
            n = self._pins.get(path, 0) - 1
            if n <= 0:
                self._pins.pop(path, None)
            else:
                self._pins[path] = n

    def get(self, path: Path) -> bytes | None:
        """Bytes of a cached frame (marking it recently used), or None."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._index.pop(path, None)
            return None
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(path, (now, now))
        with self._lock:
            self._index[path] = (now, len(data))
        return data

    def put(self, path: Path, data: bytes) -> None:
        """Store a verified frame atomically, then evict down to the size bound."""
        if self.max_bytes is not None and self.max_bytes == 0:
            return
        atomic_write_bytes(path, data)
        with self._lock:
            self._index[path] = (time.time(), len(data))
        self._evict()

    def discard(self, path: Path) -> None:
        """Remove a (corrupt) frame."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with self._lock:
            self._index.pop(path, None)

    def _evict(self) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            total = sum(size for _, size in self._index.values())
            if total <= self.max_bytes:
                return
            victims: list[Path] = []
            for path, (_, size) in sorted(self._index.items(), key=lambda kv: kv[1][0]):
                if total <= self.max_bytes:
                    break
                if path in self._pins:
                    continue
                victims.append(path)
                total -= size
            for path in victims:
                self._index.pop(path, None)
        for path in victims:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# --------------------------------------------------------------------------- helpers
def _check_catalogue(catalogue: pd.DataFrame, needed: Sequence[str]) -> None:
    if not isinstance(catalogue, pd.DataFrame):
        raise DataError(f"catalogue: expected a pandas DataFrame, got {type(catalogue).__name__}")
    missing = [c for c in needed if c not in catalogue.columns]
    if missing:
        raise DataError(f"catalogue: missing column(s) {missing}; needed {list(needed)}")
    dup = catalogue["objid"][catalogue["objid"].duplicated()]
    if len(dup):
        raise DataError(f"catalogue: objid {int(dup.iloc[0])} appears more than once")
    for c in needed:
        if c == "objid":
            continue
        bad = catalogue[c].isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"catalogue row {row}: column {c} is missing (NaN)")


def _existing_ok(path: Path, bands: Sequence[str], size: int) -> int | None:
    """``NFILLED`` of a valid existing cutout, else None (absent or unreadable)."""
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # called before any worker thread starts
            warnings.simplefilter("ignore")
            cut = read_cutout(path, bands=bands)
    except DataError:
        return None
    if cut.data.shape[1:] != (size, size):
        return None
    return int(cut.header.get("NFILLED", 0))


def _remove_stale_tmp(out_dir: Path) -> None:
    for p in out_dir.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


def _fail_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500]


# --------------------------------------------------------------------------- frames provider
def _load_frame(
    cache: FrameCache,
    downloader: Downloader,
    url: str,
    path: Path,
    expected_shape: tuple[int, int] | None,
    stats: dict[str, int],
    stats_lock: threading.Lock,
) -> Frame:
    data = cache.get(path)
    if data is not None:
        try:
            frame = parse_frame_bz2(data, expected_shape=expected_shape)
            with stats_lock:
                stats["frames_cached"] += 1
            return frame
        except DataError:
            cache.discard(path)
    body, frame, _ = downloader.fetch(url, lambda b: parse_frame_bz2(b, expected_shape=expected_shape))
    cache.put(path, body)
    with stats_lock:
        stats["frames_downloaded"] += 1
    return frame


def _cut_stamp(frames: Sequence[Frame], ra: float, dec: float, size: int) -> tuple[np.ndarray, list[Any], int, float]:
    """Cut one galaxy's stamp from each band's frame.

    Parameters
    ----------
    frames : sequence of Frame
        One decoded frame per band (``data`` of shape ``(ny, nx)``, own WCS).
    ra, dec : float
        Galaxy position (degrees); it lands on the stamp's central pixel.
    size : int
        Stamp side in pixels.

    Returns
    -------
    stack : numpy.ndarray
        float32, shape ``(n_bands, size, size)``; NaN where the stamp is off a frame.
    wcss : list of astropy.wcs.WCS
        The stamp WCS of each band (from ``Cutout2D``).
    n_filled : int
        Pixels NaN-filled in at least one band.
    scale : float
        Pixel scale of the first frame (arcsec/pixel).

    Raises
    ------
    astropy.nddata.utils.NoOverlapError
        The position is not on a frame at all.
    """
    pos = SkyCoord(ra, dec, unit="deg", frame="icrs")
    stack = np.full((len(frames), size, size), np.nan, dtype=np.float32)
    filled = np.zeros((size, size), dtype=bool)
    wcss = []
    for k, fr in enumerate(frames):
        cut = Cutout2D(fr.data, pos, (size, size), wcs=fr.wcs, mode="partial", fill_value=np.nan, copy=True)
        stack[k] = cut.data
        outside = np.ones((size, size), dtype=bool)
        outside[cut.slices_cutout] = False
        filled |= outside
        wcss.append(cut.wcs)
    scale = float(np.mean(proj_plane_pixel_scales(frames[0].wcs.celestial)) * 3600.0)
    return stack, wcss, int(filled.sum()), scale


def _frames_provider(
    todo: pd.DataFrame,
    out_dir: Path,
    *,
    bands: list[str],
    size: int,
    params: Mapping[str, Any] | None,
    settings: CutoutSettings,
    cache_dir: Path,
    downloader: Downloader,
    progress: bool,
) -> tuple[dict[int, tuple[str, str, int]], dict[str, int]]:
    dr = sdss_mod.data_release(params)
    sas = sdss_mod.sas_url(params)
    cache = FrameCache(Path(cache_dir) / "frames", settings.cache_max_bytes)
    stats = {"frames_downloaded": 0, "frames_cached": 0}
    stats_lock = threading.Lock()
    keys = ["run", "rerun", "camcol", "field"]
    groups = [(tuple(int(v) for v in key), grp) for key, grp in todo.groupby(keys, sort=True)]

    def work(item: tuple[tuple[int, ...], pd.DataFrame]) -> dict[int, tuple[str, str, int]]:
        (run, rerun, camcol, fnum), grp = item
        results: dict[int, tuple[str, str, int]] = {}
        paths = [cache.path_for(dr, run, rerun, camcol, fnum, b) for b in bands]
        for p in paths:
            cache.pin(p)
        try:
            frames = []
            for band, path in zip(bands, paths, strict=True):
                url = frame_url(sas, dr, run=run, rerun=rerun, camcol=camcol, field=fnum, band=band)
                frames.append(_load_frame(cache, downloader, url, path, settings.frame_shape, stats, stats_lock))
        except GalpipeError as exc:
            reason = f"frames of run {run} camcol {camcol} field {fnum}: {_fail_reason(exc)}"
            return {int(o): ("failed", reason, -1) for o in grp["objid"]}
        finally:
            for p in paths:
                cache.unpin(p)
        for row in grp.itertuples(index=False):
            objid = int(row.objid)
            try:
                stack, wcss, n_filled, scale = _cut_stamp(frames, float(row.ra), float(row.dec), size)
                write_cutout(
                    out_dir / cutout_filename(objid),
                    stack,
                    bands=bands,
                    objid=objid,
                    ra=float(row.ra),
                    dec=float(row.dec),
                    source="sdss",
                    bunit="nanomaggy",
                    pixel_scale=scale,
                    wcs=wcss,
                    n_filled=n_filled,
                    extra={"RUN": run, "RERUN": rerun, "CAMCOL": camcol, "FIELD": fnum, "DR": dr},
                )
                results[objid] = ("ok", "", n_filled)
            except NoOverlapError:
                results[objid] = (
                    "failed",
                    f"position ({float(row.ra):.6f}, {float(row.dec):.6f}) lies outside the "
                    f"frames of run {run} camcol {camcol} field {fnum}",
                    -1,
                )
            except (GalpipeError, OSError, ValueError) as exc:
                results[objid] = ("failed", _fail_reason(exc), -1)
        return results

    merged: dict[int, tuple[str, str, int]] = {}
    for res in run_tasks(
        groups,
        work,
        concurrency=downloader.config.concurrency,
        weight=lambda item: len(item[1]),
        progress=progress,
        desc="sdss frames",
    ):
        merged.update(res)
    return merged, stats


# --------------------------------------------------------------------------- JPEG provider
def _jpeg_provider(
    todo: pd.DataFrame,
    out_dir: Path,
    *,
    size: int,
    params: Mapping[str, Any] | None,
    settings: CutoutSettings,
    downloader: Downloader,
    progress: bool,
) -> tuple[dict[int, tuple[str, str, int]], dict[str, int]]:
    dr = sdss_mod.data_release(params)
    url = jpeg_url(sdss_mod.skyserver_url(params), dr)
    rows = list(todo.to_dict(orient="records"))

    def work(row: dict[str, Any]) -> tuple[int, tuple[str, str, int]]:
        objid = int(row["objid"])
        try:
            scale = jpeg_scale(settings, row.get("petroR90_r"), size)
            query = {
                "ra": f"{float(row['ra']):.8f}",
                "dec": f"{float(row['dec']):.8f}",
                "scale": f"{scale:.6f}",
                "width": str(size),
                "height": str(size),
            }
            _, rgb, _ = downloader.fetch(url, lambda b: parse_jpeg(b, expected_size=(size, size)), params=query)
            # JPEG rows run top to bottom; the FITS layout has y increasing upwards
            write_cutout(
                out_dir / cutout_filename(objid),
                rgb[:, ::-1, :],
                bands=JPEG_BANDS,
                objid=objid,
                ra=float(row["ra"]),
                dec=float(row["dec"]),
                source="sdss",
                bunit="DN",
                pixel_scale=scale,
                n_filled=0,
                extra={"DR": dr},
            )
            return objid, ("ok", "", 0)
        except (GalpipeError, OSError, ValueError) as exc:
            return objid, ("failed", _fail_reason(exc), -1)

    results = run_tasks(
        rows,
        work,
        concurrency=downloader.config.concurrency,
        progress=progress,
        desc="skyserver jpeg",
    )
    return dict(results), {"jpegs_downloaded": sum(1 for _, r in results if r[0] == "ok")}


# --------------------------------------------------------------------------- public API
def fetch_cutouts(
    catalogue: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    bands: Sequence[str],
    size: int,
    params: Mapping[str, Any] | None,
    cache_dir: str | os.PathLike[str],
    progress: bool = False,
) -> pd.DataFrame:
    """Fetch and write one cutout per galaxy of ``catalogue``.

    Parameters
    ----------
    catalogue : pandas.DataFrame
        Needs ``objid``, ``ra``, ``dec``; ``run``, ``rerun``, ``camcol``,
        ``field`` for ``sdss-frames``; ``petroR90_r`` for JPEG ``petro`` scaling.
    out_dir : path
        Where ``{objid}.fits`` files go (galpipe cutout layout).
    bands : sequence of str
        ``sdss-frames``: SDSS bands (ugriz), one image HDU each.
        ``skyserver-jpeg``: must be ``["red", "green", "blue"]``.
    size : int
        Stamp side in pixels (8..1024).
    params : mapping
        The ``sdss:`` config section (``cutouts`` and ``download`` used).
    cache_dir : path
        Root of the frame cache (frames go to ``{cache_dir}/frames/...``).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    pandas.DataFrame
        Manifest, one row per input galaxy in input order: ``objid`` (int64),
        ``path`` (str), ``status`` (``"ok"``/``"failed"``), ``reason`` (str,
        empty when ok), ``n_filled`` (int64; -1 when failed).  ``attrs["stats"]``
        holds counters (frames downloaded/cached, cutouts skipped, requests).

    Raises
    ------
    ConfigError
        Invalid settings or bands.
    DataError
        Malformed catalogue.
    SourceError
        More than ``max_failure_fraction`` of the galaxies failed (the message
        summarises the reasons).
    """
    settings = cutout_settings(params)
    dl_config = download_config(params)
    size = sdss_mod.check_integer("size", size, 8, 1024)
    if settings.provider == "skyserver-jpeg":
        if list(bands) != list(JPEG_BANDS):
            raise ConfigError(
                f"bands: the skyserver-jpeg provider writes bands {list(JPEG_BANDS)}; "
                f"set bands to that list (got {list(bands)})"
            )
        band_list = list(JPEG_BANDS)
        needed = ["objid", "ra", "dec"] + (["petroR90_r"] if settings.jpeg_scale_mode == "petro" else [])
    else:
        band_list = sdss_mod.validate_bands(bands)
        needed = ["objid", "ra", "dec", "run", "rerun", "camcol", "field"]
    sdss_mod.data_release(params)
    _check_catalogue(catalogue, needed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)

    objids = [int(o) for o in catalogue["objid"]]
    paths = {o: out / cutout_filename(o) for o in objids}
    results: dict[int, tuple[str, str, int]] = {}
    for o in objids:
        n_filled = _existing_ok(paths[o], band_list, size)
        if n_filled is not None:
            results[o] = ("ok", "", n_filled)
    n_skipped = len(results)
    todo = catalogue[[o not in results for o in objids]]
    stats: dict[str, int] = {}
    with Downloader(dl_config) as downloader:
        if len(todo):
            if settings.provider == "sdss-frames":
                got, stats = _frames_provider(
                    todo,
                    out,
                    bands=band_list,
                    size=size,
                    params=params,
                    settings=settings,
                    cache_dir=Path(cache_dir),
                    downloader=downloader,
                    progress=progress,
                )
            else:
                got, stats = _jpeg_provider(
                    todo,
                    out,
                    size=size,
                    params=params,
                    settings=settings,
                    downloader=downloader,
                    progress=progress,
                )
            results.update(got)
        n_requests = downloader.n_requests
    manifest = pd.DataFrame(
        {
            "objid": np.array(objids, dtype=np.int64),
            "path": [str(paths[o]) for o in objids],
            "status": [results[o][0] for o in objids],
            "reason": [results[o][1] for o in objids],
            "n_filled": np.array([results[o][2] for o in objids], dtype=np.int64),
        }
    )
    manifest.attrs["stats"] = {
        **stats,
        "skipped_existing": n_skipped,
        "requests": n_requests,
        "provider": settings.provider,
    }
    failed = manifest[manifest["status"] == "failed"]
    if len(manifest) and len(failed) / len(manifest) > dl_config.max_failure_fraction:
        reasons = failed["reason"].value_counts().head(3)
        summary = "; ".join(f"{n} x {r[:200]}" for r, n in reasons.items())
        raise SourceError(
            f"sdss cutouts: {len(failed)} of {len(manifest)} galaxies failed "
            f"({len(failed) / len(manifest):.1%} > sdss.download.max_failure_fraction="
            f"{dl_config.max_failure_fraction}); most common reasons: {summary}"
        )
    return manifest
