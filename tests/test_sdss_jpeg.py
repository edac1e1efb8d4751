"""SkyServer ImgCutout JPEGs: the stand-in's limits are the real ones, galpipe stays inside them,
and the skyserver-jpeg provider runs through the catalogue and cutouts stages.

The real limits (SkyServerWS, commit 7cc9bb3e, Sciserver_webService/ImgCutout/ImgCutout.cs
lines 30-35 and 709-711): width and height clamped to [64, 2048] pixels, scale to
[0.015, 2400] arcsec/pixel (60 in the documentation); never refused, only clamped.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from PIL import Image

from galpipe.cli import main as cli_main
from galpipe.config import validate_config
from galpipe.errors import ConfigError
from galpipe.io.cutout_fits import read_cutout
from galpipe.sources.sdss import query_catalogue
from galpipe.sources.sdss_cutouts import (
    JPEG_SCALE_LIMITS,
    JPEG_SIDE_LIMITS,
    fetch_cutouts,
    jpeg_url,
    resample_area,
)
from galpipe.testing.fakeserver import FakeSkyServer

RGB = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def srv() -> Any:
    with FakeSkyServer(n_galaxies=16, seed=5, frame_shape=(64, 64)) as server:
        yield server


@pytest.fixture(scope="module")
def catalogue(srv: Any) -> pd.DataFrame:
    params = srv.params(labels={"scheme": "spec_class", "classes": ["galaxy"]}, selection={"n_per_class": 100})
    cat, _ = query_catalogue(params, seed=0, bands=RGB)
    return cat.head(4).reset_index(drop=True)


def _get(srv: Any, **query: str) -> requests.Response:
    return requests.get(jpeg_url(srv.skyserver_url, 17), params=query, timeout=30)


def _size(resp: requests.Response) -> tuple[int, int]:
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "image/jpeg", resp.content[:200]
    return Image.open(io.BytesIO(resp.content)).size


# --------------------------------------------------------------------------- the stand-in is ImgCutout
def test_stand_in_clamps_like_imgcutout(srv: Any) -> None:
    # sides below 64 and above 2048 come back clamped (no error): the old stand-in served 32 x 32
    assert _size(_get(srv, ra="180.1", dec="1.0", scale="0.4", width="32", height="10")) == (64, 64)
    assert _size(_get(srv, ra="180.1", dec="1.0", scale="0.4", width="3000", height="64")) == (2048, 64)
    # scale clamped to [0.015, 2400]: the same picture as at the limit
    low = _get(srv, ra="180.1", dec="1.0", scale="0.001", width="64", height="64").content
    assert low == _get(srv, ra="180.1", dec="1.0", scale="0.015", width="64", height="64").content
    high = _get(srv, ra="180.1", dec="1.0", scale="5000", width="64", height="64").content
    assert high == _get(srv, ra="180.1", dec="1.0", scale="2400", width="64", height="64").content
    # getJpegController.cs defaults: scale 0.396127, 128 x 128
    default = _get(srv, ra="180.1", dec="1.0")
    assert _size(default) == (128, 128)
    assert default.content == _get(srv, ra="180.1", dec="1.0", scale="0.396127", width="128", height="128").content
    # sexagesimal positions (Coord.hms2deg / dms2deg)
    hms = _get(srv, ra="12:00:24", dec="01:00:00", width="64", height="64").content
    assert hms == _get(srv, ra="180.1", dec="1", width="64", height="64").content


def test_stand_in_refuses_like_imgcutout(srv: Any) -> None:
    for query in ({"dec": "1.0"}, {"ra": "abc", "dec": "1.0"}, {"ra": "180", "dec": "1", "scale": "x"}):
        resp = _get(srv, **query)
        assert resp.status_code == 400 and resp.headers["Content-Type"] == "application/json"
        body = json.loads(resp.content)
        assert body["ErrorCode"] == 400 and body["ErrorType"] == "BadRequest" and body["ErrorMessage"]


# --------------------------------------------------------------------------- galpipe's requests
def _queries(srv: Any) -> list[dict[str, str]]:
    return [dict(kv.split("=") for kv in e["query"].split("&")) for e in srv.log if e["endpoint"] == "jpeg"]


def _within_limits(q: dict[str, str]) -> bool:
    side_ok = all(JPEG_SIDE_LIMITS[0] <= int(q[k]) <= JPEG_SIDE_LIMITS[1] for k in ("width", "height"))
    return side_ok and JPEG_SCALE_LIMITS[0] <= float(q["scale"]) <= JPEG_SCALE_LIMITS[1]


@pytest.mark.parametrize("size", [8, 32, 80])
def test_small_cutouts_fetch_64_pixels_once_per_galaxy(srv: Any, catalogue: pd.DataFrame, tmp_path: Path,
                                                       size: int) -> None:
    srv.clear_log()
    man = fetch_cutouts(catalogue, tmp_path, bands=RGB, size=size, frame_cache_dir=tmp_path / "f",
                        sdss=srv.params(cutouts={"provider": "skyserver-jpeg", "jpeg_scale": 0.396}))
    assert (man["status"] == "ok").all(), man["reason"].tolist()
    qs = _queries(srv)
    assert len(qs) == len(catalogue)  # one request per galaxy, no retries
    side = max(size, 64)
    assert all(q["width"] == q["height"] == str(side) and _within_limits(q) for q in qs), qs
    assert all(float(q["scale"]) == pytest.approx(0.396 * size / side, abs=1e-6) for q in qs)
    for p in man["path"]:
        cut = read_cutout(p, bands=RGB)
        assert cut.data.shape == (3, size, size) and cut.header["PIXSCALE"] == pytest.approx(0.396)


def test_a_clamped_answer_is_not_retried(srv: Any, catalogue: pd.DataFrame, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a request ever outside the limits, its whole, valid JPEG of another size fails at once."""
    import galpipe.sources.sdss_cutouts as sc

    monkeypatch.setattr(sc, "jpeg_side", lambda size: int(size))  # the old request: 32 pixels
    srv.clear_log()
    man = fetch_cutouts(catalogue.head(2), tmp_path, bands=RGB, size=32, frame_cache_dir=tmp_path / "f",
                        sdss=srv.params(cutouts={"provider": "skyserver-jpeg"}))
    assert (man["status"] == "failed").all() and man["reason"].str.contains("64x64 pixels, expected 32x32").all()
    assert len(_queries(srv)) == 2  # one request each (before: max_retries + 1 = 6)


def test_petro_framing_stays_within_the_limits(srv: Any, catalogue: pd.DataFrame, tmp_path: Path) -> None:
    cat = catalogue.head(3).copy()
    cat["petroR90_r"] = [0.001, 0.5, 1e5]  # tiny, ordinary, absurd
    srv.clear_log()
    man = fetch_cutouts(cat, tmp_path, bands=RGB, size=8, frame_cache_dir=tmp_path / "f",
                        sdss=srv.params(cutouts={"provider": "skyserver-jpeg", "jpeg_scale_mode": "petro"}))
    assert (man["status"] == "ok").all(), man["reason"].tolist()
    qs = _queries(srv)
    assert len(qs) == len(cat) and all(_within_limits(q) for q in qs), qs
    by_ra = {q["ra"]: float(q["scale"]) for q in qs}
    scales = [by_ra[f"{ra:.8f}"] for ra in cat["ra"]]
    assert scales[0] == pytest.approx(0.015)  # clipped up to ImgCutout's smallest scale
    assert scales[1] == pytest.approx(8.48 * 0.5 / 8 * 8 / 64)  # the Galaxy Zoo framing itself
    assert scales[2] == pytest.approx(30.0 * 8 / 64)  # clipped to JPEG_SCALE_RANGE's 30 arcsec/pixel


def test_area_resampling() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    half = resample_area(img, 32).astype(float)
    blocks = img.reshape(3, 32, 2, 32, 2).astype(float).mean(axis=(2, 4))
    assert np.abs(half - blocks).max() <= 0.5
    third = resample_area(img, 24).astype(float)  # a fractional factor: area weights, mean kept
    assert abs(third.mean() - img.mean()) < 0.5
    assert resample_area(img, 64) is img


# --------------------------------------------------------------------------- configuration
def _cfg(srv: Any, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"source": "sdss", "bands": RGB, "cutout_size": 32, "shards": 1,
                           "sdss": srv.params(cutouts={"provider": "skyserver-jpeg"}, selection={"n_per_class": 6})}
    for key, value in over.items():
        if key == "cutouts":
            cfg["sdss"]["cutouts"] = {**cfg["sdss"]["cutouts"], **value}
        else:
            cfg[key] = value
    return cfg


def test_validation_refuses_what_imgcutout_cannot_serve(srv: Any) -> None:
    validate_config(_cfg(srv))
    with pytest.raises(ConfigError, match=r"sdss\.cutouts\.jpeg_scale.*cutout_size 8"):
        validate_config(_cfg(srv, cutout_size=8, cutouts={"jpeg_scale": 0.1}))  # 0.0125 arcsec/px asked
    validate_config(_cfg(srv, cutout_size=8, cutouts={"jpeg_scale": 0.12}))
    with pytest.raises(ConfigError, match=r"sdss\.cutouts\.jpeg_scale"):
        validate_config(_cfg(srv, cutouts={"jpeg_scale": 0.01}))  # below ImgCutout's 0.015 at any size
    with pytest.raises(ConfigError, match=r"'bands'.*skyserver-jpeg"):
        validate_config(_cfg(srv, bands=["g", "r", "i"]))
    with pytest.raises(ConfigError, match=r"'bands'.*sdss-frames"):
        validate_config(_cfg(srv, cutouts={"provider": "sdss-frames"}))


def test_skyserver_jpeg_runs_catalogue_and_cutouts(srv: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """README's provider settings, end to end through the CLI against the stand-in."""
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(yaml.safe_dump(_cfg(srv)))
    wrong = _cfg(srv, bands=["g", "r", "i"])
    Path("wrong.yaml").write_text(yaml.safe_dump(wrong))
    assert cli_main(["validate-config", "--config", "c.yaml"]) == 0
    assert cli_main(["validate-config", "--config", "wrong.yaml"]) != 0
    assert "config key 'bands'" in capsys.readouterr().err
    srv.clear_log()
    assert cli_main(["catalogue", "--config", "c.yaml", "--output", "cat.parquet", "--shard-dir", "shards"]) == 0
    assert cli_main(["cutouts", "--config", "c.yaml", "--shard", "shards/0000.parquet",
                     "--output", "manifest.parquet"]) == 0
    cat, man = pd.read_parquet("cat.parquet"), pd.read_parquet("manifest.parquet")
    assert len(cat) > 0 and man["objid"].tolist() == cat["objid"].tolist() and (man["status"] == "ok").all()
    jpeg_requests = [e for e in srv.log if e["endpoint"] == "jpeg"]
    assert len(jpeg_requests) == len(cat) and all(e["status"] == 200 for e in jpeg_requests)
    cut = read_cutout(man["path"].iloc[0], bands=RGB)
    assert cut.data.shape == (3, 32, 32) and cut.bunit == "DN" and cut.header["SOURCE"] == "sdss"
