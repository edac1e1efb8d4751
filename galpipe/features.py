"""Catalogue features for the non-image baseline.

For catalogues with SDSS photometry (the live SDSS source, and the simulated
survey, which writes the same columns with measurement noise) the features are
the colours, the concentration ``petroR90_r / petroR50_r``, ``fracDeV_r``, the
axis ratios and the size and magnitude.  For a folder of images, which has no
catalogue, the equivalent quantities are *measured* on the normalised pixels
(:func:`measure_image_features`): colour ratios, concentration, axis ratio.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import pyarrow.parquet as pq

from galpipe.errors import DataError
from galpipe.io.parquet import read_metadata

PHOTO_BANDS = ("u", "g", "r", "i", "z")
SHAPE_COLUMNS = ("petroR50_r", "petroR90_r", "fracDeV_r", "deVAB_r", "expAB_r", "petroMag_r")


def catalogue_feature_names(columns: Sequence[str]) -> list[str]:
    """Names of the catalogue features available among ``columns`` (empty if none)."""
    cols = set(columns)
    names = []
    mags = [b for b in PHOTO_BANDS if f"petroMag_{b}" in cols]
    names += [f"{a}-{b}" for a, b in pairwise(mags)]
    if {"petroR50_r", "petroR90_r"} <= cols:
        names += ["concentration", "log_petroR50_r"]
    names += [c for c in ("fracDeV_r", "deVAB_r", "expAB_r", "petroMag_r") if c in cols]
    return names if len(names) >= 3 else []


def _catalogue_features(path: str | os.PathLike[str], names: Sequence[str]) -> np.ndarray:
    needed = {c for c in pq.read_schema(path).names if c.startswith("petro") or c in SHAPE_COLUMNS}
    t = pq.read_table(path, columns=sorted(needed)).to_pandas()
    cols = []
    for n in names:
        if "-" in n:
            a, b = n.split("-")
            cols.append(t[f"petroMag_{a}"] - t[f"petroMag_{b}"])
        elif n == "concentration":
            cols.append(t["petroR90_r"] / t["petroR50_r"].clip(lower=1e-3))
        elif n == "log_petroR50_r":
            cols.append(np.log10(t["petroR50_r"].clip(lower=1e-3)))
        else:
            cols.append(t[n])
    return np.column_stack([np.asarray(c, dtype=np.float64) for c in cols]).astype(np.float32)


def measure_image_features(images: np.ndarray) -> np.ndarray:
    """Measured morphology/colour features of normalised images.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W, C)`` normalised cutouts.

    Returns
    -------
    numpy.ndarray
        ``(N, F)`` float32 with, per image: log flux ratios of consecutive
        channels in a central aperture (colours), concentration R90/R50 and
        log R50 of the channel-summed light, second-moment axis ratio, and the
        central-to-total light fraction.
    """
    x = np.clip(np.asarray(images, dtype=np.float64), 0.0, None)
    n, h, w, c = x.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    r = np.hypot(yy - cy, xx - cx)
    aperture = r <= min(h, w) / 4.0
    feats = []
    band_flux = (x * aperture[None, :, :, None]).sum(axis=(1, 2)) + 1e-3  # (N, C)
    for k in range(c - 1):
        feats.append(np.log10(band_flux[:, k] / band_flux[:, k + 1]))
    total = x.sum(axis=3) * (r <= min(h, w) / 2.0)[None]  # (N, H, W)
    order = np.argsort(r.ravel())
    r_sorted = r.ravel()[order]
    cum = np.cumsum(total.reshape(n, -1)[:, order], axis=1)
    tot = cum[:, -1:] + 1e-9
    r50 = r_sorted[np.argmax(cum >= 0.5 * tot, axis=1)] + 0.5
    r90 = r_sorted[np.argmax(cum >= 0.9 * tot, axis=1)] + 0.5
    feats += [r90 / r50, np.log10(r50)]
    m = total / tot[:, :, None]
    dy, dx = yy - cy, xx - cx
    myy = (m * dy**2).sum(axis=(1, 2))
    mxx = (m * dx**2).sum(axis=(1, 2))
    mxy = (m * dx * dy).sum(axis=(1, 2))
    tr, det = mxx + myy, mxx * myy - mxy**2
    disc = np.sqrt(np.clip(tr**2 / 4 - det, 0, None))
    lam1, lam2 = tr / 2 + disc, np.clip(tr / 2 - disc, 1e-9, None)
    feats.append(np.sqrt(lam2 / lam1))
    feats.append((total * (r <= 2.5)[None]).sum(axis=(1, 2)) / tot[:, 0])
    return np.column_stack(feats).astype(np.float32)


def feature_matrix(path: str | os.PathLike[str], *, batch_rows: int = 512) -> tuple[np.ndarray, list[str]]:
    """Features of every row of a split Parquet file, in file order.

    Returns ``(X (N, F) float32, names)``; catalogue columns when the split has
    them, otherwise features measured on the images (streamed by row group).
    """
    names = catalogue_feature_names(pq.read_schema(path).names)
    if names:
        x = _catalogue_features(path, names)
    else:
        meta = read_metadata(path)
        h, w, c = meta["image_shape"]
        pf = pq.ParquetFile(path)
        parts = []
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["image"]):
            imgs = batch.column(0).values.to_numpy(zero_copy_only=False).reshape(-1, h, w, c)
            parts.append(measure_image_features(imgs))
        x = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        names = [f"colour_{k}" for k in range(c - 1)] + ["concentration", "log_r50", "axis_ratio", "core_fraction"]
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise DataError(f"{path}: {bad} rows have non-finite catalogue features {names}")
    return x, names
