"""The live SDSS services (SkyServer DR17, SAS): tiny real queries and downloads.

Skipped unless pytest runs with ``--remote-data`` (needs internet access).  The
same code paths run offline against the stand-in server in the other tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from galpipe.io.cutout_fits import read_cutout
from galpipe.sources.sdss import OUTPUT_COLUMNS, query_catalogue
from galpipe.sources.sdss_cutouts import fetch_cutouts

pytestmark = pytest.mark.remote_data

# a small patch of the SDSS equatorial stripe, rich in Galaxy Zoo galaxies
REGION = {"ra_min": 150.0, "ra_max": 152.0, "dec_min": -1.0, "dec_max": 1.0}
POLITE = {"max_queries_per_minute": 20.0, "timeout_s": 120.0, "max_retries": 2}


@pytest.mark.parametrize("scheme", ["gz1_flags", "gz2", "spec_class"])
def test_real_skyserver_top5(scheme: str) -> None:
    params = {
        "labels": {"scheme": scheme, "classes": ["galaxy"] if scheme == "spec_class" else None},
        "selection": {**REGION, "n_per_class": 5},
        "query": {**POLITE, "page_size": 5},
    }
    cat, prov = query_catalogue(params, seed=0, bands=["g", "r", "i"])
    assert list(cat.columns[: len(OUTPUT_COLUMNS)]) == list(OUTPUT_COLUMNS)
    assert 1 <= len(cat) <= 5 * len(prov["classes"]) and cat["objid"].is_unique
    assert cat["ra"].between(REGION["ra_min"], REGION["ra_max"]).all()
    assert cat["dec"].between(REGION["dec_min"], REGION["dec_max"]).all()
    assert cat["petroMag_r"].between(10.0, 17.77).all()
    assert (cat["rerun"] == 301).all()
    assert prov["data_release"] == 17 and prov["skyserver_url"] == "https://skyserver.sdss.org"


def test_real_frame_and_jpeg(tmp_path: Path) -> None:
    params = {
        "labels": {"scheme": "spec_class", "classes": ["galaxy"]},
        "selection": {**REGION, "n_per_class": 1},
        "query": POLITE,
        "download": {"concurrency": 1, "requests_per_second": 1.0, "max_retries": 2},
    }
    cat, _ = query_catalogue(params, seed=0, bands=["r"])
    man = fetch_cutouts(cat, tmp_path / "frames", bands=["r"], size=64, sdss=params,
                        frame_cache_dir=tmp_path / "cache")
    assert (man["status"] == "ok").all()
    cut = read_cutout(man["path"][0], bands=["r"])
    assert cut.data.shape == (1, 64, 64) and np.nanmax(cut.data) > 0.5  # nanomaggies
    frames = list((tmp_path / "cache").rglob("frame-r-*.fits.bz2"))
    assert len(frames) == 1
    jpeg = {**params, "cutouts": {"provider": "skyserver-jpeg", "jpeg_scale_mode": "petro"}}
    man = fetch_cutouts(cat, tmp_path / "jpeg", bands=["red", "green", "blue"], size=64,
                        sdss=jpeg, frame_cache_dir=tmp_path / "cache")
    assert (man["status"] == "ok").all()
    cut = read_cutout(man["path"][0], bands=["red", "green", "blue"])
    assert cut.data.dtype == np.uint8 and cut.data.max() > 50


def test_real_skyserver_reports_sql_errors_with_their_message() -> None:
    """A SQL Server error is HTTP 200 + the "Skyserver Error" page; its message reaches the user, once."""
    from galpipe.sources import sdss

    with pytest.raises(sdss.SqlRejected, match=r"Invalid column name 'gz2class'"):
        sdss._send_query("SELECT TOP 1 z.gz2class FROM zoo2MainSpecz AS z", dr=17, timeout_s=120.0,
                         junk=sdss._JunkBudget(0), rate_limit_wait_s=60.0)


@pytest.mark.parametrize("table", ["zooSpec", "zoo2MainSpecz", "SpecObj", "PhotoObj"])
def test_real_columns_match_the_dr17_fixture(table: str) -> None:
    """The columns DR17 serves are those galpipe/testing/dr17_columns.json derives from sqlloader."""
    from galpipe.sources import sdss
    from galpipe.testing.dr17_columns import TABLES

    got = sdss._send_query(f"SELECT TOP 1 * FROM {table}", dr=17, timeout_s=120.0, junk=sdss._JunkBudget(1),
                           rate_limit_wait_s=60.0)
    assert [c.lower() for c in got.colnames] == [c.lower() for c in TABLES[table]]
