"""The pipeline stages and the one table of their names, paths and params.

catalogue -> cutouts -> normalise -> split -> train -> evaluate (-> leaderboard)

Each stage is a module here with a plain ``run(...)`` function; the Snakemake
rules (through the 3-line adapters in ``workflow/scripts/``) and the
``galpipe`` CLI call the same functions, so a stage behaves identically under
Snakemake, on a cluster or by hand.  Both read their file layout from
:data:`PATHS`, :data:`SPLITS` and :func:`shard_names`, and a stage's params
from :func:`stage_params`: exactly the part of the configuration the stage
depends on, which is what Snakemake compares to decide reruns.

==========  ===================================  ==========================================
stage       runs once per                        writes
==========  ===================================  ==========================================
catalogue   run                                  ``catalogue``, ``shard`` (every shard)
cutouts     shard                                ``manifest`` (+ cutouts in the cache)
normalise   shard                                ``normalised``, ``rejects``
split       run                                  ``split`` (every split), ``split_summary``
train       experiment                           ``model``, ``weights``, ``history``, ``train_info``
evaluate    experiment                           ``metrics``, ``predictions``, ``figures``
leaderboard run                                  ``leaderboard``, ``leaderboard_html``, ``comparison``,
                                                 ``dataset_html``
==========  ===================================  ==========================================
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from galpipe.config import fingerprint
from galpipe.errors import ConfigError
from galpipe.settings import Config

PathLike = str | os.PathLike[str]

#: Stage names, in pipeline order.
STAGES = ("catalogue", "cutouts", "normalise", "split", "train", "evaluate", "leaderboard")

#: The three splits, in order.
SPLITS = ("train", "validation", "test")

#: Every artifact's path below the results folder ({shard}, {split}, {experiment} are
#: filled per job); :func:`paths` puts them under a config's own folder.
ARTIFACTS: dict[str, str] = {
    "catalogue": "catalogue/catalogue.parquet",
    "shard": "catalogue/shards/{shard}.parquet",
    "manifest": "cutouts/{shard}.parquet",
    "normalised": "normalised/{shard}.parquet",
    "rejects": "normalised/{shard}.rejects.parquet",
    "split": "split/{split}.parquet",
    "split_summary": "split/summary.json",
    "model": "models/{experiment}/model.json",
    "weights": "models/{experiment}/weights.npz",
    "history": "models/{experiment}/history.csv",
    "train_info": "models/{experiment}/train_info.json",
    "metrics": "evaluation/{experiment}/metrics.json",
    "predictions": "evaluation/{experiment}/predictions.parquet",
    "figures": "evaluation/{experiment}/figures",
    "leaderboard": "leaderboard.csv",
    "leaderboard_html": "leaderboard.html",
    "comparison": "comparison.png",
    "dataset_html": "dataset.html",
    "checkpoints": "checkpoints",
}

#: The results folder of the default config (``config.yaml``) and the logs folder.
RESULTS_ROOT = "results"
LOGS_ROOT = "logs"


def paths(results: str = RESULTS_ROOT) -> dict[str, str]:
    """Every artifact's path (relative to the working directory) under the folder ``results``."""
    return {k: f"{results}/{v}" for k, v in ARTIFACTS.items()}


#: Every artifact's path for the default config, relative to the working directory.
PATHS: dict[str, str] = paths()


def run_folders(config_path: PathLike | None) -> tuple[str, str]:
    """The results and logs folders of a run of the config file ``config_path``.

    A config file named ``config.yaml`` (the default ``config/config.yaml``, or a
    ``config/config.yaml`` in another working directory) writes to ``results/``
    and ``logs/``; any other config ``NAME.yaml`` writes to ``results/NAME/`` and
    ``logs/NAME/``, so switching configs never overwrites another config's results.
    """
    from galpipe.io.atomic import safe_filename

    if config_path is None or Path(config_path).name == "config.yaml":
        return RESULTS_ROOT, LOGS_ROOT
    name = safe_filename(Path(config_path).stem, what="config file name")
    return f"{RESULTS_ROOT}/{name}", f"{LOGS_ROOT}/{name}"


#: Root of the per-galaxy cutout cache, relative to the working directory.
CUTOUT_CACHE_ROOT = "resources/cutouts"

#: Wildcard patterns, shared by the Snakefile's ``wildcard_constraints``.
WILDCARDS = {"shard": r"\d{4}", "experiment": r"[A-Za-z0-9][A-Za-z0-9_-]*"}


def shard_names(n_shards: int) -> list[str]:
    """Names of the catalogue shards: ``0000``, ``0001``, ..."""
    return [f"{i:04d}" for i in range(int(n_shards))]


def path(name: str, **wildcards: str) -> str:
    """The path of artifact ``name`` (a key of :data:`PATHS`) with its wildcards filled."""
    return PATHS[name].format(**wildcards)


def shard_paths(name: str, n_shards: int, root: PathLike | None = None) -> list[Path]:
    """Per-shard paths of artifact ``name``; under folder ``root`` (same file names) when given."""
    paths = [Path(path(name, shard=s)) for s in shard_names(n_shards)]
    return paths if root is None else [Path(root) / p.name for p in paths]


def split_paths(root: PathLike | None = None) -> dict[str, Path]:
    """The three split files, in ``root`` (same file names) when given."""
    paths = {s: Path(path("split", split=s)) for s in SPLITS}
    return paths if root is None else {s: Path(root) / p.name for s, p in paths.items()}


# --------------------------------------------------------------------------- params
def as_config(cfg: Config | Mapping[str, Any]) -> Config:
    """``cfg`` as a :class:`Config` (a mapping must be the output of ``validate_config``)."""
    return cfg if isinstance(cfg, Config) else Config.from_dict(cfg)


def stage_params(cfg: Config | Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The part of a validated config that ``stage`` depends on, as plain data.

    Each stage module declares it as ``params(cfg)`` beside its ``run``.
    Snakemake reruns a job when its params change, so changing a training
    setting reruns only training and evaluation, changing normalisation reruns
    from normalise on, and so on.  A stage's ``run`` receives exactly this
    (and rebuilds typed objects from it), so it cannot read a setting that
    Snakemake does not track.
    """
    module_name = "train" if stage == "preprocess" else stage
    if module_name not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)} (and preprocess)")
    module = importlib.import_module(f"galpipe.stages.{module_name}")
    cfg = as_config(cfg)
    return module.preprocess_params(cfg) if stage == "preprocess" else module.params(cfg)


def experiment_params(cfg: Config | Mapping[str, Any], experiment: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters of the train rule for one resolved experiment (seed and preprocessing added):
    the experiment's own ``seed`` when it sets one, else the master seed."""
    cfg = as_config(cfg)
    seed = experiment.get("seed")
    return {**experiment, "seed": cfg.seed if seed is None else int(seed),
            "preprocess": stage_params(cfg, "preprocess")}


def source_params(cfg: Config) -> dict[str, Any]:
    """The configured source's name and params (what its catalogue and cutouts depend on)."""
    from galpipe.sources import get_source

    return {"source": cfg.source, **get_source(cfg).params()}


def source_config(params: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` from a source stage's params (other sections at their defaults)."""
    from galpipe.config import load_settings

    return load_settings({k: v for k, v in params.items() if k != "max_reject_fraction"})


def cutout_cache_dir(cfg: Config | Mapping[str, Any], root: PathLike = CUTOUT_CACHE_ROOT) -> str:
    """Folder holding the per-galaxy cutout FITS files for this configuration.

    Keyed by a hash of everything that determines the pixels (the source's
    params), so a rerun with the same settings reuses verified files and a
    changed setting never mixes stale cutouts in.
    """
    cfg = as_config(cfg)
    key = fingerprint(source_params(cfg))
    return str(Path(root) / f"{cfg.source}-{key}")
