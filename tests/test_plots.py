"""Tests of galpipe.plots: valid, non-blank, byte-identical PNGs; image helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from galpipe.errors import DataError
from galpipe.metrics import evaluate_predictions
from galpipe.plots import (
    gallery_selection,
    plot_comparison,
    plot_confusion,
    plot_gallery,
    plot_learning_curves,
    plot_reliability,
    plot_roc,
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
