"""The cutout FITS headers: checksums, DATE/ORIGIN/CREATOR, per-band NFILLED, no WCS without a
position, and fitsverify (HEASARC's FITS checker) clean on a cutout of every route."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from PIL import Image

import galpipe
from galpipe.errors import DataError
from galpipe.io.cutout_fits import (
    LAYOUT_VERSION,
    read_cutout,
    stable_fits_bytes,
    tan_wcs,
    write_cutout,
)
from galpipe.sources.base import CutoutCache
from galpipe.sources.images import make_cutouts as image_cutouts
from galpipe.sources.sdss import query_catalogue
from galpipe.sources.sdss_cutouts import fetch_cutouts
from galpipe.sources.simulated import make_cutouts as simulated_cutouts
from galpipe.sources.simulated import simulate_catalogue
from galpipe.testing.fakeserver import FakeSkyServer

GRI = ["g", "r", "i"]
RGB = ["red", "green", "blue"]
#: Keywords of a celestial WCS (astropy's WCS.to_header and the FITS WCS papers).
WCS_KEY = re.compile(r"^(WCSAXES|CRPIX\d|CRVAL\d|CDELT\d|CTYPE\d|CUNIT\d|CD\d_\d|PC\d_\d|LONPOLE|LATPOLE|"
                     r"RADESYS|EQUINOX|MJDREF|DATEREF|MJD-OBS|DATE-OBS)$")


def _stack(nan_pixels: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    data = np.random.default_rng(1).normal(0, 1, (3, 16, 16)).astype(np.float32)
    for k, n in enumerate(nan_pixels):
        data[k].ravel()[:n] = np.nan
    return data


# --------------------------------------------------------------------------- the cards
def test_checksums_date_creator_and_per_band_nfilled(tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    p = write_cutout(tmp_path / "c.fits", _stack((5, 0, 12)), bands=GRI, objid=3, ra=150.0, dec=2.0,
                     source="sdss", n_filled=12)
    with fits.open(p) as hdul:
        for hdu in hdul:
            assert "CHECKSUM" in hdu.header and "DATASUM" in hdu.header
            assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1
        h = hdul[0].header
        assert h["ORIGIN"] == "galpipe" and h["CREATOR"] == f"galpipe {galpipe.__version__}"
        assert h["GPLAYOUT"] == LAYOUT_VERSION and h["NFILLED"] == 12
        written = datetime.strptime(h["DATE"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        assert before <= written <= datetime.now(UTC)
        assert [hdul[b.upper()].header["NFILLED"] for b in GRI] == [5, 0, 12]
    cut = read_cutout(p, bands=GRI)
    assert cut.n_filled_bands == (5, 0, 12) and cut.header["NFILLED"] == 12
    assert cut.header["CREATOR"].startswith("galpipe ")


def test_source_date_epoch_fixes_the_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = write_cutout(tmp_path / "a.fits", _stack(), bands=GRI, objid=1, ra=1.0, dec=2.0, source="simulated")
    assert fits.getheader(a)["DATE"] == "2023-11-14T22:13:20"
    b = write_cutout(tmp_path / "b.fits", _stack(), bands=GRI, objid=1, ra=1.0, dec=2.0, source="simulated")
    assert a.read_bytes() == b.read_bytes()  # reproducible to the byte
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    c = write_cutout(tmp_path / "c.fits", _stack(), bands=GRI, objid=1, ra=1.0, dec=2.0, source="simulated")
    assert c.read_bytes() != a.read_bytes() and stable_fits_bytes(c) == stable_fits_bytes(a)
    d = write_cutout(tmp_path / "d.fits", _stack() + 1, bands=GRI, objid=1, ra=1.0, dec=2.0, source="simulated")
    assert stable_fits_bytes(d) != stable_fits_bytes(a)


@pytest.mark.parametrize("ra, dec, scale", [(math.nan, math.nan, 0.0), (10.0, -3.0, 0.0), (math.nan, math.nan, 0.4)])
def test_no_wcs_keywords_without_a_position_and_scale(tmp_path: Path, ra: float, dec: float, scale: float) -> None:
    data = np.zeros((3, 8, 8), np.uint8)
    p = write_cutout(tmp_path / "x.fits", data, bands=RGB, objid=1, ra=ra, dec=dec, source="images", bunit="DN",
                     pixel_scale=scale)
    with fits.open(p) as hdul:
        for hdu in hdul[1:]:
            assert not [k for k in hdu.header if WCS_KEY.match(k)], repr(hdu.header)
        assert ("RA" in hdul[0].header) == np.isfinite(ra)
    # with both, a north-up east-left TAN WCS
    q = write_cutout(tmp_path / "y.fits", data, bands=RGB, objid=1, ra=10.0, dec=-3.0, source="images", bunit="DN",
                     pixel_scale=0.4)
    w = WCS(fits.getheader(q, 1))
    assert w.wcs.ctype[0] == "RA---TAN" and w.pixel_scale_matrix[0, 0] < 0 < w.pixel_scale_matrix[1, 1]


def test_a_transposed_stamp_is_stored_north_up(tmp_path: Path) -> None:
    """A stamp given with a drift-scan (transposed, turned 20 degrees) WCS: flipped exactly, no resampling."""
    s, t = 0.396 / 3600, math.radians(20)
    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval, w.wcs.crpix = ["RA---TAN", "DEC--TAN"], [150.0, 2.0], [8.0, 9.5]
    w.wcs.cd = s * np.array([[math.sin(t), math.cos(t)], [math.cos(t), -math.sin(t)]])
    data = _stack()
    p = write_cutout(tmp_path / "t.fits", data, bands=GRI, objid=1, ra=150.0, dec=2.0, source="sdss", wcs=[w] * 3)
    with fits.open(p) as hdul:
        stored, w2 = hdul["G"].data, WCS(hdul["G"].header)
        assert hdul[0].header["REORIENT"]
    # every stored pixel holds the value of the original pixel at the same sky position
    yy, xx = np.mgrid[0:16, 0:16]
    ra, dec = w2.pixel_to_world_values(xx, yy)
    x0, y0 = w.world_to_pixel_values(ra, dec)
    np.testing.assert_allclose(x0, np.round(x0), atol=1e-6)
    np.testing.assert_array_equal(stored, data[0][np.round(y0).astype(int), np.round(x0).astype(int)])
    north = np.subtract(w2.world_to_pixel_values(150.0, 2.0 + 1 / 3600), w2.world_to_pixel_values(150.0, 2.0))
    assert north[1] > abs(north[0])
    # a north-up WCS is left alone
    q = write_cutout(tmp_path / "n.fits", data, bands=GRI, objid=1, ra=150.0, dec=2.0, source="sdss",
                     wcs=tan_wcs(150.0, 2.0, (16, 16), 0.396))
    np.testing.assert_array_equal(read_cutout(q).data, data)
    assert "REORIENT" not in fits.getheader(q)


# --------------------------------------------------------------------------- corruption and old files
def test_corrupt_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    p = write_cutout(tmp_path / "7.fits", _stack(), bands=GRI, objid=7, ra=1.0, dec=2.0, source="simulated")
    good = p.read_bytes()
    with fits.open(p) as hdul:
        data_start = hdul.fileinfo(2)["datLoc"]
    damaged = bytearray(good)
    damaged[data_start + 100] ^= 0x01  # one bit of band r's pixels: still a valid float
    p.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: HDU 2 \(R\) fails its DATASUM check"):
        read_cutout(p)
    assert CutoutCache(tmp_path).load_valid(7, size=16) is None  # so the cache makes it again
    damaged = bytearray(good)
    pos = good.index(b"OBJID   =") + 29
    damaged[pos] = ord("8")  # OBJID 7 -> 8: a header edit
    p.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: HDU 0 \(PRIMARY\) fails its CHECKSUM check"):
        read_cutout(p)


def test_files_of_the_old_layout_still_read(tmp_path: Path) -> None:
    """Layout 1: no checksums, one total NFILLED, an empty WCS without a position."""
    primary = fits.PrimaryHDU()
    for k, v in {"OBJID": 5, "BANDS": "g,r", "NBANDS": 2, "BUNIT": "nanomaggy", "SOURCE": "sdss",
                 "PIXSCALE": 0.396, "NFILLED": 9}.items():
        primary.header[k] = v
    hdus = [primary] + [fits.ImageHDU(np.ones((8, 8), np.float32), header=WCS(naxis=2).to_header(), name=b.upper())
                        for b in "gr"]
    fits.HDUList(hdus).writeto(tmp_path / "old.fits")
    cut = read_cutout(tmp_path / "old.fits", bands=["g", "r"])
    assert cut.header["NFILLED"] == 9 and cut.n_filled_bands is None and "GPLAYOUT" not in cut.header


def test_image_cutouts_of_the_old_layout_are_remade(tmp_path: Path) -> None:
    """Layout 1 stored 8-bit images upside down: a cached one is not reused even with the same SRCHASH."""
    img = np.zeros((16, 16, 3), np.uint8)
    img[:4] = 255  # the top rows bright (north)
    Image.fromarray(img).save(tmp_path / "a.png")
    row = pd.DataFrame({"objid": [1], "ra": [np.nan], "dec": [np.nan], "image_path": [str(tmp_path / "a.png")]})
    cache = CutoutCache(tmp_path / "c")
    image_cutouts(row, cache, size=16, crop_fraction=1.0)
    with fits.open(cache.path(1)) as hdul:  # turn it into a layout-1 file: upside down, no GPLAYOUT
        hdul[0].header.remove("GPLAYOUT")
        for hdu in hdul[1:]:
            hdu.data = hdu.data[::-1].copy()
        hdul.writeto(tmp_path / "old.fits", checksum=True)
    (tmp_path / "old.fits").replace(cache.path(1))
    assert read_cutout(cache.path(1)).data[0, 0, 0] == 255  # upside down, as layout 1 had it
    image_cutouts(row, cache, size=16, crop_fraction=1.0)
    again = read_cutout(cache.path(1))
    assert again.header["GPLAYOUT"] == LAYOUT_VERSION and again.data[0, -1, 0] == 255 and again.data[0, 0, 0] == 0


# --------------------------------------------------------------------------- fitsverify on every route
def _fitsverify(path: Path) -> tuple[int, int, str]:
    out = subprocess.run(["fitsverify", str(path)], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"Verification found (\d+) warning\(s\) and (\d+) error\(s\)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), out


@pytest.fixture(scope="module")
def route_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("routes")
    out: dict[str, Path] = {}
    sim = simulate_catalogue({"n_galaxies": 30}, seed=1, bands=GRI).head(1)
    man = simulated_cutouts(sim, CutoutCache(root / "sim"), bands=GRI, size=16, seed=1)
    out["simulated"] = Path(man["path"].iloc[0])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "g.jpg")
    for name, (ra, dec) in {"images": (np.nan, np.nan), "images-with-coordinates": (150.0, 2.0)}.items():
        rows = pd.DataFrame({"objid": [1], "ra": [ra], "dec": [dec], "image_path": [str(root / "g.jpg")]})
        man = image_cutouts(rows, CutoutCache(root / name), size=16, crop_fraction=1.0)
        out[name] = Path(man["path"].iloc[0])
    with FakeSkyServer(n_galaxies=3, seed=4, frame_shape=(96, 128), galaxies_per_field=1) as srv:
        params = srv.params(labels={"scheme": "spec_class", "classes": ["galaxy", "star", "qso"]},
                            selection={"n_per_class": 100})
        cats = []
        for cls in ("galaxy", "star", "qso"):
            if (srv.table["class"] == cls.upper()).any():
                params["labels"]["classes"] = [cls]
                cats.append(query_catalogue(params, seed=0, bands=GRI)[0])
        cat = pd.concat(cats, ignore_index=True).head(1)
        for name, provider, bands in (("sdss-frames", "sdss-frames", GRI), ("skyserver-jpeg", "skyserver-jpeg", RGB)):
            man = fetch_cutouts(cat, root / name, bands=bands, size=16, frame_cache_dir=root / "fc",
                                sdss=srv.params(cutouts={"provider": provider, "max_fill_fraction": 1.0}))
            assert (man["status"] == "ok").all(), man["reason"].tolist()
            out[name] = Path(man["path"].iloc[0])
    return out


@pytest.mark.parametrize("route", ["simulated", "images", "images-with-coordinates", "sdss-frames",
                                   "skyserver-jpeg"])
def test_fitsverify_finds_nothing_on_any_route(route_files: dict[str, Path], route: str) -> None:
    if shutil.which("fitsverify") is None:
        pytest.skip("fitsverify is not installed (Debian package 'fitsverify'; scripts/test-services.sh installs it)")
    warnings, errors, report = _fitsverify(route_files[route])
    assert (warnings, errors) == (0, 0), report
    read_cutout(route_files[route])  # and its checksums verify


def test_route_headers(route_files: dict[str, Any]) -> None:
    for route, path in route_files.items():
        with fits.open(path) as hdul:
            h = hdul[0].header
            assert h["GPLAYOUT"] == LAYOUT_VERSION and "DATE" in h and "CHECKSUM" in h, route
            has_wcs = any(k.startswith("CTYPE") for k in hdul[1].header)
            assert has_wcs == (route not in ("images", "images-with-coordinates")), route
