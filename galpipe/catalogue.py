"""The galaxy catalogue contract: common columns, checks, provenance, sharding.

Every source produces a catalogue with at least ``objid`` (int64, unique),
``ra``, ``dec`` (float64, degrees) and ``label`` (class name, string), plus
source-specific columns (photometry, truth parameters, image paths).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from galpipe.errors import DataError
from galpipe.io.atomic import safe_filename
from galpipe.io.parquet import write_table

REQUIRED_COLUMNS = ("objid", "ra", "dec", "label")
PROVENANCE_KEY = b"galpipe.provenance"


def check_catalogue(
    df: pd.DataFrame, *, where: str = "catalogue", allow_empty: bool = False
) -> pd.DataFrame:
    """Check the common columns and return ``df`` sorted by ``objid`` (index reset).

    Raises
    ------
    DataError
        Missing columns, an empty table, non-integer or duplicate ids, missing labels,
        labels that are not safe file names (see :func:`galpipe.io.atomic.safe_filename`).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    if len(df) == 0 and not allow_empty:
        raise DataError(f"{where}: the catalogue is empty (no galaxies selected)")
    if not pd.api.types.is_integer_dtype(df["objid"]):
        raise DataError(f"{where}: column 'objid' must hold integers, got {df['objid'].dtype}")
    dup = df["objid"][df["objid"].duplicated()]
    if len(dup):
        raise DataError(f"{where}: duplicate objid(s) {dup.head(5).tolist()}")
    if df["label"].isna().any():
        bad = df.loc[df["label"].isna(), "objid"].head(5).tolist()
        raise DataError(f"{where}: rows without a label (objid {bad})")
    out = df.sort_values("objid", kind="stable").reset_index(drop=True)
    out["objid"] = out["objid"].astype(np.int64)
    out["label"] = out["label"].astype(str)
    for label in out["label"].unique():  # class names become file names (figures): never used raw
        try:
            safe_filename(label, what="label")
        except DataError as exc:
            first = int(out.loc[out["label"] == label, "objid"].iloc[0])
            raise DataError(f"{where}: objid {first}: {exc}") from exc
    return out


def write_catalogue(df: pd.DataFrame, path: str | os.PathLike[str], provenance: Mapping[str, Any]) -> Path:
    """Check and write a catalogue with its provenance (query, release, time, ...)."""
    return write_table(check_catalogue(df), path, {"provenance": dict(provenance)})


def read_catalogue(path: str | os.PathLike[str], *, allow_empty: bool = False) -> pd.DataFrame:
    """Read a catalogue (or a shard of one, which may be empty) written by galpipe."""
    try:
        df = pd.read_parquet(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"catalogue {path}: not a readable Parquet file ({exc})") from exc
    return check_catalogue(df, where=f"catalogue {path}", allow_empty=allow_empty)


def shard_catalogue(df: pd.DataFrame, n_shards: int) -> list[pd.DataFrame]:
    """Split a catalogue into ``n_shards`` balanced, deterministic shards.

    Rows are ordered by ``objid`` and dealt round-robin, so shard sizes differ by
    at most one and a galaxy's shard depends only on its rank in the catalogue.
    Shards may be empty when there are fewer galaxies than shards.
    """
    if n_shards < 1:
        raise DataError(f"number of shards must be >= 1, got {n_shards}")
    ordered = df.sort_values("objid", kind="stable").reset_index(drop=True)
    return [ordered.iloc[i::n_shards].reset_index(drop=True) for i in range(n_shards)]


def write_shards(df: pd.DataFrame, paths: Sequence[str | os.PathLike[str]],
                 provenance: Mapping[str, Any]) -> list[Path]:
    """Write :func:`shard_catalogue` of ``df`` to ``paths`` (one per shard)."""
    out = []
    for i, (part, p) in enumerate(zip(shard_catalogue(df, len(paths)), paths, strict=True)):
        out.append(write_table(part, p, {"provenance": dict(provenance), "shard": [i, len(paths)]}))
    return out
