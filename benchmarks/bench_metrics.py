"""Speed of galpipe.metrics: the vectorised bootstrap against scikit-learn called per resample.

Measured on a synthetic 3-class problem (default 10,000 galaxies, 1000 resamples),
each the median of ``--reps`` repetitions after a warm-up:

* ``bootstrap_ci`` of every headline metric (accuracy, balanced accuracy, macro F1,
  macro AUC, ECE), seconds per metric, against the budget of 1.5 s per metric that
  ``tests/test_metrics.py`` used to assert (about 0.1 s measured on 2 cores for the
  three label metrics);
* the whole ``evaluate_predictions`` (point metrics from scikit-learn, curves, all
  five intervals on shared resamples);
* the same intervals computed the slow way, calling ``sklearn.metrics`` once per
  resample (``balanced_accuracy_score`` and, per class, ``roc_auc_score``) on
  ``--sk-resamples`` resamples and scaled to the full count: the ratio is why
  ``galpipe.metrics`` keeps its hand-written bincount statistics inside the bootstrap.

``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` (set by some environments, they slow
OpenBLAS down) are removed before NumPy is imported: the script re-executes itself
without them and says so, as ``benchmarks/bench_nn.py`` does.

Usage: ``python benchmarks/bench_metrics.py [--n 10000] [--boot 1000] [--reps 3]
[--sk-resamples 50]``.  Exit status 1 if a metric is over its budget.
"""

from __future__ import annotations

import os
import sys

from _benchenv import environment_note, reexec_without_openblas_overrides

reexec_without_openblas_overrides()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from galpipe.metrics import HEADLINE_METRICS, bootstrap_ci, evaluate_predictions  # noqa: E402

#: Seconds per metric that tests/test_metrics.py asserted for 10,000 galaxies and 1000 resamples.
BUDGET_PER_METRIC_S = 1.5


def problem(n: int, k: int = 3, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` and softmax probabilities ``(n, k)`` with some signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median wall-clock seconds of ``reps`` calls of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sklearn_per_resample(y: np.ndarray, p: np.ndarray, n_resamples: int) -> dict[str, float]:
    """Seconds per resample of balanced accuracy and macro AUC computed with sklearn.metrics."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(y), size=(n_resamples, len(y)))
    pred = p.argmax(axis=1)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        for row in idx:
            skm.balanced_accuracy_score(y[row], pred[row])
        out["balanced_accuracy"] = (time.perf_counter() - t0) / n_resamples
        t0 = time.perf_counter()
        for row in idx:
            np.mean([skm.roc_auc_score(y[row] == c, p[row, c]) for c in range(p.shape[1])])
        out["macro_auc"] = (time.perf_counter() - t0) / n_resamples
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="galaxies")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    parser.add_argument("--sk-resamples", type=int, default=50, help="resamples timed with sklearn")
    args = parser.parse_args(argv)

    if environment_note():
        print(environment_note())
    else:
        print("environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE were not set")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    y, p = problem(args.n)
    print(f"problem: {args.n} galaxies, 3 classes, {args.boot} resamples, median of {args.reps}")

    failed = False
    per_metric = {}
    for metric in HEADLINE_METRICS:
        per_metric[metric] = median_time(lambda m=metric: bootstrap_ci(y, p, m, n_boot=args.boot, seed=0), args.reps)
        ok = per_metric[metric] < BUDGET_PER_METRIC_S
        failed |= not ok
        print(f"bootstrap_ci {metric:<18} {per_metric[metric]:7.3f} s  "
              f"(budget {BUDGET_PER_METRIC_S} s: {'PASS' if ok else 'FAIL'})")
    t_eval = median_time(
        lambda: evaluate_predictions(y, p, ["a", "b", "c"], n_boot=args.boot, seed=0), args.reps
    )
    print(f"evaluate_predictions (all five intervals, shared resamples) {t_eval:7.3f} s")

    sk = sklearn_per_resample(y, p, args.sk_resamples)
    for metric, per in sk.items():
        total = per * args.boot
        print(f"sklearn per resample {metric:<18} {total:7.3f} s for {args.boot} resamples "
              f"(timed on {args.sk_resamples}); vectorised is {total / per_metric[metric]:.0f}x faster")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
