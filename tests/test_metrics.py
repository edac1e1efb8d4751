"""Tests of galpipe.metrics: hand-computed values, scikit-learn cross-checks, bootstrap.

The point metrics are scikit-learn's; the tests here check the conventions around
them (label sets, 0/0, absent classes, JSON output), the hand-written vectorised
bootstrap statistics against scikit-learn resample by resample, and a fixed
problem against values recorded before the move to scikit-learn.  Speed is
measured by ``benchmarks/bench_metrics.py``, not asserted here.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from galpipe.errors import DataError
from galpipe.metrics import (
    HEADLINE_METRICS,
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    evaluate_predictions,
    headline_row,
    reliability,
    roc_curves,
)

CLASSES3 = ["elliptical", "spiral", "edge_on"]


def _random_problem(
    rng: np.random.Generator, n: int, k: int, *, ties: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities with some signal (and many ties if asked)."""
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    if ties:
        logits = np.round(logits)  # few distinct values -> many tied scores
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _assert_json_clean(obj: object) -> None:
    """Serialisable with strict JSON (no NaN/inf) and no numpy scalars anywhere."""
    json.dumps(obj, allow_nan=False)

    def walk(o: object) -> None:
        assert not isinstance(o, np.generic | np.ndarray), f"numpy object {o!r} in result"
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v)

    walk(obj)


# --------------------------------------------------------------------------- hand-computed
def test_confusion_matrix_hand_computed() -> None:
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 2]
    cm = confusion_matrix(y_true, y_pred, 3)
    # rows = true: class 0 -> (0, 1) once each; class 1 -> 1 twice; class 2 -> 0 and 2
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert cm.dtype == np.int64
    # no galaxies: all zeros (scikit-learn itself refuses empty input)
    np.testing.assert_array_equal(confusion_matrix([], [], 2), np.zeros((2, 2), dtype=np.int64))


def test_imbalanced_accuracy_differs_from_balanced_accuracy() -> None:
    # 8 of class 0, 2 of class 1; the classifier says 0 for everything but one of class 1.
    y_true = [0] * 8 + [1] * 2
    y_pred = [0] * 8 + [1, 0]
    r = classification_metrics(y_true, y_pred, ["common", "rare"])
    # accuracy = 9 correct / 10 = 0.9
    assert r["accuracy"] == pytest.approx(0.9)
    # recall(common) = 8/8 = 1, recall(rare) = 1/2 -> balanced = (1 + 0.5) / 2 = 0.75
    assert r["balanced_accuracy"] == pytest.approx(0.75)
    # precision(common) = 8/9, recall 1 -> F1 = 2*(8/9)*1/(8/9+1) = 16/17
    # precision(rare) = 1/1, recall 1/2 -> F1 = 2*1*0.5/1.5 = 2/3
    pc = r["per_class"]
    assert pc["common"]["precision"] == pytest.approx(8 / 9)
    assert pc["common"]["f1"] == pytest.approx(16 / 17)
    assert pc["rare"]["precision"] == pytest.approx(1.0)
    assert pc["rare"]["recall"] == pytest.approx(0.5)
    assert pc["rare"]["f1"] == pytest.approx(2 / 3)
    assert pc["common"]["support"] == 8 and pc["rare"]["support"] == 2
    # macro F1 = (16/17 + 2/3) / 2
    assert r["macro_f1"] == pytest.approx((16 / 17 + 2 / 3) / 2)
    assert r["confusion_matrix"] == [[8, 0], [1, 1]]
    assert r["n"] == 10
    _assert_json_clean(r)


def test_zero_division_is_zero_and_absent_classes_are_skipped() -> None:
    # class 2 never occurs and is never predicted; class 1 is never predicted.
    y_true = [0, 0, 1]
    y_pred = [0, 0, 0]
    r = classification_metrics(y_true, y_pred, CLASSES3)
    pc = r["per_class"]
    # class 1: precision 0/0 -> 0, recall 0/1 = 0, F1 0
    assert pc["spiral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert pc["edge_on"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # balanced accuracy over classes present in y_true (0, 1): (1 + 0) / 2
    assert r["balanced_accuracy"] == pytest.approx(0.5)
    # macro F1 over classes in y_true or y_pred (0, 1): F1(0) = 2*(2/3)*1/(2/3+1) = 0.8
    assert r["macro_f1"] == pytest.approx(0.8 / 2)


def test_roc_auc_hand_computed_with_ties() -> None:
    # binary problem in a 2-class layout: positives (class 1) have scores 0.9, 0.5;
    # negatives 0.5, 0.1.  Pairs (pos, neg): (0.9,0.5) win, (0.9,0.1) win,
    # (0.5,0.5) tie = 1/2, (0.5,0.1) win -> AUC = 3.5 / 4 = 0.875
    y = [1, 1, 0, 0]
    s = np.array([0.9, 0.5, 0.5, 0.1])
    proba = np.stack([1 - s, s], axis=1)
    r = roc_curves(y, proba, ["neg", "pos"])
    pos = r["per_class"]["pos"]
    assert pos["auc"] == pytest.approx(0.875)
    # step curve: (0,0) -> thr 0.9 (0, 1/2) -> thr 0.5 (1/2, 1) -> thr 0.1 (1, 1)
    np.testing.assert_allclose(pos["fpr"], [0, 0, 0.5, 1])
    np.testing.assert_allclose(pos["tpr"], [0, 0.5, 1, 1])
    np.testing.assert_allclose(pos["thresholds"][1:], [0.9, 0.5, 0.1])
    assert pos["thresholds"][0] > 0.9  # stands in for +inf (JSON has no infinity)
    # "neg" is the mirror problem with the same AUC
    assert r["per_class"]["neg"]["auc"] == pytest.approx(0.875)
    assert r["macro_auc"] == pytest.approx(0.875)
    assert pos["n_pos"] == 2 and pos["n_neg"] == 2
    _assert_json_clean(r)


def test_roc_absent_class_has_none_auc() -> None:
    y = [0, 1, 0, 1]
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.4, 0.5, 0.1]])
    r = roc_curves(y, proba, CLASSES3)
    assert r["per_class"]["edge_on"]["auc"] is None
    assert r["per_class"]["edge_on"]["fpr"] == []
    # both present classes separate perfectly: AUC 1 each; macro over those two
    assert r["per_class"]["elliptical"]["auc"] == pytest.approx(1.0)
    assert r["per_class"]["spiral"]["auc"] == pytest.approx(1.0)
    assert r["macro_auc"] == pytest.approx(1.0)
    _assert_json_clean(r)


def test_reliability_and_ece_hand_computed() -> None:
    # confidences 0.95, 0.85, 0.85, 0.55 with 5 bins of width 0.2
    proba = np.array([[0.95, 0.05], [0.85, 0.15], [0.15, 0.85], [0.55, 0.45]])
    y = [0, 1, 1, 0]  # correct, wrong, correct, correct
    r = reliability(y, proba, n_bins=5)
    bins = r["bins"]
    assert [b["count"] for b in bins] == [0, 0, 1, 0, 3]
    # bin [0.4, 0.6): one galaxy, conf 0.55, accuracy 1 -> gap 0.45
    assert bins[2]["mean_confidence"] == pytest.approx(0.55)
    assert bins[2]["accuracy"] == pytest.approx(1.0)
    # bin [0.8, 1.0]: conf mean (0.95+0.85+0.85)/3 = 0.88333, accuracy 2/3 -> gap 0.21667
    assert bins[4]["mean_confidence"] == pytest.approx(2.65 / 3)
    assert bins[4]["accuracy"] == pytest.approx(2 / 3)
    assert bins[0]["mean_confidence"] is None and bins[0]["accuracy"] is None
    assert bins[4]["lower"] == pytest.approx(0.8) and bins[4]["upper"] == pytest.approx(1.0)
    # ECE = 1/4 * 0.45 + 3/4 * (2.65/3 - 2/3) = 0.1125 + 0.1625 = 0.275
    assert r["ece"] == pytest.approx(0.275)
    # MCE = max(0.45, 0.21667) = 0.45
    assert r["mce"] == pytest.approx(0.45)
    assert r["n"] == 4 and r["n_bins"] == 5
    _assert_json_clean(r)


def test_reliability_confidence_one_goes_to_last_bin() -> None:
    proba = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = reliability([0, 0], proba, n_bins=10)
    assert r["bins"][-1]["count"] == 2
    # accuracy 1/2, confidence 1 -> ECE 0.5
    assert r["ece"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- scikit-learn
@pytest.mark.parametrize("seed", range(6))
def test_classification_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    y, p = _random_problem(rng, int(rng.integers(20, 400)), k)
    pred = p.argmax(axis=1)
    if seed == 0:  # make one class absent from y_true but present in y_pred
        y = np.where(y == k - 1, 0, y)
    names = [f"c{i}" for i in range(k)]
    r = classification_metrics(y, pred, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the absent class
        assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert r["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
        prec, rec, f1, sup = skm.precision_recall_fscore_support(
            y, pred, labels=list(range(k)), zero_division=0.0
        )
    for i, name in enumerate(names):
        assert r["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert r["per_class"][name]["recall"] == pytest.approx(rec[i])
        assert r["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert r["per_class"][name]["support"] == sup[i]
    np.testing.assert_array_equal(
        r["confusion_matrix"], skm.confusion_matrix(y, pred, labels=list(range(k)))
    )


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_roc_matches_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 5))
    y, p = _random_problem(rng, int(rng.integers(30, 300)), k, ties=ties)
    names = [f"c{i}" for i in range(k)]
    r = roc_curves(y, p, names)
    aucs = []
    for c, name in enumerate(names):
        expected = skm.roc_auc_score(y == c, p[:, c])
        aucs.append(expected)
        assert r["per_class"][name]["auc"] == pytest.approx(expected, abs=1e-12)
        fpr, tpr, thr = skm.roc_curve(y == c, p[:, c])  # drop_intermediate=True as ours
        np.testing.assert_allclose(r["per_class"][name]["fpr"], fpr)
        np.testing.assert_allclose(r["per_class"][name]["tpr"], tpr)
        np.testing.assert_allclose(r["per_class"][name]["thresholds"][1:], thr[1:])
    assert r["macro_auc"] == pytest.approx(np.mean(aucs))


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_contains_point_and_is_deterministic() -> None:
    rng = np.random.default_rng(7)
    y, p = _random_problem(rng, 500, 3)
    for metric in HEADLINE_METRICS:
        point, lo, hi = bootstrap_ci(y, p, metric, n_boot=300, seed=3)
        assert lo <= point <= hi, metric
        assert lo < hi, metric
        assert bootstrap_ci(y, p, metric, n_boot=300, seed=3) == (point, lo, hi)
        assert bootstrap_ci(y, p, metric, n_boot=300, seed=4) != (point, lo, hi)
        assert all(isinstance(v, float) for v in (point, lo, hi))


def test_bootstrap_points_match_point_metrics() -> None:
    rng = np.random.default_rng(8)
    y, p = _random_problem(rng, 300, 4, ties=True)
    names = [f"c{i}" for i in range(4)]
    cls = classification_metrics(y, p.argmax(axis=1), names)
    assert bootstrap_ci(y, p, "accuracy", n_boot=0)[0] == pytest.approx(cls["accuracy"])
    assert bootstrap_ci(y, p, "balanced_accuracy", n_boot=0)[0] == pytest.approx(
        cls["balanced_accuracy"]
    )
    assert bootstrap_ci(y, p, "macro_f1", n_boot=0)[0] == pytest.approx(cls["macro_f1"])
    assert bootstrap_ci(y, p, "macro_auc", n_boot=0)[0] == pytest.approx(
        roc_curves(y, p, names)["macro_auc"]
    )
    assert bootstrap_ci(y, p, "ece", n_boot=0)[0] == pytest.approx(reliability(y, p)["ece"])
    _, lo, hi = bootstrap_ci(y, p, "accuracy", n_boot=0)
    assert np.isnan(lo) and np.isnan(hi)


def test_vectorised_bootstrap_equals_loop_over_resamples() -> None:
    """The bincount-based resampled metrics equal the metric recomputed per resample."""
    rng = np.random.default_rng(9)
    y, p = _random_problem(rng, 120, 3, ties=True)
    names = [f"c{i}" for i in range(3)]

    def sk_auc(yy: np.ndarray, pp: np.ndarray) -> float:
        present = [c for c in range(3) if 0 < (yy == c).sum() < len(yy)]
        return float(np.mean([skm.roc_auc_score(yy == c, pp[:, c]) for c in present]))

    callables = {
        "accuracy": lambda yy, pp: skm.accuracy_score(yy, pp.argmax(axis=1)),
        "balanced_accuracy": lambda yy, pp: classification_metrics(yy, pp.argmax(1), names)[
            "balanced_accuracy"
        ],
        "macro_f1": lambda yy, pp: skm.f1_score(yy, pp.argmax(axis=1), average="macro"),
        "macro_auc": sk_auc,
        "ece": lambda yy, pp: reliability(yy, pp)["ece"],
    }
    for name, fn in callables.items():
        fast = bootstrap_ci(y, p, name, n_boot=60, seed=5, alpha=0.2)
        slow = bootstrap_ci(y, p, fn, n_boot=60, seed=5, alpha=0.2)
        np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12, err_msg=name)


def test_bootstrap_interval_shrinks_with_n() -> None:
    rng = np.random.default_rng(10)
    widths = []
    for n in (100, 1600):
        y, p = _random_problem(rng, n, 3)
        _, lo, hi = bootstrap_ci(y, p, "balanced_accuracy", n_boot=400, seed=0)
        widths.append(hi - lo)
    # standard error ~ 1/sqrt(n): 16x the data -> about 4x narrower
    assert widths[1] < widths[0] / 2.5


#: ``evaluate_predictions(y, p, ["a", "b", "c"], n_boot=200, seed=1)`` on :func:`_golden_problem`,
#: recorded with the NumPy-only implementation that preceded scikit-learn: (value, ci_low, ci_high).
GOLDEN_HEADLINE = {
    "accuracy": (0.748, 0.696, 0.796),
    "balanced_accuracy": (0.7302170642596174, 0.6778048385364278, 0.7811572051944358),
    "macro_f1": (0.7347323017611161, 0.6788284488758987, 0.7856396765301134),
    "macro_auc": (0.9086456590292737, 0.8799320253609657, 0.9360738533763542),
    "ece": (0.07363431386358167, 0.054026422218087525, 0.13331580121513706),
}


def _golden_problem() -> tuple[np.ndarray, np.ndarray]:
    """250 galaxies, 3 classes, rounded logits (many tied scores)."""
    return _random_problem(np.random.default_rng(2024), 250, 3, ties=True)


def test_evaluation_matches_values_recorded_before_scikit_learn() -> None:
    y, p = _golden_problem()
    e = evaluate_predictions(y, p, ["a", "b", "c"], n_boot=200, seed=1)
    for name, expected in GOLDEN_HEADLINE.items():
        got = (e[name]["value"], e[name]["ci_low"], e[name]["ci_high"])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0, err_msg=name)
    assert e["confusion_matrix"] == [[86, 3, 5], [20, 63, 7], [19, 9, 38]]
    aucs = [e["roc"]["per_class"][c]["auc"] for c in "abc"]
    np.testing.assert_allclose(aucs, [0.9255660120021822, 0.9059375, 0.894433465085639], rtol=1e-12)
    assert e["reliability"]["mce"] == pytest.approx(0.22388311523417082, rel=1e-12)
    pc = e["per_class"]
    np.testing.assert_allclose(
        [pc[c][q] for c in "abc" for q in ("precision", "recall", "f1")],
        [0.688, 86 / 94, 0.7853881278538812, 0.84, 0.7, 0.7636363636363637, 0.76, 38 / 66, 0.6551724137931034],
        rtol=1e-12,
    )


# --------------------------------------------------------------------------- evaluate
def test_evaluate_predictions_structure_and_json() -> None:
    rng = np.random.default_rng(12)
    y, p = _random_problem(rng, 400, 3)
    e = evaluate_predictions(y, p, CLASSES3, n_boot=200, seed=1)
    _assert_json_clean(e)
    for name in HEADLINE_METRICS:
        entry = e[name]
        assert set(entry) == {"value", "ci_low", "ci_high"}
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    cls = classification_metrics(y, p.argmax(axis=1), CLASSES3)
    assert e["accuracy"]["value"] == pytest.approx(cls["accuracy"])
    assert e["per_class"] == cls["per_class"]
    assert e["confusion_matrix"] == cls["confusion_matrix"]
    # one source of truth: the headline values are those of roc_curves / reliability
    assert e["roc"]["macro_auc"] == e["macro_auc"]["value"]
    assert e["reliability"]["ece"] == e["ece"]["value"]
    assert e["n"] == 400 and e["classes"] == CLASSES3
    assert e["bootstrap"] == {"n_boot": 200, "seed": 1, "alpha": 0.05}
    # identical inputs + seed -> identical JSON
    again = evaluate_predictions(y, p, CLASSES3, n_boot=200, seed=1)
    assert json.dumps(again, sort_keys=True) == json.dumps(e, sort_keys=True)
    row = headline_row(e)
    assert row["balanced_accuracy"] == e["balanced_accuracy"]["value"]
    assert row["ece_ci_high"] == e["ece"]["ci_high"]


def test_evaluate_without_bootstrap_and_single_class_present() -> None:
    y = np.zeros(5, dtype=int)
    p = np.tile([0.8, 0.1, 0.1], (5, 1))
    e = evaluate_predictions(y, p, CLASSES3, n_boot=0)
    _assert_json_clean(e)
    assert e["accuracy"] == {"value": 1.0, "ci_low": None, "ci_high": None}
    # no class has both positives and negatives -> AUC undefined everywhere
    assert e["macro_auc"]["value"] is None
    assert e["roc"]["macro_auc"] is None


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_data_error_naming_the_argument() -> None:
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    with pytest.raises(DataError, match="y_pred"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(DataError, match=r"y_true.*row 1.*label 2"):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(DataError, match=r"y_pred.*label -1"):
        classification_metrics([0, 1], [0, -1], ["a", "b"])
    with pytest.raises(DataError, match=r"y_true.*integer"):
        classification_metrics([0.5, 1], [0, 1], ["a", "b"])
    with pytest.raises(DataError, match=r"proba.*rows"):
        roc_curves([0, 1, 1], p, ["a", "b"])
    with pytest.raises(DataError, match=r"proba.*\(N, K\)"):
        reliability([0, 1], np.array([0.5, 0.5]))
    with pytest.raises(DataError, match=r"proba.*3 columns"):
        roc_curves([0, 1], np.full((2, 3), 1 / 3), ["a", "b"])
    with pytest.raises(DataError, match=r"proba.*row 1.*nan"):
        reliability([0, 1], np.array([[0.5, 0.5], [np.nan, 0.5]]))
    with pytest.raises(DataError, match=r"proba.*sums to"):
        bootstrap_ci([0, 1], np.array([[0.5, 0.6], [0.5, 0.5]]), "accuracy")
    with pytest.raises(DataError, match=r"proba.*probability"):
        bootstrap_ci([0, 1], np.array([[2.0, -1.0], [0.5, 0.5]]), "accuracy")
    with pytest.raises(DataError, match=r"y_true.*label 2"):
        evaluate_predictions([0, 2], p, ["a", "b"])
    with pytest.raises(DataError, match="metric"):
        bootstrap_ci([0, 1], p, "f2")
    with pytest.raises(DataError, match="n_boot"):
        bootstrap_ci([0, 1], p, "accuracy", n_boot=-1)
    with pytest.raises(DataError, match="alpha"):
        bootstrap_ci([0, 1], p, "accuracy", alpha=1.5)
    with pytest.raises(DataError, match="n_bins"):
        reliability([0, 1], p, n_bins=0)
    with pytest.raises(DataError, match="classes"):
        classification_metrics([0, 1], [0, 1], ["a", "a"])
    with pytest.raises(DataError, match="empty"):
        evaluate_predictions(np.zeros(0, int), np.zeros((0, 2)), ["a", "b"])
    # DataError is also a ValueError, for callers that only know the builtin
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0, 1, 1], 2)
