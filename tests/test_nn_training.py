"""Tests of galpipe.nn.training: learning, early stopping, best weights, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from nn_fixtures import CLASSES, synthetic_galaxies, write_split_parquet

from galpipe.errors import ConfigError, DataError, ModelError
from galpipe.nn.data import ArrayDataset, ParquetImageDataset
from galpipe.nn.model import build_model
from galpipe.nn.training import (
    CHECKPOINT_JSON,
    History,
    TrainConfig,
    balanced_accuracy,
    class_weights_from_counts,
    evaluate,
    fit,
)

SPEC = [
    {"type": "conv2d", "filters": 8},
    {"type": "batchnorm"},
    {"type": "relu"},
    {"type": "maxpool2d"},
    {"type": "conv2d", "filters": 12},
    {"type": "relu"},
    {"type": "maxpool2d"},
    {"type": "flatten"},
    {"type": "dropout", "rate": 0.2},
    {"type": "dense", "units": 3},
]


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("splits")
    x, y = synthetic_galaxies(480, size=12, channels=2, seed=11)
    tr = write_split_parquet(d / "train.parquet", x[:360], y[:360], bands=("g", "r"),
                             row_group_size=50)
    va = write_split_parquet(d / "validation.parquet", x[360:], y[360:], bands=("g", "r"),
                             row_group_size=50)
    return tr, va


def _model(seed: int = 0):
    return build_model(SPEC, (12, 12, 2), seed=seed)


def _weights(model) -> dict[str, np.ndarray]:
    out = {f"p:{k}": v.copy() for k, v in model.params.items()}
    out.update({f"b:{k}": v.copy() for k, v in model.state.items()})
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


#: The plain settings these tests were written for (no schedule, augmentation, clipping,
#: weighting or decay unless a test asks); the schema's defaults are for the pipeline.
PLAIN = {"schedule": {"type": "constant", "warmup_epochs": 0}, "augment": False, "max_shift": 0,
         "grad_clip": None, "class_weighting": "none", "weight_decay": 0.0, "early_stopping_patience": 0}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**PLAIN, **kw})


# --------------------------------------------------------------------------- config
def test_config_takes_the_schema_defaults():
    from galpipe.config import load_schema

    props = load_schema()["$defs"]["training"]["properties"]
    cfg = TrainConfig.from_dict({})
    for key, sub in props.items():
        if key not in ("schedule", "rendering"):  # objects: their own keys' defaults are filled
            assert getattr(cfg, key) == sub["default"], key
    assert cfg.rendering == {k: v["default"] for k, v in props["rendering"]["properties"].items()}
    assert cfg.schedule["warmup_epochs"] == props["schedule"]["properties"]["warmup_epochs"]["default"]
    assert cfg.seed == 42  # the schema's top-level seed
    assert cfg.optimizer_kwargs == {} and TrainConfig.from_dict({"optimizer": "sgd"}).optimizer_kwargs == {
        "momentum": 0.9, "nesterov": False}
    assert cfg.schedule_spec == {"type": "cosine", "warmup_epochs": 1, "min_lr": 0.0}


def test_config_rejects_unknown_and_bad_values():
    cfg = TrainConfig.from_dict({"epochs": 3, "lr": 0.01, "schedule": {"type": "cosine"}})
    assert cfg.epochs == 3 and cfg.optimizer == "adam"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'epoch'.*allowed keys:.*epochs"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="'bogus'"):
        TrainConfig.from_dict({"bogus": 1, "lr": 0.1})
    for bad in ({"epochs": 0}, {"lr": -1}, {"batch_size": 2.5}, {"class_weighting": "auto"},
                {"label_smoothing": 1.0}, {"early_stopping_metric": "acc"},
                {"augment": "yes"}, {"grad_clip": 0}, {"epochs": True}):
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=key):
            TrainConfig.from_dict(bad)
    with pytest.raises(ConfigError, match=r"model\.train"):
        TrainConfig.from_dict({"seed": -1}, where="model.train")


def test_metrics_helpers():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2])
    assert balanced_accuracy(y, p, 4) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert math.isnan(balanced_accuracy(np.array([], int), np.array([], int), 2))
    w = class_weights_from_counts(np.array([6, 2, 0, 4]))
    np.testing.assert_allclose(w, [12 / 24, 12 / 8, 1.0, 12 / 16])
    h = History()
    h.append(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=math.nan, val_acc=0.1,
             val_balanced_acc=0.2, lr=0.1, seconds=1.5)
    d = json.loads(json.dumps(h.to_dict()))
    h2 = History.from_dict(d)
    assert h2.epoch == [1] and math.isnan(h2.val_loss[0]) and h2.train_loss == [1.0]


def test_evaluate_weighted_loss_by_hand():
    model = build_model([{"type": "flatten"}, {"type": "dense", "units": 3}], (2, 2, 1), seed=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, 37)
    ds = ArrayDataset(x, y, classes=CLASSES)
    w = np.array([1.0, 2.0, 0.5])
    res = evaluate(model, ds, batch_size=8, class_weights=w)
    logits = model.forward(x).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    nll = -logp[np.arange(37), y]
    assert res["loss"] == pytest.approx(np.sum(w[y] * nll) / np.sum(w[y]), rel=1e-6)
    assert res["acc"] == pytest.approx(np.mean(logits.argmax(1) == y))
    assert res["n"] == 37


# --------------------------------------------------------------------------- learning
def test_learns_synthetic_problem(splits, tmp_path):
    tr, va = ParquetImageDataset(splits[0]), ParquetImageDataset(splits[1])
    model = _model()
    lines: list[str] = []
    cfg = _cfg(epochs=8, batch_size=32, lr=0.01, augment=True, max_shift=1,
               schedule={"type": "cosine", "warmup_epochs": 0}, grad_clip=5.0, shuffle_buffer=120, seed=1)
    hist = fit(model, tr, va, cfg, progress=True, log=lines.append)
    assert len(hist) == 8 and hist.epoch == list(range(1, 9))
    assert len(lines) == 8 and lines[0].startswith("epoch 1/8")
    assert hist.train_loss[-1] < 0.6 * hist.train_loss[0]
    assert max(hist.val_acc) >= 0.9
    assert all(s > 0 for s in hist.seconds)
    assert hist.lr[0] == pytest.approx(0.01) and hist.lr[-1] < hist.lr[0]
    # the restored weights are those of the best epoch
    best = hist.best_epoch
    assert hist.val_loss[best - 1] == min(hist.val_loss)
    again = evaluate(model, va)
    assert again["loss"] == pytest.approx(hist.val_loss[best - 1], rel=1e-6)
    csv = hist.to_csv(tmp_path / "history.csv").read_text().splitlines()
    assert csv[0].split(",")[:3] == ["epoch", "train_loss", "train_acc"] and len(csv) == 9


def test_same_seed_identical_weights_different_seed_differs(splits):
    tr = ParquetImageDataset(splits[0])
    va = ParquetImageDataset(splits[1])
    cfg = {**PLAIN, "epochs": 2, "batch_size": 40, "lr": 0.01, "augment": True, "seed": 5,
           "shuffle_buffer": 100}
    runs = []
    for seed in (5, 5, 6):
        model = _model()
        fit(model, tr, va, {**cfg, "seed": seed}, progress=False, log=lambda s: None)
        runs.append(_weights(model))
    _assert_same(runs[0], runs[1])
    assert not np.array_equal(runs[0]["p:" + next(iter(_model().params))],
                              runs[2]["p:" + next(iter(_model().params))])


class _Killed(Exception):
    pass


def test_resume_is_bit_identical(splits, tmp_path):
    cfg = _cfg(epochs=4, batch_size=32, lr=0.005, augment=True, max_shift=1,
               schedule={"type": "cosine"}, label_smoothing=0.05,
               class_weighting="balanced", shuffle_buffer=90, seed=3, grad_clip=2.0,
               optimizer="adamw", weight_decay=1e-3)
    straight = _model()
    h_straight = fit(straight, ParquetImageDataset(splits[0]), ParquetImageDataset(splits[1]),
                     cfg, checkpoint_dir=tmp_path / "a", progress=False, log=lambda s: None)

    def killer(line: str) -> None:
        if line.startswith("epoch 2/"):
            raise _Killed

    with pytest.raises(_Killed):
        fit(_model(), ParquetImageDataset(splits[0]), ParquetImageDataset(splits[1]), cfg,
            checkpoint_dir=tmp_path / "b", progress=False, log=killer)
    record = json.loads((tmp_path / "b" / CHECKPOINT_JSON).read_text())
    assert record["epochs_done"] == 2 and not record["finished"]
    assert sorted(p.name for p in (tmp_path / "b").glob("*.npz")) == ["checkpoint-e0002.npz"]
    # a new process: fresh objects, same seed -> picks up after epoch 2
    lines: list[str] = []
    resumed = _model()
    h_resumed = fit(resumed, ParquetImageDataset(splits[0]), ParquetImageDataset(splits[1]),
                    cfg, checkpoint_dir=tmp_path / "b", progress=False, log=lines.append)
    assert lines[0].startswith("resuming") and lines[1].startswith("epoch 3/4")
    _assert_same(_weights(straight), _weights(resumed))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr"):
        assert getattr(h_straight, key) == getattr(h_resumed, key), key
    assert h_straight.best_epoch == h_resumed.best_epoch
    # the last-epoch (not only the best) weights and optimizer state match as well
    with np.load(tmp_path / "a" / "checkpoint-e0004.npz", allow_pickle=False) as za, \
         np.load(tmp_path / "b" / "checkpoint-e0004.npz", allow_pickle=False) as zb:
        assert za.files == zb.files and any(f.startswith("opt/") for f in za.files)
        for f in za.files:
            np.testing.assert_array_equal(za[f], zb[f], err_msg=f)
    # calling fit on a finished run returns its history with the best weights loaded
    again = _model()
    h_again = fit(again, ParquetImageDataset(splits[0]), ParquetImageDataset(splits[1]), cfg,
                  checkpoint_dir=tmp_path / "a", progress=False, log=lambda s: None)
    assert h_again.val_loss == h_straight.val_loss
    _assert_same(_weights(straight), _weights(again))


def test_checkpoint_mismatch_and_corruption(splits, tmp_path):
    tr, va = ParquetImageDataset(splits[0]), ParquetImageDataset(splits[1])
    cfg = _cfg(epochs=1, batch_size=60, lr=0.01)
    fit(_model(), tr, va, cfg, checkpoint_dir=tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"different training config.*'lr'"):
        fit(_model(), tr, va, _cfg(epochs=1, batch_size=60, lr=0.02),
            checkpoint_dir=tmp_path, progress=False, log=lambda s: None)
    other = build_model([*SPEC[:-2], {"type": "dense", "units": 3}], (12, 12, 2), seed=0)
    with pytest.raises(ModelError, match="different model architecture"):
        fit(other, tr, va, cfg, checkpoint_dir=tmp_path, progress=False, log=lambda s: None)
    npz = tmp_path / "checkpoint-e0001.npz"
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="SHA-256"):
        fit(_model(), tr, va, cfg, checkpoint_dir=tmp_path, progress=False, log=lambda s: None)


def test_early_stopping_restores_best_epoch(splits):
    tr, va = ParquetImageDataset(splits[0]), ParquetImageDataset(splits[1])
    # min_delta is huge: only the first epoch counts as an improvement
    cfg = dict(PLAIN, epochs=20, batch_size=36, lr=0.01, early_stopping_patience=2, min_delta=100.0,
               seed=2)
    stopped = _model()
    hist = fit(stopped, tr, va, cfg, progress=False, log=lambda s: None)
    assert hist.stopped_early and len(hist) == 3 and hist.best_epoch == 1
    # the restored weights are exactly those after epoch 1 (constant lr: no schedule)
    one = _model()
    fit(one, tr, va, {**cfg, "epochs": 1, "early_stopping_patience": 0}, progress=False,
        log=lambda s: None)
    _assert_same(_weights(stopped), _weights(one))
    # balanced-accuracy criterion: higher is better
    cfg_acc = {**cfg, "early_stopping_metric": "val_balanced_acc", "min_delta": 2.0}
    hist = fit(_model(), tr, va, cfg_acc, progress=False, log=lambda s: None)
    assert hist.stopped_early and len(hist) == 3 and hist.best_epoch == 1
    # without a validation set nothing stops early and the last weights are kept
    hist = fit(_model(), tr, None, {**cfg, "epochs": 3}, progress=False, log=lambda s: None)
    assert len(hist) == 3 and hist.best_epoch == 3 and math.isnan(hist.val_loss[0])


def test_class_weighting_balanced_helps_minority():
    # two overlapping classes, 9:1 imbalance
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.uniform(size=n) < 0.1).astype(np.int64)
    x = (rng.normal(size=(n, 4)) + 0.8 * y[:, None]).astype(np.float32)
    ds = ArrayDataset(x, y, classes=["common", "rare"])
    spec = [{"type": "dense", "units": 2}]
    preds = {}
    for weighting in ("none", "balanced"):
        model = build_model(spec, (4,), seed=0)
        hist = fit(model, ds, ds, {**PLAIN, "epochs": 15, "batch_size": 50, "lr": 0.05,
                                   "class_weighting": weighting}, progress=False,
                   log=lambda s: None)
        preds[weighting] = np.argmax(model.forward(x), axis=1)
        if weighting == "balanced":
            counts = np.bincount(y)
            np.testing.assert_allclose(hist.class_weights, n / (2 * counts))
        else:
            assert hist.class_weights is None
    recall = {k: np.mean(p[y == 1] == 1) for k, p in preds.items()}
    bal = {k: balanced_accuracy(y, p, 2) for k, p in preds.items()}
    assert recall["balanced"] > recall["none"] + 0.2
    assert bal["balanced"] > bal["none"]


def test_incompatible_data_is_rejected(splits):
    tr = ParquetImageDataset(splits[0])
    wrong = build_model([*SPEC[:-1], {"type": "dense", "units": 4}], (12, 12, 2))
    with pytest.raises(ModelError, match="4 classes"):
        fit(wrong, tr, None, {"epochs": 1}, progress=False)
    small = build_model(SPEC, (8, 8, 2))
    with pytest.raises(DataError, match=r"\(12, 12, 2\)"):
        fit(small, tr, None, {"epochs": 1}, progress=False)
