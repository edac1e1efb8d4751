"""Re-render colour galaxy images as another survey, telescope or display might have made them.

Pure, deterministic functions on 8-bit colour images (``(H, W, 3)`` uint8 arrays, as a
JPEG decodes), used by ``benchmarks/bench_domain_shift.py`` to measure how a classifier
trained on Galaxy Zoo 1 SDSS JPEGs copes with images that differ from its training set
in framing, resolution, compression, display stretch and noise.  Every random draw comes
from :func:`image_rng`, seeded by ``(seed, rendering name, image key)``, so the same
inputs give the same bytes whatever order or process renders them in.

The renderings (:data:`RENDERINGS`), each applied to the full image and then saved as
JPEG (quality :data:`JPEG_QUALITY` without chroma subsampling, so that re-saving adds
almost nothing, unless the rendering is about JPEG):

``original``
    No change: only re-saved.
``zoom_in_2x``
    The central half upsampled 2x with Lanczos resampling: the galaxy twice as large.
``zoom_out_2x``
    The image downsampled 2x (Lanczos) in the centre of a canvas of the same size whose
    surround is sky: the median border colour plus noise drawn from the border's own
    residuals (the downsampled centre gets the noise that averaging removed, so the noise
    level is about the same everywhere): the galaxy half as large.
``blur``
    A Gaussian PSF of sigma :data:`BLUR_SIGMA_PX` pixels at 423 px.  GZ1 cut its images at
    :data:`GZ1_R90_PER_PIXEL` x petroR90_r arcsec per pixel (Lintott et al. 2008, MNRAS
    389, 1179, sect. 2; the convention of ``images.span_r90: 10.15`` = 423 x 0.024 in
    ``config/gz1-sdss-jpeg.yaml``), so the scale is per galaxy: sigma = 3 x 0.024 =
    0.072 petroR90_r (FWHM 0.17 petroR90_r).
``jpeg_q10``
    No change, saved at JPEG quality 10 with 4:2:0 chroma subsampling.
``restretch``
    Another display stretch: ``255 (v/255)^0.6`` per channel times colour gains
    (1.1, 1.0, 0.9) for (red, green, blue).
``noise``
    Gaussian noise of sigma 8 DN added to each channel of each pixel.

Results are rounded to the nearest integer and clipped to 0-255.
"""

from __future__ import annotations

import io
import math
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from galpipe.errors import DataError
from galpipe.io.atomic import atomic_write_bytes

#: Galaxy Zoo 1's pixel scale in units of the galaxy's petroR90_r (arcsec per pixel / petroR90_r arcsec).
GZ1_R90_PER_PIXEL = 0.024
#: The GZ1 JPEGs' side in pixels (the scale at which the pixel sizes below are stated).
GZ1_SIDE = 423
#: JPEG quality every rendering is saved at, except the one about JPEG quality.
JPEG_QUALITY = 95
#: Chroma subsampling of the re-saved JPEGs: none (4:4:4), so re-saving loses almost nothing and
#: what a rendering changed (colour noise included) reaches the classifier.
JPEG_SUBSAMPLING = "4:4:4"
#: Chroma subsampling of the ``jpeg_q10`` rendering: 4:2:0, what SkyServer's cutouts (the GZ1
#: originals) and most JPEG writers use.
LOW_QUALITY_SUBSAMPLING = "4:2:0"
#: Width in pixels of the border strip that measures the sky of :func:`zoom_out`.
SKY_BORDER = 8
#: Gaussian sigma of the ``blur`` PSF in pixels at :data:`GZ1_SIDE` px.
BLUR_SIGMA_PX = 3.0
#: Gaussian FWHM / sigma.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# --------------------------------------------------------------------------- helpers
def check_image(img: np.ndarray, name: str = "image") -> np.ndarray:
    """``img`` if it is an ``(H, W, 3)`` uint8 array of at least 2 x 2 pixels; else DataError naming it."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        what = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DataError(f"{name}: expected an (H, W, 3) uint8 colour image, got a {what}")
    if min(img.shape[:2]) < 2:
        raise DataError(f"{name}: image of {img.shape[1]} x {img.shape[0]} pixels is too small to re-render")
    return img


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer and clip to 0-255: any shape -> the same shape, uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check_factor(factor: float) -> float:
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1.0 <= factor <= 16.0:
        raise DataError(f"zoom factor: expected a number in [1, 16], got {factor!r}")
    return float(factor)


def image_rng(seed: int, rendering: str, key: int) -> np.random.Generator:
    """The random generator of one rendering of one image.

    Parameters
    ----------
    seed : int
        The run's seed (non-negative).
    rendering : str
        The rendering's name (hashed with CRC-32, stable across processes and runs).
    key : int
        What identifies the image, e.g. its objid (taken modulo 2**64).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed: expected a non-negative integer, got {seed!r}")
    entropy = [int(seed), zlib.crc32(rendering.encode("utf-8")), int(key) % 2**64]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _border_pixels(img: np.ndarray, border: int) -> np.ndarray:
    """The pixels of the strip of width ``border`` (at most a quarter of the shorter side) along the edges.

    Returns
    -------
    numpy.ndarray of float64, shape (n_pixels, C)
    """
    b = max(1, min(int(border), min(img.shape[:2]) // 4))
    mask = np.zeros(img.shape[:2], bool)
    mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = True, True, True, True
    return img[mask].astype(np.float64)


def sky_level(img: np.ndarray, border: int = SKY_BORDER) -> tuple[np.ndarray, np.ndarray]:
    """Sky colour and noise of an image, measured in a strip along its edges.

    Parameters
    ----------
    img : numpy.ndarray, shape (H, W, C)
        The image.
    border : int
        Width of the strip in pixels (at most a quarter of the shorter side is used).

    Returns
    -------
    median : numpy.ndarray of float64, shape (C,)
        Median of each channel in the strip.
    sigma : numpy.ndarray of float64, shape (C,)
        1.4826 x the median absolute deviation of each channel (the standard deviation of
        Gaussian noise; robust to the stars and galaxy wings that reach the strip).
    """
    strip = _border_pixels(img, border)
    med = np.median(strip, axis=0)
    return med, 1.4826 * np.median(np.abs(strip - med), axis=0)


def sky_noise(img: np.ndarray, rng: np.random.Generator, shape: tuple[int, int],
              border: int = SKY_BORDER) -> np.ndarray:
    """Sky-noise residuals like those of the border strip of ``img``, drawn for ``shape`` pixels.

    Each pixel gets the residual (pixel minus the strip's median colour) of a pixel of the
    strip drawn at random, so the noise keeps the sky's distribution per channel (its
    asymmetry where the display clips the sky at 0 included) and its correlation between
    the channels (a JPEG's sky noise is mostly in brightness, little in colour).  Pixels
    further than 5 robust sigma from the median in any channel (stars, galaxy wings) are
    never drawn.  Spatial correlation is not kept: the noise is white.

    Parameters
    ----------
    img : numpy.ndarray, shape (H, W, C)
    rng : numpy.random.Generator
    shape : (int, int)
        ``(rows, columns)`` of noise to draw.
    border : int
        Width of the strip in pixels.

    Returns
    -------
    numpy.ndarray of float64, shape (rows, columns, C)
        Residuals with median about 0 in each channel.
    """
    strip = _border_pixels(img, border)
    med, sigma = sky_level(img, border)
    res = strip - med
    keep = np.all(np.abs(res) <= 5.0 * np.maximum(sigma, 1.0), axis=1)
    res = res[keep] if keep.any() else np.zeros((1, img.shape[2]))
    return res[rng.integers(0, len(res), size=shape)]


def _resize(img: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Lanczos resampling of ``box`` (left, upper, right, lower; float pixels) of ``img`` to ``size`` (w, h)."""
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS, box=box))


# --------------------------------------------------------------------------- the transforms
def zoom_in(img: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """The central ``1/factor`` of the image, upsampled by ``factor`` (Lanczos) to the same size.

    The box is centred exactly on the image centre (float pixel edges), so the centre stays
    the centre and the magnification is exactly ``factor``.

    Parameters
    ----------
    img : numpy.ndarray of uint8, shape (H, W, 3)
    factor : float
        Magnification, in [1, 16].

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
    """
    check_image(img)
    f = _check_factor(factor)
    h, w = img.shape[:2]
    half_w, half_h = w / (2 * f), h / (2 * f)
    return _resize(img, (w, h), (w / 2 - half_w, h / 2 - half_h, w / 2 + half_w, h / 2 + half_h))


def _shrunk_side(side: int, factor: float) -> int:
    """Side of the downsampled image: at most ``side / factor`` and of the parity of ``side`` (exact centring)."""
    d = math.floor(side / factor)
    if (side - d) % 2:
        d -= 1
    return max(d, 1)


def zoom_out(img: np.ndarray, rng: np.random.Generator, factor: float = 2.0,
             border: int = SKY_BORDER) -> np.ndarray:
    """The image downsampled by ``factor`` in the centre of a same-size canvas of synthetic sky.

    The downsampled side ``d`` is the largest at most ``side / factor`` with ``side - d``
    even, and the resampled box (``factor * d`` pixels, centred on the image centre) keeps the
    scale exactly ``factor`` and the centre exactly at the centre.  The surround is the
    median colour of the border strip (:func:`sky_level`) plus noise drawn from the strip's
    own residuals (:func:`sky_noise`); the downsampled part, whose noise the averaging
    reduced, receives the missing part of that noise (scaled by ``sqrt(1 - (s_small /
    s)^2)`` per channel, ``s`` the robust sigma of the strip), so the sky noise is about the
    same inside and outside.

    Parameters
    ----------
    img : numpy.ndarray of uint8, shape (H, W, 3)
    rng : numpy.random.Generator
        Draws the noise (:func:`image_rng`).
    factor : float
        Demagnification, in [1, 16].
    border : int
        Width of the strip measuring the sky, in pixels of ``img`` (``border / factor`` in the
        downsampled image).

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
    """
    check_image(img)
    f = _check_factor(factor)
    h, w = img.shape[:2]
    dh, dw = _shrunk_side(h, f), _shrunk_side(w, f)
    bw, bh = f * dw / 2, f * dh / 2
    small = _resize(img, (dw, dh), (w / 2 - bw, h / 2 - bh, w / 2 + bw, h / 2 + bh)).astype(np.float64)
    sky, sigma = sky_level(img, border)
    _, sigma_small = sky_level(small.astype(np.uint8), max(1, round(border / f)))
    with np.errstate(divide="ignore", invalid="ignore"):
        missing = np.where(sigma > 0, np.sqrt(np.maximum(1.0 - (sigma_small / sigma) ** 2, 0.0)), 0.0)
    canvas = sky + sky_noise(img, rng, (h, w), border)
    top, left = (h - dh) // 2, (w - dw) // 2
    canvas[top:top + dh, left:left + dw] = small + missing * sky_noise(img, rng, (dh, dw), border)
    return to_uint8(canvas)


def gaussian_blur(img: np.ndarray, sigma_px: float = BLUR_SIGMA_PX) -> np.ndarray:
    """Convolve each channel with a Gaussian PSF of ``sigma_px`` pixels (``scipy.ndimage``, reflecting edges).

    Parameters
    ----------
    img : numpy.ndarray of uint8, shape (H, W, 3)
    sigma_px : float
        Standard deviation of the PSF in pixels (> 0).

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
    """
    check_image(img)
    if isinstance(sigma_px, bool) or not isinstance(sigma_px, int | float) or not 0 < sigma_px <= 100:
        raise DataError(f"blur sigma: expected a number of pixels in (0, 100], got {sigma_px!r}")
    out = ndimage.gaussian_filter(img.astype(np.float64), sigma=(sigma_px, sigma_px, 0), mode="reflect")
    return to_uint8(out)


def restretch(img: np.ndarray, gamma: float = 0.6,
              gains: tuple[float, float, float] = (1.1, 1.0, 0.9)) -> np.ndarray:
    """Another display stretch: ``255 * (v / 255) ** gamma * gain[channel]``.

    Parameters
    ----------
    img : numpy.ndarray of uint8, shape (H, W, 3)
    gamma : float
        Exponent (> 0; below 1 brightens faint light).
    gains : tuple of 3 float
        Multipliers of the red, green and blue channels (>= 0).

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
    """
    check_image(img)
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma <= 10:
        raise DataError(f"restretch gamma: expected a number in (0, 10], got {gamma!r}")
    g = np.asarray(gains, dtype=np.float64)
    if g.shape != (3,) or not np.all(np.isfinite(g)) or np.any(g < 0):
        raise DataError(f"restretch gains: expected 3 non-negative numbers (red, green, blue), got {gains!r}")
    return to_uint8(255.0 * (img / 255.0) ** gamma * g)


def add_noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    """Add Gaussian noise of ``sigma`` DN independently to every channel of every pixel.

    Parameters
    ----------
    img : numpy.ndarray of uint8, shape (H, W, 3)
    rng : numpy.random.Generator
        Draws the noise (:func:`image_rng`).
    sigma : float
        Standard deviation in DN (>= 0).

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
    """
    check_image(img)
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 <= sigma <= 255:
        raise DataError(f"noise sigma: expected a number of DN in [0, 255], got {sigma!r}")
    return to_uint8(img + sigma * rng.standard_normal(img.shape))


def encode_jpeg(img: np.ndarray, quality: int = JPEG_QUALITY, subsampling: str = JPEG_SUBSAMPLING) -> bytes:
    """JPEG bytes of ``img`` ``(H, W, 3)`` uint8 at ``quality`` (1-95) and chroma ``subsampling``
    (``"4:4:4"``, ``"4:2:2"`` or ``"4:2:0"``)."""
    check_image(img)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise DataError(f"JPEG quality: expected an integer in [1, 95], got {quality!r}")
    if subsampling not in ("4:4:4", "4:2:2", "4:2:0"):
        raise DataError(f"JPEG subsampling: expected '4:4:4', '4:2:2' or '4:2:0', got {subsampling!r}")
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 pixels of JPEG (or any Pillow-readable) bytes, as RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file's pixels as ``(H, W, 3)`` uint8 RGB; DataError naming the file if unreadable."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {path}: cannot be read as an image ({exc})") from exc


# --------------------------------------------------------------------------- the renderings
@dataclass(frozen=True)
class Rendering:
    """One way of re-rendering an image.

    Attributes
    ----------
    name : str
        Short name (a table row, a folder name).
    description : str
        What it does, in one line.
    transform : callable
        ``transform(img (H, W, 3) uint8, rng) -> (H, W, 3) uint8``.
    quality : int
        JPEG quality it is saved at.
    subsampling : str
        JPEG chroma subsampling it is saved with.
    """

    name: str
    description: str
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    quality: int = JPEG_QUALITY
    subsampling: str = JPEG_SUBSAMPLING


def _identity(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return check_image(img)


_BLUR_R90 = BLUR_SIGMA_PX * GZ1_R90_PER_PIXEL

#: Every rendering, in table order.
RENDERINGS: tuple[Rendering, ...] = (
    Rendering("original", f"none (re-saved at JPEG quality {JPEG_QUALITY})", _identity),
    Rendering("zoom_in_2x", "central half upsampled 2x (Lanczos): galaxy twice as large",
              lambda img, rng: zoom_in(img, 2.0)),
    Rendering("zoom_out_2x", "downsampled 2x (Lanczos) onto sky of the border's median colour and noise: "
                             "galaxy half as large", lambda img, rng: zoom_out(img, rng, 2.0)),
    Rendering("blur", f"Gaussian PSF sigma {BLUR_SIGMA_PX:g} px at {GZ1_SIDE} px = {_BLUR_R90:.3g} petroR90_r "
                      f"(FWHM {FWHM_PER_SIGMA * _BLUR_R90:.2g} petroR90_r)",
              lambda img, rng: gaussian_blur(img, BLUR_SIGMA_PX)),
    Rendering("jpeg_q10", f"re-compressed at JPEG quality 10 ({LOW_QUALITY_SUBSAMPLING})", _identity,
              quality=10, subsampling=LOW_QUALITY_SUBSAMPLING),
    Rendering("restretch", "gamma 0.6 per channel, colour gains (1.1, 1.0, 0.9)", lambda img, rng: restretch(img)),
    Rendering("noise", "Gaussian noise sigma 8 DN per channel", lambda img, rng: add_noise(img, rng, 8.0)),
)


def rendering(name: str) -> Rendering:
    """The rendering called ``name``; DataError listing the names otherwise."""
    for r in RENDERINGS:
        if r.name == name:
            return r
    raise DataError(f"rendering {name!r}: unknown; expected one of {[r.name for r in RENDERINGS]}")


def render_jpeg(img: np.ndarray, name: str, seed: int, key: int) -> bytes:
    """JPEG bytes of rendering ``name`` of ``img`` ``(H, W, 3)`` uint8; deterministic in (img, name, seed, key)."""
    r = rendering(name)
    return encode_jpeg(r.transform(check_image(img), image_rng(seed, name, key)), r.quality, r.subsampling)


def render_to_files(src: str | os.PathLike[str], targets: Mapping[str, str | os.PathLike[str]], seed: int,
                    key: int) -> dict[str, Path]:
    """Read the image ``src`` once and write each rendering ``name -> path`` of ``targets`` (atomically).

    Returns
    -------
    dict of str to pathlib.Path
        The files written, by rendering name.
    """
    img = check_image(read_image(src), str(src))
    return {name: atomic_write_bytes(path, render_jpeg(img, name, seed, key)) for name, path in targets.items()}
