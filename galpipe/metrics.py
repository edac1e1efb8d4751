"""Classification metrics with bootstrap confidence intervals (NumPy only).

Used by the evaluate stage, ``galpipe evaluate`` and the experiment report.
Every function returns plain Python objects (``float``, ``int``, ``list``,
``dict``, ``None``) so that results can be written with :func:`json.dumps`
directly; no NumPy scalars and no ``NaN``/``inf`` leak into the output (an
undefined value is ``None``).

Conventions
-----------
* ``y_true`` / ``y_pred`` are integer class indices in ``0..K-1``, shape ``(N,)``.
* ``proba`` is an ``(N, K)`` array of class probabilities (rows sum to one,
  values in ``[0, 1]``); the predicted class is ``argmax`` (ties go to the
  lowest class index) and the confidence is the row maximum.
* ``0/0`` is defined as ``0.0`` for precision, recall and F1 of a single class
  (a class never predicted has precision 0, a class with no true members has
  recall 0).  Averages skip classes for which the quantity is undefined:
  balanced accuracy averages recall over the classes *present in* ``y_true``;
  macro F1 averages F1 over the classes present in ``y_true`` or ``y_pred``
  (scikit-learn's default label set); macro AUC averages over the classes
  whose one-vs-rest AUC is defined (at least one positive and one negative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Confusion matrix of integer labels.

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
        (rows = true, columns = predicted).

    Raises
    ------
    DataError
        Mismatched lengths or labels outside ``0..K-1``.
    """
    k = _check_n_classes(n_classes)
    yt = _check_labels(y_true, "y_true", k)
    yp = _check_labels(y_pred, "y_pred", k)
    _check_same_length(yt, "y_true", yp, "y_pred")
    return np.bincount(yt * k + yp, minlength=k * k).reshape(k, k).astype(np.int64)


def _prf_from_cm(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 from a (..., K, K) confusion matrix; 0/0 -> 0."""
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

    ``cm`` has shape (..., K, K); every output has shape (...).  NaN where the
    quantity is undefined (empty matrix).
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


def classification_metrics(y_true: Any, y_pred: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class scores and confusion matrix.

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
    cm = confusion_matrix(y_true, y_pred, len(names))
    precision, recall, f1 = _prf_from_cm(cm)
    summary = _summary_from_cm(cm)
    support = cm.sum(axis=1)
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


def _binary_roc(
    positive: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of one binary problem, one point per distinct score.

    Returns ``(fps, tps, thresholds)`` as cumulative counts at each distinct
    threshold (descending), preceded by the ``(0, 0)`` point.  Tied scores
    form a single point, so the trapezoid under the curve counts a tied
    positive/negative pair as one half (the Mann-Whitney convention).
    """
    order = np.argsort(-score, kind="stable")
    s = score[order]
    pos = positive[order].astype(np.int64)
    # last index of each run of equal scores
    distinct = np.flatnonzero(np.diff(s)) if len(s) > 1 else np.empty(0, dtype=np.int64)
    ends = np.r_[distinct, len(s) - 1]
    tps = np.cumsum(pos)[ends]
    fps = (ends + 1) - tps
    thresholds = s[ends]
    top = thresholds[0] + 1.0 if len(thresholds) else 1.0
    return np.r_[0, fps], np.r_[0, tps], np.r_[top, thresholds]


def _drop_collinear(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """Mask keeping the corners of the curve through integer counts ``(fps, tps)``.

    The origin (index 0) and the first and last threshold points are always
    kept, as in scikit-learn's ``roc_curve(drop_intermediate=True)``.
    """
    f, t = fps[1:], tps[1:]
    if len(f) <= 2:
        return np.ones(len(fps), dtype=bool)
    corner = np.logical_or(np.diff(f, 2) != 0, np.diff(t, 2) != 0)
    return np.r_[True, True, corner, True]


def roc_curves(
    y_true: Any, proba: Any, classes: Sequence[str], *, drop_intermediate: bool = True
) -> dict[str, Any]:
    """One-vs-rest ROC curves and AUCs per class.

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
        "n_neg"}}, "macro_auc": float | None}``.  Points run from ``(0, 0)``
        (threshold ``max(score) + 1``, since JSON has no infinity) to
        ``(1, 1)``; a galaxy is called positive when its score is ``>=`` the
        threshold, and tied scores form one point, so the AUC (trapezoid on
        this step curve) equals scikit-learn's ``roc_auc_score``.  A class
        with no positives (absent from ``y_true``) or no negatives has
        ``auc = None`` and empty curve lists; ``macro_auc`` is the mean over
        the classes with a defined AUC (``None`` if there are none).

    Raises
    ------
    DataError
        Bad shapes, labels or probabilities.
    """
    y, p, names = _check_inputs(y_true, proba, classes)
    assert names is not None
    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    for k, name in enumerate(names):
        positive = y == k
        n_pos = int(positive.sum())
        n_neg = int(len(y) - n_pos)
        if n_pos == 0 or n_neg == 0:
            per_class[name] = {
                "fpr": [],
                "tpr": [],
                "thresholds": [],
                "auc": None,
                "n_pos": n_pos,
                "n_neg": n_neg,
            }
            continue
        fps, tps, thr = _binary_roc(positive, p[:, k])
        fpr = fps / n_neg
        tpr = tps / n_pos
        auc = float(np.trapezoid(tpr, fpr))
        if drop_intermediate:
            keep = _drop_collinear(fps, tps)
            fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
        aucs.append(auc)
        per_class[name] = {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            "thresholds": thr.tolist(),
            "auc": auc,
            "n_pos": n_pos,
            "n_neg": n_neg,
        }
    macro = float(np.mean(aucs)) if aucs else None
    return {"per_class": per_class, "macro_auc": macro}


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence: bin b covers [b/n, (b+1)/n), the last includes 1."""
    return np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise DataError(f"n_bins: expected a positive integer, got {n_bins!r}")
    return int(n_bins)


def reliability(y_true: Any, proba: Any, n_bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data and calibration errors of the top-class confidence.

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
        ``bins``: list of ``{lower, upper, count, mean_confidence, accuracy}``
        (the last two ``None`` for an empty bin); ``ece`` = sum over bins of
        ``count / N * |accuracy - mean_confidence|``; ``mce`` = the largest
        ``|accuracy - mean_confidence|`` over non-empty bins; ``n``;
        ``n_bins``.

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
def _auc_stack(y: np.ndarray, score: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of class ``k`` on each resample ``idx[b]``; NaN where undefined.

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
    """Vectorised built-in metrics on resamples ``idx`` of shape (B, N); NaN = undefined."""
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
    """Built-in metric on the full sample (NaN where undefined)."""
    full = _boot_chunk([name], y, p, np.arange(len(y))[None, :], n_bins)
    return float(full[name][0])


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
) -> list[tuple[float, float, float]]:
    """Point estimates and percentile CIs of several metrics on the *same* resamples."""
    builtin = [m for m in metrics if isinstance(m, str)]
    points = []
    for m in metrics:
        if isinstance(m, str):
            points.append(_point_value(m, y, p, n_bins))
        else:
            points.append(float(m(y, p)))
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
    roc = roc_curves(y, p, names)
    rel = reliability(y, p, nb)
    cis = _bootstrap_many(list(HEADLINE_METRICS), y, p, n_boot, seed, alpha, nb)
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
