"""Helpers for the galpipe.nn tests: split-format Parquet writer and synthetic galaxies."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLASSES = ["elliptical", "spiral", "edge_on"]


def write_split_parquet(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str] = CLASSES,
    objids: np.ndarray | None = None,
    bands: Sequence[str] = ("g", "r", "i"),
    row_group_size: int = 100,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``images`` ``(N, H, W, C)`` and ``labels`` ``(N,)`` in the split Parquet format."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    n, h, w, c = images.shape
    labels = np.asarray(labels, dtype=np.int32)
    if objids is None:
        objids = np.arange(1000, 1000 + n, dtype=np.int64)
    flat = pa.array(images.reshape(-1))
    image_col = pa.FixedSizeListArray.from_arrays(flat, h * w * c)
    cols = {
        "objid": pa.array(np.asarray(objids, dtype=np.int64)),
        "label": pa.array([classes[i] for i in labels], type=pa.string()),
        "label_index": pa.array(labels, type=pa.int32()),
        "image": image_col,
    }
    for name, values in (extra or {}).items():
        cols[name] = pa.array(values)
    meta = {
        b"galpipe.image_shape": json.dumps([h, w, c]).encode(),
        b"galpipe.classes": json.dumps(list(classes)).encode(),
        b"galpipe.bands": json.dumps(list(bands)).encode(),
    }
    table = pa.table(cols).replace_schema_metadata(meta)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def synthetic_galaxies(
    n: int, *, size: int = 12, channels: int = 2, seed: int = 0, noise: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class toy problem whose classes do not depend on orientation.

    Class 0 is a round Gaussian blob, class 1 a ring, class 2 an elongated bar
    at a random angle; each with random flux, small centre jitter and Gaussian
    noise.  Returns ``x`` ``(n, size, size, channels)`` float32 and ``y``
    ``(n,)`` int64 (balanced classes in random order).
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    x = np.empty((n, size, size, channels), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(-1, 1, 2)
        dy, dx = yy - cy, xx - cx
        r = np.hypot(dy, dx)
        if y[i] == 0:
            img = np.exp(-0.5 * (r / (size / 8)) ** 2)
        elif y[i] == 1:
            img = np.exp(-0.5 * ((r - size / 3.5) / 0.9) ** 2)
        else:
            t = rng.uniform(0, np.pi)
            u = dx * np.cos(t) + dy * np.sin(t)
            v = -dx * np.sin(t) + dy * np.cos(t)
            img = np.exp(-0.5 * ((u / (size / 4)) ** 2 + (v / 0.9) ** 2))
        flux = rng.uniform(0.7, 1.3)
        for ch in range(channels):
            x[i, :, :, ch] = flux * (0.8 + 0.2 * ch) * img + rng.normal(0, noise, img.shape)
    return x, y.astype(np.int64)
