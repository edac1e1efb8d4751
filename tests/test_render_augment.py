"""Training-time changes of how an image was made (``training.rendering``): zoom with sky
fill, blur, noise, colour stretch, JPEG; deterministic, shape- and dtype-preserving."""

from __future__ import annotations

import numpy as np
import pytest

from galpipe.errors import ConfigError
from galpipe.nn.augment import RenderSpec, jpeg_roundtrip, random_render, resample, sky_level
from galpipe.nn.training import TrainConfig

YY, XX = np.mgrid[:64, :64]


def _gaussian(sigma: float = 4.0, sky: float = 0.1) -> np.ndarray:
    """One ``(1, 64, 64, 1)`` centred Gaussian galaxy on a flat sky."""
    g = sky + np.exp(-((YY - 31.5) ** 2 + (XX - 31.5) ** 2) / (2 * sigma**2))
    return g[None, :, :, None].astype(np.float32)


def _width(img: np.ndarray, sky: float = 0.1) -> float:
    a = img[0, :, :, 0] - sky
    w = a / a.sum()
    return float(np.sqrt((w * (YY - 31.5) ** 2).sum()))


ALL_ON = {"probability": 0.5, "zoom": [0.5, 2.0], "blur_sigma": [0.0, 1.5], "noise_sigma": [0.0, 0.03],
          "gamma": [0.6, 1.6], "colour_gain": 0.1, "jpeg_quality": [10, 95]}


def test_zoom_scales_the_galaxy_about_the_centre_and_fills_sky():
    img = _gaussian()
    assert np.array_equal(resample(img, np.ones(1), np.zeros(1)), img)  # zoom 1, no blur: identity
    for z in (0.5, 2.0):
        out = resample(img, np.array([z]), np.zeros(1))
        assert _width(out) == pytest.approx(4.0 * z, rel=0.03)
    small = resample(img, np.array([0.5]), np.zeros(1), np.random.default_rng(0))
    # the new border (beyond the shrunk stamp) is sky: its level is the old border's
    assert small[0, :4, :, 0].mean() == pytest.approx(0.1, abs=0.01)
    level, _ = sky_level(img)
    assert level[0, 0] == pytest.approx(0.1, abs=1e-6)


def test_blur_widens_by_the_psf_in_quadrature():
    out = resample(_gaussian(3.0), np.ones(1), np.array([4.0]))
    assert _width(out) == pytest.approx(5.0, rel=0.03)


def test_random_render_is_deterministic_and_keeps_shape_and_range():
    x = np.random.default_rng(1).random((16, 32, 32, 3)).astype(np.float32)
    spec = RenderSpec.from_dict(ALL_ON)
    a = random_render(x, np.random.default_rng(7), spec, display=True)
    b = random_render(x, np.random.default_rng(7), spec, display=True)
    c = random_render(x, np.random.default_rng(8), spec, display=True)
    assert a.shape == x.shape and a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.array_equal(x, np.random.default_rng(1).random((16, 32, 32, 3)).astype(np.float32))  # input kept
    changed = [not np.array_equal(a[i], x[i]) for i in range(16)]
    assert 8 <= sum(changed) <= 16  # each of 6 changes at p=0.5: nearly every image gets one


def test_probability_zero_or_nothing_enabled_changes_nothing():
    x = np.random.default_rng(2).random((4, 16, 16, 3)).astype(np.float32)
    assert not RenderSpec.from_dict({}).enabled
    off = RenderSpec.from_dict({**ALL_ON, "probability": 0.0})
    assert not off.enabled
    assert np.array_equal(random_render(x, np.random.default_rng(0), off, display=True), x)


def test_each_change_does_what_it_says():
    x = np.full((1, 32, 32, 3), 0.5, np.float32)
    rng = np.random.default_rng(0)
    bright = random_render(x, rng, RenderSpec(probability=1.0, gamma=(0.5, 0.5)), display=True)
    assert np.allclose(bright, np.sqrt(0.5), atol=1e-6)
    noisy = random_render(x, rng, RenderSpec(probability=1.0, noise_sigma=(0.05, 0.05)))
    assert np.std(noisy - x) == pytest.approx(0.05, rel=0.1)
    tinted = random_render(x, rng, RenderSpec(probability=1.0, colour_gain=0.2))
    gains = tinted[0, 0, 0] / 0.5
    assert len(set(np.round(gains, 6))) == 3  # a gain per channel, constant over the image
    assert np.allclose(tinted[0], tinted[0, :1, :1])


def test_jpeg_roundtrip_is_lossy_and_needs_display_images():
    img = np.random.default_rng(3).random((32, 32, 3)).astype(np.float32)
    lo, hi = jpeg_roundtrip(img, 10), jpeg_roundtrip(img, 95)
    assert lo.shape == img.shape and np.abs(lo - img).mean() > np.abs(hi - img).mean()
    with pytest.raises(ConfigError, match="jpeg_quality needs 8-bit display images"):
        random_render(img[None], np.random.default_rng(0), RenderSpec(jpeg_quality=(10, 20)), display=False)


def test_config_validates_the_rendering_section():
    cfg = TrainConfig.from_dict({"rendering": {"zoom": [0.5, 2.0]}})
    assert cfg.rendering["zoom"] == [0.5, 2.0] and cfg.rendering["probability"] == 0.5
    with pytest.raises(ConfigError, match="rendering"):
        TrainConfig.from_dict({"rendering": {"zoom": [0.5]}})
    with pytest.raises(ConfigError, match="rendering"):
        TrainConfig.from_dict({"rendering": {"blurr": [0, 1]}})
    with pytest.raises(ConfigError, match="low 2 is above high 1"):
        RenderSpec.from_dict({"gamma": [2.0, 1.0]})
