"""Shipped pretrained models: finding them by name, packaging a run with its card, and the CI check.

* :func:`galpipe.models.resolve_model`: an existing folder wins, then a shipped name; an unknown
  reference is refused naming it and the shipped names.  Shipped folders are only ever made in
  temporary folders here (``galpipe.models._shipped_root`` is pointed at one).
* :func:`galpipe.modelcard.package_model` on two tiny seeds of one ``images`` config, trained
  here through the stage functions, whose validation and test orders are made to disagree:
  the card must ship the best-VALIDATION run.
* The CI check: when ``galpipe/models/gz1`` is shipped and the real GZ1 images are beside the
  checkout, ``galpipe predict`` on the images of its ``test_split.csv`` must give exactly the
  balanced accuracy its ``card.json`` states (to 1e-9: predict is deterministic, no randomness,
  no MC dropout; the same files give the same classes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import galpipe.models
from galpipe.cli import main as galpipe_main
from galpipe.config import preset_search_path, resolve_experiments, validate_config
from galpipe.errors import ConfigError, DataError, ModelError
from galpipe.modelcard import RunRecord, check_shipped, choose_run, package_model, read_run, run_file
from galpipe.models import SHIPPED_FILES, available_models, resolve_model
from galpipe.stages import ARTIFACTS, cutout_cache_dir, experiment_params, stage_params
from galpipe.stages.catalogue import run as run_catalogue
from galpipe.stages.cutouts import run as run_cutouts
from galpipe.stages.evaluate import run as run_evaluate
from galpipe.stages.normalise import run as run_normalise
from galpipe.stages.split import run as run_split
from galpipe.stages.train import run as run_train

REPO = Path(__file__).resolve().parents[1]
GZ1_DIR = REPO.parent / "shared" / "data" / "gz1-sdss-jpeg"
SHIPPED_GZ1 = REPO / "galpipe" / "models" / "gz1"
EXP = "tiny_cnn"


# --------------------------------------------------------------------------- tiny runs
def _jpegs(folder: Path, n: int) -> list[str]:
    """``n`` synthetic RGB JPEGs: red round blobs (E) and blue streaks (S); CSV rows."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] - 15.5
    rows = ["objid,morph,file"]
    for i in range(n):
        objid, raw = 7000 + i, "ES"[i % 2]
        if raw == "E":
            r2, colour = (xx**2 + yy**2) / rng.uniform(15, 40), np.array([230, 150, 90])
        else:
            t = rng.uniform(0, np.pi)
            u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
            r2, colour = u**2 / rng.uniform(40, 90) + v**2 / 3.0, np.array([90, 140, 230])
        img = np.exp(-r2)[..., None] * colour + rng.normal(12, 6, (32, 32, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{objid}.jpeg", quality=92)
        rows.append(f"{objid},{raw},{objid}.jpeg")
    return rows


def _run(root: Path, cfg: dict[str, Any], config: Path, cache_root: Path, same_data_as: Path | None = None) -> None:
    """One seed: catalogue -> ... -> evaluate, written in the pipeline's layout under ``root``.

    With ``same_data_as`` its catalogue and normalised images are reused (they do not depend
    on the seed): only split, train and evaluate run.
    """
    p = {k: root / v for k, v in ARTIFACTS.items()}
    manifest, normalised = (root / ARTIFACTS[k].format(shard="0000") for k in ("manifest", "normalised"))
    if same_data_as is not None:
        for folder in ("catalogue", "normalised"):
            shutil.copytree(same_data_as / folder, root / folder)
    else:
        shard = root / ARTIFACTS["shard"].format(shard="0000")
        run_catalogue(stage_params(cfg, "catalogue"), p["catalogue"], [shard])
        run_cutouts(stage_params(cfg, "cutouts"), shard, manifest, cutout_cache_dir(cfg, root=cache_root))
        run_normalise(stage_params(cfg, "normalise"), manifest, shard, normalised,
                      root / ARTIFACTS["rejects"].format(shard="0000"))
    splits = {s: root / ARTIFACTS["split"].format(split=s) for s in ("train", "validation", "test")}
    run_split(stage_params(cfg, "split"), [normalised], splits, p["split_summary"])
    exp = resolve_experiments(cfg, preset_search_path(config))[EXP]
    model_json = run_file(root, "model", EXP)
    run_train(experiment_params(cfg, exp), splits["train"], splits["validation"], model_json, name=EXP,
              checkpoint_root=root / "checkpoints", progress=False)
    run_evaluate(stage_params(cfg, "evaluate"), model_json, splits["test"], run_file(root, "metrics", EXP),
                 run_file(root, "predictions", EXP), root / ARTIFACTS["figures"].format(experiment=EXP))


def _set_validation_ba(root: Path, value: float) -> None:
    """Overwrite the validation balanced accuracy of the kept epoch in ``history.csv``."""
    best = json.loads(run_file(root, "train_info", EXP).read_text())["best_epoch"]
    hist = pd.read_csv(run_file(root, "history", EXP))
    hist.loc[hist["epoch"] == best, "val_balanced_acc"] = value
    hist.to_csv(run_file(root, "history", EXP), index=False)


def _set_test_ba(root: Path, value: float) -> None:
    path = run_file(root, "metrics", EXP)
    doc = json.loads(path.read_text())
    doc["plain"]["balanced_accuracy"]["value"] = value
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two seeds of one tiny ``images`` config; seed 2 best on validation, seed 1 best on test."""
    wd = tmp_path_factory.mktemp("runs")
    images = wd / "images"
    images.mkdir()
    (wd / "labels.csv").write_text("\n".join(_jpegs(images, 40)) + "\n")
    raw = {
        "source": "images", "seed": 1, "cutout_size": 12, "shards": 1,
        "images": {"directory": str(images), "labels_csv": str(wd / "labels.csv"), "id_column": "objid",
                   "label_column": "morph", "path_column": "file",
                   "label_map": {"E": "elliptical", "S": "spiral"}, "crop_fraction": 0.8},
        "split": {"row_group_size": 16},
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.01, "early_stopping_patience": 0},
        "experiments": {EXP: {"architecture": [{"type": "conv2d", "filters": 4}, "relu", "maxpool2d",
                                               "global_avg_pool"]}},
        "evaluate": {"n_bootstrap": 20, "gallery_size": 2},
    }
    config = wd / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    roots = [wd / "seed1", wd / "seed2"]
    _run(roots[0], validate_config(raw), config, wd / "cache")
    _run(roots[1], validate_config({**raw, "seed": 2}), config, wd / "cache", same_data_as=roots[0])
    true_ba = [json.loads(run_file(r, "metrics", EXP).read_text())["plain"]["balanced_accuracy"]["value"]
               for r in roots]
    _set_validation_ba(roots[0], 0.61)  # seed 1: worse on validation ...
    _set_test_ba(roots[0], 0.97)        # ... but best on test
    _set_validation_ba(roots[1], 0.83)
    _set_test_ba(roots[1], 0.52)
    dest = wd / "shipped" / "tiny"
    card = package_model(name="tiny", config=config, experiment=EXP, runs=[str(r) for r in roots], dest=dest)
    return SimpleNamespace(wd=wd, images=images, config=config, roots=roots, true_ba=true_ba, dest=dest, card=card)


@pytest.fixture
def shipped_here(runs: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The packaged tiny model made a shipped model named ``tiny`` (for this test only)."""
    monkeypatch.setattr(galpipe.models, "_shipped_root", lambda: runs.dest.parent)
    return runs.dest


# --------------------------------------------------------------------------- resolve_model
def _fake_shipped(root: Path) -> Path:
    (root / "gz1").mkdir(parents=True)
    (root / "gz1" / "model.json").write_text("{}")
    (root / "no_model").mkdir()  # no model.json: not a shipped model
    (root / ".hidden").mkdir()
    (root / ".hidden" / "model.json").write_text("{}")
    return root


def test_resolve_model_folder_then_shipped_name_then_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = _fake_shipped(tmp_path / "pkg")
    monkeypatch.setattr(galpipe.models, "_shipped_root", lambda: shipped)
    monkeypatch.chdir(tmp_path)
    assert available_models() == ["gz1"]
    assert resolve_model("gz1") == shipped / "gz1"          # a shipped name
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert resolve_model(other) == other                     # a folder, even without model.json
    (tmp_path / "gz1").mkdir()                               # a folder named like the shipped model ...
    assert resolve_model("gz1") == Path("gz1")               # ... wins
    for bad in ("gz2", "no_model", "../pkg/gz1", ".hidden", "gz1/model.json"):
        with pytest.raises(ModelError) as err:
            resolve_model(bad)
        msg = str(err.value)
        assert repr(bad) in msg and "shipped models: gz1" in msg, msg


def test_no_shipped_model_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(galpipe.models, "_shipped_root", lambda: tmp_path)
    assert available_models() == []
    with pytest.raises(ModelError, match="none is shipped with this install"):
        resolve_model(tmp_path / "absent")


def test_cli_help_names_the_shipped_models(shipped_here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("predict", "evaluate", "summary"):
        with pytest.raises(SystemExit):
            galpipe_main([command, "--help"])
        assert "or the name of a shipped model: tiny" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- the card
def test_card_ships_the_best_validation_run_not_the_best_test_run(runs: SimpleNamespace) -> None:
    card, chosen = runs.card, runs.roots[1]
    assert card["chosen"]["seed"] == 2 and card["chosen"]["run"] == str(chosen)
    assert "validation" in card["chosen"]["reason"] and "test split took no part" in card["chosen"]["reason"]
    assert (runs.dest / "weights.npz").read_bytes() == run_file(chosen, "weights", EXP).read_bytes()
    assert (runs.dest / "model.json").read_bytes() == run_file(chosen, "model", EXP).read_bytes()
    assert (runs.dest / "weights.npz").read_bytes() != run_file(runs.roots[0], "weights", EXP).read_bytes()
    assert sorted(p.name for p in runs.dest.iterdir()) == sorted(SHIPPED_FILES)
    # the seed spread lists every run, in --run order, and their mean and sample std
    table = card["seeds"]
    assert [r["seed"] for r in table["runs"]] == [1, 2]
    assert [r["validation_balanced_accuracy"] for r in table["runs"]] == [0.61, 0.83]
    assert [r["test_balanced_accuracy"] for r in table["runs"]] == [0.97, 0.52]
    assert table["test_balanced_accuracy"]["mean"] == pytest.approx(0.745)
    assert table["test_balanced_accuracy"]["std"] == pytest.approx(np.std([0.97, 0.52], ddof=1))
    # the test figures are the chosen run's (its metrics.json, here edited to 0.52)
    assert card["test"]["plain"]["balanced_accuracy"]["value"] == 0.52
    md = (runs.dest / "MODEL_CARD.md").read_text()
    assert "| 2 | 0.830 | 0.520 |" in md and "(chosen)" in md and "| 1 | 0.610 | 0.970 |" in md


def test_card_test_split_and_predict_figures_are_the_chosen_runs(runs: SimpleNamespace) -> None:
    chosen = runs.roots[1]
    rows = pd.read_csv(runs.dest / "test_split.csv")
    assert list(rows.columns) == ["objid", "image", "label"]
    test = pd.read_parquet(chosen / ARTIFACTS["split"].format(split="test"), columns=["objid", "label"])
    assert sorted(rows["objid"]) == sorted(test["objid"])
    assert all((runs.images / p).is_file() and not Path(p).is_absolute() for p in rows["image"])
    pr = runs.card["predict"]
    assert pr["n"] == pr["n_predicted"] == len(test)
    # predict on the test images gives what the evaluate stage measured (before the test was edited)
    assert pr["balanced_accuracy"] == pytest.approx(runs.true_ba[1], abs=1e-12)
    assert pr["agreement_with_evaluate"] == {"same_class": len(test), "same_class_tta": len(test), "n": len(test)}


def test_card_records_what_the_model_follows_from(runs: SimpleNamespace) -> None:
    card = json.loads((runs.dest / "card.json").read_text())  # strict JSON: no NaN
    assert card["format"] == "galpipe-model-card" and card["name"] == "tiny"
    assert len(card["config"]["sha256"]) == 64 and len(card["data"]["labels_csv_sha256"]) == 64
    assert card["data"]["n_images"] == 40 and len(card["data"]["images_sha256"]) == 64
    assert card["files"]["weights.npz"] == hashlib.sha256((runs.dest / "weights.npz").read_bytes()).hexdigest()
    assert card["split_counts"]["test"] == {c: int(n) for c, n in pd.read_csv(
        runs.dest / "test_split.csv")["label"].value_counts().items()}
    assert card["training"]["settings"]["augment"] in (True, False) and "max_shift" in card["training"]["settings"]
    assert "--config seed=2" in card["reproduce"][0]
    recall = card["test"]["plain"]["per_class_recall"]
    assert set(recall) == {"elliptical", "spiral"}
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in recall.values())
    assert any("Framing convention" in lim for lim in card["limits"]) and card["citations"]


def test_data_hash_follows_image_sizes(runs: SimpleNamespace, tmp_path: Path) -> None:
    from galpipe.modelcard import data_hash

    images = tmp_path / "images"
    shutil.copytree(runs.images, images)
    section = {"directory": str(images), "labels_csv": str(runs.wd / "labels.csv"), "id_column": "objid",
               "label_column": "morph", "path_column": "file", "label_map": {"E": "elliptical", "S": "spiral"}}
    before = data_hash(section)
    assert before["images_sha256"] == runs.card["data"]["images_sha256"]  # paths are relative: folder-independent
    with (images / "7003.jpeg").open("ab") as fh:
        fh.write(b"\0")
    assert data_hash(section)["images_sha256"] != before["images_sha256"]


def test_choose_run_ignores_test_figures() -> None:
    def rec(val: float, loss: float, test: float) -> RunRecord:
        return RunRecord("r", "exp", 0, 1, val, loss, test, None)

    assert choose_run([rec(0.8, 0.3, 0.99), rec(0.9, 0.5, 0.10)]) == 1
    assert choose_run([rec(0.9, 0.5, 0.99), rec(0.9, 0.4, 0.10)]) == 1  # tie: lower validation loss
    assert choose_run([rec(0.9, 0.4, 0.99), rec(0.9, 0.4, 0.10)]) == 0  # full tie: the first
    with pytest.raises(ConfigError):
        choose_run([])


def test_runs_of_different_configs_are_refused(runs: SimpleNamespace, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(runs.roots[0], other)
    model_json = run_file(other, "model", EXP)
    doc = json.loads(model_json.read_text())
    doc["metadata"]["training"]["lr"] = 0.5
    model_json.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="differ in the model's training"):
        package_model(name="x", config=runs.config, experiment=EXP, runs=[runs.roots[1], other],
                      dest=tmp_path / "x")
    with pytest.raises(DataError, match="was not trained with the config's settings"):
        package_model(name="x", config=runs.config, experiment=EXP, runs=[other], dest=tmp_path / "x")
    run_file(other, "history", EXP).unlink()
    with pytest.raises(DataError, match=r"history\.csv"):
        read_run(other, EXP)
    with pytest.raises(ConfigError, match="not an experiment"):
        package_model(name="x", config=runs.config, experiment="nope", runs=[other], dest=tmp_path / "x")
    with pytest.raises(ConfigError, match="--name"):
        package_model(name="../x", config=runs.config, experiment=EXP, runs=[other], dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_repackaging_replaces_the_folder_whole(runs: SimpleNamespace, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    package_model(name="m", config=runs.config, experiment=EXP, runs=[runs.roots[0]], dest=dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(SHIPPED_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind


# --------------------------------------------------------------------------- using a shipped model
def test_predict_evaluate_summary_take_a_shipped_name(shipped_here: Path, runs: SimpleNamespace, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert galpipe_main(["predict", "--model", "tiny", str(runs.images), "--output", str(tmp_path / "p.csv")]) == 0
    by_name = pd.read_csv(tmp_path / "p.csv")
    assert galpipe_main(["predict", "--model", str(shipped_here), str(runs.images),
                         "--output", str(tmp_path / "q.csv")]) == 0
    pd.testing.assert_frame_equal(by_name, pd.read_csv(tmp_path / "q.csv"))
    assert galpipe_main(["summary", "--model", "tiny"]) == 0
    test = runs.roots[1] / ARTIFACTS["split"].format(split="test")
    assert galpipe_main(["evaluate", "--model", "tiny", "--test", str(test), "--n-bootstrap", "5",
                         "--output-dir", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    capsys.readouterr()
    assert galpipe_main(["predict", "--model", "tinyy", str(runs.images), "--output", str(tmp_path / "r.csv")]) == 1
    err = capsys.readouterr().err
    assert "'tinyy'" in err and "shipped models: tiny" in err and "Traceback" not in err


def test_check_shipped_recomputes_the_cards_predict_figures(shipped_here: Path, runs: SimpleNamespace) -> None:
    got = check_shipped("tiny", runs.images)
    assert set(got) == {"balanced_accuracy", "balanced_accuracy_tta", "balanced_accuracy_reframe_auto",
                        "balanced_accuracy_tta_reframe_auto", "n_predicted"}
    for card_value, now in got.values():
        assert abs(card_value - now) <= 1e-9


def test_check_shipped_notices_a_card_that_does_not_match(runs: SimpleNamespace, tmp_path: Path) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(runs.dest, folder)
    card = json.loads((folder / "card.json").read_text())
    card["predict"]["balanced_accuracy"] += 1e-6
    (folder / "card.json").write_text(json.dumps(card))
    got = check_shipped(folder, runs.images)
    assert abs(got["balanced_accuracy"][0] - got["balanced_accuracy"][1]) == pytest.approx(1e-6)


# --------------------------------------------------------------------------- the CI check of the real model
@pytest.mark.slow
def test_shipped_gz1_predict_gives_the_cards_balanced_accuracy() -> None:
    """``galpipe predict --model gz1`` on its test galaxies gives card.json's balanced accuracy (plain, TTA).

    Deterministic (no MC dropout, no random draws), so the figure must agree to 1e-9; it differs
    only if the shipped weights, the test list or the preprocessing changed since packaging.
    Takes about a minute (591 real JPEGs, twice).
    """
    # gz1 ships with galpipe: its absence is a defect, not a missing resource
    assert (SHIPPED_GZ1 / "card.json").is_file(), f"no shipped model at {SHIPPED_GZ1} (scripts/package_model.py)"
    if not (GZ1_DIR / "labels.csv").is_file():
        pytest.skip(f"real GZ1 SDSS JPEG set not found at {GZ1_DIR} (only on CI/dev machines)")
    assert "gz1" in available_models()
    for figure, (card_value, now) in check_shipped(SHIPPED_GZ1, GZ1_DIR).items():
        assert abs(card_value - now) <= 1e-9, f"{figure}: card.json {card_value}, predict now {now}"


def test_seed_experiments_of_one_results_folder_are_candidates_too(runs: SimpleNamespace, tmp_path: Path) -> None:
    """Seeds as experiments of one config (``experiments.<name>.seed``, one split): every
    experiment in the folder is a candidate, chosen on validation as runs are."""
    one = tmp_path / "one"
    shutil.copytree(runs.roots[1], one)  # seed 2 (validation 0.83) as EXP, with its split
    other = f"{EXP}_seed1"  # seed 1's model and evaluation (validation 0.61) beside it
    for name in ("model", "metrics"):
        shutil.copytree(run_file(runs.roots[0], name, EXP).parent, run_file(one, name, other).parent)
    metrics = run_file(one, "metrics", other)
    metrics.write_text(metrics.read_text().replace(f'"experiment": "{EXP}"', f'"experiment": "{other}"'))
    raw = yaml.safe_load(runs.config.read_text())
    raw["experiments"][other] = {**raw["experiments"][EXP], "seed": 1}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    card = package_model(name="tiny", config=config, experiment=[other, EXP], runs=[str(one)], dest=tmp_path / "tiny")
    assert card["chosen"]["experiment"] == EXP and card["chosen"]["seed"] == 2  # validation 0.83 > 0.61
    assert [(r["experiment"], r["seed"]) for r in card["seeds"]["runs"]] == [(other, 1), (EXP, 2)]
    assert card["reproduce"][0].endswith(f"evaluation/{other}/metrics.json results/tiny/evaluation/{EXP}/metrics.json")
    assert f"--experiment {other} --experiment {EXP} --run {one}" in card["reproduce"][-1]
    assert (tmp_path / "tiny" / "weights.npz").read_bytes() == run_file(runs.roots[1], "weights", EXP).read_bytes()
