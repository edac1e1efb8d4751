"""Experiments: train one architecture on the splits, evaluate it, compare them all.

An experiment (one entry of ``experiments:`` in the config, resolved by
:func:`galpipe.config.resolve_experiments`) is an architecture — the list of
hidden layers; the output layer, one unit per class, is appended here — plus
training settings and the kind of input: the image pixels or, for the
non-image baseline, catalogue features (:mod:`galpipe.features`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from galpipe import __version__
from galpipe.catalogue import read_metadata, write_table
from galpipe.config import fingerprint
from galpipe.errors import ConfigError
from galpipe.io import atomic_write_text, safe_filename

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]


def full_architecture(hidden: Sequence[Any], n_classes: int) -> list[Any]:
    """Hidden layers + the output layer (dense, ``n_classes`` units, logits)."""
    return [*hidden, {"type": "dense", "units": int(n_classes), "init": "glorot"}]


#: Keys of the config's ``training.schedule`` that each schedule type uses.
_SCHEDULE_KEYS = {"constant": {"type", "warmup_epochs"}, "step": {"type", "warmup_epochs", "step_size", "gamma"},
                  "cosine": {"type", "warmup_epochs", "min_lr"}}


def _training_dict(exp: Mapping[str, Any]) -> dict[str, Any]:
    t = dict(exp["training"])
    opt = t.pop("optimizer")
    momentum, nesterov = t.pop("momentum", 0.9), t.pop("nesterov", False)
    out = {**t, "optimizer": opt, "seed": int(exp.get("seed", 0))}
    if opt == "sgd":
        out["optimizer_kwargs"] = {"momentum": momentum, "nesterov": nesterov}
    out["early_stopping_patience"] = t.get("early_stopping_patience") or None
    sched = dict(t.get("schedule") or {"type": "constant"})
    out["schedule"] = {k: v for k, v in sched.items() if k in _SCHEDULE_KEYS[sched.get("type", "constant")]}
    return out


def _feature_datasets(train: PathLike, val: PathLike) -> tuple[Any, Any, dict[str, Any]]:
    from galpipe.features import feature_matrix
    from galpipe.nn.data import ArrayDataset, ParquetImageDataset

    xt, names = feature_matrix(train)
    xv, _ = feature_matrix(val)
    mean, std = xt.mean(axis=0), xt.std(axis=0) + 1e-6
    dt, dv = ParquetImageDataset(train), ParquetImageDataset(val)
    tr = ArrayDataset((xt - mean) / std, dt.labels(), classes=dt.classes, objids=dt.objids())
    va = ArrayDataset((xv - mean) / std, dv.labels(), classes=dv.classes, objids=dv.objids())
    return tr, va, {"names": names, "mean": mean.tolist(), "std": std.tolist()}


def load_inputs(model_meta: Mapping[str, Any], path: PathLike) -> Any:
    """The dataset a trained model consumes for split file ``path`` (images or features)."""
    from galpipe.features import feature_matrix
    from galpipe.nn.data import ArrayDataset, ParquetImageDataset

    ds = ParquetImageDataset(path)
    if model_meta.get("inputs") != "features":
        return ds
    x, names = feature_matrix(path)
    f = model_meta["features"]
    if names != f["names"]:
        raise ConfigError(f"{path}: features {names} differ from the model's {f['names']}")
    x = (x - np.asarray(f["mean"], np.float32)) / np.asarray(f["std"], np.float32)
    return ArrayDataset(x.astype(np.float32), ds.labels(), classes=ds.classes, objids=ds.objids())


def train_experiment(exp: Mapping[str, Any], train: PathLike, validation: PathLike, model_json: PathLike,
                     *, name: str = "experiment", checkpoint_root: PathLike = "results/checkpoints",
                     progress: bool = True) -> dict[str, Any]:
    """Train one experiment and write ``model.json``, ``weights.npz``, ``history.csv``, ``train_info.json``.

    Training checkpoints every epoch under ``checkpoint_root/<name>-<hash>``
    (keyed by everything that determines the result), so a killed job resumes
    where it stopped; the checkpoint is removed once the model is saved.
    """
    from galpipe.nn.data import ParquetImageDataset
    from galpipe.nn.model import build_model
    from galpipe.nn.persist import save_model
    from galpipe.nn.training import fit

    safe_filename(name, what="experiment name")  # part of the checkpoint path
    out_dir = Path(model_json).parent
    meta = read_metadata(train)
    classes = list(meta["classes"])
    tcfg = _training_dict(exp)
    feature_info = None
    if exp.get("inputs") == "features":
        train_ds, val_ds, feature_info = _feature_datasets(train, validation)
        input_shape: tuple[int, ...] = (len(feature_info["names"]),)
    else:
        train_ds, val_ds = ParquetImageDataset(train), ParquetImageDataset(validation)
        input_shape = tuple(meta["image_shape"])
    arch = full_architecture(exp["architecture"], len(classes))
    model = build_model(arch, input_shape, seed=int(exp.get("seed", 0)))
    data_key = [pq.ParquetFile(train).metadata.num_rows, meta.get("split"), meta.get("normalisation")]
    ckpt = Path(checkpoint_root) / f"{name}-{fingerprint(arch, tcfg, input_shape, data_key)}"
    t0 = time.perf_counter()
    history = fit(model, train_ds, val_ds, tcfg, checkpoint_dir=ckpt, progress=progress, log=log.info)
    seconds = time.perf_counter() - t0
    metadata = {
        "experiment": name, "description": exp.get("description", ""), "preset": exp.get("preset"),
        "inputs": exp.get("inputs", "image"), "classes": classes, "bands": meta.get("bands", []),
        "image_shape": meta["image_shape"], "normalisation": meta.get("normalisation", {}),
        "features": feature_info, "training": tcfg, "galpipe_version": __version__,
        "preprocess": dict(exp.get("preprocess") or {}),
    }
    save_model(model, out_dir, metadata=metadata)
    history.to_csv(out_dir / "history.csv")
    hist = history.to_dict()
    val_key = "val_balanced_acc"
    best_epoch = int(np.nanargmax(hist[val_key])) + 1 if hist.get(val_key) else len(hist.get("epoch", []))
    info = {"experiment": name, "train_seconds": round(seconds, 3), "n_params": int(model.n_params()),
            "epochs_run": len(hist.get("epoch", [])), "best_epoch": best_epoch,
            "input_shape": list(input_shape), "description": exp.get("description", ""),
            "inputs": exp.get("inputs", "image")}
    atomic_write_text(out_dir / "train_info.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("trained %s: %s", name, info)
    return info


def _predictions_frame(ds: Any, classes: Sequence[str], res: Any, tag: str = "") -> pd.DataFrame:
    df = pd.DataFrame({f"p{tag}_{c}": res.proba[:, k] for k, c in enumerate(classes)})
    df[f"pred{tag}"] = [classes[i] for i in res.proba.argmax(axis=1)]
    df[f"entropy{tag}"] = res.entropy
    if getattr(res, "std", None) is not None and np.any(res.std):
        for k, c in enumerate(classes):
            df[f"std{tag}_{c}"] = res.std[:, k]
    return df


def evaluate_experiment(params: Mapping[str, Any], model_json: PathLike, test: PathLike,
                        metrics_out: PathLike, predictions_out: PathLike, figures_dir: PathLike,
                        *, history: PathLike | None = None) -> dict[str, Any]:
    """Evaluate a trained model on the test split: metrics.json, predictions and figures."""
    from galpipe import metrics as M
    from galpipe import plots as P
    from galpipe.nn.inference import predict_proba
    from galpipe.nn.persist import load_model

    ev = params["evaluate"]
    seed = int(params.get("seed", 0))
    model, meta = load_model(Path(model_json).parent)
    classes = list(meta["classes"])
    ds = load_inputs(meta, test)
    y = ds.labels()
    objids = ds.objids()
    images = meta.get("inputs") != "features"
    res = predict_proba(model, ds, mc_dropout=int(ev["mc_dropout"]), seed=seed)
    result: dict[str, Any] = {"experiment": meta.get("experiment"), "classes": classes, "n_test": len(y)}
    result["plain"] = M.evaluate_predictions(y, res.proba, classes, n_boot=int(ev["n_bootstrap"]), seed=seed)
    preds = pd.DataFrame({"objid": objids, "label": [classes[i] for i in y], "label_index": y})
    preds = pd.concat([preds, _predictions_frame(ds, classes, res)], axis=1)
    best = res.proba
    if ev["tta"] and images:
        res_tta = predict_proba(model, ds, tta=True, seed=seed)
        result["tta"] = M.evaluate_predictions(y, res_tta.proba, classes, n_boot=int(ev["n_bootstrap"]), seed=seed)
        preds = pd.concat([preds, _predictions_frame(ds, classes, res_tta, "_tta")], axis=1)
    result["headline"] = {k: result["plain"][k] for k in HEADLINE}
    write_table(preds, predictions_out)
    fig = Path(figures_dir)
    fig.mkdir(parents=True, exist_ok=True)
    plain = result["plain"]
    P.plot_confusion(np.asarray(plain["confusion_matrix"]), classes, fig / "confusion_matrix.png")
    P.plot_roc(plain["roc"], fig / "roc.png")
    P.plot_reliability(plain["reliability"], fig / "reliability.png")
    if history is not None:
        P.plot_learning_curves(pd.read_csv(history), fig / "learning_curves.png")
    if images:
        _galleries(test, y, best, classes, meta.get("bands", []), int(ev["gallery_size"]), fig)
    atomic_write_text(metrics_out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    h = result["headline"]
    log.info("evaluated %s: balanced accuracy %.3f [%.3f, %.3f]", meta.get("experiment"),
             h["balanced_accuracy"]["value"], h["balanced_accuracy"]["ci_low"], h["balanced_accuracy"]["ci_high"])
    return result


def _galleries(test: PathLike, y: np.ndarray, proba: np.ndarray, classes: Sequence[str], bands: Sequence[str],
               k: int, fig: Path) -> None:
    from galpipe import plots as P

    sel = P.gallery_selection(y, proba, classes, k=k)
    wanted = sorted({i for idx in sel.values() for i in idx})
    meta = read_metadata(test)
    h, w, c = meta["image_shape"]
    pf = pq.ParquetFile(test)
    found: dict[int, np.ndarray] = {}
    start = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        inside = [i for i in wanted if start <= i < start + n]
        if inside:
            col = pf.read_row_group(rg, columns=["image"]).column(0).combine_chunks()
            imgs = col.values.to_numpy(zero_copy_only=False).reshape(-1, h, w, c)
            for i in inside:
                found[i] = imgs[i - start].copy()
        start += n
    for key, idx in sel.items():
        if not idx:
            continue
        titles = [f"true: {classes[y[i]]}\np({classes[int(proba[i].argmax())]})={proba[i].max():.2f}" for i in idx]
        name = "gallery_mistakes" if key == "mistakes" else f"gallery_correct_{key.split(':', 1)[1]}"
        P.plot_gallery(np.stack([found[i] for i in idx]), list(bands), titles, fig / f"{name}.png",
                       title=key.replace(":", ": "))


def leaderboard(experiments: Sequence[str], metrics_files: Sequence[PathLike], info_files: Sequence[PathLike],
                table_out: PathLike, figure_out: PathLike, *, html_out: PathLike | None = None) -> pd.DataFrame:
    """One row per experiment: headline metrics with 95% intervals, time, parameters.

    Writes the table as CSV (``table_out``), the comparison chart (``figure_out``)
    and, when ``html_out`` is given, the same table as a self-contained HTML page
    (:func:`leaderboard_html`) for the Snakemake report, which shows HTML but not CSV.
    """
    from galpipe import plots as P

    rows = []
    for name, mf, inf in zip(experiments, metrics_files, info_files, strict=True):
        m = json.loads(Path(mf).read_text())
        info = json.loads(Path(inf).read_text())
        row: dict[str, Any] = {"experiment": name, "description": info.get("description", ""),
                               "inputs": info.get("inputs", "image")}
        for key in HEADLINE:
            v = m["plain"].get(key)
            row[key] = v["value"] if v else None
            row[f"{key}_ci_low"] = v["ci_low"] if v else None
            row[f"{key}_ci_high"] = v["ci_high"] if v else None
        if "tta" in m:
            row["tta_balanced_accuracy"] = m["tta"]["balanced_accuracy"]["value"]
            row["tta_accuracy"] = m["tta"]["accuracy"]["value"]
        row.update({"train_seconds": info["train_seconds"], "n_params": info["n_params"],
                    "epochs_run": info["epochs_run"], "n_test": m["n_test"]})
        rows.append(row)
    df = pd.DataFrame(rows).sort_values("balanced_accuracy", ascending=False, kind="stable").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    atomic_write_text(table_out, df.to_csv(index=False, float_format="%.6g"))
    if html_out is not None:
        atomic_write_text(html_out, leaderboard_html(df))
    P.plot_comparison(df, figure_out, metric="balanced_accuracy")
    return df


#: Leaderboard columns shown in the HTML table: (column, header); metrics get their CI below.
_HTML_COLUMNS = (("rank", "rank"), ("experiment", "experiment"), ("inputs", "inputs"),
                 ("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
                 ("macro_auc", "macro AUC"), ("ece", "ECE"), ("tta_balanced_accuracy", "balanced accuracy, TTA"),
                 ("n_params", "parameters"), ("epochs_run", "epochs"), ("train_seconds", "training time (s)"),
                 ("n_test", "test galaxies"), ("description", "description"))

_HTML_STYLE = """body{font-family:system-ui,sans-serif;font-size:14px;margin:1.5em;color:#1e293b}
table{border-collapse:collapse}th,td{padding:.35em .7em;border-bottom:1px solid #cbd5e1;vertical-align:top}
th{background:#f1f5f9;text-align:left}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.text{min-width:14em;max-width:32em}small{color:#64748b}"""


def _html_cell(row: Mapping[str, Any], col: str) -> str:
    from html import escape

    value = row.get(col)
    missing = value is None or (isinstance(value, float) and not np.isfinite(value))
    if col in HEADLINE or col.startswith("tta_"):
        if missing:
            return '<td class="num">&ndash;</td>'
        lo, hi = row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
        ci = (f"<br><small>[{lo:.3f}, {hi:.3f}]</small>"
              if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi) else "")
        return f'<td class="num">{value:.3f}{ci}</td>'
    if missing:
        return "<td></td>"
    if isinstance(value, int | np.integer):
        return f'<td class="num">{int(value):,}</td>'
    if isinstance(value, float | np.floating):
        return f'<td class="num">{value:.2f}</td>'
    return f'<td class="text">{escape(str(value))}</td>' if col == "description" else f"<td>{escape(str(value))}</td>"


def leaderboard_html(df: pd.DataFrame) -> str:
    """The leaderboard as a self-contained HTML page (one table row per experiment).

    Parameters
    ----------
    df : pandas.DataFrame
        The frame returned by :func:`leaderboard` (one row per experiment,
        best first); metric columns absent from it are left out of the table.

    Returns
    -------
    str
        An HTML document: a ``<table>`` whose metric cells show the value and
        its bootstrap 95% interval.
    """
    cols = [(c, h) for c, h in _HTML_COLUMNS if c in df.columns]
    head = "".join(f"<th>{h}</th>" for _, h in cols)
    rows = []
    for rec in df.to_dict("records"):
        rows.append("<tr>" + "".join(_html_cell(rec, c) for c, _ in cols) + "</tr>")
    body = "\n".join(rows)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>galpipe leaderboard</title>'
            f"<style>{_HTML_STYLE}</style></head>\n<body>\n<h1>Leaderboard</h1>\n"
            "<p>Test-split metrics of every experiment, best balanced accuracy first; "
            "bootstrap 95% confidence intervals in brackets.</p>\n"
            f'<table id="leaderboard">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n'
            "</body>\n</html>\n")


def check_architectures(cfg: Mapping[str, Any], experiments: Mapping[str, Mapping[str, Any]]) -> None:
    """Build every image experiment's network on the configured input shape.

    Run by the Snakefile before any job, so an architecture whose shapes do not
    fit together fails at once, naming the experiment and the layer.
    """
    from galpipe.errors import ModelError
    from galpipe.nn.model import build_model

    n_bands = 3 if cfg["source"] == "images" else len(cfg["bands"])
    shape = (cfg["cutout_size"], cfg["cutout_size"], n_bands)
    for name, exp in experiments.items():
        if exp.get("inputs", "image") != "image":
            continue
        try:
            build_model(full_architecture(exp["architecture"], 2), shape)
        except ModelError as exc:
            raise ModelError(f"config key 'experiments.{name}.architecture': {exc}") from exc
