"""Centred finite-difference gradient checks in float64.

The scalar loss for a layer is a fixed random projection of its output,
``L = sum(forward(x) * P)``, so ``dL/dout = P`` and the analytic gradients are
``backward(P)``.  Every element of the input and of every parameter is perturbed
by ``+-eps``; the reported error of an array is the norm-wise relative error
``max|analytic - numeric| / max(max|analytic|, max|numeric|)`` (0 when both are 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer
from galpipe.nn.losses import SoftmaxCrossEntropy


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """Norm-wise relative error ``max|a - n| / max(max|a|, max|n|)``."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(n), initial=0.0)))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(a - n)) / scale)


def numeric_gradient(f: Callable[[], float], arr: np.ndarray, eps: float) -> np.ndarray:
    """Centred differences of ``f()`` w.r.t. every element of ``arr`` (perturbed in place)."""
    grad = np.zeros(arr.shape, dtype=np.float64)
    if not arr.flags.c_contiguous:
        raise ModelError("numeric_gradient: array must be C-contiguous")
    flat = arr.reshape(-1)
    g = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        g[i] = (up - down) / (2.0 * eps)
    return grad


def check_layer_gradients(
    layer: Layer,
    x: np.ndarray,
    eps: float = 1e-6,
    seed: int = 0,
    training: bool = True,
) -> dict[str, float]:
    """Compare a layer's analytic gradients with centred finite differences.

    Parameters
    ----------
    layer : Layer
        Unbuilt (it is then built in float64 with a generator seeded by ``seed``)
        or already built with ``dtype=float64``.  Containers are fine.
    x : numpy.ndarray
        Input batch (converted to float64).
    eps : float
        Finite-difference step.
    seed : int
        Seeds the output projection and, before *every* forward pass, the
        layer's random streams (so dropout uses one fixed mask).
    training : bool
        Mode of the forward passes (BatchNorm batch statistics, dropout).

    Returns
    -------
    dict
        ``{"x": err, "<param name>": err, ...}`` relative errors.
    """
    x = np.array(x, dtype=np.float64)
    if not layer.built:
        layer.build(x.shape[1:], np.random.default_rng(seed), np.float64)
    if np.dtype(layer.dtype) != np.float64:
        raise ModelError("check_layer_gradients: build the layer with dtype=float64")
    layer.input_grad_needed = True

    def run() -> np.ndarray:
        layer.set_rng(np.random.default_rng(seed + 1))
        return layer.forward(x, training=training)

    out = run()
    proj = np.random.default_rng(seed).standard_normal(out.shape)

    def loss() -> float:
        return float(np.sum(run() * proj))

    loss()
    dx = layer.backward(proj.copy())
    analytic = {k: g.copy() for k, g in layer.grads.items()}
    if dx is None:
        raise ModelError("check_layer_gradients: the layer returned no input gradient")
    errors = {"x": relative_error(dx, numeric_gradient(loss, x, eps))}
    for name, p in layer.params.items():
        errors[name] = relative_error(analytic[name], numeric_gradient(loss, p, eps))
    return errors


def check_loss_gradients(
    loss_fn: SoftmaxCrossEntropy, logits: np.ndarray, y: np.ndarray, eps: float = 1e-6
) -> float:
    """Relative error of ``loss_fn.backward()`` against centred differences of ``forward``."""
    z = np.array(logits, dtype=np.float64)
    loss_fn.forward(z, y)
    analytic = loss_fn.backward()
    numeric = numeric_gradient(lambda: loss_fn.forward(z, y), z, eps)
    return relative_error(analytic, numeric)
