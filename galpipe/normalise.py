"""Per-band scaling of cutouts to network-ready float32 arrays.

Flux cutouts (``BUNIT = "nanomaggy"``) get a Lupton-style asinh stretch,
``asinh(f / b) / asinh(f_ref / b)`` with softening ``b`` (about the sky noise)
and reference flux ``f_ref`` mapped to 1; 8-bit images (``BUNIT = "DN"``) are
scaled to 0..1.  Values are clipped; NaN/inf pixels are replaced and counted.
The output is channels-last ``(H, W, C)`` float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from galpipe.catalogue import read_catalogue, write_arrow
from galpipe.errors import DataError
from galpipe.io import Cutout, read_cutout

DEFAULTS: dict[str, Any] = {
    "softening": 0.1,
    "reference_flux": 100.0,
    "clip": [-0.5, 1.5],
    "bad_pixel_value": 0.0,
}


def normalise_array(data: np.ndarray, bunit: str, params: Mapping[str, Any] | None = None) -> tuple[np.ndarray, int]:
    """Normalise one cutout.

    Parameters
    ----------
    data : numpy.ndarray
        ``(n_bands, ny, nx)`` pixels, float fluxes or uint8 DN.
    bunit : str
        ``"DN"`` for 8-bit images; anything else is treated as linear flux.
    params : mapping, optional
        ``softening``, ``reference_flux``, ``clip``, ``bad_pixel_value``.

    Returns
    -------
    image : numpy.ndarray
        ``(ny, nx, n_bands)`` float32, channels-last.
    n_bad : int
        Number of NaN/inf pixels replaced by ``bad_pixel_value``.
    """
    p = {**DEFAULTS, **(params or {})}
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
        b = np.float32(p["softening"])
        out = np.arcsinh(xf / b) / np.float32(np.arcsinh(p["reference_flux"] / p["softening"]))
        out[bad] = np.float32(p["bad_pixel_value"])
    lo, hi = p["clip"]
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


def normalise_shard(
    manifest_path: str | os.PathLike[str],
    catalogue_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    rejects_output: str | os.PathLike[str],
    *,
    params: Mapping[str, Any],
    size: int,
    bands: Sequence[str] | None = None,
    max_reject_fraction: float = 0.0,
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
    params : mapping
        The ``normalise:`` config section.
    size : int
        Expected cutout side.
    bands : sequence of str, optional
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
    import pyarrow.parquet as pq

    from galpipe.io import atomic_path

    if row_group_rows < 1:
        raise DataError(f"row_group_rows must be >= 1, got {row_group_rows}")
    manifest = pd.read_parquet(manifest_path)
    cat = read_catalogue(catalogue_path, allow_empty=True)
    merged = cat.merge(manifest[["objid", "path", "status", "reason", "n_filled"]], on="objid",
                       how="left", validate="one_to_one")
    # Every row's non-image columns, converted once so that all row groups share one schema;
    # n_bad_pixels is filled in per row group.
    base = merged.drop(columns=["path", "status", "reason"])
    base["n_filled"] = base["n_filled"].fillna(0).astype(np.int64)
    base["n_bad_pixels"] = np.zeros(len(base), dtype=np.int64)
    columns = pa.Table.from_pandas(base, preserve_index=False)
    bad_col = columns.schema.get_field_index("n_bad_pixels")
    norm_meta = {**DEFAULTS, **dict(params)}

    images: list[np.ndarray] = []
    keep: list[int] = []
    n_bad: list[int] = []
    rejects: list[tuple[int, str, str]] = []
    n_kept = n_bad_total = 0
    shape: tuple[int, ...] | None = None
    file_bands: list[str] | None = list(bands) if bands is not None else None
    writer: pq.ParquetWriter | None = None

    def table_of(rows: list[int], bad: list[int], stack: np.ndarray, n_values: int) -> pa.Table:
        part = columns.take(pa.array(rows, type=pa.int64()))
        part = part.set_column(bad_col, "n_bad_pixels", pa.array(bad, type=pa.int64()))
        image = image_column(stack) if len(stack) else pa.array(
            [], type=pa.list_(pa.float32(), n_values))
        return part.append_column("image", image)

    def schema_for(table: pa.Table) -> pa.Schema:
        meta = dict(table.schema.metadata or {})
        for k, v in {"image_shape": list(shape or ()), "bands": file_bands or [],
                     "normalisation": norm_meta}.items():
            meta[f"galpipe.{k}".encode()] = json.dumps(v, sort_keys=True, default=str).encode()
        return table.schema.with_metadata(meta)

    with atomic_path(output) as tmp:

        def flush() -> None:
            """Write the buffered images as one row group (opening the writer on first use)."""
            nonlocal writer, images, keep, n_bad
            if not keep:
                return
            table = table_of(keep, n_bad, np.stack(images), int(np.prod(shape or ())))
            if writer is None:
                writer = pq.ParquetWriter(tmp, schema_for(table), compression="zstd")
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata),
                               row_group_size=row_group_rows)
            images, keep, n_bad = [], [], []

        try:
            for i, row in enumerate(merged.itertuples(index=False)):
                if row.status != "ok" or not isinstance(row.path, str):
                    reason = row.reason if isinstance(row.reason, str) and row.reason else "no cutout"
                    rejects.append((int(row.objid), "cutouts", reason))
                    continue
                try:
                    cut: Cutout = read_cutout(row.path, bands=file_bands)
                    if cut.data.shape[1:] != (size, size):
                        raise DataError(f"cutout {row.path}: size {cut.data.shape[1:]}, expected {(size, size)}")
                    img, bad = normalise_array(cut.data, cut.bunit, params)
                    if shape is not None and img.shape != shape:
                        raise DataError(f"cutout {row.path}: shape {img.shape} differs from the shard's {shape}")
                    shape, file_bands = img.shape, cut.bands
                except DataError as exc:
                    rejects.append((int(row.objid), "normalise", str(exc)))
                    continue
                images.append(img)
                keep.append(i)
                n_bad.append(bad)
                n_kept += 1
                n_bad_total += bad
                if len(keep) >= row_group_rows:
                    flush()
            n = len(merged)
            if n and len(rejects) / n > max_reject_fraction:
                first = rejects[0]
                raise DataError(
                    f"shard {catalogue_path}: {len(rejects)} of {n} galaxies rejected, more than "
                    f"max_reject_fraction={max_reject_fraction}; first: objid {first[0]} ({first[1]}): "
                    f"{first[2]}"
                )
            flush()
            if writer is None:  # no image at all: an empty table with the expected columns
                if shape is None:
                    shape = (size, size, len(file_bands) if file_bands else 0)
                empty = table_of([], [], np.zeros((0, *shape), np.float32), int(np.prod(shape)))
                writer = pq.ParquetWriter(tmp, schema_for(empty), compression="zstd")
                writer.write_table(empty.replace_schema_metadata(writer.schema.metadata))
        finally:
            if writer is not None:
                writer.close()
    rej = pd.DataFrame(rejects, columns=["objid", "stage", "reason"]).astype({"objid": np.int64})
    write_arrow(pa.Table.from_pandas(rej, preserve_index=False), rejects_output)
    return {"n": n_kept, "n_rejected": len(rejects), "n_bad_pixels": int(n_bad_total)}


def read_images(path: str | os.PathLike[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Read a normalised/split Parquet file whole (small files only: tests, tools).

    Returns ``images`` ``(N, H, W, C)`` and the other columns as a DataFrame.
    """
    import pyarrow.parquet as pq

    from galpipe.catalogue import read_metadata

    meta = read_metadata(path)
    table = pq.read_table(path)
    h, w, c = meta["image_shape"]
    col = table.column("image").combine_chunks()
    if not len(col):
        return np.zeros((0, h, w, c), np.float32), table.drop(["image"]).to_pandas()
    imgs = col.values.to_numpy(zero_copy_only=False).reshape(-1, h, w, c)
    return imgs, table.drop(["image"]).to_pandas()


__all__ = ["ROW_GROUP_ROWS", "image_column", "normalise_array", "normalise_shard", "read_images"]
