"""Train/validation/test split into Parquet: stratified, grouped by object, deterministic.

The assignment is computed from the ``objid`` and ``label`` columns only; the
image data is then streamed shard by shard into three Parquet files with row
groups of ``row_group_size`` rows, so no stage holds the whole image set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from galpipe.errors import DataError
from galpipe.io.atomic import atomic_path
from galpipe.io.parquet import read_metadata
from galpipe.settings import Config
from galpipe.stages import SPLITS


def _stream_seed(seed: int, text: str) -> list[int]:
    digest = hashlib.sha256(text.encode()).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into counts proportional to ``fractions`` (largest remainder).

    When ``n >= len(fractions)`` every part gets at least one item.
    """
    f = np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    raw = f * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= len(f):
        for i in range(len(f)):
            while counts[i] == 0:
                j = int(np.argmax(counts))
                counts[j] -= 1
                counts[i] += 1
    return counts.tolist()


def assign_splits(objid: np.ndarray, label: np.ndarray, fractions: Mapping[str, float],
                  seed: int, group: np.ndarray | None = None) -> np.ndarray:
    """Assign each row to a split, stratified by label and grouped.

    Parameters
    ----------
    objid : numpy.ndarray
        ``(N,)`` int64 object ids.
    label : numpy.ndarray
        ``(N,)`` class names.
    fractions : mapping
        ``train``, ``validation``, ``test`` fractions (sum 1).
    seed : int
        Master seed; the result depends only on (seed, the set of rows).
    group : numpy.ndarray, optional
        ``(N,)`` group key (default ``objid``): rows of one group always land in
        the same split, so no object appears in two splits.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` array of split names.
    """
    objid = np.asarray(objid, dtype=np.int64)
    label = np.asarray(label).astype(str)
    group = objid if group is None else np.asarray(group)
    out = np.empty(len(objid), dtype=object)
    fr = [float(fractions[s]) for s in SPLITS]
    for cls in sorted(set(label.tolist())):
        idx = np.flatnonzero(label == cls)
        groups = np.unique(group[idx])  # sorted: independent of input order
        rng = np.random.default_rng(_stream_seed(seed, f"split:{cls}"))
        order = rng.permutation(len(groups))
        counts = allocate(len(groups), fr)
        bounds = np.cumsum([0, *counts])
        g_split = np.empty(len(groups), dtype=object)
        for k, name in enumerate(SPLITS):
            g_split[order[bounds[k]: bounds[k + 1]]] = name
        lookup = dict(zip(groups.tolist(), g_split.tolist(), strict=True))
        out[idx] = [lookup[g] for g in group[idx].tolist()]
    # A group whose rows carry several labels: force the split of its first row.
    if len(np.unique(group)) != len(group):
        first: dict[Any, str] = {}
        for i, g in enumerate(group.tolist()):
            out[i] = first.setdefault(g, out[i])
    return out


def check_split_counts(label: np.ndarray, split: np.ndarray, classes: Sequence[str]) -> None:
    """Refuse a split assignment that leaves a split without some class (or has one class only).

    Parameters
    ----------
    label, split : numpy.ndarray
        ``(N,)`` class name and split name of every row.
    classes : sequence of str
        The classes the model will have.

    Raises
    ------
    DataError
        Naming the split and the class (and each class's count), before anything is written:
        an empty split would otherwise only fail later, in training or evaluation.
    """
    label = np.asarray(label).astype(str)
    split = np.asarray(split).astype(str)
    totals = {c: int((label == c).sum()) for c in classes}
    if len(classes) < 2:
        raise DataError(f"split: only {len(classes)} class ({list(classes)}) among the {len(label)} galaxies left "
                        "after normalisation; a classifier needs at least two")
    for s in SPLITS:
        for c in classes:
            if not ((split == s) & (label == c)).any():
                raise DataError(
                    f"split: the {s} split would have no galaxy of class {c!r} ({totals[c]} {c!r} galaxies in all, "
                    f"class counts {totals}); every class needs at least {len(SPLITS)} galaxies left after the "
                    "cutouts and normalise stages (more galaxies, or fewer rejected ones)"
                )


def split_dataset(
    inputs: Sequence[str | os.PathLike[str]],
    outputs: Mapping[str, str | os.PathLike[str]],
    *,
    fractions: Mapping[str, float],
    seed: int,
    row_group_size: int = 256,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Split the normalised shards into train/validation/test Parquet files.

    Parameters
    ----------
    inputs : sequence of path-like
        Normalised shard files (same ``image_shape`` and ``bands``).
    outputs : mapping
        ``{"train": path, "validation": path, "test": path}``.
    fractions, seed, row_group_size
        See the ``split:`` config section.
    classes : sequence of str, optional
        Class order (index = ``label_index``); default: sorted labels present.

    Returns
    -------
    dict
        Summary: classes, counts per split and class.
    """
    metas = [read_metadata(p) for p in inputs]
    shapes = {tuple(m.get("image_shape", ())) for m in metas}
    bands = {tuple(m.get("bands", ())) for m in metas if m.get("bands")}
    non_empty = [m for m, p in zip(metas, inputs, strict=True) if pq.ParquetFile(p).metadata.num_rows]
    shapes = {tuple(m["image_shape"]) for m in non_empty}
    if len(shapes) > 1 or len(bands) > 1:
        raise DataError(f"normalised shards disagree on image shape {shapes} or bands {bands}")
    if not non_empty:
        raise DataError("no galaxies left after normalisation: every shard is empty")
    keys = pd.concat([pd.read_parquet(p, columns=["objid", "label"]) for p in inputs], ignore_index=True)
    if keys["objid"].duplicated().any():
        raise DataError(f"objid(s) in several shards: {keys['objid'][keys['objid'].duplicated()].head().tolist()}")
    split_of = dict(zip(keys["objid"].tolist(),
                        assign_splits(keys["objid"].to_numpy(), keys["label"].to_numpy(), fractions, seed).tolist(),
                        strict=True))
    classes = list(classes) if classes is not None else sorted(keys["label"].unique().tolist())
    unknown = sorted(set(keys["label"]) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not among the classes {classes}")
    check_split_counts(keys["label"].to_numpy(), np.array([split_of[i] for i in keys["objid"].tolist()]), classes)
    class_index = {c: i for i, c in enumerate(classes)}
    meta0 = non_empty[0]
    meta = {"image_shape": meta0["image_shape"], "bands": meta0.get("bands", []), "classes": classes,
            "normalisation": meta0.get("normalisation", {}), "split": {"fractions": dict(fractions), "seed": seed}}
    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(classes, 0) for s in SPLITS}
    with _SplitWriters(outputs, meta, row_group_size) as writers:
        for path in inputs:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                tbl = pf.read_row_group(rg)
                if tbl.num_rows == 0:
                    continue
                ids = tbl.column("objid").to_numpy()
                labels = tbl.column("label").to_pylist()
                tbl = tbl.append_column("label_index", pa.array([class_index[x] for x in labels], pa.int32()))
                which = np.array([split_of[i] for i in ids.tolist()])
                for s in SPLITS:
                    mask = which == s
                    if mask.any():
                        writers.write(s, tbl.filter(pa.array(mask)))
                        for lab in np.asarray(labels, dtype=object)[mask].tolist():
                            counts[s][lab] += 1
    return {"classes": classes, "counts": counts, "n": len(keys)}


class _SplitWriters:
    """One ParquetWriter per split, writing to temp files renamed on success."""

    def __init__(self, outputs: Mapping[str, str | os.PathLike[str]], meta: Mapping[str, Any], row_group_size: int):
        self.outputs = {s: Path(outputs[s]) for s in SPLITS}
        self.meta = meta
        self.rgs = row_group_size
        self.buffers: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self.buffered: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self._ctx: dict[str, Any] = {}
        self.schema: pa.Schema | None = None

    def __enter__(self) -> _SplitWriters:
        self._paths = {}
        for s, p in self.outputs.items():
            ctx = atomic_path(p)
            self._paths[s] = ctx.__enter__()
            self._ctx[s] = ctx
        return self

    def write(self, split: str, table: pa.Table) -> None:
        if self.schema is None:
            import json

            md = dict(table.schema.metadata or {})
            md = {k: v for k, v in md.items() if not k.startswith(b"galpipe.")}
            for k, v in self.meta.items():
                md[f"galpipe.{k}".encode()] = json.dumps(v, sort_keys=True).encode()
            self.schema = table.schema.with_metadata(md)
        table = table.cast(self.schema) if table.schema != self.schema else table
        self.buffers[split].append(table)
        self.buffered[split] += table.num_rows
        while self.buffered[split] >= self.rgs:
            self._flush(split, self.rgs)

    def _flush(self, split: str, n: int | None) -> None:
        assert self.schema is not None
        tbl = pa.concat_tables(self.buffers[split]) if self.buffers[split] else self.schema.empty_table()
        n = tbl.num_rows if n is None else n
        if split not in self.writers:
            self.writers[split] = pq.ParquetWriter(self._paths[split], self.schema, compression="zstd")
        if n:
            self.writers[split].write_table(tbl.slice(0, n), row_group_size=self.rgs)
        rest = tbl.slice(n)
        self.buffers[split] = [rest] if rest.num_rows else []
        self.buffered[split] = rest.num_rows

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                if self.schema is None:
                    raise DataError("split produced no rows")
                for s in SPLITS:
                    self._flush(s, None)
        finally:
            for w in self.writers.values():
                w.close()
            for ctx in self._ctx.values():
                ctx.__exit__(exc_type, exc, tb)


def params(cfg: Config) -> dict[str, Any]:
    """What the split depends on: the split section and the seed."""
    return {"split": cfg.split.to_dict(), "seed": cfg.seed}


def run(params: Mapping[str, Any], inputs: Sequence[str | os.PathLike[str]],
        outputs: Mapping[str, str | os.PathLike[str]], summary_out: str | os.PathLike[str]) -> dict[str, Any]:
    """Split the normalised shards; write the three Parquet files and a JSON summary.

    ``params`` is ``stage_params(cfg, "split")``; ``outputs`` maps each split name to its file.
    """
    import json
    import logging

    from galpipe.io.atomic import atomic_write_text

    summary = split_dataset(list(inputs), outputs, fractions=params["split"]["fractions"], seed=params["seed"],
                            row_group_size=int(params["split"]["row_group_size"]))
    atomic_write_text(summary_out, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    logging.getLogger("galpipe").info("split: %s", summary["counts"])
    return summary
