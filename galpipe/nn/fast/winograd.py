"""Winograd F(2x2, 3x3) convolution: 3x3, stride 1, padding 1 ('same'), channels-last.

:class:`WinogradStep` runs a :class:`~galpipe.nn.conv.Conv2D` (alone or fused with the
``relu`` and 2x2 ``maxpool2d`` after it) with Lavin & Gray's minimal filtering
algorithm F(2x2, 3x3): each 2x2 output tile is

    Y = A^T [ (G w G^T) . (B^T d B) ] A

for the 4x4 input tile ``d`` around it, where the element-wise product over the 16
"positions" ``p = (a, b)`` becomes, summed over input channels, 16 matrix products
``M_p = V_p @ U_p`` (``V_p`` ``(tiles, C)``, ``U_p`` ``(C, F)``): 16 * C * F multiplies
per tile instead of 36 * C * F (2.25x fewer).

Inference forwards (``training=False``) of layers whose height and width are multiples of
4 run F(4x4, 3x3) instead (:mod:`galpipe.nn.fast.winograd4`; :data:`USE_F4_INFERENCE`);
training forwards and both gradients are always F(2x2).

Backward pass (transposition principle, one transformed output gradient for both):

* the output gradient ``e`` of a tile (2x2) is transformed once, ``E = A e A^T`` (4x4);
* weight gradient: ``dW = G^T [ sum_tiles V_p^T E_p ] G`` (16 GEMMs reducing over the
  tiles of a piece; the 3x3 back-transform is done once, in float64, on the sum);
* input gradient: ``dd = B [ E_p @ U_p^T ] B^T`` for every tile, overlap-added (tiles
  overlap by 2 pixels) -- the same transforms with the kernel transposed, no
  scatter-add (the overlap is written as shifted slices);
* bias gradient: ``E_(1,1)`` summed (``A`` maps position (1, 1) to every output pixel).

Implementation notes (NumPy only):

* The batch is split into pieces of a few images (:data:`PIECE_BYTES`), spread over worker
  threads like :class:`~galpipe.nn.fast.conv.ConvStep`; all transforms of a piece
  happen in per-worker scratch buffers while they are in cache.
* Channels-last strided ufuncs with a short innermost run (``C`` values) are slow
  (NumPy calls its inner loop once per run).  The padded input is therefore stored
  with even and odd columns *de-interleaved* (``(m, Hp, 2, Wp/2, C)``): every tile
  column offset is then a plain slice with ``Wp/2 * C``-long runs, and the whole
  input transform is 8 ufunc calls over stacked arrays.
* Output tiles are exactly the 2x2 pooling windows, so the fused ``relu`` + max-pool
  works on the four output blocks as they come out of the output transform (the
  tie rule and winner masks of :func:`galpipe.nn.fast.conv._pool_blocks_relu`).
* In training the transformed input ``V`` of the whole batch is kept for the weight
  gradient (``4 * N * H * W * C`` floats; cheaper than recomputing it).
* Numerically the transforms only add and subtract (and halve, in ``G``): float32
  relative error ~2e-7 against a float64 direct convolution (measured, like im2col).
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.conv import Conv2D
from galpipe.nn.fast.conv import _pool_blocks_relu, _unpool_blocks_relu, checked_input
from galpipe.nn.fast.threads import BufferCache, batch_pieces, parallel_chunks, sum_arrays
from galpipe.nn.fast.winograd4 import PARTS, Winograd4Forward, eligible4

#: Target size in bytes of the 16 position products ``M`` of one piece
#: (``16 * tiles * F * itemsize``): a piece holds that many bytes' worth of images (at
#: least one; the last pieces may hold one fewer).  Measured (batch 64, 1 and 2 workers,
#: interleaved): 4 images (2 MiB) beat 2 and 8 for the 16->32 @ 32x32 layer, and 8 images
#: (2 MiB) beat 4 and 16 for the 32->64 @ 16x16 layer (inference 1.1x, backward 1.15-1.2x
#: faster than 4).
PIECE_BYTES = 2 << 20
#: Fixed images per piece instead of :data:`PIECE_BYTES` (None: by bytes; tests set it).
PIECE_IMAGES: int | None = None
#: Convolutions with fewer input channels than this run im2col (:class:`ConvStep`):
#: with few channels the 16 GEMMs have a tiny inner dimension and the transforms cost
#: more than they save (see :func:`eligible`).
MIN_CHANNELS = 16
#: Inference forwards (``training=False``) of layers that
#: :func:`galpipe.nn.fast.winograd4.eligible4` accepts (height and width divisible by 4) run
#: Winograd F(4x4, 3x3) (:class:`~galpipe.nn.fast.winograd4.Winograd4Forward`: 36 GEMMs of
#: a quarter of the tiles, 4x fewer multiplies than direct); training and gradients stay
#: F(2x2).  Set False to run F(2x2) everywhere.  Measured (benchmarks/bench_winograd4.py,
#: batch 64, fused relu_pool, one process, interleaved, medians of 21-25, three runs on a
#: shared 2-core machine at load average 1.8-4.5): 16->32 @ 32x32 1.23-1.28x faster at 1
#: thread, 1.25-1.32x at 2; 32->64 @ 16x16 1.26-1.27x at 1 thread, 1.28-1.30x at 2 (GEMMs
#: about 0.6x F(2x2)'s, transforms about equal).  Whole reference CNN inference (bench_nn's
#: network, batch 64): 1.10x at 1 thread, 1.18x at 2 (load average 4).
#: Float32 error against a float64 direct convolution (max |err| / max |y|): F(4x4) 2e-6 to
#: 5e-6 against F(2x2) 2e-7 to 3e-7 (RMS 3e-7 to 1.3e-6 against 1e-7 to 2e-7).
USE_F4_INFERENCE = True

#: ``G`` of F(2x2, 3x3) (kernel transform, 4x3).
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
#: Signs left out of the transformed output gradient by :func:`_grad_transform`
#: (position ``4a + b``): ``-1`` where exactly one of ``a``, ``b`` is 3.
SIGNS = np.outer([1.0, 1.0, 1.0, -1.0], [1.0, 1.0, 1.0, -1.0]).reshape(16)


def eligible(conv: Conv2D) -> bool:
    """Whether ``conv`` (built) runs as a Winograd F(2x2, 3x3) convolution: a 3x3 kernel,
    stride 1, one pixel of padding on every side and at least :data:`MIN_CHANNELS`
    input channels."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv._pads == ((1, 1), (1, 1))
        and conv._in_c >= MIN_CHANNELS
    )


def kernel_transform(w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``U = G w G^T`` for a kernel ``(3, 3, C, F)``: ``(16, C, F)`` (position ``4a + b``),
    computed in float64."""
    u = np.einsum("ai,ijcf,bj->abcf", G, w.astype(np.float64), G)
    return np.ascontiguousarray(u.reshape(16, *w.shape[2:]), dtype=dtype)


def kernel_gradient(mw: np.ndarray) -> np.ndarray:
    """``dW = G^T M G`` for the summed position products ``M`` ``(16, C, F)`` (computed
    with the sign-less :func:`_grad_transform`; :data:`SIGNS` restored here):
    ``(3, 3, C, F)`` (float64)."""
    m = (mw.astype(np.float64) * SIGNS[:, None, None]).reshape(4, 4, *mw.shape[1:])
    return np.einsum("ai,abcf,bj->ijcf", G, m, G)


class WinogradStep:
    """Winograd F(2x2, 3x3) execution of an :func:`eligible` :class:`Conv2D`, optionally fused.

    Parameters
    ----------
    conv : Conv2D
        The (built) layer; its ``params`` are read and its ``grads`` written.
    post : {None, "relu", "relu_pool"}
        Also apply a ReLU, or a ReLU and a 2x2 stride-2 max-pool (even output size).

    Notes
    -----
    Input ``(N, H, W, C)``; output ``(N, H, W, F)`` (``(N, H/2, W/2, F)`` with the pool).
    Outputs, input gradients and parameter gradients equal the reference layers' up to
    float rounding (a different, exact algorithm); the max-pool tie rule is that of
    :class:`~galpipe.nn.fast.conv.ConvStep`.  Results do not depend on the number of
    workers (pieces depend on the batch size only; sums over them in a fixed order).
    With :data:`USE_F4_INFERENCE` an inference forward of a
    :func:`~galpipe.nn.fast.winograd4.eligible4` layer runs F(4x4, 3x3)
    (:class:`~galpipe.nn.fast.winograd4.Winograd4Forward`; float32 error ~10x F(2x2)'s); a
    backward pass after it recomputes the F(2x2) training forward.
    """

    algorithm = "winograd"

    def __init__(self, conv: Conv2D, post: str | None = None) -> None:
        if post not in (None, "relu", "relu_pool"):
            raise ModelError(f"conv2d: unknown fused post-op {post!r}")
        if not eligible(conv):
            raise ModelError("conv2d: Winograd F(2x2,3x3) needs a 3x3 stride-1 'same' kernel")
        self.conv = conv
        self.post = post
        self.kind = {None: "conv", "relu": "conv_relu", "relu_pool": "conv_relu_pool"}[post]
        self.size = {None: 1, "relu": 2, "relu_pool": 3}[post]
        h, w, _ = conv.input_shape
        if post == "relu_pool" and (h % 2 or w % 2):
            raise ModelError("conv2d: fused 2x2 max-pool needs an even output size")
        self._th, self._tw = -(-h // 2), -(-w // 2)
        self._bufs = BufferCache(max_entries=64)
        self._cache: dict[str, Any] = {}
        self._f4 = Winograd4Forward(conv, post) if eligible4(conv) else None

    # -- helpers ---------------------------------------------------------------------------
    def _pieces(self, n: int, itemsize: int) -> list[tuple[int, int]]:
        """Sample ranges of about :data:`PIECE_BYTES` of position products (or
        :data:`PIECE_IMAGES` images) each; an even count when > 1.  Depends on ``n`` and
        the layer only, never on the number of workers."""
        images = PIECE_IMAGES
        if images is None:
            per_image = 16 * self._th * self._tw * self.conv.filters * itemsize
            images = max(1, PIECE_BYTES // per_image)
        return batch_pieces(n, images)

    def _scratch(self, tag: str, k: int, shape: tuple[int, ...], dt: np.dtype,
                 zero: bool = False) -> np.ndarray:
        return self._bufs.get(f"{tag}{k}", shape, dt, zero=zero)

    def _input_transform(self, x: np.ndarray, xq: np.ndarray, t: np.ndarray,
                         v: np.ndarray) -> None:
        """``V = B^T d B`` of every tile of ``x`` ``(m, H, W, C)`` into ``v``
        ``(4, 4, m, TH, TW, C)``; ``xq`` ``(>=m, 2TH+2, 2, TW+1, C)`` (zero borders) and ``t``
        ``(4, >=m, 2TH+2, TW, C)`` are scratch."""
        m, h, w, _ = x.shape
        th, tw = self._th, self._tw
        xq = xq[:m]
        t = t[:, :m]
        # padded column pc = col + 1 goes to (parity pc % 2, index pc // 2)
        xq[:, 1 : h + 1, 1, : (w + 1) // 2] = x[:, :, 0::2]
        xq[:, 1 : h + 1, 0, 1 : 1 + w // 2] = x[:, :, 1::2]
        c0, c1 = xq[:, :, 0, :tw], xq[:, :, 1, :tw]
        c2, c3 = xq[:, :, 0, 1 : tw + 1], xq[:, :, 1, 1 : tw + 1]
        np.subtract(c0, c2, out=t[0])
        np.add(c1, c2, out=t[1])
        np.subtract(c2, c1, out=t[2])
        np.subtract(c1, c3, out=t[3])
        r0, r1 = t[:, :, 0 : 2 * th : 2], t[:, :, 1 : 2 * th + 1 : 2]
        r2, r3 = t[:, :, 2 : 2 * th + 2 : 2], t[:, :, 3 : 2 * th + 2 : 2]
        np.subtract(r0, r2, out=v[0])
        np.add(r1, r2, out=v[1])
        np.subtract(r2, r1, out=v[2])
        np.subtract(r1, r3, out=v[3])

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False,
                timings: dict[str, float] | None = None) -> np.ndarray:
        """Convolve ``x`` ``(N, H, W, C)`` (then ReLU / pool as fused).

        ``timings``, when given, gets the seconds spent in each part (input transform, GEMMs,
        output transform, pool / emit: :data:`galpipe.nn.fast.winograd4.PARTS`) added to it,
        summed over the workers (for benchmarks).
        """
        conv = self.conv
        x = checked_input(conv, x)
        dt, n = x.dtype, x.shape[0]
        if not training and USE_F4_INFERENCE and self._f4 is not None:
            out = self._f4.forward(x, timings)
            # a backward pass after this recomputes the F(2x2) training forward from x
            self._cache = {"n": n, "pieces": None, "vall": None, "out": out, "winners": None,
                           "x": x, "dtype": dt}
            return out
        h, w, c = conv.input_shape
        f = conv.filters
        th, tw = self._th, self._tw
        tiles = th * tw
        pool = self.post == "relu_pool"
        pieces = self._pieces(n, dt.itemsize)
        ps = max(b - a for a, b in pieces)
        u = kernel_transform(conv.params["W"], dt)
        bias = conv.params["b"].astype(dt, copy=False) if conv.use_bias else None
        out = np.empty((n, th, tw, f) if pool else (n, h, w, f), dtype=dt)
        winners = (tuple(np.empty(out.shape, dtype=bool) for _ in range(3))
                   if pool and training else None)
        vall = self._bufs.get("vall", (16, n * tiles, c), dt) if training else None

        def work(k: int, lo: int, hi: int) -> list[float]:
            xq = self._scratch("xq", k, (ps, 2 * th + 2, 2, tw + 1, c), dt, zero=True)
            t = self._scratch("t", k, (4, ps, 2 * th + 2, tw, c), dt)
            mm = self._scratch("m", k, (16, ps * tiles, f), dt)
            s = self._scratch("s", k, (2, 4, ps * tiles, f), dt)
            yb = self._scratch("y", k, (2, 2, ps * tiles, f), dt)
            spent = [0.0] * 4
            for a, b in pieces[lo:hi]:
                p = (b - a) * tiles
                t0 = perf_counter()
                if vall is not None:
                    v = vall[:, a * tiles : b * tiles]
                else:
                    v = self._scratch("v", k, (16, ps * tiles, c), dt)[:, :p]
                self._input_transform(x[a:b], xq, t, v.reshape(4, 4, b - a, th, tw, c))
                t1 = perf_counter()
                mp = mm[:, :p]
                np.matmul(v, u, out=mp)
                if bias is not None:
                    mp[5] += bias  # position (1, 1) reaches every pixel of the tile
                t2 = perf_counter()
                y = yb[:, :, :p]
                _output_transform(mp.reshape(4, 4, p, f), s[:, :, :p], y)
                t3 = perf_counter()
                self._emit(y, out, a, b, winners)
                for i, dt_ in enumerate((t1 - t0, t2 - t1, t3 - t2, perf_counter() - t3)):
                    spent[i] += dt_
            return spent

        results = parallel_chunks(work, len(pieces), with_index=True)
        if timings is not None:
            for spent in results:
                for key, value in zip(PARTS, spent, strict=True):
                    timings[key] = timings.get(key, 0.0) + value
        self._cache = {"n": n, "pieces": pieces, "vall": vall, "out": out, "winners": winners,
                       "x": None if training else x, "dtype": dt}
        return out

    def _emit(self, y: np.ndarray, out: np.ndarray, a: int, b: int,
              winners: tuple[np.ndarray, ...] | None) -> None:
        """Write the output blocks ``y`` ``(2, 2, m*TH*TW, F)`` of samples ``a:b`` to ``out``."""
        conv = self.conv
        h, w, _ = conv.input_shape
        th, tw, f, m = self._th, self._tw, conv.filters, b - a
        if self.post == "relu_pool":
            _pool_blocks_relu(y.reshape(4, m, th, tw, f), out[a:b],
                              None if winners is None else [v[a:b] for v in winners])
            return
        relu = self.post == "relu"
        if h % 2 == 0 and w % 2 == 0:
            dest = out[a:b].reshape(m, th, 2, tw, 2, f)
            for dy in range(2):
                for dx in range(2):
                    src = y[dy, dx].reshape(m, th, tw, f)
                    if relu:
                        np.maximum(src, 0, out=dest[:, :, dy, :, dx])
                    else:
                        dest[:, :, dy, :, dx] = src
            return
        for dy in range(2):
            for dx in range(2):
                src = y[dy, dx].reshape(m, th, tw, f)
                hh, ww = (h - dy + 1) // 2, (w - dx + 1) // 2
                dst = out[a:b, dy::2, dx::2]
                if relu:
                    np.maximum(src[:, :hh, :ww], 0, out=dst)
                else:
                    dst[...] = src[:, :hh, :ww]

    # -- backward --------------------------------------------------------------------------
    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """Fill the layer's ``grads``; return ``dx`` ``(N, H, W, C)`` (None when the layer's
        ``input_grad_needed`` is False).  ``dout`` is the gradient w.r.t. the step's output."""
        conv, cache = self.conv, self._cache
        if not cache:
            raise ModelError("conv2d: backward called before forward")
        if cache["vall"] is None or (self.post == "relu_pool" and cache["winners"] is None):
            # the forward pass ran in inference mode: redo it (same values) keeping what
            # the backward pass needs
            self.forward(cache["x"], training=True)
            cache = self._cache
        dt, n = cache["dtype"], cache["n"]
        out = cache["out"]
        dout = np.ascontiguousarray(dout, dtype=dt)
        if dout.shape != out.shape:
            raise ModelError(
                f"conv2d: backward expects a gradient of shape {out.shape}, got {dout.shape}"
            )
        h, w, c = conv.input_shape
        f = conv.filters
        th, tw = self._th, self._tw
        tiles = th * tw
        pieces = cache["pieces"]
        ps = max(b - a for a, b in pieces)
        vall = cache["vall"]
        need_dx = conv.input_grad_needed
        even = h % 2 == 0 and w % 2 == 0
        if need_dx:
            # U_p^T with the signs of the transformed output gradient folded in
            ut64 = kernel_transform(conv.params["W"], np.dtype(np.float64)) * SIGNS[:, None, None]
            ut = np.ascontiguousarray(ut64.transpose(0, 2, 1), dtype=dt)
        dx = np.empty((n, h, w, c), dtype=dt) if need_dx else None

        def work(k: int, lo: int, hi: int) -> list[tuple[np.ndarray, np.ndarray]]:
            # the 16 transformed positions, stacked; the output gradient lands in the
            # corners (zeroed once for odd sizes: the cropped pixels are never written)
            eb = self._scratch("e16", k, (16, ps * tiles, f), dt, zero=not even)
            if need_dx:
                dd = self._scratch("dd", k, (16, ps * tiles, c), dt)
                z = self._scratch("z", k, (2, 4, ps * tiles, c), dt)
                dxb = (None if even else
                       self._scratch("dxb", k, (ps, th, 2, tw, 2, c), dt))
            parts = []
            for a, b in pieces[lo:hi]:
                m, p = b - a, (b - a) * tiles
                eps = eb[:, :p]
                g4 = eps.reshape(4, 4, p, f)
                self._output_grad(dout, out, cache["winners"], a, b, g4[::3, ::3])
                _grad_transform(g4)
                v = vall[:, a * tiles : b * tiles]
                # one stacked matmul per product (16 single-threaded GEMMs inside): faster
                # than 16 np.dot calls, and they scale better on two workers (measured)
                mw = np.empty((16, c, f), dtype=dt)
                np.matmul(v.transpose(0, 2, 1), eps, out=mw)
                parts.append((mw, eps[5].sum(axis=0)))
                if need_dx:
                    ddp = dd[:, :p]
                    np.matmul(eps, ut, out=ddp)
                    target = (dx[a:b].reshape(m, th, 2, tw, 2, c) if even else dxb[:m])
                    _input_grad_transform(ddp.reshape(4, 4, m, th, tw, c), z[:, :, :p], target)
                    if not even:
                        dx[a:b] = target.reshape(m, 2 * th, 2 * tw, c)[:, :h, :w]
            return parts

        results = [p for parts in parallel_chunks(work, len(pieces), with_index=True)
                   for p in parts]
        mw_total = sum_arrays([r[0] for r in results])
        conv.grads["W"][...] = kernel_gradient(mw_total)
        if conv.use_bias:
            conv.grads["b"][...] = sum_arrays([r[1] for r in results])
        return dx

    def _output_grad(self, dout: np.ndarray, out: np.ndarray,
                     winners: tuple[np.ndarray, ...] | None, a: int, b: int,
                     e: np.ndarray) -> None:
        """Gradient w.r.t. the convolution output of samples ``a:b`` in tile blocks ``e``
        ``(2, 2, m*TH*TW, F)`` (through the fused ReLU / pool); ``e`` may be a strided view,
        each ``e[dy, dx]`` is contiguous."""
        conv = self.conv
        h, w, _ = conv.input_shape
        th, tw, f, m = self._th, self._tw, conv.filters, b - a
        if self.post == "relu_pool":
            assert winners is not None
            _unpool_blocks_relu(dout[a:b], out[a:b], [v[a:b] for v in winners],
                                [e[k // 2, k % 2].reshape(m, th, tw, f) for k in range(4)])
            return
        relu = self.post == "relu"
        for dy in range(2):
            for dx in range(2):
                hh, ww = (h - dy + 1) // 2, (w - dx + 1) // 2
                dst = e[dy, dx].reshape(m, th, tw, f)[:, :hh, :ww]
                src = dout[a:b, dy::2, dx::2]
                if relu:
                    np.multiply(src, out[a:b, dy::2, dx::2] > 0, out=dst)
                else:
                    dst[...] = src


def _output_transform(mm: np.ndarray, s: np.ndarray, y: np.ndarray) -> None:
    """``Y = A^T M A``: ``mm`` ``(4, 4, P, F)`` to ``y`` ``(2, 2, P, F)``; ``s``
    ``(2, 4, P, F)`` scratch.  ``A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]``.  Every call works on
    contiguous arrays (NumPy's strided loops are about 2x slower)."""
    np.add(mm[0], mm[1], out=s[0])
    s[0] += mm[2]
    np.subtract(mm[1], mm[2], out=s[1])
    s[1] -= mm[3]
    for i in range(2):
        si, yi = s[i], y[i]
        np.add(si[0], si[1], out=yi[0])
        yi[0] += si[2]
        np.subtract(si[1], si[2], out=yi[1])
        yi[1] -= si[3]


def _grad_transform(g: np.ndarray) -> None:
    """``E = A e A^T`` up to the signs :data:`SIGNS`, in place in ``g`` ``(4, 4, P, F)``.

    On entry the corners ``g[3*dy, 3*dx]`` hold the output gradient ``e`` of pixel
    ``(dy, dx)`` of every tile; on return ``g[a, b]`` holds ``SIGNS[a, b] * E_ab``.
    ``A = [[1, 0], [1, 1], [1, -1], [0, -1]]``; the ``-1`` of row 3 is left out (the GEMM
    operands carry the sign), so positions 0 and 3 of each axis are ``e`` itself and
    nothing is copied or negated: four ufunc calls over stacked arrays.
    """
    # rows 1, 2 at columns 0 and 3: e0 + e1, e0 - e1 (row 3 = e1, true -e1)
    np.add(g[0, ::3], g[3, ::3], out=g[1, ::3])
    np.subtract(g[0, ::3], g[3, ::3], out=g[2, ::3])
    # columns 1, 2 of every row
    np.add(g[:, 0], g[:, 3], out=g[:, 1])
    np.subtract(g[:, 0], g[:, 3], out=g[:, 2])


def _input_grad_transform(dd: np.ndarray, z: np.ndarray, dest: np.ndarray) -> None:
    """``B D B^T`` of every tile, overlap-added and cropped to the unpadded input.

    ``dd`` ``(4, 4, m, TH, TW, C)`` (positions ``(a, b)``), ``z`` ``(2, 4, m*TH*TW, C)``
    scratch, ``dest`` ``(m, TH, 2, TW, 2, C)``: input pixel ``(2s + py, 2t + px)``.

    With ``B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`` and tiles at
    stride 2 starting one pixel above/left of the input, input row ``2s`` gets
    ``D1[s] - D2[s] + D3[s] - D3[s-1]`` and row ``2s+1`` gets
    ``D1[s] + D2[s] + D0[s+1] - D0[s]`` (likewise for columns).
    """
    _, _, m, th, tw, c = dd.shape
    z6 = z.reshape(2, 4, m, th, tw, c)
    ev, od = z6[0], z6[1]
    np.subtract(dd[1], dd[2], out=ev)
    ev += dd[3]
    ev[:, :, 1:] -= dd[3][:, :, :-1]
    np.add(dd[1], dd[2], out=od)
    od -= dd[0]
    od[:, :, :-1] += dd[0][:, :, 1:]
    # columns: z6[py, b] is (m, TH, TW, C); dest[:, :, py, :, px] is (m, TH, TW, C)
    for py in range(2):
        zz = z6[py]
        d0 = dest[:, :, py, :, 0]
        np.subtract(zz[1], zz[2], out=d0)
        d0 += zz[3]
        d0[:, :, 1:] -= zz[3][:, :, :-1]
        d1 = dest[:, :, py, :, 1]
        np.add(zz[1], zz[2], out=d1)
        d1 -= zz[0]
        d1[:, :, :-1] += zz[0][:, :, 1:]
