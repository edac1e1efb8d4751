"""The input contract: ``galpipe predict`` refuses images unlike the model's training data.

Two small untrained models are saved with the metadata the train stage writes (no
training needed: the contract check happens before the network runs): a JPEG colour
model (``images`` source, ``red, green, blue``, ``DN``) and a flux model (``simulated``,
``g, r, i``, ``nanomaggy``, 0.396 arcsec/pixel).  Each mismatch is refused in one line
naming the file, what differs, the expected and the found value; ``--force`` classifies
anyway and records the differences in the output's metadata.  Models from before the
contract are checked against what their metadata implies; a forged contract is refused.
The contract the train stage writes after a real training run is checked in
``tests/test_predict.py`` (its trained fixtures).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.table import Table
from PIL import Image

import galpipe
from galpipe.cli import main
from galpipe.config import build_section, load_settings
from galpipe.io.cutout_fits import write_cutout
from galpipe.nn.model import build_model
from galpipe.nn.persist import save_model
from galpipe.stages.train import full_architecture, input_contract, preprocess_params

CLASSES = ["elliptical", "spiral"]
SIZE = 12
HIDDEN = [{"type": "conv2d", "filters": 2}, "relu", "global_avg_pool"]


def _metadata(source: str, bands: list[str], *, contract: bool = True) -> dict[str, Any]:
    """What :func:`galpipe.stages.train.run` writes for a model of ``source`` (contract by its own builder)."""
    raw = {"source": source, "cutout_size": SIZE}
    if source == "images":
        raw["images"] = {"directory": ".", "labels_csv": "labels.csv"}
    prep = preprocess_params(load_settings(raw))
    meta = {
        "experiment": f"tiny_{source}", "description": "", "preset": None, "inputs": "image",
        "classes": list(CLASSES), "bands": bands, "image_shape": [SIZE, SIZE, 3],
        "normalisation": build_section("normalise").to_dict(), "features": None, "training": {},
        "galpipe_version": galpipe.__version__, "preprocess": prep,
    }
    if contract:
        unit = "DN" if source == "images" else None  # images: what the train stage reads from the data
        meta["input_contract"] = input_contract(prep, bands, (SIZE, SIZE, 3), unit, derived_from="test")
    else:  # a model from before the contract: preprocess as it was then
        meta["preprocess"] = {k: prep[k] for k in ("source", "crop_fraction", "cutout_size")}
    return meta


def _save(folder: Path, meta: dict[str, Any]) -> Path:
    model = build_model(full_architecture(HIDDEN, len(CLASSES)), (SIZE, SIZE, 3), seed=0)
    save_model(model, folder, metadata=meta)
    return folder


def _fits(path: Path, bands: list[str], *, side: int = SIZE, scale: float = 0.396, bunit: str = "nanomaggy",
          objid: int = 1) -> Path:
    rng = np.random.default_rng(objid)
    data = rng.normal(1.0, 0.1, (len(bands), side, side)).astype(np.float32)
    if bunit == "DN":
        data = rng.integers(0, 255, (len(bands), side, side)).astype(np.uint8)
    write_cutout(path, data, bands=bands, objid=objid, ra=150.0 + objid / 100, dec=2.0, source="test",
                 bunit=bunit, pixel_scale=scale)
    return path


def _png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("contract")
    inputs = root / "inputs"
    inputs.mkdir()
    return SimpleNamespace(
        root=root,
        jpeg=_save(root / "jpeg_model", _metadata("images", ["red", "green", "blue"])),
        flux=_save(root / "flux_model", _metadata("simulated", ["g", "r", "i"])),
        old_jpeg=_save(root / "old_jpeg_model", _metadata("images", ["red", "green", "blue"], contract=False)),
        old_flux=_save(root / "old_flux_model", _metadata("simulated", ["g", "r", "i"], contract=False)),
        fits=_fits(inputs / "101.fits", ["g", "r", "i"], objid=101),
        png=_png(inputs / "102.png"),
        one_band=_fits(inputs / "103.fits", ["r"], objid=103),
        rzi=_fits(inputs / "104.fits", ["r", "i", "z"], objid=104),
        fine_scale=_fits(inputs / "105.fits", ["g", "r", "i"], scale=0.2, objid=105),
        binned=_fits(inputs / "106.fits", ["g", "r", "i"], side=2 * SIZE, scale=0.198, objid=106),
    )


def _refused(capsys: pytest.CaptureFixture[str], model: Path, image: Path, out: Path, *extra: str) -> str:
    """Run predict, expect exit 1 with one line on stderr and no output written; return that line."""
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(image), "--output", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("galpipe predict: error: ") and "does not match the input contract" in err
    assert "--force" in err
    assert not list(out.parent.glob(f"{out.stem}.*"))
    return err


# --------------------------------------------------------------------------- refusals
def test_nanomaggy_fits_refused_by_a_jpeg_model(m: SimpleNamespace, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, m.jpeg, m.fits, tmp_path / "p.csv")
    assert f"image {m.fits} " in err and str(m.jpeg) in err
    assert "pixel unit: expected 'DN'" in err and "got 'nanomaggy' (FITS BUNIT)" in err
    assert "bands: expected [red, green, blue], got [g, r, i]" in err


def test_jpeg_refused_by_a_nanomaggy_model(m: SimpleNamespace, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, m.flux, m.png, tmp_path / "p.csv")
    assert f"image {m.png} " in err
    assert "pixel unit: expected 'nanomaggy'" in err and "got 'DN' (8-bit image)" in err
    assert "bands: expected [g, r, i], got [red, green, blue]" in err


def test_one_channel_refused_by_a_three_channel_model(m: SimpleNamespace, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, m.flux, m.one_band, tmp_path / "p.csv")
    assert f"image {m.one_band} " in err and "channels: expected 3 (g, r, i), got 1 (r)" in err


def test_other_bands_and_another_pixel_scale_refused(m: SimpleNamespace, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, m.flux, m.rzi, tmp_path / "p.csv")
    assert "bands: expected [g, r, i], got [r, i, z]" in err and "pixel unit" not in err
    err = _refused(capsys, m.flux, m.fine_scale, tmp_path / "p.csv")
    assert "pixel scale: expected 0.396 arcsec/pixel" in err and "got 0.2 arcsec/pixel (PIXSCALE 0.2" in err
    # twice the pixels at half the scale, resized to the model's 12 pixels: the same framing, accepted
    assert main(["predict", "--model", str(m.flux), str(m.binned), "--output", str(tmp_path / "b.csv")]) == 0


def test_a_folder_with_one_mismatch_is_refused_not_silently_thinned(m: SimpleNamespace, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in (m.fits, m.binned, m.png):
        shutil.copy(p, folder / p.name)
    err = _refused(capsys, m.flux, folder, tmp_path / "p.parquet")
    assert f"image {folder / m.png.name} " in err


def test_older_models_are_checked_against_what_their_metadata_implies(
        m: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "input_contract" not in json.loads((m.old_jpeg / "model.json").read_text())["metadata"]
    err = _refused(capsys, m.old_jpeg, m.fits, tmp_path / "p.csv")
    assert "pixel unit: expected 'DN'" in err
    err = _refused(capsys, m.old_flux, m.png, tmp_path / "p.csv")
    assert "pixel unit: expected 'nanomaggy'" in err
    assert main(["predict", "--model", str(m.old_jpeg), str(m.png), "--output", str(tmp_path / "ok.csv")]) == 0
    # still refused as before: an older model without preprocess metadata
    broken = tmp_path / "no_preprocess"
    meta = _metadata("images", ["red", "green", "blue"], contract=False)
    del meta["preprocess"]
    _save(broken, meta)
    capsys.readouterr()
    assert main(["predict", "--model", str(broken), str(m.png), "--output", str(tmp_path / "x.csv")]) == 1
    assert "key 'preprocess': missing" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "value", "text"), [
    ("", ["red"], "key 'input_contract': "),
    ("channels", ["red", "green"], "key 'input_contract.channels': 2 channel(s) for a network taking 3"),
    ("channels", "red,green,blue", "key 'input_contract.channels'"),
    ("pixel_unit", 7, "key 'input_contract.pixel_unit'"),
    ("framing", {"kind": "pixel_scale", "arcsec_per_pixel": -1}, "key 'input_contract.framing.arcsec_per_pixel'"),
    ("size", [SIZE, 2 * SIZE], "key 'input_contract.size'"),
])
def test_a_forged_contract_is_refused_naming_the_key(m: SimpleNamespace, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     key: str, value: Any, text: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(m.jpeg, model)
    doc = json.loads((model / "model.json").read_text())
    if key:
        doc["metadata"]["input_contract"][key] = value
    else:
        doc["metadata"]["input_contract"] = value
    (model / "model.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(m.png), "--output", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"galpipe predict: error: model {model / 'model.json'}: {text}"), err
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------- --force
def test_force_classifies_and_records_the_differences(m: SimpleNamespace, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (m.png, m.one_band, m.fits):
        shutil.copy(p, folder / p.name)
    out = tmp_path / "forced.parquet"
    assert main(["predict", "--model", str(m.flux), str(folder), "--output", str(out), "--force"]) == 0
    df = pd.read_parquet(out)
    # the PNG is classified anyway; the 1-band FITS cannot be fed to a 3-channel network: skipped, recorded
    assert df["source_path"].tolist() == [str(folder / "101.fits"), str(folder / "102.png")]
    meta = {k.decode(): json.loads(v) for k, v in pq.read_schema(out).metadata.items() if k.startswith(b"galpipe.")}
    assert meta["galpipe.forced"] is True
    warnings = meta["galpipe.warnings"]
    assert any(w.startswith(f"{folder / '102.png'}: pixel unit: expected 'nanomaggy'") for w in warnings)
    assert any(w.startswith(f"{folder / '103.fits'}: channels: expected 3") for w in warnings)
    assert len(meta["galpipe.failed"]) == 1 and "103.fits" in meta["galpipe.failed"][0]
    assert meta["galpipe.input_contract"]["pixel_unit"] == "nanomaggy"
    ecsv = Table.read(out.with_suffix(".ecsv"), format="ascii.ecsv")
    assert ecsv.meta["forced"] is True and ecsv.meta["warnings"] == warnings
    hdr = Table.read(out.with_suffix(".fits"), format="fits").meta
    assert hdr["FORCED"] is True and hdr["NWARN"] == len(warnings)
    comments = "".join(hdr["comments"])  # COMMENT cards, split every 72 characters
    assert f"warning: {folder / '102.png'}: pixel unit: expected 'nanomaggy'" in comments


def test_matching_inputs_record_no_warning(m: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    assert main(["predict", "--model", str(m.jpeg), str(m.png), "--output", str(out)]) == 0
    meta = pq.read_schema(out).metadata
    assert json.loads(meta[b"galpipe.warnings"]) == [] and json.loads(meta[b"galpipe.forced"]) is False


def test_predict_never_overwrites_its_input(m: SimpleNamespace, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``galaxy.fits --output galaxy.csv`` would write the FITS table over the image: refused."""
    image = shutil.copy(m.fits, tmp_path / "galaxy.fits")
    before = Path(image).read_bytes()
    capsys.readouterr()
    assert main(["predict", "--model", str(m.flux), str(image), "--output", str(tmp_path / "galaxy.csv")]) == 1
    err = capsys.readouterr().err
    assert f"would overwrite the input {image}" in err
    assert Path(image).read_bytes() == before and not (tmp_path / "galaxy.csv").exists()
