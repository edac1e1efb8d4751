"""Batch normalisation over the last (channel/feature) axis."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer, register


@register("batchnorm")
class BatchNorm(Layer):
    """Batch normalisation of the last axis, for ``(N, H, W, C)`` or ``(N, F)`` input.

    In training mode each channel is normalised with the batch mean and (biased)
    variance over all other axes, then scaled by ``gamma`` and shifted by
    ``beta``.  The running statistics in :attr:`state` are updated as
    ``running = momentum * running + (1 - momentum) * batch`` (the running
    variance uses the unbiased batch variance, as PyTorch does) and are used
    when ``training=False``.

    Parameters
    ----------
    momentum : float
        Weight of the old running statistics, in ``[0, 1)``.
    eps : float
        Added to the variance before the square root.
    """

    def __init__(self, momentum: float = 0.9, eps: float = 1e-5, name: str | None = None) -> None:
        super().__init__(name)
        for what, v, lo_ok in (("momentum", momentum, True), ("eps", eps, False)):
            if isinstance(v, bool) or not isinstance(v, int | float | np.number):
                raise ModelError(f"batchnorm: {what} must be a number, got {v!r}")
            fv = float(v)
            if not math.isfinite(fv) or fv < 0 or (fv == 0 and not lo_ok):
                raise ModelError(f"batchnorm: {what} out of range: {v!r}")
        if float(momentum) >= 1.0:
            raise ModelError(f"batchnorm: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self._cache: dict[str, Any] = {}

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        if len(input_shape) not in (1, 3):
            raise ModelError(
                f"batchnorm expects per-sample input (H, W, C) or (F,), got {input_shape}"
            )
        c = input_shape[-1]
        self.params = {
            "gamma": np.ones(c, dtype=self.dtype),
            "beta": np.zeros(c, dtype=self.dtype),
        }
        self.state = {
            "running_mean": np.zeros(c, dtype=self.dtype),
            "running_var": np.ones(c, dtype=self.dtype),
        }
        return input_shape

    def flops(self) -> int:
        return 4 * int(np.prod(self.input_shape)) if self.built else 0

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Normalise ``x`` (``(N, ..., C)``); returns the same shape."""
        self._ensure_built(x)
        if x.shape[1:] != self.input_shape:
            raise ModelError(
                f"batchnorm: expects input of per-sample shape {self.input_shape}, "
                f"got {x.shape[1:]}"
            )
        dt = x.dtype
        c = x.shape[-1]
        xf = x.reshape(-1, c)
        gamma = self.params["gamma"].astype(dt, copy=False)
        beta = self.params["beta"].astype(dt, copy=False)
        if training:
            m = xf.shape[0]
            mean = xf.mean(axis=0)
            centred = xf - mean
            var = np.mean(centred * centred, axis=0)
            inv = 1.0 / np.sqrt(var + dt.type(self.eps))
            xhat = centred * inv
            mom = self.momentum
            rm, rv = self.state["running_mean"], self.state["running_var"]
            rm *= mom
            rm += (1.0 - mom) * mean.astype(rm.dtype)
            unbiased = var * (m / max(m - 1, 1))
            rv *= mom
            rv += (1.0 - mom) * unbiased.astype(rv.dtype)
        else:
            rm = self.state["running_mean"].astype(dt, copy=False)
            rv = self.state["running_var"].astype(dt, copy=False)
            inv = 1.0 / np.sqrt(rv + dt.type(self.eps))
            xhat = (xf - rm) * inv
        out = xhat * gamma + beta
        self._cache = {"xhat": xhat, "inv": inv, "training": training, "shape": x.shape}
        return out.reshape(x.shape)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Fill ``grads["gamma"]``, ``grads["beta"]``; return ``dx`` (same shape as input)."""
        if not self._cache:
            raise ModelError("batchnorm: backward called before forward")
        xhat: np.ndarray = self._cache["xhat"]
        inv: np.ndarray = self._cache["inv"]
        c = xhat.shape[1]
        d = np.asarray(dout, dtype=xhat.dtype).reshape(-1, c)
        gamma = self.params["gamma"].astype(xhat.dtype, copy=False)
        dbeta = d.sum(axis=0)
        dgamma = (d * xhat).sum(axis=0)
        self.grads["beta"][...] = dbeta
        self.grads["gamma"][...] = dgamma
        if self._cache["training"]:
            m = d.shape[0]
            dx = (gamma * inv / m) * (m * d - dbeta - xhat * dgamma)
        else:
            dx = d * (gamma * inv)
        return dx.reshape(self._cache["shape"])
