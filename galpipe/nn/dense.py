"""Fully connected layer, flattening and dropout."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer, parallel_chunks, register
from galpipe.nn.init import INITIALISERS, get_initialiser


def _min_rows(work_per_row: int) -> int:
    """Smallest chunk (rows) worth a thread: about 2**17 multiply-adds."""
    return max(1, (1 << 17) // max(work_per_row, 1))


@register("dense")
class Dense(Layer):
    """Affine map ``y = x @ W + b``.

    Parameters
    ----------
    units : int
        Output features ``F_out``.
    use_bias : bool
        Add the bias ``b``.
    init : str
        Initialiser of ``W`` (``"he"`` or ``"glorot"`` etc.); ``b`` starts at 0.

    Notes
    -----
    Input ``(N, F_in)``, output ``(N, F_out)``; ``W`` has shape ``(F_in, F_out)``.
    """

    def __init__(
        self, units: int, use_bias: bool = True, init: str = "he", name: str | None = None
    ) -> None:
        super().__init__(name)
        if isinstance(units, bool) or not isinstance(units, int | np.integer) or units < 1:
            raise ModelError(f"dense: units must be a positive integer, got {units!r}")
        self.units = int(units)
        self.use_bias = bool(use_bias)
        if str(init).lower() not in INITIALISERS:
            raise ModelError(
                f"dense: unknown init {init!r}; valid: {', '.join(sorted(INITIALISERS))}"
            )
        self.init = str(init).lower()
        self._x: np.ndarray | None = None

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "type": self.type_name,
            "units": self.units,
            "use_bias": self.use_bias,
            "init": self.init,
        }
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        if len(input_shape) != 1:
            raise ModelError(
                f"dense expects flat per-sample input of shape (F,), got {input_shape} "
                "(insert a 'flatten' or 'global_avg_pool' layer before it)"
            )
        f_in = input_shape[0]
        init = get_initialiser(self.init)
        self.params = {"W": init((f_in, self.units), f_in, self.units, rng, self.dtype)}
        if self.use_bias:
            self.params["b"] = np.zeros(self.units, dtype=self.dtype)
        return (self.units,)

    def flops(self) -> int:
        if not self.built:
            return 0
        return int(self.units * (2 * self.input_shape[0] + (1 if self.use_bias else 0)))

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """``(N, F_in) -> (N, F_out)``."""
        self._ensure_built(x)
        if x.shape[1:] != self.input_shape:
            raise ModelError(
                f"dense: expects input of per-sample shape {self.input_shape}, got {x.shape[1:]}"
            )
        w = self.params["W"].astype(x.dtype, copy=False)
        b = self.params["b"].astype(x.dtype, copy=False) if self.use_bias else None
        out = np.empty((x.shape[0], self.units), dtype=x.dtype)

        def work(lo: int, hi: int) -> None:
            np.matmul(x[lo:hi], w, out=out[lo:hi])
            if b is not None:
                out[lo:hi] += b

        parallel_chunks(work, x.shape[0], min_chunk=_min_rows(w.size))
        self._x = x
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill ``grads``; return ``dx`` ``(N, F_in)`` (``None`` if not needed)."""
        if self._x is None:
            raise ModelError("dense: backward called before forward")
        x = self._x
        dout = np.ascontiguousarray(dout, dtype=x.dtype)
        gw = self.grads["W"]
        w = self.params["W"].astype(x.dtype, copy=False)
        need_dx = self.input_grad_needed
        dx = np.empty_like(x) if need_dx else None

        # Split over input features: disjoint rows of dW and columns of dx, each
        # computed exactly as in one GEMM (same reduction), for any worker count.
        def work(lo: int, hi: int) -> None:
            if gw.dtype == x.dtype:
                np.matmul(x[:, lo:hi].T, dout, out=gw[lo:hi])
            else:
                gw[lo:hi] = x[:, lo:hi].T @ dout
            if dx is not None:
                np.matmul(dout, w[lo:hi].T, out=dx[:, lo:hi])

        parallel_chunks(work, x.shape[1], min_chunk=_min_rows(x.shape[0] * self.units))
        if self.use_bias:
            self.grads["b"][...] = dout.sum(axis=0)
        return dx


@register("flatten")
class Flatten(Layer):
    """Reshape ``(N, d1, d2, ...) -> (N, d1*d2*...)`` (C order, channels last)."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._shape: tuple[int, ...] | None = None

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"type": self.type_name}
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        return (int(np.prod(input_shape)),)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if self._shape is None:
            raise ModelError("flatten: backward called before forward")
        return dout.reshape(self._shape)


@register("dropout")
class Dropout(Layer):
    """Inverted dropout: zero each element with probability ``rate``, scale the rest.

    ``training=False`` is the identity.  The random stream is seeded at build time
    from the model's generator and can be reseeded with :meth:`set_rng`
    (deterministic resume, Monte-Carlo dropout).
    """

    def __init__(self, rate: float = 0.5, name: str | None = None) -> None:
        super().__init__(name)
        if isinstance(rate, bool) or not isinstance(rate, int | float | np.number) or not (
            math.isfinite(float(rate)) and 0.0 <= float(rate) < 1.0
        ):
            raise ModelError(f"dropout: rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self._rng = np.random.default_rng(0)
        self._mask: np.ndarray | None = None

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"type": self.type_name, "rate": self.rate}
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        self.set_rng(np.random.default_rng(rng.integers(0, 2**63 - 1)))
        return input_shape

    def set_rng(self, rng: np.random.Generator) -> None:
        """Use ``rng`` for the masks from now on."""
        self._rng = rng

    def flops(self) -> int:
        return int(np.prod(self.input_shape)) if self.built else 0

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._ensure_built(x)
        if not training or self.rate == 0.0:
            self._mask = None
            return x
        keep = self._rng.random(x.shape, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        mask = (keep >= self.rate).astype(x.dtype)
        mask *= x.dtype.type(1.0 / (1.0 - self.rate))
        self._mask = mask
        return x * mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if self._mask is None:
            return dout
        return dout * self._mask
