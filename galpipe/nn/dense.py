"""Fully connected layer, flattening and dropout."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer, Step, register
from galpipe.nn.init import INITIALISERS, get_initialiser


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
    name : str, optional
        Free-form name.

    Notes
    -----
    Input ``(N, F_in)``, output ``(N, F_out)``; ``W`` has shape ``(F_in, F_out)``.
    The fast step (:class:`~galpipe.nn.fast.dense.DenseStep`) is threaded.
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

    def fast_step(self, following: Sequence[Layer]) -> Step | None:
        """The threaded dense layer."""
        from galpipe.nn.fast.dense import DenseStep

        return DenseStep(self)

    def _check_input(self, x: np.ndarray) -> None:
        self._ensure_built(x)
        if x.shape[1:] != self.input_shape:
            raise ModelError(
                f"dense: expects input of per-sample shape {self.input_shape}, got {x.shape[1:]}"
            )

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """``(N, F_in) -> (N, F_out)``."""
        self._check_input(x)
        out = x @ self.params["W"].astype(x.dtype, copy=False)
        if self.use_bias:
            out += self.params["b"].astype(x.dtype, copy=False)
        self._x = x
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Fill ``grads`` (``W`` ``(F_in, F_out)``, ``b`` ``(F_out,)``); return ``dx``
        ``(N, F_in)`` for ``dout`` ``(N, F_out)``."""
        if self._x is None:
            raise ModelError("dense: backward called before forward")
        x = self._x
        dout = np.asarray(dout, dtype=x.dtype)
        self.grads["W"][...] = x.T @ dout
        if self.use_bias:
            self.grads["b"][...] = dout.sum(axis=0)
        return dout @ self.params["W"].astype(x.dtype, copy=False).T


@register("flatten")
class Flatten(Layer):
    """Reshape ``(N, d1, d2, ...) -> (N, d1*d2*...)`` (C order, channels last)."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._shape: tuple[int, ...] | None = None

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

    Masks are drawn when ``forward`` runs with ``training=True`` *or* while
    :attr:`mc_sampling` is set (Monte-Carlo dropout at inference; set it with
    :func:`galpipe.nn.inference.mc_dropout_active` or
    :meth:`galpipe.nn.model.Sequential.set_mc_dropout`); otherwise it is the identity.
    The random stream is seeded at build time from the model's generator and can be
    reseeded with :meth:`set_rng` (deterministic resume, Monte-Carlo dropout).
    Any input shape ``(N, ...)``.
    """

    def __init__(self, rate: float = 0.5, name: str | None = None) -> None:
        super().__init__(name)
        if isinstance(rate, bool) or not isinstance(rate, int | float | np.number) or not (
            math.isfinite(float(rate)) and 0.0 <= float(rate) < 1.0
        ):
            raise ModelError(f"dropout: rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)
        #: Draw masks even when ``training`` is False (Monte-Carlo dropout).
        self.mc_sampling = False
        self._rng = np.random.default_rng(0)
        self._mask: np.ndarray | None = None

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
        if not (training or self.mc_sampling) or self.rate == 0.0:
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
