"""Per-band scaling of cutouts to network-ready float32 arrays.

Flux cutouts (``BUNIT = "nanomaggy"``) get a Lupton-style asinh stretch,
``asinh(f / b) / asinh(f_ref / b)`` with softening ``b`` (about the sky noise)
and reference flux ``f_ref`` mapped to 1; 8-bit images (``BUNIT = "DN"``) are
scaled to 0..1.  Values are clipped; NaN/inf pixels are replaced and counted.
The output is channels-last ``(H, W, C)`` float32.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from galpipe.catalogue import read_catalogue
from galpipe.errors import DataError
from galpipe.io.atomic import atomic_path
from galpipe.io.cutout_fits import Cutout, read_cutout
from galpipe.io.parquet import write_arrow
from galpipe.settings import Config, NormaliseConfig

log = logging.getLogger("galpipe")

def normalise_array(data: np.ndarray, bunit: str, params: NormaliseConfig) -> tuple[np.ndarray, int]:
    """Normalise one cutout.

    Parameters
    ----------
    data : numpy.ndarray
        ``(n_bands, ny, nx)`` pixels, float fluxes or uint8 DN.
    bunit : str
        ``"DN"`` for 8-bit images; anything else is treated as linear flux.
    params : NormaliseConfig
        ``softening``, ``reference_flux``, ``clip``, ``bad_pixel_value`` (the ``normalise:`` section).

    Returns
    -------
    image : numpy.ndarray
        ``(ny, nx, n_bands)`` float32, channels-last.
    n_bad : int
        Number of NaN/inf pixels replaced by ``bad_pixel_value``.
    """
    x = np.asarray(data)
    if x.ndim != 3:
        raise DataError(f"expected a cutout of shape (n_bands, ny, nx), got {x.shape}")
    if bunit == "DN":
        out = x.astype(np.float32) / np.float32(255.0)
        n_bad = 0
    else:
        xf = x.astype(np.float32, copy=True)
        bad = ~np.isfinite(xf)
        n_bad = int(bad.sum())
        if n_bad == xf.size:
            raise DataError("every pixel is NaN or infinite")
        xf[bad] = 0.0
        b = np.float32(params.softening)
        out = np.arcsinh(xf / b) / np.float32(np.arcsinh(params.reference_flux / params.softening))
        out[bad] = np.float32(params.bad_pixel_value)
    lo, hi = params.clip
    np.clip(out, lo, hi, out=out)
    return np.ascontiguousarray(out.transpose(1, 2, 0), dtype=np.float32), n_bad


def image_column(images: np.ndarray) -> pa.FixedSizeListArray:
    """Arrow column of flattened images: ``(N, H, W, C)`` -> ``fixed_size_list<float32>[H*W*C]``."""
    n = images.shape[0]
    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(n, -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


#: Rows per Parquet row group of a normalised shard.  The shard is written one row group at
#: a time, so normalise (and split, which reads row groups) holds at most this many images.
ROW_GROUP_ROWS = 256


class _ShardWriter:
    """Streams a normalised shard to Parquet one row group at a time.

    Holds at most ``row_group_rows`` images; the first row group fixes the
    schema (with ``galpipe.image_shape``, ``galpipe.bands`` and
    ``galpipe.normalisation`` metadata) and every later one reuses it.
    """

    def __init__(self, tmp: Path, columns: pa.Table, normalisation: Mapping[str, Any], row_group_rows: int) -> None:
        self.tmp, self.columns, self.normalisation = tmp, columns, dict(normalisation)
        self.row_group_rows = row_group_rows
        self.bad_col = columns.schema.get_field_index("n_bad_pixels")
        self.writer: pq.ParquetWriter | None = None
        self.images: list[np.ndarray] = []
        self.rows: list[int] = []
        self.n_bad: list[int] = []

    def add(self, row: int, image: np.ndarray, n_bad: int, shape: tuple[int, ...], bands: list[str]) -> None:
        """Buffer one ``(H, W, C)`` image of catalogue row ``row``; flush a full row group."""
        self.images.append(image)
        self.rows.append(row)
        self.n_bad.append(n_bad)
        if len(self.rows) >= self.row_group_rows:
            self.flush(shape, bands)

    def _table(self, rows: list[int], bad: list[int], stack: np.ndarray, n_values: int) -> pa.Table:
        part = self.columns.take(pa.array(rows, type=pa.int64()))
        part = part.set_column(self.bad_col, "n_bad_pixels", pa.array(bad, type=pa.int64()))
        image = image_column(stack) if len(stack) else pa.array([], type=pa.list_(pa.float32(), n_values))
        return part.append_column("image", image)

    def _write(self, table: pa.Table, shape: tuple[int, ...], bands: list[str]) -> None:
        if self.writer is None:
            meta = dict(table.schema.metadata or {})
            for k, v in {"image_shape": list(shape), "bands": bands, "normalisation": self.normalisation}.items():
                meta[f"galpipe.{k}".encode()] = json.dumps(v, sort_keys=True, default=str).encode()
            self.writer = pq.ParquetWriter(self.tmp, table.schema.with_metadata(meta), compression="zstd")
        self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata),
                                row_group_size=self.row_group_rows)

    def flush(self, shape: tuple[int, ...], bands: list[str]) -> None:
        """Write the buffered images as one row group (opening the writer on first use)."""
        if not self.rows:
            return
        self._write(self._table(self.rows, self.n_bad, np.stack(self.images), int(np.prod(shape))), shape, bands)
        self.images, self.rows, self.n_bad = [], [], []

    def finish(self, shape: tuple[int, ...], bands: list[str]) -> None:
        """Flush; with no image at all, write an empty table with the expected columns."""
        self.flush(shape, bands)
        if self.writer is None:
            empty = self._table([], [], np.zeros((0, *shape), np.float32), int(np.prod(shape)))
            self._write(empty, shape, bands)


def _base_columns(merged: pd.DataFrame) -> pa.Table:
    """Every row's non-image columns, converted once so that all row groups share one schema."""
    base = merged.drop(columns=["path", "status", "reason"])
    base["n_filled"] = base["n_filled"].fillna(0).astype(np.int64)
    base["n_bad_pixels"] = np.zeros(len(base), dtype=np.int64)  # filled in per row group
    return pa.Table.from_pandas(base, preserve_index=False)


def _load_normalised(path: str, bands: list[str] | None, size: int, params: NormaliseConfig,
                     shape: tuple[int, ...] | None) -> tuple[np.ndarray, int, list[str]]:
    """Read and normalise one cutout: ``(H, W, C)`` image, bad-pixel count, its bands."""
    cut: Cutout = read_cutout(path, bands=bands)
    if cut.data.shape[1:] != (size, size):
        raise DataError(f"cutout {path}: size {cut.data.shape[1:]}, expected {(size, size)}")
    img, bad = normalise_array(cut.data, cut.bunit, params)
    if shape is not None and img.shape != shape:
        raise DataError(f"cutout {path}: shape {img.shape} differs from the shard's {shape}")
    return img, bad, list(cut.bands)


def normalise_shard(
    manifest_path: str | os.PathLike[str],
    catalogue_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    rejects_output: str | os.PathLike[str],
    *,
    params: NormaliseConfig,
    size: int,
    bands: Sequence[str] | None,
    max_reject_fraction: float,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> dict[str, Any]:
    """Normalise every cutout of one shard into a Parquet table, streamed in row groups.

    Parameters
    ----------
    manifest_path : path-like
        Cutout manifest of the shard (``objid``, ``path``, ``status``, ``reason``).
    catalogue_path : path-like
        The catalogue shard (its columns are carried along).
    output : path-like
        Parquet file: the catalogue columns, ``n_filled``, ``n_bad_pixels`` and ``image``
        (``fixed_size_list<float32>`` of ``size*size*C``, the ``(H, W, C)`` image flattened);
        schema metadata ``galpipe.image_shape``, ``galpipe.bands``, ``galpipe.normalisation``.
        Written atomically, ``row_group_rows`` rows per row group.
    rejects_output : path-like
        Parquet table of quarantined galaxies (``objid``, ``stage``, ``reason``).
    params : NormaliseConfig
        The ``normalise:`` config section.
    size : int
        Expected cutout side.
    bands : sequence of str or None
        Expected bands (None: whatever the first cutout has; all must agree).
    max_reject_fraction : float
        Fail (DataError) when more than this fraction of the shard is rejected.
    row_group_rows : int
        Rows per row group; at most this many images are held in memory at once.

    Returns
    -------
    dict
        Counts: ``n``, ``n_rejected``, ``n_bad_pixels``.
    """
    if row_group_rows < 1:
        raise DataError(f"row_group_rows must be >= 1, got {row_group_rows}")
    manifest = pd.read_parquet(manifest_path)
    cat = read_catalogue(catalogue_path, allow_empty=True)
    merged = cat.merge(manifest[["objid", "path", "status", "reason", "n_filled"]], on="objid",
                       how="left", validate="one_to_one")
    rejects: list[tuple[int, str, str]] = []
    n_kept = n_bad_total = 0
    shape: tuple[int, ...] | None = None
    file_bands: list[str] | None = list(bands) if bands is not None else None
    with atomic_path(output) as tmp:
        out = _ShardWriter(tmp, _base_columns(merged), params.to_dict(), row_group_rows)
        try:
            for i, row in enumerate(merged.itertuples(index=False)):
                if row.status != "ok" or not isinstance(row.path, str):
                    reason = row.reason if isinstance(row.reason, str) and row.reason else "no cutout"
                    rejects.append((int(row.objid), "cutouts", reason))
                    continue
                try:
                    img, bad, file_bands = _load_normalised(row.path, file_bands, size, params, shape)
                except DataError as exc:
                    rejects.append((int(row.objid), "normalise", str(exc)))
                    continue
                shape = img.shape
                out.add(i, img, bad, shape, file_bands)
                n_kept += 1
                n_bad_total += bad
            _check_rejected(rejects, len(merged), max_reject_fraction, catalogue_path)
            if shape is None:
                shape = (size, size, len(file_bands) if file_bands else 0)
            out.finish(shape, file_bands or [])
        finally:
            if out.writer is not None:
                out.writer.close()
    rej = pd.DataFrame(rejects, columns=["objid", "stage", "reason"]).astype({"objid": np.int64})
    write_arrow(pa.Table.from_pandas(rej, preserve_index=False), rejects_output)
    return {"n": n_kept, "n_rejected": len(rejects), "n_bad_pixels": int(n_bad_total)}


def _check_rejected(rejects: list[tuple[int, str, str]], n: int, max_reject_fraction: float,
                    where: str | os.PathLike[str]) -> None:
    if n and len(rejects) / n > max_reject_fraction:
        first = rejects[0]
        raise DataError(
            f"shard {where}: {len(rejects)} of {n} galaxies rejected, more than "
            f"max_reject_fraction={max_reject_fraction}; first: objid {first[0]} ({first[1]}): {first[2]}"
        )


def params(cfg: Config) -> dict[str, Any]:
    """What normalising depends on: the normalise section, the stamp size and bands, the rejection threshold."""
    from galpipe.sources import get_source

    bands = get_source(cfg).bands
    return {"normalise": cfg.normalise.to_dict(), "cutout_size": cfg.cutout_size,
            "bands": list(bands) if bands is not None else None, "max_reject_fraction": cfg.max_reject_fraction}


def run(params: Mapping[str, Any], manifest: str | os.PathLike[str], shard: str | os.PathLike[str],
        output: str | os.PathLike[str], rejects: str | os.PathLike[str]) -> dict[str, Any]:
    """Normalise one shard (``params`` = ``stage_params(cfg, "normalise")``; see :func:`normalise_shard`)."""
    stats = normalise_shard(manifest, shard, output, rejects, params=NormaliseConfig.from_dict(params["normalise"]),
                            size=int(params["cutout_size"]), bands=params["bands"],
                            max_reject_fraction=float(params["max_reject_fraction"]))
    log.info("normalise: %s", stats)
    return stats


def read_images(path: str | os.PathLike[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Read a normalised/split Parquet file whole (small files only: tests, tools).

    Returns ``images`` ``(N, H, W, C)`` and the other columns as a DataFrame.
    """
    import pyarrow.parquet as pq

    from galpipe.io.parquet import read_metadata

    meta = read_metadata(path)
    table = pq.read_table(path)
    h, w, c = meta["image_shape"]
    col = table.column("image").combine_chunks()
    if not len(col):
        return np.zeros((0, h, w, c), np.float32), table.drop(["image"]).to_pandas()
    imgs = col.values.to_numpy(zero_copy_only=False).reshape(-1, h, w, c)
    return imgs, table.drop(["image"]).to_pandas()


__all__ = ["ROW_GROUP_ROWS", "image_column", "normalise_array", "normalise_shard", "read_images", "run"]
