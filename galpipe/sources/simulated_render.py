"""GalSim rendering of the simulated survey's galaxies (imported on first use).

Split from :mod:`galpipe.sources.simulated` so that reading a config, building
the DAG or a catalogue never imports GalSim (about a second): only making
cutouts does.  The model is described in :mod:`galpipe.sources.simulated`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import galsim
import numpy as np

from galpipe.errors import ConfigError, DataError
from galpipe.sources.sdss_photometry import (
    DARK_VARIANCE,
    GAIN,
    NMGY_PER_DN,
    PIXEL_SCALE,
    SDSS_BANDS,
    sky_nmgy_per_pixel,
    validate_bands,
)
from galpipe.sources.simulated import (
    _ARM_CLUMP_SIZE,
    _ARM_CLUMPINESS,
    _ARM_MAX_GRID,
    _ARM_SHARPNESS,
    _B1,
    _SERSIC_TRUNC,
    SIMULATED_CLASSES,
    _check_seed,
    _is_number,
)


# --------------------------------------------------------------------------- rendering
def _get(row: Mapping[str, Any], key: str) -> Any:
    try:
        return row[key]
    except (KeyError, IndexError):
        oid = row.get("objid", "?") if hasattr(row, "get") else "?"
        raise DataError(
            f"catalogue row objid={oid}: missing column {key!r} needed to render the galaxy "
            "(use a catalogue made by simulate_catalogue with these bands)"
        ) from None


def _incline(prof: galsim.GSObject, q: float, beta: galsim.Angle) -> galsim.GSObject:
    """Squash ``prof`` along y by ``q`` (major axis unchanged), then orient it to ``beta``."""
    if q >= 0.9999:
        return prof
    return prof.dilate(math.sqrt(q)).shear(q=q, beta=beta)


def _smooth_field(shape: tuple[int, int], sigma_pix: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field smoothed by a Gaussian of ``sigma_pix``."""
    white = rng.standard_normal(shape)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_pix) ** 2 * (kx**2 + ky**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape)
    std = field.std()
    return field / std if std > 0 else field


def _arm_image(row: Mapping[str, Any], pixel_scale: float, rng: np.random.Generator) -> galsim.InterpolatedImage:
    """Face-on spiral-arm light (logarithmic spiral x exponential disc x clumps)."""
    hlr = _num(row, "hlr_disc", 0.0, 1000.0)
    rs = hlr / _B1  # exponential scale length
    radius = 3.5 * hlr
    step = pixel_scale / 2.0
    m = int(2 * math.ceil(radius / step))
    if m > _ARM_MAX_GRID:
        m = _ARM_MAX_GRID
        step = 2.0 * radius / m
    m = max(m, 32)
    coords = (np.arange(m) - (m - 1) / 2.0) * step
    x, y = np.meshgrid(coords, coords)
    r = np.hypot(x, y)
    theta = np.arctan2(y, x)
    n_arms = int(_num(row, "n_arms", 0.0, 100.0))
    tan_pitch = math.tan(math.radians(_num(row, "pitch_deg", 0.0, 89.0)))
    phase = math.radians(_num(row, "arm_phase_deg"))
    sign = -1.0 if _num(row, "arm_sign") < 0 else 1.0
    spiral = n_arms * (theta - sign * np.log(np.maximum(r, 1e-3 * rs) / rs) / tan_pitch - phase)
    arms = ((1.0 + np.cos(spiral)) / 2.0) ** _ARM_SHARPNESS
    inner = 1.0 - np.exp(-((r / (0.7 * rs)) ** 2))  # the arms start outside the bulge
    envelope = np.exp(-r / (1.15 * rs))
    clumps = np.exp(_ARM_CLUMPINESS * _smooth_field((m, m), _ARM_CLUMP_SIZE / step, rng) - 0.5 * _ARM_CLUMPINESS**2)
    img = envelope * inner * arms * clumps
    return galsim.InterpolatedImage(
        galsim.Image(np.ascontiguousarray(img), scale=step),
        flux=1.0,
        x_interpolant="lanczos3",
        pad_factor=2,
        calculate_stepk=False,
        calculate_maxk=False,
    )


def _num(row: Mapping[str, Any], key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``row[key]`` as a float in ``(lo, hi]`` (``lo`` excluded unless infinite)."""
    value = _get(row, key)
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or not (lo < v <= hi):
        raise DataError(
            f"catalogue row objid={row.get('objid', '?')}: {key}={value!r}; "
            f"expected a finite number in ({lo}, {hi}]"
        )
    return v


def _components(
    row: Mapping[str, Any], pixel_scale: float, rng: np.random.Generator
) -> dict[str, galsim.GSObject]:
    """Unit-flux GalSim profiles of the galaxy's light components (no PSF)."""
    label = str(_get(row, "label"))
    if label not in SIMULATED_CLASSES:
        raise DataError(
            f"catalogue row objid={_get(row, 'objid')}: label {label!r} is not one of "
            f"{list(SIMULATED_CLASSES)}"
        )
    beta = (90.0 + _num(row, "pa_deg")) * galsim.degrees  # PA east of north
    comps: dict[str, galsim.GSObject] = {}
    spheroids = [("bulge", "hlr_bulge", "bulge_frac")]
    if label == "elliptical":
        spheroids.append(("envelope", "hlr_envelope", "envelope_frac"))
    for name, hlr_key, frac_key in spheroids:
        if _num(row, frac_key) <= 0:
            continue
        hlr = _num(row, hlr_key, 0.0, 1000.0)
        prof = galsim.Sersic(
            _num(row, "n_bulge", 0.3, 6.2),
            half_light_radius=hlr,
            trunc=_SERSIC_TRUNC * hlr,
            flux=1.0,
        )
        comps[name] = _incline(prof, _num(row, "q_bulge", 0.0, 1.0), beta)
    if label == "spiral":
        q = _num(row, "q", 0.0, 1.0)
        disc = galsim.Exponential(half_light_radius=_num(row, "hlr_disc", 0.0, 1000.0))
        comps["disc"] = _incline(disc, q, beta)
        if _num(row, "arm_frac") > 0:
            comps["arms"] = _incline(_arm_image(row, pixel_scale, rng), q, beta)
    elif label == "edge_on":
        disc = galsim.InclinedExponential(
            _num(row, "inclination_deg", -1e-9, 90.0) * galsim.degrees,
            half_light_radius=_num(row, "hlr_disc", 0.0, 1000.0),
            scale_h_over_r=_num(row, "disc_h_over_r", 0.0, 2.0),
        )
        comps["disc"] = disc.rotate(beta)
    return comps


def _add_sdss_noise(image: np.ndarray, band: str, pixel_scale: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (source + sky) and dark/read noise of an SDSS frame; sky subtracted.

    ``image`` (nanomaggies, shape ``(ny, nx)``) -> noisy image of the same shape.
    """
    c = NMGY_PER_DN[band]
    gain = GAIN[band]
    sky = sky_nmgy_per_pixel(band, pixel_scale)
    electrons = rng.poisson(np.clip(image + sky, 0.0, None) * (gain / c))
    dn = electrons / gain + rng.normal(0.0, math.sqrt(DARK_VARIANCE[band]), image.shape)
    return dn * c - sky


def _check_size(size: object) -> int:
    if not isinstance(size, int | np.integer) or isinstance(size, bool) or not 8 <= size <= 1024:
        raise ConfigError(f"size: expected an integer cutout side in 8..1024 pixels, got {size!r}")
    return int(size)


def render_galaxy(
    row: Mapping[str, Any],
    *,
    bands: Sequence[str],
    size: int,
    seed: int,
    pixel_scale: float = PIXEL_SCALE,
    noise: bool = True,
) -> np.ndarray:
    """Render one catalogue galaxy as an SDSS-like multi-band stamp.

    Parameters
    ----------
    row : mapping
        A row of :func:`simulate_catalogue` (``pandas.Series`` or dict) with
        the truth columns and ``flux_<comp>_<band>`` for every band requested.
    bands : sequence of str
        Bands to render, in output order.
    size : int
        Stamp side in pixels; the galaxy is at the stamp's centre
        (``((size - 1) / 2, (size - 1) / 2)`` in 0-based pixel coordinates,
        the reference pixel of :func:`galpipe.io.cutout_fits.tan_wcs`).
    seed : int
        Survey seed; with ``row['objid']`` it fixes every random number used
        (arm clumps, noise), independently of any other galaxy and of the
        other bands requested.
    pixel_scale : float
        Arcsec per pixel.
    noise : bool
        Add sky-subtracted Poisson + read noise (``False``: the noiseless,
        PSF-convolved model).

    Returns
    -------
    numpy.ndarray
        float32 nanomaggies per pixel, shape ``(len(bands), size, size)``.

    Raises
    ------
    DataError
        A column needed for rendering is missing or the label is unknown.
    ConfigError
        Bad ``bands``, ``size``, ``seed`` or ``pixel_scale``.
    """
    bands = validate_bands(bands)
    size = _check_size(size)
    seed = _check_seed(seed)
    if not _is_number(pixel_scale) or not 0 < float(pixel_scale) <= 10:
        raise ConfigError(f"pixel_scale: expected arcsec per pixel in (0, 10], got {pixel_scale!r}")
    pixel_scale = float(pixel_scale)
    key = int(_get(row, "objid")) % 2**63
    # independent streams: 0 for the galaxy's structure, 1 + SDSS band index for each
    # band's noise, so a band's pixels do not depend on which other bands are drawn
    image = np.zeros((len(bands), size, size), dtype=np.float64)
    try:
        comps = _components(row, pixel_scale, np.random.default_rng([seed, key, 0]))
        psf = galsim.Kolmogorov(fwhm=_num(row, "psf_fwhm", 0.0, 100.0))
        for name, prof in comps.items():
            fluxes = np.array([float(_get(row, f"flux_{name}_{b}")) for b in bands])
            if not np.any(fluxes):
                continue
            stamp = galsim.Convolve(prof, psf).drawImage(
                nx=size, ny=size, scale=pixel_scale, dtype=np.float64
            )
            image += fluxes[:, None, None] * stamp.array[None, :, :]
    except galsim.GalSimError as exc:
        raise DataError(
            f"catalogue row objid={_get(row, 'objid')}: GalSim cannot render it ({exc}); "
            "expected positive radii and PSF FWHM and axis ratios in (0, 1]"
        ) from exc
    if not np.all(np.isfinite(image)):
        raise DataError(
            f"catalogue row objid={_get(row, 'objid')}: non-finite pixels; "
            "expected finite fluxes and shape parameters"
        )
    if noise:
        for k, b in enumerate(bands):
            band_rng = np.random.default_rng([seed, key, 1 + SDSS_BANDS.index(b)])
            image[k] = _add_sdss_noise(image[k], b, pixel_scale, band_rng)
    return image.astype(np.float32)


