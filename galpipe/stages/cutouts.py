"""Stage ``cutouts``: one cutout FITS per galaxy of a shard, made by the configured source."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import pandas as pd

from galpipe.catalogue import read_catalogue
from galpipe.errors import DataError
from galpipe.io.parquet import write_table
from galpipe.settings import Config
from galpipe.sources import get_source
from galpipe.sources.base import CutoutCache, manifest_frame
from galpipe.stages import source_config, source_params

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]


def check_rejects(manifest: pd.DataFrame, max_reject_fraction: float, where: str) -> None:
    """Fail when more than ``max_reject_fraction`` of ``manifest``'s galaxies failed.

    The message gives the count and the most common reasons (not only the first).
    """
    failed = manifest[manifest["status"] != "ok"]
    if not len(manifest) or len(failed) / len(manifest) <= max_reject_fraction:
        return
    reasons = failed["reason"].value_counts().head(3)
    summary = "; ".join(f"{n} x {str(r)[:200]}" for r, n in reasons.items())
    first = failed.iloc[0]
    raise DataError(
        f"cutouts of {where}: {len(failed)} of {len(manifest)} galaxies failed, more than "
        f"max_reject_fraction={max_reject_fraction}; first: objid {first.objid}: {first.reason}; "
        f"most common reasons: {summary}"
    )


def params(cfg: Config) -> dict[str, Any]:
    """What the cutouts depend on: the source's params, and the one rejection threshold."""
    return {**source_params(cfg), "max_reject_fraction": cfg.max_reject_fraction}


def run(params: Mapping[str, Any], shard: PathLike, manifest_out: PathLike, cache_dir: PathLike,
        *, progress: bool = False) -> pd.DataFrame:
    """Make the cutouts of one shard (in ``cache_dir``) and write its manifest.

    Galaxies whose cutout could not be made are kept in the manifest with
    ``status="failed"`` and the reason; the stage fails when their fraction
    exceeds ``max_reject_fraction`` (the one threshold for every source).

    Parameters
    ----------
    params : mapping
        ``stage_params(cfg, "cutouts")``.
    shard : path-like
        The catalogue shard.
    manifest_out : path-like
        Parquet manifest: ``objid``, ``path``, ``status``, ``reason``, ``n_filled``.
    cache_dir : path-like
        The cutout cache folder of this configuration (``cutout_cache_dir``).
    """
    cat = read_catalogue(shard, allow_empty=True)
    if len(cat):
        manifest = get_source(source_config(params)).make_cutouts(cat, CutoutCache(cache_dir), progress=progress)
    else:
        manifest = manifest_frame([])
    check_rejects(manifest, float(params["max_reject_fraction"]), f"shard {shard}")
    manifest = manifest.astype({"objid": "int64", "n_filled": "int64"})
    write_table(manifest, manifest_out, {"cache_dir": str(cache_dir)})
    n_failed = int((manifest["status"] != "ok").sum())
    log.info("cutouts: %d ok, %d failed (shard %s)", len(manifest) - n_failed, n_failed, shard)
    return manifest
