"""Atomic file writes and the per-galaxy cutout FITS layout shared by every source.

Cutout layout (written identically by the simulated, image-folder and live SDSS
sources, so that everything downstream is the same code):

* primary HDU: no data; header keys ``OBJID`` (int), ``RA``/``DEC`` (deg),
  ``BANDS`` (comma-separated band names, e.g. ``"g,r,i"``), ``NBANDS``,
  ``BUNIT`` (``"nanomaggy"`` for calibrated fluxes, ``"DN"`` for 8-bit images),
  ``SOURCE`` (``simulated``/``images``/``sdss``), ``NFILLED`` (pixels filled
  with NaN because the stamp ran off the frame), ``PIXSCALE`` (arcsec/pixel).
* one ``ImageHDU`` per band, in ``BANDS`` order, ``EXTNAME`` = band name,
  2-D data of shape ``(ny, nx)`` (float32 fluxes, or uint8 for ``DN``), a
  celestial TAN WCS centred on the galaxy, ``BUNIT`` and ``FILTER`` = band.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.wcs import WCS

from galpipe.errors import DataError

#: Largest cutout side accepted when reading (pixels); checked from the header
#: before any data is allocated.
MAX_CUTOUT_SIDE = 4096

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# --------------------------------------------------------------------------- atomic writes
#: Temporary files of another host (or of an older galpipe) are removed once this old (seconds).
STALE_TEMP_SECONDS = 3600.0

_HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
# ".<final name>.p<pid>h<host tag>.<random>.tmp", as made by atomic_path
_TEMP_NAME = re.compile(r"^\..+\.p(?P<pid>\d{1,10})h(?P<host>[0-9a-f]{8})\.[a-z0-9_]{8}\.tmp$")
# ".<final name>.<random>.tmp": the format before the writer's pid was recorded
_OLD_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_swept: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user) or not a pid we can judge: keep the file
    return True


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that :func:`atomic_path` writers left behind when killed.

    A temporary file is stale when the process that wrote it (its pid is in
    the name) no longer runs on this host, or, for a file written on another
    host or by an older galpipe, when it is older than
    :data:`STALE_TEMP_SECONDS`.  Files of live writers are never touched, so
    this is safe while other jobs write into the same directory.

    Parameters
    ----------
    directory : path-like
        Folder to clean (not recursive).

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        m = _TEMP_NAME.fullmatch(name)
        try:
            if m and m["host"] == _HOST_TAG:
                stale = not _pid_alive(int(m["pid"]))
            elif m or _OLD_TEMP_NAME.fullmatch(name):
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            else:
                stale = False
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # vanished meanwhile or not ours to delete
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory (same filesystem) so the
    final :func:`os.replace` is atomic.  On any exception the temporary file is
    removed and ``path`` is left untouched (either absent or the old version).
    A process killed outright (SIGKILL, power loss) cannot clean up: the first
    atomic write into a directory in each process removes what such writers
    left there (:func:`remove_stale_temps`).

    Parameters
    ----------
    path : path-like
        Final destination.
    durable : bool
        Also ``fsync`` the file before the rename, so it survives a power
        loss, not only a killed process (slow for many small files).

    Yields
    ------
    pathlib.Path
        Temporary path to write to (it does not exist yet).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.abspath(final.parent)
    if key not in _swept:
        remove_stale_temps(final.parent)
        _swept.add(key)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.p{os.getpid()}h{_HOST_TAG}.", suffix=".tmp", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise DataError(f"atomic write of {final}: nothing was written")
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def safe_filename(name: object, *, what: str = "name") -> str:
    """Return ``str(name)`` if it is safe as a single path component.

    Object ids and labels are never used raw in paths: only
    ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (max 128 chars, no ``..``) passes.

    Raises
    ------
    DataError
        If the name contains path separators, NUL, ``..`` or other characters.
    """
    text = str(name)
    if not _SAFE_NAME.fullmatch(text) or ".." in text:  # fullmatch: '$' alone allows a final newline
        raise DataError(
            f"{what} {text!r} is not usable as a file name "
            "(allowed: letters, digits, '_', '-', '.', no '..', at most 128 characters)"
        )
    return text


def cutout_filename(objid: int) -> str:
    """File name of the cutout of ``objid`` (an integer object id)."""
    if isinstance(objid, bool) or not isinstance(objid, int | np.integer):
        raise DataError(f"object id {objid!r} is not an integer")
    return f"{int(objid)}.fits"


# --------------------------------------------------------------------------- cutout layout
@dataclass
class Cutout:
    """A multi-band cutout as read from the galpipe FITS layout.

    Attributes
    ----------
    data : numpy.ndarray
        Pixels, shape ``(n_bands, ny, nx)``; float32 fluxes or uint8 DN.
    bands : list of str
        Band names, length ``n_bands``.
    objid : int
        Object identifier.
    ra, dec : float
        Centre of the cutout (degrees).
    bunit : str
        ``"nanomaggy"`` or ``"DN"``.
    header : dict
        Remaining primary-header cards (``SOURCE``, ``NFILLED``, ...).
    """

    data: np.ndarray
    bands: list[str]
    objid: int
    ra: float
    dec: float
    bunit: str
    header: dict[str, Any] = field(default_factory=dict)


def tan_wcs(ra: float, dec: float, shape: tuple[int, int], pixel_scale: float) -> WCS:
    """A TAN WCS of ``shape`` = ``(ny, nx)`` centred on ``(ra, dec)``.

    North up, east left (``CD1_1 < 0``), ``pixel_scale`` in arcsec/pixel.
    """
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra), float(dec)]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    scale = pixel_scale / 3600.0
    w.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
    w.wcs.cunit = ["deg", "deg"]
    return w


def write_cutout(
    path: str | os.PathLike[str],
    data: np.ndarray,
    *,
    bands: Sequence[str],
    objid: int,
    ra: float,
    dec: float,
    source: str,
    bunit: str = "nanomaggy",
    pixel_scale: float = 0.396,
    wcs: Sequence[WCS] | WCS | None = None,
    n_filled: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one galaxy's cutout in the galpipe FITS layout, atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.fits`` file.
    data : numpy.ndarray
        Pixels, shape ``(n_bands, ny, nx)``.  float32 for ``bunit="nanomaggy"``,
        uint8 for ``bunit="DN"``.
    bands : sequence of str
        Band names, length ``n_bands``.
    objid, ra, dec : int, float, float
        Identity and centre of the galaxy.
    source : str
        Which source produced it (``simulated``, ``images``, ``sdss``).
    bunit : str
        Pixel unit.
    pixel_scale : float
        Arcsec per pixel (used for the WCS when ``wcs`` is None).
    wcs : astropy.wcs.WCS or sequence of them, optional
        Per-band WCS (e.g. from ``Cutout2D``); default a TAN WCS centred on
        ``(ra, dec)``.
    n_filled : int
        Number of pixels filled with NaN because the stamp left the frame.
    extra : mapping, optional
        Additional primary-header cards (keys of at most 8 characters).
    """
    arr = np.asarray(data)
    if arr.ndim != 3 or arr.shape[0] != len(bands):
        raise DataError(
            f"cutout of object {objid}: expected data of shape (n_bands={len(bands)}, ny, nx), "
            f"got {arr.shape}"
        )
    if bunit == "DN":
        arr = arr.astype(np.uint8, copy=False)
    else:
        arr = arr.astype(np.float32, copy=False)
    primary = fits.PrimaryHDU()
    hdr = primary.header
    hdr["OBJID"] = (int(objid), "object identifier")
    has_sky = bool(np.isfinite(ra) and np.isfinite(dec))
    if has_sky:  # images without coordinates carry no RA/DEC and no WCS
        hdr["RA"] = (float(ra), "[deg] right ascension of the centre")
        hdr["DEC"] = (float(dec), "[deg] declination of the centre")
    hdr["BANDS"] = (",".join(bands), "band names, one image HDU each")
    hdr["NBANDS"] = (len(bands), "number of bands")
    hdr["BUNIT"] = (bunit, "pixel unit")
    hdr["SOURCE"] = (source, "galpipe source that produced the cutout")
    hdr["PIXSCALE"] = (float(pixel_scale) if np.isfinite(pixel_scale) else 0.0,
                       "[arcsec/pixel], 0 if unknown")
    hdr["NFILLED"] = (int(n_filled), "pixels filled with NaN (off the frame)")
    for key, value in (extra or {}).items():
        hdr[key] = value
    hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU] = [primary]
    for k, band in enumerate(bands):
        if wcs is None and not has_sky:
            band_wcs = WCS(naxis=2)
        elif wcs is None:
            band_wcs = tan_wcs(ra, dec, arr.shape[1:], pixel_scale)
        elif isinstance(wcs, WCS):
            band_wcs = wcs
        else:
            band_wcs = wcs[k]
        ext = fits.ImageHDU(data=arr[k], header=band_wcs.to_header(), name=band.upper())
        ext.header["BUNIT"] = bunit
        ext.header["FILTER"] = (band, "band name")
        hdus.append(ext)
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path)


def read_cutout(
    path: str | os.PathLike[str], *, bands: Sequence[str] | None = None
) -> Cutout:
    """Read and verify a cutout written by :func:`write_cutout`.

    Header sizes are checked before any pixel data is read, so a file that
    claims an absurd ``NAXIS`` is rejected without a large allocation.

    Parameters
    ----------
    path : path-like
        The ``.fits`` file.
    bands : sequence of str, optional
        Bands expected, in order; a mismatch is an error.

    Returns
    -------
    Cutout
        ``data`` of shape ``(n_bands, ny, nx)``.

    Raises
    ------
    DataError
        Missing, empty, truncated or corrupt file, wrong bands or shapes.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"cutout {p}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"cutout {p}: file is empty (0 bytes)")
    try:
        with fits.open(p, memmap=False, lazy_load_hdus=False) as hdul:
            return _read_hdul(p, hdul, bands)
    except DataError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, VerifyError) as exc:
        raise DataError(f"cutout {p}: not a readable FITS file ({exc})") from exc


def _read_hdul(p: Path, hdul: fits.HDUList, bands: Sequence[str] | None) -> Cutout:
    hdr = hdul[0].header
    for key in ("OBJID", "BANDS", "BUNIT"):
        if key not in hdr:
            raise DataError(f"cutout {p}: primary header lacks {key}")
    file_bands = [b for b in str(hdr["BANDS"]).split(",") if b]
    if bands is not None and list(bands) != file_bands:
        raise DataError(f"cutout {p}: has bands {file_bands}, expected {list(bands)}")
    if len(hdul) != len(file_bands) + 1:
        raise DataError(
            f"cutout {p}: expected {len(file_bands)} image HDUs for bands {file_bands}, "
            f"found {len(hdul) - 1}"
        )
    shape: tuple[int, int] | None = None
    for k, band in enumerate(file_bands, start=1):
        h = hdul[k].header
        naxis = h.get("NAXIS", 0)
        if naxis != 2:
            raise DataError(f"cutout {p}: band {band} has NAXIS={naxis}, expected 2")
        ny, nx = int(h.get("NAXIS2", 0)), int(h.get("NAXIS1", 0))
        if not (0 < nx <= MAX_CUTOUT_SIDE and 0 < ny <= MAX_CUTOUT_SIDE):
            raise DataError(
                f"cutout {p}: band {band} claims size {ny}x{nx}; "
                f"expected 1..{MAX_CUTOUT_SIDE} pixels per side"
            )
        if shape is None:
            shape = (ny, nx)
        elif shape != (ny, nx):
            raise DataError(f"cutout {p}: band {band} is {ny}x{nx}, other bands {shape}")
    assert shape is not None
    bunit = str(hdr["BUNIT"])
    dtype = np.uint8 if bunit == "DN" else np.float32
    out = np.empty((len(file_bands), *shape), dtype=dtype)
    for k in range(len(file_bands)):
        data = hdul[k + 1].data
        if data is None or data.shape != shape:
            raise DataError(f"cutout {p}: band {file_bands[k]} data is missing or truncated")
        out[k] = data
    extra = {k: hdr[k] for k in ("SOURCE", "NFILLED", "PIXSCALE") if k in hdr}
    return Cutout(
        data=out,
        bands=file_bands,
        objid=int(hdr["OBJID"]),
        ra=float(hdr.get("RA", np.nan)),
        dec=float(hdr.get("DEC", np.nan)),
        bunit=bunit,
        header=extra,
    )
