"""Data augmentation on channels-last image batches ``(N, H, W, C)``.

Galaxy images have no preferred orientation, so the 8 symmetries of the square
(the dihedral group D4) are label-preserving.  Symmetry ``k`` in ``0..7`` is

    ``g_k = R^(k mod 4) . F^(k // 4)``

i.e. first an optional left-right mirror ``F`` (reverse the ``W`` axis, applied
when ``k >= 4``), then ``k mod 4`` counter-clockwise quarter turns ``R``
(:func:`numpy.rot90` on the ``(H, W)`` axes).  ``k = 0`` is the identity.
Channels are never mixed or reordered.

Optional small integer translations are circular (:func:`numpy.roll`
semantics): pixels leaving one edge re-enter at the opposite edge.  For
galaxy-centred cutouts the edges are sky background, so wrapping a few pixels
adds no artificial structure, and no fill value has to be invented.
"""

from __future__ import annotations

import numpy as np

from galpipe.errors import ConfigError, DataError

#: Number of elements of D4.
N_SYMMETRIES = 8


def _check_batch(x: np.ndarray, *, square: bool) -> None:
    if x.ndim != 4:
        raise DataError(f"expected a channels-last image batch (N, H, W, C), got shape {x.shape}")
    if square and x.shape[1] != x.shape[2]:
        raise DataError(
            f"rotations by 90 degrees need square images, got H x W = {x.shape[1]} x {x.shape[2]}"
        )


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < N_SYMMETRIES:
        raise ConfigError(f"dihedral symmetry index must be an integer in 0..7, got {k!r}")
    return int(k)


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """Apply symmetry ``k`` of the square to every image of a batch.

    Parameters
    ----------
    x : numpy.ndarray
        Images, shape ``(N, H, W, C)``; ``H == W`` unless ``k`` is 0, 2, 4 or 6.
    k : int
        Symmetry index in ``0..7`` (see the module docstring).

    Returns
    -------
    numpy.ndarray
        Transformed images, same shape and dtype, C-contiguous (a new array,
        except for ``k = 0`` which returns ``x`` itself).
    """
    k = _check_k(k)
    _check_batch(x, square=k % 2 == 1)
    if k == 0:
        return x
    out = x[:, :, ::-1, :] if k >= 4 else x
    out = np.rot90(out, k % 4, axes=(1, 2))
    return np.ascontiguousarray(out)


def dihedral_inverse(k: int) -> int:
    """Index of the inverse of symmetry ``k``: ``dihedral(dihedral(x, k), dihedral_inverse(k))
    == x``.

    Rotations invert to the opposite rotation; every mirror symmetry (``k >= 4``)
    is its own inverse.
    """
    k = _check_k(k)
    return (4 - k) % 4 if k < 4 else k


def dihedral_compose(a: int, b: int) -> int:
    """Index ``c`` with ``g_c = g_a . g_b`` (apply ``b`` first, then ``a``).

    Uses ``F R F = R^-1``: ``R^ra F^fa R^rb F^fb = R^(ra + (-1)^fa rb) F^(fa xor fb)``.
    """
    a, b = _check_k(a), _check_k(b)
    ra, fa = a % 4, a // 4
    rb, fb = b % 4, b // 4
    r = (ra + (-rb if fa else rb)) % 4
    return r + 4 * (fa ^ fb)


def random_augment(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    flips_rotations: bool = True,
    max_shift: int = 0,
) -> np.ndarray:
    """Apply an independent random D4 symmetry and shift to every image.

    Samples sharing the same symmetry are transformed together (at most 8
    vectorised calls); shifts are one vectorised gather.

    Parameters
    ----------
    x : numpy.ndarray
        Images, shape ``(N, H, W, C)`` (square when ``flips_rotations``).
    rng : numpy.random.Generator
        Source of randomness: ``N`` symmetry indices are drawn first (only when
        ``flips_rotations``), then ``2N`` shifts (only when ``max_shift > 0``).
    flips_rotations : bool
        Draw a uniformly random symmetry of the square per image.
    max_shift : int
        Largest circular translation in pixels along each of ``H`` and ``W``;
        each image gets independent integer shifts uniform in
        ``-max_shift..max_shift``.

    Returns
    -------
    numpy.ndarray
        Augmented copy, same shape and dtype as ``x`` (``x`` is not modified).
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int | np.integer):
        raise ConfigError(f"max_shift must be a non-negative integer, got {max_shift!r}")
    if max_shift < 0:
        raise ConfigError(f"max_shift must be a non-negative integer, got {max_shift}")
    _check_batch(x, square=flips_rotations)
    n, h, w = x.shape[:3]
    if max_shift >= min(h, w):
        raise ConfigError(f"max_shift={max_shift} must be smaller than the image side {min(h, w)}")
    out = x
    if flips_rotations:
        ks = rng.integers(0, N_SYMMETRIES, size=n)
        out = np.empty_like(x)
        for k in np.unique(ks):
            sel = ks == k
            out[sel] = dihedral(x[sel], int(k))
    if max_shift > 0:
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        rows = (np.arange(h)[None, :] - shifts[:, :1]) % h  # (N, H)
        cols = (np.arange(w)[None, :] - shifts[:, 1:]) % w  # (N, W)
        out = out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if out is x:
        out = x.copy()
    return out
