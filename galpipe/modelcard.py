"""Package a trained run as a shipped model: weights, test galaxies and a model card.

``scripts/package_model.py --name gz1 --config config/gz1-sdss-jpeg.yaml --experiment vgg_like
--run DIR [--run DIR ...]`` calls :func:`package_model`.  Each ``--run`` is the results folder
of one seed of the same config (``models/<exp>/``, ``evaluation/<exp>/metrics.json``,
``split/{validation,test}.parquet``, ``catalogue/catalogue.parquet``).  It

1. reads every run (:func:`read_run`): its seed, the validation balanced accuracy at the
   epoch whose weights were kept (``train_info.json`` ``best_epoch``, that row of
   ``history.csv``) and its test figures (``metrics.json``);
2. chooses the run with the best **validation** balanced accuracy (:func:`choose_run`; the
   test split never takes part in the choice);
3. writes ``galpipe/models/<name>/`` (package data, so it is in the wheel): the chosen run's
   ``model.json`` and ``weights.npz`` byte for byte, ``test_split.csv`` (its test galaxies:
   ``objid``, ``image`` relative to the images folder, ``label``), ``card.json``
   (machine-readable, :func:`build_card`) and ``MODEL_CARD.md`` (:func:`render_markdown`);
4. runs :func:`galpipe.predict.predict_input` on the test galaxies' images with the packaged
   folder (plain and TTA) and records the balanced accuracy it gets in ``card.json``
   ``predict``: what CI checks the shipped files against (:func:`check_shipped`).

The new folder is written beside the old one and swapped in by renames, so an interrupted
run leaves the previous model (or none), never a mixture.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from galpipe import __version__
from galpipe.errors import ConfigError, DataError, GalpipeError
from galpipe.io.atomic import atomic_path, atomic_write_text, file_sha256
from galpipe.models import MODEL_FILE, SHIPPED_FILES, is_model_name, resolve_model
from galpipe.stages import ARTIFACTS

PathLike = str | os.PathLike[str]
CARD_FORMAT = "galpipe-model-card"
CARD_FORMAT_VERSION = 1
#: The files of a run, relative to its results folder (``{experiment}`` filled in).
RUN_FILES = ("model", "weights", "history", "train_info", "metrics", "predictions")
#: How the data hash is made (recorded in the card beside the hash).
IMAGES_HASH_RULE = ("sha256 over the UTF-8 lines '<image path relative to images.directory>\\t<size in bytes>\\n' "
                    "of every image the config's labels CSV keeps (after images.label_map), sorted by path")
#: What a model card cites, for the GZ1 model galpipe ships.
CITATIONS = (
    "Galaxy Zoo 1 classifications: Lintott C. J. et al. 2008, MNRAS 389, 1179 (doi:10.1111/j.1365-2966.2008.13689.x)",
    "Galaxy Zoo 1 data release: Lintott C. et al. 2011, MNRAS 410, 166 (doi:10.1111/j.1365-2966.2010.17432.x)",
    "SDSS imaging, Data Release 7: Abazajian K. N. et al. 2009, ApJS 182, 543 (doi:10.1088/0067-0049/182/2/543)",
    "The Sloan Digital Sky Survey: York D. G. et al. 2000, AJ 120, 1579 (doi:10.1086/301513)",
    "Image set: github.com/Eggochi/Proyecto_Galaxias, smallGZ1/ at commit 5226e5e4e193118d33884a85acf09e41cfa914de "
    "(SkyServer JPEG cutouts as rendered for Galaxy Zoo; see the data folder's README.md)",
)


# --------------------------------------------------------------------------- reading runs
@dataclass(frozen=True)
class RunRecord:
    """What the card needs from one seed's results folder.

    Attributes
    ----------
    root : str
        The results folder, as given.
    experiment : str
        The experiment in it (seeds may be experiments of one config that differ only in
        their ``seed``, sharing the split, or one experiment in several results folders).
    seed : int
        The run's master seed (``model.json`` ``metadata.training.seed``).
    best_epoch : int
        The epoch whose weights were kept (``train_info.json``).
    validation_balanced_accuracy, validation_loss : float
        ``history.csv`` ``val_balanced_acc`` and ``val_loss`` at ``best_epoch``.
    test_balanced_accuracy : float
        ``metrics.json`` ``plain.balanced_accuracy.value``.
    test_balanced_accuracy_tta : float or None
        ``metrics.json`` ``tta.balanced_accuracy.value`` (None without TTA).
    """

    root: str
    experiment: str
    seed: int
    best_epoch: int
    validation_balanced_accuracy: float
    validation_loss: float
    test_balanced_accuracy: float
    test_balanced_accuracy_tta: float | None


def run_file(root: PathLike, name: str, experiment: str) -> Path:
    """The path of artifact ``name`` (a key of :data:`galpipe.stages.ARTIFACTS`) in results folder ``root``."""
    return Path(root) / ARTIFACTS[name].format(experiment=experiment, split="{split}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object")
    return doc


def _value(doc: Mapping[str, Any], path: Path, *keys: str) -> Any:
    cur: Any = doc
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            raise DataError(f"{path}: key {'.'.join(keys)!r} missing")
        cur = cur[k]
    return cur


def read_run(root: PathLike, experiment: str) -> RunRecord:
    """Read one seed's results folder (see :class:`RunRecord`).

    Raises
    ------
    DataError
        A file missing or malformed, naming it; a best epoch not in ``history.csv``.
    """
    missing = [str(run_file(root, n, experiment)) for n in RUN_FILES if not run_file(root, n, experiment).exists()]
    missing += [str(Path(root) / ARTIFACTS["split"].format(split=s)) for s in ("validation", "test")
                if not (Path(root) / ARTIFACTS["split"].format(split=s)).is_file()]
    if missing:
        raise DataError(f"run {root}: not a finished results folder of experiment {experiment!r} "
                        f"(missing: {', '.join(missing)})")
    mj = run_file(root, "model", experiment)
    meta = _value(_read_json(mj), mj, "metadata")
    seed = _value(meta, mj, "training", "seed")
    ti = run_file(root, "train_info", experiment)
    best = _value(_read_json(ti), ti, "best_epoch")
    if isinstance(seed, bool) or not isinstance(seed, int) or isinstance(best, bool) or not isinstance(best, int):
        raise DataError(f"run {root}: seed {seed!r} ({mj}) and best_epoch {best!r} ({ti}) must be integers")
    hp = run_file(root, "history", experiment)
    hist = pd.read_csv(hp)
    need = {"epoch", "val_balanced_acc", "val_loss"}
    if not need <= set(hist.columns):
        raise DataError(f"{hp}: columns {sorted(need - set(hist.columns))} missing (a run without validation?)")
    row = hist[hist["epoch"] == best]
    if len(row) != 1 or not math.isfinite(float(row["val_balanced_acc"].iloc[0])):
        raise DataError(f"{hp}: no finite val_balanced_acc for the best epoch {best} ({ti})")
    mp = run_file(root, "metrics", experiment)
    metrics = _read_json(mp)
    if metrics.get("experiment") not in (None, experiment):
        raise DataError(f"{mp}: evaluates experiment {metrics.get('experiment')!r}, not {experiment!r}")
    tta = metrics.get("tta")
    return RunRecord(root=str(root), experiment=experiment, seed=seed, best_epoch=best,
                     validation_balanced_accuracy=float(row["val_balanced_acc"].iloc[0]),
                     validation_loss=float(row["val_loss"].iloc[0]),
                     test_balanced_accuracy=float(_value(metrics, mp, "plain", "balanced_accuracy", "value")),
                     test_balanced_accuracy_tta=None if not tta else float(tta["balanced_accuracy"]["value"]))


def choose_run(runs: Sequence[RunRecord]) -> int:
    """Index of the run to ship: the highest validation balanced accuracy.

    Ties go to the lower validation loss, then to the earlier run.  Test figures never
    take part: choosing on the test split would make its figures optimistic.
    """
    if not runs:
        raise ConfigError("no --run given: at least one results folder is needed")
    return min(range(len(runs)), key=lambda i: (-runs[i].validation_balanced_accuracy, runs[i].validation_loss, i))


def _check_same_config(pairs: Sequence[tuple[PathLike, str]], config_training: Mapping[str, Mapping[str, Any]]
                       ) -> None:
    """Every run must be a seed of one config: same architecture, classes, contract, training but the seed.

    ``pairs`` are the ``(results folder, experiment)`` runs; ``config_training`` maps each
    experiment to the config's (defaults filled) training section; keys present both there
    and in a model's ``metadata.training`` must agree.
    """
    def key(pair: tuple[PathLike, str]) -> dict[str, Any]:
        root, experiment = pair
        doc = _read_json(run_file(root, "model", experiment))
        meta = doc.get("metadata", {})
        return {"architecture": doc.get("architecture"), "classes": meta.get("classes"),
                "input_contract": {k: v for k, v in (meta.get("input_contract") or {}).items()
                                   if k != "derived_from"},  # names a training image: differs per split
                "preprocess": meta.get("preprocess"),
                "normalisation": meta.get("normalisation"),
                "training": {k: v for k, v in (meta.get("training") or {}).items() if k != "seed"}}

    def show(pair: tuple[PathLike, str]) -> str:
        return f"{pair[0]} ({pair[1]})"

    first = key(pairs[0])
    for pair in pairs:
        this = key(pair)
        for k, v in this.items():
            if v != first[k]:
                raise DataError(f"runs {show(pairs[0])} and {show(pair)} differ in the model's {k}: they are not "
                                "seeds of one config")
        bad = [f"{k}: run {this['training'][k]!r}, config {v!r}" for k, v in config_training[pair[1]].items()
               if k != "seed" and k in this["training"] and this["training"][k] != v]
        if bad:
            raise DataError(f"run {pair[0]} was not trained with the config's settings of experiment "
                            f"{pair[1]!r} ({'; '.join(bad)})")


# --------------------------------------------------------------------------- data and test galaxies
def _images_section(cfg: Mapping[str, Any], config: PathLike) -> Mapping[str, Any]:
    if cfg.get("source") != "images":
        raise ConfigError(f"config {config}: source {cfg.get('source')!r}; packaging needs the 'images' source "
                          "(the test galaxies are named by their image files)")
    return cfg["images"]


def data_hash(images: Mapping[str, Any]) -> dict[str, Any]:
    """The hash of the data a config reads: its labels CSV and every image it keeps.

    Parameters
    ----------
    images : mapping
        The config's ``images:`` section (``directory`` and ``labels_csv`` relative to the
        current directory, as the pipeline reads them).

    Returns
    -------
    dict
        ``labels_csv``, ``labels_csv_sha256``, ``n_images``, ``images_sha256`` (over
        ``(path, size)``, see :data:`IMAGES_HASH_RULE`; contents are not read) and the rule.
    """
    from galpipe.sources.images import read_labels

    labels = read_labels(images)
    root = Path(str(images["directory"])).resolve()
    lines = sorted(f"{Path(p).relative_to(root).as_posix()}\t{Path(p).stat().st_size}\n"
                   for p in labels["image_path"])
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
    return {"labels_csv": str(images["labels_csv"]), "labels_csv_sha256": file_sha256(images["labels_csv"]),
            "images_directory": str(images["directory"]), "n_images": len(lines), "images_sha256": h.hexdigest(),
            "images_hash_rule": IMAGES_HASH_RULE}


def test_galaxies(root: PathLike, images_dir: PathLike) -> pd.DataFrame:
    """The test galaxies of a run: ``objid`` (int64), ``image`` (relative to ``images_dir``, POSIX), ``label``.

    From ``split/test.parquet`` (the ids and labels) and ``catalogue/catalogue.parquet`` (each
    galaxy's image file), sorted by ``objid``.

    Raises
    ------
    DataError
        A test galaxy absent from the catalogue, or an image outside ``images_dir``.
    """
    test_path = Path(root) / ARTIFACTS["split"].format(split="test")
    cat_path = Path(root) / ARTIFACTS["catalogue"]
    test = pd.read_parquet(test_path, columns=["objid", "label"])
    cat = pd.read_parquet(cat_path, columns=["objid", "image_path"])
    rows = test.merge(cat, on="objid", how="left", validate="one_to_one")
    if rows["image_path"].isna().any():
        lost = rows.loc[rows["image_path"].isna(), "objid"].head(3).tolist()
        raise DataError(f"{test_path}: test galaxies {lost} are not in {cat_path}")
    base = Path(images_dir).resolve()
    rel = []
    for p in rows["image_path"]:
        try:
            rel.append(Path(p).resolve().relative_to(base).as_posix())
        except ValueError as exc:
            raise DataError(f"{cat_path}: image {p} is not inside the images folder {base} "
                            "(give --images-dir: the folder these results were made from)") from exc
    out = pd.DataFrame({"objid": rows["objid"].astype("int64"), "image": rel, "label": rows["label"].astype(str)})
    return out.sort_values("objid", kind="stable").reset_index(drop=True)


def split_counts(root: PathLike, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Galaxies per class in each split of a run (``split/summary.json``, else counted from the Parquet files)."""
    summary = Path(root) / ARTIFACTS["split_summary"]
    if summary.is_file():
        counts = _read_json(summary).get("counts")
        if isinstance(counts, dict):
            return {s: {c: int(counts.get(s, {}).get(c, 0)) for c in classes} for s in ("train", "validation", "test")}
    out = {}
    for s in ("train", "validation", "test"):
        labels = pd.read_parquet(Path(root) / ARTIFACTS["split"].format(split=s), columns=["label"])["label"]
        out[s] = {c: int((labels == c).sum()) for c in classes}
    return out


# --------------------------------------------------------------------------- test figures
def _interval(block: Mapping[str, Any]) -> dict[str, float | None]:
    return {k: block.get(k) for k in ("value", "ci_low", "ci_high")}


def evaluation_figures(root: PathLike, experiment: str) -> dict[str, Any]:
    """Test metrics with 95% intervals from a run's ``metrics.json``, plain and TTA.

    Per-class recall intervals are not in ``metrics.json``: they are bootstrapped here from
    the run's ``predictions.parquet`` with the evaluate stage's own resampling settings
    (:func:`galpipe.metrics.bootstrap_ci`, same ``n_boot``, ``seed`` and ``alpha``, hence the
    same resamples), after checking that the point recalls equal ``metrics.json``'s.

    Returns
    -------
    dict
        ``{"plain": {...}, "tta": {...} or None}``; each holds ``n``, ``balanced_accuracy``,
        ``accuracy``, ``ece``, ``macro_f1``, ``macro_auc`` (``value``, ``ci_low``, ``ci_high``),
        ``per_class_recall`` (``{class: {value, ci_low, ci_high, support}}``),
        ``confusion_matrix`` and ``bootstrap``.
    """
    from galpipe.metrics import bootstrap_ci

    mp = run_file(root, "metrics", experiment)
    metrics = _read_json(mp)
    classes = list(_value(metrics, mp, "classes"))
    preds = pd.read_parquet(run_file(root, "predictions", experiment))
    y = preds["label_index"].to_numpy(np.int64)
    out: dict[str, Any] = {}
    for mode, prefix in (("plain", "p_"), ("tta", "p_tta_")):
        block = metrics.get(mode)
        if not block:
            out[mode] = None
            continue
        proba = preds[[f"{prefix}{c}" for c in classes]].to_numpy(np.float64)
        boot = _value(metrics, mp, mode, "bootstrap")
        recalls = {}
        for k, c in enumerate(classes):
            def recall(yt: np.ndarray, p: np.ndarray, k: int = k) -> float:
                sel = yt == k
                return float((p[sel].argmax(axis=1) == k).mean()) if sel.any() else math.nan

            value, lo, hi = bootstrap_ci(y, proba, recall, n_boot=int(boot["n_boot"]), seed=int(boot["seed"]),
                                         alpha=float(boot["alpha"]))
            stored = float(_value(metrics, mp, mode, "per_class", c, "recall"))
            if abs(value - stored) > 1e-9:
                raise DataError(f"{run_file(root, 'predictions', experiment)}: recall of {c!r} {value:.6f} differs "
                                f"from {mp}'s {stored:.6f}: the two files are not from one evaluation")
            recalls[c] = {"value": value, "ci_low": lo, "ci_high": hi,
                          "support": int(_value(metrics, mp, mode, "per_class", c, "support"))}
        out[mode] = {"n": int(block.get("n", len(y))), "bootstrap": dict(boot),
                     **{m: _interval(_value(metrics, mp, mode, m))
                        for m in ("balanced_accuracy", "accuracy", "ece", "macro_f1", "macro_auc")},
                     "per_class_recall": recalls, "confusion_matrix": block.get("confusion_matrix")}
    return out


# --------------------------------------------------------------------------- what predict gets
def _link_inputs(rows: pd.DataFrame, images_dir: Path, folder: Path) -> None:
    """``folder/<objid><suffix>`` -> each test image (a symlink; a copy where links are not allowed)."""
    folder.mkdir(parents=True)
    for objid, image in zip(rows["objid"], rows["image"], strict=True):
        src = (images_dir / image).resolve()
        dst = folder / f"{int(objid)}{src.suffix.lower()}"
        try:
            dst.symlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)


def predict_figures(model: PathLike, test_split_csv: PathLike, images_dir: PathLike) -> dict[str, Any]:
    """Balanced accuracy of ``galpipe predict --model MODEL`` on the test galaxies, plain and TTA,
    with ``--reframe off`` (the images as the pipeline's evaluate stage sees them) and with
    ``--reframe auto`` (predict's default).

    The images named in ``test_split_csv`` (``objid``, ``image``, ``label``) are put in a
    temporary folder as ``<objid>.<ext>`` and classified by
    :func:`galpipe.predict.predict_input` exactly as ``galpipe predict`` does; each prediction
    is matched to its label by the ``objid`` predict reads from the file name.  Deterministic:
    no MC dropout, no randomness, the same images in the same order give the same probabilities.

    Parameters
    ----------
    model : path-like or str
        A model folder or a shipped model's name (:func:`galpipe.models.resolve_model`).
    test_split_csv : path-like
        ``test_split.csv`` of a shipped model (N rows).
    images_dir : path-like
        The folder the ``image`` paths are relative to.

    Returns
    -------
    dict
        ``n`` (rows), ``n_predicted`` (images predict could read), ``balanced_accuracy``,
        ``balanced_accuracy_tta``, ``accuracy``, ``accuracy_tta`` (over the predicted rows,
        ``--reframe off``), the same with the suffix ``_reframe_auto`` and ``n_reframed``,
        and ``pred``/``pred_tta``: the predicted class per row (``--reframe off``), in
        ``test_split_csv`` order (None where an image could not be read).
    """
    from galpipe.metrics import classification_metrics
    from galpipe.nn.persist import read_model_info
    from galpipe.predict import predict_input

    model_dir = resolve_model(model)
    classes = list(read_model_info(model_dir)["metadata"]["classes"])
    rows = pd.read_csv(test_split_csv, dtype={"objid": "int64", "image": str, "label": str}, keep_default_na=False)
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise DataError(f"{test_split_csv}: labels {unknown} are not classes of the model {classes}")
    out: dict[str, Any] = {"n": len(rows)}
    with tempfile.TemporaryDirectory(prefix="galpipe-card-") as tmp:
        inputs = Path(tmp) / "test_images"
        _link_inputs(rows, Path(images_dir), inputs)
        runs = [(tta, reframe, ("_tta" if tta else "") + ("" if reframe == "off" else "_reframe_auto"))
                for reframe in ("off", "auto") for tta in (False, True)]
        for tta, reframe, suffix in runs:
            df = predict_input(model_dir, inputs, Path(tmp) / f"predictions{suffix}.csv", tta=tta,
                               show_progress=False, reframe=reframe)
            if reframe == "auto" and "reframe" in df:
                out["n_reframed"] = int((df["reframe"] != 1.0).sum())
            pred = dict(zip(df["objid"].astype("int64"), df["pred"], strict=True))
            got = [pred.get(int(o)) for o in rows["objid"]]
            keep = [i for i, g in enumerate(got) if g is not None]
            yt = np.array([classes.index(rows["label"].iloc[i]) for i in keep], np.int64)
            yp = np.array([classes.index(got[i]) for i in keep], np.int64)
            m = classification_metrics(yt, yp, classes)
            out["n_predicted"] = len(keep)
            out[f"balanced_accuracy{suffix}"] = m["balanced_accuracy"]
            out[f"accuracy{suffix}"] = m["accuracy"]
            out[f"pred{suffix}"] = got
    return out


def _agreement_with_evaluate(root: PathLike, experiment: str, rows: pd.DataFrame,
                             figures: Mapping[str, Any]) -> dict[str, Any]:
    """How many test galaxies predict classifies as the evaluate stage did (plain and TTA)."""
    ev = pd.read_parquet(run_file(root, "predictions", experiment)).set_index("objid")
    out = {}
    for suffix in ("", "_tta"):
        col = f"pred{suffix}"
        if col not in ev.columns:
            continue
        same = sum(1 for o, p in zip(rows["objid"], figures[col], strict=True) if p is not None and ev.at[o, col] == p)
        out[f"same_class{suffix}"] = same
    out["n"] = len(rows)
    return out


# --------------------------------------------------------------------------- the card
def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip()


def code_version() -> dict[str, Any]:
    """galpipe's version and, in a git checkout, its commit and whether tracked files differ from it."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"galpipe_version": __version__, "git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    vals = [v for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def default_limits(card: Mapping[str, Any]) -> list[str]:
    """The known limits every card states (written for the GZ1 model; ``--no-default-limits`` drops them)."""
    classes = card["classes"]
    test = card["test"]["plain"]
    ba = test["balanced_accuracy"]
    contract = card["input_contract"]
    framing = (contract.get("framing") or {}).get("description", "unknown")
    counts = card["split_counts"]["test"]
    total = sum(counts.values()) or 1
    mix = ", ".join(f"{100 * counts[c] / total:.0f}% {c}" for c in classes)
    return [
        "Trained on Galaxy Zoo 1 JPEG renderings (SkyServer colour composites, gri) of bright SDSS DR7 "
        "main-sample galaxies: other surveys, depths, colour stretches or fainter galaxies are outside what "
        "it has seen, and its figures do not carry over to them.",
        f"{len(classes)} classes only ({', '.join(classes)}): every galaxy gets one of them. Mergers, "
        "irregulars, stars and artefacts were dropped from training (images.label_map) and will still be "
        "given one of these classes.",
        "Labels are Galaxy Zoo 1 volunteer classes turned into one class per galaxy by an undocumented rule "
        "(probably the most-voted class): some are wrong, which caps the measurable accuracy and blurs the "
        "boundary cases.",
        f"Framing convention: {framing}. Images framed differently (a fixed pixel scale, a tighter or looser "
        "cut-out) change what the network sees; predict checks channels and pixel unit, but cannot check the "
        "framing of a JPEG.",
        f"Input: {', '.join(contract.get('channels', []))} 8-bit display images ({contract.get('pixel_unit')}); "
        "FITS flux images (nanomaggies) break the input contract and are refused by predict unless --force.",
        f"The test set is small (n = {test['n']}): the balanced accuracy's 95% interval is "
        f"[{ba['ci_low']:.3f}, {ba['ci_high']:.3f}], and seeds of the same config differ by the spread given above.",
        f"Calibration (ECE) and accuracy were measured on this test set's class mix ({mix}); on a set with "
        "other class fractions the probabilities are no longer calibrated and the accuracy changes.",
    ]


def build_card(*, name: str, config: PathLike, experiment: str, runs: Sequence[RunRecord], chosen: int,
               images_dir: PathLike, data: Mapping[str, Any] | None, files: Mapping[str, str],
               predict: Mapping[str, Any], limits_markdown: str | None, default_limits_on: bool = True,
               created: str | None = None) -> dict[str, Any]:
    """The machine-readable model card (``card.json``).

    Parameters
    ----------
    name, config, experiment : str, path-like, str
        The shipped name, the config file, the experiment packaged.
    runs : sequence of RunRecord
        Every seed's record (:func:`read_run`), in ``--run`` order.
    chosen : int
        Index into ``runs`` of the packaged run (:func:`choose_run`).
    images_dir : path-like
        The folder ``test_split.csv``'s image paths are relative to.
    data : mapping or None
        :func:`data_hash`.
    files : mapping
        ``{file name: sha256}`` of the packaged ``model.json``, ``weights.npz``, ``test_split.csv``.
    predict : mapping
        :func:`predict_figures` (without the per-row predictions) and the agreement with evaluate.
    limits_markdown : str or None
        The lead's ``--limits`` snippet.
    default_limits_on : bool
        Include :func:`default_limits`.
    created : str, optional
        ISO date (default: now, UTC).
    """
    run = runs[chosen]
    root = Path(run.root)
    doc = _read_json(run_file(root, "model", experiment))
    meta = doc["metadata"]
    info = _read_json(run_file(root, "train_info", experiment))
    classes = list(meta["classes"])
    contract = dict(meta.get("input_contract") or {})
    test = evaluation_figures(root, experiment)
    from galpipe.stages import run_folders

    results, _ = run_folders(config)
    experiments = list(dict.fromkeys(r.experiment for r in runs))
    roots = list(dict.fromkeys(r.root for r in runs))
    targets = " ".join(f"{results}/{ARTIFACTS['metrics'].format(experiment=e)}" for e in experiments)
    others = [r.validation_balanced_accuracy for i, r in enumerate(runs) if i != chosen]
    reason = (f"highest validation balanced accuracy at the kept (best) epoch among {len(runs)} seed(s)"
              + (f" (next best {max(others):.4f})" if others else "")
              + "; the test split took no part in the choice")
    card: dict[str, Any] = {
        "format": CARD_FORMAT, "format_version": CARD_FORMAT_VERSION, "name": name,
        "created": created or datetime.now(UTC).replace(microsecond=0).isoformat(),
        "experiment": experiment, "description": meta.get("description", ""), "classes": classes,
        "usage": f"galpipe predict --model {name} IMAGES --output predictions.csv",
        "code": code_version(),
        "config": {"path": str(config), "sha256": file_sha256(config)},
        "data": dict(data) if data else None,
        "split_counts": split_counts(root, classes),
        "input_contract": contract,
        "framing": (contract.get("framing") or {}).get("description"),
        "training": {"architecture_preset": meta.get("preset"), "n_params": doc.get("n_params"),
                     "input_shape": doc.get("input_shape"), "settings": meta.get("training"),
                     "best_epoch": info.get("best_epoch"), "epochs_run": info.get("epochs_run"),
                     "train_seconds": info.get("train_seconds")},
        "test": test,
        "predict": {"images_dir": str(images_dir), "test_split": "test_split.csv", **predict,
                    "how": "galpipe.modelcard.predict_figures: galpipe.predict.predict_input(model, a folder of "
                           "the test_split.csv images named <objid>.<ext>, tta False and True), balanced accuracy "
                           "by galpipe.metrics.classification_metrics; deterministic, CI recomputes it "
                           "(tests/test_models_package.py)"},
        "seeds": {"runs": [asdict(r) for r in runs],
                  "validation_balanced_accuracy": _mean_std([r.validation_balanced_accuracy for r in runs]),
                  "test_balanced_accuracy": _mean_std([r.test_balanced_accuracy for r in runs]),
                  "test_balanced_accuracy_tta": _mean_std([r.test_balanced_accuracy_tta for r in runs]),
                  "std": "sample standard deviation (n - 1); null for one run"},
        "chosen": {"run": run.root, "experiment": run.experiment, "seed": run.seed,
                   "validation_balanced_accuracy": run.validation_balanced_accuracy,
                   "reason": reason},
        "reproduce": ([f"snakemake --cores 2 --configfile {config} {targets}"] if len(roots) == 1 else
                      [f"snakemake --cores 2 --configfile {config} --config seed={run.seed} {targets}",
                       f"# each master seed writes {results}/: move it aside before running the next seed"])
                     + ["python scripts/package_model.py --name " + name + f" --config {config} "
                        + " ".join(f"--experiment {e}" for e in experiments) + " "
                        + " ".join(f"--run {r}" for r in roots)],
        "files": dict(files),
        "model_provenance": meta.get("provenance"),
        "citations": list(CITATIONS),
    }
    card["limits"] = default_limits(card) if default_limits_on else []
    card["limits_markdown"] = limits_markdown
    return card


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ci(block: Mapping[str, Any] | None) -> str:
    if not block:
        return "n/a"
    return f"{_fmt(block.get('value'))} [{_fmt(block.get('ci_low'))}, {_fmt(block.get('ci_high'))}]"


def render_markdown(card: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md``: the card for people, from ``card.json``'s content."""
    name, classes = card["name"], card["classes"]
    plain, tta = card["test"]["plain"], card["test"].get("tta")
    pr = card["predict"]
    out = io.StringIO()
    w = out.write
    w(f"# Model card: `{name}` ({' vs '.join(classes)})\n\n")
    w(f"{card['description']}  \nExperiment `{card['experiment']}` of `{card['config']['path']}`, "
      f"seed {card['chosen']['seed']}; packaged {card['created']} by galpipe {card['code']['galpipe_version']}.\n\n")
    w(f"Test balanced accuracy **{_ci(plain['balanced_accuracy'])}**"
      + (f", with test-time augmentation {_ci(tta['balanced_accuracy'])}" if tta else "") + " (95% bootstrap).\n\n")
    w(f"```\n{card['usage']}\n```\n\n")
    w("## Data and classes\n\n")
    d = card.get("data") or {}
    if d:
        w(f"Images: `{d['images_directory']}` ({d['n_images']} labelled images kept by the config), labels "
          f"`{d['labels_csv']}`.\n\n")
    w("| split | " + " | ".join(classes) + " | total |\n|---|" + "---|" * (len(classes) + 1) + "\n")
    for s, counts in card["split_counts"].items():
        w(f"| {s} | " + " | ".join(str(counts[c]) for c in classes) + f" | {sum(counts.values())} |\n")
    con = card["input_contract"]
    w("\n## Input contract and framing\n\n")
    w(f"- channels: {', '.join(con.get('channels', []))} ({con.get('meaning', '')})\n")
    w(f"- pixel unit: {con.get('pixel_unit')} ({con.get('pixel_values', '')})\n")
    w(f"- size: {con.get('size')} pixels\n- framing: {card.get('framing')}\n")
    w("- `galpipe predict` refuses inputs that break the contract (channels, pixel unit, pixel scale) unless "
      "`--force`.\n")
    w("\n## Test figures (95% bootstrap intervals)\n\n")
    boot = plain["bootstrap"]
    w(f"n = {plain['n']} test galaxies; {boot.get('n_boot')} resamples, seed {boot.get('seed')}.\n\n")
    w("| metric | plain | TTA (8 rotations/flips) |\n|---|---|---|\n")
    for m, label in (("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy"),
                     ("ece", "ECE (10 bins)"), ("macro_f1", "macro F1"), ("macro_auc", "macro AUC")):
        w(f"| {label} | {_ci(plain[m])} | {_ci(tta[m]) if tta else 'n/a'} |\n")
    for c in classes:
        r = plain["per_class_recall"][c]
        w(f"| recall {c} (n = {r['support']}) | {_ci(r)} | "
          f"{_ci(tta['per_class_recall'][c]) if tta else 'n/a'} |\n")
    w("\n## What `galpipe predict` gets\n\n")
    w(f"`galpipe predict --model {name}` on the {pr['n']} images of `test_split.csv` "
      f"({pr['n_predicted']} readable), with `--reframe off` (the images as the evaluate stage sees them): "
      f"balanced accuracy {_fmt(pr['balanced_accuracy'], 4)} plain, {_fmt(pr['balanced_accuracy_tta'], 4)} with "
      f"`--tta`; with the default `--reframe auto` ({pr.get('n_reframed', 'n/a')} galaxies reframed): "
      f"{_fmt(pr.get('balanced_accuracy_reframe_auto'), 4)} plain, "
      f"{_fmt(pr.get('balanced_accuracy_tta_reframe_auto'), 4)} with `--tta`.")
    agree = pr.get("agreement_with_evaluate") or {}
    if agree:
        w(f" It gives the evaluate stage's class for {agree.get('same_class', 'n/a')} of {agree['n']} galaxies "
          f"(TTA: {agree.get('same_class_tta', 'n/a')}).")
    w(" CI recomputes these numbers from the shipped files (`tests/test_models_package.py`).\n")
    seeds = card["seeds"]
    w("\n## Seed spread\n\n| seed | validation BA | test BA | test BA (TTA) | run |\n|---|---|---|---|---|\n")
    for r in seeds["runs"]:
        mark = " (chosen)" if (r["root"], r.get("experiment")) == (card["chosen"]["run"],
                                                                   card["chosen"].get("experiment")) else ""
        w(f"| {r['seed']} | {_fmt(r['validation_balanced_accuracy'])} | {_fmt(r['test_balanced_accuracy'])} | "
          f"{_fmt(r['test_balanced_accuracy_tta'])} | `{r['root']}` {r['experiment']}{mark} |\n")
    ms = [seeds[k] for k in ("validation_balanced_accuracy", "test_balanced_accuracy", "test_balanced_accuracy_tta")]
    w("| mean ± std | " + " | ".join(f"{_fmt(m['mean'])} ± {_fmt(m['std'])}" for m in ms) + " | |\n\n")
    w(f"Standard deviations: {seeds['std']}.\n\n")
    w(f"## Which run and why\n\nSeed {card['chosen']['seed']} (`{card['chosen']['run']}` "
      f"{card['chosen'].get('experiment', card['experiment'])}): "
      f"{card['chosen']['reason']}.\n\n")
    tr = card["training"]
    w(f"## Training\n\nArchitecture `{tr['architecture_preset']}`, {tr['n_params']} parameters, input "
      f"{tr['input_shape']}; best epoch {tr['best_epoch']} of {tr['epochs_run']} "
      f"({_fmt(tr['train_seconds'], 0)} s).\n\n| setting | value |\n|---|---|\n")
    for k, v in (tr.get("settings") or {}).items():
        w(f"| {k} | `{json.dumps(v, sort_keys=True)}` |\n")
    code, data = card["code"], card.get("data") or {}
    w("\n## Provenance\n\n")
    w(f"- config `{card['config']['path']}` sha256 `{card['config']['sha256']}`\n")
    if data:
        w(f"- labels CSV sha256 `{data['labels_csv_sha256']}`; images sha256 `{data['images_sha256']}` "
          f"({data['images_hash_rule']})\n")
    w(f"- galpipe {code['galpipe_version']}, git commit `{code['git_commit']}`"
      + (" (with uncommitted changes)" if code.get("git_dirty") else "") + "\n")
    prov = card.get("model_provenance") or {}
    w(f"- model provenance: code `{prov.get('code_digest')}`, config `{prov.get('config_digest')}`, data "
      f"`{prov.get('data_digest')}`\n")
    for f, h in card["files"].items():
        w(f"- `{f}` sha256 `{h}`\n")
    w("\n## Reproduce\n\n```\n" + "\n".join(card["reproduce"]) + "\n```\n")
    w("\n## Known limits\n\n")
    for item in card["limits"]:
        w(f"- {item}\n")
    if card.get("limits_markdown"):
        w("\n" + card["limits_markdown"].strip() + "\n")
    w("\n## Citations\n\n")
    for c in card["citations"]:
        w(f"- {c}\n")
    return out.getvalue()


# --------------------------------------------------------------------------- packaging
def _write_frame_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    atomic_write_text(path, buf.getvalue())


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def default_dest(name: str) -> Path:
    """``galpipe/models/<name>`` of this galpipe (the checkout's, for an editable install)."""
    import galpipe.models

    return Path(galpipe.models.__file__).resolve().parent / name


def _swap_in(new: Path, dest: Path) -> None:
    """Replace folder ``dest`` by ``new`` with renames (an interruption leaves the old or the new folder)."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except OSError:
        if old.exists():
            os.replace(old, dest)
        raise
    if old.exists():
        shutil.rmtree(old)


def package_model(*, name: str, config: PathLike, experiment: str | Sequence[str], runs: Sequence[PathLike],
                  dest: PathLike | None = None, images_dir: PathLike | None = None, limits: PathLike | None = None,
                  default_limits_on: bool = True) -> dict[str, Any]:
    """Choose the best-validation run and write ``dest`` (default ``galpipe/models/<name>``); return the card.

    Parameters
    ----------
    name : str
        The shipped model's name (``galpipe predict --model NAME``).
    config : path-like
        The config every run was made with (``config/gz1-sdss-jpeg.yaml``).
    experiment : str or sequence of str
        The experiment to ship, or several that differ only in their ``seed`` (the
        candidates are every experiment in every results folder).
    runs : sequence of path-like
        Results folders (one per master seed, or one holding the seed experiments).
    dest : path-like, optional
        Where the model folder goes (tests write to a temporary folder).
    images_dir : path-like, optional
        The images folder the runs were made from (default: the config's ``images.directory``).
    limits : path-like, optional
        A Markdown snippet of further known limits, added to the card.
    default_limits_on : bool
        Include :func:`default_limits`.

    Raises
    ------
    ConfigError
        A bad name, an experiment the config does not define, no runs.
    DataError
        A run that is not a finished results folder, or runs that are not seeds of one config.
    """
    from galpipe.config import load_config, preset_search_path, resolve_experiments

    if not is_model_name(name):
        raise ConfigError(f"--name {name!r}: a shipped model's name is letters, digits, '_', '-', '.' "
                          "(one path component, at most 64 characters)")
    cfg = load_config(config)
    exps = resolve_experiments(cfg, preset_search_path(config))
    experiments = [experiment] if isinstance(experiment, str) else list(experiment)
    for e in experiments:
        if e not in exps:
            raise ConfigError(f"--experiment {e!r}: not an experiment of {config} ({', '.join(exps)})")
    if not runs:
        raise ConfigError("no --run given: at least one results folder is needed")
    images = _images_section(cfg, config)
    images_dir = Path(images_dir if images_dir is not None else str(images["directory"]))
    pairs = [(r, e) for r in runs for e in experiments]
    records = [read_run(r, e) for r, e in pairs]
    _check_same_config(pairs, {e: exps[e]["training"] for e in experiments})
    chosen = choose_run(records)
    root = Path(records[chosen].root)
    experiment = records[chosen].experiment
    limits_md = Path(limits).read_text(encoding="utf-8") if limits else None
    dest = Path(dest) if dest is not None else default_dest(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        _copy(run_file(root, "model", experiment), new / MODEL_FILE)
        _copy(run_file(root, "weights", experiment), new / "weights.npz")
        rows = test_galaxies(root, images_dir)
        _write_frame_csv(rows, new / "test_split.csv")
        figures = predict_figures(new, new / "test_split.csv", images_dir)
        agreement = _agreement_with_evaluate(root, experiment, rows, figures)
        predict = {k: v for k, v in figures.items() if not k.startswith("pred")}
        predict["agreement_with_evaluate"] = agreement
        files = {f: file_sha256(new / f) for f in (MODEL_FILE, "weights.npz", "test_split.csv")}
        card = build_card(name=name, config=config, experiment=experiment, runs=records, chosen=chosen,
                          images_dir=images_dir, data=data_hash(images), files=files, predict=predict,
                          limits_markdown=limits_md, default_limits_on=default_limits_on)
        atomic_write_text(new / "card.json", json.dumps(card, indent=2, sort_keys=False, allow_nan=False) + "\n")
        atomic_write_text(new / "MODEL_CARD.md", render_markdown(card))
        written = sorted(p.name for p in new.iterdir())
        if written != sorted(SHIPPED_FILES):  # a shipped folder holds exactly these (galpipe.models)
            raise DataError(f"{new}: wrote {written}, expected {sorted(SHIPPED_FILES)}")
        new.chmod(0o755)  # mkdtemp makes it 0700; a package folder is readable by all
        _swap_in(new, dest)
    finally:
        if new.exists():
            shutil.rmtree(new)
    return card


def check_shipped(model: PathLike, images_dir: PathLike) -> dict[str, tuple[float, float]]:
    """Recompute a shipped model's ``predict`` figures; ``{figure: (card value, recomputed)}``.

    What CI runs: ``model`` (a shipped name or folder) holds ``card.json`` and
    ``test_split.csv``; the images are read from ``images_dir``.
    """
    folder = resolve_model(model)
    card = _read_json(folder / "card.json")
    got = predict_figures(folder, folder / "test_split.csv", images_dir)
    return {k: (float(card["predict"][k]), float(got[k]))
            for k in ("balanced_accuracy", "balanced_accuracy_tta", "balanced_accuracy_reframe_auto",
                      "balanced_accuracy_tta_reframe_auto", "n_predicted")}


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The options of ``scripts/package_model.py``."""
    p = argparse.ArgumentParser(
        prog="package_model.py", description=__doc__.split("\n\n")[0],
        epilog="example: python scripts/package_model.py --name gz1 --config config/gz1-sdss-jpeg.yaml "
               "--experiment vgg_like --run results/gz1-seed42 --run results/gz1-seed43 --limits limits.md")
    p.add_argument("--name", required=True, help="the shipped model's name (galpipe predict --model NAME)")
    p.add_argument("--config", required=True, help="the config every run was made with")
    p.add_argument("--experiment", action="append", required=True,
                   help="the experiment to ship; repeat for experiments that differ only in their seed")
    p.add_argument("--run", action="append", required=True, metavar="DIR",
                   help="results folder of one seed (repeat for each seed)")
    p.add_argument("--limits", default=None, metavar="FILE",
                   help="Markdown snippet of further known limits (default: only the built-in list)")
    p.add_argument("--no-default-limits", action="store_true", help="leave out the built-in list of known limits")
    p.add_argument("--images-dir", default=None, metavar="DIR",
                   help="the images folder the runs were made from (default: the config's images.directory)")
    p.add_argument("--dest", default=None, metavar="DIR",
                   help="where the model folder goes (default: galpipe/models/NAME of this galpipe)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`package_model` from the command line; a galpipe error is one line on stderr, exit 1."""
    args = build_parser().parse_args(argv)
    try:
        card = package_model(name=args.name, config=args.config, experiment=args.experiment, runs=args.run,
                             dest=args.dest, images_dir=args.images_dir, limits=args.limits,
                             default_limits_on=not args.no_default_limits)
    except (GalpipeError, OSError) as exc:
        print(f"package_model.py: error: {exc}", file=sys.stderr)
        return 1
    dest = Path(args.dest) if args.dest else default_dest(args.name)
    pr = card["predict"]
    print(f"chose seed {card['chosen']['seed']} ({card['chosen']['run']} {card['chosen']['experiment']}): "
          f"{card['chosen']['reason']}")
    print(f"test balanced accuracy {_ci(card['test']['plain']['balanced_accuracy'])}; galpipe predict gets "
          f"{pr['balanced_accuracy']:.4f} (TTA {pr['balanced_accuracy_tta']:.4f}) on {pr['n_predicted']}/{pr['n']}")
    print(f"wrote {dest}: {', '.join(SHIPPED_FILES)}")
    return 0

