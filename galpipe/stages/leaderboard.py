"""Stage ``leaderboard``: every experiment's headline metrics side by side (CSV, HTML, chart)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from galpipe.io.atomic import atomic_write_text
from galpipe.stages.evaluate import HEADLINE

PathLike = str | os.PathLike[str]


def run(experiments: Sequence[str], metrics_files: Sequence[PathLike], info_files: Sequence[PathLike],
        table_out: PathLike, figure_out: PathLike, *, html_out: PathLike | None = None,
        catalogue: PathLike | None = None, split_summary: PathLike | None = None,
        dataset_out: PathLike | None = None) -> pd.DataFrame:
    """One row per experiment: headline metrics with 95% intervals, time, parameters.

    Writes the table as CSV (``table_out``), the comparison chart (``figure_out``)
    and, when ``html_out`` is given, the same table as a self-contained HTML page
    (:func:`leaderboard_html`) for the Snakemake report, which shows HTML but not CSV.
    With ``catalogue``, ``split_summary`` and ``dataset_out``, also the data page
    (:func:`dataset_html`): class counts per split and where the data came from.
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
    if dataset_out is not None:
        if catalogue is None or split_summary is None:
            raise ValueError("dataset_out needs catalogue and split_summary")
        atomic_write_text(dataset_out, dataset_html(catalogue, split_summary))
    return df


#: Leaderboard columns shown in the HTML table: (column, header); metrics get their CI below.
_HTML_COLUMNS = (("rank", "rank"), ("experiment", "experiment"), ("inputs", "inputs"),
                 ("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
                 ("macro_auc", "macro AUC"), ("ece", "ECE"), ("tta_balanced_accuracy", "balanced accuracy, TTA"),
                 ("n_params", "parameters"), ("epochs_run", "epochs"), ("train_seconds", "training time (s)"),
                 ("n_test", "test galaxies"), ("description", "description"))


@functools.cache
def _templates() -> jinja2.Environment:
    """The Jinja2 environment of ``galpipe/templates`` (package data), autoescaping every value."""
    return jinja2.Environment(loader=jinja2.PackageLoader("galpipe", "templates"), autoescape=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def _html_cell(row: Mapping[str, Any], col: str) -> dict[str, Any]:
    """One table cell of the leaderboard page, for ``templates/leaderboard.html.j2``.

    Parameters
    ----------
    row : mapping
        One leaderboard record (column -> value).
    col : str
        The column shown in this cell.

    Returns
    -------
    dict
        ``cls`` (CSS class ``"num"``, ``"text"`` or ``None``), ``dash`` (a missing
        metric, shown as an en dash), ``text`` (the formatted value, escaped by the
        template) and ``ci`` (``"lo, hi"`` of a metric's interval, or ``""``).
    """
    value = row.get(col)
    missing = value is None or (isinstance(value, float) and not np.isfinite(value))
    cell: dict[str, Any] = {"cls": None, "dash": False, "text": "", "ci": ""}
    if col in HEADLINE or col.startswith("tta_"):
        cell["cls"] = "num"
        if missing:
            return {**cell, "dash": True}
        lo, hi = row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
            cell["ci"] = f"{lo:.3f}, {hi:.3f}"
        return {**cell, "text": f"{value:.3f}"}
    if missing:
        return cell
    if isinstance(value, int | np.integer):
        return {**cell, "cls": "num", "text": f"{int(value):,}"}
    if isinstance(value, float | np.floating):
        return {**cell, "cls": "num", "text": f"{value:.2f}"}
    return {**cell, "cls": "text" if col == "description" else None, "text": str(value)}


def leaderboard_html(df: pd.DataFrame) -> str:
    """The leaderboard as a self-contained HTML page (one table row per experiment).

    Rendered from ``galpipe/templates/leaderboard.html.j2`` with Jinja2
    autoescaping, so experiment names and descriptions cannot inject markup.

    Parameters
    ----------
    df : pandas.DataFrame, shape (n_experiments, n_columns)
        The frame returned by :func:`leaderboard` (one row per experiment,
        best first); columns of ``_HTML_COLUMNS`` absent from it are left out
        of the table.

    Returns
    -------
    str
        An HTML document: a ``<table id="leaderboard">`` whose metric cells show
        the value and its bootstrap 95% interval.
    """
    cols = [(c, h) for c, h in _HTML_COLUMNS if c in df.columns]
    rows = [[_html_cell(rec, c) for c, _ in cols] for rec in df.to_dict("records")]
    return _templates().get_template("leaderboard.html.j2").render(headers=[h for _, h in cols], rows=rows)


# --------------------------------------------------------------------------- the data page
#: Provenance keys shown as "what / value" rows, in this order, when present (the rest is in the JSON).
_PROVENANCE_ROWS = (("source", "source"), ("data_release", "SDSS data release"),
                    ("query_endpoint", "SQL endpoint"), ("queried_at_utc", "queried (UTC)"),
                    ("astroquery_version", "astroquery"), ("label_scheme", "label scheme"),
                    ("labels_csv", "labels CSV"), ("directory", "image folder"),
                    ("created_utc", "catalogue made (UTC)"), ("seed", "seed"), ("bands", "bands"),
                    ("galpipe_version", "galpipe"))


def dataset_summary(catalogue: PathLike, split_summary: PathLike) -> dict[str, Any]:
    """What the data page shows: class counts per split and the catalogue's provenance.

    Parameters
    ----------
    catalogue : path-like
        The catalogue Parquet file (its ``galpipe.provenance`` metadata is read, not its rows).
    split_summary : path-like
        The split stage's ``summary.json`` (``classes``, ``counts`` split -> class -> n, ``n``).

    Returns
    -------
    dict
        ``classes`` (list), ``splits`` (list of split names), ``counts`` (class -> split -> n,
        with a ``total`` per class and a ``total`` row), ``n_catalogue`` (galaxies in the
        catalogue), ``n_split`` (galaxies in the three splits; the difference was rejected
        by the cutouts/normalise stages), ``provenance`` (the catalogue's provenance dict),
        ``sql`` (list of the SQL statements sent, empty unless the source is ``sdss``),
        ``images`` (how the pixels were made, when recorded).
    """
    import pyarrow.parquet as pq

    from galpipe.io.parquet import read_metadata
    from galpipe.stages import SPLITS

    summary = json.loads(Path(split_summary).read_text())
    classes = list(summary["classes"])
    counts: dict[str, dict[str, int]] = {}
    for cls in [*classes, "total"]:
        row = {s: (sum(summary["counts"].get(s, {}).values()) if cls == "total"
                   else int(summary["counts"].get(s, {}).get(cls, 0))) for s in SPLITS}
        row["total"] = sum(row.values())
        counts[cls] = row
    provenance = dict(read_metadata(catalogue).get("provenance", {}))
    sql = provenance.pop("sql", [])
    return {"classes": classes, "splits": list(SPLITS), "counts": counts,
            "n_catalogue": int(pq.ParquetFile(catalogue).metadata.num_rows),
            "n_split": int(counts["total"]["total"]), "provenance": provenance,
            "sql": [str(q) for q in sql] if isinstance(sql, list) else [str(sql)]}


def dataset_html(catalogue: PathLike, split_summary: PathLike) -> str:
    """The data page of the report: split sizes, class counts, provenance and the SQL sent.

    Rendered from ``galpipe/templates/dataset.html.j2`` with autoescaping (SQL text, paths and
    class names cannot inject markup).  See :func:`dataset_summary` for the inputs.
    """
    info = dataset_summary(catalogue, split_summary)
    prov = info["provenance"]
    rows = []
    for key, title in _PROVENANCE_ROWS:
        if key in prov and prov[key] not in (None, "", [], {}):
            value = prov[key]
            rows.append((title, ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    details = json.dumps({k: v for k, v in prov.items() if k not in dict(_PROVENANCE_ROWS)},
                         indent=1, sort_keys=True, default=str)
    return _templates().get_template("dataset.html.j2").render(info=info, rows=rows, details=details)
