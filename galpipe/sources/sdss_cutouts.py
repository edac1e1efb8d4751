"""Per-galaxy cutouts from live SDSS: calibrated frames -> stamps, or SkyServer JPEGs.

Two providers (``sdss.cutouts.provider``):

``sdss-frames`` (default)
    For every field (``run, rerun, camcol, field``) holding galaxies that still
    lack a cutout, the calibrated frames ``frame-{band}-{run:06d}-{camcol}-{field:04d}.fits.bz2``
    are fetched once from the SAS (the URL astroquery's ``SDSS.get_images``
    builds from ``conf.sas_baseurl``; here from ``sdss.sas_url``), verified, and
    kept in a size-bounded LRU cache under ``{cache_dir}/frames/dr{DR}/...``.
    Only HDU 0 (the 2048 x 1489 image in nanomaggies) is used; the calibration,
    sky and trace HDUs are verified to be there and otherwise ignored.
    Each galaxy's stamp is cut from HDU 0 of every band with
    ``Cutout2D(data, SkyCoord(ra, dec), (size, size), wcs=frame_wcs,
    mode='partial', fill_value=nan)``, then turned north up, east left in FITS
    row order (row 0 = south edge) by an exact transpose/flip: drift-scan frames
    are transposed, columns running across the scan (:func:`.cutout_fits.north_up_op`).
    Pixels off the frame are NaN and counted in ``NFILLED`` (pixels NaN-filled
    in at least one band); a stamp with more than
    ``sdss.cutouts.max_fill_fraction`` of its pixels filled fails, its reason
    giving the count.  Callers shard catalogues by field
    (:attr:`.sdss.SdssSource.shard_group_columns`), so each frame is fetched
    by one job.
``skyserver-jpeg``
    SkyServer ``/dr{DR}/SkyServerWS/ImgCutout/getjpeg`` colour cutouts (what
    Galaxy Zoo volunteers saw), written as ``bunit="DN"`` uint8 with bands
    ``red, green, blue``.  ``jpeg_scale_mode: fixed`` uses ``jpeg_scale``
    arcsec/pixel; ``petro`` uses ``jpeg_span_r90 * petroR90_r / size`` so the
    stamp side spans ``jpeg_span_r90`` Petrosian R90 radii whatever ``size`` is
    (the default 8.48 equals Galaxy Zoo 2's 0.02 x petroR90_r arcsec/pixel on
    424-pixel images); the scale is clipped to [0.05, 30] arcsec/pixel and to
    what ImgCutout can serve.  Requests stay within ImgCutout's limits
    (:data:`JPEG_SIDE_LIMITS`, :data:`JPEG_SCALE_LIMITS`; it silently clamps
    anything else): a cutout smaller than 64 pixels is fetched at 64 pixels
    over the same field of view and area-averaged down to ``size`` locally
    (:func:`jpeg_request`, :func:`resample_area`).  JPEG rows (top = north)
    are turned into the FITS row order of :mod:`galpipe.io.cutout_fits`
    (north up, east left with ``origin="lower"``).

Both use one :class:`~galpipe.sources.download.Downloader` (bounded thread
pool, shared token-bucket rate limit, retries with backoff honouring
``Retry-After``, verification of every body).  A rerun skips galaxies whose
cutout file already reads back correctly and frames already in the cache, so
only what is missing is fetched.  Cutouts are written and validated by the
shared :class:`~galpipe.sources.base.CutoutCache` (atomic writes; a parallel
shard job's temporary file is never touched).  Galaxies that still fail are
reported in the manifest with ``status="failed"`` and the reason: the one
threshold, ``max_reject_fraction``, is applied by the cutouts stage.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord
from astropy.nddata import Cutout2D
from astropy.nddata.utils import NoOverlapError
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from galpipe.errors import ConfigError, DataError, GalpipeError
from galpipe.io.atomic import atomic_write_bytes
from galpipe.io.cutout_fits import apply_pixel_op, image_rows_to_fits, north_up_op, transform_wcs
from galpipe.settings import SdssConfig, SdssCutouts
from galpipe.sources.base import CutoutCache, PathLike, manifest_frame
from galpipe.sources.download import (
    Downloader,
    Frame,
    parse_frame_bz2,
    parse_jpeg,
    run_tasks,
)
from galpipe.sources.sdss import sdss_section

PROVIDERS: tuple[str, ...] = ("sdss-frames", "skyserver-jpeg")
JPEG_BANDS: tuple[str, ...] = ("red", "green", "blue")
#: ``jpeg_scale_mode: petro``: the cutout's arcsec/pixel is clipped to this range.
JPEG_SCALE_RANGE: tuple[float, float] = (0.05, 30.0)
#: ImgCutout's width/height limits for SDSS images, pixels: SkyServerWS (github.com/sciserver/
#: SkyServerWS, commit 7cc9bb3eb8cf3788176ebbb4783c8cfe9cc75e60) Sciserver_webService/ImgCutout/
#: ImgCutout.cs lines 30-33, applied by clamping (``validateInput``, lines 709-710), never refused.
JPEG_SIDE_LIMITS: tuple[int, int] = (64, 2048)
#: ImgCutout's scale limits, arcsec/pixel: 0.015 (ImgCutout.cs line 35) to 60, the documented
#: upper limit (doc comment line 217, getJpegController.cs lines 38 and 74); the code clamps at
#: 2400 (line 34, line 711).  galpipe keeps every request inside this range.
JPEG_SCALE_LIMITS: tuple[float, float] = (0.015, 60.0)
#: SDSS imaging bands a frame exists for.
FRAME_BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z")
#: Temp files of ``galpipe.io.atomic.atomic_path`` older than this are removed from the frame cache.
STALE_TMP_S = 3600.0
#: One galaxy's outcome: ``(status, reason, n_filled)``.
Result = tuple[str, str, int]


def cache_max_bytes(cutouts: SdssCutouts) -> int | None:
    """The frame-cache bound ``sdss.cutouts.cache_max_mb`` in bytes (None: no bound)."""
    return None if cutouts.cache_max_mb is None else int(float(cutouts.cache_max_mb) * 1024 * 1024)


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


@dataclass(frozen=True)
class JpegRequest:
    """One ImgCutout request for a ``size`` x ``size`` cutout.

    Attributes
    ----------
    side : int
        ``width`` = ``height`` asked for: ``max(size, 64)``, within :data:`JPEG_SIDE_LIMITS`.
    request_scale : float
        ``scale`` asked for (arcsec/pixel), within :data:`JPEG_SCALE_LIMITS`.
    cutout_scale : float
        Arcsec/pixel of the cutout after area-averaging ``side`` down to ``size``
        pixels (``request_scale * side / size``; the field of view is the same).
    """

    side: int
    request_scale: float
    cutout_scale: float


def jpeg_side(size: int) -> int:
    """Pixels per side to request for a ``size``-pixel cutout: ``size`` within :data:`JPEG_SIDE_LIMITS`."""
    return int(min(max(int(size), JPEG_SIDE_LIMITS[0]), JPEG_SIDE_LIMITS[1]))


def jpeg_cutout_scale_limits(size: int) -> tuple[float, float]:
    """The cutout arcsec/pixel range a ``size``-pixel cutout can have with requests inside ImgCutout's limits."""
    factor = jpeg_side(size) / int(size)
    return JPEG_SCALE_LIMITS[0] * factor, JPEG_SCALE_LIMITS[1] * factor


def jpeg_request(cutouts: SdssCutouts, petro_r90: float | None, size: int) -> JpegRequest:
    """What to ask ImgCutout for so that the cutout is ``size`` pixels at the configured scale.

    ``fixed``: the cutout scale is ``jpeg_scale``.  ``petro``: ``jpeg_span_r90 *
    petroR90_r / size``, clipped to :data:`JPEG_SCALE_RANGE` and to
    :func:`jpeg_cutout_scale_limits`.  The request is ``side = max(size, 64)`` pixels
    at ``cutout_scale * size / side`` arcsec/pixel: the same field of view.

    Raises
    ------
    DataError
        ``petro`` and ``petroR90_r`` is not a positive number.
    ConfigError
        ``fixed`` and ``jpeg_scale`` at this ``size`` would ask for a scale outside
        ImgCutout's limits (validation refuses such a config first).
    """
    side = jpeg_side(size)
    lo, hi = jpeg_cutout_scale_limits(size)
    if cutouts.jpeg_scale_mode == "fixed":
        scale = float(cutouts.jpeg_scale)
        if not lo <= scale <= hi:
            raise ConfigError(
                f"sdss.cutouts.jpeg_scale: {scale} arcsec/pixel at cutout_size {size} would ask ImgCutout for "
                f"{scale * size / side:.6g} arcsec/pixel on {side} pixels, outside its limits "
                f"{list(JPEG_SCALE_LIMITS)}; use {lo:.6g}..{hi:.6g} at this size")
    else:
        if petro_r90 is None or not np.isfinite(petro_r90) or petro_r90 <= 0:
            raise DataError(f"petroR90_r {petro_r90!r} is not a positive number (jpeg_scale_mode=petro)")
        scale = float(cutouts.jpeg_span_r90) * float(petro_r90) / size
        scale = float(np.clip(scale, max(JPEG_SCALE_RANGE[0], lo), min(JPEG_SCALE_RANGE[1], hi)))
    request = float(np.clip(scale * size / side, *JPEG_SCALE_LIMITS))  # only float rounding is clipped
    return JpegRequest(side=side, request_scale=request, cutout_scale=scale)


def jpeg_scale(cutouts: SdssCutouts, petro_r90: float | None, size: int) -> float:
    """Arcsec/pixel of a ``size``-pixel JPEG cutout (:attr:`JpegRequest.cutout_scale` of :func:`jpeg_request`)."""
    return jpeg_request(cutouts, petro_r90, size).cutout_scale


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """Shape ``(n_out, n_in)``: the fraction of output pixel ``i`` that input pixel ``j`` covers.

    Output pixel ``i`` spans ``[i, i + 1) * n_in / n_out`` in input pixels; each row sums to 1.
    """
    edges_out = np.arange(n_out + 1) * (n_in / n_out)
    lo = np.maximum(edges_out[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges_out[1:, None], np.arange(n_in)[None, :] + 1.0)
    return np.clip(hi - lo, 0.0, None) / (n_in / n_out)


def resample_area(rgb: np.ndarray, size: int) -> np.ndarray:
    """Area-average 8-bit planes to ``size`` x ``size`` pixels (antialiased downsampling).

    Each output pixel is the mean of the input pixels it covers, partial overlaps
    weighted by their area (for a whole factor, e.g. 64 -> 32, exactly the 2 x 2
    block means), computed in float64 and rounded half up.  The JPEG's detail and
    noise average down as a coarser camera would record them; nothing aliases.

    Parameters
    ----------
    rgb : numpy.ndarray
        uint8, shape ``(n_planes, ny, nx)``.
    size : int
        Output side.

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(n_planes, size, size)``; ``rgb`` itself when already that size.
    """
    if rgb.shape[1:] == (size, size):
        return rgb
    wy = _area_weights(rgb.shape[1], size)
    wx = _area_weights(rgb.shape[2], size)
    out = np.einsum("ij,kjl,ml->kim", wy, rgb.astype(np.float64), wx)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


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


@dataclass(frozen=True)
class Stamp:
    """One galaxy's stamp cut from its field's frames, north up and east left.

    Attributes
    ----------
    data : numpy.ndarray
        float32, shape ``(n_bands, size, size)``, FITS row order: row 0 is the south
        edge, rows grow northwards and columns westwards (``imshow(origin="lower")``
        shows north up, east left); NaN where the stamp lies off a frame.
    wcs : list of astropy.wcs.WCS
        ``n_bands`` stamp WCSs (exact; frames of different bands are not pixel-aligned).
    filled_per_band : tuple of int
        ``n_bands`` counts of NaN-filled pixels.
    n_filled : int
        Pixels NaN-filled in at least one band.
    pixel_scale : float
        Pixel scale of the first band's frame (arcsec/pixel).
    """

    data: np.ndarray
    wcs: list[WCS]
    filled_per_band: tuple[int, ...]
    n_filled: int
    pixel_scale: float


def _cut_stamp(frames: Sequence[Frame], ra: float, dec: float, size: int) -> Stamp:
    """Cut one galaxy's stamp from each band's frame and turn it north up, east left.

    Each band's ``Cutout2D`` (partial, NaN fill) is taken in the frame's own
    orientation -- drift-scan frames are transposed, with columns across the
    scan -- then transposed/flipped to the closest north-up, east-left grid
    (:func:`galpipe.io.cutout_fits.north_up_op`, the cutout layout's own
    convention; exact: pixel values are never resampled), with its WCS.

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
    Stamp
        ``data`` of shape ``(n_bands, size, size)``.

    Raises
    ------
    astropy.nddata.utils.NoOverlapError
        The position is not on a frame at all.
    """
    pos = SkyCoord(ra, dec, unit="deg", frame="icrs")
    stack = np.full((len(frames), size, size), np.nan, dtype=np.float32)
    outside = np.ones((len(frames), size, size), dtype=bool)
    wcss: list[WCS] = []
    for k, fr in enumerate(frames):
        cut = Cutout2D(fr.data, pos, (size, size), wcs=fr.wcs, mode="partial", fill_value=np.nan, copy=True)
        off = np.ones((size, size), dtype=bool)
        off[cut.slices_cutout] = False
        op = north_up_op(cut.wcs, (size, size))
        stack[k] = apply_pixel_op(cut.data, op)
        outside[k] = apply_pixel_op(off, op)
        wcss.append(transform_wcs(cut.wcs, op, (size, size)))
    scale = float(np.mean(proj_plane_pixel_scales(frames[0].wcs.celestial)) * 3600.0)
    per_band = tuple(int(v) for v in outside.sum(axis=(1, 2)))
    return Stamp(stack, wcss, per_band, int(outside.any(axis=0).sum()), scale)


def fill_rejection(n_filled: int, size: int, max_fill_fraction: float) -> str:
    """The failure reason of a stamp with ``n_filled`` of ``size**2`` pixels off the frame, or ``""`` if it passes."""
    total = size * size
    if n_filled <= max_fill_fraction * total:
        return ""
    return (f"stamp runs off the frame: {n_filled} of {total} pixels ({100.0 * n_filled / total:.1f}%) "
            f"NaN-filled, more than sdss.cutouts.max_fill_fraction = {max_fill_fraction:g}")


class _FieldWorker:
    """Makes the stamps of the galaxies of one field at a time (run by :func:`run_tasks` threads).

    The field's frames (one per band) are loaded once, from the frame cache
    or the SAS, pinned while in use, and every galaxy's stamp is cut from them.
    """

    def __init__(self, cache: CutoutCache, *, sdss: SdssConfig, bands: Sequence[str], size: int,
                 frame_cache_dir: Path, downloader: Downloader) -> None:
        self.cache = cache
        self.bands = list(bands)
        self.size = size
        self.max_fill_fraction = float(sdss.cutouts.max_fill_fraction)
        self.dr = sdss.data_release
        self.sas = sdss.sas_url.rstrip("/")
        shape = sdss.cutouts.frame_shape
        self.frame_shape: tuple[int, int] | None = (int(shape[0]), int(shape[1])) if shape is not None else None
        self.frames = FrameCache(Path(frame_cache_dir) / "frames", cache_max_bytes(sdss.cutouts))
        self.downloader = downloader
        self.stats = {"frames_downloaded": 0, "frames_cached": 0}
        self.stats_lock = threading.Lock()

    def _field_frames(self, run: int, rerun: int, camcol: int, fnum: int) -> list[Frame]:
        paths = [self.frames.path_for(self.dr, run, rerun, camcol, fnum, b) for b in self.bands]
        for p in paths:
            self.frames.pin(p)
        try:
            return [
                _load_frame(self.frames, self.downloader,
                            frame_url(self.sas, self.dr, run=run, rerun=rerun, camcol=camcol, field=fnum, band=band),
                            path, self.frame_shape, self.stats, self.stats_lock)
                for band, path in zip(self.bands, paths, strict=True)
            ]
        finally:
            for p in paths:
                self.frames.unpin(p)

    def _stamp(self, row: Any, frames: Sequence[Frame], field_key: tuple[int, int, int, int]) -> Result:
        run, rerun, camcol, fnum = field_key
        ra, dec = float(row.ra), float(row.dec)
        try:
            stamp = _cut_stamp(frames, ra, dec, self.size)
            rejected = fill_rejection(stamp.n_filled, self.size, self.max_fill_fraction)
            if rejected:
                return "failed", f"{rejected} (run {run} camcol {camcol} field {fnum})", -1
            self.cache.write(int(row.objid), stamp.data, bands=self.bands, ra=ra, dec=dec, source="sdss",
                             bunit="nanomaggy", pixel_scale=stamp.pixel_scale, wcs=stamp.wcs,
                             n_filled=stamp.n_filled,
                             extra={"RUN": run, "RERUN": rerun, "CAMCOL": camcol, "FIELD": fnum, "DR": self.dr})
            return "ok", "", stamp.n_filled
        except NoOverlapError:
            return ("failed", f"position ({ra:.6f}, {dec:.6f}) lies outside the "
                    f"frames of run {run} camcol {camcol} field {fnum}", -1)
        except (GalpipeError, OSError, ValueError) as exc:
            return "failed", _fail_reason(exc), -1

    def __call__(self, item: tuple[tuple[int, int, int, int], pd.DataFrame]) -> dict[int, Result]:
        field_key, grp = item
        run, rerun, camcol, fnum = field_key
        try:
            frames = self._field_frames(run, rerun, camcol, fnum)
        except GalpipeError as exc:
            reason = f"frames of run {run} camcol {camcol} field {fnum}: {_fail_reason(exc)}"
            return {int(o): ("failed", reason, -1) for o in grp["objid"]}
        return {int(row.objid): self._stamp(row, frames, field_key) for row in grp.itertuples(index=False)}


def _frames_provider(
    todo: pd.DataFrame,
    cache: CutoutCache,
    *,
    sdss: SdssConfig,
    bands: Sequence[str],
    size: int,
    frame_cache_dir: Path,
    downloader: Downloader,
    progress: bool,
) -> tuple[dict[int, Result], dict[str, int]]:
    """Stamps of ``todo`` cut from the calibrated frames, fetched once per field (in parallel)."""
    worker = _FieldWorker(cache, sdss=sdss, bands=bands, size=size, frame_cache_dir=frame_cache_dir,
                          downloader=downloader)
    keys = ["run", "rerun", "camcol", "field"]
    groups = [(tuple(int(v) for v in key), grp) for key, grp in todo.groupby(keys, sort=True)]
    merged: dict[int, Result] = {}
    for res in run_tasks(groups, worker, concurrency=downloader.config.concurrency,
                         weight=lambda item: len(item[1]), progress=progress, desc="sdss frames"):
        merged.update(res)
    return merged, worker.stats


# --------------------------------------------------------------------------- JPEG provider
def _jpeg_provider(
    todo: pd.DataFrame,
    cache: CutoutCache,
    *,
    sdss: SdssConfig,
    size: int,
    downloader: Downloader,
    progress: bool,
) -> tuple[dict[int, Result], dict[str, int]]:
    """SkyServer ImgCutout JPEGs of ``todo`` (one request per galaxy, in parallel)."""
    dr = sdss.data_release
    url = jpeg_url(sdss.skyserver_url, dr)
    rows = list(todo.to_dict(orient="records"))

    def work(row: dict[str, Any]) -> tuple[int, Result]:
        objid = int(row["objid"])
        try:
            req = jpeg_request(sdss.cutouts, row.get("petroR90_r"), size)
            query = {
                "ra": f"{float(row['ra']):.8f}",
                "dec": f"{float(row['dec']):.8f}",
                "scale": f"{req.request_scale:.6f}",
                "width": str(req.side),
                "height": str(req.side),
            }
            side = (req.side, req.side)
            _, rgb, _ = downloader.fetch(url, lambda b: parse_jpeg(b, expected_size=side), params=query)
            # area-average to the cutout size, then JPEG rows (top = north) into FITS row order
            planes = image_rows_to_fits(resample_area(rgb, size))
            cache.write(objid, planes, bands=JPEG_BANDS, ra=float(row["ra"]), dec=float(row["dec"]),
                        source="sdss", bunit="DN", pixel_scale=req.cutout_scale, n_filled=0,
                        extra={"DR": dr, "JPEGSIDE": (req.side, "pixels per side fetched from ImgCutout")})
            return objid, ("ok", "", 0)
        except (GalpipeError, OSError, ValueError) as exc:
            return objid, ("failed", _fail_reason(exc), -1)

    results = run_tasks(rows, work, concurrency=downloader.config.concurrency, progress=progress,
                        desc="skyserver jpeg")
    return dict(results), {"jpegs_downloaded": sum(1 for _, r in results if r[0] == "ok")}


# --------------------------------------------------------------------------- public API
def provider_bands(cutouts: SdssCutouts, bands: Sequence[str]) -> tuple[str, ...]:
    """The bands the configured provider writes: ``bands`` (ugriz) for frames, :data:`JPEG_BANDS` for JPEGs.

    :func:`galpipe.config.cross_field_checks` makes a config consistent; this
    guards direct library calls (a band name also becomes part of a URL).

    Raises
    ------
    ConfigError
        ``bands`` do not suit the provider (the message names ``bands``).
    """
    if cutouts.provider == "skyserver-jpeg":
        if tuple(bands) != JPEG_BANDS:
            raise ConfigError(f"bands: the skyserver-jpeg provider writes bands {list(JPEG_BANDS)}; "
                              f"set bands to that list (got {list(bands)})")
        return JPEG_BANDS
    bad = [b for b in bands if b not in FRAME_BANDS]
    if bad or not bands or len(set(bands)) != len(bands):
        raise ConfigError(f"bands: the sdss-frames provider needs distinct SDSS bands from {list(FRAME_BANDS)}, "
                          f"got {list(bands)}")
    return tuple(bands)


def _needed_columns(cutouts: SdssCutouts) -> list[str]:
    """Catalogue columns the configured provider reads."""
    if cutouts.provider == "skyserver-jpeg":
        return ["objid", "ra", "dec"] + (["petroR90_r"] if cutouts.jpeg_scale_mode == "petro" else [])
    return ["objid", "ra", "dec", "run", "rerun", "camcol", "field"]


def _reuse_valid(objids: Sequence[int], cache: CutoutCache, *, bands: Sequence[str], size: int,
                 max_fill_fraction: float) -> dict[int, Result]:
    """Results of the galaxies whose cutout is already valid in ``cache`` (their stored ``NFILLED`` kept).

    A stored stamp with more NaN-filled pixels than ``max_fill_fraction`` allows
    counts as failed (with the reason) without being fetched again.
    """
    out: dict[int, Result] = {}
    for o in objids:
        cut = cache.load_valid(o, size=size, bands=bands)
        if cut is not None:
            n_filled = int(cut.header.get("NFILLED", 0))
            rejected = fill_rejection(n_filled, size, max_fill_fraction)
            out[o] = ("failed", rejected, -1) if rejected else ("ok", "", n_filled)
    return out


def fetch_cutouts(
    catalogue: pd.DataFrame,
    cache: CutoutCache | PathLike,
    *,
    sdss: SdssConfig | Mapping[str, Any],
    bands: Sequence[str],
    size: int,
    frame_cache_dir: PathLike,
    progress: bool = False,
) -> pd.DataFrame:
    """Fetch and write one cutout per galaxy of ``catalogue`` into ``cache``.

    Parameters
    ----------
    catalogue : pandas.DataFrame
        Needs ``objid``, ``ra``, ``dec``; ``run``, ``rerun``, ``camcol``,
        ``field`` for ``sdss-frames``; ``petroR90_r`` for JPEG ``petro`` scaling.
    cache : CutoutCache or path-like
        Where the cutouts go (a folder becomes ``CutoutCache(folder)``); a
        valid cached cutout is kept (not fetched again).
    sdss : SdssConfig or mapping
        The validated ``sdss:`` section (``data_release``, URLs, ``cutouts``,
        ``download`` used; a mapping goes through :func:`.sdss.sdss_section`).
    bands : sequence of str
        ``sdss-frames``: SDSS bands (ugriz), one image HDU each.
        ``skyserver-jpeg``: ``["red", "green", "blue"]``.
    size : int
        Stamp side in pixels.
    frame_cache_dir : path-like
        Root of the frame cache (frames go to ``{frame_cache_dir}/frames/...``).
    progress : bool
        Report progress (:mod:`galpipe.progress`).

    Returns
    -------
    pandas.DataFrame
        Manifest, one row per input galaxy in input order: ``objid`` (int64),
        ``path`` (str), ``status`` (``"ok"``/``"failed"``), ``reason`` (str,
        empty when ok), ``n_filled`` (int64; -1 when failed).  Failed galaxies
        never raise: the caller applies ``max_reject_fraction``.
        ``attrs["stats"]`` holds counters (frames downloaded/cached, cutouts
        skipped, requests, provider).

    Raises
    ------
    ConfigError
        ``bands`` do not suit the provider, or a mapping ``sdss`` is not a valid section.
    DataError
        Malformed catalogue (missing column or value, duplicate ``objid``).
    """
    sdss = sdss_section(sdss)
    if not isinstance(cache, CutoutCache):
        cache = CutoutCache(cache)
    cutouts = sdss.cutouts
    band_list = provider_bands(cutouts, bands)
    _check_catalogue(catalogue, _needed_columns(cutouts))
    objids = [int(o) for o in catalogue["objid"]]
    max_fill = float(cutouts.max_fill_fraction) if cutouts.provider == "sdss-frames" else 1.0
    results = _reuse_valid(objids, cache, bands=band_list, size=size, max_fill_fraction=max_fill)
    n_skipped = len(results)
    todo = catalogue[[o not in results for o in objids]]
    stats: dict[str, int] = {}
    # the request budget is shared by every job of the run (and every run using this cache)
    with Downloader(sdss.download, rate_state_dir=Path(frame_cache_dir) / "rate") as downloader:
        if len(todo) and cutouts.provider == "sdss-frames":
            got, stats = _frames_provider(todo, cache, sdss=sdss, bands=band_list, size=size,
                                          frame_cache_dir=Path(frame_cache_dir), downloader=downloader,
                                          progress=progress)
            results.update(got)
        elif len(todo):
            got, stats = _jpeg_provider(todo, cache, sdss=sdss, size=size, downloader=downloader, progress=progress)
            results.update(got)
        n_requests = downloader.n_requests
    manifest = manifest_frame((o, str(cache.path(o)), *results[o]) for o in objids)
    manifest.attrs["stats"] = {**stats, "skipped_existing": n_skipped, "requests": n_requests,
                               "provider": cutouts.provider}
    return manifest
