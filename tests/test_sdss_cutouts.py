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

from galpipe.config import load_settings
from galpipe.errors import ConfigError, DataError
from galpipe.io.cutout_fits import read_cutout
from galpipe.sources.base import CutoutCache, Source
from galpipe.sources.sdss import SdssSource, query_catalogue
from galpipe.sources.sdss_cutouts import FrameCache, fetch_cutouts, frame_url, jpeg_url
from galpipe.testing.fakeserver import FakeSkyServer

BANDS = ["g", "r", "i"]
SIZE = 24


@pytest.fixture(scope="module")
def srv() -> FakeSkyServer:
    with FakeSkyServer(n_galaxies=16, seed=7, frame_shape=(96, 128)) as server:
        yield server


@pytest.fixture(scope="module")
def catalogue(srv: FakeSkyServer) -> pd.DataFrame:
    # every object of the fake sky (stars and QSOs included), as the catalogue stage gives it
    params = srv.params(labels={"scheme": "spec_class", "classes": ["galaxy", "star", "qso"]},
                        selection={"n_per_class": 100})
    cats = []
    for cls in ("galaxy", "star", "qso"):
        if (srv.table["class"] == cls.upper()).any():
            params["labels"]["classes"] = [cls]
            cats.append(query_catalogue(params, seed=0, bands=BANDS)[0])
    cat = pd.concat(cats, ignore_index=True)
    assert len(cat) == 16
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


def _truth_frame(srv: FakeSkyServer, row: pd.Series, band: str) -> tuple[np.ndarray, WCS]:
    raw = bz2.decompress(srv.frame_bytes(int(row["run"]), int(row["camcol"]), int(row["field"]),
                                         band))
    with fits.open(io.BytesIO(raw)) as hdul:
        return np.array(hdul[0].data), WCS(hdul[0].header)


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


def test_edge_galaxies_are_nan_filled_and_counted(frames_run: dict[str, Any]) -> None:
    man = frames_run["manifest"]
    edge = man[man["n_filled"] > 0]
    assert len(edge) >= 1, "the fake sky places some galaxies within a stamp of the edge"
    for _, m in edge.iterrows():
        cut = read_cutout(m["path"])
        union = np.isnan(cut.data).any(axis=0)
        assert int(union.sum()) == m["n_filled"] == cut.header["NFILLED"]
        assert 0 < m["n_filled"] < SIZE * SIZE
        assert np.isfinite(cut.data).any()
    inner = man[man["n_filled"] == 0]
    assert len(inner) >= 1
    assert all(np.isfinite(read_cutout(p).data).all() for p in inner["path"])


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
    assert all("scale=0.396000&width=32&height=32" in e["query"] for e in log)
    cut = read_cutout(man["path"][0], bands=rgb)
    assert cut.data.dtype == np.uint8 and cut.data.shape == (3, 32, 32) and cut.bunit == "DN"
    # the FITS layout is north up with row 0 at the bottom: the JPEG rows are flipped
    row = catalogue.iloc[0]
    (query,) = [e["query"] for e in log if f"ra={row['ra']:.8f}&dec={row['dec']:.8f}&" in e["query"]]
    direct = requests.get(jpeg_url(srv.skyserver_url, 17), params=query, timeout=10)
    jpeg = np.asarray(Image.open(io.BytesIO(direct.content)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(cut.data, jpeg[:, ::-1, :])

    srv.clear_log()
    params = srv.params(cutouts={"provider": "skyserver-jpeg", "jpeg_scale_mode": "petro"})
    man = fetch_cutouts(catalogue, tmp_path / "petro", bands=rgb, size=32, sdss=params,
                        frame_cache_dir=tmp_path / "cache")
    assert (man["status"] == "ok").all()
    by_ra = {f"{r:.8f}": r90 for r, r90 in zip(catalogue["ra"], catalogue["petroR90_r"],
                                               strict=True)}
    for e in srv.log:
        q = dict(kv.split("=") for kv in e["query"].split("&"))
        expected = np.clip(8.48 * by_ra[q["ra"]] / 32, 0.05, 30.0)
        assert float(q["scale"]) == pytest.approx(expected, abs=1e-6)
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
    man = fetch_cutouts(moved, tmp_path / "moved", bands=BANDS, sdss=srv.params(),
                        size=SIZE, frame_cache_dir=tmp_path / "c")
    assert man["status"].tolist() == ["failed", "ok", "ok", "ok"]
    assert "outside the frames" in man["reason"][0] and man["n_filled"][0] == -1
    # every galaxy failing is no error here either: the cutouts stage applies max_reject_fraction
    lost = catalogue.head(3).copy()
    lost["ra"] += 1.0
    man = fetch_cutouts(lost, tmp_path / "lost", bands=BANDS, sdss=srv.params(), size=SIZE,
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
