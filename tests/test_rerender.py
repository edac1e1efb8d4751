"""The re-renderings of the domain-shift benchmark (galpipe.testing.rerender) on synthetic images.

Each transform is checked against what it claims: the magnification and centring of the
zooms (second moments and centroid of a Gaussian galaxy), the sky colour and noise of the
zoom-out's surround, the PSF width of the blur, the exact formula of the restretch, the
noise level, the JPEG quality, determinism by seed, and clear errors for bad input.
The benchmark script's main() is run once, on a missing data folder (it skips cleanly).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from galpipe.errors import DataError
from galpipe.testing import rerender as rr

REPO = Path(__file__).resolve().parents[1]
SIDE = 423
SKY, SKY_SIGMA = 20.0, 4.0


def _galaxy(sigma: float, side: int = SIDE, peak: float = 200.0, noise: float = 0.0, seed: int = 1) -> np.ndarray:
    """A round Gaussian galaxy of ``sigma`` px, centred on the image centre, on a sky of SKY DN (+ noise)."""
    c = (side - 1) / 2.0
    yy, xx = np.mgrid[0:side, 0:side]
    light = peak * np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * sigma**2))
    img = SKY + light[..., None] * np.array([1.0, 0.8, 0.6])
    if noise:
        img = img + noise * np.random.default_rng(seed).standard_normal(img.shape)
    return rr.to_uint8(img)


def _moments(img: np.ndarray, channel: int = 0) -> tuple[float, float, float]:
    """Centroid (x, y) and radial second moment sigma (px) of the light above the sky in one channel."""
    light = np.clip(img[..., channel].astype(np.float64) - SKY, 0, None)
    light[light < 3.0] = 0.0  # ignore the noise floor
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    tot = light.sum()
    cx, cy = (light * xx).sum() / tot, (light * yy).sum() / tot
    var = (light * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / tot / 2.0
    return float(cx), float(cy), float(np.sqrt(var))


@pytest.fixture(scope="module")
def galaxy() -> np.ndarray:
    """``(423, 423, 3)`` uint8: a sigma-12 px galaxy on a noiseless sky."""
    return _galaxy(12.0)


@pytest.fixture(scope="module")
def noisy_galaxy() -> np.ndarray:
    """``(423, 423, 3)`` uint8: a sigma-12 px galaxy on a sky of SKY +- SKY_SIGMA DN."""
    return _galaxy(12.0, noise=SKY_SIGMA)


def test_zoom_in_doubles_the_galaxy_about_the_centre(galaxy: np.ndarray) -> None:
    out = rr.zoom_in(galaxy, 2.0)
    assert out.shape == galaxy.shape and out.dtype == np.uint8
    cx0, cy0, s0 = _moments(galaxy)
    cx, cy, s = _moments(out)
    assert abs(cx - cx0) < 0.05 and abs(cy - cy0) < 0.05  # centred exactly: no half-pixel shift
    assert s / s0 == pytest.approx(2.0, rel=0.02)
    assert np.abs(rr.zoom_in(galaxy, 1.0).astype(int) - galaxy).max() <= 1  # factor 1: the same image


def test_zoom_out_halves_the_galaxy_onto_matching_sky(noisy_galaxy: np.ndarray) -> None:
    out = rr.zoom_out(noisy_galaxy, rr.image_rng(0, "zoom_out_2x", 7), 2.0)
    assert out.shape == noisy_galaxy.shape and out.dtype == np.uint8
    cx0, cy0, s0 = _moments(_galaxy(12.0))
    cx, cy, s = _moments(rr.zoom_out(_galaxy(12.0), rr.image_rng(0, "zoom_out_2x", 7), 2.0))
    assert abs(cx - cx0) < 0.05 and abs(cy - cy0) < 0.05
    assert s / s0 == pytest.approx(0.5, rel=0.03)
    # the surround (outside the downsampled 211 px centre) is sky of the original's colour and noise
    med0, sig0 = rr.sky_level(noisy_galaxy)
    med, sig = rr.sky_level(out, 60)
    np.testing.assert_allclose(med, med0, atol=1.0)
    np.testing.assert_allclose(sig, sig0, rtol=0.1)
    # inside the downsampled part, away from the galaxy, the noise lost to averaging was put back
    inner = out[110:140, 110:313].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(inner.std(axis=0), SKY_SIGMA, rtol=0.15)


def test_zoom_out_sky_noise_never_draws_stars() -> None:
    img = np.full((64, 64, 3), 10, np.uint8)
    img[0, :8] = 255  # a bright star in the border strip
    noise = rr.sky_noise(img, np.random.default_rng(0), (50, 50))
    assert noise.shape == (50, 50, 3) and np.all(noise == 0)


def test_blur_has_the_stated_psf_width() -> None:
    point = np.zeros((101, 101, 3), np.uint8)
    point[50, 50] = 255
    out = rr.gaussian_blur(point, 3.0).astype(np.float64)
    assert out.sum() == pytest.approx(3 * 255, rel=0.2)  # flux kept (to the rounding of faint wings)
    wide = rr.gaussian_blur(_galaxy(12.0), 3.0)
    assert _moments(wide)[2] ** 2 - _moments(_galaxy(12.0))[2] ** 2 == pytest.approx(9.0, abs=1.0)  # sigma^2 adds
    assert "0.072 petroR90_r" in rr.rendering("blur").description


def test_restretch_is_the_stated_formula() -> None:
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(2, axis=0)
    out = rr.restretch(ramp, 0.6, (1.1, 1.0, 0.9)).astype(np.int64)
    v = np.arange(256) / 255.0
    for c, gain in enumerate((1.1, 1.0, 0.9)):
        np.testing.assert_array_equal(out[0, :, c], np.clip(np.rint(255 * v**0.6 * gain), 0, 255))
    assert out[0, 255, 0] == 255  # a gain above 1 clips


def test_noise_has_the_stated_sigma_and_follows_the_seed() -> None:
    grey = np.full((200, 200, 3), 128, np.uint8)
    a = rr.add_noise(grey, rr.image_rng(3, "noise", 11), 8.0)
    np.testing.assert_allclose(a.reshape(-1, 3).std(axis=0), 8.0, rtol=0.05)
    np.testing.assert_array_equal(a, rr.add_noise(grey, rr.image_rng(3, "noise", 11), 8.0))
    assert not np.array_equal(a, rr.add_noise(grey, rr.image_rng(3, "noise", 12), 8.0))  # another galaxy
    assert not np.array_equal(a, rr.add_noise(grey, rr.image_rng(4, "noise", 11), 8.0))  # another seed


def test_renderings_are_deterministic_and_resaving_is_nearly_lossless(noisy_galaxy: np.ndarray) -> None:
    names = [r.name for r in rr.RENDERINGS]
    assert names == ["original", "zoom_in_2x", "zoom_out_2x", "blur", "jpeg_q10", "restretch", "noise"]
    for name in names:
        data = rr.render_jpeg(noisy_galaxy, name, 0, 587722981733826738)
        assert data == rr.render_jpeg(noisy_galaxy, name, 0, 587722981733826738), name
        assert rr.decode_jpeg(data).shape == noisy_galaxy.shape
    smooth = _galaxy(12.0)
    resaved = rr.decode_jpeg(rr.render_jpeg(smooth, "original", 0, 1)).astype(np.int64)
    q10 = rr.decode_jpeg(rr.render_jpeg(smooth, "jpeg_q10", 0, 1)).astype(np.int64)
    assert np.abs(resaved - smooth).max() <= 3 and np.abs(resaved - smooth).mean() < 0.5  # q95, no subsampling
    assert np.abs(q10 - smooth).max() >= 5
    noisy95 = rr.render_jpeg(noisy_galaxy, "original", 0, 1)
    assert len(rr.render_jpeg(noisy_galaxy, "jpeg_q10", 0, 1)) < len(noisy95) / 4


def test_render_to_files_writes_each_rendering(tmp_path: Path, galaxy: np.ndarray) -> None:
    src = tmp_path / "123.jpeg"
    src.write_bytes(rr.encode_jpeg(galaxy))
    targets = {"original": tmp_path / "a" / "123.jpeg", "blur": tmp_path / "b" / "123.jpeg"}
    written = rr.render_to_files(src, targets, 0, 123)
    assert written == targets
    assert written["blur"].read_bytes() == rr.render_jpeg(rr.read_image(src), "blur", 0, 123)


def test_bad_input_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected an \(H, W, 3\) uint8 colour image, got a float64"):
        rr.zoom_in(np.zeros((8, 8, 3)))
    with pytest.raises(DataError, match="shape"):
        rr.restretch(np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"rendering 'swirl': unknown; expected one of \['original'"):
        rr.rendering("swirl")
    with pytest.raises(DataError, match="zoom factor"):
        rr.zoom_out(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), 0.5)
    with pytest.raises(DataError, match="JPEG quality"):
        rr.encode_jpeg(np.zeros((8, 8, 3), np.uint8), 100)
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"image .*broken\.jpeg: cannot be read"):
        rr.render_to_files(bad, {"original": tmp_path / "o.jpeg"}, 0, 1)
    with pytest.raises(DataError, match="seed"):
        rr.image_rng(-1, "noise", 1)


def test_benchmark_skips_cleanly_without_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # else importing it would re-execute pytest
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = importlib.import_module("bench_domain_shift")
    assert bench.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out.md")]) == 0
    assert "SKIPPED: the GZ1 SDSS JPEG set is not at" in capsys.readouterr().out
    assert not (tmp_path / "out.md").exists()
