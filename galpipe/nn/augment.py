"""Data augmentation on channels-last image batches ``(N, H, W, C)``.

Galaxy images have no preferred orientation, so the 8 symmetries of the square
(the dihedral group D4) are label-preserving.  Symmetry ``k`` in ``0..7`` is

    ``g_k = R^(k mod 4) . F^(k // 4)``

i.e. first an optional left-right mirror ``F`` (reverse the ``W`` axis, applied
when ``k >= 4``), then ``k mod 4`` counter-clockwise quarter turns ``R``
(:func:`numpy.rot90` on the ``(H, W)`` axes).  ``k = 0`` is the identity.
Channels are never mixed or reordered.

Optional small integer translations are circular (:func:`numpy.roll`
semantics): pixels leaving one edge re-enter at the opposite edge.  For
galaxy-centred cutouts the edges are sky background, so wrapping a few pixels
adds no artificial structure, and no fill value has to be invented.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from galpipe.errors import ConfigError, DataError

#: Number of elements of D4.
N_SYMMETRIES = 8


def _check_batch(x: np.ndarray, *, square: bool) -> None:
    if x.ndim != 4:
        raise DataError(f"expected a channels-last image batch (N, H, W, C), got shape {x.shape}")
    if square and x.shape[1] != x.shape[2]:
        raise DataError(
            f"rotations by 90 degrees need square images, got H x W = {x.shape[1]} x {x.shape[2]}"
        )


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < N_SYMMETRIES:
        raise ConfigError(f"dihedral symmetry index must be an integer in 0..7, got {k!r}")
    return int(k)


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """Apply symmetry ``k`` of the square to every image of a batch.

    Parameters
    ----------
    x : numpy.ndarray
        Images, shape ``(N, H, W, C)``; ``H == W`` unless ``k`` is 0, 2, 4 or 6.
    k : int
        Symmetry index in ``0..7`` (see the module docstring).

    Returns
    -------
    numpy.ndarray
        Transformed images, same shape and dtype, C-contiguous (a new array,
        except for ``k = 0`` which returns ``x`` itself).
    """
    k = _check_k(k)
    _check_batch(x, square=k % 2 == 1)
    if k == 0:
        return x
    out = x[:, :, ::-1, :] if k >= 4 else x
    out = np.rot90(out, k % 4, axes=(1, 2))
    return np.ascontiguousarray(out)


def dihedral_inverse(k: int) -> int:
    """Index of the inverse of symmetry ``k``: ``dihedral(dihedral(x, k), dihedral_inverse(k))
    == x``.

    Rotations invert to the opposite rotation; every mirror symmetry (``k >= 4``)
    is its own inverse.
    """
    k = _check_k(k)
    return (4 - k) % 4 if k < 4 else k


def dihedral_compose(a: int, b: int) -> int:
    """Index ``c`` with ``g_c = g_a . g_b`` (apply ``b`` first, then ``a``).

    Uses ``F R F = R^-1``: ``R^ra F^fa R^rb F^fb = R^(ra + (-1)^fa rb) F^(fa xor fb)``.
    """
    a, b = _check_k(a), _check_k(b)
    ra, fa = a % 4, a // 4
    rb, fb = b % 4, b // 4
    r = (ra + (-rb if fa else rb)) % 4
    return r + 4 * (fa ^ fb)


def random_augment(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    flips_rotations: bool = True,
    max_shift: int = 0,
) -> np.ndarray:
    """Apply an independent random D4 symmetry and shift to every image.

    Samples sharing the same symmetry are transformed together (at most 8
    vectorised calls); shifts are one vectorised gather.

    Parameters
    ----------
    x : numpy.ndarray
        Images, shape ``(N, H, W, C)`` (square when ``flips_rotations``).
    rng : numpy.random.Generator
        Source of randomness: ``N`` symmetry indices are drawn first (only when
        ``flips_rotations``), then ``2N`` shifts (only when ``max_shift > 0``).
    flips_rotations : bool
        Draw a uniformly random symmetry of the square per image.
    max_shift : int
        Largest circular translation in pixels along each of ``H`` and ``W``;
        each image gets independent integer shifts uniform in
        ``-max_shift..max_shift``.

    Returns
    -------
    numpy.ndarray
        Augmented copy, same shape and dtype as ``x`` (``x`` is not modified).
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int | np.integer):
        raise ConfigError(f"max_shift must be a non-negative integer, got {max_shift!r}")
    if max_shift < 0:
        raise ConfigError(f"max_shift must be a non-negative integer, got {max_shift}")
    _check_batch(x, square=flips_rotations)
    n, h, w = x.shape[:3]
    if max_shift >= min(h, w):
        raise ConfigError(f"max_shift={max_shift} must be smaller than the image side {min(h, w)}")
    out = x
    if flips_rotations:
        ks = rng.integers(0, N_SYMMETRIES, size=n)
        out = np.empty_like(x)
        for k in np.unique(ks):
            sel = ks == k
            out[sel] = dihedral(x[sel], int(k))
    if max_shift > 0:
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        rows = (np.arange(h)[None, :] - shifts[:, :1]) % h  # (N, H)
        cols = (np.arange(w)[None, :] - shifts[:, 1:]) % w  # (N, W)
        out = out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if out is x:
        out = x.copy()
    return out


# --------------------------------------------------------------------------- rendering
# How an image was made (pixel scale and framing, seeing, noise, display stretch, JPEG
# compression) varies between surveys, cutout services and users; a classifier trained on
# one rendering should not depend on it.  ``random_render`` varies each at random.


@dataclass(frozen=True)
class RenderSpec:
    """Random changes of how a training image was made (the ``training.rendering`` config).

    Every range is ``(low, high)``; None switches that change off.

    Attributes
    ----------
    probability : float
        Chance that each enabled change is applied to an image (drawn independently per
        image and per change).
    zoom : (float, float) or None
        Apparent-size factor, log-uniform: 2 makes the galaxy twice as large (the central
        half of the stamp fills it), 0.5 half as large (the stamp shrinks into the centre
        and the new border is sky: the border's median plus noise of the border's spread).
    blur_sigma : (float, float) or None
        Extra Gaussian PSF, sigma in pixels, uniform.
    noise_sigma : (float, float) or None
        Gaussian pixel noise, sigma in normalised pixel units (8-bit images: 1 = 255 DN), uniform.
    gamma : (float, float) or None
        Display stretch ``x -> x**gamma`` of positive pixels, log-uniform.
    colour_gain : float or None
        Per-channel gain ``exp(N(0, colour_gain))``.
    jpeg_quality : (int, int) or None
        JPEG re-compression at a quality uniform in the range (8-bit images only: the
        values must be display values in 0..1).
    """

    probability: float = 0.5
    zoom: tuple[float, float] | None = None
    blur_sigma: tuple[float, float] | None = None
    noise_sigma: tuple[float, float] | None = None
    gamma: tuple[float, float] | None = None
    colour_gain: float | None = None
    jpeg_quality: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RenderSpec:
        """From the (schema-validated) ``training.rendering`` mapping."""
        d = dict(d or {})

        def pair(key: str) -> tuple[float, float] | None:
            v = d.get(key)
            if v is None:
                return None
            lo, hi = (float(t) for t in v)
            if lo > hi:
                raise ConfigError(f"training.rendering.{key}: low {lo:g} is above high {hi:g}")
            return lo, hi

        q = pair("jpeg_quality")
        gain = d.get("colour_gain")
        return cls(probability=float(d.get("probability", 0.5)), zoom=pair("zoom"),
                   blur_sigma=pair("blur_sigma"), noise_sigma=pair("noise_sigma"), gamma=pair("gamma"),
                   colour_gain=None if gain is None else float(gain),
                   jpeg_quality=None if q is None else (int(q[0]), int(q[1])))

    @property
    def enabled(self) -> bool:
        """Whether any change is switched on (with a non-zero probability)."""
        on = (self.zoom, self.blur_sigma, self.noise_sigma, self.gamma, self.colour_gain, self.jpeg_quality)
        return self.probability > 0 and any(v is not None for v in on)


def _tent_matrix(n_out: int, n_in: int, zoom: float, sigma: float) -> np.ndarray:
    """Resampling matrix ``(n_out, n_in + 1)`` of one axis: zoom about the centre, then blur.

    Output pixel ``i`` samples the input at ``c + (i - c) / zoom`` (``c`` the centre) with a
    tent kernel widened to ``1 / zoom`` when shrinking (no aliasing), then a Gaussian of
    ``sigma`` output pixels.  Rows sum to one; the last column holds the weight that
    falls outside the input (to be filled with sky).
    """
    c_out, c_in = (n_out - 1) / 2.0, (n_in - 1) / 2.0
    pos = c_in + (np.arange(n_out) - c_out) / zoom  # (n_out,) sample positions in input pixels
    support = max(1.0, 1.0 / zoom)
    reach = int(np.ceil(support)) + 1
    base = np.floor(pos).astype(int)
    idx = base[:, None] + np.arange(-reach + 1, reach + 1)[None, :]  # (n_out, 2*reach)
    w = np.maximum(0.0, 1.0 - np.abs(idx - pos[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    m = np.zeros((n_out, n_in + 1))
    inside = (idx >= 0) & (idx < n_in)
    rows = np.broadcast_to(np.arange(n_out)[:, None], idx.shape)
    np.add.at(m, (rows[inside], idx[inside]), w[inside])
    m[:, n_in] = 1.0 - m[:, :n_in].sum(axis=1)
    if sigma > 0:
        t = np.arange(n_out)
        g = np.exp(-0.5 * ((t[:, None] - t[None, :]) / sigma) ** 2)
        g /= g.sum(axis=1, keepdims=True)  # renormalised at the edges
        m = g @ m
    return m


def sky_level(x: np.ndarray, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and noise of each image from its border ring.

    Parameters
    ----------
    x : numpy.ndarray
        Images ``(N, H, W, C)``.
    width : int
        Ring width in pixels.

    Returns
    -------
    (level, sigma) : tuple of numpy.ndarray
        ``(N, C)`` median and robust standard deviation (1.4826 MAD) of the ring.
    """
    n, h, w, c = x.shape
    ring = np.concatenate([x[:, :width].reshape(n, -1, c), x[:, h - width:].reshape(n, -1, c),
                           x[:, :, :width].reshape(n, -1, c), x[:, :, w - width:].reshape(n, -1, c)], axis=1)
    level = np.median(ring, axis=1)
    sigma = 1.4826 * np.median(np.abs(ring - level[:, None, :]), axis=1)
    return level, sigma


def resample(x: np.ndarray, zoom: np.ndarray, blur: np.ndarray, rng: np.random.Generator | None = None,
             *, out_size: int | None = None) -> np.ndarray:
    """Zoom each image about its centre and blur it; the area left uncovered is sky.

    Parameters
    ----------
    x : numpy.ndarray
        Images ``(N, H, W, C)``, square.
    zoom : numpy.ndarray
        ``(N,)`` apparent-size factors (> 0; 1 keeps the scale).
    blur : numpy.ndarray
        ``(N,)`` Gaussian sigma in output pixels (0: none).
    rng : numpy.random.Generator, optional
        Noise for the sky fill (its sigma from the border ring, scaled by the uncovered
        weight); None fills with the sky level only.
    out_size : int, optional
        Output side (default the input side).

    Returns
    -------
    numpy.ndarray
        ``(N, out_size, out_size, C)`` in ``x``'s dtype.
    """
    _check_batch(x, square=True)
    n, h, _, c = x.shape
    size = h if out_size is None else int(out_size)
    level, sigma = sky_level(x)
    mats = np.stack([_tent_matrix(size, h, float(zoom[i]), float(blur[i])) for i in range(n)])  # (N, S, H+1)
    a = mats[:, :, :h].astype(np.float32)
    outside = mats[:, :, h]  # (N, S)
    inner = np.matmul(a, x.reshape(n, h, -1).astype(np.float32, copy=False)).reshape(n, size, h, c)
    out = np.matmul(a[:, None], inner)  # (N, S, S, C): rows then columns
    fill = 1.0 - (1.0 - outside)[:, :, None] * (1.0 - outside)[:, None, :]  # (N, S, S) weight outside
    out += (fill[..., None] * level[:, None, None, :]).astype(np.float32)
    if rng is not None:
        for i in np.flatnonzero(fill.max(axis=(1, 2)) > 1e-6):
            noise = rng.standard_normal((size, size, c)) * sigma[i][None, None, :]
            out[i] += (fill[i][..., None] * noise).astype(np.float32)
    return out.astype(x.dtype, copy=False)


def jpeg_roundtrip(x: np.ndarray, quality: int) -> np.ndarray:
    """One image ``(H, W, C)`` of display values in 0..1 (C = 1 or 3) through JPEG at ``quality``."""
    from PIL import Image

    u8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(u8[:, :, 0] if x.shape[2] == 1 else u8)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / np.float32(255.0)
    return back.reshape(x.shape)


def random_render(x: np.ndarray, rng: np.random.Generator, spec: RenderSpec, *,
                  display: bool = False) -> np.ndarray:
    """Vary how each image was made, at random (see :class:`RenderSpec`).

    Order, as an image is made: zoom and blur (one resampling), noise, colour gain and
    stretch, JPEG.  Random numbers are drawn for every image and every enabled change
    whether or not it is applied, so the stream does not depend on ``probability``.

    Parameters
    ----------
    x : numpy.ndarray
        Images ``(N, H, W, C)``, square.
    rng : numpy.random.Generator
        Source of randomness.
    spec : RenderSpec
        The changes and their ranges.
    display : bool
        The pixels are display values in 0..1 (8-bit images): results are clipped to
        0..1, and JPEG re-compression is allowed.

    Returns
    -------
    numpy.ndarray
        New array, same shape and dtype as ``x``.

    Raises
    ------
    ConfigError
        ``jpeg_quality`` set for images that are not display values, or with C not 1 or 3.
    """
    _check_batch(x, square=True)
    n, _, _, c = x.shape
    if spec.jpeg_quality is not None and (not display or c not in (1, 3)):
        raise ConfigError("training.rendering.jpeg_quality needs 8-bit display images with 1 or 3 channels "
                          f"(these are {'display values' if display else 'not display values (flux)'}, {c} channels)")
    p = spec.probability

    def draw(rng_pair: tuple[float, float] | None, log: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        if rng_pair is None:
            return None
        on = rng.random(n) < p
        lo, hi = rng_pair
        v = np.exp(rng.uniform(np.log(lo), np.log(hi), n)) if log else rng.uniform(lo, hi, n)
        return on, v

    zoom = draw(spec.zoom, log=True)
    blur = draw(spec.blur_sigma)
    noise = draw(spec.noise_sigma)
    gamma = draw(spec.gamma, log=True)
    gain = None
    if spec.colour_gain is not None:
        gain = rng.random(n) < p, np.exp(rng.normal(0.0, spec.colour_gain, (n, c)))
    quality = None
    if spec.jpeg_quality is not None:
        quality = rng.random(n) < p, rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1, n)
    out = x.astype(np.float32, copy=True)
    z = np.where(zoom[0], zoom[1], 1.0) if zoom else np.ones(n)
    s = np.where(blur[0], blur[1], 0.0) if blur else np.zeros(n)
    geo = (z != 1.0) | (s > 0)
    if geo.any():
        out[geo] = resample(out[geo], z[geo], s[geo], rng)
    if noise is not None:
        sel = noise[0]
        out[sel] += (rng.standard_normal(out[sel].shape) * noise[1][sel][:, None, None, None]).astype(np.float32)
    if gain is not None:
        sel = gain[0]
        out[sel] *= gain[1][sel][:, None, None, :].astype(np.float32)
    if gamma is not None:
        for i in np.flatnonzero(gamma[0]):
            pos = np.maximum(out[i], 0.0)
            out[i] = np.where(out[i] > 0, pos ** np.float32(gamma[1][i]), out[i])
    if display:
        np.clip(out, 0.0, 1.0, out=out)
    if quality is not None:
        for i in np.flatnonzero(quality[0]):
            out[i] = jpeg_roundtrip(out[i], int(quality[1][i]))
    return out.astype(x.dtype, copy=False)
