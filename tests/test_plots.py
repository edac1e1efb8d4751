"""Tests of galpipe.plots: what each figure plots, valid byte-identical PNGs, image helpers.

The ``*_figure`` builders return the unsaved figure; the content tests read the
plotted data back from its Axes (lines, bars, images, texts) and compare it with
scikit-learn or with hand-computed values of constructed examples.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from sklearn import metrics as skm

from galpipe.errors import DataError
from galpipe.metrics import evaluate_predictions, reliability, roc_curves
from galpipe.plots import (
    comparison_figure,
    confusion_figure,
    gallery_figure,
    gallery_selection,
    learning_curves_figure,
    plot_comparison,
    plot_confusion,
    plot_gallery,
    plot_learning_curves,
    plot_reliability,
    plot_roc,
    reliability_figure,
    roc_figure,
    to_rgb,
)

CLASSES = ["elliptical", "spiral", "edge_on"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluation() -> dict:
    rng = np.random.default_rng(0)
    y = rng.choice(3, 300, p=[0.6, 0.3, 0.1])
    logits = rng.normal(size=(300, 3)) + 2.0 * np.eye(3)[y]
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return evaluate_predictions(y, p, CLASSES, n_boot=50)


def _history() -> dict[str, list[float]]:
    e = np.arange(12, dtype=float)
    return {
        "epoch": list(range(1, 13)),
        "train_loss": list(1.0 / (1 + e)),
        "val_loss": list(1.2 / (1 + e) + 0.1),
        "train_acc": list(1 - 0.5 / (1 + e)),
        "val_acc": list(1 - 0.6 / (1 + e)),
        "val_balanced_acc": [None, *list(1 - 0.7 / (1 + e[1:]))],  # NaN written as null
        "lr": list(1e-3 * 0.8**e),
    }


def _images(n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:24, :24]
    imgs = rng.normal(0.0, 0.03, size=(n, 24, 24, 3))
    for i in range(n):
        blob = np.exp(-((yy - 12) ** 2 / (1 + i) + (xx - 12) ** 2) / 20.0)
        imgs[i] += blob[..., None] * np.array([0.5, 0.8, 1.0])
    return imgs


def _check_png(path: Path) -> np.ndarray:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 5.0, "figure looks blank"
    # no leftover temporary files from the atomic write
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    return pixels


def _figures(evaluation: dict) -> dict[str, Callable[[Path], Path]]:
    leaderboard = pd.DataFrame(
        {
            "experiment": ["small_cnn", "wide_cnn", "features"],
            "balanced_accuracy": [0.81, 0.86, 0.62],
            "balanced_accuracy_ci_low": [0.78, 0.83, 0.57],
            "balanced_accuracy_ci_high": [0.84, 0.89, 0.67],
        }
    )
    return {
        "confusion": lambda p: plot_confusion(
            np.array(evaluation["confusion_matrix"]), CLASSES, p, title="test"
        ),
        "confusion_counts": lambda p: plot_confusion(
            np.array(evaluation["confusion_matrix"]), CLASSES, p, normalise=False
        ),
        "learning": lambda p: plot_learning_curves(_history(), p),
        "learning_df": lambda p: plot_learning_curves(
            pd.DataFrame(_history()).drop(columns=["lr"]), p
        ),
        "roc": lambda p: plot_roc(evaluation["roc"], p),
        "reliability": lambda p: plot_reliability(evaluation["reliability"], p),
        "gallery": lambda p: plot_gallery(
            _images(),
            ["g", "r", "i"],
            [f"true: spiral\np(x)=0.{i}" for i in range(5)],
            p,
            ncols=3,
            title="gallery",
        ),
        "gallery_empty": lambda p: plot_gallery(np.zeros((0, 8, 8, 3)), ["g", "r", "i"], [], p),
        "comparison": lambda p: plot_comparison(leaderboard, p),
    }


@pytest.mark.parametrize(
    "name",
    [
        "confusion",
        "confusion_counts",
        "learning",
        "learning_df",
        "roc",
        "reliability",
        "gallery",
        "gallery_empty",
        "comparison",
    ],
)
def test_figure_valid_nonblank_and_byte_identical(
    name: str, evaluation: dict, tmp_path: Path
) -> None:
    make = _figures(evaluation)[name]
    first = make(tmp_path / "a" / f"{name}.png")
    assert first == tmp_path / "a" / f"{name}.png"
    _check_png(first)
    second = make(tmp_path / "b" / f"{name}.png")
    assert first.read_bytes() == second.read_bytes()
    # overwriting in place is atomic and gives the same bytes again
    assert make(first).read_bytes() == second.read_bytes()


def test_figure_depends_on_data(evaluation: dict, tmp_path: Path) -> None:
    cm = np.array(evaluation["confusion_matrix"])
    a = plot_confusion(cm, CLASSES, tmp_path / "a.png")
    b = plot_confusion(cm[::-1].copy(), CLASSES, tmp_path / "b.png")
    assert a.read_bytes() != b.read_bytes()


def test_comparison_sorted_best_first_and_missing_column(tmp_path: Path) -> None:
    lb = pd.DataFrame({"ece": [0.2, 0.05]}, index=["worse", "better"])
    _check_png(plot_comparison(lb, tmp_path / "ece.png", metric="ece"))  # no CI columns
    with pytest.raises(DataError, match="macro_f1"):
        plot_comparison(lb, tmp_path / "x.png", metric="macro_f1")


def test_plot_input_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cm.*\(3, 3\)"):
        plot_confusion(np.ones((2, 2)), CLASSES, tmp_path / "c.png")
    with pytest.raises(DataError, match="val_acc"):
        h = _history()
        del h["val_acc"]
        plot_learning_curves(h, tmp_path / "l.png")
    with pytest.raises(DataError, match=r"train_loss.*rows"):
        h = _history()
        h["train_loss"] = h["train_loss"][:-1]
        plot_learning_curves(h, tmp_path / "l.png")
    with pytest.raises(DataError, match="titles"):
        plot_gallery(_images(2), ["g", "r", "i"], ["one"], tmp_path / "g.png")
    with pytest.raises(DataError, match="roc"):
        plot_roc({"macro_auc": 0.5}, tmp_path / "r.png")
    assert not list(tmp_path.iterdir())  # nothing written on failure


# --------------------------------------------------------------------------- content
def _lines_by_label(fig: Figure, axes: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{label: (xdata, ydata)}`` of the labelled lines of ``fig.axes[axes]``."""
    return {
        line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
        for line in fig.axes[axes].get_lines()
        if not line.get_label().startswith("_")
    }


def test_roc_figure_plots_sklearn_curves_and_aucs() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.2 * np.eye(3)[y]
    p = np.exp(np.round(logits, 1))  # rounded: tied scores
    p /= p.sum(axis=1, keepdims=True)
    fig = roc_figure(roc_curves(y, p, CLASSES))
    lines = _lines_by_label(fig)
    np.testing.assert_array_equal(lines.pop("chance"), ([0, 1], [0, 1]))
    assert len(lines) == 3
    for k, name in enumerate(CLASSES):
        auc = skm.roc_auc_score(y == k, p[:, k])
        fpr, tpr, _ = skm.roc_curve(y == k, p[:, k])
        x, yy = lines[f"{name} (AUC {auc:.3f})"]
        np.testing.assert_allclose(x, fpr, rtol=0, atol=1e-15)
        np.testing.assert_allclose(yy, tpr, rtol=0, atol=1e-15)
    macro = np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in range(3)])
    assert fig.axes[0].get_title() == f"ROC, one vs rest (macro AUC {macro:.3f})"


def test_roc_figure_hand_computed_and_undefined_class() -> None:
    # "pos": positives score 0.9, 0.5; negatives 0.5, 0.3, 0.1.  Of the 6 (pos, neg) pairs
    # 5 are won and (0.5, 0.5) is tied: AUC = 5.5 / 6 = 0.917
    s = np.array([0.9, 0.5, 0.5, 0.1, 0.3])
    y = [1, 1, 0, 0, 0]
    proba = np.stack([1 - s, s, np.zeros(5)], axis=1)
    fig = roc_figure(roc_curves(y, proba, ["neg", "pos", "absent"]))
    lines = _lines_by_label(fig)
    # (0,0) -> (0, 1/2) at 0.9 -> (1/3, 1) at 0.5 -> (1, 1) at 0.1; (2/3, 1) at 0.3 is collinear
    x, yy = lines["pos (AUC 0.917)"]
    np.testing.assert_allclose(x, [0, 0, 1 / 3, 1])
    np.testing.assert_allclose(yy, [0, 0.5, 1, 1])
    assert lines["absent (AUC undefined)"][0].size == 0
    assert "macro AUC 0.917" in fig.axes[0].get_title()


def test_confusion_figure_cells() -> None:
    cm = np.array([[5, 1, 0], [2, 6, 2], [0, 0, 0]])
    fig = confusion_figure(cm, CLASSES)
    ax = fig.axes[0]
    expected_frac = np.array([[5 / 6, 1 / 6, 0], [0.2, 0.6, 0.2], [0, 0, 0]])
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected_frac)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells[(0, 0)] == "5\n(0.83)"
    assert cells[(0, 1)] == "1\n(0.17)"
    assert cells[(1, 2)] == "2\n(0.20)"
    assert cells[(2, 2)] == "0\n(0.00)"  # empty row: fractions 0, not NaN
    assert len(cells) == 9
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    counts = confusion_figure(cm, CLASSES, normalise=False).axes[0]
    np.testing.assert_array_equal(np.asarray(counts.images[0].get_array()), cm)


def test_reliability_figure_bins_hand_computed() -> None:
    # the example of tests/test_metrics.py: 5 bins, confidences 0.95, 0.85, 0.85 (bin 4)
    # and 0.55 (bin 2); accuracies 2/3 and 1; ECE 0.275, MCE 0.45
    proba = np.array([[0.95, 0.05], [0.85, 0.15], [0.15, 0.85], [0.55, 0.45]])
    fig = reliability_figure(reliability([0, 1, 1, 0], proba, n_bins=5))
    top, bottom = fig.axes
    bars = [(p.get_x() + p.get_width() / 2, p.get_width(), p.get_height()) for p in top.patches]
    np.testing.assert_allclose(bars, [(0.5, 0.2, 1.0), (0.9, 0.2, 2 / 3)])
    diamonds = _lines_by_label(fig)["mean confidence"]
    np.testing.assert_allclose(diamonds, ([0.5, 0.9], [0.55, 2.65 / 3]))
    assert top.get_title() == "Reliability diagram (ECE 0.275, MCE 0.450)"
    np.testing.assert_allclose([p.get_height() for p in bottom.patches], [0, 0, 1, 0, 3])
    np.testing.assert_allclose([p.get_x() for p in bottom.patches], [0, 0.2, 0.4, 0.6, 0.8], atol=1e-12)


def test_learning_curves_figure_plots_the_history() -> None:
    h = _history()
    fig = learning_curves_figure({**h, "best_epoch": 7})
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy", "Learning rate"]
    epoch = np.arange(1, 13)
    loss = _lines_by_label(fig, 0)
    np.testing.assert_allclose(loss["train"], (epoch, h["train_loss"]))
    np.testing.assert_allclose(loss["validation"], (epoch, h["val_loss"]))
    assert "best epoch" in loss
    acc = _lines_by_label(fig, 1)
    np.testing.assert_allclose(acc["train accuracy"], (epoch, h["train_acc"]))
    np.testing.assert_allclose(acc["validation accuracy"], (epoch, h["val_acc"]))
    bal = acc["validation balanced acc."][1]
    assert np.isnan(bal[0])  # the missing first value is a gap
    np.testing.assert_allclose(bal[1:], h["val_balanced_acc"][1:])
    lr_lines = [ln for ln in fig.axes[2].get_lines() if len(ln.get_xdata()) == 12]
    np.testing.assert_allclose(lr_lines[0].get_ydata(), h["lr"])
    assert fig.axes[2].get_yscale() == "log"
    for ax in fig.axes:  # the best epoch is a vertical line on every panel
        assert any(np.all(np.asarray(ln.get_xdata(), float) == 7.0) and len(ln.get_xdata()) == 2
                   for ln in ax.get_lines())
    no_lr = learning_curves_figure(pd.DataFrame(h).drop(columns=["lr"]))
    assert [ax.get_title() for ax in no_lr.axes] == ["Loss", "Accuracy"]
    assert "best epoch" not in _lines_by_label(no_lr, 0)


def test_comparison_figure_best_first_with_intervals() -> None:
    lb = pd.DataFrame({
        "experiment": ["small", "wide", "broken", "features"],
        "balanced_accuracy": [0.81, 0.86, np.nan, 0.62],
        "balanced_accuracy_ci_low": [0.78, 0.83, np.nan, np.nan],
        "balanced_accuracy_ci_high": [0.84, 0.89, np.nan, 0.7],
    })
    ax = comparison_figure(lb).axes[0]
    # top to bottom: best first, undefined last
    ticks = sorted(((t.get_position()[1], t.get_text()) for t in ax.get_yticklabels()), reverse=True)
    assert [name for _, name in ticks] == ["wide", "small", "features", "broken"]
    points, _, (bars,) = ax.containers[0].lines
    np.testing.assert_allclose(points.get_ydata(), [3, 2, 1, 0])
    np.testing.assert_allclose(points.get_xdata(), [0.86, 0.81, 0.62, np.nan])
    spans = [(seg[0][0], seg[1][0], seg[0][1]) for seg in bars.get_segments() if len(seg)]
    # an interval only where both bounds are known: features (one bound) gets a zero-length
    # bar, broken (no value) none
    np.testing.assert_allclose(spans, [(0.83, 0.89, 3), (0.78, 0.84, 2), (0.62, 0.62, 1)])
    assert [t.get_text() for t in ax.texts] == ["0.860", "0.810", "0.620"]
    ece = comparison_figure(pd.DataFrame({"ece": [0.2, 0.05]}, index=["worse", "better"]), metric="ece").axes[0]
    top = max(ece.get_yticklabels(), key=lambda t: t.get_position()[1])
    assert top.get_text() == "better" and "lower is better" in ece.get_xlabel()


def test_gallery_figure_tiles() -> None:
    imgs = _images(5)
    titles = [f"true: spiral\np={i}" for i in range(5)]
    fig = gallery_figure(imgs, ["g", "r", "i"], titles, ncols=3, title="gallery")
    assert len(fig.axes) == 6  # 2 rows of 3, the last tile switched off
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_xlabel() for ax in shown] == titles
    for ax, img in zip(shown, imgs, strict=True):
        np.testing.assert_array_equal(ax.images[0].get_array(), to_rgb(img, ["g", "r", "i"]))
    assert not fig.axes[5].axison
    assert fig.get_suptitle() == "gallery"
    empty = gallery_figure(np.zeros((0, 8, 8, 3)), ["g", "r", "i"], [])
    assert [t.get_text() for t in empty.texts] == ["(no galaxies to show)"]


# --------------------------------------------------------------------------- to_rgb
def test_to_rgb_maps_reddest_band_to_red() -> None:
    img = np.zeros((4, 4, 3))
    img[..., 0] = 0.0  # g
    img[..., 1] = 0.5  # r
    img[..., 2] = 1.0  # i
    rgb = to_rgb(img, ["g", "r", "i"])
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    # i -> R (brightest), r -> G, g -> B (darkest)
    assert rgb[0, 0, 0] > rgb[0, 0, 1] > rgb[0, 0, 2]
    # band order in the file does not matter
    np.testing.assert_array_equal(to_rgb(img[..., ::-1], ["i", "r", "g"]), rgb)


def test_to_rgb_picks_three_reddest_of_five() -> None:
    rng = np.random.default_rng(2)
    img = rng.random((6, 6, 5))
    bands = ["u", "g", "r", "i", "z"]
    np.testing.assert_array_equal(to_rgb(img, bands), to_rgb(img[..., [2, 3, 4]], ["r", "i", "z"]))


def test_to_rgb_rgb_as_is_grey_and_nan() -> None:
    img = np.zeros((2, 2, 3))
    img[..., 0] = 1.0  # channel named "blue"
    img[..., 2] = 0.5  # channel named "red"
    rgb = to_rgb(img, ["blue", "green", "red"])
    np.testing.assert_array_equal(rgb[0, 0], [128, 0, 255])  # in [0, 1]: used as it is
    grey = np.arange(16, dtype=float).reshape(4, 4, 1)
    grey[0, 0, 0] = np.nan
    g = to_rgb(grey, ["r"])
    assert g.shape == (4, 4, 3)
    assert np.all(g[..., 0] == g[..., 1]) and np.all(g[..., 1] == g[..., 2])
    assert g[0, 0, 0] == 0 and g[-1, -1, 0] == 255
    with pytest.raises(DataError, match="bands"):
        to_rgb(np.zeros((2, 2, 3)), ["g", "r"])


# --------------------------------------------------------------------------- gallery
def test_gallery_selection_constructed_example() -> None:
    classes = ["a", "b"]
    y = np.array([0, 0, 0, 1, 1, 0, 1, 1])
    p_a = np.array([0.9, 0.99, 0.6, 0.2, 0.45, 0.3, 0.05, 0.7])
    proba = np.stack([p_a, 1 - p_a], axis=1)
    # correct "a": rows 0 (0.9), 1 (0.99), 2 (0.6) -> most confident first: 1, 0
    # correct "b": rows 3 (0.8), 4 (0.55), 6 (0.95) -> 6, 3
    # mistakes: row 5 (true a, p(b)=0.7), row 7 (true b, p(a)=0.7): tie -> lower index first
    sel = gallery_selection(y, proba, classes, k=2)
    assert sel == {"correct:a": [1, 0], "correct:b": [6, 3], "mistakes": [5, 7]}
    sel3 = gallery_selection(y, proba, classes, k=3)
    assert sel3["correct:a"] == [1, 0, 2]
    assert sel3["mistakes"] == [5, 7]  # only two mistakes exist
    assert all(isinstance(i, int) for v in sel3.values() for i in v)
    with pytest.raises(DataError, match="k"):
        gallery_selection(y, proba, classes, k=0)
