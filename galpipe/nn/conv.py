"""2-D convolution on channels-last batches: the reference implementation.

The maths only, with whole-batch arrays (cs231n style):

* forward: ``im2col`` gathers every ``(kh, kw, C)`` patch of the padded input into
  a row of ``cols`` ``(N*Ho*Wo, kh*kw*C)``; the output is ``cols @ W + b``.
* backward: ``dW = cols.T @ dout``, ``db = sum(dout)``, and ``dx`` is ``dout @ W.T``
  scattered back onto the patches' pixels (``col2im``, a sum over kernel offsets).

The fast path (:mod:`galpipe.nn.fast.conv`: cache-sized pieces, scratch buffers,
threads, conv+relu+pool fusion) computes the same thing and is what a model runs
by default (:meth:`Conv2D.fast_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.base import Layer, Step, register
from galpipe.nn.init import INITIALISERS, get_initialiser


def as_pair(value: Any, what: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalise an int or a length-2 sequence of ints to a pair (validated)."""
    if isinstance(value, bool):
        raise ModelError(f"{what} must be an integer or a pair of integers, got {value!r}")
    if isinstance(value, int | np.integer):
        pair = (int(value), int(value))
    elif isinstance(value, list | tuple) and len(value) == 2 and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ModelError(f"{what} must be an integer or a pair of integers, got {value!r}")
    if min(pair) < minimum:
        raise ModelError(f"{what} must be >= {minimum}, got {value!r}")
    return pair


def conv_output_size(size: int, k: int, s: int, pad_before: int, pad_after: int) -> int:
    """Output length of a strided window over ``size + pads`` samples."""
    return (size + pad_before + pad_after - k) // s + 1


def resolve_padding(
    padding: str | int | tuple[int, int] | list[int],
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return ``((top, bottom), (left, right))`` padding.

    ``"same"`` follows the TensorFlow rule (output ``ceil(size / stride)``, the
    extra pixel of an odd total padding goes after); ``"valid"`` is no padding;
    an int ``p`` (or a pair ``(ph, pw)``) pads symmetrically.
    """
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        pads = []
        for n, k, s in zip(size, kernel, stride, strict=True):
            out = -(-n // s)
            total = max((out - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]
    ph, pw = as_pair(padding, "padding", minimum=0)
    return (ph, ph), (pw, pw)


def _offset(a: np.ndarray, i: int, j: int, sh: int, sw: int, ho: int, wo: int) -> np.ndarray:
    """View ``(N, ho, wo, C)`` of ``a`` at kernel offset ``(i, j)`` for every output pixel."""
    return a[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


def im2col(xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int) -> np.ndarray:
    """Patches of the padded input ``xp`` ``(N, Hp, Wp, C)`` as rows ``(N*ho*wo, kh*kw*C)``.

    Column order is ``(i, j, c)`` (kernel row, kernel column, channel), matching a
    kernel stored as ``(kh, kw, C, F)``.
    """
    n, _, _, c = xp.shape
    cols = np.empty((n, ho, wo, kh, kw, c), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = _offset(xp, i, j, sh, sw, ho, wo)
    return cols.reshape(n * ho * wo, kh * kw * c)


def col2im(dcols: np.ndarray, padded_shape: tuple[int, ...], kh: int, kw: int, sh: int, sw: int,
           ho: int, wo: int) -> np.ndarray:
    """Adjoint of :func:`im2col`: sum patch gradients ``(N*ho*wo, kh*kw*C)`` onto the
    padded input ``padded_shape`` ``(N, Hp, Wp, C)``."""
    n, _, _, c = padded_shape
    d6 = dcols.reshape(n, ho, wo, kh, kw, c)
    dxp = np.zeros(padded_shape, dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            _offset(dxp, i, j, sh, sw, ho, wo)[...] += d6[:, :, :, i, j, :]
    return dxp


@register("conv2d")
class Conv2D(Layer):
    """2-D convolution, channels-last.

    Parameters
    ----------
    filters : int
        Number of output channels ``F``.
    kernel_size : int or (int, int)
        Kernel ``(kh, kw)``.
    stride : int or (int, int)
        Stride ``(sh, sw)``.
    padding : {"same", "valid"} or int or (int, int)
        See :func:`resolve_padding`.
    use_bias : bool
        Add a per-filter bias.
    init : str
        Kernel initialiser name (:data:`galpipe.nn.init.INITIALISERS`); biases start at 0.
    name : str, optional
        Free-form name.

    Notes
    -----
    Input ``(N, H, W, C)``, output ``(N, Ho, Wo, F)``.  Parameters: ``W`` of shape
    ``(kh, kw, C, F)`` and ``b`` of shape ``(F,)``.  Called directly, the layer keeps
    the whole im2col matrix between forward and backward (simple, memory-hungry);
    in a model it runs as :class:`~galpipe.nn.fast.conv.ConvStep`, fused with a
    following ``relu`` (and 2x2 ``maxpool2d``).
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        use_bias: bool = True,
        init: str = "he",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if isinstance(filters, bool) or not isinstance(filters, int | np.integer) or filters < 1:
            raise ModelError(f"conv2d: filters must be a positive integer, got {filters!r}")
        self.filters = int(filters)
        self.kernel_size = as_pair(kernel_size, "conv2d: kernel_size")
        self.stride = as_pair(stride, "conv2d: stride")
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ModelError(
                f"conv2d: padding must be 'same', 'valid' or an integer, got {padding!r}"
            )
        self.padding: str | tuple[int, int] = (
            padding if isinstance(padding, str) else as_pair(padding, "conv2d: padding", minimum=0)
        )
        self.use_bias = bool(use_bias)
        if str(init).lower() not in INITIALISERS:
            raise ModelError(
                f"conv2d: unknown init {init!r}; valid: {', '.join(sorted(INITIALISERS))}"
            )
        self.init = str(init).lower()
        self._cache: dict[str, Any] = {}

    def _build(self, input_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        if len(input_shape) != 3:
            raise ModelError(
                f"conv2d expects per-sample input of shape (H, W, C), got {input_shape}"
            )
        h, w, c = input_shape
        kh, kw = self.kernel_size
        sh, sw = self.stride
        (pt, pb), (pl, pr) = resolve_padding(self.padding, (h, w), (kh, kw), (sh, sw))
        ho = conv_output_size(h, kh, sh, pt, pb)
        wo = conv_output_size(w, kw, sw, pl, pr)
        if ho < 1 or wo < 1:
            raise ModelError(
                f"conv2d: kernel {kh}x{kw} with stride {sh}x{sw} and padding {self.padding!r} "
                f"does not fit input {h}x{w} (output would be {ho}x{wo})"
            )
        self._pads = ((pt, pb), (pl, pr))
        self._out_hw = (ho, wo)
        self._in_c = c
        init = get_initialiser(self.init)
        self.params = {"W": init((kh, kw, c, self.filters), kh * kw * c, kh * kw * self.filters,
                                 rng, self.dtype)}
        if self.use_bias:
            self.params["b"] = np.zeros(self.filters, dtype=self.dtype)
        return (ho, wo, self.filters)

    def flops(self) -> int:
        if not self.built:
            return 0
        ho, wo = self._out_hw
        kh, kw = self.kernel_size
        per_out = 2 * kh * kw * self._in_c + (1 if self.use_bias else 0)
        return int(ho * wo * self.filters * per_out)

    def fast_step(self, following: Sequence[Layer]) -> Step | None:
        """The fast convolution, fused with a following ``relu`` (and 2x2 ``maxpool2d``)."""
        from galpipe.nn.fast.conv import ConvStep

        return ConvStep.fuse(self, following)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Convolve ``x`` ``(N, H, W, C)``; returns ``(N, Ho, Wo, F)``."""
        self._ensure_built(x)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ModelError(
                f"conv2d: expects input of per-sample shape {self.input_shape}, got {x.shape[1:]}"
            )
        n = x.shape[0]
        (pt, pb), (pl, pr) = self._pads
        ho, wo = self._out_hw
        xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        cols = im2col(xp, *self.kernel_size, *self.stride, ho, wo)  # (N*Ho*Wo, K)
        out = cols @ self.params["W"].reshape(-1, self.filters).astype(x.dtype, copy=False)
        if self.use_bias:
            out += self.params["b"].astype(x.dtype, copy=False)
        self._cache = {"cols": cols, "xp_shape": xp.shape}
        return out.reshape(n, ho, wo, self.filters)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Fill ``grads["W"]`` ``(kh, kw, C, F)`` and ``grads["b"]`` ``(F,)``; return ``dx``
        ``(N, H, W, C)`` for ``dout`` ``(N, Ho, Wo, F)``."""
        if not self._cache:
            raise ModelError("conv2d: backward called before forward")
        cols: np.ndarray = self._cache["cols"]
        d2 = np.asarray(dout, dtype=cols.dtype).reshape(-1, self.filters)  # (N*Ho*Wo, F)
        self.grads["W"][...] = (cols.T @ d2).reshape(self.grads["W"].shape)
        if self.use_bias:
            self.grads["b"][...] = d2.sum(axis=0)
        wmat = self.params["W"].reshape(-1, self.filters).astype(cols.dtype, copy=False)
        dxp = col2im(d2 @ wmat.T, self._cache["xp_shape"], *self.kernel_size, *self.stride,
                     *self._out_hw)
        (pt, _), (pl, _) = self._pads
        h, w, _ = self.input_shape  # type: ignore[misc]
        return dxp[:, pt : pt + h, pl : pl + w, :]
