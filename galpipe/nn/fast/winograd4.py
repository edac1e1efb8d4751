"""Winograd F(4x4, 3x3) inference forward: 3x3, stride 1, padding 1 ('same'), channels-last.

Lavin & Gray's F(4x4, 3x3) (interpolation points ``0, +-1, +-2, inf``): each 4x4 output tile is

    Y = A^T [ (G w G^T) . (B^T d B) ] A

for the 6x6 input tile ``d`` around it (tiles at stride 4).  Summed over input channels the
element-wise product over the 36 positions ``p = 6a + b`` is 36 matrix products
``M_p = V_p @ U_p`` (``V_p`` ``(tiles, C)``, ``U_p`` ``(C, F)``): 36 * C * F multiplies per
16 output pixels, 4x fewer than direct convolution (F(2x2, 3x3): 2.25x fewer).

Only the inference forward (``training=False``) uses it
(:class:`~galpipe.nn.fast.winograd.WinogradStep` dispatches here when
:data:`galpipe.nn.fast.winograd.USE_F4_INFERENCE` is set and :func:`eligible4` holds);
training and both gradients stay F(2x2, 3x3).

Implementation notes (NumPy only):

* The batch is cut into pieces of about :data:`PIECE_BYTES` of position products,
  spread over worker threads with per-worker scratch (as ``WinogradStep``); pieces
  depend on the batch size and the layer only, so results do not depend on the
  number of workers.
* Input: one copy into a zero-bordered padded buffer laid out ``(m, TH+1, 4, TW+1, 4,
  C)`` -- rows and columns split into (tile, offset mod 4), so every tile offset is a
  plain slice -- then four copies gather the 36 tile positions into ``D`` ``(6, 6, m, TH,
  TW, C)``.  ``B^T d B`` is then two matrix products with the 6x6 ``B^T``: one along the
  column position (six GEMMs ``(6, 6) @ (6, m*TH*TW*C)``), one along the row position
  (one GEMM ``(6, 6) @ (6, 6*m*TH*TW*C)``).  Measured (1 thread, batch 64, 16->32 @ 32x32):
  2.2 ms for the two products against 2.8 ms for the common-subexpression ufunc form
  (``(d4 - 4 d2) +- (d3 - 4 d1)``, ``(d4 - d2) +- 2 (d3 - d1)``, ...; 17 ufunc calls per axis).
* Output: ``A^T M A`` is likewise two products with the 4x6 ``A^T`` on the stacked ``M``
  ``(36, P, F)``; the bias is added to position ``(1, 1)`` (``A^T``'s column 1 is all ones,
  so it reaches every pixel of the tile).  The fused ReLU + 2x2 max-pool takes the maximum
  over the four output blocks of each pooling window (windows lie inside a tile: output H
  and W are multiples of 4) and writes the pooled tile blocks into the output.
* Accuracy: ``B^T`` and ``A^T`` hold 4, 5 and 8, ``G`` 1/6, 1/12 and 1/24, so float32
  rounding grows: see ``benchmarks/bench_winograd4.py`` and the module constant's notes
  in :mod:`galpipe.nn.fast.winograd` for the measured errors.
"""

from __future__ import annotations

import time

import numpy as np

from galpipe.errors import ModelError
from galpipe.nn.conv import Conv2D
from galpipe.nn.fast.conv import checked_input
from galpipe.nn.fast.threads import BufferCache, batch_pieces, parallel_chunks

#: Target size in bytes of the 36 position products ``M`` of one piece
#: (``36 * tiles * F * itemsize``; at least one image per piece).  Measured
#: (``benchmarks/bench_winograd4.py``, batch 64, 1 and 2 workers, interleaved): 1 MiB (3
#: images of the 16->32 @ 32x32 layer, 7 of the 32->64 @ 16x16 one) beat 0.5 MiB by 5-12%
#: and 2 MiB by 1-10%.
PIECE_BYTES = 1 << 20
#: Fixed images per piece instead of :data:`PIECE_BYTES` (None: by bytes; tests set it).
PIECE_IMAGES: int | None = None

#: ``B^T`` of F(4x4, 3x3) (input transform, 6x6).
BT = np.array(
    [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ]
)
#: ``G`` of F(4x4, 3x3) (kernel transform, 6x3).
G = np.array(
    [
        [1 / 4, 0.0, 0.0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0.0, 0.0, 1.0],
    ]
)
#: ``A^T`` of F(4x4, 3x3) (output transform, 4x6).
AT = np.array(
    [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ]
)
#: Position whose product reaches every output pixel of a tile with weight 1: ``(1, 1)``.
BIAS_POSITION = 6 * 1 + 1
#: Names of the parts timed by :meth:`Winograd4Forward.forward` (``timings=``).
PARTS = ("input", "gemm", "output", "pool")


def eligible4(conv: Conv2D) -> bool:
    """Whether ``conv`` (built) can run as F(4x4, 3x3): a 3x3 kernel, stride 1, one pixel of
    padding on every side, at least ``winograd.MIN_CHANNELS`` input channels, and an input
    (= output) height and width divisible by 4 (so 2x2 pooling windows lie inside tiles)."""
    from galpipe.nn.fast.winograd import eligible

    h, w, _ = conv.input_shape
    return eligible(conv) and h % 4 == 0 and w % 4 == 0


def kernel_transform4(w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``U = G w G^T`` for a kernel ``(3, 3, C, F)``: ``(36, C, F)`` (position ``6a + b``),
    computed in float64 and rounded once to ``dtype``."""
    u = np.einsum("ai,ijcf,bj->abcf", G, w.astype(np.float64), G)
    return np.ascontiguousarray(u.reshape(36, *w.shape[2:]), dtype=dtype)


class Winograd4Forward:
    """F(4x4, 3x3) inference forward of an :func:`eligible4` :class:`Conv2D`, optionally fused.

    Parameters
    ----------
    conv : Conv2D
        The (built) layer; its ``params`` are read (never written).
    post : {None, "relu", "relu_pool"}
        Also apply a ReLU, or a ReLU and a 2x2 stride-2 max-pool.

    Notes
    -----
    Input ``(N, H, W, C)``; output ``(N, H, W, F)`` (``(N, H/2, W/2, F)`` with the pool).
    Outputs equal the reference layers' up to float rounding (larger than F(2x2)'s: see the
    module notes).  Results do not depend on the number of workers.
    """

    def __init__(self, conv: Conv2D, post: str | None = None) -> None:
        if post not in (None, "relu", "relu_pool"):
            raise ModelError(f"conv2d: unknown fused post-op {post!r}")
        if not eligible4(conv):
            raise ModelError(
                "conv2d: Winograd F(4x4,3x3) needs a 3x3 stride-1 'same' kernel, at least 16 "
                f"input channels and a height and width divisible by 4; got kernel "
                f"{conv.kernel_size}, stride {conv.stride}, input {conv.input_shape}"
            )
        self.conv = conv
        self.post = post
        h, w, _ = conv.input_shape
        self._th, self._tw = h // 4, w // 4
        self._bufs = BufferCache(max_entries=32)
        #: (dtype, copy of the kernel, its transform): reused while the kernel is unchanged
        self._u_cache: tuple[np.dtype, np.ndarray, np.ndarray] | None = None

    def transformed_kernel(self, dtype: np.dtype) -> np.ndarray:
        """``U`` ``(36, C, F)`` of the layer's current kernel (:func:`kernel_transform4`).

        The transform (1.3 ms for a 32->64 kernel, run before the batch is split over the
        workers) is kept with a copy of the kernel it came from and reused while the kernel
        is unchanged (one comparison, ~0.02 ms): every batch of a prediction or validation
        pass after the first.  Training updates the kernel in place; the comparison sees it.
        """
        w = self.conv.params["W"]
        cached = self._u_cache
        if cached is not None and cached[0] == dtype and np.array_equal(cached[1], w):
            return cached[2]
        u = kernel_transform4(w, dtype)
        self._u_cache = (np.dtype(dtype), w.copy(), u)
        return u

    def pieces(self, n: int, itemsize: int) -> list[tuple[int, int]]:
        """Sample ranges of about :data:`PIECE_BYTES` of position products (or
        :data:`PIECE_IMAGES` images) each; an even count when > 1.  Depends on ``n`` and the
        layer only, never on the number of workers."""
        images = PIECE_IMAGES
        if images is None:
            per_image = 36 * self._th * self._tw * self.conv.filters * itemsize
            images = max(1, PIECE_BYTES // per_image)
        return batch_pieces(n, images)

    def forward(self, x: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """Convolve ``x`` ``(N, H, W, C)`` (then ReLU / pool as fused).

        Parameters
        ----------
        x : ndarray
            ``(N, H, W, C)`` input.
        timings : dict, optional
            When given, the seconds spent in each of :data:`PARTS`, summed over workers,
            are added to it (for benchmarks).

        Returns
        -------
        ndarray
            ``(N, H, W, F)``, or ``(N, H/2, W/2, F)`` with the fused pool; a new array.
        """
        conv = self.conv
        x = checked_input(conv, x)
        dt, n = x.dtype, x.shape[0]
        h, w, c = conv.input_shape
        f = conv.filters
        th, tw = self._th, self._tw
        tiles = th * tw
        pool = self.post == "relu_pool"
        pieces = self.pieces(n, dt.itemsize)
        ps = max(b - a for a, b in pieces)
        u = self.transformed_kernel(dt)
        bias = conv.params["b"].astype(dt, copy=False) if conv.use_bias else None
        bt, at = BT.astype(dt), AT.astype(dt)
        out = np.empty((n, h // 2, w // 2, f) if pool else (n, h, w, f), dtype=dt)
        big = 36 * ps * tiles * max(c, f)

        def work(k: int, lo: int, hi: int) -> dict[str, float]:
            spent = dict.fromkeys(PARTS, 0.0)
            xp = self._bufs.get(f"xp{k}", (ps, th + 1, 4, tw + 1, 4, c), dt, zero=True)
            buf_a = self._bufs.get(f"a{k}", (big,), dt)
            buf_b = self._bufs.get(f"b{k}", (big,), dt)
            buf_m = self._bufs.get(f"m{k}", (36 * ps * tiles * f,), dt)
            for a, b in pieces[lo:hi]:
                m = b - a
                p = m * tiles
                t0 = time.perf_counter()
                v = _input_transform(x[a:b], xp[:m], buf_a, buf_b, bt)
                t1 = time.perf_counter()
                mm = buf_m[: 36 * p * f].reshape(36, p, f)
                np.matmul(v, u, out=mm)
                if bias is not None:
                    mm[BIAS_POSITION] += bias
                t2 = time.perf_counter()
                y = buf_b[: 16 * p * f].reshape(4, 4, m, th, tw, f)
                s = buf_a[: 24 * p * f].reshape(4, 6 * p * f)
                np.matmul(at, mm.reshape(6, 6 * p * f), out=s)
                np.matmul(at, s.reshape(4, 6, p * f), out=y.reshape(4, 4, p * f))
                t3 = time.perf_counter()
                self._emit(y, out[a:b], buf_a, buf_m)
                t4 = time.perf_counter()
                spent["input"] += t1 - t0
                spent["gemm"] += t2 - t1
                spent["output"] += t3 - t2
                spent["pool"] += t4 - t3
            return spent

        results = parallel_chunks(work, len(pieces), with_index=True)
        if timings is not None:
            for spent in results:
                for key, value in spent.items():
                    timings[key] = timings.get(key, 0.0) + value
        return out

    def _emit(self, y: np.ndarray, out: np.ndarray, scratch: np.ndarray,
              scratch2: np.ndarray) -> None:
        """Write the output tiles ``y`` ``(4, 4, m, TH, TW, F)`` (pixel ``(r, c)`` of every
        tile) to ``out`` ``(m, H, W, F)`` or, pooled, ``(m, H/2, W/2, F)``; ``scratch`` and
        ``scratch2`` (flat, at least ``8 * m*TH*TW*F`` and ``4 * m*TH*TW*F``) are free."""
        _, _, m, th, tw, f = y.shape
        if self.post == "relu_pool":
            z = scratch[: y.size // 2].reshape(2, 4, m, th, tw, f)
            wmax = scratch2[: y.size // 4].reshape(2, 2, m, th, tw, f)
            np.maximum(y[0::2], y[1::2], out=z)  # rows 2u, 2u+1
            np.maximum(z[:, 0::2], z[:, 1::2], out=wmax)  # columns 2v, 2v+1
            dest = out.reshape(m, th, 2, tw, 2, f)
            np.maximum(wmax.transpose(2, 3, 0, 4, 1, 5), 0, out=dest)
            return
        dest = out.reshape(m, th, 4, tw, 4, f)
        src = y.transpose(2, 3, 0, 4, 1, 5)
        if self.post == "relu":
            np.maximum(src, 0, out=dest)
        else:
            np.copyto(dest, src)


def _input_transform(x: np.ndarray, xp: np.ndarray, buf_a: np.ndarray, buf_b: np.ndarray,
                     bt: np.ndarray) -> np.ndarray:
    """``V = B^T d B`` of every 6x6 tile of ``x`` ``(m, H, W, C)``: a view of ``buf_a``
    ``(36, m*TH*TW, C)`` (position ``6a + b``).

    ``xp`` ``(m, TH+1, 4, TW+1, 4, C)`` is the zero-bordered padded input (padded pixel
    ``(4i + r, 4j + s)`` at ``[:, i, r, j, s]``; only its interior is written); ``buf_a``,
    ``buf_b`` flat scratch of at least ``36 * m*TH*TW*C`` values; ``bt`` is ``B^T`` (6x6).
    """
    m, h, w, c = x.shape
    th, tw = h // 4, w // 4
    size = 36 * m * th * tw * c
    flat = xp.reshape(m, 4 * th + 4, 4 * tw + 4, c)
    flat[:, 1 : h + 1, 1 : w + 1] = x
    # D[r, s] = padded pixel (4i + r, 4j + s): offsets 0..3 at tile i, 4..5 at tile i + 1
    d = buf_a[:size].reshape(6, 6, m, th, tw, c)
    order = (2, 4, 0, 1, 3, 5)
    d[0:4, 0:4] = xp[:, 0:th, :, 0:tw, :].transpose(order)
    d[4:6, 0:4] = xp[:, 1:, 0:2, 0:tw, :].transpose(order)
    d[0:4, 4:6] = xp[:, 0:th, :, 1:, 0:2].transpose(order)
    d[4:6, 4:6] = xp[:, 1:, 0:2, 1:, 0:2].transpose(order)
    cols = size // 36
    t = buf_b[:size].reshape(6, 6, cols)
    np.matmul(bt, d.reshape(6, 6, cols), out=t)  # along the column position
    v = buf_a[:size].reshape(6, 6 * cols)
    np.matmul(bt, t.reshape(6, 6 * cols), out=v)  # along the row position
    return v.reshape(36, m * th * tw, c)
