"""End-to-end check of the NumPy CNN on a real image task: scikit-learn's 8x8 digits.

1797 grayscale images, scaled to ``0..1`` as ``(N, 8, 8, 1)``; a stratified 25%
is held out for testing (never seen during training or model selection).  No
augmentation: digits have an orientation (a rotated 6 is a 9).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from galpipe.nn.data import ArrayDataset
from galpipe.nn.inference import predict_proba
from galpipe.nn.model import build_model
from galpipe.nn.training import TrainConfig, fit

ARCH = """
- {type: conv2d, filters: 16, kernel_size: 3, padding: same}
- relu
- {type: conv2d, filters: 32, kernel_size: 3, padding: same}
- relu
- maxpool2d
- flatten
- {type: dense, units: 64}
- relu
- {type: dropout, rate: 0.25}
- {type: dense, units: 10}
"""

TRAIN = """
epochs: 12
batch_size: 32
optimizer: adam
lr: 0.003
schedule: {type: cosine, warmup_epochs: 0}
early_stopping_patience: 4
augment: false          # digits are not rotation- or shift-invariant
weight_decay: 0.0
grad_clip: null
class_weighting: none
seed: 0
"""


@pytest.mark.slow
def test_digits_cnn_reaches_97_percent():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_tr, y_tr, test_size=0.1, stratify=y_tr, random_state=0
    )
    model = build_model(yaml.safe_load(ARCH), (8, 8, 1), seed=0)
    cfg = TrainConfig.from_dict(yaml.safe_load(TRAIN))
    hist = fit(model, ArrayDataset(x_fit, y_fit), ArrayDataset(x_val, y_val), cfg,
               progress=False, log=print)
    res = predict_proba(model, x_te)
    acc = float(np.mean(res.pred == y_te))
    print(f"digits: test accuracy {acc:.4f} after {len(hist)} epochs (best {hist.best_epoch}) "
          f"with {model.n_params()} parameters")
    assert acc >= 0.97  # its training time is measured by benchmarks/bench_digits.py
    # confident on what it gets right, uncertain on what it gets wrong
    right = res.pred == y_te
    assert res.entropy[right].mean() < res.entropy[~right].mean()
