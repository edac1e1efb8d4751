"""Tests of galpipe.nn.inference: plain prediction, TTA, MC dropout, batching."""

from __future__ import annotations

import numpy as np
import pytest
from nn_fixtures import CLASSES, synthetic_galaxies, write_split_parquet

from galpipe.errors import ConfigError, DataError
from galpipe.nn.augment import dihedral
from galpipe.nn.data import ArrayDataset, ParquetImageDataset
from galpipe.nn.inference import (
    dropout_layers,
    entropy,
    mc_dropout_active,
    predict_proba,
)
from galpipe.nn.losses import softmax
from galpipe.nn.model import build_model

CNN = [
    {"type": "conv2d", "filters": 6},
    {"type": "batchnorm"},
    {"type": "relu"},
    {"type": "maxpool2d"},
    {"type": "flatten"},
    {"type": "dropout", "rate": 0.3},
    {"type": "dense", "units": 3},
]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return synthetic_galaxies(45, size=8, channels=2, seed=4)[0]


def _trained_bn(model, x: np.ndarray) -> None:
    """Give the BatchNorm non-trivial running statistics."""
    for _ in range(3):
        model.forward(x * 2.0 + 0.5, training=True)


def test_plain_prediction_matches_softmax_of_forward(x):
    model = build_model(CNN, (8, 8, 2), seed=1)
    _trained_bn(model, x)
    res = predict_proba(model, x, batch_size=16)
    logits = model.forward(x, training=False).astype(np.float64)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(res.proba, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.proba.sum(1), 1.0)
    assert res.proba.shape == res.std.shape == (45, 3) and len(res) == 45
    assert np.all(res.std == 0) and np.all(res.mutual_info == 0)
    np.testing.assert_allclose(res.entropy, -(expected * np.log(expected)).sum(1), rtol=1e-6)
    assert res.objids is None and res.labels is None
    np.testing.assert_array_equal(res.pred, expected.argmax(1))


def test_entropy_and_softmax_helpers():
    np.testing.assert_allclose(entropy(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.0, np.log(2)])
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])


def test_tta_equals_plain_on_rotation_invariant_model(x):
    invariant = build_model([{"type": "global_avg_pool"}, {"type": "dense", "units": 3}],
                            (8, 8, 2), seed=2)
    plain = predict_proba(invariant, x)
    tta = predict_proba(invariant, x, tta=True)
    np.testing.assert_allclose(tta.proba, plain.proba, rtol=1e-5, atol=1e-7)
    # on an orientation-sensitive model TTA is the average over the 8 symmetries
    model = build_model(CNN, (8, 8, 2), seed=1)
    res = predict_proba(model, x, tta=True, batch_size=10)
    manual = np.mean([predict_proba(model, dihedral(x, k)).proba for k in range(8)], axis=0)
    np.testing.assert_allclose(res.proba, manual, rtol=1e-6, atol=1e-9)
    assert not np.allclose(res.proba, predict_proba(model, x).proba, atol=1e-4)


def test_mc_dropout_spread_only_with_dropout(x):
    model = build_model(CNN, (8, 8, 2), seed=1)
    _trained_bn(model, x)
    buffers = {k: v.copy() for k, v in model.state.items()}
    res = predict_proba(model, x, mc_dropout=12, seed=3, batch_size=20)
    assert res.std.shape == (45, 3) and np.all(res.std >= 0) and res.std.max() > 1e-3
    assert np.all(res.mutual_info >= 0) and res.mutual_info.max() > 0
    np.testing.assert_allclose(res.proba.sum(1), 1.0)
    # BatchNorm stayed in inference mode: its running statistics did not move
    for k, v in model.state.items():
        np.testing.assert_array_equal(v, buffers[k], err_msg=k)
    # reproducible for a seed, different for another
    again = predict_proba(model, x, mc_dropout=12, seed=3, batch_size=20)
    np.testing.assert_array_equal(res.proba, again.proba)
    other = predict_proba(model, x, mc_dropout=12, seed=4, batch_size=20)
    assert not np.array_equal(res.proba, other.proba)
    # the MC mean is close to the deterministic prediction (inverted dropout)
    assert np.abs(res.proba - predict_proba(model, x).proba).mean() < 0.1
    # dropout is back to normal afterwards: inference is deterministic again
    layer = dropout_layers(model)[0]
    assert "forward" not in vars(layer)
    np.testing.assert_array_equal(model.forward(x), model.forward(x))
    # no dropout layer: the passes agree exactly
    plain = build_model([s for s in CNN if s["type"] != "dropout"], (8, 8, 2), seed=1)
    res0 = predict_proba(plain, x, mc_dropout=5)
    assert np.all(res0.std == 0)
    np.testing.assert_allclose(res0.proba, predict_proba(plain, x).proba, rtol=1e-12)


def test_mc_dropout_context_restores_on_error(x):
    model = build_model(CNN, (8, 8, 2), seed=1)
    with pytest.raises(RuntimeError), mc_dropout_active(model) as n:
        assert n == 1
        a = model.forward(x, training=False)
        b = model.forward(x, training=False)
        assert not np.array_equal(a, b)
        raise RuntimeError
    np.testing.assert_array_equal(model.forward(x), model.forward(x))


def test_mc_dropout_is_an_explicit_mode(x):
    """Dropout reads its declared ``mc_sampling`` flag; nothing is patched on the layer."""
    model = build_model(CNN, (8, 8, 2), seed=1)
    layer = dropout_layers(model)[0]
    assert layer.mc_sampling is False
    with mc_dropout_active(model):
        assert layer.mc_sampling is True and "forward" not in vars(layer)
    assert layer.mc_sampling is False
    model.set_mc_dropout(True)
    assert not np.array_equal(model.forward(x), model.forward(x))
    model.set_mc_dropout(False)
    np.testing.assert_array_equal(model.forward(x), model.forward(x))


def test_batching_does_not_change_results(x):
    model = build_model(CNN, (8, 8, 2), seed=5)
    _trained_bn(model, x)
    for tta in (False, True):
        one = predict_proba(model, x, batch_size=1000, tta=tta)
        many = predict_proba(model, x, batch_size=7, tta=tta)
        np.testing.assert_allclose(many.proba, one.proba, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(many.entropy, one.entropy, rtol=1e-5, atol=1e-8)


def test_datasets_give_objids_and_labels(x, tmp_path):
    y = np.arange(45) % 3
    ids = np.arange(7000, 7045)
    path = write_split_parquet(tmp_path / "test.parquet", x, y, objids=ids, bands=("g", "r"),
                               row_group_size=10)
    model = build_model(CNN, (8, 8, 2), seed=1)
    res = predict_proba(model, ParquetImageDataset(path), batch_size=16, tta=True)
    np.testing.assert_array_equal(res.objids, ids)
    np.testing.assert_array_equal(res.labels, y)
    np.testing.assert_allclose(res.proba, predict_proba(model, x, tta=True).proba,
                               rtol=1e-5, atol=1e-8)
    res_a = predict_proba(model, ArrayDataset(x, y, classes=CLASSES, objids=ids))
    np.testing.assert_array_equal(res_a.objids, ids)
    with pytest.raises(DataError, match="model expects"):
        predict_proba(model, x[:, :4, :4])
    with pytest.raises(ConfigError, match="mc_dropout"):
        predict_proba(model, x, mc_dropout=-1)
