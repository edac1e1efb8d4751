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
from galpipe.nn.base import BufferCache, Layer, parallel_chunks, register
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
        self._bufs = BufferCache()

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
    ``Ho = (H - ph) // sh + 1``.  Each window's gradient goes to exactly one
    maximal element (ties have a single winner).

    Notes
    -----
    With ``stride == pool_size`` (the usual case) pooling is separable: first the
    maximum over the ``ph`` rows of each window (contiguous ``W*C`` runs, fast),
    then over the ``pw`` columns; the winning row/column indices are kept as
    small integer maps for the backward pass.  Other strides loop over the
    window offsets and route the gradient to the first maximum in row-major
    window order.
    """

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._check_input(x)
        if self.stride == self.pool_size:
            return self._forward_separable(x)
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

    def _forward_separable(self, x: np.ndarray) -> np.ndarray:
        n, c = x.shape[0], x.shape[3]
        ho, wo = self._out_hw
        ph, pw = self.pool_size
        wc = wo * pw  # columns used (floor mode drops the rest)
        out = np.empty((n, ho, wo, c), dtype=x.dtype)
        rowmax = self._bufs.get("rowmax", (n, ho, wc, c), x.dtype)

        def work(lo: int, hi: int) -> None:
            xs = x[lo:hi, : ho * ph, :wc]
            r = rowmax[lo:hi]
            np.copyto(r, xs[:, 0::ph])
            for i in range(1, ph):
                np.maximum(r, xs[:, i::ph], out=r)
            r5 = r.reshape(hi - lo, ho, wo, pw, c)
            o = out[lo:hi]
            np.copyto(o, r5[:, :, :, 0])
            for j in range(1, pw):
                np.maximum(o, r5[:, :, :, j], out=o)

        parallel_chunks(work, n, min_chunk=self._min_chunk(x))
        # The winners are found in the backward pass (nothing extra at inference).
        self._cache = {"x": x, "rowmax": rowmax, "separable": True}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if not self._cache:
            raise ModelError("maxpool2d: backward called before forward")
        if self._cache.get("separable"):
            return self._backward_separable(dout)
        x: np.ndarray = self._cache["x"]
        out: np.ndarray = self._cache["out"]
        dout = np.asarray(dout, dtype=x.dtype)
        n = x.shape[0]
        ph, pw = self.pool_size
        dx = np.zeros_like(x)

        def work(lo: int, hi: int) -> None:
            xs, o, d, g = x[lo:hi], out[lo:hi], dout[lo:hi], dx[lo:hi]
            # ``free`` marks windows whose maximum has not been claimed yet (first wins).
            free = np.ones(o.shape, dtype=bool)
            hit = np.empty(o.shape, dtype=bool)
            last = ph * pw - 1
            for k in range(ph * pw):
                i, j = divmod(k, pw)
                if k < last:
                    np.equal(self._window(xs, i, j), o, out=hit)
                    np.logical_and(hit, free, out=hit)
                    np.logical_xor(free, hit, out=free)
                else:
                    hit = free
                gw = self._window(g, i, j)
                gw += d * hit

        parallel_chunks(work, n, min_chunk=self._min_chunk(x))
        return dx

    def _backward_separable(self, dout: np.ndarray) -> np.ndarray:
        x: np.ndarray = self._cache["x"]
        rowmax: np.ndarray = self._cache["rowmax"]
        n, h, w, c = x.shape
        ho, wo = self._out_hw
        ph, pw = self.pool_size
        wc = wo * pw
        d = np.asarray(dout, dtype=x.dtype)
        covers = h == ho * ph and w == wc
        dx = np.empty_like(x) if covers else np.zeros_like(x)
        dcol = self._bufs.get("dcol", (n, ho, wc, c), x.dtype)

        def work(lo: int, hi: int) -> None:
            m = hi - lo
            # columns: route d to the winning column of each window's row-maxima
            r5 = rowmax[lo:hi].reshape(m, ho, wo, pw, c)
            dc5 = dcol[lo:hi].reshape(m, ho, wo, pw, c)
            _route([r5[:, :, :, j] for j in range(pw)], d[lo:hi],
                   [dc5[:, :, :, j] for j in range(pw)])
            # rows: route each column's gradient to the winning row
            xs = x[lo:hi, : ho * ph, :wc]
            g = dx[lo:hi, : ho * ph, :wc]
            if ph == 2 and covers:
                # one multiply with a contiguous output: dx = dcol (repeated) * mask
                x3 = xs.reshape(m * ho, 2, wc * c)
                mask = np.empty((m * ho, 2, wc * c), dtype=bool)
                np.greater(x3[:, 1], x3[:, 0], out=mask[:, 1])  # ties: first row wins
                np.logical_not(mask[:, 1], out=mask[:, 0])
                np.multiply(dcol[lo:hi].reshape(m * ho, 1, wc * c), mask,
                            out=g.reshape(m * ho, 2, wc * c))
            else:
                _route([xs[:, i::ph] for i in range(ph)], dcol[lo:hi],
                       [g[:, i::ph] for i in range(ph)])

        parallel_chunks(work, n, min_chunk=self._min_chunk(x))
        return dx


def _route(cands: list[np.ndarray], grad: np.ndarray, outs: list[np.ndarray]) -> None:
    """``outs[k] = grad`` where ``cands[k]`` is the first maximum of the candidates, else 0.

    Masked NumPy writes (``where=``, boolean indexing) are slow on random masks, so
    everything is arithmetic: a winner map updated as ``idx += (k - idx) * (v > best)``
    (uint8, exact modulo 256), then ``outs[k] = grad * (idx == k)``.
    """
    if len(cands) == 2:
        upd = np.greater(cands[1], cands[0])  # strict: ties go to the first
        np.multiply(grad, upd, out=outs[1])
        np.subtract(grad, outs[1], out=outs[0])  # exact: grad - grad or grad - 0
        return
    best = cands[0].copy()
    idx = np.zeros(best.shape, dtype=np.uint8)
    upd = np.empty(best.shape, dtype=bool)
    tmp = np.empty(best.shape, dtype=np.uint8)
    for k, v in enumerate(cands[1:], start=1):
        np.greater(v, best, out=upd)
        np.maximum(best, v, out=best)
        np.subtract(k, idx, out=tmp)
        np.multiply(tmp, upd, out=tmp)
        idx += tmp
    for k, o in enumerate(outs):
        np.equal(idx, k, out=upd)
        np.multiply(grad, upd, out=o)


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
        h, w = self._shape[1:3]
        g = np.asarray(dout) / (h * w)
        return np.broadcast_to(g[:, None, None, :], self._shape).copy()
