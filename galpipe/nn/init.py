"""Weight initialisers.

Every initialiser has the signature ``init(shape, fan_in, fan_out, rng, dtype) -> ndarray``
and draws from the given :class:`numpy.random.Generator` only (deterministic for a seed).
For a convolution kernel of shape ``(kh, kw, C, F)`` the fans are ``kh*kw*C`` and
``kh*kw*F``; for a dense matrix ``(F_in, F_out)`` they are ``F_in`` and ``F_out``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from galpipe.errors import ModelError

Initialiser = Callable[..., np.ndarray]


def _draw_normal(
    shape: tuple[int, ...], std: float, rng: np.random.Generator, dtype: np.dtype | type
) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(dtype)


def _draw_uniform(
    shape: tuple[int, ...], limit: float, rng: np.random.Generator, dtype: np.dtype | type
) -> np.ndarray:
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def he_normal(
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """He/Kaiming normal: ``N(0, 2 / fan_in)`` (for ReLU networks)."""
    return _draw_normal(shape, float(np.sqrt(2.0 / max(fan_in, 1))), rng, dtype)


def he_uniform(
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """He/Kaiming uniform: ``U(-a, a)`` with ``a = sqrt(6 / fan_in)``."""
    return _draw_uniform(shape, float(np.sqrt(6.0 / max(fan_in, 1))), rng, dtype)


def glorot_uniform(
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Glorot/Xavier uniform: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    return _draw_uniform(shape, float(np.sqrt(6.0 / max(fan_in + fan_out, 1))), rng, dtype)


def glorot_normal(
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Glorot/Xavier normal: ``N(0, 2 / (fan_in + fan_out))``."""
    return _draw_normal(shape, float(np.sqrt(2.0 / max(fan_in + fan_out, 1))), rng, dtype)


def lecun_normal(
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """LeCun normal: ``N(0, 1 / fan_in)`` (for tanh/SELU networks)."""
    return _draw_normal(shape, float(np.sqrt(1.0 / max(fan_in, 1))), rng, dtype)


def zeros(
    shape: tuple[int, ...],
    fan_in: int = 0,
    fan_out: int = 0,
    rng: np.random.Generator | None = None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """All zeros (biases, BatchNorm shift)."""
    return np.zeros(shape, dtype=dtype)


def ones(
    shape: tuple[int, ...],
    fan_in: int = 0,
    fan_out: int = 0,
    rng: np.random.Generator | None = None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """All ones (BatchNorm scale)."""
    return np.ones(shape, dtype=dtype)


#: Name (as used in layer specs, ``init: he``) -> initialiser function.
INITIALISERS: dict[str, Initialiser] = {
    "he": he_normal,
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "glorot": glorot_uniform,
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "xavier": glorot_uniform,
    "lecun": lecun_normal,
    "lecun_normal": lecun_normal,
    "zeros": zeros,
    "ones": ones,
}


def get_initialiser(name: str) -> Initialiser:
    """Look up an initialiser by name.

    Raises
    ------
    ModelError
        Unknown name; the message lists the valid ones.
    """
    try:
        return INITIALISERS[str(name).lower()]
    except KeyError:
        raise ModelError(
            f"unknown initialiser {name!r}; valid: {', '.join(sorted(INITIALISERS))}"
        ) from None
