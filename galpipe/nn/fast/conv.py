"""Fast 2-D convolution: cache-sized pieces, scratch buffers, threads and fused kernels.

:class:`ConvStep` runs a :class:`~galpipe.nn.conv.Conv2D` layer (whose parameters
and gradients it reads and writes) -- alone, or fused with the ``relu`` (and 2x2
``maxpool2d``) after it -- computing what the reference layers compute.  It is
what :meth:`Conv2D.fast_step <galpipe.nn.conv.Conv2D.fast_step>` returns, so
models run it by default.

Implementation notes (what makes it fast on a CPU with NumPy only):

* The batch is processed in *pieces* of a few samples (about
  :data:`PIECE_BYTES` of patches): ``im2col`` writes a piece's patches into a
  reused scratch matrix that is still in cache when the GEMM reads it.  Pieces
  are spread over worker threads (:func:`galpipe.nn.fast.threads.parallel_chunks`),
  each running its own single-threaded GEMM.
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
* Fused with ``relu`` and a 2x2 max-pool, the patch rows of a piece are grouped by
  window position (``(dy, dx, n, y2, x2)``) so that pooling works on four contiguous
  blocks while the convolution output is still in cache; the full-resolution
  activation is never written to memory.
* Parameter gradients are summed over pieces in a fixed order, so results do
  not depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from galpipe.errors import ModelError
from galpipe.nn.base import Layer
from galpipe.nn.conv import Conv2D
from galpipe.nn.fast.threads import (
    BufferCache,
    chunk_bounds,
    parallel_chunks,
    plan_chunks,
    sum_arrays,
)

if TYPE_CHECKING:
    from galpipe.nn.fast.s2d import SpaceToDepthStep
    from galpipe.nn.fast.winograd import WinogradStep

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



def checked_input(conv: Conv2D, x: np.ndarray) -> np.ndarray:
    """``x`` ``(N, H, W, C)`` as a C-contiguous array, after checking it fits ``conv``'s input shape.

    Raises
    ------
    ModelError
        ``x`` is not 4-d or its per-sample shape is not ``conv.input_shape``.
    """
    if x.ndim != 4 or x.shape[1:] != conv.input_shape:
        raise ModelError(f"conv2d: expects input of per-sample shape {conv.input_shape}, got {x.shape[1:]}")
    return np.ascontiguousarray(x)

class ConvStep:
    """Fast execution of a built :class:`~galpipe.nn.conv.Conv2D`, optionally fused.

    Parameters
    ----------
    conv : Conv2D
        The (built) layer; its ``params`` are read and its ``grads`` written.
    post : {None, "relu", "relu_pool"}
        Also apply a ReLU (``"relu"``), or a ReLU and a 2x2 stride-2 max-pool
        (``"relu_pool"``; the output size must be even), piece by piece.

    Notes
    -----
    Input ``(N, H, W, C)``; output ``(N, Ho, Wo, F)`` (``(N, Ho/2, Wo/2, F)`` with
    the pool).  Outputs and input gradients are exactly those of the separate layers
    (same max-pool tie rule as :class:`~galpipe.nn.fast.pool.MaxPoolStep`); parameter
    gradients equal the reference ones up to the order of the float sums.
    """

    def __init__(self, conv: Conv2D, post: str | None = None) -> None:
        if post not in (None, "relu", "relu_pool"):
            raise ModelError(f"conv2d: unknown fused post-op {post!r}")
        self.conv = conv
        self.post = post
        self.kind = {None: "conv", "relu": "conv_relu", "relu_pool": "conv_relu_pool"}[post]
        self.size = {None: 1, "relu": 2, "relu_pool": 3}[post]
        self._bufs = BufferCache()
        self._cache: dict[str, Any] = {}
        (pt, pb), (pl, pr) = conv._pads
        kh, kw = conv.kernel_size
        # A stride-1 kernel padded by at most k - 1 on every side gets its input
        # gradient as a correlation (im2col + GEMM) instead of a scatter-add.
        self._full_corr = conv.stride == (1, 1) and max(pt, pb) < kh and max(pl, pr) < kw

    @classmethod
    def fuse(cls, conv: Conv2D, following: Sequence[Layer]
             ) -> ConvStep | WinogradStep | SpaceToDepthStep:
        """The step for ``conv`` and what it can fuse of the ``following`` layers:
        a ``fusion_tag`` of ``"relu"``, then possibly ``"maxpool2x2"``.

        3x3 stride-1 'same' convolutions with enough input channels
        (:func:`galpipe.nn.fast.winograd.eligible`) run as Winograd F(2x2, 3x3)
        (:class:`~galpipe.nn.fast.winograd.WinogradStep`); few-channel ones fused with
        ``relu`` + 2x2 max-pool as one GEMM per pooling window
        (:class:`~galpipe.nn.fast.s2d.SpaceToDepthStep`); the others as im2col.
        """
        from galpipe.nn.fast import s2d, winograd

        make = winograd.WinogradStep if winograd.eligible(conv) else cls
        tags = [layer.fusion_tag for layer in following[:2]]
        if tags[:1] != ["relu"]:
            return make(conv)
        ho, wo = conv._out_hw
        if tags[1:] == ["maxpool2x2"] and ho % 2 == 0 and wo % 2 == 0:
            if s2d.eligible(conv, "relu_pool"):
                return s2d.SpaceToDepthStep(conv, "relu_pool")
            return make(conv, "relu_pool")
        return make(conv, "relu")

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Convolve ``x`` ``(N, H, W, C)`` (then ReLU / pool as fused)."""
        return self._forward(x, training, self.post)

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill the layer's ``grads``; return ``dx`` ``(N, H, W, C)`` (None when the
        layer's ``input_grad_needed`` is False).  ``dout`` is the gradient w.r.t. the
        step's output."""
        return self._backward(dout)

    def _weight_matrix(self, dt: np.dtype) -> np.ndarray:
        """``(K [+1], F)`` GEMM operand; the bias is the last row when ``use_bias``."""
        conv = self.conv
        w = conv.params["W"].reshape(-1, conv.filters)
        if conv.use_bias:
            w = np.concatenate([w, conv.params["b"][None, :]], axis=0)
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
        conv = self.conv
        ho, wo = conv._out_hw
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

    def _patches(self, xp: np.ndarray, a: int, b: int, dest: np.ndarray, transposed: bool,
                 blocked: bool, sources: list[list[np.ndarray]] | None) -> None:
        """im2col of samples ``a:b`` of the padded input ``xp`` into ``dest``.

        ``dest`` is ``(m*Ho*Wo, K [+1])`` (or its transpose when ``transposed``).
        With ``blocked`` the rows are ordered ``(dy, dx, n, y2, x2)`` -- output pixel
        ``(2*y2 + dy, 2*x2 + dx)`` -- so that the four positions of every 2x2 pooling
        window lie in four contiguous blocks.  ``sources`` are the precomputed
        :func:`row_sources` views (rows layout only).
        """
        conv = self.conv
        if not transposed:
            assert sources is not None
            fill_rows(sources, a, b, dest)
            return
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        ho, wo = conv._out_hw
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
        conv = self.conv
        if transposed:
            return None
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        ho, wo = conv._out_hw
        return row_sources(xp, kh, kw, sh, sw, ho, wo, blocked)

    def _forward(self, x: np.ndarray, training: bool, post: str | None) -> np.ndarray:
        """Convolve ``x`` ``(N, H, W, C)`` piece by piece over worker threads (then ReLU,
        or ReLU and 2x2 max-pool, per ``post``); returns ``(N, Ho, Wo, F)`` (halved
        with the pool)."""
        conv = self.conv
        conv._ensure_built(x)
        x = checked_input(conv, x)
        ctx = self._forward_context(x, training, post)

        def work(k: int, lo: int, hi: int) -> None:
            for a, b in ctx.pieces[lo:hi]:
                self._forward_piece(ctx, k, a, b, x)

        parallel_chunks(work, len(ctx.pieces), with_index=True)
        self._cache = {
            "xp": ctx.xp, "n": x.shape[0], "cols_all": ctx.store, "transposed": ctx.transposed,
            "post": post, "out": ctx.out if post else None, "winners": ctx.winners,
            "pieces": ctx.pieces,
        }
        return ctx.out

    def _forward_context(self, x: np.ndarray, training: bool, post: str | None
                         ) -> SimpleNamespace:
        """Output, padded input, pieces and per-worker scratch buffers of one forward pass."""
        conv = self.conv
        dt, n = x.dtype, x.shape[0]
        h, w, c = conv.input_shape
        kw = conv.kernel_size[1]
        ho, wo = conv._out_hw
        (pt, pb), (pl, pr) = conv._pads
        kk = conv.kernel_size[0] * kw * c + (1 if conv.use_bias else 0)
        f, mp = conv.filters, ho * wo
        ctx = SimpleNamespace(post=post, pool=post == "relu_pool", wmat=self._weight_matrix(dt),
                              padded=bool(pt or pb or pl or pr), store=None, winners=None)
        ctx.xp = (self._bufs.get("xp", (n, h + pt + pb, w + pl + pr, c), dt, zero=True)
                  if ctx.padded else x)
        if ctx.pool and (ho % 2 or wo % 2):
            raise ModelError("conv2d: fused 2x2 max-pool needs an even output size")
        ctx.out = np.empty((n, ho // 2, wo // 2, f) if ctx.pool else (n, ho, wo, f), dtype=dt)
        ctx.pieces, ps = self._pieces(n, kk, dt.itemsize)
        nk = len(plan_chunks(len(ctx.pieces)))
        ctx.transposed = kw * c < SMALL_PATCH_BELOW
        if training and ctx.transposed and KEEP_SMALL_PATCHES:
            ctx.store = self._scratch("cols_all", 0, (kk, n * mp), dt)
        ctx.scratch = [
            self._scratch("cols_t", k, (kk, ps * mp), dt)
            if ctx.transposed
            else self._scratch("cols", k, (ps * mp, kk), dt, bias_col=conv.use_bias)
            for k in range(nk)
        ]
        if ctx.transposed and conv.use_bias:
            for buf in [*ctx.scratch, *([] if ctx.store is None else [ctx.store])]:
                # ones row for the bias: always written (one row), since a fresh
                # np.empty buffer may hold a stray 1.0 where a "set once" check looks
                buf[-1] = 1.0
        ctx.sources = self._sources(ctx.xp, ctx.transposed, ctx.pool)
        if ctx.pool:
            ctx.ys = [self._scratch("y", k, (ps * mp, f), dt) for k in range(nk)]
            if training:
                ctx.winners = tuple(np.empty(ctx.out.shape, dtype=bool) for _ in range(3))
        return ctx

    def _forward_piece(self, ctx: SimpleNamespace, k: int, a: int, b: int, x: np.ndarray
                       ) -> None:
        """Pad, im2col, GEMM (and ReLU / pool) for samples ``a:b``, on worker ``k``."""
        conv = self.conv
        h, w, _ = conv.input_shape
        ho, wo = conv._out_hw
        (pt, _), (pl, _) = conv._pads
        f, m, mp = conv.filters, b - a, ho * wo
        if ctx.padded:
            ctx.xp[a:b, pt : pt + h, pl : pl + w, :] = x[a:b]
        y = ctx.ys[k][: m * mp] if ctx.pool else ctx.out.reshape(-1, f)[a * mp : b * mp]
        if ctx.transposed:
            blk_t = (ctx.store[:, a * mp : b * mp] if ctx.store is not None
                     else ctx.scratch[k][:, : m * mp])
            self._patches(ctx.xp, a, b, blk_t, True, ctx.pool, None)
            np.matmul(blk_t.T, ctx.wmat, out=y)
        else:
            blk = ctx.scratch[k][: m * mp]
            self._patches(ctx.xp, a, b, blk, False, ctx.pool, ctx.sources)
            np.matmul(blk, ctx.wmat, out=y)
        if ctx.pool:
            _pool_blocks_relu(y.reshape(4, m, ho // 2, wo // 2, f), ctx.out[a:b],
                              None if ctx.winners is None else [v[a:b] for v in ctx.winners])
        elif ctx.post == "relu":
            np.maximum(y, 0, out=y)

    def _backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Backward pass of the last :meth:`_forward`, piece by piece over worker threads.

        Per piece: the gradient w.r.t. the convolution output (through the fused ReLU
        and pool), the patches (recomputed, or kept from the forward pass), their
        contribution to ``dW``/``db`` and the input gradient.  Partial weight
        gradients are summed in piece order: identical for any number of workers.
        """
        conv = self.conv
        if not self._cache:
            raise ModelError("conv2d: backward called before forward")
        cache = self._cache
        xp: np.ndarray = cache["xp"]
        dout = np.ascontiguousarray(dout, dtype=xp.dtype)
        ho, wo = conv._out_hw
        fused_out = cache["out"]
        expected = fused_out.shape if fused_out is not None else (cache["n"], ho, wo, conv.filters)
        if dout.shape != expected:
            raise ModelError(
                f"conv2d: backward expects a gradient of shape {expected}, got {dout.shape}"
            )
        if cache["post"] == "relu_pool" and cache["winners"] is None:
            # The forward ran in inference mode, which does not record the pooling
            # winners: recompute the forward pass (same input, same values) with them.
            (pt, _), (pl, _) = conv._pads
            h, w, _ = conv.input_shape
            self._forward(np.array(xp[:, pt : pt + h, pl : pl + w, :]), True, cache["post"])
            return self._backward(dout)
        ctx = self._backward_context()
        dx = np.empty((cache["n"], *conv.input_shape), dtype=xp.dtype) if ctx.need_dx else None

        def work(k: int, lo: int, hi: int) -> list[np.ndarray]:
            parts = []
            for a, b in ctx.pieces[lo:hi]:
                dpiece = self._piece_output_grad(ctx, k, a, b, dout)
                parts.append(self._piece_weight_grad(ctx, k, a, b, dpiece))
                if dx is not None:
                    self._piece_input_grad(ctx, k, a, b, dpiece, dx)
            return parts

        gw = sum_arrays([p for parts in parallel_chunks(work, len(ctx.pieces), with_index=True)
                         for p in parts])
        k_ = gw.shape[0] - (1 if conv.use_bias else 0)
        conv.grads["W"][...] = gw[:k_].reshape(conv.grads["W"].shape)
        if conv.use_bias:
            conv.grads["b"][...] = gw[k_]
        return dx

    def _backward_context(self) -> SimpleNamespace:
        """Pieces and per-worker scratch buffers of one backward pass.

        Fields: ``pieces`` (sample ranges), ``need_dx``, ``full`` (input gradient as a
        correlation), ``cols``/``sources`` (patch scratch), ``dys`` (output-gradient
        scratch when fused), and the buffers of :meth:`_piece_input_grad`.
        """
        conv, cache = self.conv, self._cache
        xp: np.ndarray = cache["xp"]
        dt, n = xp.dtype, cache["n"]
        h, w, c = conv.input_shape
        kh, kw = conv.kernel_size
        ho, wo = conv._out_hw
        f, mp = conv.filters, ho * wo
        kk = kh * kw * c + (1 if conv.use_bias else 0)
        ctx = SimpleNamespace(need_dx=conv.input_grad_needed, stored=cache["cols_all"],
                              pool=cache["post"] == "relu_pool")
        ctx.full = ctx.need_dx and self._full_corr
        if ctx.stored is not None:
            # kept patches are laid out piece by piece: reuse the forward pieces
            ctx.pieces = cache["pieces"]
            ps = max(b - a for a, b in ctx.pieces)
        else:
            # the backward pass holds more per sample than the forward's patches: the
            # output gradient and, for the correlation, the patches of the padded output
            # gradient (kh*kw*F wide, at input resolution); size its pieces by all of it
            width = kk + f + (kh * kw * f * (h * w) // mp if ctx.full else 0)
            ctx.pieces, ps = self._pieces(n, width, dt.itemsize, BWD_PIECE_BYTES)
        nk = len(plan_chunks(len(ctx.pieces)))
        transposed: bool = cache["transposed"]
        if ctx.stored is None:
            ctx.cols = [
                self._scratch("cols_t", k, (kk, ps * mp), dt)
                if transposed
                else self._scratch("cols", k, (ps * mp, kk), dt, bias_col=conv.use_bias)
                for k in range(nk)
            ]
            if transposed and conv.use_bias:
                for buf in ctx.cols:
                    buf[-1] = 1.0
        ctx.sources = self._sources(xp, transposed, ctx.pool) if ctx.stored is None else None
        if cache["post"]:
            ctx.dys = [self._scratch("dy", k, (ps * mp, f), dt) for k in range(nk)]
        if ctx.pool and ctx.need_dx and not ctx.full:
            ctx.dnat = [self._scratch("dnat", k, (ps * mp, f), dt) for k in range(nk)]
        self._input_grad_buffers(ctx, dt, ps, nk)
        return ctx

    def _input_grad_buffers(self, ctx: SimpleNamespace, dt: np.dtype, ps: int, nk: int) -> None:
        """Kernel operands and per-worker scratch of :meth:`_piece_input_grad` (pieces of at
        most ``ps`` samples, ``nk`` workers)."""
        conv = self.conv
        h, w, c = conv.input_shape
        kh, kw = conv.kernel_size
        ho, wo = conv._out_hw
        f = conv.filters
        wk = conv.params["W"].astype(dt, copy=False)
        if ctx.full:
            # dx = correlation of dout, padded by (k - 1 - pad), with the flipped kernel
            # transposed to (kh, kw, F, C): im2col + GEMM, no scatter-add.
            ctx.wflip = np.ascontiguousarray(wk[::-1, ::-1].transpose(0, 1, 3, 2)).reshape(
                kh * kw * f, c
            )
            ctx.dpads = [self._scratch("dpad", k, (ps, h + kh - 1, w + kw - 1, f), dt, zero=True)
                         for k in range(nk)]
            ctx.dcols = [self._scratch("dcols", k, (ps * h * w, kh * kw * f), dt)
                         for k in range(nk)]
            ctx.dsources = [row_sources(dp, kh, kw, 1, 1, h, w, False) for dp in ctx.dpads]
        elif ctx.need_dx:
            # one GEMM per kernel offset, accumulated with sliced adds (any stride)
            (pt, pb), (pl, pr) = conv._pads
            ctx.wts = [np.ascontiguousarray(wk[i, j].T) for i in range(kh) for j in range(kw)]
            ctx.dxps = [self._scratch("dxp", k, (ps, h + pt + pb, w + pl + pr, c), dt)
                        for k in range(nk)]
            ctx.tmps = [self._scratch("tmp", k, (ps * ho * wo, c), dt) for k in range(nk)]

    def _piece_output_grad(self, ctx: SimpleNamespace, k: int, a: int, b: int,
                           dout: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. the convolution output of samples ``a:b``, ``(m*Ho*Wo, F)``
        (blocked row order with the fused pool, like the patches)."""
        conv, cache = self.conv, self._cache
        ho, wo = conv._out_hw
        f, m, mp = conv.filters, b - a, ho * wo
        fused_out, winners = cache["out"], cache["winners"]
        if ctx.pool:
            dpiece = ctx.dys[k][: m * mp]
            _unpool_blocks_relu(dout[a:b], fused_out[a:b], [v[a:b] for v in winners],
                                dpiece.reshape(4, m, ho // 2, wo // 2, f))
            return dpiece
        d2 = dout.reshape(-1, f)
        if cache["post"] == "relu":
            dpiece = ctx.dys[k][: m * mp]
            np.multiply(d2[a * mp : b * mp], fused_out[a:b].reshape(-1, f) > 0, out=dpiece)
            return dpiece
        return d2[a * mp : b * mp]

    def _piece_weight_grad(self, ctx: SimpleNamespace, k: int, a: int, b: int,
                           dpiece: np.ndarray) -> np.ndarray:
        """Contribution ``patches.T @ dpiece`` ``(K [+1], F)`` of samples ``a:b`` to
        ``dW`` (and ``db``, the last row)."""
        mp = self.conv._out_hw[0] * self.conv._out_hw[1]
        m = b - a
        xp = self._cache["xp"]
        if self._cache["transposed"]:
            if ctx.stored is not None:
                blk_t = ctx.stored[:, a * mp : b * mp]
            else:
                blk_t = ctx.cols[k][:, : m * mp]
                self._patches(xp, a, b, blk_t, True, ctx.pool, None)
            # np.dot, not matmul: for this shape (K x long) @ (long x F)
            # matmul does not run concurrently on two threads (measured)
            return np.dot(blk_t, dpiece)
        blk = ctx.cols[k][: m * mp]
        self._patches(xp, a, b, blk, False, ctx.pool, ctx.sources)
        return blk.T @ dpiece

    def _piece_input_grad(self, ctx: SimpleNamespace, k: int, a: int, b: int,
                          dpiece: np.ndarray, dx: np.ndarray) -> None:
        """Write ``dx[a:b]`` ``(m, H, W, C)`` from the output gradient ``dpiece``."""
        conv = self.conv
        h, w, c = conv.input_shape
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        ho, wo = conv._out_hw
        (pt, pb), (pl, pr) = conv._pads
        f, m = conv.filters, b - a
        if ctx.full:
            inner = ctx.dpads[k][:m, kh - 1 - pt : kh - 1 - pt + ho, kw - 1 - pl : kw - 1 - pl + wo]
            if ctx.pool:
                _unblock(dpiece, inner)
            else:
                inner[...] = dpiece.reshape(m, ho, wo, f)
            dblk = ctx.dcols[k][: m * h * w]
            fill_rows(ctx.dsources[k], 0, m, dblk)
            np.matmul(dblk, ctx.wflip, out=dx[a:b].reshape(m * h * w, c))
            return
        if ctx.pool:
            nat = ctx.dnat[k][: m * ho * wo]
            _unblock(dpiece, nat.reshape(m, ho, wo, f))
            dpiece = nat
        padded = bool(pt or pb or pl or pr)
        g = ctx.dxps[k][:m] if padded else dx[a:b]
        g[...] = 0.0
        t = ctx.tmps[k][: m * ho * wo]
        t4 = t.reshape(m, ho, wo, c)
        for q, wt in enumerate(ctx.wts):
            i, j = divmod(q, kw)
            np.matmul(dpiece, wt, out=t)
            g[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] += t4
        if padded:
            dx[a:b] = g[:, pt : pt + h, pl : pl + w, :]


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
