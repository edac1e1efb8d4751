"""2-D convolution on channels-last batches via im2col and one GEMM per chunk.

Implementation notes (what makes it fast on a CPU with NumPy only):

* ``im2col`` writes the patches of a chunk of the batch into a reused buffer of
  shape ``(rows, kh*kw*C [+1])`` with one strided copy per kernel row: for a
  fixed kernel row the ``kw*C`` values of a patch are contiguous in the padded
  channels-last image (``numpy.lib.stride_tricks.as_strided`` view).
* The bias rides along in the GEMM: the im2col buffer has a trailing column of
  ones and the weight matrix a trailing row holding the bias, so the forward pass
  is a single ``matmul`` and the bias gradient falls out of the weight-gradient
  GEMM.
* ``col2im`` accumulates with sliced adds per kernel offset (no ``np.add.at``);
  for stride 1 convolutions the input gradient is instead computed as a
  "full" correlation of the padded output gradient with the flipped kernel
  (im2col + GEMM), which needs no scatter at all.
* The batch is split into chunks processed on worker threads
  (:func:`galpipe.nn.base.parallel_chunks`), each with its own single-threaded
  GEMM; buffers are cached per input shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from galpipe.errors import ModelError
from galpipe.nn.base import BufferCache, Layer, parallel_chunks, register, sum_arrays
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


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


def _rows_view(xp: np.ndarray, ho: int, wo: int, sh: int, sw: int, kw: int, i: int) -> np.ndarray:
    """View ``(n, ho, wo, kw*C)``: kernel row ``i`` of every patch of padded ``xp``."""
    n, _, _, c = xp.shape
    s0, s1, s2, s3 = xp.strides
    return as_strided(
        xp[:, i:], shape=(n, ho, wo, kw * c), strides=(s0, s1 * sh, s2 * sw, s3), writeable=False
    )


def im2col_rows(
    xp: np.ndarray, cols: np.ndarray, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int
) -> None:
    """Fill ``cols`` (shape ``(n*ho*wo, >= kh*kw*C)``) with the patches of padded ``xp``.

    Column order is ``(i, j, c)`` (kernel row, kernel column, channel), matching a
    kernel stored as ``(kh, kw, C, F)``.  Extra trailing columns are left untouched.
    """
    n, _, _, c = xp.shape
    k = kh * kw * c
    dest = cols[:, :k].reshape(n, ho, wo, kh, kw * c)
    for i in range(kh):
        dest[:, :, :, i, :] = _rows_view(xp, ho, wo, sh, sw, kw, i)


def col2im_add(
    dcols: np.ndarray, dxp: np.ndarray, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int
) -> None:
    """Accumulate patch gradients ``dcols`` (``(n*ho*wo, kh*kw*C)``) into padded ``dxp``."""
    n, _, _, c = dxp.shape
    d6 = dcols.reshape(n, ho, wo, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            dxp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] += d6[
                :, :, :, i, j, :
            ]


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

    Notes
    -----
    Input ``(N, H, W, C)``, output ``(N, Ho, Wo, F)``.  Parameters: ``W`` of shape
    ``(kh, kw, C, F)`` and ``b`` of shape ``(F,)``.
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
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ModelError(
                    f"conv2d: padding must be 'same', 'valid' or an integer, got {padding!r}"
                )
            self.padding: str | tuple[int, int] = padding
        else:
            self.padding = as_pair(padding, "conv2d: padding", minimum=0)
        self.use_bias = bool(use_bias)
        if str(init).lower() not in INITIALISERS:
            raise ModelError(
                f"conv2d: unknown init {init!r}; valid: {', '.join(sorted(INITIALISERS))}"
            )
        self.init = str(init).lower()
        self._bufs = BufferCache()
        self._cache: dict[str, Any] = {}

    # -- config ------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "type": self.type_name,
            "filters": self.filters,
            "kernel_size": _jsonable(self.kernel_size)
            if self.kernel_size[0] != self.kernel_size[1]
            else self.kernel_size[0],
            "stride": _jsonable(self.stride) if self.stride[0] != self.stride[1] else self.stride[0],
            "padding": self.padding
            if isinstance(self.padding, str)
            else (self.padding[0] if self.padding[0] == self.padding[1] else list(self.padding)),
            "use_bias": self.use_bias,
            "init": self.init,
        }
        if self.name is not None:
            cfg["name"] = self.name
        return cfg

    # -- build ---------------------------------------------------------------------------
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
        fan_in, fan_out = kh * kw * c, kh * kw * self.filters
        init = get_initialiser(self.init)
        self.params = {"W": init((kh, kw, c, self.filters), fan_in, fan_out, rng, self.dtype)}
        if self.use_bias:
            self.params["b"] = np.zeros(self.filters, dtype=self.dtype)
        self._bufs.clear()
        # A stride-1 kernel padded by at most k - 1 on every side gets its input
        # gradient as a correlation (im2col + GEMM) instead of a scatter-add.
        self._full_corr = (sh, sw) == (1, 1) and max(pt, pb) < kh and max(pl, pr) < kw
        return (ho, wo, self.filters)

    def flops(self) -> int:
        if not self.built:
            return 0
        ho, wo = self._out_hw
        kh, kw = self.kernel_size
        per_out = 2 * kh * kw * self._in_c + (1 if self.use_bias else 0)
        return int(ho * wo * self.filters * per_out)

    # -- helpers -------------------------------------------------------------------------
    def _weight_matrix(self) -> np.ndarray:
        """``(K [+1], F)`` GEMM operand; the bias is the last row when ``use_bias``."""
        w = self.params["W"].reshape(-1, self.filters)
        if not self.use_bias:
            return w
        return np.concatenate([w, self.params["b"][None, :]], axis=0)

    def _padded(self, x: np.ndarray, lo: int, hi: int, xp: np.ndarray | None) -> np.ndarray:
        """Chunk ``lo:hi`` of the input, padded (writes into the cached ``xp``)."""
        if xp is None:
            return x[lo:hi]
        (pt, _), (pl, _) = self._pads
        h, w = x.shape[1:3]
        xp[lo:hi, pt : pt + h, pl : pl + w, :] = x[lo:hi]
        return xp[lo:hi]

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Convolve ``x`` of shape ``(N, H, W, C)``; returns ``(N, Ho, Wo, F)``."""
        self._ensure_built(x)
        if x.shape[1:] != self.input_shape:
            raise ModelError(
                f"conv2d: expects input of per-sample shape {self.input_shape}, "
                f"got {x.shape[1:]}"
            )
        x = np.ascontiguousarray(x)
        dt = x.dtype
        n = x.shape[0]
        h, w, c = self.input_shape
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ho, wo = self._out_hw
        (pt, pb), (pl, pr) = self._pads
        k = kh * kw * c
        kk = k + (1 if self.use_bias else 0)
        f = self.filters
        m_per = ho * wo
        wmat = self._weight_matrix().astype(dt, copy=False)
        padded = pt or pb or pl or pr
        xp = (
            self._bufs.get("xp", (n, h + pt + pb, w + pl + pr, c), dt, zero=True)
            if padded
            else None
        )
        cols = self._bufs.get("cols", (n * m_per, kk), dt)
        if self.use_bias:
            cols[:, k] = 1.0
        out = np.empty((n, ho, wo, f), dtype=dt)
        out2 = out.reshape(n * m_per, f)

        def work(lo: int, hi: int) -> None:
            src = self._padded(x, lo, hi, xp)
            block = cols[lo * m_per : hi * m_per]
            im2col_rows(src, block, kh, kw, sh, sw, ho, wo)
            np.matmul(block, wmat, out=out2[lo * m_per : hi * m_per])

        parallel_chunks(work, n)
        self._cache = {"cols": cols, "n": n, "wmat": wmat}
        return out

    # -- backward ------------------------------------------------------------------------
    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill ``grads["W"]`` (and ``grads["b"]``); return ``dx`` of shape ``(N, H, W, C)``.

        Returns ``None`` when :attr:`input_grad_needed` is False.
        """
        if not self._cache:
            raise ModelError("conv2d: backward called before forward")
        cols: np.ndarray = self._cache["cols"]
        n: int = self._cache["n"]
        wmat: np.ndarray = self._cache["wmat"]
        dout = np.ascontiguousarray(dout, dtype=cols.dtype)
        dt = cols.dtype
        h, w, c = self.input_shape
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ho, wo = self._out_hw
        (pt, pb), (pl, pr) = self._pads
        f = self.filters
        k = kh * kw * c
        m_per = ho * wo
        d2 = dout.reshape(n * m_per, f)
        need_dx = self.input_grad_needed
        dx = np.empty((n, h, w, c), dtype=dt) if need_dx else None
        full = need_dx and self._full_corr
        padded = pt or pb or pl or pr
        if full:
            # dx = correlation of dout, padded by (k - 1 - pad), with the flipped kernel
            # transposed to (kh, kw, F, C): an im2col + GEMM, no scatter-add.
            qt, ql = kh - 1 - pt, kw - 1 - pl
            wflip = np.ascontiguousarray(
                self.params["W"][::-1, ::-1].transpose(0, 1, 3, 2), dtype=dt
            ).reshape(kh * kw * f, c)
            dpad = self._bufs.get("dpad", (n, h + kh - 1, w + kw - 1, f), dt, zero=True)
            dcols = self._bufs.get("dcols_full", (n * h * w, kh * kw * f), dt)
        elif need_dx:
            dxp = np.empty((n, h + pt + pb, w + pl + pr, c), dtype=dt) if padded else dx
            wt = np.ascontiguousarray(wmat[:k].T)
            dcols = self._bufs.get("dcols", (n * m_per, k), dt)

        def work(lo: int, hi: int) -> np.ndarray:
            r0, r1 = lo * m_per, hi * m_per
            gw = cols[r0:r1].T @ d2[r0:r1]
            if full:
                assert dx is not None
                dpad[lo:hi, qt : qt + ho, ql : ql + wo, :] = dout[lo:hi]
                blk = dcols[lo * h * w : hi * h * w]
                im2col_rows(dpad[lo:hi], blk, kh, kw, 1, 1, h, w)
                np.matmul(blk, wflip, out=dx[lo:hi].reshape(-1, c))
            elif need_dx:
                assert dx is not None and dxp is not None
                blk = dcols[r0:r1]
                np.matmul(d2[r0:r1], wt, out=blk)
                dxp[lo:hi] = 0.0
                col2im_add(blk, dxp[lo:hi], kh, kw, sh, sw, ho, wo)
                if padded:
                    dx[lo:hi] = dxp[lo:hi, pt : pt + h, pl : pl + w, :]
            return gw

        gw = sum_arrays(parallel_chunks(work, n))
        self.grads["W"][...] = gw[:k].reshape(self.grads["W"].shape)
        if self.use_bias:
            self.grads["b"][...] = gw[k]
        return dx
