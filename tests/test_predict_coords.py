"""``galpipe predict --coords``: galaxies by position, SkyServer cutouts framed as the model's training images.

Small untrained models are saved with the metadata the train stage writes (the framing, not
the weights, is under test), and the stand-in SkyServer (:mod:`galpipe.testing.fakeserver`)
serves the SQL position look-up and the ImgCutout JPEGs.  The framing tests compare a
``--coords`` cutout with the image the model was trained on for the same stand-in galaxy:
for an ``sdss`` JPEG model the pipeline's own stamp (identical pixels), for a Galaxy Zoo 1
style ``images`` model a 423-pixel JPEG at 0.024 x petroR90_r arcsec/pixel cropped by the
images source (the same galaxy size in pixels).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from astropy.table import Table

import galpipe
from galpipe.cli import main
from galpipe.config import build_section, load_settings
from galpipe.errors import ConfigError, DataError
from galpipe.io.cutout_fits import read_cutout
from galpipe.nn.model import build_model
from galpipe.nn.persist import save_model
from galpipe.predict import InputContractError
from galpipe.predict_coords import coords_framing, predict_coords, read_coords
from galpipe.sources import sdss as sdss_mod
from galpipe.sources.images import load_external_image
from galpipe.sources.sdss_cutouts import fetch_cutouts, jpeg_url
from galpipe.stages.train import full_architecture, input_contract, preprocess_params, source_contract
from galpipe.testing import dr17_columns
from galpipe.testing.fakeserver import NEAREST_FUNCTION_COLUMNS, FakeSkyServer, execute_sql, make_sky

CLASSES = ["elliptical", "spiral"]
SIZE = 32
RGB = ["red", "green", "blue"]
HIDDEN = [{"type": "conv2d", "filters": 2}, "relu", "global_avg_pool"]
GZ1_SPAN = 10.15  # 423 px x 0.024 petroR90_r arcsec/px
SQLLOADER = Path("/work/.mirror/sciserver+sqlloader/repo")


def _raw(source: str, **section: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"source": source, "cutout_size": SIZE}
    if source == "images":
        raw["images"] = {"directory": ".", "labels_csv": "labels.csv", **section}
    elif source == "sdss":
        raw["bands"] = RGB
        raw["sdss"] = {"cutouts": {"provider": "skyserver-jpeg", **section}}
    return raw


def _model(folder: Path, raw: dict[str, Any], bands: list[str]) -> Path:
    """A model folder with the metadata the train stage writes for config ``raw``."""
    prep = preprocess_params(load_settings(raw))
    unit = "DN" if raw["source"] == "images" else None
    meta = {"experiment": folder.name, "description": "", "preset": None, "inputs": "image",
            "classes": list(CLASSES), "bands": bands, "image_shape": [SIZE, SIZE, 3],
            "normalisation": build_section("normalise").to_dict(), "features": None, "training": {},
            "galpipe_version": galpipe.__version__, "preprocess": prep,
            "input_contract": input_contract(prep, bands, (SIZE, SIZE, 3), unit, derived_from="test")}
    save_model(build_model(full_architecture(HIDDEN, len(CLASSES)), (SIZE, SIZE, 3), seed=0), folder, metadata=meta)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("coords")
    with FakeSkyServer(n_galaxies=12, seed=3, frame_shape=(256, 256)) as srv:
        cfg = root / "sdss.yaml"
        cfg.write_text(yaml.safe_dump({"sdss": srv.params()}))
        galaxies = srv.table[srv.table["class"] == "GALAXY"].reset_index(drop=True)
        yield SimpleNamespace(
            root=root, srv=srv, config=cfg, galaxies=galaxies,
            gz1=_model(root / "gz1", _raw("images", crop_fraction=0.5, span_r90=GZ1_SPAN), RGB),
            no_span=_model(root / "no_span", _raw("images", crop_fraction=0.5), RGB),
            petro=_model(root / "petro", _raw("sdss", jpeg_scale_mode="petro", jpeg_span_r90=8.48), RGB),
            flux=_model(root / "flux", _raw("simulated"), ["g", "r", "i"]),
        )


def _csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _run(env: Any, model: Path, coords: Path, wd: Path, **kw: Any) -> pd.DataFrame:
    return predict_coords(model, coords, wd / "out.csv", tta=False, seed=0, config=env.config,
                          cache_dir=wd / "cache", frame_cache_dir=wd / "sdss", show_progress=False, **kw)


def _requests(env: Any, endpoint: str) -> int:
    return sum(1 for e in env.srv.log if e["endpoint"] == endpoint)


# --------------------------------------------------------------------------- the config key and the contract
def test_images_span_r90_is_recorded_in_the_contract_times_the_crop() -> None:
    with_span = source_contract(load_settings(_raw("images", crop_fraction=0.5, span_r90=GZ1_SPAN)))["framing"]
    assert with_span["kind"] == "crop" and with_span["crop_fraction"] == 0.5
    assert with_span["span_r90"] == pytest.approx(5.075) and "5.075 x petroR90_r" in with_span["description"]
    assert "span_r90" not in source_contract(load_settings(_raw("images", crop_fraction=0.5)))["framing"]
    assert load_settings(_raw("images")).images.span_r90 is None  # the schema's default
    with pytest.raises(ConfigError, match=r"images\.span_r90"):
        load_settings(_raw("images", span_r90=-1))
    shipped = yaml.safe_load((Path(__file__).parents[1] / "config" / "gz1-sdss-jpeg.yaml").read_text())
    assert shipped["images"]["span_r90"] == pytest.approx(423 * 0.024, abs=0.01)


def test_framing_of_each_kind_of_model(env: Any) -> None:
    contract = {"size": [SIZE, SIZE], "channels": RGB, "pixel_unit": "DN"}
    fixed = coords_framing({**contract, "framing": {"kind": "pixel_scale", "arcsec_per_pixel": 0.4}}, "m")
    assert (fixed.kind, fixed.arcsec_per_pixel, fixed.wanted_scale(99.0)) == ("pixel_scale", 0.4, 0.4)
    crop = coords_framing({**contract, "framing": {"kind": "crop", "crop_fraction": 0.5, "span_r90": 5.075}}, "m")
    assert crop.kind == "petro" and crop.wanted_scale(6.4) == pytest.approx(5.075 * 6.4 / SIZE)
    with pytest.raises(InputContractError, match=r"unknown sky extent .*images\.span_r90"):
        coords_framing({**contract, "framing": {"kind": "crop", "crop_fraction": 0.5}}, "m")
    with pytest.raises(galpipe.errors.ModelError, match=r"input_contract\.framing\.span_r90"):
        coords_framing({**contract, "framing": {"kind": "petro", "span_r90": "big"}}, "m")


# --------------------------------------------------------------------------- the SQL look-up
def test_nearest_sql_names_only_dr17_columns_and_fits_in_a_url() -> None:
    positions = [(i, 180.0 + i * 1e-3, -1.5) for i in range(150)]
    pages = sdss_mod.nearest_pages(positions, dr=17)
    assert sum(len(p) for p in pages) == 150 and len(pages) > 1
    assert [p[0] for page in pages for p in page] == list(range(150))
    for page in pages:
        assert sdss_mod.sql_query_string_length(sdss_mod.build_nearest_sql(page), 17) <= sdss_mod.QUERY_STRING_MAX
    sql = sdss_mod.build_nearest_sql(pages[0])
    photo = {c.lower() for c in dr17_columns.TABLES["PhotoPrimary"]}
    function = {c.lower() for c in NEAREST_FUNCTION_COLUMNS}
    used = re.findall(r"\b([pn])\.(\w+)", sql)
    assert used and all(c.lower() in (photo if a == "p" else function) for a, c in used)
    assert "photoprimary" in dr17_columns.OBJECTS and "--" not in sql and ";" not in sql
    for bad, key in (([(0, float("nan"), 0.0)], r"positions\[0\]: ra"), ([(0, 10.0, 91.0)], r"positions\[0\]: dec"),
                     ([(0, 1.0, 1.0), (0, 2.0, 2.0)], "repeated"), ([], "expected 1 to")):
        with pytest.raises(ConfigError, match=key):
            sdss_mod.build_nearest_sql(bad)


@pytest.mark.skipif(not SQLLOADER.is_dir(), reason="no local mirror of sciserver/sqlloader")
def test_function_columns_are_fGetNearestObjEq_s() -> None:
    text = subprocess.run(["git", "-C", str(SQLLOADER), "show", "HEAD:schema/sql/spNearby.sql"], check=True,
                          capture_output=True, text=True, errors="replace").stdout
    body = text[text.index("CREATE FUNCTION fGetNearestObjEq "):]
    table = body[body.index("RETURNS @proxtab TABLE ("):body.index(") AS BEGIN")]
    declared = re.findall(r"^\s+(\w+)\s+(?:bigint|int|float)", table, re.M)
    assert tuple(declared) == NEAREST_FUNCTION_COLUMNS


def test_stand_in_finds_the_nearest_primary_within_the_radius() -> None:
    sky, _ = make_sky(8, seed=1, frame_shape=(96, 128))
    g0, g3 = sky.iloc[0], sky.iloc[3]
    sql = sdss_mod.build_nearest_sql([(5, g0.ra + 1.0 / 3600 / np.cos(np.radians(g0.dec)), g0.dec),
                                      (2, g3.ra, g3.dec), (7, 10.0, 10.0)], radius_arcsec=2.0)
    names, rows = execute_sql(sky, sql)
    assert names == list(sdss_mod.NEAREST_COLUMNS)
    assert [r[0] for r in rows] == [2, 5]  # ordered by row_index; (7) has no object: CROSS APPLY drops it
    assert rows[1][1] == g0.objid and rows[1][4] == g0.petroR90_r
    assert rows[1][5] * 60 == pytest.approx(1.0, rel=1e-3)  # distance in arcmin
    _, none = execute_sql(sky, sdss_mod.build_nearest_sql([(0, g0.ra + 1.0 / 3600, g0.dec)], radius_arcsec=0.5))
    assert none == []


# --------------------------------------------------------------------------- the CSV
def test_bad_rows_are_refused_naming_the_row(tmp_path: Path) -> None:
    good = {"ra": 180.0, "dec": 1.0}
    for bad, say in (({"ra": 400.0, "dec": 1.0}, "ra '400.0' is not a number in [0, 360)"),
                     ({"ra": "nan", "dec": 1.0}, "ra 'nan'"), ({"ra": 10.0, "dec": ""}, "dec ''"),
                     ({"ra": 10.0, "dec": 1.0, "petroR90_r": -9999}, "petroR90_r '-9999.0' is not a positive"),
                     ({"ra": 10.0, "dec": 1.0, "objid": "12x"}, "objid '12x' is not a 64-bit integer")):
        path = _csv(tmp_path / "c.csv", [good, {**good, "name": "NGC 1", **bad}])
        with pytest.raises(DataError) as err:
            read_coords(path)
        assert "row 2 (line 3), name 'NGC 1'" in str(err.value) and say in str(err.value), str(err.value)
    with pytest.raises(DataError, match=r"missing column\(s\) \['dec'\]"):
        read_coords(_csv(tmp_path / "c.csv", [{"ra": 1.0}]))
    ok = read_coords(_csv(tmp_path / "c.csv", [{"RA": 1.5, "Dec": -2.0, "OBJID": "1237661381693210625"}]))
    assert ok.loc[0, "objid"] == 1237661381693210625 and np.isnan(ok.loc[0, "petroR90_r"])  # exact 64-bit ids


# --------------------------------------------------------------------------- end to end
def test_coords_classifies_looks_up_and_reports_each_row(env: Any, tmp_path: Path, monkeypatch: Any,
                                                          capsys: Any) -> None:
    monkeypatch.chdir(tmp_path)
    g = env.galaxies
    rows = [{"ra": g.ra[0], "dec": g.dec[0], "petroR90_r": g.petroR90_r[0], "objid": 11, "name": "given"},
            {"ra": g.ra[1], "dec": g.dec[1], "petroR90_r": "", "objid": "", "name": "looked up"},
            {"ra": 10.0, "dec": -5.0, "petroR90_r": "", "objid": "", "name": "empty sky"}]
    coords = _csv(tmp_path / "galaxies.csv", rows)
    env.srv.clear_log()
    assert main(["predict", "--model", str(env.gz1), "--coords", str(coords), "--config", str(env.config),
                 "--output", "pred.csv", "--cache-dir", "cache"]) == 0
    assert "3 predictions -> pred.csv" in capsys.readouterr().out
    assert _requests(env, "sql") == 1 and _requests(env, "jpeg") == 2  # one query for the page, one JPEG a galaxy
    df = pd.read_csv("pred.csv", keep_default_na=False, dtype={"objid": str})
    assert list(df["name"]) == ["given", "looked up", "empty sky"] and list(df["row"]) == [1, 2, 3]
    assert list(df["status"]) == ["ok", "ok", "failed"]
    assert "no SDSS DR17 PhotoPrimary object within 3 arcsec of (10.000000, -5.000000)" in df["reason"][2]
    assert df["objid"][0] == "11" and df["objid"][1] == str(g.objid[1])  # a looked-up row gets the SDSS objid
    assert float(df["petroR90_r"][1]) == pytest.approx(g.petroR90_r[1]) and float(df["match_arcsec"][1]) < 0.01
    probs = df.loc[:1, ["p_elliptical", "p_spiral"]].astype(float).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and df["p_spiral"][2] == "" and df["pred"][2] == ""
    for suffix in (".ecsv", ".fits"):
        table = Table.read(f"pred{suffix}")
        assert list(table["name"]) == ["given", "looked up", "empty sky"] and len(table.meta) > 0
    meta = Table.read("pred.ecsv").meta
    assert any("row 3 (line 4), name 'empty sky'" in f for f in meta["failed"])
    # a rerun fetches nothing again
    env.srv.clear_log()
    again = predict_coords(env.gz1, coords, tmp_path / "again.csv", tta=False, seed=0, config=env.config,
                           cache_dir="cache", show_progress=False)
    assert _requests(env, "jpeg") == 0 and _requests(env, "sql") == 1
    assert np.allclose(again["p_spiral"].to_numpy()[:2], probs[:, 1], atol=1e-6)


def test_models_that_cannot_take_coords_are_refused(env: Any, tmp_path: Path, capsys: Any) -> None:
    coords = _csv(tmp_path / "c.csv", [{"ra": env.galaxies.ra[0], "dec": env.galaxies.dec[0]}])
    for model, say in ((env.no_span, "unknown sky extent"), (env.flux, "does not take SkyServer colour JPEGs")):
        capsys.readouterr()
        assert main(["predict", "--model", str(model), "--coords", str(coords), "--config", str(env.config),
                     "--output", str(tmp_path / "p.csv")]) == 1
        err = capsys.readouterr().err
        assert say in err and str(model) in err and not (tmp_path / "p.csv").exists()
    with pytest.raises(SystemExit):  # argparse: INPUT and --coords are mutually exclusive
        main(["predict", "--model", str(env.gz1), "x.csv", "--coords", str(coords)])
    assert "not allowed with argument INPUT" in capsys.readouterr().err
    assert main(["predict", "--model", str(env.gz1), "--output", str(tmp_path / "p.csv")]) == 1
    assert "give an INPUT (image, folder or catalogue) or --coords CSV" in capsys.readouterr().err


# --------------------------------------------------------------------------- the framing
def _light(img: np.ndarray) -> np.ndarray:
    """``(N, N)`` sum of the 8-bit planes ``(C, N, N)`` as float."""
    return img.astype(float).sum(axis=0)


def _half_light_radius(img: np.ndarray) -> float:
    """Radius (pixels, about the centre) holding half the light above the border's median."""
    light = _light(img)
    border = np.concatenate([light[0], light[-1], light[:, 0], light[:, -1]])
    light = np.clip(light - np.median(border), 0, None)
    yy, xx = np.indices(light.shape) - (light.shape[0] - 1) / 2.0
    r = np.hypot(xx, yy).ravel()
    order = np.argsort(r)
    cum = np.cumsum(light.ravel()[order])
    return float(r[order][np.searchsorted(cum, cum[-1] / 2.0)])


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_light(a).ravel(), _light(b).ravel())[0, 1])


def test_a_coords_cutout_is_framed_like_the_training_stamp(env: Any, tmp_path: Path) -> None:
    g = env.galaxies.iloc[[2]].reset_index(drop=True)
    coords = _csv(tmp_path / "one.csv", [{"ra": g.ra[0], "dec": g.dec[0], "petroR90_r": g.petroR90_r[0]}])
    # an sdss JPEG model: the pipeline's own stamp of the galaxy, pixel for pixel
    got = _run(env, env.petro, coords, tmp_path / "petro")
    sdss = build_section("sdss", env.srv.params(cutouts={"provider": "skyserver-jpeg", "jpeg_scale_mode": "petro",
                                                          "jpeg_span_r90": 8.48}), bands=RGB, source="sdss")
    man = fetch_cutouts(g.assign(objid=g.objid.astype(np.int64)), tmp_path / "stamps", sdss=sdss, bands=RGB,
                        size=SIZE, frame_cache_dir=tmp_path / "sdss")
    stamp = read_cutout(man["path"][0])
    ours = read_cutout(got["source_path"][0])
    assert np.array_equal(ours.data, stamp.data) and ours.header["PIXSCALE"] == stamp.header["PIXSCALE"]
    # a Galaxy Zoo 1 style images model: trained on 423-pixel JPEGs at 0.024 x petroR90_r, cropped to half
    got = _run(env, env.gz1, coords, tmp_path / "gz1")
    resp = requests.get(jpeg_url(env.srv.skyserver_url, 17), timeout=30, params={
        "ra": f"{g.ra[0]:.8f}", "dec": f"{g.dec[0]:.8f}", "scale": f"{0.024 * g.petroR90_r[0]:.6f}",
        "width": "423", "height": "423"})
    (tmp_path / "gz1.jpeg").write_bytes(resp.content)
    trained = load_external_image(tmp_path / "gz1.jpeg", size=SIZE, crop_fraction=0.5).data
    coords_view = load_external_image(got["source_path"][0], size=SIZE, crop_fraction=1.0).data  # what predict uses
    cropped_again = load_external_image(got["source_path"][0], size=SIZE, crop_fraction=0.5).data
    # the same picture (measured over the stand-in's galaxies: 0.98-0.995), the galaxy the same size
    assert _corr(coords_view, trained) > 0.95
    assert _half_light_radius(coords_view) == pytest.approx(_half_light_radius(trained), rel=0.1)
    # the model's crop applied a second time would show half the field, magnified (measured 0.58-0.83)
    assert _corr(cropped_again, trained) < 0.9
