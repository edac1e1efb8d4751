"""Pipeline stages as plain functions of (config subset, input paths, output paths).

The Snakemake rules call these through the short adapters in
``workflow/scripts/`` and the ``galpipe`` CLI calls the same functions, so a
stage behaves identically under Snakemake, on a cluster or by hand.  Each
stage receives only the part of the configuration it depends on
(:func:`stage_config`), which is also what Snakemake compares to decide reruns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from galpipe import __version__
from galpipe.catalogue import read_catalogue, write_catalogue, write_shards, write_table
from galpipe.config import fingerprint
from galpipe.errors import ConfigError, DataError

log = logging.getLogger("galpipe")

PathLike = str | os.PathLike[str]


def stage_config(cfg: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The subset of a validated config that ``stage`` depends on.

    Snakemake reruns a job when its params change, so changing a training
    setting reruns only training and evaluation, changing normalisation reruns
    from normalise on, and so on.
    """
    source = cfg["source"]
    src = {"source": source, "seed": cfg["seed"], source: cfg.get(source, {})}
    if source != "images":
        src["bands"] = list(cfg["bands"])
    if stage == "catalogue":
        return src
    if stage == "cutouts":
        return {**src, "cutout_size": cfg["cutout_size"], "max_reject_fraction": cfg["max_reject_fraction"]}
    if stage == "normalise":
        return {"normalise": cfg["normalise"], "cutout_size": cfg["cutout_size"],
                "bands": list(cfg["bands"]) if source != "images" else None,
                "max_reject_fraction": cfg["max_reject_fraction"]}
    if stage == "split":
        return {"split": cfg["split"], "seed": cfg["seed"]}
    if stage == "preprocess":  # what predict must redo on new images, stored with the model
        crop = cfg["images"]["crop_fraction"] if source == "images" else 1.0
        return {"source": source, "crop_fraction": crop, "cutout_size": cfg["cutout_size"]}
    if stage == "evaluate":
        return {"evaluate": cfg["evaluate"], "seed": cfg["seed"]}
    raise ConfigError(f"unknown stage {stage!r}")


def experiment_params(cfg: Mapping[str, Any], experiment: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters of the train rule for one resolved experiment (seed and preprocessing added)."""
    return {**experiment, "seed": cfg["seed"], "preprocess": stage_config(cfg, "preprocess")}


#: Root of the per-galaxy cutout cache, relative to the working directory.
CUTOUT_CACHE_ROOT = "resources/cutouts"


def cutout_cache_dir(cfg: Mapping[str, Any], root: PathLike = CUTOUT_CACHE_ROOT) -> str:
    """Folder holding the per-galaxy cutout FITS files for this configuration.

    Keyed by a hash of everything that determines the pixels, so a rerun with
    the same settings reuses verified files and a changed setting never mixes
    stale cutouts in.
    """
    sc = stage_config(cfg, "cutouts")
    key = fingerprint({k: v for k, v in sc.items() if k != "max_reject_fraction"})
    return str(Path(root) / f"{cfg['source']}-{key}")


# --------------------------------------------------------------------------- catalogue
def build_catalogue(sc: Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Build the catalogue for the configured source (``sc`` = stage_config 'catalogue')."""
    source = sc["source"]
    if source == "simulated":
        from galpipe.sources.simulated import simulate_catalogue

        df = simulate_catalogue(sc["simulated"], seed=sc["seed"], bands=sc["bands"])
        prov = {"source": "simulated", "params": dict(sc["simulated"]), "seed": sc["seed"],
                "bands": list(sc["bands"]), "galpipe_version": __version__}
        return df, prov
    if source == "images":
        from galpipe.sources.images import build_catalogue as images_catalogue

        df, prov = images_catalogue(sc["images"])
        prov.pop("created_utc", None)  # keep the file identical across reruns
        return df, prov
    if source == "sdss":
        from galpipe.sources.sdss import query_catalogue

        return query_catalogue(sc["sdss"], seed=sc["seed"], bands=sc["bands"])
    raise ConfigError(f"config key 'source': unknown source {source!r}")


def catalogue_stage(sc: Mapping[str, Any], output: PathLike, shard_outputs: Sequence[PathLike]) -> int:
    """Write the catalogue and its shards; return the number of galaxies."""
    df, prov = build_catalogue(sc)
    write_catalogue(df, output, prov)
    df = read_catalogue(output)
    write_shards(df, list(shard_outputs), prov)
    log.info("catalogue: %d galaxies, %d shards, classes %s", len(df), len(shard_outputs),
             df["label"].value_counts().sort_index().to_dict())
    return len(df)


# --------------------------------------------------------------------------- cutouts
def cutouts_stage(sc: Mapping[str, Any], shard: PathLike, manifest_out: PathLike,
                  cache_dir: PathLike, *, progress: bool = False) -> pd.DataFrame:
    """Produce the cutout FITS files of one shard (under ``cache_dir``) and its manifest.

    Galaxies whose cutout could not be made are kept in the manifest with
    ``status="failed"`` and the reason; the stage fails when their fraction
    exceeds ``max_reject_fraction``.
    """
    cat = read_catalogue(shard, allow_empty=True)
    source = sc["source"]
    size = int(sc["cutout_size"])
    if len(cat) == 0:
        manifest = pd.DataFrame({"objid": pd.Series([], dtype="int64"), "path": [], "status": [],
                                 "reason": [], "n_filled": pd.Series([], dtype="int64")})
    elif source == "simulated":
        from galpipe.sources.simulated import make_cutouts

        manifest = make_cutouts(cat, cache_dir, bands=sc["bands"], size=size, seed=sc["seed"],
                                pixel_scale=sc["simulated"].get("pixel_scale", 0.396), progress=progress)
    elif source == "images":
        from galpipe.sources.images import make_cutouts as image_cutouts

        manifest = image_cutouts(cat, cache_dir, size=size, params=sc["images"], progress=progress)
    elif source == "sdss":
        from galpipe.sources.sdss_cutouts import fetch_cutouts

        manifest = fetch_cutouts(cat, cache_dir, bands=sc["bands"], size=size, params=sc["sdss"],
                                 cache_dir=Path("resources") / "sdss", progress=progress)
    else:
        raise ConfigError(f"config key 'source': unknown source {source!r}")
    failed = manifest[manifest["status"] != "ok"]
    if len(manifest) and len(failed) / len(manifest) > float(sc["max_reject_fraction"]):
        first = failed.iloc[0]
        raise DataError(
            f"cutouts of shard {shard}: {len(failed)} of {len(manifest)} galaxies failed, more than "
            f"max_reject_fraction={sc['max_reject_fraction']}; first: objid {first.objid}: {first.reason}"
        )
    manifest = manifest.astype({"objid": "int64", "n_filled": "int64"})
    write_table(manifest, manifest_out, {"cache_dir": str(cache_dir)})
    log.info("cutouts: %d ok, %d failed (shard %s)", len(manifest) - len(failed), len(failed), shard)
    return manifest


# --------------------------------------------------------------------------- normalise / split
def normalise_stage(sc: Mapping[str, Any], manifest: PathLike, shard: PathLike, output: PathLike,
                    rejects: PathLike) -> dict[str, Any]:
    """Normalise one shard (see :func:`galpipe.normalise.normalise_shard`)."""
    from galpipe.normalise import normalise_shard

    stats = normalise_shard(manifest, shard, output, rejects, params=sc["normalise"],
                            size=int(sc["cutout_size"]), bands=sc["bands"],
                            max_reject_fraction=float(sc["max_reject_fraction"]))
    log.info("normalise: %s", stats)
    return stats


def split_stage(sc: Mapping[str, Any], inputs: Sequence[PathLike], outputs: Mapping[str, PathLike],
                summary_out: PathLike) -> dict[str, Any]:
    """Split the normalised shards; write the three Parquet files and a JSON summary."""
    import json

    from galpipe.io import atomic_write_text
    from galpipe.split import split_dataset

    summary = split_dataset(list(inputs), outputs, fractions=sc["split"]["fractions"], seed=sc["seed"],
                            row_group_size=int(sc["split"]["row_group_size"]))
    atomic_write_text(summary_out, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info("split: %s", summary["counts"])
    return summary
