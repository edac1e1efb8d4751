"""Pooling layers on channels-last batches ``(N, H, W, C)``.

Windows are ``valid`` (no padding); trailing rows/columns that do not fill a
window are dropped (floor mode, as in PyTorch).  All pooling is expressed as a
loop over the ``ph*pw`` kernel offsets with strided slices (for the common
``pool == stride`` case these are exactly the reshape views
``x.reshape(N, Ho, ph, Wo, pw, C)[:, :, i, :, j, :]``), so there is no per-window
Python loop and no ``np.add.at``.

Max pooling routes the gradient to the *first* maximum of each window in
row-major window order (ties: one winner, like PyTorch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer, parallel_chunks, register
from galpipe.nn.conv import _jsonable, as_pair

#: Batches smaller than this many elements per chunk are pooled on one thread.
_MIN_PARALLEL = 1 << 16


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
        self._stride_given = stride is not None
        self._cache: dict[str, Any] = {}

    def get_config(self) -> dict[str, Any]:
        ps = self.pool_size
        cfg: dict[str, Any] = {
            "type": self.type_name,
            "pool_size": ps[0] if ps[0] == ps[1] else _jsonable(ps),
        }
        st = self.stride
        cfg["stride"] = (st[0] if st[0] == st[1] else _jsonable(st)) if self._stride_given else None
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

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

    def _min_chunk(self, x: np.ndarray) -> int:
        per_sample = max(int(np.prod(x.shape[1:])), 1)
        return max(1, _MIN_PARALLEL // per_sample)

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

    Input ``(N, H, W, C)``, output ``(N, Ho, Wo, C)`` with
    ``Ho = (H - ph) // sh + 1``.
    """

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._check_input(x)
        n, c = x.shape[0], x.shape[3]
        ho, wo = self._out_hw
        ph, pw = self.pool_size
        out = np.empty((n, ho, wo, c), dtype=x.dtype)

        def work(lo: int, hi: int) -> None:
            xs = x[lo:hi]
            o = out[lo:hi]
            np.copyto(o, self._window(xs, 0, 0))
            for i in range(ph):
                for j in range(pw):
                    if i or j:
                        np.maximum(o, self._window(xs, i, j), out=o)

        parallel_chunks(work, n, min_chunk=self._min_chunk(x))
        self._cache = {"x": x, "out": out}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if not self._cache:
            raise ModelError("maxpool2d: backward called before forward")
        x: np.ndarray = self._cache["x"]
        out: np.ndarray = self._cache["out"]
        dout = np.asarray(dout, dtype=x.dtype)
        n = x.shape[0]
        ph, pw = self.pool_size
        covers = self._covers()
        dx = np.empty_like(x)

        def work(lo: int, hi: int) -> None:
            xs, o, d, g = x[lo:hi], out[lo:hi], dout[lo:hi], dx[lo:hi]
            if not covers:
                g[...] = 0.0
            # ``free`` marks windows whose maximum has not been claimed yet (first wins).
            free = np.ones(o.shape, dtype=bool)
            hit = np.empty(o.shape, dtype=bool)
            last = ph * pw - 1
            for k in range(ph * pw):
                i, j = divmod(k, pw)
                gw = self._window(g, i, j)
                if k < last:
                    np.equal(self._window(xs, i, j), o, out=hit)
                    np.logical_and(hit, free, out=hit)
                    np.logical_xor(free, hit, out=free)
                else:
                    hit = free
                if covers:
                    np.multiply(d, hit, out=gw)
                else:
                    gw += d * hit

        parallel_chunks(work, n, min_chunk=self._min_chunk(x))
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

        def work(lo: int, hi: int) -> None:
            xs, o = x[lo:hi], out[lo:hi]
            np.copyto(o, self._window(xs, 0, 0))
            for i in range(ph):
                for j in range(pw):
                    if i or j:
                        np.add(o, self._window(xs, i, j), out=o)
            o *= scale

        parallel_chunks(work, n, min_chunk=self._min_chunk(x))
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

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"type": self.type_name}
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

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
        n, h, w, c = self._shape
        g = np.asarray(dout) / (h * w)
        return np.broadcast_to(g[:, None, None, :], self._shape).copy()
