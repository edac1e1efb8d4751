"""Softmax and the fused, numerically stable softmax cross-entropy loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from galpipe.errors import ModelError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable ``log(softmax(logits))`` along the last axis (log-sum-exp with max shift)."""
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Stable softmax along the last axis.

    Parameters
    ----------
    logits : numpy.ndarray
        Shape ``(..., K)``.

    Returns
    -------
    numpy.ndarray
        Probabilities of the same shape (rows sum to 1), same float dtype.
    """
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


class SoftmaxCrossEntropy:
    """Softmax + cross-entropy, fused (gradient ``p - q``), with class weights and smoothing.

    Parameters
    ----------
    class_weights : array-like of shape (K,), optional
        Weight of each *true* class; the loss is the weighted mean
        ``sum_i w[y_i] * l_i / sum_i w[y_i]`` (PyTorch's ``weight=`` convention for
        the un-smoothed loss).
    label_smoothing : float
        ``eps`` in ``[0, 1)``: targets are ``(1 - eps) * onehot + eps / K``.

    Notes
    -----
    ``l_i = -sum_k q_ik log softmax(z_i)_k`` computed with log-sum-exp, so
    arbitrarily large logits are fine.
    """

    def __init__(
        self, class_weights: Any = None, label_smoothing: float = 0.0
    ) -> None:
        if class_weights is not None:
            w = np.asarray(class_weights, dtype=np.float64)
            if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ModelError(
                    "SoftmaxCrossEntropy: class_weights must be a 1-D array of finite, "
                    f"non-negative numbers, got {class_weights!r}"
                )
            self.class_weights: np.ndarray | None = w
        else:
            self.class_weights = None
        if isinstance(label_smoothing, bool) or not isinstance(
            label_smoothing, int | float | np.number
        ) or not (math.isfinite(float(label_smoothing)) and 0.0 <= label_smoothing < 1.0):
            raise ModelError(
                f"SoftmaxCrossEntropy: label_smoothing must be in [0, 1), got {label_smoothing!r}"
            )
        self.label_smoothing = float(label_smoothing)
        self._cache: dict[str, Any] = {}

    def _check(self, logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(logits)
        if z.ndim != 2 or z.shape[0] == 0:
            raise ModelError(f"SoftmaxCrossEntropy: logits must have shape (N, K), got {z.shape}")
        if not np.issubdtype(z.dtype, np.floating):
            z = z.astype(np.float64)
        labels = np.asarray(y)
        if labels.shape != (z.shape[0],) or not (
            np.issubdtype(labels.dtype, np.integer) or labels.size == 0
        ):
            raise ModelError(
                f"SoftmaxCrossEntropy: labels must be integers of shape ({z.shape[0]},), "
                f"got {labels.dtype} {labels.shape}"
            )
        k = z.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ModelError(
                f"SoftmaxCrossEntropy: labels must be in [0, {k}), got range "
                f"[{labels.min()}, {labels.max()}]"
            )
        if self.class_weights is not None and self.class_weights.shape[0] != k:
            raise ModelError(
                f"SoftmaxCrossEntropy: {self.class_weights.shape[0]} class weights for "
                f"{k} classes"
            )
        return z, labels.astype(np.intp, copy=False)

    def forward(self, logits: np.ndarray, y: np.ndarray) -> float:
        """Weighted mean loss of logits ``(N, K)`` against integer labels ``(N,)``."""
        z, labels = self._check(logits, y)
        n, k = z.shape
        logp = log_softmax(z)
        eps = self.label_smoothing
        rows = np.arange(n)
        per = -(1.0 - eps) * logp[rows, labels]
        if eps:
            per = per - (eps / k) * logp.sum(axis=1)
        w = (
            self.class_weights[labels].astype(z.dtype)
            if self.class_weights is not None
            else np.ones(n, dtype=z.dtype)
        )
        total = float(w.sum(dtype=np.float64))
        if total <= 0:
            raise ModelError(
                "SoftmaxCrossEntropy: the class weights of this batch's labels sum to 0"
            )
        self._cache = {"logp": logp, "labels": labels, "w": w, "total": total}
        return float(np.dot(per.astype(np.float64), w.astype(np.float64)) / total)

    __call__ = forward

    def backward(self) -> np.ndarray:
        """Gradient of the last :meth:`forward` loss w.r.t. the logits, shape ``(N, K)``."""
        if not self._cache:
            raise ModelError("SoftmaxCrossEntropy: backward called before forward")
        logp: np.ndarray = self._cache["logp"]
        labels: np.ndarray = self._cache["labels"]
        n, k = logp.shape
        eps = self.label_smoothing
        grad = np.exp(logp)
        if eps:
            grad -= eps / k
        grad[np.arange(n), labels] -= 1.0 - eps
        grad *= (self._cache["w"] / self._cache["total"])[:, None]
        return grad
