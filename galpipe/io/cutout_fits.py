"""The per-galaxy cutout FITS layout shared by every source.

Cutout layout (written identically by the simulated, image-folder and live SDSS
sources, so that everything downstream is the same code):

* primary HDU: no data; header keys ``OBJID`` (int), ``RA``/``DEC`` (deg),
  ``BANDS`` (comma-separated band names, e.g. ``"g,r,i"``), ``NBANDS``,
  ``BUNIT`` (``"nanomaggy"`` for calibrated fluxes, ``"DN"`` for 8-bit images),
  ``SOURCE`` (``simulated``/``images``/``sdss``), ``NFILLED`` (pixels filled
  with NaN because the stamp ran off the frame), ``PIXSCALE`` (arcsec/pixel),
  ``SRCHASH`` (SHA-256 of the file a cutout was made from, when it was made from
  one: a cached cutout is reused only while its source file is unchanged).
* one ``ImageHDU`` per band, in ``BANDS`` order, ``EXTNAME`` = band name,
  2-D data of shape ``(ny, nx)`` (float32 fluxes, or uint8 for ``DN``), a
  celestial TAN WCS centred on the galaxy, ``BUNIT`` and ``FILTER`` = band.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.wcs import WCS

from galpipe.errors import DataError
from galpipe.io.atomic import atomic_path

#: Largest cutout side accepted when reading (pixels); checked from the header
#: before any data is allocated.
MAX_CUTOUT_SIDE = 4096


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
    extra = {k: hdr[k] for k in ("SOURCE", "NFILLED", "PIXSCALE", "SRCHASH") if k in hdr}
    return Cutout(
        data=out,
        bands=file_bands,
        objid=int(hdr["OBJID"]),
        ra=float(hdr.get("RA", np.nan)),
        dec=float(hdr.get("DEC", np.nan)),
        bunit=bunit,
        header=extra,
    )
