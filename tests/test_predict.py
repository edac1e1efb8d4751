"""``galpipe predict``, ``galpipe evaluate`` and ``galpipe summary`` on tiny trained models.

Two tiny pipelines run in-process, through the same stage functions the
Snakemake rules call: a simulated g/r/i survey with a CNN that has dropout, and an
``images`` source built from a folder of synthetic labelled JPEGs (a 3-channel
RGB model).  Each model is evaluated on its test split as the pipeline does; the
tests then apply the model to FITS cutouts, JPEGs, folders and catalogues and
check that the probabilities are exactly the pipeline's (same preprocessing),
and score external labelled images and split files with ``evaluate``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from galpipe.cli import main
from galpipe.config import resolve_experiments, validate_config
from galpipe.io.cutout_fits import write_cutout
from galpipe.io.parquet import read_metadata
from galpipe.nn.persist import load_model
from galpipe.stages import (
    cutout_cache_dir,
    experiment_params,
    stage_params,
)
from galpipe.stages.catalogue import run as run_catalogue
from galpipe.stages.cutouts import run as run_cutouts
from galpipe.stages.evaluate import run as evaluate_experiment
from galpipe.stages.normalise import run as run_normalise
from galpipe.stages.split import run as run_split
from galpipe.stages.train import run as train_experiment

REPO = Path(__file__).resolve().parents[1]
TRAINING = {"epochs": 4, "batch_size": 16, "lr": 0.01, "early_stopping_patience": 0}
SIMULATED = {
    "source": "simulated", "seed": 5, "cutout_size": 24, "shards": 1,
    "simulated": {"n_galaxies": 60}, "split": {"row_group_size": 16}, "training": TRAINING,
    "experiments": {"cnn": {"architecture": [{"type": "conv2d", "filters": 4}, "relu", "maxpool2d",
                                             "global_avg_pool", {"type": "dropout", "rate": 0.3}]}},
    "evaluate": {"n_bootstrap": 20, "gallery_size": 4},
}
#: Synthetic RGB set: round red blobs ("E" -> elliptical) and thin blue streaks ("S" -> spiral).
N_JPEG = 40


def _pipeline(wd: Path, raw: dict[str, Any]) -> SimpleNamespace:
    """catalogue -> cutouts -> normalise -> split -> train -> evaluate, in ``wd``."""
    cfg = validate_config(raw)
    (wd / "config.yaml").write_text(yaml.safe_dump(raw))
    r = wd / "results"
    cache = cutout_cache_dir(cfg, root=wd / "resources" / "cutouts")
    run_catalogue(stage_params(cfg, "catalogue"), r / "catalogue.parquet", [r / "shard.parquet"])
    run_cutouts(stage_params(cfg, "cutouts"), r / "shard.parquet", r / "manifest.parquet", cache)
    run_normalise(stage_params(cfg, "normalise"), r / "manifest.parquet", r / "shard.parquet",
                    r / "normalised.parquet", r / "rejects.parquet")
    splits = {s: r / "split" / f"{s}.parquet" for s in ("train", "validation", "test")}
    run_split(stage_params(cfg, "split"), [r / "normalised.parquet"], splits, r / "split" / "summary.json")
    (name, exp), = resolve_experiments(cfg, [REPO / "config" / "architectures"]).items()
    model = r / "models" / name
    train_experiment(experiment_params(cfg, exp), splits["train"], splits["validation"], model / "model.json",
                     name=name, checkpoint_root=wd / "checkpoints", progress=False)
    ev = r / "evaluation" / name
    metrics = evaluate_experiment(stage_params(cfg, "evaluate"), model / "model.json", splits["test"],
                                  ev / "metrics.json", ev / "predictions.parquet", ev / "figures",
                                  history=model / "history.csv")
    preds = pd.read_parquet(ev / "predictions.parquet").set_index("objid")
    classes = list(metrics["classes"])
    return SimpleNamespace(wd=wd, cfg=cfg, config=wd / "config.yaml", cache=Path(cache), model=model,
                           splits=splits, metrics=metrics, preds=preds, classes=classes,
                           catalogue=r / "catalogue.parquet")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return _pipeline(tmp_path_factory.mktemp("sim"), SIMULATED)


def _synthetic_jpegs(folder: Path, n: int, seed: int = 0) -> list[tuple[int, str, str]]:
    """``n`` JPEGs in ``folder``; returns ``(objid, raw label, file name)`` rows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40] - 19.5
    rows = []
    for i in range(n):
        objid, raw = 9000 + i, "ES"[i % 2]
        if raw == "E":
            r2 = (xx**2 + yy**2) / rng.uniform(20, 60)
            colour = np.array([230, 150, 90])
        else:
            t = rng.uniform(0, np.pi)
            u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
            r2 = u**2 / rng.uniform(60, 120) + v**2 / 4.0
            colour = np.array([90, 140, 230])
        img = np.exp(-r2)[..., None] * colour + rng.normal(12, 6, (40, 40, 3))
        name = f"{objid}.jpeg" if i % 4 else f"{objid}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name, quality=92)
        rows.append((objid, raw, name))
    return rows


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    wd = tmp_path_factory.mktemp("rgb")
    images = wd / "images"
    images.mkdir()
    rows = _synthetic_jpegs(images, N_JPEG)
    lines = ["objid,morph,file"] + [f"{o},{raw},{name}" for o, raw, name in rows]
    (wd / "labels.csv").write_text("\n".join(lines) + "\n")
    raw_cfg = {
        "source": "images", "seed": 3, "cutout_size": 16, "shards": 1,
        "images": {"directory": str(images), "labels_csv": str(wd / "labels.csv"), "id_column": "objid",
                   "label_column": "morph", "path_column": "file",
                   "label_map": {"E": "elliptical", "S": "spiral"}, "crop_fraction": 0.8},
        "split": {"row_group_size": 16}, "training": TRAINING,
        "experiments": {"rgb_cnn": {"architecture": [{"type": "conv2d", "filters": 4}, "relu", "maxpool2d",
                                                     "global_avg_pool"]}},
        "evaluate": {"n_bootstrap": 20, "gallery_size": 4},
    }
    ns = _pipeline(wd, raw_cfg)
    ns.images, ns.rows = images, rows
    return ns


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``galpipe.cli.main`` configures logging to the (captured) stderr; undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _galpipe(*args: Any) -> int:
    return main([str(a) for a in args])


def _check_probabilities(df: pd.DataFrame, classes: list[str], *, tol: float = 1e-5) -> np.ndarray:
    """Columns p_<class> sum to 1, pred is their argmax, entropy is theirs; returns them (N, K)."""
    p = df[[f"p_{c}" for c in classes]].to_numpy(np.float64)
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0, atol=tol)
    assert df["pred"].tolist() == [classes[i] for i in p.argmax(axis=1)]
    expected = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
    np.testing.assert_allclose(df["entropy"].to_numpy(np.float64), expected, atol=10 * tol)
    return p


def _pipeline_proba(ns: SimpleNamespace, objids: Any) -> np.ndarray:
    """The evaluate stage's (plain) test-split probabilities of ``objids``, shape (N, K)."""
    return ns.preds.loc[list(objids), [f"p_{c}" for c in ns.classes]].to_numpy(np.float64)


def _test_objids(ns: SimpleNamespace) -> list[int]:
    return sorted(int(o) for o in ns.preds.index)


# --------------------------------------------------------------------------- predict
def test_predict_one_fits_cutout_matches_the_pipeline(sim: SimpleNamespace, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    objid = _test_objids(sim)[0]
    cutout = tmp_path / "galaxy.fits"  # not an integer name: the id comes from the FITS header
    shutil.copy(sim.cache / f"{objid}.fits", cutout)
    out = tmp_path / "pred.csv"
    assert _galpipe("predict", "--model", sim.model, cutout, "--output", out) == 0
    assert f"1 predictions -> {out}" in capsys.readouterr().out
    df = pd.read_csv(out)
    assert len(df) == 1 and df["objid"].tolist() == [objid] and df["source_path"].tolist() == [str(cutout)]
    assert not any(c.startswith("std_") for c in df.columns)
    p = _check_probabilities(df, sim.classes)
    np.testing.assert_allclose(p, _pipeline_proba(sim, [objid]), atol=2e-6)


def test_predict_folder_with_mc_dropout(sim: SimpleNamespace, tmp_path: Path) -> None:
    folder = tmp_path / "cutouts"
    folder.mkdir()
    ids = _test_objids(sim)
    for o in ids:
        shutil.copy(sim.cache / f"{o}.fits", folder / f"{o}.fits")
    (folder / "notes.txt").write_text("not an image, ignored")
    plain = tmp_path / "plain.parquet"
    assert _galpipe("predict", "--model", sim.model, folder, "--output", plain) == 0
    df = pd.read_parquet(plain)
    assert df["objid"].tolist() == ids  # one row per image, in file-name order
    np.testing.assert_allclose(_check_probabilities(df, sim.classes, tol=1e-9), _pipeline_proba(sim, ids),
                               rtol=1e-5, atol=1e-7)
    runs = []
    for k in range(2):
        out = tmp_path / f"mc{k}.parquet"
        assert _galpipe("predict", "--model", sim.model, folder, "--output", out, "--mc-dropout", 6) == 0
        runs.append(pd.read_parquet(out))
    mc = runs[0]
    pd.testing.assert_frame_equal(mc, runs[1])  # the MC-dropout masks are seeded
    assert len(mc) == len(ids)
    _check_probabilities(mc, sim.classes, tol=1e-9)
    std = mc[[f"std_{c}" for c in sim.classes]].to_numpy()
    assert std.shape == (len(ids), len(sim.classes)) and np.all(std >= 0) and std.max() > 0
    assert json.loads(pq.read_schema(plain).metadata[b"galpipe.model"]) == "cnn"


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_predict_catalogue_rerenders_the_cutouts(sim: SimpleNamespace, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    ids = _test_objids(sim)[:5]
    cat = pd.read_parquet(sim.catalogue)
    rows = cat[cat["objid"].isin(ids)].iloc[::-1]  # any order
    src = tmp_path / f"new.{fmt}"
    if fmt == "parquet":
        rows.to_parquet(src)
    else:
        rows.to_csv(src, index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # an empty cutout cache: the galaxies are rendered anew
    out = tmp_path / f"pred.{fmt}"
    assert _galpipe("predict", "--model", sim.model, src, "--config", sim.config, "--output", out) == 0
    rendered = sorted(p.name for p in (elsewhere / "resources" / "cutouts").glob("simulated-*/*.fits"))
    assert rendered == sorted(f"{o}.fits" for o in ids)
    df = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
    assert sorted(df["objid"]) == ids
    p = _check_probabilities(df, sim.classes, tol=1e-9 if fmt == "parquet" else 1e-5)
    np.testing.assert_allclose(p, _pipeline_proba(sim, df["objid"]), rtol=1e-5, atol=2e-6)


def test_predict_catalogue_cache_dir_is_used_and_reused(sim: SimpleNamespace, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--cache-dir`` holds the catalogue's cutouts; a second call reuses them (nothing re-rendered)."""
    ids = _test_objids(sim)[:3]
    cat = pd.read_parquet(sim.catalogue)
    src = tmp_path / "new.parquet"
    cat[cat["objid"].isin(ids)].to_parquet(src)
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "my-cache"
    outs = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    assert _galpipe("predict", "--model", sim.model, src, "--config", sim.config, "--output", outs[0],
                    "--cache-dir", cache) == 0
    files = sorted(cache.glob("simulated-*/*.fits"))
    assert sorted(p.name for p in files) == sorted(f"{o}.fits" for o in ids)
    assert not (tmp_path / "resources").exists()  # nothing written to the default cache
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert _galpipe("predict", "--model", sim.model, src, "--config", sim.config, "--output", outs[1],
                    "--cache-dir", cache) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # reused, not fetched again
    pd.testing.assert_frame_equal(pd.read_parquet(outs[0]), pd.read_parquet(outs[1]))


def test_predict_jpeg_file_and_folder_match_the_pipeline(rgb: SimpleNamespace, tmp_path: Path) -> None:
    ids = _test_objids(rgb)
    name = next(n for o, _, n in rgb.rows if o == ids[0])
    exe = Path(sys.executable).parent / "galpipe"
    if not exe.is_file():
        pytest.skip(f"the galpipe console script is not installed beside {sys.executable} (pip install -e .)")
    out = tmp_path / "one.csv"
    res = subprocess.run([str(exe), "predict", "--model", str(rgb.model), str(rgb.images / name), "--output",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "1 predictions" in res.stdout
    one = pd.read_csv(out)
    assert one["objid"].tolist() == [ids[0]]
    np.testing.assert_allclose(_check_probabilities(one, rgb.classes), _pipeline_proba(rgb, [ids[0]]), atol=2e-6)

    out = tmp_path / "all.parquet"
    assert _galpipe("predict", "--model", rgb.model, rgb.images, "--output", out, "--tta") == 0
    df = pd.read_parquet(out).set_index("objid")
    assert sorted(df.index) == sorted(o for o, _, _ in rgb.rows)
    tta = df.loc[ids]
    _check_probabilities(tta.reset_index(), rgb.classes, tol=1e-9)
    expected = rgb.preds.loc[ids, [f"p_tta_{c}" for c in rgb.classes]].to_numpy(np.float64)
    np.testing.assert_allclose(tta[[f"p_{c}" for c in rgb.classes]].to_numpy(), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- evaluate
def _hand_accuracy(preds: pd.DataFrame, tag: str = "") -> float:
    return float((preds[f"pred{tag}"] == preds["label"]).mean())


def test_evaluate_external_images_with_label_map(rgb: SimpleNamespace, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    dropped = {o for o, _, _ in rgb.rows[:3]}
    lines = ["id,gz,path"] + [f"{o},{'X' if o in dropped else raw},{n}" for o, raw, n in rgb.rows]
    (tmp_path / "ext.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ext"
    assert _galpipe("evaluate", "--model", rgb.model, "--images", rgb.images, "--labels", tmp_path / "ext.csv",
                    "--id-column", "id", "--label-column", "gz", "--path-column", "path",
                    "--label-map", "E=elliptical", "S=spiral", "X=", "--n-bootstrap", 20,
                    "--output-dir", out) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    kept = sorted(o for o, _, _ in rgb.rows if o not in dropped)
    assert metrics["n_test"] == len(kept) and sorted(preds["objid"]) == kept
    truth = {o: {"E": "elliptical", "S": "spiral"}[raw] for o, raw, _ in rgb.rows}
    assert preds["label"].tolist() == [truth[o] for o in preds["objid"]]
    assert metrics["plain"]["accuracy"]["value"] == pytest.approx(_hand_accuracy(preds))
    assert metrics["tta"]["accuracy"]["value"] == pytest.approx(_hand_accuracy(preds, "_tta"))
    assert printed["accuracy"] == pytest.approx(_hand_accuracy(preds))
    cm = np.asarray(metrics["plain"]["confusion_matrix"])
    assert cm.sum() == len(kept) and np.trace(cm) == int((preds["pred"] == preds["label"]).sum())
    # the images went through the training preprocessing: same probabilities as the pipeline's
    test_ids = _test_objids(rgb)
    ext = preds.set_index("objid").loc[[o for o in test_ids if o not in dropped]]
    np.testing.assert_allclose(ext[[f"p_{c}" for c in rgb.classes]].to_numpy(),
                               _pipeline_proba(rgb, ext.index), rtol=1e-5, atol=1e-7)
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"confusion_matrix.png", "roc.png", "reliability.png"} <= figures
    assert any(f.startswith("gallery_") for f in figures)
    assert read_metadata(out / "external.parquet")["classes"] == rgb.classes


GZ1_MAP = ["elliptical=elliptical", "spiral_cw=spiral", "spiral_acw=spiral", "edge_on=spiral", "dont_know=",
           "merger="]


def test_evaluate_and_predict_real_gz1_jpegs(rgb: SimpleNamespace, gz1_dir: Path, tmp_path: Path) -> None:
    """Real 423x423 SDSS JPEGs, raw Galaxy Zoo 1 classes mapped on the command line (a subset only)."""
    labels = pd.read_csv(gz1_dir / "labels.csv", dtype={"objid": "int64"})
    subset = labels.groupby("gz1_class_name", sort=True).head(2)
    assert len(subset) == 12  # two of each of the six GZ1 classes
    subset.to_csv(tmp_path / "subset.csv", index=False)
    out = tmp_path / "gz1"
    assert _galpipe("evaluate", "--model", rgb.model, "--images", gz1_dir, "--labels", tmp_path / "subset.csv",
                    "--label-column", "gz1_class_name", "--label-map", *GZ1_MAP, "--n-bootstrap", 20,
                    "--output-dir", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    kept = subset[~subset["gz1_class_name"].isin(["dont_know", "merger"])]
    assert metrics["n_test"] == len(kept) == 8
    assert sorted(preds["objid"]) == sorted(kept["objid"])
    assert preds.set_index("objid").loc[kept["objid"], "label"].tolist() == [
        "elliptical" if c == "elliptical" else "spiral" for c in kept["gz1_class_name"]]
    assert metrics["plain"]["accuracy"]["value"] == pytest.approx(_hand_accuracy(preds))
    first = kept.iloc[0]
    pred = tmp_path / "one.parquet"
    assert _galpipe("predict", "--model", rgb.model, gz1_dir / first["image"], "--output", pred) == 0
    one = pd.read_parquet(pred)
    assert one["objid"].tolist() == [int(first["objid"])]  # an 18-digit SDSS objID, from the file name
    np.testing.assert_allclose(one[[f"p_{c}" for c in rgb.classes]].to_numpy(),
                               preds.set_index("objid").loc[[first["objid"]], [f"p_{c}" for c in rgb.classes]],
                               rtol=1e-5, atol=1e-7)


def test_evaluate_split_file_reproduces_the_pipeline(sim: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    assert _galpipe("evaluate", "--model", sim.model, "--test", sim.splits["test"], "--no-tta",
                    "--n-bootstrap", 20, "--seed", 5, "--output-dir", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    assert metrics["n_test"] == len(preds) == len(sim.preds) and "tta" not in metrics
    assert metrics["plain"]["accuracy"]["value"] == pytest.approx(_hand_accuracy(preds))
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert metrics["plain"][key]["value"] == pytest.approx(sim.metrics["plain"][key]["value"])
    assert metrics["plain"]["confusion_matrix"] == sim.metrics["plain"]["confusion_matrix"]
    assert {p.name for p in (out / "figures").glob("*.png")} >= {"confusion_matrix.png", "roc.png"}


# --------------------------------------------------------------------------- errors
def _fails(capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    assert _galpipe(*args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_model_directory(sim: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_model"
    cutout = sim.cache / f"{_test_objids(sim)[0]}.fits"
    err = _fails(capsys, "predict", "--model", missing, cutout, "--output", tmp_path / "p.csv")
    assert "galpipe predict: error:" in err and str(missing / "model.json") in err
    err = _fails(capsys, "evaluate", "--model", missing, "--test", sim.splits["test"], "--output-dir", tmp_path)
    assert str(missing / "model.json") in err
    err = _fails(capsys, "summary", "--model", missing)
    assert "not a saved galpipe model directory" in err
    assert not (tmp_path / "p.csv").exists()


def test_label_outside_the_model_classes_needs_a_label_map(rgb: SimpleNamespace, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["objid,label,image"] + [f"{o},{raw},{n}" for o, raw, n in rgb.rows[:6]]
    (tmp_path / "raw.csv").write_text("\n".join(lines) + "\n")
    err = _fails(capsys, "evaluate", "--model", rgb.model, "--images", rgb.images, "--labels", tmp_path / "raw.csv",
                 "--output-dir", tmp_path / "out")
    assert "['E', 'S']" in err and "--label-map RAW=CLASS" in err and "elliptical" in err
    err = _fails(capsys, "evaluate", "--model", rgb.model, "--images", rgb.images, "--labels", tmp_path / "raw.csv",
                 "--label-map", "E:elliptical", "--output-dir", tmp_path / "out")
    assert "expected RAW=CLASS" in err
    err = _fails(capsys, "evaluate", "--model", rgb.model, "--output-dir", tmp_path / "out")
    assert "--test" in err and "--images" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_wrong_channel_count_and_empty_folder(sim: SimpleNamespace, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    one_band = tmp_path / "mixed" / "77.fits"
    one_band.parent.mkdir()
    write_cutout(one_band, np.ones((1, 24, 24), np.float32), bands=["r"], objid=77, ra=180.0, dec=1.0,
                 source="simulated")
    err = _fails(capsys, "predict", "--model", sim.model, one_band, "--output", tmp_path / "p.csv")
    assert f"image {one_band} does not match the input contract" in err
    assert "channels: expected 3 (g, r, i), got 1 (r)" in err
    good = _test_objids(sim)[0]
    shutil.copy(sim.cache / f"{good}.fits", one_band.parent / f"{good}.fits")
    out = tmp_path / "mixed.parquet"
    err = _fails(capsys, "predict", "--model", sim.model, one_band.parent, "--output", out)
    assert str(one_band) in err and "--force" in err  # refused, not silently thinned
    assert _galpipe("predict", "--model", sim.model, one_band.parent, "--output", out, "--force") == 0
    assert pd.read_parquet(out)["objid"].tolist() == [good]  # the 1-band file is skipped and recorded
    failed = json.loads(pq.read_schema(out).metadata[b"galpipe.failed"])
    assert len(failed) == 1 and "77.fits" in failed[0] and "1 channel(s)" in failed[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    err = _fails(capsys, "predict", "--model", sim.model, empty, "--output", tmp_path / "e.csv")
    assert str(empty) in err and "no JPEG/PNG/FITS files found" in err
    err = _fails(capsys, "predict", "--model", sim.model, tmp_path / "absent.csv", "--output", tmp_path / "e.csv")
    assert "absent.csv: not found" in err
    cat = tmp_path / "cat.csv"
    pd.read_parquet(sim.catalogue).head(2).to_csv(cat, index=False)
    assert "--config" in _fails(capsys, "predict", "--model", sim.model, cat, "--output", tmp_path / "e.csv")
    pd.read_parquet(sim.catalogue).head(2).drop(columns=["label"]).to_csv(cat, index=False)
    err = _fails(capsys, "predict", "--model", sim.model, cat, "--config", sim.config, "--output", tmp_path / "e.csv")
    assert f"catalogue {cat}: missing column(s) ['label']; the simulated source reads" in err
    assert not (tmp_path / "e.csv").exists()


# --------------------------------------------------------------------------- input contract
def _contract(ns: SimpleNamespace) -> dict[str, Any]:
    return json.loads((ns.model / "model.json").read_text())["metadata"]["input_contract"]


def test_the_train_stage_writes_the_input_contract(sim: SimpleNamespace, rgb: SimpleNamespace) -> None:
    con = _contract(sim)
    assert con["channels"] == ["g", "r", "i"] and con["pixel_unit"] == "nanomaggy"
    assert con["framing"]["kind"] == "pixel_scale" and con["framing"]["arcsec_per_pixel"] == 0.396
    assert con["size"] == [24, 24] and "SDSS g, r, i" in con["meaning"]
    con = _contract(rgb)
    # the images source leaves the unit to the files: read from the training JPEGs
    assert con["channels"] == ["red", "green", "blue"] and con["pixel_unit"] == "DN"
    assert "training image" in con["derived_from"]
    assert con["framing"] == {"kind": "crop", "crop_fraction": 0.8, "description": con["framing"]["description"]}
    assert con["size"] == [16, 16]


def test_trained_models_refuse_each_others_images(sim: SimpleNamespace, rgb: SimpleNamespace, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fits_cutout = sim.cache / f"{_test_objids(sim)[0]}.fits"
    jpeg = rgb.images / rgb.rows[0][2]
    err = _fails(capsys, "predict", "--model", rgb.model, fits_cutout, "--output", tmp_path / "a.csv")
    assert "pixel unit: expected 'DN'" in err and "got 'nanomaggy'" in err
    err = _fails(capsys, "predict", "--model", sim.model, jpeg, "--output", tmp_path / "b.csv")
    assert "pixel unit: expected 'nanomaggy'" in err and "got 'DN'" in err
    assert not list(tmp_path.iterdir())
    assert _galpipe("predict", "--model", sim.model, jpeg, "--output", tmp_path / "b.parquet", "--force") == 0
    assert json.loads(pq.read_schema(tmp_path / "b.parquet").metadata[b"galpipe.forced"]) is True


def test_astropy_tables_match_the_csv_and_parquet(sim: SimpleNamespace, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import astropy.units as u
    from astropy.table import Table

    import galpipe

    folder = tmp_path / "cutouts"
    folder.mkdir()
    ids = _test_objids(sim)[:4]
    for o in ids:
        shutil.copy(sim.cache / f"{o}.fits", folder / f"{o}.fits")
    assert _galpipe("predict", "--model", sim.model, folder, "--output", tmp_path / "p.parquet", "--mc-dropout", 3) == 0
    assert _galpipe("predict", "--model", sim.model, folder, "--output", tmp_path / "p.csv", "--mc-dropout", 3) == 0
    printed = capsys.readouterr().out
    assert f"-> {tmp_path / 'p.csv'} (also {tmp_path / 'p.ecsv'}, {tmp_path / 'p.fits'})" in printed
    parquet, csv = pd.read_parquet(tmp_path / "p.parquet"), pd.read_csv(tmp_path / "p.csv")
    ecsv = Table.read(tmp_path / "p.ecsv", format="ascii.ecsv")
    fits_t = Table.read(tmp_path / "p.fits", format="fits", character_as_bytes=False)
    cat = pd.read_parquet(sim.catalogue).set_index("objid")
    assert ecsv.colnames == fits_t.colnames == list(parquet.columns) == list(csv.columns)
    for t in (ecsv, fits_t):
        assert t["source_path"].tolist() == parquet["source_path"].tolist()
        assert t["objid"].tolist() == parquet["objid"].tolist() == ids
        assert t["pred"].tolist() == parquet["pred"].tolist()
        assert t["ra"].unit == u.deg and t["dec"].unit == u.deg
        np.testing.assert_allclose(t["ra"], cat.loc[ids, "ra"], rtol=0, atol=1e-9)  # the cutout centres
        np.testing.assert_allclose(t["dec"], cat.loc[ids, "dec"], rtol=0, atol=1e-9)
        for c in [*(f"p_{k}" for k in sim.classes), *(f"std_{k}" for k in sim.classes), "entropy"]:
            np.testing.assert_array_equal(np.asarray(t[c]), parquet[c].to_numpy())  # bit-identical
            np.testing.assert_allclose(np.asarray(t[c]), csv[c].to_numpy(), rtol=1e-5, atol=1e-7)  # %.6g
            assert t[c].unit in (None, u.dimensionless_unscaled)
        np.testing.assert_allclose(parquet[["ra", "dec"]].to_numpy(), csv[["ra", "dec"]].to_numpy(), rtol=0,
                                   atol=1e-8)  # the CSV keeps positions to 1e-8 deg
    assert all(ecsv[f"p_{k}"].unit == u.dimensionless_unscaled for k in sim.classes)
    meta = ecsv.meta
    assert meta["model"] == "cnn" and meta["classes"] == sim.classes and meta["galpipe_version"] == galpipe.__version__
    assert meta["mc_dropout"] == 3 and meta["forced"] is False and meta["warnings"] == []
    assert meta["input_contract"] == _contract(sim)
    model_doc = json.loads((sim.model / "model.json").read_text())
    assert meta["model_provenance"] == model_doc["metadata"]["provenance"]
    from galpipe.io.atomic import file_sha256

    assert meta["weights_sha256"] == file_sha256(sim.model / "weights.npz")
    assert meta["model_json_sha256"] == file_sha256(sim.model / "model.json")
    assert pd.Timestamp(meta["date"]).tzinfo is not None
    hdr = fits_t.meta
    assert hdr["MODEL"] == "cnn" and hdr["CLASSES"] == ",".join(sim.classes) and hdr["MCDROP"] == 3
    assert hdr["WGTSSHA"] == meta["weights_sha256"] and hdr["GALPVER"] == galpipe.__version__
    assert hdr["CODEDIG"] == model_doc["metadata"]["provenance"]["code_digest"] and hdr["DATE"] == meta["date"]


# --------------------------------------------------------------------------- summary
def test_summary_totals_match_the_model(sim: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    assert _galpipe("summary", "--model", sim.model) == 0
    text = capsys.readouterr().out
    model, _ = load_model(sim.model)
    n = model.n_params()
    assert f"total params: {n:,}" in text
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    assert len(rules) == 2, text
    rows = [line.split() for line in lines[rules[0] + 1:rules[1]]]
    assert [r[1] for r in rows] == ["conv2d", "relu", "maxpool2d", "global_avg_pool", "dropout", "dense"]
    assert sum(int(r[-2].replace(",", "")) for r in rows) == n
    assert rows[-1][2] == "(3)"  # the output layer: one unit per class
    assert "input shape: (24, 24, 3)" in text
