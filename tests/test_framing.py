"""Framing: the galaxy's size measured on the image, and predict's reframing to the model's
convention (``model.json`` ``framing_measured``, ``predict --reframe``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import galpipe
from galpipe.cli import main
from galpipe.config import build_section, load_settings
from galpipe.framing import AUTO_TOLERANCE, convention, extent, reframe_fraction
from galpipe.nn.model import build_model
from galpipe.nn.persist import save_model
from galpipe.predict import load_input, reframe_input
from galpipe.stages.train import full_architecture, input_contract, preprocess_params

SIDE = 160  # the image files; the model sees the central half at 32 x 32
SIZE = 32


def _galaxy(sigma: float, side: int = SIDE, star: bool = False, seed: int = 0) -> np.ndarray:
    """``(side, side, 3)`` uint8: a centred elliptical Gaussian on a noisy sky (and a corner star)."""
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2.0
    g = 200 * np.exp(-(yy**2 / (2 * sigma**2) + xx**2 / (2 * (0.7 * sigma) ** 2)))
    if star:
        g += 250 * np.exp(-((yy + side * 0.4) ** 2 + (xx + side * 0.4) ** 2) / 4.0)
    img = 10 + g[..., None] * np.array([1.0, 0.8, 0.6]) + np.random.default_rng(seed).normal(0, 2, (side, side, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_extent_scales_with_the_galaxy_and_ignores_neighbours():
    r1, r2 = extent(_galaxy(8.0)), extent(_galaxy(16.0))
    assert r1 is not None and r2 / r1 == pytest.approx(2.0, rel=0.1)
    # a Gaussian's 90%-light radius is 2.15 sigma (here the geometric mean of the axes, 0.84 sigma)
    assert r1 == pytest.approx(2.15 * 8.0 * np.sqrt(0.7), rel=0.15)
    assert extent(_galaxy(8.0, star=True)) == pytest.approx(r1, rel=0.02)  # the corner star is another source
    assert extent(np.random.default_rng(0).normal(10, 2, (64, 64, 3))) is None  # blank sky: nothing to measure


def test_convention_and_reframe_factor():
    stamps = np.stack([_galaxy(s, side=64) for s in (5.0, 6.0, 7.0)]).astype(np.float32) / 255
    conv = convention(stamps)
    assert conv["n_measured"] == 3 and 0.1 < conv["r90_fraction"] < 0.4
    r = conv["r90_fraction"] * 64
    assert reframe_fraction(r, 64, conv, "auto") == 1.0
    assert reframe_fraction(r * 2, 64, conv, "auto") == pytest.approx(2.0)
    assert reframe_fraction(r * 1.2, 64, conv, "always") == pytest.approx(1.2)
    assert reframe_fraction(r * 1.2, 64, conv, "auto") == 1.0 and 1.2 < AUTO_TOLERANCE
    assert reframe_fraction(r * 2, 64, conv, "off") == 1.0
    assert reframe_fraction(r * 3, 64, conv, "auto") == 1.0  # beyond AUTO_LIMIT: a merged neighbour, not the image
    assert reframe_fraction(r * 3, 64, conv, "always") == pytest.approx(3.0)
    assert reframe_fraction(None, 64, conv, "always") == 1.0
    assert reframe_fraction(r * 2, 64, {"r90_fraction": None}, "always") == 1.0
    with pytest.raises(ValueError, match="reframe mode"):
        reframe_fraction(r, 64, conv, "sometimes")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An untrained images-source model (crop 0.5, 32 px) whose convention is measured on stamps
    made the way its cutouts stage makes them."""
    root = tmp_path_factory.mktemp("framing")
    prep = preprocess_params(load_settings({"source": "images", "cutout_size": SIZE,
                                            "images": {"directory": ".", "labels_csv": "labels.csv",
                                                       "crop_fraction": 0.5}}))
    meta = {"experiment": "tiny", "description": "", "preset": None, "inputs": "image",
            "classes": ["elliptical", "spiral"], "bands": ["red", "green", "blue"],
            "image_shape": [SIZE, SIZE, 3], "normalisation": build_section("normalise").to_dict(),
            "features": None, "training": {}, "galpipe_version": galpipe.__version__, "preprocess": prep}
    stamps = []
    for i, s in enumerate((9.0, 10.0, 11.0)):
        path = root / f"train{i}.png"
        Image.fromarray(_galaxy(s, seed=i)).save(path)
        stamps.append(np.moveaxis(load_input(path, meta).data, 0, -1) / 255.0)
    meta["framing_measured"] = convention(np.stack(stamps))
    meta["input_contract"] = input_contract(prep, meta["bands"], (SIZE, SIZE, 3), "DN", derived_from="test")
    folder = root / "model"
    save_model(build_model(full_architecture([{"type": "conv2d", "filters": 2}, "relu", "global_avg_pool"], 2),
                           (SIZE, SIZE, 3), seed=0), folder, metadata=meta)
    return folder, meta


def test_a_zoomed_image_is_reframed_to_the_training_framing(model, tmp_path: Path):
    _, meta = model
    plain, zoomed = tmp_path / "plain.png", tmp_path / "zoomed.png"
    Image.fromarray(_galaxy(10.0)).save(plain)
    Image.fromarray(_galaxy(20.0)).save(zoomed)  # the same galaxy seen twice as large
    ext_plain = load_input(plain, meta)
    same, f_plain = reframe_input(plain, meta, 0.5, ext_plain, "auto")
    assert f_plain == 1.0 and same is ext_plain  # in the convention: exactly what the pipeline makes
    ext_zoomed = load_input(zoomed, meta)
    fixed, f_zoomed = reframe_input(zoomed, meta, 0.5, ext_zoomed, "auto")
    assert f_zoomed == pytest.approx(2.0, rel=0.15)
    assert fixed.data.shape == ext_plain.data.shape and fixed.data.dtype == np.uint8
    r_plain = extent(np.moveaxis(ext_plain.data, 0, -1).astype(float))
    r_before = extent(np.moveaxis(ext_zoomed.data, 0, -1).astype(float))
    r_after = extent(np.moveaxis(fixed.data, 0, -1).astype(float))
    assert abs(r_after - r_plain) < 0.15 * r_plain < abs(r_before - r_plain)
    kept, f_off = reframe_input(zoomed, meta, 0.5, ext_zoomed, "off")
    assert f_off == 1.0 and kept is ext_zoomed


def test_predict_reports_the_reframe_factor(model, tmp_path: Path):
    folder, _ = model
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(_galaxy(10.0)).save(images / "1.png")
    Image.fromarray(_galaxy(5.0)).save(images / "2.png")  # half the size: widened... narrowed crop
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(folder), str(images), "--output", str(out)]) == 0
    df = pd.read_csv(out)
    assert df["reframe"].iloc[0] == 1.0 and df["reframe"].iloc[1] == pytest.approx(0.5, rel=0.15)
    assert main(["predict", "--model", str(folder), str(images), "--output", str(out), "--reframe", "off"]) == 0
    assert (pd.read_csv(out)["reframe"] == 1.0).all()
    legacy = tmp_path / "legacy"  # a model without a measured framing is never reframed
    legacy.mkdir()
    for f in ("model.json", "weights.npz"):
        (legacy / f).write_bytes((folder / f).read_bytes())
    doc = json.loads((legacy / "model.json").read_text())
    doc["metadata"].pop("framing_measured")
    (legacy / "model.json").write_text(json.dumps(doc))
    assert main(["predict", "--model", str(legacy), str(images), "--output", str(out), "--reframe", "always"]) == 0
    assert (pd.read_csv(out)["reframe"] == 1.0).all()
