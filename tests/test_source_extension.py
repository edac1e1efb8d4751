"""The "add a source" recipe of docs/architecture.md, proven from outside the package.

A toy source is one class in this file, registered with
``galpipe.sources.register_source``; nothing in galpipe is edited.  The config
names it (``source: toy``), validation accepts it, and the stage functions
(the same ones the Snakemake rules and the CLI call) take it from catalogue to
the split files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from galpipe.config import load_settings
from galpipe.errors import ConfigError
from galpipe.sources import get_source, register_source, source_names
from galpipe.sources.base import CutoutCache, ExternalImage, Source, manifest_frame
from galpipe.sources.images import load_image
from galpipe.stages import SPLITS, cutout_cache_dir, shard_paths, split_paths, stage_params
from galpipe.stages import catalogue as catalogue_stage
from galpipe.stages import cutouts as cutouts_stage
from galpipe.stages import normalise as normalise_stage
from galpipe.stages import split as split_stage
from galpipe.stages.normalise import read_images


@register_source
class ToySource:
    """Round (``blob``) and elongated (``streak``) Gaussians on a flat sky, two bands."""

    name: ClassVar[str] = "toy"
    N = 40

    def __init__(self, cfg: Any) -> None:
        self.seed, self.size = cfg.seed, cfg.cutout_size

    @property
    def bands(self) -> tuple[str, ...]:
        return ("g", "r")

    @property
    def crop_fraction(self) -> float:
        return 1.0

    @property
    def catalogue_columns(self) -> tuple[str, ...]:
        return ("objid", "ra", "dec", "label")

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed, "cutout_size": self.size}

    def catalogue(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        ids = np.arange(1, self.N + 1, dtype=np.int64)
        df = pd.DataFrame({"objid": ids, "ra": 150.0 + ids * 1e-3, "dec": 2.0 + ids * 1e-3,
                           "label": np.where(ids % 2 == 0, "blob", "streak")})
        return df, {"source": self.name, "seed": self.seed}

    def make_cutouts(self, shard: pd.DataFrame, cache: CutoutCache, *, progress: bool = False) -> pd.DataFrame:
        rows = []
        yy, xx = np.mgrid[: self.size, : self.size] - (self.size - 1) / 2
        for r in shard.itertuples(index=False):
            if cache.load_valid(r.objid, size=self.size, bands=self.bands) is None:
                sx = 2.0 if r.label == "blob" else 6.0
                img = 50 * np.exp(-(xx**2 / (2 * sx**2) + yy**2 / 8.0)).astype(np.float32)
                cache.write(r.objid, np.stack([img, 2 * img]), bands=self.bands, ra=r.ra, dec=r.dec,
                            source=self.name)
            rows.append((r.objid, cache.path(r.objid), "ok", "", 0))
        return manifest_frame(rows)

    def input_files(self) -> list[Path]:
        return []

    def shard_input_files(self, n_shards: int) -> list[list[Path]]:
        return [[] for _ in range(n_shards)]

    @classmethod
    def load_external(cls, path: Any, *, size: int, crop_fraction: float) -> ExternalImage:
        data, bunit, bands = load_image(path, size=size, crop_fraction=crop_fraction)
        return ExternalImage(data, bunit, tuple(bands))


def test_toy_source_runs_through_every_data_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "toy" in source_names()
    cfg = load_settings({"source": "toy", "shards": 2, "cutout_size": 16, "max_reject_fraction": 0.0})
    assert isinstance(get_source(cfg), Source)

    shards = shard_paths("shard", cfg.shards)
    assert catalogue_stage.run(stage_params(cfg, "catalogue"), "cat.parquet", shards) == ToySource.N
    normalised = []
    for k, shard in enumerate(shards):
        manifest = tmp_path / f"m{k}.parquet"
        m = cutouts_stage.run(stage_params(cfg, "cutouts"), shard, manifest, cutout_cache_dir(cfg))
        assert (m["status"] == "ok").all() and len(m) == ToySource.N // 2
        normalised.append(tmp_path / f"n{k}.parquet")
        normalise_stage.run(stage_params(cfg, "normalise"), manifest, shard, normalised[-1],
                            tmp_path / f"r{k}.parquet")
    outputs = split_paths(tmp_path / "split")
    summary = split_stage.run(stage_params(cfg, "split"), normalised, outputs, tmp_path / "summary.json")
    assert sum(sum(summary["counts"][s].values()) for s in SPLITS) == ToySource.N
    assert all(set(summary["counts"][s]) == {"blob", "streak"} for s in SPLITS)
    images, rows = read_images(outputs["train"])
    assert images.shape[1:] == (16, 16, 2)
    # the pixels are the toy's: a streak's light spreads further along x than a blob's
    edge = {lab: images[(rows["label"] == lab).to_numpy(), 8, 1, 0].mean() for lab in ("blob", "streak")}
    assert edge["streak"] > 0.6 and edge["blob"] < 0.3


def test_unknown_source_is_refused_naming_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown source 'nope'.*toy"):
        load_settings({"source": "nope"})
