"""Source ``images``: a folder of existing images (JPEG, PNG or FITS) plus a labels CSV.

This is how a user brings their own labelled set (for example the real SDSS
Galaxy Zoo 1 JPEGs).  Images are centre-cropped, resized to the cutout size and
written in the common cutout FITS layout (:mod:`galpipe.io.cutout_fits`) through
the shared :class:`~galpipe.sources.base.CutoutCache`: 8-bit images as
``BUNIT = "DN"`` uint8 with bands ``red, green, blue``; FITS inputs keep their
pixel values as float32.  :class:`ImagesSource` is the registered source;
:func:`load_external_image` is the one loader of an image file, shared by
``make_cutouts``, ``galpipe predict`` and the other sources' ``load_external``.

Orientation follows :mod:`galpipe.io.cutout_fits`: pixels are stored in FITS row
order, north up and east left when drawn with ``origin="lower"``.  A JPEG/PNG is
taken to be a north-up, east-left picture (as SkyServer's and Galaxy Zoo's are):
its rows, top first, are flipped.  A FITS image is kept in its own row order,
flipped/transposed to north up, east left when its header has a celestial WCS.
"""

from __future__ import annotations

import math
import re
import struct
import warnings
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from PIL import Image, UnidentifiedImageError

from galpipe.errors import DataError
from galpipe.io.atomic import file_sha256, safe_filename
from galpipe.io.cutout_fits import LAYOUT_VERSION, apply_pixel_op, image_rows_to_fits, north_up_op, read_cutout
from galpipe.settings import Config, ImagesConfig
from galpipe.sources import register_source
from galpipe.sources.base import CutoutCache, ExternalImage, PathLike, manifest_frame

RGB_BANDS = ["red", "green", "blue"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".fits", ".fit", ".fts"}
#: Largest decoded image accepted (pixels); Pillow's own bomb check uses 2x its default.
MAX_IMAGE_PIXELS = 64_000_000
#: Largest FITS file side accepted before any data is read.
MAX_FITS_SIDE = 16384


def images_section(images: ImagesConfig | Mapping[str, Any] | None) -> ImagesConfig:
    """``images`` as the typed section; a plain mapping (some keys set) is completed and
    validated by the schema first (:func:`galpipe.config.build_section`).

    Raises
    ------
    ConfigError
        The mapping is not a valid ``images:`` section (the message names the key).
    """
    from galpipe.config import as_section

    section: ImagesConfig = as_section("images", images)
    return section


def read_labels(images: ImagesConfig | Mapping[str, Any]) -> pd.DataFrame:
    """Read and check the labels CSV of the ``images`` source.

    Parameters
    ----------
    images : ImagesConfig or mapping
        The ``images:`` config section (``directory``, ``labels_csv``,
        ``id_column``, ``label_column``, ``path_column``, ``label_map``); a
        mapping (only some keys set) is completed and validated by the schema
        (:func:`galpipe.config.build_section`).

    Returns
    -------
    pandas.DataFrame
        Columns ``objid`` (int64: the id if it is an integer, else :func:`text_objid`),
        ``ra``, ``dec`` (float64 degrees from optional ``ra``/``dec`` CSV columns, NaN
        where unknown), ``name`` (the id as written), ``label`` (class name), ``raw_label``,
        ``image_path`` (absolute path of the image), sorted by ``objid``.  Rows whose
        raw label is empty or mapped to null are dropped.

    Raises
    ------
    DataError
        Missing file or columns, empty or duplicate ids, bad coordinates, a raw label not in
        a non-empty ``label_map``, an image path escaping the folder, two labelled
        rows naming the same file, FITS and JPEG/PNG images mixed.
    """
    params = images_section(images)
    csv = Path(str(params.labels_csv))
    directory = Path(str(params.directory))
    if not csv.is_file():
        raise DataError(f"labels CSV {csv} not found (config key 'images.labels_csv')")
    if not directory.is_dir():
        raise DataError(f"image folder {directory} not found (config key 'images.directory')")
    cols = {k: getattr(params, k) for k in ("id_column", "label_column", "path_column")}
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"labels CSV {csv}: cannot be parsed ({exc})") from exc
    missing = [f"{v} (images.{k})" for k, v in cols.items() if v not in df.columns]
    if missing:
        raise DataError(
            f"labels CSV {csv}: missing column(s) {', '.join(missing)}; columns present: {list(df.columns)}"
        )
    names = df[cols["id_column"]].str.strip()
    objid = _parse_ids(names, csv, cols["id_column"])
    raw = df[cols["label_column"]].str.strip()
    label = _map_labels(raw, params.label_map, csv)
    resolved = _resolve_paths(df[cols["path_column"]].str.strip(), directory.resolve(), csv)
    coords = _parse_coordinates(df.assign(objid=objid), csv)
    out = pd.DataFrame({"objid": objid, "ra": coords["ra"].to_numpy(), "dec": coords["dec"].to_numpy(),
                        "name": names, "label": label, "raw_label": raw, "image_path": resolved})
    out["_row"] = np.arange(len(out)) + 2
    out = out[out["label"].notna()].sort_values("objid", kind="stable").reset_index(drop=True)
    if len(out) == 0:
        raise DataError(f"labels CSV {csv}: no labelled rows left after applying images.label_map")
    _check_unique_paths(out, csv)
    _check_one_kind(out, csv)
    return out.drop(columns="_row")


def _check_unique_paths(labels: pd.DataFrame, csv: Path) -> None:
    """Two labelled rows naming the same file (after resolving) would put one image in two splits."""
    dup = labels["image_path"].duplicated(keep=False)
    if dup.any():
        first = labels.loc[dup, "image_path"].iloc[0]
        rows = labels[labels["image_path"] == first]
        raise DataError(
            f"labels CSV {csv}: rows {rows['_row'].tolist()} (ids {rows['objid'].tolist()}) name the same image "
            f"{first}; one image could land in train and test (config key 'images.labels_csv': "
            f"{int(dup.sum())} rows share a file with another row)"
        )


#: The two kinds of image file the ``images`` source reads: 8-bit colour and FITS.
FITS_SUFFIXES = {".fits", ".fit", ".fts"}


def _check_one_kind(labels: pd.DataFrame, csv: Path) -> None:
    """All labelled images must be 8-bit (JPEG/PNG: bands red, green, blue) or all FITS, never both.

    The network sees one band layout; a mixed folder would make each shard's first file decide it.
    """
    is_fits = labels["image_path"].map(lambda p: Path(p).suffix.lower() in FITS_SUFFIXES)
    n_fits = int(is_fits.sum())
    if 0 < n_fits < len(labels):
        first_fits = labels.loc[is_fits, "image_path"].iloc[0]
        first_8bit = labels.loc[~is_fits, "image_path"].iloc[0]
        raise DataError(
            f"labels CSV {csv}: mixes {n_fits} FITS image(s) (e.g. {first_fits}) with {len(labels) - n_fits} "
            f"JPEG/PNG image(s) (e.g. {first_8bit}); config key 'images.directory' must hold one kind "
            "(convert one kind, or map the other rows' labels to null)"
        )


def find_duplicate_content(labels: pd.DataFrame) -> list[list[int]]:
    """Groups of ``objid`` whose image files have identical content (SHA-256).

    Only files of equal size are hashed; a missing or unreadable file is skipped (the
    cutouts stage reports it).  ``labels`` is :func:`read_labels` output.
    """
    import hashlib
    import os

    by_size: dict[int, list[tuple[int, str]]] = {}
    for objid, path in zip(labels["objid"].tolist(), labels["image_path"].tolist(), strict=True):
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        by_size.setdefault(size, []).append((int(objid), str(path)))
    groups: dict[str, list[int]] = {}
    for members in by_size.values():
        if len(members) < 2:
            continue
        for objid, path in members:
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        digest.update(block)
            except OSError:
                continue
            groups.setdefault(digest.hexdigest(), []).append(objid)
    return sorted(ids for ids in groups.values() if len(ids) > 1)


def check_duplicate_content(labels: pd.DataFrame, csv: PathLike) -> None:
    """Refuse two labelled rows whose image files are identical (:func:`find_duplicate_content`).

    Raises
    ------
    DataError
        Naming the ids and files of the first group, and how many groups there are.
    """
    dups = find_duplicate_content(labels)
    if dups:
        first = labels[labels["objid"].isin(dups[0])]
        files = ", ".join(f"id {i}: {p}" for i, p in zip(first["objid"], first["image_path"], strict=True))
        raise DataError(
            f"labels CSV {csv}: {len(dups)} group(s) of rows have images with identical content (sha256); "
            f"first: {files}; one image could land in train and test (config key 'images.labels_csv')"
        )


#: Longest text id accepted (a name, not a document).
MAX_ID_LENGTH = 128
#: Integer ids: ASCII digits that fit in int64 (``int()`` would also take other scripts' digits).
_INTEGER_ID = r"-?[0-9]{1,19}"


def text_objid(text: str) -> int:
    """The int64 ``objid`` of a text id such as ``NGC1000``: a stable hash, always negative.

    ``-(h >> 1) - 1`` for the first 8 bytes ``h`` of BLAKE2b of the UTF-8 text, so it lies in
    ``[-2**63, -1]`` and never meets SDSS object ids (positive); the same text gives the same
    id on every machine and run.  The text itself is kept in the catalogue's ``name`` column.
    """
    import hashlib

    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return -(h >> 1) - 1


def _parse_ids(ids: pd.Series, csv: Path, column: str) -> pd.Series:
    """The id column (stripped text, shape ``(n_rows,)``) as unique int64 ids; rows are CSV row - 2.

    An id of ASCII digits that fits in int64 is that integer (an SDSS ``objid``); any other
    text (``NGC1000``, ``J123456.7+012345``) maps to :func:`text_objid`.
    """
    empty = (ids == "").to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(f"labels CSV {csv}: row {row + 2}: the id in column {column!r} is empty")
    unprintable = (~ids.map(lambda t: t.isprintable() and len(t) <= MAX_ID_LENGTH)).to_numpy()
    if unprintable.any():
        row = int(np.flatnonzero(unprintable)[0])
        raise DataError(f"labels CSV {csv}: row {row + 2}: id {ids.iloc[row][:40]!r} in column {column!r} "
                        f"has control characters or more than {MAX_ID_LENGTH} characters")

    def one(text: str) -> int:
        if re.fullmatch(_INTEGER_ID, text) and -(2**63) <= int(text) < 2**63:
            return int(text)
        return text_objid(text)

    objid = ids.map(one).astype(np.int64)
    dup = objid[objid.duplicated()]
    if len(dup):
        rows = (np.flatnonzero((objid == dup.iloc[0]).to_numpy()) + 2).tolist()
        texts = sorted({ids.iloc[r - 2] for r in rows})
        raise DataError(f"labels CSV {csv}: duplicate id(s) [{', '.join(texts)}]; id {texts[0]} is on rows {rows} "
                        f"(column {column!r}; a text id and an integer id may not name one object)")
    return objid


def _parse_coordinates(df: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """Optional ``ra``/``dec`` columns of the labels CSV (degrees; empty: unknown) as float64.

    Without the columns every position is unknown (NaN).  Values are checked by
    :func:`galpipe.catalogue.check_coordinates` (numbers, in range, both or neither).
    """
    from galpipe.catalogue import check_coordinates

    present = [c for c in ("ra", "dec") if c in df.columns]
    if not present:
        return pd.DataFrame({"ra": np.nan, "dec": np.nan}, index=df.index)
    if len(present) == 1:
        raise DataError(f"labels CSV {csv}: has a {present[0]!r} column but no "
                        f"{'dec' if present[0] == 'ra' else 'ra'!r} column (give both or neither)")
    coords = df[["ra", "dec"]].replace("", np.nan)
    return check_coordinates(coords.assign(objid=df["objid"]), where=f"labels CSV {csv}")


def _map_labels(raw: pd.Series, label_map: Mapping[str, str | None], csv: Path) -> pd.Series:
    """Class names of the raw labels (None: dropped); every class name must be usable as a file name."""
    if label_map:
        known = {str(k) for k in label_map}
        unknown = sorted(set(raw[raw != ""]) - known)
        if unknown:
            row = int(np.flatnonzero(raw.isin(unknown).to_numpy())[0])
            raise DataError(
                f"labels CSV {csv}: row {row + 2}: label {raw.iloc[row]!r} is not in "
                f"images.label_map (known: {sorted(known)}); map it to a class or to null to drop it"
            )
        label = raw.map(lambda r: label_map.get(r) if r else None)
    else:
        label = raw.where(raw != "", None)
    for lab in pd.unique(label.dropna()):  # class names become file names (figures): never used raw
        try:
            safe_filename(lab, what="label")
        except DataError as exc:
            row = int(np.flatnonzero((label == lab).to_numpy())[0])
            raise DataError(f"labels CSV {csv}: row {row + 2}: {exc}; map it with images.label_map") from exc
    return label


def _resolve_paths(paths: pd.Series, root: Path, csv: Path) -> list[str]:
    """Absolute image paths; each must be relative and stay inside ``root`` (symlinks resolved)."""
    resolved = []
    for i, rel in enumerate(paths):
        if not rel or "\x00" in rel or Path(rel).is_absolute():
            raise DataError(f"labels CSV {csv}: row {i + 2}: image path {rel!r} must be relative to {root}")
        p = (root / rel).resolve()
        if root not in p.parents:
            raise DataError(f"labels CSV {csv}: row {i + 2}: image path {rel!r} escapes {root}")
        resolved.append(str(p))
    return resolved


def build_catalogue(images: ImagesConfig | Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Catalogue of the ``images`` source (``ra``/``dec`` from the CSV, NaN where unknown).

    Returns
    -------
    catalogue : pandas.DataFrame
        :func:`read_labels`' table.
    provenance : dict
        ``source``, ``labels_csv``, ``directory``, ``label_map``,
        ``class_counts`` and ``created_utc``.

    Raises
    ------
    DataError
        :func:`read_labels`'s errors, and two rows whose images have identical content.
    """
    params = images_section(images)
    labels = read_labels(params)
    check_duplicate_content(labels, str(params.labels_csv))
    counts = labels["label"].value_counts().sort_index().to_dict()
    provenance = {
        "source": "images",
        "labels_csv": str(params.labels_csv),
        "directory": str(params.directory),
        "label_map": dict(params.label_map),
        "class_counts": {str(k): int(v) for k, v in counts.items()},
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return labels, provenance


def _centre_crop_box(w: int, h: int, fraction: float) -> tuple[int, int, int, int]:
    side = max(1, round(min(w, h) * fraction))
    left = (w - side) // 2
    top = (h - side) // 2
    return left, top, left + side, top + side


def load_image(path: str | Path, *, size: int, crop_fraction: float = 1.0) -> tuple[np.ndarray, str, list[str]]:
    """Load one image, centre-crop and resize it.

    Parameters
    ----------
    path : path-like
        JPEG, PNG or FITS file.
    size : int
        Output side in pixels.
    crop_fraction : float
        Fraction of the shorter side kept by the centre crop.

    Returns
    -------
    data : numpy.ndarray
        ``(n_bands, size, size)``; uint8 for 8-bit images, float32 for FITS; in
        FITS row order, north up and east left with ``origin="lower"`` (see the
        module docstring).
    bunit : str
        ``"DN"`` for 8-bit images, the FITS ``BUNIT`` (default ``"nanomaggy"``) otherwise.
    bands : list of str
        Band names.

    Raises
    ------
    DataError
        Missing, empty, truncated or corrupt file, unsupported type, too large
        (decompression bomb, absurd ``NAXIS``), NaN-only data.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image {p}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"image {p}: file is empty (0 bytes)")
    suffix = p.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(f"image {p}: unsupported type {suffix!r}; expected one of {sorted(IMAGE_SUFFIXES)}")
    if suffix in (".fits", ".fit", ".fts"):
        return _load_fits(p, size, crop_fraction)
    return _load_8bit(p, size, crop_fraction)


def _load_8bit(p: Path, size: int, crop_fraction: float) -> tuple[np.ndarray, str, list[str]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"image {p}: {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
                        "(possible decompression bomb)"
                    )
                im.load()
                rgb = im.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {p}: rejected as a decompression bomb ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error,
            zlib.error) as exc:
        raise DataError(f"image {p}: corrupt or truncated image ({exc})") from exc
    box = _centre_crop_box(rgb.width, rgb.height, crop_fraction)
    small = rgb.resize((size, size), Image.Resampling.LANCZOS, box=box)
    # first row of a JPEG/PNG = top (north): the cutout convention has row 0 at the bottom
    arr = image_rows_to_fits(np.asarray(small, dtype=np.uint8).transpose(2, 0, 1))
    return arr, "DN", list(RGB_BANDS)


def _north_up(header: fits.Header, data: np.ndarray) -> np.ndarray:
    """``data`` (shape ``(n_bands, ny, nx)``, FITS rows) flipped/transposed to north up, east left.

    Only when ``header`` holds a usable celestial WCS on the image axes
    (:func:`galpipe.io.cutout_fits.north_up_op`); otherwise the file is taken
    as it is (assumed north up, east left).
    """
    from astropy.wcs import WCS, FITSFixedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header)
            if not wcs.has_celestial or sorted((wcs.wcs.lng, wcs.wcs.lat)) != [0, 1]:
                return data  # no sky position on the image axes: nothing says where north is
            op = north_up_op(wcs.celestial, data.shape[1:])
    except (ValueError, TypeError, KeyError, MemoryError, DataError, AttributeError):
        return data
    return np.ascontiguousarray(apply_pixel_op(data, op))


def _check_fits_size(p: Path, hdu: Any, naxes: list[int]) -> None:
    """Reject a FITS image whose header claims more pixels than allowed or than the file holds.

    Runs before ``hdu.data`` is touched, so a lying header never causes a large allocation.
    """
    n_pix = math.prod(naxes)
    if n_pix > MAX_IMAGE_PIXELS:
        raise DataError(
            f"image {p}: FITS axes {naxes} make {n_pix} pixels, more than the limit of {MAX_IMAGE_PIXELS}"
        )
    if isinstance(hdu, fits.CompImageHDU):
        return  # compressed: the file is legitimately smaller than the pixels
    need = n_pix * abs(int(hdu.header.get("BITPIX", 8))) // 8
    size = p.stat().st_size
    if need > size:
        raise DataError(
            f"image {p}: FITS header claims {need} bytes of pixel data ({naxes}) but the file has "
            f"only {size} bytes (truncated?)"
        )


def _load_fits(p: Path, size: int, crop_fraction: float) -> tuple[np.ndarray, str, list[str]]:
    try:
        with fits.open(p, memmap=False) as hdul:
            if "BANDS" in hdul[0].header and "OBJID" in hdul[0].header:
                cut = read_cutout(p)
                data, bunit, bands = cut.data.astype(np.float32), cut.bunit, cut.bands
            else:
                hdu = next((h for h in hdul if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) >= 2), None)
                if hdu is None:
                    raise DataError(f"image {p}: FITS file has no image HDU with NAXIS >= 2")
                naxes = [int(hdu.header.get(f"NAXIS{k}", 0)) for k in range(1, int(hdu.header["NAXIS"]) + 1)]
                if (
                    len(naxes) > 3
                    or any(n <= 0 or n > MAX_FITS_SIDE for n in naxes)
                    or (len(naxes) == 3 and naxes[2] > 16)
                ):
                    raise DataError(
                        f"image {p}: FITS axes {naxes} are out of range (at most 3 axes, "
                        f"sides 1..{MAX_FITS_SIDE}, at most 16 bands)"
                    )
                _check_fits_size(p, hdu, naxes)
                raw = np.asarray(hdu.data, dtype=np.float32)
                data = _north_up(hdu.header, raw[None] if raw.ndim == 2 else raw)
                bunit = str(hdu.header.get("BUNIT", "nanomaggy")) or "nanomaggy"
                bands = [f"band{k}" for k in range(data.shape[0])]
    except DataError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError, VerifyError) as exc:
        raise DataError(f"image {p}: not a readable FITS file ({exc})") from exc
    if not np.isfinite(data).any():
        raise DataError(f"image {p}: every pixel is NaN or infinite")
    _, h, w = data.shape
    left, top, right, bottom = _centre_crop_box(w, h, crop_fraction)
    out = np.empty((data.shape[0], size, size), dtype=np.float32)
    for k in range(data.shape[0]):
        finite = np.nan_to_num(data[k, top:bottom, left:right], nan=0.0, posinf=0.0, neginf=0.0)
        band = Image.fromarray(finite, mode="F")
        out[k] = np.asarray(band.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    if bunit == "DN":
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out, bunit, bands


def load_external_image(path: PathLike, *, size: int, crop_fraction: float = 1.0) -> ExternalImage:
    """One image file as cutout pixels: :func:`load_image`, as an :class:`ExternalImage`.

    The single loader of image files: ``make_cutouts`` of the ``images`` source
    and ``load_external`` of every built-in source use it.

    Returns
    -------
    ExternalImage
        ``data`` of shape ``(n_bands, size, size)`` (uint8 for 8-bit images,
        float32 for FITS), ``bunit`` and ``bands``.
    """
    data, bunit, bands = load_image(path, size=size, crop_fraction=crop_fraction)
    return ExternalImage(data=data, bunit=bunit, bands=tuple(bands))


def make_cutouts(
    catalogue: pd.DataFrame,
    cache: CutoutCache,
    *,
    size: int,
    crop_fraction: float,
    progress: bool = False,
) -> pd.DataFrame:
    """Convert the images of a catalogue shard into cutout FITS files in ``cache``.

    A cutout already in the cache that is valid (:meth:`CutoutCache.load_valid`)
    is kept (a rerun resumes).  An image that cannot be read is quarantined:
    its manifest row has ``status="failed"``, an empty path and the reason.

    Parameters
    ----------
    catalogue : pandas.DataFrame
        Rows of :func:`build_catalogue` (``objid``, ``ra``, ``dec``, ``image_path``).
    cache : CutoutCache
        Where the cutouts go.
    size : int
        Cutout side in pixels.
    crop_fraction : float
        Fraction of the shorter image side kept by the centre crop.
    progress : bool
        Report progress (:mod:`galpipe.progress`).

    Returns
    -------
    pandas.DataFrame
        Manifest (:data:`galpipe.sources.base.MANIFEST_COLUMNS`), one row per
        galaxy in catalogue order.
    """
    from galpipe.progress import track

    rows = []
    it: Any = track(catalogue.itertuples(index=False), "image cutouts", "galaxy", total=len(catalogue),
                    enabled=progress)
    for row in it:
        objid = int(row.objid)
        try:
            source_hash = file_sha256(row.image_path)
        except OSError as exc:
            rows.append((objid, "", "failed", f"image {row.image_path}: cannot be read ({exc.strerror})", 0))
            continue
        cached = cache.load_valid(objid, size=size)
        if (cached is not None and cached.header.get("SRCHASH") == source_hash  # made from these very bytes
                and int(cached.header.get("GPLAYOUT", 1)) >= LAYOUT_VERSION):  # v1: 8-bit rows upside down
            rows.append((objid, str(cache.path(objid)), "ok", "", 0))
            continue
        try:
            image = load_external_image(row.image_path, size=size, crop_fraction=crop_fraction)
            path = cache.write(objid, image.data, bands=image.bands, ra=float(row.ra), dec=float(row.dec),
                               source="images", bunit=image.bunit, pixel_scale=0.0,
                               extra={"SRCHASH": source_hash})
            rows.append((objid, str(path), "ok", "", 0))
        except DataError as exc:
            rows.append((objid, "", "failed", str(exc), 0))
    return manifest_frame(rows)


# --------------------------------------------------------------------------- the source
@register_source
class ImagesSource:
    """Source ``images``: a folder of labelled images (see the module docstring).

    Parameters
    ----------
    cfg : Config
        The whole validated configuration; uses ``images``, ``seed`` and
        ``cutout_size`` (not ``bands``: the files decide).
    """

    name: ClassVar[str] = "images"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.section: ImagesConfig = cfg.images

    @property
    def bands(self) -> None:
        """None: the image files decide (``red, green, blue`` for 8-bit images)."""
        return None

    @property
    def catalogue_columns(self) -> tuple[str, ...]:
        """``objid`` and ``image_path`` (the file each cutout is made from)."""
        return ("objid", "image_path")

    @property
    def crop_fraction(self) -> float:
        """``images.crop_fraction``: the centre crop applied to every image (and to external ones)."""
        return float(self.section.crop_fraction)

    def params(self) -> dict[str, Any]:
        """``source``, ``seed``, the ``images`` section and ``cutout_size`` (plain data)."""
        return {
            "source": self.name,
            "seed": int(self.cfg.seed),
            "images": self.section.to_dict(),
            "cutout_size": int(self.cfg.cutout_size),
        }

    def catalogue(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The labels CSV as a catalogue (:func:`build_catalogue`); no time stamp in the provenance."""
        df, prov = build_catalogue(self.section)
        prov.pop("created_utc", None)  # keep the file identical across reruns
        return df, prov

    def make_cutouts(self, shard: pd.DataFrame, cache: CutoutCache, *, progress: bool = False) -> pd.DataFrame:
        """Cutouts of the images of ``shard`` in ``cache`` (:func:`make_cutouts`); return the manifest."""
        return make_cutouts(shard, cache, size=int(self.cfg.cutout_size),
                            crop_fraction=float(self.section.crop_fraction), progress=progress)

    def input_files(self) -> list[Path]:
        """The labels CSV: the one file the catalogue reads."""
        return [Path(str(self.section.labels_csv))]

    def shard_input_files(self, n_shards: int) -> list[list[Path]]:
        """Per shard, the images its cutouts are made from (the catalogue's own shard assignment).

        Reads the labels CSV as the catalogue stage does and deals the rows into
        shards with :func:`galpipe.catalogue.shard_catalogue`, so a changed image
        is traced to exactly its shard.  A missing CSV gives empty lists (the
        catalogue stage reports it).
        """
        from galpipe.catalogue import check_catalogue, shard_catalogue
        from galpipe.sources.base import shard_group_columns

        if not Path(str(self.section.labels_csv)).is_file():
            return [[] for _ in range(n_shards)]
        cat, _ = build_catalogue(self.section)
        parts = shard_catalogue(check_catalogue(cat), n_shards, group_columns=shard_group_columns(self))
        return [[Path(p) for p in part["image_path"]] for part in parts]

    @classmethod
    def load_external(cls, path: PathLike, *, size: int, crop_fraction: float) -> ExternalImage:
        """An external image as cutout pixels, exactly as :meth:`make_cutouts` makes them."""
        return load_external_image(path, size=size, crop_fraction=crop_fraction)
