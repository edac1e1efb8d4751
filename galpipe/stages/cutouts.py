"""Stage ``cutouts``: one cutout FITS per galaxy of a shard, made by the configured source."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from galpipe.catalogue import check_coordinates, read_catalogue
from galpipe.errors import DataError
from galpipe.io.parquet import write_table
from galpipe.settings import Config
from galpipe.sources import get_source
from galpipe.sources.base import CutoutCache, manifest_frame
from galpipe.stages import source_config, source_params

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]


def failed_manifest_path(manifest_out: PathLike) -> Path:
    """Where a failed stage leaves its complete manifest: ``<name>.failed.parquet`` beside ``manifest_out``.

    Not a declared output of the rule, so Snakemake does not delete it with the
    failed job's outputs; the stage removes it when it later succeeds.
    """
    out = Path(manifest_out)
    return out.with_name(f"{out.stem}.failed{out.suffix or '.parquet'}")


def check_rejects(manifest: pd.DataFrame, max_reject_fraction: float, where: str,
                  full_manifest: PathLike | None = None) -> None:
    """Fail when more than ``max_reject_fraction`` of ``manifest``'s galaxies failed.

    The message gives the count and the most common reasons (not only the first)
    and, when given, the file that holds every galaxy and every reason.
    """
    failed = manifest[manifest["status"] != "ok"]
    if not len(manifest) or len(failed) / len(manifest) <= max_reject_fraction:
        return
    reasons = failed["reason"].value_counts().head(3)
    summary = "; ".join(f"{n} x {str(r)[:200]}" for r, n in reasons.items())
    first = failed.iloc[0]
    every = f"; every galaxy and reason: {full_manifest}" if full_manifest is not None else ""
    raise DataError(
        f"cutouts of {where}: {len(failed)} of {len(manifest)} galaxies failed, more than "
        f"max_reject_fraction={max_reject_fraction}; first: objid {first.objid}: {first.reason}; "
        f"most common reasons: {summary}{every}"
    )


def params(cfg: Config) -> dict[str, Any]:
    """What the cutouts depend on: the source's params, and the one rejection threshold."""
    return {**source_params(cfg), "max_reject_fraction": cfg.max_reject_fraction}


def run(params: Mapping[str, Any], shard: PathLike, manifest_out: PathLike, cache_dir: PathLike,
        *, progress: bool = True) -> pd.DataFrame:
    """Make the cutouts of one shard (in ``cache_dir``) and write its manifest.

    Galaxies whose cutout could not be made are kept in the manifest with
    ``status="failed"`` and the reason; the stage fails when their fraction
    exceeds ``max_reject_fraction`` (the one threshold for every source).  It
    then writes the complete manifest to :func:`failed_manifest_path` instead
    (named in the error; removed by the next successful run), since a failed
    job's declared outputs are deleted.  A source that cuts stamps at the
    galaxy's position (it reads ``ra``/``dec``) refuses rows without coordinates.

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
    progress : bool
        Report the source's progress (:mod:`galpipe.progress`): a tqdm bar on a terminal,
        otherwise a log line (count, rate, ETA) at least every 10 s and at the end, so a
        Snakemake or SLURM job's log shows how far a long download is.
    """
    cat = read_catalogue(shard, allow_empty=True)
    if len(cat):
        source = get_source(source_config(params))
        if {"ra", "dec"} & set(source.catalogue_columns):  # it cuts at the position: NaN will not do
            check_coordinates(cat, where=f"catalogue {shard}", required=True)
        manifest = source.make_cutouts(cat, CutoutCache(cache_dir), progress=progress)
    else:
        manifest = manifest_frame([])
    manifest = manifest.astype({"objid": "int64", "n_filled": "int64"})
    failed_out = failed_manifest_path(manifest_out)
    max_reject, where = float(params["max_reject_fraction"]), f"shard {shard}"
    try:
        check_rejects(manifest, max_reject, where)
    except DataError as exc:
        try:  # the declared output is deleted with a failed job: keep every reason beside it
            write_table(manifest, failed_out, {"cache_dir": str(cache_dir), "failed": True})
        except OSError as write_exc:
            log.warning("cutouts: could not keep the full manifest in %s: %s", failed_out, write_exc)
            raise exc from None
        check_rejects(manifest, max_reject, where, failed_out)  # raises, naming that file
    write_table(manifest, manifest_out, {"cache_dir": str(cache_dir)})
    failed_out.unlink(missing_ok=True)
    n_failed = int((manifest["status"] != "ok").sum())
    log.info("cutouts: %d ok, %d failed (shard %s)", len(manifest) - n_failed, n_failed, shard)
    return manifest
