"""The offline simulated survey (galpipe.sources.simulated)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from galpipe.config import build_section, load_settings
from galpipe.errors import ConfigError, DataError
from galpipe.io.cutout_fits import cutout_filename, read_cutout
from galpipe.sources.base import CutoutCache, Source
from galpipe.sources.sdss_photometry import (
    SDSS_BANDS,
    asinh_mag,
    mag_to_nmgy,
    nmgy_to_mag,
    pixel_noise_sigma,
)
from galpipe.sources.simulated import (
    COMPONENTS,
    SIMULATED_CLASSES,
    SimulatedSource,
    _normalised_fractions,
    render_galaxy,
    simulate_catalogue,
)
from galpipe.sources.simulated import make_cutouts as _make_cutouts

BANDS = ["g", "r", "i"]
SEED = 12345
SIM_DEFAULTS = build_section("simulated")  # the schema's defaults, the only ones


def make_cutouts(catalogue: pd.DataFrame, out_dir, **kwargs) -> pd.DataFrame:
    """:func:`galpipe.sources.simulated.make_cutouts` into the cutout cache at ``out_dir``."""
    return _make_cutouts(catalogue, CutoutCache(out_dir), **kwargs)


@pytest.fixture(scope="module")
def cat() -> pd.DataFrame:
    return simulate_catalogue({"n_galaxies": 300}, seed=SEED, bands=BANDS)


def _first(cat: pd.DataFrame, label: str, query: str = "index == index") -> dict:
    rows = cat[cat.label == label].query(query)
    assert len(rows), f"no {label} matching {query}"
    return rows.iloc[0].to_dict()


def _moments_q(img: np.ndarray) -> float:
    """Axis ratio from the unweighted second moments of a (positive) image."""
    a = np.clip(img, 0, None)
    y, x = np.mgrid[: a.shape[0], : a.shape[1]]
    f = a.sum()
    xc, yc = (a * x).sum() / f, (a * y).sum() / f
    xx = (a * (x - xc) ** 2).sum() / f
    yy = (a * (y - yc) ** 2).sum() / f
    xy = (a * (x - xc) * (y - yc)).sum() / f
    t = xx + yy
    d = np.hypot(xx - yy, 2 * xy)
    return float(np.sqrt((t - d) / (t + d)))


def _azimuthal_residual(img: np.ndarray) -> float:
    """Relative power left after subtracting the azimuthal mean in thin (0.25 px) rings."""
    n = img.shape[0]
    y, x = np.mgrid[:n, :n] - (n - 1) / 2.0
    radius = np.hypot(x, y)
    ring = (radius / 0.25).astype(int)
    mean = np.bincount(ring.ravel(), img.ravel()) / np.maximum(np.bincount(ring.ravel()), 1)
    resid = img - mean[ring]
    disc = (radius >= 4) & (radius < n // 2)
    return float((resid[disc] ** 2).sum() / (img[disc] ** 2).sum())


# --------------------------------------------------------------------------- catalogue
def test_catalogue_is_deterministic_and_seed_dependent(cat: pd.DataFrame) -> None:
    again = simulate_catalogue({"n_galaxies": 300}, seed=SEED, bands=BANDS)
    pd.testing.assert_frame_equal(cat, again)
    other = simulate_catalogue({"n_galaxies": 300}, seed=SEED + 1, bands=BANDS)
    assert not np.array_equal(cat["mag_r"].to_numpy(), other["mag_r"].to_numpy())
    assert not np.array_equal(cat["objid"].to_numpy(), other["objid"].to_numpy())


def test_catalogue_columns_ids_and_positions(cat: pd.DataFrame) -> None:
    assert len(cat) == 300
    assert cat["objid"].dtype == np.int64
    assert cat["objid"].is_unique and cat["objid"].is_monotonic_increasing
    assert (cat["objid"] > 1_237_000_000_000_000_000).all()
    assert set(cat["label"]) <= set(SIMULATED_CLASSES)
    reg = SIM_DEFAULTS.region
    assert cat["ra"].between(reg.ra_min, reg.ra_max).all()
    assert cat["dec"].between(reg.dec_min, reg.dec_max).all()
    for b in BANDS:
        for c in COMPONENTS:
            assert f"flux_{c}_{b}" in cat.columns
        assert f"petroMag_{b}" in cat.columns
        comp_sum = sum(cat[f"flux_{c}_{b}"] for c in COMPONENTS)
        np.testing.assert_allclose(comp_sum, cat[f"flux_{b}"], rtol=1e-12)
    for col in ("petroR50_r", "petroR90_r", "fracDeV_r", "deVAB_r", "expAB_r", "psf_fwhm"):
        assert col in cat.columns
        assert cat[col].dtype == np.float64
    assert "petroMag_u" not in cat.columns and "flux_z" not in cat.columns
    # labels are not grouped by objid
    first_half = cat["label"].iloc[:150].value_counts()
    assert len(first_half) == 3


def test_bands_subset_same_draws() -> None:
    a = simulate_catalogue({"n_galaxies": 50}, seed=3, bands=["r"])
    b = simulate_catalogue({"n_galaxies": 50}, seed=3, bands=["z", "u", "r"])
    pd.testing.assert_series_equal(a["flux_r"], b["flux_r"])
    pd.testing.assert_series_equal(a["petroMag_r"], b["petroMag_r"])
    assert {"petroMag_u", "petroMag_z", "flux_arms_u"} <= set(b.columns)


def test_class_counts_follow_fractions() -> None:
    c = simulate_catalogue(
        {"n_galaxies": 101, "class_fractions": {"elliptical": 2, "spiral": 1, "edge_on": 0}},
        seed=1,
        bands=BANDS,
    )
    counts = c["label"].value_counts().to_dict()
    assert counts == {"elliptical": 67, "spiral": 34}  # 67.33, 33.67: largest remainder
    c = simulate_catalogue({"n_galaxies": 10}, seed=1, bands=BANDS)
    assert sorted(c["label"].value_counts().tolist()) == [3, 3, 4]


def test_magnitudes_range_and_number_counts() -> None:
    c = simulate_catalogue({"n_galaxies": 20000}, seed=2, bands=BANDS)
    lo, hi = SIM_DEFAULTS.mag_r_range
    assert c["mag_r"].between(lo, hi).all()
    # rising counts: each magnitude bin holds more galaxies than the one before
    hist, _ = np.histogram(c["mag_r"], bins=np.linspace(lo, hi, 5))
    assert np.all(np.diff(hist) > 0)
    # measured Petrosian r magnitudes track the truth (Petrosian flux < total flux)
    diff = c["petroMag_r"] - c["mag_r"]
    assert -0.05 < diff.median() < 0.3
    # radii in the range of the SDSS main sample, ordered R50 < R90
    assert 1.0 < c["petroR50_r"].median() < 2.5
    assert (c["petroR90_r"] > c["petroR50_r"]).all()
    assert c["fracDeV_r"].between(0, 1).all() and c["deVAB_r"].between(0, 1).all()
    # class signatures in the measured catalogue
    med = c.assign(
        gr=c["petroMag_g"] - c["petroMag_r"], conc=c["petroR90_r"] / c["petroR50_r"]
    ).groupby("label")[["gr", "conc", "deVAB_r", "fracDeV_r"]].median()
    assert med.loc["elliptical", "gr"] > med.loc["spiral", "gr"] + 0.15
    assert med.loc["elliptical", "conc"] > med.loc["spiral", "conc"] + 0.2
    assert med.loc["edge_on", "deVAB_r"] < 0.45 < med.loc["spiral", "deVAB_r"]
    assert med.loc["elliptical", "fracDeV_r"] > med.loc["spiral", "fracDeV_r"] + 0.3

    c2 = simulate_catalogue({"n_galaxies": 500, "mag_r_range": [15.0, 16.0]}, seed=2, bands=BANDS)
    assert c2["mag_r"].between(15.0, 16.0).all()


def test_large_catalogue_has_unique_ids() -> None:
    # its speed is measured by benchmarks/bench_simulated.py
    c = simulate_catalogue({"n_galaxies": 100_000}, seed=4, bands=BANDS)
    assert len(c) == 100_000 and c["objid"].is_unique


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"n_galaxies": 0}, "simulated.n_galaxies"),
        ({"n_galaxies": 2.5}, "simulated.n_galaxies"),
        ({"n_galaxies": True}, "simulated.n_galaxies"),
        ({"class_fractions": {"elliptical": -1}}, "simulated.class_fractions.elliptical"),
        ({"class_fractions": {"lenticular": 1}}, "simulated.class_fractions"),
        ({"class_fractions": {"elliptical": 0, "spiral": 0, "edge_on": 0}}, "simulated.class_fractions"),
        ({"class_fractions": [1, 1, 1]}, "simulated.class_fractions"),
        ({"pixel_scale": 0}, "simulated.pixel_scale"),
        ({"pixel_scale": "0.4"}, "simulated.pixel_scale"),
        ({"psf_fwhm": -1.0}, "simulated.psf_fwhm"),
        ({"psf_fwhm": float("nan")}, "simulated.psf_fwhm"),
        ({"mag_r_range": [18.0, 14.0]}, "simulated.mag_r_range"),
        ({"mag_r_range": [14.0]}, "simulated.mag_r_range"),
        ({"mag_r_range": "14-17"}, "simulated.mag_r_range"),
        ({"region": {"ra_min": 200, "ra_max": 150}}, "simulated.region"),
        ({"region": {"dec_min": -100}}, "simulated.region"),
        ({"region": {"dec_max": "north"}}, "simulated.region.dec_max"),
        ({"region": {"glon": 3}}, "simulated.region"),
        ({"n_galaxy": 10}, "simulated"),
    ],
)
def test_bad_config_names_the_key(params: dict, key: str) -> None:
    # the schema and galpipe.config.cross_field_checks reject it before any galaxy is drawn
    with pytest.raises(ConfigError, match=r"config key '" + key.replace(".", r"\.")):
        load_settings({"simulated": params})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        simulate_catalogue(params, seed=1, bands=BANDS)  # a plain mapping goes through the schema


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"seed": -1}, "seed"),
        ({"bands": ["g", "y"]}, "bands"),
        ({"bands": ["g", "g"]}, "bands"),
        ({"bands": []}, "bands"),
        ({"bands": ["red", "green", "blue"]}, "bands"),  # cross-field: the simulated source renders ugriz
    ],
)
def test_bad_seed_and_bands(config: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"config key '{key}"):
        load_settings({"source": "simulated", **config})


def test_bands_are_still_checked_by_the_library_call() -> None:
    with pytest.raises(ConfigError, match="bands"):
        simulate_catalogue(SIM_DEFAULTS, seed=1, bands=["g", "y"])


def test_schema_fills_defaults_and_fractions_are_normalised() -> None:
    p = build_section("simulated", {"region": {"ra_min": 10}, "class_fractions": {"spiral": 2, "edge_on": 0}})
    assert p.region.ra_min == 10.0 and p.region.ra_max == 200.0
    assert p.class_fractions == {"elliptical": 1.0, "spiral": 2, "edge_on": 0}  # schema default for the rest
    assert _normalised_fractions(p.class_fractions) == pytest.approx(
        {"elliptical": 1 / 3, "spiral": 2 / 3, "edge_on": 0.0})
    assert _normalised_fractions(SIM_DEFAULTS.class_fractions) == pytest.approx({c: 1 / 3 for c in SIMULATED_CLASSES})


def test_photometry_helpers() -> None:
    assert mag_to_nmgy(22.5) == pytest.approx(1.0)
    assert nmgy_to_mag(100.0) == pytest.approx(17.5)
    assert np.isnan(nmgy_to_mag(-1.0))
    # asinh magnitudes equal log magnitudes when bright, stay finite at zero flux
    assert asinh_mag(100.0, "r") == pytest.approx(17.5, abs=1e-4)
    assert np.isfinite(asinh_mag(0.0, "r")) and np.isfinite(asinh_mag(-1.0, "r"))
    sig = {b: pixel_noise_sigma(b) for b in SDSS_BANDS}
    assert sig["g"] < sig["r"] < sig["i"] < sig["z"]
    assert 0.02 < sig["r"] < 0.035


# --------------------------------------------------------------------------- rendering
def test_render_shape_determinism_and_order_independence(cat: pd.DataFrame) -> None:
    rows = [cat.iloc[k].to_dict() for k in range(3)]
    first = [render_galaxy(r, bands=BANDS, size=48, seed=SEED) for r in rows]
    reverse = [render_galaxy(r, bands=BANDS, size=48, seed=SEED) for r in rows[::-1]][::-1]
    for a, b in zip(first, reverse, strict=True):
        assert a.dtype == np.float32 and a.shape == (3, 48, 48)
        np.testing.assert_array_equal(a, b)
    other = render_galaxy(rows[0], bands=BANDS, size=48, seed=SEED + 1)
    assert not np.array_equal(first[0], other)
    # a band's pixels do not depend on which other bands are drawn, nor their order
    ri = render_galaxy(rows[0], bands=["i", "g"], size=48, seed=SEED)
    np.testing.assert_array_equal(ri[0], first[0][2])
    np.testing.assert_array_equal(ri[1], first[0][0])


def test_render_flux_matches_catalogue() -> None:
    c = simulate_catalogue({"n_galaxies": 400, "mag_r_range": [14.0, 15.0]}, seed=5, bands=BANDS)
    row = _first(c, "elliptical", "hlr_envelope < 3.0")
    img = render_galaxy(row, bands=BANDS, size=96, seed=5)
    for k, b in enumerate(BANDS):
        total = img[k].sum(dtype=np.float64)
        noise = pixel_noise_sigma(b) * img.shape[1]
        assert abs(total - row[f"flux_{b}"]) < 0.03 * row[f"flux_{b}"] + 5 * noise, b
    # the noiseless model holds the catalogue flux (minus light off the stamp)
    model = render_galaxy(row, bands=BANDS, size=96, seed=5, noise=False)
    np.testing.assert_allclose(model.sum(axis=(1, 2)), [row[f"flux_{b}"] for b in BANDS], rtol=0.03)
    # peak at the centre
    assert np.unravel_index(np.argmax(model[1]), model[1].shape) in {(47, 47), (47, 48), (48, 47), (48, 48)}


def test_empty_sky_noise_matches_documented_sigma(cat: pd.DataFrame) -> None:
    row = dict(_first(cat, "elliptical"))
    row["hlr_bulge"], row["hlr_envelope"] = 0.5, 0.8
    bands = ["u", "g", "r", "i", "z"]
    for b in bands:  # a faint source: the corners are empty sky
        for c in COMPONENTS:
            row[f"flux_{c}_{b}"] = 1.0 if c in ("bulge", "envelope") else 0.0
    img = render_galaxy(row, bands=bands, size=64, seed=9)
    for k, b in enumerate(bands):
        corners = np.concatenate(
            [img[k, :16, :16].ravel(), img[k, :16, -16:].ravel(), img[k, -16:, :16].ravel(), img[k, -16:, -16:].ravel()]
        )
        sigma = pixel_noise_sigma(b)
        assert corners.std() == pytest.approx(sigma, rel=0.08), b
        assert abs(corners.mean()) < 4 * sigma / np.sqrt(corners.size), b


def test_ellipticals_redder_than_spirals(cat: pd.DataFrame) -> None:
    def g_minus_r(label: str) -> float:
        rows = cat[cat.label == label].head(8)
        colours = []
        for r in rows.to_dict("records"):
            img = render_galaxy(r, bands=BANDS, size=48, seed=SEED)
            g, rr = img[0].sum(dtype=np.float64), img[1].sum(dtype=np.float64)
            colours.append(-2.5 * np.log10(g / rr))
        return float(np.median(colours))

    assert g_minus_r("elliptical") > g_minus_r("spiral") + 0.15


def test_edge_on_is_elongated_and_elliptical_is_not(cat: pd.DataFrame) -> None:
    edge = dict(_first(cat, "edge_on", "hlr_disc > 2.5"))
    img = render_galaxy(edge, bands=["r"], size=64, seed=1, noise=False)[0]
    assert _moments_q(img) < 0.4
    ell = dict(_first(cat, "elliptical", "q > 0.8"))
    img = render_galaxy(ell, bands=["r"], size=64, seed=1, noise=False)[0]
    assert _moments_q(img) > 0.7


def test_spiral_arms_present(cat: pd.DataFrame) -> None:
    spiral = dict(_first(cat, "spiral"))
    spiral.update(q=1.0, q_bulge=1.0, hlr_disc=5.0, hlr_bulge=1.0, arm_strength=0.6, psf_fwhm=1.4)
    ell = dict(_first(cat, "elliptical"))
    ell.update(q=1.0, q_bulge=1.0, hlr_bulge=3.5, hlr_envelope=7.0, psf_fwhm=1.4)
    bands = ["r"]
    s_img = render_galaxy(spiral, bands=bands, size=64, seed=1, noise=False)[0]
    e_img = render_galaxy(ell, bands=bands, size=64, seed=1, noise=False)[0]
    s_res, e_res = _azimuthal_residual(s_img), _azimuthal_residual(e_img)
    assert s_res > 0.01
    assert s_res > 20 * e_res
    # the arms are bluer than the bulge: the outer disc is bluer than the centre
    gr = render_galaxy(spiral, bands=["g", "r"], size=64, seed=1, noise=False)
    y, x = np.mgrid[:64, :64] - 31.5
    rad = np.hypot(x, y)
    inner, outer = rad < 2.5, (rad > 6) & (rad < 20)
    colour = [-2.5 * np.log10(gr[0][m].sum() / gr[1][m].sum()) for m in (inner, outer)]
    assert colour[0] > colour[1] + 0.05


def test_render_bad_input(cat: pd.DataFrame) -> None:
    row = cat.iloc[0].to_dict()
    missing = {k: v for k, v in row.items() if k != "psf_fwhm"}
    with pytest.raises(DataError, match="psf_fwhm"):
        render_galaxy(missing, bands=BANDS, size=32, seed=1)
    with pytest.raises(DataError, match="flux_bulge_u"):
        render_galaxy(row, bands=["u"], size=32, seed=1)
    with pytest.raises(DataError, match="label"):
        render_galaxy({**row, "label": "irregular"}, bands=BANDS, size=32, seed=1)
    with pytest.raises(ConfigError, match="size"):
        render_galaxy(row, bands=BANDS, size=4, seed=1)
    spiral = _first(cat, "spiral")
    for key, value in (("q", 0.0), ("psf_fwhm", -1.0), ("hlr_disc", float("nan")), ("n_bulge", 9.0)):
        with pytest.raises(DataError, match=key):
            render_galaxy({**spiral, key: value}, bands=BANDS, size=32, seed=1)
    with pytest.raises(DataError, match="non-finite"):
        render_galaxy({**spiral, "flux_disc_r": float("inf")}, bands=BANDS, size=32, seed=1)


# --------------------------------------------------------------------------- cutouts
def test_make_cutouts_layout_wcs_and_manifest(cat: pd.DataFrame, tmp_path) -> None:
    sub = cat.iloc[:3]
    manifest = make_cutouts(sub, tmp_path, bands=BANDS, size=40, seed=SEED)
    assert list(manifest.columns) == ["objid", "path", "status", "reason", "n_filled"]
    assert manifest["objid"].tolist() == sub["objid"].tolist()
    assert (manifest["status"] == "ok").all() and (manifest["reason"] == "").all()
    assert (manifest["n_filled"] == 0).all()
    for row, path in zip(sub.to_dict("records"), manifest["path"], strict=True):
        assert path == str(tmp_path / cutout_filename(row["objid"]))
        cut = read_cutout(path, bands=BANDS)
        assert cut.objid == row["objid"] and cut.bunit == "nanomaggy"
        assert cut.header["SOURCE"] == "simulated" and cut.header["PIXSCALE"] == pytest.approx(0.396)
        np.testing.assert_array_equal(cut.data, render_galaxy(row, bands=BANDS, size=40, seed=SEED))
        with fits.open(path) as hdul:
            assert hdul[0].header["BANDS"] == "g,r,i"
            for k, band in enumerate(BANDS, start=1):
                h = hdul[k].header
                assert h["FILTER"] == band and h["BUNIT"] == "nanomaggy"
                w = WCS(h)
                sky = w.pixel_to_world((40 - 1) / 2.0, (40 - 1) / 2.0)
                assert sky.ra.deg == pytest.approx(row["ra"], abs=1e-9)
                assert sky.dec.deg == pytest.approx(row["dec"], abs=1e-9)
                scale = np.abs(w.proj_plane_pixel_scales()[0].to_value("arcsec"))
                assert scale == pytest.approx(0.396)


def test_make_cutouts_shards_match_whole(cat: pd.DataFrame, tmp_path) -> None:
    sub = cat.iloc[:4]
    make_cutouts(sub, tmp_path / "whole", bands=BANDS, size=32, seed=SEED)
    make_cutouts(sub.iloc[2:], tmp_path / "shards", bands=BANDS, size=32, seed=SEED)
    make_cutouts(sub.iloc[:2], tmp_path / "shards", bands=BANDS, size=32, seed=SEED)
    for oid in sub["objid"]:
        a = read_cutout(tmp_path / "whole" / cutout_filename(oid)).data
        b = read_cutout(tmp_path / "shards" / cutout_filename(oid)).data
        np.testing.assert_array_equal(a, b)


def test_make_cutouts_resumes_and_repairs(cat: pd.DataFrame, tmp_path) -> None:
    sub = cat.iloc[:3]
    manifest = make_cutouts(sub, tmp_path, bands=BANDS, size=32, seed=SEED)
    paths = [str(p) for p in manifest["path"]]
    original = read_cutout(paths[1]).data
    # make mtimes distinguishable from a rewrite, then rerun: nothing is touched
    for p in paths:
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    make_cutouts(sub, tmp_path, bands=BANDS, size=32, seed=SEED)
    assert [os.stat(p).st_mtime_ns for p in paths] == [1_000_000_000] * 3
    # a corrupt (truncated) file and a file of the wrong shape are rewritten
    with open(paths[1], "r+b") as fh:
        fh.truncate(3000)
    make_cutouts(sub.iloc[:1], tmp_path, bands=BANDS, size=16, seed=SEED)  # wrong size for [0]
    manifest2 = make_cutouts(sub, tmp_path, bands=BANDS, size=32, seed=SEED)
    assert (manifest2["status"] == "ok").all()
    assert os.stat(paths[2]).st_mtime_ns == 1_000_000_000
    assert os.stat(paths[1]).st_mtime_ns != 1_000_000_000
    np.testing.assert_array_equal(read_cutout(paths[1]).data, original)
    assert read_cutout(paths[0], bands=BANDS).data.shape == (3, 32, 32)
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cutout_filename(o) for o in sub["objid"])


def test_make_cutouts_rejects_bad_catalogue(cat: pd.DataFrame, tmp_path) -> None:
    with pytest.raises(DataError, match="ra"):
        make_cutouts(cat.iloc[:2].drop(columns=["ra"]), tmp_path, bands=BANDS, size=32, seed=1)
    dup = pd.concat([cat.iloc[:1], cat.iloc[:1]])
    with pytest.raises(DataError, match="more than once"):
        make_cutouts(dup, tmp_path, bands=BANDS, size=32, seed=1)


# --------------------------------------------------------------------------- the Source class
def test_simulated_source_implements_the_interface(tmp_path) -> None:
    cfg = load_settings({"source": "simulated", "seed": 5, "bands": ["r", "i"], "cutout_size": 24,
                         "simulated": {"n_galaxies": 12}})
    src = SimulatedSource(cfg)
    assert isinstance(src, Source) and src.name == "simulated"
    assert src.bands == ("r", "i") and src.input_files() == [] and src.crop_fraction == 1.0
    # params: what the catalogue and the cutouts depend on, as plain data (a rule's params, a cache key)
    assert src.params() == {"source": "simulated", "seed": 5, "simulated": cfg.simulated.to_dict(),
                            "bands": ["r", "i"], "cutout_size": 24}
    df, prov = src.catalogue()
    pd.testing.assert_frame_equal(df, simulate_catalogue(cfg.simulated, seed=5, bands=["r", "i"]))
    assert prov["source"] == "simulated" and prov["params"] == cfg.simulated.to_dict()
    assert prov["seed"] == 5 and prov["bands"] == ["r", "i"] and "created_utc" not in prov
    man = src.make_cutouts(df.head(3), CutoutCache(tmp_path))
    assert man["status"].tolist() == ["ok"] * 3
    cut = read_cutout(man["path"].iloc[0], bands=["r", "i"])
    np.testing.assert_array_equal(cut.data, render_galaxy(df.iloc[0].to_dict(), bands=["r", "i"], size=24, seed=5))
    # an external image is loaded by the one shared loader
    ext = SimulatedSource.load_external(man["path"].iloc[0], size=12, crop_fraction=1.0)
    assert ext.data.shape == (2, 12, 12) and ext.bands == ("r", "i") and ext.bunit == "nanomaggy"


def test_a_live_writers_temp_file_survives_another_source_instance(tmp_path) -> None:
    """Parallel shard jobs share the cutout cache: only dead writers' temporary files are swept."""
    import subprocess
    import sys

    from galpipe.io.atomic import _HOST_TAG

    cfg = load_settings({"simulated": {"n_galaxies": 9}, "cutout_size": 16})
    df, _ = SimulatedSource(cfg).catalogue()
    cache_dir = tmp_path / "cutouts"
    cache_dir.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    try:
        live_tmp = cache_dir / f".{cutout_filename(int(df.objid[5]))}.p{writer.pid}h{_HOST_TAG}.abcd1234.tmp"
        live_tmp.write_bytes(b"half-written by a parallel shard job")
        dead_tmp = cache_dir / f".{cutout_filename(int(df.objid[4]))}.p{int(dead.stdout)}h{_HOST_TAG}.wxyz5678.tmp"
        dead_tmp.write_bytes(b"left behind by a killed job")
        man = SimulatedSource(cfg).make_cutouts(df.head(3), CutoutCache(cache_dir))
        assert (man["status"] == "ok").all()
        assert live_tmp.read_bytes() == b"half-written by a parallel shard job"
        assert not dead_tmp.exists()
    finally:
        writer.kill()
        writer.wait()
