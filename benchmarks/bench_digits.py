"""Training time of the NumPy CNN on scikit-learn's 8x8 digits (the network of tests/test_nn_digits.py).

Builds, trains (12 epochs at most, early stopping) and evaluates exactly the
network and training settings of ``tests/test_nn_digits.py`` (``ARCH`` and
``TRAIN`` are read from that file, so the two cannot drift apart) on the same
stratified splits, and prints the wall-clock seconds of build + fit + predict,
the epochs run, seconds per epoch and the test accuracy.  Budget: 120 s, the
bound the test used to assert; the test keeps the accuracy check.

``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` (set by some environments, they slow
OpenBLAS down) are removed before NumPy is imported: the script re-executes itself
without them and says so, as ``benchmarks/bench_nn.py`` does.

Usage: ``python benchmarks/bench_digits.py``.  Exit status 1 if over budget.
"""

from __future__ import annotations

import os
import sys

from _benchenv import environment_note, reexec_without_openblas_overrides

reexec_without_openblas_overrides()

import argparse  # noqa: E402
import ast  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from galpipe.nn.data import ArrayDataset  # noqa: E402
from galpipe.nn.inference import predict_proba  # noqa: E402
from galpipe.nn.model import build_model  # noqa: E402
from galpipe.nn.training import TrainConfig, fit  # noqa: E402

#: Seconds (build + fit + predict) that tests/test_nn_digits.py asserted.
BUDGET_S = 120.0
TEST_FILE = Path(__file__).resolve().parents[1] / "tests" / "test_nn_digits.py"


def digits_settings() -> tuple[str, str]:
    """``ARCH`` and ``TRAIN`` (YAML strings) of tests/test_nn_digits.py, read without importing it."""
    found: dict[str, str] = {}
    for node in ast.parse(TEST_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("ARCH", "TRAIN") and isinstance(node.value, ast.Constant):
                found[name] = str(node.value.value)
    return found["ARCH"], found["TRAIN"]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    if environment_note():
        print(environment_note())
    else:
        print("environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE were not set")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    arch, train = digits_settings()
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    x_fit, x_val, y_fit, y_val = train_test_split(x_tr, y_tr, test_size=0.1, stratify=y_tr, random_state=0)
    t0 = time.perf_counter()
    model = build_model(yaml.safe_load(arch), (8, 8, 1), seed=0)
    cfg = TrainConfig.from_dict(yaml.safe_load(train))
    hist = fit(model, ArrayDataset(x_fit, y_fit), ArrayDataset(x_val, y_val), cfg, progress=False, log=lambda _: None)
    res = predict_proba(model, x_te)
    elapsed = time.perf_counter() - t0
    acc = float(np.mean(res.pred == y_te))
    ok = elapsed < BUDGET_S
    print(f"digits CNN ({model.n_params()} parameters): {elapsed:.1f} s for {len(hist)} epochs "
          f"({elapsed / max(len(hist), 1):.2f} s/epoch), test accuracy {acc:.4f}; "
          f"budget {BUDGET_S:.0f} s: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
