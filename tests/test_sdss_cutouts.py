"""SDSS cutouts: stamps cut from (fake) calibrated frames, the frame cache, JPEG cutouts."""

from __future__ import annotations

import bz2
import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
from astropy.io import fits
from astropy.wcs import WCS
from PIL import Image

from galpipe.catalogue import shard_catalogue
from galpipe.config import load_settings
from galpipe.errors import ConfigError, DataError
from galpipe.io.cutout_fits import read_cutout
from galpipe.io.parquet import read_metadata
from galpipe.sources.base import CutoutCache, Source, shard_group_columns
from galpipe.sources.download import VerificationError, parse_frame_bz2
from galpipe.sources.sdss import SdssSource, query_catalogue
from galpipe.sources.sdss_cutouts import FrameCache, fetch_cutouts, frame_url, jpeg_url
from galpipe.testing.fakeserver import FakeSkyServer

BANDS = ["g", "r", "i"]
SIZE = 24


#: Objects per field that the stamp tests cut (of the sky's 80).
PER_FIELD = 8


@pytest.fixture(scope="module")
def srv(full_frame_sky: dict[str, Any]) -> FakeSkyServer:
    # full-size SDSS frames (1489 x 2048, transposed WCS, 4 HDUs) on two fields: few fields, real
    # frames; the session's shared sky (tests/conftest.py), its frames rendered before any request
    with FakeSkyServer(**full_frame_sky) as server:
        yield server


@pytest.fixture(scope="module")
def catalogue(srv: FakeSkyServer) -> pd.DataFrame:
    """The first :data:`PER_FIELD` objects (by objid) of each field whose stamps lie inside the frames.

    Every object of the fake sky (stars and QSOs included) as the catalogue stage gives it, then
    those whose r-frame position is at least a stamp from every edge (the edge tests move some
    to the edges themselves).
    """
    params = srv.params(labels={"scheme": "spec_class", "classes": ["galaxy", "star", "qso"]},
                        selection={"n_per_class": len(srv.table)})
    cats = []
    for cls in ("galaxy", "star", "qso"):
        if (srv.table["class"] == cls.upper()).any():
            params["labels"]["classes"] = [cls]
            cats.append(query_catalogue(params, seed=0, bands=BANDS)[0])
    cat = pd.concat(cats, ignore_index=True).sort_values("objid", ignore_index=True)
    assert len(cat) == len(srv.table)
    xy = srv.table.set_index("objid").loc[cat["objid"], ["x_pix", "y_pix"]].to_numpy()
    ny, nx = srv.frame_shape
    inside = (xy >= SIZE).all(axis=1) & (xy[:, 0] <= nx - 1 - SIZE) & (xy[:, 1] <= ny - 1 - SIZE)
    cat = cat[inside].groupby(FIELD, sort=False).head(PER_FIELD).reset_index(drop=True)
    assert len(cat) == 2 * PER_FIELD and set(cat["label"]) >= {"galaxy", "star"}
    return cat


@pytest.fixture(scope="module")
def frames_run(
    srv: FakeSkyServer, catalogue: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("frames")
    srv.clear_log()
    manifest = fetch_cutouts(catalogue, root / "out", bands=BANDS, size=SIZE,
                             sdss=srv.params(), frame_cache_dir=root / "cache")
    return {"root": root, "manifest": manifest, "log": srv.log}


_TRUTH: dict[tuple[int, int, int, int, str], tuple[np.ndarray, WCS]] = {}


def _truth_frame(srv: FakeSkyServer, row: pd.Series, band: str) -> tuple[np.ndarray, WCS]:
    """The served frame's HDU 0 pixels and WCS (decoded once per frame: a full frame takes ~1 s)."""
    key = (id(srv), int(row["run"]), int(row["camcol"]), int(row["field"]), band)
    if key not in _TRUTH:
        raw = bz2.decompress(srv.frame_bytes(*key[1:]))
        with fits.open(io.BytesIO(raw)) as hdul:
            _TRUTH[key] = (np.array(hdul[0].data), WCS(hdul[0].header))
    return _TRUTH[key]


def test_every_galaxy_gets_a_stamp(frames_run: dict[str, Any], catalogue: pd.DataFrame) -> None:
    man = frames_run["manifest"]
    assert list(man.columns) == ["objid", "path", "status", "reason", "n_filled"]
    assert man["objid"].tolist() == catalogue["objid"].tolist()
    assert (man["status"] == "ok").all() and (man["reason"] == "").all()
    assert man["objid"].dtype == np.int64 and man["n_filled"].dtype == np.int64
    for path in man["path"]:
        cut = read_cutout(path, bands=BANDS)
        assert cut.data.shape == (3, SIZE, SIZE) and cut.data.dtype == np.float32
        assert cut.bunit == "nanomaggy" and cut.header["SOURCE"] == "sdss"
        assert cut.header["PIXSCALE"] == pytest.approx(0.396)


def test_galaxy_is_at_the_stamp_centre_in_every_band(
    frames_run: dict[str, Any], catalogue: pd.DataFrame, srv: FakeSkyServer
) -> None:
    man = frames_run["manifest"].set_index("objid")
    checked = 0
    for _, row in catalogue.iterrows():
        path = man.loc[row["objid"], "path"]
        with fits.open(path) as hdul:
            for k, band in enumerate(BANDS, start=1):
                stamp = hdul[k].data
                xs, ys = WCS(hdul[k].header).world_to_pixel_values(row["ra"], row["dec"])
                assert abs(xs - (SIZE - 1) / 2) <= 1.0 and abs(ys - (SIZE - 1) / 2) <= 1.0
                if not np.isfinite(stamp[round(float(ys)), round(float(xs))]):
                    continue
                frame, fwcs = _truth_frame(srv, row, band)
                x, y = fwcs.world_to_pixel_values(row["ra"], row["dec"])
                # the stamp pixel under the galaxy is the frame pixel under the galaxy
                assert stamp[round(float(ys)), round(float(xs))] == pytest.approx(
                    frame[round(float(y)), round(float(x))]
                )
                checked += 1
        if row["petroMag_r"] < 17.0 and man.loc[row["objid"], "n_filled"] == 0:
            r = read_cutout(path).data[1]
            c = SIZE // 2
            assert r[c - 2: c + 2, c - 2: c + 2].mean() > np.median(r) + 10 * 0.028
    assert checked >= 30


#: Edge positions in the r frame's pixels (0-based x, y) and roughly how much of a 24-pixel stamp
#: each leaves off the frame (g and i frames are offset by a few pixels).
EDGE_POSITIONS = ((3.0, 700.0), (2040.0, 600.0), (1000.0, 10.0))


@pytest.fixture(scope="module")
def edge_catalogue(srv: FakeSkyServer, catalogue: pd.DataFrame) -> pd.DataFrame:
    """Three galaxies moved near the edges of their own field's r frame: about 40%, 20% and 10% off."""
    cat = catalogue.head(len(EDGE_POSITIONS)).copy()
    for i, (x, y) in zip(cat.index, EDGE_POSITIONS, strict=True):
        row = cat.loc[i]
        w = srv.frame_wcs(int(row["run"]), int(row["camcol"]), int(row["field"]), "r")
        ra, dec = w.pixel_to_world_values(x, y)
        cat.loc[i, "ra"], cat.loc[i, "dec"] = float(ra), float(dec)
    return cat


#: Bands of the edge tests (two, so that the union of filled pixels differs from one band's).
EDGE_BANDS = ["g", "r"]


@pytest.fixture(scope="module")
def edge_run(srv: FakeSkyServer, edge_catalogue: pd.DataFrame, frames_run: dict[str, Any]) -> dict[str, Any]:
    """The edge galaxies' stamps with no fill limit (``max_fill_fraction: 1``)."""
    out = frames_run["root"] / "edge-loose"
    man = fetch_cutouts(edge_catalogue, out, bands=EDGE_BANDS, size=SIZE,
                        sdss=srv.params(cutouts={"max_fill_fraction": 1.0}),
                        frame_cache_dir=frames_run["root"] / "cache")
    return {"manifest": man, "out": out}


def test_edge_galaxies_are_nan_filled_and_counted(edge_run: dict[str, Any], frames_run: dict[str, Any]) -> None:
    man = edge_run["manifest"]
    assert (man["status"] == "ok").all() and (man["n_filled"] > 0).all()
    for _, m in man.iterrows():
        cut = read_cutout(m["path"])
        union = np.isnan(cut.data).any(axis=0)
        assert int(union.sum()) == m["n_filled"] == cut.header["NFILLED"]
        assert 0 < m["n_filled"] < SIZE * SIZE
        assert np.isfinite(cut.data).any()
    inner = frames_run["manifest"][frames_run["manifest"]["n_filled"] == 0]
    assert len(inner) >= 1
    assert all(np.isfinite(read_cutout(p).data).all() for p in inner["path"])


def test_edge_stamps_beyond_max_fill_fraction_fail_with_the_count(
    srv: FakeSkyServer, edge_catalogue: pd.DataFrame, edge_run: dict[str, Any], frames_run: dict[str, Any],
    tmp_path: Path
) -> None:
    """Issue 13 item 10: a stamp mostly off the frame was kept however empty; now it fails, saying how much."""
    kwargs: dict[str, Any] = dict(bands=EDGE_BANDS, size=SIZE, frame_cache_dir=frames_run["root"] / "cache")
    loose = edge_run["manifest"]
    fraction = loose["n_filled"].to_numpy() / SIZE**2
    assert fraction[0] > 0.3 and 0.1 < fraction[1] < 0.3 and fraction[2] <= 0.1, fraction
    default = fetch_cutouts(edge_catalogue, tmp_path / "default", sdss=srv.params(), **kwargs)  # 0.25
    assert default["status"].tolist() == ["failed", "ok", "ok"]
    assert f"{loose['n_filled'][0]} of {SIZE * SIZE} pixels" in default["reason"][0]
    assert "max_fill_fraction = 0.25" in default["reason"][0]
    strict_params = srv.params(cutouts={"max_fill_fraction": 0.1})
    strict = fetch_cutouts(edge_catalogue, tmp_path / "strict", sdss=strict_params, **kwargs)
    assert strict["status"].tolist() == ["failed", "failed", "ok"]
    for i in (0, 1):
        reason = strict["reason"][i]
        assert f"{loose['n_filled'][i]} of {SIZE * SIZE} pixels" in reason and "max_fill_fraction = 0.1" in reason
        assert strict["n_filled"][i] == -1 and not Path(strict["path"][i]).exists()
    assert strict["n_filled"][2] == loose["n_filled"][2]
    # a stamp already in the cache that exceeds the limit is refused too (without a request)
    srv.clear_log()
    again = fetch_cutouts(edge_catalogue, edge_run["out"], sdss=strict_params, **kwargs)
    assert again["status"].tolist() == ["failed", "failed", "ok"] and srv.log == []
    assert again["reason"][0] == strict["reason"][0].rsplit(" (run", 1)[0]


def test_stamps_are_north_up_east_left_from_transposed_frames(
    srv: FakeSkyServer, frames_run: dict[str, Any], catalogue: pd.DataFrame
) -> None:
    """Drift-scan frames are transposed (x across the scan ~ Dec); every stamp comes out north up, east
    left in FITS row order (row 0 south), as galpipe.io.cutout_fits defines, on the axis-aligned field
    (rotation 0: exactly) and the rotated one (20 degrees: the rest of the rotation stays in the WCS)."""
    row = catalogue.iloc[0]
    fw = srv.frame_wcs(int(row["run"]), int(row["camcol"]), int(row["field"]), "r")
    assert abs(fw.wcs.cd[0, 0]) < 1e-6 and abs(abs(fw.wcs.cd[0, 1]) - 0.396 / 3600) < 1e-9  # transposed
    man = frames_run["manifest"].set_index("objid")
    rotations = set()
    for _, row in catalogue.iterrows():
        geom = srv.fields[(int(row["run"]), int(row["camcol"]), int(row["field"]))]
        rotations.add(geom.rotation_deg)
        with fits.open(man.loc[row["objid"], "path"]) as hdul:
            for k in range(1, len(BANDS) + 1):
                w = WCS(hdul[k].header)
                x0, y0 = w.world_to_pixel_values(row["ra"], row["dec"])
                d = 5.0 / 3600.0
                xn, yn = w.world_to_pixel_values(row["ra"], row["dec"] + d)  # 5" north
                xe, ye = w.world_to_pixel_values(row["ra"] + d / np.cos(np.radians(row["dec"])), row["dec"])  # east
                north = np.degrees(np.arctan2(-(xn - x0), yn - y0))  # angle of north from +y, towards -x
                east = np.degrees(np.arctan2(-(ye - y0), -(xe - x0)))  # angle of east from -x, towards -y
                assert abs(north) <= 45.0 and abs(east - north) < 0.01, (row["objid"], north, east)
                if geom.rotation_deg == 0.0:
                    assert abs(north) < 0.01  # 5 arcsec from the galaxy, the TAN projection's own turn
                    np.testing.assert_allclose(w.wcs.cd if w.wcs.has_cd() else w.pixel_scale_matrix,
                                               [[-0.396 / 3600, 0], [0, 0.396 / 3600]], atol=1e-12)
    assert rotations == {0.0, 20.0}


def test_stand_in_frames_have_the_real_layout(srv: FakeSkyServer, catalogue: pd.DataFrame) -> None:
    """The SDSS frame data model: HDU0 2048 x 1489 float32 nanomaggies with a transposed TAN CD matrix,
    HDU1 the calibration vector, HDU2 the sky table (ALLSKY, XINTERP, YINTERP), HDU3 the trace;
    bz2-compressible (quantised); our parser (which frames_run used) takes HDU0 only and checks its shape."""
    row = catalogue.iloc[0]
    body = srv.frame_bytes(int(row["run"]), int(row["camcol"]), int(row["field"]), "r")
    assert body[:3] == b"BZh" and len(body) < 0.6 * 2048 * 1489 * 4
    with fits.open(io.BytesIO(bz2.decompress(body))) as hdul:
        assert len(hdul) == 4
        h = hdul[0].header
        assert (h["NAXIS1"], h["NAXIS2"], h["BITPIX"]) == (2048, 1489, -32)
        assert (h["CTYPE1"], h["CTYPE2"], h["BUNIT"]) == ("RA---TAN", "DEC--TAN", "nanomaggy")
        assert abs(h["CD1_1"]) < 1e-6 and abs(h["CD2_2"]) < 1e-6
        assert abs(abs(h["CD1_2"]) - 1.1e-4) < 1e-6 and abs(abs(h["CD2_1"]) - 1.1e-4) < 1e-6
        assert "PC1_1" not in h and h["NMGY"] > 0 and h["RUN"] == row["run"] and h["FRAME"] == row["field"]
        assert hdul[1].data.shape == (2048,) and hdul[1].data.dtype.kind == "f"
        sky = hdul[2].data
        assert sky["ALLSKY"][0].shape == (187, 256)
        assert sky["XINTERP"][0].shape == (2048,) and sky["YINTERP"][0].shape == (1489,)
        assert {"NODE", "INCL", "A", "B", "C", "D", "E", "F"} <= set(hdul[3].columns.names)
        # 10 significant bits, as FLOATCOMPRESS keeps
        assert not (hdul[0].data.astype(">f4").view(">u4") & np.uint32(0x1FFF)).any()
    with pytest.raises(VerificationError, match=r"shape \(1489, 2048\), expected \(372, 512\)"):
        parse_frame_bz2(body, expected_shape=(372, 512))


def test_frames_shared_by_a_field_are_downloaded_once(
    frames_run: dict[str, Any], catalogue: pd.DataFrame
) -> None:
    log = [e for e in frames_run["log"] if e["endpoint"] == "frame"]
    per_path = Counter(e["path"] for e in log)
    n_fields = catalogue[["run", "rerun", "camcol", "field"]].drop_duplicates().shape[0]
    assert n_fields < len(catalogue)
    assert len(per_path) == n_fields * len(BANDS) and set(per_path.values()) == {1}
    stats = frames_run["manifest"].attrs["stats"]
    assert stats["frames_downloaded"] == n_fields * len(BANDS)
    row = catalogue.iloc[0]
    url = frame_url("http://x/sas", 17, run=int(row["run"]), rerun=301, camcol=int(row["camcol"]),
                    field=int(row["field"]), band="g")
    assert f"/dr17/eboss/photoObj/frames/301/{int(row['run'])}/" in url
    assert url.endswith(f"frame-g-{int(row['run']):06d}-{int(row['camcol'])}-"
                        f"{int(row['field']):04d}.fits.bz2")
    assert "/dr12/boss/" in frame_url("http://x", 12, run=1, rerun=301, camcol=1, field=1,
                                      band="r")


FIELD = ["run", "rerun", "camcol", "field"]


def _fields_per_shard(parts: list[pd.DataFrame]) -> int:
    """How many (shard, field) pairs the shards hold: the number of fields when no field is split."""
    return sum(len(part[FIELD].drop_duplicates()) for part in parts)


@pytest.mark.parametrize("n_shards", [2, 4])
def test_shards_grouped_by_field_fetch_each_frame_once(
    srv: FakeSkyServer, catalogue: pd.DataFrame, tmp_path: Path, n_shards: int
) -> None:
    """Issue 13 item 8: dealt round-robin by objid, a field's galaxies landed in several shards and its
    frames were fetched by each.  Dealt by field, each frame is fetched once in total, even when every
    shard job has its own frame cache (jobs on different machines)."""
    src = SdssSource(load_settings({"source": "sdss", "bands": ["r"], "cutout_size": SIZE, "sdss": srv.params()}))
    assert src.shard_group_columns == tuple(FIELD)
    n_fields = len(catalogue[FIELD].drop_duplicates())
    assert _fields_per_shard(shard_catalogue(catalogue, n_shards)) > n_fields  # per-galaxy dealing splits fields
    parts = shard_catalogue(catalogue, n_shards, group_columns=shard_group_columns(src))
    assert _fields_per_shard(parts) == n_fields
    assert sorted(pd.concat(parts)["objid"]) == sorted(catalogue["objid"])
    srv.clear_log()
    for i, part in enumerate(parts):
        man = fetch_cutouts(part, tmp_path / "cutouts", bands=["r"], size=SIZE, sdss=srv.params(),
                            frame_cache_dir=tmp_path / f"frames-{i}")
        assert man["objid"].tolist() == part["objid"].tolist()
    fetched = Counter(e["path"] for e in srv.log if e["endpoint"] == "frame")
    assert len(fetched) == n_fields and set(fetched.values()) == {1}
    jpeg = SdssSource(load_settings({"source": "sdss", "bands": ["red", "green", "blue"], "cutout_size": SIZE,
                                     "sdss": srv.params(cutouts={"provider": "skyserver-jpeg"})}))
    assert shard_group_columns(jpeg) == ()


def test_catalogue_stage_deals_sdss_frames_shards_by_field(srv: FakeSkyServer, tmp_path: Path) -> None:
    """The catalogue stage asks the source how to group: sdss-frames shards never split a field."""
    from galpipe.stages import catalogue as catalogue_stage
    from galpipe.stages import stage_params

    cfg = load_settings({"source": "sdss", "bands": BANDS, "cutout_size": SIZE,
                         "sdss": srv.params(labels={"scheme": "spec_class", "classes": ["galaxy", "star"]},
                                            selection={"n_per_class": 100})})
    shards = [tmp_path / f"shard-{i}.parquet" for i in range(3)]
    n = catalogue_stage.run(stage_params(cfg, "catalogue"), tmp_path / "catalogue.parquet", shards)
    parts = [pd.read_parquet(p) for p in shards]
    assert sum(len(p) for p in parts) == n and n > 0
    assert _fields_per_shard(parts) == len(pd.concat(parts)[FIELD].drop_duplicates())
    assert read_metadata(shards[0])["shard_group_columns"] == FIELD


def test_rerun_skips_and_refetches_only_what_is_missing(
    frames_run: dict[str, Any], catalogue: pd.DataFrame, srv: FakeSkyServer
) -> None:
    root = frames_run["root"]
    kwargs = dict(bands=BANDS, size=SIZE, sdss=srv.params(), frame_cache_dir=root / "cache")
    srv.clear_log()
    man = fetch_cutouts(catalogue, root / "out", **kwargs)
    assert srv.log == [] and man.attrs["stats"]["skipped_existing"] == len(catalogue)
    pd.testing.assert_frame_equal(man, frames_run["manifest"])
    # a missing and a damaged cutout are remade from the frame cache, without any request
    paths = frames_run["manifest"]["path"]
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    Path(paths[0]).unlink()
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:3000])
    man = fetch_cutouts(catalogue, root / "out", **kwargs)
    assert srv.log == [] and (man["status"] == "ok").all()
    assert man.attrs["stats"]["skipped_existing"] == len(catalogue) - 2
    assert all(os.stat(p).st_mtime_ns == before[p] for p in paths[2:])
    # a corrupt cached frame is detected and fetched again
    row = catalogue.iloc[2]
    cache = FrameCache(root / "cache" / "frames", None)
    fpath = cache.path_for(17, int(row["run"]), 301, int(row["camcol"]), int(row["field"]), "r")
    fpath.write_bytes(b"BZh91AY&SY garbage")
    Path(paths[2]).unlink()
    man = fetch_cutouts(catalogue, root / "out", **kwargs)
    assert len(srv.log) == 1 and srv.log[0]["path"].endswith(fpath.name)
    assert (man["status"] == "ok").all()


def test_frame_cache_is_lru_and_bounded(tmp_path: Path) -> None:
    cache = FrameCache(tmp_path, max_bytes=2500)
    paths = [cache.path_for(17, 1, 301, 1, f, "r") for f in range(4)]
    cache.put(paths[0], b"a" * 1000)
    cache.put(paths[1], b"b" * 1000)
    os.utime(paths[0], (1, 1))
    os.utime(paths[1], (2, 2))
    cache._index = {p: (os.stat(p).st_mtime, 1000) for p in paths[:2]}
    assert cache.get(paths[0]) == b"a" * 1000  # touch: 0 is now the most recent
    cache.put(paths[2], b"c" * 1000)  # 3000 > 2500: evict the least recently used (1)
    assert paths[0].exists() and not paths[1].exists() and paths[2].exists()
    cache.pin(paths[0])
    cache.put(paths[3], b"d" * 1000)
    assert paths[0].exists() and not paths[2].exists() and paths[3].exists()
    cache.unpin(paths[0])
    assert cache.total_bytes <= 2500
    # a new cache instance sees the files on disk and cleans stale temporary files
    stale = tmp_path / ".frame-r.fits.bz2.x.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    again = FrameCache(tmp_path, max_bytes=2500)
    assert again.total_bytes == 2000 and not stale.exists()


def test_jpeg_provider_fixed_and_petro_scale(
    srv: FakeSkyServer, catalogue: pd.DataFrame, tmp_path: Path
) -> None:
    rgb = ["red", "green", "blue"]
    srv.clear_log()
    params = srv.params(cutouts={"provider": "skyserver-jpeg"})
    man = fetch_cutouts(catalogue, tmp_path / "fixed", bands=rgb, size=32, sdss=params,
                        frame_cache_dir=tmp_path / "cache")
    assert (man["status"] == "ok").all() and (man["n_filled"] == 0).all()
    log = srv.log
    assert len(log) == len(catalogue) and {e["endpoint"] for e in log} == {"jpeg"}
    # ImgCutout serves 64..2048 pixels: 32 pixels are fetched as 64 over the same field of view
    assert all("scale=0.198000&width=64&height=64" in e["query"] for e in log)
    cut = read_cutout(man["path"][0], bands=rgb)
    assert cut.data.dtype == np.uint8 and cut.data.shape == (3, 32, 32) and cut.bunit == "DN"
    assert cut.header["PIXSCALE"] == pytest.approx(0.396)
    # area-averaged 2 x 2, then the JPEG rows flipped (FITS layout: row 0 at the bottom, north up)
    row = catalogue.iloc[0]
    (query,) = [e["query"] for e in log if f"ra={row['ra']:.8f}&dec={row['dec']:.8f}&" in e["query"]]
    direct = requests.get(jpeg_url(srv.skyserver_url, 17), params=query, timeout=10)
    jpeg = np.asarray(Image.open(io.BytesIO(direct.content)).convert("RGB")).transpose(2, 0, 1)
    binned = jpeg.reshape(3, 32, 2, 32, 2).astype(float).mean(axis=(2, 4))
    assert np.abs(cut.data.astype(float) - binned[:, ::-1, :]).max() <= 0.5 + 1e-9

    srv.clear_log()
    params = srv.params(cutouts={"provider": "skyserver-jpeg", "jpeg_scale_mode": "petro"})
    man = fetch_cutouts(catalogue, tmp_path / "petro", bands=rgb, size=32, sdss=params,
                        frame_cache_dir=tmp_path / "cache")
    assert (man["status"] == "ok").all()
    by_ra = {f"{r:.8f}": r90 for r, r90 in zip(catalogue["ra"], catalogue["petroR90_r"],
                                               strict=True)}
    for e in srv.log:
        q = dict(kv.split("=") for kv in e["query"].split("&"))
        expected = np.clip(8.48 * by_ra[q["ra"]] / 32, 0.05, 30.0)  # the cutout's arcsec/pixel
        assert q["width"] == q["height"] == "64"
        assert float(q["scale"]) == pytest.approx(expected * 32 / 64, abs=1e-6)
    headers = [read_cutout(p).header["PIXSCALE"] for p in man["path"]]
    assert len(set(headers)) > 1

    with pytest.raises(ConfigError, match="red"):  # a library call; a config is checked at validation
        fetch_cutouts(catalogue, tmp_path / "x", bands=BANDS, size=32, sdss=params,
                      frame_cache_dir=tmp_path / "cache")


def test_bad_inputs(srv: FakeSkyServer, catalogue: pd.DataFrame, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = dict(size=SIZE, sdss=srv.params(), frame_cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="field"):
        fetch_cutouts(catalogue.drop(columns=["field"]), tmp_path / "o", bands=BANDS, **kwargs)
    with pytest.raises(DataError, match="more than once"):
        fetch_cutouts(pd.concat([catalogue, catalogue.head(1)]), tmp_path / "o", bands=BANDS,
                      **kwargs)
    with pytest.raises(ConfigError, match="bands"):
        fetch_cutouts(catalogue, tmp_path / "o", bands=["g", "y"], **kwargs)
    with pytest.raises(ConfigError, match=r"sdss\.cutouts\.provider"):
        fetch_cutouts(catalogue, tmp_path / "o", bands=BANDS, size=SIZE,
                      sdss=srv.params(cutouts={"provider": "ftp"}), frame_cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"sdss\.download\.concurrency"):
        fetch_cutouts(catalogue, tmp_path / "o", bands=BANDS, size=SIZE,
                      sdss=srv.params(download={"concurrency": "8"}), frame_cache_dir=tmp_path)
    # a galaxy whose position is not on its field's frames fails with a reason
    moved = catalogue.head(4).copy()
    moved.loc[moved.index[0], "ra"] += 1.0
    man = fetch_cutouts(moved, tmp_path / "moved", bands=["r"], sdss=srv.params(),
                        size=SIZE, frame_cache_dir=tmp_path / "c")
    assert man["status"].tolist() == ["failed", "ok", "ok", "ok"]
    assert "outside the frames" in man["reason"][0] and man["n_filled"][0] == -1
    # every galaxy failing is no error here either: the cutouts stage applies max_reject_fraction
    lost = catalogue.head(3).copy()
    lost["ra"] += 1.0
    man = fetch_cutouts(lost, tmp_path / "lost", bands=["r"], sdss=srv.params(), size=SIZE,
                        frame_cache_dir=tmp_path / "c")
    assert (man["status"] == "failed").all() and man["reason"].str.contains("outside the frames").all()


# --------------------------------------------------------------------------- the Source class and the shared cache
def test_sdss_source_fetches_into_the_shared_cache(
    srv: FakeSkyServer, catalogue: pd.DataFrame, tmp_path: Path
) -> None:
    cfg = load_settings({"source": "sdss", "bands": BANDS, "cutout_size": SIZE, "sdss": srv.params()})
    src = SdssSource(cfg, frame_cache_dir=tmp_path / "frames")
    assert isinstance(src, Source)
    cache = CutoutCache(tmp_path / "cutouts")
    man = src.make_cutouts(catalogue.head(5), cache)
    assert (man["status"] == "ok").all()
    assert man["path"].tolist() == [str(cache.path(o)) for o in catalogue["objid"].head(5)]
    assert list((tmp_path / "frames").rglob("*.fits.bz2"))
    # a rerun reuses what CutoutCache.load_valid accepts, keeping each galaxy's NFILLED
    srv.clear_log()
    again = src.make_cutouts(catalogue.head(5), cache)
    assert srv.log == [] and again.attrs["stats"]["skipped_existing"] == 5
    pd.testing.assert_frame_equal(again, man)


def test_a_live_writers_temp_file_in_the_cache_survives(
    srv: FakeSkyServer, catalogue: pd.DataFrame, tmp_path: Path
) -> None:
    """Parallel shard jobs share the cutout cache: a running job's temporary file is never removed,
    a killed job's is."""
    import subprocess
    import sys

    from galpipe.io.atomic import _HOST_TAG

    out = tmp_path / "cutouts"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    try:
        live = out / f".{int(catalogue['objid'].iloc[9])}.fits.p{writer.pid}h{_HOST_TAG}.abcd1234.tmp"
        live.write_bytes(b"being written by another shard job")
        stale = out / f".{int(catalogue['objid'].iloc[8])}.fits.p{int(dead.stdout)}h{_HOST_TAG}.wxyz5678.tmp"
        stale.write_bytes(b"left by a killed job")
        src = SdssSource(load_settings({"source": "sdss", "bands": BANDS, "cutout_size": SIZE,
                                        "sdss": srv.params()}), frame_cache_dir=tmp_path / "frames")
        man = src.make_cutouts(catalogue.head(4), CutoutCache(out))
        assert (man["status"] == "ok").all()
        assert live.read_bytes() == b"being written by another shard job"
        assert not stale.exists()
    finally:
        writer.kill()
        writer.wait()
