"""Classification metrics with bootstrap confidence intervals.

Used by the evaluate stage, ``galpipe evaluate`` and the experiment report.
Every function returns plain Python objects (``float``, ``int``, ``list``,
``dict``, ``None``) so that results can be written with :func:`json.dumps`
directly; no NumPy scalars and no ``NaN``/``inf`` leak into the output (an
undefined value is ``None``).

Sources of truth
----------------
* Point metrics (accuracy, balanced accuracy, precision/recall/F1, confusion
  matrix, ROC curve and its area) are computed by :mod:`sklearn.metrics`;
  this module only validates inputs, fixes the conventions below and turns
  the results into JSON-ready objects.
* The reliability diagram / ECE and the bootstrap are written here:
  scikit-learn has no expected calibration error, and its
  ``calibration_curve`` bins differently (see :func:`reliability`); the
  bootstrap evaluates each headline metric on every resample at once from
  bincounts (see :func:`_boot_chunk`), which calling scikit-learn once per
  resample would make 100-1000 times slower.  ``tests/test_metrics.py``
  checks the vectorised statistics against scikit-learn resample by resample.

Conventions
-----------
* ``y_true`` / ``y_pred`` are integer class indices in ``0..K-1``, shape ``(N,)``.
* ``proba`` is an ``(N, K)`` array of class probabilities (rows sum to one,
  values in ``[0, 1]``); the predicted class is ``argmax`` (ties go to the
  lowest class index) and the confidence is the row maximum.
* ``0/0`` is defined as ``0.0`` for precision, recall and F1 of a single class
  (a class never predicted has precision 0, a class with no true members has
  recall 0; scikit-learn's ``zero_division=0.0``).  Averages skip classes for
  which the quantity is undefined: balanced accuracy averages recall over the
  classes *present in* ``y_true``; macro F1 averages F1 over the classes
  present in ``y_true`` or ``y_pred`` (scikit-learn's default label set);
  macro AUC averages over the classes whose one-vs-rest AUC is defined (at
  least one positive and one negative).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from galpipe.errors import DataError

__all__ = [
    "HEADLINE_METRICS",
    "bootstrap_ci",
    "classification_metrics",
    "confusion_matrix",
    "evaluate_predictions",
    "headline_row",
    "reliability",
    "roc_curves",
]

#: Metrics reported with a bootstrap confidence interval, in report order.
HEADLINE_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "macro_auc",
    "ece",
)

#: Tolerance on probabilities: values in [-tol, 1 + tol], rows summing to 1 +- tol.
_PROBA_TOL = 1e-3
#: Upper bound on n_boot * N index entries drawn per bootstrap chunk (memory bound).
_CHUNK_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- validation
def _check_labels(y: Any, name: str, n_classes: int | None = None) -> np.ndarray:
    """Return ``y`` as a 1-D int64 array of class indices, or raise DataError."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise DataError(f"{name}: expected a 1-D array of class indices, got shape {arr.shape}")
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == bool or not numeric:
        raise DataError(f"{name}: expected integer class indices, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise DataError(f"{name}: row {bad} is {arr[bad]!r}; expected an integer class index")
        if np.any(arr != np.round(arr)):
            bad = int(np.flatnonzero(arr != np.round(arr))[0])
            raise DataError(f"{name}: row {bad} is {arr[bad]!r}; expected an integer class index")
    out = arr.astype(np.int64)
    if n_classes is not None and out.size:
        bad_mask = (out < 0) | (out >= n_classes)
        if bad_mask.any():
            bad = int(np.flatnonzero(bad_mask)[0])
            raise DataError(
                f"{name}: row {bad} has label {int(out[bad])}; expected 0..{n_classes - 1}"
            )
    return out


def _check_n_classes(n_classes: Any) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise DataError(f"n_classes: expected a positive integer, got {n_classes!r}")
    if n_classes < 1:
        raise DataError(f"n_classes: expected a positive integer, got {n_classes}")
    return int(n_classes)


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str):
        raise DataError(f"classes: expected a sequence of class names, got the string {classes!r}")
    names = [str(c) for c in classes]
    if not names:
        raise DataError("classes: expected at least one class name, got an empty sequence")
    if len(set(names)) != len(names):
        raise DataError(f"classes: names must be unique, got {names}")
    return names


def _check_same_length(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if len(a) != len(b):
        raise DataError(f"{b_name}: has {len(b)} rows but {a_name} has {len(a)}; expected equal")


def _check_proba(proba: Any, n_classes: int | None = None, name: str = "proba") -> np.ndarray:
    """Return ``proba`` as a float64 ``(N, K)`` array of probabilities, or raise DataError."""
    arr = np.asarray(proba)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected an (N, K) array of probabilities, got shape {arr.shape}")
    if n_classes is not None and arr.shape[1] != n_classes:
        raise DataError(
            f"{name}: has {arr.shape[1]} columns, expected one per class (K={n_classes})"
        )
    if arr.shape[1] < 1:
        raise DataError(f"{name}: expected at least one column (class), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{name}: expected numeric probabilities, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    finite = np.isfinite(out)
    if not finite.all():
        row, col = (int(v) for v in np.argwhere(~finite)[0])
        raise DataError(f"{name}: row {row}, column {col} is {out[row, col]}; expected finite")
    out_of_range = (out < -_PROBA_TOL) | (out > 1.0 + _PROBA_TOL)
    if out_of_range.any():
        row, col = (int(v) for v in np.argwhere(out_of_range)[0])
        raise DataError(
            f"{name}: row {row}, column {col} is {out[row, col]:g}; "
            "expected a probability in [0, 1]"
        )
    sums = out.sum(axis=1)
    bad_sum = np.abs(sums - 1.0) > _PROBA_TOL
    if bad_sum.any():
        row = int(np.flatnonzero(bad_sum)[0])
        raise DataError(
            f"{name}: row {row} sums to {sums[row]:.6g}; expected probabilities summing to 1 "
            f"(within {_PROBA_TOL:g})"
        )
    return out


def _check_inputs(
    y_true: Any, proba: Any, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    names = _check_classes(classes) if classes is not None else None
    p = _check_proba(proba, len(names) if names is not None else None)
    y = _check_labels(y_true, "y_true", p.shape[1])
    _check_same_length(y, "y_true", p, "proba")
    if len(y) == 0:
        raise DataError("y_true: is empty; expected at least one galaxy")
    return y, p, names


def _float_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- point metrics
def _labels_cm(yt: np.ndarray, yp: np.ndarray, k: int) -> np.ndarray:
    """``sklearn.metrics.confusion_matrix`` over labels ``0..k-1``, int64, shape (K, K).

    scikit-learn refuses empty input; the confusion matrix of no galaxies is all zeros.
    """
    if len(yt) == 0:
        return np.zeros((k, k), dtype=np.int64)
    return skm.confusion_matrix(yt, yp, labels=np.arange(k)).astype(np.int64)


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Confusion matrix of integer labels (``sklearn.metrics.confusion_matrix``).

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (N,)
        True and predicted class indices in ``0..n_classes-1``.
    n_classes : int
        Number of classes ``K``.

    Returns
    -------
    numpy.ndarray of int64, shape (K, K)
        ``cm[i, j]`` = number of galaxies of true class ``i`` predicted as ``j``
        (rows = true, columns = predicted); all zeros when ``N == 0``.

    Raises
    ------
    DataError
        Mismatched lengths or labels outside ``0..K-1``.
    """
    k = _check_n_classes(n_classes)
    yt = _check_labels(y_true, "y_true", k)
    yp = _check_labels(y_pred, "y_pred", k)
    _check_same_length(yt, "y_true", yp, "y_pred")
    return _labels_cm(yt, yp, k)


def _point_summary(yt: np.ndarray, yp: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 from scikit-learn; NaN when ``N == 0``.

    Parameters
    ----------
    yt, yp : numpy.ndarray of int64, shape (N,)
        Validated true and predicted class indices.
    """
    if len(yt) == 0:
        return {"accuracy": math.nan, "balanced_accuracy": math.nan, "macro_f1": math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        # balanced_accuracy_score warns "y_pred contains classes not in y_true" (those
        # classes have no recall and are left out of the mean, as documented above)
        # and "A single label was found" (the mean of one recall is what we want).
        warnings.filterwarnings("ignore", category=UserWarning, module=r"sklearn\.metrics")
        return {
            "accuracy": float(skm.accuracy_score(yt, yp)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(yt, yp)),
            "macro_f1": float(skm.f1_score(yt, yp, average="macro", zero_division=0.0)),
        }


def classification_metrics(y_true: Any, y_pred: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class scores and confusion matrix.

    All values come from :mod:`sklearn.metrics` (``accuracy_score``,
    ``balanced_accuracy_score``, ``f1_score(average="macro")``,
    ``precision_recall_fscore_support`` and ``confusion_matrix``, with
    ``zero_division=0.0``).

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (N,)
        True and predicted class indices in ``0..K-1``.
    classes : sequence of str, length K
        Class names, in index order.

    Returns
    -------
    dict
        ``accuracy``; ``balanced_accuracy`` (mean recall over the classes present
        in ``y_true``); ``macro_f1`` (mean F1 over the classes present in
        ``y_true`` or ``y_pred``); ``per_class`` = ``{class: {precision,
        recall, f1, support}}`` where ``0/0`` is defined as ``0.0``;
        ``confusion_matrix`` (K lists of K ints, rows = true); ``n``.
        Averages are ``None`` when ``N == 0``.

    Raises
    ------
    DataError
        Mismatched lengths or labels outside ``0..K-1``.
    """
    names = _check_classes(classes)
    k = len(names)
    yt = _check_labels(y_true, "y_true", k)
    yp = _check_labels(y_pred, "y_pred", k)
    _check_same_length(yt, "y_true", yp, "y_pred")
    cm = _labels_cm(yt, yp, k)
    if len(yt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            precision, recall, f1, support = skm.precision_recall_fscore_support(
                yt, yp, labels=np.arange(k), zero_division=0.0
            )
    else:  # scikit-learn refuses empty input; every 0/0 is 0 by convention
        precision = recall = f1 = np.zeros(k)
        support = np.zeros(k, dtype=np.int64)
    summary = _point_summary(yt, yp)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "accuracy": _float_or_none(summary["accuracy"]),
        "balanced_accuracy": _float_or_none(summary["balanced_accuracy"]),
        "macro_f1": _float_or_none(summary["macro_f1"]),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "n": int(cm.sum()),
    }


def _class_roc(
    positive: np.ndarray, score: np.ndarray, drop_intermediate: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One-vs-rest ROC curve and AUC of one class, from ``sklearn.metrics.roc_curve``.

    Parameters
    ----------
    positive : numpy.ndarray of bool, shape (N,)
        Membership of the class; must hold at least one ``True`` and one ``False``.
    score : numpy.ndarray of float, shape (N,)
        Score of the class (its probability).
    drop_intermediate : bool
        Passed to ``roc_curve`` for the returned points.

    Returns
    -------
    fpr, tpr, thresholds : numpy.ndarray of float, shape (M,)
        Curve points from ``(0, 0)``; ``thresholds[0]`` is ``max(score) + 1``
        instead of scikit-learn's ``inf`` (JSON has no infinity).
    auc : float
        ``sklearn.metrics.auc`` (trapezoid) of the full curve, one point per
        distinct score, which equals ``roc_auc_score``.
    """
    full_fpr, full_tpr, full_thr = skm.roc_curve(positive, score, drop_intermediate=False)
    auc = float(skm.auc(full_fpr, full_tpr))
    if drop_intermediate:
        fpr, tpr, thr = skm.roc_curve(positive, score, drop_intermediate=True)
    else:
        fpr, tpr, thr = full_fpr, full_tpr, full_thr
    thr = np.asarray(thr, dtype=np.float64).copy()
    thr[0] = thr[1] + 1.0
    return fpr, tpr, thr, auc


def _roc_all(
    y: np.ndarray, p: np.ndarray, names: Sequence[str], drop_intermediate: bool
) -> dict[str, Any]:
    """:func:`roc_curves` on validated ``y`` (N,) and ``p`` (N, K)."""
    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    for k, name in enumerate(names):
        positive = y == k
        n_pos = int(positive.sum())
        n_neg = int(len(y) - n_pos)
        entry: dict[str, Any] = {"fpr": [], "tpr": [], "thresholds": [], "auc": None}
        if n_pos and n_neg:
            fpr, tpr, thr, auc = _class_roc(positive, p[:, k], drop_intermediate)
            entry = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist(), "auc": auc}
            aucs.append(auc)
        per_class[name] = {**entry, "n_pos": n_pos, "n_neg": n_neg}
    macro = float(np.mean(aucs)) if aucs else None
    return {"per_class": per_class, "macro_auc": macro}


def roc_curves(
    y_true: Any, proba: Any, classes: Sequence[str], *, drop_intermediate: bool = True
) -> dict[str, Any]:
    """One-vs-rest ROC curves and AUCs per class (``sklearn.metrics.roc_curve``).

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        True class indices in ``0..K-1``.
    proba : array-like of float, shape (N, K)
        Class probabilities; column ``k`` is the score of the "class k vs rest"
        problem.
    classes : sequence of str, length K
        Class names.
    drop_intermediate : bool
        Drop points lying on a straight segment between their neighbours (the
        curve and its area are unchanged; the JSON is smaller).

    Returns
    -------
    dict
        ``{"per_class": {class: {"fpr", "tpr", "thresholds", "auc", "n_pos",
        "n_neg"}}, "macro_auc": float | None}``.  Points (lists of M floats)
        run from ``(0, 0)`` (threshold ``max(score) + 1``, since JSON has no
        infinity) to ``(1, 1)``; a galaxy is called positive when its score is
        ``>=`` the threshold, and tied scores form one point, so the AUC
        (trapezoid on this step curve) equals scikit-learn's
        ``roc_auc_score``.  A class with no positives (absent from ``y_true``)
        or no negatives has ``auc = None`` and empty curve lists;
        ``macro_auc`` is the mean over the classes with a defined AUC
        (``None`` if there are none).

    Raises
    ------
    DataError
        Bad shapes, labels or probabilities.
    """
    y, p, names = _check_inputs(y_true, proba, classes)
    assert names is not None
    return _roc_all(y, p, names, drop_intermediate)


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence: bin b covers [b/n, (b+1)/n), the last includes 1."""
    return np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise DataError(f"n_bins: expected a positive integer, got {n_bins!r}")
    return int(n_bins)


def reliability(y_true: Any, proba: Any, n_bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data and calibration errors of the top-class confidence.

    Written here rather than with ``sklearn.calibration.calibration_curve``:
    scikit-learn has no ECE/MCE, its curve is for one binary score and drops
    empty bins, and its uniform bins are closed on the right (``searchsorted``)
    where these are closed on the left, which would move galaxies whose
    confidence lies on a bin edge (e.g. exactly 0.5) and change published
    values.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        True class indices.
    proba : array-like of float, shape (N, K)
        Class probabilities; confidence = row maximum, prediction = argmax.
    n_bins : int
        Number of equal-width confidence bins on ``[0, 1]``; bin ``b`` holds
        confidences in ``[b/n_bins, (b+1)/n_bins)`` (``floor(conf * n_bins)``),
        the last bin also holds ``1.0``.

    Returns
    -------
    dict
        ``bins``: list of ``n_bins`` dicts ``{lower, upper, count,
        mean_confidence, accuracy}`` (the last two ``None`` for an empty bin);
        ``ece`` = sum over bins of ``count / N * |accuracy - mean_confidence|``;
        ``mce`` = the largest ``|accuracy - mean_confidence|`` over non-empty
        bins; ``n``; ``n_bins``.

    Raises
    ------
    DataError
        Bad shapes, labels, probabilities or ``n_bins``.
    """
    nb = _check_n_bins(n_bins)
    y, p, _ = _check_inputs(y_true, proba)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    b = _bin_index(conf, nb)
    count = np.bincount(b, minlength=nb)
    sum_conf = np.bincount(b, weights=conf, minlength=nb)
    sum_correct = np.bincount(b, weights=correct, minlength=nb)
    bins = []
    gaps = []
    for i in range(nb):
        c = int(count[i])
        entry: dict[str, Any] = {
            "lower": i / nb,
            "upper": (i + 1) / nb,
            "count": c,
            "mean_confidence": None,
            "accuracy": None,
        }
        if c:
            entry["mean_confidence"] = float(sum_conf[i] / c)
            entry["accuracy"] = float(sum_correct[i] / c)
            gaps.append(abs(entry["accuracy"] - entry["mean_confidence"]))
        bins.append(entry)
    ece = float(np.abs(sum_correct - sum_conf).sum() / len(y))
    return {
        "bins": bins,
        "ece": ece,
        "mce": float(max(gaps)),
        "n": len(y),
        "n_bins": nb,
    }


# --------------------------------------------------------------------------- bootstrap
# The per-resample statistics below are written by hand on purpose.  A bootstrap
# of 1000 resamples would call scikit-learn 1000 times per metric (about 1 ms of
# input validation per call before any work, and a sort per class for the AUC);
# instead every resample is evaluated at once from bincounts over a (B, N) index
# array.  tests/test_metrics.py::test_vectorised_bootstrap_equals_loop_over_resamples
# checks them against scikit-learn resample by resample, and
# benchmarks/bench_metrics.py times them.  The point estimates next to the
# intervals come from the scikit-learn functions above.


def _prf_from_cm(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 of a stack of confusion matrices; 0/0 -> 0.

    Parameters
    ----------
    cm : numpy.ndarray, shape (..., K, K)
        Confusion matrices, rows = true class.

    Returns
    -------
    precision, recall, f1 : numpy.ndarray of float64, shape (..., K)
    """
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    pred = cm.sum(axis=-2).astype(np.float64)
    true = cm.sum(axis=-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred > 0, tp / pred, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (n_pred + n_true); 0/0 -> 0.
        denom = pred + true
        f1 = np.where(denom > 0, 2.0 * tp / denom, 0.0)
    return precision, recall, f1


def _summary_from_cm(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro F1 of a stack of confusion matrices.

    Parameters
    ----------
    cm : numpy.ndarray, shape (..., K, K)
        Confusion matrices, rows = true class.

    Returns
    -------
    dict of str to numpy.ndarray of float64, shape (...)
        ``accuracy``, ``balanced_accuracy``, ``macro_f1`` with the label sets
        of :func:`classification_metrics`; NaN where undefined (empty matrix).
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum(axis=(-2, -1))
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    true = cm.sum(axis=-1)
    pred = cm.sum(axis=-2)
    _, recall, f1 = _prf_from_cm(cm)
    present = true > 0
    used = present | (pred > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = tp.sum(axis=-1) / n
        balanced = (recall * present).sum(axis=-1) / present.sum(axis=-1)
        macro_f1 = (f1 * used).sum(axis=-1) / used.sum(axis=-1)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": macro_f1}


def _auc_stack(y: np.ndarray, score: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of class ``k`` on each resample ``idx[b]``; NaN where undefined.

    Parameters
    ----------
    y : numpy.ndarray of int64, shape (N,)
        True class indices.
    score : numpy.ndarray of float64, shape (N,)
        Score of class ``k`` (its probability column).
    k : int
        The positive class.
    idx : numpy.ndarray of int64, shape (B, N)
        Row indices of ``B`` resamples.

    Returns
    -------
    numpy.ndarray of float64, shape (B,)

    Notes
    -----
    Uses tie groups of the *original* scores: for each resample, the number of
    positives and negatives in each group (a bincount), then
    ``AUC = sum_g pos_g * (neg_below_g + neg_g / 2) / (P * N)``, which is the
    trapezoid area of the ROC step curve with ties.  Everything is integer
    arithmetic (times two), so the result is exact.
    """
    n_boot = idx.shape[0]
    _, group = np.unique(score, return_inverse=True)  # ascending groups
    n_groups = int(group.max()) + 1
    code = group + np.where(y == k, 0, n_groups)  # positives: g, negatives: G + g
    width = 2 * n_groups
    offsets = (np.arange(n_boot, dtype=np.int64) * width)[:, None]
    counts = np.bincount((code[idx] + offsets).ravel(), minlength=n_boot * width)
    counts = counts.reshape(n_boot, 2, n_groups)
    pos, neg = counts[:, 0, :], counts[:, 1, :]
    neg_below = np.cumsum(neg, axis=1) - neg
    twice = (pos * (2 * neg_below + neg)).sum(axis=1)
    n_pos = pos.sum(axis=1)
    n_neg = neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = twice / (2.0 * n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _boot_chunk(
    names: Sequence[str], y: np.ndarray, p: np.ndarray, idx: np.ndarray, n_bins: int
) -> dict[str, np.ndarray]:
    """Built-in metrics on all resamples at once, from bincounts; NaN where undefined.

    Parameters
    ----------
    names : sequence of str
        Metrics wanted, among :data:`HEADLINE_METRICS`.
    y : numpy.ndarray of int64, shape (N,)
        True class indices.
    p : numpy.ndarray of float64, shape (N, K)
        Class probabilities.
    idx : numpy.ndarray of int64, shape (B, N)
        Row indices of ``B`` resamples.
    n_bins : int
        Bins of the ECE.

    Returns
    -------
    dict of str to numpy.ndarray of float64, shape (B,)
        One value per resample for each name in ``names``.
    """
    n_boot, n = idx.shape
    k = p.shape[1]
    out: dict[str, np.ndarray] = {}
    pred = p.argmax(axis=1)
    offsets = np.arange(n_boot, dtype=np.int64)[:, None]
    if {"accuracy", "balanced_accuracy", "macro_f1"} & set(names):
        code = y * k + pred
        cms = np.bincount((code[idx] + offsets * (k * k)).ravel(), minlength=n_boot * k * k)
        summary = _summary_from_cm(cms.reshape(n_boot, k, k))
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            if name in names:
                out[name] = summary[name]
    if "ece" in names:
        conf = p.max(axis=1)
        correct = (pred == y).astype(np.float64)
        flat = (_bin_index(conf, n_bins)[idx] + offsets * n_bins).ravel()
        sum_conf = np.bincount(flat, weights=conf[idx].ravel(), minlength=n_boot * n_bins)
        sum_corr = np.bincount(flat, weights=correct[idx].ravel(), minlength=n_boot * n_bins)
        gap = np.abs(sum_corr - sum_conf).reshape(n_boot, n_bins)
        out["ece"] = gap.sum(axis=1) / n
    if "macro_auc" in names:
        aucs = np.stack([_auc_stack(y, p[:, c], c, idx) for c in range(k)], axis=1)
        defined = np.isfinite(aucs)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["macro_auc"] = np.where(defined, aucs, 0.0).sum(axis=1) / defined.sum(axis=1)
    return out


def _point_value(name: str, y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    """Built-in metric on the full sample, from the point-metric functions; NaN if undefined.

    Parameters
    ----------
    name : str
        One of :data:`HEADLINE_METRICS`.
    y : numpy.ndarray of int64, shape (N,)
        Validated true class indices.
    p : numpy.ndarray of float64, shape (N, K)
        Validated class probabilities.
    n_bins : int
        Bins of the ECE.
    """
    if name == "macro_auc":
        macro = _roc_all(y, p, [str(c) for c in range(p.shape[1])], drop_intermediate=False)["macro_auc"]
        return math.nan if macro is None else macro
    if name == "ece":
        return reliability(y, p, n_bins)["ece"]
    return _point_summary(y, p.argmax(axis=1))[name]


def _resample_chunks(n: int, n_boot: int, seed: int) -> list[np.ndarray]:
    """All bootstrap index arrays, drawn from one generator in fixed-size chunks.

    The chunk size depends only on ``n`` so the draws are a deterministic
    function of ``(n, n_boot, seed)``.
    """
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    chunks = []
    done = 0
    while done < n_boot:
        b = min(per_chunk, n_boot - done)
        chunks.append(rng.integers(0, n, size=(b, n), dtype=np.int64))
        done += b
    return chunks


def _check_boot_args(n_boot: Any, seed: Any, alpha: Any) -> tuple[int, int, float]:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 0:
        raise DataError(f"n_boot: expected a non-negative integer, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha < 1.0:
        raise DataError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    return int(n_boot), int(seed), float(alpha)


def _bootstrap_many(
    metrics: Sequence[str | Callable[[np.ndarray, np.ndarray], float]],
    y: np.ndarray,
    p: np.ndarray,
    n_boot: int,
    seed: int,
    alpha: float,
    n_bins: int = 10,
    points: Sequence[float] | None = None,
) -> list[tuple[float, float, float]]:
    """Point estimates and percentile CIs of several metrics on the *same* resamples.

    Parameters
    ----------
    metrics : sequence of str or callable
        Built-in metric names (vectorised) or ``metric(y (n,), p (n, K)) -> float``.
    y : numpy.ndarray of int64, shape (N,)
        True class indices.
    p : numpy.ndarray of float64, shape (N, K)
        Class probabilities.
    n_boot, seed, alpha : int, int, float
        As in :func:`bootstrap_ci`.
    n_bins : int
        Bins of the ECE.
    points : sequence of float, optional
        Point estimates already computed (one per metric, NaN if undefined);
        computed here when omitted.

    Returns
    -------
    list of (point, lo, hi)
        One tuple of floats per metric; NaN bounds when no resample defines it.
    """
    builtin = [m for m in metrics if isinstance(m, str)]
    if points is None:
        points = [_point_value(m, y, p, n_bins) if isinstance(m, str) else float(m(y, p)) for m in metrics]
    draws: list[list[np.ndarray]] = [[] for _ in metrics]
    for idx in _resample_chunks(len(y), n_boot, seed):
        values = _boot_chunk(builtin, y, p, idx, n_bins) if builtin else {}
        for j, m in enumerate(metrics):
            if isinstance(m, str):
                draws[j].append(values[m])
            else:
                draws[j].append(np.array([float(m(y[row], p[row])) for row in idx]))
    results = []
    for j in range(len(metrics)):
        dist = np.concatenate(draws[j]) if draws[j] else np.empty(0)
        dist = dist[np.isfinite(dist)]
        if dist.size:
            lo, hi = np.percentile(dist, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
            results.append((points[j], float(lo), float(hi)))
        else:
            results.append((points[j], math.nan, math.nan))
    return results


def bootstrap_ci(
    y_true: Any,
    proba: Any,
    metric: str | Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of a metric, resampling galaxies.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        True class indices.
    proba : array-like of float, shape (N, K)
        Class probabilities.
    metric : str or callable
        One of :data:`HEADLINE_METRICS` (``"accuracy"``, ``"balanced_accuracy"``,
        ``"macro_f1"``, ``"macro_auc"``, ``"ece"`` with 10 bins), computed
        vectorised over all resamples from bincounts; or a callable
        ``metric(y_true (n,), proba (n, K)) -> float`` called once per resample.
    n_boot : int
        Number of resamples (rows drawn with replacement, ``N`` each); 0 gives
        a NaN interval.
    seed : int
        Seed of the :func:`numpy.random.default_rng` that draws the resamples;
        equal inputs and seed give identical results.
    alpha : float
        The interval covers ``1 - alpha`` (percentiles ``100*alpha/2`` and
        ``100*(1 - alpha/2)`` of the resampled values).

    Returns
    -------
    (point, lo, hi) : tuple of float
        ``point`` is the metric on the full sample.  Resamples on which the
        metric is undefined (e.g. macro AUC when every drawn galaxy has the
        same class) are left out of the percentiles; NaN when it is undefined
        everywhere.

    Raises
    ------
    DataError
        Bad inputs, unknown metric name or bad ``n_boot``/``seed``/``alpha``.
    """
    y, p, _ = _check_inputs(y_true, proba)
    n_boot, seed, alpha = _check_boot_args(n_boot, seed, alpha)
    if isinstance(metric, str):
        if metric not in HEADLINE_METRICS:
            raise DataError(
                f"metric: unknown metric {metric!r}; expected one of {list(HEADLINE_METRICS)} "
                "or a callable"
            )
    elif not callable(metric):
        raise DataError(f"metric: expected a metric name or a callable, got {metric!r}")
    return _bootstrap_many([metric], y, p, n_boot, seed, alpha)[0]


def evaluate_predictions(
    y_true: Any,
    proba: Any,
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Every evaluation quantity of one set of predictions, JSON-serialisable.

    Parameters
    ----------
    y_true : array-like of int, shape (N,)
        True class indices in ``0..K-1``.
    proba : array-like of float, shape (N, K)
        Class probabilities.
    classes : sequence of str, length K
        Class names.
    n_boot, seed, alpha : int, int, float
        Bootstrap settings (see :func:`bootstrap_ci`); all headline metrics are
        computed on the same resamples.  ``n_boot = 0`` gives ``None`` bounds.
    n_bins : int
        Bins of the reliability diagram and of the ECE.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``macro_auc``,
        ``ece``: each ``{"value", "ci_low", "ci_high"}`` (``None`` where
        undefined); ``per_class``, ``confusion_matrix`` (as in
        :func:`classification_metrics`); ``roc`` (:func:`roc_curves`);
        ``reliability`` (:func:`reliability`); ``n``, ``classes`` and
        ``bootstrap`` = ``{"n_boot", "seed", "alpha"}``.
    """
    y, p, names = _check_inputs(y_true, proba, classes)
    assert names is not None
    n_boot, seed, alpha = _check_boot_args(n_boot, seed, alpha)
    nb = _check_n_bins(n_bins)
    cls = classification_metrics(y, p.argmax(axis=1), names)
    roc = _roc_all(y, p, names, drop_intermediate=True)
    rel = reliability(y, p, nb)
    # the point estimates are those of the scikit-learn based functions above
    found = {**cls, "macro_auc": roc["macro_auc"], "ece": rel["ece"]}
    points = [math.nan if found[m] is None else float(found[m]) for m in HEADLINE_METRICS]
    cis = _bootstrap_many(list(HEADLINE_METRICS), y, p, n_boot, seed, alpha, nb, points)
    out: dict[str, Any] = {}
    for name, (point, lo, hi) in zip(HEADLINE_METRICS, cis, strict=True):
        out[name] = {
            "value": _float_or_none(point),
            "ci_low": _float_or_none(lo),
            "ci_high": _float_or_none(hi),
        }
    out.update(
        {
            "per_class": cls["per_class"],
            "confusion_matrix": cls["confusion_matrix"],
            "roc": roc,
            "reliability": rel,
            "n": len(y),
            "classes": names,
            "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha},
        }
    )
    return out


def headline_row(evaluation: dict[str, Any]) -> dict[str, float | None]:
    """Flatten the headline metrics of :func:`evaluate_predictions` into one table row.

    Returns
    -------
    dict
        ``{<metric>: value, <metric>_ci_low: ..., <metric>_ci_high: ...}`` for
        every metric in :data:`HEADLINE_METRICS` (the leaderboard columns used
        by :func:`galpipe.plots.plot_comparison`).

    Raises
    ------
    DataError
        If a headline metric is missing from ``evaluation``.
    """
    row: dict[str, float | None] = {}
    for name in HEADLINE_METRICS:
        entry = evaluation.get(name)
        if not isinstance(entry, dict) or "value" not in entry:
            raise DataError(f"evaluation: key {name!r} missing or not a {{value, ci_low, ci_high}}")
        row[name] = entry["value"]
        row[f"{name}_ci_low"] = entry.get("ci_low")
        row[f"{name}_ci_high"] = entry.get("ci_high")
    return row
