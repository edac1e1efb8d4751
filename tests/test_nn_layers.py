"""Layer behaviour: configs, shapes, values against direct reference implementations."""

from __future__ import annotations

import numpy as np
import pytest

import galpipe.nn.fast.conv as conv_mod
from galpipe.errors import ModelError
from galpipe.nn import (
    ELU,
    GELU,
    LAYERS,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Tanh,
    layer_from_spec,
    set_num_workers,
    softmax,
)
from galpipe.nn.conv import resolve_padding


def _conv_reference(x, w, b, stride, pads):
    """Direct (loop over outputs) convolution, float64."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, f = w.shape
    sh, sw = stride
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], ho, wo, f))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * sh : i * sh + kh, j * sw : j * sw + kw, :]
            out[:, i, j, :] = np.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
    return out + (b if b is not None else 0)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((3, 9, 8, 3), {"filters": 5}),
        ((3, 9, 8, 6), {"filters": 5, "stride": 2}),
        ((2, 7, 7, 4), {"filters": 3, "kernel_size": 5, "padding": "valid"}),
        ((2, 6, 5, 8), {"filters": 4, "kernel_size": [1, 3], "padding": 2}),
        ((2, 8, 8, 2), {"filters": 4, "kernel_size": 2, "stride": 2, "use_bias": False}),
    ],
)
def test_conv2d_matches_direct_convolution(shape, kwargs) -> None:
    x = np.random.default_rng(0).standard_normal(shape)
    layer = Conv2D(**kwargs)
    layer.build(shape[1:], np.random.default_rng(1), np.float64)
    if layer.use_bias:
        layer.params["b"][...] = np.arange(layer.filters) * 0.1
    out = layer.forward(x)
    pads = resolve_padding(layer.padding, shape[1:3], layer.kernel_size, layer.stride)
    ref = _conv_reference(x, layer.params["W"], layer.params.get("b"), layer.stride, pads)
    assert out.shape == ref.shape == (shape[0], *layer.output_shape)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_same_padding_output_size() -> None:
    for size in (7, 8):
        for stride in (1, 2, 3):
            layer = Conv2D(2, kernel_size=3, stride=stride, padding="same")
            assert layer.build((size, size, 1))[:2] == (-(-size // stride),) * 2


def test_conv2d_float32_and_pieces_and_workers_agree(monkeypatch) -> None:
    """The piece/worker decomposition changes nothing: bit-identical outputs and grads."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 12, 12, 8)).astype(np.float32)
    d = rng.standard_normal((10, 12, 12, 6)).astype(np.float32)
    results = []
    for piece_bytes, workers in [(1 << 30, 1), (1, 1), (1, 2), (5000, 2)]:
        monkeypatch.setattr(conv_mod, "PIECE_BYTES", piece_bytes)
        monkeypatch.setattr(conv_mod, "BWD_PIECE_BYTES", piece_bytes)
        set_num_workers(workers)
        try:
            layer = Conv2D(6)
            layer.build((12, 12, 8), np.random.default_rng(3))
            out = layer.forward(x, training=True)
            dx = layer.backward(d)
        finally:
            set_num_workers(None)
        assert out.dtype == np.float32 and dx.dtype == np.float32
        results.append((out, dx, layer.grads["W"].copy(), layer.grads["b"].copy()))
    for other in results[1:]:
        for a, b in zip(results[0][:2], other[:2], strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(results[0][2:], other[2:], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    # with a fixed piece size the gradients are identical for any number of workers
    np.testing.assert_array_equal(results[1][2], results[2][2])


def test_maxpool_values_and_threaded_path_match_reference() -> None:
    x = np.random.default_rng(0).standard_normal((6, 16, 16, 8)).astype(np.float32)
    ref = x.reshape(6, 8, 2, 8, 2, 8).max(axis=(2, 4))
    for workers in (1, 2):
        set_num_workers(workers)
        try:
            layer = MaxPool2D(2)
            np.testing.assert_array_equal(layer.forward(x), ref)
            dx = layer.backward(np.ones_like(ref))
        finally:
            set_num_workers(None)
        # exactly one winner per window, at the maximum
        assert dx.sum() == ref.size
        np.testing.assert_array_equal(x[dx == 1].reshape(-1).size, ref.size)
        assert np.all(x * dx == np.repeat(np.repeat(ref, 2, 1), 2, 2) * dx)


def test_pooling_odd_sizes_and_overlap() -> None:
    x = np.arange(2 * 7 * 5 * 1, dtype=np.float64).reshape(2, 7, 5, 1)
    assert MaxPool2D(2).forward(x).shape == (2, 3, 2, 1)
    out = MaxPool2D(3, stride=2).forward(x)
    assert out.shape == (2, 3, 2, 1)
    assert out[0, 0, 0, 0] == x[0, 2, 2, 0]
    avg = AvgPool2D(2).forward(x)
    assert avg[0, 0, 0, 0] == pytest.approx(np.mean(x[0, :2, :2, 0]))
    with pytest.raises(ModelError, match="larger than the input"):
        MaxPool2D(8).build((7, 5, 1))


def test_global_avg_pool_flatten_dense_values() -> None:
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    np.testing.assert_allclose(GlobalAvgPool().forward(x), x.mean(axis=(1, 2)))
    flat = Flatten().forward(x)
    assert flat.shape == (3, 120)
    np.testing.assert_array_equal(flat[1], x[1].reshape(-1))
    dense = Dense(7)
    dense.build((120,), np.random.default_rng(0), np.float64)
    np.testing.assert_allclose(dense.forward(flat), flat @ dense.params["W"] + dense.params["b"])


def test_activation_values() -> None:
    x = np.linspace(-4, 4, 17)[None, :]
    np.testing.assert_allclose(ReLU().forward(x), np.maximum(x, 0))
    np.testing.assert_allclose(LeakyReLU(0.2).forward(x), np.where(x > 0, x, 0.2 * x))
    np.testing.assert_allclose(ELU(1.5).forward(x), np.where(x > 0, x, 1.5 * np.expm1(x)))
    np.testing.assert_allclose(Sigmoid().forward(x), 1 / (1 + np.exp(-x)))
    np.testing.assert_allclose(Tanh().forward(x), np.tanh(x))
    gelu_tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(GELU().forward(x), gelu_tanh)
    # no overflow warnings for extreme inputs
    big = np.array([[-1e4, 1e4]], dtype=np.float32)
    with np.errstate(all="raise"):
        np.testing.assert_allclose(Sigmoid().forward(big), [[0.0, 1.0]])
        np.testing.assert_allclose(ELU().forward(big), [[-1.0, 1e4]])


def test_batchnorm_train_and_eval() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 3, 4)) * 3 + 5
    bn = BatchNorm(momentum=0.5)
    out = bn.forward(x, training=True)
    flat = out.reshape(-1, 4)
    np.testing.assert_allclose(flat.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(flat.std(axis=0), 1, atol=1e-3)
    xf = x.reshape(-1, 4)
    np.testing.assert_allclose(bn.state["running_mean"], 0.5 * xf.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.state["running_var"], 0.5 + 0.5 * xf.var(axis=0, ddof=1),
                               rtol=1e-5)
    ev = bn.forward(x, training=False)
    expect = (x - bn.state["running_mean"]) / np.sqrt(bn.state["running_var"] + 1e-5)
    np.testing.assert_allclose(ev, expect, rtol=1e-5)
    dense_bn = BatchNorm()
    assert dense_bn.forward(rng.standard_normal((8, 5)), training=True).shape == (8, 5)


def test_dropout_seeded_and_reseedable() -> None:
    a, b = Dropout(0.5), Dropout(0.5)
    a.build((100,), np.random.default_rng(1))
    b.build((100,), np.random.default_rng(1))
    x = np.ones((4, 100), dtype=np.float32)
    np.testing.assert_array_equal(a.forward(x, training=True), b.forward(x, training=True))
    a.set_rng(np.random.default_rng(5))
    first = a.forward(x, training=True)
    a.set_rng(np.random.default_rng(5))
    np.testing.assert_array_equal(first, a.forward(x, training=True))


ALL_SPECS = [
    {"type": "conv2d", "filters": 4, "kernel_size": [3, 5], "stride": 2, "padding": 1,
     "use_bias": False, "init": "glorot", "name": "first"},
    {"type": "maxpool2d", "pool_size": 3, "stride": 2},
    {"type": "avgpool2d", "pool_size": 2, "stride": None},
    {"type": "global_avg_pool"},
    {"type": "flatten"},
    {"type": "dense", "units": 3, "use_bias": True, "init": "he"},
    {"type": "dropout", "rate": 0.25},
    {"type": "batchnorm", "momentum": 0.8, "eps": 1e-3},
    {"type": "relu"},
    {"type": "leaky_relu", "alpha": 0.2},
    {"type": "elu", "alpha": 0.5},
    {"type": "gelu"},
    {"type": "sigmoid"},
    {"type": "tanh"},
    {"type": "sequential", "layers": [{"type": "dense", "units": 2, "use_bias": True,
                                       "init": "he"}]},
    {"type": "residual", "body": [{"type": "relu"}], "projection": None},
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[s["type"] for s in ALL_SPECS])
def test_config_round_trip(spec: dict) -> None:
    layer = layer_from_spec(spec)
    cfg = layer.get_config()
    assert layer_from_spec(cfg).get_config() == cfg
    for key, value in spec.items():
        if key in cfg and key not in ("layers", "body", "kernel_size"):
            assert cfg[key] == value
    assert repr(layer).startswith(type(layer).__name__)


def test_every_type_round_trips() -> None:
    builtin = {name for name, cls in LAYERS.items() if cls.__module__.startswith("galpipe.nn.")}
    assert {s["type"] for s in ALL_SPECS} == builtin


def test_bare_string_spec_and_errors_list_choices() -> None:
    assert isinstance(layer_from_spec("relu"), ReLU)
    with pytest.raises(ModelError) as err:
        layer_from_spec({"type": "conv3d", "filters": 2})
    assert "valid types" in str(err.value) and "conv2d" in str(err.value)
    with pytest.raises(ModelError) as err:
        layer_from_spec({"type": "dense", "unit": 3})
    assert "unit" in str(err.value) and "accepted" in str(err.value) and "units" in str(err.value)
    with pytest.raises(ModelError, match="padding"):
        Conv2D(4, padding="full")
    with pytest.raises(ModelError, match="unknown init"):
        Dense(3, init="uniformish")
    with pytest.raises(ModelError, match="rate"):
        Dropout(1.0)
    with pytest.raises(ModelError, match="filters"):
        Conv2D(0)


def test_flops_per_sample() -> None:
    conv = Conv2D(8, kernel_size=3)
    conv.build((10, 10, 4))
    assert conv.flops() == 10 * 10 * 8 * (2 * 9 * 4 + 1)
    dense = Dense(5)
    dense.build((20,))
    assert dense.flops() == 5 * (2 * 20 + 1)


def test_softmax_is_stable() -> None:
    p = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, 1.0, 2.0]]))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0])
    assert np.all(np.isfinite(p))
