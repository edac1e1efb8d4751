"""Stage ``evaluate``: one experiment's metrics, predictions and figures on the test split."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from galpipe.errors import DataError
from galpipe.io.atomic import atomic_write_text, safe_filename
from galpipe.io.parquet import read_metadata, write_table
from galpipe.provenance import provenance
from galpipe.settings import Config
from galpipe.stages.train import load_inputs

#: The metrics of the leaderboard and of a run's log line.
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")

log = logging.getLogger("galpipe")
PathLike = str | os.PathLike[str]


def params(cfg: Config) -> dict[str, Any]:
    """What evaluation depends on: the evaluate section and the seed (bootstrap, MC dropout)."""
    return {"evaluate": cfg.evaluate.to_dict(), "seed": cfg.seed}


def _predictions_frame(ds: Any, classes: Sequence[str], res: Any, tag: str = "") -> pd.DataFrame:
    df = pd.DataFrame({f"p{tag}_{c}": res.proba[:, k] for k, c in enumerate(classes)})
    df[f"pred{tag}"] = [classes[i] for i in res.proba.argmax(axis=1)]
    df[f"entropy{tag}"] = res.entropy
    if getattr(res, "std", None) is not None and np.any(res.std):
        for k, c in enumerate(classes):
            df[f"std{tag}_{c}"] = res.std[:, k]
    return df


def run(params: Mapping[str, Any], model_json: PathLike, test: PathLike,
        metrics_out: PathLike, predictions_out: PathLike, figures_dir: PathLike,
        *, history: PathLike | None = None) -> dict[str, Any]:
    """Evaluate a trained model on the test split: metrics.json, predictions and figures."""
    from galpipe import metrics as M
    from galpipe import plots as P
    from galpipe.nn.inference import predict_proba
    from galpipe.nn.persist import load_model

    ev = params["evaluate"]
    seed = int(params.get("seed", 0))
    model, meta = load_model(Path(model_json).parent, pipeline=True)
    classes = list(meta["classes"])
    ds = load_inputs(meta, test)
    y = ds.labels()
    objids = ds.objids()
    images = meta.get("inputs") != "features"
    res = predict_proba(model, ds, mc_dropout=int(ev["mc_dropout"]), seed=seed)
    result: dict[str, Any] = {"experiment": meta.get("experiment"), "classes": classes, "n_test": len(y),
                              "provenance": {**provenance("evaluate", params, [test]),
                                             "model": meta.get("provenance")}}
    result["plain"] = M.evaluate_predictions(y, res.proba, classes, n_boot=int(ev["n_bootstrap"]), seed=seed)
    preds = pd.DataFrame({"objid": objids, "label": [classes[i] for i in y], "label_index": y})
    preds = pd.concat([_identity_columns(test, objids), preds.drop(columns="objid"),
                       _predictions_frame(ds, classes, res)], axis=1)
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
        framing = (meta.get("input_contract") or {}).get("framing") or {}
        _galleries(test, y, best, classes, meta.get("bands", []), int(ev["gallery_size"]), fig,
                   identity=preds[[c for c in IDENTITY_COLUMNS if c in preds.columns]],
                   pixel_scale=framing.get("arcsec_per_pixel"))
    atomic_write_text(metrics_out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    h = result["headline"]
    log.info("evaluated %s: balanced accuracy %.3f [%.3f, %.3f]", meta.get("experiment"),
             h["balanced_accuracy"]["value"], h["balanced_accuracy"]["ci_low"], h["balanced_accuracy"]["ci_high"])
    return result


#: Catalogue columns that say which galaxy a prediction is about, copied into the predictions when present.
IDENTITY_COLUMNS = ("objid", "name", "ra", "dec")


def _identity_columns(test: PathLike, objids: np.ndarray) -> pd.DataFrame:
    """``objid`` and, when the split has them, ``name`` (a text id), ``ra``, ``dec`` of every test row.

    Parameters
    ----------
    test : path-like
        The test split Parquet file.
    objids : numpy.ndarray, shape (n_test,)
        The object ids in the order the predictions are made.
    """
    have = [c for c in IDENTITY_COLUMNS if c in pq.read_schema(test).names]
    ident = pq.read_table(test, columns=have).to_pandas()
    if not np.array_equal(ident["objid"].to_numpy(), objids):  # the same rows, in the same order
        ident = ident.set_index("objid").loc[objids].reset_index()
    if "ra" in ident and ident["ra"].isna().all():
        ident = ident.drop(columns=["ra", "dec"])
    return ident.reset_index(drop=True)


def _figure_path(fig: Path, name: str) -> Path:
    """``fig / name`` for a name built from data (a class name): refused unless it stays inside ``fig``."""
    path = fig / name
    if Path(name).name != name or path.resolve().parent != fig.resolve():
        raise DataError(f"figure {name!r}: the path {path} leaves the figures folder {fig}")
    return path


def gallery_caption(row: Mapping[str, Any]) -> str:
    """The identity line(s) of a gallery tile: the text id or objid, and RA/Dec when known.

    ``row`` has ``objid`` and optionally ``name``, ``ra``, ``dec`` (degrees), e.g.
    ``"1237648720693755918\n180.12345 +0.56780"``.
    """
    name = row.get("name")
    ident = str(name) if isinstance(name, str) and name else str(int(row["objid"]))
    ra, dec = row.get("ra"), row.get("dec")
    if ra is not None and dec is not None and np.isfinite(ra) and np.isfinite(dec):
        return f"{ident}\n{float(ra):.5f} {float(dec):+.5f}"
    return ident


def _galleries(test: PathLike, y: np.ndarray, proba: np.ndarray, classes: Sequence[str], bands: Sequence[str],
               k: int, fig: Path, *, identity: pd.DataFrame | None = None,
               pixel_scale: float | None = None) -> None:
    from galpipe import plots as P

    sel = P.gallery_selection(y, proba, classes, k=k)
    ids = identity.to_dict("records") if identity is not None else []
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
        if identity is not None:  # records, not iloc rows: a row Series would turn int64 objids into floats
            titles = [f"{gallery_caption(ids[i])}\n{t}" for i, t in zip(idx, titles, strict=True)]
        name = "gallery_mistakes" if key == "mistakes" else (
            f"gallery_correct_{safe_filename(key.split(':', 1)[1], what='class name')}")
        P.plot_gallery(np.stack([found[i] for i in idx]), list(bands), titles, _figure_path(fig, f"{name}.png"),
                       title=key.replace(":", ": "), pixel_scale=pixel_scale)
