"""The per-galaxy cutout FITS layout shared by every source.

Cutout layout (written identically by the simulated, image-folder and live SDSS
sources, so that everything downstream is the same code):

* primary HDU: no data; header keys ``OBJID`` (int), ``RA``/``DEC`` (deg; absent
  when the position is unknown), ``BANDS`` (comma-separated band names, e.g.
  ``"g,r,i"``), ``NBANDS``, ``BUNIT`` (``"nanomaggy"`` for calibrated fluxes,
  ``"DN"`` for 8-bit images), ``SOURCE`` (``simulated``/``images``/``sdss``),
  ``NFILLED`` (pixels NaN-filled in at least one band because the stamp ran off
  the frame), ``PIXSCALE`` (arcsec/pixel, 0 if unknown), ``SRCHASH`` (SHA-256 of
  the file a cutout was made from, when it was made from one: a cached cutout is
  reused only while its source file is unchanged), ``GPLAYOUT`` (the version of
  this layout, :data:`LAYOUT_VERSION`), ``DATE`` (UTC time the file was written,
  ``YYYY-MM-DDThh:mm:ss``; ``SOURCE_DATE_EPOCH`` fixes it, as for reproducible
  builds), ``ORIGIN`` (``galpipe``) and ``CREATOR`` (``galpipe <version>``).
* one ``ImageHDU`` per band, in ``BANDS`` order, ``EXTNAME`` = band name,
  2-D data of shape ``(ny, nx)`` (float32 fluxes, or uint8 for ``DN``),
  ``BUNIT``, ``FILTER`` = band, ``NFILLED`` = that band's NaN-filled pixels,
  and a celestial WCS centred on the galaxy when its position (and pixel scale)
  is known; with no position there are no WCS keywords at all.
* every HDU carries ``CHECKSUM``/``DATASUM`` (FITS checksum convention);
  :func:`read_cutout` refuses a file whose sums do not match.

Orientation (one convention for every source and route)
--------------------------------------------------------
Arrays are stored in FITS order: ``data[k, 0, 0]`` is the **bottom-left**
pixel, the row index grows **northwards** and the column index **westwards**,
so a cutout drawn with ``imshow(data[k], origin="lower")`` (or opened in
ds9) shows **north up and east left**, exactly like SkyServer's JPEG of the
same object (whose first row is the top, north).  Consequently:

* 8-bit images (JPEG/PNG, first row = top) are flipped row-wise when read
  (:func:`image_rows_to_fits`): the skyserver-jpeg provider and the images
  source share that one conversion;
* a stamp written with a WCS that is not north-up, east-left (SDSS drift-scan
  frames are transposed and rotated) is flipped/transposed by
  :func:`write_cutout` to the closest north-up, east-left orientation
  (:func:`north_up_op`, exact: no resampling; the residual rotation, at most
  45 degrees and a few degrees for SDSS stripes, is described by the stored WCS);
* galleries (:mod:`galpipe.plots`) draw with ``origin="lower"``;
* a cutout without coordinates (images source) is assumed to be a picture
  taken north up, east left.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
#: Version of the layout written by :func:`write_cutout` (primary card ``GPLAYOUT``).
#: 2: north up / east left in FITS row order for every route, per-band ``NFILLED``,
#: checksums, ``DATE``/``ORIGIN``/``CREATOR``, no WCS without coordinates.  Files without
#: the card (version 1) read fine; their 8-bit images-source pixels are upside down.
LAYOUT_VERSION = 2
#: Primary-header cards :func:`read_cutout` returns in ``Cutout.header`` when present.
HEADER_KEYS = ("SOURCE", "NFILLED", "PIXSCALE", "SRCHASH", "GPLAYOUT", "DATE", "CREATOR", "REORIENT")


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
        Remaining primary-header cards (:data:`HEADER_KEYS` present: ``SOURCE``,
        ``NFILLED``, ...).
    n_filled_bands : tuple of int or None
        NaN-filled pixels of each band (length ``n_bands``); None for a file of
        layout version 1, which recorded only the primary ``NFILLED``.
    """

    data: np.ndarray
    bands: list[str]
    objid: int
    ra: float
    dec: float
    bunit: str
    header: dict[str, Any] = field(default_factory=dict)
    n_filled_bands: tuple[int, ...] | None = None


# --------------------------------------------------------------------------- orientation
def image_rows_to_fits(rgb: np.ndarray) -> np.ndarray:
    """An 8-bit image's planes (first row = top) in FITS row order (first row = bottom).

    The one conversion of JPEG/PNG pixels into the cutout convention (see the
    module docstring), used by the skyserver-jpeg provider and the images source.

    Parameters
    ----------
    rgb : numpy.ndarray
        Shape ``(n_bands, ny, nx)``, rows top to bottom as decoded.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype, rows bottom to top (a contiguous copy).
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3:
        raise DataError(f"image planes: expected shape (n_bands, ny, nx), got {arr.shape}")
    return np.ascontiguousarray(arr[:, ::-1, :])


#: A flip/transpose of the pixel grid: ``(transpose, flip_x, flip_y)``, applied in that order.
PixelOp = tuple[bool, bool, bool]
_IDENTITY: PixelOp = (False, False, False)
#: The 8 ops in a fixed order (ties go to the first, the identity).
_OPS: tuple[PixelOp, ...] = tuple((t, fx, fy) for t in (False, True) for fx in (False, True) for fy in (False, True))


def _op_matrix(op: PixelOp) -> np.ndarray:
    """The 2x2 integer matrix ``M`` of ``op`` acting on centred pixel vectors ``(x, y)``."""
    transpose, flip_x, flip_y = op
    m = np.array([[0, 1], [1, 0]]) if transpose else np.eye(2, dtype=int)
    return np.diag([-1 if flip_x else 1, -1 if flip_y else 1]) @ m


def _sky_directions(wcs: WCS, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Unit pixel vectors ``(x, y)`` pointing north and east at the centre of a ``(ny, nx)`` grid."""
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    ra0, dec0 = (float(v) for v in wcs.celestial.pixel_to_world_values(cx, cy))
    step = 1.0 / 3600.0  # one arcsec
    xn, yn = wcs.celestial.world_to_pixel_values(ra0, dec0 + step)
    xe, ye = wcs.celestial.world_to_pixel_values(ra0 + step / max(np.cos(np.radians(dec0)), 1e-6), dec0)
    north = np.array([float(xn) - cx, float(yn) - cy])
    east = np.array([float(xe) - cx, float(ye) - cy])
    if not (np.all(np.isfinite(north)) and np.all(np.isfinite(east))):
        raise DataError("WCS: cannot find north and east at the cutout centre")
    return north / np.linalg.norm(north), east / np.linalg.norm(east)


def north_up_op(wcs: WCS, shape: tuple[int, int]) -> PixelOp:
    """The flip/transpose bringing a ``(ny, nx)`` grid with ``wcs`` closest to north up, east left.

    Chooses, among the 8 flips/transposes of the grid, the one that maximises
    ``north . (0, 1) + east . (-1, 0)`` at the centre (north along +row, east along
    -column): parity is always right afterwards and north is within 45 degrees of up.
    """
    north, east = _sky_directions(wcs, shape)
    scores = []
    for op in _OPS:
        m = _op_matrix(op)
        scores.append(float((m @ north)[1] - (m @ east)[0]))
    best = int(np.argmax(np.round(scores, 9)))  # first of equals: the identity wins a tie
    return _OPS[best]


def apply_pixel_op(data: np.ndarray, op: PixelOp) -> np.ndarray:
    """``data`` of shape ``(..., ny, nx)`` with ``op`` applied to its last two axes (a view)."""
    transpose, flip_x, flip_y = op
    out = np.swapaxes(data, -1, -2) if transpose else data
    if flip_x:
        out = out[..., ::-1]
    if flip_y:
        out = out[..., ::-1, :]
    return out


def transform_wcs(wcs: WCS, op: PixelOp, shape: tuple[int, int]) -> WCS:
    """The WCS of a ``(ny, nx)`` grid after :func:`apply_pixel_op` ``op`` (linear WCS only).

    With ``p' = M p + t`` (0-based pixel vectors), the new linear matrix is
    ``CD M^-1`` and the new reference pixel ``M crpix + t``.

    Raises
    ------
    DataError
        The WCS has distortions (SIP, lookup tables), which a flip cannot carry exactly.
    """
    if op == _IDENTITY:
        return wcs
    if wcs.sip is not None or wcs.cpdis1 is not None or wcs.cpdis2 is not None or wcs.det2im1 is not None:
        raise DataError("WCS: a stamp whose WCS has distortion terms cannot be reoriented exactly")
    ny, nx = shape
    m = _op_matrix(op)
    transpose, flip_x, flip_y = op
    nx2, ny2 = (ny, nx) if transpose else (nx, ny)
    t = np.array([nx2 - 1 if flip_x else 0, ny2 - 1 if flip_y else 0], dtype=float)
    cd = wcs.pixel_scale_matrix @ np.linalg.inv(m)
    crpix0 = m @ (np.asarray(wcs.wcs.crpix, dtype=float) - 1.0) + t
    header = wcs.to_header()
    for key in list(header):
        if key.startswith(("PC", "CD", "CDELT")):
            del header[key]
    out = WCS(header)
    out.wcs.cd = cd
    out.wcs.crpix = crpix0 + 1.0
    out.pixel_shape = (nx2, ny2)
    out.wcs.set()
    return out


def _creation_date() -> str:
    """``DATE`` card value: now in UTC, or ``SOURCE_DATE_EPOCH`` (seconds) when set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    stamp = time.time()
    if epoch:
        try:
            stamp = float(int(epoch))
        except ValueError as exc:
            raise DataError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer number of seconds") from exc
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _creator() -> str:
    from galpipe import __version__

    return f"galpipe {__version__}"


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

    The layout and the orientation convention are in the module docstring: the
    pixels are stored north up, east left in FITS row order; a ``wcs`` saying
    otherwise makes this function flip/transpose the stack (and the WCS) to the
    closest such orientation (:func:`north_up_op`, recorded in ``REORIENT``).

    Parameters
    ----------
    path : path-like
        Destination ``.fits`` file.
    data : numpy.ndarray
        Pixels, shape ``(n_bands, ny, nx)``, in FITS row order (row 0 = bottom).
        float32 for ``bunit="nanomaggy"``, uint8 for ``bunit="DN"``.
    bands : sequence of str
        Band names, length ``n_bands``.
    objid, ra, dec : int, float, float
        Identity and centre of the galaxy; NaN ``ra``/``dec``: position unknown
        (no ``RA``/``DEC`` cards and no WCS).
    source : str
        Which source produced it (``simulated``, ``images``, ``sdss``).
    bunit : str
        Pixel unit.
    pixel_scale : float
        Arcsec per pixel (used for the WCS when ``wcs`` is None); 0 or NaN if
        unknown, in which case no WCS is written.
    wcs : astropy.wcs.WCS or sequence of them, optional
        Per-band WCS of ``data`` as given (e.g. from ``Cutout2D``); default a TAN
        WCS centred on ``(ra, dec)``, north up, east left.
    n_filled : int
        Pixels NaN-filled in at least one band because the stamp left the frame
        (primary ``NFILLED``); each band's ``NFILLED`` is the count of its NaN pixels.
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
    has_sky = bool(np.isfinite(ra) and np.isfinite(dec))
    scale_known = bool(np.isfinite(pixel_scale) and pixel_scale > 0)
    band_wcs: list[WCS | None]
    if wcs is None:
        default = tan_wcs(ra, dec, arr.shape[1:], pixel_scale) if has_sky and scale_known else None
        band_wcs = [default] * len(bands)
    elif isinstance(wcs, WCS):
        band_wcs = [wcs] * len(bands)
    else:
        band_wcs = list(wcs)
        if len(band_wcs) != len(bands):
            raise DataError(f"cutout of object {objid}: {len(band_wcs)} WCS for {len(bands)} bands")
    op = _IDENTITY
    first = band_wcs[0] if band_wcs else None
    if first is not None and first.has_celestial:
        op = north_up_op(first, arr.shape[1:])
    if op != _IDENTITY:
        band_wcs = [None if w is None else transform_wcs(w, op, arr.shape[1:]) for w in band_wcs]
        arr = np.ascontiguousarray(apply_pixel_op(arr, op))
    primary = fits.PrimaryHDU()
    hdr = primary.header
    hdr["OBJID"] = (int(objid), "object identifier")
    if has_sky:  # images without coordinates carry no RA/DEC and no WCS
        hdr["RA"] = (float(ra), "[deg] right ascension of the centre")
        hdr["DEC"] = (float(dec), "[deg] declination of the centre")
    hdr["BANDS"] = (",".join(bands), "band names, one image HDU each")
    hdr["NBANDS"] = (len(bands), "number of bands")
    hdr["BUNIT"] = (bunit, "pixel unit")
    hdr["SOURCE"] = (source, "galpipe source that produced the cutout")
    hdr["PIXSCALE"] = (float(pixel_scale) if scale_known else 0.0, "[arcsec/pixel], 0 if unknown")
    hdr["NFILLED"] = (int(n_filled), "pixels NaN-filled (off the frame) in any band")
    hdr["GPLAYOUT"] = (LAYOUT_VERSION, "galpipe cutout layout version")
    if op != _IDENTITY:
        hdr["REORIENT"] = (",".join(name for name, on in zip(("transpose", "flipx", "flipy"), op, strict=True)
                                    if on), "flips applied to be north up, east left")
    date = _creation_date()
    hdr["DATE"] = (date, "UTC date the file was written")
    hdr["ORIGIN"] = ("galpipe", "organisation or software that wrote the file")
    hdr["CREATOR"] = (_creator(), "software that wrote the file")
    for key, value in (extra or {}).items():
        hdr[key] = value
    hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU] = [primary]
    for k, band in enumerate(bands):
        w = band_wcs[k]
        header = w.to_header() if w is not None else fits.Header()
        ext = fits.ImageHDU(data=arr[k], header=header, name=band.upper())
        ext.header["BUNIT"] = bunit
        ext.header["FILTER"] = (band, "band name")
        n_nan = int(np.isnan(arr[k]).sum()) if arr.dtype.kind == "f" else 0
        ext.header["NFILLED"] = (n_nan, "pixels of this band NaN-filled (off the frame)")
        hdus.append(ext)
    hdul = fits.HDUList(hdus)
    hdul.update_extend()
    for hdu in hdul:  # the sums' comments carry DATE, not astropy's local clock (same bytes for one DATE)
        hdu.add_checksum(when=f"checksum as of {date} UTC")
    with atomic_path(path) as tmp:
        hdul.writeto(tmp)
    return Path(path)


def read_cutout(
    path: str | os.PathLike[str], *, bands: Sequence[str] | None = None
) -> Cutout:
    """Read and verify a cutout written by :func:`write_cutout`.

    Header sizes are checked before any pixel data is read, so a file that
    claims an absurd ``NAXIS`` is rejected without a large allocation.  When an
    HDU carries ``CHECKSUM``/``DATASUM`` (every file of layout version 2), both
    are verified; files written before checksums existed read as before.

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
        Missing, empty, truncated or corrupt file (a checksum mismatch included),
        wrong bands or shapes; the message names the file.
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
    _verify_checksums(p, hdul)
    extra = {k: hdr[k] for k in HEADER_KEYS if k in hdr}
    per_band = [hdul[k].header.get("NFILLED") for k in range(1, len(file_bands) + 1)]
    n_filled_bands = tuple(int(n) for n in per_band) if all(n is not None for n in per_band) else None
    return Cutout(
        data=out,
        bands=file_bands,
        objid=int(hdr["OBJID"]),
        ra=float(hdr.get("RA", np.nan)),
        dec=float(hdr.get("DEC", np.nan)),
        bunit=bunit,
        header=extra,
        n_filled_bands=n_filled_bands,
    )


def _verify_checksums(p: Path, hdul: fits.HDUList) -> None:
    """Refuse ``p`` if an HDU's ``CHECKSUM`` or ``DATASUM`` card disagrees with its bytes."""
    for k, hdu in enumerate(hdul):
        name = hdu.name or ("PRIMARY" if k == 0 else str(k))
        if "DATASUM" in hdu.header and hdu.verify_datasum() == 0:
            raise DataError(f"cutout {p}: HDU {k} ({name}) fails its DATASUM check: the pixel data are "
                            "corrupt (damaged on disk or in transfer); delete the file to have it made again")
        if "CHECKSUM" in hdu.header and hdu.verify_checksum() == 0:
            raise DataError(f"cutout {p}: HDU {k} ({name}) fails its CHECKSUM check: the file was damaged or "
                            "edited after it was written; delete it to have it made again")


def stable_fits_bytes(source: str | os.PathLike[str] | bytes) -> bytes:
    """The bytes of a FITS file (a path, or its bytes) with the wall-clock cards' values blanked.

    ``DATE`` (when the file was written), ``CHECKSUM`` (which covers it) and the
    comment of ``DATASUM`` (which quotes it) are the only parts of a cutout that
    differ between two runs of the same configuration (unless
    ``SOURCE_DATE_EPOCH`` fixes ``DATE``); two cutouts are the same when these
    bytes are equal.  ``DATASUM``'s value (the pixels' checksum) is kept.
    """
    raw = bytearray(source if isinstance(source, bytes | bytearray) else Path(source).read_bytes())
    with fits.open(io.BytesIO(bytes(raw)), memmap=False) as hdul:
        spans = [(info["hdrLoc"], info["datLoc"]) for info in (hdul.fileinfo(k) for k in range(len(hdul)))]
    for lo, hi in spans:
        for pos in range(lo, hi, 80):
            key = bytes(raw[pos:pos + 9])
            if key in (b"DATE    =", b"CHECKSUM="):
                raw[pos + 9:pos + 80] = b" " * 71
            elif key == b"DATASUM =":
                slash = raw.find(b" / ", pos + 10, pos + 80)
                if slash >= 0:
                    raw[slash:pos + 80] = b" " * (pos + 80 - slash)
    return bytes(raw)
