"""Winograd F(4x4, 3x3) inference forward (galpipe.nn.fast.winograd4): the transforms, the
forward against the reference layers (float64: exact algorithm; float32: its rounding), every
fusion, odd batches, piece sizes and worker counts, and the dispatch from WinogradStep."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import galpipe.nn.fast.winograd as winograd
import galpipe.nn.fast.winograd4 as winograd4
from galpipe.errors import ModelError
from galpipe.nn import build_model, set_num_workers
from galpipe.nn.conv import Conv2D

#: Float32 bound on max |err| / max |y| (measured 1.4e-6 to 5e-6 on the benchmark layers,
#: see benchmarks/bench_winograd4.py; F(2x2) and im2col: 2e-7 to 6e-7).
F32_TOL = 2e-5

SPECS: dict[str, tuple[list[Any], str | None]] = {
    "conv": ([{"type": "conv2d", "filters": 5}], None),
    "conv-relu-nobias": ([{"type": "conv2d", "filters": 6, "use_bias": False}, "relu"], "relu"),
    "conv-relu-pool": ([{"type": "conv2d", "filters": 7}, "relu", "maxpool2d"], "relu_pool"),
}
SHAPE = (8, 12, 16)  # H != W, both multiples of 4, C at the Winograd threshold


def _models(case: str, dtype: type = np.float32) -> tuple[Any, Any]:
    """(fast, reference) models of ``SPECS[case]`` with the same weights and a non-zero bias."""
    spec, _ = SPECS[case]
    fast = build_model(spec, SHAPE, seed=3, dtype=dtype)
    ref = build_model(spec, SHAPE, seed=3, dtype=dtype)
    ref.use_fast_path(False)
    if "b" in fast.layers[0].params:
        bias = np.random.default_rng(9).standard_normal(fast.layers[0].filters) * 0.3
        fast.layers[0].params["b"][...] = bias
        ref.layers[0].params["b"][...] = bias
    return fast, ref


def _f4_step(model: Any) -> winograd4.Winograd4Forward:
    step = model._plan[0][0]
    assert isinstance(step, winograd.WinogradStep) and step._f4 is not None
    return step._f4


@pytest.fixture(params=[(None, 1), (None, 2), (1, 2), (2, 3)],
                ids=["bytes-1worker", "bytes-2workers", "1image-2workers", "2images-3workers"])
def pieces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    images, workers = request.param
    monkeypatch.setattr(winograd4, "PIECE_IMAGES", images)
    set_num_workers(workers)
    yield request.param
    set_num_workers(None)


def test_one_dimensional_transforms_are_exact() -> None:
    """``A^T [(G g) . (B^T d)]`` is the 4-output correlation of a 6-sample ``d`` with ``g``."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        g, d = rng.standard_normal(3), rng.standard_normal(6)
        got = winograd4.AT @ ((winograd4.G @ g) * (winograd4.BT @ d))
        np.testing.assert_allclose(got, np.correlate(d, g, "valid"), rtol=0, atol=1e-13)
    # the bias position reaches every output pixel with weight 1
    e = np.zeros(6)
    e[winograd4.BIAS_POSITION // 6] = 1.0
    np.testing.assert_array_equal(winograd4.AT @ e, np.ones(4))


@pytest.mark.parametrize("case", sorted(SPECS))
@pytest.mark.parametrize("batch", [1, 5])
def test_float64_forward_equals_reference(pieces: tuple, case: str, batch: int) -> None:
    """In float64 the algorithm is exact: any tile, offset or border mistake shows up."""
    fast, ref = _models(case, np.float64)
    x = np.random.default_rng(batch).standard_normal((batch, *SHAPE))
    got = _f4_step(fast).forward(x)
    want = ref.forward(x, training=False)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("case", sorted(SPECS))
def test_float32_inference_forward_matches_reference_layers(pieces: tuple, case: str) -> None:
    """``model.forward(training=False)`` runs F(4x4) (odd batch, every fusion) and agrees with
    Conv2D + ReLU + MaxPool2D to F(4x4)'s float32 rounding."""
    fast, ref = _models(case)
    x = np.random.default_rng(7).standard_normal((7, *SHAPE)).astype(np.float32)
    got = fast.forward(x, training=False)
    np.testing.assert_array_equal(got, _f4_step(fast).forward(x))  # the dispatch ran F(4x4)
    want = ref.forward(x, training=False)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= F32_TOL * np.abs(want).max()


def test_kernel_transform_is_reused_until_the_kernel_changes() -> None:
    """The transformed kernel is kept between inference batches and recomputed once the
    kernel changes in place (as an optimiser step changes it)."""
    fast, ref = _models("conv-relu-pool")
    step = _f4_step(fast)
    x = np.random.default_rng(5).standard_normal((3, *SHAPE)).astype(np.float32)
    fast.forward(x, training=False)
    u = step.transformed_kernel(np.dtype(np.float32))
    assert step.transformed_kernel(np.dtype(np.float32)) is u  # unchanged kernel: reused
    for model in (fast, ref):
        model.layers[0].params["W"][0, 0, 0, 0] += 0.5  # in place, like Adam on the flat buffer
    assert step.transformed_kernel(np.dtype(np.float32)) is not u
    got, want = fast.forward(x, training=False), ref.forward(x, training=False)
    assert np.abs(got - want).max() <= F32_TOL * np.abs(want).max()


def test_results_do_not_depend_on_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces depend on the batch size only: 1, 2 and 3 workers give identical outputs."""
    monkeypatch.setattr(winograd4, "PIECE_IMAGES", 2)
    fast, _ = _models("conv-relu-pool")
    x = np.random.default_rng(1).standard_normal((9, *SHAPE)).astype(np.float32)
    outs = []
    try:
        with threadpool_limits(limits=1):
            for workers in (1, 2, 3):
                set_num_workers(workers)
                outs.append(fast.forward(x, training=False))
    finally:
        set_num_workers(None)
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0], other)


def test_float32_accuracy_against_float64_direct() -> None:
    """F(4x4) float32 error on a benchmark-like layer (32 channels, He init) stays within
    :data:`F32_TOL` of the output scale (and above F(2x2)'s, which is ~2e-7)."""
    conv = build_model([{"type": "conv2d", "filters": 16}], (16, 16, 32), seed=2).layers[0]
    ref = build_model([{"type": "conv2d", "filters": 16}], (16, 16, 32), seed=2, dtype=np.float64)
    ref.use_fast_path(False)
    ref.layers[0].params["W"][...] = conv.params["W"]
    x = np.random.default_rng(5).standard_normal((4, 16, 16, 32))
    want = ref.forward(x, training=False)
    got = winograd4.Winograd4Forward(conv).forward(x.astype(np.float32))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-7 < err < F32_TOL, err


def test_training_and_switch_off_run_f2x2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training forwards stay F(2x2); with ``USE_F4_INFERENCE`` off, inference is F(2x2) too
    (bit-identical to the training forward)."""
    fast, _ = _models("conv-relu-pool")
    x = np.random.default_rng(2).standard_normal((3, *SHAPE)).astype(np.float32)
    train = fast.forward(x, training=True)
    infer4 = fast.forward(x, training=False)
    assert not np.array_equal(train, infer4)  # different rounding: F(4x4) did run
    monkeypatch.setattr(winograd, "USE_F4_INFERENCE", False)
    np.testing.assert_array_equal(fast.forward(x, training=False), train)


def test_backward_after_f4_inference_forward() -> None:
    """A backward pass after an F(4x4) inference forward recomputes the F(2x2) training
    forward: the same gradients as after a training forward."""
    spec = SPECS["conv-relu-pool"][0]
    x = np.random.default_rng(0).standard_normal((5, *SHAPE)).astype(np.float32)
    a, b = build_model(spec, SHAPE, seed=1), build_model(spec, SHAPE, seed=1)
    ya = a.forward(x, training=False)
    yb = b.forward(x, training=True)
    assert not np.array_equal(ya, yb)  # a ran F(4x4)
    d = np.random.default_rng(1).standard_normal(ya.shape).astype(np.float32)
    np.testing.assert_array_equal(a.backward(d), b.backward(d))
    for k, g in a.grads.items():
        np.testing.assert_array_equal(g, b.grads[k])


@pytest.mark.parametrize(("shape", "kwargs"), [
    ((6, 8, 16), {}),                     # height not a multiple of 4
    ((8, 10, 16), {}),                    # width not a multiple of 4
    ((8, 8, 15), {}),                     # below the Winograd channel threshold
    ((8, 8, 16), {"stride": 2}),
    ((8, 8, 16), {"padding": "valid"}),
    ((8, 8, 16), {"kernel_size": 5}),
])
def test_ineligible_layers_stay_f2x2_or_im2col(shape: tuple, kwargs: dict) -> None:
    model = build_model([{"type": "conv2d", "filters": 4, **kwargs}], shape)
    conv = model.layers[0]
    assert isinstance(conv, Conv2D) and not winograd4.eligible4(conv)
    step = model._plan[0][0]
    assert getattr(step, "_f4", None) is None
    with pytest.raises(ModelError, match=r"F\(4x4,3x3\) needs .*input"):
        winograd4.Winograd4Forward(conv)


def test_bad_post_and_bad_input_are_refused() -> None:
    fast, _ = _models("conv")
    conv = fast.layers[0]
    with pytest.raises(ModelError, match="unknown fused post-op 'gelu'"):
        winograd4.Winograd4Forward(conv, "gelu")
    with pytest.raises(ModelError, match="per-sample shape"):
        winograd4.Winograd4Forward(conv).forward(np.zeros((2, 8, 8, 16), np.float32))
