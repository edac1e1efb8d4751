"""Element-wise activation layers (any input shape ``(N, ...)``, same output shape).

Reference implementations; :class:`ReLU` has a threaded fast step
(:mod:`galpipe.nn.fast.elementwise`) and fuses into a preceding convolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer, Step, register


def _check_number(value: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ModelError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise ModelError(f"{what} must be a finite{' positive' if positive else ''} number, "
                         f"got {value!r}")
    return v


class _Activation(Layer):
    """Shared bookkeeping: shape-preserving, no parameters."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._cache: dict[str, np.ndarray] = {}

    def flops(self) -> int:
        return int(np.prod(self.input_shape)) if self.built else 0

    def _get(self, key: str) -> np.ndarray:
        if key not in self._cache:
            raise ModelError(f"{self.type_name}: backward called before forward")
        return self._cache[key]


@register("relu")
class ReLU(_Activation):
    """``max(x, 0)``; the gradient at 0 is taken as 0.

    Declares ``fusion_tag = "relu"`` (a preceding convolution may fuse it); its fast
    step is threaded, and fused with a following ``maxpool2d`` it runs after the pool.
    """

    @property
    def fusion_tag(self) -> str | None:
        return "relu"

    def fast_step(self, following: Sequence[Layer]) -> Step | None:
        """Threaded ReLU, or ``relu(maxpool(x))`` when a max-pool follows."""
        from galpipe.nn.fast.elementwise import ReLUStep
        from galpipe.nn.fast.pool import ReLUPoolStep

        if following and following[0].fusion_tag in ("maxpool", "maxpool2x2"):
            return ReLUPoolStep(self, following[0])  # type: ignore[arg-type]
        return ReLUStep(self)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        out = np.maximum(x, 0)
        self._cache = {"out": out}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        out = self._get("out")
        return dout * (out > 0)


@register("leaky_relu")
class LeakyReLU(_Activation):
    """``x`` for ``x > 0`` else ``alpha * x``."""

    def __init__(self, alpha: float = 0.01, name: str | None = None) -> None:
        super().__init__(name)
        self.alpha = _check_number(alpha, "leaky_relu: alpha")

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        self._cache = {"x": x}
        return np.where(x > 0, x, x * x.dtype.type(self.alpha))

    def backward(self, dout: np.ndarray) -> np.ndarray:
        x = self._get("x")
        return np.where(x > 0, dout, dout * x.dtype.type(self.alpha))


@register("elu")
class ELU(_Activation):
    """``x`` for ``x > 0`` else ``alpha * (exp(x) - 1)``."""

    def __init__(self, alpha: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        self.alpha = _check_number(alpha, "elu: alpha")

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        a = x.dtype.type(self.alpha)
        neg = a * np.expm1(np.minimum(x, 0))
        out = np.where(x > 0, x, neg)
        self._cache = {"x": x, "out": out}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        x, out = self._get("x"), self._cache["out"]
        a = x.dtype.type(self.alpha)
        return np.where(x > 0, dout, dout * (out + a))


@register("gelu")
class GELU(_Activation):
    """Gaussian error linear unit, **tanh approximation**.

    ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` (Hendrycks & Gimpel;
    PyTorch ``approximate="tanh"``).  The backward pass is the exact derivative of
    this approximation.
    """

    _C = math.sqrt(2.0 / math.pi)
    _A = 0.044715

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        c, a = x.dtype.type(self._C), x.dtype.type(self._A)
        t = np.tanh(c * (x + a * x * x * x))
        self._cache = {"x": x, "t": t}
        return 0.5 * x * (1 + t)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        x, t = self._get("x"), self._cache["t"]
        c, a = x.dtype.type(self._C), x.dtype.type(self._A)
        du = c * (1 + 3 * a * x * x)
        grad = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
        return dout * grad


@register("sigmoid")
class Sigmoid(_Activation):
    """Logistic function ``1 / (1 + exp(-x))`` (computed without overflow)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        # 0.5 * (1 + tanh(x / 2)) is the logistic function and never overflows.
        out = 0.5 * (1 + np.tanh(0.5 * x))
        self._cache = {"out": out}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        out = self._get("out")
        return dout * out * (1 - out)


@register("tanh")
class Tanh(_Activation):
    """Hyperbolic tangent."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        out = np.tanh(x)
        self._cache = {"out": out}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        out = self._get("out")
        return dout * (1 - out * out)
