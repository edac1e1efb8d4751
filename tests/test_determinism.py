"""Same config and seed, same outputs: stage by stage, and for the whole workflow.

The slow test runs the tiny workflow a second time in another directory (the
first run is the session's reference, shared with ``test_kill``) under a
different ``PYTHONHASHSEED`` -- users do not fix it -- and requires every
artifact (catalogue, shards, cutout manifests and FITS files, normalised and
split Parquet files, weights, metrics, predictions, figures) to be
byte-identical; only wall-clock fields (training seconds) are left out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from nn_fixtures import synthetic_galaxies, write_split_parquet
from robust_fixtures import (
    ROBUST_TINY,
    Run,
    artifact_digests,
    check_ok,
    compare_digests,
    reference_run,
    run_workflow,
    write_config,
)

from galpipe.config import resolve_experiments, validate_config
from galpipe.io.cutout_fits import stable_fits_bytes
from galpipe.stages import (
    cutout_cache_dir,
    experiment_params,
    stage_params,
)
from galpipe.stages.catalogue import run as run_catalogue
from galpipe.stages.cutouts import run as run_cutouts
from galpipe.stages.normalise import run as run_normalise
from galpipe.stages.split import run as run_split
from galpipe.stages.train import run as train_experiment

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    """SHA-256 of a file; of a cutout without its wall-clock cards (DATE, CHECKSUM)."""
    data = stable_fits_bytes(path) if path.suffix == ".fits" else path.read_bytes()
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    return reference_run(tmp_path_factory)


@pytest.mark.slow
def test_two_workflow_runs_give_identical_artifacts(
    reference: tuple[Path, Run], tmp_path_factory: pytest.TempPathFactory
) -> None:
    ref_dir, _ = reference
    wd = tmp_path_factory.mktemp("second")
    write_config(wd, ROBUST_TINY)
    check_ok(run_workflow(wd, hash_seed=1), "second clean run")
    ref, got = artifact_digests(ref_dir), artifact_digests(wd)
    problems = compare_digests(ref, got)
    assert not problems, "two runs of the same config differ:\n" + "\n".join(problems)
    # the comparison really covered every kind of artifact
    keys = set(got)
    n_fits = sum(k.startswith("resources/cutouts/") and k.endswith(".fits") for k in keys)
    assert n_fits == ROBUST_TINY["simulated"]["n_galaxies"]
    for must in ["results/catalogue/catalogue.parquet", "results/catalogue/shards/0001.parquet",
                 "results/cutouts/0000.parquet", "results/normalised/0001.parquet",
                 "results/normalised/0000.rejects.parquet", "results/split/train.parquet",
                 "results/split/test.parquet", "results/models/tiny_cnn/weights.npz",
                 "results/models/baseline/model.json", "results/models/tiny_cnn/history.csv",
                 "results/evaluation/tiny_cnn/metrics.json", "results/evaluation/baseline/predictions.parquet",
                 "results/evaluation/tiny_cnn/figures/confusion_matrix.png", "results/leaderboard.csv",
                 "results/comparison.png"]:
        assert must in keys, must


def _stages_once(root: Path, cfg: dict, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """catalogue -> cutouts -> normalise -> split with the stage functions, run inside ``root``.

    Paths are relative, as in the workflow (manifests record the cutout paths).
    """
    root.mkdir()
    monkeypatch.chdir(root)
    cat, shard = Path("catalogue.parquet"), Path("shard.parquet")
    run_catalogue(stage_params(cfg, "catalogue"), cat, [shard])
    manifest = Path("manifest.parquet")
    cache = cutout_cache_dir(cfg)
    run_cutouts(stage_params(cfg, "cutouts"), shard, manifest, cache)
    norm, rejects = Path("normalised.parquet"), Path("rejects.parquet")
    run_normalise(stage_params(cfg, "normalise"), manifest, shard, norm, rejects)
    splits = {s: Path(f"{s}.parquet") for s in ("train", "validation", "test")}
    run_split(stage_params(cfg, "split"), [norm], splits, Path("summary.json"))
    fits = sorted(Path(cache).glob("*.fits"))
    return [root / p for p in [cat, shard, manifest, norm, rejects, *splits.values(), Path("summary.json"), *fits]]


def test_stage_functions_are_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = validate_config({"seed": 5, "cutout_size": 16, "shards": 1, "simulated": {"n_galaxies": 12}})
    a = _stages_once(tmp_path / "a", cfg, monkeypatch)
    b = _stages_once(tmp_path / "b", cfg, monkeypatch)
    assert len(a) == len(b) == 9 + 12
    for pa_, pb in zip(a, b, strict=True):
        assert pa_.name == pb.name
        assert _sha(pa_) == _sha(pb), f"{pa_.name} differs between two runs"
    other = validate_config({**cfg, "seed": 6})
    c = _stages_once(tmp_path / "c", other, monkeypatch)
    assert _sha(a[0]) != _sha(c[0]), "a different seed must give a different catalogue"


def _tiny_splits(tmp_path: Path) -> tuple[Path, Path]:
    """Train (56) and validation (24) splits of small synthetic two-band galaxies."""
    x, y = synthetic_galaxies(80, size=12, channels=2, seed=4)
    train = write_split_parquet(tmp_path / "train.parquet", x[:56], y[:56], bands=("g", "r"))
    val = write_split_parquet(tmp_path / "validation.parquet", x[56:], y[56:], bands=("g", "r"),
                              objids=np.arange(9000, 9024))
    return train, val


def test_training_is_bit_identical(tmp_path: Path) -> None:
    train, val = _tiny_splits(tmp_path)
    cfg = validate_config({
        "seed": 9, "cutout_size": 12, "bands": ["g", "r"],
        "training": {"epochs": 2, "batch_size": 8, "early_stopping_patience": 0},
        "experiments": {"cnn": {"architecture": [{"type": "conv2d", "filters": 4}, "batchnorm", "relu",
                                                 "maxpool2d", {"type": "dropout", "rate": 0.2}, "flatten"]}},
    })
    exp = experiment_params(cfg, resolve_experiments(cfg, [REPO / "config" / "architectures"])["cnn"])
    other = {**exp, "seed": 10}
    for run, e in (("a", exp), ("b", exp), ("c", other)):
        train_experiment(e, train, val, tmp_path / run / "model.json", name="cnn",
                         checkpoint_root=tmp_path / run / "ckpt", progress=False)
    for name in ("weights.npz", "model.json"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), name
    assert _sha(tmp_path / "a" / "weights.npz") != _sha(tmp_path / "c" / "weights.npz"), "the seed must matter"


@pytest.mark.parametrize("metric", ["val_loss", "val_balanced_acc"])
def test_train_info_names_the_epoch_whose_weights_were_kept(tmp_path: Path, metric: str) -> None:
    """train_info.json's best_epoch is the epoch the early-stopping metric chose (its weights are
    the ones saved), not the best validation balanced accuracy whatever the metric."""
    import json

    import pandas as pd

    train, val = _tiny_splits(tmp_path)
    cfg = validate_config({
        "seed": 9, "cutout_size": 12, "bands": ["g", "r"],
        "training": {"epochs": 6, "batch_size": 8, "early_stopping_patience": 0,
                     "early_stopping_metric": metric},
        "experiments": {"cnn": {"architecture": [{"type": "conv2d", "filters": 4}, "relu",
                                                 "maxpool2d", "flatten"]}},
    })
    exp = experiment_params(cfg, resolve_experiments(cfg, [REPO / "config" / "architectures"])["cnn"])
    info = train_experiment(exp, train, val, tmp_path / "m" / "model.json", name="cnn",
                            checkpoint_root=tmp_path / "ckpt", progress=False)
    hist = pd.read_csv(tmp_path / "m" / "history.csv")
    if metric == "val_loss":
        want = int(hist["epoch"][hist["val_loss"].idxmin()])
    else:
        want = int(hist["epoch"][hist["val_balanced_acc"].idxmax()])
    assert info["best_epoch"] == want
    assert json.loads((tmp_path / "m" / "train_info.json").read_text())["best_epoch"] == want
