"""Winograd F(2x2, 3x3) convolution (galpipe.nn.fast.winograd): float64 gradient checks of
every fusion and size parity, and the backward pass after an inference-mode forward."""

from __future__ import annotations

import numpy as np
import pytest

import galpipe.nn.fast.winograd as winograd
from galpipe.nn import Sequential, build_model, check_layer_gradients, set_num_workers

TOL = 1e-6


@pytest.fixture(params=[(None, 1), (1, 2), (2, 2)],
                ids=["default-1worker", "1image-pieces-2workers", "uneven-pieces-2workers"])
def piece_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    piece, workers = request.param
    if piece is not None:
        monkeypatch.setattr(winograd, "PIECE_IMAGES", piece)
    set_num_workers(workers)
    yield request.param
    set_num_workers(None)


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        ([{"type": "conv2d", "filters": 3}], (3, 6, 5, 16)),
        ([{"type": "conv2d", "filters": 2, "padding": 1, "use_bias": False}, "relu"],
         (2, 5, 7, 16)),
        ([{"type": "conv2d", "filters": 3}, "relu", "maxpool2d"], (3, 6, 4, 17)),
    ],
    ids=["conv-even-odd", "conv-relu-odd", "conv-relu-pool"],
)
def test_winograd_float64_gradients(piece_mode: tuple, spec: list, shape: tuple) -> None:
    net = Sequential(spec)
    x = np.random.default_rng(2).standard_normal(shape)
    errors = check_layer_gradients(net, x)
    assert isinstance(net._plan[0][0], winograd.WinogradStep)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert set(errors) == {"x"} | set(net.params) and not bad, bad


def test_backward_after_inference_forward_matches_training_forward() -> None:
    """A backward pass after ``forward(training=False)`` recomputes what it needs."""
    spec = [{"type": "conv2d", "filters": 4}, "relu", "maxpool2d"]
    x = np.random.default_rng(0).standard_normal((5, 6, 6, 16)).astype(np.float32)
    d = np.random.default_rng(1).standard_normal((5, 3, 3, 4)).astype(np.float32)
    a, b = build_model(spec, (6, 6, 16), seed=1), build_model(spec, (6, 6, 16), seed=1)
    np.testing.assert_array_equal(a.forward(x, training=False), b.forward(x, training=True))
    np.testing.assert_array_equal(a.backward(d), b.backward(d))
    for k, g in a.grads.items():
        np.testing.assert_array_equal(g, b.grads[k])


def test_kernel_transforms_round_trip() -> None:
    """``kernel_gradient`` is the adjoint of ``kernel_transform`` (with the gradient signs):
    <U(w), M> == <w, G^T (SIGNS * M) G> for ``M`` built with the signs left out."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 3, 2, 3))
    m = rng.standard_normal((16, 2, 3))
    lhs = float(np.sum(winograd.kernel_transform(w, np.dtype(np.float64)) * m * winograd.SIGNS[:, None, None]))
    rhs = float(np.sum(w * winograd.kernel_gradient(m)))
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))
