"""SDSS imaging constants shared by the simulated and the live SDSS sources.

All fluxes in galpipe are in SDSS *nanomaggies*: ``mag = 22.5 - 2.5 log10(flux)``
(AB-like; SDSS u and z are offset from AB by about -0.04 and +0.02 mag, ignored
here).  The numbers below are typical values of the SDSS imaging camera (DR7
field documentation, camcol averages); they are used to give simulated frames a
realistic background noise, and to predict the per-pixel noise of a calibrated,
sky-subtracted SDSS ``frame`` cutout.

=====  ===========  ============  ===========  ==============  ======================
band   sky          gain          dark var.    nmgy per DN     sigma per 0.396" pixel
       mag/arcsec²  e-/DN         DN²          (calibration)   (nanomaggies, derived)
=====  ===========  ============  ===========  ==============  ======================
u      22.1         1.65          10.0         0.0101          ~0.049
g      21.9         3.85          1.3          0.0039          ~0.017
r      20.9         4.72          1.35         0.0052          ~0.028
i      20.2         5.15          5.8          0.0067          ~0.044
z      19.0         4.62          2.6          0.0300          ~0.17
=====  ===========  ============  ===========  ==============  ======================

The per-pixel noise of a sky-subtracted frame is (Poisson noise of the sky
electrons plus the dark/read variance, converted back to nanomaggies)::

    sky_dn = sky_nmgy / nmgy_per_dn
    sigma_nmgy = nmgy_per_dn * sqrt(sky_dn / gain + dark_variance)

with ``sky_nmgy = 10**(-0.4 (mu_sky - 22.5)) * pixel_scale**2``; see
:func:`pixel_noise_sigma`.  Exposures are drift scans of 53.907456 s per band.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from galpipe.errors import ConfigError

#: The five SDSS bands, blue to red.
SDSS_BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z")
#: Arcsec per pixel of the SDSS imaging camera.
PIXEL_SCALE: float = 0.396
#: Magnitude of a source of 1 nanomaggy.
NMGY_ZEROPOINT: float = 22.5
#: Effective exposure time of one SDSS drift scan (s).
EXPOSURE_TIME_S: float = 53.907456
#: Typical dark-sky surface brightness (mag/arcsec²).
SKY_MAG_ARCSEC2: dict[str, float] = {"u": 22.1, "g": 21.9, "r": 20.9, "i": 20.2, "z": 19.0}
#: CCD gain (electrons per DN), averaged over the six camera columns.
GAIN: dict[str, float] = {"u": 1.65, "g": 3.85, "r": 4.72, "i": 5.15, "z": 4.62}
#: Dark current plus read-noise variance per pixel (DN²), camcol averages.
DARK_VARIANCE: dict[str, float] = {"u": 10.0, "g": 1.3, "r": 1.35, "i": 5.8, "z": 2.6}
#: Photometric calibration: nanomaggies per DN of a 53.9 s exposure (``NMGY`` of frames).
NMGY_PER_DN: dict[str, float] = {"u": 0.0101, "g": 0.0039, "r": 0.0052, "i": 0.0067, "z": 0.0300}


def validate_bands(bands: Sequence[str], *, key: str = "bands") -> tuple[str, ...]:
    """Check that ``bands`` is a non-empty list of distinct SDSS bands; keep its order.

    Raises
    ------
    ConfigError
        Naming ``key`` if a band is unknown, repeated, or the list is empty.
    """
    if isinstance(bands, str) or not isinstance(bands, Sequence):
        raise ConfigError(f"{key}: expected a list of SDSS bands from {SDSS_BANDS}, got {bands!r}")
    out = tuple(bands)
    if not out:
        raise ConfigError(f"{key}: expected at least one band from {SDSS_BANDS}, got []")
    for b in out:
        if b not in SDSS_BANDS:
            raise ConfigError(f"{key}: unknown band {b!r}; expected bands from {SDSS_BANDS}")
    if len(set(out)) != len(out):
        raise ConfigError(f"{key}: band listed twice in {list(out)}")
    return out


def mag_to_nmgy(mag: np.ndarray | float) -> np.ndarray:
    """Convert magnitudes to fluxes in nanomaggies (any shape, float64)."""
    return np.power(10.0, -0.4 * (np.asarray(mag, dtype=np.float64) - NMGY_ZEROPOINT))


def nmgy_to_mag(flux: np.ndarray | float) -> np.ndarray:
    """Convert nanomaggies to magnitudes (any shape); non-positive fluxes give NaN."""
    f = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = NMGY_ZEROPOINT - 2.5 * np.log10(f)
    return np.where(f > 0, out, np.nan)


def sky_nmgy_per_pixel(band: str, pixel_scale: float = PIXEL_SCALE) -> float:
    """Sky level of ``band`` in nanomaggies per pixel of ``pixel_scale`` arcsec."""
    return float(mag_to_nmgy(SKY_MAG_ARCSEC2[band])) * pixel_scale**2


def pixel_noise_sigma(band: str, pixel_scale: float = PIXEL_SCALE) -> float:
    """Per-pixel noise (nanomaggies) of an empty, sky-subtracted ``band`` frame.

    Sky Poisson noise plus dark/read variance, at the SDSS depth (one 53.9 s
    exposure), for pixels of ``pixel_scale`` arcsec.
    """
    c = NMGY_PER_DN[band]
    sky_dn = sky_nmgy_per_pixel(band, pixel_scale) / c
    return float(c * np.sqrt(sky_dn / GAIN[band] + DARK_VARIANCE[band]))


#: Softening parameters ``b`` of SDSS asinh magnitudes (luptitudes), per band.
ASINH_SOFTENING: dict[str, float] = {
    "u": 1.4e-10,
    "g": 0.9e-10,
    "r": 1.2e-10,
    "i": 1.8e-10,
    "z": 7.4e-10,
}


def asinh_mag(flux: np.ndarray | float, band: str) -> np.ndarray:
    """SDSS asinh magnitude (luptitude) of ``flux`` nanomaggies in ``band``.

    Equal to ``22.5 - 2.5 log10(flux)`` for bright sources, finite for zero or
    negative measured fluxes (as in the SDSS ``PhotoObj`` magnitudes).
    """
    b = ASINH_SOFTENING[band]
    f = np.asarray(flux, dtype=np.float64) * 1e-9  # in units of the AB zero point (3631 Jy)
    return -(2.5 / np.log(10.0)) * (np.arcsinh(f / (2.0 * b)) + np.log(b))


def asinh_mag_err(flux: np.ndarray | float, flux_err: np.ndarray | float, band: str) -> np.ndarray:
    """1-sigma error of :func:`asinh_mag` for a flux error ``flux_err`` (nanomaggies)."""
    b = ASINH_SOFTENING[band]
    f = np.asarray(flux, dtype=np.float64) * 1e-9
    df = np.asarray(flux_err, dtype=np.float64) * 1e-9
    return (2.5 / np.log(10.0)) * df / np.sqrt(f**2 + 4.0 * b**2)
