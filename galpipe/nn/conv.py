"""2-D convolution on channels-last batches via im2col and GEMMs.

Implementation notes (what makes it fast on a CPU with NumPy only):

* The batch is processed in *pieces* of a few samples (about
  :data:`PIECE_BYTES` of patches): ``im2col`` writes a piece's patches into a
  reused scratch matrix that is still in cache when the GEMM reads it.  Pieces
  are spread over worker threads (:func:`galpipe.nn.base.parallel_chunks`), each
  running its own single-threaded GEMM.
* ``im2col`` needs one strided copy per kernel row: for a fixed kernel row the
  ``kw*C`` values of a patch are contiguous in the padded channels-last image
  (an ``as_strided`` view).
* The bias rides along in the GEMM: the scratch matrix has a trailing column of
  ones and the weight matrix a trailing row holding the bias, so the forward
  pass is one ``matmul`` per piece and the bias gradient falls out of the
  weight-gradient GEMM.
* The backward pass recomputes the patches piece by piece instead of storing the
  whole im2col matrix (faster: the GEMMs read from cache; and far less memory).
  For stride 1 the input gradient is the correlation of the padded output
  gradient with the flipped kernel (im2col + GEMM, no scatter); otherwise one
  GEMM per kernel offset is accumulated with sliced adds (never ``np.add.at``).
* Parameter gradients are summed over pieces in a fixed order, so results do
  not depend on the number of workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from galpipe.errors import ModelError
from galpipe.nn.base import (
    BufferCache,
    Layer,
    parallel_chunks,
    plan_chunks,
    register,
    sum_arrays,
)
from galpipe.nn.init import INITIALISERS, get_initialiser

#: Target size in bytes of one im2col scratch matrix: the batch is processed in
#: pieces of samples small enough for the patches to stay in cache between the
#: im2col copy and the GEMM that reads them.
PIECE_BYTES = 3 << 20
#: At most this many samples per piece.
MAX_PIECE = 16
#: Few-channel convolutions (a kernel row spans fewer than this many values,
#: ``kw * C``; e.g. the first layer on RGB input) build their patches transposed
#: (:func:`im2col_t`, long copy runs) and, in training, keep them from the forward
#: pass for the backward pass instead of recomputing them.
SMALL_PATCH_BELOW = 16


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


def im2col_t(
    xp: np.ndarray, cols_t: np.ndarray, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int
) -> None:
    """Transposed im2col: fill ``cols_t`` (``(>= kh*kw*C, n*ho*wo)``) from padded ``xp``.

    Row ``(i, j, c)`` holds channel ``c`` shifted by the kernel offset ``(i, j)`` for
    every output position: one copy per kernel offset, with runs of ``wo`` values
    (better than the ``kw*C``-long runs of :func:`im2col_rows` when ``C`` is small).
    Extra trailing rows are left untouched.
    """
    n, _, _, c = xp.shape
    dest = cols_t[: kh * kw * c].reshape(kh, kw, c, n, ho, wo)
    for i in range(kh):
        for j in range(kw):
            src = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
            dest[i, j] = src.transpose(3, 0, 1, 2)


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
    def _weight_matrix(self, dt: np.dtype) -> np.ndarray:
        """``(K [+1], F)`` GEMM operand; the bias is the last row when ``use_bias``."""
        w = self.params["W"].reshape(-1, self.filters)
        if self.use_bias:
            w = np.concatenate([w, self.params["b"][None, :]], axis=0)
        return np.ascontiguousarray(w, dtype=dt)

    def _piece_size(self, n: int, width: int, itemsize: int) -> int:
        """Samples per piece so that one im2col scratch is about :data:`PIECE_BYTES`."""
        ho, wo = self._out_hw
        per = max(ho * wo * width * itemsize, 1)
        return int(min(max(PIECE_BYTES // per, 1), MAX_PIECE, n))

    def _scratch(self, tag: str, k: int, shape: tuple[int, ...], dt: np.dtype, *,
                 zero: bool = False, bias_col: bool = False) -> np.ndarray:
        buf = self._bufs.get(f"{tag}{k}", shape, dt, zero=zero or bias_col)
        if bias_col and buf[0, -1] != 1:
            buf[:, -1] = 1.0  # set once; im2col never writes the last column
        return buf

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Convolve ``x`` of shape ``(N, H, W, C)``; returns ``(N, Ho, Wo, F)``.

        The batch is processed in pieces of a few samples whose im2col matrix stays
        in cache (im2col, then one GEMM per piece), pieces spread over the workers.
        """
        self._ensure_built(x)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
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
        kk = kh * kw * c + (1 if self.use_bias else 0)
        f = self.filters
        mp = ho * wo
        wmat = self._weight_matrix(dt)
        padded = bool(pt or pb or pl or pr)
        xp = (
            self._bufs.get("xp", (n, h + pt + pb, w + pl + pr, c), dt, zero=True)
            if padded
            else x
        )
        out = np.empty((n, ho, wo, f), dtype=dt)
        out2 = out.reshape(n * mp, f)
        ps = self._piece_size(n, kk, dt.itemsize)
        n_pieces = -(-n // ps)
        chunks = plan_chunks(n_pieces)
        transposed = kw * c < SMALL_PATCH_BELOW
        keep = training and transposed
        if keep:
            store = self._scratch("cols_all", 0, (kk, n * mp), dt)
        scratch = [
            self._scratch("cols_t", k, (kk, ps * mp), dt)
            if transposed
            else self._scratch("cols", k, (ps * mp, kk), dt, bias_col=self.use_bias)
            for k in range(len(chunks))
        ]
        if transposed and self.use_bias:
            for buf in [*scratch, *([store] if keep else [])]:
                if buf[-1, 0] != 1:
                    buf[-1] = 1.0  # ones row for the bias, set once

        def work(k: int, lo: int, hi: int) -> None:
            for a in range(lo * ps, min(hi * ps, n), ps):
                b = min(a + ps, n)
                if padded:
                    xp[a:b, pt : pt + h, pl : pl + w, :] = x[a:b]
                if transposed:
                    blk_t = store[:, a * mp : b * mp] if keep else scratch[k][:, : (b - a) * mp]
                    im2col_t(xp[a:b], blk_t, kh, kw, sh, sw, ho, wo)
                    np.matmul(blk_t.T, wmat, out=out2[a * mp : b * mp])
                else:
                    blk = scratch[k][: (b - a) * mp]
                    im2col_rows(xp[a:b], blk, kh, kw, sh, sw, ho, wo)
                    np.matmul(blk, wmat, out=out2[a * mp : b * mp])

        parallel_chunks(work, n_pieces, with_index=True)
        self._cache = {"xp": xp, "n": n, "cols_all": store if keep else None,
                       "transposed": transposed}
        return out

    # -- backward ------------------------------------------------------------------------
    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill ``grads["W"]`` (and ``grads["b"]``); return ``dx`` of shape ``(N, H, W, C)``.

        The patches are recomputed piece by piece (cheaper than keeping the whole
        im2col matrix: the GEMMs then read from cache).  Returns ``None`` when
        :attr:`input_grad_needed` is False.
        """
        if not self._cache:
            raise ModelError("conv2d: backward called before forward")
        xp: np.ndarray = self._cache["xp"]
        n: int = self._cache["n"]
        stored: np.ndarray | None = self._cache["cols_all"]
        dt = xp.dtype
        dout = np.ascontiguousarray(dout, dtype=dt)
        h, w, c = self.input_shape
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ho, wo = self._out_hw
        (pt, pb), (pl, pr) = self._pads
        f = self.filters
        k_ = kh * kw * c
        kk = k_ + (1 if self.use_bias else 0)
        mp = ho * wo
        if dout.shape != (n, ho, wo, f):
            raise ModelError(
                f"conv2d: backward expects a gradient of shape {(n, ho, wo, f)}, got {dout.shape}"
            )
        d2 = dout.reshape(n * mp, f)
        need_dx = self.input_grad_needed
        full = need_dx and self._full_corr
        padded = bool(pt or pb or pl or pr)
        dx = np.empty((n, h, w, c), dtype=dt) if need_dx else None
        width = max(kk, kh * kw * f) if full else kk
        ps = self._piece_size(n, width, dt.itemsize)
        n_pieces = -(-n // ps)
        chunks = plan_chunks(n_pieces)
        nk = len(chunks)
        transposed: bool = self._cache["transposed"]
        if stored is None:
            cols = [
                self._scratch("cols_t", k, (kk, ps * mp), dt)
                if transposed
                else self._scratch("cols", k, (ps * mp, kk), dt, bias_col=self.use_bias)
                for k in range(nk)
            ]
            if transposed and self.use_bias:
                for buf in cols:
                    buf[-1] = 1.0
        wk = self.params["W"].astype(dt, copy=False)
        if full:
            # dx = correlation of dout, padded by (k - 1 - pad), with the flipped kernel
            # transposed to (kh, kw, F, C): im2col + GEMM, no scatter-add.
            qt, ql = kh - 1 - pt, kw - 1 - pl
            wflip = np.ascontiguousarray(wk[::-1, ::-1].transpose(0, 1, 3, 2)).reshape(
                kh * kw * f, c
            )
            dpads = [self._scratch("dpad", k, (ps, h + kh - 1, w + kw - 1, f), dt, zero=True)
                     for k in range(nk)]
            dcols = [self._scratch("dcols", k, (ps * h * w, kh * kw * f), dt)
                     for k in range(nk)]
        elif need_dx:
            # one GEMM per kernel offset, accumulated with sliced adds (any stride)
            wts = [np.ascontiguousarray(wk[i, j].T) for i in range(kh) for j in range(kw)]
            hp, wp = h + pt + pb, w + pl + pr
            dxps = [self._scratch("dxp", k, (ps, hp, wp, c), dt) for k in range(nk)]
            tmps = [self._scratch("tmp", k, (ps * mp, c), dt) for k in range(nk)]

        def work(k: int, lo: int, hi: int) -> list[np.ndarray]:
            parts = []
            for a in range(lo * ps, min(hi * ps, n), ps):
                b = min(a + ps, n)
                m = b - a
                dpiece = d2[a * mp : b * mp]
                if transposed:
                    if stored is not None:
                        blk_t = stored[:, a * mp : b * mp]
                    else:
                        blk_t = cols[k][:, : m * mp]
                        im2col_t(xp[a:b], blk_t, kh, kw, sh, sw, ho, wo)
                    parts.append(blk_t @ dpiece)
                else:
                    blk = cols[k][: m * mp]
                    im2col_rows(xp[a:b], blk, kh, kw, sh, sw, ho, wo)
                    parts.append(blk.T @ dpiece)
                if full:
                    assert dx is not None
                    dp = dpads[k][:m]
                    dp[:, qt : qt + ho, ql : ql + wo, :] = dout[a:b]
                    dblk = dcols[k][: m * h * w]
                    im2col_rows(dp, dblk, kh, kw, 1, 1, h, w)
                    np.matmul(dblk, wflip, out=dx[a:b].reshape(m * h * w, c))
                elif need_dx:
                    assert dx is not None
                    g = dxps[k][:m] if padded else dx[a:b]
                    g[...] = 0.0
                    t = tmps[k][: m * mp]
                    t4 = t.reshape(m, ho, wo, c)
                    for q, wt in enumerate(wts):
                        i, j = divmod(q, kw)
                        np.matmul(dpiece, wt, out=t)
                        g[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw,
                          :] += t4
                    if padded:
                        dx[a:b] = g[:, pt : pt + h, pl : pl + w, :]
            return parts

        # per-piece partial gradients, summed in piece order: identical results for
        # any number of workers.
        gw = sum_arrays([p for parts in parallel_chunks(work, n_pieces, with_index=True)
                         for p in parts])
        self.grads["W"][...] = gw[:k_].reshape(self.grads["W"].shape)
        if self.use_bias:
            self.grads["b"][...] = gw[k_]
        return dx
