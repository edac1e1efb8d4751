"""Centred finite-difference gradient checks (float64) for every layer type and the loss."""

from __future__ import annotations

import numpy as np
import pytest

import galpipe.nn.fast.conv as conv_mod
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
    Residual,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    Tanh,
    check_layer_gradients,
    check_loss_gradients,
    set_num_workers,
)

TOL = 1e-6


def _x(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _away_from_zero(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Inputs at least 0.05 away from the ReLU kink."""
    x = _x(shape, seed)
    return np.where(np.abs(x) < 0.05, 0.05 * np.sign(x) + 0.05 * (x == 0), x)


def _distinct(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Inputs without ties (max-pool): a shuffled ramp with gaps much larger than eps."""
    n = int(np.prod(shape))
    vals = np.random.default_rng(seed).permutation(n).astype(np.float64) / n - 0.5
    return vals.reshape(shape)


def _assert_ok(errors: dict[str, float], expected_keys: set[str]) -> None:
    assert set(errors) == expected_keys
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.fixture(params=[1, 2], ids=["1worker", "2workers"])
def workers(request: pytest.FixtureRequest):
    """Run with one and with two batch chunks (the threaded code path)."""
    set_num_workers(request.param)
    yield request.param
    set_num_workers(None)


CONV_MODES = {
    # name: (PIECE_BYTES, SMALL_PATCH_BELOW, workers)
    "default": (None, None, 1),
    "pieces-2workers": (1, None, 2),
    "row-patches": (1, 0, 2),
    "transposed-patches": (1, 10**6, 2),
}


@pytest.fixture(params=sorted(CONV_MODES))
def conv_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Exercise every convolution code path: one piece per sample, 2 workers, both
    patch layouts."""
    piece, small, workers = CONV_MODES[request.param]
    if piece is not None:
        monkeypatch.setattr(conv_mod, "PIECE_BYTES", piece)
        monkeypatch.setattr(conv_mod, "BWD_PIECE_BYTES", piece)
    if small is not None:
        monkeypatch.setattr(conv_mod, "SMALL_PATCH_BELOW", small)
    set_num_workers(workers)
    yield request.param
    set_num_workers(None)


CONV_CASES = [
    # (input (N, H, W, C), kwargs)
    ((2, 6, 6, 3), {"filters": 4}),
    ((2, 7, 5, 2), {"filters": 3, "kernel_size": 3, "padding": "valid"}),
    ((2, 7, 7, 2), {"filters": 3, "kernel_size": 3, "stride": 2}),
    ((2, 8, 8, 2), {"filters": 3, "kernel_size": 3, "stride": 2, "padding": "same"}),
    ((2, 6, 7, 2), {"filters": 2, "kernel_size": 2, "padding": "same"}),
    ((2, 6, 6, 2), {"filters": 2, "kernel_size": 3, "padding": 1}),
    ((2, 5, 5, 2), {"filters": 2, "kernel_size": 3, "padding": 2, "stride": 2}),
    ((2, 5, 6, 3), {"filters": 2, "kernel_size": [3, 1], "stride": [1, 2], "padding": "same"}),
    ((2, 5, 5, 2), {"filters": 3, "kernel_size": 1, "padding": 1}),
    ((2, 6, 6, 3), {"filters": 4, "use_bias": False}),
    ((3, 5, 5, 1), {"filters": 2, "kernel_size": 5, "padding": "valid"}),
    ((2, 5, 5, 7), {"filters": 3}),
    ((3, 6, 5, 6), {"filters": 2, "stride": 2, "padding": "valid"}),
]


@pytest.mark.parametrize(("shape", "kwargs"), CONV_CASES)
def test_conv2d_gradients(conv_mode: str, shape: tuple[int, ...], kwargs: dict) -> None:
    keys = {"W"} | ({"b"} if kwargs.get("use_bias", True) else set())
    # the reference layer
    _assert_ok(check_layer_gradients(Conv2D(**kwargs), _x(shape)), {"x"} | keys)
    # the fast step (a model runs it), in every mode of the fast convolution
    net = Sequential([Conv2D(**kwargs)])
    errors = check_layer_gradients(net, _x(shape))
    assert net.execution_plan() == [("conv", (0,))]
    _assert_ok(errors, {"x"} | {f"0.conv2d.{k}" for k in keys})


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((2, 6, 6, 3), {"pool_size": 2}),
        ((2, 7, 5, 2), {"pool_size": 2}),  # odd sizes: trailing row/column dropped
        ((2, 7, 7, 2), {"pool_size": 3, "stride": 2}),  # overlapping windows
        ((2, 8, 6, 2), {"pool_size": [2, 3], "stride": [2, 1]}),
        ((2, 9, 9, 1), {"pool_size": 3}),
    ],
)
def test_pooling_gradients(workers: int, shape: tuple[int, ...], kwargs: dict) -> None:
    _assert_ok(check_layer_gradients(MaxPool2D(**kwargs), _distinct(shape)), {"x"})
    _assert_ok(check_layer_gradients(AvgPool2D(**kwargs), _x(shape)), {"x"})


def test_maxpool_ties_route_to_first_maximum() -> None:
    x = np.zeros((1, 2, 2, 1), dtype=np.float64)
    layer = MaxPool2D(2)
    layer.forward(x)
    dx = layer.backward(np.ones((1, 1, 1, 1)))
    assert dx[0, :, :, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_global_avg_pool_and_flatten_gradients() -> None:
    _assert_ok(check_layer_gradients(GlobalAvgPool(), _x((2, 3, 4, 5))), {"x"})
    _assert_ok(check_layer_gradients(Flatten(), _x((2, 3, 4, 5))), {"x"})


@pytest.mark.parametrize("init", ["he", "glorot"])
def test_dense_gradients(init: str) -> None:
    _assert_ok(check_layer_gradients(Dense(4, init=init), _x((3, 6))), {"x", "W", "b"})
    _assert_ok(check_layer_gradients(Dense(4, use_bias=False), _x((3, 6))), {"x", "W"})


@pytest.mark.parametrize(
    "layer_factory",
    [ReLU, lambda: LeakyReLU(0.1), lambda: ELU(0.7), GELU, Sigmoid, Tanh],
    ids=["relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh"],
)
def test_activation_gradients(workers: int, layer_factory) -> None:
    # large enough to take the threaded path for relu when workers == 2
    _assert_ok(check_layer_gradients(layer_factory(), _away_from_zero((2, 3, 3, 2))), {"x"})


def test_relu_large_batch_threaded_matches_reference() -> None:
    x = _x((8, 64, 64, 8)).astype(np.float32)
    set_num_workers(2)
    try:
        layer = ReLU()
        out = layer.forward(x)
        dx = layer.backward(x)
    finally:
        set_num_workers(None)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(dx, x * (x > 0))


@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (5, 4)], ids=["conv", "dense"])
def test_batchnorm_training_gradients(shape: tuple[int, ...]) -> None:
    layer = BatchNorm()
    layer.build(shape[1:], np.random.default_rng(0), np.float64)
    rng = np.random.default_rng(3)
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, shape[-1])
    layer.params["beta"][...] = rng.standard_normal(shape[-1])
    _assert_ok(check_layer_gradients(layer, _x(shape)), {"x", "gamma", "beta"})


def test_batchnorm_eval_gradients() -> None:
    layer = BatchNorm()
    layer.build((3, 3, 2), np.random.default_rng(0), np.float64)
    layer.state["running_mean"][...] = [0.3, -0.2]
    layer.state["running_var"][...] = [1.5, 0.7]
    _assert_ok(check_layer_gradients(layer, _x((2, 3, 3, 2)), training=False),
               {"x", "gamma", "beta"})


def test_dropout_gradients_with_fixed_mask() -> None:
    layer = Dropout(0.4)
    errors = check_layer_gradients(layer, _x((3, 5, 4)), training=True)
    _assert_ok(errors, {"x"})
    # the mask really drops something, and evaluation mode is the identity
    layer.set_rng(np.random.default_rng(7))
    x = np.ones((200, 10))
    y = layer.forward(x, training=True)
    assert 0.3 < np.mean(y == 0) < 0.5
    np.testing.assert_allclose(y[y != 0], 1 / 0.6)
    assert layer.forward(x, training=False) is x


@pytest.mark.parametrize("projection", [None, "auto", "explicit"])
def test_residual_gradients(projection: str | None) -> None:
    if projection is None:
        body = [{"type": "conv2d", "filters": 3}, "tanh", {"type": "conv2d", "filters": 3}]
        block = Residual(body, projection=None)
        keys = {"x", "body.0.conv2d.W", "body.0.conv2d.b", "body.2.conv2d.W", "body.2.conv2d.b"}
    elif projection == "auto":
        body = [{"type": "conv2d", "filters": 4, "stride": 2}, "tanh"]
        block = Residual(body, projection="auto")
        keys = {"x", "body.0.conv2d.W", "body.0.conv2d.b", "proj.0.conv2d.W"}
    else:
        # (a bias before BatchNorm has an exactly-zero gradient: leave it out)
        body = [{"type": "conv2d", "filters": 4, "use_bias": False}, "batchnorm", "elu"]
        block = Residual(body, projection=[{"type": "conv2d", "filters": 4, "kernel_size": 1}])
        keys = {"x", "body.0.conv2d.W", "body.1.batchnorm.gamma",
                "body.1.batchnorm.beta", "proj.0.conv2d.W", "proj.0.conv2d.b"}
    _assert_ok(check_layer_gradients(block, _x((2, 5, 5, 3))), keys)


def test_sequential_with_fused_steps_gradients(conv_mode: str) -> None:
    net = Sequential(
        [{"type": "conv2d", "filters": 6}, "relu",  # conv_relu
         {"type": "conv2d", "filters": 3}, "relu", "maxpool2d",  # conv_relu_pool
         "tanh", "relu", "maxpool2d",  # relu_pool
         "flatten", {"type": "dense", "units": 4}, "leaky_relu", {"type": "dense", "units": 2}]
    )
    x = _x((3, 8, 8, 2), seed=5)
    errors = check_layer_gradients(net, x)
    kinds = [kind for kind, _ in net.execution_plan()]
    assert kinds[:3] == ["conv_relu", "conv_relu_pool", "layer"]
    assert "relu_pool" in kinds
    _assert_ok(errors, {"x"} | set(net.params))


def test_fused_and_unfused_execution_agree() -> None:
    """The fused conv/relu/pool steps compute what the separate reference layers compute,
    to float32 rounding (more cases in tests/test_nn_fast.py)."""
    spec = [{"type": "conv2d", "filters": 8}, "relu", "maxpool2d",
            {"type": "conv2d", "filters": 4}, "relu", "flatten", {"type": "dense", "units": 3}]
    from galpipe.nn import build_model

    x = np.random.default_rng(0).standard_normal((5, 8, 8, 3)).astype(np.float32)
    d = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    fused = build_model(spec, (8, 8, 3), seed=3)
    plain = build_model(spec, (8, 8, 3), seed=3)
    plain.use_fast_path(False)
    assert {kind for kind, _ in plain.execution_plan()} == {"layer"}
    for training in (False, True):
        np.testing.assert_allclose(fused.forward(x, training), plain.forward(x, training),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.backward(d), plain.backward(d), rtol=1e-5, atol=1e-6)
    for k, g in fused.grads.items():
        ref = plain.grads[k]
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_every_builtin_layer_type_is_checked() -> None:
    checked = {
        "conv2d", "maxpool2d", "avgpool2d", "global_avg_pool", "flatten", "dense", "dropout",
        "batchnorm", "relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh", "sequential",
        "residual",
    }
    builtin = {name for name, cls in LAYERS.items() if cls.__module__.startswith("galpipe.nn.")}
    assert builtin <= checked


@pytest.mark.parametrize(
    ("weights", "smoothing"),
    [(None, 0.0), ([0.5, 2.0, 1.0, 0.1], 0.0), (None, 0.1), ([0.5, 2.0, 1.0, 0.1], 0.2)],
)
def test_loss_gradients(weights: list[float] | None, smoothing: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4)) * 3
    y = rng.integers(0, 4, 6)
    err = check_loss_gradients(SoftmaxCrossEntropy(weights, smoothing), logits, y)
    assert err < TOL
