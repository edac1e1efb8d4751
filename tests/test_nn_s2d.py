"""Few-channel conv + relu + 2x2 max-pool as one GEMM per pooling window
(galpipe.nn.fast.s2d): float64 gradient checks, the layout helpers against their
definitions, eligibility, and the backward pass after an inference-mode forward."""

from __future__ import annotations

import numpy as np
import pytest

import galpipe.nn.fast.s2d as s2d
from galpipe.nn import Sequential, build_model, check_layer_gradients, set_num_workers

TOL = 1e-6


@pytest.fixture(params=[(None, 1), (1, 2)], ids=["default-1worker", "1image-pieces-2workers"])
def piece_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    piece, workers = request.param
    if piece is not None:
        monkeypatch.setattr(s2d, "PIECE_IMAGES", piece)
    set_num_workers(workers)
    yield request.param
    set_num_workers(None)


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        ([{"type": "conv2d", "filters": 3}, "relu", "maxpool2d"], (3, 6, 4, 3)),
        ([{"type": "conv2d", "filters": 2, "use_bias": False}, "relu", "maxpool2d"],
         (2, 4, 8, 1)),
    ],
    ids=["rgb", "one-channel-nobias"],
)
def test_s2d_float64_gradients(piece_mode: tuple, spec: list, shape: tuple) -> None:
    """Input and parameter gradients (the input gradient is only computed when asked for)."""
    net = Sequential(spec)
    x = np.random.default_rng(2).standard_normal(shape)
    errors = check_layer_gradients(net, x)
    assert isinstance(net._plan[0][0], s2d.SpaceToDepthStep)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert set(errors) == {"x"} | set(net.params) and not bad, bad


def test_layout_helpers_match_their_definitions() -> None:
    """space_to_depth / window_patches give xpad[n, 2Y + r, 2X + s, c]; depth_to_space and
    scatter_windows are their inverse / adjoint; block_kernel places the kernel at the four
    tile offsets and fold_kernel_gradient is its adjoint."""
    rng = np.random.default_rng(0)
    m, h, w, c = 2, 6, 4, 3
    x = rng.standard_normal((m, h, w, c))
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xq = np.zeros((c, 2, 2, m, h // 2 + 1, w // 2 + 1))
    s2d.space_to_depth(x, xq)
    pt = np.empty((16 * c, m * (h // 2) * (w // 2)))
    s2d.window_patches(xq, pt, m)
    p6 = pt.reshape(4, 4, c, m, h // 2, w // 2)
    for r in range(4):
        for s in range(4):
            want = xpad[:, r : r + h - 1 : 2, s : s + w - 1 : 2, :].transpose(3, 0, 1, 2)
            np.testing.assert_array_equal(p6[r, s], want)
    back = np.empty_like(x)
    s2d.depth_to_space(xq, back)
    np.testing.assert_array_equal(back, x)
    # adjoint: <window_patches(x), g> == <x, scatter(g)>
    g = rng.standard_normal(pt.shape)
    dxq = np.zeros_like(xq)
    s2d.scatter_windows(g, dxq, m)
    dx = np.empty_like(x)
    s2d.depth_to_space(dxq, dx)
    np.testing.assert_allclose(np.sum(pt * g), np.sum(x * dx), rtol=1e-12)
    kernel = rng.standard_normal((3, 3, c, 5))
    wbt = s2d.block_kernel(kernel, np.dtype(np.float64)).reshape(2, 2, 5, 4, 4, c)
    for dy in range(2):
        for dx_ in range(2):
            np.testing.assert_array_equal(
                wbt[dy, dx_, :, dy : dy + 3, dx_ : dx_ + 3], kernel.transpose(3, 0, 1, 2))
            assert np.sum(np.abs(wbt[dy, dx_])) == pytest.approx(np.sum(np.abs(kernel)))
    # split_block_kernel keeps exactly the nonzero halves: the upper outputs' rows against
    # window rows 0-2, the lower outputs' rows against window rows 1-3
    flat = wbt.reshape(20, 16 * c)
    upper, lower = s2d.split_block_kernel(flat, c)
    assert upper.shape == lower.shape == (10, 12 * c)
    assert upper.flags.c_contiguous and lower.flags.c_contiguous
    np.testing.assert_array_equal(upper, flat[:10, : 12 * c])
    np.testing.assert_array_equal(lower, flat[10:, 4 * c :])
    assert not flat[:10, 12 * c :].any() and not flat[10:, : 4 * c].any()
    gb = rng.standard_normal((20, 16 * c))
    lhs = np.sum(wbt.reshape(20, 16 * c) * gb)
    assert lhs == pytest.approx(np.sum(kernel * s2d.fold_kernel_gradient(gb, c)), rel=1e-12)


def test_eligibility() -> None:
    """Only 3x3 stride-1 'same' kernels on few channels and even sizes, fused with relu and
    a 2x2 max-pool; the rest keeps its im2col / Winograd step."""
    pool = ["relu", "maxpool2d"]
    cases = [
        ([{"type": "conv2d", "filters": 4}, *pool], (6, 6, 3), True),
        ([{"type": "conv2d", "filters": 4}, *pool], (6, 6, s2d.MAX_CHANNELS), True),
        ([{"type": "conv2d", "filters": 4}, *pool], (6, 6, s2d.MAX_CHANNELS + 1), False),
        ([{"type": "conv2d", "filters": 4}, "relu"], (6, 6, 3), False),
        ([{"type": "conv2d", "filters": 4}, *pool], (7, 6, 3), False),
        ([{"type": "conv2d", "filters": 4, "stride": 2}, *pool], (8, 8, 3), False),
        ([{"type": "conv2d", "filters": 4, "kernel_size": 5}, *pool], (8, 8, 3), False),
    ]
    for spec, shape, expected in cases:
        model = build_model(spec, shape)
        assert isinstance(model._plan[0][0], s2d.SpaceToDepthStep) is expected, (spec, shape)


def test_backward_after_inference_forward_and_input_grad_skipped() -> None:
    """A backward pass after ``forward(training=False)`` recomputes what it needs; as the first
    layer of a training step (``input_grad=False``) it returns no input gradient."""
    spec = [{"type": "conv2d", "filters": 4}, "relu", "maxpool2d"]
    x = np.random.default_rng(0).standard_normal((5, 6, 8, 3)).astype(np.float32)
    d = np.random.default_rng(1).standard_normal((5, 3, 4, 4)).astype(np.float32)
    a, b = build_model(spec, (6, 8, 3), seed=1), build_model(spec, (6, 8, 3), seed=1)
    np.testing.assert_array_equal(a.forward(x, training=False), b.forward(x, training=True))
    np.testing.assert_array_equal(a.backward(d), b.backward(d))
    for k, g in a.grads.items():
        np.testing.assert_array_equal(g, b.grads[k])
    assert b.backward(d, input_grad=False) is None
    for k, g in a.grads.items():
        np.testing.assert_array_equal(g, b.grads[k])
