"""The fast path (galpipe.nn.fast) against the reference layers, layer by layer and on whole
networks: forward (training and inference), input gradients and parameter gradients agree
to float32 rounding, in every mode of the fast convolution and for 1 and 2 workers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import galpipe.nn.fast.conv as fast_conv
import galpipe.nn.fast.s2d as s2d
import galpipe.nn.fast.winograd as winograd
from galpipe.nn import LAYERS, Conv2D, Layer, ReLU, Sequential, build_model, set_num_workers

# The presets of config/architectures (small_cnn, vgg_like, small_resnet), with a 3-class head.
PRESETS: dict[str, list[Any]] = {
    "small_cnn": [
        {"type": "conv2d", "filters": 16, "kernel_size": 3}, "relu", "maxpool2d",
        {"type": "conv2d", "filters": 32, "kernel_size": 3}, "relu", "maxpool2d",
        {"type": "conv2d", "filters": 64, "kernel_size": 3}, "relu", "maxpool2d",
        "flatten", {"type": "dense", "units": 128}, "relu", {"type": "dropout", "rate": 0.3},
        {"type": "dense", "units": 3},
    ],
    "vgg_like": [
        {"repeat": 2, "layers": [{"type": "conv2d", "filters": 16}, "batchnorm", "relu"]},
        "maxpool2d",
        {"repeat": 2, "layers": [{"type": "conv2d", "filters": 32}, "batchnorm", "relu"]},
        "maxpool2d",
        {"repeat": 2, "layers": [{"type": "conv2d", "filters": 64}, "batchnorm", "relu"]},
        "maxpool2d", "global_avg_pool", {"type": "dropout", "rate": 0.3},
        {"type": "dense", "units": 64}, "relu", {"type": "dense", "units": 3},
    ],
    "small_resnet": [
        {"type": "conv2d", "filters": 16, "kernel_size": 3, "stride": 2}, "batchnorm", "relu",
        {"type": "residual", "body": [{"type": "conv2d", "filters": 16}, "batchnorm", "relu",
                                      {"type": "conv2d", "filters": 16}, "batchnorm"]},
        "relu",
        {"type": "residual", "body": [{"type": "conv2d", "filters": 32, "stride": 2}, "batchnorm",
                                      "relu", {"type": "conv2d", "filters": 32}, "batchnorm"],
         "projection": "auto"},
        "relu", "global_avg_pool", {"type": "dense", "units": 3},
    ],
}

# Single layers and short stacks with a fast step (one case per code path).
LAYER_CASES: dict[str, tuple[list[Any], tuple[int, ...], list[str]]] = {
    # name: (spec, per-sample input shape, expected step kinds)
    "conv": ([{"type": "conv2d", "filters": 5}], (9, 8, 3), ["conv"]),
    "conv-valid-stride2": ([{"type": "conv2d", "filters": 4, "stride": 2, "padding": "valid"}],
                           (9, 9, 6), ["conv"]),
    "conv-nobias-1x1": ([{"type": "conv2d", "filters": 4, "kernel_size": 1, "use_bias": False}],
                        (6, 6, 8), ["conv"]),
    "conv-relu": ([{"type": "conv2d", "filters": 6}, "relu"], (8, 8, 2), ["conv_relu"]),
    "conv-relu-pool": ([{"type": "conv2d", "filters": 6}, "relu", "maxpool2d"], (8, 8, 8),
                       ["conv_relu_pool"]),
    "conv-relu-pool-odd": ([{"type": "conv2d", "filters": 3}, "relu", "maxpool2d"], (7, 7, 2),
                           ["conv_relu", "maxpool"]),
    "relu": (["relu"], (6, 6, 3), ["relu"]),
    "relu-pool": (["relu", "maxpool2d"], (8, 6, 3), ["relu_pool"]),
    "relu-pool-overlapping": (["relu", {"type": "maxpool2d", "pool_size": 3, "stride": 2}],
                              (7, 7, 2), ["relu_pool"]),
    "maxpool": (["maxpool2d"], (9, 7, 4), ["maxpool"]),
    "maxpool-3x2": ([{"type": "maxpool2d", "pool_size": [3, 2]}], (9, 8, 2), ["maxpool"]),
    "dense": (["flatten", {"type": "dense", "units": 7}], (5, 3), ["layer", "dense"]),
    # Winograd F(2x2, 3x3) (C_in >= winograd.MIN_CHANNELS): even and odd sizes, the
    # threshold itself, every fusion
    "wino-conv": ([{"type": "conv2d", "filters": 5}], (8, 8, 16), ["conv"]),
    "wino-conv-odd": ([{"type": "conv2d", "filters": 4, "padding": 1}], (7, 5, 16), ["conv"]),
    "wino-conv-relu-odd": ([{"type": "conv2d", "filters": 6}, "relu"], (5, 9, 17), ["conv_relu"]),
    "wino-conv-relu-pool": ([{"type": "conv2d", "filters": 6}, "relu", "maxpool2d"], (8, 6, 16),
                            ["conv_relu_pool"]),
    "wino-conv-relu-pool-odd": ([{"type": "conv2d", "filters": 3, "use_bias": False}, "relu",
                                 "maxpool2d"], (7, 7, 16), ["conv_relu", "maxpool"]),
    # few channels + relu + 2x2 pool: one GEMM per pooling window (s2d.MAX_CHANNELS)
    "s2d-conv-relu-pool": ([{"type": "conv2d", "filters": 5}, "relu", "maxpool2d"], (8, 6, 3),
                           ["conv_relu_pool"]),
    "s2d-conv-relu-pool-nobias": ([{"type": "conv2d", "filters": 4, "use_bias": False}, "relu",
                                   "maxpool2d"], (6, 10, 1), ["conv_relu_pool"]),
}

# One spec per built-in layer type (those without a fast step run the reference in both).
EVERY_TYPE: dict[str, tuple[list[Any], tuple[int, ...]]] = {
    "conv2d": ([{"type": "conv2d", "filters": 3}], (6, 6, 2)),
    "maxpool2d": (["maxpool2d"], (6, 6, 2)),
    "avgpool2d": ([{"type": "avgpool2d", "pool_size": 3, "stride": 2}], (7, 7, 2)),
    "global_avg_pool": (["global_avg_pool"], (5, 4, 3)),
    "flatten": (["flatten"], (3, 4, 2)),
    "dense": ([{"type": "dense", "units": 4}], (6,)),
    "dropout": ([{"type": "dropout", "rate": 0.4}], (5, 3)),
    "batchnorm": (["batchnorm"], (4, 4, 3)),
    "relu": (["relu"], (4, 4, 3)),
    "leaky_relu": ([{"type": "leaky_relu", "alpha": 0.1}], (7,)),
    "elu": (["elu"], (7,)),
    "gelu": (["gelu"], (7,)),
    "sigmoid": (["sigmoid"], (7,)),
    "tanh": (["tanh"], (7,)),
    "sequential": ([{"type": "sequential", "layers": [{"type": "conv2d", "filters": 2}, "relu"]}],
                   (6, 6, 2)),
    "residual": ([{"type": "residual", "body": [{"type": "conv2d", "filters": 4}, "relu"]}],
                 (6, 6, 2)),
}

CONV_MODES = {
    # name: (PIECE_BYTES, SMALL_PATCH_BELOW, workers)
    "default-1worker": (None, None, 1),
    "default-2workers": (None, None, 2),
    "small-pieces": (1, None, 2),
    "row-patches": (1, 0, 2),
    "transposed-patches": (1, 10**6, 2),
}


@pytest.fixture(params=sorted(CONV_MODES))
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    piece, small, workers = CONV_MODES[request.param]
    if piece is not None:
        monkeypatch.setattr(fast_conv, "PIECE_BYTES", piece)
        monkeypatch.setattr(fast_conv, "BWD_PIECE_BYTES", piece)
        monkeypatch.setattr(winograd, "PIECE_IMAGES", piece)
        monkeypatch.setattr(s2d, "PIECE_IMAGES", piece)
    if small is not None:
        monkeypatch.setattr(fast_conv, "SMALL_PATCH_BELOW", small)
    set_num_workers(workers)
    yield request.param
    set_num_workers(None)


def _close(got: np.ndarray, want: np.ndarray, what: str, scale: float | None = None) -> None:
    """Equal to float32 rounding: ``|got - want| <= 1e-4 |want| + 2e-6 scale`` (``scale``:
    the largest ``|want|``, or a model-wide magnitude for gradients that should be ~0,
    e.g. a bias followed by BatchNorm)."""
    if scale is None:
        scale = float(np.max(np.abs(want), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6 * max(scale, 1e-30), err_msg=what)


def _compare(spec: list[Any], shape: tuple[int, ...], batch: int = 5, seed: int = 0) -> Sequential:
    """Run the fast and the reference execution of ``spec``; assert they agree."""
    fast = build_model(spec, shape, seed=seed)
    ref = build_model(spec, shape, seed=seed)
    ref.use_fast_path(False)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    for training in (False, True):
        fast.set_rng(np.random.default_rng(7))
        ref.set_rng(np.random.default_rng(7))
        y_fast = fast.forward(x, training)
        y_ref = ref.forward(x, training)
        _close(y_fast, y_ref, f"forward (training={training})")
        d = rng.standard_normal(y_ref.shape).astype(np.float32)
        _close(fast.backward(d), ref.backward(d), f"dx (training={training})")
        assert list(fast.grads) == list(ref.grads)
        scale = max(float(np.max(np.abs(g))) for g in ref.grads.values()) if ref.grads else 0.0
        for k, g in fast.grads.items():
            _close(g, ref.grads[k], f"grad {k} (training={training})", scale)
    for k, v in fast.state.items():
        _close(v, ref.state[k], f"state {k}")
    return fast


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_fast_step_matches_reference_layer(mode: str, case: str) -> None:
    spec, shape, kinds = LAYER_CASES[case]
    # batch 5: not a multiple of the Winograd piece size (4), nor of the 2 workers
    fast = _compare(spec, shape)
    assert [kind for kind, _ in fast.execution_plan()] == kinds
    first = fast._plan[0][0]
    if case.startswith("wino"):
        assert isinstance(first, winograd.WinogradStep)
    elif case.startswith("s2d"):
        assert isinstance(first, s2d.SpaceToDepthStep)
    elif case.startswith("conv"):
        assert isinstance(first, fast_conv.ConvStep)


def test_winograd_threshold_and_eligibility() -> None:
    """Winograd runs exactly for 3x3 stride-1 one-pixel-padded kernels with C_in at or above
    the threshold; the rest (C_in = 3, strides, other kernels) stays im2col."""
    c_min = winograd.MIN_CHANNELS
    cases = [
        ({"filters": 4}, c_min, True),
        ({"filters": 4}, c_min - 1, False),
        ({"filters": 4}, 3, False),
        ({"filters": 4, "stride": 2}, c_min, False),
        ({"filters": 4, "padding": "valid"}, c_min, False),
        ({"filters": 4, "kernel_size": 5}, c_min, False),
    ]
    for kwargs, c, expected in cases:
        model = build_model([{"type": "conv2d", **kwargs}], (6, 6, c))
        assert isinstance(model._plan[0][0], winograd.WinogradStep) is expected, (kwargs, c)


def test_winograd_float32_accuracy_against_float64_direct() -> None:
    """F(2x2, 3x3) in float32 is as accurate as im2col: relative error ~1e-7 of the output
    scale against a float64 direct convolution (measured 2e-7 to 3e-7)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 10, 12, 32))
    fast = build_model([{"type": "conv2d", "filters": 8}], (10, 12, 32), seed=2)
    ref = build_model([{"type": "conv2d", "filters": 8}], (10, 12, 32), seed=2, dtype=np.float64)
    ref.use_fast_path(False)
    ref.layers[0].params["W"][...] = fast.layers[0].params["W"]
    want = ref.forward(x)
    got = fast.forward(x.astype(np.float32))
    assert isinstance(fast._plan[0][0], winograd.WinogradStep)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 2e-6


@pytest.mark.parametrize("type_name", sorted(EVERY_TYPE))
def test_every_layer_type_fast_matches_reference(type_name: str) -> None:
    spec, shape = EVERY_TYPE[type_name]
    _compare(spec, shape)


def test_every_builtin_layer_type_is_compared() -> None:
    builtin = {name for name, cls in LAYERS.items() if cls.__module__.startswith("galpipe.nn.")}
    assert builtin == set(EVERY_TYPE)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fast_path_matches_reference_on_presets(mode: str, preset: str) -> None:
    fast = _compare(PRESETS[preset], (16, 16, 3), batch=6)
    assert any(kind != "layer" for kind, _ in fast.execution_plan())


def test_reference_plan_runs_every_layer_itself() -> None:
    model = build_model(PRESETS["small_cnn"], (16, 16, 3))
    assert model.execution_plan()[0] == ("conv_relu_pool", (0, 1, 2))
    model.use_fast_path(False)
    assert {kind for kind, _ in model.execution_plan()} == {"layer"}
    model.use_fast_path(True)
    assert model.execution_plan()[0] == ("conv_relu_pool", (0, 1, 2))


def test_nested_containers_follow_use_fast_path() -> None:
    model = build_model(PRESETS["small_resnet"], (16, 16, 3))
    block = model.layers[3]
    assert block.body.execution_plan()[0][0] == "conv"
    model.use_fast_path(False)
    assert {kind for kind, _ in block.body.execution_plan()} == {"layer"}


def test_fusion_follows_declared_tags_not_classes() -> None:
    """A convolution fuses whatever declares ``fusion_tag == "relu"``; a ReLU subclass that
    changes the maths and resets the tag is run by itself."""

    class TaggedRelu(Layer):  # not a ReLU subclass, but declares the tag
        @property
        def fusion_tag(self) -> str | None:
            return "relu"

        def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
            return np.maximum(x, 0)

    class Shifted(ReLU):
        @property
        def fusion_tag(self) -> str | None:
            return None

        def fast_step(self, following: Any) -> None:
            return None

        def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
            return super().forward(x - 1, training)

    tagged = Sequential([Conv2D(3), TaggedRelu()])
    tagged.build((6, 6, 2))
    assert tagged.execution_plan() == [("conv_relu", (0, 1))]
    shifted = Sequential([Conv2D(3), Shifted()])
    shifted.build((6, 6, 2))
    assert shifted.execution_plan() == [("conv", (0,)), ("layer", (1,))]
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 2)).astype(np.float32)
    conv_out = shifted.layers[0].forward(x)
    np.testing.assert_allclose(shifted.forward(x), np.maximum(conv_out - 1, 0), rtol=1e-5,
                               atol=1e-6)


def test_fast_convolutions_do_not_depend_on_workers() -> None:
    """Pieces, and the order of the sums over them, depend on the batch size only (with
    single-threaded BLAS: otherwise one worker would run multi-threaded GEMMs)."""
    from threadpoolctl import threadpool_limits

    x = np.random.default_rng(3).standard_normal((16, 16, 16, 3)).astype(np.float32)
    results = []
    for workers in (1, 2):
        set_num_workers(workers)
        try:
            with threadpool_limits(limits=1):
                model = build_model(PRESETS["small_cnn"][:9], (16, 16, 3), seed=1)
                y = model.forward(x, training=True)
                model.backward(np.ones_like(y))
                results.append((y, {k: g.copy() for k, g in model.grads.items()}))
        finally:
            set_num_workers(None)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for k, g in results[0][1].items():
        np.testing.assert_array_equal(g, results[1][1][k])
