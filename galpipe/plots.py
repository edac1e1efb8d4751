"""Evaluation figures (PNG) and the image helpers behind the galleries.

Every ``plot_*`` function draws on its own :class:`matplotlib.figure.Figure`
(no pyplot state, nothing left open), built by the matching ``*_figure``
function (which returns the figure unsaved, so that what it plots can be read
back from its Axes, as the tests do), writes the PNG atomically with
:func:`galpipe.io.atomic.atomic_path` and returns the path.  Output is byte-identical
for identical inputs: a fixed style (:data:`_STYLE`, independent of the user's
matplotlibrc), a fixed DPI and no ``Software``/date metadata in the PNG.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from galpipe.errors import DataError
from galpipe.io.atomic import atomic_path
from galpipe.metrics import _check_classes, _check_inputs

__all__ = [
    "comparison_figure",
    "confusion_figure",
    "gallery_figure",
    "gallery_selection",
    "learning_curves_figure",
    "plot_comparison",
    "plot_confusion",
    "plot_gallery",
    "plot_learning_curves",
    "plot_reliability",
    "plot_roc",
    "reliability_figure",
    "roc_figure",
    "to_rgb",
]

#: Resolution of every figure written.
DPI = 100

#: Style applied to every figure, whatever the user's matplotlibrc says.
_STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": False,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "axes.prop_cycle": matplotlib.cycler(
        color=[
            "#1f77b4",
            "#ff7f0e",
            "#2ca02c",
            "#d62728",
            "#9467bd",
            "#8c564b",
            "#e377c2",
            "#7f7f7f",
            "#bcbd22",
            "#17becf",
        ]
    ),
    "image.cmap": "viridis",
    "path.simplify": True,
    "text.usetex": False,
    "svg.hashsalt": "galpipe",
}

#: Effective wavelengths (nm) of known photometric bands, used to order bands blue -> red.
BAND_WAVELENGTH_NM: dict[str, float] = {
    "u": 354.0,
    "g": 477.0,
    "r": 623.0,
    "i": 763.0,
    "z": 913.0,
    "y": 1004.0,
    "j": 1250.0,
    "h": 1650.0,
    "k": 2200.0,
    "ks": 2150.0,
}

_RGB_NAMES = ("red", "green", "blue")


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _figure(width: float, height: float) -> Iterator[Figure]:
    """A fresh Agg figure of ``width`` x ``height`` inches, built under :data:`_STYLE`."""
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI)
        FigureCanvasAgg(fig)
        yield fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a deterministic PNG at ``path``, atomically, under :data:`_STYLE`."""
    final = Path(path)
    with matplotlib.rc_context(_STYLE), atomic_path(final) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return final


def _as_float_array(values: Any, what: str) -> np.ndarray:
    """``values`` as a float64 array of any shape; DataError naming ``what`` if not numeric."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}: expected numbers ({exc})") from exc
    return arr


# --------------------------------------------------------------------------- confusion
def confusion_figure(
    cm: Any, classes: Sequence[str], *, normalise: bool = True, title: str | None = None
) -> Figure:
    """The figure of :func:`plot_confusion`, not saved (its cells can be read back).

    Parameters
    ----------
    cm : array-like of int, shape (K, K)
        Counts, rows = true class, columns = predicted class.
    classes : sequence of str, length K
        Class names.
    normalise : bool
        Colour cells by row fraction (recall of the row's class) instead of count.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One heat-map Axes (plus its colour bar): ``axes[0].images[0]`` holds
        the (K, K) colour values (row fractions, or counts), and
        ``axes[0].texts[i * K + j]`` at ``(j, i)`` reads ``"count\\n(fraction)"``.
    """
    names = _check_classes(classes)
    m = _as_float_array(cm, "cm")
    k = len(names)
    if m.shape != (k, k):
        raise DataError(f"cm: expected shape ({k}, {k}) for classes {names}, got {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise DataError("cm: expected finite non-negative counts")
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    shown = frac if normalise else m
    vmax = 1.0 if normalise else max(float(m.max()), 1.0)

    side = 2.2 + 0.9 * k
    with _figure(side + 1.0, side) as fig:
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cbar.set_label("row fraction" if normalise else "count")
        for i in range(k):
            for j in range(k):
                dark = shown[i, j] > 0.55 * vmax
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.0f}\n({frac[i, j]:.2f})",
                    ha="center",
                    va="center",
                    color="white" if dark else "black",
                    fontsize=8,
                )
        ax.set_xticks(range(k), names, rotation=30, ha="right")
        ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title if title is not None else "Confusion matrix (count, row fraction)")
        fig.tight_layout()
    return fig


def plot_confusion(
    cm: Any,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    normalise: bool = True,
    title: str | None = None,
) -> Path:
    """Confusion-matrix heat map with counts and row fractions in every cell.

    Parameters
    ----------
    cm : array-like of int, shape (K, K)
        Counts, rows = true class, columns = predicted class.
    classes : sequence of str, length K
        Class names.
    path : path-like
        Destination PNG.
    normalise : bool
        Colour cells by row fraction (recall of the row's class) instead of count.
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _save(confusion_figure(cm, classes, normalise=normalise, title=title), path)


# --------------------------------------------------------------------------- learning curves
_HISTORY_REQUIRED = ("epoch", "train_loss", "val_loss", "train_acc", "val_acc")
_HISTORY_OPTIONAL = ("val_balanced_acc", "lr")
#: Colour of reference lines (chance, perfect calibration, best epoch) and of the learning rate.
_GREY = "#7f7f7f"


def _history_columns(
    history: Mapping[str, Sequence[float]] | pd.DataFrame,
) -> tuple[dict[str, np.ndarray], float | None]:
    """Validated float columns of a training history, and its best epoch.

    Parameters
    ----------
    history : mapping of str to sequence of float, or pandas.DataFrame
        See :func:`plot_learning_curves`.

    Returns
    -------
    columns : dict of str to numpy.ndarray of float64, shape (E,)
        The required columns and those optional ones present; None -> NaN.
    best_epoch : float or None
        A scalar ``best_epoch`` > 0 of a mapping, else None.
    """
    if isinstance(history, pd.DataFrame):
        cols: dict[str, Any] = {c: history[c].to_numpy() for c in history.columns}
    elif isinstance(history, Mapping):
        cols = dict(history)
    else:
        raise DataError(
            f"history: expected a mapping of columns or a DataFrame, got {type(history).__name__}"
        )
    missing = [c for c in _HISTORY_REQUIRED if c not in cols]
    if missing:
        raise DataError(
            f"history: missing column(s) {missing}; expected {list(_HISTORY_REQUIRED)} "
            f"(optional: {', '.join(_HISTORY_OPTIONAL)})"
        )
    data: dict[str, np.ndarray] = {}
    for c in (*_HISTORY_REQUIRED, *_HISTORY_OPTIONAL):
        if c in cols:
            arr = _as_float_array(cols[c], f"history[{c!r}]")
            if arr.ndim != 1:
                raise DataError(f"history[{c!r}]: expected a 1-D column, got shape {arr.shape}")
            data[c] = arr
    n = len(data["epoch"])
    if n == 0:
        raise DataError("history: has no rows; expected at least one epoch")
    for c, arr in data.items():
        if len(arr) != n:
            raise DataError(f"history[{c!r}]: has {len(arr)} rows, but 'epoch' has {n}")
    best = cols.get("best_epoch")
    scalar = isinstance(best, int | float | np.integer | np.floating) and not isinstance(best, bool)
    return data, (float(best) if scalar and best > 0 else None)


def _draw_loss(ax: Axes, data: Mapping[str, np.ndarray], marker: str | None) -> None:
    """Train and validation loss against epoch (columns of shape (E,))."""
    ax.plot(data["epoch"], data["train_loss"], marker=marker, ms=3, label="train")
    ax.plot(data["epoch"], data["val_loss"], marker=marker, ms=3, label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend()


def _draw_accuracy(ax: Axes, data: Mapping[str, np.ndarray], marker: str | None) -> None:
    """Train/validation accuracy (and validation balanced accuracy if logged) against epoch."""
    epoch = data["epoch"]
    ax.plot(epoch, data["train_acc"], marker=marker, ms=3, label="train accuracy")
    ax.plot(epoch, data["val_acc"], marker=marker, ms=3, label="validation accuracy")
    if "val_balanced_acc" in data:
        ax.plot(epoch, data["val_balanced_acc"], marker=marker, ms=3, ls="--", label="validation balanced acc.")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy")
    ax.legend()


def _draw_lr(ax: Axes, epoch: np.ndarray, lr: np.ndarray, marker: str | None) -> None:
    """Learning rate (shape (E,)) against epoch; log scale when every logged value is > 0."""
    ax.plot(epoch, lr, color=_GREY, marker=marker, ms=3)
    if np.all(lr[np.isfinite(lr)] > 0) and np.isfinite(lr).any():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")


def learning_curves_figure(history: Mapping[str, Sequence[float]] | pd.DataFrame) -> Figure:
    """The figure of :func:`plot_learning_curves`, not saved (its lines can be read back).

    Parameters
    ----------
    history : mapping of str to sequence of float, or pandas.DataFrame
        See :func:`plot_learning_curves`.

    Returns
    -------
    matplotlib.figure.Figure
        Axes "Loss", "Accuracy" and, when ``lr`` is logged, "Learning rate",
        each line's data being ``(epoch, column)``; the best epoch, when
        given, is a dotted vertical line on every Axes.
    """
    data, best_epoch = _history_columns(history)
    has_lr = "lr" in data
    marker = "o" if len(data["epoch"]) <= 30 else None
    with _figure(4.2 * (3 if has_lr else 2), 3.6) as fig:
        axes = fig.subplots(1, 3 if has_lr else 2)
        _draw_loss(axes[0], data, marker)
        _draw_accuracy(axes[1], data, marker)
        if best_epoch is not None:
            for ax in axes:
                ax.axvline(best_epoch, ls=":", color=_GREY, lw=1)
            axes[0].plot([], [], ls=":", color=_GREY, lw=1, label="best epoch")
            axes[0].legend()
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if has_lr:
            _draw_lr(axes[2], data["epoch"], data["lr"], marker)
        fig.tight_layout()
    return fig


def plot_learning_curves(
    history: Mapping[str, Sequence[float]] | pd.DataFrame, path: str | os.PathLike[str]
) -> Path:
    """Loss and accuracy per epoch (and the learning rate when logged).

    Parameters
    ----------
    history : mapping of str to sequence of float, or pandas.DataFrame
        Columns ``epoch``, ``train_loss``, ``val_loss``, ``train_acc``,
        ``val_acc`` (required, equal lengths E >= 1), and optionally
        ``val_balanced_acc`` and ``lr``.  NaN/None entries are left as gaps.
        Other keys are ignored, except a scalar ``best_epoch`` > 0 (as in
        :meth:`galpipe.nn.training.History.to_dict`), marked by a vertical line.
    path : path-like
        Destination PNG.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _save(learning_curves_figure(history), path)


# --------------------------------------------------------------------------- ROC
def roc_figure(roc: Mapping[str, Any]) -> Figure:
    """The figure of :func:`plot_roc`, not saved (its curves can be read back).

    Parameters
    ----------
    roc : dict
        Output of :func:`galpipe.metrics.roc_curves`.

    Returns
    -------
    matplotlib.figure.Figure
        One Axes whose first line is the chance diagonal, then one line per
        class labelled ``"<class> (AUC 0.xxx)"`` with data ``(fpr, tpr)``
        (shape (M,) each), or an empty line ``"<class> (AUC undefined)"``.
    """
    if not isinstance(roc, Mapping) or not isinstance(roc.get("per_class"), Mapping):
        raise DataError("roc: expected the dict returned by galpipe.metrics.roc_curves")
    with _figure(5.0, 4.6) as fig:
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], ls=":", color=_GREY, lw=1, label="chance")
        for name, curve in roc["per_class"].items():
            try:
                fpr = _as_float_array(curve["fpr"], f"roc[{name!r}]['fpr']")
                tpr = _as_float_array(curve["tpr"], f"roc[{name!r}]['tpr']")
                auc = curve["auc"]
            except KeyError as exc:
                raise DataError(f"roc: class {name!r} lacks key {exc}") from exc
            if auc is None or len(fpr) == 0:
                ax.plot([], [], label=f"{name} (AUC undefined)")
                continue
            if fpr.shape != tpr.shape:
                raise DataError(f"roc: class {name!r} has fpr/tpr of different lengths")
            ax.plot(fpr, tpr, lw=1.5, drawstyle="default", label=f"{name} (AUC {auc:.3f})")
        macro = roc.get("macro_auc")
        subtitle = f"macro AUC {macro:.3f}" if macro is not None else "macro AUC undefined"
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC, one vs rest ({subtitle})")
        ax.legend(loc="lower right")
        fig.tight_layout()
    return fig


def plot_roc(roc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """One-vs-rest ROC curves of every class with a defined AUC.

    Parameters
    ----------
    roc : dict
        Output of :func:`galpipe.metrics.roc_curves` (``per_class`` with
        ``fpr``/``tpr``/``auc`` lists, and ``macro_auc``).
    path : path-like
        Destination PNG.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _save(roc_figure(roc), path)


# --------------------------------------------------------------------------- reliability
def _reliability_bins(rel: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``lower``, ``upper``, ``count``, ``accuracy``, ``confidence`` per bin (shape (B,), None -> NaN)."""
    if not isinstance(rel, Mapping) or not isinstance(rel.get("bins"), Sequence):
        raise DataError("rel: expected the dict returned by galpipe.metrics.reliability")
    bins = rel["bins"]
    try:
        return {
            "lower": np.array([b["lower"] for b in bins], dtype=np.float64),
            "upper": np.array([b["upper"] for b in bins], dtype=np.float64),
            "count": np.array([b["count"] for b in bins], dtype=np.float64),
            "accuracy": np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins], dtype=np.float64),
            "confidence": np.array(
                [np.nan if b["mean_confidence"] is None else b["mean_confidence"] for b in bins], dtype=np.float64
            ),
        }
    except (KeyError, TypeError) as exc:
        raise DataError(f"rel: malformed bin ({exc})") from exc


def reliability_figure(rel: Mapping[str, Any]) -> Figure:
    """The figure of :func:`plot_reliability`, not saved (its bars can be read back).

    Parameters
    ----------
    rel : dict
        Output of :func:`galpipe.metrics.reliability`.

    Returns
    -------
    matplotlib.figure.Figure
        Two Axes.  Top: one bar per non-empty bin (``patches``: centre, width,
        height = accuracy), the gaps as red vertical segments and the mean
        confidences as a line of diamonds (``lines[1]``, data (centre,
        confidence)); title with ECE and MCE.  Bottom: one bar per bin, height
        = galaxy count.
    """
    b = _reliability_bins(rel)
    acc, conf = b["accuracy"], b["confidence"]
    width = b["upper"] - b["lower"]
    centre = (b["lower"] + b["upper"]) / 2.0
    filled = b["count"] > 0
    with _figure(5.0, 6.0) as fig:
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        top.plot([0, 1], [0, 1], ls=":", color=_GREY, lw=1, label="perfect calibration")
        top.bar(centre[filled], acc[filled], width=width[filled], edgecolor="#1f4e79", color="#1f77b4", alpha=0.8,
                label="accuracy")
        top.vlines(centre[filled], np.minimum(acc, conf)[filled], np.maximum(acc, conf)[filled], color="#d62728",
                   lw=2, label="gap |accuracy - confidence|")
        top.plot(centre[filled], conf[filled], ls="none", marker="D", ms=4, color="black", label="mean confidence")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        ece, mce = rel.get("ece"), rel.get("mce")
        parts = []
        if ece is not None:
            parts.append(f"ECE {ece:.3f}")
        if mce is not None:
            parts.append(f"MCE {mce:.3f}")
        top.set_title("Reliability diagram" + (f" ({', '.join(parts)})" if parts else ""))
        top.legend(loc="upper left")
        bottom.bar(centre, b["count"], width=width, color=_GREY, edgecolor="#404040")
        bottom.set_xlabel("confidence (top-class probability)")
        bottom.set_ylabel("galaxies")
        fig.tight_layout()
    return fig


def plot_reliability(rel: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) over a confidence histogram.

    Parameters
    ----------
    rel : dict
        Output of :func:`galpipe.metrics.reliability` (``bins`` with
        ``lower``/``upper``/``count``/``mean_confidence``/``accuracy``,
        ``ece``, ``mce``).
    path : path-like
        Destination PNG.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _save(reliability_figure(rel), path)


# --------------------------------------------------------------------------- images
def _band_order(bands: Sequence[str]) -> list[int] | None:
    """Indices of ``bands`` sorted blue -> red by wavelength; None if any band is unknown."""
    keys = [str(b).strip().lower() for b in bands]
    if not all(k in BAND_WAVELENGTH_NM for k in keys):
        return None
    return sorted(range(len(keys)), key=lambda i: BAND_WAVELENGTH_NM[keys[i]])


def to_rgb(
    image: Any,
    bands: Sequence[str],
    *,
    percentiles: tuple[float, float] = (1.0, 99.5),
) -> np.ndarray:
    """Display colour image of one normalised cutout.

    Channel choice:

    * bands ``red``, ``green``, ``blue`` (any order, the 8-bit image source):
      used as R, G, B;
    * one band: greyscale;
    * photometric bands (``u g r i z ...``): the three reddest, reddest -> R,
      e.g. ``g, r, i`` -> ``(i, r, g)`` as in Lupton et al. (2004) colour
      composites; two bands -> R = redder, B = bluer, G = their mean.
      Unknown band names are taken to be listed blue -> red.

    Scaling: the pipeline has already asinh-stretched flux cutouts, so the
    chosen channels are only rescaled jointly (preserving colour) by a robust
    percentile range ``percentiles`` of their finite pixels and clipped to
    ``[0, 1]``; an RGB image whose values already lie in ``[0, 1]`` is used
    as it is.  NaN/inf pixels become 0.

    Parameters
    ----------
    image : array-like of float, shape (H, W, C)
        Channels-last image.
    bands : sequence of str, length C
        Band names.
    percentiles : (float, float)
        Lower and upper percentile mapped to 0 and 1.

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
    """
    img = _as_float_array(image, "image")
    if img.ndim != 3:
        raise DataError(f"image: expected shape (H, W, C), got {img.shape}")
    names = [str(b) for b in bands]
    if img.shape[2] != len(names):
        raise DataError(f"image: has {img.shape[2]} channels but bands lists {len(names)} {names}")
    if img.shape[2] == 0:
        raise DataError("image: has no channels")
    lowered = [b.strip().lower() for b in names]
    rgb_like = sorted(lowered) == sorted(_RGB_NAMES)
    if rgb_like:
        chans = img[..., [lowered.index(c) for c in _RGB_NAMES]]
    elif img.shape[2] == 1:
        chans = np.repeat(img, 3, axis=2)
    else:
        order = _band_order(names) or list(range(len(names)))  # blue -> red
        if len(order) == 2:
            blue, red = img[..., order[0]], img[..., order[1]]
            chans = np.stack([red, (red + blue) / 2.0, blue], axis=2)
        else:
            reddest = order[-3:]  # blue, green, red of the three reddest
            chans = img[..., reddest[::-1]]
    finite = np.isfinite(chans)
    values = chans[finite]
    if rgb_like and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = chans
    elif values.size:
        lo, hi = np.percentile(values, percentiles)
        scaled = (chans - lo) / (hi - lo) if hi > lo else np.zeros_like(chans)
    else:
        scaled = np.zeros_like(chans)
    scaled = np.where(finite, scaled, 0.0)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def gallery_selection(
    y_true: Any, proba: Any, classes: Sequence[str], k: int = 8
) -> dict[str, list[int]]:
    """Row indices of the galleries: most confident hits per class, worst mistakes.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        True class indices.
    proba : array-like of float, shape (N, K)
        Class probabilities (prediction = argmax, ties to the lowest index).
    classes : sequence of str, length K
        Class names.
    k : int
        Gallery size.

    Returns
    -------
    dict of str to list of int
        ``"correct:<class>"``: up to ``k`` correctly classified galaxies of
        that class with the highest probability of it; ``"mistakes"``: up to
        ``k`` misclassified galaxies with the highest probability on a wrong
        class (their predicted class).  Ties are broken by the lower row index.
    """
    y, p, names = _check_inputs(y_true, proba, classes)
    assert names is not None
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise DataError(f"k: expected a positive integer gallery size, got {k!r}")
    pred = p.argmax(axis=1)
    out: dict[str, list[int]] = {}
    for c, name in enumerate(names):
        rows = np.flatnonzero((y == c) & (pred == c))
        order = np.argsort(-p[rows, c], kind="stable")
        out[f"correct:{name}"] = [int(i) for i in rows[order[:k]]]
    wrong = p.copy()
    wrong[np.arange(len(y)), y] = -np.inf
    worst = wrong.max(axis=1)
    rows = np.flatnonzero(pred != y)
    order = np.argsort(-worst[rows], kind="stable")
    out["mistakes"] = [int(i) for i in rows[order[:k]]]
    return out


def _scale_bar_arcsec(width_px: int, pixel_scale: float) -> float:
    """A round bar length in arcsec, about a quarter of a tile ``width_px`` pixels wide."""
    target = 0.25 * width_px * pixel_scale
    for length in (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600):
        if length >= target:
            return float(length)
    return float(round(target, -2))


def _draw_scale_bar(ax: Any, width_px: int, height_px: int, pixel_scale: float) -> None:
    """An angular scale bar (bottom left) and the north/east directions (top right) on one tile."""
    length = _scale_bar_arcsec(width_px, pixel_scale)
    px = length / pixel_scale
    x0, y0 = 0.06 * width_px, 0.08 * height_px
    ax.plot([x0, x0 + px], [y0, y0], color="white", linewidth=2.0, solid_capstyle="butt")
    text = f"{length:g}\u2033" if length < 60 else f"{length / 60:g}\u2032"
    ax.text(x0 + px / 2, y0 + 0.04 * height_px, text, color="white", fontsize=6, ha="center", va="bottom")
    ax.text(0.94 * width_px, 0.92 * height_px, "N\u2191 E\u2190", color="white", fontsize=6, ha="right", va="top")


def gallery_figure(
    images: Any,
    bands: Sequence[str],
    titles: list[str],
    *,
    ncols: int = 8,
    title: str | None = None,
    pixel_scale: float | None = None,
) -> Figure:
    """The figure of :func:`plot_gallery`, not saved (its tiles can be read back).

    Parameters
    ----------
    images, bands, titles, ncols, title, pixel_scale
        As in :func:`plot_gallery`.

    Returns
    -------
    matplotlib.figure.Figure
        ``ceil(N / ncols)`` rows of ``min(ncols, N)`` Axes; tile ``i`` (row-major)
        shows ``to_rgb(images[i], bands)`` (``images[0]``, shape (H, W, 3))
        with ``origin="lower"`` (north up, east left) and ``titles[i]`` as its
        x label; unused tiles are switched off.  With ``pixel_scale``, the first
        tile also has a scale bar (``lines[0]``) and the north/east directions.
    """
    imgs = _as_float_array(images, "images")
    if imgs.ndim != 4:
        raise DataError(f"images: expected shape (N, H, W, C), got {imgs.shape}")
    if len(titles) != len(imgs):
        raise DataError(f"titles: has {len(titles)} entries, expected one per image ({len(imgs)})")
    if isinstance(ncols, bool) or not isinstance(ncols, int | np.integer) or ncols < 1:
        raise DataError(f"ncols: expected a positive integer, got {ncols!r}")
    n = len(imgs)
    if n == 0:
        with _figure(4.0, 1.5) as fig:
            fig.text(0.5, 0.5, "(no galaxies to show)", ha="center", va="center")
            if title:
                fig.suptitle(title)
        return fig
    cols = min(int(ncols), n)
    nrows = math.ceil(n / cols)
    n_lines = max(str(t).count("\n") + 1 for t in titles)
    tile = 1.6
    height = (tile + 0.16 * n_lines) * nrows + (0.4 if title else 0.0)
    with _figure(tile * cols, height) as fig:
        axes = fig.subplots(nrows, cols, squeeze=False)
        for idx, ax in enumerate(axes.ravel()):
            ax.set_xticks([])
            ax.set_yticks([])
            if idx >= n:
                ax.set_axis_off()
                continue
            # cutout rows are in FITS order (row 0 = south, galpipe.io.cutout_fits): north up, east left
            ax.imshow(to_rgb(imgs[idx], bands), interpolation="nearest", origin="lower")
            ax.set_xlabel(str(titles[idx]), fontsize=7, linespacing=1.1)
            if idx == 0 and pixel_scale is not None and np.isfinite(pixel_scale) and pixel_scale > 0:
                _draw_scale_bar(ax, imgs.shape[2], imgs.shape[1], float(pixel_scale))
                ax.set_xlim(-0.5, imgs.shape[2] - 0.5)
                ax.set_ylim(-0.5, imgs.shape[1] - 0.5)
        if title:
            fig.suptitle(title)
        fig.tight_layout(pad=0.4)
    return fig


def plot_gallery(
    images: Any,
    bands: Sequence[str],
    titles: list[str],
    path: str | os.PathLike[str],
    *,
    ncols: int = 8,
    title: str | None = None,
    pixel_scale: float | None = None,
) -> Path:
    """Grid of cutouts with a caption under each (e.g. ``"true: spiral\\np(elliptical)=0.97"``).

    Parameters
    ----------
    images : array-like of float, shape (N, H, W, C)
        Normalised cutouts, channels-last, rows in FITS order (row 0 = south, the
        convention of :mod:`galpipe.io.cutout_fits`); each is shown with
        :func:`to_rgb` and ``origin="lower"``, so north is up and east left, as
        on SkyServer's JPEG of the same object.
    bands : sequence of str, length C
        Band names.
    titles : list of str, length N
        Caption of each tile.
    path : path-like
        Destination PNG.
    ncols : int
        Tiles per row.
    title : str, optional
        Figure title.  With ``N = 0`` a placeholder figure saying so is written.
    pixel_scale : float, optional
        Arcsec per pixel of the images: draws an angular scale bar and the north/east
        directions on the first tile (None or unknown: neither).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _save(gallery_figure(images, bands, titles, ncols=ncols, title=title, pixel_scale=pixel_scale), path)


# --------------------------------------------------------------------------- comparison
def _leaderboard_column(leaderboard: pd.DataFrame, column: str) -> np.ndarray:
    """Column ``column`` as float64, shape (n_experiments,); all NaN when absent."""
    if column not in leaderboard.columns:
        return np.full(len(leaderboard), np.nan)
    return _as_float_array(leaderboard[column].to_numpy(), f"leaderboard[{column!r}]")


def comparison_figure(leaderboard: pd.DataFrame, *, metric: str = "balanced_accuracy") -> Figure:
    """The figure of :func:`plot_comparison`, not saved (its points can be read back).

    Parameters
    ----------
    leaderboard, metric
        As in :func:`plot_comparison`.

    Returns
    -------
    matplotlib.figure.Figure
        One Axes: ``lines[0]`` holds the points (value, y) with the best
        experiment at the top (largest y), the y tick labels name the
        experiments, and the error bars span each bootstrap interval.
    """
    if not isinstance(leaderboard, pd.DataFrame):
        raise DataError(
            f"leaderboard: expected a pandas DataFrame, got {type(leaderboard).__name__}"
        )
    if metric not in leaderboard.columns:
        raise DataError(
            f"leaderboard: has no column {metric!r}; columns are {list(leaderboard.columns)}"
        )
    if len(leaderboard) == 0:
        raise DataError("leaderboard: has no rows; expected one per experiment")
    names = (
        leaderboard["experiment"].astype(str).tolist()
        if "experiment" in leaderboard.columns
        else [str(i) for i in leaderboard.index]
    )
    value = _leaderboard_column(leaderboard, metric)
    lo = _leaderboard_column(leaderboard, f"{metric}_ci_low")
    hi = _leaderboard_column(leaderboard, f"{metric}_ci_high")
    lower_is_better = metric == "ece"
    key = np.where(np.isfinite(value), value if lower_is_better else -value, np.inf)
    order = np.lexsort((np.arange(len(value)), key))  # best first, ties by row order
    n = len(order)
    with _figure(6.0, 1.2 + 0.35 * n) as fig:
        ax = fig.add_subplot(1, 1, 1)
        ypos = np.arange(n)[::-1]  # best at the top
        v, lo_o, hi_o = value[order], lo[order], hi[order]
        has_ci = np.isfinite(lo_o) & np.isfinite(hi_o) & np.isfinite(v)
        err = np.zeros((2, n))
        err[0, has_ci] = np.maximum(v[has_ci] - lo_o[has_ci], 0.0)
        err[1, has_ci] = np.maximum(hi_o[has_ci] - v[has_ci], 0.0)
        ax.errorbar(v, ypos, xerr=err, fmt="o", color="#1f77b4", ecolor="#404040", capsize=3)
        for yp, val in zip(ypos, v, strict=True):
            if np.isfinite(val):
                ax.annotate(f"{val:.3f}", (val, yp), xytext=(0, 6), textcoords="offset points", ha="center",
                            fontsize=7)
        ax.set_yticks(ypos, [names[i] for i in order])
        ax.set_ylim(-0.7, n - 0.3)
        label = metric.replace("_", " ")
        ax.set_xlabel(f"{label} ({'lower' if lower_is_better else 'higher'} is better)")
        ax.set_title(f"Experiments by {label}, with bootstrap CI")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
    return fig


def plot_comparison(
    leaderboard: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    metric: str = "balanced_accuracy",
) -> Path:
    """Point + CI error bar of one metric per experiment, best first.

    Parameters
    ----------
    leaderboard : pandas.DataFrame, shape (n_experiments, n_columns)
        One row per experiment; the experiment name comes from an
        ``experiment`` column if present, else from the index.  Columns
        ``<metric>`` and optionally ``<metric>_ci_low`` / ``<metric>_ci_high``
        (missing/NaN bounds: no error bar).
    path : path-like
        Destination PNG.
    metric : str
        Metric to compare.  Higher is better, except ``ece`` (lower is better).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _save(comparison_figure(leaderboard, metric=metric), path)
