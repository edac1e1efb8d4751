"""The stand-in SkyServer/SAS: protocol fidelity with astroquery, content, faults, log."""

from __future__ import annotations

import bz2
import contextlib
import io
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from PIL import Image

from galpipe.errors import ConfigError
from galpipe.sources.sdss import build_page_sql
from galpipe.sources.sdss_cutouts import frame_url
from galpipe.testing.fakeserver import (
    FAULT_KINDS,
    HAPROXY_503,
    FakeSkyServer,
    FaultSpec,
    SqlError,
    SqlNotModelled,
    SqlRejection,
    SqlServerError,
    execute_sql,
    format_csv,
    make_sky,
    objid_from,
    skyserver_error_page,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def srv() -> FakeSkyServer:
    with FakeSkyServer(n_galaxies=16, seed=4, frame_shape=(96, 128)) as server:
        yield server


def test_sky_is_deterministic_and_consistent() -> None:
    a, fields_a = make_sky(30, seed=9, frame_shape=(96, 128))
    b, _ = make_sky(30, seed=9, frame_shape=(96, 128))
    c, _ = make_sky(30, seed=10, frame_shape=(96, 128))
    assert a.equals(b) and not a.equals(c)
    assert a["objid"].is_unique and a["objid"].is_monotonic_increasing
    row = a.iloc[0]
    assert row["objid"] == objid_from(row["run"], row["rerun"], row["camcol"], row["field"],
                                      int(row["objid"]) & 0xFFFF)
    # GZ1 flags follow the debiased fractions; only spectroscopic galaxies are in Galaxy Zoo
    gal = a[a["in_zoo"]]
    assert ((gal["p_el_debiased"] >= 0.8) == (gal["elliptical"] == 1)).all()
    assert (gal["uncertain"] == 1 - gal["spiral"] - gal["elliptical"]).all()
    assert set(a.loc[~a["in_zoo"], "class"]) <= {"STAR", "QSO"}
    assert len(fields_a) == 8


def test_sql_engine_conditions() -> None:
    table, _ = make_sky(40, seed=1, frame_shape=(96, 128))
    params = {"labels": {"scheme": "spec_class", "classes": ["galaxy"]},
              "selection": {"ra_min": 179.99, "ra_max": 180.1, "petro_mag_r_max": 17.0}}
    sql = build_page_sql(params, "galaxy", top=5, after_objid=int(table["objid"].iloc[3]))
    names, rows = execute_sql(table, sql, row_limit=1000)
    assert names[:3] == ["objid", "ra", "dec"] and names[-2:] == ["spec_class", "redshift"]
    t = table[(table["class"] == "GALAXY") & table["ra"].between(179.99, 180.1)
              & (table["petroMag_r"] <= 17.0) & (table["objid"] > table["objid"].iloc[3])]
    assert [r[0] for r in rows] == t["objid"].head(5).tolist()
    # spExecuteSQL's @limit: a TOP above it is refused, a statement without TOP gets TOP @limit
    with pytest.raises(SqlRejection, match=r"^error: limit is  top 2 SELECT TOP 5 p\.objid"):
        execute_sql(table, sql, row_limit=2)
    _, limited = execute_sql(table, sql.replace("TOP 5 ", ""), row_limit=2)
    assert len(limited) == 2
    # wrapped RA range
    wrap = build_page_sql({"labels": {"scheme": "spec_class"},
                           "selection": {"ra_min": 180.05, "ra_max": 180.0}}, "galaxy", top=100)
    _, rows = execute_sql(table, wrap, row_limit=1000)
    ras = np.array([r[1] for r in rows])
    assert len(ras) and ((ras >= 180.05) | (ras <= 180.0)).all()


@pytest.mark.parametrize(
    ("sql", "kind", "message"),
    [
        # what SQL Server says (binding errors against DR17's schema)
        ("SELECT TOP 5 p.objid FROM PhotoObj AS p WHERE p.secret > 0 ORDER BY p.objid", SqlServerError,
         "Invalid column name 'secret'."),
        ("SELECT TOP 5 z.objid, z.gz2class FROM zoo2MainSpecz AS z", SqlServerError,
         "Invalid column name 'objid'.\nInvalid column name 'gz2class'."),
        ("SELECT TOP 5 p.objid FROM zooSpec AS z JOIN PhotoObj AS p ON p.objid = z.dr8objid", SqlServerError,
         "Invalid column name 'dr8objid'."),
        ("SELECT TOP 5 p.objid FROM Users AS u WHERE p.objid > 0", SqlServerError, "Invalid object name 'Users'."),
        ("SELECT TOP 5 q.objid FROM PhotoObj AS p", SqlServerError,
         'The multi-part identifier "q.objid" could not be bound.'),
        # what spExecuteSQL refuses before running anything
        ("DELETE FROM PhotoObj", SqlRejection, "error: must be a select statement: DELETE FROM PhotoObj "),
        ("SELECT TOP 11 p.objid FROM PhotoObj AS p", SqlRejection,
         "error: limit is  top 10 SELECT TOP 11 p.objid FROM PhotoObj AS p "),
        # valid DR17 SQL beyond the stand-in: never silently ignored
        ("SELECT TOP 5 p.objid FROM PhotoObj AS p WHERE p.objid > 0 OR 1=1 ORDER BY p.objid", SqlNotModelled,
         "unsupported condition"),
        ("SELECT TOP 5 p.objid FROM PhotoObj AS p WHERE p.objid > 0 ORDER BY p.ra", SqlNotModelled, "ORDER BY"),
        ("SELECT TOP 5 p.psfMag_r FROM PhotoObj AS p", SqlNotModelled, "photoobj.psfMag_r exists in DR17"),
        ("SELECT TOP 5 s.plate FROM SpecObjAll AS s", SqlNotModelled, "SpecObjAll is not modelled"),
    ],
)
def test_sql_engine_answers_errors_as_the_real_stack(sql: str, kind: type[SqlError], message: str) -> None:
    table, _ = make_sky(8, seed=1, frame_shape=(96, 128))
    with pytest.raises(kind) as err:
        execute_sql(table, sql, row_limit=10)
    assert message in str(err.value)


def test_modelled_columns_are_dr17_columns() -> None:
    from galpipe.testing.dr17_columns import TABLES
    from galpipe.testing.fakeserver import _MODELLED

    dr17 = {name.lower(): {c.lower() for c in cols} for name, cols in TABLES.items()}
    for table, columns in _MODELLED.items():
        assert set(columns) <= dr17[table], table


def test_sql_answers_over_http(srv: FakeSkyServer) -> None:
    """Rows as CSV, SQL Server errors as x_results.aspx's 200 error page, spExecuteSQL
    rejections as an error_message table, the stand-in's own gaps as 501."""
    url = f"{srv.skyserver_url}/dr17/en/tools/search/x_results.aspx"

    def get(sql: str) -> requests.Response:
        return requests.get(url, params={"cmd": sql, "format": "csv", "searchtool": "SQL"}, timeout=10)

    bad = get("SELECT TOP 1 z.gz2class FROM zoo2MainSpecz AS z")
    assert bad.status_code == 200 and bad.headers["Content-Type"].startswith("text/html")
    assert bad.text == skyserver_error_page("Invalid column name 'gz2class'.").decode()
    assert "<title>Skyserver Error</title>" in bad.text and "<font color=red>Invalid column name" in bad.text
    refused = get("SELECT TOP 500001 p.objid, p.ra FROM PhotoObj AS p")
    assert refused.status_code == 200 and refused.text.splitlines()[:2] == ["#Table1", "error_message"]
    assert refused.text.splitlines()[2].startswith('"error: limit is  top 500000 SELECT TOP 500001 p.objid, p.ra')
    gap = get("SELECT TOP 1 p.psfMag_r FROM PhotoObj AS p")
    assert gap.status_code == 501 and "stand-in" in gap.text


def test_spexecutesql_throttle_per_client() -> None:
    with FakeSkyServer(n_galaxies=4, seed=0, frame_shape=(64, 64), sql_max_queries=3, sql_window_s=0.5) as s:
        url = f"{s.skyserver_url}/dr17/en/tools/search/x_results.aspx"
        sql = "SELECT TOP 1 p.objid FROM PhotoObj AS p"
        texts = [requests.get(url, params={"cmd": sql}, timeout=5).text for _ in range(6)]
        # more than 3 in the window: rejected (a rejected query is not counted)
        assert [t.splitlines()[1] for t in texts] == ["objid"] * 4 + ["error_message"] * 2
        assert texts[4].splitlines()[2] == f"ERROR: Maximum 3 queries allowed per minute. Rejected query: {sql} "
        time.sleep(0.55)
        assert requests.get(url, params={"cmd": sql}, timeout=5).text.splitlines()[1] == "objid"
    assert FakeSkyServer(n_galaxies=4, frame_shape=(64, 64))._throttle.limit == 60  # the real default


def test_sql_endpoint_faults_take_the_real_forms() -> None:
    sql = "SELECT TOP 1 p.objid FROM PhotoObj AS p"
    for kind, status in (("500", 200), ("503", 503)):
        faults = FaultSpec(rate=1.0, kinds=(kind,), max_per_path=None, endpoints=("sql",))
        with FakeSkyServer(n_galaxies=4, seed=0, frame_shape=(64, 64), faults=faults) as s:
            r = requests.get(f"{s.skyserver_url}/dr17/en/tools/search/x_results.aspx", params={"cmd": sql},
                             timeout=5)
        assert r.status_code == status and "Retry-After" not in r.headers
        assert ("Execution Timeout Expired" in r.text) if kind == "500" else (r.content == HAPROXY_503)


def test_csv_format() -> None:
    body = format_csv(["objid", "ra", "g"], [[1, 0.5, "Sc"], [2, 1.25, "a,b"]]).decode()
    assert body.splitlines() == ["#Table1", "objid,ra,g", "1,0.5,Sc", '2,1.25,"a,b"']


def test_astroquery_query_sql_talks_to_it(srv: FakeSkyServer) -> None:
    from astroquery.sdss import SDSS, conf

    with conf.set_temp("skyserver_baseurl", srv.skyserver_url):
        table = SDSS.query_sql(
            "SELECT TOP 3 p.objid, p.ra, s.class FROM PhotoObj AS p JOIN SpecObj AS s "
            "ON s.bestobjid = p.objid WHERE p.objid > 0 ORDER BY p.objid",
            data_release=17, cache=False,
        )
    assert isinstance(table, Table) and table.colnames == ["objid", "ra", "class"]
    assert list(table["objid"]) == srv.table["objid"].head(3).tolist()
    raw = requests.get(f"{srv.skyserver_url}/dr17/en/tools/search/x_results.aspx",
                       params={"cmd": "SELECT TOP 1 p.objid FROM PhotoObj AS p", "format": "csv"},
                       timeout=5)
    assert raw.text.startswith("#Table1\nobjid\n")


def test_astroquery_get_images_urls_match(srv: FakeSkyServer, tmp_path: Path) -> None:
    """astroquery's own get_images fetches the frame galpipe's frame_url points at."""
    from astroquery.sdss import SDSS, conf

    row = srv.table.iloc[0]
    matches = Table({k: [int(row[k])] for k in ("run", "rerun", "camcol", "field")})
    srv.clear_log()
    with conf.set_temp("sas_baseurl", srv.sas_url):
        images = SDSS.get_images(matches=matches, band="r", data_release=17, cache=False,
                                 show_progress=False)
    assert len(images) == 1 and images[0][0].data.shape == srv.frame_shape
    ours = frame_url(srv.sas_url, 17, run=int(row["run"]), rerun=int(row["rerun"]),
                     camcol=int(row["camcol"]), field=int(row["field"]), band="r")
    assert [e["path"] for e in srv.log] == [ours.replace(srv.skyserver_url, "")]


def test_frames_hold_galaxies_at_catalogue_positions(srv: FakeSkyServer) -> None:
    row = srv.table.sort_values("petroMag_r").iloc[0]  # the brightest object
    run, camcol, fnum = int(row["run"]), int(row["camcol"]), int(row["field"])
    positions: list[tuple[float, float]] = []
    for band in ("g", "i"):
        url = frame_url(srv.sas_url, 17, run=run, rerun=301, camcol=camcol, field=fnum, band=band)
        resp = requests.get(url, timeout=10)
        assert resp.status_code == 200
        with fits.open(io.BytesIO(bz2.decompress(resp.content))) as hdul:
            assert len(hdul) == 4 and hdul[0].header["BUNIT"] == "nanomaggy"
            data = hdul[0].data
            wcs = WCS(hdul[0].header)
        assert data.shape == srv.frame_shape and data.dtype.kind == "f"
        x, y = wcs.world_to_pixel_values(row["ra"], row["dec"])
        xi, yi = round(float(x)), round(float(y))
        _ny, _nx = data.shape
        box = data[max(0, yi - 3): yi + 4, max(0, xi - 3): xi + 4]
        peak = np.unravel_index(np.argmax(box), box.shape)
        assert abs(peak[0] + max(0, yi - 3) - y) <= 1.5 and abs(peak[1] + max(0, xi - 3) - x) <= 1.5
        assert box.max() > 10 * np.std(data[:10, :10])
        positions.append((float(x), float(y)))
    # frames of different bands are not pixel-aligned (as in SDSS): same sky, other pixel
    assert abs(positions[0][0] - positions[1][0]) > 1.0


def test_jpeg_endpoint(srv: FakeSkyServer) -> None:
    row = srv.table.iloc[0]
    resp = requests.get(f"{srv.skyserver_url}/dr17/SkyServerWS/ImgCutout/getjpeg",
                        params={"ra": row["ra"], "dec": row["dec"], "scale": 0.4, "width": 80,
                                "height": 30}, timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "image/jpeg"
    img = Image.open(io.BytesIO(resp.content))
    # ImgCutout clamps sides to [64, 2048] (tests/test_sdss_jpeg.py checks its limits in full)
    assert img.format == "JPEG" and img.size == (80, 64) and img.mode == "RGB"
    arr = np.asarray(img).astype(float).sum(axis=2)
    assert arr[29:35, 37:43].mean() > arr[:4, :4].mean()
    bad = requests.get(f"{srv.skyserver_url}/dr17/SkyServerWS/ImgCutout/getjpeg",
                       params={"ra": "x"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["ErrorType"] == "BadRequest"
    assert requests.get(f"{srv.skyserver_url}/nothing", timeout=5).status_code == 404


def test_faults_are_deterministic_and_logged() -> None:
    spec = FaultSpec(rate=0.5, seed=3, slow_s=0.01, retry_after_s=2, max_per_path=None)

    def run() -> list[tuple[str, int, str | None]]:
        with FakeSkyServer(n_galaxies=4, seed=0, faults=spec, frame_shape=(64, 64)) as s:
            for k in range(40):
                with contextlib.suppress(requests.exceptions.RequestException):
                    requests.get(f"{s.skyserver_url}/dr17/SkyServerWS/ImgCutout/getjpeg",
                                 params={"ra": 180.0, "dec": 1.0, "scale": 0.4, "width": 16,
                                         "height": 16 + k % 4}, timeout=5)
            log = s.log
        return [(e["query"], e["status"], e["fault"]) for e in log]

    first = run()
    assert first == run() and len(first) == 40
    with FakeSkyServer(n_galaxies=4, seed=0, faults=spec, frame_shape=(64, 64)) as s:
        kinds: Counter[str | None] = Counter()
        statuses: dict[str, set[int]] = {}
        for k in range(120):
            try:
                r = requests.get(f"{s.skyserver_url}/dr17/SkyServerWS/ImgCutout/getjpeg",
                                 params={"ra": 180.0, "dec": 1.0, "scale": 0.4, "width": 16,
                                         "height": 16 + k % 3}, timeout=5)
                if r.status_code == 503:
                    assert r.headers["Retry-After"] == "2"
            except requests.exceptions.RequestException:
                pass
        for e in s.log:
            kinds[e["fault"]] += 1
            statuses.setdefault(str(e["fault"]), set()).add(e["status"])
    assert 0.35 < 1 - kinds[None] / 120 < 0.65
    assert set(kinds) - {None} == set(FAULT_KINDS)
    assert statuses["500"] == {500} and statuses["503"] == {503} and statuses["html200"] == {200}


def test_fault_caps_and_sticky_faults() -> None:
    capped = FaultSpec(rate=1.0, kinds=("500",), max_per_path=2)
    with FakeSkyServer(n_galaxies=4, seed=0, faults=capped, frame_shape=(64, 64)) as s:
        url = f"{s.skyserver_url}/dr17/SkyServerWS/ImgCutout/getjpeg?ra=180&dec=1&scale=1&width=8"
        codes = [requests.get(url, timeout=5).status_code for _ in range(4)]
    assert codes == [500, 500, 200, 200]
    sticky = FaultSpec(rate=0.5, kinds=("500",), max_per_path=None, sticky=True, seed=1)
    with FakeSkyServer(n_galaxies=4, seed=0, faults=sticky, frame_shape=(64, 64)) as s:
        for w in range(8, 20):
            url = (f"{s.skyserver_url}/dr17/SkyServerWS/ImgCutout/getjpeg?ra=180&dec=1&scale=1"
                   f"&width={w}")
            codes = {requests.get(url, timeout=5).status_code for _ in range(3)}
            assert len(codes) == 1  # always or never
    with pytest.raises(ConfigError):
        FaultSpec(kinds=("teapot",))
    with pytest.raises(ConfigError):
        FaultSpec(rate=1.5)


def test_binds_to_loopback_only(srv: FakeSkyServer) -> None:
    assert srv.skyserver_url.startswith("http://127.0.0.1:")
    assert srv._httpd is not None and srv._httpd.server_address[0] == "127.0.0.1"


def test_command_line_entry_point() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "galpipe.testing.fakeserver", "--port", "0", "--galaxies", "6",
         "--frame-shape", "64,80"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("fake SkyServer: http://127.0.0.1:"), line
        base = line.split()[2]
        r = requests.get(f"{base}/dr17/en/tools/search/x_results.aspx",
                         params={"cmd": "SELECT TOP 2 p.objid FROM PhotoObj AS p"}, timeout=10)
        assert r.text.startswith("#Table1") and len(r.text.splitlines()) == 4
    finally:
        proc.terminate()
        proc.wait(timeout=10)
