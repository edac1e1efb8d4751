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
#: Valid coordinates in degrees: (low, high, high included, as written in messages).
COORDINATE_RANGES = {"ra": (0.0, 360.0, False, "[0, 360)"), "dec": (-90.0, 90.0, True, "[-90, 90]")}


def _refuse(df: pd.DataFrame, bad: np.ndarray, where: str, column: str, problem: str,
            raw: pd.Series | None = None) -> None:
    """Raise a DataError naming the first row flagged in ``bad`` (objid, row, column, value)."""
    rows = np.flatnonzero(bad)
    if not len(rows):
        return
    i = int(rows[0])
    value = (raw if raw is not None else df[column]).iloc[i]
    shown = repr(float(value)) if isinstance(value, (int, float, np.number)) else repr(value)
    more = f" ({len(rows)} rows like this)" if len(rows) > 1 else ""
    raise DataError(f"{where}: objid {df['objid'].iloc[i]} (row {i + 1}): column {column!r}: {shown} {problem}{more}")


def check_coordinates(df: pd.DataFrame, *, where: str = "catalogue", required: bool = False) -> pd.DataFrame:
    """Check a catalogue's ``ra`` and ``dec`` (degrees); return them as float64 columns.

    ``ra`` must lie in [0, 360) and ``dec`` in [-90, 90].  A row may have no
    coordinates at all (``ra`` and ``dec`` both NaN: the ``images`` source knows
    none) unless ``required`` (a source that makes a cutout at the position);
    one of the two without the other is refused.

    Returns
    -------
    pandas.DataFrame
        ``ra`` and ``dec`` as float64, with the index of ``df``.

    Raises
    ------
    DataError
        Naming ``where``, the first offending row (its ``objid`` and 1-based row
        number in ``df``), the column and the value; text that is not a number,
        a value out of range, a half-missing or (with ``required``) a missing position.
    """
    values: dict[str, np.ndarray] = {}
    for column, (low, high, high_ok, text) in COORDINATE_RANGES.items():
        raw = df[column]
        kind = raw.dtype
        if pd.api.types.is_bool_dtype(kind) or pd.api.types.is_complex_dtype(kind):
            raise DataError(f"{where}: column {column!r} must hold numbers (degrees), got {kind}")
        numeric = raw if pd.api.types.is_numeric_dtype(kind) else pd.to_numeric(raw, errors="coerce")
        try:
            num = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: column {column!r} must hold numbers (degrees): {exc}") from exc
        _refuse(df, raw.notna().to_numpy() & np.isnan(num), where, column, "is not a number (degrees)")
        with np.errstate(invalid="ignore"):
            inside = (num >= low) & ((num <= high) if high_ok else (num < high))
        _refuse(df, ~np.isnan(num) & ~inside, where, column, f"is outside {text} degrees", pd.Series(num))
        values[column] = num
    ra_nan, dec_nan = np.isnan(values["ra"]), np.isnan(values["dec"])
    _refuse(df, ra_nan & ~dec_nan, where, "ra", "is missing while dec has a value (give both or neither)",
            pd.Series(values["ra"]))
    _refuse(df, dec_nan & ~ra_nan, where, "dec", "is missing while ra has a value (give both or neither)",
            pd.Series(values["dec"]))
    if required:
        _refuse(df, ra_nan, where, "ra", "is missing: this source makes each cutout at the galaxy's position",
                pd.Series(values["ra"]))
    return pd.DataFrame(values, index=df.index)


def check_catalogue(
    df: pd.DataFrame, *, where: str = "catalogue", allow_empty: bool = False
) -> pd.DataFrame:
    """Check the common columns and return ``df`` sorted by ``objid`` (index reset).

    Raises
    ------
    DataError
        Missing columns, an empty table, non-integer or duplicate ids, missing labels,
        labels that are not safe file names (see :func:`galpipe.io.atomic.safe_filename`),
        coordinates that are not numbers or out of range (:func:`check_coordinates`).
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
    coords = check_coordinates(df, where=where)
    out = df.assign(ra=coords["ra"].to_numpy(), dec=coords["dec"].to_numpy())
    out = out.sort_values("objid", kind="stable").reset_index(drop=True)
    out["objid"] = out["objid"].astype(np.int64)
    out["label"] = out["label"].astype(str)
    for label in out["label"].unique():  # class names become file names (figures): never used raw
        try:
            safe_filename(label, what="label")
        except DataError as exc:
            first = int(out.loc[out["label"] == label, "objid"].iloc[0])
            raise DataError(f"{where}: objid {first}: {exc}") from exc
    return out


def write_catalogue(df: pd.DataFrame, path: str | os.PathLike[str], provenance: Mapping[str, Any], *,
                    where: str | None = None) -> Path:
    """Check and write a catalogue with its provenance (query, release, time, ...).

    Errors name ``where``; by default the file the table was read from
    (``provenance["input"]``, as ``galpipe predict`` records it), else ``path``.
    """
    if where is None:
        where = f"catalogue {provenance.get('input') or path}"
    return write_table(check_catalogue(df, where=where), path, {"provenance": dict(provenance)})


def read_catalogue(path: str | os.PathLike[str], *, allow_empty: bool = False) -> pd.DataFrame:
    """Read a catalogue (or a shard of one, which may be empty) written by galpipe."""
    try:
        df = pd.read_parquet(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"catalogue {path}: not a readable Parquet file ({exc})") from exc
    return check_catalogue(df, where=f"catalogue {path}", allow_empty=allow_empty)


def shard_catalogue(df: pd.DataFrame, n_shards: int, *, group_columns: Sequence[str] = ()) -> list[pd.DataFrame]:
    """Split a catalogue into ``n_shards`` balanced, deterministic shards.

    Without ``group_columns``, rows are ordered by ``objid`` and dealt
    round-robin, so shard sizes differ by at most one and a galaxy's shard
    depends only on its rank in the catalogue.

    With ``group_columns`` (a source's ``shard_group_columns``, e.g. the SDSS
    field ``run, rerun, camcol, field``), the rows of one group always land in
    the same shard, so a job fetches each of its frames once and no two jobs
    fetch the same frame.  Groups are dealt largest first (ties: smaller key
    first) to the shard holding the fewest galaxies so far (ties: lower shard
    index); shard sizes then differ by at most the largest group's size.

    Either way each shard is ordered by ``objid``, the result depends only on
    the catalogue's content (not its row order), and shards may be empty when
    there are fewer galaxies (or groups) than shards.

    Parameters
    ----------
    df : pandas.DataFrame
        The catalogue (``objid`` plus ``group_columns``), ``n_rows`` rows.
    n_shards : int
        Number of shards (>= 1).
    group_columns : sequence of str
        Columns whose values tie galaxies to one shard; empty for per-galaxy dealing.

    Returns
    -------
    list of pandas.DataFrame
        ``n_shards`` tables with the columns of ``df`` and index reset; together
        they hold every row once.

    Raises
    ------
    DataError
        ``n_shards`` < 1, or a group column missing or with missing values.
    """
    if n_shards < 1:
        raise DataError(f"number of shards must be >= 1, got {n_shards}")
    ordered = df.sort_values("objid", kind="stable").reset_index(drop=True)
    if not group_columns:
        return [ordered.iloc[i::n_shards].reset_index(drop=True) for i in range(n_shards)]
    cols = list(group_columns)
    missing = [c for c in cols if c not in ordered.columns]
    if missing:
        raise DataError(f"catalogue: cannot group shards by {cols}: missing column(s) {missing}")
    for c in cols:
        if ordered[c].isna().any():
            first = ordered.loc[ordered[c].isna(), "objid"].iloc[0]
            raise DataError(f"catalogue: objid {first}: column {c!r} is missing; shards are grouped by {cols}")
    groups = ordered.groupby(cols, sort=True).indices  # key -> row positions (ascending objid)
    # largest group first, then by key: a deterministic order independent of the input row order
    order = sorted(groups, key=lambda key: (-len(groups[key]), key))
    loads = [0] * n_shards
    members: list[list[np.ndarray]] = [[] for _ in range(n_shards)]
    for key in order:
        target = min(range(n_shards), key=lambda i: (loads[i], i))
        members[target].append(groups[key])
        loads[target] += len(groups[key])
    out = []
    for rows in members:
        idx = np.sort(np.concatenate(rows)) if rows else np.array([], dtype=np.int64)
        out.append(ordered.iloc[idx].reset_index(drop=True))
    return out


def write_shards(df: pd.DataFrame, paths: Sequence[str | os.PathLike[str]],
                 provenance: Mapping[str, Any], *, group_columns: Sequence[str] = ()) -> list[Path]:
    """Write :func:`shard_catalogue` of ``df`` (grouped by ``group_columns``) to ``paths`` (one per shard).

    Each shard's metadata records ``shard`` = ``[index, n_shards]`` and
    ``shard_group_columns`` (the grouping used, empty for per-galaxy dealing).
    """
    out = []
    parts = shard_catalogue(df, len(paths), group_columns=group_columns)
    for i, (part, p) in enumerate(zip(parts, paths, strict=True)):
        out.append(write_table(part, p, {"provenance": dict(provenance), "shard": [i, len(paths)],
                                         "shard_group_columns": list(group_columns)}))
    return out
