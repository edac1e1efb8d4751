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
  The backward pieces are sized by everything held per sample (patches, output
  gradient, input-gradient patches: :data:`BWD_PIECE_BYTES`); sized for the forward
  patches alone, two workers' working sets overflowed the caches and the 2-thread
  backward of the 16->32 conv of the benchmark network was 35% slower.
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
    chunk_bounds,
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
#: Target size in bytes of the per-piece working set of the backward pass (patches,
#: output gradient and the input-gradient patches together).
BWD_PIECE_BYTES = 3 << 20
#: At most this many samples per piece.
MAX_PIECE = 16
#: Few-channel convolutions (a kernel row spans fewer than this many values,
#: ``kw * C``; e.g. the first layer on RGB input) build their patches transposed
#: (:func:`im2col_t`, long copy runs) and, in training, keep them from the forward
#: pass for the backward pass instead of recomputing them.
SMALL_PATCH_BELOW = 16
#: Keep the (transposed) patches of few-channel convolutions for the backward pass.
KEEP_SMALL_PATCHES = True


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


def row_sources(
    xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int, blocked: bool
) -> list[list[np.ndarray]]:
    """Strided source views for :func:`fill_rows`, built once per batch.

    ``sources[k][i]`` is the ``(n, ho', wo', kw*C)`` view of kernel row ``i`` for
    block ``k`` (one block, or four with ``blocked``: output pixels
    ``(2*y2 + dy, 2*x2 + dx)``, ``k = 2*dy + dx``, with ``ho' = ho/2``, ``wo' = wo/2``).
    Slicing these views per piece is cheap; building them (``as_strided``) is not.
    """
    if not blocked:
        return [[_rows_view(xp, ho, wo, sh, sw, kw, i) for i in range(kh)]]
    return [
        [_rows_view(xp[:, dy * sh :, dx * sw :], ho // 2, wo // 2, 2 * sh, 2 * sw, kw, i)
         for i in range(kh)]
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))
    ]


def fill_rows(sources: list[list[np.ndarray]], a: int, b: int, cols: np.ndarray) -> None:
    """im2col of samples ``a:b`` from :func:`row_sources` views into ``cols`` (rows layout)."""
    m = b - a
    n_blocks = len(sources)
    q = cols.shape[0] // n_blocks
    for k, srcs in enumerate(sources):
        _, ho_, wo_, run = srcs[0].shape
        dest = cols[k * q : (k + 1) * q, : len(srcs) * run].reshape(m, ho_, wo_, len(srcs), run)
        for i, src in enumerate(srcs):
            dest[:, :, :, i, :] = src[a:b]


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

    def _pieces(self, n: int, width: int, itemsize: int, budget: int | None = None
                ) -> tuple[list[tuple[int, int]], int]:
        """Split the batch into pieces of about ``budget`` bytes (default :data:`PIECE_BYTES`)
        at ``width`` values per output pixel.

        Returns ``(bounds, size)``: ``(a, b)`` sample ranges (sizes differ by at most
        one; an even number of pieces, so that two workers get equal shares) and the
        largest piece size.  Depends only on ``n`` and the layer, never on the number
        of workers, so results are identical for any worker count.
        """
        ho, wo = self._out_hw
        per = max(ho * wo * width * itemsize, 1)
        target = int(min(max((PIECE_BYTES if budget is None else budget) // per, 1), MAX_PIECE, n))
        count = -(-n // target)
        if count > 1 and count % 2:
            count = min(count + 1, n)
        bounds = chunk_bounds(n, count)
        return bounds, max(b - a for a, b in bounds)

    def _scratch(self, tag: str, k: int, shape: tuple[int, ...], dt: np.dtype, *,
                 zero: bool = False, bias_col: bool = False) -> np.ndarray:
        buf = self._bufs.get(f"{tag}{k}", shape, dt, zero=zero or bias_col)
        if bias_col:
            buf[:, -1] = 1.0  # the bias column; im2col never writes it
        return buf

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Convolve ``x`` of shape ``(N, H, W, C)``; returns ``(N, Ho, Wo, F)``.

        The batch is processed in pieces of a few samples whose im2col matrix stays
        in cache (im2col, then one GEMM per piece), pieces spread over the workers.
        """
        return self._forward(x, training, None)

    def forward_fused(self, x: np.ndarray, training: bool, post: str) -> np.ndarray:
        """Convolution followed by ``relu`` (``post="relu"``) or by ``relu`` and a 2x2
        stride-2 max-pool (``post="relu_pool"``), applied piece by piece while the
        convolution output is still in cache.

        Outputs and input gradients are exactly those of the separate layers
        (:class:`~galpipe.nn.activations.ReLU`, :class:`~galpipe.nn.pooling.MaxPool2D`,
        same tie rule); parameter gradients equal theirs up to the order of the float
        sums (with the pool, the patch rows are grouped by window position so that
        pooling works on contiguous blocks).  The full-resolution activation is
        never written to memory.  Used by :class:`~galpipe.nn.model.Sequential`;
        pair with :meth:`backward_fused`.
        """
        if post not in ("relu", "relu_pool"):
            raise ModelError(f"conv2d: unknown fused post-op {post!r}")
        return self._forward(x, training, post)

    def _patches(self, xp: np.ndarray, a: int, b: int, dest: np.ndarray, transposed: bool,
                 blocked: bool, sources: list[list[np.ndarray]] | None) -> None:
        """im2col of samples ``a:b`` of the padded input ``xp`` into ``dest``.

        ``dest`` is ``(m*Ho*Wo, K [+1])`` (or its transpose when ``transposed``).
        With ``blocked`` the rows are ordered ``(dy, dx, n, y2, x2)`` -- output pixel
        ``(2*y2 + dy, 2*x2 + dx)`` -- so that the four positions of every 2x2 pooling
        window lie in four contiguous blocks.  ``sources`` are the precomputed
        :func:`row_sources` views (rows layout only).
        """
        if not transposed:
            assert sources is not None
            fill_rows(sources, a, b, dest)
            return
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ho, wo = self._out_hw
        piece = xp[a:b]
        if not blocked:
            im2col_t(piece, dest, kh, kw, sh, sw, ho, wo)
            return
        q = (b - a) * (ho // 2) * (wo // 2)
        for k in range(4):
            dy, dx = divmod(k, 2)
            im2col_t(piece[:, dy * sh :, dx * sw :], dest[:, k * q : (k + 1) * q], kh, kw,
                     2 * sh, 2 * sw, ho // 2, wo // 2)

    def _sources(self, xp: np.ndarray, transposed: bool, blocked: bool
                 ) -> list[list[np.ndarray]] | None:
        if transposed:
            return None
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ho, wo = self._out_hw
        return row_sources(xp, kh, kw, sh, sw, ho, wo, blocked)

    def _forward(self, x: np.ndarray, training: bool, post: str | None) -> np.ndarray:
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
        kw = self.kernel_size[1]
        ho, wo = self._out_hw
        (pt, pb), (pl, pr) = self._pads
        kk = self.kernel_size[0] * kw * c + (1 if self.use_bias else 0)
        f = self.filters
        mp = ho * wo
        wmat = self._weight_matrix(dt)
        padded = bool(pt or pb or pl or pr)
        xp = (
            self._bufs.get("xp", (n, h + pt + pb, w + pl + pr, c), dt, zero=True)
            if padded
            else x
        )
        pool = post == "relu_pool"
        if pool and (ho % 2 or wo % 2):
            raise ModelError("conv2d: fused 2x2 max-pool needs an even output size")
        out = np.empty((n, ho // 2, wo // 2, f) if pool else (n, ho, wo, f), dtype=dt)
        out2 = out.reshape(-1, f)
        pieces, ps = self._pieces(n, kk, dt.itemsize)
        nk = len(plan_chunks(len(pieces)))
        transposed = kw * c < SMALL_PATCH_BELOW
        keep = training and transposed and KEEP_SMALL_PATCHES
        if keep:
            store = self._scratch("cols_all", 0, (kk, n * mp), dt)
        scratch = [
            self._scratch("cols_t", k, (kk, ps * mp), dt)
            if transposed
            else self._scratch("cols", k, (ps * mp, kk), dt, bias_col=self.use_bias)
            for k in range(nk)
        ]
        if transposed and self.use_bias:
            for buf in [*scratch, *([store] if keep else [])]:
                # ones row for the bias: always written (one row), since a fresh
                # np.empty buffer may hold a stray 1.0 where a "set once" check looks
                buf[-1] = 1.0
        sources = self._sources(xp, transposed, pool)
        winners = None
        if pool:
            ys = [self._scratch("y", k, (ps * mp, f), dt) for k in range(nk)]
            if training:
                winners = tuple(np.empty(out.shape, dtype=bool) for _ in range(3))

        def work(k: int, lo: int, hi: int) -> None:
            for a, b in pieces[lo:hi]:
                m = b - a
                if padded:
                    xp[a:b, pt : pt + h, pl : pl + w, :] = x[a:b]
                y = ys[k][: m * mp] if pool else out2[a * mp : b * mp]
                if transposed:
                    blk_t = store[:, a * mp : b * mp] if keep else scratch[k][:, : m * mp]
                    self._patches(xp, a, b, blk_t, True, pool, None)
                    np.matmul(blk_t.T, wmat, out=y)
                else:
                    blk = scratch[k][: m * mp]
                    self._patches(xp, a, b, blk, False, pool, sources)
                    np.matmul(blk, wmat, out=y)
                if pool:
                    _pool_blocks_relu(y.reshape(4, m, ho // 2, wo // 2, f), out[a:b],
                                      None if winners is None else [v[a:b] for v in winners])
                elif post == "relu":
                    np.maximum(y, 0, out=y)

        parallel_chunks(work, len(pieces), with_index=True)
        self._cache = {
            "xp": xp, "n": n, "cols_all": store if keep else None, "transposed": transposed,
            "post": post, "out": out if post else None, "winners": winners,
            "pieces": pieces,
        }
        return out

    # -- backward ------------------------------------------------------------------------
    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill ``grads["W"]`` (and ``grads["b"]``); return ``dx`` of shape ``(N, H, W, C)``.

        The patches are recomputed piece by piece (cheaper than keeping the whole
        im2col matrix: the GEMMs then read from cache).  Returns ``None`` when
        :attr:`input_grad_needed` is False.
        """
        if self._cache.get("post"):
            raise ModelError("conv2d: the last forward was fused; call backward_fused")
        return self._backward(dout)

    def backward_fused(self, dout: np.ndarray) -> np.ndarray | None:
        """Backward pass of :meth:`forward_fused`: ``dout`` is the gradient w.r.t. the
        fused output (pooled, after ReLU)."""
        if not self._cache.get("post"):
            raise ModelError("conv2d: backward_fused called without forward_fused")
        return self._backward(dout)

    def _backward(self, dout: np.ndarray) -> np.ndarray | None:
        if not self._cache:
            raise ModelError("conv2d: backward called before forward")
        xp: np.ndarray = self._cache["xp"]
        n: int = self._cache["n"]
        stored: np.ndarray | None = self._cache["cols_all"]
        post: str | None = self._cache["post"]
        fused_out: np.ndarray | None = self._cache["out"]
        winners: tuple[np.ndarray, ...] | None = self._cache["winners"]
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
        expected = fused_out.shape if fused_out is not None else (n, ho, wo, f)
        if dout.shape != expected:
            raise ModelError(
                f"conv2d: backward expects a gradient of shape {expected}, got {dout.shape}"
            )
        pool = post == "relu_pool"
        if pool and winners is None:
            # The forward ran in inference mode, which does not record the pooling
            # winners: recompute the forward pass (same input, same values) with them.
            self._forward(np.array(xp[:, pt : pt + h, pl : pl + w, :]), True, post)
            return self._backward(dout)
        need_dx = self.input_grad_needed
        full = need_dx and self._full_corr
        padded = bool(pt or pb or pl or pr)
        dx = np.empty((n, h, w, c), dtype=dt) if need_dx else None
        if stored is not None:
            # kept patches are laid out piece by piece: reuse the forward pieces
            pieces = self._cache["pieces"]
            ps = max(b - a for a, b in pieces)
        else:
            # the backward pass holds more per sample than the forward's patches: the
            # output gradient and, for the correlation, the patches of the padded output
            # gradient (kh*kw*F wide, at input resolution); size its pieces by all of it
            width = kk + f + (kh * kw * f * (h * w) // mp if full else 0)
            pieces, ps = self._pieces(n, width, dt.itemsize, BWD_PIECE_BYTES)
        nk = len(plan_chunks(len(pieces)))
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
        sources = self._sources(xp, transposed, pool) if stored is None else None
        if post:
            dys = [self._scratch("dy", k, (ps * mp, f), dt) for k in range(nk)]
        if pool and need_dx and not full:
            dnat = [self._scratch("dnat", k, (ps * mp, f), dt) for k in range(nk)]
        d2 = dout.reshape(-1, f)
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
            dsources = [row_sources(dp, kh, kw, 1, 1, h, w, False) for dp in dpads]
        elif need_dx:
            # one GEMM per kernel offset, accumulated with sliced adds (any stride)
            wts = [np.ascontiguousarray(wk[i, j].T) for i in range(kh) for j in range(kw)]
            hp, wp = h + pt + pb, w + pl + pr
            dxps = [self._scratch("dxp", k, (ps, hp, wp, c), dt) for k in range(nk)]
            tmps = [self._scratch("tmp", k, (ps * mp, c), dt) for k in range(nk)]

        def work(k: int, lo: int, hi: int) -> list[np.ndarray]:
            parts = []
            for a, b in pieces[lo:hi]:
                m = b - a
                if pool:
                    assert fused_out is not None and winners is not None
                    dpiece = dys[k][: m * mp]  # blocked row order, like the patches
                    _unpool_blocks_relu(dout[a:b], fused_out[a:b], [v[a:b] for v in winners],
                                        dpiece.reshape(4, m, ho // 2, wo // 2, f))
                elif post == "relu":
                    assert fused_out is not None
                    dpiece = dys[k][: m * mp]
                    np.multiply(d2[a * mp : b * mp], fused_out[a:b].reshape(-1, f) > 0,
                                out=dpiece)
                else:
                    dpiece = d2[a * mp : b * mp]
                if transposed:
                    if stored is not None:
                        blk_t = stored[:, a * mp : b * mp]
                    else:
                        blk_t = cols[k][:, : m * mp]
                        self._patches(xp, a, b, blk_t, True, pool, None)
                    # np.dot, not matmul: for this shape (K x long) @ (long x F)
                    # matmul does not run concurrently on two threads (measured)
                    parts.append(np.dot(blk_t, dpiece))
                else:
                    blk = cols[k][: m * mp]
                    self._patches(xp, a, b, blk, False, pool, sources)
                    parts.append(blk.T @ dpiece)
                if not need_dx:
                    continue
                assert dx is not None
                if full:
                    dp = dpads[k][:m]
                    inner = dp[:, qt : qt + ho, ql : ql + wo, :]
                    if pool:
                        _unblock(dpiece, inner)
                    else:
                        inner[...] = dpiece.reshape(m, ho, wo, f)
                    dblk = dcols[k][: m * h * w]
                    fill_rows(dsources[k], 0, m, dblk)
                    np.matmul(dblk, wflip, out=dx[a:b].reshape(m * h * w, c))
                else:
                    if pool:
                        nat = dnat[k][: m * mp]
                        _unblock(dpiece, nat.reshape(m, ho, wo, f))
                        dpiece = nat
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
        gw = sum_arrays([p for parts in parallel_chunks(work, len(pieces), with_index=True)
                         for p in parts])
        self.grads["W"][...] = gw[:k_].reshape(self.grads["W"].shape)
        if self.use_bias:
            self.grads["b"][...] = gw[k_]
        return dx


def _pool_blocks_relu(
    y: np.ndarray, out: np.ndarray, winners: list[np.ndarray] | None
) -> None:
    """``out = relu(maxpool2x2(y))`` for ``y`` in blocked order ``(4, m, H/2, W/2, F)``.

    Block ``2*dy + dx`` holds window position ``(dy, dx)``, so every operation is on
    contiguous arrays.  The tie rule is that of :class:`~galpipe.nn.pooling.MaxPool2D`
    (per column the upper row wins ties, then the left column); ``winners``
    receives ``(lower_left, lower_right, right)``: the lower row strictly larger in
    the left/right column, the right column's maximum strictly larger.
    """
    left = np.maximum(y[0], y[2])
    right = np.maximum(y[1], y[3])
    np.maximum(left, right, out=out)
    if winners is not None:
        np.greater(y[2], y[0], out=winners[0])
        np.greater(y[3], y[1], out=winners[1])
        np.greater(right, left, out=winners[2])
    np.maximum(out, 0, out=out)


def _unpool_blocks_relu(
    d: np.ndarray, out: np.ndarray, winners: list[np.ndarray], dy: np.ndarray
) -> None:
    """Gradient of :func:`_pool_blocks_relu`: ``dy`` ``(4, m, H/2, W/2, F)`` (blocked)."""
    g = d * (out > 0)
    d_right = g * winners[2]
    d_left = g - d_right  # exact: g - g or g - 0
    np.multiply(d_left, winners[0], out=dy[2])
    np.subtract(d_left, dy[2], out=dy[0])
    np.multiply(d_right, winners[1], out=dy[3])
    np.subtract(d_right, dy[3], out=dy[1])


def _unblock(blocked: np.ndarray, natural: np.ndarray) -> None:
    """Copy rows in blocked order ``(dy, dx, m, y2, x2)`` into ``natural`` ``(m, H, W, F)``."""
    m, hh, ww, f = natural.shape
    b5 = blocked.reshape(4, m, hh // 2, ww // 2, f)
    for k in range(4):
        dy, dx = divmod(k, 2)
        natural[:, dy::2, dx::2, :] = b5[k]
