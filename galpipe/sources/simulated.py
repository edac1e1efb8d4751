"""The offline simulated survey: SDSS-like galaxies rendered with GalSim.

This is galpipe's default source, so that the whole pipeline runs without
network.  To the rest of the pipeline it looks like SDSS: a catalogue with
``objid``/``ra``/``dec`` and ``PhotoObj``-style measured columns, and cutouts in
nanomaggies on 0.396" pixels with SDSS-like seeing and noise.

Model (all numbers are module constants, documented where they are defined)
---------------------------------------------------------------------------
Classes (:data:`SIMULATED_CLASSES`):

* ``elliptical``: a truncated Sersic spheroid, n = 3-6 (mostly ~4), axis ratio
  ``q`` 0.6-1, red colours (g-r ~0.78, r-i ~0.40), drawn as a core (0.7 R_e,
  redder) plus an envelope (1.4 R_e, bluer by 0.03-0.10 in g-r): a weak colour
  gradient as in real ellipticals.  12 % are bluer (recent star formation).
* ``spiral``: Sersic bulge (n = 2-4, B/T 0.03-0.7, mean 0.24, red) + smooth
  exponential disc (g-r ~0.60) + spiral arms (g-r ~0.35).  The arms are a
  logarithmic-spiral modulation of an exponential disc with 2-4 arms, pitch
  angle 12-30 deg, broken into clumps by a smoothed log-normal random field,
  drawn on a fine grid and turned into a ``galsim.InterpolatedImage``; they
  hold 35-75 % of the disc light (less in bulge-dominated spirals, which are
  also redder).  Disc axis ratio ``q`` 0.4-1, rounder bulge.
* ``edge_on``: a ``galsim.InclinedExponential`` thin disc (scale height 6-12 %
  of the scale length), apparent axis ratio ``q`` 0.1-0.25, dust-reddened
  colours (g-r ~0.68), small bulge (B/T 0-0.25).

Every component has its own colours (per-galaxy scatter around the means of
:data:`COMPONENT_COLOURS`, plus a shift of the whole stellar population), so
galaxies have colour gradients and the class colour distributions overlap.
Each component is rendered once (unit flux, convolved with the PSF and the
pixel) and scaled per band by its flux, so the cost hardly depends on the
number of bands.

Photometry: r-band total magnitudes in ``mag_r_range`` drawn from number
counts ``dN/dm ∝ 10**(0.55 m)`` (the slope of SDSS bright galaxy counts,
slightly below the Euclidean 0.6).  Half-light radii (major axis, arcsec)
follow ``log10 R = log10 R17 - 0.16 (m_r - 17)`` with 0.14 dex scatter,
``R17`` = 1.7" (ellipticals), 2.1" (spiral discs), 2.5" (edge-on discs).

PSF: Kolmogorov, FWHM = ``psf_fwhm`` (default 1.4", the SDSS median seeing)
times a per-galaxy log-normal jitter of 8 % (clipped to 0.75-1.35x); the same
PSF is used in all bands of a galaxy (a simplification that lets every
component be rendered once).

Noise: each band is a sky-subtracted calibrated frame at SDSS depth: the
galaxy plus the sky (:data:`galpipe.sources.sdss_photometry.SKY_MAG_ARCSEC2`)
is converted to electrons with the SDSS gain and calibration, Poisson-sampled,
dark/read noise added, converted back to nanomaggies and the sky subtracted.
The noise of an empty pixel is
:func:`galpipe.sources.sdss_photometry.pixel_noise_sigma`
(g 0.017, r 0.028, i 0.044 nanomaggies at 0.396").

Measured catalogue columns (noisy, as the SDSS photometric pipeline would give):
the Petrosian radius, fluxes and ``petroR50_r``/``petroR90_r`` follow the SDSS
definitions (Petrosian ratio 0.2 in the 0.8-1.25 r annulus, flux within 2 R_P)
applied to the bulge + disc light profile, each component circularised for
circular apertures and broadened and softened by the seeing (formulas fitted
to GalSim renders; R50 agrees with noiseless renders to about 5 %), through
lookup tables so that 100,000 galaxies take well under a second.  Asinh
magnitudes ``petroMag_<band>`` carry errors from the source and sky noise in
the aperture plus 1 % calibration; ``fracDeV_r`` follows the de
Vaucouleurs-like light fraction; ``deVAB_r``/``expAB_r`` the seeing-rounded
axis ratio; all with noise that grows for faint galaxies.

Determinism: the catalogue is a function of ``(params, seed, bands)`` (the
random draws do not depend on ``bands``: every band's colours are always
drawn); the pixels of a galaxy are a function of ``(catalogue row, seed)``
only, through ``numpy.random.default_rng([seed, objid % 2**63, stream])``, so
shards can be rendered in any order and in parallel.

:class:`SimulatedSource` is the registered source ``simulated``: it takes the
validated :class:`~galpipe.settings.Config` (the ``simulated`` section's
defaults and ranges live in the JSON schema only) and writes the cutouts
through the shared :class:`~galpipe.sources.base.CutoutCache`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from galpipe import __version__
from galpipe.errors import ConfigError, DataError
from galpipe.settings import Config, Region, SimulatedConfig
from galpipe.sources import register_source
from galpipe.sources.base import CutoutCache, NoLocalFiles, manifest_frame
from galpipe.sources.sdss_photometry import (
    GAIN,
    NMGY_PER_DN,
    PIXEL_SCALE,
    SDSS_BANDS,
    asinh_mag,
    asinh_mag_err,
    mag_to_nmgy,
    pixel_noise_sigma,
    validate_bands,
)

__all__ = [
    "COMPONENTS",
    "COMPONENT_COLOURS",
    "SIMULATED_CLASSES",
    "SimulatedSource",
    "make_cutouts",
    "simulate_catalogue",
]

#: Morphological classes of the simulated survey.
SIMULATED_CLASSES: tuple[str, ...] = ("elliptical", "spiral", "edge_on")

#: Light components of a galaxy; each has per-band fluxes ``flux_<comp>_<band>``.
#: ``bulge``: the bulge of a disc galaxy, or the (redder) core of an elliptical;
#: ``envelope``: the outer, slightly bluer Sersic envelope of an elliptical.
COMPONENTS: tuple[str, ...] = ("bulge", "envelope", "disc", "arms")

#: Mean colours (u-g, g-r, r-i, i-z) of each kind of component.
COMPONENT_COLOURS: dict[str, tuple[float, float, float, float]] = {
    "elliptical": (1.80, 0.78, 0.40, 0.33),  # red sequence at z ~ 0.1
    "bulge": (1.70, 0.74, 0.39, 0.31),  # bulges of discs
    "disc": (1.35, 0.60, 0.32, 0.22),  # smooth (old) disc light
    "arms": (1.00, 0.35, 0.18, 0.08),  # young stars in the arms
    "edge_disc": (1.55, 0.68, 0.38, 0.28),  # edge-on disc, reddened by dust
}
#: Per-galaxy Gaussian scatter of each colour (u-g, g-r, r-i, i-z), mag.
COLOUR_SCATTER: tuple[float, float, float, float] = (0.10, 0.035, 0.03, 0.03)
#: Per-galaxy shift of all components' colours: ``delta * _POPULATION_SHIFT`` with
#: ``delta`` ~ N(0, sigma), sigma per class (elliptical, spiral, edge_on), in g-r mag.
_POPULATION_SHIFT = (1.5, 1.0, 0.5, 0.4)
_POPULATION_SCATTER = (0.04, 0.14, 0.08)
#: Fraction of ellipticals with recent star formation (bluer by 0.05-0.3 in g-r).
_BLUE_ELLIPTICAL_FRACTION = 0.12
#: Ellipticals are a core (R_e x 0.7) plus an envelope (R_e x 1.4) of the same Sersic
#: index, the core redder by 0.03-0.10 in g-r (times this vector for u-g, g-r, r-i, i-z).
_ELL_CORE_SIZE = 0.7
_ELL_ENVELOPE_SIZE = 1.4
_ELL_GRADIENT = (0.03, 0.10)
_GRADIENT_SHIFT = (2.0, 1.0, 0.5, 0.4)

_OBJID_BASE = 1_237_650_000_000_000_000
_COUNT_SLOPE = 0.55  # d log10 N / dm of the r-band number counts
_SIZE_PIVOT_MAG = 17.0
_SIZE_SLOPE = 0.16  # d log10 R / d(-m)
#: (R at r = 17 in arcsec, scatter in dex) of the main half-light radius per class.
_SIZE = {"elliptical": (1.7, 0.14), "spiral": (2.1, 0.14), "edge_on": (2.5, 0.14)}
_HLR_CLIP = (0.4, 10.0)  # arcsec
_PSF_JITTER = 0.08  # log-normal sigma of the per-galaxy seeing
_PSF_JITTER_CLIP = (0.75, 1.35)
_B1 = 1.6783469900166605  # Sersic b_n for n = 1 (exponential: R_e = b_1 x scale length)
_SERSIC_TRUNC = 5.0  # bulges are truncated at 5 half-light radii (speed; exact R_e kept)
#: Sersic indices (2n integer) and probabilities of ellipticals and of bulges.
_ELL_SERSIC = ((3.0, 3.5, 4.0, 4.5, 5.0, 6.0), (0.12, 0.18, 0.3, 0.18, 0.14, 0.08))
_BULGE_SERSIC = ((2.0, 2.5, 3.0, 4.0), (0.3, 0.25, 0.25, 0.2))
_PSF_HLR_PER_FWHM = 0.567  # half-light radius of the Kolmogorov PSF per FWHM
_ARM_SHARPNESS = 3.0  # exponent of the cosine arm profile (larger: narrower arms)
_ARM_CLUMPINESS = 0.6  # sigma of the log-normal clump field of the arms
_ARM_CLUMP_SIZE = 0.5  # arcsec, smoothing length of the clump field
_ARM_MAX_GRID = 128  # largest side of the arm image (pixels)
_MAG_CALIB_ERR = 0.01  # fractional calibration error added to Petrosian fluxes


# --------------------------------------------------------------------------- helpers
def _is_number(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _check_seed(seed: object) -> int:
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or int(seed) < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def _class_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Exact class counts summing to ``n`` by the largest-remainder method."""
    quotas = np.array([fractions[c] * n for c in SIMULATED_CLASSES])
    counts = np.floor(quotas).astype(np.int64)
    remainders = quotas - counts
    # ties resolved by class order (stable sort of -remainder)
    order = np.argsort(-remainders, kind="stable")
    for k in order[: n - int(counts.sum())]:
        counts[k] += 1
    return {c: int(k) for c, k in zip(SIMULATED_CLASSES, counts, strict=True)}


# --------------------------------------------------------------------------- profiles
def _gamma_p_int(k: int, y: np.ndarray) -> np.ndarray:
    """Regularised lower incomplete gamma ``P(k, y)`` for a positive integer ``k``."""
    term = np.ones_like(y)
    total = np.ones_like(y)
    for j in range(1, k):  # P(k, y) = 1 - exp(-y) sum_{j<k} y^j / j!
        term = term * y / j
        total = total + term
    return 1.0 - np.exp(-y) * total


@functools.cache
def _sersic_scale(n: float) -> tuple[float, float]:
    """``(r0 / R_e, untruncated fraction within the truncation)`` of a truncated Sersic.

    The profile ``exp(-(r / r0)**(1/n))`` truncated at ``_SERSIC_TRUNC`` R_e
    (as drawn by ``galsim.Sersic(n, half_light_radius=R_e, trunc=...)``) has
    half its light within ``R_e``; ``2 n`` must be an integer.
    """
    k = round(2 * n)
    lo, hi = 1e-9, 1.0  # bracket of r0 / R_e
    for _ in range(200):  # bisection in log space
        mid = math.sqrt(lo * hi)
        y1 = np.array((1.0 / mid) ** (1.0 / n))
        yt = np.array((_SERSIC_TRUNC / mid) ** (1.0 / n))
        if _gamma_p_int(k, y1) / _gamma_p_int(k, yt) > 0.5:
            lo = mid  # too concentrated: r0 too small
        else:
            hi = mid
    r0 = math.sqrt(lo * hi)
    return r0, float(_gamma_p_int(k, np.array((_SERSIC_TRUNC / r0) ** (1.0 / n))))


def _enclosed(n: float, x: np.ndarray) -> np.ndarray:
    """Fraction of a truncated Sersic profile's light within ``x`` half-light radii."""
    r0, norm = _sersic_scale(n)
    y = np.power(np.maximum(x, 0.0) / r0, 1.0 / n)
    return np.minimum(_gamma_p_int(round(2 * n), y) / norm, 1.0)


def _first_crossing(values: np.ndarray, target: np.ndarray, log_r: np.ndarray) -> np.ndarray:
    """Per row, interpolated ``log_r`` where ``values`` first reaches ``target``.

    ``values`` has shape ``(N, K)``, ``target`` shape ``(N,)`` and ``log_r``
    shape ``(K,)``; ``values`` is assumed to start below the target (rows
    that never reach it return the last radius).
    """
    hit = values >= target[:, None]
    idx = np.where(hit.any(axis=1), np.argmax(hit, axis=1), values.shape[1] - 1)
    idx = np.clip(idx, 1, values.shape[1] - 1)
    rows = np.arange(values.shape[0])
    v0, v1 = values[rows, idx - 1], values[rows, idx]
    x0, x1 = log_r[idx - 1], log_r[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(v1 != v0, (target - v0) / (v1 - v0), 1.0)
    return x0 + np.clip(t, 0.0, 1.0) * (x1 - x0)


#: Grids of the Petrosian lookup tables: bulge fraction, log10(R_bulge / R_disc),
#: and radius in units of R_disc.
_TAB_WB = np.linspace(0.0, 1.0, 26)
_TAB_LRHO = np.linspace(-1.5, 0.5, 26)
_TAB_LOG_R = np.linspace(np.log(0.01), np.log(40.0), 300)


@functools.cache
def _petro_table(n: float) -> np.ndarray:
    """Petrosian radius, R50 and R90 of bulge (Sersic ``n``) + exponential disc.

    Returns
    -------
    numpy.ndarray
        Shape ``(3, len(_TAB_WB), len(_TAB_LRHO))``: ``R_P``, ``R50``, ``R90``
        in units of the disc half-light radius (SDSS definitions: Petrosian
        ratio 0.2 in the annulus 0.8-1.25 r, Petrosian flux within 2 R_P).
    """
    wb, lrho = np.meshgrid(_TAB_WB, _TAB_LRHO, indexing="ij")
    wb = wb.reshape(-1, 1)
    rho = 10.0 ** lrho.reshape(-1, 1)
    r = np.exp(_TAB_LOG_R)[None, :]

    def light(r: np.ndarray) -> np.ndarray:
        return wb * _enclosed(n, r / rho) + (1.0 - wb) * _enclosed(1.0, r)

    lr = light(r)
    eta = (light(1.25 * r) - light(0.8 * r)) / ((1.25**2 - 0.8**2) * np.maximum(lr, 1e-300))
    # the Petrosian ratio falls from 1 at the centre: first radius where it reaches 0.2
    log_rp = _first_crossing(-eta, np.full(eta.shape[0], -0.2), _TAB_LOG_R)
    rp = np.exp(log_rp)[:, None]
    flux_p = (light(2.0 * rp))[:, 0]
    r50 = np.exp(_first_crossing(lr, 0.5 * flux_p, _TAB_LOG_R))
    r90 = np.exp(_first_crossing(lr, 0.9 * flux_p, _TAB_LOG_R))
    shape = (len(_TAB_WB), len(_TAB_LRHO))
    return np.stack([rp[:, 0].reshape(shape), r50.reshape(shape), r90.reshape(shape)])


def _petrosian(
    n_bulge: np.ndarray, w_bulge: np.ndarray, r_bulge: np.ndarray, r_disc: np.ndarray
) -> dict[str, np.ndarray]:
    """SDSS Petrosian quantities of circular bulge + disc profiles, vectorised.

    Trilinear interpolation in lookup tables (:func:`_petro_table`) computed
    for half-integer bulge Sersic indices.

    Parameters
    ----------
    n_bulge : numpy.ndarray
        Sersic index of the bulge in 1..6 (any real value), shape ``(N,)``.
    w_bulge : numpy.ndarray
        Bulge fraction of the r-band light, shape ``(N,)``; the rest is an
        exponential disc.
    r_bulge, r_disc : numpy.ndarray
        Half-light radii of the two components in arcsec, shape ``(N,)``.

    Returns
    -------
    dict
        ``petroRad`` (R_P), ``r50``/``r90`` (radii enclosing 50 %/90 % of the
        Petrosian flux), ``frac_bulge``/``frac_disc`` (fraction of each
        component's light within 2 R_P), each of shape ``(N,)``.
    """
    nb = len(_TAB_WB)
    nr = len(_TAB_LRHO)
    fw = np.clip(w_bulge, 0.0, 1.0) * (nb - 1)
    i0 = np.clip(np.floor(fw).astype(np.int64), 0, nb - 2)
    tw = fw - i0
    lrho = np.clip(np.log10(r_bulge / r_disc), _TAB_LRHO[0], _TAB_LRHO[-1])
    fr = (lrho - _TAB_LRHO[0]) / (_TAB_LRHO[1] - _TAB_LRHO[0])
    j0 = np.clip(np.floor(fr).astype(np.int64), 0, nr - 2)
    tr = fr - j0
    fn = (np.clip(n_bulge, 1.0, 6.0) - 1.0) * 2.0  # index in the half-integer grid 1..6
    k0 = np.clip(np.floor(fn).astype(np.int64), 0, 9)
    tn = fn - k0
    vals = np.zeros((3, w_bulge.shape[0]))
    for k in np.unique(np.concatenate([k0, k0 + 1])):
        weight_n = np.where(k0 == k, 1.0 - tn, 0.0) + np.where(k0 + 1 == k, tn, 0.0)
        m = weight_n > 0
        if not m.any():
            continue
        tab = _petro_table(1.0 + 0.5 * float(k))
        a, b, ta, tb = i0[m], j0[m], tw[m], tr[m]
        vals[:, m] += weight_n[m] * (
            tab[:, a, b] * (1 - ta) * (1 - tb)
            + tab[:, a + 1, b] * ta * (1 - tb)
            + tab[:, a, b + 1] * (1 - ta) * tb
            + tab[:, a + 1, b + 1] * ta * tb
        )
    rp = vals[0] * r_disc
    # fraction of the bulge light within 2 R_P, interpolated in n like the table
    n_lo = 1.0 + 0.5 * k0
    x = 2.0 * rp / r_bulge
    frac_bulge = np.empty_like(rp)
    for n_half in np.unique(n_lo):
        m = n_lo == n_half
        frac_bulge[m] = (1.0 - tn[m]) * _enclosed(float(n_half), x[m]) + tn[m] * _enclosed(
            float(n_half) + 0.5, x[m]
        )
    return {
        "petroRad": rp,
        "r50": vals[1] * r_disc,
        "r90": vals[2] * r_disc,
        "frac_bulge": frac_bulge,
        "frac_disc": _enclosed(1.0, 2.0 * rp / r_disc),
    }


def _circular_radius(hlr: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Radius of a circular aperture holding half the light of an elliptical profile.

    ``hlr`` is the major-axis half-light radius, ``q`` the axis ratio; the
    factor ``0.535 + 0.33 q + 0.135 q**2`` fits exponential and de Vaucouleurs
    profiles drawn with GalSim to 2 % for 0.1 <= q <= 1.
    """
    return hlr * (0.535 + 0.33 * q + 0.135 * q**2)


def _seeing_broadened(
    hlr: np.ndarray, n: np.ndarray | float, fwhm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Half-light radius and effective Sersic index after a Kolmogorov PSF.

    Fitted to GalSim convolutions: radii add as a p-norm with the PSF's
    half-light radius ``0.567 FWHM`` (p = 1.7 for discs, 1.5 for bulges), and
    the profile's concentration falls from Sersic ``n`` towards the PSF's
    (about n = 1) as ``n_eff = 1 + (n - 1) / (1 + (t0 / t)**a)``,
    ``t = hlr / FWHM``, ``t0 = 1.33 + 0.135 n``, ``a = max(2.65 - 0.2 n, 1.2)``.
    """
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), np.shape(hlr))
    p = np.where(n < 1.5, 1.7, 1.5)
    r_psf = _PSF_HLR_PER_FWHM * fwhm
    radius = (hlr**p + r_psf**p) ** (1.0 / p)
    t = np.maximum(hlr / fwhm, 1e-6)
    t0 = 1.33 + 0.135 * n
    a = np.maximum(2.65 - 0.2 * n, 1.2)
    n_eff = 1.0 + (n - 1.0) / (1.0 + (t0 / t) ** a)
    return radius, n_eff


def _mag_offsets(colours: np.ndarray) -> dict[str, np.ndarray]:
    """``m_band - m_r`` for every SDSS band from colours of shape ``(N, 4)``."""
    ug, gr, ri, iz = colours.T
    return {"u": ug + gr, "g": gr, "r": np.zeros_like(gr), "i": -ri, "z": -ri - iz}


# --------------------------------------------------------------------------- catalogue
def simulate_catalogue(
    sim: SimulatedConfig | Mapping[str, Any], *, seed: int, bands: Sequence[str]
) -> pd.DataFrame:
    """Draw the truth and the SDSS-like measured catalogue of a simulated survey.

    Parameters
    ----------
    sim : SimulatedConfig or mapping
        The validated ``simulated:`` config section
        (``galpipe.config.build_section("simulated", {...})``); a mapping
        (some keys set) is completed and validated by the schema first.
    seed : int
        Non-negative random seed; the same seed gives an identical catalogue.
    bands : sequence of str
        Bands to provide fluxes for (subset of ``ugriz``, order kept).

    Returns
    -------
    pandas.DataFrame
        One row per galaxy (``n_galaxies`` rows), sorted by ``objid``, with:

        * identity: ``objid`` (int64, unique), ``ra``, ``dec`` (deg),
          ``label`` (one of :data:`SIMULATED_CLASSES`);
        * truth: ``mag_r`` (total r magnitude), ``psf_fwhm`` (arcsec),
          ``q`` (disc, or elliptical, axis ratio), ``q_bulge``, ``pa_deg``
          (east of north), ``hlr_bulge``/``hlr_envelope``/``hlr_disc``
          (major-axis half-light radii, arcsec; 0 when absent), ``n_bulge``
          (Sersic index of bulge / elliptical), ``bulge_frac``,
          ``envelope_frac``, ``arm_frac`` (r-band light fractions; the disc
          has the rest), ``n_arms``, ``pitch_deg``, ``arm_strength``,
          ``arm_phase_deg``, ``arm_sign``, ``disc_h_over_r``,
          ``inclination_deg``, and per requested band ``flux_<band>`` plus
          ``flux_<component>_<band>`` for each of :data:`COMPONENTS`
          (nanomaggies);
        * measured (noisy): ``petroMag_<band>``/``petroMagErr_<band>``
          (asinh mags), ``petroRad_r``, ``petroR50_r``, ``petroR90_r``
          (arcsec), ``fracDeV_r``, ``deVAB_r``, ``expAB_r``.

    Raises
    ------
    ConfigError
        ``bands`` are not SDSS bands, or a mapping ``sim`` is not a valid
        section (the message names the key).
    """
    bands = validate_bands(bands)
    sim = simulated_section(sim)
    n = int(sim.n_galaxies)
    rng = np.random.default_rng([int(seed), 0x5EED_CA7A])
    # the draws below happen in a fixed order: the catalogue is a function of (sim, seed)
    t = _draw_identity(rng, n, _normalised_fractions(sim.class_fractions), sim.region)
    t.update(_draw_magnitude_and_seeing(rng, n, sim.mag_r_range, float(sim.psf_fwhm)))
    t.update(_draw_sizes(rng, t))
    t.update(_draw_shapes(rng, t))
    t.update(_draw_structure(rng, t))
    comp_flux = _component_fluxes(rng, t)
    measured = _measure(rng, t, comp_flux, float(sim.pixel_scale))
    return _catalogue_frame(t, comp_flux, measured, bands)


def simulated_section(sim: SimulatedConfig | Mapping[str, Any] | None) -> SimulatedConfig:
    """``sim`` as the typed section; a plain mapping goes through the schema
    (:func:`galpipe.config.build_section`), which fills the defaults."""
    from galpipe.config import as_section

    section: SimulatedConfig = as_section("simulated", sim)
    return section


def _normalised_fractions(weights: Mapping[str, float]) -> dict[str, float]:
    """Class weights (a missing class weighs 0) scaled to sum to 1, in :data:`SIMULATED_CLASSES` order."""
    values = [float(weights.get(c, 0.0)) for c in SIMULATED_CLASSES]
    total = sum(values)
    return {c: w / total for c, w in zip(SIMULATED_CLASSES, values, strict=True)}


def _draw_identity(
    rng: np.random.Generator, n: int, fractions: Mapping[str, float], region: Region
) -> dict[str, np.ndarray]:
    """``objid``, ``label`` (and the class masks), ``ra``, ``dec``; arrays of shape ``(n,)``."""
    counts = _class_counts(n, fractions)
    objid = _OBJID_BASE + np.cumsum(rng.integers(1, 2**20, size=n, dtype=np.int64))
    labels = np.repeat(np.array(SIMULATED_CLASSES, dtype=object), list(counts.values()))
    labels = labels[rng.permutation(n)]
    ra = rng.uniform(float(region.ra_min), float(region.ra_max), n)
    sin_dec = rng.uniform(np.sin(np.radians(float(region.dec_min))), np.sin(np.radians(float(region.dec_max))), n)
    return {
        "objid": objid,
        "labels": labels,
        "is_ell": labels == "elliptical",
        "is_spi": labels == "spiral",
        "is_edge": labels == "edge_on",
        "ra": ra,
        "dec": np.degrees(np.arcsin(sin_dec)),
    }


def _draw_magnitude_and_seeing(
    rng: np.random.Generator, n: int, mag_range: Sequence[float], psf_fwhm: float
) -> dict[str, np.ndarray]:
    """``mag_r`` from ``dN/dm ∝ 10**(a m)`` on ``mag_range`` (inverse CDF) and the per-galaxy ``psf_fwhm``."""
    lo, hi = float(mag_range[0]), float(mag_range[1])
    a = _COUNT_SLOPE * np.log(10.0)
    u = rng.uniform(0.0, 1.0, n)
    mag_r = np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a
    fwhm = psf_fwhm * np.clip(np.exp(rng.normal(0.0, _PSF_JITTER, n)), *_PSF_JITTER_CLIP)
    return {"mag_r": np.clip(mag_r, lo, hi), "psf_fwhm": fwhm}


def _draw_sizes(rng: np.random.Generator, t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Major-axis half-light radii (arcsec, shape ``(n,)``) of the main component and of each component."""
    n = len(t["mag_r"])
    is_ell, is_spi = t["is_ell"], t["is_spi"]
    size_noise = rng.normal(0.0, 1.0, n)
    hlr_main = np.empty(n)
    for cls, mask in (("elliptical", is_ell), ("spiral", is_spi), ("edge_on", t["is_edge"])):
        r17, scatter = _SIZE[cls]
        log_r = np.log10(r17) - _SIZE_SLOPE * (t["mag_r"][mask] - _SIZE_PIVOT_MAG)
        hlr_main[mask] = 10 ** (log_r + scatter * size_noise[mask])
    hlr_main = np.clip(hlr_main, *_HLR_CLIP)
    bulge_size_ratio = np.where(is_spi, rng.uniform(0.15, 0.35, n), rng.uniform(0.12, 0.30, n))
    return {
        "hlr_main": hlr_main,
        "hlr_bulge": np.where(is_ell, hlr_main * _ELL_CORE_SIZE, np.maximum(hlr_main * bulge_size_ratio, 0.25)),
        "hlr_envelope": np.where(is_ell, hlr_main * _ELL_ENVELOPE_SIZE, 0.0),
        "hlr_disc": np.where(is_ell, 0.0, hlr_main),
    }


def _draw_shapes(rng: np.random.Generator, t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Axis ratios ``q``/``q_bulge``, ``pa_deg``, edge-on ``inclination_deg`` and ``disc_h_over_r``."""
    n = len(t["mag_r"])
    is_ell, is_spi, is_edge = t["is_ell"], t["is_spi"], t["is_edge"]
    q_ell = 0.6 + 0.4 * rng.beta(2.5, 1.5, n)
    q_spi = rng.uniform(0.4, 1.0, n)
    q_edge = rng.uniform(0.10, 0.25, n)
    q = np.select([is_ell, is_spi], [q_ell, q_spi], q_edge)
    q_bulge_disc = np.maximum(q, rng.uniform(0.65, 1.0, n))
    q_bulge = np.where(is_ell, q, np.where(is_edge, rng.uniform(0.5, 0.8, n), q_bulge_disc))
    pa_deg = rng.uniform(0.0, 180.0, n)
    h_over_r = rng.uniform(0.06, 0.12, n)
    # second-moment axis ratio of an InclinedExponential: q^2 ~ (1.2 cos i)^2 + (0.65 h/r)^2
    cos_i = np.sqrt(np.clip(q**2 - (0.65 * h_over_r) ** 2, 0.0, None)) / 1.2
    return {
        "q": q,
        "q_bulge": q_bulge,
        "pa_deg": pa_deg,
        "inclination_deg": np.where(is_edge, np.degrees(np.arccos(np.clip(cos_i, 0.0, 1.0))), 0.0),
        "disc_h_over_r": np.where(is_edge, h_over_r, 0.0),
    }


def _draw_structure(rng: np.random.Generator, t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Light fractions of bulge/envelope/disc/arms, spiral-arm geometry and Sersic indices, shape ``(n,)``."""
    n = len(t["mag_r"])
    is_ell, is_spi = t["is_ell"], t["is_spi"]
    bt_spi = 0.03 + 0.67 * rng.beta(1.4, 3.0, n)  # Sc..Sa: mean 0.24, up to 0.7
    bt_edge = rng.uniform(0.0, 0.25, n)
    envelope_frac = np.where(is_ell, rng.uniform(0.4, 0.6, n), 0.0)
    spheroid_frac = np.select([is_ell, is_spi], [np.ones(n), bt_spi], bt_edge)
    n_arms_draw = rng.choice(np.array([2, 3, 4]), size=n, p=[0.6, 0.25, 0.15])
    pitch = rng.uniform(12.0, 30.0, n)
    strength = rng.uniform(0.35, 0.75, n) * (1.0 - 0.5 * spheroid_frac)  # weaker in Sa
    phase = rng.uniform(0.0, 360.0, n)
    sign = np.where(rng.uniform(0.0, 1.0, n) < 0.5, -1, 1)
    arm_frac = np.where(is_spi, (1.0 - spheroid_frac) * strength, 0.0)
    n_ell = rng.choice(np.asarray(_ELL_SERSIC[0]), size=n, p=_ELL_SERSIC[1])
    n_blg = rng.choice(np.asarray(_BULGE_SERSIC[0]), size=n, p=_BULGE_SERSIC[1])
    return {
        "envelope_frac": envelope_frac,
        "spheroid_frac": spheroid_frac,
        "bulge_frac": spheroid_frac - envelope_frac,
        "arm_frac": arm_frac,
        "disc_frac": np.where(is_ell, 0.0, 1.0 - spheroid_frac - arm_frac),
        "n_arms": np.where(is_spi, n_arms_draw, 0).astype(np.int64),
        "pitch": pitch,
        "strength": strength,
        "phase": phase,
        "sign": sign,
        "n_bulge": np.where(is_ell, n_ell, n_blg),
    }


def _component_fluxes(rng: np.random.Generator, t: Mapping[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """Flux (nanomaggies, shape ``(n,)``) of every component in every SDSS band: ``{(component, band): flux}``.

    All five bands' colours are drawn whatever bands are requested, so the
    catalogue does not depend on the bands.
    """
    n = len(t["mag_r"])
    is_ell, is_spi, is_edge = t["is_ell"], t["is_spi"], t["is_edge"]
    scatter = np.asarray(COLOUR_SCATTER)
    col = {
        kind: np.asarray(COMPONENT_COLOURS[kind]) + scatter * rng.normal(0.0, 1.0, (n, 4))
        for kind in ("elliptical", "bulge", "disc", "arms", "edge_disc")
    }
    # a per-galaxy shift of the whole stellar population (age, dust, metallicity)
    shift = rng.normal(0.0, 1.0, n) * np.select(
        [is_ell, is_spi], list(_POPULATION_SCATTER[:2]), _POPULATION_SCATTER[2]
    )
    blue_ell = is_ell & (rng.uniform(0.0, 1.0, n) < _BLUE_ELLIPTICAL_FRACTION)
    shift = shift - np.where(blue_ell, rng.uniform(0.05, 0.3, n), 0.0)
    # bulge-dominated (early-type) spirals have older, redder discs
    shift = shift + np.where(is_spi, 0.3 * (t["spheroid_frac"] - 0.24), 0.0)
    shift_vec = shift[:, None] * np.asarray(_POPULATION_SHIFT)[None, :]
    # colour gradient of ellipticals: core redder than envelope
    half_grad = 0.5 * rng.uniform(*_ELL_GRADIENT, n)[:, None] * np.asarray(_GRADIENT_SHIFT)
    ell_col = col["elliptical"] + shift_vec
    bulge_col = np.where(is_ell[:, None], ell_col + half_grad, col["bulge"] + shift_vec)
    disc_col = np.where(is_edge[:, None], col["edge_disc"], col["disc"]) + shift_vec
    offsets = {
        "bulge": _mag_offsets(bulge_col),
        "envelope": _mag_offsets(ell_col - half_grad),
        "disc": _mag_offsets(disc_col),
        "arms": _mag_offsets(col["arms"] + shift_vec),
    }
    flux_r = mag_to_nmgy(t["mag_r"])
    comp_r = {
        "bulge": flux_r * t["bulge_frac"],
        "envelope": flux_r * t["envelope_frac"],
        "disc": flux_r * t["disc_frac"],
        "arms": flux_r * t["arm_frac"],
    }
    return {(c, b): comp_r[c] * 10 ** (-0.4 * offsets[c][b]) for c in COMPONENTS for b in SDSS_BANDS}


def _measure(
    rng: np.random.Generator,
    t: Mapping[str, np.ndarray],
    comp_flux: Mapping[tuple[str, str], np.ndarray],
    pixel_scale: float,
) -> dict[str, Any]:
    """Noisy SDSS-like measurements (Petrosian photometry and sizes, fracDeV, axis ratios), shape ``(n,)`` each."""
    n = len(t["mag_r"])
    is_ell, is_spi = t["is_ell"], t["is_spi"]
    spheroid_frac, q, q_bulge, psf_fwhm = t["spheroid_frac"], t["q"], t["q_bulge"], t["psf_fwhm"]
    # seeing-rounded axis ratio from second moments (Gaussian-equivalent sizes)
    # (an elliptical's core + envelope is treated as one Sersic of radius hlr_main)
    hlr_sph = np.where(is_ell, t["hlr_main"], t["hlr_bulge"])
    s_gal = (spheroid_frac * hlr_sph + (1.0 - spheroid_frac) * t["hlr_disc"]) / 1.1774
    q_gal = spheroid_frac * q_bulge + (1.0 - spheroid_frac) * q
    s_psf = psf_fwhm / 2.3548
    q_obs = np.sqrt(((s_gal * q_gal) ** 2 + s_psf**2) / (s_gal**2 + s_psf**2))
    # (circular apertures on the elliptical profiles; arms lie ~28 % further out
    # than the smooth disc; the PSF enlarges and softens each component)
    rb_eff, nb_eff = _seeing_broadened(_circular_radius(hlr_sph, q_bulge), t["n_bulge"], psf_fwhm)
    hd = np.where(is_ell, t["hlr_main"], t["hlr_disc"] * (1.0 + 0.28 * np.where(is_spi, t["strength"], 0.0)))
    rd_eff, _ = _seeing_broadened(_circular_radius(hd, q), 1.0, psf_fwhm)
    petro = _petrosian(nb_eff, spheroid_frac, rb_eff, rd_eff)
    out: dict[str, Any] = _petro_mags(rng, comp_flux, petro, pixel_scale)
    snr_r = out.pop("snr_r")
    size_noise = rng.normal(0.0, 1.0, (n, 3))
    rel = 0.04 + 0.5 / snr_r
    petro_r50 = petro["r50"] * np.exp(rel * size_noise[:, 0])
    # circular apertures on an elongated profile: R90/R50 grows as q falls (GalSim fit)
    r90 = petro["r90"] * (1.0 + 0.2 * (1.0 - q_obs) ** 2.2)
    out["petroRad_r"] = petro["petroRad"] * np.exp(rel * size_noise[:, 2])
    out["petroR50_r"] = petro_r50
    out["petroR90_r"] = np.maximum(r90 * np.exp(rel * size_noise[:, 1]), 1.05 * petro_r50)
    # fracDeV: de Vaucouleurs-like light (an n=2 bulge counts 1/3, n>=4 fully); the
    # composite fits of SDSS also give discs some deV weight (0-0.35), plus noise
    frac_sigma = 0.12 + 0.08 * (t["mag_r"] - 14.0) / 3.77
    dev_like = spheroid_frac * np.clip((t["n_bulge"] - 1.0) / 3.0, 0.0, 1.0)
    dev_like = dev_like + (1.0 - spheroid_frac) * rng.uniform(0.0, 0.35, n)
    out["fracDeV_r"] = np.clip(dev_like + frac_sigma * rng.normal(0.0, 1.0, n), 0.0, 1.0)
    ab_sigma = 0.03 + 0.3 / np.sqrt(snr_r)
    out["deVAB_r"] = np.clip(q_obs + ab_sigma * rng.normal(0.0, 1.0, n), 0.05, 1.0)
    out["expAB_r"] = np.clip(q_obs + ab_sigma * rng.normal(0.0, 1.0, n), 0.05, 1.0)
    return out


def _petro_mags(
    rng: np.random.Generator,
    comp_flux: Mapping[tuple[str, str], np.ndarray],
    petro: Mapping[str, np.ndarray],
    pixel_scale: float,
) -> dict[str, np.ndarray]:
    """Measured asinh ``petroMag_<b>``/``petroMagErr_<b>`` of every SDSS band, and ``snr_r`` (shape ``(n,)``)."""
    n = len(petro["petroRad"])
    area_pix = np.pi * (2.0 * petro["petroRad"] / pixel_scale) ** 2
    meas_noise = rng.normal(0.0, 1.0, (n, len(SDSS_BANDS)))
    out: dict[str, np.ndarray] = {"snr_r": np.ones(n)}
    for k, b in enumerate(SDSS_BANDS):
        f_p = (
            (comp_flux["bulge", b] + comp_flux["envelope", b]) * petro["frac_bulge"]
            + (comp_flux["disc", b] + comp_flux["arms", b]) * petro["frac_disc"]
        )
        var = (
            f_p * NMGY_PER_DN[b] / GAIN[b]
            + area_pix * pixel_noise_sigma(b, pixel_scale) ** 2
            + (_MAG_CALIB_ERR * f_p) ** 2
        )
        sigma = np.sqrt(var)
        f_meas = f_p + sigma * meas_noise[:, k]
        out[f"petroMag_{b}"] = asinh_mag(f_meas, b)
        out[f"petroMagErr_{b}"] = asinh_mag_err(f_meas, sigma, b)
        if b == "r":
            out["snr_r"] = f_p / sigma
    return out


def _catalogue_frame(
    t: Mapping[str, np.ndarray],
    comp_flux: Mapping[tuple[str, str], np.ndarray],
    measured: Mapping[str, np.ndarray],
    bands: Sequence[str],
) -> pd.DataFrame:
    """Assemble the catalogue columns (see :func:`simulate_catalogue`), sorted by ``objid``."""
    is_spi = t["is_spi"]
    cols: dict[str, Any] = {
        "objid": t["objid"].astype(np.int64),
        "ra": t["ra"],
        "dec": t["dec"],
        "label": t["labels"].astype(str),
        **{k: t[k] for k in ("mag_r", "psf_fwhm", "q", "q_bulge", "pa_deg", "hlr_bulge", "hlr_envelope",
                             "hlr_disc", "bulge_frac", "envelope_frac", "n_bulge", "arm_frac", "n_arms")},
        "pitch_deg": np.where(is_spi, t["pitch"], 0.0),
        "arm_strength": np.where(is_spi, t["strength"], 0.0),
        "arm_phase_deg": np.where(is_spi, t["phase"], 0.0),
        "arm_sign": np.where(is_spi, t["sign"], 0).astype(np.int64),
        "disc_h_over_r": t["disc_h_over_r"],
        "inclination_deg": t["inclination_deg"],
    }
    for b in bands:
        cols[f"flux_{b}"] = sum(comp_flux[c, b] for c in COMPONENTS)
        for c in COMPONENTS:
            cols[f"flux_{c}_{b}"] = comp_flux[c, b]
    for b in bands:
        cols[f"petroMag_{b}"] = measured[f"petroMag_{b}"]
        cols[f"petroMagErr_{b}"] = measured[f"petroMagErr_{b}"]
    for name in ("petroRad_r", "petroR50_r", "petroR90_r", "fracDeV_r", "deVAB_r", "expAB_r"):
        cols[name] = measured[name]
    df = pd.DataFrame(cols)
    for name, values in cols.items():
        if name not in ("objid", "label", "n_arms", "arm_sign"):
            df[name] = np.asarray(values, dtype=np.float64)
    return df.sort_values("objid", kind="stable").reset_index(drop=True)



# --------------------------------------------------------------------------- rendering
#: Names of :mod:`galpipe.sources.simulated_render`, the GalSim part, imported on first use.
_RENDER_NAMES = ("render_galaxy",)


def __getattr__(name: str) -> Any:
    """PEP 562: ``render_galaxy`` lives in :mod:`.simulated_render`, which imports GalSim only when needed."""
    if name in _RENDER_NAMES:
        from galpipe.sources import simulated_render

        return getattr(simulated_render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- cutouts
_REQUIRED = ("objid", "ra", "dec", "label")


def _check_shard(catalogue: pd.DataFrame) -> None:
    """A shard must have the identity columns and unique ``objid`` (a DATA check)."""
    missing = [c for c in _REQUIRED if c not in catalogue.columns]
    if missing:
        raise DataError(f"simulated catalogue: missing column(s) {missing}; expected {_REQUIRED}")
    if catalogue["objid"].duplicated().any():
        dup = catalogue.loc[catalogue["objid"].duplicated(), "objid"].iloc[0]
        raise DataError(f"simulated catalogue: objid {dup} appears more than once")


def make_cutouts(
    catalogue: pd.DataFrame,
    cache: CutoutCache,
    *,
    bands: Sequence[str],
    size: int,
    seed: int,
    pixel_scale: float = PIXEL_SCALE,
    progress: bool = False,
) -> pd.DataFrame:
    """Render every catalogue galaxy into the cutout cache (``cache.path(objid)``, galpipe layout).

    Cutouts already in the cache that are valid (:meth:`CutoutCache.load_valid`:
    right objid, bands and shape) are kept untouched (a rerun resumes);
    missing or corrupt ones are (re)written atomically by :meth:`CutoutCache.write`.

    Parameters
    ----------
    catalogue : pandas.DataFrame
        Rows of :func:`simulate_catalogue` (any subset, e.g. one shard).
    cache : CutoutCache
        Where the cutouts go.
    bands, size, seed, pixel_scale
        As in :func:`render_galaxy`.
    progress : bool
        Report progress (:mod:`galpipe.progress`: a bar on a terminal, else a log line every 10 s).

    Returns
    -------
    pandas.DataFrame
        Manifest in catalogue order (:data:`galpipe.sources.base.MANIFEST_COLUMNS`):
        ``objid`` (int64), ``path`` (str), ``status`` (``"ok"``), ``reason``
        (``""``), ``n_filled`` (0).

    Raises
    ------
    DataError
        Missing catalogue columns, duplicate ``objid`` or a row that cannot be rendered.
    """
    from galpipe.sources import simulated_render  # GalSim, imported only to render

    bands = validate_bands(bands)
    _check_shard(catalogue)
    records = catalogue.to_dict("records")
    from galpipe.progress import track

    iterator: Any = track(records, "simulated cutouts", "galaxy", enabled=progress)
    rows = []
    for rec in iterator:
        objid = int(rec["objid"])
        if cache.load_valid(objid, size=size, bands=bands) is None:
            data = simulated_render.render_galaxy(rec, bands=bands, size=size, seed=seed, pixel_scale=pixel_scale)
            cache.write(
                objid,
                data,
                bands=bands,
                ra=float(rec["ra"]),
                dec=float(rec["dec"]),
                source="simulated",
                bunit="nanomaggy",
                pixel_scale=pixel_scale,
                extra={"SIMSEED": (seed, "seed of the simulated survey")},
            )
        rows.append((objid, str(cache.path(objid)), "ok", "", 0))
    return manifest_frame(rows)


# --------------------------------------------------------------------------- the source
@register_source
class SimulatedSource(NoLocalFiles):
    """Source ``simulated``: the GalSim survey of this module (offline).

    Parameters
    ----------
    cfg : Config
        The whole validated configuration; uses ``simulated``, ``seed``,
        ``bands`` and ``cutout_size``.
    """

    name: ClassVar[str] = "simulated"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.section: SimulatedConfig = cfg.simulated

    @property
    def bands(self) -> tuple[str, ...]:
        """The configured SDSS bands (``cfg.bands``)."""
        return tuple(self.cfg.bands)

    @property
    def catalogue_columns(self) -> tuple[str, ...]:
        """Each galaxy is rendered from its catalogue row, class included."""
        return _REQUIRED

    @property
    def crop_fraction(self) -> float:
        """1.0: the survey renders its stamps, an external image is not cropped."""
        return 1.0

    def params(self) -> dict[str, Any]:
        """``source``, ``seed``, the ``simulated`` section, ``bands`` and ``cutout_size`` (plain data)."""
        return {
            "source": self.name,
            "seed": int(self.cfg.seed),
            "simulated": self.section.to_dict(),
            "bands": list(self.cfg.bands),
            "cutout_size": int(self.cfg.cutout_size),
        }

    def catalogue(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The simulated catalogue (:func:`simulate_catalogue`) and its provenance.

        The provenance holds ``source``, ``params`` (the ``simulated`` section),
        ``seed``, ``bands`` and ``galpipe_version``: no time stamp, so a rerun
        writes an identical file.
        """
        df = simulate_catalogue(self.section, seed=self.cfg.seed, bands=self.cfg.bands)
        prov = {"source": self.name, "params": self.section.to_dict(), "seed": int(self.cfg.seed),
                "bands": list(self.cfg.bands), "galpipe_version": __version__}
        return df, prov

    def make_cutouts(self, shard: pd.DataFrame, cache: CutoutCache, *, progress: bool = False) -> pd.DataFrame:
        """Render the galaxies of ``shard`` into ``cache`` (see :func:`make_cutouts`); return the manifest."""
        return make_cutouts(shard, cache, bands=self.cfg.bands, size=int(self.cfg.cutout_size),
                            seed=int(self.cfg.seed), pixel_scale=float(self.section.pixel_scale),
                            progress=progress)
