"""Per-band scaling of cutouts to network-ready float32 arrays.

Flux cutouts (``BUNIT = "nanomaggy"``) get a Lupton-style asinh stretch,
``asinh(f / b) / asinh(f_ref / b)`` with softening ``b`` (about the sky noise)
and reference flux ``f_ref`` mapped to 1; 8-bit images (``BUNIT = "DN"``) are
scaled to 0..1.  Values are clipped; NaN/inf pixels are replaced and counted.
The output is channels-last ``(H, W, C)`` float32.
"""

from __future__ import annotations

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
) -> dict[str, Any]:
    """Normalise every cutout of one shard into a Parquet table.

    Parameters
    ----------
    manifest_path : path-like
        Cutout manifest of the shard (``objid``, ``path``, ``status``, ``reason``).
    catalogue_path : path-like
        The catalogue shard (its columns are carried along).
    output : path-like
        Parquet file: ``objid``, ``label``, ``image`` (``fixed_size_list<float32>``
        of ``size*size*C``), ``n_bad_pixels``, ``n_filled`` and the catalogue
        columns; schema metadata ``galpipe.image_shape``, ``galpipe.bands``,
        ``galpipe.normalisation``.
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

    Returns
    -------
    dict
        Counts: ``n``, ``n_rejected``, ``n_bad_pixels``.
    """
    manifest = pd.read_parquet(manifest_path)
    cat = read_catalogue(catalogue_path, allow_empty=True)
    merged = cat.merge(manifest[["objid", "path", "status", "reason", "n_filled"]], on="objid",
                       how="left", validate="one_to_one")
    images: list[np.ndarray] = []
    keep: list[int] = []
    n_bad: list[int] = []
    rejects: list[tuple[int, str, str]] = []
    shape: tuple[int, ...] | None = None
    file_bands: list[str] | None = list(bands) if bands is not None else None
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
    n = len(merged)
    if n and len(rejects) / n > max_reject_fraction:
        first = rejects[0]
        raise DataError(
            f"shard {catalogue_path}: {len(rejects)} of {n} galaxies rejected, more than "
            f"max_reject_fraction={max_reject_fraction}; first: objid {first[0]} ({first[1]}): {first[2]}"
        )
    table_df = merged.iloc[keep].drop(columns=["path", "status", "reason"]).reset_index(drop=True)
    table_df["n_bad_pixels"] = np.asarray(n_bad, dtype=np.int64)
    table_df["n_filled"] = table_df["n_filled"].fillna(0).astype(np.int64)
    table = pa.Table.from_pandas(table_df, preserve_index=False)
    if shape is None:
        shape = (size, size, len(file_bands) if file_bands else 0)
    stack = np.stack(images) if images else np.zeros((0, *shape), dtype=np.float32)
    table = table.append_column("image", image_column(stack) if len(stack) else
                                pa.array([], type=pa.list_(pa.float32(), int(np.prod(shape)))))
    meta = {"image_shape": list(shape), "bands": file_bands or [],
            "normalisation": {**DEFAULTS, **dict(params)}}
    write_arrow(table, output, meta)
    rej = pd.DataFrame(rejects, columns=["objid", "stage", "reason"]).astype({"objid": np.int64})
    write_arrow(pa.Table.from_pandas(rej, preserve_index=False), rejects_output)
    return {"n": len(keep), "n_rejected": len(rejects), "n_bad_pixels": int(sum(n_bad))}


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


__all__ = ["image_column", "normalise_array", "normalise_shard", "read_images"]
