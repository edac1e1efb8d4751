"""How large a galaxy looks on its stamp, and reframing a stamp to a model's convention.

Galaxy Zoo framed every image by the galaxy's own size (the stamp side a fixed multiple of
``petroR90_r``); a classifier trained on such stamps expects the galaxy to fill the same
fraction of its input.  An image made another way (another pixel scale, a tighter or wider
cutout) breaks that.  :func:`extent` measures the galaxy on the image itself, without a
catalogue: the radius that holds 90% of the light of the source at the centre (a
Petrosian-like ``r90`` measured on the image), and :func:`reframe_fraction` turns the
ratio of that radius to the model's convention into the centre crop that restores it.

All functions take channels-last images ``(H, W, C)``, any pixel unit (the background and
its noise are measured on the image's border).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Threshold (in border-noise sigmas, after smoothing) of the pixels that belong to the
#: central source.
DETECT_SIGMA = 2.0
#: Fraction of the central source's light inside :func:`extent`'s radius.
LIGHT_FRACTION = 0.9
#: Reframing is left alone when the measured size is within this factor of the
#: convention (``predict --reframe auto``): a stamp framed as the training stamps were
#: stays exactly as the pipeline made it.  GZ1's own stamps scatter by about 1.3x around
#: their median (16th-84th percentile of r90: 0.21-0.34 of the side, median 0.26), so a
#: tighter tolerance reframes ordinary galaxies for their natural size.
AUTO_TOLERANCE = 1.6
#: ... and when it is more than this factor off: then the measurement, not the image, is
#: likely wrong (a neighbour or a bright star merged with the galaxy), and ``auto`` leaves
#: the stamp alone.
AUTO_LIMIT = 2.5
#: Centre crops are kept within these fractions of the image side (a crop above 1 pads the
#: image with sky).
CROP_LIMITS = (0.1, 3.0)


def _luminance(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 2:
        return x
    if x.ndim != 3:
        raise ValueError(f"expected an image (H, W) or (H, W, C), got shape {x.shape}")
    return x.mean(axis=2)


def extent(image: np.ndarray) -> float | None:
    """Radius in pixels holding 90% of the light of the source at the image centre.

    The image (mean over channels) is smoothed by a Gaussian of 1 pixel, the background
    and its noise are the median and 1.4826 MAD of the outer ring (5% of the side, at
    least 2 pixels); pixels above ``DETECT_SIGMA`` noise form sources, and the source
    that covers the centre (or the nearest within a tenth of the side) is measured: its
    background-subtracted light, accumulated outwards from the image centre.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` or ``(H, W, C)``, any unit.

    Returns
    -------
    float or None
        ``r90`` in pixels, or None when no source covers the centre (a blank or
        crowded image: no reframing is possible).
    """
    from scipy import ndimage

    lum = _luminance(image)
    h, w = lum.shape
    ring = max(2, round(0.05 * min(h, w)))
    border = np.concatenate([lum[:ring].ravel(), lum[-ring:].ravel(), lum[:, :ring].ravel(), lum[:, -ring:].ravel()])
    sky = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - sky)))
    smooth = ndimage.gaussian_filter(lum, 1.0) - sky
    noise = max(noise, 1e-3 * float(np.abs(smooth).max() or 1.0))
    labels, n = ndimage.label(smooth > DETECT_SIGMA * noise)
    if n == 0:
        return None
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    label = labels[round(cy), round(cx)]
    if label == 0:  # the centre pixel is not detected: the nearest source close to it
        ys, xs = np.nonzero(labels)
        d = np.hypot(ys - cy, xs - cx)
        k = int(np.argmin(d))
        if d[k] > 0.1 * min(h, w):
            return None
        label = labels[ys[k], xs[k]]
    ys, xs = np.nonzero(labels == label)
    flux = np.clip(lum[ys, xs] - sky, 0.0, None)
    total = flux.sum()
    if total <= 0:
        return None
    r = np.hypot(ys - cy, xs - cx)
    order = np.argsort(r)
    cum = np.cumsum(flux[order])
    k = int(np.searchsorted(cum, LIGHT_FRACTION * total))
    return float(max(r[order][min(k, len(r) - 1)], 0.5))


def convention(images: np.ndarray) -> dict[str, Any]:
    """The framing of a set of training stamps: their ``r90`` as a fraction of the side.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W, C)`` stamps as the network sees them.

    Returns
    -------
    dict
        ``r90_fraction`` (median of ``extent / side``), ``r90_fraction_p16``/``p84``,
        ``n_measured`` and ``n`` (stamps without a central source are left out).
    """
    x = np.asarray(images)
    side = min(x.shape[1], x.shape[2])
    values = [r / side for r in (extent(img) for img in x) if r is not None]
    if not values:
        return {"r90_fraction": None, "n_measured": 0, "n": len(x)}
    v = np.asarray(values)
    return {"r90_fraction": float(np.median(v)), "r90_fraction_p16": float(np.percentile(v, 16)),
            "r90_fraction_p84": float(np.percentile(v, 84)), "n_measured": len(v), "n": len(x),
            "light_fraction": LIGHT_FRACTION, "detect_sigma": DETECT_SIGMA}


def reframe_fraction(r90_px: float | None, view_px: float, model_convention: Mapping[str, Any] | None,
                     mode: str = "auto") -> float:
    """Factor by which to scale the centre crop so that the galaxy fills the model's convention.

    Parameters
    ----------
    r90_px : float or None
        :func:`extent` measured on the image region the model would see as it stands
        (``view_px`` pixels across).
    view_px : float
        Side of that region in the same pixels.
    model_convention : mapping or None
        The model's :func:`convention` (``model.json`` ``framing_measured``).
    mode : {"auto", "always", "off"}
        ``off``: 1. ``always``: the measured ratio.  ``auto``: the measured ratio
        only when the galaxy is more than :data:`AUTO_TOLERANCE` (and at most
        :data:`AUTO_LIMIT`) times too large or too small, else 1.

    Returns
    -------
    float
        Multiply the crop's side by this (> 1: a wider view, the galaxy was too large;
        clipped to ``CROP_LIMITS`` by the caller).
    """
    if mode not in ("auto", "always", "off"):
        raise ValueError(f"reframe mode must be auto, always or off, got {mode!r}")
    target = (model_convention or {}).get("r90_fraction")
    if mode == "off" or r90_px is None or not target:
        return 1.0
    factor = (r90_px / view_px) / float(target)
    if mode == "auto" and not math.log(AUTO_TOLERANCE) < abs(math.log(factor)) <= math.log(AUTO_LIMIT):
        return 1.0
    return factor
