"""Fine-tuning: ``training.init_from`` (a shipped model or a folder) and ``training.freeze``;
an experiment's own ``seed``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from galpipe.config import build_section, preset_search_path, resolve_experiments, validate_config
from galpipe.errors import ConfigError, ModelError
from galpipe.nn.data import ArrayDataset
from galpipe.nn.model import build_model
from galpipe.nn.persist import save_model
from galpipe.nn.training import fit
from galpipe.stages import experiment_params
from galpipe.stages.train import full_architecture, init_files, init_weights

HIDDEN = [{"type": "conv2d", "filters": 4}, "batchnorm", "relu", "maxpool2d",
          {"type": "conv2d", "filters": 4}, "relu", "global_avg_pool"]
SHAPE = (8, 8, 3)


def _data(n: int = 64, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, *SHAPE)).astype(np.float32) + y[:, None, None, None] * 0.5
    return ArrayDataset(x, y, classes=["a", "b"])


def _cfg(**kw) -> dict:
    return {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0, "augment": False, "seed": 3, **kw}


def _copy(d: dict) -> dict:
    return {k: v.copy() for k, v in d.items()}


def test_frozen_layers_keep_weights_and_batchnorm_statistics():
    model = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=1)
    before_p, before_s = _copy(model.params), _copy(model.state)
    fit(model, _data(), _data(32, 1), _cfg(freeze=3), progress=False, log=lambda s: None)
    frozen = [k for k in before_p if int(k.split(".")[0]) < 3]
    trained = [k for k in before_p if int(k.split(".")[0]) >= 3]
    assert frozen and trained
    for k in frozen:
        assert np.array_equal(model.params[k], before_p[k]), k
    for k in before_s:  # the batchnorm (layer 1) is frozen: its running statistics too
        assert np.array_equal(model.state[k], before_s[k]), k
    assert all(not np.array_equal(model.params[k], before_p[k]) for k in trained)
    assert model.n_frozen == 0  # the model is left as it was built

    free = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=1)
    fit(free, _data(), _data(32, 1), _cfg(), progress=False, log=lambda s: None)
    assert not np.array_equal(free.params["0.conv2d.W"], before_p["0.conv2d.W"])
    assert not np.array_equal(free.state[next(iter(before_s))], before_s[next(iter(before_s))])


def test_freezing_every_layer_is_refused():
    model = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=1)
    with pytest.raises(ConfigError, match=r"training\.freeze: 8 would freeze every layer"):
        fit(model, _data(), None, _cfg(freeze=8), progress=False, log=lambda s: None)
    with pytest.raises(ModelError, match="at least the last layer must train"):
        model.freeze(8)


@pytest.fixture(scope="module")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=5)
    folder = tmp_path_factory.mktemp("init") / "pretrained"
    save_model(model, folder, metadata={"classes": ["a", "b"], "experiment": "pretrained", "inputs": "image",
                                        "image_shape": list(SHAPE),
                                        "preprocess": {"source": "simulated", "crop_fraction": 1.0, "cutout_size": 8},
                                        "normalisation": build_section("normalise").to_dict()})
    return folder


def test_init_from_copies_matching_layers_and_refits_a_new_output(source_model: Path):
    src = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=5)
    same = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=9)
    info = init_weights(same, str(source_model), ["a", "b"])
    assert not info["fresh"] and len(info["weights_sha256"]) == 64
    for k, v in src.params.items():
        assert np.array_equal(same.params[k], v), k

    three = build_model(full_architecture(HIDDEN, 3), SHAPE, seed=9)
    fresh_out = three.params["7.dense.W"].copy()
    info = init_weights(three, str(source_model), ["a", "b", "c"])
    assert info["fresh"] == ["param:7.dense.W", "param:7.dense.b"]
    assert np.array_equal(three.params["7.dense.W"], fresh_out)
    assert np.array_equal(three.params["0.conv2d.W"], src.params["0.conv2d.W"])

    swapped = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=9)
    out_before = swapped.params["7.dense.W"].copy()
    info = init_weights(swapped, str(source_model), ["b", "a"])  # same count, other classes: no copy
    assert "param:7.dense.W" in info["fresh"] and np.array_equal(swapped.params["7.dense.W"], out_before)


def test_init_from_an_unrelated_architecture_or_a_missing_model_is_refused(source_model: Path, tmp_path: Path):
    other = build_model(full_architecture([{"type": "dense", "units": 3}], 2), (5,), seed=0)
    with pytest.raises(ConfigError, match=r"training\.init_from: model .* shares no layer"):
        init_weights(other, str(source_model), ["a", "b"])
    with pytest.raises((ConfigError, ModelError), match="nowhere"):
        init_weights(other, str(tmp_path / "nowhere"), ["a", "b"])


def test_init_from_is_a_train_job_input_and_fine_tuning_trains(source_model: Path):
    exp = {"training": {"init_from": str(source_model)}}
    assert init_files(exp) == [str(source_model / "model.json"), str(source_model / "weights.npz")]
    assert init_files({"training": {}}) == []
    model = build_model(full_architecture(HIDDEN, 2), SHAPE, seed=9)
    init_weights(model, str(source_model), ["a", "b"])
    h = fit(model, _data(), _data(32, 1), _cfg(freeze=4), progress=False, log=lambda s: None)
    assert len(h.epoch) == 2 and np.isfinite(h.train_loss).all()


def test_an_experiment_seed_overrides_the_master_seed_for_training_only():
    raw = validate_config({"seed": 42, "experiments": {"a": {"architecture": "small_cnn"},
                                                       "b": {"architecture": "small_cnn", "seed": 7}}})
    exps = resolve_experiments(raw, preset_search_path())
    assert experiment_params(raw, exps["a"])["seed"] == 42
    assert experiment_params(raw, exps["b"])["seed"] == 7
    with pytest.raises(ConfigError, match="seed"):
        validate_config({"experiments": {"b": {"architecture": "small_cnn", "seed": -1}}})
