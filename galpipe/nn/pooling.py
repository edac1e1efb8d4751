"""Pooling layers on channels-last batches ``(N, H, W, C)``.

Windows are ``valid`` (no padding); trailing rows/columns that do not fill a
window are dropped (floor mode, as in PyTorch).  All pooling is expressed as a
loop over the ``ph*pw`` kernel offsets with strided slices (for the common
``pool == stride`` case these are exactly the reshape views
``x.reshape(N, Ho, ph, Wo, pw, C)[:, :, i, :, j, :]``), so there is no per-window
Python loop and no ``np.add.at``.

Max pooling routes the gradient to the *first* maximum of each window in
row-major window order (ties: one winner, like PyTorch).  The fast step
(:mod:`galpipe.nn.fast.pool`) is separable and breaks ties column-wise first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer, Step, register
from galpipe.nn.conv import as_pair


def _pool_geometry(
    input_shape: tuple[int, ...], pool: tuple[int, int], stride: tuple[int, int], what: str
) -> tuple[int, int]:
    if len(input_shape) != 3:
        raise ModelError(f"{what} expects per-sample input of shape (H, W, C), got {input_shape}")
    h, w, _ = input_shape
    ho = (h - pool[0]) // stride[0] + 1
    wo = (w - pool[1]) // stride[1] + 1
    if h < pool[0] or w < pool[1]:
        raise ModelError(f"{what}: pool {pool[0]}x{pool[1]} is larger than the input {h}x{w}")
    return ho, wo


class _Pool2D(Layer):
    """Shared configuration of the 2-D pooling layers."""

    def __init__(
        self,
        pool_size: int | tuple[int, int] = 2,
        stride: int | tuple[int, int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.pool_size = as_pair(pool_size, f"{self.type_name}: pool_size")
        self.stride = self.pool_size if stride is None else as_pair(
            stride, f"{self.type_name}: stride"
        )
        self._cache: dict[str, Any] = {}

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        ho, wo = _pool_geometry(input_shape, self.pool_size, self.stride, self.type_name)
        self._out_hw = (ho, wo)
        return (ho, wo, input_shape[2])

    def _window(self, a: np.ndarray, i: int, j: int) -> np.ndarray:
        """Strided view ``(n, Ho, Wo, C)`` of the elements at offset ``(i, j)`` of each window."""
        ho, wo = self._out_hw
        sh, sw = self.stride
        return a[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]

    def _check_input(self, x: np.ndarray) -> None:
        self._ensure_built(x)
        if x.shape[1:] != self.input_shape:
            raise ModelError(
                f"{self.type_name}: expects input of per-sample shape {self.input_shape}, "
                f"got {x.shape[1:]}"
            )

    def _covers(self) -> bool:
        """Windows tile the input exactly (no overlap, no gaps)."""
        h, w, _ = self.input_shape  # type: ignore[misc]
        ho, wo = self._out_hw
        return self.stride == self.pool_size and ho * self.stride[0] == h and (
            wo * self.stride[1] == w
        )

    def flops(self) -> int:
        if not self.built:
            return 0
        ho, wo = self._out_hw
        return int(ho * wo * self.output_shape[-1] * self.pool_size[0] * self.pool_size[1])


@register("maxpool2d")
class MaxPool2D(_Pool2D):
    """Max pooling over ``pool_size`` windows moved by ``stride`` (default: ``pool_size``).

    Input ``(N, H, W, C)``, output ``(N, Ho, Wo, C)`` with ``Ho = (H - ph) // sh + 1``.
    Each window's gradient goes to exactly one maximal element: the first in
    row-major window order.  With ``stride == pool_size`` the fast step
    (:class:`~galpipe.nn.fast.pool.MaxPoolStep`, separable) is used; a 2x2 stride-2
    pool declares ``fusion_tag = "maxpool2x2"`` and fuses into ``conv2d, relu``.
    """

    @property
    def fusion_tag(self) -> str | None:
        return "maxpool2x2" if self.pool_size == self.stride == (2, 2) else "maxpool"

    def fast_step(self, following: Sequence[Layer]) -> Step | None:
        """Separable threaded pooling when the windows do not overlap."""
        from galpipe.nn.fast.pool import MaxPoolStep

        return MaxPoolStep(self) if self.stride == self.pool_size else None

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._check_input(x)
        ph, pw = self.pool_size
        out = self._window(x, 0, 0).copy()
        for k in range(1, ph * pw):
            np.maximum(out, self._window(x, *divmod(k, pw)), out=out)
        self._cache = {"x": x, "out": out}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Route ``dout`` ``(N, Ho, Wo, C)`` to the first maximum of each window."""
        if not self._cache:
            raise ModelError("maxpool2d: backward called before forward")
        x, out = self._cache["x"], self._cache["out"]
        dout = np.asarray(dout, dtype=x.dtype)
        ph, pw = self.pool_size
        dx = np.zeros_like(x)
        free = np.ones(out.shape, dtype=bool)  # windows whose maximum is not claimed yet
        for k in range(ph * pw):
            hit = (self._window(x, *divmod(k, pw)) == out) & free
            free &= ~hit
            self._window(dx, *divmod(k, pw))[...] += dout * hit
        return dx


@register("avgpool2d")
class AvgPool2D(_Pool2D):
    """Average pooling over ``pool_size`` windows moved by ``stride`` (default: ``pool_size``).

    Input ``(N, H, W, C)``, output ``(N, Ho, Wo, C)``.
    """

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._check_input(x)
        n, c = x.shape[0], x.shape[3]
        ho, wo = self._out_hw
        ph, pw = self.pool_size
        scale = 1.0 / (ph * pw)
        out = np.empty((n, ho, wo, c), dtype=x.dtype)
        np.copyto(out, self._window(x, 0, 0))
        for i in range(ph):
            for j in range(pw):
                if i or j:
                    np.add(out, self._window(x, i, j), out=out)
        out *= scale
        self._cache = {"shape": x.shape, "dtype": x.dtype}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if not self._cache:
            raise ModelError("avgpool2d: backward called before forward")
        shape, dtype = self._cache["shape"], self._cache["dtype"]
        ph, pw = self.pool_size
        scaled = np.asarray(dout, dtype=dtype) * (1.0 / (ph * pw))
        covers = self._covers()
        dx = np.empty(shape, dtype=dtype) if covers else np.zeros(shape, dtype=dtype)
        for i in range(ph):
            for j in range(pw):
                gw = self._window(dx, i, j)
                if covers:
                    gw[...] = scaled
                else:
                    gw += scaled
        return dx


@register("global_avg_pool")
class GlobalAvgPool(Layer):
    """Mean over the spatial axes: ``(N, H, W, C) -> (N, C)``."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._shape: tuple[int, ...] | None = None

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        if len(input_shape) != 3:
            raise ModelError(
                f"global_avg_pool expects per-sample input of shape (H, W, C), got {input_shape}"
            )
        return (input_shape[2],)

    def flops(self) -> int:
        return int(np.prod(self.input_shape)) if self.built else 0

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        if x.ndim != 4:
            raise ModelError(f"global_avg_pool: expects (N, H, W, C) input, got {x.shape}")
        self._shape = x.shape
        return x.mean(axis=(1, 2), dtype=x.dtype)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise ModelError("global_avg_pool: backward called before forward")
        h, w = self._shape[1:3]
        g = np.asarray(dout) / (h * w)
        return np.broadcast_to(g[:, None, None, :], self._shape).copy()
