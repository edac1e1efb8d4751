"""Parquet I/O with galpipe metadata: atomic writes, JSON values under ``galpipe.*`` schema keys."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from galpipe.errors import DataError
from galpipe.io.atomic import atomic_path


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
                *, row_group_size: int | None = None) -> Path:
    """Write ``df`` to Parquet atomically, with JSON values under ``galpipe.*`` metadata keys."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    return write_arrow(table, path, metadata, row_group_size=row_group_size)


def write_arrow(table: pa.Table, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
                *, row_group_size: int | None = None) -> Path:
    """Write an Arrow table atomically; ``metadata`` values are stored as JSON."""
    meta = dict(table.schema.metadata or {})
    for k, v in (metadata or {}).items():
        meta[f"galpipe.{k}".encode()] = json.dumps(v, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    return Path(path)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``galpipe.*`` schema metadata of a Parquet file, JSON-decoded, prefix removed."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    out: dict[str, Any] = {}
    for k, v in (schema.metadata or {}).items():
        if k.startswith(b"galpipe."):
            out[k[len(b"galpipe."):].decode()] = json.loads(v)
    return out
