"""Stage ``catalogue``: the configured source's catalogue, written whole and in shards."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from galpipe.catalogue import read_catalogue, write_catalogue, write_shards
from galpipe.settings import Config
from galpipe.sources import get_source
from galpipe.sources.base import shard_group_columns
from galpipe.stages import source_config, source_params

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]


def params(cfg: Config) -> dict[str, Any]:
    """What the catalogue depends on: the source's params, without the stamp size."""
    return {k: v for k, v in source_params(cfg).items() if k != "cutout_size"}


def run(params: Mapping[str, Any], output: PathLike, shard_outputs: Sequence[PathLike]) -> int:
    """Write the catalogue and its shards; return the number of galaxies.

    Parameters
    ----------
    params : mapping
        ``stage_params(cfg, "catalogue")``.
    output : path-like
        The whole catalogue (Parquet, provenance in its metadata).
    shard_outputs : sequence of path-like
        One Parquet file per shard (:func:`galpipe.catalogue.shard_catalogue`: galaxies
        dealt round-robin by ``objid``, or whole groups of the source's
        ``shard_group_columns``, e.g. SDSS fields, so a frame is fetched by one job).
    """
    source = get_source(source_config(params))
    df, prov = source.catalogue()
    write_catalogue(df, output, prov)
    df = read_catalogue(output)
    write_shards(df, list(shard_outputs), prov, group_columns=shard_group_columns(source))
    log.info("catalogue: %d galaxies, %d shards, classes %s", len(df), len(shard_outputs),
             df["label"].value_counts().sort_index().to_dict())
    return len(df)
